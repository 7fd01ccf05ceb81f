"""Where the host time of one flash_mla_with_kvcache call goes (GPU kept busy).

  python tools/host_profile.py           # top functions by own time over 300 calls (cProfile)
  python tools/host_profile.py --steps   # each step of the torch hot path timed alone, us
"""
import cProfile
import os
import pstats
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402
from mla_reference import make_inputs  # noqa: E402

from bench import host_us  # noqa: E402  (tools/, this script's directory)
from flashmla_jit import api, driver, flash_mla_with_kvcache, get_mla_metadata  # noqa: E402

q, k, bt, sl = make_inputs(4, 1, 16, 1, [64] * 4)
sched, splits = get_mla_metadata(sl, 16, 1)
out, lse = flash_mla_with_kvcache(q, k, bt, sl, 512, sched, splits)


def steps():
    """The hot path of api.flash_mla_with_kvcache, step by step (each step alone, so the
    sum misses what the steps share, e.g. the call frames between them)."""
    arrays = (q, k, bt, sl, sched, splits) + (None,) * 6
    scalars = (512, None, False, None, None)
    key = api._torch_signature(arrays, scalars)
    plan = api._plans[key]
    ptrs = [x.data_ptr() if x is not None else 0 for x in arrays]
    stream = api._torch_stream(plan.device)
    launches = plan.prepare(ptrs, q, None, None, stream)[3]

    def no_op(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
              softmax_scale=None, causal=False, *, q_pe=None, k_pe_cache=None, cu_seqlens_q=None,
              max_seqlen_q=None, out=None, lse=None, k_scale=None):
        return None

    rows = [
        ("a Python call of the same signature", lambda: no_op(q, k, bt, sl, 512, sched, splits)),
        ("signature (shapes, strides, dtypes, devices)", lambda: api._torch_signature(arrays, scalars)),
        ("plan lookup", lambda: api._plans.get(key)),
        ("pointers", lambda: [x.data_ptr() if x is not None else 0 for x in arrays]),
        ("current stream", lambda: api._torch_stream(plan.device)),
        ("out + lse + scratch, allocated and freed", lambda: plan._torch_buffers(q, None, None, stream)),
        ("scratch alone, allocated and freed", lambda: plan._torch_buffers(q, out, lse, stream)),
        ("prepare (buffers + parameter structs)", lambda: plan.prepare(ptrs, q, None, None, stream)),
        ("the two launches (raw)", lambda: driver.launch_all(plan.device, launches)),
        ("whole call", lambda: flash_mla_with_kvcache(q, k, bt, sl, 512, sched, splits)),
        ("whole call, out= and lse= given", lambda: flash_mla_with_kvcache(q, k, bt, sl, 512, sched, splits,
                                                                         out=out, lse=lse)),
    ]
    for name, fn in rows:  # each the best of 5 rounds, as tools/bench.py times the host
        print(f"{min(host_us(fn) for _ in range(5)):7.2f} us  {name}")


def profile():
    torch.cuda._sleep(int(4e9))  # keep the GPU busy so launches only queue
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(300):  # few enough that the launch queue never fills and blocks
        flash_mla_with_kvcache(q, k, bt, sl, 512, sched, splits)
    profiler.disable()
    torch.cuda.synchronize()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    steps() if "--steps" in sys.argv[1:] else profile()
