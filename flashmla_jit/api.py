"""The public API, FlashMLA's: get_mla_metadata and flash_mla_with_kvcache.

Data flows one way: describe and validate the inputs -> pick the KernelSpec ->
driver.launch (which loads through the cache, which compiles on a miss). Nothing
here synchronizes the host unless FLASHMLA_JIT_VALIDATE=1 asks for the checks that
need the seqlens and page ids on the host.
"""

from __future__ import annotations

import ctypes
import math
import struct

from . import settings
from .spec import (BLOCK_N, COMBINE_THREADS, MAX_PARTS, MERGE_LOADS, METADATA_SPEC, SUPPORTED_HEAD_DIMS, combine_spec,
                   decode_spec, merge_chunks_for, q_tma_fits, seesaw_fits, tile_rows_for)
from .params import CombineParams, DecodeParams, SeesawParams
from .tensors import Tensor, current_stream, describe, empty

# Fixed cost of one split piece (Q load + epilogue), in 64-token blocks, for the scheduler.
OVERHEAD_BLOCKS = 5


def whole_slack(rows: int) -> tuple:
    """How much longer a part may get to keep equal requests whole, or (fewer requests than
    parts) split on part boundaries (metadata.cuh): (percent, blocks). Up to 128 query
    rows per KV head a step is memory-bound: cutting b = 128
    requests over 132 parts cost 3-10 % (H100, docs/PERF.md). At 256 rows the 3 % of SMs
    left idle cost as much as they would compute, while the cut requests cost a combine
    after the decode kernel and more pieces, 15-20 us together (~12 blocks of a part's
    work): whole requests gained 3 % at 4K and tied at 8K (8 / 16 blocks more), and lost
    2-3 % at 16K (31 blocks; PERF.md v11, v13)."""
    return (10, 0) if rows <= 128 else (0, 12)


