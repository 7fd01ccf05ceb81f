// Split-KV MLA decode for 64-row query tiles on a "seesaw" schedule, with KV blocks
// loaded by TMA. Same work split, parameters and results as decode.cuh's 64-row tile;
// used when the cache pages hold whole 64-token blocks (page_size % 64 == 0), so that a
// block is one 64-row box per 64-column sub-tile of a tensor map.
//
// Why a seesaw (the idea of FlashMLA's 2025-04 kernel; this code is ours): a 64 x 512
// fp32 output tile fills half the register file, so there is one per CTA and two
// warpgroups share it: warpgroup 0 (WG0) keeps columns 0-255 ("left"), WG1 columns
// 256-511 ("right"), 128 registers each. Blocks come in pairs: WG0 computes S0 = Q K0^T
// and the softmax of the even block, WG1 those of the odd block, so one warpgroup's
// softmax runs while the other's wgmmas keep the tensor pipe busy. Each warpgroup then
// multiplies both blocks' P into its half of O: its own P from registers, the other
// warpgroup's through shared memory.
//
// ---- Online softmax over a pair (log2 domain, m = running row max, both warpgroups
// ---- hold the same m and their own partial row sum l against it; "max" below moves
// ---- m only when the block's max passes it by more than kMaxSlack, see raise_max) ----
//   WG0: m0 = max(m, rowmax S0), s0 = 2^(m - m0), P0 = 2^(S0 - m0)    -> sMax0, sP0
//   WG1: m1 = max(m0, rowmax S1), s1 = 2^(m0 - m1), P1 = 2^(S1 - m1)  -> sMax1, sP1
//   WG0: O_L = (O_L s0 + P0 V0_L) s1 + P1 V1_L
//   WG1: O_R = (O_R s0 + P0 V0_R) s1 + P1 V1_R
// so both halves end the pair against m1. P0 leaves WG0 against m0, before WG1's max
// exists: WG1's g (P0 V0_R) depends on WG0's softmax only, and the refill of the buffer
// half it frees starts early. The s1 rescale waits for the PV before it, but it is skipped
// when no row's max moved (most blocks). A pair without an odd block has s1 = 1.
//
// ---- Events of one pair (blk in buffer kv0, blk + 1 in kv1); S0 is done on entry ----
//  WG0                                      WG1 (S1 done on entry)
//  rowmax S0 -> m0, sMax0; arrive Max0      sync Max0; O_R *= s0
//  P0 -> sP0; arrive P0                     sync P0; g = sP0 V0_R (SS)
//  O_L *= s0; c = P0 V0_L (RS); wait        rowmax S1 -> m1, sMax1; arrive Max1
//  TMA kv0 0-3, rope <- blk+2               P1 -> sP1; arrive P1
//  sync Max1                                (O_R moved: wait g; O_R *= s1); e = P1 V1_R (RS)
//  sync P1; O_L *= s1; h = sP1 V1_L (SS)    wait g; TMA kv0 4-7 <- blk+2, kv1 rope <- blk+3
//  S0' on kv0 rope, 0-3                     wait e; TMA kv1 4-7 <- blk+3
//  wait h; TMA kv1 0-3 <- blk+3             S1' on kv1 rope, 4-7, 0-3; wait
//  S0' on kv0 4-7; wait
// A buffer fills in three parts (sub-tiles 0-3, 4-7 and the rope sub-tile), each with
// its own mbarrier, and each S waits part by part in refill order. A part is refilled as
// soon as its last reader is done: kv0 0-3 after c; kv0 4-7 after g (S0 finished before
// WG0's arrive on Max0, which WG1 synced); kv1 0-3 after h (S1 finished before WG1's
// arrive on Max1, synced by WG0); kv1 4-7 after e. The rope sub-tiles are free right after
// their block's S, but a TMA issue inside the softmax delays that warp's arrive on P, which
// the other warpgroup waits for: they go out after the PV wait that follows (WG0's after c,
// WG1's after g), where the warpgroup waits anyway (h128 s_q 2 steps ~3 % faster in single
// calls and back to back, s_q 1 4K ~0.7 %; docs/PERF.md v29).
// Page ids are read at the top of the pair, so no TMA issue waits on the block table.
// (Measured and dropped: an L2 prefetch of the blocks one pair ahead, docs/PERF.md v7, or
// two pairs ahead, v27: 10-19 % slower. The L2 hint on the loads: see load_kv.)
// With two buffers, a refill has about one PV of tensor work to land before its S
// needs it: the S waits there are what separates this kernel from the tensor peak.
// Cheap skips on the CUDA cores, whose work sits between the wgmmas: blocks a whole
// warp sees entirely skip the mask, and O is not rescaled when no row's max moved.
// Steady pairs (no mask, no V tail, the next pair present: all but the last one or two,
// in parts of 8 blocks or more) run their own copy of the pair, without the code for
// those cases: a loop a third smaller, 5-10 % faster compute-bound (docs/PERF.md, v11).
//
// ---- Who protects what ----
// sMax0: written by WG0 before Max0, read by WG1 after it; the next write comes after
//   WG0's sync on Max1, which WG1 arrives after its read. sMax1 likewise (next write after
//   WG1's next sync on Max0, which WG0 arrives after its sync on Max1 and the read).
// sP0: written before P0, read by g; the next write comes after S0' of the next block,
//   which waited on the kv0 4-7 refill that WG1 issues only after waiting for g (moving
//   that refill breaks this; the same chain keeps WG0 from arriving on P0 twice before
//   WG1 synced it). sP1: written before P1, read by h; the next write comes after WG1's
//   next sync on Max0, which WG0 arrives after waiting for h.
//   For d = 576 sP1 is sQ's rope sub-tile: the rope part of Q lives in registers (the A
//   operand of the 4 rope k-steps), loaded before any sP1 write. The next request's Q
//   (a TMA write) comes after the __syncthreads that starts it; publish_p fenced the
//   sP1 writes for the async proxy.
// Named barriers pair one arrive with one sync per pair under the same conditions, and
// no warpgroup can arrive twice on one before the other synced it (each second arrive
// sits behind a sync on a signal the other sends after its sync).
// Tails: rows of a request's last block past its length hold whatever the page holds
// (NaN included). S masks them by select; P is 0 there, but 0 * NaN is NaN, so each
// warpgroup zeroes those rows of its own V half before its first PV on the block (after
// the block's S finished, so no wgmma reads while they are written). Blocks past the
// block table's reach, and page ids outside [0, num_pages), load as zeros (TMA fills
// boxes outside the tensor with zeros).
// A request starts with __syncthreads: by then every wgmma was waited for and every TMA
// issued was consumed by an S that waited on it, so nothing is in flight.
#pragma once
#include "decode.cuh"

