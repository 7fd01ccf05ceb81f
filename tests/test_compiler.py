"""compiler.py: NVRTC to sm_90a CUBIN, its options, errors and source fingerprint."""

import os
import pathlib
import subprocess
import sys

import pytest

from flashmla_jit import compiler
from flashmla_jit.compiler import CompileError
from jit_fakes import SPILLS, SYNTAX_ERROR, FakeSpec, reload

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_kernel_dir_holds_the_headers():
    assert (compiler.kernel_dir() / "flashmla" / "decode.cuh").is_file()


def test_nvrtc_identity_names_the_loaded_nvrtc():
    # a wheel's exact version, whose major.minor is what the loaded library reports
    identity = compiler.nvrtc_identity()
    major, minor = compiler.nvrtc_version()
    assert identity.startswith("nvidia-cuda-nvrtc") or identity.startswith("nvrtc ")
    assert identity.split("==")[-1].split(" ")[-1].startswith(f"{major}.{minor}")


def test_nvrtc_version_is_a_pair_of_ints():
    major, minor = compiler.nvrtc_version()
    assert (major, minor) >= (12, 8)


def test_options(cache_root, monkeypatch):
    opts = compiler.compile_options(FakeSpec())
    assert "--gpu-architecture=sm_90a" in opts
    assert f"-I{compiler.kernel_dir()}" in opts
    assert "--ptxas-options=--warn-on-spills" in opts
    assert not any("fast_math" in o or "fast-math" in o for o in opts)
    assert "--ptxas-options=-v" not in opts
    reload(monkeypatch, ptxas_verbose=1)
    assert "--ptxas-options=-v" in compiler.compile_options(FakeSpec())


def test_compile_a_template_instance(cache_root, monkeypatch):
    reload(monkeypatch, ptxas_verbose=1)
    art = compiler.compile_spec(FakeSpec(tag=3))
    assert art.cubin[:4] == b"\x7fELF"
    assert art.lowered_name == "_Z11fake_kernelILi3EEvPf"   # from nvrtcGetLoweredName
    meta = art.meta
    assert meta["name"] == "fake.t3" and meta["spec"]["tag"] == 3
    assert meta["options"] == list(compiler.compile_options(FakeSpec()))
    assert meta["nvrtc_version"] == list(compiler.nvrtc_version())
    assert meta["compile_seconds"] > 0
    assert "ptxas info" in meta["log"]   # verbose ptxas output kept


def test_syntax_error_carries_log_variant_options_and_command(cache_root):
    bad = FakeSpec(tag=4, body=SYNTAX_ERROR)
    with pytest.raises(CompileError) as info:
        compiler.compile_spec(bad)
    msg = str(info.value)
    assert "fake.t4" in msg
    assert "error" in msg and "expected a \";\"" in msg   # NVRTC's own log text
    assert "--gpu-architecture=sm_90a" in msg
    assert "   4  __global__ void fake_kernel" in msg     # numbered source
    command = msg.split("--- reproduce ---\n")[1].strip()
    assert command.startswith("python -c ")
    # The command replays the failure by itself.
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run(command.replace("python", sys.executable, 1), shell=True, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "CompileError" in run.stderr and "fake.t4" in run.stderr


def test_spills_are_a_hard_error(cache_root):
    with pytest.raises(CompileError, match="spill") as info:
        compiler.compile_spec(FakeSpec(tag=5, body=SPILLS))
    assert "Registers are spilled" in str(info.value)


def test_hard_warning_filter():
    log = "\n".join([
        "ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions "
        "are serialized due to the presence of Extern calls",
        "ptxas info    : (C7511) Potential Performance Loss: wgmma.mma_async instructions "
        "are serialized due to insufficient register resources",
        "ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads",
        "ptxas         .     8 bytes stack frame, 16 bytes spill stores, 0 bytes spill loads",
        "ptxas info    : Used 168 registers",
    ])
    found = compiler.hard_warnings(log)
    assert [line[:22] for line in found] == ["ptxas info    : (C7515", "ptxas info    : (C7511",
                                              "ptxas         .     8 "]
    # the trace build may spill, never serialize
    traced = compiler.hard_warnings(log, ("-lineinfo", "-DFLASHMLA_SEESAW_TRACE=1"))
    assert [line[:22] for line in traced] == ["ptxas info    : (C7515", "ptxas info    : (C7511"]


def test_source_fingerprint_covers_every_file(tmp_path, monkeypatch):
    (tmp_path / "flashmla").mkdir()
    header = tmp_path / "flashmla" / "a.cuh"
    header.write_text("// a\n")
    monkeypatch.setattr(compiler, "kernel_dir", lambda: tmp_path)
    prints = []
    try:
        for change in (lambda: None,
                       lambda: header.write_text("// a changed\n"),
                       lambda: (tmp_path / "flashmla" / "b.cuh").write_text("")):
            change()
            compiler.source_fingerprint.cache_clear()
            prints.append(compiler.source_fingerprint())
        header.write_text("// once per process\n")
        assert compiler.source_fingerprint() == prints[-1]   # cached, not re-read
    finally:
        compiler.source_fingerprint.cache_clear()
    assert len(set(prints)) == 3
