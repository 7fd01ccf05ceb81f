"""A/B settings in one process, rounds interleaved call by call: when the GPU's clocks
drift with power and heat (s_q 2 at 16K moved 1680-1890 µs within minutes on one H100),
variants timed minutes apart in separate processes (tools/ab.py) can differ by more than
the change under test.

  AB_ROUNDS=6 AB_CONFIGS="128,16384,128,2" python tools/ab_interleaved.py "" "FLASHMLA_JIT_SEESAW=0" PEER
A config is b,s_k,h_q,s_q[,varlen]: varlen 1 draws normal(s_k, s_k / 2) lengths, as tools/bench.py.
A variant is "" (as is), space-separated VAR=value settings for flashmla_jit (read again
per variant; FLASHMLA_JIT_DEFINES compiles a kernel variant), or PEER (FlashMLA from the
git-ignored .peer/). Each round starts one variant later than the one before: where a
variant always follows the same one, it runs in that one's heat (v30: at s_q 2 16K one
build ran 4-9 % slower than the as-is build when it came after it in every round, and 2.5 %
faster when it came first). AB_B2B=1 times each variant per call over back-to-back calls
in a CUDA graph, over KV caches that outgrow L2, as tools/bench.py's back-to-back column.
Prints, per config, each variant's median and best of the rounds, µs, and "differs" where
its output is not the first variant's (relative error over 1e-2).
"""
import os
import statistics
import sys

import torch
from triton.testing import do_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from mla_reference import make_inputs  # noqa: E402

from flashmla_jit import api, driver, flash_mla_with_kvcache, get_mla_metadata, settings  # noqa: E402
from bench import B2B_CALLS, b2b_replay, config_lens, env_configs, load_peer, rotation  # noqa: E402

CONFIGS = env_configs("128,16384,128,2")
ROUNDS = int(os.environ.get("AB_ROUNDS", "6"))
B2B = os.environ.get("AB_B2B", "") == "1"
START = {n: v for n, v in os.environ.items() if n.startswith("FLASHMLA_JIT_")}  # restored per variant


def use_settings(variant: str):
    """Environment of `variant` on top of the starting one; plans rebuilt from it."""
    for name in [n for n in os.environ if n.startswith("FLASHMLA_JIT_")]:
        if name not in START:
            del os.environ[name]
    os.environ.update(START)
    os.environ.update(dict(item.split("=", 1) for item in variant.split()))
    settings.get.cache_clear()
    api._plans.clear()
    # Loaded kernels are keyed by spec, which FLASHMLA_JIT_DEFINES is not part of.
    driver._library.cache_clear()
    driver._functions.clear()
    driver._configs.clear()


def time_config(b, s_k, h_q, s_q, varlen=0, *, variants, peer):
    """Each variant's times (µs) over the rounds, the variants in turn within a round, and
    the variants whose output differs from the first one's."""
    lens = config_lens(b, s_k, h_q, varlen)
    q, k, bt, sl = make_inputs(b, s_q, h_q, 1, lens, nan_tail=False)
    caches = rotation(k) if B2B else None
    times = {v: [] for v in variants}
    reference, differs = None, set()
    for r in range(ROUNDS):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            if v == "PEER":
                ps, pn = peer.get_mla_metadata(sl, s_q * h_q, 1)
                call_on = lambda kc: peer.flash_mla_with_kvcache(q, kc, bt, sl, 512, ps, pn, causal=True)
            else:  # the plan too is the variant's (its metadata kernel may differ)
                use_settings(v)
                sched, splits = get_mla_metadata(sl, s_q * h_q, 1)
                call_on = lambda kc: flash_mla_with_kvcache(q, kc, bt, sl, 512, sched, splits, causal=True)
            if r == 0:
                out = call_on(k)[0].float()
                reference = out if reference is None else reference
                if ((out - reference).norm() / reference.norm()).item() > 1e-2:
                    differs.add(v)
            if B2B:
                replay = b2b_replay(call_on, caches)
                times[v].append(do_bench(replay, warmup=10, rep=60, return_mode="median") * 1e3 / B2B_CALLS)
            else:
                times[v].append(do_bench(lambda: call_on(k), warmup=10, rep=60, return_mode="median") * 1e3)
    use_settings("")
    return times, differs


def main():
    variants = sys.argv[1:] or [""]
    peer = load_peer() if "PEER" in variants else None
    if "PEER" in variants and peer is None:
        sys.exit("PEER asked for, but .peer/flashmla_peer.py (a local FlashMLA build) is missing")
    print(f"{torch.cuda.get_device_name()}, configs (b, s_k, h_q, s_q) {CONFIGS}, {ROUNDS} rounds, "
          + ("per call over back-to-back calls" if B2B else "one call at a time"))
    for config in CONFIGS:
        times, differs = time_config(*config, variants=variants, peer=peer)
        torch.cuda.empty_cache()
        name = "b={} s_k={} h_q={} s_q={}".format(*config[:4]) + (" varlen" if config[4:5] == (1,) else "")
        print(f"{name}: " + " | ".join(
            f"{v or '(as is)'} {statistics.median(t):.1f} (best {min(t):.1f}){' differs' if v in differs else ''}"
            for v, t in times.items()), flush=True)


if __name__ == "__main__":
    main()
