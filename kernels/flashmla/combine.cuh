// Merge the fp32 partial outputs of split requests, and finalize requests with no work.
//
// One CTA per output row (request, KV head, packed query row). Its 8 warps split the
// row's pieces (warp w takes pieces w, w + 8, ...), so a request split over 132 parts
// (small batches) keeps 8 warps x 4 loads per lane in flight instead of walking the
// pieces one after another; the warps' sums meet in shared memory. Requests that ran
// as a single piece were written by the decode kernel and are skipped; requests with no
// piece (seqlen 0) get out = 0 and lse = +inf here, so every output is always written.
#pragma once
#include "params.cuh"

namespace flashmla {

constexpr int kCombineThreads = 256;
constexpr int kCombineWarps = kCombineThreads / 32;

template <int kDV>
struct CombineSmem {
  float partial[kCombineWarps][kDV];  // each warp's weighted sum over its pieces
  float warp_max[kCombineWarps], warp_sum[kCombineWarps];
};

template <typename T, int kDV>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(const __grid_constant__ CombineParams p) {
  static_assert(kDV % 128 == 0, "each lane owns kDV / 128 runs of 4 columns");
  constexpr int kRuns = kDV / 128;
  __shared__ CombineSmem<kDV> smem;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const i64 rows = p.rows;
  const i64 item = blockIdx.x;
  const int req = (int)(item / (p.h_kv * rows));
  const int head_kv = (int)(item / rows % p.h_kv);
  const int r = (int)(item % rows);

  const int first = p.num_splits[req];
  const int n = p.num_splits[req + 1] - first;
  const QuerySpan span = query_span(p.cu_seqlens_q, req, (int)p.s_q);
  if (n == 1 || r >= span.count * p.heads_per_kv) return;  // written by decode, or no such row

  const int tok = span.first + r / (int)p.heads_per_kv;
  const int hq = head_kv * (int)p.heads_per_kv + r % (int)p.heads_per_kv;
  u16* out = (u16*)p.out + req * p.o_batch_stride + tok * p.o_seq_stride + hq * p.o_head_stride;
  const float inf = __int_as_float(0x7f800000);
  auto piece_row = [&](int k) { return ((i64)(first + k) * p.h_kv + head_kv) * rows + r; };

  // Global log2-sum-exp over the pieces: every thread strides over them, then the block reduces.
  float mx = -inf;
  for (int k = tid; k < n; k += kCombineThreads) mx = fmaxf(mx, p.lse_accum[piece_row(k)]);
  for (int d = 16; d > 0; d /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, d));
  if (lane == 0) smem.warp_max[warp] = mx;
  __syncthreads();
  mx = -inf;
#pragma unroll
  for (int w = 0; w < kCombineWarps; ++w) mx = fmaxf(mx, smem.warp_max[w]);
  float sum = 0.f;
  if (mx != -inf)
    for (int k = tid; k < n; k += kCombineThreads) sum += ex2(p.lse_accum[piece_row(k)] - mx);
  for (int d = 16; d > 0; d /= 2) sum += __shfl_xor_sync(0xffffffff, sum, d);
  if (lane == 0) smem.warp_sum[warp] = sum;
  __syncthreads();
  sum = 0.f;
#pragma unroll
  for (int w = 0; w < kCombineWarps; ++w) sum += smem.warp_sum[w];
  const bool empty = !(sum > 0.f);  // no piece, or no piece saw a key
  const float lse_total = empty ? inf : mx + __log2f(sum);

  // Each warp: weighted sum of its pieces; lane owns columns 4 * lane + 128 * c.
  float acc[kRuns][4] = {};
  if (!empty) {
    for (int k = warp; k < n; k += kCombineWarps) {
      const float w = ex2(p.lse_accum[piece_row(k)] - lse_total);
      const float* src = p.o_accum + piece_row(k) * kDV;
#pragma unroll
      for (int c = 0; c < kRuns; ++c) {
        const float4 v = *(const float4*)(src + c * 128 + lane * 4);
        acc[c][0] += w * v.x; acc[c][1] += w * v.y; acc[c][2] += w * v.z; acc[c][3] += w * v.w;
      }
    }
  }
#pragma unroll
  for (int c = 0; c < kRuns; ++c)
    *(float4*)&smem.partial[warp][c * 128 + lane * 4] = make_float4(acc[c][0], acc[c][1], acc[c][2], acc[c][3]);
  __syncthreads();

  // Sum the warps' partials: thread tid owns columns 2 tid, 2 tid + 1 (kDV / 2 threads).
  for (int col = 2 * tid; col < kDV; col += 2 * kCombineThreads) {
    float o0 = 0.f, o1 = 0.f;
#pragma unroll
    for (int w = 0; w < kCombineWarps; ++w) {
      o0 += smem.partial[w][col];
      o1 += smem.partial[w][col + 1];
    }
    *(u32*)(out + col) = cvt_pack(o0, o1, T{});
  }
  if (tid == 0)
    p.lse[req * p.lse_batch_stride + hq * p.lse_head_stride + tok * p.lse_seq_stride] = empty ? inf : lse_total * kLn2;
}

}  // namespace flashmla
