// Merge the fp32 partial outputs of split requests, and finalize requests with no work.
//
// Two grids, chosen on the host (api.merge_grid: whichever merges faster for the pieces
// per request and the rows to merge), a template argument each:
// - few pieces (large batches, a request splits in 1-5 pieces; kCtaChunks = 0): one
//   warp merges one whole output row, walking its pieces two at a time; 8 rows a CTA.
// - many pieces (small batches, a request splits over up to every SM, ~130 pieces):
//   a CTA merges kCtaChunks 128-column chunks of one row (1, 2 or 4: the most that keep
//   all of a request's pieces in flight at once); its 8 (or 16) warps take every 8th (16th)
//   piece, and their sums meet in shared memory.
// Either way a warp issues the loads of a round of pieces, and their lse, before it
// waits for any, and only then walks the row's lse for the total (merge_pieces).
// Partials are read once and then dropped from L2 (discard), so they cost no DRAM
// write-back. Requests that ran as a single piece were written by the decode kernel and are
// skipped; requests with no piece (seqlen 0) get out = 0 and lse = +inf here, so every
// output of an active request is always written. Padding requests (at or past the
// active count in the scheduler records) are never written.
//
// The kernel starts while the decode kernel runs (programmatic dependent launch) and gets
// SMs as decode CTAs exit. In the few-pieces grid a CTA merges as soon as its rows' pieces
// are stored (their flags, params.cuh), so merges of requests whose parts ended early
// overlap the decode kernel's last CTAs (b = 128 varlen h64 4K-8K: merge tail 9-10 ->
// 3-4 us, steps 2-4 us shorter); in the many-pieces grid every piece ends with the decode
// grid, and its CTAs wait for that (griddepcontrol.wait; flags cost b = 1 h16 32K 6 us).
// A flag is read with ld.acquire.gpu, after which (and the CTA barrier) plain loads see
// the partials it guards: the acquire also drops this SM's L1 (CCTL.IVALL in the SASS),
// where another CTA may have cached a line of lse of two pieces (below 32 rows) before
// the second was written.
#pragma once
#include "params.cuh"

namespace flashmla {

constexpr int kCombineThreads = 256;
constexpr int kCombineWarps = kCombineThreads / 32;  // rows per CTA in the few-pieces grid
constexpr int kChunkCols = 128;                      // a warp's columns per 16-byte load
// Many-pieces grid: 16-byte loads a lane holds in flight, for kWarps warps a CTA. 8 warps
// x 18 (144 one-chunk pieces of a row in one round), 2 CTAs an SM; or, where the grid has
// an SM for every CTA (one chunk a CTA, b = 1 at up to 32 rows), 16 warps x 10: at b = 1 a
// warp's chain of dependent work sets the merge's time (8 warps issued ~1300 instructions
// each, one every ~6 cycles; PERF.md v16), and 16 warps halve each one's pieces.
template <int kWarps>
constexpr int kMergeLoads = kWarps == 16 ? 10 : 18;

// The pieces of one output row.
struct CombineRow {
  const float* lse_accum;  // piece k's lse at lse_accum[k * piece_stride]
  const float* o_accum;    // piece k's row at o_accum + k * piece_stride * dv
  int piece_stride;        // h_kv * rows (an int: one register less in the merge loops)
};
// Where a merged row goes (combine_kernel works it out before or after the merge).
struct CombineDest {
  u16* out;
  float* lse;
};

__device__ __forceinline__ float warp_max(float x) {
  for (int d = 16; d > 0; d /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, d));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int d = 16; d > 0; d /= 2) x += __shfl_xor_sync(0xffffffff, x, d);
  return x;
}

