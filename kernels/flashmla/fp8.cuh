// FP8 KV caches for the decode kernel: the staging layout and the dequantization into
// the 16-bit swizzled KV tile, so the MMAs (and all the compute code) stay bf16 / fp16.
//
// Two cache formats (KvFormat):
//   kKvFp8      per-tensor e4m3: each token is kD e4m3 values (latent, then rope), one
//               fp32 scale for the whole cache. e4m3 is a subset of bf16 and of fp16, so
//               the tile holds the fp8 values exactly and the scale is applied in fp32
//               outside the MMAs: S = (q . k8) * (k_scale * softmax_scale), O = (P V8) * k_scale.
//   kKvFp8Ds    FlashMLA's 656-byte token (DeepSeek V3.2's "FP8 with scale"): 512 e4m3 latent
//               values, 4 fp32 scales (one per 128 values), 64 bf16 rope values. The tile
//               gets bf16(e4m3 * scale): the value FlashMLA's dequantizer produces (up to one
//               bf16 ulp, rarely: split_scale).
//
// Pipeline (decode.cuh): the raw bytes of a 64-token block are gathered with cp.async into
// one of two staging buffers (zero-filled past the sequence end or for an invalid page,
// so NaN bytes of a page tail never reach the tile), and at the top of an iteration the
// block is converted into the single 16-bit KV tile while the next block's bytes are
// still in flight.
#pragma once
#include "ptx.cuh"

namespace flashmla {

enum KvFormat : int {
  kKvSame = 0,  // the cache has q's 16-bit dtype
  kKvFp8 = 1,   // per-tensor scaled e4m3, kD bytes per token
  kKvFp8Ds = 2, // 656-byte tokens: 512 e4m3 + 4 fp32 scales + 64 bf16
};

// Staging geometry of one KV token. The pitch is a multiple of 16 (cp.async chunks) with
// pitch % 128 == 64, so two consecutive tokens' 64-byte pieces cover all 32 banks (see
// dequant_block's thread mapping).
template <int kKv, int kD>
struct Fp8Stage {
  static constexpr int kLatent = 512;                               // e4m3 latent values
  static constexpr int kRowBytes = kKv == kKvFp8Ds ? 656 : kD;      // bytes per token in the cache
  static constexpr int kScaleOffset = 512;                          // kKvFp8Ds: 4 fp32 scales
  static constexpr int kRopeOffset = 528;                           // kKvFp8Ds: 64 bf16 rope values
  static constexpr int kChunks = kRowBytes / 16;                    // 16-byte cp.async chunks
  static constexpr int kPitch = (kRowBytes + 63) / 128 * 128 + 64;  // 512 -> 576, 576 -> 576, 656 -> 704
  static constexpr int kBytes = kKv == kKvSame ? 0 : 64 * kPitch;   // one 64-token block
  static_assert(kKv == kKvSame || kRowBytes % 16 == 0, "cache rows are whole 16-byte chunks");
  static_assert(kKv != kKvFp8Ds || kD == 576, "the 656-byte layout is d = 576 (512 latent + 64 rope)");
};

// Two staging buffers (blocks blk and blk + 1 in flight), 1024-byte multiples so the KV
// tile after them keeps its swizzle-atom alignment. Empty for 16-bit caches.
template <int kBytes>
struct StageSmem {
  static_assert(kBytes % 1024 == 0, "staging buffers keep the tiles after them 1024-byte aligned");
  unsigned char stage[2][kBytes];
};
template <>
struct StageSmem<0> {};

// ---- conversions ------------------------------------------------------------------------
// cvt.rn.f16x2.e4m3x2 (sm_89+): two e4m3 (low byte -> low half) to two fp16, exact.
__device__ __forceinline__ void e4m3x4_to_f16x2x2(u32 w, u32& lo, u32& hi) {
  asm("{\n.reg .b16 l, h;\nmov.b32 {l, h}, %2;\ncvt.rn.f16x2.e4m3x2 %0, l;\ncvt.rn.f16x2.e4m3x2 %1, h;\n}\n"
      : "=r"(lo), "=r"(hi) : "r"(w));
}
// fp16 pair -> bf16 pair, exact for values that came from e4m3 (fp16 exponent field 0 or
// >= 6, mantissa in the top 3 bits): moving the bits gives x * 2^-112 as a normal bf16,
// and one bf16x2 multiply by 2^112 (0x7780) restores x. No subnormal is ever formed.
__device__ __forceinline__ u32 f16x2_to_bf16x2_exact(u32 h) {
  const u32 bits = (h & 0x80008000u) | ((h >> 3) & 0x0fff0fffu);
  u32 r;
  asm("mul.rn.bf16x2 %0, %1, %2;\n" : "=r"(r) : "r"(bits), "r"(0x77807780u));
  return r;
}

// A group scale s as two bf16 pairs, hi = bf16(s) and lo = bf16(s - hi), so that
// x * s = fma(x, hi, x * lo) in bf16x2 arithmetic: one rounding of x * s up to a 2^-17
// relative perturbation (so it can differ from float(x) * s rounded to bf16 by one ulp,
// rarely). This keeps fp32 -> bf16 conversions (a quarter-rate pipe, FlashMLA's
// deep-dive counts them as the dequantization bottleneck) out of the per-value work.
struct ScaleBf16x2 {
  u32 hi, lo;
};
__device__ __forceinline__ ScaleBf16x2 split_scale(float s) {
  ScaleBf16x2 r;
  r.hi = cvt_pack(s, s, bf16_t{});
  const float hi = __uint_as_float(r.hi << 16);
  r.lo = cvt_pack(s - hi, s - hi, bf16_t{});
  return r;
}
__device__ __forceinline__ u32 scale_bf16x2(u32 x, ScaleBf16x2 s) {
  u32 t, r;
  asm("mul.rn.bf16x2 %0, %1, %2;\n" : "=r"(t) : "r"(x), "r"(s.lo));
  asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(r) : "r"(x), "r"(s.hi), "r"(t));
  return r;
}