namespace flashmla {

constexpr int kSeesawThreads = 256;
constexpr float kMaxSlack = 8.f;  // how far (log2) a row max may pass the running max unnoticed
constexpr int kSteadyMinBlocks = 8;  // a part's block range that runs the steady pair copies

// FLASHMLA_JIT_DEFINES="FLASHMLA_SEESAW_TRACE=1" (tools/seesaw_trace.py): in CTA
// (0, 0, 0), thread 0 of warpgroup 0 sums the SM clock at each event of a pair minus the
// pair's start, in the row-sum slots (unused until the epilogue: no extra registers), and
// adds the sums per request to the int64 buffer passed as k_scale (unused by 16-bit
// caches): [event], event 15 = pairs; warpgroup 1's thread 0 likewise in static smem of
// its own, into [16 + event]. Off: the marks compile away.
#ifndef FLASHMLA_SEESAW_TRACE
#define FLASHMLA_SEESAW_TRACE 0
#endif
#ifndef FLASHMLA_SEESAW_TRACE_MASK
#define FLASHMLA_SEESAW_TRACE_MASK 0xffd  // event 1 left out: marking it too makes ptxas spill
#endif
// Only a request's pairs FROM..TO (0-based) are summed, e.g. its first ones against the rest.
#ifndef FLASHMLA_SEESAW_TRACE_PAIRS_FROM
#define FLASHMLA_SEESAW_TRACE_PAIRS_FROM 0
#endif
#ifndef FLASHMLA_SEESAW_TRACE_PAIRS_TO
#define FLASHMLA_SEESAW_TRACE_PAIRS_TO (1 << 30)
#endif
constexpr int kTraceEvents = 16;

// FLASHMLA_JIT_DEFINES="FLASHMLA_SEESAW_CTATIME=1" (tools/cta_timeline.py): thread 0 of
// every CTA stamps its request boundaries into the int64 buffer passed as k_scale,
// [cta][32]: globaltimer at entry and exit (0, 1), clock64 at entry and exit (2, 3), then
// per request i < 5 of the part, at 4 + 5 i: start, first S done, loop done, stores
// begin, stores done (clock64), and the SM id at 31. The stamps collect in shared memory
// and go out at the CTA's exit (a global store at each stamp made ptxas spill in the Q-TMA
// variants on NVRTC 12). Off: the stamps compile away.
#ifndef FLASHMLA_SEESAW_CTATIME
#define FLASHMLA_SEESAW_CTATIME 0
#endif
// CTATIME=2 (tools/pair_timeline.py) also stamps each pair's start and each request's
// loop end, as the low 32 bits of clock64 and of globaltimer (the SM clock moves within a
// call), written out to slots 32 + 2 n, 32 + 2 n + 1, n < kPairStamps counted over the
// part's requests. 85: under 1 KB of static shared memory with the request stamps. The
// dynamic plan (230712 bytes at d = 576) starts at the next 1024-byte boundary after it,
// and the two must fit in 232448 (227 KiB).
constexpr int kPairStamps = 85;
constexpr int kCtaStampSlots = FLASHMLA_SEESAW_CTATIME >= 2 ? 32 + 2 * kPairStamps : 32;
#if FLASHMLA_SEESAW_CTATIME
__shared__ long long cta_slots[32];
#endif
#if FLASHMLA_SEESAW_CTATIME >= 2
__shared__ u32 pair_stamps[2 * kPairStamps];
__shared__ int pair_stamps_taken;  // thread 0's count (no other thread reads it)
#endif
__device__ __forceinline__ long long stamp_clock(bool globaltimer = false) {
  long long v;
  if (globaltimer) asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(v));
  else asm volatile("mov.u64 %0, %%clock64;" : "=l"(v));
  return v;
}
// Event `event` (0-4) of the part's request at position `pos`, its first at `begin_pos`.
__device__ __forceinline__ void cta_stamp(int pos, int begin_pos, int event) {
#if FLASHMLA_SEESAW_CTATIME
  if (threadIdx.x == 0) cta_slots[4 + 5 * min(pos - begin_pos, 4) + event] = stamp_clock();
#endif
}
__device__ __forceinline__ void pair_stamp() {
#if FLASHMLA_SEESAW_CTATIME >= 2
  if (threadIdx.x != 0) return;
  const int n = pair_stamps_taken;
  if (n < kPairStamps) {
    u32 clock, ns;  // the low words only: two registers where the loop has few
    asm volatile("mov.u32 %0, %%clock;\n mov.u32 %1, %%globaltimer_lo;" : "=r"(clock), "=r"(ns));
    pair_stamps[2 * n] = clock, pair_stamps[2 * n + 1] = ns;
  }
  pair_stamps_taken = n + 1;
#endif
}
// At entry: clear the slots, then stamp the entry and the SM the CTA runs on (slot 31, to
// tell an SM's pace from its part's).
__device__ __forceinline__ void cta_stamps_begin() {
#if FLASHMLA_SEESAW_CTATIME
  if (threadIdx.x != 0) return;
  for (int i = 0; i < 32; ++i) cta_slots[i] = 0;
  u32 smid;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
  cta_slots[0] = stamp_clock(true), cta_slots[2] = stamp_clock(), cta_slots[31] = smid;
#if FLASHMLA_SEESAW_CTATIME >= 2
  pair_stamps_taken = 0;
#endif
#endif
}
// At exit: stamp it, and write this CTA's slots out.
__device__ __forceinline__ void cta_stamps_end(const DecodeParams& p) {
#if FLASHMLA_SEESAW_CTATIME
  if (threadIdx.x != 0) return;
  cta_slots[1] = stamp_clock(true), cta_slots[3] = stamp_clock();
  long long* out = (long long*)p.k_scale + (blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z)) * kCtaStampSlots;
  for (int i = 0; i < 32; ++i) out[i] = cta_slots[i];
#if FLASHMLA_SEESAW_CTATIME >= 2
  for (int i = 0; i < 2 * min(pair_stamps_taken, kPairStamps); ++i) out[32 + i] = pair_stamps[i];
#endif
#endif
}

// Named barrier ids (0 is __syncthreads); 256 threads = both warpgroups, 128 = one.
constexpr int kBarMax0 = 1;  // WG0 -> WG1: sMax0 of this pair written
constexpr int kBarMax1 = 2;  // WG1 -> WG0: sMax1 written
constexpr int kBarP0 = 3;    // WG0 -> WG1: sP0 written
constexpr int kBarP1 = 4;    // WG1 -> WG0: sP1 written
constexpr int kBarWg = 5;    // + warpgroup: its own zeroed V rows visible to its wgmma

