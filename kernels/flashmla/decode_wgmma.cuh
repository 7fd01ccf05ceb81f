// Split-KV MLA decode for 64-row query tiles on wgmma, with the "seesaw" schedule
// (the idea of FlashMLA's 2025-04 kernel; this code is ours). One CTA = one 64-row query
// tile of one KV head x one scheduler part, as in decode.cuh (same DecodeParams, same
// results); 256 threads = two warpgroups, no producer warps.
//
// Why a seesaw: per 64-token block the tensor pipe needs ~2176 cycles (S = Q K^T 1152,
// O += P V 1024) and the softmax ~500 CUDA-core cycles. If one warpgroup computes S and
// the softmax for every block, the pipe idles during the softmax. Here warpgroup 0
// (WG0) computes S for the even blocks of a part (blocks lo, lo+2, ...: buffer kv0) and
// WG1 for the odd ones (kv1), each in its own 32 registers, so one warpgroup's softmax
// runs while the other's wgmmas keep the pipe busy. Each warpgroup keeps one half of O
// in registers (WG0 columns 0-255 "left", WG1 256-511 "right", 128 fp32 each) and
// multiplies both blocks' P into it: its own P from registers (RS wgmma), the other's
// through shared memory (sP0 / sP1, SS wgmma).
//
// ---- Online softmax across the pair (log2 domain, m = running row max) ----
// Entering a pair both warpgroups hold m (the same value) and their O half against m.
//   WG0: m0 = max(m, rowmax S0), s0 = 2^(m - m0), P0 = 2^(S0 - m0)  -> sMax0, sP0
//   WG1: reads m0; m1 = max(m0, rowmax S1), s1 = 2^(m0 - m1), P1 = 2^(S1 - m1) -> sMax1, sP1
//   WG0: O_L = (O_L * s0 + P0 V0_L) * s1 + P1 V1_L      l0 = (l0 * s0 + sum P0) * s1
//   WG1: O_R = (O_R * s0 + P0 V0_R) * s1 + P1 V1_R      l1 = (l1 * s0) * s1 + sum P1
// so both halves and both partial row sums end the pair against m1; l = l0 + l1 at the
// end. P0 goes to smem unscaled (against m0) because WG1 applies it before its s1
// rescale: WG0 can publish P0 right after its softmax, without waiting for m1.
// A pair without an odd block (odd block count: the last pair) has s1 = 1, m1 = m0, and
// skips everything that touches block 1.
//
// ---- Order of events per block pair (blk = even block in kv0, blk+1 in kv1) ----
// WG0                                         WG1
//  1 wait S0 (wgmma_wait 0)                    1 bar.sync P0  (m0, sP0 ready)
//  2 refill kv0 rope sub-tile (only S0 read it)2 wait S1 (wgmma_wait 0), then
//  3 softmax S0 -> m0, P0; write sMax0, sP0      O_R *= s0; issue g = sP0 V0_R (SS)
//    fence.proxy.async; bar.arrive P0         3-4 refill kv1 rope sub-tile
//  4 O_L *= s0; issue c = P0 V0_L (RS)         5 softmax S1 -> m1, P1; write sMax1, sP1
//  5 bar.sync P1 (m1, sP1 ready); s1             fence.proxy.async; bar.arrive P1
//  6 wait c; refill kv0 sub-tiles 0-3          6 wait g; refill kv0 sub-tiles 4-7
//  7 O_L *= s1; issue h = sP1 V1_L (SS); wait  7 O_R *= s1; issue e = P1 V1_R (RS); wait
//  8 refill kv1 sub-tiles 0-3                  8 refill kv1 sub-tiles 4-7
//  9 cp.async.wait (own kv0 parts), fence,     9 cp.async.wait (own kv0 part), fence,
//    bar.sync Wg0; issue S0' on kv0 0-3, rope     bar.arrive Kv0
//    bar.sync Kv0; issue S0' on kv0 4-7       10 cp.async.wait (own kv1 parts), fence,
// 10 cp.async.wait (own kv1 part), fence,        bar.sync Wg1; issue S1' on kv1 rope, 4-7
//    bar.arrive Kv1                               bar.sync Kv1; issue S1' on kv1 0-3
// (S0' / S1' = the next pair's S; steps 2, 4, 6, 8 and the S issue only when that block
// exists; steps that touch block 1 only when it exists.) Each refill is one cp.async
// group committed unconditionally (possibly empty), so the wait_group counts hold.
//
// ---- Who protects what ----
// kv0 sub-tiles 0-3 + rope: loaded by WG0. Read by S0 (WG0) and c (WG0, 0-3): refilled
//   after WG0's own wgmma_wait, no cross-warpgroup hazard. Published to WG0's own S by
//   cp.async.wait + fence.proxy.async + bar.sync Wg0 (step 9), to c by the same path.
// kv0 sub-tiles 4-7: loaded by WG1. Read by S0 (WG0) and g (WG1). Refilled after g's
//   wgmma_wait (step 6); S0 finished before WG0's arrive on P0, which WG1 synced before g.
//   Published to S0' by cp.async.wait + fence + bar.arrive Kv0 -> bar.sync Kv0 (WG0),
//   to the next g through Kv0 -> WG0's arrive on P0 -> WG1's bar.sync P0.
// kv1 sub-tiles 0-3: loaded by WG0. Read by S1 (WG1) and h (WG0). Refilled after h's
//   wgmma_wait (step 7); S1 finished before WG1's arrive on P1, which WG0 synced in step 5.
//   Published to S1' by WG0's cp.async.wait + fence + bar.arrive Kv1 -> bar.sync Kv1, to
//   the next h through Kv1 -> WG1's arrive on P1 -> WG0's bar.sync P1.
// kv1 sub-tiles 4-7 + rope: loaded by WG1; read only by WG1 (S1, e): refilled after its
//   own wgmma_wait; published by cp.async.wait + fence + bar.sync Wg1 (and Kv1).
// sP0: written by WG0 (step 3), read by WG1's g. RAW: fence + arrive P0 -> sync P0.
//   WAR (next pair's step 3 vs g): WG1 waits g (step 6) before its arrive on Kv0, which
//   WG0 syncs before S0', before the next step 3. (No next pair: no next write.)
// sP1: written by WG1 (step 5), read by WG0's h. RAW: fence + arrive P1 -> sync P1.
//   WAR: WG0 waits h (step 7) before its arrive on Kv1 (step 10), which WG1 syncs before
//   S1', before its next step 5. For d = 576 sP1 is sQ's rope sub-tile: the rope part of
//   Q lives in registers (the RS operand of the 4 rope k-steps) from the prologue on;
//   every thread's ldmatrix of it precedes its arrive/sync on P0 of the first pair,
//   which precedes the first sP1 write.
// sMax0: WG0 writes (step 3), WG1 reads after sync P0. WAR: WG1 reads it before its
//   arrive on P1, which WG0 syncs (step 5) before the next pair's write.
// sMax1: WG1 writes (step 5), WG0 reads after sync P1. WAR: WG0 reads it before its
//   next arrive on P0, which WG1 syncs before the next write.
// row_limit, sQ, first blocks: written at request start, published by __syncthreads.
//   The request starts with __syncthreads after both warpgroups waited all their wgmma
//   and cp.async, so nothing of the previous request is in flight.
// Named barriers: every arrive has exactly one matching sync per pair (same conditions
// on both sides), and a warpgroup cannot arrive twice on one barrier before the other
// has synced it (each second arrive sits behind a sync on the other warpgroup's signal).
//
// KV loads: per token through the block table with cp.async (any page size; page ids
// outside [0, num_pages) and tokens past kv_len are zero-filled), two buffers. Each
// warpgroup loads the sub-tiles that only it, or it last, reads (see above), so a buffer
// half is refilled as soon as its last reader is done, without a CTA-wide barrier.
#pragma once
#include "decode_common.cuh"

