"""KernelSpec: the one value that decides what gets compiled, cached and launched.

A spec is frozen and hashable. Code generation, the cache key and the launch
configuration are all functions of it, and of nothing else. The generated source
is a one-line instantiation of a template in kernels/flashmla/, reached through an
NVRTC name expression (no text templating of kernel bodies).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

KINDS = ("decode", "combine", "metadata")
DTYPES = {"bf16": "flashmla::bf16_t", "fp16": "flashmla::fp16_t"}

# Head dims the templates are written for: (d, dv). d is the K/Q row (latent + rope),
# dv the V row (a prefix of K). The kernels need d % 64 == 0 (128-byte swizzle atoms
# of 64 elements), and each warp a whole number of 64-column sub-tiles of O: dv = 512
# fits every tile (the 64-row tile's two m64n256 halves), dv = 256 the 32-row tile
# only (4 warps x 64 columns), so it runs every row count on 32-row tiles. (576, 512)
# is DeepSeek V2/V3's latent 512 + rope 64; (512, 512) a latent cache with no rope
# part; (320, 256) a smaller MLA's latent 256 + rope 64.
SUPPORTED_HEAD_DIMS = ((576, 512), (512, 512), (320, 256))
DEEPSEEK_HEAD_DIMS = (576, 512)

# KV cache formats: "same" = q's dtype; "fp8_e4m3" = e4m3 values with one fp32 scale for
# the whole cache (k_scale); "fp8_656" = FlashMLA's 656-byte token (512 e4m3 + 4 fp32
# group scales + 64 bf16 rope). FP8 caches are dequantized to q's dtype in shared memory
# and run on 16- and 32-row tiles (mma.sync); the enum mirrors KvFormat in fp8.cuh.
KV_FORMATS = {"same": "flashmla::kKvSame", "fp8_e4m3": "flashmla::kKvFp8", "fp8_656": "flashmla::kKvFp8Ds"}
FP8_MAX_TILE_ROWS = 32

TILE_ROWS = (16, 32, 64)  # query-tile heights of the decode kernel (tile_rows_for picks one)
BLOCK_N = 64            # KV tokens per main-loop block
DECODE_THREADS = 256
COMBINE_THREADS = 256   # 8 warps: 8 rows a CTA, or one row's pieces split over them
MERGE_CHUNKS = (1, 2, 4)  # 128-column chunks a CTA of the many-pieces merge takes
MERGE_LOADS = {8: 18, 16: 10}  # its warps a CTA -> 16-byte loads a lane holds in flight (kMergeLoads)
METADATA_THREADS = 1024
MAX_PARTS = 1024        # upper bound on scheduler parts (the metadata kernel's smem table)
# Above this many query rows per KV head (two or more m-block CTAs read each KV block) the
# seesaw kernel loads KV evict-first in L2 (decode_seesaw.cuh's load_kv: faster there,
# slower with any hint at or below it).
EVICT_FIRST_ABOVE_ROWS = 64


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    kind: str                 # "decode" | "combine" | "metadata"
    dtype: str = "bf16"       # q / kv / out element type ("bf16" | "fp16")
    head_dim: int = 576
    head_dim_v: int = 512
    causal: bool = False      # decode only; normalized to False when it cannot matter
    tile_rows: int = 64       # decode only: query rows per CTA tile (16, 32 or 64)
    kv_format: str = "same"   # decode only: KV cache format (KV_FORMATS)
    seesaw: bool = False      # decode only: the 64-row seesaw kernel with TMA loads
                              # (decode_seesaw.cuh; pages of whole 64-token blocks)
    kv_evict_first: bool = False  # seesaw only: KV loads evict-first in L2 (EVICT_FIRST_ABOVE_ROWS)
    q_tma: bool = False       # seesaw only: Q tiles by TMA (q_tma_fits), else by cp.async
    merge_chunks: int = 0     # combine only: 0 = a warp per row (few pieces a request), else
                              # a CTA per this many 128-column chunks of a row (many pieces)
    merge_warps: int = 8      # combine with merge_chunks = 1 only: 8 or 16 warps a CTA

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if (self.head_dim, self.head_dim_v) not in SUPPORTED_HEAD_DIMS:
            raise ValueError(
                f"head dims (d={self.head_dim}, dv={self.head_dim_v}) are not supported; "
                f"supported: {', '.join(f'(d={d}, dv={v})' for d, v in SUPPORTED_HEAD_DIMS)}")
        if self.kv_format not in KV_FORMATS:
            raise ValueError(f"kv_format must be one of {tuple(KV_FORMATS)}, got {self.kv_format!r}")
        if self.kv_format != "same":
            if self.kind != "decode":
                raise ValueError(f"kv_format {self.kv_format!r} is a decode-kernel choice, not {self.kind}'s")
            if not kv_format_supported(self.kv_format, self.dtype, self.head_dim, self.head_dim_v):
                raise ValueError(f"kv_format {self.kv_format!r} does not support dtype {self.dtype} with "
                                 f"d={self.head_dim}, dv={self.head_dim_v}")
        if self.seesaw and not (self.kind == "decode" and self.tile_rows == 64 and self.kv_format == "same"
                                and self.head_dim_v == 512):
            raise ValueError("seesaw is a decode kernel for 64-row tiles, head_dim_v 512 and a 16-bit cache")
        if (self.kv_evict_first or self.q_tma) and not self.seesaw:
            raise ValueError("kv_evict_first and q_tma are choices of the seesaw decode kernel")
        if self.merge_chunks and not (self.kind == "combine"
                                      and self.merge_chunks in merge_chunks_for(self.head_dim_v)):
            raise ValueError(f"merge_chunks is a combine choice, one of {MERGE_CHUNKS} dividing "
                             f"head_dim_v / 128 = {self.head_dim_v // 128}; got {self.merge_chunks} for {self.kind}")
        if self.merge_warps not in MERGE_LOADS or (self.merge_warps != 8 and self.merge_chunks != 1):
            raise ValueError(f"merge_warps must be 8, or 16 with merge_chunks = 1; got {self.merge_warps} with "
                             f"merge_chunks = {self.merge_chunks}")
        allowed = tile_rows_allowed(self.head_dim_v, self.kv_format)
        if self.kind == "decode" and self.tile_rows not in allowed:
            raise ValueError(f"tile_rows must be one of {allowed} for head_dim_v={self.head_dim_v} and "
                             f"kv_format={self.kv_format!r}, got {self.tile_rows}")

    # ---- code generation -------------------------------------------------------------
    @property
    def header(self) -> str:
        return "flashmla/decode_seesaw.cuh" if self.seesaw else f"flashmla/{self.kind}.cuh"

    @property
    def name_expression(self) -> str:
        """The C++ expression NVRTC resolves to the kernel's lowered (mangled) name."""
        t = DTYPES[self.dtype]
        if self.kind == "decode":
            causal = "true" if self.causal else "false"
            if self.seesaw:
                evict = "true" if self.kv_evict_first else "false"
                q_tma = "true" if self.q_tma else "false"
                return (f"&flashmla::decode_seesaw_kernel<{t}, {self.head_dim}, {self.head_dim_v}, {causal}, "
                        f"{evict}, {q_tma}>")
            kv = "" if self.kv_format == "same" else f", {KV_FORMATS[self.kv_format]}"
            return (f"&flashmla::decode_kernel<{t}, {self.head_dim}, {self.head_dim_v}, {self.tile_rows}, "
                    f"{causal}{kv}>")
        if self.kind == "combine":
            warps = f", {self.merge_warps}" if self.merge_warps != 8 else ""
            return f"&flashmla::combine_kernel<{t}, {self.head_dim_v}, {self.merge_chunks}{warps}>"
        return "&flashmla::metadata_kernel"

    @property
    def source(self) -> str:
        """The whole translation unit handed to NVRTC."""
        return f'#include "{self.header}"\n'

    @property
    def name(self) -> str:
        """Readable entry name, e.g. decode.bf16.d576.dv512.m64.causal."""
        if self.kind == "metadata":
            return "metadata"
        parts = [self.kind, self.dtype, f"d{self.head_dim}", f"dv{self.head_dim_v}"]
        if self.kind == "decode":
            parts.append(f"m{self.tile_rows}")
            if self.seesaw:
                parts.append("seesaw")
            if self.kv_evict_first:
                parts.append("evict_first")
            if self.q_tma:
                parts.append("q_tma")
            if self.causal:
                parts.append("causal")
            if self.kv_format != "same":
                parts.append(f"kv_{self.kv_format}")
        if self.merge_chunks:
            parts.append(f"c{self.merge_chunks}")
        if self.merge_warps != 8:
            parts.append(f"w{self.merge_warps}")
        return ".".join(parts)

    # ---- launch configuration ----------------------------------------------------------
    # Read on every launch: computed once per spec (cached_property writes the instance
    # dict directly, which a frozen dataclass allows).
    @functools.cached_property
    def threads(self) -> int:
        if self.kind == "combine" and self.merge_chunks:
            return 32 * self.merge_warps
        return {"decode": DECODE_THREADS, "combine": COMBINE_THREADS,
                "metadata": METADATA_THREADS}[self.kind]

    @functools.cached_property
    def smem_bytes(self) -> int:
        """Dynamic shared memory; mirrors DecodeSmem in kernels/flashmla/decode.cuh."""
        if self.kind != "decode":
            return 0
        if self.seesaw:  # mirrors SeesawSmem in kernels/flashmla/decode_seesaw.cuh
            rope = self.head_dim > self.head_dim_v
            tiles = 3 * BLOCK_N * self.head_dim * 2 + (1 if rope else 2) * BLOCK_N * 128
            parts = 3 if rope else 2  # one mbarrier per buffer part: sub-tiles 0-3, 4-7, rope
            return tiles + 1280 + (2 * parts + 1) * 8  # and Q's
        col_groups = DECODE_THREADS // 32 // (self.tile_rows // 16)
        kv = (2 if self.kv_format == "same" else 1) * BLOCK_N * self.head_dim * 2
        stage = 0 if self.kv_format == "same" else 2 * BLOCK_N * fp8_stage_pitch(self.kv_format, self.head_dim)
        q = self.tile_rows * self.head_dim * 2
        p = self.tile_rows * BLOCK_N * 2
        row_stats = (2 * col_groups + 1) * self.tile_rows * 4   # row_max, row_sum, row_limit
        return stage + kv + q + p + row_stats


