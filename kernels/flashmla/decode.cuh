// Split-KV MLA decode: one CTA = one query tile (kTileRows rows) of one KV head x one
// scheduler part (a contiguous run of (request, 64-token block) work from
// get_mla_metadata).
//
// Query rows of KV head g are packed as r = s_idx * heads_per_kv + head_in_group, so
// all query heads (and tokens) sharing a KV head ride in one tile (FlashMLA's layout).
// The tile height follows the rows per KV head (16, 32 or 64): few rows means a short
// tile, so the memory-bound case does not pay for padding rows in MMAs and smem reads.
//
// Warps: 8 = kRowGroups (16 rows each) x kColGroups. For S = Q K^T the column groups
// split the 64 tokens of a block; for O += P V they split the output columns. The warps
// of a row group agree on the running max through shared memory and share P (16-bit)
// through shared memory, so each S element is computed once.
//
// Tensor cores: 64-row tiles use wgmma (two warpgroups: S for 32 tokens each with
// m64n32k16, O for 256 columns each with m64n256k16, operands straight from shared
// memory); 16- and 32-row tiles use mma.sync m16n8k16 with operands via ldmatrix. K and V
// come from the same shared K block (V is the first head_dim_v columns of K). KV pages are gathered per token through the block
// table with cp.async, double buffered; tokens past the sequence end are zero-filled,
// so NaN in a page tail never reaches the MMAs. FP8 caches (kKv != kKvSame, 16- and
// 32-row tiles only) are staged as raw bytes and dequantized into a single 16-bit KV
// tile at the top of each iteration (fp8.cuh).
#pragma once
#include "fp8.cuh"
#include "params.cuh"

