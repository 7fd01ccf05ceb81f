"""FP8 KV caches on the CPU: the torch quantize / dequantize helpers, and a bit-level
emulation of the kernel's dequantization arithmetic (kernels/flashmla/fp8.cuh)."""

import math

import pytest

torch = pytest.importorskip("torch")

import flashmla_jit  # noqa: E402
from flashmla_jit import fp8  # noqa: E402
from mla_reference import make_fp8_inputs, reference  # noqa: E402

# Every finite e4m3 code (0x7f / 0xff are NaN).
CODES = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)


def rn_bf16(x: torch.Tensor) -> torch.Tensor:
    """Round float64 values (normal bf16 range) to bf16 once, nearest-even, as float64."""
    m, e = torch.frexp(x)
    return torch.ldexp(torch.round(m * 256) / 256, e)


def test_656_layout_bytes():
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(2, 4, 1, 576, generator=gen).to(torch.bfloat16)
    k[0, 0, 0, 128:256] = 0                       # an all-zero group: scale 1, values 0
    q = flashmla_jit.quantize_kv_cache_fp8(k)
    assert q.shape == (2, 4, 1, 656) and q.dtype == torch.float8_e4m3fn
    raw = q.view(torch.uint8)
    scales = raw[..., 512:528].contiguous().view(torch.float32)
    amax = k[..., :512].float().abs().unflatten(-1, (4, 128)).amax(-1)
    expected = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    assert torch.equal(scales, expected)
    assert torch.equal(raw[..., 528:].contiguous().view(torch.bfloat16), k[..., 512:])  # rope kept bf16
    values = raw[..., :512].view(torch.float8_e4m3fn).float().unflatten(-1, (4, 128))
    assert values.abs().amax(-1)[amax > 0].eq(448).all()   # each group's amax maps to e4m3's max
    assert values[0, 0, 0, 1].eq(0).all()


def test_656_round_trip_within_e4m3_rounding():
    gen = torch.Generator().manual_seed(1)
    k = (torch.randn(3, 16, 2, 576, generator=gen) * torch.logspace(-3, 3, 576)).to(torch.bfloat16)
    q = flashmla_jit.quantize_kv_cache_fp8(k)
    d = flashmla_jit.dequantize_kv_cache_fp8(q, dtype=torch.float32)
    assert torch.equal(d[..., 512:], k[..., 512:].float())
    scale = q.view(torch.uint8)[..., 512:528].contiguous().view(torch.float32)
    err = (d[..., :512] - k[..., :512].float()).abs().unflatten(-1, (4, 128))
    # e4m3 keeps 3 fraction bits: half an ulp is <= 2^-4 relative, and subnormals (below
    # 2^-6 * scale) round to multiples of 2^-9 * scale
    bound = torch.maximum(k[..., :512].float().abs().unflatten(-1, (4, 128)) * 2 ** -4,
                          scale[..., None] * 2 ** -10)
    assert (err <= bound * (1 + 1e-6)).all()
    # the default (bf16) is the fp32 product rounded once
    assert torch.equal(flashmla_jit.dequantize_kv_cache_fp8(q), d.to(torch.bfloat16))


def test_uint8_cache_is_read_as_e4m3_bytes():
    k = torch.randn(2, 8, 1, 576).to(torch.bfloat16)
    q = flashmla_jit.quantize_kv_cache_fp8(k)
    assert torch.equal(flashmla_jit.dequantize_kv_cache_fp8(q.view(torch.uint8)), flashmla_jit.dequantize_kv_cache_fp8(q))