FP8_656_TOKEN_BYTES = 656  # 512 e4m3 + 4 fp32 scales + 64 bf16


def fp8_stage_pitch(kv_format: str, head_dim: int) -> int:
    """Bytes per token in an FP8 staging buffer; mirrors Fp8Stage::kPitch in fp8.cuh."""
    row = FP8_656_TOKEN_BYTES if kv_format == "fp8_656" else head_dim
    return (row + 63) // 128 * 128 + 64


def tile_rows_allowed(head_dim_v: int, kv_format: str = "same") -> tuple:
    """dv = 256 fits the 32-row tile only; FP8 caches have no 64-row (wgmma) tile yet."""
    tiles = TILE_ROWS if head_dim_v == 512 else (32,)
    return tiles if kv_format == "same" else tuple(m for m in tiles if m <= FP8_MAX_TILE_ROWS)


@functools.cache
def tile_rows_for(rows: int, head_dim_v: int = 512, kv_format: str = "same") -> int:
    """Query-tile height for `rows` query rows per KV head: the shortest that holds
    them, so few heads do not pay for padding rows (the tallest beyond that)."""
    allowed = tile_rows_allowed(head_dim_v, kv_format)
    return next((m for m in allowed if rows <= m), allowed[-1])


def seesaw_fits(head_dim_v: int, kv_format: str, page_size: int) -> bool:
    """The seesaw kernel (64-row tiles, TMA loads) runs dv = 512 on 16-bit caches whose
    pages hold whole 64-token blocks, at every row count: padded to 64 rows it still beats
    the 16- and 32-row mma.sync tiles when memory-bound (docs/PERF.md, v7), as FlashMLA's
    64-row tiles do."""
    return head_dim_v == 512 and kv_format == "same" and page_size % BLOCK_N == 0


