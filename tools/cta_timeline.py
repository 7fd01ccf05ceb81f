"""Where a seesaw decode call's time goes per request, over every CTA: the fill (first loads
and first S), the pair loop, the epilogue before and during the output stores
(kernels/flashmla/decode_seesaw.cuh, CTATIME). Only launch a CTATIME build with a buffer in
k_scale, as here: through the API it would write to address 0.

  python tools/cta_timeline.py [B,S_K,H_Q,S_Q[,VARLEN] ...]  # default 128,4096,128,1; causal, bf16
  (VARLEN 1: lengths drawn around S_K as tools/bench.py's varlen rows)
  CTA_RUNS=4 python tools/cta_timeline.py 128,4096,64,1  # also: is a CTA's exit set by its SM?
"""
import os
import sys

# before flashmla_jit reads its settings; other defines (experiments) pass through
os.environ["FLASHMLA_JIT_DEFINES"] = "FLASHMLA_SEESAW_CTATIME=1 " + os.environ.get("FLASHMLA_JIT_DEFINES", "")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "tools")]

import torch  # noqa: E402
from seesaw_probe import cta_stamps, run_with_buffer, stamp_ghz  # noqa: E402

REQUESTS, STAMPS = 5, 5  # requests per part stamped (later ones share the last slots); stamps each


def timeline(batch, s_k, h_q, s_q, varlen=0):
    """(stamps [CTA][32], the decode grid (m-blocks, h_kv = 1, parts), the call's µs by
    CUDA events): CTA c is m-block c % m-blocks of part c // m-blocks."""
    grids = []

    def buffer_for(plan):
        grids.append(plan.decode_grid)
        return cta_stamps(plan)

    stamps, launch_us = run_with_buffer(batch, s_k, h_q, s_q, buffer_for, bool(varlen))
    return stamps.cpu().double(), grids[0], launch_us


def report(t, config, grid, launch_us):
    ghz = stamp_ghz(t)
    exit_us = (t[:, 1] - t[:, 0].min()) / 1e3
    kind = " var" if config[4:5] == (1,) else ""
    print(f"b={config[0]} s_k={config[1]}{kind} h_q={config[2]} s_q={config[3]}: {len(t)} CTAs at {ghz:.3f} GHz, exit "
          f"min / median / max {exit_us.min():.1f} / {exit_us.median():.1f} / {exit_us.max():.1f} us (the call "
          f"by CUDA events, decode + merge: {launch_us:.1f} us); per request, mean (max) us over the CTAs that ran it:")
    us = lambda ticks: ticks / ghz / 1e3
    for i in range(REQUESTS):
        start, first_s, loop, stores, end = (t[:, 4 + STAMPS * i + j] for j in range(STAMPS))
        ran = start > 0
        if not ran.any():
            break
        before = t[:, 2] if i == 0 else t[:, 4 + STAMPS * (i - 1) + STAMPS - 1]
        spans = {"before": (before, start), "fill": (start, first_s), "loop": (first_s, loop),
                 "epilogue": (loop, stores), "stores": (stores, end)}
        cells = [f"{name} {us(b - a)[ran].mean():7.2f} ({us(b - a)[ran].max():6.2f})" for name, (a, b) in spans.items()]
        print(f"  request {i} ({int(ran.sum())} CTAs): " + " | ".join(cells))
    # The CTAs that end last set the kernel's time (their SMs: slot 31).
    per_part = grid[0] * grid[1]  # m-blocks (h_kv = 1)
    last = torch.argsort(exit_us, descending=True)[:6].tolist()
    print("  last to exit (part, m-block, SM, exit us): " + ", ".join(
        f"({c // per_part}, {c % per_part}, {int(t[c, 31])}, {exit_us[c]:.1f})" for c in last))


def exits_by_sm(t):
    """Each SM's CTA exit (µs from the first entry); NaN for SMs whose CTA had no work."""
    by_sm = torch.full((int(t[:, 31].max()) + 1,), float("nan"), dtype=torch.float64)
    ran = t[:, 4] > 0
    by_sm[t[ran, 31].long()] = (t[ran, 1] - t[:, 0].min()) / 1e3
    return by_sm


def report_by_sm(runs):
    """Across runs (a different CTA-to-SM map each): how alike are the SMs' exit times?"""
    n = min(len(r) for r in runs)
    m = torch.stack([r[:n] for r in runs])
    m = m[:, ~torch.isnan(m).any(0)]
    z = (m - m.mean(1, keepdim=True)) / m.std(1, correction=0, keepdim=True)
    corr = (z @ z.T / z.shape[1]).numpy().round(2)
    mean = m.mean(0)
    print(f"  per-SM exit times, correlation between runs: {corr.tolist()}; SMs' mean exit "
          f"{mean.min():.1f} - {mean.max():.1f} us")


if __name__ == "__main__":
    configs = [tuple(map(int, c.split(","))) for c in sys.argv[1:]] or [(128, 4096, 128, 1)]
    print(torch.cuda.get_device_name())
    for config in configs:
        runs = []
        for _ in range(int(os.environ.get("CTA_RUNS", "1"))):
            t, grid, launch_us = timeline(*config)
            report(t, config, grid, launch_us)
            runs.append(exits_by_sm(t))
            torch.cuda.empty_cache()
        if len(runs) > 1:
            report_by_sm(runs)