// The row's total lse (log2 domain) over its n pieces, by one warp: lanes take pieces
// lane + 32 j, kLoads at a time (one round trip up to 32 kLoads pieces; the second pass
// hits L1). empty: no piece saw a key.
template <int kLoads>
__device__ __forceinline__ float total_lse(const CombineRow& row, int n, int lane, bool& empty) {
  const float inf = __int_as_float(0x7f800000);
  const i64 stride = 32 * row.piece_stride;  // lane's next piece
  // kLoads lse values from piece k1 on, lane's pieces (-inf past n)
  auto load = [&](int k1, float (&l)[kLoads]) {
    const float* p = row.lse_accum + (i64)k1 * row.piece_stride;
#pragma unroll
    for (int j = 0; j < kLoads; ++j, p += stride) l[j] = k1 + 32 * j < n ? *p : -inf;
  };
  float mx = -inf;
#pragma unroll 1
  for (int k1 = lane; k1 < n; k1 += 32 * kLoads) {
    float l[kLoads];
    load(k1, l);
#pragma unroll
    for (int j = 0; j < kLoads; ++j) mx = fmaxf(mx, l[j]);
  }
  mx = warp_max(mx);
  float sum = 0.f;
  if (mx != -inf)
#pragma unroll 1
    for (int k1 = lane; k1 < n; k1 += 32 * kLoads) {
      float l[kLoads];
      load(k1, l);
#pragma unroll
      for (int j = 0; j < kLoads; ++j) sum += ex2(l[j] - mx);
    }
  sum = warp_sum(sum);
  empty = !(sum > 0.f);
  return mx + __log2f(sum);
}

// One warp adds pieces k0, k0 + step, ... < n of kChunks 128-column chunks from `chunk0`
// (lane: 4 columns of each, at 4 lane) into acc, weighted by 2^(lse_k - total), in
// rounds of kSlots pieces. A round issues all its loads (data and lse) before it waits
// for any; in the first round the warp then takes the row's total lse, those loads in
// flight with the data, so one L2 round trip merges up to kSlots pieces. (v14 read the
// lse first and kept 4 pieces in flight a lane: ~5 round trips for b = 1's 132 pieces.)
// Returns the total lse; empty as total_lse's.
template <int kSlots, int kChunks, int kLseLoads, int kDV>
__device__ __forceinline__ float merge_pieces(const CombineRow& row, int n, int chunk0, int k0, int step, int lane,
                                              float4 (&acc)[kChunks], bool& empty) {
  const float inf = __int_as_float(0x7f800000);
  // Slot i of a round reads piece k1 + i step: pointers advance by one slot's stride
  // (64-bit multiplies per slot were a third of this loop's instructions).
  const i64 lse_step = (i64)step * row.piece_stride, o_step = lse_step * kDV;
  const float* o_base = row.o_accum + chunk0 * kChunkCols + lane * 4;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) acc[c] = make_float4(0.f, 0.f, 0.f, 0.f);
  float lse_total = 0.f;
  empty = true;
  for (int k1 = k0; k1 < n; k1 += kSlots * step) {
    float4 v[kSlots][kChunks];
    float lse[kSlots];
    const float* o = o_base + (i64)k1 * row.piece_stride * kDV;
    const float* l = row.lse_accum + (i64)k1 * row.piece_stride;
#pragma unroll
    for (int i = 0; i < kSlots; ++i, o += o_step, l += lse_step) {
      const bool live = k1 + i * step < n;
#pragma unroll
      for (int c = 0; c < kChunks; ++c)
        v[i][c] = live ? *(const float4*)(o + c * kChunkCols) : make_float4(0.f, 0.f, 0.f, 0.f);
      lse[i] = live ? *l : -inf;
    }
    if (k1 == k0) lse_total = total_lse<kLseLoads>(row, n, lane, empty);
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      const float w = empty ? 0.f : ex2(lse[i] - lse_total);  // 0 for dead slots and keyless pieces
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        acc[c].x += w * v[i][c].x; acc[c].y += w * v[i][c].y;
        acc[c].z += w * v[i][c].z; acc[c].w += w * v[i][c].w;
      }
    }
    // Each partial line is read by this warp alone, once: drop it from L2 so that it is
    // never written back (the seesaw decode kernel stores partials evict_last to keep them
    // there until now). Lanes 8 l .. 8 l + 7 read one 128-byte line (the partials start
    // 128-byte aligned, api.py checks); the warp's loads have completed, since every lane
    // used its values above. Addresses recomputed (opaque): held from the loads, they
    // would cost 2 registers a slot.
    if (lane % 8 == 0) {
      const float* o = o_base + (i64)(int)opaque(k1) * row.piece_stride * kDV;
#pragma unroll
      for (int i = 0; i < kSlots; ++i, o += o_step)
        if (k1 + i * step < n)
#pragma unroll
          for (int c = 0; c < kChunks; ++c) discard_l2_line(o + c * kChunkCols);
    }
  }
  return lse_total;
}

__device__ __forceinline__ void write_lse(const CombineDest& dest, bool empty, float lse_total) {
  *dest.lse = empty ? __int_as_float(0x7f800000) : lse_total * kLn2;
}

