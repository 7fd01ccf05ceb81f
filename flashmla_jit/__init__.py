"""flashmla_jit: FlashMLA's MLA decode for Hopper as a JIT-compiled runtime.

Importing this package is cheap: torch, cupy and the CUDA libraries are loaded only
when a function is called (PEP 562 module __getattr__).
"""

from ._version import __version__

__all__ = ["get_mla_metadata", "flash_mla_with_kvcache", "__version__"]


def __getattr__(name):
    if name in ("get_mla_metadata", "flash_mla_with_kvcache"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'flashmla_jit' has no attribute {name!r}")
