"""flashmla-jit: precompile kernel variants into the cache, and inspect or clear it.

    flashmla-jit precompile [--dtype bf16] [--causal both] [--kv-format fp8_656] [--all] [--jobs N]
    flashmla-jit cache [info|clear]

Needs no GPU: compiling is NVRTC only. Variants are compiled in a process pool
(NVRTC is single-threaded, and spawned workers share no state with the caller).
"""

from __future__ import annotations

import argparse
import itertools
import concurrent.futures
import multiprocessing
import os
import sys
import time

from flashmla_jit import cache, settings
from flashmla_jit import spec as specs


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))   # respects taskset / container CPU limits
    except AttributeError:
        return os.cpu_count() or 1


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _head_dims(text: str) -> tuple:
    try:
        dims = tuple(int(x) for x in text.split(","))
    except ValueError:
        dims = ()
    if dims not in specs.SUPPORTED_HEAD_DIMS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a supported D,DV pair: " + " ".join(f"{d},{v}" for d, v in specs.SUPPORTED_HEAD_DIMS))
    return dims


def select_specs(args) -> list:
    """The variants the flags name, derived the way the runtime derives them."""
    if args.all:
        return specs.all_specs()
    if not (args.dtype or args.causal or args.heads or args.s_q or args.head_dims or args.kv_format):
        return specs.default_specs()
    dtypes = args.dtype or ["bf16"]
    causals = {"yes": [True], "no": [False], "both": [False, True]}[args.causal or "both"]
    # Query heads per KV head and s_q pick the tile height (rows = s_q * heads / h_kv,
    # with DeepSeek's h_kv = 1); s_q == 1 makes causal a no-op. Without --s-q assume
    # multi-token decode so causal variants are kept; without --heads, all tile heights.
    s_qs = args.s_q or [2]
    out = [specs.METADATA_SPEC]
    for dtype in dtypes:
        for d, dv in args.head_dims or [specs.DEEPSEEK_HEAD_DIMS]:
            for kv in args.kv_format or ["same"]:
                if not specs.kv_format_supported(kv, dtype, d, dv):
                    continue   # the 656-byte layout is bf16, d=576 only
                for c, s_q in itertools.product(causals, s_qs):
                    rows = [s_q * h for h in args.heads] if args.heads else list(specs.TILE_ROWS)
                    out += [specs.decode_spec(dtype, d, dv, c, s_q, r, kv) for r in rows]
                    # FlashMLA's 64-token pages (and multiples) run the seesaw kernel; without
                    # --heads both of its variants (up to 64 rows and above)
                    if specs.seesaw_fits(dv, kv, specs.BLOCK_N):
                        seesaw_rows = rows if args.heads else (rows[0], specs.EVICT_FIRST_ABOVE_ROWS + 1)
                        out += [specs.decode_spec(dtype, d, dv, c, s_q, r, kv, True) for r in seesaw_rows]
            out += specs.combine_specs(dtype, d, dv)
    return list(dict.fromkeys(out))


def _compile_one(spec):
    """Pool worker: (spec, compiled now, seconds, error text or None)."""
    start = time.perf_counter()
    try:
        _, compiled = cache.precompile(spec)
        return spec, compiled, time.perf_counter() - start, None
    except Exception as err:   # reported per variant; the others still compile
        return spec, False, time.perf_counter() - start, f"{type(err).__name__}: {err}"