// Shared memory plan (bytes; every tile on a 1024-byte boundary for the 128-byte swizzle).
// d = 576: kv 2 x 73728 + q 73728 + sP0 8192 + stats 1280 + barriers 48 = 230704 (sP1
// aliases sQ's rope sub-tile); d = 512: 2 x 65536 + 65536 + 2 x 8192 + 1280 + 32.
template <int kD, int kDV>
struct SeesawSmem {
  static constexpr bool kRope = kD > kDV;  // one 64-column rope sub-tile after the latent part
  static constexpr int kKvBytes = kBlockN * kD * 2;
  static constexpr int kKv0 = 0, kKv1 = kKvBytes;
  static constexpr int kQ = 2 * kKvBytes;
  static constexpr int kP0 = kQ + 64 * kD * 2;
  static constexpr int kP1 = kRope ? kQ + (kDV / 64) * kSubTileBytes : kP0 + kSubTileBytes;
  static constexpr int kStats = kP0 + kSubTileBytes + (kRope ? 0 : kSubTileBytes);
  static constexpr int kMax0 = kStats;             // float[64]: m0 per row
  static constexpr int kMax1 = kStats + 256;       // float[64]: m1 per row
  static constexpr int kRowSum = kStats + 512;     // float[2][64]: l of each warpgroup (epilogue)
  static constexpr int kRowLimit = kStats + 1024;  // int[64]: keys [0, limit) visible
  static constexpr int kParts = kRope ? 3 : 2;   // sub-tile groups with one mbarrier each (below)
  static constexpr int kBars = kStats + 1280;     // u64[2][kParts], then Q's (with Q by TMA)
  static constexpr int kQBar = kBars + 2 * kParts * 8;
  static constexpr int kBytes = kQBar + 8;
  // Epilogue: final 16-bit O rows staged over the KV buffers, free by then, rows padded so
  // the 8 rows of a stmatrix matrix sit 4 banks apart.
  static constexpr int kStage = kKv0;
  static constexpr int kStageRow = kDV * 2 + 16;
  static_assert(64 * kStageRow <= kQ, "the staging area ends before sQ");
};