def test_per_tensor_round_trip():
    k = torch.randn(4, 16, 1, 576) * 5
    q, scale = flashmla_jit.quantize_kv_cache_fp8_per_tensor(k)
    assert q.dtype == torch.float8_e4m3fn and scale == pytest.approx(float(k.abs().max()) / 448)
    d = flashmla_jit.dequantize_kv_cache_fp8(q, scale, torch.float32)
    assert float(((d - k).norm() / k.norm())) < 0.05
    tensor_scale = torch.tensor([scale], dtype=torch.float32)
    assert torch.equal(flashmla_jit.dequantize_kv_cache_fp8(q, tensor_scale, torch.float32), d)
    with pytest.raises(ValueError, match="k_scale is required"):
        flashmla_jit.dequantize_kv_cache_fp8(q)
    with pytest.raises(ValueError, match="k_scale must be None for the 656-byte layout"):
        flashmla_jit.dequantize_kv_cache_fp8(flashmla_jit.quantize_kv_cache_fp8(k), 1.0)


def test_quantize_rejects_other_head_dims():
    with pytest.raises(ValueError, match="last dim 576"):
        flashmla_jit.quantize_kv_cache_fp8(torch.zeros(1, 1, 1, 512))


# ---- the kernel's arithmetic, bit for bit ------------------------------------------------

def kernel_e4m3_to_bf16(codes: torch.Tensor) -> torch.Tensor:
    """fp8.cuh: cvt.rn.f16x2.e4m3x2, then f16x2_to_bf16x2_exact (bits moved, times 2^112)."""
    h = codes.view(torch.float8_e4m3fn).to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    bits = (h & 0x8000) | ((h >> 3) & 0x0FFF)
    as_bf16 = bits.to(torch.int16).view(torch.bfloat16)
    exponent = (bits >> 7) & 0xFF
    assert ((exponent > 0) | (bits & 0x7FFF == 0)).all(), "a nonzero value formed a bf16 subnormal"
    return as_bf16.double() * 2.0 ** 112   # mul.rn.bf16x2 by 2^112: exact (power of two, normal result)


def test_e4m3_to_bf16_bit_trick_is_exact_for_every_code():
    got = kernel_e4m3_to_bf16(CODES)
    want = CODES.view(torch.float8_e4m3fn).double()
    assert torch.equal(got, want)
    assert torch.equal(got.to(torch.bfloat16).double(), want)   # and representable in bf16


def kernel_scaled(x: torch.Tensor, s: float) -> torch.Tensor:
    """fp8.cuh split_scale + scale_bf16x2: fma.rn.bf16x2(x, hi, mul.rn.bf16x2(x, lo))."""
    hi = float(torch.tensor(s, dtype=torch.float32).to(torch.bfloat16))
    lo = float(torch.tensor(s - hi, dtype=torch.float32).to(torch.bfloat16))
    t = rn_bf16(x * lo) if lo != 0 else torch.zeros_like(x)
    return rn_bf16(x * hi + t)


@pytest.mark.parametrize("s", [0.0123, 1.0, 3.3e-4, 0.7777, 2.0 ** -7, 17.31, 448.0 / 3])
def test_656_scaled_conversion_within_one_ulp(s):
    s = float(torch.tensor(s, dtype=torch.float32))          # the fp32 scale in the cache
    x = CODES.view(torch.float8_e4m3fn).double()
    x = x[x != 0]
    got = kernel_scaled(x, s)
    want = rn_bf16(x * s)                                      # dequantize_kv_cache_fp8's value
    ulp = torch.ldexp(torch.ones_like(want), torch.frexp(want)[1] - 8)
    assert ((got - want).abs() <= ulp).all()
    assert float((got != want).double().mean()) < 0.02        # and almost always identical
    assert torch.equal(kernel_scaled(torch.zeros(3, dtype=torch.float64), s), torch.zeros(3, dtype=torch.float64))


