"""FP8 KV caches in torch: FlashMLA's 656-byte layout and per-tensor e4m3, to and from 16-bit.

Pure torch (any device; no kernel launch), for building caches and for checking the
kernels: a cache this module makes, decoded by flash_mla_with_kvcache, matches the
attention computed on `dequantize_kv_cache_fp8` of it.

656-byte token (FlashMLA, DeepSeek V3.2): bytes [0, 512) are the 512 latent values as
e4m3, [512, 528) four float32 scales (scale i covers latent values 128 i .. 128 i + 127),
[528, 656) the 64 rope values as bf16 (not quantized). Value = e4m3 * scale.
Per-tensor e4m3: every column (latent and rope) as e4m3, value = e4m3 * k_scale.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
LATENT, ROPE, GROUP = 512, 64, 128
TOKEN_BYTES = LATENT + 4 * (LATENT // GROUP) + 2 * ROPE  # 656


def _e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_kv_cache_fp8(k_cache: torch.Tensor) -> torch.Tensor:
    """(..., 576) float cache -> (..., 656) float8_e4m3fn in FlashMLA's layout.

    Per 128-value latent group: scale = amax / 448 (1 for an all-zero group), values
    e4m3(x / scale); the rope part is stored as bf16. NaN in a group stays NaN.
    """
    if k_cache.shape[-1] != LATENT + ROPE:
        raise ValueError(f"k_cache must have last dim {LATENT + ROPE} (512 latent + 64 rope), got {tuple(k_cache.shape)}")
    x = k_cache.float()
    groups = x[..., :LATENT].unflatten(-1, (LATENT // GROUP, GROUP))
    amax = groups.abs().amax(-1)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))   # NaN amax -> 1: values stay NaN
    values = _e4m3(groups / scale[..., None]).flatten(-2)
    parts = [values.view(torch.uint8), scale.contiguous().view(torch.uint8),
             x[..., LATENT:].to(torch.bfloat16).contiguous().view(torch.uint8)]
    return torch.cat(parts, -1).view(torch.float8_e4m3fn)


def quantize_kv_cache_fp8_per_tensor(k_cache: torch.Tensor, k_scale: float | None = None):
    """(..., d) float cache -> ((..., d) float8_e4m3fn, k_scale): one scale for all values
    (default amax / 448)."""
    x = k_cache.float()
    if k_scale is None:
        amax = float(x.abs().nan_to_num(0.0).amax())
        k_scale = amax / E4M3_MAX if amax > 0 else 1.0
    return _e4m3(x / k_scale), k_scale


def dequantize_kv_cache_fp8(k_cache: torch.Tensor, k_scale=None, dtype: torch.dtype = torch.bfloat16):
    """FP8 cache (float8_e4m3fn, or uint8 holding e4m3 bytes) -> (..., 576) / (..., d) `dtype`.

    Last dim 656: FlashMLA's layout (k_scale must be None); each value is float(e4m3) *
    scale rounded once to `dtype`. Otherwise per-tensor: float(e4m3) * k_scale (a float
    or a 1-element tensor); pass dtype=torch.float32 for the unrounded values.
    """
    raw = k_cache.view(torch.uint8)
    if k_cache.shape[-1] == TOKEN_BYTES:
        if k_scale is not None:
            raise ValueError("k_scale must be None for the 656-byte layout: its scales are in every token")
        values = raw[..., :LATENT].view(torch.float8_e4m3fn).float()
        scale = raw[..., LATENT:LATENT + 16].contiguous().view(torch.float32)
        rope = raw[..., LATENT + 16:].contiguous().view(torch.bfloat16)
        latent = (values.unflatten(-1, (LATENT // GROUP, GROUP)) * scale[..., None]).flatten(-2)
        return torch.cat([latent.to(dtype), rope.to(dtype)], -1)
    if k_scale is None:
        raise ValueError("k_scale is required for a per-tensor FP8 cache")
    scale = k_scale.float().reshape(()) if isinstance(k_scale, torch.Tensor) else float(k_scale)
    return (raw.view(torch.float8_e4m3fn).float() * scale).to(dtype)
