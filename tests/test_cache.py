"""cache.py and settings.py: key, memo, atomic publish, lock, corruption, env."""

import errno
import fcntl
import json
import logging
import multiprocessing
import os
import pathlib
import subprocess
import sys
import warnings

import pytest

from flashmla_jit import cache, compiler, settings
from jit_fakes import FakeSpec, compile_in_child, reload, sha

REPO = pathlib.Path(__file__).resolve().parents[1]


# ---- settings ----------------------------------------------------------------------

def test_settings_defaults_and_override(cache_root, monkeypatch, tmp_path):
    assert settings.get().cache_dir == cache_root
    assert settings.get() is settings.get()   # read once
    reload(monkeypatch, cache_dir=None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    settings.get.cache_clear()
    assert settings.get().cache_dir == tmp_path / "xdg" / "flashmla_jit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    settings.get.cache_clear()
    assert settings.get().cache_dir == tmp_path / "home" / ".cache" / "flashmla_jit"
    s = settings.get()
    assert not (s.disable_cache or s.no_jit or s.validate or s.ptxas_verbose)
    reload(monkeypatch, validate=1, no_jit="true", disable_cache="0")
    s = settings.get()
    assert s.validate and s.no_jit and not s.disable_cache
    reload(monkeypatch, validate="maybe")
    with pytest.raises(ValueError, match="FLASHMLA_JIT_VALIDATE"):
        settings.get()


# ---- key ---------------------------------------------------------------------------

def test_key_changes_with_everything_that_builds_the_binary(cache_root, monkeypatch):
    spec = FakeSpec()
    base = cache.cache_key(spec)
    assert base == cache.cache_key(FakeSpec())
    assert cache.cache_key(FakeSpec(tag=2)) != base                      # instantiation
    assert cache.cache_key(FakeSpec(body="// other\n")) != base          # source text
    names = [name for name, _ in cache.key_parts(spec)]
    assert {"format", "package", "source", "name_expression", "options", "nvrtc",
            "kernel_sources", "env"} <= set(names)
    changes = [
        (compiler, "source_fingerprint", lambda: "0" * 64),              # kernel headers
        (compiler, "compile_options", lambda s: ("--gpu-architecture=sm_90a", "-O2")),
        (compiler, "nvrtc_identity", lambda: "nvidia-cuda-nvrtc==99.1.0"),
        (cache, "package_version", lambda: "9.9.9"),
    ]
    for module, attr, fake in changes:
        with monkeypatch.context() as m:
            m.setattr(module, attr, fake)
            assert cache.cache_key(spec) != base, attr
    assert cache.cache_key(spec) == base
    reload(monkeypatch, ptxas_verbose=1)                                 # codegen env var
    verbose = cache.cache_key(spec)
    assert verbose != base
    reload(monkeypatch, ptxas_verbose=None, defines="FLASHMLA_X=1 FLASHMLA_Y")  # kernel experiment defines
    assert cache.cache_key(spec) not in (base, verbose)
    assert compiler.compile_options(spec)[-2:] == ("-DFLASHMLA_X=1", "-DFLASHMLA_Y")


def test_warm_key_reads_no_distribution_metadata(monkeypatch):
    # The package and NVRTC versions come from _version.py and a directory listing:
    # importlib.metadata's scan of sys.path would cost ~15 ms of every warm start.
    from importlib import metadata

    from flashmla_jit._version import __version__

    def scan(*args, **kwargs):
        raise AssertionError("importlib.metadata consulted on the warm path")

    import cuda.bindings
    site = pathlib.Path(cuda.bindings.__file__).resolve().parents[2]
    wheel_nvrtc = any(n.startswith("nvidia_cuda_nvrtc") and n.endswith(".dist-info") for n in os.listdir(site))
    monkeypatch.setattr(metadata, "version", scan)
    monkeypatch.setattr(metadata, "distribution", scan)
    assert cache.package_version() == __version__ == "0.1.0"
    if wheel_nvrtc:  # NVRTC's wheel beside cuda-bindings (both CI stacks); else the library is asked
        compiler.nvrtc_identity.cache_clear()
        assert compiler.nvrtc_identity().startswith("nvidia-cuda-nvrtc")
        cache.cache_key(FakeSpec())


# ---- memo, disk, layout --------------------------------------------------------------

def test_compile_then_memory_hit_then_disk_hit(cache_root):
    spec = FakeSpec(tag=11)
    art = cache.load_or_compile(spec)
    assert cache.stats() == {"compiles": 1, "disk_hits": 0, "memory_hits": 0}
    assert cache.load_or_compile(spec) is art
    assert cache.stats()["memory_hits"] == 1

    entry = cache.entry_dir(spec)
    assert entry.parent == cache_root
    assert entry.name == f"fake.t11.{cache.cache_key(spec)[:16]}"
    assert sorted(p.name for p in entry.iterdir()) == ["kernel.cubin", "meta.json"]
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["cubin_sha256"] == sha((entry / "kernel.cubin").read_bytes())
    assert meta["lowered_name"] == art.lowered_name and meta["options"]
    assert meta["nvrtc_version"] and meta["compile_seconds"] > 0 and "smem_bytes" in meta
    assert not [p for p in cache_root.iterdir() if p.name.startswith(".tmp-")]

    cache.reset()   # a new process, as far as the cache can tell
    again = cache.load_or_compile(spec)
    assert cache.stats() == {"compiles": 0, "disk_hits": 1, "memory_hits": 0}
    assert again.cubin == art.cubin and again.meta == art.meta


def test_memo_follows_a_defines_change_in_process(cache_root, monkeypatch):
    # An A/B tool flips FLASHMLA_JIT_DEFINES and re-reads settings in one process: the
    # same spec must then get the other binary, not the one memoized first.
    spec = FakeSpec(tag=13)
    plain = cache.load_or_compile(spec)
    monkeypatch.setenv("FLASHMLA_JIT_DEFINES", "FLASHMLA_X=1")
    settings.get.cache_clear()   # what tools/ab_interleaved.py does, without cache.reset()
    defined = cache.load_or_compile(spec)
    assert cache.stats()["compiles"] == 2 and defined.meta["options"] != plain.meta["options"]
    monkeypatch.delenv("FLASHMLA_JIT_DEFINES")
    settings.get.cache_clear()
    assert cache.load_or_compile(spec) is plain


def test_the_lock_is_held_while_compiling(cache_root, monkeypatch):
    spec = FakeSpec(tag=12)
    lock_path = cache_root / f"{cache.entry_dir(spec).name}.lock"
    real = compiler.compile_spec
    seen = []

    def probing_compile(s):
        with open(lock_path) as other:   # a second open file = another process's view
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        seen.append(s)
        return real(s)

    monkeypatch.setattr(compiler, "compile_spec", probing_compile)
    cache.load_or_compile(spec)
    assert seen == [spec]


def test_publish_that_loses_the_race_keeps_theirs(cache_root):
    spec = FakeSpec(tag=13)
    theirs = cache.load_or_compile(spec)
    key = cache.cache_key(spec)
    ours = cache.Artifact(b"not the same", theirs.lowered_name, dict(theirs.meta))
    got = cache._publish(cache.entry_dir(spec, key), key, ours)
    assert got.cubin == theirs.cubin
    assert not [p for p in cache_root.iterdir() if p.name.startswith(".tmp-")]


def test_two_processes_compile_one_key_once(cache_root):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=compile_in_child, args=(barrier, results, 21)) for _ in range(2)]
    for p in procs:
        p.start()
    out = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sum(stats["compiles"] for stats, _ in out) == 1
    assert sum(stats["disk_hits"] for stats, _ in out) == 1
    assert out[0][1] == out[1][1]                                        # identical cubins
    entries = [p for p in cache_root.iterdir() if p.is_dir()]
    assert [p.name for p in entries] == [cache.entry_dir(FakeSpec(21)).name]


