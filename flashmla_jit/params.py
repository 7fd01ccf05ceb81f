"""ctypes mirrors of the kernel parameter structs in kernels/flashmla/params.cuh.

Every field there is 8 bytes (pointer, int64 or double), so a plain field list in the
same order has the same layout; tests/test_params.py parses the header and checks
names, order and types, so the two cannot drift apart silently.
"""

import ctypes

P = ctypes.c_void_p
I = ctypes.c_int64
F = ctypes.c_double


class DecodeParams(ctypes.Structure):
    _fields_ = [
        ("q", P), ("k", P), ("q_pe", P), ("k_pe", P), ("block_table", P), ("seqlens", P), ("cu_seqlens_q", P),
        ("sched", P), ("num_splits", P),
        ("out", P), ("lse", P), ("o_accum", P), ("lse_accum", P),
        ("q_batch_stride", I), ("q_seq_stride", I), ("q_head_stride", I),
        ("k_page_stride", I), ("k_row_stride", I), ("k_head_stride", I),
        ("q_pe_batch_stride", I), ("q_pe_seq_stride", I), ("q_pe_head_stride", I),
        ("k_pe_page_stride", I), ("k_pe_row_stride", I), ("k_pe_head_stride", I),
        ("bt_batch_stride", I),
        ("o_batch_stride", I), ("o_seq_stride", I), ("o_head_stride", I),
        ("lse_batch_stride", I), ("lse_head_stride", I), ("lse_seq_stride", I),
        ("batch", I), ("s_q", I), ("h_q", I), ("h_kv", I),
        ("heads_per_kv", I), ("rows", I),
        ("page_size", I), ("num_pages", I), ("max_blocks", I),
        ("scale_log2", F),
        ("k_scale", P), ("k_scale_value", F),
    ]


class SeesawParams(ctypes.Structure):
    """Two CUtensorMaps (128 bytes each, 64-byte aligned on the device) then DecodeParams;
    the tail pads to the device struct's size, a multiple of its 64-byte alignment."""
    _fields_ = [("k_latent", ctypes.c_uint64 * 16), ("k_rope", ctypes.c_uint64 * 16), ("p", DecodeParams),
                ("_pad", ctypes.c_uint64 * (-ctypes.sizeof(DecodeParams) // 8 % 8))]


class CombineParams(ctypes.Structure):
    _fields_ = [
        ("sched", P), ("num_splits", P), ("cu_seqlens_q", P), ("o_accum", P), ("lse_accum", P), ("out", P),
        ("lse", P),
        ("o_batch_stride", I), ("o_seq_stride", I), ("o_head_stride", I),
        ("lse_batch_stride", I), ("lse_head_stride", I), ("lse_seq_stride", I),
        ("batch", I), ("s_q", I), ("h_q", I), ("h_kv", I), ("heads_per_kv", I), ("rows", I),
        ("chunked", I),
    ]


class MetadataParams(ctypes.Structure):
    _fields_ = [
        ("seqlens", P), ("num_seqs", P), ("sched", P), ("num_splits", P),
        ("batch", I), ("active", I), ("num_parts", I), ("block_n", I), ("overhead_blocks", I),
    ]


SCHED_RECORD_INTS = 8   # kSchedRecordInts
