// Merge the fp32 partial outputs of split requests, and finalize requests with no work.
//
// Two grids, chosen on the host (api.merge_by_chunks: whichever merges faster for the
// pieces per request and the rows to merge; CombineParams.chunked):
// - few pieces (large batches, a request splits in 1-3 pieces): one warp merges one
//   whole output row, walking its pieces; a CTA holds 8 rows.
// - many pieces (small batches, a request splits over every SM, ~130 pieces): one CTA
//   merges one 128-column chunk of one row; its 8 warps take every 8th piece, each lane
//   loading 4 pieces before it adds any, so ~32 loads of a row are in flight per CTA,
//   and the warps' sums meet in shared memory.
// Partials are read once and then dropped from L2 (discard), so they cost no DRAM
// write-back. Requests that ran as a single piece were written by the decode kernel and are
// skipped; requests with no piece (seqlen 0) get out = 0 and lse = +inf here, so every
// output of an active request is always written. Padding requests (at or past the
// active count in the scheduler records) are never written.
//
// The kernel may start before the decode kernel has finished (programmatic dependent
// launch); every CTA that merges waits for it (griddepcontrol.wait) first.
#pragma once
#include "params.cuh"

namespace flashmla {

constexpr int kCombineThreads = 256;
constexpr int kCombineWarps = kCombineThreads / 32;  // rows per CTA in the few-pieces grid
constexpr int kChunkCols = 128;                      // columns per CTA in the many-pieces grid
constexpr int kPiecesInFlight = 4;                   // loads a lane issues before it adds

// The pieces of one output row and where its result goes.
struct CombineRow {
  const float* lse_accum;  // piece k's lse at lse_accum[k * piece_stride]
  const float* o_accum;    // piece k's row at o_accum + k * piece_stride * dv
  i64 piece_stride;
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

// Lane `lane` adds pieces k0, k0 + step, ... < n of kChunks consecutive 128-column
// chunks from `chunk` (its 4 columns of each at 4 * lane) into acc, weighted by
// exp2(lse_k - lse_total), the loads of kInFlight pieces (all their chunks) at a time.
template <int kInFlight, int kChunks>
__device__ __forceinline__ void sum_chunks(const CombineRow& row, int dv, int chunk, int k0, int n, int step,
                                           float lse_total, int lane, float4 (&acc)[kChunks]) {
#pragma unroll
  for (int c = 0; c < kChunks; ++c) acc[c] = make_float4(0.f, 0.f, 0.f, 0.f);
  const float* base = row.o_accum + chunk * kChunkCols + lane * 4;
  for (int k = k0; k < n; k += kInFlight * step) {
    float4 v[kInFlight][kChunks];
    float w[kInFlight];
#pragma unroll
    for (int i = 0; i < kInFlight; ++i) {
      const int kk = k + i * step;
      const bool live = kk < n;
#pragma unroll
      for (int c = 0; c < kChunks; ++c)
        v[i][c] = live ? *(const float4*)(base + kk * row.piece_stride * dv + c * kChunkCols)
                       : make_float4(0.f, 0.f, 0.f, 0.f);
      // 0 for dead slots, and (lse = -inf) for pieces that saw no key
      w[i] = live ? ex2(row.lse_accum[kk * row.piece_stride] - lse_total) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < kInFlight; ++i) {
      const float wi = w[i];
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        acc[c].x += wi * v[i][c].x; acc[c].y += wi * v[i][c].y;
        acc[c].z += wi * v[i][c].z; acc[c].w += wi * v[i][c].w;
      }
    }
    // Each partial line is read by this warp alone, once: drop it from L2 so that it is
    // never written back (the seesaw decode kernel stores partials evict_last to keep them
    // there until now). Lanes 8 l .. 8 l + 7 read one 128-byte line (the partials start
    // 128-byte aligned, api.py checks); the warp's loads have completed, since every lane
    // used its values above.
    if (lane % 8 == 0) {
#pragma unroll
      for (int i = 0; i < kInFlight; ++i) {
        const int kk = k + i * step;
        if (kk < n)
#pragma unroll
          for (int c = 0; c < kChunks; ++c) discard_l2_line(base + kk * row.piece_stride * dv + c * kChunkCols);
      }
    }
  }
}

__device__ __forceinline__ void write_lse(const CombineRow& row, bool empty, float lse_total) {
  *row.lse = empty ? __int_as_float(0x7f800000) : lse_total * kLn2;
}

// Few pieces: one warp merges one row on its own.
template <typename T, int kDV>
__device__ void combine_row_by_warp(const CombineRow& row, int n, int lane) {
  float mx = -__int_as_float(0x7f800000);
  for (int k = lane; k < n; k += 32) mx = fmaxf(mx, row.lse_accum[k * row.piece_stride]);
  mx = warp_max(mx);
  float sum = 0.f;
  if (mx != -__int_as_float(0x7f800000))
    for (int k = lane; k < n; k += 32) sum += ex2(row.lse_accum[k * row.piece_stride] - mx);
  sum = warp_sum(sum);
  const bool empty = !(sum > 0.f);  // no piece, or no piece saw a key
  const float lse_total = mx + __log2f(sum);
  // All four chunks of two pieces in flight at once: a split request has 2-3 pieces, so
  // one or two L2 round trips per row instead of one per chunk (varlen b = 128: the merge
  // after the decode kernel took 17 us, now 13).
  constexpr int kChunks = kDV / kChunkCols;
  float4 acc[kChunks];
  sum_chunks<2>(row, kDV, 0, 0, empty ? 0 : n, 1, lse_total, lane, acc);
#pragma unroll
  for (int c = 0; c < kChunks; ++c)
    *(uint2*)(row.out + c * kChunkCols + lane * 4) =
        make_uint2(cvt_pack(acc[c].x, acc[c].y, T{}), cvt_pack(acc[c].z, acc[c].w, T{}));
  if (lane == 0) write_lse(row, empty, lse_total);
}

// Many pieces: the CTA's 8 warps merge one 128-column chunk of one row.
template <typename T, int kDV>
__device__ void combine_chunk_by_cta(const CombineRow& row, int n, int chunk, int tid) {
  __shared__ float4 partial[kCombineWarps][32];
  __shared__ float warp_stat[2][kCombineWarps];
  const int warp = tid / 32, lane = tid % 32;
  const float inf = __int_as_float(0x7f800000);
  // log2-sum-exp over the pieces: every thread strides over them, then the CTA reduces.
  float mx = -inf;
  for (int k = tid; k < n; k += kCombineThreads) mx = fmaxf(mx, row.lse_accum[k * row.piece_stride]);
  mx = warp_max(mx);
  if (lane == 0) warp_stat[0][warp] = mx;
  __syncthreads();
  mx = -inf;
#pragma unroll
  for (int w = 0; w < kCombineWarps; ++w) mx = fmaxf(mx, warp_stat[0][w]);
  float sum = 0.f;
  if (mx != -inf)
    for (int k = tid; k < n; k += kCombineThreads) sum += ex2(row.lse_accum[k * row.piece_stride] - mx);
  sum = warp_sum(sum);
  if (lane == 0) warp_stat[1][warp] = sum;
  __syncthreads();
  sum = 0.f;
#pragma unroll
  for (int w = 0; w < kCombineWarps; ++w) sum += warp_stat[1][w];
  const bool empty = !(sum > 0.f);
  const float lse_total = mx + __log2f(sum);

  float4 acc[1];
  sum_chunks<kPiecesInFlight>(row, kDV, chunk, warp, empty ? 0 : n, kCombineWarps, lse_total, lane, acc);
  partial[warp][lane] = acc[0];
  __syncthreads();
  if (tid < kChunkCols / 2) {  // thread t owns columns 2t, 2t + 1 of the chunk
    const float* flat = reinterpret_cast<const float*>(&partial[0][0]);
    float o0 = 0.f, o1 = 0.f;
#pragma unroll
    for (int w = 0; w < kCombineWarps; ++w) {
      o0 += flat[w * kChunkCols + 2 * tid];
      o1 += flat[w * kChunkCols + 2 * tid + 1];
    }
    *(u32*)(row.out + chunk * kChunkCols + 2 * tid) = cvt_pack(o0, o1, T{});
  }
  if (tid == 0 && chunk == 0) write_lse(row, empty, lse_total);
}

template <typename T, int kDV>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(const __grid_constant__ CombineParams p) {
  static_assert(kDV % kChunkCols == 0, "a lane owns 4 columns of each 128-column chunk");
  constexpr int kChunks = kDV / kChunkCols;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const i64 rows = p.rows;
  // Few pieces: CTA = (request, KV head, group of 8 rows), warp = row.
  // Many pieces: CTA = (request, KV head, row, chunk).
  const i64 per_head = p.chunked ? rows * kChunks : (rows + kCombineWarps - 1) / kCombineWarps;
  const int req = (int)(blockIdx.x / (p.h_kv * per_head));
  const int head_kv = (int)(blockIdx.x / per_head % p.h_kv);
  const int item = (int)(blockIdx.x % per_head);
  const int r = p.chunked ? item / kChunks : item * kCombineWarps + warp;

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
  const int cta_first_row = p.chunked ? r : item * kCombineWarps;
  const bool idle = n == 1 || req >= p.sched[5] || cta_first_row >= req_rows;
  if (idle && blockIdx.x != 0) return;
  grid_dependency_wait();  // the decode kernel has finished: its partials are visible
  // Uniform per CTA in the many-pieces grid, so the early return skips no barrier.
  if (idle || r >= req_rows) return;  // written by decode, or no such row

  const int tok = span.first + r / (int)p.heads_per_kv;
  const int hq = head_kv * (int)p.heads_per_kv + r % (int)p.heads_per_kv;
  const i64 piece0 = ((i64)first * p.h_kv + head_kv) * rows + r;
  const CombineRow row{p.lse_accum + piece0, p.o_accum + piece0 * kDV, p.h_kv * rows,
                       (u16*)p.out + req * p.o_batch_stride + tok * p.o_seq_stride + hq * p.o_head_stride,
                       p.lse + req * p.lse_batch_stride + hq * p.lse_head_stride + tok * p.lse_seq_stride};
  if (p.chunked)
    combine_chunk_by_cta<T, kDV>(row, n, item % kChunks, tid);
  else
    combine_row_by_warp<T, kDV>(row, n, lane);
}

}  // namespace flashmla
