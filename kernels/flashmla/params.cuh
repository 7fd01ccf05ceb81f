// Kernel parameter structs, passed by value as one __grid_constant__ argument.
// Every field is 8 bytes (a pointer, i64 or double) so the layout has no padding and
// the ctypes mirror in flashmla_jit/params.py is a plain field list; a CPU test keeps
// the two in step (names, order, count).
#pragma once
#include "ptx.cuh"

namespace flashmla {

// Query tokens of request `req`: the first one's index in q's token dimension (0 for a
// fixed s_q, whose requests are apart by the batch stride) and how many there are.
struct QuerySpan {
  int first, count;
};
__device__ __forceinline__ QuerySpan query_span(const int* cu_seqlens_q, int req, int s_q) {
  if (cu_seqlens_q == nullptr) return {0, s_q};
  const int first = cu_seqlens_q[req];
  return {first, cu_seqlens_q[req + 1] - first};
}

// Scheduler record of one part (one CTA column of the decode grid), 8 ints. Parts walk
// positions on the cost line (metadata.cuh), which hold the requests in an order of its
// choosing (request_at):
//   [0] begin position  [1] begin block (in that position's request)
//   [2] end position    [3] end block (exclusive, in the end position's request)
//   [4] split index of the part's piece of the begin position's request
//   [5] active requests: those at or past it are padding (no work, no writes)
//   [6..7] the requests at positions 4 q .. 4 q + 3 (record q), a u16 each, low half
//          first; when batch > kOrderPerRecord * parts, positions are requests
constexpr int kSchedRecordInts = 8;
constexpr int kOrderPerRecord = 4;

// The request at position `pos` of the parts' walk.
__device__ __forceinline__ int request_at(const int* sched, int pos, int batch, int parts) {
  if (batch > kOrderPerRecord * parts) return pos;
  const int* rec = sched + pos / kOrderPerRecord * kSchedRecordInts;
  return reinterpret_cast<const unsigned short*>(rec + 6)[pos % kOrderPerRecord];
}

struct DecodeParams {
  const void* q;              // (batch, s_q, h_q, >= head_dim_v): latent columns, last dim contiguous
  const void* k;              // (num_pages, page_size, h_kv, >= head_dim_v): latent columns (= V)
  const void* q_pe;           // (batch, s_q, h_q, head_dim - head_dim_v): rope columns
  const void* k_pe;           // (num_pages, page_size, h_kv, head_dim - head_dim_v): rope columns
  const int* block_table;     // (batch, max_blocks), last dim contiguous
  const int* seqlens;         // (batch,), contiguous
  const int* cu_seqlens_q;    // (batch + 1,) ragged queries: request i owns query tokens
                              // [cu[i], cu[i+1]) of a packed q; null = s_q tokens each
  const int* sched;           // (num_parts, kSchedRecordInts)
  const int* num_splits;      // (batch + 1,) exclusive prefix of pieces per request
  void* out;                  // (batch, s_q, h_q, head_dim_v)
  float* lse;                 // (batch, h_q, s_q), or (h_q, total_q) when ragged
  float* o_accum;             // (pieces, h_kv, rows, head_dim_v) fp32 partial outputs
  float* lse_accum;           // (pieces, h_kv, rows) log2-domain partial lse
  u32* piece_done;            // (pieces, h_kv, m-blocks): 1 once a piece's partials are stored, or null
  i64 q_batch_stride, q_seq_stride, q_head_stride;        // elements
  i64 k_page_stride, k_row_stride, k_head_stride;         // elements
  i64 q_pe_batch_stride, q_pe_seq_stride, q_pe_head_stride;
  i64 k_pe_page_stride, k_pe_row_stride, k_pe_head_stride;
  i64 bt_batch_stride;                                    // elements
  i64 o_batch_stride, o_seq_stride, o_head_stride;        // elements
  i64 lse_batch_stride, lse_head_stride, lse_seq_stride;  // elements
  i64 batch, s_q, h_q, h_kv;  // s_q: query tokens per request (the most, when ragged)
  i64 heads_per_kv;           // h_q / h_kv
  i64 rows;                   // s_q * heads_per_kv: query rows per KV head
  i64 page_size, num_pages, max_blocks;
  double scale_log2;          // softmax_scale * log2(e)
  const float* k_scale;       // per-tensor FP8 cache: () fp32 scale on the device, or null
  double k_scale_value;       // ... the scale when k_scale is null (a host float)
};

// A CUtensorMap: 128 opaque bytes encoded on the host (cuTensorMapEncodeTiled), 64-byte
// aligned in parameter space.
struct alignas(64) TensorMap {
  u64 words[16];
};

// The seesaw decode kernel (64-row tiles, page_size % 64 == 0) loads KV blocks with TMA:
// two tensor maps over the cache, each a 4-D view (columns, KV heads, rows in a page,
// pages) with 64 x 64 boxes, 128-byte swizzled. Its Q-by-TMA variant loads Q tiles
// through two more, over q as (columns, heads, tokens, requests; one request of every
// token when ragged) whose box is 64 columns of a tile's 64 rows. The usual parameters
// follow.
struct SeesawParams {
  TensorMap k_latent;  // k's latent columns [0, head_dim_v)
  TensorMap k_rope;    // k_pe's rope columns (unused when head_dim == head_dim_v)
  TensorMap q_latent;  // q's latent columns (Q by TMA only)
  TensorMap q_rope;    // q_pe's rope columns (Q by TMA, head_dim > head_dim_v only)
  DecodeParams p;
};

// The per-tensor FP8 scale (a coherent load: the scale may come from a preceding kernel).
__device__ __forceinline__ float fp8_k_scale(const DecodeParams& p) {
  return p.k_scale != nullptr ? *p.k_scale : (float)p.k_scale_value;
}

struct CombineParams {
  const int* sched;           // (num_parts, kSchedRecordInts): record 0 holds the active count
  const int* num_splits;      // (batch + 1,)
  const int* cu_seqlens_q;    // as in DecodeParams
  const float* o_accum;       // (pieces, h_kv, rows, head_dim_v)
  const float* lse_accum;     // (pieces, h_kv, rows)
  const u32* piece_done;      // as in DecodeParams (the few-pieces grid's)
  void* out;                  // (batch, s_q, h_q, head_dim_v)
  float* lse;                 // (batch, h_q, s_q)
  i64 o_batch_stride, o_seq_stride, o_head_stride;
  i64 lse_batch_stride, lse_head_stride, lse_seq_stride;
  i64 batch, s_q, h_q, h_kv, heads_per_kv, rows;
  i64 decode_tile_rows;       // query rows of a decode CTA: row r's piece flag is m-block r / this
};

// ---- Split pieces merge as soon as they are stored (the few-pieces combine grid) ----
// The combine kernel starts while the decode kernel runs (programmatic dependent launch)
// and gets SMs as decode CTAs exit. Where requests split in a few pieces (large batches:
// their parts end at different times) each of its CTAs merges a request once that
// request's pieces are stored, not after the whole decode grid: the decode CTA of a piece
// (split index, KV head, m-block) sets its flag to 1 after its partials. The flags live
// in the call's scratch, so they start as anything: before a decode CTA lets the combine
// start, it zeroes the flags of the pieces it may write, its part's first and last (the
// pieces of its middle requests are whole, and a request split across parts is the last
// piece of one and the first of the next, so the next part's first split index, minus
// one, is this part's last; split indices go by request index while the cost line may be
// reordered, so the last can lie below the first: tests/sched_model.py, zeroed_flags).
// CTAs that exit before any work own no flag that is read, and their exit lets the
// combine start as a launch_dependents would. With piece_done null (the many-pieces grid:
// every piece of a small batch ends with the grid) there are no flags, and the combine
// waits for the decode grid.
__device__ __forceinline__ i64 piece_flag(int split, int head_kv, int h_kv, int m_block, int m_blocks) {
  return ((i64)split * h_kv + head_kv) * m_blocks + m_block;
}
__device__ __forceinline__ u32* decode_piece_flag(const DecodeParams& p, int split) {
  return p.piece_done + piece_flag(split, blockIdx.y, gridDim.y, blockIdx.x, gridDim.x);
}

// Decode, with flags: once, by one warp (a provably warp-uniform branch: wgmma code
// around it is serialized otherwise), at its CTA's first request, after issuing its loads
// so that the fence overlaps their wait: zero this CTA's flags, then let the combine be
// scheduled. Only this warp calls launch_dependents: a CTA's first call is the one that
// counts, and it must come after the zeroes are visible.
__device__ __forceinline__ void decode_start_pieces(const DecodeParams& p) {
  const int* rec = p.sched + blockIdx.z * kSchedRecordInts;
  const int first = rec[4];
  const int last = rec[3] > 0 && blockIdx.z + 1 < gridDim.z ? rec[kSchedRecordInts + 4] - 1 : first;
  *decode_piece_flag(p, first) = 0;
  if (last != first && last < p.batch + gridDim.z) *decode_piece_flag(p, last) = 0;  // the scratch holds batch + parts pieces
  __threadfence();
  grid_launch_dependents();
}

// Decode, with flags, after every thread stored its partials of piece `split`: a
// CTA-uniform call; `publisher` is true in one warp (warp-uniform). Every thread fences
// its own stores before the barrier, then that warp's release publishes them.
__device__ __forceinline__ void decode_publish_piece(const DecodeParams& p, int split, bool publisher) {
  __threadfence();
  __syncthreads();
  if (publisher) st_release_gpu(decode_piece_flag(p, split), 1);
}

struct MetadataParams {
  const int* seqlens;         // (batch,)
  const int* num_seqs;        // (1,) active requests, those past it are padding; null: `active`
  int* sched;                 // (num_parts, kSchedRecordInts)
  int* num_splits;            // (batch + 1,)
  i64 batch;
  i64 active;                 // active requests when num_seqs is null
  i64 num_parts;
  i64 block_n;                // tokens per block in the decode kernel
  i64 overhead_blocks;        // fixed cost of one piece, in blocks
  i64 whole_slack_pct;        // payload may grow this much (%) to keep equal requests whole,
  i64 whole_slack_blocks;     // or this many blocks
};

}  // namespace flashmla
