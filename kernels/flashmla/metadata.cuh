// get_mla_metadata on the GPU: a balanced split-KV plan, no host sync (graph-capturable).
//
// Every request is laid on one "cost line": first `overhead_blocks` units (the fixed
// cost of starting a piece: Q load, epilogue), then one unit per 64-token block. The
// line is cut into num_parts equal payloads; part q owns the positions
// [q * payload, (q + 1) * payload). A request whose blocks straddle cuts becomes several
// pieces, merged later by the combine kernel. Everything follows from prefix sums, so
// one CTA computes it in a few block-wide scans (tests/sched_model.py is the
// pure-Python twin of this file). Parts past the line's end begin and end at position
// `active`, so no part reaches a padding request.
// Equal requests a little fewer than the parts (b = 128 on 132 SMs) would all be cut in
// two by equal payloads; a payload of whole requests (the largest cost times requests
// per part) keeps them whole instead, when it is at most whole_slack_pct percent or
// whole_slack_blocks blocks above the equal one. Memory-bound steps gain 3-10 % that way
// (the pieces' fixed costs and the combine go away, and idle SMs cost no bandwidth);
// compute-bound ones only when the few blocks more cost less than the combine.
// With fewer requests than parts the aligned payload is a request per k = parts /
// requests parts (the largest cost / k), each request padded on the line to whole parts,
// under the same slack: equal requests then split in k pieces with one piece a part,
// where equal payloads cut most of them in k + 1 and give most parts two pieces, each
// with its own start and partial store (b = 32 h128 8K: 3 pieces a request, 2 aligned).
// Under equal payloads, with more requests than half the parts, the requests are laid
// on the line in an order that cuts fewer of them (pack_order): at about a request a
// part (varlen b = 128) nearly every request straddles a cut in index order, and each
// cut one costs an fp32 partial per piece and its merge. Pairs whose costs add up to
// whole payloads go first, each ending on a cut (varlen b = 128 8K: 254 -> 226 pieces).
// The parts then walk positions, and the records carry the order (params.cuh).
#pragma once
#include "params.cuh"

