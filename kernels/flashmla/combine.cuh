// Merge the fp32 partial outputs of split requests, and finalize requests with no work.
//
// One CTA per (output row, 128-column chunk); the row is (request, KV head, packed query
// row). A small batch splits each request over every SM, so a row can have ~130 pieces:
// the CTA first turns all their lse into weights in shared memory, then its 8 warps
// split the pieces (warp w takes w, w + 8, ...) with independent 16-byte loads, and the
// warps' sums meet in shared memory. Requests that ran as a single piece were written by
// the decode kernel and are skipped; requests with no piece (seqlen 0) get out = 0 and
// lse = +inf here, so every output is always written.
#pragma once
#include "params.cuh"

namespace flashmla {

constexpr int kCombineThreads = 256;
constexpr int kCombineWarps = kCombineThreads / 32;
constexpr int kCombineCols = 128;        // output columns per CTA: 4 per lane
constexpr int kMaxPieces = 1024 + 1;     // pieces of one request <= scheduler parts + 1

struct CombineSmem {
  float weight[kMaxPieces];                      // 2^(lse_k - lse_total) per piece
  float partial[kCombineWarps][kCombineCols];    // each warp's weighted sum over its pieces
  float warp_max[kCombineWarps], warp_sum[kCombineWarps];
};

template <typename T, int kDV>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(const __grid_constant__ CombineParams p) {
  static_assert(kDV % kCombineCols == 0, "a row splits into 128-column chunks");
  constexpr int kChunks = kDV / kCombineCols;
  __shared__ CombineSmem smem;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const i64 rows = p.rows;
  const i64 item = blockIdx.x / kChunks;
  const int col0 = (blockIdx.x % kChunks) * kCombineCols;
  const int req = (int)(item / (p.h_kv * rows));
  const int head_kv = (int)(item / rows % p.h_kv);
  const int r = (int)(item % rows);

  const int first = p.num_splits[req];
  const int n = p.num_splits[req + 1] - first;
  const QuerySpan span = query_span(p.cu_seqlens_q, req, (int)p.s_q);
  if (n == 1 || r >= span.count * p.heads_per_kv) return;  // written by decode, or no such row

  const int tok = span.first + r / (int)p.heads_per_kv;
  const int hq = head_kv * (int)p.heads_per_kv + r % (int)p.heads_per_kv;
  u16* out = (u16*)p.out + req * p.o_batch_stride + tok * p.o_seq_stride + hq * p.o_head_stride + col0;
  const float inf = __int_as_float(0x7f800000);
  auto piece_row = [&](int k) { return ((i64)(first + k) * p.h_kv + head_kv) * rows + r; };

  // Global log2-sum-exp over the pieces: every thread strides over them, then the block reduces.
  float mx = -inf;
  for (int k = tid; k < n; k += kCombineThreads) {
    smem.weight[k] = p.lse_accum[piece_row(k)];
    mx = fmaxf(mx, smem.weight[k]);
  }
  for (int d = 16; d > 0; d /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, d));
  if (lane == 0) smem.warp_max[warp] = mx;
  __syncthreads();
  mx = -inf;
#pragma unroll
  for (int w = 0; w < kCombineWarps; ++w) mx = fmaxf(mx, smem.warp_max[w]);
  float sum = 0.f;
  if (mx != -inf)
    for (int k = tid; k < n; k += kCombineThreads) sum += ex2(smem.weight[k] - mx);
  for (int d = 16; d > 0; d /= 2) sum += __shfl_xor_sync(0xffffffff, sum, d);
  if (lane == 0) smem.warp_sum[warp] = sum;
  __syncthreads();
  sum = 0.f;
#pragma unroll
  for (int w = 0; w < kCombineWarps; ++w) sum += smem.warp_sum[w];
  const bool empty = !(sum > 0.f);  // no piece, or no piece saw a key
  const float lse_total = empty ? inf : mx + __log2f(sum);
  for (int k = tid; k < n; k += kCombineThreads) smem.weight[k] = empty ? 0.f : ex2(smem.weight[k] - lse_total);
  __syncthreads();

  // Each warp: weighted sum of its pieces, 4 pieces' loads in flight at a time.
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  const float* src = p.o_accum + col0 + lane * 4;
  int k = warp;
  for (; k + 3 * kCombineWarps < n; k += 4 * kCombineWarps) {
    float4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = *(const float4*)(src + piece_row(k + u * kCombineWarps) * kDV);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const float w = smem.weight[k + u * kCombineWarps];
      acc[0] += w * v[u].x; acc[1] += w * v[u].y; acc[2] += w * v[u].z; acc[3] += w * v[u].w;
    }
  }
  for (; k < n; k += kCombineWarps) {
    const float4 v = *(const float4*)(src + piece_row(k) * kDV);
    const float w = smem.weight[k];
    acc[0] += w * v.x; acc[1] += w * v.y; acc[2] += w * v.z; acc[3] += w * v.w;
  }
  *(float4*)&smem.partial[warp][lane * 4] = make_float4(acc[0], acc[1], acc[2], acc[3]);
  __syncthreads();

  // Sum the warps' partials: threads 0..63 own columns 2 tid, 2 tid + 1 of the chunk.
  if (tid < kCombineCols / 2) {
    float o0 = 0.f, o1 = 0.f;
#pragma unroll
    for (int w = 0; w < kCombineWarps; ++w) {
      o0 += smem.partial[w][2 * tid];
      o1 += smem.partial[w][2 * tid + 1];
    }
    *(u32*)(out + 2 * tid) = cvt_pack(o0, o1, T{});
  }
  if (tid == 0 && col0 == 0)
    p.lse[req * p.lse_batch_stride + hq * p.lse_head_stride + tok * p.lse_seq_stride] = empty ? inf : lse_total * kLn2;
}

}  // namespace flashmla