namespace flashmla {

constexpr int kBlockN = 64;

// The blocks [lo, hi) a part owns (its scheduler record) of the request at position
// `pos`: all of the request's blocks except at the part's first and last position.
struct BlockRange {
  int lo, hi;
};
__device__ __forceinline__ BlockRange part_blocks(int seqlen, int pos, int begin_pos, int begin_blk, int end_pos,
                                                  int end_blk) {
  const int nblk = (seqlen + kBlockN - 1) / kBlockN;
  return {pos == begin_pos ? begin_blk : 0, pos == end_pos ? end_blk : nblk};
}
constexpr int kDecodeThreads = 256;
constexpr int kDecodeWarps = kDecodeThreads / 32;
constexpr float kMaxInit = -1e30f;  // finite: exp2 of (init - init) is 1, never NaN

template <int kTileRows, int kD, int kKv = kKvSame>
struct DecodeSmem : StageSmem<Fp8Stage<kKv, kD>::kBytes> {  // FP8: two raw staging buffers first
  static constexpr int kColGroups = kDecodeWarps / (kTileRows / 16);
  u16 kv[kKv == kKvSame ? 2 : 1][kBlockN * kD];  // FP8: one tile, refilled from the staging
  u16 q[kTileRows * kD];
  u16 p[kTileRows * kBlockN];
  float row_max[kColGroups][kTileRows];
  float row_sum[kColGroups][kTileRows];
  int row_limit[kTileRows];  // per row: keys [0, limit) are visible
};

// Shared tiles are stored as wgmma's 128-byte-swizzled K-major layout: a tile of kRows
// rows x (64 * n) columns is n sub-tiles of kRows x 64 elements (128-byte rows, 8-row
// atoms of 1024 bytes), and inside a row the 16-byte chunk index is XORed with row % 8.
// wgmma reads it through descriptors; ldmatrix reads 8 rows of one chunk column from 8
// different bank groups. Element offset of (row, col); col must be a multiple of 8.
template <int kRows>
__device__ __forceinline__ int tile_offset(int row, int col) {
  return (col / 64) * kRows * 64 + row * 64 + ((((col / 8) % 8) ^ (row % 8)) * 8);
}
constexpr int kSubTileBytes = kBlockN * 128;  // one 64-column sub-tile of a KV block

// One request's query tile (kRows rows of the KV head, rows past req_rows zero-filled)
// into the swizzled tile at sq: kThreads / kRows threads per row, one cp.async per
// 16-byte chunk, latent columns from q and rope columns from q_pe. Not committed: the
// caller puts it in a commit group. Both decode kernels load Q this way (the seesaw one
// by TMA instead where a tile is one box per 64 columns).
template <int kRows, int kThreads, int kD, int kDV>
__device__ __forceinline__ void load_q_tile(const DecodeParams& p, u32 sq, int tid, int req, QuerySpan span,
                                            int req_rows, int hpk, int m_block, int head_kv) {
  constexpr int kQThreads = kThreads / kRows, kChunks = kD / 8, kLatentChunks = kDV / 8;
  const int row = tid / kQThreads, r = m_block * kRows + row;
  const bool valid = r < req_rows;
  const u16 *src = (const u16*)p.q, *src_pe = (const u16*)p.q_pe;  // latent, rope columns
  if (valid) {
    const int tok = span.first + r / hpk, hq = head_kv * hpk + r % hpk;
    src += req * p.q_batch_stride + tok * p.q_seq_stride + hq * p.q_head_stride;
    src_pe += req * p.q_pe_batch_stride + tok * p.q_pe_seq_stride + hq * p.q_pe_head_stride;
  }
#pragma unroll 1  // once per request: not worth registers held across the main loop
  for (int i = 0; i < (kChunks + kQThreads - 1) / kQThreads; ++i) {
    const int c = tid % kQThreads + kQThreads * i;
    const u16* chunk = c < kLatentChunks ? src + c * 8 : src_pe + (c - kLatentChunks) * 8;
    if (kChunks % kQThreads == 0 || c < kChunks)
      cp_async_16(sq + 2 * tile_offset<kRows>(row, c * 8), valid ? chunk : src, valid);
  }
}

template <typename T, int kD, int kDV, int kTileRows, bool kCausal, int kKv = kKvSame>
__global__ void __launch_bounds__(kDecodeThreads, 1) decode_kernel(const __grid_constant__ DecodeParams p) {
  static_assert(kD % 64 == 0 && kDV % 64 == 0 && kDV <= kD, "head dims: d % 64 == 0, dv % 64 == 0, dv <= d");
  static_assert(kTileRows == 16 || kTileRows == 32 || kTileRows == 64, "tile rows: 16, 32 or 64");
  constexpr int kRowGroups = kTileRows / 16;
  constexpr int kColGroups = kDecodeWarps / kRowGroups;  // 8, 4, 2
  constexpr bool kWgmma = kTileRows == 64;               // 64-row tiles run on wgmma
  // Warps that compute S: mma.sync tiles split the 64 tokens over the column groups;
  // wgmma tiles give all of S to warpgroup 0 (one S group).
  constexpr int kSGroups = kWgmma ? 1 : kColGroups;
  constexpr int kSTokens = kBlockN / kSGroups;           // S tokens per warp: 8, 16 or 64
  constexpr int kSTiles = kSTokens / 8;                  // n8 tiles of S per warp
  constexpr int kCols = kDV / kColGroups;                // O columns per warp: 64, 128, 256
  constexpr int kOTiles = kCols / 8;                     // n8 tiles of O per warp
  constexpr int kChunks = kD / 8;                        // 16-byte chunks per K/Q row
  constexpr int kTokenThreads = kDecodeThreads / kBlockN;  // KV loader threads per token
  // Columns [0, kDV) (the latent part, which doubles as V) come from q / k, the rest (the
  // rope part) from q_pe / k_pe: separate tensors, or views into the same rows.
  constexpr int kLatentChunks = kDV / 8;
  static_assert(kLatentChunks % kTokenThreads == 0, "a loader thread's chunks are all latent or all rope");
  static_assert(kChunks % 8 == 0, "a token's chunks split evenly over its loader threads");
  static_assert(kCols % 64 == 0, "a warp's O columns span whole swizzle atoms");
  constexpr int kGroupThreads = 32 * kColGroups;         // threads of one row group
  // 64-row tiles: warps 4w..4w+3 form warpgroup w = cg, and warp w % 4 of a warpgroup
  // owns rows 16 (w % 4).. of wgmma's accumulators, i.e. the same rows as row group rg.
  static_assert(!kWgmma || (kSTokens == 64 && kCols == 256), "wgmma shapes are m64n64 (S) and m64n256 (O)");
  constexpr bool kFp8 = kKv != kKvSame;
  static_assert(!kFp8 || !kWgmma, "FP8 caches run on 16- and 32-row (mma.sync) tiles");

  if (!p.piece_done) grid_launch_dependents();  // the combine's CTAs may be scheduled; they wait for us
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  auto& smem = *reinterpret_cast<DecodeSmem<kTileRows, kD, kKv>*>(smem_raw);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int rg = warp % kRowGroups, cg = warp / kRowGroups;  // row group, column group
  // The last warp, provably warp-uniform (the 64-row tile's wgmma is serialized otherwise).
  auto last_warp = [&]() { return __shfl_sync(0xffffffff, threadIdx.x / 32, 0) == kDecodeThreads / 32 - 1; };
  const int g = lane / 4, t = lane % 4;                       // mma fragment coordinates
  const int m_block = blockIdx.x, head_kv = blockIdx.y;
  const int* rec = p.sched + blockIdx.z * kSchedRecordInts;
  const int begin_pos = rec[0], begin_blk = rec[1], end_pos = rec[2], end_blk = rec[3], begin_split = rec[4];
  // Per-tensor FP8: the tile holds the e4m3 values, k_scale scales S here and O at the end.
  const float scale = (float)p.scale_log2 * (kKv == kKvFp8 ? fp8_k_scale(p) : 1.f);
  const int rows = (int)p.rows, hpk = (int)p.heads_per_kv;

  // The two rows this thread holds in every accumulator fragment: row0 and row0 + 8.
  const int row0 = rg * 16 + g;

  // Per-lane ldmatrix addresses. In a swizzled tile the XOR term depends only on
  // row % 8 (a lane constant) and the chunk within the 128-byte atom, so four offsets
  // cover every k-step; the rest of each address is an immediate.
  const u32 sq = smem_u32(smem.q), sp = smem_u32(smem.p);
  const u32 q_frag = sq + (rg * 16 + lane % 16) * 128;                         // A of Q K^T
  const int s_tok0 = kWgmma ? 0 : cg * kSTokens;                               // first S token of this warp
  const u32 k_frag = (s_tok0 + lane % 8 + (lane / 16) * 8) * 128;              // B of Q K^T
  const u32 p_frag = sp + (rg * 16 + lane % 16) * 128;                         // A of P V
  const u32 v_frag = (lane % 8 + ((lane / 8) % 2) * 8) * 128 + (cg * kCols / 64) * kSubTileBytes;  // B of P V
  const u32 v_frag_wg = (cg * kCols / 64) * kSubTileBytes;                     // wgmma: V of warpgroup cg
  u32 a_xor[4], k_xor[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    a_xor[i] = ((2 * i + lane / 16) ^ (lane % 8)) * 16;        // A operands and V (.trans)
    k_xor[i] = ((2 * i + (lane / 8) % 2) ^ (lane % 8)) * 16;   // K as the B operand
  }

  const i64 kv_cap = p.max_blocks * p.page_size;  // tokens the block table can address
  bool pieces_started = false;  // decode_start_pieces ran (params.cuh)

  for (int pos = begin_pos; pos <= end_pos && pos < p.batch; ++pos) {
    const int req = request_at(p.sched, pos, (int)p.batch, (int)gridDim.z);
    const int seqlen = p.seqlens[req];
    const BlockRange blocks = part_blocks(seqlen, pos, begin_pos, begin_blk, end_pos, end_blk);
    const int lo = blocks.lo, hi = blocks.hi;
    if (lo >= hi) continue;
    const int n_pieces = p.num_splits[req + 1] - p.num_splits[req];
    const int split = pos == begin_pos ? begin_split : p.num_splits[req];
    const int kv_len = (int)min((i64)seqlen, kv_cap);
    const QuerySpan span = query_span(p.cu_seqlens_q, req, (int)p.s_q);
    const int req_rows = span.count * hpk;  // this request's query rows per KV head
    if (m_block * kTileRows >= req_rows) continue;

    __syncthreads();  // the previous request is done with every shared buffer

    load_q_tile<kTileRows, kDecodeThreads, kD, kDV>(p, sq, tid, req, span, req_rows, hpk, m_block, head_kv);
    // ---- KV block loader: kTokenThreads threads per token, page looked up per token ----
    auto load_kv = [&](int blk, int buf) {
      const int tok_in_blk = tid / kTokenThreads, part = tid % kTokenThreads;
      const int tok = blk * kBlockN + tok_in_blk;
      bool valid = tok < kv_len;
      i64 page = 0;
      if (valid) {
        page = p.block_table[req * p.bt_batch_stride + tok / p.page_size];
        valid = page >= 0 && page < p.num_pages;
      }
      const i64 row = tok % p.page_size;
      if constexpr (kFp8) {  // the token's raw bytes into staging buffer `buf`
        using S = Fp8Stage<kKv, kD>;
        const unsigned char* src =
            (const unsigned char*)p.k + (valid ? page * p.k_page_stride + row * p.k_row_stride + head_kv * p.k_head_stride : 0);
        const u32 dst = smem_u32(smem.stage[buf]) + tok_in_blk * S::kPitch;
#pragma unroll
        for (int i = 0; i < (S::kChunks + kTokenThreads - 1) / kTokenThreads; ++i) {
          const int c = part + kTokenThreads * i;
          if (c < S::kChunks) cp_async_16(dst + c * 16, valid ? src + c * 16 : src, valid);
        }
        cp_async_commit_group();
        return;
      }
      const u16* src = (const u16*)p.k +
                       (valid ? page * p.k_page_stride + row * p.k_row_stride + head_kv * p.k_head_stride : 0);
      const u16* src_pe = (const u16*)p.k_pe +
                          (valid ? page * p.k_pe_page_stride + row * p.k_pe_row_stride + head_kv * p.k_pe_head_stride : 0);
      // Chunk c = part + kTokenThreads * i lands in sub-tile i / kXors, at one of kXors
      // XOR positions inside its 128-byte row.
      constexpr int kXors = 8 / kTokenThreads;
      const u32 dst = smem_u32(smem.kv[buf]) + tok_in_blk * 128;
      u32 x[kXors];
#pragma unroll
      for (int k = 0; k < kXors; ++k) x[k] = ((part + kTokenThreads * k) ^ (tok_in_blk % 8)) * 16;
#pragma unroll
      for (int i = 0; i < kChunks / kTokenThreads; ++i) {
        const int c = part + kTokenThreads * i;  // c < kLatentChunks is known at compile time
        const u16* chunk = c < kLatentChunks ? src + c * 8 : src_pe + (c - kLatentChunks) * 8;
        cp_async_16(dst + (i / kXors) * kSubTileBytes + x[i % kXors], valid ? chunk : src, valid);
      }
      cp_async_commit_group();
    };
    load_kv(lo, 0);  // commits Q and the first block together
    if constexpr (kFp8) {  // FP8: two blocks in flight; one commit group per block (maybe empty)
      if (lo + 1 < hi) load_kv(lo + 1, 1);
      else cp_async_commit_group();
    }
    if (!pieces_started) {  // the combine kernel's CTAs may be scheduled now
      if (p.piece_done && last_warp()) decode_start_pieces(p);
      pieces_started = true;
    }

    // Per-row visible length (end-aligned causal mask), kept in shared memory: two more
    // live registers make the main loop spill.
    if (tid < kTileRows) {
      const int s_idx = (m_block * kTileRows + tid) / hpk;
      smem.row_limit[tid] = kCausal ? min(kv_len, seqlen - span.count + 1 + s_idx) : kv_len;
    }

    float o[kOTiles][4];
#pragma unroll
    for (int j = 0; j < kOTiles; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m_run[2] = {kMaxInit, kMaxInit}, l_run[2] = {0.f, 0.f};

    for (int blk = lo; blk < hi; ++blk) {
      const int buf = (blk - lo) & 1;
      if constexpr (kFp8) {
        cp_async_wait_group<1>();  // block `blk` (and Q) landed; block blk + 1 may still fly
        __syncthreads();           // ... for every thread; all are done with the tile
        dequant_block<kKv, kD, T>(smem_u32(smem.kv[0]), smem_u32(smem.stage[buf]), tid);
        __syncthreads();           // tile written; staging buffer `buf` free again
        if (blk + 2 < hi) load_kv(blk + 2, buf);
        else cp_async_commit_group();
      } else {
        cp_async_wait_all();
        fence_proxy_async_shared();  // cp.async wrote through the generic proxy; wgmma reads via the async one
        __syncthreads();  // block `blk` visible to all; everyone is done with the other buffer
        // 64-row tiles: warpgroup 0 issues its share of the next block's loads only after
        // its S wgmmas are in flight (loading from 4 warps alone halves the issue rate).
        if (blk + 1 < hi && (!kWgmma || cg == 1)) load_kv(blk + 1, buf ^ 1);
      }
      const u32 sk = smem_u32(smem.kv[kFp8 ? 0 : buf]);

      // ---- S = Q K^T for 16 rows x kSTokens tokens, by the warps that own S ----
      // 64-row tiles: warpgroup 0 computes S for all 64 tokens (m64n64k16 reads as many
      // smem bytes per cycle as the pipe allows; n32 would be smem-bound) and the
      // softmax, and hands P and the row rescale to warpgroup 1 through shared memory.
      float rescale[2];
      if (!kWgmma || cg == 0) {
        float s[kSTiles][4];
#pragma unroll
        for (int j = 0; j < kSTiles; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
        if constexpr (kWgmma) {
          float(&acc)[kSTiles * 4] = *reinterpret_cast<float(*)[kSTiles * 4]>(&s[0][0]);
          wgmma_fence();
#pragma unroll
          for (int ks = 0; ks < kD / 16; ++ks) {
            const u32 k_off = (ks / 4) * kSubTileBytes + (ks % 4) * 32;  // +32 bytes = 16 columns in an atom
            wgmma_m64n64k16_ss(acc, smem_desc(sq + (ks / 4) * kTileRows * 128 + (ks % 4) * 32, 0, 1024),
                               smem_desc(sk + k_off, 0, 1024), ks > 0, T{});
          }
          wgmma_commit_group();
          if (blk + 1 < hi) load_kv(blk + 1, buf ^ 1);
          wgmma_wait_group<0>();
        } else {
#pragma unroll 1
          for (int atom = 0; atom < kD / 64; ++atom) {  // 64 columns = one sub-tile
#pragma unroll
            for (int ks = 0; ks < 4; ++ks) {
              u32 a[4];
              ldmatrix_x4(a, q_frag + atom * kTileRows * 128 + a_xor[ks]);
#pragma unroll
              for (int nn = 0; nn < kSTiles; nn += 2) {
                if (kSTiles == 1) {  // one n8 tile: lanes 0-15 address its two 8x8 halves
                  u32 b[2];
                  ldmatrix_x2(b, sk + k_frag + atom * kSubTileBytes + k_xor[ks]);
                  mma_m16n8k16(s[0], a, b[0], b[1], T{});
                } else {
                  u32 b[4];
                  ldmatrix_x4(b, sk + k_frag + nn * 8 * 128 + atom * kSubTileBytes + k_xor[ks]);
                  mma_m16n8k16(s[nn], a, b[0], b[1], T{});
                  mma_m16n8k16(s[nn + 1], a, b[2], b[3], T{});
                }
              }
            }
          }
        }

        // ---- mask (select, so garbage never survives) and scale into the log2 domain ----
        const int limit[2] = {smem.row_limit[row0], smem.row_limit[row0 + 8]};
        float mx[2] = {kMaxInit, kMaxInit};
#pragma unroll
        for (int j = 0; j < kSTiles; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int h = i / 2, tok = blk * kBlockN + s_tok0 + 8 * j + 2 * t + (i & 1);
            s[j][i] = tok < limit[h] ? s[j][i] * scale : -__int_as_float(0x7f800000);
            mx[h] = fmaxf(mx[h], s[j][i]);
          }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffff, mx[h], 1));
          mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffff, mx[h], 2));
          if (kSGroups > 1 && t == 0) smem.row_max[cg][row0 + 8 * h] = mx[h];
        }
        if (kSGroups > 1) bar_sync(1 + rg, kGroupThreads);  // the warps sharing these rows

        // ---- online softmax: every warp of the row group derives the same new max ----
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float m_new = fmaxf(m_run[h], mx[h]);
#pragma unroll
          for (int c = 0; c < kSGroups && kSGroups > 1; ++c) m_new = fmaxf(m_new, smem.row_max[c][row0 + 8 * h]);
          rescale[h] = ex2(m_run[h] - m_new);
          m_run[h] = m_new;
          l_run[h] *= rescale[h];
          if (kWgmma && t == 0) smem.row_max[0][row0 + 8 * h] = rescale[h];  // for warpgroup 1
        }
#pragma unroll
        for (int j = 0; j < kSTiles; ++j) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            s[j][i] = ex2(s[j][i] - m_run[i / 2]);
            l_run[i / 2] += s[j][i];
          }
          const int col = s_tok0 + 8 * j;
          *(u32*)&smem.p[tile_offset<kTileRows>(row0, col) + 2 * t] = cvt_pack(s[j][0], s[j][1], T{});
          *(u32*)&smem.p[tile_offset<kTileRows>(row0 + 8, col) + 2 * t] = cvt_pack(s[j][2], s[j][3], T{});
        }
      }
      if constexpr (kWgmma) {
        fence_proxy_async_shared();  // P was written with st.shared; wgmma reads it
        __syncthreads();             // P and the rescale of this block published by warpgroup 0
        if (cg == 1) {
          rescale[0] = smem.row_max[0][row0];
          rescale[1] = smem.row_max[0][row0 + 8];
        }
      }
