"""cli.py: variant selection, precompile (in-process and pooled), cache info/clear."""

import os
import pathlib
import subprocess
import sys

import pytest

from flashmla_jit import cache, cli
from flashmla_jit import spec as specs
from jit_fakes import SYNTAX_ERROR, FakeSpec, reload

REPO = pathlib.Path(__file__).resolve().parents[1]


def selected(*argv):
    return cli.select_specs(cli.build_parser().parse_args(["precompile", *argv]))


def test_selection_maps_flags_to_specs():
    assert selected() == specs.default_specs()
    assert selected("--all") == specs.all_specs()
    decodes = [specs.KernelSpec("decode", "fp16", 576, 512, causal=True, tile_rows=m) for m in (16, 32, 64)]
    seesaw = [specs.KernelSpec("decode", "fp16", 576, 512, causal=True, tile_rows=64, seesaw=True, kv_evict_first=e)
              for e in (False, True)]
    assert selected("--dtype", "fp16", "--causal", "yes") == [
        specs.METADATA_SPEC, *decodes, *seesaw, *(specs.combine_spec("fp16", 576, 512, g) for g in (0, 1, 2, 4)),
        specs.combine_spec("fp16", 576, 512, 1, 16)]
    # s_q = 1 cannot need causal; heads x s_q pick the tile height.
    one_token = selected("--s-q", "1", "--heads", "128")
    # (each row count: its cp.async tile, and the seesaw kernel for 64-token pages)
    assert [(s.tile_rows, s.seesaw) for s in one_token if s.kind == "decode"] == [(64, False), (64, True)]
    # above 64 rows the seesaw loads KV evict-first: its own variant
    two_tokens = selected("--s-q", "2", "--heads", "128", "--causal", "yes")
    assert [s.kv_evict_first for s in two_tokens if s.seesaw] == [True]
    assert [s.kv_evict_first for s in selected("--s-q", "1", "--heads", "64") if s.seesaw] == [False]
    assert not any(s.causal for s in one_token)
    assert [s.tile_rows for s in selected("--s-q", "2", "--heads", "16", "--causal", "yes")
            if s.kind == "decode"] == [32, 64]
    # metadata + per dtype: (non-causal + causal) x (3 tile heights + 2 seesaw) + 5 merge grids
    assert len(selected("--dtype", "bf16", "--dtype", "fp16")) == 1 + 2 * (2 * 5 + 5)
    with pytest.raises(SystemExit):
        selected("--heads", "0")
    no_rope = selected("--head-dims", "512,512", "--heads", "16", "--s-q", "1")
    assert [(s.kind, s.head_dim, s.seesaw) for s in no_rope] == [
        ("metadata", 576, False), ("decode", 512, False), ("decode", 512, True)] + [("combine", 512, False)] * 5
    with pytest.raises(SystemExit):
        selected("--head-dims", "320,128")
    # FP8 caches: 32-row tiles at most; the 656 layout only for bf16 with d = 576
    fp8 = selected("--kv-format", "fp8_656", "--kv-format", "fp8_e4m3", "--heads", "128", "--s-q", "1")
    assert [(s.kv_format, s.tile_rows) for s in fp8 if s.kind == "decode"] == [("fp8_656", 32), ("fp8_e4m3", 32)]
    assert [s.kv_format for s in selected("--kv-format", "fp8_656", "--dtype", "fp16") if s.kind == "decode"] == []


@pytest.fixture
def fakes(cache_root, monkeypatch):
    two = [FakeSpec(tag=31), FakeSpec(tag=32)]
    monkeypatch.setattr(specs, "default_specs", lambda: list(two))
    return two


def test_precompile_info_clear_and_second_run_is_cached(fakes, capsys):
    assert cli.main(["precompile", "--jobs", "1"]) == 0
    out, err = capsys.readouterr()
    assert "2 variants: 2 compiled, 0 already cached, 0 failed" in out
    assert "[2/2]" in err and "fake.t32" in err
    assert cache.stats()["compiles"] == 2

    cache.reset()   # as a fresh process would: only the disk remembers
    assert cli.main(["precompile"]) == 0
    out, err = capsys.readouterr()
    assert "2 variants: 0 compiled, 2 already cached" in out and err == ""
    assert cache.stats()["compiles"] == 0 and cache.stats()["disk_hits"] == 2

    assert cli.main(["cache"]) == 0
    out = capsys.readouterr().out
    assert str(cache.cache_dir()) in out and "entries:   2" in out
    assert "fake.t31" in out and "fake.t32" in out

    assert cli.main(["cache", "clear"]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert cli.main(["cache", "info"]) == 0
    assert "entries:   0" in capsys.readouterr().out


def test_precompile_in_a_process_pool(fakes, capsys):
    assert cli.main(["precompile", "--jobs", "2"]) == 0
    assert "2 compiled" in capsys.readouterr().out
    assert cache.stats()["compiles"] == 0            # the workers compiled, not us
    assert sorted(name for name, *_ in cache.entries()) == ["fake.t31", "fake.t32"]


def test_a_failing_variant_is_reported_and_the_rest_compile(cache_root, monkeypatch, capsys):
    monkeypatch.setattr(specs, "default_specs",
                        lambda: [FakeSpec(tag=33, body=SYNTAX_ERROR), FakeSpec(tag=34)])
    assert cli.main(["precompile", "-j", "1"]) == 1
    out, err = capsys.readouterr()
    assert "1 compiled" in out and "1 failed" in out
    assert "FAILED" in err and "CompileError" in err and 'expected a ";"' in err


def test_precompile_refuses_when_cache_is_disabled(fakes, monkeypatch, capsys):
    reload(monkeypatch, disable_cache=1)
    assert cli.main(["precompile"]) == 2
    assert "FLASHMLA_JIT_DISABLE_CACHE" in capsys.readouterr().err


def test_python_dash_m_entry_point(cache_root):
    env = dict(os.environ, PYTHONPATH=str(REPO), FLASHMLA_JIT_CACHE_DIR=str(cache_root))
    run = subprocess.run([sys.executable, "-m", "flashmla_jit", "cache", "info"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"cache dir: {cache_root}" in run.stdout
