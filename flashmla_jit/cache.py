"""Disk cache of compiled kernels: KernelSpec -> Artifact (cubin + lowered name + meta).

    memory (dict keyed by spec) -> disk entry <root>/<spec.name>.<key[:16]>/ -> NVRTC

An entry is a directory holding kernel.cubin and meta.json. It is staged in a temp
dir inside the root and published by one rename, so readers see a whole entry or
none. A per-entry flock makes processes that miss the same key compile it once.
Entries are checked on load (meta parses, cubin sha256 matches) and rebuilt when not.
A cache dir that cannot be written never fails a call: we compile in memory, warn once.

Imports no torch, cupy or driver; NVRTC is reached only through compiler, lazily.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
import warnings

from flashmla_jit import compiler, settings
from flashmla_jit.compiler import Artifact

FORMAT_VERSION = 1   # bump when the entry layout or meta.json schema changes
CUBIN, META = "kernel.cubin", "meta.json"
_TMP_PREFIX = ".tmp-"

log = logging.getLogger("flashmla_jit")


class CacheMissError(RuntimeError):
    """FLASHMLA_JIT_NO_JIT=1 and the variant is not in the cache."""


class CacheWarning(UserWarning):
    """The cache dir is unusable; kernels are compiled in memory only."""


_memo: dict = {}   # (spec, codegen env) -> Artifact: a settings change mid-process
                   # (FLASHMLA_JIT_DEFINES in an A/B tool) must not serve the old binary
_stats = {"compiles": 0, "disk_hits": 0, "memory_hits": 0}
_warned: set = set()   # cache roots already warned about


def stats() -> dict:
    return dict(_stats)


def reset() -> None:
    """Forget the in-process memo, the counters and the warn-once state (for tests)."""
    _memo.clear()
    _warned.clear()
    for k in _stats:
        _stats[k] = 0


def cache_dir() -> pathlib.Path:
    return settings.get().cache_dir


# ---- key ---------------------------------------------------------------------------

def package_version() -> str:
    # _version.py is the wheel's version too (pyproject reads it): no importlib.metadata,
    # whose scan of every path entry costs ~15 ms of a warm start.
    from flashmla_jit._version import __version__
    return __version__


def key_parts(spec) -> list:
    """Everything that can change the binary, by name (Triton-style), for the key."""
    return [
        ("format", FORMAT_VERSION),
        ("package", package_version()),
        ("spec_type", f"{type(spec).__module__}.{type(spec).__qualname__}"),
        ("spec", compiler.spec_fields(spec)),
        ("source", spec.source),
        ("name_expression", spec.name_expression),
        ("options", list(compiler.compile_options(spec))),
        ("nvrtc", compiler.nvrtc_identity()),
        ("kernel_sources", compiler.source_fingerprint()),
        ("env", [list(kv) for kv in settings.get().codegen_env]),
    ]


def cache_key(spec) -> str:
    blob = json.dumps(key_parts(spec), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def entry_dir(spec, key: str | None = None) -> pathlib.Path:
    return cache_dir() / f"{spec.name}.{(key or cache_key(spec))[:16]}"


# ---- disk --------------------------------------------------------------------------

def _warn_once(root: pathlib.Path, err: BaseException) -> None:
    if root in _warned:
        return
    _warned.add(root)
    warnings.warn(f"flashmla_jit: kernel cache dir {root} is not usable ({err}); "
                  f"compiling in memory, nothing is saved. Set FLASHMLA_JIT_CACHE_DIR "
                  f"to a writable directory.", CacheWarning, stacklevel=3)


def _read(entry: pathlib.Path, key: str) -> Artifact | None:
    """The entry if it is whole and matches key; None if absent; raises ValueError
    describing the damage if it is corrupt."""
    try:
        meta_text = (entry / META).read_text()
    except FileNotFoundError:
        if entry.exists():
            raise ValueError("meta.json is missing")
        return None
    try:
        meta = json.loads(meta_text)
        cubin = (entry / CUBIN).read_bytes()
        expected = (meta["key"], meta["cubin_sha256"], meta["lowered_name"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"unreadable entry: {err!r}")
    if expected[0] != key:
        raise ValueError("meta.json belongs to another key")
    if hashlib.sha256(cubin).hexdigest() != expected[1]:
        raise ValueError(f"cubin sha256 mismatch ({len(cubin)} bytes on disk, "
                         f"{meta.get('cubin_bytes')} expected)")
    return Artifact(cubin, expected[2], meta)


def _load(entry: pathlib.Path, key: str, repair: bool) -> Artifact | None:
    try:
        return _read(entry, key)
    except OSError:
        return None   # unreadable dir: treated as a miss
    except ValueError as damage:
        # Only the lock holder deletes, so a rebuilt entry is never removed by a
        # process that saw the old corrupt one.
        if repair:
            log.warning("flashmla_jit: dropping corrupt cache entry %s: %s", entry, damage)
            shutil.rmtree(entry, ignore_errors=True)
        return None


@contextlib.contextmanager
def _locked(lock_path: pathlib.Path):
    """Exclusive flock for the whole check-compile-publish; released on close."""
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: pathlib.Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _publish(entry: pathlib.Path, key: str, art: Artifact) -> Artifact:
    """Stage in a temp dir next to the entry, then rename it into place. Returns the
    artifact now on disk: ours, or theirs if another writer got there first."""
    root = entry.parent
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{entry.name}.", dir=root))
    try:
        tmp.chmod(0o755)   # mkdtemp makes it private; a shared cache must stay readable
        _write(tmp / CUBIN, art.cubin)
        _write(tmp / META, json.dumps(art.meta, indent=1, sort_keys=True).encode())
        _fsync_dir(tmp)
        try:
            os.rename(tmp, entry)
        except OSError:
            # Lost a race (e.g. a writer the lock did not see): keep theirs if whole.
            theirs = _load(entry, key, repair=False)
            if theirs is not None:
                return theirs
            raise
        _fsync_dir(root)
        return art
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- the runtime's entry point -----------------------------------------------------

def _precompile_hint(spec) -> str:
    cmd = "flashmla-jit precompile"
    fields = compiler.spec_fields(spec)
    if "dtype" in fields:
        cmd += f" --dtype {fields['dtype']}"
    if fields.get("kind") == "decode":
        cmd += f" --causal {'yes' if fields.get('causal') else 'no'}"
    override = os.environ.get("FLASHMLA_JIT_CACHE_DIR")
    return f"FLASHMLA_JIT_CACHE_DIR={override} {cmd}" if override else cmd


def _miss(spec) -> CacheMissError:
    return CacheMissError(
        f"flashmla_jit: kernel variant {spec.name} is not in the cache ({cache_dir()}) "
        f"and FLASHMLA_JIT_NO_JIT=1 forbids compiling it. Run: {_precompile_hint(spec)}")


def _compile(spec, key: str | None) -> Artifact:
    art = compiler.compile_spec(spec)
    _stats["compiles"] += 1
    if key is None:
        return art
    meta = dict(art.meta, format=FORMAT_VERSION, key=key, package=package_version(),
                cubin_bytes=len(art.cubin), cubin_sha256=hashlib.sha256(art.cubin).hexdigest())
    return Artifact(art.cubin, art.lowered_name, meta)


def _get(spec, allow_jit: bool) -> tuple[Artifact, str]:
    """(artifact, where it came from: "memory" | "disk" | "compiled")."""
    memo_key = (spec, settings.get().codegen_env)
    art = _memo.get(memo_key)
    if art is not None:
        _stats["memory_hits"] += 1
        return art, "memory"
    if settings.get().disable_cache:
        if not allow_jit:
            raise _miss(spec)
        art, origin = _compile(spec, None), "compiled"
    else:
        art, origin = _get_disk(spec, allow_jit)
    _memo[memo_key] = art
    return art, origin


def _get_disk(spec, allow_jit: bool) -> tuple[Artifact, str]:
    root, key = cache_dir(), cache_key(spec)
    entry = entry_dir(spec, key)
    art = _load(entry, key, repair=False)   # fast path: a hit takes no lock
    if art is not None:
        _stats["disk_hits"] += 1
        return art, "disk"
    if not allow_jit:
        raise _miss(spec)
    with contextlib.ExitStack() as stack:
        try:
            root.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_locked(root / f"{entry.name}.lock"))
        except OSError as err:
            _warn_once(root, err)
            return _compile(spec, key), "compiled"
        # Whoever held the lock before us may have published the entry meanwhile.
        art = _load(entry, key, repair=True)
        if art is not None:
            _stats["disk_hits"] += 1
            return art, "disk"
        art = _compile(spec, key)
        try:
            art = _publish(entry, key, art)
        except OSError as err:
            _warn_once(root, err)
        return art, "compiled"


def load_or_compile(spec) -> Artifact:
    """The runtime's one call: memory, then disk, then NVRTC (unless NO_JIT)."""
    return _get(spec, allow_jit=not settings.get().no_jit)[0]