// Few pieces: one warp merges one row on its own, all four chunks of two pieces in
// flight at once (a split request has 2-3 pieces); dest_of() locates the row after it.
template <typename T, int kDV, typename Dest>
__device__ void combine_row_by_warp(const CombineRow& row, int n, int lane, Dest dest_of) {
  constexpr int kChunks = kDV / kChunkCols;
  float4 acc[kChunks];
  bool empty;
  const float lse_total = merge_pieces<2, kChunks, 1, kDV>(row, n, 0, 0, 1, lane, acc, empty);
  const CombineDest dest = dest_of();
#pragma unroll
  for (int c = 0; c < kChunks; ++c)
    *(uint2*)(dest.out + c * kChunkCols + lane * 4) =
        make_uint2(cvt_pack(acc[c].x, acc[c].y, T{}), cvt_pack(acc[c].z, acc[c].w, T{}));
  if (lane == 0) write_lse(dest, empty, lse_total);
}

// Many pieces: the CTA's kWarps warps merge kChunks 128-column chunks of one row, warp w
// pieces w, w + kWarps, ...; the warps' sums meet in shared memory.
template <typename T, int kDV, int kChunks, int kWarps>
__device__ void combine_chunks_by_cta(const CombineRow& row, int n, int chunk0, int tid, const CombineDest& dest) {
  __shared__ float4 partial[kWarps][kChunks][32];
  const int warp = tid / 32, lane = tid % 32;
  float4 acc[kChunks];
  bool empty;
  const float lse_total =
      merge_pieces<kMergeLoads<kWarps> / kChunks, kChunks, 5, kDV>(row, n, chunk0, warp, kWarps, lane, acc, empty);
#pragma unroll
  for (int c = 0; c < kChunks; ++c) partial[warp][c][lane] = acc[c];
  __syncthreads();
  if (tid < kChunks * kChunkCols / 2) {  // thread t owns columns 2t, 2t + 1 of the CTA's chunks
    const int c = tid / (kChunkCols / 2), col = 2 * (tid % (kChunkCols / 2));
    float o0 = 0.f, o1 = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float* flat = reinterpret_cast<const float*>(&partial[w][c][0]);
      o0 += flat[col];
      o1 += flat[col + 1];
    }
    *(u32*)(dest.out + (chunk0 + c) * kChunkCols + col) = cvt_pack(o0, o1, T{});
  }
  // Warps without a piece (n < kWarps) skip merge_pieces' rounds; warp 0 has piece 0.
  if (tid == 0 && chunk0 == 0) write_lse(dest, empty, lse_total);
}

// Wait until the decode CTAs of the row's n pieces have stored them (params.cuh, piece
// flags): warp 0 polls them, lane k piece k (then k + 32, ...), and the barrier after
// lets the other warps read what the flags guard (ld.acquire.gpu also drops this SM's L1).
// The decode grid holds every SM it needs before this grid starts, so the wait ends.
__device__ __forceinline__ void wait_for_pieces(const CombineParams& p, int first, int n, int head_kv, int row,
                                                int warp, int lane) {
  if (warp == 0) {
    const int m_blocks = (int)((p.rows + p.decode_tile_rows - 1) / p.decode_tile_rows);
    const u32* flag = p.piece_done + piece_flag(first, head_kv, (int)p.h_kv, row / (int)p.decode_tile_rows, m_blocks);
    const int stride = (int)p.h_kv * m_blocks;  // the next piece's flag
    for (int k = lane; k - lane < n; k += 32)
      while (!__all_sync(0xffffffff, k >= n || ld_acquire_gpu(flag + k * stride) == 1)) __nanosleep(200);
  }
  __syncthreads();
}