// Four e4m3 values (one u32, lowest byte first) -> two packed 16-bit pairs of type T.
// kScaled: times the group scale (the 656-byte layout, bf16 only).
template <bool kScaled>
__device__ __forceinline__ void dequant4(u32 w, ScaleBf16x2 scale, u32& a, u32& b, bf16_t) {
  u32 lo, hi;
  e4m3x4_to_f16x2x2(w, lo, hi);
  a = f16x2_to_bf16x2_exact(lo);
  b = f16x2_to_bf16x2_exact(hi);
  if constexpr (kScaled) {
    a = scale_bf16x2(a, scale);
    b = scale_bf16x2(b, scale);
  }
}
template <bool kScaled>
__device__ __forceinline__ void dequant4(u32 w, ScaleBf16x2, u32& a, u32& b, fp16_t) {
  static_assert(!kScaled, "the 656-byte layout has a bf16 rope part: fp16 queries are not supported");
  e4m3x4_to_f16x2x2(w, a, b);
}

__device__ __forceinline__ uint4 lds128(u32 addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}
__device__ __forceinline__ void sts128(u32 addr, u32 a, u32 b, u32 c, u32 d) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(a), "r"(b), "r"(c), "r"(d));
}

// Convert one staged 64-token block into the 16-bit KV tile (kD columns in 64-column
// swizzled sub-tiles of 64 rows x 128 bytes, 16-byte chunk j of row r at (j ^ r % 8)).
//
// Latent: thread -> one token, 8 chunks of 16 e4m3 values (chunk c = 4 i + tid % 4, i.e.
// latent columns 16c..16c+15 = sub-tile i, 16-bit chunks 2c % 8 and 2c % 8 + 1). Lanes
// 4q..4q+3 of a warp share token 2 (q / 2 + 4 warp) + q % 2, so each 8-lane phase reads
// 2 x 64 bytes half a pitch apart (all banks) and writes 8 distinct chunk positions
// (the two tokens' rows XOR with row % 8 differing in bit 0).
template <int kKv, int kD, typename T>
__device__ __forceinline__ void dequant_block(u32 tile, u32 stage, int tid) {
  using S = Fp8Stage<kKv, kD>;
  constexpr bool kScaled = kKv == kKvFp8Ds;
  constexpr int kSubTile = 64 * 128;
  const int lane = tid % 32, warp = tid / 32, cl = lane % 4;
  const int tok = 2 * (lane / 8 + 4 * warp) + (lane / 4) % 2;
  const u32 src = stage + tok * S::kPitch + cl * 16;
  const u32 dst = tile + tok * 128;
  const u32 xa = ((2 * cl) ^ (tok % 8)) * 16, xb = ((2 * cl + 1) ^ (tok % 8)) * 16;
  ScaleBf16x2 scales[4] = {};
  if constexpr (kScaled) {
    const uint4 s = lds128(stage + tok * S::kPitch + S::kScaleOffset);
    scales[0] = split_scale(__uint_as_float(s.x));
    scales[1] = split_scale(__uint_as_float(s.y));
    scales[2] = split_scale(__uint_as_float(s.z));
    scales[3] = split_scale(__uint_as_float(s.w));
  }
#pragma unroll
  for (int i = 0; i < S::kLatent / 64; ++i) {  // 8 chunks of 16 values
    const uint4 w = lds128(src + i * 64);
    const ScaleBf16x2 scale = scales[i / 2];  // chunk 4i + cl lies in 128-value group i / 2
    u32 r[8];
    dequant4<kScaled>(w.x, scale, r[0], r[1], T{});
    dequant4<kScaled>(w.y, scale, r[2], r[3], T{});
    dequant4<kScaled>(w.z, scale, r[4], r[5], T{});
    dequant4<kScaled>(w.w, scale, r[6], r[7], T{});
    sts128(dst + i * kSubTile + xa, r[0], r[1], r[2], r[3]);
    sts128(dst + i * kSubTile + xb, r[4], r[5], r[6], r[7]);
  }
  if constexpr (kKv == kKvFp8 && kD > S::kLatent) {
    // e4m3 rope (columns 512..575): thread -> token tid / 4, 16 values (chunk 32 + tid % 4).
    static_assert(kD - S::kLatent == 64, "per-tensor rope part: 64 columns");
    const int rt = tid / 4;
    const uint4 w = lds128(stage + rt * S::kPitch + S::kLatent + cl * 16);
    u32 r[8];
    dequant4<false>(w.x, {}, r[0], r[1], T{});
    dequant4<false>(w.y, {}, r[2], r[3], T{});
    dequant4<false>(w.z, {}, r[4], r[5], T{});
    dequant4<false>(w.w, {}, r[6], r[7], T{});
    const u32 d = tile + 8 * kSubTile + rt * 128;
    sts128(d + (((2 * cl) ^ (rt % 8)) * 16), r[0], r[1], r[2], r[3]);
    sts128(d + (((2 * cl + 1) ^ (rt % 8)) * 16), r[4], r[5], r[6], r[7]);
  }
  if constexpr (kKv == kKvFp8Ds) {
    // bf16 rope (128 bytes at 528): a plain copy, thread -> chunk tid % 8 of tokens
    // tid / 8 and tid / 8 + 32 (8 lanes read one token's 128 contiguous bytes).
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int rt = tid / 8 + 32 * j, ch = tid % 8;
      const uint4 v = lds128(stage + rt * S::kPitch + S::kRopeOffset + ch * 16);
      sts128(tile + 8 * kSubTile + rt * 128 + ((ch ^ (rt % 8)) * 16), v.x, v.y, v.z, v.w);
    }
  }
}

}  // namespace flashmla