namespace flashmla {

constexpr int kWgmmaThreads = 256;

// Named barrier ids (0 is __syncthreads); 256 = both warpgroups, 128 = one.
constexpr int kBarP0 = 1;   // WG0 -> WG1: sMax0 and sP0 of this pair written
constexpr int kBarP1 = 2;   // WG1 -> WG0: sMax1 and sP1 of this pair written
constexpr int kBarKv0 = 3;  // WG1 -> WG0: WG1's part of the next even block landed
constexpr int kBarKv1 = 4;  // WG0 -> WG1: WG0's part of the next odd block landed
constexpr int kBarWg0 = 5;  // WG0 only: its own cp.async data visible to its wgmma
constexpr int kBarWg1 = 6;  // WG1 only

// Shared memory plan (bytes). d = 576: kv 2 x 73728 + q 73728 + sP0 8192 + stats 1280 =
// 230656 (sP1 aliases sQ's rope sub-tile); d = 512: 2 x 65536 + 65536 + 2 x 8192 + 1280.
// Every tile starts on a 1024-byte boundary (128-byte swizzle atoms).
template <int kD, int kDV>
struct SeesawSmem {
  static constexpr bool kRope = kD > kDV;  // one 64-column rope sub-tile after the latent part
  static constexpr int kKvBytes = kBlockN * kD * 2;
  static constexpr int kKv0 = 0, kKv1 = kKvBytes;
  static constexpr int kQ = 2 * kKvBytes;
  static constexpr int kP0 = kQ + 64 * kD * 2;
  static constexpr int kP1 = kRope ? kQ + (kDV / 64) * kSubTileBytes : kP0 + 64 * 128;
  static constexpr int kStats = kP0 + 64 * 128 + (kRope ? 0 : 64 * 128);
  static constexpr int kMax0 = kStats;            // float[64]: m0 per row
  static constexpr int kMax1 = kStats + 256;      // float[64]: m1 per row
  static constexpr int kRowSum = kStats + 512;    // float[2][64]: l0, l1 per row (epilogue)
  static constexpr int kRowLimit = kStats + 1024; // int[64]: keys [0, limit) visible
  static constexpr int kBytes = kStats + 1280;
};

template <typename T, int kD, int kDV, bool kCausal>
__global__ void __launch_bounds__(kWgmmaThreads, 1) decode_wgmma_kernel(const __grid_constant__ DecodeParams p) {
  using L = SeesawSmem<kD, kDV>;
  static_assert(kDV == 512, "each warpgroup's O half is one m64n256 accumulator");
  static_assert(kD == kDV || kD == kDV + 64, "the rope part is absent or one 64-column sub-tile");
  static_assert(L::kBytes <= 232448, "fits the 227 KB per-block shared memory");
  constexpr bool kRope = L::kRope;
  constexpr int kVSub = kDV / 64 / 2;     // V sub-tiles per warpgroup (4)
  constexpr int kRopeSub = kDV / 64;      // index of the rope sub-tile (8)
  constexpr int kChunks = kD / 8;         // 16-byte chunks per Q row
  constexpr int kLatentChunks = kDV / 8;

  // Let the combine kernel's CTAs be scheduled as SMs free up; they wait for this grid.
  grid_launch_dependents();
  extern __shared__ __align__(1024) unsigned char smem[];
  const u32 sbase = smem_u32(smem);
  const u32 kv0 = sbase + L::kKv0, kv1 = sbase + L::kKv1, sq = sbase + L::kQ;
  const u32 sp0 = sbase + L::kP0, sp1 = sbase + L::kP1;
  float* s_max0 = reinterpret_cast<float*>(smem + L::kMax0);
  float* s_max1 = reinterpret_cast<float*>(smem + L::kMax1);
  float* s_rowsum = reinterpret_cast<float*>(smem + L::kRowSum);
  int* s_limit = reinterpret_cast<int*>(smem + L::kRowLimit);

  const int tid = threadIdx.x, wtid = tid % 128, warp = tid / 32, lane = tid % 32;
  // Warpgroup index broadcast from lane 0: provably warp-uniform, so ptxas does not treat
  // the per-warpgroup code paths (which hold all the wgmma) as divergent.
  const int wg = __shfl_sync(0xffffffff, tid / 128, 0);
  const int g = lane / 4, t = lane % 4;  // accumulator fragment coordinates
  const int row0 = (warp % 4) * 16 + g;  // this thread's rows: row0 and row0 + 8
  const int m_block = blockIdx.x, head_kv = blockIdx.y;
  const int* rec = p.sched + blockIdx.z * kSchedRecordInts;
  const int begin_req = rec[0], begin_blk = rec[1], end_req = rec[2], end_blk = rec[3];
  const float scale = (float)p.scale_log2;
  const int rows = (int)p.rows, hpk = (int)p.heads_per_kv;
  const i64 kv_cap = p.max_blocks * p.page_size;  // tokens the block table can address

  for (int req = begin_req; req <= end_req && req < p.batch; ++req) {
    const int seqlen = p.seqlens[req];
    const int nblk = (seqlen + kBlockN - 1) / kBlockN;
    const int lo = req == begin_req ? begin_blk : 0;
    const int hi = req == end_req ? end_blk : nblk;
    if (lo >= hi) continue;
    const int kv_len = (int)min((i64)seqlen, kv_cap);
    const QuerySpan span = query_span(p.cu_seqlens_q, req, (int)p.s_q);
    const int req_rows = span.count * hpk;  // this request's query rows per KV head
    if (m_block * 64 >= req_rows) continue;

    __syncthreads();  // the previous request is done with every shared buffer

    // ---- Q tile: 4 threads per row, rows past the request's zero-filled ----
    {
      constexpr int kQThreads = kWgmmaThreads / 64;
      const int qtid = opaque(tid);  // per-thread values of each phase are recomputed in it,
                                     // not hoisted and held across the main loop
      const int row = qtid / kQThreads, r = m_block * 64 + row;
      const bool valid = r < req_rows;
      const u16 *src = (const u16*)p.q, *src_pe = (const u16*)p.q_pe;  // latent, rope columns
      if (valid) {
        const int tok = span.first + r / hpk, hq = head_kv * hpk + r % hpk;
        src += req * p.q_batch_stride + tok * p.q_seq_stride + hq * p.q_head_stride;
        src_pe += req * p.q_pe_batch_stride + tok * p.q_pe_seq_stride + hq * p.q_pe_head_stride;
      }
#pragma unroll 1  // once per request: not worth registers held across the main loop
      for (int i = 0; i < kChunks / kQThreads; ++i) {
        const int c = qtid % kQThreads + kQThreads * i;
        const u16* chunk = c < kLatentChunks ? src + c * 8 : src_pe + (c - kLatentChunks) * 8;
        cp_async_16(sq + 2 * tile_offset<64>(row, c * 8), valid ? chunk : src, valid);
      }
    }

    // ---- KV loader: the calling warpgroup's 128 threads fill sub-tiles [sub_begin,
    // sub_end) of block `blk` in buffer `buf`; 2 threads per token, 4 chunks each per
    // sub-tile (a token's two threads cover 32 contiguous bytes per instruction). ----
    auto load_kv = [&](int blk, u32 buf, int sub_begin, int sub_end) {
      const int ltid = opaque(wtid), head = opaque(head_kv);
      const int tok_in_blk = ltid / 2, part = ltid % 2;
      const int tok = blk * kBlockN + tok_in_blk;
      bool valid = tok < kv_len;
      i64 page = 0;
      if (valid) {
        page = p.block_table[req * p.bt_batch_stride + tok / p.page_size];
        valid = page >= 0 && page < p.num_pages;
      }
      const i64 row = tok % p.page_size;
      const u16* src = (const u16*)p.k +
                       (valid ? page * p.k_page_stride + row * p.k_row_stride + head * p.k_head_stride : 0);
      const u16* src_pe = (const u16*)p.k_pe +
                          (valid ? page * p.k_pe_page_stride + row * p.k_pe_row_stride + head * p.k_pe_head_stride : 0);
      // Swizzled chunk c of this token's row: (c ^ tok % 8) * 16 = (2k * 16) ^ x with
      // x = (part ^ tok % 8) * 16 (opaque: not hoisted as 4 live registers).
      const u32 dst = opaque(buf) + tok_in_blk * 128, x = opaque((part ^ (tok_in_blk % 8)) * 16);
#pragma unroll
      for (int sub = sub_begin; sub < sub_end; ++sub)
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int c = part + 2 * k;  // 16-byte chunk within the sub-tile's 128-byte row
          const u16* chunk = sub < kRopeSub ? src + sub * 64 + c * 8 : src_pe + (sub - kRopeSub) * 64 + c * 8;
          cp_async_16(dst + sub * kSubTileBytes + ((32 * k) ^ x), valid ? chunk : src, valid);
        }
    };

    // ---- prologue: Q and the part's first two blocks, each warpgroup its own share ----
    const bool has_second = lo + 1 < hi;
    if (wg == 0) {
      load_kv(lo, kv0, 0, kVSub);
      if (kRope) load_kv(lo, kv0, kRopeSub, kRopeSub + 1);
    } else {
      load_kv(lo, kv0, kVSub, 2 * kVSub);
    }
    cp_async_commit_group();  // Q + this thread's part of block lo
    if (has_second) {
      if (wg == 0) load_kv(lo + 1, kv1, 0, kVSub);
      else load_kv(lo + 1, kv1, kVSub, kRope ? kRopeSub + 1 : 2 * kVSub);
    }
    cp_async_commit_group();  // this thread's part of block lo + 1 (maybe empty)
    if (tid < 64) {           // per-row visible length (end-aligned causal mask)
      const int s_idx = (m_block * 64 + tid) / hpk;
      s_limit[tid] = kCausal ? min(kv_len, seqlen - span.count + 1 + s_idx) : kv_len;
    }
    cp_async_wait_group<1>();
    fence_proxy_async_shared();  // cp.async wrote through the generic proxy; wgmma reads via the async one
    __syncthreads();             // Q, block lo and row_limit visible to everyone

    // The rope part of Q as RS A fragments (4 k-steps x 4 registers): frees sQ's rope
    // sub-tile for sP1. Lanes 0-15 address rows 0-15 of the warp's slice at the k-step's
    // first 8 columns, lanes 16-31 the next 8 (the A layout of m64nNk16).
    u32 q_rope[4][4];
    if constexpr (kRope) {
      const u32 a = opaque(sq + kRopeSub * kSubTileBytes + ((warp % 4) * 16 + lane % 16) * 128);
      const u32 x = opaque(((lane / 16) ^ (lane % 8)) * 16);
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) ldmatrix_x4(q_rope[ks], a + ((32 * ks) ^ x));
    }

