"""cupy end to end in a process that never imports torch (run by tests/test_gpu.py).

bf16 is held as uint16 (cupy has no bfloat16); the reference is numpy float32.
Prints "cupy ok" on success; any failure raises.
"""

import math
import sys

import cupy as cp
import numpy as np

from flashmla_jit import flash_mla_with_kvcache, get_mla_metadata


def to_bf16_bits(x):
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even


def from_bf16_bits(b):
    return (b.astype(np.uint32) << 16).view(np.float32)


def reference(q, kv, table, lens, dv, causal):
    b, s_q, h_q, d = q.shape
    page, h_kv = kv.shape[1], kv.shape[2]
    out = np.zeros((b, s_q, h_q, dv), np.float32)
    lse = np.full((b, h_q, s_q), np.inf, np.float32)
    for i, n in enumerate(lens):
        if n == 0:
            continue
        keys = kv[table[i, : math.ceil(n / page)]].reshape(-1, h_kv, d)[:n]
        keys = np.repeat(keys, h_q // h_kv, axis=1).transpose(1, 0, 2)     # (h_q, n, d)
        s = np.einsum("shd,hnd->hsn", q[i], keys) * d ** -0.5
        if causal:
            limit = n - s_q + 1 + np.arange(s_q)
            s = np.where(np.arange(n)[None, None, :] >= limit[None, :, None], -np.inf, s)
        m = s.max(-1, keepdims=True)
        seen = np.isfinite(m)
        p = np.where(seen, np.exp(s - np.where(seen, m, 0)), 0)
        l = p.sum(-1, keepdims=True)
        o = np.einsum("hsn,hnd->shd", p / np.where(l > 0, l, 1), keys[..., :dv])
        out[i] = o
        lse[i] = np.where(seen[..., 0], np.log(np.where(l[..., 0] > 0, l[..., 0], 1)) + m[..., 0], np.inf)
    return out, lse


def main():
    rng = np.random.default_rng(0)
    b, s_q, h_q, h_kv, page, d, dv = 4, 2, 16, 1, 64, 576, 512
    lens = [700, 0, 64, 3000]
    max_blocks = math.ceil(max(lens) / page)
    pages = b * max_blocks + 2
    q = from_bf16_bits(to_bf16_bits(rng.standard_normal((b, s_q, h_q, d))))
    kv = from_bf16_bits(to_bf16_bits(rng.standard_normal((pages, page, h_kv, d))))
    table = rng.permutation(pages)[: b * max_blocks].reshape(b, max_blocks).astype(np.int32)
    for i, n in enumerate(lens):  # NaN past every seqlen
        flat = kv[table[i]].reshape(-1, h_kv, d)
        flat[n:] = np.nan
        kv[table[i]] = flat.reshape(max_blocks, page, h_kv, d)

    lens_d = cp.asarray(np.array(lens, np.int32))
    stream = cp.cuda.Stream()  # a non-default stream, ordered after the uploads above
    with stream:
        sched, splits = get_mla_metadata(lens_d, s_q * h_q // h_kv, h_kv)
        out, lse = flash_mla_with_kvcache(cp.asarray(to_bf16_bits(q)), cp.asarray(to_bf16_bits(kv)),
                                          cp.asarray(table), lens_d, dv, sched, splits, causal=True)
    stream.synchronize()
    assert "torch" not in sys.modules, "the cupy path imported torch"
    assert isinstance(out, cp.ndarray) and out.dtype == cp.uint16 and out.shape == (b, s_q, h_q, dv)
    assert isinstance(lse, cp.ndarray) and lse.dtype == cp.float32 and lse.shape == (b, h_q, s_q)
    got = from_bf16_bits(out.get())
    ref, ref_lse = reference(q, kv, table, lens, dv, causal=True)
    assert np.isfinite(got).all()
    cos = 1 - 2 * (got.astype(np.float64) * ref).sum() / ((got.astype(np.float64) ** 2 + ref ** 2).sum())
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert cos < 1e-5 and rel < 8e-3, (cos, rel)
    got_lse = lse.get()
    assert (np.isinf(got_lse) == np.isinf(ref_lse)).all()
    fin = np.isfinite(ref_lse)
    assert np.abs(got_lse[fin] - ref_lse[fin]).max() < 2e-3 * max(1, np.abs(ref_lse[fin]).max())
    print(f"cupy ok: cos {cos:.2e} rel {rel:.2e}")


if __name__ == "__main__":
    main()