namespace flashmla {

#ifndef FLASHMLA_METADATA_INDEX_ORDER  // 1: requests always in index order on the line (A/B)
#define FLASHMLA_METADATA_INDEX_ORDER 0
#endif

constexpr int kMetadataThreads = 1024;
constexpr int kMaxParts = 1024;
constexpr int kMaxOrder = kMetadataThreads;        // requests pack_order takes at most (one a thread)
constexpr int kPackMaxPayload = kMetadataThreads;  // payloads it takes at most (a residue a thread)

// Block-wide exclusive scan of one int per thread; returns the prefix, writes the total.
__device__ __forceinline__ int block_exclusive_scan(int x, int* warp_sums, int& total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int inc = x;
  for (int d = 1; d < 32; d *= 2) {
    const int y = __shfl_up_sync(0xffffffff, inc, d);
    if (lane >= d) inc += y;
  }
  if (lane == 31) warp_sums[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    int w = lane < kMetadataThreads / 32 ? warp_sums[lane] : 0;
    for (int d = 1; d < 32; d *= 2) {
      const int y = __shfl_up_sync(0xffffffff, w, d);
      if (lane >= d) w += y;
    }
    warp_sums[lane] = w;  // inclusive prefix of warp totals
  }
  __syncthreads();
  total = warp_sums[kMetadataThreads / 32 - 1];
  const int prefix = (warp > 0 ? warp_sums[warp - 1] : 0) + inc - x;
  __syncthreads();  // warp_sums is reused by the next scan
  return prefix;
}

__device__ __forceinline__ int block_max(int x, int* warp_vals) {
  x = __reduce_max_sync(0xffffffff, x);
  if (threadIdx.x % 32 == 0) warp_vals[threadIdx.x / 32] = x;
  __syncthreads();
  int m = warp_vals[0];
  for (int w = 1; w < kMetadataThreads / 32; ++w) m = max(m, warp_vals[w]);
  __syncthreads();  // warp_vals is reused next
  return m;
}

// The shared tables of pack_order.
struct PackTables {
  alignas(16) int residue[kMaxOrder];  // cost % payload by request, -1 for cost 0
  int count[kPackMaxPayload];         // requests of each residue
  int pairs_before[kPackMaxPayload];  // pairs of the residue classes below r (r < payload - r)
  unsigned short order[kMaxOrder];    // position -> request
};

// The order to lay the active requests on the line in, so that fewer straddle a cut
// (tests/sched_model.py, pack_order, is the twin): first pairs of requests whose costs
// add up to a multiple of the payload, so that each pair ends on a cut; then requests
// of whole payloads; then the rest; then those of cost 0 (and padding); index order
// within each. Residue classes r and payload - r (r < payload - r, by r ascending) pair
// their requests in index order, the class payload / 2 its own. Each thread places one
// request from counts and ranks: a few block scans, no sequential walk. `mine`: this
// thread's request's cost (0 past the batch).
__device__ void pack_order(PackTables& t, int mine, int batch, int payload, int* warp_sums) {
  const int tid = threadIdx.x;
  if (tid < payload) t.count[tid] = 0;
  const int res = mine > 0 ? mine % payload : -1;
  if (tid < batch) t.residue[tid] = res;
  __syncthreads();
  if (res >= 0) atomicAdd(&t.count[res], 1);
  int rank = 0;  // among the requests of this residue, by index (four a load: no latency chain)
  for (int j = 0; j < tid && res >= 0; j += 4) {
    const int4 r4 = reinterpret_cast<const int4*>(t.residue)[j / 4];
    rank += (r4.x == res) + (r4.y == res && j + 1 < tid) + (r4.z == res && j + 2 < tid) + (r4.w == res && j + 3 < tid);
  }
  __syncthreads();
  // Pairs a residue class r < payload - r makes with its partner class (r = payload / 2: with itself).
  const int r = tid, partner = payload - tid;
  const int pairs = r <= 0 || r >= payload || r > partner ? 0
                    : r < partner                         ? min(t.count[r], t.count[partner])
                                                          : t.count[r] / 2;
  int total_pairs;
  const int before = block_exclusive_scan(pairs, warp_sums, total_pairs);
  if (r < payload) t.pairs_before[r] = before;
  __syncthreads();
  int pos = -1;
  if (res > 0 && res < payload - res && rank < min(t.count[res], t.count[payload - res]))
    pos = 2 * (t.pairs_before[res] + rank);
  else if (res > payload - res && rank < min(t.count[res], t.count[payload - res]))
    pos = 2 * (t.pairs_before[payload - res] + rank) + 1;
  else if (res > 0 && res == payload - res && rank < t.count[res] / 2 * 2)
    pos = 2 * t.pairs_before[res] + rank;
  else if (res == 0)
    pos = 2 * total_pairs + rank;
  const bool rest = res > 0 && pos < 0, zero = tid < batch && res < 0;
  int rests, zeros;
  const int rest_rank = block_exclusive_scan(rest, warp_sums, rests);
  const int zero_rank = block_exclusive_scan(zero, warp_sums, zeros);
  if (rest) pos = 2 * total_pairs + t.count[0] + rest_rank;
  if (zero) pos = batch - zeros + zero_rank;
  if (tid < batch) t.order[pos] = tid;
}

__global__ void __launch_bounds__(kMetadataThreads, 1) metadata_kernel(const __grid_constant__ MetadataParams p) {
  __shared__ int warp_sums[32];
  __shared__ int part_begin[kMaxParts + 1][3];  // position, block, split index
  const int tid = threadIdx.x;
  const int batch = (int)p.batch, parts = (int)p.num_parts, ovh = (int)p.overhead_blocks;
  const int block_n = (int)p.block_n;
  // Requests at or past `active` are padding of a batch captured larger (CUDA graphs):
  // they get no piece, whatever their seqlens hold, and the kernels skip them.
  const int active = min(max(p.num_seqs ? *p.num_seqs : (int)p.active, 0), batch);
  auto blocks_of = [&](int i) { return i < active ? (max(p.seqlens[i], 0) + block_n - 1) / block_n : 0; };

  // Pass 1: total cost, hence the payload per part; or a payload of whole requests.
  int local = 0, local_count = 0, local_max = 0;
  for (int i = tid; i < batch; i += kMetadataThreads) {
    const int nb = blocks_of(i);
    const int cost = nb > 0 ? nb + ovh : 0;
    local += cost;
    local_count += cost > 0;
    local_max = max(local_max, cost);
  }
  int total, count;
  block_exclusive_scan(local, warp_sums, total);
  block_exclusive_scan(local_count, warp_sums, count);
  const int max_cost = block_max(local_max, warp_sums);
  int payload = max(1, (total + parts - 1) / parts);
  bool pad = count <= parts;  // aligned payload: a request per k parts, else whole requests
  const int k = parts / max(count, 1);
  const long long aligned = pad ? (max_cost + k - 1) / k : (long long)max_cost * ((count + parts - 1) / parts);
  bool take = count > 0 && (aligned * 100 <= (long long)payload * (100 + p.whole_slack_pct) ||
                            aligned - payload <= p.whole_slack_blocks);
  if (take && pad) {  // padded, the requests must still fit in the parts
    int local_parts = 0, needed;
    for (int i = tid; i < batch; i += kMetadataThreads) {
      const int nb = blocks_of(i);
      local_parts += nb > 0 ? (int)((nb + ovh + aligned - 1) / aligned) : 0;
    }
    block_exclusive_scan(local_parts, warp_sums, needed);
    take = needed <= parts;
    if (take) total = needed * (int)aligned;
  }
  pad = pad && take;
  if (take) payload = (int)aligned;
  // A request's length on the cost line: its cost, or padded to whole parts.
  auto line_of = [&](int cost) { return pad ? (cost + payload - 1) / payload * payload : cost; };
  // The pieces of a request of nb blocks starting at `start` on the line: the parts its
  // blocks (after the overhead) fall in.
  auto pieces_of = [&](int start, int nb) {
    return nb > 0 ? (start + ovh + nb - 1) / payload - (start + ovh) / payload + 1 : 0;
  };

  // The order of the requests on the line: reordered under equal payloads (pack_order),
  // kept when the line then cuts them into fewer pieces than in index order (pairs can
  // lose to it when requests span several parts).
  __shared__ PackTables pack;
  bool packed = !FLASHMLA_METADATA_INDEX_ORDER && !take && 2 * count > parts &&
                batch <= min(kMaxOrder, kOrderPerRecord * parts) && payload <= kPackMaxPayload;
  if (packed) {
    const int nb = tid < batch ? blocks_of(tid) : 0;
    pack_order(pack, nb > 0 ? nb + ovh : 0, batch, payload, warp_sums);
    __syncthreads();
    auto pieces_when = [&](bool reordered) {  // one position a thread (batch <= kMaxOrder)
      const int i = tid < batch ? (reordered ? (int)pack.order[tid] : tid) : 0;
      const int nb = tid < batch ? blocks_of(i) : 0;
      int total, pieces;
      const int start = block_exclusive_scan(nb > 0 ? nb + ovh : 0, warp_sums, total);
      block_exclusive_scan(pieces_of(start, nb), warp_sums, pieces);
      return pieces;
    };
    packed = pieces_when(true) < pieces_when(false);
  }
  auto request_at_pos = [&](int pos) { return packed ? (int)pack.order[pos] : pos; };

  // Pass 2: each position's start on the line, hence its request's pieces (counted in
  // num_splits, then turned into the prefix by request), then the cut points.
  auto start_of_positions = [&](int base, int& cost_carry, int& i, int& nb, int& cost) {
    const int pos = base + tid;
    i = pos < batch ? request_at_pos(pos) : 0;
    nb = pos < batch ? blocks_of(i) : 0;
    cost = nb > 0 ? nb + ovh : 0;
    int chunk_cost;
    const int start = cost_carry + block_exclusive_scan(line_of(cost), warp_sums, chunk_cost);
    cost_carry += chunk_cost;
    return start;
  };
  int cost_carry = 0;
  for (int base = 0; base < batch; base += kMetadataThreads) {
    int i, nb, cost;
    const int start = start_of_positions(base, cost_carry, i, nb, cost);
    if (base + tid < batch) p.num_splits[i] = pieces_of(start, nb);
  }
  __syncthreads();  // every count written
  int piece_carry = 0;
  for (int base = 0; base < batch; base += kMetadataThreads) {
    const int i = base + tid;
    int chunk_pieces;
    const int first = piece_carry + block_exclusive_scan(i < batch ? p.num_splits[i] : 0, warp_sums, chunk_pieces);
    if (i < batch) p.num_splits[i] = first;
    piece_carry += chunk_pieces;
  }
  if (tid == 0) p.num_splits[batch] = piece_carry;
  __syncthreads();  // every prefix written
  cost_carry = 0;
  for (int base = 0; base < batch; base += kMetadataThreads) {
    int i, nb, cost;
    const int start = start_of_positions(base, cost_carry, i, nb, cost);
    const int first_part = (start + ovh) / payload;
    if (cost > 0) {
      for (int q = (start + payload - 1) / payload; q * payload < start + cost && q < parts; ++q) {
        part_begin[q][0] = base + tid;
        part_begin[q][1] = min(max(q * payload - start - ovh, 0), nb);
        part_begin[q][2] = p.num_splits[i] + q - first_part;
      }
    }
  }
  // Parts that start past the end of the line own nothing.
  for (int q = tid; q <= parts; q += kMetadataThreads) {
    if ((long long)q * payload >= total) {
      part_begin[q][0] = active;
      part_begin[q][1] = 0;
      part_begin[q][2] = piece_carry;
    }
  }
  __syncthreads();
  // Two positions' requests as a u16 pair (params.cuh, request_at).
  auto order_word = [&](int pos) {
    auto at = [&](int k) { return batch <= kOrderPerRecord * parts && k < batch ? request_at_pos(k) : 0; };
    return at(pos) | at(pos + 1) << 16;
  };
  for (int q = tid; q < parts; q += kMetadataThreads) {
    int* rec = p.sched + q * kSchedRecordInts;
    rec[0] = part_begin[q][0];
    rec[1] = part_begin[q][1];
    rec[2] = part_begin[q + 1][0];
    rec[3] = part_begin[q + 1][1];
    rec[4] = part_begin[q][2];
    rec[5] = active;
    rec[6] = order_word(q * kOrderPerRecord);
    rec[7] = order_word(q * kOrderPerRecord + 2);
  }
}

}  // namespace flashmla