def merge_ctas(batch: int, h_kv: int, rows: int, head_dim_v: int, chunks: int) -> int:
    """The combine grid's size: a CTA per row and `chunks` 128-column chunks, or (chunks
    0) a CTA per 8 rows, a warp each (combine.cuh)."""
    per_head = rows * (head_dim_v // 128 // chunks) if chunks else -(-rows // (COMBINE_THREADS // 32))
    return batch * h_kv * per_head


def merge_grid(batch: int, h_kv: int, rows: int, num_parts: int, head_dim_v: int, sms: int) -> tuple:
    """The combine grid (KernelSpec.merge_chunks, merge_warps): chunks 0 = a warp per row,
    else a CTA per row and this many 128-column chunks, the most that keep all of a
    request's pieces in flight in one round of loads. Chosen by a cost fitted on the H100
    (docs/PERF.md, v15): a warp per row takes ~5 us + 0.5 us per piece after the decode
    kernel; the CTA grid ~3 us + 2.2 us per wave of 2 CTAs an SM (b = 16 h128: 7.5
    against 20.3 us; b = 4 h128: 12 against 7.6; b = 16 h16: 7.2 against 3.3). One chunk
    a CTA takes 16 warps where every CTA has an SM of its own (b = 1 h16 32K: tail 5.1 ->
    4.2 us; with more CTAs than SMs 16-warp CTAs ran b = 4 h128 5 us slower, v19)."""
    pieces = -(-num_parts // batch) + 1  # each cut between parts adds at most one
    chunks = max((g for g in merge_chunks_for(head_dim_v) if 8 * (MERGE_LOADS[8] // g) >= pieces), default=1)
    ctas = merge_ctas(batch, h_kv, rows, head_dim_v, chunks)
    if not 5 + 0.5 * pieces > 3 + 2.2 * ctas / (2 * sms):
        return 0, 8
    return chunks, 16 if chunks == 1 and ctas <= sms else 8


# ---- validation helpers: each error names the argument, what it got and what it needs ----

def _check_dtype(t: Tensor, name: str, allowed):
    if t.dtype not in allowed:
        raise TypeError(f"{name} must have dtype {' or '.join(allowed)}, got {t.dtype}")


def _check_rank(t: Tensor, name: str, ndim: int, layout: str):
    if t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {t.shape}")


def _check_last_dim_contiguous(t: Tensor, name: str):
    if t.shape[-1] != 1 and t.strides[-1] != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {t.strides}")


def _check_contiguous(t: Tensor, name: str):
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got shape {t.shape} with strides {t.strides}")


def _check_16_byte_rows(t: Tensor, name: str, dims, itemsize: int = 2):
    """cp.async moves 16-byte chunks: base and row strides must be 16-byte multiples."""
    if t.ptr % 16:
        raise ValueError(f"{name} must start at a 16-byte aligned address, got 0x{t.ptr:x}")
    per_chunk = 16 // itemsize
    for d in dims:
        if t.shape[d] > 1 and t.strides[d] % per_chunk:
            raise ValueError(f"{name} stride of dim {d} must be a multiple of {per_chunk} elements (16 bytes), "
                             f"got strides {t.strides}")


def _check_positive_int(name: str, value, context: str = ""):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int{context}, got {value!r}")


def _check_device(tensors: dict) -> int:
    """All arrays on one CUDA device, which must be a Hopper GPU; returns its index."""
    devices = {name: t.device for name, t in tensors.items()}
    for name, t in tensors.items():
        if t.device is None:
            raise ValueError(f"{name} must be on a CUDA device, got {t.obj.device}")
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{n} on cuda:{d}" for n, d in devices.items())
        raise ValueError(f"all arrays must be on one CUDA device, got {where}")
    device = next(iter(devices.values()))
    from . import driver
    major, minor = driver.compute_capability(device)
    if major != 9:
        raise ValueError(f"flashmla_jit needs a Hopper GPU (sm_90); cuda:{device} is sm_{major}{minor}")
    return device


def _num_parts(device: int, rows: int, h_kv: int) -> int:
    from . import driver
    m_blocks = math.ceil(rows / tile_rows_for(rows))
    return max(1, min(MAX_PARTS, driver.sm_count(device) // (h_kv * m_blocks)))


# ---- public API -----------------------------------------------------------------------

_is_compiling = None


def _compiling(x) -> bool:
    """Inside a torch.compile trace of torch tensors: go through torch.ops.flashmla_jit.*,
    registered here on first use (dynamo runs the import for real). Eager-only processes
    never register them: torch.library's registration costs ~17 ms of the first call."""
    global _is_compiling
    if not type(x).__module__.startswith("torch"):
        return False
    if _is_compiling is None:
        import torch
        _is_compiling = torch.compiler.is_compiling
    if not _is_compiling():
        return False
    from . import torch_ops  # noqa: F401
    return True


def get_mla_metadata(cache_seqlens, num_heads_per_head_k: int, num_heads_k: int, *, num_seqs=None, out=None):
    """Split-KV schedule for one decode step, computed on the GPU.

    cache_seqlens: (batch,) int32 on the GPU. num_heads_per_head_k: s_q * h_q // h_kv
    (query rows per KV head). num_heads_k: h_kv. Returns (tile_scheduler_metadata
    (num_parts, 8) int32, num_splits (batch + 1,) int32) in the caller's framework.

    For CUDA graphs captured at a fixed batch: `num_seqs` (an int, or a 1-element int32
    array on the GPU, read there) says how many leading requests are real; the rest are
    padding, get no work, and their rows of out / lse are never written. `out` =
    (tile_scheduler_metadata, num_splits) writes into caller-owned buffers of the shapes
    a first call returned, so one step's metadata can live at fixed addresses.
    """
    if _compiling(cache_seqlens) and num_seqs is None and out is None:
        import torch
        return torch.ops.flashmla_jit.get_mla_metadata(cache_seqlens, num_heads_per_head_k, num_heads_k)
    seqlens = describe(cache_seqlens, "cache_seqlens")
    _check_dtype(seqlens, "cache_seqlens", ("int32",))
    _check_rank(seqlens, "cache_seqlens", 1, "(batch,)")
    _check_contiguous(seqlens, "cache_seqlens")
    if seqlens.shape[0] < 1:
        raise ValueError("cache_seqlens must hold at least one sequence, got batch 0")
    _check_positive_int("num_heads_per_head_k", num_heads_per_head_k)
    _check_positive_int("num_heads_k", num_heads_k)
    batch = seqlens.shape[0]
    arrays = {"cache_seqlens": seqlens}
    active, active_ptr = batch, 0
    if isinstance(num_seqs, int) and not isinstance(num_seqs, bool):
        if not 0 <= num_seqs <= batch:
            raise ValueError(f"num_seqs must be in [0, {batch}] (cache_seqlens' batch), got {num_seqs}")
        active = num_seqs
    elif num_seqs is not None:
        arrays["num_seqs"] = nt = describe(num_seqs, "num_seqs")
        _check_dtype(nt, "num_seqs", ("int32",))
        if nt.shape not in ((1,), ()):
            raise ValueError(f"num_seqs must be an int or a 1-element int32 array, got shape {nt.shape}")
        active_ptr = nt.ptr
    from .params import SCHED_RECORD_INTS, MetadataParams
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError("out must be a (tile_scheduler_metadata, num_splits) pair of int32 arrays")
        sched, num_splits = out
        arrays["out[0]"] = st = describe(sched, "out[0] (tile_scheduler_metadata)")
        arrays["out[1]"] = nst = describe(num_splits, "out[1] (num_splits)")
        for t, name in ((st, "out[0] (tile_scheduler_metadata)"), (nst, "out[1] (num_splits)")):
            _check_dtype(t, name, ("int32",))
            _check_contiguous(t, name)
        if st.ndim != 2 or st.shape[1] != SCHED_RECORD_INTS or not 1 <= st.shape[0] <= MAX_PARTS:
            raise ValueError(f"out[0] (tile_scheduler_metadata) must have shape (num_parts, {SCHED_RECORD_INTS}) "
                             f"with 1 <= num_parts <= {MAX_PARTS}, got {st.shape}")
        if nst.shape != (batch + 1,):
            raise ValueError(f"out[1] (num_splits) must have shape ({batch + 1},) (batch + 1), got {nst.shape}")
    device = _check_device(arrays)
    if out is not None:
        num_parts, sched_ptr, splits_ptr = st.shape[0], st.ptr, nst.ptr
    else:
        num_parts = _num_parts(device, num_heads_per_head_k, num_heads_k)
        sched = empty(seqlens, (num_parts, SCHED_RECORD_INTS), "int32")
        num_splits = empty(seqlens, (batch + 1,), "int32")
        sched_ptr, splits_ptr = _ptr(sched), _ptr(num_splits)

    from . import driver
    params = MetadataParams(seqlens.ptr, active_ptr, sched_ptr, splits_ptr, batch, active, num_parts, BLOCK_N,
                            OVERHEAD_BLOCKS, *whole_slack(num_heads_per_head_k))
    driver.launch(METADATA_SPEC, device, (1, 1, 1), params, current_stream(seqlens))
    return sched, num_splits


def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v: int,
                           tile_scheduler_metadata, num_splits, softmax_scale: float | None = None,
                           causal: bool = False, *, q_pe=None, k_pe_cache=None, cu_seqlens_q=None,
                           max_seqlen_q: int | None = None, out=None, lse=None, k_scale=None):
    """MLA decode attention over a paged KV cache (FlashMLA's semantics).

    q (b, s_q, h_q, d); k_cache (num_pages, page_size, h_kv, d), V = its first
    head_dim_v columns; block_table (b, max_blocks) int32; cache_seqlens (b,) int32;
    metadata from get_mla_metadata. Returns out (b, s_q, h_q, head_dim_v) in q's dtype
    and lse (b, h_q, s_q) float32 (natural log; +inf where a query sees no key).

    Ragged queries: with cu_seqlens_q ((b + 1,) int32) and max_seqlen_q, q is packed as
    (total_q, h_q, d), request i owning tokens [cu[i], cu[i+1]) (causal per request,
    end-aligned); out is (total_q, h_q, head_dim_v) and lse (h_q, total_q).
    Split inputs: with q_pe, q holds only the latent columns (head_dim_v of them) and q_pe
    the rope columns; likewise k_pe_cache holds the rope columns of a cache whose latent
    part is k_cache. out / lse may be caller-owned buffers of the shapes above.
    FP8 caches (float8_e4m3fn, or uint8 holding e4m3 bytes): last dim 576 / 512 is
    per-tensor e4m3 (value = fp8 * k_scale; k_scale a float or a 1-element float32 device
    tensor, read by the kernel); last dim 656 is FlashMLA's layout (512 e4m3, 4 fp32
    scales, 64 bf16 rope per token; q bf16, d = 576, head_dim_v = 512; no k_scale).
    """
    # A k_scale number is a scalar of the call; a k_scale array is read on the GPU.
    scale_number = isinstance(k_scale, (int, float)) and not isinstance(k_scale, bool)
    arrays = (q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
              q_pe, k_pe_cache, cu_seqlens_q, out, lse, None if scale_number else k_scale)
    if _compiling(q) and all(x is None for x in arrays[6:11]):
        import torch
        scale_tensor = k_scale if isinstance(k_scale, torch.Tensor) else None
        return torch.ops.flashmla_jit.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v,
                                                             tile_scheduler_metadata, num_splits, softmax_scale,
                                                             causal, scale_tensor,
                                                             None if scale_tensor is not None else k_scale)
    scalars = (head_dim_v, softmax_scale, causal, max_seqlen_q, k_scale if scale_number else None)
    # Hot path: a torch call whose signature (shapes, strides, dtypes, devices, scalars)
    # was validated before only reads the pointers and launches.
    key = _torch_signature(arrays, scalars)
    try:
        plan = _plans.get(key) if key is not None else None
    except TypeError:  # an unhashable scalar: validation below names it
        key = plan = None
    if plan is not None and not settings.get().validate:
        ptrs = [x.data_ptr() if x is not None else 0 for x in arrays]
        if not plan.misaligned(ptrs):
            return plan.run(ptrs, q, out, lse, _torch_stream(plan.device))
    described = [_describe_arg(x, name) if x is not None else None for x, name in zip(arrays, _ARG_NAMES)]
    plan = _plan(described, *scalars)
    if key is not None:
        if len(_plans) >= 1024:  # long-lived processes see many batch sizes
            _plans.clear()
        _plans[key] = plan
    ptrs = [t.ptr if t is not None else 0 for t in described]
    like = described[0]
    return plan.run(ptrs, q, out, lse, current_stream(like), like)


_ARG_NAMES = ("q", "k_cache", "block_table", "cache_seqlens", "tile_scheduler_metadata", "num_splits",
              "q_pe", "k_pe_cache", "cu_seqlens_q", "out", "lse", "k_scale")
_plans: dict = {}
_TORCH_TENSOR = None


def _describe_arg(x, name: str) -> Tensor:
    try:
        return describe(x, name)
    except TypeError:
        if name != "k_scale":
            raise
        raise TypeError(f"k_scale must be a float or a 1-element float32 tensor, got "
                        f"{type(x).__module__}.{type(x).__name__}") from None


def _torch_signature(arrays, scalars):
    """Everything a plan depends on besides the pointers, for plain torch tensors; None
    for anything else (cupy, DLPack objects, tensor subclasses take the described path)."""
    global _TORCH_TENSOR
    if _TORCH_TENSOR is None:
        import sys
        if "torch" not in sys.modules:
            return None
        _TORCH_TENSOR = sys.modules["torch"].Tensor
    sig = [scalars]
    for x in arrays:
        if x is None:
            sig.append(None)
        elif type(x) is _TORCH_TENSOR:
            sig.append((x.shape, x.stride(), x.dtype, x.get_device()))
        else:
            return None
    return tuple(sig)


def _torch_stream(device: int) -> int:
    import torch
    return torch._C._cuda_getCurrentRawStream(device)


def _plan(described, head_dim_v, softmax_scale, causal, max_seqlen_q, scale_number) -> "_DecodePlan":
    """Validate described arguments (each error names its argument) and build the plan."""
    qt, kt, bt, sl, sched, ns, qpt, kpt, cu, ot, lt, kst = described
    _check_dtype(qt, "q", ("bf16", "fp16"))
    if cu is not None:
        _check_rank(qt, "q", 3, "(total_q, h_q, head_dim) with cu_seqlens_q")
        _check_positive_int("max_seqlen_q", max_seqlen_q, " with cu_seqlens_q")
        _check_rank(sl, "cache_seqlens", 1, "(batch,)")
        (total_q, h_q, q_dim), batch, s_q = qt.shape, sl.shape[0], max_seqlen_q
    else:
        _check_rank(qt, "q", 4, "(batch, s_q, h_q, head_dim)")
        batch, s_q, h_q, q_dim = qt.shape
        total_q = None
    _check_rank(kt, "k_cache", 4, "(num_blocks, page_size, h_kv, head_dim)")
    kv = _kv_format(kt, qt, kst if kst is not None else scale_number, kpt)
    qpt = _rope_part(qpt, "q_pe", qt, "q", head_dim_v)
    kpt = _rope_part(kpt, "k_pe_cache", kt, "k_cache", head_dim_v)
    head_dim = q_dim + (qpt.shape[-1] if qpt else 0)
    if kv[0] == "fp8_656":
        _check_fp8_656(head_dim, head_dim_v)
    k_row = 576 if kv[0] == "fp8_656" else kt.shape[3]  # the 656 bytes hold 576 columns
    num_pages, page_size, h_kv, k_dim = kt.shape[:3] + (k_row + (kpt.shape[3] if kpt else 0),)
    if k_dim != head_dim:
        raise ValueError(f"k_cache head_dim must equal q's ({head_dim}), got k_cache shape {kt.shape}")
    if not isinstance(head_dim_v, int) or (head_dim, head_dim_v) not in SUPPORTED_HEAD_DIMS:
        supported = ", ".join(f"(d={d}, head_dim_v={v})" for d, v in SUPPORTED_HEAD_DIMS)
        raise ValueError(f"unsupported head dims (d={head_dim}, head_dim_v={head_dim_v!r}); supported: {supported}")
    if min(batch, s_q, h_q) < 1 or min(num_pages, page_size, h_kv) < 1:
        raise ValueError(f"q and k_cache must have no empty dimension, got q {qt.shape}, k_cache {kt.shape}")
    if h_q % h_kv:
        raise ValueError(f"h_q ({h_q}, q.shape[-2]) must be a multiple of h_kv ({h_kv}, k_cache.shape[2])")
    _check_last_dim_contiguous(qt, "q")
    _check_last_dim_contiguous(kt, "k_cache")
    _check_16_byte_rows(qt, "q", range(qt.ndim - 1))
    _check_16_byte_rows(kt, "k_cache", (0, 1, 2), 1 if kv[0] != "same" else 2)

    _check_dtype(bt, "block_table", ("int32",))
    _check_rank(bt, "block_table", 2, "(batch, max_blocks_per_seq)")
    if bt.shape[0] != batch:
        raise ValueError(f"block_table must have {batch} rows (q's batch), got shape {bt.shape}")
    _check_last_dim_contiguous(bt, "block_table")
    _check_dtype(sl, "cache_seqlens", ("int32",))
    if sl.shape != (batch,):
        raise ValueError(f"cache_seqlens must have shape ({batch},) (q's batch), got {sl.shape}")
    _check_contiguous(sl, "cache_seqlens")
    if cu is not None:
        _check_dtype(cu, "cu_seqlens_q", ("int32",))
        if cu.shape != (batch + 1,):
            raise ValueError(f"cu_seqlens_q must have shape ({batch + 1},) (batch + 1), got {cu.shape}")
        _check_contiguous(cu, "cu_seqlens_q")

    from .params import SCHED_RECORD_INTS
    _check_dtype(sched, "tile_scheduler_metadata", ("int32",))
    if sched.ndim != 2 or sched.shape[1] != SCHED_RECORD_INTS or not 1 <= sched.shape[0] <= MAX_PARTS:
        raise ValueError(f"tile_scheduler_metadata must come from get_mla_metadata: shape (num_parts, "
                         f"{SCHED_RECORD_INTS}), got {sched.shape}")
    _check_contiguous(sched, "tile_scheduler_metadata")
    _check_dtype(ns, "num_splits", ("int32",))
    if ns.shape != (batch + 1,):
        raise ValueError(f"num_splits has shape {ns.shape}: metadata made for batch {ns.shape[0] - 1 if ns.ndim == 1 else '?'}, "
                         f"but q has batch {batch} (expected ({batch + 1},)); call get_mla_metadata for this batch")
    _check_contiguous(ns, "num_splits")
    out_shape = qt.shape[:-1] + (head_dim_v,)
    lse_shape = (h_q, total_q) if cu is not None else (batch, h_q, s_q)
    if ot is not None:
        _check_dtype(ot, "out", (qt.dtype,))
        if ot.shape != out_shape:
            raise ValueError(f"out must have shape {out_shape}, got {ot.shape}")
        _check_last_dim_contiguous(ot, "out")
        _check_16_byte_rows(ot, "out", range(ot.ndim - 1))
    if lt is not None:
        _check_dtype(lt, "lse", ("fp32",))
        if lt.shape != lse_shape:
            raise ValueError(f"lse must have shape {lse_shape}, got {lt.shape}")
        _check_contiguous(lt, "lse")
    device = _check_device({name: t for name, t in zip(_ARG_NAMES, described) if t is not None})
    if settings.get().validate:
        _validate_on_host(bt, sl, page_size, num_pages)
        if cu is not None:
            _validate_cu_seqlens(cu, total_q, max_seqlen_q)
    return _DecodePlan(qt, kt, bt, sched, ot, qpt, kpt, cu, device, batch, s_q, h_q, h_kv, head_dim,
                       head_dim_v, softmax_scale, causal, out_shape, lse_shape, kv)


class _DecodePlan:
    """One validated call signature: the kernels, grids and parameter structs with every
    field but the pointers filled in. run() fills the pointers and launches."""

    def __init__(self, qt, kt, bt, sched, ot, qpt, kpt, cu, device, batch, s_q, h_q, h_kv, head_dim,
                 head_dim_v, softmax_scale, causal, out_shape, lse_shape, kv):
        num_pages, page_size = kt.shape[:2]
        heads_per_kv = h_q // h_kv
        rows = s_q * heads_per_kv
        ragged = cu is not None

        def bsh(strides):  # (batch, token, head) strides; packed ragged tokens have no batch stride
            return (0, *strides[:2]) if ragged else strides[:3]

        # Outputs the plan allocates are contiguous; caller-owned ones keep their strides.
        o_strides = ot.strides if ot is not None else _contiguous_strides(out_shape)
        lse_strides = (0, lse_shape[1], 1) if ragged else (h_q * s_q, s_q, 1)  # lse is contiguous
        num_parts = sched.shape[0]
        if softmax_scale is None:
            softmax_scale = head_dim ** -0.5
        self.device = device
        self.out_shape, self.lse_shape, self.dtype = out_shape, lse_shape, qt.dtype
        # Split pieces: fp32 partial outputs, their log2-domain lse, then a u32 flag per
        # piece and decode CTA (params.cuh), in one allocation. Each cut between parts
        # adds at most one piece to the batch's count.
        self.partial_rows = (batch + num_parts) * h_kv * rows
        self.head_dim_v = head_dim_v
        # Rope columns: the split tensors, or the columns after the latent ones in the same rows.
        self.q_pe_split, self.k_pe_split = qpt is not None, kpt is not None
        kv_format, _, k_scale_value = kv  # from _kv_format; a k_scale array is a pointer of the call
        # Caches of whole 64-token pages run the seesaw kernel (64-row tiles), which loads
        # KV blocks with TMA through tensor maps (every stride a 16-byte multiple).
        rope_t = kpt or kt
        self.seesaw = (settings.get().seesaw and num_pages > 0 and seesaw_fits(head_dim_v, kv_format, page_size)
                       and all(s % 8 == 0 for s in (*kt.strides[:3], *rope_t.strides[:3])))
        # (cols, heads, page_size, num_pages, head / row / page strides) of each tensor map
        self.kv_geometry = ((head_dim_v, h_kv, page_size, num_pages, kt.strides[2], kt.strides[1], kt.strides[0]),
                            (head_dim - head_dim_v, h_kv, page_size, num_pages, rope_t.strides[2], rope_t.strides[1],
                             rope_t.strides[0]))
        self.seesaw_templates = {}  # (k, k_pe) addresses -> parameters with their tensor maps
        # The seesaw kernel loads Q tiles by TMA too where a tile is one box per 64 columns:
        # two more maps, over q (and q_pe), given each call's addresses (_encode_q_maps).
        self.q_geometry = (q_tile_geometry(qt, qpt, ragged, heads_per_kv, head_dim, head_dim_v)
                           if self.seesaw and settings.get().q_tma and q_tma_fits(heads_per_kv) else None)
        self.set_q_maps = None
        self.decode_spec = decode_spec(qt.dtype, head_dim, head_dim_v, causal, s_q, rows, kv_format, self.seesaw,
                                       self.q_geometry is not None)
        self.decode_params = DecodeParams(
            *([0] * 14),  # pointers: filled per call
            *bsh(qt.strides), *kt.strides[:3], *bsh((qpt or qt).strides),
            *(kpt or kt).strides[:3], bt.strides[0], *bsh(o_strides), *lse_strides,
            batch, s_q, h_q, h_kv, heads_per_kv, rows, page_size, num_pages, bt.shape[1],
            softmax_scale * math.log2(math.e), 0, k_scale_value)
        if self.seesaw:
            self.decode_params = SeesawParams(p=self.decode_params)
        self.decode_grid = (math.ceil(rows / self.decode_spec.tile_rows), h_kv, num_parts)
        flags = (batch + num_parts) * h_kv * self.decode_grid[0]
        self.scratch_numel = self.partial_rows * (head_dim_v + 1) + flags
        # Combine grid: a warp per row (8 rows a CTA), or a CTA per row (or per part of a
        # row) when requests split into so many pieces that a warp's walk is slower.
        decode_ctas = math.prod(self.decode_grid)  # one a SM
        chunks, merge_warps = merge_grid(batch, h_kv, rows, num_parts, head_dim_v, decode_ctas)
        self.combine_spec = combine_spec(qt.dtype, head_dim, head_dim_v, chunks, merge_warps)
        self.piece_flags = chunks == 0  # the few-pieces grid merges each request once its pieces are stored
        self.combine_params = CombineParams(
            *([0] * 8),  # pointers: filled per call
            *bsh(o_strides), *lse_strides, batch, s_q, h_q, h_kv, heads_per_kv, rows, self.decode_spec.tile_rows)
        self.combine_grid = (merge_ctas(batch, h_kv, rows, head_dim_v, chunks), 1, 1)
        # Per call only the pointers change: they are packed into a copy of a template.
        from .params import COMBINE_POINTERS, DECODE_POINTERS, PointerPacker
        base = SeesawParams.p.offset if self.seesaw else 0
        self.decode_template = bytes(self.decode_params)  # seesaw: tensor maps not yet in
        self.pack_decode = PointerPacker(DecodeParams, DECODE_POINTERS, base)
        self.pack_k_scale = PointerPacker(DecodeParams, ("k_scale",), base)
        self.combine_template = bytes(self.combine_params)
        self.pack_combine = PointerPacker(CombineParams, COMBINE_POINTERS)
        self.torch_float32 = None
        from . import driver
        self.driver = driver

    def misaligned(self, ptrs) -> bool:
        """cp.async moves 16-byte chunks: q, k_cache, q_pe, k_pe_cache and out must be
        16-byte aligned (checked with a named error on the described path)."""
        q, k, _, _, _, _, q_pe, k_pe, _, out, _, _ = ptrs
        return bool((q | k | q_pe | k_pe | out) & 15)

    def run(self, ptrs, q, out, lse, stream: int, like: Tensor | None = None):
        out, lse, scratch, launches = self.prepare(ptrs, q, out, lse, stream, like)
        self.driver.launch_all(self.device, launches)
        return out, lse  # scratch is released here: the allocators are stream ordered

    def prepare(self, ptrs, q, out, lse, stream: int, like: Tensor | None = None):
        """Outputs, scratch and the launches of one call (tools/bench.py times the
        launches alone). like: q described, or None on the torch hot path (q a tensor)."""
        q_ptr, k_ptr, bt, sl, sched, ns, q_pe, k_pe, cu, out_ptr, lse_ptr, k_scale = ptrs
        new_out, new_lse = out is None, lse is None
        if like is None:  # the torch hot path: q is a plain torch.Tensor
            out, lse, scratch = self._torch_buffers(q, out, lse, stream)
        else:
            out = empty(like, self.out_shape, self.dtype) if new_out else out
            lse = empty(like, self.lse_shape, "fp32") if new_lse else lse
            scratch = empty(like, (self.scratch_numel,), "fp32")
        if new_out:
            out_ptr = _ptr(out)
        if new_lse:
            lse_ptr = _ptr(lse)
        o_accum = _ptr(scratch)
        if o_accum % 128:  # the merge drops partials from L2 by whole 128-byte lines (combine.cuh)
            raise RuntimeError(f"flashmla_jit: split-KV scratch at 0x{o_accum:x} is not 128-byte aligned")
        lse_accum = o_accum + self.partial_rows * self.head_dim_v * 4
        piece_done = lse_accum + self.partial_rows * 4 if self.piece_flags else 0
        if not self.q_pe_split:
            q_pe = q_ptr + 2 * self.head_dim_v
        if not self.k_pe_split:
            k_pe = k_ptr + 2 * self.head_dim_v
        if self.q_geometry and self.set_q_maps is None:
            self._encode_q_maps(q_ptr, q_pe)
        template = self._seesaw_template(k_ptr, k_pe) if self.seesaw else self.decode_template
        params = type(self.decode_params).from_buffer_copy(template)
        if self.set_q_maps:
            self.set_q_maps(params, q_ptr, q_pe)
        self.pack_decode(params, q_ptr, k_ptr, q_pe, k_pe, bt, sl, cu, sched, ns, out_ptr, lse_ptr, o_accum, lse_accum,
                         piece_done)
        if k_scale:
            self.pack_k_scale(params, k_scale)
        cp = type(self.combine_params).from_buffer_copy(self.combine_template)
        self.pack_combine(cp, sched, ns, cu, o_accum, lse_accum, piece_done, out_ptr, lse_ptr)
        # The combine starts while the decode kernel drains (programmatic dependent
        # launch) and merges each request once the flags say its partials are stored.
        launches = ((self.decode_spec, self.decode_grid, params, stream, False),
                    (self.combine_spec, self.combine_grid, cp, stream, True))
        return out, lse, scratch, launches

    def _torch_buffers(self, q, out, lse, stream: int):
        if self.torch_float32 is None:
            import torch
            self.torch_float32 = torch.float32
        if out is None:
            out = q.new_empty(self.out_shape)
        if lse is None:
            lse = q.new_empty(self.lse_shape, dtype=self.torch_float32)
        scratch = (_TorchScratch.make(self.scratch_numel * 4, stream, self.device)
                   or q.new_empty((self.scratch_numel,), dtype=self.torch_float32))
        return out, lse, scratch

    def _seesaw_template(self, k: int, k_pe: int) -> bytes:
        """The seesaw parameters with their two tensor maps (latent, rope) for these cache
        addresses; encoded once per address pair (serving engines keep one cache per layer)."""
        template = self.seesaw_templates.get((k, k_pe))
        if template is None:
            if len(self.seesaw_templates) >= 64:
                self.seesaw_templates.clear()
            latent, rope = self.kv_geometry
            maps = self.driver.kv_tensor_map(k, *latent)
            maps += self.driver.kv_tensor_map(k_pe, *rope) if rope[0] else bytes(128)
            template = self.seesaw_templates[(k, k_pe)] = maps + self.decode_template[len(maps):]
        return template

    def _q_maps(self, q: int, q_pe: int) -> bytes:
        """The 256 bytes of the two Q maps (latent, rope) for these addresses."""
        latent, rope = self.q_geometry
        return self.driver.tile_map(q, *latent) + (self.driver.tile_map(q_pe, *rope) if rope else bytes(128))

    def _encode_q_maps(self, q: int, q_pe: int):
        """Put the Q maps into the template (first call), and choose how each call gives
        them its addresses: where the driver keeps a map's address as a plain u64
        (driver.tensor_map_address_offset) a patch of those bytes (~0.2 us), else the maps
        encoded anew."""
        at, template = SeesawParams.q_latent.offset, self.decode_template
        self.decode_template = template[:at] + self._q_maps(q, q_pe) + template[at + 256:]
        self.seesaw_templates.clear()
        offset = self.driver.tensor_map_address_offset()
        if offset is None:
            def set_q_maps(params, q, q_pe):
                ctypes.memmove(ctypes.addressof(params) + at, self._q_maps(q, q_pe), 256)
        else:
            # Each address alone: one pack across both maps would write its pad bytes over them.
            pack, latent, rope = struct.Struct("<Q").pack_into, at + offset, at + 128 + offset
            has_rope = self.q_geometry[1] is not None

            def set_q_maps(params, q, q_pe):
                pack(params, latent, q)
                if has_rope:
                    pack(params, rope, q_pe)
        self.set_q_maps = set_q_maps


class _TorchScratch:
    """The fp32 split-KV scratch of one call, straight from torch's caching allocator
    (a tensor costs several microseconds more per call). Freed when dropped: like a
    tensor's memory, it is reused only by work queued later on the same stream."""

    __slots__ = ("ptr",)
    _raw = None  # (raw_alloc, raw_delete, current device) once torch is loaded

    @classmethod
    def make(cls, nbytes: int, stream: int, device: int):
        """None where the raw allocator is missing or allocates on another device (it
        uses torch's current device): the caller then takes a tensor."""
        raw = cls._raw
        if raw is None:
            import torch
            c = torch._C
            names = ("_cuda_cudaCachingAllocator_raw_alloc", "_cuda_cudaCachingAllocator_raw_delete", "_cuda_getDevice")
            raw = cls._raw = tuple(getattr(c, n) for n in names) if all(hasattr(c, n) for n in names) else ()
        if not raw or raw[2]() != device:
            return None
        scratch = object.__new__(cls)
        scratch.ptr = raw[0](nbytes, stream)
        return scratch

    def data_ptr(self) -> int:
        return self.ptr

    def __del__(self):
        self._raw[1](self.ptr)


def q_tile_geometry(qt: Tensor, qpt: Tensor | None, ragged: bool, heads_per_kv: int, head_dim: int,
                    head_dim_v: int):
    """(dims, strides, box) of the Q maps, innermost first, strides in elements: the latent
    columns of q and the rope columns of q_pe or of q (None without a rope part), q seen as
    (columns, heads, tokens, requests), a box of 64 columns by a tile's 64 rows (64 heads
    of a token, or the KV head's heads for 64 / heads_per_kv tokens). None where a stride
    is not positive (TMA strides are unsigned): the kernel then copies Q by cp.async."""
    box = (64, min(heads_per_kv, 64), max(64 // heads_per_kv, 1), 1)

    def view(t: Tensor, cols: int):
        if ragged:  # (total_q, h_q, d): every request's tokens in one dimension
            dims, strides = (cols, t.shape[1], t.shape[0], 1), (t.strides[1], t.strides[0], 0)
        else:       # (batch, s_q, h_q, d)
            dims, strides = (cols, t.shape[2], t.shape[1], t.shape[0]), (t.strides[2], t.strides[1], t.strides[0])
        # The stride of an extent-1 dimension is never used (torch and cupy give any)
        return dims, tuple(s if n > 1 else 8 for n, s in zip(dims[1:], strides)), box

    latent = view(qt, head_dim_v)
    rope = view(qpt or qt, head_dim - head_dim_v) if head_dim > head_dim_v else None
    if any(s <= 0 for v in (latent, rope) if v for s in v[1]):
        return None
    return latent, rope


def _contiguous_strides(shape):
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _rope_part(t: Tensor | None, name: str, main: Tensor, main_name: str, head_dim_v: int) -> Tensor | None:
    """Check a split rope tensor (q_pe, k_pe_cache) against its latent part."""
    if t is None:
        return None
    if t.dtype != main.dtype:
        raise TypeError(f"{name} must have {main_name}'s dtype {main.dtype}, got {t.dtype}")
    if t.ndim != main.ndim or t.shape[:-1] != main.shape[:-1]:
        raise ValueError(f"{name} must have shape {main.shape[:-1]} + (rope_dim,) like {main_name}, got {t.shape}")
    if main.shape[-1] != head_dim_v:
        raise ValueError(f"with {name} given, {main_name} holds the latent columns only: its last dim must be "
                         f"head_dim_v = {head_dim_v}, got {main.shape[-1]}")
    _check_last_dim_contiguous(t, name)
    _check_16_byte_rows(t, name, range(t.ndim - 1))
    return t


# FP8 caches: torch's float8_e4m3fn, or raw e4m3 bytes as uint8 (cupy has no fp8 dtype;
# serving engines often hold FlashMLA's 656-byte layout as uint8).
FP8_CACHE_DTYPES = ("float8_e4m3fn", "uint8")


def _kv_format(kt: Tensor, qt: Tensor, k_scale, kpt: Tensor | None):
    """(kv_format, k_scale described or None, k_scale as a float): the cache format
    (spec.KV_FORMATS) read from k_cache's dtype and last dim, checked against k_scale
    (None, a number, or a described array)."""
    if kt.dtype not in FP8_CACHE_DTYPES:
        if kt.dtype != qt.dtype:
            raise TypeError(f"k_cache must have q's dtype {qt.dtype}, or be an FP8 cache (float8_e4m3fn, or "
                            f"uint8 holding e4m3 bytes), got {kt.dtype}")
        if k_scale is not None:
            raise ValueError(f"k_scale applies only to an FP8 k_cache, but k_cache is {kt.dtype}")
        return "same", None, 1.0
    if kpt is not None:
        raise ValueError("k_pe_cache is not supported with an FP8 k_cache: keep the rope columns in k_cache "
                         "(per-tensor e4m3, last dim 576) or use the 656-byte layout")
    last = kt.shape[3]
    if last == 656:
        if qt.dtype != "bf16":
            raise TypeError(f"q must be bf16 with the 656-byte FP8 k_cache (its rope part is bf16), got {qt.dtype}")
        if k_scale is not None:
            raise ValueError("k_scale must be None with the 656-byte FP8 k_cache: its scales are stored "
                             "in every token")
        return "fp8_656", None, 1.0
    if last not in (576, 512):
        raise ValueError(f"an FP8 k_cache must have last dim 576 or 512 (per-tensor e4m3, with k_scale) or "
                         f"656 (FlashMLA's layout: 512 e4m3 + 4 fp32 scales + 64 bf16), got shape {kt.shape}")
    if k_scale is None:
        raise ValueError(f"k_scale is required with a per-tensor FP8 k_cache (last dim {last}): pass the "
                         "dequantization scale as a float or a 1-element float32 tensor on k_cache's device")
    if isinstance(k_scale, (int, float)) and not isinstance(k_scale, bool):
        if not (math.isfinite(k_scale) and k_scale > 0):
            raise ValueError(f"k_scale must be a positive finite number, got {k_scale!r}")
        return "fp8_e4m3", None, float(k_scale)
    st = k_scale
    if st.dtype != "fp32":
        raise TypeError(f"k_scale must have dtype fp32, got {st.dtype}")
    if math.prod(st.shape) != 1:
        raise ValueError(f"k_scale must hold exactly one element, got shape {st.shape}")
    if st.device != kt.device:
        where = "the host" if st.device is None else f"cuda:{st.device}"
        raise ValueError(f"k_scale must be on k_cache's device, got {where}")
    return "fp8_e4m3", st, 1.0


def _check_fp8_656(head_dim: int, head_dim_v):
    if (head_dim, head_dim_v) != (576, 512):
        raise ValueError(f"the 656-byte FP8 k_cache holds d = 576 columns (512 latent + 64 rope): q's head_dim "
                         f"must be 576 and head_dim_v 512, got head_dim {head_dim}, head_dim_v {head_dim_v!r}")


def _ptr(array) -> int:
    """Device address of an array this module allocated (torch or cupy)."""
    return array.data_ptr() if hasattr(array, "data_ptr") else int(array.data.ptr)


def _validate_on_host(bt: Tensor, sl: Tensor, page_size: int, num_pages: int):
    """FLASHMLA_JIT_VALIDATE=1: checks that need the seqlens and page ids (syncs the host)."""
    seqlens = _to_host(sl)
    table = _to_host(bt)
    max_blocks = bt.shape[1]
    for i, n in enumerate(seqlens.tolist()):
        if n < 0:
            raise ValueError(f"cache_seqlens[{i}] = {n} is negative")
        need = -(-n // page_size)
        if need > max_blocks:
            raise ValueError(f"block_table is too small: sequence {i} has {n} tokens = {need} pages of "
                             f"{page_size}, but block_table has {max_blocks} columns")
        used = table[i, :need]
        if need and (used.min() < 0 or used.max() >= num_pages):
            raise ValueError(f"block_table row {i} holds page ids outside [0, {num_pages}) for its "
                             f"{n} tokens: {used.tolist()}")


def _validate_cu_seqlens(cu: Tensor, total_q: int, max_seqlen_q: int):
    """FLASHMLA_JIT_VALIDATE=1: cu_seqlens_q starts at 0, never decreases, ends at total_q."""
    starts = _to_host(cu).tolist()
    counts = [b - a for a, b in zip(starts, starts[1:])]
    if starts[0] != 0 or starts[-1] != total_q or min(counts) < 0:
        raise ValueError(f"cu_seqlens_q must rise from 0 to total_q = {total_q}, got {starts}")
    if max(counts) > max_seqlen_q:
        raise ValueError(f"cu_seqlens_q has a request of {max(counts)} query tokens, more than "
                         f"max_seqlen_q = {max_seqlen_q}")


def _to_host(t: Tensor):
    if t.framework == "torch":
        return t.obj.cpu().numpy()
    return t.obj.get()
