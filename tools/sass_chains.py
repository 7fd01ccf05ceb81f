"""The longest chains of dependent instructions in a kernel variant's SASS, between sync
points: where each instruction reads the one before's result, the chain's length is time
the warp cannot hide. v30 found two in the seesaw kernel's softmax this way (a row max and
a row sum, 16 deep each; docs/PERF.md v30). Runs without a GPU (NVRTC and cuobjdump).

  python tools/sass_chains.py decode.bf16.d576.dv512.m64.seesaw.q_tma.causal [top]
  FLASHMLA_JIT_DEFINES="NAME=1" python tools/sass_chains.py SPEC   # a kernel experiment

A stretch ends at every HGMMA, barrier, mbarrier (SYNCS), warpgroup fence, branch and
branch target. Prints the `top` (default 20) longest chains: length, address range, and
the chain's opcodes (FMNMXx7 = seven in a row). Register dependences only (no predicates,
no uniform registers), and a count of instructions, not cycles: MUFU and loads weigh more.
"""
import itertools
import os
import pathlib
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from flashmla_jit import compiler, spec  # noqa: E402
from test_kernels import cuobjdump, sass  # noqa: E402

ENDS = ("HGMMA", "BAR", "SYNCS", "WARPGROUP", "BRA", "EXIT", "WARPSYNC", "NANOSLEEP", "RET", "CALL")
NO_DEST = ("ST", "RED", "ATOM", "UTMA", "UBLKCP", "DEPBAR", "MEMBAR", "FENCE", "CCTL", "NOP", "ISETP", "FSETP")


def instructions(name: str) -> list:
    """(address, text without its guard predicate) of spec `name`'s SASS."""
    kernel = next((s for s in spec.default_specs() if s.name == name), None)
    if kernel is None:
        sys.exit(f"no spec named {name}; names: " + ", ".join(s.name for s in spec.default_specs()))
    tool = cuobjdump()
    if tool is None:
        sys.exit("cuobjdump not found: pip install nvidia-cuda-cuobjdump")
    with tempfile.TemporaryDirectory() as folder:
        listing = sass(compiler.compile_spec(kernel).cubin, pathlib.Path(folder))
    found = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", listing)
    return [(int(a, 16), re.sub(r"^@!?U?P\w+\s+", "", text)) for a, text in found]


def stretches(code: list):
    """Runs of instructions with no sync point, branch or branch target inside."""
    targets = {int(t, 16) for _, text in code for t in re.findall(r"BRA\S*\s+.*?0x([0-9a-f]+)", text)}
    run = []
    for address, text in code:
        if address in targets or text.split()[0].startswith(ENDS):
            yield run
            run = []
        if not text.split()[0].startswith(ENDS):
            run.append((address, text))
    yield run


def longest_chain(run: list) -> list:
    """The longest chain of (address, opcode) in `run` where each reads the last's result."""
    last_write, best = {}, []  # register -> the chain that ends writing it
    for address, text in run:
        opcode, _, operands = text.partition(" ")
        operands = [o.strip() for o in operands.split(",")]
        dest = None if opcode.startswith(NO_DEST) else re.fullmatch(r"R\d+", operands[0])
        reads = re.findall(r"\bR\d+\b", " ".join(operands[1:] if dest else operands))
        chain = max((last_write.get(r, []) for r in reads), key=len, default=[]) + [(address, opcode)]
        if dest:
            last_write[dest.group()] = chain
        best = max(best, chain, key=len)
    return best


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "decode.bf16.d576.dv512.m64.seesaw.q_tma.causal"
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    chains = sorted(filter(None, map(longest_chain, stretches(instructions(name)))), key=len, reverse=True)
    for chain in chains[:top]:
        ops = " ".join(f"{op}x{n}" if n > 1 else op
                       for op, n in ((op, len(list(g))) for op, g in itertools.groupby(op for _, op in chain)))
        print(f"{len(chain):3d}  {chain[0][0]:05x}-{chain[-1][0]:05x}  {ops}")


if __name__ == "__main__":
    main()