// A thread's 32 S values hold 16 of each of its two rows (x[k] is row (k / 2) % 2's).
// reduce_row combines row `row`'s 16 by `op` as a tree, 4 steps deep. As a chain of 16
// dependent steps the row max delayed the exponentials, and the row sum, which ptxas places
// between the next PV's wgmmas, delayed that PV's later k-steps (PERF.md v30).
template <typename Op>
__device__ __forceinline__ float reduce_row(const float (&x)[32], int row, Op op) {
  float v[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = op(x[4 * j + 2 * row], x[4 * j + 2 * row + 1]);
#pragma unroll
  for (int width = 4; width >= 1; width /= 2)
#pragma unroll
    for (int j = 0; j < width; ++j) v[j] = op(v[j], v[j + width]);
  return v[0];
}

// kKvEvictFirst: KV loads with an L2 evict-first hint, for more than 64 query rows per KV
// head (spec.KernelSpec.kv_evict_first; load_kv says why).
// kQTma: Q tiles by TMA through sp.q_latent / sp.q_rope (where a 64-row tile is one box
// per 64 columns: spec.KernelSpec.q_tma), else by cp.async from every thread.
template <typename T, int kD, int kDV, bool kCausal, bool kKvEvictFirst, bool kQTma>
__global__ void __launch_bounds__(kSeesawThreads, 1) decode_seesaw_kernel(const __grid_constant__ SeesawParams sp) {
  using L = SeesawSmem<kD, kDV>;
  static_assert(kDV == 512, "each warpgroup's O half is one m64n256 accumulator");
  static_assert(kD == kDV || kD == kDV + 64, "the rope part is absent or one 64-column sub-tile");
  static_assert(L::kBytes <= 232448, "fits the 227 KB per-block shared memory");
  constexpr bool kRope = L::kRope;
  constexpr int kVSub = kDV / 64 / 2;   // V sub-tiles per warpgroup (4)
  constexpr int kRopeSub = kDV / 64;    // index of the rope sub-tile (8)
  // A buffer fills in parts, each on one mbarrier: the left V half (sub-tiles 0-3, read by
  // WG0's PVs), the right one (4-7, WG1's) and the rope sub-tile. The sub-tiles of a part
  // are issued back to back and land together, so a wait per part costs the S little, and
  // the issuing thread (whose warp the other three wait for at the next wgmma) does a
  // quarter of the mbarrier work it did with one barrier per sub-tile.
  constexpr int kLeft = 0, kRight = 1, kRopePart = 2;
  const DecodeParams& p = sp.p;

  if (!sp.p.piece_done) grid_launch_dependents();  // the combine's CTAs may be scheduled; they wait for us
  cta_stamps_begin();
  extern __shared__ __align__(1024) unsigned char smem[];
  const u32 sbase = smem_u32(smem);
  const u32 kv0 = sbase + L::kKv0, kv1 = sbase + L::kKv1, sq = sbase + L::kQ;
  const u32 sp0 = sbase + L::kP0, sp1 = sbase + L::kP1;
  float* s_max0 = reinterpret_cast<float*>(smem + L::kMax0);
  float* s_max1 = reinterpret_cast<float*>(smem + L::kMax1);
  float* s_rowsum = reinterpret_cast<float*>(smem + L::kRowSum);
  int* s_limit = reinterpret_cast<int*>(smem + L::kRowLimit);
  auto bar = [&](int buf, int part) { return sbase + L::kBars + (buf * L::kParts + part) * 8; };

  const int tid = threadIdx.x, wtid = tid % 128, warp = tid / 32, lane = tid % 32;
  // Warpgroup index broadcast from lane 0: provably warp-uniform, so ptxas does not treat
  // the per-warpgroup code paths (which hold all the wgmma) as divergent.
  const int wg = __shfl_sync(0xffffffff, tid / 128, 0);
  // The last warp, likewise provably uniform (recomputed where used: registers are full).
  auto last_warp = [&]() { return __shfl_sync(0xffffffff, threadIdx.x / 32, 0) == kSeesawThreads / 32 - 1; };
  const int t = lane % 4;                             // accumulator fragment column pair
  const int row0 = (warp % 4) * 16 + lane / 4;        // this thread's rows: row0 and row0 + 8
  const int m_block = blockIdx.x, head_kv = blockIdx.y;
  // The part's scheduler record, re-read per request (its ints held across the loop spilled).
  const int* rec = p.sched + blockIdx.z * kSchedRecordInts;
  const float scale = (float)p.scale_log2;
  const int hpk = (int)p.heads_per_kv;
  // Tokens the block table can address, clamped to int (seqlens are int): one register held
  // across the request loop, not two (the pair of a 64-bit product spilled once a request).
  const int kv_cap = (int)min(p.max_blocks * p.page_size, (i64)0x7fffffff);
  const int blocks_per_page = (int)p.page_size / kBlockN;  // page_size % 64 == 0 here

  if (tid == 0) {
    prefetch_tensor_map(&sp.k_latent);
    if (kRope) prefetch_tensor_map(&sp.k_rope);
    if (kQTma) prefetch_tensor_map(&sp.q_latent);
    if (kQTma && kRope) prefetch_tensor_map(&sp.q_rope);
    for (int i = 0; i < 2 * L::kParts; ++i) mbarrier_init(bar(i / L::kParts, i % L::kParts), 1);
    if (kQTma) mbarrier_init(sbase + L::kQBar, 1);
    fence_mbarrier_init();
  }
  // Phase parity of the buffer this warpgroup's S reads (WG0: kv0, WG1: kv1); it flips
  // once per fill, and every fill is waited for by exactly one S of that warpgroup.
  u32 phase = 0;
  u32 q_phase = 0;  // likewise for Q's mbarrier (Q by TMA): once per request
  bool pieces_started = false;  // decode_start_pieces ran (params.cuh)
  const int last = min(rec[2], (int)p.batch - 1);  // the part's last request position
  for (int pos = rec[0]; pos <= last; ++pos) {
    const int req = request_at(p.sched, pos, (int)p.batch, (int)gridDim.z);
    const int seqlen = p.seqlens[req];
    const BlockRange blocks = part_blocks(seqlen, pos, rec[0], rec[1], rec[2], rec[3]);
    const int lo = blocks.lo, hi = blocks.hi;
    if (lo >= hi) continue;
    const int kv_len = min(seqlen, kv_cap);
    const QuerySpan span = query_span(p.cu_seqlens_q, req, (int)p.s_q);
    const int req_rows = span.count * hpk;  // this request's query rows per KV head
    if (m_block * 64 >= req_rows) continue;

    __syncthreads();  // the previous request is done with every shared buffer (and barriers are initialized)
    cta_stamp(pos, rec[0], 0);

    // ---- KV loads, issued by lane 0 of one warp. A block's page id is read ahead
    // (page_of) so the TMA issue never waits on the block table; blocks at or past
    // kv_len, or past the part's range, get page -1, which loads zeros. ----
    auto page_of = [&](int blk) {
      const int tok = blk * kBlockN;
      const int slot = blocks_per_page == 1 ? blk : tok / (int)p.page_size;
      return blk < hi && tok < kv_len ? p.block_table[req * p.bt_batch_stride + slot] : -1;
    };
    // Block `blk` (in page `page`) -> buffer `buf`, one part. Above 64 query rows per KV
    // head (two or more m-block CTAs read each block) the loads are evict-first in L2:
    // 0.4-2.3 % off s_q 2 steps under sustained load (docs/PERF.md v21), 4-7 % off
    // 128-row steps at b = 1-4 back to back, where the partials then stay in L2 for the
    // merge, and neutral at b = 16-128 (v25). At 64 rows or fewer a hint cost 2-5 %, an
    // explicit evict-normal one included (v20, v21, v25): that variant loads without one.
    auto tma = [&](u32 dst, const void* tensor_map, u32 b, int col, int row, int page) {
      if constexpr (kKvEvictFirst) tma_load_4d(dst, tensor_map, b, col, head_kv, row, page, l2_evict_first_policy());
      else tma_load_4d(dst, tensor_map, b, col, head_kv, row, page);
    };
    auto load_kv = [&](int blk, int page, int buf, int part) {
      const int row = blocks_per_page == 1 ? 0 : blk * kBlockN % (int)p.page_size;
      const u32 dst = sbase + (buf ? L::kKv1 : L::kKv0);
      if (part == kRopePart) {
        mbarrier_arrive_expect_tx(bar(buf, part), kSubTileBytes);
        tma(dst + kRopeSub * kSubTileBytes, &sp.k_rope, bar(buf, part), 0, row, page);
        return;
      }
      mbarrier_arrive_expect_tx(bar(buf, part), kVSub * kSubTileBytes);
#pragma unroll
      for (int i = 0; i < kVSub; ++i) {
        const int sub = part * kVSub + i;
        tma(dst + sub * kSubTileBytes, &sp.k_latent, bar(buf, part), sub * 64, row, page);
      }
    };
    // Refills are spread over warps 0-2 of a warpgroup: the next wgmma waits for the
    // slowest warp, so one warp issuing them all delays every batch after a refill.
    auto issuer = [&](int w) { return wtid == 32 * w; };
    // A request's first two blocks, each part in the order its S waits for them: WG0's S
    // reads kv0 0-3, 4-7, rope; WG1's reads kv1 rope, 4-7, 0-3 (s1_gemm, the order its
    // refills come in). In WG0's order kv1's first part landed last, so WG1's first S
    // began only once the whole block was in (this order: s_q 2 4K 0.5-1.5 % faster back
    // to back in three runs, the rest within noise; docs/PERF.md v31).
    auto load_block = [&](int blk, int page, int buf) {
      if (buf == 1) {
        if (kRope) load_kv(blk, page, buf, kRopePart);
        load_kv(blk, page, buf, kRight);
        load_kv(blk, page, buf, kLeft);
      } else {
        load_kv(blk, page, buf, kLeft);
        load_kv(blk, page, buf, kRight);
        if (kRope) load_kv(blk, page, buf, kRopePart);
      }
    };
    if constexpr (kQTma) {
      // Q by TMA, issued ahead of the KV so that it is not queued behind every CTA's 147 KB
      // of KV: a box per 64 columns holds the tile's 64 rows (64 heads of a token, or the
      // KV head's heads for 64 / hpk tokens; past the tensor's tokens it loads zeros, and
      // in a packed ragged q it holds the next request's tokens, rows no result reads).
      if (tid == 0) {
        const int page0 = page_of(lo), page1 = page_of(lo + 1);  // read while Q goes out
        const u32 q_bar = sbase + L::kQBar;
        const int r0 = m_block * 64, head = head_kv * hpk + r0 % hpk, tok = span.first + r0 / hpk;
        const int batch = p.cu_seqlens_q == nullptr ? req : 0;
        mbarrier_arrive_expect_tx(q_bar, 64 * kD * 2);
#pragma unroll
        for (int sub = 0; sub < kDV / 64; ++sub)
          tma_load_4d(sq + sub * kSubTileBytes, &sp.q_latent, q_bar, sub * 64, head, tok, batch);
        if (kRope) tma_load_4d(sq + kRopeSub * kSubTileBytes, &sp.q_rope, q_bar, 0, head, tok, batch);
        load_block(lo, page0, 0);
        if (lo + 1 < hi) load_block(lo + 1, page1, 1);
      }
    } else {
      if (tid == 0) {
        load_block(lo, page_of(lo), 0);
        if (lo + 1 < hi) load_block(lo + 1, page_of(lo + 1), 1);
      }
      // Q: per-thread values recomputed (opaque), not held across the main loop
      load_q_tile<64, kSeesawThreads, kD, kDV>(p, sq, opaque(tid), req, span, req_rows, hpk, m_block, head_kv);
      cp_async_commit_group();
    }
    if (!pieces_started) {  // the combine kernel's CTAs may be scheduled now
      if (p.piece_done && last_warp()) decode_start_pieces(p);
      pieces_started = true;
    }
    if (tid < 64) {  // per-row visible length (end-aligned causal mask)
      const int s_idx = (m_block * 64 + tid) / hpk;
      s_limit[tid] = kCausal ? min(kv_len, seqlen - span.count + 1 + s_idx) : kv_len;
    }
    if constexpr (kQTma) {
      __syncthreads();  // row limits visible to everyone
      mbarrier_wait(sbase + L::kQBar, q_phase);  // Q landed (async-proxy writes, seen by ldmatrix too)
      q_phase ^= 1;
    } else {
      cp_async_wait_all();
      fence_proxy_async_shared();  // cp.async wrote through the generic proxy; wgmma reads via the async one
      __syncthreads();             // Q and row limits visible to everyone
    }

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
    // S (+)= Q K^T over one part of buffer `buf`, after its TMA landed; the rope sub-tile
    // takes Q from registers. The first wgmma of a block starts from zero. Bases go through
    // opaque(): otherwise the compiler hoists the loop-invariant descriptors out of the
    // request loop and spills them.
    auto s_gemm = [&](float (&s)[32], int buf, int part, bool zero_first) {
      const u64 dq = smem_desc(opaque(sq), 0, 1024), dk = smem_desc(opaque(buf ? kv1 : kv0), 0, 1024);
      const int sub_begin = part == kRopePart ? kRopeSub : part * kVSub;
      const int sub_end = part == kRopePart ? kRopeSub + 1 : sub_begin + kVSub;
      mbarrier_wait(bar(buf, part), phase);
#pragma unroll
      for (int sub = sub_begin; sub < sub_end; ++sub) {
        const bool first = zero_first && sub == sub_begin;
        if (kRope && sub == kRopeSub) {
#pragma unroll
          for (int ks = 0; ks < 4; ++ks) {
            const u64 db = desc_plus(dk, sub * kSubTileBytes + ks * 32);
            if (first && ks == 0)
              wgmma_m64n64k16_rs_first(s, q_rope[ks][0], q_rope[ks][1], q_rope[ks][2], q_rope[ks][3], db, T{});
            else
              wgmma_m64n64k16_rs(s, q_rope[ks][0], q_rope[ks][1], q_rope[ks][2], q_rope[ks][3], db, 1, T{});
          }
        } else {
#pragma unroll
          for (int ks = 0; ks < 4; ++ks) {  // +32 bytes = 16 columns inside a swizzle atom
            const u64 da = desc_plus(dq, sub * kSubTileBytes + ks * 32);
            const u64 db = desc_plus(dk, sub * kSubTileBytes + ks * 32);
            if (first && ks == 0) wgmma_m64n64k16_ss_first(s, da, db, T{});
            else wgmma_m64n64k16_ss(s, da, db, 1, T{});
          }
        }
      }
    };
    // O half += P[64 x 64] V[64 tokens x 256 columns]; V = this warpgroup's 4 sub-tiles
    // of a K buffer read MN-major (LBO 8 KB between sub-tiles, +2 KB per 16 tokens).
    auto v_half = [&](u32 kbuf) { return opaque(kbuf + wg * kVSub * kSubTileBytes); };
    auto pv_rs = [&](float (&o)[128], const u32 (&pk)[16], u32 vbase) {
      const u64 dv = smem_desc(vbase, kSubTileBytes, 1024);
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_m64n256k16_rs(o, pk[4 * kk], pk[4 * kk + 1], pk[4 * kk + 2], pk[4 * kk + 3],
                            desc_plus(dv, kk * 16 * 128), T{});
    };
    auto pv_ss = [&](float (&o)[128], u32 pbase, u32 vbase) {
      const u64 dp = smem_desc(opaque(pbase), 0, 1024), dv = smem_desc(vbase, kSubTileBytes, 1024);
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_m64n256k16_ss(o, desc_plus(dp, kk * 32), desc_plus(dv, kk * 16 * 128), 1, T{});
    };

    // ---- softmax pieces (this thread: rows row0, row0 + 8; 16 columns of the block) ----
    // Mask S into x (select, so garbage never survives) and take its row max, scaled
    // into the log2 domain (scale > 0 commutes with max; the exp applies it per element
    // in one FMA). S is only read, never written: ptxas serializes all wgmma (C7515)
    // when ordinary code redefines an accumulator register that a wgmma may still own.
    auto masked_max = [&](const float (&s)[32], int blk, float (&x)[32], float (&mx)[2], bool steady) {
      // Blocks every row of the warp sees whole (all but the last one or two) skip the mask.
      if (steady || __all_sync(0xffffffff, (blk + 1) * kBlockN <= min(s_limit[row0], s_limit[row0 + 8]))) {
#pragma unroll
        for (int k = 0; k < 32; ++k) x[k] = s[k];
      } else {
        const int limit[2] = {s_limit[row0], s_limit[row0 + 8]};
#pragma unroll
        for (int k = 0; k < 32; ++k) {
          const int h = (k / 2) % 2, tok = blk * kBlockN + 8 * (k / 4) + 2 * t + (k % 2);
          x[k] = tok < limit[h] ? s[k] : -__int_as_float(0x7f800000);
        }
      }
      const auto larger = [](float a, float b) { return fmaxf(a, b); };
#pragma unroll
      for (int h = 0; h < 2; ++h) mx[h] = fmaxf(kMaxInit, reduce_row(x, h, larger));
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffff, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffff, mx[h], 2));
        mx[h] *= scale;
      }
    };
    // x <- 2^(x scale - m) in place, added to the row sums l.
    auto exp_rows = [&](float (&x)[32], const float (&m)[2], float (&l)[2]) {
#pragma unroll
      for (int k = 0; k < 32; ++k) x[k] = ex2(fmaf(x[k], scale, -m[(k / 2) % 2]));
#pragma unroll
      for (int h = 0; h < 2; ++h) l[h] += reduce_row(x, h, [](float a, float b) { return a + b; });
    };
    // x packed as RS A fragments: pk[4 kk .. 4 kk + 3] = k-step kk (pk[i] holds row
    // row0 + 8 (i % 2)).
    auto pack_p = [&](const float (&x)[32], u32 (&pk)[16]) {
#pragma unroll
      for (int i = 0; i < 16; ++i) pk[i] = cvt_pack(x[2 * i], x[2 * i + 1], T{});
    };
    // P (64 x 64, 16-bit) into a swizzled K-major tile for the other warpgroup's SS
    // wgmma; 8-column group j of row r sits at chunk j ^ (r % 8): conflict-free.
    // pk[2 j] / pk[2 j + 1] are the 8 x 8 matrices (rows 0-7 / 8-15 of the warp's slice,
    // columns 8 j ..) already in stmatrix's fragment layout, so one stmatrix.x4 stores four
    // of them: 4 warp instructions instead of 16 st.shared (as FlashMLA stores P). Lane l
    // gives the address of row l % 8 of matrix l / 8: 8 rows down for the odd matrices,
    // the next column group for matrices 2 and 3.
    auto store_p = [&](const u32 (&pk)[16], u32 pbase) {
      const u32 ltid = opaque(tid), r = (ltid / 32 % 4) * 16 + ltid % 16;  // lane % 8 + 8 ((lane / 8) % 2)
      const u32 rb = pbase + r * 128, gx = (r % 8) * 16, hi = ltid / 16 % 2;
#pragma unroll
      for (int jj = 0; jj < 4; ++jj)
        stmatrix_x4(rb + ((16 * (2 * jj + hi)) ^ gx), pk[4 * jj], pk[4 * jj + 1], pk[4 * jj + 2], pk[4 * jj + 3]);
    };
    // A warpgroup's P: exp against m (row sums into l), packed for this warpgroup's RS PV
    // and stored for the other one's SS PV, made visible to the async proxy, and signalled.
    auto publish_p = [&](float (&x)[32], const float (&m)[2], float (&l)[2], u32 (&pk)[16], u32 pbase, int bar_p) {
      exp_rows(x, m, l);
      pack_p(x, pk);
      store_p(pk, pbase);
      fence_proxy_async_shared();
      bar_arrive(bar_p, 256);
    };
    auto rescale = [&](float (&o)[128], const float (&sc)[2]) {
      // Once the running max settles most blocks leave it unchanged: skip the 128
      // multiplies (they sit right before a PV wgmma) when no row of the warp moved.
      if (__all_sync(0xffffffff, sc[0] == 1.f && sc[1] == 1.f)) return;
#pragma unroll
      for (int i = 0; i < 128; ++i) o[i] *= sc[(i / 2) % 2];
    };
    // A request's last block may end mid-block: zero this warpgroup's V half in rows past
    // kv_len (the page's tail may hold NaN) and publish that to its own wgmma.
    auto zero_v_tail = [&](int blk, u32 kbuf) {
      const int valid = kv_len - blk * kBlockN;
      if (valid >= kBlockN) return;  // warpgroup-uniform
      const u32 base = opaque(kbuf + wg * kVSub * kSubTileBytes);
      for (int i = wtid; i < (kBlockN - max(valid, 0)) * kVSub * 8; i += 128) {
        const int row = max(valid, 0) + i / (kVSub * 8), sub = (i / 8) % kVSub, chunk = i % 8;
        asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(base + sub * kSubTileBytes + row * 128 + chunk * 16),
                     "r"(0) : "memory");
      }
      fence_proxy_async_shared();
      bar_sync(kBarWg + wg, 128);
    };

    // (32-bit clock and sums: a request's sums stay far below 2^32 cycles)
    // (in warp 0's epilogue row-sum slots: it writes them only after its flush)
    u32* trace_slots = reinterpret_cast<u32*>(smem + L::kRowSum);
    auto traced = [&]() {
      return FLASHMLA_SEESAW_TRACE && tid == 0 && (blockIdx.x | blockIdx.y | blockIdx.z) == 0;
    };
    // Trace builds only (the default build's source stays token for token as it was, so
    // its SASS does too): the pair each warpgroup is at in its request, and whether it is
    // one of the traced ones.
