"""Benchmark flashmla_jit on the GPU against ceilings measured in the same run.

  python tools/bench.py [--quick] [--json PATH]

FlashMLA is timed beside ours when .peer/flashmla_peer.py exists (a local build of
FlashMLA in a git-ignored folder; never committed). Ceilings: device-to-device copy
(bytes read + written), a large read (sum over 4 GiB), bf16 8192^3 matmul. Each config
times one decode step (decode + combine; metadata is computed once per step and reused by
all layers, so it is timed apart) with triton's do_bench (median, L2 flushed between
runs), and a torch eager MLA for comparison; b = 128 and small batches also per call over
10 back-to-back calls in one CUDA graph, over KV caches that together outgrow L2, as a
model's layers run them. Ours and FlashMLA are timed in turn over BENCH_ROUNDS rounds
(default 3) and each reported as the median of its rounds: under sustained load the SM
clock drifts with power and heat (docs/PERF.md, v12), by more than the gaps between the
two.
FLOPs and bytes as in DESIGN.md section 6 (FP8 caches: the bytes read, 576 or 656 per
token). Small batches also against a plain read of their KV bytes, back to back as
they are timed (cupy's RawModule compiles it; skipped without cupy). Also: cold compile,
warm-cache first call in a new process, host overhead per call with the GPU busy.
"""

import argparse
import compileall
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from triton.testing import do_bench

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from mla_reference import capture_graph, make_inputs  # noqa: E402

from flashmla_jit import flash_mla_with_kvcache, get_mla_metadata  # noqa: E402
from flashmla_jit import fp8  # noqa: E402
from flashmla_jit.spec import seesaw_fits  # noqa: E402

# Cache bytes per token: q's 16-bit dtype (d = 576), per-tensor e4m3, FlashMLA's layout.
KV_TOKEN_BYTES = {"same": 576 * 2, "fp8_e4m3": 576, "fp8_656": fp8.TOKEN_BYTES}


def load_peer():
    """FlashMLA built from source for side-by-side timing, if present in the git-ignored
    .peer/ folder (never part of this repository); None otherwise."""
    path = os.path.join(ROOT, ".peer")
    if not os.path.exists(os.path.join(path, "flashmla_peer.py")):
        return None
    sys.path.insert(0, path)
    import flashmla_peer
    flashmla_peer.load()
    return flashmla_peer


def env_configs(default: str) -> list:
    """(b, s_k, h_q, s_q) tuples from AB_CONFIGS="b,s_k,h_q,s_q ..." (else `default`), as
    tools/ab_interleaved.py and tools/energy.py take them."""
    return [tuple(map(int, c.split(","))) for c in os.environ.get("AB_CONFIGS", default).split()]


PEER = None
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))


