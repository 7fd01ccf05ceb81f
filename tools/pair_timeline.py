"""Where a seesaw call's pair loop goes, pair by pair: each pair's length (globaltimer) and
the SM clock it ran at (clock64 ticks over those ns), mean over the CTAs, for a request's
first six pairs, its middle and its last four (kernels/flashmla/decode_seesaw.cuh,
CTATIME=2). Fixed-length requests of s_k tokens, s_k / 128 pairs each; a CTA keeps its
first 85 stamps (the pairs and each request's loop end).

  python tools/pair_timeline.py [B,S_K,H_Q,S_Q ...]   # default 128,4096,128,1; causal, bf16
"""
import math
import os
import re
import sys

# before flashmla_jit reads its settings; other defines (experiments) pass through
os.environ["FLASHMLA_JIT_DEFINES"] = "FLASHMLA_SEESAW_CTATIME=2 " + os.environ.get("FLASHMLA_JIT_DEFINES", "")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "tools")]

import torch  # noqa: E402
from seesaw_probe import run_with_buffer  # noqa: E402

from flashmla_jit.compiler import kernel_dir  # noqa: E402

# kPairStamps, read from the kernel so that the buffer's layout cannot drift from it
PAIR_STAMPS = int(re.search(r"constexpr int kPairStamps = (\d+);",
                            (kernel_dir() / "flashmla" / "decode_seesaw.cuh").read_text()).group(1))
WRAP = 2.0 ** 32  # the stamps keep 32 bits of each counter


def pair_timeline(batch, s_k, h_q, s_q):
    def buffer_for(plan):
        return torch.zeros(math.prod(plan.decode_grid), 32 + 2 * PAIR_STAMPS, dtype=torch.int64, device="cuda")

    t, call_us = run_with_buffer(batch, s_k, h_q, s_q, buffer_for)
    stamps = t.cpu().double()[:, 32:].reshape(-1, PAIR_STAMPS, 2)  # [cta][n][clock, ns]
    ticks = torch.remainder(stamps[:, 1:, 0] - stamps[:, :-1, 0], WRAP)
    ns = torch.remainder(stamps[:, 1:, 1] - stamps[:, :-1, 1], WRAP)
    print(f"b={batch} s_k={s_k} h_q={h_q} s_q={s_q}: the call {call_us:.1f} us by CUDA events; per request, "
          f"pair us (GHz), mean over its CTAs")
    pairs = s_k // 128
    for req in range(PAIR_STAMPS // (pairs + 1) or 1):
        lo = req * (pairs + 1)  # a request's stamps: its pairs' starts, then its loop's end
        hi = min(lo + pairs, PAIR_STAMPS - 1)
        ran = stamps[:, hi, 1] != 0  # the CTA ran this request and kept its stamps
        if hi - lo < 12 or not ran.any():
            break
        us, tk = ns[ran, lo:hi] / 1e3, ticks[ran, lo:hi]
        ghz = tk.sum(0) / us.sum(0) / 1e3

        def cells(idx):
            return " ".join(f"{us[:, i].mean():.2f} ({ghz[i]:.2f})" for i in idx)

        middle = slice(6, hi - lo - 4)
        print(f"  request {req} ({int(ran.sum())} CTAs, pairs 0-{hi - lo - 1}): first {cells(range(6))} | "
              f"middle {us[:, middle].mean():.3f} ({tk[:, middle].sum() / us[:, middle].sum() / 1e3:.2f}) | "
              f"last {cells(range(hi - lo - 4, hi - lo))}")


if __name__ == "__main__":
    configs = [tuple(map(int, c.split(","))) for c in sys.argv[1:]] or [(128, 4096, 128, 1)]
    print(torch.cuda.get_device_name())
    for config in configs:
        pair_timeline(*config)
        torch.cuda.empty_cache()