@pytest.mark.parametrize("damage", ["truncate_cubin", "garbage_meta", "drop_cubin"])
def test_corrupt_entry_is_rebuilt(cache_root, caplog, damage):
    spec = FakeSpec(tag=14)
    good = cache.load_or_compile(spec)
    entry = cache.entry_dir(spec)
    if damage == "truncate_cubin":
        (entry / "kernel.cubin").write_bytes(good.cubin[: len(good.cubin) // 2])
    elif damage == "garbage_meta":
        (entry / "meta.json").write_text("{not json")
    else:
        (entry / "kernel.cubin").unlink()
    cache.reset()
    with caplog.at_level(logging.WARNING, logger="flashmla_jit"):
        rebuilt = cache.load_or_compile(spec)
    assert "corrupt cache entry" in caplog.text
    assert cache.stats()["compiles"] == 1
    assert rebuilt.cubin == good.cubin
    assert sha((entry / "kernel.cubin").read_bytes()) == json.loads(
        (entry / "meta.json").read_text())["cubin_sha256"]


# ---- environment ---------------------------------------------------------------------

def test_unusable_cache_dir_compiles_in_memory_and_warns_once(cache_root, monkeypatch):
    blocker = cache_root.parent / "a_file"
    blocker.write_text("")
    reload(monkeypatch, cache_dir=blocker / "cache")   # a dir under a file: mkdir fails
    with pytest.warns(cache.CacheWarning, match="not usable"):
        assert cache.load_or_compile(FakeSpec(tag=15)).cubin[:4] == b"\x7fELF"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # a second warning would raise
        cache.load_or_compile(FakeSpec(tag=16))
    assert cache.stats()["compiles"] == 2


def test_read_only_cache_dir_still_loads_and_compiles(cache_root, monkeypatch):
    cache.load_or_compile(FakeSpec(tag=17))
    cache.reset()
    if os.geteuid() == 0:
        # root ignores mode bits: fail every write the way a read-only mount would.
        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")
        monkeypatch.setattr(cache, "_locked", read_only)
        monkeypatch.setattr(cache.tempfile, "mkdtemp", read_only)
    cache_root.chmod(0o555)
    try:
        cache.load_or_compile(FakeSpec(tag=17))           # existing entry: read only
        assert cache.stats()["disk_hits"] == 1
        with pytest.warns(cache.CacheWarning, match="not usable"):
            cache.load_or_compile(FakeSpec(tag=18))
        assert cache.stats()["compiles"] == 1
        assert len(cache.entries()) == 1
    finally:
        cache_root.chmod(0o755)


def test_env_override_is_where_entries_go(cache_root, monkeypatch, tmp_path):
    other = tmp_path / "elsewhere"
    reload(monkeypatch, cache_dir=other)
    cache.load_or_compile(FakeSpec(tag=19))
    assert cache.cache_dir() == other and len(cache.entries()) == 1
    assert not cache_root.exists()


def test_disable_cache_never_touches_disk(cache_root, monkeypatch):
    reload(monkeypatch, disable_cache=1)
    art = cache.load_or_compile(FakeSpec(tag=20))
    assert cache.load_or_compile(FakeSpec(tag=20)) is art
    assert cache.stats() == {"compiles": 1, "disk_hits": 0, "memory_hits": 1}
    assert not cache_root.exists()


def test_no_jit_names_the_variant_and_the_command(cache_root, monkeypatch):
    reload(monkeypatch, no_jit=1)
    spec = FakeSpec(tag=22)
    with pytest.raises(cache.CacheMissError) as info:
        cache.load_or_compile(spec)
    assert "fake.t22" in str(info.value) and "flashmla-jit precompile" in str(info.value)
    assert cache.stats()["compiles"] == 0
    _, compiled = cache.precompile(spec)                 # the CLI may still compile
    assert compiled
    cache.reset()
    cache.load_or_compile(spec)
    assert cache.stats() == {"compiles": 0, "disk_hits": 1, "memory_hits": 0}


def test_entries_and_clear_leave_foreign_files(cache_root):
    cache.load_or_compile(FakeSpec(tag=23))
    (cache_root / "notes.txt").write_text("not ours")
    (found,) = cache.entries()
    name, path, size, meta = found
    assert name == "fake.t23" and size > 0 and meta["name"] == "fake.t23"
    assert cache.clear() == 1
    assert sorted(p.name for p in cache_root.iterdir()) == ["notes.txt"]


def test_cache_modules_import_no_framework_or_driver():
    code = ("import sys; import flashmla_jit.cache, flashmla_jit.cli, flashmla_jit.settings; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'cupy') "
            "or m.startswith('cuda.')]; "
            "assert not bad, bad")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
