"""Where a decode step's time goes on the GPU: 10 back-to-back calls replayed as one CUDA
graph under torch.profiler; per config the period between calls, the decode kernel's
duration and how long the merge (combine) kernel runs on after it.

  python tools/step_timeline.py        # h_kv = 1, s_q = 1, causal, bf16
  STEP_CONFIGS="4,32768,128,0 128,8192,64,1" python tools/step_timeline.py   # b,s_k,h_q,varlen[,s_q]
FlashMLA (from the git-ignored .peer/, as tools/bench.py loads it) is timed the same way
beside ours where it is there.
STEP_CACHES=N: the calls take N KV caches in turn (same lengths and block table), as a
model's layers do; with one, a cache smaller than L2 (b = 1 32K: 38 MB of 50) is partly
read from L2 on the next call.
"""
import itertools
import os
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from bench import load_peer  # noqa: E402
from mla_reference import capture_graph, make_inputs  # noqa: E402

import flashmla_jit  # noqa: E402

CONFIGS = [  # batch, s_k, h_q, varlen (normal(s_k, s_k / 2), clipped, as tools/bench.py), s_q
    (1, 32768, 16, False, 1), (1, 131072, 16, False, 1), (1, 131072, 128, False, 1), (4, 131072, 16, False, 1),
    (16, 131072, 16, False, 1), (128, 4096, 16, False, 1), (128, 8192, 64, True, 1),
]
if os.environ.get("STEP_CONFIGS"):
    CONFIGS = [(c[0], c[1], c[2], bool(c[3]), c[4] if len(c) > 4 else 1) for c in
               (tuple(map(int, c.split(","))) for c in os.environ["STEP_CONFIGS"].split())]
# (name, module, decode kernel name part, merge kernel name part)
IMPLS = [("ours", flashmla_jit, "decode", "combine")]
CALLS = 10
CACHES = int(os.environ.get("STEP_CACHES", "1"))
TOKEN_BYTES = 576 * 2


def kernel_times(call, decode_name: str, merge_name: str):
    """GPU (start, end) in µs of each decode and merge kernel of CALLS replayed calls."""
    for _ in range(3):  # compile, load, warm the caches
        call()
    replay, _ = capture_graph(lambda: [call() for _ in range(CALLS)])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        replay()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    pick = lambda name: [(e.time_range.start, e.time_range.end) for e in events if name in e.name]
    decode, merge = pick(decode_name), pick(merge_name)
    if len(decode) != CALLS or len(merge) != CALLS:
        raise RuntimeError(f"want {CALLS} kernels named *{decode_name}* and *{merge_name}*, got "
                           f"{sorted(set(e.name for e in events))}")
    return decode, merge


def main():
    peer = load_peer()
    if peer is not None:
        IMPLS.append(("FlashMLA", peer, "splitkv_mla", "combine"))
    gen = torch.Generator().manual_seed(1)
    print(f"{torch.cuda.get_device_name()}: {CALLS} back-to-back calls in one graph over {CACHES} KV cache(s), µs "
          "(the first call left out)")
    for batch, s_k, h_q, varlen, s_q in CONFIGS:
        if varlen:
            lens = torch.clamp(torch.normal(float(s_k), s_k / 2, (batch,), generator=gen), 1, 2 * s_k).int().tolist()
        else:
            lens = [s_k] * batch
        q, k_cache, block_table, seqlens = make_inputs(batch, s_q, h_q, 1, lens, nan_tail=False)
        k_caches = [k_cache] + [torch.randn_like(k_cache) for _ in range(CACHES - 1)]
        for name, impl, decode_name, merge_name in IMPLS:
            sched, splits = impl.get_mla_metadata(seqlens, s_q * h_q, 1)
            turn = itertools.cycle(k_caches)
            decode, combine = kernel_times(lambda: impl.flash_mla_with_kvcache(
                q, next(turn), block_table, seqlens, 512, sched, splits, causal=True), decode_name, merge_name)
            period = (decode[-1][0] - decode[1][0]) / (len(decode) - 2)
            duration = statistics.median(end - start for start, end in decode[1:])
            tail = statistics.median(c_end - d_end for (_, d_end), (_, c_end) in zip(decode[1:], combine[1:]))
            gbs = sum(lens) * TOKEN_BYTES / period / 1e3
            print(f"b={batch:<4} s_k={s_k:<7} h_q={h_q:<4} s_q={s_q} {'var' if varlen else 'fix'} {name:8s}: period "
                  f"{period:7.1f} ({gbs:5.0f} GB/s) | decode {duration:7.1f} | merge runs on {tail:5.1f}")
        del q, k_cache, k_caches
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
