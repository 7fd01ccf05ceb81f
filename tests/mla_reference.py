"""Float32 reference for MLA decode over a paged cache, and FlashMLA-style input makers.

Shared by the GPU tests and tools/bench.py. torch only; the cupy test has its own
numpy twin so that its process never imports torch.
"""

import math

import torch


def make_inputs(batch, s_q, h_q, h_kv, seqlens, dtype=torch.bfloat16, page_size=64, d=576, device="cuda",
                extra_pages=3, nan_tail=True, generator=None):
    """Random q, a paged cache in random page order (NaN past every seqlen), block table."""
    seqlens = torch.as_tensor(seqlens, dtype=torch.int32)
    max_len = max(int(seqlens.max()), 1)
    max_blocks = math.ceil(max_len / page_size)
    num_pages = batch * max_blocks + extra_pages
    q = torch.randn(batch, s_q, h_q, d, dtype=dtype, device=device, generator=generator)
    k_cache = torch.randn(num_pages, page_size, h_kv, d, dtype=dtype, device=device, generator=generator)
    perm = torch.randperm(num_pages, device="cpu")[: batch * max_blocks]
    block_table = perm.view(batch, max_blocks).to(torch.int32).to(device)
    if nan_tail:  # every position past a seqlen holds NaN: results must not change
        for i, n in enumerate(seqlens.tolist()):
            pages = block_table[i].long()
            flat = k_cache[pages].view(max_blocks * page_size, h_kv, d)
            flat[n:] = float("nan")
            k_cache[pages] = flat.view(max_blocks, page_size, h_kv, d)
    return q, k_cache, block_table, seqlens.to(device)


def make_fp8_inputs(batch, s_q, h_q, h_kv, seqlens, kv_format, dtype=torch.bfloat16, page_size=64, d=576,
                    device="cuda", extra_pages=3, nan_tail=True, generator=None):
    """make_inputs with the cache quantized: kv_format "fp8_e4m3" (per tensor, d columns of
    e4m3, k_scale a float) or "fp8_656" (FlashMLA's layout, k_scale None). Returns
    (q, k_cache_fp8, k_scale, block_table, seqlens). Past every seqlen the cache holds NaN
    bytes: e4m3 0x7f / 0xff alternating, and 0xff (NaN) in the 656 layout's scales and rope."""
    from flashmla_jit import fp8
    q, k, table, lens = make_inputs(batch, s_q, h_q, h_kv, seqlens, dtype=dtype, page_size=page_size, d=d,
                                    device=device, extra_pages=extra_pages, nan_tail=False, generator=generator)
    if kv_format == "fp8_656":
        k8, k_scale = fp8.quantize_kv_cache_fp8(k), None
    else:
        k8, k_scale = fp8.quantize_kv_cache_fp8_per_tensor(k)
    if nan_tail:
        raw = k8.view(torch.uint8)
        e4m3_bytes = 512 if kv_format == "fp8_656" else d
        max_blocks = table.shape[1]
        for i, n in enumerate(lens.tolist()):
            pages = table[i].long()
            flat = raw[pages].reshape(max_blocks * page_size, h_kv, raw.shape[-1])
            flat[n:] = 0xFF
            flat[n:, :, :e4m3_bytes:2] = 0x7F
            raw[pages] = flat.view(max_blocks, page_size, h_kv, raw.shape[-1])
    return q, k8, k_scale, table, lens


def reference(q, k_cache, block_table, seqlens, head_dim_v, softmax_scale=None, causal=False):
    """out (b, s_q, h_q, dv) float32 and lse (b, h_q, s_q) float32 (+inf where no key is seen)."""
    batch, s_q, h_q, d = q.shape
    page_size, h_kv = k_cache.shape[1], k_cache.shape[2]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros(batch, s_q, h_q, head_dim_v, dtype=torch.float32, device=q.device)
    lse = torch.full((batch, h_q, s_q), float("inf"), dtype=torch.float32, device=q.device)
    for i, n in enumerate(seqlens.tolist()):
        if n == 0:
            continue
        pages = block_table[i, : math.ceil(n / page_size)].long()
        kv = k_cache[pages].reshape(-1, h_kv, d)[:n].float()                 # (n, h_kv, d)
        kv = kv.repeat_interleave(h_q // h_kv, dim=1).transpose(0, 1)        # (h_q, n, d)
        qi = q[i].float().transpose(0, 1)                                    # (h_q, s_q, d)
        scores = torch.bmm(qi, kv.transpose(1, 2)) * scale                   # (h_q, s_q, n)
        if causal:
            pos = torch.arange(n, device=q.device)
            limit = n - s_q + 1 + torch.arange(s_q, device=q.device)         # keys < limit visible
            scores = scores.masked_fill(pos[None, None, :] >= limit[None, :, None], float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)                            # (h_q, s_q)
        seen = torch.isfinite(row_lse)
        probs = torch.exp(scores - torch.where(seen, row_lse, 0)[..., None])
        probs = torch.where(seen[..., None], probs, 0)
        o = torch.bmm(probs, kv[..., :head_dim_v])                           # (h_q, s_q, dv)
        out[i] = o.transpose(0, 1)
        lse[i] = torch.where(seen, row_lse, float("inf"))
    return out, lse


def capture_graph(fn):
    """Run fn once on a side stream (compiles and loads outside the capture), capture a
    second call in a CUDA graph; return (the graph's replay, what the captured call returned)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph.replay, result


def cosine_diff(x, y):
    """FlashMLA's measure: 1 - 2 sum(xy) / sum(x^2 + y^2); 0 for identical tensors."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    return 0.0 if denom == 0 else float(1 - 2 * (x * y).sum() / denom)


def assert_close(out, lse, ref_out, ref_lse, what=""):
    """Every element written, no NaN, cosine < 1e-5, norm-wise error within bf16 rounding."""
    out = out.float()
    assert torch.isfinite(out).all(), f"{what}: out has NaN/inf"
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), f"{what}: +inf lse pattern differs"
    assert not torch.isnan(lse).any(), f"{what}: lse has NaN"
    cos = cosine_diff(out, ref_out)
    assert cos < 1e-5, f"{what}: cosine diff {cos:.3e}"
    denom = ref_out.norm()
    rel = float((out - ref_out).norm() / denom) if denom > 0 else float(out.norm())
    assert rel < 8e-3, f"{what}: relative error {rel:.3e}"
    finite = torch.isfinite(ref_lse)
    if finite.any():
        lse_err = float((lse[finite] - ref_lse[finite]).abs().max())
        assert lse_err < 2e-3 * max(1.0, float(ref_lse[finite].abs().max())), f"{what}: lse error {lse_err:.3e}"
