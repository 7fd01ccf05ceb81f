// Merge the fp32 partial outputs of split requests, and finalize requests with no work.
//
// One CTA per (request, KV head, group of 8 packed query rows). How a row is merged
// depends on its request's piece count n, the same for the whole CTA:
// - n <= kWarpPieces (large batches: a request splits into a few pieces at most): each
//   warp merges one row on its own, walking its pieces;
// - more (small batches split a request over every SM, ~130 pieces): the 8 warps merge
//   the rows one after another, each warp taking every 8th piece, and their sums meet
//   in shared memory, so ~8x more loads are in flight per row.
// Requests that ran as a single piece were written by the decode kernel and are
// skipped; requests with no piece (seqlen 0) get out = 0 and lse = +inf here, so every
// output is always written.
#pragma once
#include "params.cuh"

namespace flashmla {

constexpr int kCombineThreads = 256;
constexpr int kCombineWarps = kCombineThreads / 32;  // = rows per CTA
constexpr int kWarpPieces = 16;

template <int kDV>
struct CombineSmem {
  float partial[kCombineWarps][kDV];  // each warp's weighted sum over its pieces (float4 stores: first)
  float warp_max[kCombineWarps], warp_sum[kCombineWarps];
};

// The pieces of one output row and where its result goes.
struct CombineRow {
  const float* lse_accum;  // piece k's lse at lse_accum[k * piece_stride]
  const float* o_accum;    // piece k's row at o_accum + k * piece_stride * dv
  i64 piece_stride;
  u16* out;
  float* lse;
};

// Lanes stride over pieces [k0, n) by `step`, accumulating fp32 columns 4 * lane + 128 * c.
template <int kDV>
__device__ __forceinline__ void accumulate_pieces(const CombineRow& row, int k0, int n, int step, float lse_total,
                                                  float (&acc)[kDV / 128][4], int lane) {
  for (int k = k0; k < n; k += step) {
    const float w = ex2(row.lse_accum[k * row.piece_stride] - lse_total);
    const float* src = row.o_accum + k * row.piece_stride * kDV;
#pragma unroll
    for (int c = 0; c < kDV / 128; ++c) {
      const float4 v = *(const float4*)(src + c * 128 + lane * 4);
      acc[c][0] += w * v.x; acc[c][1] += w * v.y; acc[c][2] += w * v.z; acc[c][3] += w * v.w;
    }
  }
}

__device__ __forceinline__ void write_lse(const CombineRow& row, bool empty, float lse_total) {
  *row.lse = empty ? __int_as_float(0x7f800000) : lse_total * kLn2;
}

// One warp merges one row.
template <typename T, int kDV>
__device__ void combine_row_by_warp(const CombineRow& row, int n, int lane) {
  const float inf = __int_as_float(0x7f800000);
  float mx = -inf;
  for (int k = lane; k < n; k += 32) mx = fmaxf(mx, row.lse_accum[k * row.piece_stride]);
  for (int d = 16; d > 0; d /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, d));
  float sum = 0.f;
  if (mx != -inf)
    for (int k = lane; k < n; k += 32) sum += ex2(row.lse_accum[k * row.piece_stride] - mx);
  for (int d = 16; d > 0; d /= 2) sum += __shfl_xor_sync(0xffffffff, sum, d);
  const bool empty = !(sum > 0.f);  // no piece, or no piece saw a key
  const float lse_total = mx + __log2f(sum);
  float acc[kDV / 128][4] = {};
  if (!empty) accumulate_pieces<kDV>(row, 0, n, 1, lse_total, acc, lane);
#pragma unroll
  for (int c = 0; c < kDV / 128; ++c)
    *(uint2*)(row.out + c * 128 + lane * 4) =
        make_uint2(cvt_pack(acc[c][0], acc[c][1], T{}), cvt_pack(acc[c][2], acc[c][3], T{}));
  if (lane == 0) write_lse(row, empty, lse_total);
}

