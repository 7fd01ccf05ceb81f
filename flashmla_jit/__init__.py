"""flashmla_jit: FlashMLA's MLA decode for Hopper as a JIT-compiled runtime.

Importing this package is cheap: torch, cupy and the CUDA libraries are loaded only
when a function is called (PEP 562 module __getattr__).
"""

from ._version import __version__

__all__ = ["get_mla_metadata", "flash_mla_with_kvcache", "quantize_kv_cache_fp8",
           "quantize_kv_cache_fp8_per_tensor", "dequantize_kv_cache_fp8", "__version__"]
_FP8_HELPERS = ("quantize_kv_cache_fp8", "quantize_kv_cache_fp8_per_tensor", "dequantize_kv_cache_fp8")


def __getattr__(name):
    if name in ("get_mla_metadata", "flash_mla_with_kvcache"):
        from . import api
        return getattr(api, name)
    if name in _FP8_HELPERS:  # torch helpers for FP8 caches (flashmla_jit/fp8.py)
        from . import fp8
        return getattr(fp8, name)
    raise AttributeError(f"module 'flashmla_jit' has no attribute {name!r}")
