"""tools/sass_chains.py on hand-written SASS: chains follow register results, stop at sync
points and branch targets."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import sass_chains  # noqa: E402

CODE = [
    (0x00, "FMNMX R1, R2, R3, !PT"),
    (0x10, "FMNMX R4, R1, R5, !PT"),
    (0x20, "FADD R9, R10, R11"),          # independent
    (0x30, "FMNMX R6, R4, R7, !PT"),
    (0x40, "STS [R4], R1"),               # reads R4 and R1, writes nothing
    (0x50, "FMUL R12, R9, R6"),           # 4 deep: R1 -> R4 -> R6 -> R12
    (0x60, "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24"),
    (0x70, "FADD R13, R12, R12"),         # after the HGMMA: a new stretch
    (0x80, "BRA 0xa0"),                   # (instructions() drops the guard, @P0)
    (0x90, "FADD R14, R13, R1"),
    (0xa0, "FADD R15, R14, R14"),         # a branch target: a new stretch
    (0xb0, "ISETP.GE.AND P1, PT, R15, RZ, PT"),
    (0xc0, "FADD R16, R15, R1"),
    (0xd0, "FADD R17, R16, R16"),
]


def test_chains_follow_results_and_stop_at_sync_points_and_targets():
    runs = [[a for a, _ in run] for run in sass_chains.stretches(CODE)]
    assert runs == [[0x00, 0x10, 0x20, 0x30, 0x40, 0x50], [0x70], [0x90], [0xa0, 0xb0, 0xc0, 0xd0]]
    first = sass_chains.longest_chain([i for i in CODE if i[0] <= 0x50])
    assert first == [(0x00, "FMNMX"), (0x10, "FMNMX"), (0x30, "FMNMX"), (0x50, "FMUL")]
    last = sass_chains.longest_chain([i for i in CODE if i[0] >= 0xa0])
    assert last == [(0xa0, "FADD"), (0xc0, "FADD"), (0xd0, "FADD")]
