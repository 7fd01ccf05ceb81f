"""Every FLASHMLA_JIT_* environment variable, read in one place, once.

Only the standard library is imported here: the cache, the compiler and the CLI read
settings before (or without) any CUDA module being loaded. Tests that change the
environment call `get.cache_clear()` to read it again.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib

# Variables that change what NVRTC is asked to do. Their values are part of the cache
# key, so flipping one never serves a binary (or a compile log) built without it.
CODEGEN_VARS = ("FLASHMLA_JIT_PTXAS_VERBOSE", "FLASHMLA_JIT_DEFINES")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class Settings:
    cache_dir: pathlib.Path   # FLASHMLA_JIT_CACHE_DIR: root of the compiled-kernel cache
    disable_cache: bool       # FLASHMLA_JIT_DISABLE_CACHE=1: never read or write the disk
    no_jit: bool              # FLASHMLA_JIT_NO_JIT=1: never compile; a cache miss is an error
    validate: bool            # FLASHMLA_JIT_VALIDATE=1: input checks that synchronize the host
    ptxas_verbose: bool       # FLASHMLA_JIT_PTXAS_VERBOSE=1: ptxas -v, log kept in meta.json
    defines: tuple            # FLASHMLA_JIT_DEFINES="A=1 B": -D options for kernel experiments
    seesaw: bool              # FLASHMLA_JIT_SEESAW=0: never the seesaw (TMA) kernel; 64-token
                              # pages run the cp.async kernels too (for comparisons)
    q_tma: bool               # FLASHMLA_JIT_Q_TMA=0: the seesaw kernel loads Q by cp.async
                              # (for comparisons)
    codegen_env: tuple        # ((name, value), ...) of CODEGEN_VARS, for the cache key


def _flag(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"{name}={os.environ[name]!r} is not a boolean; use 1 or 0")


def _default_cache_dir() -> pathlib.Path:
    # XDG base-directory spec: an empty XDG_CACHE_HOME counts as unset.
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache"
    return base / "flashmla_jit"


@functools.lru_cache(maxsize=None)
def get() -> Settings:
    override = os.environ.get("FLASHMLA_JIT_CACHE_DIR", "")
    cache_dir = pathlib.Path(override).expanduser() if override else _default_cache_dir()
    return Settings(
        cache_dir=cache_dir.absolute(),
        disable_cache=_flag("FLASHMLA_JIT_DISABLE_CACHE"),
        no_jit=_flag("FLASHMLA_JIT_NO_JIT"),
        validate=_flag("FLASHMLA_JIT_VALIDATE"),
        ptxas_verbose=_flag("FLASHMLA_JIT_PTXAS_VERBOSE"),
        defines=tuple(os.environ.get("FLASHMLA_JIT_DEFINES", "").split()),
        seesaw=_flag("FLASHMLA_JIT_SEESAW", default=True),
        q_tma=_flag("FLASHMLA_JIT_Q_TMA", default=True),
        codegen_env=tuple((name, os.environ.get(name, "")) for name in CODEGEN_VARS),
    )