def test_per_tensor_scale_folded_out_of_the_tile_matches_the_dequantized_reference():
    """Per-tensor: the kernel keeps e4m3 values in the tile and applies k_scale to S (with
    the softmax scale) and to O; same attention as the reference on fp8 * k_scale."""
    gen = torch.Generator().manual_seed(5)
    b, s_q, h_q, seqlens = 3, 2, 4, [0, 37, 130]
    q, k8, k_scale, table, lens = make_fp8_inputs(b, s_q, h_q, 1, seqlens, "fp8_e4m3", device="cpu",
                                                   page_size=16, generator=gen)
    ref_out, ref_lse = reference(q, fp8.dequantize_kv_cache_fp8(k8, k_scale, torch.float32), table, lens, 512,
                                 causal=True)
    values = k8.float()                                          # what the tile holds
    scale = 576 ** -0.5
    out = torch.zeros_like(ref_out)
    lse = torch.full_like(ref_lse, math.inf)
    for i, n in enumerate(seqlens):
        if n == 0:
            continue
        kv = values[table[i].long()].reshape(-1, 576)[:n]
        scores = q[i].float() @ kv.T * (scale * k_scale)      # (s_q, h_q, n)
        limit = n - s_q + 1 + torch.arange(s_q)
        scores = scores.masked_fill(torch.arange(n)[None, None] >= limit[:, None, None], -math.inf)
        m = scores.amax(-1, keepdim=True)
        p = torch.exp(scores - m)
        out[i] = (p @ kv[:, :512]) / p.sum(-1, keepdim=True) * k_scale
        lse[i] = (m[..., 0] + p.sum(-1).log()).T
    assert torch.allclose(out, ref_out, rtol=1e-4, atol=1e-5)
    assert torch.allclose(lse, ref_lse, rtol=1e-5)


@pytest.mark.parametrize("kv_format", ["fp8_e4m3", "fp8_656"])
def test_fp8_inputs_poison_page_tails_with_nan_bytes(kv_format):
    gen = torch.Generator().manual_seed(2)
    seqlens = [0, 5, 16, 33]
    q, k8, k_scale, table, lens = make_fp8_inputs(4, 1, 16, 1, seqlens, kv_format, device="cpu",
                                                   page_size=16, generator=gen)
    assert (k_scale is None) == (kv_format == "fp8_656")
    raw = k8.view(torch.uint8)
    for i, n in enumerate(seqlens):
        rows = raw[table[i].long()].reshape(-1, raw.shape[-1])
        assert ((rows[n:] & 0x7F) == 0x7F).all()                   # e4m3 NaN bytes past the seqlen
        deq = fp8.dequantize_kv_cache_fp8(k8, k_scale, torch.float32)[table[i].long()].reshape(-1, 576)
        assert torch.isfinite(deq[:n]).all() and torch.isnan(deq[n:]).all()


def test_fp8_kernel_spec():
    from flashmla_jit import spec
    s = spec.decode_spec("bf16", 576, 512, True, 2, 256, "fp8_656")
    assert (s.tile_rows, s.causal, s.name) == (32, True, "decode.bf16.d576.dv512.m32.causal.kv_fp8_656")
    assert s.name_expression.endswith(", true, flashmla::kKvFp8Ds>")
    assert spec.decode_spec("fp16", 512, 512, False, 1, 16, "fp8_e4m3").tile_rows == 16
    plain = spec.decode_spec("bf16", 576, 512, False, 1, 16)
    assert plain.name_expression.endswith(", false>") and plain.kv_format == "same"   # unchanged for 16-bit caches
    assert s.smem_bytes == 2 * 64 * 704 + 64 * 576 * 2 + 32 * 576 * 2 + 32 * 64 * 2 + 9 * 32 * 4
    with pytest.raises(ValueError, match=r"tile_rows must be one of \(16, 32\) for head_dim_v=512 and kv_format='fp8_e4m3'"):
        spec.KernelSpec("decode", tile_rows=64, kv_format="fp8_e4m3")
    with pytest.raises(ValueError, match="kv_format 'fp8_656' does not support dtype fp16 with d=576, dv=512"):
        spec.KernelSpec("decode", "fp16", tile_rows=32, kv_format="fp8_656")
    with pytest.raises(ValueError, match="a decode-kernel choice, not combine's"):
        spec.KernelSpec("combine", kv_format="fp8_e4m3")
    with pytest.raises(ValueError, match="kv_format must be one of"):
        spec.KernelSpec("decode", tile_rows=32, kv_format="fp8")