#pragma unroll
      for (int j = 0; j < kOTiles; ++j) {
        o[j][0] *= rescale[0]; o[j][1] *= rescale[0];
        o[j][2] *= rescale[1]; o[j][3] *= rescale[1];
      }
      if constexpr (kWgmma) {
        // ---- O[64 rows, this warpgroup's 256 columns] += P[64, 64] V[64, 256] ----
        float(&acc)[kOTiles * 4] = *reinterpret_cast<float(*)[kOTiles * 4]>(&o[0][0]);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk)  // V: MN-major, 64-column sub-tiles 8 KB apart
          wgmma_m64n256k16_ss(acc, smem_desc(sp + kk * 32, 0, 1024),
                              smem_desc(sk + v_frag_wg + kk * 16 * 128, kSubTileBytes, 1024), 1, T{});
        wgmma_commit_group();
        wgmma_wait_group<0>();
      } else {
        // ---- O[16 rows, this warp's kCols columns] += P[16, 64] V[64, kCols] ----
        bar_sync(1 + rg, kGroupThreads);  // P of the whole row group written
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          u32 a[4];
          ldmatrix_x4(a, p_frag + a_xor[kk]);
#pragma unroll
          for (int nn = 0; nn < kOTiles / 2; ++nn) {
            u32 b[4];
            ldmatrix_x4_trans(b, sk + v_frag + kk * 16 * 128 + (nn / 4) * kSubTileBytes + a_xor[nn % 4]);
            mma_m16n8k16(o[2 * nn], a, b[0], b[1], T{});
            mma_m16n8k16(o[2 * nn + 1], a, b[2], b[3], T{});
          }
        }
      }
    }

    // ---- epilogue: row sums across the quad, then across the column groups ----
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l_run[h] += __shfl_xor_sync(0xffffffff, l_run[h], 1);
      l_run[h] += __shfl_xor_sync(0xffffffff, l_run[h], 2);
      if (t == 0) smem.row_sum[cg][row0 + 8 * h] = l_run[h];
    }
    bar_sync(1 + rg, kGroupThreads);
    float inv[2];
    bool empty[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float l = 0.f;
#pragma unroll
      for (int c = 0; c < kColGroups; ++c) l += smem.row_sum[c][row0 + 8 * h];
      empty[h] = !(l > 0.f);  // no visible key (or NaN): output 0
      inv[h] = empty[h] ? 0.f : __fdividef(1.f, l) * (kKv == kKvFp8 ? fp8_k_scale(p) : 1.f);
      l_run[h] = l;
    }