def _progress(done: int, total: int, name: str, seconds: float, note: str) -> None:
    width = 20
    bar = "#" * (width * done // total) + "-" * (width - width * done // total)
    print(f"[{done}/{total}] {bar} {name}  {seconds:.1f}s{note}", file=sys.stderr, flush=True)


def _run_jobs(todo: list, jobs: int):
    """Yield _compile_one results as they finish."""
    if not todo:
        return
    if jobs == 1 or len(todo) == 1:
        yield from map(_compile_one, todo)
        return
    # spawn, not fork: the caller may hold threads or CUDA state that fork would copy.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(jobs, len(todo)), mp_context=ctx) as pool:
        futures = [pool.submit(_compile_one, s) for s in todo]
        for future in concurrent.futures.as_completed(futures):
            yield future.result()


def cmd_precompile(args) -> int:
    if settings.get().disable_cache:
        print("flashmla-jit: FLASHMLA_JIT_DISABLE_CACHE=1, nothing would be kept; "
              "unset it to precompile", file=sys.stderr)
        return 2
    start = time.perf_counter()
    wanted = select_specs(args)
    todo = [s for s in wanted if cache.lookup(s) is None]
    cached = len(wanted) - len(todo)
    compiled, failures = 0, []
    for i, (spec, fresh, seconds, error) in enumerate(_run_jobs(todo, args.jobs), 1):
        compiled += fresh
        cached += not fresh and error is None
        if error:
            failures.append((spec, error))
        _progress(i, len(todo), spec.name, seconds, "  FAILED" if error else "")
    for spec, error in failures:
        print(f"\n{spec.name} failed:\n{error}", file=sys.stderr)
    print(f"{len(wanted)} variants: {compiled} compiled, {cached} already cached, "
          f"{len(failures)} failed in {time.perf_counter() - start:.1f}s "
          f"(cache: {cache.cache_dir()})")
    return 1 if failures else 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def cmd_cache_info(args) -> int:
    s = settings.get()
    found = cache.entries()
    print(f"cache dir: {s.cache_dir}" + ("  (disabled: FLASHMLA_JIT_DISABLE_CACHE=1)"
                                         if s.disable_cache else ""))
    print(f"entries:   {len(found)}, {_size(sum(size for _, _, size, _ in found))}")
    for name, path, size, meta in found:
        seconds = meta.get("compile_seconds")
        note = f"compiled in {seconds:.2f}s" if seconds is not None else "damaged"
        print(f"  {name:40s} {_size(size):>10s}  {note}  {path.name}")
    return 0


def cmd_cache_clear(args) -> int:
    removed = cache.clear()
    print(f"removed {removed} entries from {cache.cache_dir()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashmla-jit", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    pre = sub.add_parser("precompile", help="compile kernel variants into the cache")
    pre.add_argument("--dtype", action="append", choices=sorted(specs.DTYPES),
                     help="q/kv dtype (repeatable; default bf16)")
    pre.add_argument("--causal", choices=("yes", "no", "both"), help="default both")
    pre.add_argument("--heads", action="append", type=_positive, metavar="H",
                     help="query heads per KV head (repeatable): picks the query-tile height")
    pre.add_argument("--s-q", action="append", type=_positive, metavar="S",
                     help="query tokens per sequence (repeatable; s_q=1 needs no causal)")
    pre.add_argument("--head-dims", action="append", type=_head_dims, metavar="D,DV",
                     help="q/k head dim and v head dim (repeatable; default 576,512; supported: "
                          + " ".join(f"{d},{v}" for d, v in specs.SUPPORTED_HEAD_DIMS) + ")")
    pre.add_argument("--kv-format", action="append", choices=list(specs.KV_FORMATS),
                     help="KV cache format (repeatable; default same = q's dtype; fp8_e4m3 = per-tensor "
                          "FP8, fp8_656 = FlashMLA's 656-byte FP8 layout)")
    pre.add_argument("--all", action="store_true", help="every supported variant")
    pre.add_argument("--jobs", "-j", type=_positive, default=_cpu_count(),
                     help="parallel compiles (default: CPU count)")
    pre.set_defaults(func=cmd_precompile)

    c = sub.add_parser("cache", help="show (default) or clear the kernel cache")
    csub = c.add_subparsers(dest="action")
    csub.add_parser("info", help="location, entries, size").set_defaults(func=cmd_cache_info)
    csub.add_parser("clear", help="delete every entry").set_defaults(func=cmd_cache_clear)
    c.set_defaults(func=cmd_cache_info)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
