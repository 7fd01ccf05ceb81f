"""Every precompile variant compiles with NVRTC for sm_90a, and its SASS is what we meant.

Real compiles of the real kernels (no GPU needed). The compiler already rejects any
spill; here the disassembly is checked for the instructions each kernel is built on.
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from flashmla_jit import compiler, spec


def cuobjdump():
    """cuobjdump's path (on PATH or from pip's nvidia-cuda-cuobjdump), or None; this and
    sass() are also used by tools/sass_chains.py."""
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
    tool = cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not installed (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    path = tmp_path / "k.cubin"
    path.write_bytes(cubin)
    return subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True, check=True).stdout


EXPECTED = {
    # kind: instructions that must appear (tensor-core MMA, ldmatrix, async copies, ex2)
    "decode": ["MUFU.EX2", "BAR.SYNC"],
    "decode.cp_async": ["LDGSTS"],  # Q (and KV, outside the seesaw) by per-thread async copies
    "decode.m64": ["HGMMA.64x64x16.F32", "HGMMA.64x256x16.F32", "WARPGROUP.ARRIVE"],        # wgmma
    "decode.mma_sync": ["HMMA.16816.F32", "LDSM.16.M88.4", "LDSM.16.MT88.4"],              # 16/32 rows
    # the seesaw: KV by TMA onto mbarriers (no per-thread KV copies), named-barrier arrives
    "decode.seesaw": ["UTMALDG.4D", "SYNCS.ARRIVE.TRANS64", "BAR.ARV"],
    # FP8 caches: e4m3 -> f16x2 unpack, 128-bit staging reads and tile writes; bf16 tiles
    # get the exact f16 -> bf16 rebias (HMUL2.BF16), the 656 layout its split-scale FMA.
    "decode.fp8": ["F2FP.F16.E4M3.UNPACK_B", "LDS.128", "STS.128"],
    "decode.fp8_e4m3.bf16": ["HMUL2.BF16"],
    "decode.fp8_656": ["HMUL2.BF16", "HFMA2.BF16"],
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
        expected += EXPECTED["decode.seesaw"] if s.seesaw else []
        expected += [] if s.q_tma else EXPECTED["decode.cp_async"]
    if s.kind == "decode" and s.kv_format != "same":
        expected += EXPECTED["decode.fp8"] + EXPECTED.get(f"decode.{s.kv_format}.{s.dtype}", [])
        expected += EXPECTED.get(f"decode.{s.kv_format}", [])
    for instruction in expected:
        assert instruction in code, f"{s.name}: {instruction} missing from SASS"
    if s.q_tma:  # Q by TMA: no per-thread copy left in the kernel
        assert "LDGSTS" not in code, f"{s.name}: Q by TMA, yet LDGSTS in SASS"
    if s.kind == "decode" and s.tile_rows == 64:
        assert "HMMA" not in code, f"{s.name}: 64-row tiles must run on wgmma only"
        # as for HMMA, only bf16 inputs print a type suffix
        assert ("HGMMA.64x256x16.F32.BF16" in code) == (s.dtype == "bf16")
    elif s.kind == "decode":
        # fp16 inputs print as plain HMMA.16816.F32; bf16 ones carry a .BF16 suffix
        assert ("HMMA.16816.F32.BF16" in code) == (s.dtype == "bf16")
    for local in ("LDL", "STL"):
        assert f" {local}" not in code, f"{s.name}: local-memory access {local} in SASS"


def _loops(code: str) -> list:
    """(instructions, HGMMAs) spanned by each backward branch of a SASS listing."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", code)]
    loops = []
    for addr, text in ins:
        branch = re.search(r"\bBRA(?:\.\S+)?\s+0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < addr:
            body = [t for a, t in ins if int(branch.group(1), 16) <= a <= addr]
            loops.append((len(body), sum("HGMMA" in t for t in body)))
    return loops


@pytest.mark.parametrize("d,causal,evict_first", [(576, False, False), (512, True, False), (576, True, True)])
def test_seesaw_steady_loops_stay_small(d, causal, evict_first, tmp_path):
    """Each warpgroup's loop over steady pairs (S of a block, two PVs: d / 16 + 8 HGMMA)
    stays near FlashMLA's size: code the loop never runs, left inline, cost 4-7 % of
    compute-bound time (docs/PERF.md, v11)."""
    s = spec.KernelSpec("decode", "bf16", d, 512, causal=causal, tile_rows=64, seesaw=True, kv_evict_first=evict_first)
    code = sass(compiler.compile_spec(s).cubin, tmp_path)
    sizes = sorted(n for n, hgmma in _loops(code) if hgmma == d // 16 + 8)
    assert len(sizes) >= 4, f"{s.name}: expected a steady and a general loop per warpgroup, got {sizes}"
    assert sizes[1] <= 1100, f"{s.name}: steady loops of {sizes[:2]} SASS instructions"


def test_fp8_variants_are_in_the_all_set():
    fp8 = [s for s in spec.all_specs() if s.kv_format != "same"]
    assert {s.kv_format for s in fp8} == {"fp8_e4m3", "fp8_656"}
    assert all(s.tile_rows <= spec.FP8_MAX_TILE_ROWS for s in fp8)
    assert {(s.dtype, s.head_dim) for s in fp8 if s.kv_format == "fp8_656"} == {("bf16", 576)}


def test_shared_memory_plan_matches_the_struct(tmp_path):
    """KernelSpec.smem_bytes (the launch's dynamic smem) equals sizeof(DecodeSmem<...>)."""
    asserts = []
    for s in spec.all_specs():
        if s.kind == "decode" and s.seesaw:
            asserts.append(f"static_assert(flashmla::SeesawSmem<{s.head_dim}, {s.head_dim_v}>::kBytes == "
                           f"{s.smem_bytes}, \"{s.name}\");")
            assert s.smem_bytes <= 227 * 1024, s.name
        elif s.kind == "decode":
            kv = spec.KV_FORMATS[s.kv_format]
            asserts.append(f"static_assert(sizeof(flashmla::DecodeSmem<{s.tile_rows}, {s.head_dim}, {kv}>) == "
                           f"{s.smem_bytes}, \"{s.name}\");")
            assert s.smem_bytes <= 227 * 1024, s.name
    source = '#include "flashmla/decode_seesaw.cuh"\n' + "\n".join(asserts) + "\n__global__ void probe() {}\n"
    compiler.compile_source(source, "&probe", compiler.compile_options(None), "smem_probe")


def test_import_is_lazy():
    code = ("import sys, flashmla_jit; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'cupy') or m.startswith('cuda.')))")
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).parent.parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_seesaw_params_mirror_matches_the_device_struct():
    """SeesawParams: four 64-byte aligned tensor maps, then DecodeParams; the ctypes mirror
    has the device struct's size (the launch copies that many bytes from it). The field
    order is tests/test_params.py's."""
    from flashmla_jit.params import SeesawParams
    import ctypes
    source = ('#include "flashmla/params.cuh"\n'
              f"static_assert(sizeof(flashmla::SeesawParams) == {ctypes.sizeof(SeesawParams)}, \"size\");\n"
              "__global__ void probe(flashmla::SeesawParams* s) {}\n")
    # the offsets are fixed by alignment (128-byte tensor maps first); the size is what a drift breaks
    names = ("k_latent", "k_rope", "q_latent", "q_rope", "p")
    assert [getattr(SeesawParams, n).offset for n in names] == [0, 128, 256, 384, 512]
    compiler.compile_source(source, "&probe", compiler.compile_options(None), "params_probe")


@pytest.mark.parametrize("define", ["FLASHMLA_SEESAW_TRACE=1", "FLASHMLA_SEESAW_CTATIME=1", "FLASHMLA_SEESAW_CTATIME=2"])
def test_seesaw_diagnostic_builds_compile(define, monkeypatch):
    """The builds of tools/seesaw_trace.py, tools/cta_timeline.py and tools/pair_timeline.py
    stay usable: their clock marks sit where registers are tight (the compiler lets the
    trace build spill a few bytes, never serialize its wgmma; the timeline builds must not
    spill at all). Three variants that between them set every template flag: register use
    differs by variant (the Q-TMA ones spilled where the plain ones did not)."""
    from flashmla_jit import settings
    monkeypatch.setenv("FLASHMLA_JIT_DEFINES", define)
    monkeypatch.setenv("FLASHMLA_JIT_DISABLE_CACHE", "1")
    settings.get.cache_clear()
    try:
        for causal, evict_first, q_tma in ((False, False, False), (False, False, True), (True, True, True)):
            compiler.compile_spec(spec.KernelSpec("decode", "bf16", 576, 512, causal=causal, tile_rows=64, seesaw=True,
                                                  kv_evict_first=evict_first, q_tma=q_tma))
    finally:
        settings.get.cache_clear()