#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = m_block * kTileRows + row0 + 8 * h;
      const QuerySpan span = query_span(p.cu_seqlens_q, req, (int)p.s_q);  // reloaded: saves registers
      if (r >= span.count * hpk) continue;
      const int tok = span.first + r / hpk, hq = head_kv * hpk + r % hpk;
      if (n_pieces == 1) {  // the whole request is in this part: write the final result
        u16* dst = (u16*)p.out + req * p.o_batch_stride + tok * p.o_seq_stride + hq * p.o_head_stride +
                   cg * kCols + 2 * t;
#pragma unroll
        for (int j = 0; j < kOTiles; ++j)
          *(u32*)(dst + 8 * j) = cvt_pack(o[j][2 * h] * inv[h], o[j][2 * h + 1] * inv[h], T{});
        if (cg == 0 && t == 0)
          p.lse[req * p.lse_batch_stride + hq * p.lse_head_stride + tok * p.lse_seq_stride] =
              empty[h] ? __int_as_float(0x7f800000) : (__log2f(l_run[h]) + m_run[h]) * kLn2;
      } else {  // one piece of a split request: fp32 partial, lse in the log2 domain
        const i64 prow = ((i64)split * p.h_kv + head_kv) * rows + r;
        float* dst = p.o_accum + prow * kDV + cg * kCols + 2 * t;
#pragma unroll
        for (int j = 0; j < kOTiles; ++j)
          *(float2*)(dst + 8 * j) = make_float2(o[j][2 * h] * inv[h], o[j][2 * h + 1] * inv[h]);
        if (cg == 0 && t == 0)
          p.lse_accum[prow] = empty[h] ? -__int_as_float(0x7f800000) : __log2f(l_run[h]) + m_run[h];
      }
    }
    if (n_pieces > 1 && p.piece_done) decode_publish_piece(p, split, last_warp());
  }
}

}  // namespace flashmla
