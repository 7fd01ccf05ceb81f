"""Where a seesaw pair's cycles go: mean SM-clock offsets of each warpgroup's events from
its pair's start, in CTA (0, 0, 0) (kernels/flashmla/decode_seesaw.cuh, TRACE); warpgroup
1's also shifted onto warpgroup 0's clock. Only launch a trace build with a buffer in
k_scale, as here: through the API it would write to address 0.

  python tools/seesaw_trace.py [H_Q S_Q S_K]      # default 128 2 16384, b = 128
  FLASHMLA_JIT_DEFINES="FLASHMLA_SEESAW_TRACE_PAIRS_FROM=0 FLASHMLA_SEESAW_TRACE_PAIRS_TO=2"
      sums only those pairs of each request (0-based), e.g. the first ones against the rest
"""
import os
import sys

# before flashmla_jit reads its settings; other defines (experiments) pass through
os.environ["FLASHMLA_JIT_DEFINES"] = "FLASHMLA_SEESAW_TRACE=1 " + os.environ.get("FLASHMLA_JIT_DEFINES", "")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402
from seesaw_probe import run_with_buffer  # noqa: E402

EVENTS = ["top: S0 done", "arrive Max0 (mask 0xfff)", "c issued", "c done", "sync Max1", "arrive P0 (before c)", "sync P1", "h issued",
          "S0' rope,0-3 issued", "h done", "S0' 4-7 issued", "S0' done (end)"]  # mark() ids
EVENTS1 = ["top: S1 done", "(start - WG0's start)", "sync Max0", "sync P0", "g issued", "arrive Max1", "arrive P1",
           "e issued", "g done", "e done", "S1' issued", "S1' done (end)"]  # mark1() ids

h_q, s_q, s_k = (int(a) for a in sys.argv[1:4]) if len(sys.argv) > 3 else (128, 2, 16384)
# WG0 events, then WG1's
trace, _ = run_with_buffer(128, s_k, h_q, s_q, lambda plan: torch.zeros(32, dtype=torch.int64, device="cuda"))
t = trace.cpu()
ranged = " ".join(d for d in os.environ["FLASHMLA_JIT_DEFINES"].split() if "TRACE_PAIRS" in d)
print(f"{torch.cuda.get_device_name()}: b=128 h_q={h_q} s_q={s_q} s_k={s_k}, CTA (0, 0, 0), mean SM cycles from each "
      f"pair's start{' (' + ranged + ')' if ranged else ''}")
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
