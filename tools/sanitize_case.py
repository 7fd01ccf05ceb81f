"""Small decode steps for compute-sanitizer (memcheck, racecheck): tools/gpu_check.sh runs it.

Covers a whole-request part, split requests (combine), an empty sequence, causal rows
that see nothing, NaN page tails and a multi-tile query (rows > 64), the seesaw kernel
(64-token pages) and the cp.async one (page 16), requests reordered on the cost line
(metadata.cuh, pack_order), every merge grid (a warp per row, which merges as the decode
CTAs flag their pieces, a CTA per 1, 2 or 4 chunks of a row, one chunk in 8 or 16 warps:
api.merge_grid); and both FP8 cache formats (staging buffers, the in-smem dequantization).
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402
from mla_reference import assert_close, make_fp8_inputs, make_inputs, reference  # noqa: E402

from flashmla_jit import dequantize_kv_cache_fp8, flash_mla_with_kvcache, get_mla_metadata  # noqa: E402

for batch, s_q, h_q, lens, page in [(3, 2, 16, [130, 0, 1], 64), (1, 2, 48, [2000], 64), (2, 1, 128, [70, 900], 64),
                                    (2, 1, 128, [70, 900], 16),  # pages of 64: seesaw (TMA); of 16: cp.async
                                    (2, 2, 128, [70, 900], 64),  # 256 rows: the seesaw's evict-first variant
                                    (1, 1, 16, [9000], 64), (6, 1, 64, [1500] * 6, 64),  # merge grids c1.w16, c4
                                    (1, 1, 64, [9000], 64),  # c1 in 8 warps (more CTAs than SMs)
                                    (40, 1, 128, [300] * 40, 64),  # a warp per row
                                    # more requests than half the parts, unequal: reordered on the line
                                    (70, 1, 16, [i * 37 % 300 + 64 for i in range(70)], 64)]:
    q, k, bt, sl = make_inputs(batch, s_q, h_q, 1, lens, page_size=page)
    sched, splits = get_mla_metadata(sl, s_q * h_q, 1)
    out, lse = flash_mla_with_kvcache(q, k, bt, sl, 512, sched, splits, causal=True)
    ref_out, ref_lse = reference(q, k, bt, sl, 512, causal=True)
    assert_close(out, lse, ref_out, ref_lse, f"sanitize case b={batch}")
for kv_format, batch, s_q, h_q, lens, page in [("fp8_e4m3", 3, 2, 16, [130, 0, 1], 16),
                                               ("fp8_656", 2, 1, 64, [70, 900], 64)]:
    q, k8, k_scale, bt, sl = make_fp8_inputs(batch, s_q, h_q, 1, lens, kv_format, page_size=page)
    sched, splits = get_mla_metadata(sl, s_q * h_q, 1)
    out, lse = flash_mla_with_kvcache(q, k8, bt, sl, 512, sched, splits, causal=True, k_scale=k_scale)
    deq = dequantize_kv_cache_fp8(k8, k_scale, torch.float32 if k_scale is not None else torch.bfloat16)
    ref_out, ref_lse = reference(q, deq, bt, sl, 512, causal=True)
    assert_close(out, lse, ref_out, ref_lse, f"sanitize case {kv_format} b={batch}")
torch.cuda.synchronize()
print("sanitize cases ok")
