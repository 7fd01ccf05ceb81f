"""Every precompile variant compiles with NVRTC for sm_90a, and its SASS is what we meant.

Real compiles of the real kernels (no GPU needed). The compiler already rejects any
spill; here the disassembly is checked for the instructions each kernel is built on.
"""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from flashmla_jit import compiler, spec


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import nvidia
    except ImportError:
        return None
    for root in nvidia.__path__:
        for sub in ("cu13/bin", "cuda_cuobjdump/bin"):
            path = pathlib.Path(root) / sub / "cuobjdump"
            if path.exists():
                return str(path)
    return None


def sass(cubin: bytes, tmp_path) -> str:
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not installed (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    path = tmp_path / "k.cubin"
    path.write_bytes(cubin)
    return subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True, check=True).stdout


EXPECTED = {
    # kind: instructions that must appear (tensor-core MMA, ldmatrix, async copies, ex2)
    "decode": ["LDGSTS", "MUFU.EX2", "BAR.SYNC"],
    # 64-row tiles (decode_wgmma.cuh, seesaw): wgmma, named-barrier handoffs between the
    # two warpgroups, proxy fences for the cp.async -> wgmma and st.shared -> wgmma paths
    "decode.m64": ["HGMMA.64x64x16.F32", "HGMMA.64x256x16.F32", "WARPGROUP.ARRIVE", "BAR.ARV",
                   "FENCE.VIEW.ASYNC.S"],
    "decode.mma_sync": ["HMMA.16816.F32", "LDSM.16.M88.4", "LDSM.16.MT88.4"],              # 16/32 rows
    "combine": ["MUFU.EX2", "LDG.E.128"],
    "metadata": ["SHFL.UP", "BAR.SYNC"],
}


@pytest.mark.parametrize("s", spec.all_specs(), ids=lambda s: s.name)
def test_variant_compiles_without_spills_and_uses_the_meant_instructions(s, tmp_path):
    artifact = compiler.compile_spec(s)
    code = sass(artifact.cubin, tmp_path)
    assert "sm_90a" in code
    expected = list(EXPECTED[s.kind])
    if s.kind == "decode":
        expected += EXPECTED["decode.m64" if s.tile_rows == 64 else "decode.mma_sync"]
    for instruction in expected:
        assert instruction in code, f"{s.name}: {instruction} missing from SASS"
    if s.kind == "decode" and s.tile_rows == 64:
        assert "HMMA" not in code, f"{s.name}: 64-row tiles must run on wgmma only"
        # as for HMMA, only bf16 inputs print a type suffix
        assert ("HGMMA.64x256x16.F32.BF16" in code) == (s.dtype == "bf16")
        hgmma = [line for line in code.splitlines() if "HGMMA." in line]
        s_mma = [line for line in hgmma if ".64x64x16." in line]
        pv_mma = [line for line in hgmma if ".64x256x16." in line]
        # 4 S batches in the code (each warpgroup: first block + loop) x d/16 k-steps,
        # 4 PV batches (own P from registers, other's P from smem, per warpgroup) x 4
        assert len(s_mma) == 4 * (s.head_dim // 16), f"{s.name}: {len(s_mma)} m64n64k16"
        assert len(pv_mma) == 4 * 4, f"{s.name}: {len(pv_mma)} m64n256k16"
        # RS forms (A from registers: "HGMMA... R, R, gdesc"): P V with the own P, and
        # the rope k-steps of S (Q's rope part is held in registers)
        rs = [line for line in hgmma if ", gdesc" in line and line.split("gdesc")[0].count("R") >= 2]
        assert len(rs) == 2 * 4 + (4 * 4 if s.head_dim > s.head_dim_v else 0), f"{s.name}: {len(rs)} RS wgmma"
        # Not serialized: only the last wgmma of each batch waits on the group barrier
        # (gsb0), one batch per WARPGROUP.ARRIVE.
        assert sum("gsb0" in line for line in hgmma) == code.count("WARPGROUP.ARRIVE"), s.name
    elif s.kind == "decode":
        # fp16 inputs print as plain HMMA.16816.F32; bf16 ones carry a .BF16 suffix
        assert ("HMMA.16816.F32.BF16" in code) == (s.dtype == "bf16")
    for local in ("LDL", "STL"):
        assert f" {local}" not in code, f"{s.name}: local-memory access {local} in SASS"


def test_import_is_lazy():
    code = ("import sys, flashmla_jit; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'cupy') or m.startswith('cuda.')))")
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).parent.parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]", out.stdout
