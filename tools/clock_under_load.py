"""The SM clock inside the seesaw kernel as the card heats: one call's clock (clock64
ticks over globaltimer ns, median over CTAs) and time to the last CTA's exit, fresh, then
after 100 / 300 / 600 calls each behind a 256 MB L2 flush (do_bench's pattern), and after
1 s idle each time. A CTATIME build, launched with its stamp buffer in k_scale.

  python tools/clock_under_load.py [B,S_K,H_Q,S_Q]     # default 128,16384,128,2
"""
import os
import sys
import time

os.environ["FLASHMLA_JIT_DEFINES"] = "FLASHMLA_SEESAW_CTATIME=1 " + os.environ.get("FLASHMLA_JIT_DEFINES", "")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402
from seesaw_probe import cta_stamps, launcher, stamp_ghz  # noqa: E402


def main():
    b, s_k, h_q, s_q = map(int, (sys.argv[1] if len(sys.argv) > 1 else "128,16384,128,2").split(","))
    launch, stamps = launcher(b, s_k, h_q, s_q, cta_stamps)
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")

    def report(what):
        torch.cuda.synchronize()
        t = stamps.cpu().double()  # per CTA: globaltimer at entry, exit; clock64 at entry, exit
        print(f"{what}: {stamp_ghz(t):.3f} GHz, last CTA exits {(t[:, 1].max() - t[:, 0].min()).item() / 1e3:.1f} us",
              flush=True)

    print(f"{torch.cuda.get_device_name()}, b={b} s_k={s_k} h_q={h_q} s_q={s_q}")
    for _ in range(3):
        launch()
    report("fresh (third call)")
    for calls in (100, 300, 600):
        for _ in range(calls):
            flush.zero_()
            launch()
        report(f"after {calls} flushed calls")
        time.sleep(1.0)
        launch()
        report("  then after 1 s idle")


if __name__ == "__main__":
    main()