def q_tma_fits(heads_per_kv: int) -> bool:
    """A 64-row query tile is one TMA box per 64 columns when its rows are 64 heads of one
    token (heads_per_kv a multiple of 64) or every head of the KV head for 64 /
    heads_per_kv tokens (heads_per_kv dividing 64)."""
    return heads_per_kv % 64 == 0 or 64 % heads_per_kv == 0


@functools.cache  # called on every decode: build (and validate) each spec once
def decode_spec(dtype: str, head_dim: int, head_dim_v: int, causal: bool, s_q: int, rows: int,
                kv_format: str = "same", seesaw: bool = False, q_tma: bool = False) -> KernelSpec:
    # With one query token the end-aligned causal mask equals the seqlen mask.
    tile_rows = 64 if seesaw else tile_rows_for(rows, head_dim_v, kv_format)
    return KernelSpec("decode", dtype, head_dim, head_dim_v, causal=bool(causal) and s_q > 1,
                      tile_rows=tile_rows, kv_format=kv_format, seesaw=seesaw,
                      kv_evict_first=seesaw and rows > EVICT_FIRST_ABOVE_ROWS, q_tma=seesaw and q_tma)


@functools.cache
def combine_spec(dtype: str, head_dim: int, head_dim_v: int, merge_chunks: int = 0, merge_warps: int = 8) -> KernelSpec:
    return KernelSpec("combine", dtype, head_dim, head_dim_v, merge_chunks=merge_chunks, merge_warps=merge_warps)


