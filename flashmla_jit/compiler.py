"""NVRTC: a KernelSpec (or anything with its attributes) -> an sm_90a CUBIN.

No torch, no driver: CPU-only CI compiles every variant through this module.
cuda.bindings.nvrtc is imported on first use; cuda-pathfinder finds libnvrtc in the
installed wheels (CUDA 12 or 13), so no library path is ever written here.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import pathlib
import re
import shlex
import time

from flashmla_jit import settings

log = logging.getLogger("flashmla_jit")

ARCH = "sm_90a"   # wgmma and setmaxnreg exist only on the arch-specific target

# ptxas advisories that compile "successfully" but leave a kernel we refuse to ship:
# a serialized wgmma pipeline (C7511/C7515) or registers spilled to local memory.
_SERIALIZED = re.compile(r"C7511|C7515|wgmma\.mma_async instructions are serialized")
_SPILL = re.compile(r"Registers are spilled|\b[1-9]\d* bytes spill (stores|loads)")


class CompileError(RuntimeError):
    """NVRTC failed, or ptxas left serialized wgmma / spills. The message holds the
    variant, the full log, the options and a command that reproduces it."""


@dataclasses.dataclass(frozen=True)
class Artifact:
    cubin: bytes
    lowered_name: str   # mangled kernel symbol, for cuLibraryGetKernel / cuModuleGetFunction
    meta: dict


def kernel_dir() -> pathlib.Path:
    """The folder holding flashmla/*.cuh: inside the package in a wheel, else the
    repo-root kernels/ next to the package (source checkout, editable install)."""
    package = pathlib.Path(__file__).resolve().parent
    inside = package / "kernels"
    return inside if inside.is_dir() else package.parent / "kernels"


@functools.lru_cache(maxsize=None)
def source_fingerprint() -> str:
    """sha256 over every file under kernel_dir() (paths and bytes); once per process,
    since the headers do not change under a running program."""
    root = kernel_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"flashmla_jit: kernel sources not found at {root}")
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        # Path and length framing keep (a, bc) and (ab, c) from hashing alike.
        h.update(f"{path.relative_to(root).as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def _nvrtc():
    from cuda.bindings import nvrtc
    return nvrtc


def _check(result, what: str):
    """Every nvrtc call returns (status, *values): raise on a bad status."""
    nvrtc = _nvrtc()
    status, values = result[0], result[1:]
    if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, text = nvrtc.nvrtcGetErrorString(status)
        raise CompileError(f"{what} failed: {text.decode()}")
    return values[0] if len(values) == 1 else values


@functools.lru_cache(maxsize=None)
def nvrtc_version() -> tuple[int, int]:
    major, minor = _check(_nvrtc().nvrtcVersion(), "nvrtcVersion")
    return (int(major), int(minor))


@functools.lru_cache(maxsize=None)
def nvrtc_identity() -> str:
    """Which NVRTC compiles, for the cache key.

    When NVRTC comes from its pip wheel (the one cuda-bindings of this major version
    loads first), its exact distribution version names it without loading the library,
    which would cost ~40 ms of every warm start; otherwise ask the library itself.
    """
    import cuda.bindings
    major = str(cuda.bindings.__version__).split(".")[0]
    dist = "nvidia-cuda-nvrtc-cu12" if major == "12" else "nvidia-cuda-nvrtc"
    version = _dist_version(dist, pathlib.Path(cuda.bindings.__file__).resolve().parents[2])
    return f"{dist}=={version}" if version else "nvrtc " + ".".join(map(str, nvrtc_version()))


def _dist_version(dist: str, site: pathlib.Path) -> str | None:
    """A pip distribution's version, from its one .dist-info folder beside cuda-bindings
    (one directory listing: importlib.metadata scans every path entry, ~15 ms); else
    importlib.metadata's answer, or None when it is not installed."""
    prefix = dist.replace("-", "_") + "-"
    try:
        found = [e.name for e in os.scandir(site) if e.name.startswith(prefix) and e.name.endswith(".dist-info")]
    except OSError:
        found = []
    if len(found) == 1:
        return found[0][len(prefix):-len(".dist-info")]
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def compile_options(spec) -> tuple[str, ...]:
    # No --use_fast_math: the kernels choose their approximate math explicitly.
    # No CUDA include dirs: the kernels use only NVRTC built-ins and inline PTX.
    # `spec` is taken so per-variant options (e.g. a register cap) can be added here.
    opts = [
        f"--gpu-architecture={ARCH}",
        "-std=c++17",
        "-default-device",
        f"-I{kernel_dir()}",
        "--ptxas-options=--warn-on-spills",
        "-lineinfo",
    ]
    if settings.get().ptxas_verbose:
        opts.append("--ptxas-options=-v")
    opts += [f"-D{define}" for define in settings.get().defines]
    return tuple(opts)


# Diagnostic builds whose extra code may cost a few spilled bytes (their timings are
# approximate anyway): tools/seesaw_trace.py's clock marks. Serialized wgmma stays fatal.
_SPILL_TOLERANT_DEFINES = ("FLASHMLA_SEESAW_TRACE=1",)


def hard_warnings(program_log: str, options=()) -> list[str]:
    """The log lines that make a successful compile a failure in this project."""
    spills_ok = any(f"-D{d}" in options for d in _SPILL_TOLERANT_DEFINES)
    return [line for line in program_log.splitlines()
            if _SERIALIZED.search(line) or (_SPILL.search(line) and not spills_ok)]


def _program_log(prog) -> str:
    nvrtc = _nvrtc()
    size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
    buf = b" " * size
    _check(nvrtc.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
    return buf.rstrip(b"\0").decode(errors="replace").strip()


def reproduce_command(source: str, name_expression: str, options, name: str) -> str:
    # JSON literals are valid Python and use double quotes, so shlex.quote rarely
    # has to escape anything and the command stays readable.
    args = ", ".join(json.dumps(a) for a in (source, name_expression, list(options), name))
    call = f"from flashmla_jit.compiler import compile_source; compile_source({args})"
    return f"python -c {shlex.quote(call)}"


def _numbered(source: str) -> str:
    return "\n".join(f"{i:4d}  {line}" for i, line in enumerate(source.splitlines(), 1))


def compile_source(source: str, name_expression: str, options, name: str = "kernel"):
    """Compile one translation unit; returns (cubin, lowered_name, log).

    The lowest layer, free of specs and caches, so a failure can be replayed with a
    one-line command (see reproduce_command)."""
    nvrtc = _nvrtc()
    options = tuple(options)
    prog = _check(nvrtc.nvrtcCreateProgram(source.encode(), f"{name}.cu".encode(), 0, [], []),
                  "nvrtcCreateProgram")
    try:
        _check(nvrtc.nvrtcAddNameExpression(prog, name_expression.encode()),
               "nvrtcAddNameExpression")
        raw = [o.encode() for o in options]
        status = nvrtc.nvrtcCompileProgram(prog, len(raw), raw)[0]
        program_log = _program_log(prog)
        problems = hard_warnings(program_log, options)
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS or problems:
            what = ("NVRTC compilation failed" if status != nvrtc.nvrtcResult.NVRTC_SUCCESS
                    else "ptxas reported serialized wgmma or register spills")
            listed = "".join(f"\n  {p}" for p in problems)
            raise CompileError(
                f"flashmla_jit: {what} for variant {name}"
                + (f"\nhard warnings:{listed}" if problems else "")
                + f"\n--- NVRTC log ---\n{program_log or '(empty)'}"
                + f"\n--- source ({name}.cu) ---\n{_numbered(source)}"
                + f"\n--- name expression ---\n{name_expression}"
                + f"\n--- options ---\n{' '.join(options)}"
                + f"\n--- reproduce ---\n{reproduce_command(source, name_expression, options, name)}")
        lowered = _check(nvrtc.nvrtcGetLoweredName(prog, name_expression.encode()),
                         "nvrtcGetLoweredName")
        size = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        _check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return cubin, lowered.decode(), program_log
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def spec_fields(spec) -> dict:
    """The spec as plain data (for meta.json and the cache key); works for any dataclass,
    so tests can hand in a small stand-in with the same attributes."""
    if dataclasses.is_dataclass(spec):
        return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    return {"name": spec.name}


def compile_spec(spec) -> Artifact:
    """Compile any object with .name, .source and .name_expression (a KernelSpec)."""
    options = compile_options(spec)
    start = time.perf_counter()
    cubin, lowered, program_log = compile_source(spec.source, spec.name_expression,
                                                 options, spec.name)
    seconds = time.perf_counter() - start
    log.info("flashmla_jit: compiled %s in %.2fs", spec.name, seconds)
    if program_log and settings.get().ptxas_verbose:
        log.info("flashmla_jit: %s compile log:\n%s", spec.name, program_log)
    meta = {
        "name": spec.name,
        "spec": spec_fields(spec),
        "name_expression": spec.name_expression,
        "lowered_name": lowered,
        "options": list(options),
        "nvrtc_version": list(nvrtc_version()),
        "compile_seconds": round(seconds, 3),
        "threads": getattr(spec, "threads", None),
        "smem_bytes": getattr(spec, "smem_bytes", None),
        "log": program_log,
    }
    return Artifact(cubin, lowered, meta)
