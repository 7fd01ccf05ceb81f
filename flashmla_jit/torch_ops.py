"""torch.ops.flashmla_jit.*: the API as torch custom ops, for torch.compile and graphs.

Registered through torch.library with fake (meta) implementations, so
torch.compile(fullgraph=True) traces a model that calls the API and a CUDA graph sees
one op per call. Importing flashmla_jit does not import torch: this module is loaded
the first time the API is called inside a torch.compile trace (or by importing it);
eager-only processes never pay for the registration (~17 ms). Inside a trace the
public functions route through these ops; in eager mode they run directly, without
the dispatcher's overhead.
"""

from __future__ import annotations

import torch

from . import api
from .params import SCHED_RECORD_INTS


@torch.library.custom_op("flashmla_jit::get_mla_metadata", mutates_args=())
def get_mla_metadata(cache_seqlens: torch.Tensor, num_heads_per_head_k: int,
                     num_heads_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return api.get_mla_metadata(cache_seqlens, num_heads_per_head_k, num_heads_k)


@get_mla_metadata.register_fake
def _(cache_seqlens, num_heads_per_head_k, num_heads_k):
    num_parts = api._num_parts(cache_seqlens.device.index or 0, num_heads_per_head_k, num_heads_k)
    return (cache_seqlens.new_empty((num_parts, SCHED_RECORD_INTS)),
            cache_seqlens.new_empty((cache_seqlens.shape[0] + 1,)))


@torch.library.custom_op("flashmla_jit::flash_mla_with_kvcache", mutates_args=())
def flash_mla_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                           cache_seqlens: torch.Tensor, head_dim_v: int, tile_scheduler_metadata: torch.Tensor,
                           num_splits: torch.Tensor, softmax_scale: float | None = None,
                           causal: bool = False, k_scale: torch.Tensor | None = None,
                           k_scale_value: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    # An FP8 cache's per-tensor scale comes as a tensor (k_scale) or a float (k_scale_value).
    return api.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v,
                                      tile_scheduler_metadata, num_splits, softmax_scale, causal,
                                      k_scale=k_scale if k_scale is not None else k_scale_value)


@flash_mla_with_kvcache.register_fake
def _(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
      softmax_scale=None, causal=False, k_scale=None, k_scale_value=None):
    batch, s_q, h_q, _ = q.shape
    return (q.new_empty((batch, s_q, h_q, head_dim_v)),
            q.new_empty((batch, h_q, s_q), dtype=torch.float32))