#if FLASHMLA_SEESAW_TRACE
    __shared__ int trace_pair[2];
    auto pair_traced = [&](int w, int event) {
      if (event == 0) ++trace_pair[w];
      return trace_pair[w] >= FLASHMLA_SEESAW_TRACE_PAIRS_FROM && trace_pair[w] <= FLASHMLA_SEESAW_TRACE_PAIRS_TO;
    };
#endif
    auto mark = [&](int event) {
      if (!traced() || !((FLASHMLA_SEESAW_TRACE_MASK >> event) & 1)) return;
#if FLASHMLA_SEESAW_TRACE
      if (!pair_traced(0, event)) return;
#endif
      u32 now;
      asm volatile("mov.u32 %0, %%clock;\n" : "=r"(now));
      if (event == 0) trace_slots[0] = now, trace_slots[kTraceEvents - 1] += 1;
      else trace_slots[event] += now - trace_slots[0];
    };
    auto trace_begin = [&]() {
      if (traced())
        for (int e = 0; e < kTraceEvents; ++e) trace_slots[e] = 0;
#if FLASHMLA_SEESAW_TRACE
      if (traced()) trace_pair[0] = -1;
#endif
    };
    auto trace_end = [&]() {
      if (traced())
        for (int e = 1; e < kTraceEvents; ++e) ((long long*)p.k_scale)[e] += trace_slots[e];
    };
    // Warpgroup 1 (its thread 0) in slots of its own (static smem, trace builds only),
    // against its own pair start; event 1 sums (its start - WG0's start of the same pair),
    // read at its sync on Max0 (WG0 cannot start the next pair before WG1's Max1).