def merge_chunks_for(head_dim_v: int) -> tuple:
    """The many-pieces merge grids for this head_dim_v: chunks a CTA takes that split a
    row's 128-column chunks evenly (combine.cuh's static_assert)."""
    return tuple(g for g in MERGE_CHUNKS if head_dim_v // 128 % g == 0)


def combine_specs(dtype: str, head_dim: int, head_dim_v: int) -> list:
    """Every merge grid a step may pick (api.merge_grid: it depends on the batch)."""
    return ([combine_spec(dtype, head_dim, head_dim_v, g) for g in (0, *merge_chunks_for(head_dim_v))]
            + [combine_spec(dtype, head_dim, head_dim_v, 1, 16)])


METADATA_SPEC = KernelSpec("metadata")


def kv_format_supported(kv_format: str, dtype: str, head_dim: int, head_dim_v: int) -> bool:
    if kv_format == "fp8_656":
        return (dtype, head_dim, head_dim_v) == ("bf16", 576, 512)
    return kv_format == "same" or head_dim_v == 512  # FP8 with dv = 256: not built yet


def specs_for(dtypes=("bf16",), causal=(False, True), head_dims=SUPPORTED_HEAD_DIMS, kv_formats=("same",)):
    """Every spec a decode step with these choices can touch (for precompile)."""
    out = [METADATA_SPEC]
    for dtype, (d, dv) in itertools.product(dtypes, head_dims):
        for kv in kv_formats:
            if not kv_format_supported(kv, dtype, d, dv):
                continue
            for c, m in itertools.product(causal, tile_rows_allowed(dv, kv)):
                out.append(KernelSpec("decode", dtype, d, dv, causal=c, tile_rows=m, kv_format=kv))
                if m == 64 and seesaw_fits(dv, kv, BLOCK_N):
                    out += [KernelSpec("decode", dtype, d, dv, causal=c, tile_rows=m, seesaw=True, kv_evict_first=e,
                                       q_tma=q) for e, q in itertools.product((False, True), repeat=2)]
        out.extend(combine_specs(dtype, d, dv))
    return list(dict.fromkeys(out))


def default_specs():
    """What common models use: bf16, DeepSeek's 576/512, causal and not."""
    return specs_for(dtypes=("bf16",), head_dims=(DEEPSEEK_HEAD_DIMS,))


def all_specs():
    return specs_for(dtypes=tuple(DTYPES), kv_formats=tuple(KV_FORMATS))