    // ---- wgmma batches ----
    // S (+)= Q K^T over sub-tiles [sub_begin, sub_end) of a K buffer (SS); the first
    // wgmma of a block starts from zero (scale-d = 0).
    // Bases go through opaque(): otherwise the compiler hoists all ~150 loop-invariant
    // descriptors out of the request loop and spills them.
    auto s_gemm = [&](float (&s)[32], u32 kbuf, int sub_begin, int sub_end, bool zero_first) {
      const u32 qb = opaque(sq), kb = opaque(kbuf);
#pragma unroll
      for (int sub = sub_begin; sub < sub_end; ++sub)
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) {  // +32 bytes = 16 columns inside a swizzle atom
          const u64 da = smem_desc(qb + sub * kSubTileBytes + ks * 32, 0, 1024);
          const u64 db = smem_desc(kb + sub * kSubTileBytes + ks * 32, 0, 1024);
          if (zero_first && sub == sub_begin && ks == 0) wgmma_m64n64k16_ss_first(s, da, db, T{});
          else wgmma_m64n64k16_ss(s, da, db, 1, T{});
        }
    };
    auto s_gemm_rope = [&](float (&s)[32], u32 kbuf, bool zero_first) {  // RS: Q rope in registers
      if constexpr (kRope) {
        const u32 kb = opaque(kbuf);
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) {
          const u64 db = smem_desc(kb + kRopeSub * kSubTileBytes + ks * 32, 0, 1024);
          if (zero_first && ks == 0)
            wgmma_m64n64k16_rs_first(s, q_rope[ks][0], q_rope[ks][1], q_rope[ks][2], q_rope[ks][3], db, T{});
          else
            wgmma_m64n64k16_rs(s, q_rope[ks][0], q_rope[ks][1], q_rope[ks][2], q_rope[ks][3], db, 1, T{});
        }
      }
    };
    // O half += P[64 x 64] V[64 tokens x 256 columns]; V = sub-tiles vsub.. of a K
    // buffer read MN-major (LBO 8 KB between 64-column sub-tiles, +2 KB per 16 tokens).
    auto pv_rs = [&](float (&o)[128], const u32 (&pk)[16], u32 vbase) {
      vbase = opaque(vbase);
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_m64n256k16_rs(o, pk[4 * kk], pk[4 * kk + 1], pk[4 * kk + 2], pk[4 * kk + 3],
                            smem_desc(vbase + kk * 16 * 128, kSubTileBytes, 1024), T{});
    };
    auto pv_ss = [&](float (&o)[128], u32 pbase, u32 vbase) {
      pbase = opaque(pbase), vbase = opaque(vbase);
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_m64n256k16_ss(o, smem_desc(pbase + kk * 32, 0, 1024),
                            smem_desc(vbase + kk * 16 * 128, kSubTileBytes, 1024), 1, T{});
    };

    // ---- softmax of one block's S (this thread: rows row0, row0 + 8; 16 columns) ----
    // Masks (select, so garbage never survives), scales into the log2 domain, updates
    // the max from m_prev, turns S into P packed as RS A fragments (pk[4 kk .. 4 kk + 3]
    // = k-step kk), and rescales + accumulates the partial row sums l.
    // S is only read here, never written: ptxas serializes all wgmma (C7515) when
    // ordinary code redefines an accumulator register that a wgmma may still own.
    auto softmax = [&](const float (&s)[32], int blk, const float (&m_prev)[2], float (&m_new)[2],
                       float (&sc)[2], float (&l)[2], u32 (&pk)[16]) {
      const int limit[2] = {s_limit[row0], s_limit[row0 + 8]};
      float x[32], mx[2] = {kMaxInit, kMaxInit};
#pragma unroll
      for (int k = 0; k < 32; ++k) {
        const int h = (k / 2) % 2, tok = blk * kBlockN + 8 * (k / 4) + 2 * t + (k % 2);
        x[k] = tok < limit[h] ? s[k] * scale : -__int_as_float(0x7f800000);
        mx[h] = fmaxf(mx[h], x[k]);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffff, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffff, mx[h], 2));
        m_new[h] = fmaxf(m_prev[h], mx[h]);
        sc[h] = ex2(m_prev[h] - m_new[h]);
        l[h] *= sc[h];
      }