// kCtaChunks = 0: the few-pieces grid, CTA = (request, KV head, group of 8 rows), warp =
// row, at 64-75 registers (3-4 CTAs an SM). kCtaChunks > 0: the many-pieces grid, CTA =
// (request, KV head, row, group of kCtaChunks 128-column chunks) of kMergeWarps warps,
// held to 128 registers (2 CTAs an SM at 8 warps, 1 at 16) for the loads in flight.
template <typename T, int kDV, int kCtaChunks, int kMergeWarps = 8>
__global__ void __launch_bounds__(kCtaChunks > 0 ? 32 * kMergeWarps : kCombineThreads,
                                  kCtaChunks > 0 ? 16 / kMergeWarps : 0)
    combine_kernel(const __grid_constant__ CombineParams p) {
  static_assert(kDV % kChunkCols == 0, "a lane owns 4 columns of each 128-column chunk");
  constexpr int kChunks = kDV / kChunkCols;
  constexpr bool kByCta = kCtaChunks > 0;
  static_assert(!kByCta || kChunks % kCtaChunks == 0, "a row's chunks split evenly over its CTAs");
  static_assert(kMergeWarps == 8 || (kMergeWarps == 16 && kCtaChunks == 1), "8 warps, or 16 for one chunk a CTA");
  constexpr int kCtasPerRow = kByCta ? kChunks / kCtaChunks : 1;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const i64 rows = p.rows;
  // The CTA's request, KV head and item (a row, or a group of 8), and this warp's row.
  auto locate = [&](u32 block, int warp, int& req, int& head_kv, int& item, int& r) {
    const i64 per_head = kByCta ? p.rows * kCtasPerRow : (p.rows + kCombineWarps - 1) / kCombineWarps;
    req = (int)(block / (p.h_kv * per_head));
    head_kv = (int)(block / per_head % p.h_kv);
    item = (int)(block % per_head);
    r = kByCta ? item / kCtasPerRow : item * kCombineWarps + warp;
  };
  int req, head_kv, item, r;
  locate(blockIdx.x, warp, req, head_kv, item, r);

  // Before the wait only the schedule and cu_seqlens_q are read: both were final before
  // the decode kernel started.
  const int first = p.num_splits[req];
  const int n = p.num_splits[req + 1] - first;
  const QuerySpan span = query_span(p.cu_seqlens_q, req, (int)p.s_q);
  const int req_rows = span.count * (int)p.heads_per_kv;
  // CTAs with nothing to merge (a request the decode kernel wrote whole, padding of a batch
  // captured larger, rows past the request's) leave at once, on SMs the decode kernel has
  // left, instead of after it (FlashMLA's merge does the same): with whole requests its
  // tail after the decode kernel was ~4 us of empty CTAs. CTA 0 always waits, so this grid
  // still completes only after the decode kernel: work queued after it sees all outputs.
  const int cta_first_row = kByCta ? r : item * kCombineWarps;
  const bool idle = n == 1 || req >= p.sched[5] || cta_first_row >= req_rows;
  if (blockIdx.x == 0 || (kByCta && !idle)) grid_dependency_wait();  // the decode kernel has finished
  if (idle) return;
  if (!kByCta) wait_for_pieces(p, first, n, head_kv, cta_first_row, warp, lane);  // their partials are visible
  if (r >= req_rows) return;  // no such row (a warp of the few-pieces grid)

  const i64 piece0 = ((i64)first * p.h_kv + head_kv) * rows + r;
  const CombineRow row{p.lse_accum + piece0, p.o_accum + piece0 * kDV, (int)(p.h_kv * rows)};
  // Where row r of request req goes.
  auto dest_at = [&](int req, int head_kv, int r, const QuerySpan& span) {
    const int tok = span.first + r / (int)p.heads_per_kv;
    const int hq = head_kv * (int)p.heads_per_kv + r % (int)p.heads_per_kv;
    return CombineDest{(u16*)p.out + req * p.o_batch_stride + tok * p.o_seq_stride + hq * p.o_head_stride,
                       p.lse + req * p.lse_batch_stride + hq * p.lse_head_stride + tok * p.lse_seq_stride};
  };
  if constexpr (kByCta) {
    // Worked out before the merge: its span came before the wait, so the stores wait for no
    // load after it (located after it, the b = 1 and 4 merge tails grew 0.9-1.8 us).
    combine_chunks_by_cta<T, kDV, kCtaChunks, kMergeWarps>(row, n, item % kCtasPerRow * kCtaChunks, tid,
                                                           dest_at(req, head_kv, r, span));
  } else {
    // Located again after the merge from the block index (opaque: not held across it) and
    // the reloaded span: held, these pointers made the few-pieces grid spill or drop to 2
    // CTAs an SM.
    combine_row_by_warp<T, kDV>(row, n, lane, [&]() {
      int req, head_kv, item, r;
      locate(opaque(blockIdx.x), (int)opaque(threadIdx.x) / 32, req, head_kv, item, r);
      return dest_at(req, head_kv, r, query_span(p.cu_seqlens_q, req, (int)p.s_q));
    });
  }
}

}  // namespace flashmla