// All warps of the CTA merge one row (called by every thread, uniformly).
template <typename T, int kDV>
__device__ void combine_row_by_cta(const CombineRow& row, int n, CombineSmem<kDV>& smem, int tid) {
  const int warp = tid / 32, lane = tid % 32;
  const float inf = __int_as_float(0x7f800000);
  float mx = -inf;
  for (int k = tid; k < n; k += kCombineThreads) mx = fmaxf(mx, row.lse_accum[k * row.piece_stride]);
  for (int d = 16; d > 0; d /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, d));
  if (lane == 0) smem.warp_max[warp] = mx;
  __syncthreads();
  mx = -inf;
#pragma unroll
  for (int w = 0; w < kCombineWarps; ++w) mx = fmaxf(mx, smem.warp_max[w]);
  float sum = 0.f;
  if (mx != -inf)
    for (int k = tid; k < n; k += kCombineThreads) sum += ex2(row.lse_accum[k * row.piece_stride] - mx);
  for (int d = 16; d > 0; d /= 2) sum += __shfl_xor_sync(0xffffffff, sum, d);
  if (lane == 0) smem.warp_sum[warp] = sum;
  __syncthreads();
  sum = 0.f;
#pragma unroll
  for (int w = 0; w < kCombineWarps; ++w) sum += smem.warp_sum[w];
  const bool empty = !(sum > 0.f);
  const float lse_total = mx + __log2f(sum);
  float acc[kDV / 128][4] = {};
  if (!empty) accumulate_pieces<kDV>(row, warp, n, kCombineWarps, lse_total, acc, lane);
#pragma unroll
  for (int c = 0; c < kDV / 128; ++c)
    *(float4*)&smem.partial[warp][c * 128 + lane * 4] = make_float4(acc[c][0], acc[c][1], acc[c][2], acc[c][3]);
  __syncthreads();
  for (int col = 2 * tid; col < kDV; col += 2 * kCombineThreads) {  // columns 2 tid, 2 tid + 1
    float o0 = 0.f, o1 = 0.f;
#pragma unroll
    for (int w = 0; w < kCombineWarps; ++w) {
      o0 += smem.partial[w][col];
      o1 += smem.partial[w][col + 1];
    }
    *(u32*)(row.out + col) = cvt_pack(o0, o1, T{});
  }
  if (tid == 0) write_lse(row, empty, lse_total);
  __syncthreads();  // smem is reused by the next row
}

template <typename T, int kDV>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(const __grid_constant__ CombineParams p) {
  static_assert(kDV % 128 == 0, "each lane owns kDV / 128 runs of 4 columns");
  __shared__ __align__(16) CombineSmem<kDV> smem;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const i64 rows = p.rows, groups = (rows + kCombineWarps - 1) / kCombineWarps;
  const int req = (int)(blockIdx.x / (p.h_kv * groups));
  const int head_kv = (int)(blockIdx.x / groups % p.h_kv);
  const int r0 = (int)(blockIdx.x % groups) * kCombineWarps;

  const int first = p.num_splits[req];
  const int n = p.num_splits[req + 1] - first;
  const QuerySpan span = query_span(p.cu_seqlens_q, req, (int)p.s_q);
  const int req_rows = span.count * (int)p.heads_per_kv;
  if (n == 1 || r0 >= req_rows) return;  // written by decode, or no such rows

  auto row_of = [&](int r) {
    const int tok = span.first + r / (int)p.heads_per_kv;
    const int hq = head_kv * (int)p.heads_per_kv + r % (int)p.heads_per_kv;
    const i64 piece0 = ((i64)first * p.h_kv + head_kv) * rows + r;
    return CombineRow{p.lse_accum + piece0, p.o_accum + piece0 * kDV, p.h_kv * rows,
                      (u16*)p.out + req * p.o_batch_stride + tok * p.o_seq_stride + hq * p.o_head_stride,
                      p.lse + req * p.lse_batch_stride + hq * p.lse_head_stride + tok * p.lse_seq_stride};
  };
  if (n <= kWarpPieces) {
    if (r0 + warp < req_rows) combine_row_by_warp<T, kDV>(row_of(r0 + warp), n, lane);
  } else {
    for (int r = r0; r < min(r0 + kCombineWarps, req_rows); ++r) combine_row_by_cta<T, kDV>(row_of(r), n, smem, tid);
  }
}

}  // namespace flashmla