def lookup(spec) -> Artifact | None:
    """The cached artifact, or None; never compiles (the CLI's "already cached?")."""
    try:
        return _get(spec, allow_jit=False)[0]
    except CacheMissError:
        return None


def precompile(spec) -> tuple[Artifact, bool]:
    """Make sure spec is on disk, even under NO_JIT; returns (artifact, compiled now)."""
    art, origin = _get(spec, allow_jit=True)
    return art, origin == "compiled"


# ---- CLI helpers -------------------------------------------------------------------

def _is_entry(path: pathlib.Path) -> bool:
    return path.is_dir() and ((path / META).exists() or (path / CUBIN).exists())


def entries() -> list[tuple[str, pathlib.Path, int, dict]]:
    """(name, path, size_bytes, meta) per entry; meta is {} for a damaged one."""
    root = cache_dir()
    if not root.is_dir():
        return []
    out = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(_TMP_PREFIX) or not _is_entry(path):
            continue
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, ValueError):
            meta = {}
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        out.append((meta.get("name", path.name.rsplit(".", 1)[0]), path, size, meta))
    return out


def clear() -> int:
    """Delete entries, staging dirs and lock files (only those: the root may be shared
    with other files). Also forgets the in-process memo. Returns entries removed."""
    _memo.clear()
    root = cache_dir()
    if not root.is_dir():
        return 0
    removed = 0
    for path in root.iterdir():
        if path.name.startswith(_TMP_PREFIX) or _is_entry(path):
            removed += not path.name.startswith(_TMP_PREFIX)
            shutil.rmtree(path, ignore_errors=True)
        elif path.suffix == ".lock" and path.is_file():
            path.unlink(missing_ok=True)
    return removed
