"""A decode step for ncu to profile: b = 128, s_k = 16384 (or B, S_K), causal, bf16.

  ncu -k regex:decode -s 2 -c 1 --section WarpStateStats python tools/ncu_probe.py H_Q S_Q [B S_K]
  (add --page source --print-source sass --csv for stall samples per SASS instruction)
  NCU_PEER=1: FlashMLA from .peer/ (git-ignored) instead, kernel regex:splitkv_mla
  NCU_VARLEN=1: lengths drawn around S_K as tools/bench.py's varlen rows
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from mla_reference import make_inputs  # noqa: E402

import flashmla_jit  # noqa: E402

h_q, s_q = int(sys.argv[1]), int(sys.argv[2])
batch, s_k = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else (128, 16384)
if os.environ.get("NCU_VARLEN"):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from bench import config_lens  # noqa: E402
    lens = config_lens(batch, s_k, h_q, True)
else:
    lens = [s_k] * batch
q, k_cache, block_table, seqlens = make_inputs(batch, s_q, h_q, 1, lens, nan_tail=False)
api = flashmla_jit
if os.environ.get("NCU_PEER"):
    sys.path.insert(0, os.path.join(ROOT, ".peer"))
    import flashmla_peer as api  # noqa: E402

    api.load()
sched, splits = api.get_mla_metadata(seqlens, s_q * h_q, 1)
for _ in range(3):  # the first call compiles; profile a later one (-s 2)
    api.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, sched, splits, causal=True)
torch.cuda.synchronize()
