"""Where a seesaw pair's cycles go: mean SM-clock offsets of each warpgroup's events from
its pair's start, in CTA (0, 0, 0) (kernels/flashmla/decode_seesaw.cuh, TRACE); warpgroup
1's also shifted onto warpgroup 0's clock. Only launch a trace build with a buffer in
k_scale, as here: through the API it would write to address 0.

  python tools/seesaw_trace.py [H_Q S_Q S_K]      # default 128 2 16384, b = 128
"""
import os
import sys

# before flashmla_jit reads its settings; other defines (experiments) pass through
os.environ["FLASHMLA_JIT_DEFINES"] = "FLASHMLA_SEESAW_TRACE=1 " + os.environ.get("FLASHMLA_JIT_DEFINES", "")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402
from mla_reference import make_inputs  # noqa: E402

from flashmla_jit import api, driver, get_mla_metadata  # noqa: E402

EVENTS = ["top: S0 done", "arrive Max0 (mask 0xfff)", "c issued", "c done", "sync Max1", "arrive P0 (before c)", "sync P1", "h issued",
          "S0' rope,0-3 issued", "h done", "S0' 4-7 issued", "S0' done (end)"]  # mark() ids
EVENTS1 = ["top: S1 done", "(start - WG0's start)", "sync Max0", "sync P0", "g issued", "arrive Max1", "arrive P1",
           "e issued", "g done", "e done", "S1' issued", "S1' done (end)"]  # mark1() ids

h_q, s_q, s_k = (int(a) for a in sys.argv[1:4]) if len(sys.argv) > 3 else (128, 2, 16384)
q, k, bt, sl = make_inputs(128, s_q, h_q, 1, [s_k] * 128, nan_tail=False)
sched, splits = get_mla_metadata(sl, s_q * h_q, 1)
# The plan of this call, made without a launch through the API (which passes no buffer).
arrays = (q, k, bt, sl, sched, splits) + (None,) * 6
described = [api._describe_arg(x, name) if x is not None else None for x, name in zip(arrays, api._ARG_NAMES)]
plan = api._plan(described, 512, None, True, None, None)
assert plan.seesaw
trace = torch.zeros(32, dtype=torch.int64, device="cuda")  # WG0 events, then WG1's
ptrs = [x.data_ptr() if x is not None else 0 for x in (q, k, bt, sl, sched, splits)] + [0] * 6
for _ in range(3):  # the last run is read: caches and clocks warm
    trace.zero_()
    _, _, scratch, launches = plan.prepare(ptrs, q, None, None, torch.cuda.current_stream().cuda_stream)
    launches[0][2].p.k_scale = trace.data_ptr()
    driver.launch_all(plan.device, launches)
    torch.cuda.synchronize()
t = trace.cpu()
print(f"{torch.cuda.get_device_name()}: b=128 h_q={h_q} s_q={s_q} s_k={s_k}, CTA (0, 0, 0), mean SM cycles from each pair's start")
pairs = int(t[15])
print(f"warpgroup 0 ({pairs} pairs)")
for e, name in enumerate(EVENTS):
    if e and t[e]:  # event 1 only with FLASHMLA_SEESAW_TRACE_MASK=0xfff (spills more)
        print(f"  {name:24s} {t[e].item() / max(pairs, 1):8.0f}")
pairs1 = int(t[16 + 15])
offset = t[16 + 1].item() / max(pairs1, 1)
print(f"warpgroup 1 ({pairs1} pairs), from its own pair start | on warpgroup 0's clock (start {offset:+.0f})")
for e, name in enumerate(EVENTS1):
    if e > 1:
        mean = t[16 + e].item() / max(pairs1, 1)
        print(f"  {name:24s} {mean:8.0f} | {mean + offset:8.0f}")