#pragma unroll
      for (int k = 0; k < 32; ++k) {
        x[k] = ex2(x[k] - m_new[(k / 2) % 2]);
        l[(k / 2) % 2] += x[k];
      }
#pragma unroll
      for (int i = 0; i < 16; ++i) pk[i] = cvt_pack(x[2 * i], x[2 * i + 1], T{});
    };
    // P (64 x 64, 16-bit) into a swizzled K-major tile for the other warpgroup's SS
    // wgmma; 8-column group j of row r sits at chunk j ^ (r % 8): conflict-free.
    auto store_p = [&](const u32 (&pk)[16], u32 pbase) {
      const u32 rb = opaque(pbase + row0 * 128 + 4 * t), gx = opaque(g * 16);  // (row0 + 8) % 8 == g too
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const u32 a = rb + ((16 * j) ^ gx);
        asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(a), "r"(pk[2 * j]) : "memory");
        asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(a + 8 * 128), "r"(pk[2 * j + 1]) : "memory");
      }
    };
    auto rescale = [&](float (&o)[128], const float (&sc)[2]) {
#pragma unroll
      for (int i = 0; i < 128; ++i) o[i] *= sc[(i / 2) % 2];
    };

    float o[128];  // this warpgroup's O half, m64n256 accumulator layout
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    float m_run[2] = {kMaxInit, kMaxInit}, l_run[2] = {0.f, 0.f};
    float s[32];  // S of this warpgroup's current block (in flight across the loop edge)

    if (wg == 0) {
      // ================= warpgroup 0: even blocks, O columns 0-255 =================
      wgmma_fence();
      s_gemm(s, kv0, 0, 2 * kVSub, true);  // block lo: published by the __syncthreads
      s_gemm_rope(s, kv0, false);
      wgmma_commit_group();
      if (has_second) {  // WG0's part of block lo + 1 -> WG1's first S
        cp_async_wait_group<0>();
        fence_proxy_async_shared();
        bar_arrive(kBarKv1, 256);
      }
      for (int blk = lo; blk < hi; blk += 2) {
        const bool has1 = blk + 1 < hi, next0 = blk + 2 < hi, next1 = blk + 3 < hi;
        wgmma_wait_group<0>();  // 1: S0 done
        if (kRope && next0) load_kv(blk + 2, kv0, kRopeSub, kRopeSub + 1);  // 2
        cp_async_commit_group();
        float m0[2], s0[2], s1[2] = {1.f, 1.f};
        u32 pk[16];
        softmax(s, blk, m_run, m0, s0, l_run, pk);  // 3
        if (t == 0) s_max0[row0] = m0[0], s_max0[row0 + 8] = m0[1];
        store_p(pk, sp0);
        fence_proxy_async_shared();  // sP0 is read by WG1's wgmma (async proxy)
        bar_arrive(kBarP0, 256);
        rescale(o, s0);  // 4
        wgmma_fence();
        pv_rs(o, pk, kv0);
        wgmma_commit_group();
        m_run[0] = m0[0], m_run[1] = m0[1];
        if (has1) {  // 5
          bar_sync(kBarP1, 256);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            m_run[h] = s_max1[row0 + 8 * h];
            s1[h] = ex2(m0[h] - m_run[h]);
            l_run[h] *= s1[h];
          }
        }
        wgmma_wait_group<0>();  // 6: c done, kv0 sub-tiles 0-3 free
        if (next0) load_kv(blk + 2, kv0, 0, kVSub);
        cp_async_commit_group();
        if (has1) {  // 7
          rescale(o, s1);
          wgmma_fence();
          pv_ss(o, sp1, kv1);
          wgmma_commit_group();
        }
        wgmma_wait_group<0>();  // h done, kv1 sub-tiles 0-3 and sP1 free
        if (next1) load_kv(blk + 3, kv1, 0, kVSub);  // 8
        cp_async_commit_group();
        if (next0) {  // 9: S of the next even block, own sub-tiles first
          cp_async_wait_group<1>();  // all but the kv1 group just issued
          fence_proxy_async_shared();
          bar_sync(kBarWg0, 128);
          wgmma_fence();
          s_gemm(s, kv0, 0, kVSub, true);
          s_gemm_rope(s, kv0, false);
          bar_sync(kBarKv0, 256);  // WG1's sub-tiles 4-7 landed
          s_gemm(s, kv0, kVSub, 2 * kVSub, false);
          wgmma_commit_group();
          if (next1) {  // 10
            cp_async_wait_group<0>();
            fence_proxy_async_shared();
            bar_arrive(kBarKv1, 256);
          }
        }
      }
    } else {
      // ================= warpgroup 1: odd blocks, O columns 256-511 =================
      auto s1_gemm = [&]() {  // S of the odd block in kv1: own sub-tiles (rope, 4-7) first
        cp_async_wait_group<0>();
        fence_proxy_async_shared();
        bar_sync(kBarWg1, 128);
        wgmma_fence();
        s_gemm_rope(s, kv1, true);
        s_gemm(s, kv1, kVSub, 2 * kVSub, !kRope);
        bar_sync(kBarKv1, 256);  // WG0's sub-tiles 0-3 landed
        s_gemm(s, kv1, 0, kVSub, false);
        wgmma_commit_group();
      };
      if (has_second) s1_gemm();
      for (int blk = lo; blk < hi; blk += 2) {
        const bool has1 = blk + 1 < hi, next0 = blk + 2 < hi, next1 = blk + 3 < hi;
        bar_sync(kBarP0, 256);  // 1: m0 and sP0 ready
        // 2: S1 is waited for before O_R is touched: ptxas serializes every wgmma if an
        // accumulator is redefined while any wgmma (here S1) may be in flight. S1 was
        // queued on the pipe ahead of WG0's c, which keeps the pipe busy meanwhile.
        wgmma_wait_group<0>();  // S1 done (and the previous e); waits live outside branches
        float m0[2], s0[2], s1[2] = {1.f, 1.f};
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          m0[h] = s_max0[row0 + 8 * h];
          s0[h] = ex2(m_run[h] - m0[h]);
          l_run[h] *= s0[h];
          m_run[h] = m0[h];
        }
        rescale(o, s0);
        wgmma_fence();
        pv_ss(o, sp0, kv0 + kVSub * kSubTileBytes);
        wgmma_commit_group();
        u32 pk[16];
        if (has1) {
          if (kRope && next1) load_kv(blk + 3, kv1, kRopeSub, kRopeSub + 1);  // 3-4
          cp_async_commit_group();
          float m1[2];
          softmax(s, blk + 1, m0, m1, s1, l_run, pk);  // 5
          if (t == 0) s_max1[row0] = m1[0], s_max1[row0 + 8] = m1[1];
          store_p(pk, sp1);
          fence_proxy_async_shared();  // sP1 is read by WG0's wgmma
          bar_arrive(kBarP1, 256);
          m_run[0] = m1[0], m_run[1] = m1[1];
        }
        wgmma_wait_group<0>();  // 6: g done, kv0 sub-tiles 4-7 free
        if (next0) load_kv(blk + 2, kv0, kVSub, 2 * kVSub);
        cp_async_commit_group();
        if (has1) {  // 7
          rescale(o, s1);
          wgmma_fence();
          pv_rs(o, pk, kv1 + kVSub * kSubTileBytes);
          wgmma_commit_group();
        }
        wgmma_wait_group<0>();  // e done, kv1 sub-tiles 4-7 free
        if (next1) load_kv(blk + 3, kv1, kVSub, 2 * kVSub);  // 8
        cp_async_commit_group();
        if (next0) {  // 9: WG1's part of the next even block -> WG0
          cp_async_wait_group<1>();  // all but the kv1 group just issued
          fence_proxy_async_shared();
          bar_arrive(kBarKv0, 256);
        }
        if (next1) s1_gemm();  // 10
      }
    }
    wgmma_wait_group<0>();  // nothing is in flight here; tells ptxas so before O is read

    // ---- epilogue: l = l0 + l1 (each summed over its quad), both halves against m ----
    {  // per-thread values recomputed here (opaque), not held across the main loop
      const int etid = opaque(tid), row0 = ((etid / 32) % 4) * 16 + (etid % 32) / 4, t = etid % 4;
      const int m_block = opaque(blockIdx.x), head_kv = opaque(blockIdx.y);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        l_run[h] += __shfl_xor_sync(0xffffffff, l_run[h], 1);
        l_run[h] += __shfl_xor_sync(0xffffffff, l_run[h], 2);
        if (t == 0) s_rowsum[wg * 64 + row0 + 8 * h] = l_run[h];
      }
      __syncthreads();
      float inv[2];
      bool empty[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float l = s_rowsum[row0 + 8 * h] + s_rowsum[64 + row0 + 8 * h];
        empty[h] = !(l > 0.f);  // no visible key (or NaN): output 0
        inv[h] = empty[h] ? 0.f : __fdividef(1.f, l);
        l_run[h] = l;
      }
      // Request facts needed only here are (re)loaded here: registers are the limit.
      const int n_pieces = p.num_splits[req + 1] - p.num_splits[req];
      const int split = req == begin_req ? rec[4] : p.num_splits[req];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = m_block * 64 + row0 + 8 * h;
        const QuerySpan span = query_span(p.cu_seqlens_q, req, (int)p.s_q);
        if (r >= span.count * hpk) continue;
        const int tok = span.first + r / hpk, hq = head_kv * hpk + r % hpk;
        if (n_pieces == 1) {  // the whole request is in this part: write the final result
          u16* dst = (u16*)p.out + req * p.o_batch_stride + tok * p.o_seq_stride + hq * p.o_head_stride +
                     wg * 256 + 2 * t;
#pragma unroll
          for (int j = 0; j < 32; ++j)
            *(u32*)(dst + 8 * j) = cvt_pack(o[4 * j + 2 * h] * inv[h], o[4 * j + 2 * h + 1] * inv[h], T{});
          if (wg == 0 && t == 0)
            p.lse[req * p.lse_batch_stride + hq * p.lse_head_stride + tok * p.lse_seq_stride] =
                empty[h] ? __int_as_float(0x7f800000) : (__log2f(l_run[h]) + m_run[h]) * kLn2;
        } else {  // one piece of a split request: fp32 partial, lse in the log2 domain
          const i64 prow = ((i64)split * p.h_kv + head_kv) * rows + r;
          float* dst = p.o_accum + prow * kDV + wg * 256 + 2 * t;
#pragma unroll
          for (int j = 0; j < 32; ++j)
            *(float2*)(dst + 8 * j) = make_float2(o[4 * j + 2 * h] * inv[h], o[4 * j + 2 * h + 1] * inv[h]);
          if (wg == 0 && t == 0)
            p.lse_accum[prow] = empty[h] ? -__int_as_float(0x7f800000) : __log2f(l_run[h]) + m_run[h];
        }
      }
    }
  }
}

}  // namespace flashmla