def bench_ms(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def interleaved_us(fns):
    """Each fn's median time (µs) over ROUNDS rounds, the fns in turn within a round."""
    times = [[] for _ in fns]
    for _ in range(ROUNDS):
        for t, fn in zip(times, fns):
            t.append(bench_ms(fn) * 1e3)
    return [statistics.median(t) for t in times]


B2B_CALLS = 10


def b2b_replay(call_on, caches, calls=B2B_CALLS):
    """A CUDA graph of `calls` back-to-back calls; time its replay and divide by `calls`.
    One call timed alone (bench_ms, L2 flushed before it) carries the launch of its first
    kernel and an empty pipeline; consecutive calls (a model's layers) overlap those. Each
    call reads the next of `caches` in turn, as each layer reads its own: calls on one
    cache smaller than L2 would read part of it from L2 (b = 1 32K: 23.6 against 26.8 us)."""
    turn = itertools.cycle(caches)
    return capture_graph(lambda: [call_on(next(turn)) for _ in range(calls)])[0]


def rotation(k_cache, at_least=128 << 20):
    """k_cache and enough copies of it to hold at_least bytes together (over L2's 50 MB)."""
    return [k_cache] + [k_cache.clone() for _ in range(-(-at_least // k_cache.nbytes) - 1)]


def ceilings():
    n = 1 << 30  # 1 Gi floats = 4 GiB
    x = torch.randn(n, device="cuda")
    y = torch.empty_like(x)
    copy = 2 * x.numel() * 4 / (bench_ms(lambda: y.copy_(x)) * 1e-3) / 1e9
    read = x.numel() * 4 / (bench_ms(lambda: x.sum()) * 1e-3) / 1e9
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = 2 * 8192 ** 3 / (bench_ms(lambda: a @ b) * 1e-3) / 1e12
    return {"copy_gbs": copy, "read_gbs": read, "matmul_tflops": mm}


# A plain read of n 16-byte words (each lane keeps 4 loads in flight, streaming, all SMs):
# what any kernel that reads the same bytes could reach at that size. At tens of MB a
# step is ramp and drain as much as bandwidth: the large-read ceiling above is reached
# only from ~150 MB (PERF.md v20).
_READ_SRC = r"""
extern "C" __global__ void plain_read(const int4* __restrict__ x, long long n, int* sink) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  int acc = 0;
  for (; i + 3 * stride < n; i += 4 * stride) {
    int4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = __ldcs(x + i + u * stride);
#pragma unroll
    for (int u = 0; u < 4; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n; i += stride) { const int4 v = x[i]; acc ^= v.x ^ v.y ^ v.z ^ v.w; }
  if (acc == 0x1234567) sink[0] = acc;  // keeps the loads live (a rare store to sink is harmless)
}
"""


def _cupy_stream(cupy):
    """torch's current stream (the capturing one inside a graph capture) as a cupy stream."""
    try:
        return cupy.cuda.Stream.from_external(torch.cuda.current_stream())
    except (AttributeError, TypeError):  # cupy or torch without the CUDA stream protocol
        return cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)


def plain_read_us(nbytes, calls=10):
    """Per call of `calls` back-to-back plain reads of nbytes (one CUDA graph, buffers in
    turn that outgrow L2), the best of a few grid shapes; None without cupy."""
    try:
        import cupy
    except ImportError:
        return None
    kernel = cupy.RawModule(code=_READ_SRC).get_function("plain_read")
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    words = nbytes // 16
    bufs = rotation(torch.randint(-2**31, 2**31 - 1, (words, 4), dtype=torch.int32, device="cuda"))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    best = float("inf")
    for ctas, threads in ((sms, 1024), (2 * sms, 1024), (4 * sms, 512)):
        def launch(i):
            with _cupy_stream(cupy):
                kernel((ctas,), (threads,), (bufs[i % len(bufs)].data_ptr(), cupy.int64(words), sink.data_ptr()))
        replay, _ = capture_graph(lambda: [launch(i) for i in range(calls)])
        best = min(best, bench_ms(replay) * 1e3 / calls)
    del bufs
    torch.cuda.empty_cache()
    return best


def eager_mla(q, k_cache, block_table, s_k, causal):
    """Torch eager MLA decode for fixed-length batches (h_kv = 1): gather, bmm, softmax, bmm."""
    b, s_q, h_q, d = q.shape
    kv = k_cache[block_table.long()].view(b, -1, d)[:, :s_k]
    scores = torch.bmm(q.view(b, s_q * h_q, d), kv.transpose(1, 2)).float() * d ** -0.5
    if causal and s_q > 1:
        row_s = torch.arange(s_q, device=q.device).repeat_interleave(h_q)
        limit = s_k - s_q + 1 + row_s
        scores.masked_fill_(torch.arange(s_k, device=q.device)[None, None] >= limit[None, :, None], float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.softmax(scores, -1).to(q.dtype)
    return torch.bmm(probs, kv[..., :512]).view(b, s_q, h_q, 512), lse


def quantize_cache(k_cache, kv_format, pages_per_chunk=4096):
    """The bench cache as FP8 (chunked over pages: the quantizers work in fp32) and k_scale
    (a 1-element device tensor, as vLLM passes it; None for the 656 layout)."""
    if kv_format == "same":
        return k_cache, None
    if kv_format == "fp8_656":
        return torch.cat([fp8.quantize_kv_cache_fp8(k_cache[i:i + pages_per_chunk])
                          for i in range(0, k_cache.shape[0], pages_per_chunk)]), None
    scale = float(k_cache.abs().amax()) / fp8.E4M3_MAX
    k8 = torch.cat([fp8.quantize_kv_cache_fp8_per_tensor(k_cache[i:i + pages_per_chunk], scale)[0]
                    for i in range(0, k_cache.shape[0], pages_per_chunk)])
    return k8, torch.tensor([scale], dtype=torch.float32, device=k_cache.device)


def varlen_lens(batch, s_k, seed):
    """normal(s_k, s_k / 2) lengths clipped to [1, 2 s_k], as FlashMLA's benchmark draws them."""
    gen = torch.Generator().manual_seed(seed)
    return torch.clamp(torch.normal(float(s_k), s_k / 2, (batch,), generator=gen), 1, 2 * s_k).int().tolist()


def config_lens(batch, s_k, h_q, varlen):
    """A config's seqlens: s_k each, or varlen_lens seeded by s_k + h_q, so that every tool
    (ab_interleaved, ncu_probe, seesaw_probe) draws the bench row's lengths."""
    return varlen_lens(batch, s_k, s_k + h_q) if varlen else [s_k] * batch


def b2b_scale(r):
    """How a row's GB/s and TFLOPS scale from one call to back to back (same work, less time)."""
    return r["us"] / r["b2b_us"]


def run_config(batch, s_k, h_q, s_q, varlen, with_eager, page_size=64, graph=False, kv_format="same", b2b=None):
    """One config's row. graph: the single call is timed as a graph replay (small batches);
    b2b (default: graph): also the time per call over back-to-back calls (b2b_us)."""
    b2b = graph if b2b is None else b2b
    lens = config_lens(batch, s_k, h_q, varlen)
    q, k_cache, block_table, seqlens = make_inputs(batch, s_q, h_q, 1, lens, nan_tail=False, page_size=page_size)
    k_cache, k_scale = quantize_cache(k_cache, kv_format)
    sched, splits = get_mla_metadata(seqlens, s_q * h_q, 1)
    call_on = lambda k: flash_mla_with_kvcache(q, k, block_table, seqlens, 512, sched, splits, causal=True,
                                               k_scale=k_scale)
    call = lambda: call_on(k_cache)
    caches = rotation(k_cache) if b2b else None
    # Small batches run for tens of microseconds: time graph replays, or host launch time leaks in.
    timed = lambda fn: capture_graph(fn)[0] if graph else fn
    total = sum(lens)
    flops = s_q * total * h_q * (576 + 512) * 2
    nbytes = total * KV_TOKEN_BYTES[kv_format] + batch * s_q * h_q * (576 + 512) * 2
    row = {"b": batch, "s_k": s_k, "h_q": h_q, "s_q": s_q, "varlen": varlen, "page": page_size, "kv": kv_format}
    if PEER is not None and page_size == 64 and kv_format == "same":  # FlashMLA: bf16, 64-token pages
        p_sched, p_splits = PEER.get_mla_metadata(seqlens, s_q * h_q, 1)
        peer_call_on = lambda k: PEER.flash_mla_with_kvcache(q, k, block_table, seqlens, 512, p_sched, p_splits,
                                                             causal=True)
        peer_call = lambda: peer_call_on(k_cache)
        out, _ = call()
        peer_out, _ = peer_call()
        row["peer_match"] = bool(((out.float() - peer_out.float()).norm() / out.float().norm()) < 1e-2)
        row["us"], row["flashmla_us"] = interleaved_us([timed(call), timed(peer_call)])
        if b2b:  # also per call over back-to-back calls, as a model's layers issue them
            ours, peer = interleaved_us([b2b_replay(call_on, caches), b2b_replay(peer_call_on, caches)])
            row["b2b_us"], row["flashmla_b2b_us"] = ours / B2B_CALLS, peer / B2B_CALLS
    else:
        row["us"], = interleaved_us([timed(call)])
        if b2b:
            row["b2b_us"] = interleaved_us([b2b_replay(call_on, caches)])[0] / B2B_CALLS
    row["tflops"], row["gbs"] = flops / row["us"] / 1e6, nbytes / row["us"] / 1e3
    # A graph replay: the kernel runs ~8 µs, less than the host takes to launch it.
    row["meta_us"] = bench_ms(capture_graph(lambda: get_mla_metadata(seqlens, s_q * h_q, 1))[0]) * 1e3
    if seesaw_fits(512, kv_format, page_size):  # the same call on the 16/32/64-row cp.async kernels
        row["cp_async_us"] = _with_seesaw_off(lambda: bench_ms(timed(call))) * 1e3
    if with_eager and not varlen and kv_format == "same":
        try:
            row["eager_us"] = bench_ms(lambda: eager_mla(q, k_cache, block_table, s_k, True)) * 1e3
        except torch.OutOfMemoryError:
            row["eager_us"] = float("nan")
        torch.cuda.empty_cache()
    del q, k_cache, caches
    torch.cuda.empty_cache()
    return row


def _with_seesaw_off(fn):
    from flashmla_jit import api, settings
    os.environ["FLASHMLA_JIT_SEESAW"] = "0"
    settings.get.cache_clear()
    api._plans.clear()
    try:
        return fn()
    finally:
        del os.environ["FLASHMLA_JIT_SEESAW"]
        settings.get.cache_clear()
        api._plans.clear()


def host_us(fn, calls=300):
    """Host time per call of fn, us, with the GPU kept busy so that launches only queue."""
    torch.cuda._sleep(int(5e8))  # ~0.3 s of GPU time ahead of the calls (300 calls need ~15 ms)
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = (time.perf_counter() - t) / calls * 1e6
    torch.cuda.synchronize()
    return elapsed


def jit_timings():
    """Cold compile of one variant, warm-cache first call in a new process, host overhead."""
    probe = (
        "import time, torch, sys; sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r});"
        "from mla_reference import make_inputs; import flashmla_jit as F;"
        "q,k,bt,sl = make_inputs(4, 1, 16, 1, [100]*4); torch.cuda.synchronize();"
        "t=time.perf_counter(); s,n=F.get_mla_metadata(sl, 16, 1); o,l=F.flash_mla_with_kvcache(q,k,bt,sl,512,s,n);"
        "torch.cuda.synchronize(); print(time.perf_counter()-t)"
    ).format(root=ROOT, tests=os.path.join(ROOT, "tests"))
    # A pip install leaves the package's bytecode compiled; a source tree where no .pyc was
    # written (PYTHONDONTWRITEBYTECODE) would add ~18 ms of compiling to the warm start.
    compileall.compile_dir(os.path.join(ROOT, "flashmla_jit"), quiet=1)
    with tempfile.TemporaryDirectory() as cache_dir:
        env = dict(os.environ, FLASHMLA_JIT_CACHE_DIR=cache_dir)
        cold = float(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                    check=True).stdout.split()[-1])
        warm = float(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                    check=True).stdout.split()[-1])
    # Host time per call with the GPU kept busy, so launches queue and the host is the bound:
    # the whole API call, and the raw launches of one call with their arguments prepared.
    from flashmla_jit import api, driver
    q, k, bt, sl = make_inputs(4, 1, 16, 1, [64] * 4)
    s, n = get_mla_metadata(sl, 16, 1)
    out, lse = flash_mla_with_kvcache(q, k, bt, sl, 512, s, n)
    arrays = (q, k, bt, sl, s, n) + (None,) * 6
    plan = api._plans[api._torch_signature(arrays, (512, None, False, None, None))]  # made by the call above
    ptrs = [x.data_ptr() if x is not None else 0 for x in arrays]
    _, _, scratch, launches = plan.prepare(ptrs, q, None, None, torch.cuda.current_stream().cuda_stream)

    def raw():
        driver.launch_all(plan.device, launches)

    # Each the best of 5 rounds: the host's other work only ever adds time. With caller-owned
    # out / lse (the API's out= and lse=) the call allocates only its scratch.
    full = min(host_us(lambda: flash_mla_with_kvcache(q, k, bt, sl, 512, s, n)) for _ in range(5))
    owned = min(host_us(lambda: flash_mla_with_kvcache(q, k, bt, sl, 512, s, n, out=out, lse=lse)) for _ in range(5))
    return {"cold_first_call_s": cold, "warm_first_call_s": warm, "host_us_per_call": full,
            "host_us_per_call_owned_outputs": owned, "raw_launch_us_per_call": min(host_us(raw) for _ in range(5))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="b=128 at s_k 4096 and 16384 only")
    ap.add_argument("--json", default=None)
    ap.add_argument("--sections", default="b128,varlen,small,pages,fp8,jit",
                    help="comma-separated subset of b128,varlen,small,pages,fp8,jit")
    ap.add_argument("--no-peer", action="store_true", help="do not time FlashMLA even if .peer/ has it")
    args = ap.parse_args()
    global PEER
    PEER = None if args.no_peer else load_peer()
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    ceil = ceilings()
    print(f"ceilings: copy {ceil['copy_gbs']:.0f} GB/s, read {ceil['read_gbs']:.0f} GB/s, "
          f"bf16 matmul {ceil['matmul_tflops']:.0f} TFLOPS", flush=True)
    rows = []
    s_ks = (4096, 16384) if args.quick else (4096, 8192, 16384, 32768)

    def add(*config, **kw):
        rows.append(run_config(*config, **kw))
        print(rows[-1], flush=True)

    sections = set(args.sections.split(","))
    if "b128" in sections:
        for s_q in (1, 2):
            for h_q in (16, 32, 64, 128):
                for s_k in s_ks:
                    add(128, s_k, h_q, s_q, False, s_k <= 16384, b2b=True)
    if "varlen" in sections:
        for s_q, h_q in ((1, 64), (2, 128)):
            for s_k in s_ks:
                add(128, s_k, h_q, s_q, True, False, b2b=True)
    if "small" in sections and not args.quick:
        for batch in (1, 4, 16):  # small batches: split-KV over all SMs
            for s_k in (32768, 131072):
                read_us = plain_read_us(batch * s_k * KV_TOKEN_BYTES["same"])
                for h_q in (16, 128):
                    add(batch, s_k, h_q, 1, False, False, graph=True)
                    rows[-1]["plain_read_b2b_us"] = read_us
    if "pages" in sections and not args.quick:
        for page_size in (1, 16):  # page sizes other than FlashMLA's 64 (same rows at 64 above)
            for h_q in (16, 128):
                add(128, 8192, h_q, 1, False, False, page_size=page_size)
    if "fp8" in sections:
        for h_q in (16, 128):  # FP8 caches (bytes = the FP8 bytes read); bf16 rows as the baseline
            for s_k in (8192, 32768):
                for kv_format in ("same", "fp8_e4m3", "fp8_656"):
                    add(128, s_k, h_q, 1, False, False, kv_format=kv_format)
    jit = jit_timings() if "jit" in sections else None
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "ceilings": ceil, "rows": rows, "jit": jit}, f, indent=1)

    print(f"\n== flashmla_jit on {torch.cuda.get_device_name()}: h_kv=1, causal, bf16 ==")
    print(f"ceilings (same run): copy {ceil['copy_gbs']:.0f} GB/s | read {ceil['read_gbs']:.0f} GB/s | "
          f"matmul {ceil['matmul_tflops']:.0f} TFLOPS")
    print(f"{'b':>4} {'s_k':>6} {'h_q':>4} {'s_q':>3} {'len':>4} {'page':>4} {'kv':>8} {'us':>8} {'GB/s':>6} "
          f"{'%read':>6} {'TFLOPS':>7} {'%mm':>5} {'eager us':>9} {'speedup':>7} {'FlashMLA us':>11} {'vs FlashMLA':>11} {'cp.async us':>11}")
    for r in rows:
        eager = r.get("eager_us", float("nan"))
        peer = r.get("flashmla_us", float("nan"))
        mismatch = "" if r.get("peer_match", True) else " (outputs differ!)"
        print(f"{r['b']:>4} {r['s_k']:>6} {r['h_q']:>4} {r['s_q']:>3} {'var' if r['varlen'] else 'fix':>4} "
              f"{r['page']:>4} {r['kv']:>8} {r['us']:>8.1f} "
              f"{r['gbs']:>6.0f} {100 * r['gbs'] / ceil['read_gbs']:>5.1f}% {r['tflops']:>7.1f} "
              f"{100 * r['tflops'] / ceil['matmul_tflops']:>4.1f}% {eager:>9.1f} {eager / r['us']:>6.2f}x "
              f"{peer:>11.1f} {peer / r['us']:>10.2f}x {r.get('cp_async_us', float('nan')):>11.1f}{mismatch}")
    b2b = [r for r in rows if "b2b_us" in r]
    if b2b:
        print(f"per call over {B2B_CALLS} back-to-back calls (one CUDA graph, KV caches in turn that outgrow L2, "
              "as a model's layers run them; 'us' above: one call alone):")
        print(f"{'b':>4} {'s_k':>6} {'h_q':>4} {'s_q':>3} {'len':>4} {'us':>8} {'GB/s':>6} {'%read':>6} "
              f"{'TFLOPS':>7} {'%mm':>5} {'FlashMLA us':>11} {'vs FlashMLA':>11} {'plain read us':>13} {'vs read':>7}")
        for r in b2b:
            per_us = b2b_scale(r)
            peer = r.get("flashmla_b2b_us", float("nan"))
            read = r.get("plain_read_b2b_us") or float("nan")  # the KV bytes alone, same graph pattern
            print(f"{r['b']:>4} {r['s_k']:>6} {r['h_q']:>4} {r['s_q']:>3} {'var' if r['varlen'] else 'fix':>4} "
                  f"{r['b2b_us']:>8.1f} {r['gbs'] * per_us:>6.0f} {100 * r['gbs'] * per_us / ceil['read_gbs']:>5.1f}% "
                  f"{r['tflops'] * per_us:>7.1f} {100 * r['tflops'] * per_us / ceil['matmul_tflops']:>4.1f}% "
                  f"{peer:>11.1f} {peer / r['b2b_us']:>10.2f}x {read:>13.1f} {read / r['b2b_us']:>6.2f}x")
    shape = lambda r: (r["s_k"], r["h_q"], r["s_q"])  # noqa: E731
    fixed = {shape(r): r for r in rows if not r["varlen"] and r["page"] == 64 and r["kv"] == "same"}
    pairs = [(r, fixed[shape(r)]) for r in rows if r["varlen"] and shape(r) in fixed]
    if pairs:  # the varlen target: throughput at equal tokens (bytes per second) against fixed length
        def ratios(r, f):  # one call, then back to back where both were timed so
            one = f"{r['gbs'] / f['gbs']:.3f}"
            if "b2b_us" not in r or "b2b_us" not in f:
                return one
            return f"{one} | {r['gbs'] * b2b_scale(r) / (f['gbs'] * b2b_scale(f)):.3f}"
        print("varlen / fixed-length throughput (GB/s), one call | back to back: " + ", ".join(
            f"s_k {r['s_k']} h_q {r['h_q']} s_q {r['s_q']} {ratios(r, f)}" for r, f in pairs))
    if rows:
        print(f"metadata kernel: {min(r['meta_us'] for r in rows):.1f}-{max(r['meta_us'] for r in rows):.1f} us")
    if jit:
        print(f"JIT: cold first call {jit['cold_first_call_s']:.2f} s | warm-cache first call (new process) "
              f"{1e3 * jit['warm_first_call_s']:.1f} ms | host time {jit['host_us_per_call']:.1f} us/call, "
              f"{jit['host_us_per_call_owned_outputs']:.1f} with out= / lse= given "
              f"(raw launches {jit['raw_launch_us_per_call']:.1f} us)")


if __name__ == "__main__":
    main()
