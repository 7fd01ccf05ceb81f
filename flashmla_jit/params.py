"""ctypes mirrors of the kernel parameter structs in kernels/flashmla/params.cuh.

Every field there is 8 bytes (pointer, int64 or double), so a plain field list in the
same order has the same layout; tests/test_params.py parses the header and checks
names, order and types, so the two cannot drift apart silently.
"""

import ctypes
import struct

P = ctypes.c_void_p
I = ctypes.c_int64
F = ctypes.c_double


class DecodeParams(ctypes.Structure):
    _fields_ = [
        ("q", P), ("k", P), ("q_pe", P), ("k_pe", P), ("block_table", P), ("seqlens", P), ("cu_seqlens_q", P),
        ("sched", P), ("num_splits", P),
        ("out", P), ("lse", P), ("o_accum", P), ("lse_accum", P), ("piece_done", P),
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
    """Four CUtensorMaps (128 bytes each, 64-byte aligned on the device) then DecodeParams;
    the tail pads to the device struct's size, a multiple of its 64-byte alignment."""
    _fields_ = [("k_latent", ctypes.c_uint64 * 16), ("k_rope", ctypes.c_uint64 * 16),
                ("q_latent", ctypes.c_uint64 * 16), ("q_rope", ctypes.c_uint64 * 16), ("p", DecodeParams),
                ("_pad", ctypes.c_uint64 * (-ctypes.sizeof(DecodeParams) // 8 % 8))]


class CombineParams(ctypes.Structure):
    _fields_ = [
        ("sched", P), ("num_splits", P), ("cu_seqlens_q", P), ("o_accum", P), ("lse_accum", P),
        ("piece_done", P), ("out", P), ("lse", P),
        ("o_batch_stride", I), ("o_seq_stride", I), ("o_head_stride", I),
        ("lse_batch_stride", I), ("lse_head_stride", I), ("lse_seq_stride", I),
        ("batch", I), ("s_q", I), ("h_q", I), ("h_kv", I), ("heads_per_kv", I), ("rows", I),
        ("decode_tile_rows", I),
    ]


class MetadataParams(ctypes.Structure):
    _fields_ = [
        ("seqlens", P), ("num_seqs", P), ("sched", P), ("num_splits", P),
        ("batch", I), ("active", I), ("num_parts", I), ("block_n", I), ("overhead_blocks", I),
        ("whole_slack_pct", I), ("whole_slack_blocks", I),
    ]


SCHED_RECORD_INTS = 8   # kSchedRecordInts


class PointerPacker:
    """Writes consecutive pointer fields of a parameter struct in one struct.pack_into
    (the per-call part of a launch: the rest of the struct comes from a template)."""

    def __init__(self, struct_type, names, base: int = 0):
        fields = [getattr(struct_type, name) for name in names]
        first = fields[0].offset
        if any(f.offset != first + 8 * i or f.size != 8 for i, f in enumerate(fields)):
            raise TypeError(f"{struct_type.__name__}: {names} are not consecutive 8-byte fields")
        self.offset = base + first
        self.pack = struct.Struct(f"<{len(names)}Q").pack_into

    def __call__(self, params, *pointers):
        self.pack(params, self.offset, *pointers)


# The pointer fields of a call, in the order the API fills them.
DECODE_POINTERS = ("q", "k", "q_pe", "k_pe", "block_table", "seqlens", "cu_seqlens_q", "sched", "num_splits",
                   "out", "lse", "o_accum", "lse_accum", "piece_done")
COMBINE_POINTERS = ("sched", "num_splits", "cu_seqlens_q", "o_accum", "lse_accum", "piece_done", "out", "lse")
