"""A/B kernel variants on the GPU: each FLASHMLA_JIT_DEFINES set in a fresh process,
timed on the same configs, outputs checked against the cp.async kernel.

  AB_ROUNDS=2 python tools/ab.py "" "NAME=1" PEER
("" = the kernels as they are, "NAME=1" = a -D for a kernel's #ifndef knob, "ENV:VAR=1" = an
environment variable (e.g. ENV:FLASHMLA_JIT_SEESAW=0), PEER = FlashMLA
from .peer/, @DIR = the kernels of another checkout (absolute path; for the device tool keep
it inside the tree: `git archive HEAD~1 flashmla_jit kernels tests | tar -x -C _base`);
rounds interleave the sets. AB_CONFIGS="b,s_k,h_q,s_q ..." replaces the default configs.)
"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIGS = [(128, 16384, 128, 2), (128, 16384, 128, 1), (128, 16384, 64, 1), (128, 4096, 128, 2)]
CONFIGS = [tuple(map(int, c.split(","))) for c in os.environ.get("AB_CONFIGS", "").split()] or DEFAULT_CONFIGS

PROBE = r"""
import os, sys, torch
sys.path[:0] = [{root!r}, os.path.join({root!r}, "tests")]
from triton.testing import do_bench
from mla_reference import make_inputs
from flashmla_jit import api, flash_mla_with_kvcache, get_mla_metadata, settings
res = []
for b, s_k, h_q, s_q in {configs!r}:
    q, k, bt, sl = make_inputs(b, s_q, h_q, 1, [s_k] * b, nan_tail=False)
    sched, splits = get_mla_metadata(sl, s_q * h_q, 1)
    ours = call = lambda: flash_mla_with_kvcache(q, k, bt, sl, 512, sched, splits, causal=True)
    if os.environ.get("AB_PEER"):  # FlashMLA built in .peer/ (git-ignored)
        sys.path.insert(0, os.path.join({root!r}, ".peer")); import flashmla_peer; flashmla_peer.load()
        ps, pn = flashmla_peer.get_mla_metadata(sl, s_q * h_q, 1)
        call = lambda: flashmla_peer.flash_mla_with_kvcache(q, k, bt, sl, 512, ps, pn, causal=True)
    out = call()[0].float()
    us = do_bench(call, warmup=25, rep=100, return_mode="median") * 1e3
    os.environ["FLASHMLA_JIT_SEESAW"] = "0"; settings.get.cache_clear(); api._plans.clear()
    ref = ours()[0].float()  # our cp.async kernels
    del os.environ["FLASHMLA_JIT_SEESAW"]; settings.get.cache_clear(); api._plans.clear()
    err = ((out - ref).norm() / ref.norm()).item()
    res.append(f"{{us:8.1f}} ({{err:.0e}})")
    del q, k; torch.cuda.empty_cache()
print("RESULT", " | ".join(res))
"""

print("configs (b, s_k, h_q, s_q):", CONFIGS)
ROUNDS = int(os.environ.get("AB_ROUNDS", "1"))
for defines in (sys.argv[1:] or [""]) * ROUNDS:  # rounds interleave the variants: clocks drift
    peer = defines == "PEER"  # time FlashMLA instead; our cp.async kernels stay the reference
    root = defines[1:] if defines.startswith("@") else ROOT
    setting = defines[4:].split("=", 1) if defines.startswith("ENV:") else None
    env = dict(os.environ, FLASHMLA_JIT_DEFINES="" if peer or setting or root != ROOT else defines,
               AB_PEER="1" if peer else "")
    if setting:
        env[setting[0]] = setting[1]
    run = subprocess.run([sys.executable, "-c", PROBE.format(root=root, configs=CONFIGS)], env=env,
                         capture_output=True, text=True)
    line = next((l for l in run.stdout.splitlines() if l.startswith("RESULT")), None)
    error = next((l for l in run.stderr.splitlines() if "warning" in l or "Error" in l), run.stderr[-200:])
    print(f"{defines or '(default)':60s} {line[7:] if line else 'FAILED: ' + error.strip()[:150]}", flush=True)
