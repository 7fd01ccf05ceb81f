// Merge the fp32 partial outputs of split requests, and finalize requests with no work.
//
// One warp per output row (request, KV head, packed query row). Requests that ran as a
// single piece were written by the decode kernel and are skipped; requests with no
// piece (seqlen 0) get out = 0 and lse = +inf here, so every output is always written.
#pragma once
#include "params.cuh"

namespace flashmla {

constexpr int kCombineThreads = 256;

template <typename T, int kDV>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(const __grid_constant__ CombineParams p) {
  static_assert(kDV % 128 == 0, "each lane owns kDV / 128 runs of 4 columns");
  constexpr int kRuns = kDV / 128;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const i64 rows = p.rows;
  const i64 item = (i64)blockIdx.x * (kCombineThreads / 32) + warp;
  if (item >= p.batch * p.h_kv * rows) return;
  const int req = (int)(item / (p.h_kv * rows));
  const int head_kv = (int)(item / rows % p.h_kv);
  const int r = (int)(item % rows);

  const int first = p.num_splits[req];
  const int n = p.num_splits[req + 1] - first;
  if (n == 1) return;

  const int s_idx = r / (int)p.heads_per_kv;
  const int hq = head_kv * (int)p.heads_per_kv + r % (int)p.heads_per_kv;
  u16* out = (u16*)p.out + req * p.o_batch_stride + s_idx * p.o_seq_stride + hq * p.o_head_stride;
  float* lse_out = p.lse + ((i64)req * p.h_q + hq) * p.s_q + s_idx;
  const float inf = __int_as_float(0x7f800000);

  // Global log2-sum-exp over the pieces (lanes stride over pieces).
  auto piece_lse = [&](int k) { return p.lse_accum[((i64)(first + k) * p.h_kv + head_kv) * rows + r]; };
  float mx = -inf;
  for (int k = lane; k < n; k += 32) mx = fmaxf(mx, piece_lse(k));
  for (int d = 16; d > 0; d /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, d));
  float sum = 0.f;
  if (mx != -inf)
    for (int k = lane; k < n; k += 32) sum += ex2(piece_lse(k) - mx);
  for (int d = 16; d > 0; d /= 2) sum += __shfl_xor_sync(0xffffffff, sum, d);

  float acc[kRuns][4] = {};
  const bool empty = !(sum > 0.f);  // no piece, or no piece saw a key
  if (!empty) {
    const float lse_total = mx + __log2f(sum);
    for (int k = 0; k < n; ++k) {
      const float w = ex2(piece_lse(k) - lse_total);
      const float* src = p.o_accum + (((i64)(first + k) * p.h_kv + head_kv) * rows + r) * kDV;
#pragma unroll
      for (int c = 0; c < kRuns; ++c) {
        const float4 v = *(const float4*)(src + c * 128 + lane * 4);
        acc[c][0] += w * v.x; acc[c][1] += w * v.y; acc[c][2] += w * v.z; acc[c][3] += w * v.w;
      }
    }
    if (lane == 0) *lse_out = lse_total * kLn2;
  } else if (lane == 0) {
    *lse_out = inf;
  }
#pragma unroll
  for (int c = 0; c < kRuns; ++c)
    *(uint2*)(out + c * 128 + lane * 4) =
        make_uint2(cvt_pack(acc[c][0], acc[c][1], T{}), cvt_pack(acc[c][2], acc[c][3], T{}));
}

}  // namespace flashmla