#if FLASHMLA_SEESAW_TRACE
    __shared__ u32 wg1_slots[kTraceEvents];
#else
    u32* wg1_slots = nullptr;
#endif
    auto traced1 = [&]() {
      return FLASHMLA_SEESAW_TRACE && tid == 128 && (blockIdx.x | blockIdx.y | blockIdx.z) == 0;
    };
    auto mark1 = [&](int event) {
      if (!traced1()) return;
#if FLASHMLA_SEESAW_TRACE
      if (!pair_traced(1, event)) return;
#endif
      u32 now;
      asm volatile("mov.u32 %0, %%clock;\n" : "=r"(now));
      if (event == 0) wg1_slots[0] = now, wg1_slots[kTraceEvents - 1] += 1;
      else if (event == 1) wg1_slots[1] += wg1_slots[0] - trace_slots[0];
      else wg1_slots[event] += now - wg1_slots[0];
    };
    auto trace1_begin = [&]() {
      if (traced1())
        for (int e = 0; e < kTraceEvents; ++e) wg1_slots[e] = 0;
#if FLASHMLA_SEESAW_TRACE
      if (traced1()) trace_pair[1] = -1;
#endif
    };
    auto trace1_end = [&]() {
      if (traced1())  // signed: event 1 may be negative
        for (int e = 1; e < kTraceEvents; ++e) ((long long*)p.k_scale)[kTraceEvents + e] += (int)wg1_slots[e];
    };

    float o[128];  // this warpgroup's O half, m64n256 accumulator layout
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    float m_run[2] = {kMaxInit, kMaxInit}, l_run[2] = {0.f, 0.f};
    float s[32];  // S of this warpgroup's current block
    // The running max takes in a block's row max mx: s = 2^(old - new) rescales the row
    // sums now (O later, by the caller), and the new max goes to the other warpgroup.
    // Lazily: only a max above the running one by more than kMaxSlack (log2 units) moves
    // it, so P = 2^(S - m) may reach 2^kMaxSlack (exact in 16 bits, far from overflow in
    // the fp32 sums) and O is rescaled about once per request instead of at a quarter of
    // the blocks (a warp rescales when any of its 16 rows moves).
    auto raise_max = [&](const float (&mx)[2], float (&sc)[2], float* s_max, int bar_max) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float m = mx[h] > m_run[h] + kMaxSlack ? mx[h] : m_run[h];
        sc[h] = ex2(m_run[h] - m);
        l_run[h] *= sc[h];
        m_run[h] = m;
      }
      if (t == 0) s_max[row0] = m_run[0], s_max[row0 + 8] = m_run[1];
      bar_arrive(bar_max, 256);
    };

    // Steady pairs: both blocks seen whole by every row (row 0 sees the fewest keys) and
    // both blocks of the next pair present, in ranges of kSteadyMinBlocks or more: a short
    // range runs the general pair only, whose code each SM fetches anyway (b = 1 h16 32K,
    // 4 blocks a part: 1.2 us faster a step; PERF.md v19). Both warpgroups decide alike,
    // so their barriers still pair up.
    auto steady_pair = [&](int blk) {
      return hi - lo >= kSteadyMinBlocks && blk + 3 < hi && (blk + 2) * kBlockN <= s_limit[0];
    };
    if (wg == 0) {
      // ================= warpgroup 0: even blocks, O columns 0-255 =================
      trace_begin();
      wgmma_fence();
      s_gemm(s, 0, kLeft, true);
      s_gemm(s, 0, kRight, false);
      if (kRope) s_gemm(s, 0, kRopePart, false);
      wgmma_commit_group();
      phase ^= 1;
      wgmma_wait_group<0>();
      cta_stamp(pos, rec[0], 1);
      auto pair = [&](int blk, bool steady) {
        const bool has1 = steady || blk + 1 < hi, next0 = steady || blk + 2 < hi, next1 = steady || blk + 3 < hi;
        int page2 = -1, page3 = -1;  // read now, used later in the pair
        if (lane == 0) page2 = page_of(blk + 2), page3 = page_of(blk + 3);
        float x[32], mx[2], s0[2];
        mark(0);
        masked_max(s, blk, x, mx, steady);
        raise_max(mx, s0, s_max0, kBarMax0);
        const float m0[2] = {m_run[0], m_run[1]};
        mark(1);
        u32 pk[16];
        // P0 against m0: WG1 brings its product to m1 itself
        publish_p(x, m0, l_run, pk, sp0, kBarP0);
        mark(5);
        if (!steady) zero_v_tail(blk, kv0);
        rescale(o, s0);
        wgmma_fence();
        pv_rs(o, pk, v_half(kv0));  // c
        wgmma_commit_group();
        mark(2);
        wgmma_wait_group<0>();  // c done: kv0 sub-tiles 0-3 free (S0 finished before it)
        mark(3);
        // Refill before the wait on WG1's max, which can take a PV's time
        if (next0 && issuer(1)) load_kv(blk + 2, page2, 0, kLeft);
        if (kRope && next0 && issuer(0)) load_kv(blk + 2, page2, 0, kRopePart);
        if (has1) {
          float s1[2];
          bar_sync(kBarMax1, 256);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            m_run[h] = s_max1[row0 + 8 * h];
            s1[h] = ex2(m0[h] - m_run[h]);
            l_run[h] *= s1[h];
          }
          mark(4);
          if (!steady) zero_v_tail(blk + 1, kv1);  // S1 finished before WG1's arrive on Max1
          bar_sync(kBarP1, 256);
          mark(6);
          rescale(o, s1);
          wgmma_fence();
          pv_ss(o, sp1, v_half(kv1));  // h
          wgmma_commit_group();
          mark(7);
        }
        if (next0) {  // S of the next even block: the sub-tiles refilled first, first
          wgmma_fence();
          if (kRope) s_gemm(s, 0, kRopePart, true);
          s_gemm(s, 0, kLeft, !kRope);
          wgmma_commit_group();
          mark(8);
        }
        if (has1) {
          if (next0) wgmma_wait_group<1>();
          else wgmma_wait_group<0>();
          // h done: kv1 sub-tiles 0-3 and sP1 free
          mark(9);
          if (next1 && issuer(2)) load_kv(blk + 3, page3, 1, kLeft);
        }
        if (next0) {
          s_gemm(s, 0, kRight, false);
          wgmma_commit_group();
          phase ^= 1;
          mark(10);
        }
        wgmma_wait_group<0>();  // outside the branches: ptxas must see no wgmma in flight here
        mark(11);
      };
      int blk = lo;
      for (; steady_pair(blk); blk += 2) pair_stamp(), pair(blk, true);
      for (; blk < hi; blk += 2) pair_stamp(), pair(blk, false);
      pair_stamp();
      trace_end();
      cta_stamp(pos, rec[0], 2);
    } else {
      // ================= warpgroup 1: odd blocks, O columns 256-511 =================
      // S of the odd block in kv1, in refill order: rope, 4-7 (WG1's), 0-3 (WG0's).
      auto s1_gemm = [&]() {
        wgmma_fence();
        if (kRope) s_gemm(s, 1, kRopePart, true);
        s_gemm(s, 1, kRight, !kRope);
        s_gemm(s, 1, kLeft, false);
        wgmma_commit_group();
        phase ^= 1;
      };
      trace1_begin();
      if (lo + 1 < hi) s1_gemm();
      wgmma_wait_group<0>();
      auto pair = [&](int blk, bool steady) {
        const bool has1 = steady || blk + 1 < hi, next0 = steady || blk + 2 < hi, next1 = steady || blk + 3 < hi;
        int page2 = -1, page3 = -1;  // read now, used later in the pair
        if (lane == 0) page2 = page_of(blk + 2), page3 = page_of(blk + 3);
        mark1(0);
        bar_sync(kBarMax0, 256);
        mark1(1);
        mark1(2);
        float m0[2], s0[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          m0[h] = s_max0[row0 + 8 * h];
          s0[h] = ex2(m_run[h] - m0[h]);
          l_run[h] *= s0[h];
          m_run[h] = m0[h];
        }
        rescale(o, s0);                      // O_R: m -> m0, the frame of P0
        if (!steady) zero_v_tail(blk, kv0);  // S0 finished before WG0's arrive on Max0
        bar_sync(kBarP0, 256);
        mark1(3);
        wgmma_fence();
        pv_ss(o, sp0, v_half(kv0));  // g: needs nothing of this warpgroup's softmax
        wgmma_commit_group();
        mark1(4);
        if (has1) {
          float x[32], mx[2], s1[2];
          masked_max(s, blk + 1, x, mx, steady);
          raise_max(mx, s1, s_max1, kBarMax1);  // m_run is m0 here
          mark1(5);
          u32 pk[16];
          publish_p(x, m_run, l_run, pk, sp1, kBarP1);
          mark1(6);
          if (!steady) zero_v_tail(blk + 1, kv1);
          // O_R: m0 -> m1, g's product included, so g must land first (rare: the max moved)
          if (!__all_sync(0xffffffff, s1[0] == 1.f && s1[1] == 1.f)) {
            wgmma_wait_group<0>();
#pragma unroll
            for (int i = 0; i < 128; ++i) o[i] *= s1[(i / 2) % 2];
          }
          wgmma_fence();
          pv_rs(o, pk, v_half(kv1));  // e
          wgmma_commit_group();
          mark1(7);
          wgmma_wait_group<1>();  // g done: kv0 sub-tiles 4-7 and sP0 free
          mark1(8);
          if (next0 && issuer(1)) load_kv(blk + 2, page2, 0, kRight);
          if (kRope && next1 && issuer(0)) load_kv(blk + 3, page3, 1, kRopePart);
          wgmma_wait_group<0>();  // e done: kv1 sub-tiles 4-7 free
          mark1(9);
          if (next1 && issuer(2)) load_kv(blk + 3, page3, 1, kRight);
        } else {
          wgmma_wait_group<0>();  // g done
          if (next0 && issuer(1)) load_kv(blk + 2, page2, 0, kRight);
        }
        if (next1) s1_gemm();
        mark1(10);
        wgmma_wait_group<0>();
        mark1(11);
      };
      int blk = lo;
      for (; steady_pair(blk); blk += 2) pair(blk, true);
      for (; blk < hi; blk += 2) pair(blk, false);
      trace1_end();
    }

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
      const int split = pos == rec[0] ? rec[4] : p.num_splits[req];
      cta_stamp(pos, rec[0], 3);
      if (n_pieces == 1) {
        // The final 16-bit rows leave by bulk copies (FlashMLA's way; 3 % faster at h128
        // 4K than stores from registers, PERF.md v18): each warp stages its 16 rows of
        // this warpgroup's 256 columns by stmatrix (matrices rows +0 / +8 x column groups
        // 2 jj, 2 jj + 1), and 16 of its lanes hand one row each to the TMA unit, which
        // writes whole lines while the warps go on. fp32 partials stay register stores
        // (as bulk copies no faster, and slower in some runs).
        const int elane = etid % 32, wrow0 = (etid / 32 % 4) * 16;
        const u32 rb = sbase + L::kStage + (wrow0 + elane % 16) * L::kStageRow + wg * 512 + elane / 16 * 16;
#pragma unroll
        for (int jj = 0; jj < 16; ++jj)
          stmatrix_x4(rb + 32 * jj, cvt_pack(o[8 * jj] * inv[0], o[8 * jj + 1] * inv[0], T{}),
                      cvt_pack(o[8 * jj + 2] * inv[1], o[8 * jj + 3] * inv[1], T{}),
                      cvt_pack(o[8 * jj + 4] * inv[0], o[8 * jj + 5] * inv[0], T{}),
                      cvt_pack(o[8 * jj + 6] * inv[1], o[8 * jj + 7] * inv[1], T{}));
        fence_proxy_async_shared();  // generic writes, read by the bulk copies (async proxy)
        __syncwarp();
        const int r = m_block * 64 + wrow0 + elane;
        const QuerySpan span = query_span(p.cu_seqlens_q, req, (int)p.s_q);
        if (elane < 16 && r < span.count * hpk) {
          const int tok = span.first + r / hpk, hq = head_kv * hpk + r % hpk;
          bulk_store((u16*)p.out + req * p.o_batch_stride + tok * p.o_seq_stride + hq * p.o_head_stride + wg * 256,
                     sbase + L::kStage + (wrow0 + elane) * L::kStageRow + wg * 512, 512);
          bulk_commit_group();
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = m_block * 64 + row0 + 8 * h;
        const QuerySpan span = query_span(p.cu_seqlens_q, req, (int)p.s_q);
        if (r >= span.count * hpk) continue;
        const int tok = span.first + r / hpk, hq = head_kv * hpk + r % hpk;
        if (n_pieces == 1) {  // the whole request is in this part: its rows left above, here its lse
          if (wg == 0 && t == 0)
            p.lse[req * p.lse_batch_stride + hq * p.lse_head_stride + tok * p.lse_seq_stride] =
                empty[h] ? __int_as_float(0x7f800000) : (__log2f(l_run[h]) + m_run[h]) * kLn2;
        } else {  // one piece of a split request: fp32 partial, lse in the log2 domain
          const i64 prow = ((i64)split * p.h_kv + head_kv) * p.rows + r;
          float* dst = p.o_accum + prow * kDV + wg * 256 + 2 * t;
          // Kept in L2 (evict_last) for the merge, which reads each line once and then
          // discards it: no DRAM write or read for partials that stay (combine.cuh). A
          // row this piece saw no key of weighs 0 there (lse -inf, values 0): evict first.
          const u64 policy = empty[h] ? l2_evict_first_policy() : l2_evict_last_policy();
#pragma unroll
          for (int j = 0; j < 32; ++j)
            st_global_f2_hint(dst + 8 * j, o[4 * j + 2 * h] * inv[h], o[4 * j + 2 * h + 1] * inv[h], policy);
          if (wg == 0 && t == 0)
            p.lse_accum[prow] = empty[h] ? -__int_as_float(0x7f800000) : __log2f(l_run[h]) + m_run[h];
        }
      }
      if (n_pieces > 1 && p.piece_done) decode_publish_piece(p, split, last_warp());
    }
    // The staging area is the next request's KV buffers: read out before its first loads
    // (after the __syncthreads that starts it) and before the CTA exits.
    bulk_wait_read();
    cta_stamp(pos, rec[0], 4);
  }
  cta_stamps_end(sp.p);
}

}  // namespace flashmla
