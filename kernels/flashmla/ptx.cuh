// Thin wrappers over the PTX instructions the kernels use, each named after its
// instruction (PTX ISA: https://docs.nvidia.com/cuda/parallel-thread-execution/).
// No CUDA toolkit header is included anywhere: NVRTC's built-ins and inline PTX are
// all we need, which keeps a cold compile short and the wheel free of header deps.
#pragma once

namespace flashmla {

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

// Element-type tags; data is moved as raw 16-bit words and only the MMA and the
// float -> 16-bit conversion know the format.
struct bf16_t { u16 bits; };
struct fp16_t { u16 bits; };

constexpr float kLn2 = 0.6931471805599453f;

// ---- shared-memory addressing -------------------------------------------------------
__device__ __forceinline__ u32 smem_u32(const void* ptr) {
  u32 addr;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(addr) : "l"(ptr));
  return addr;
}

// x unchanged, but opaque to the compiler: values derived from it are computed where they
// are used instead of being hoisted out of loops and held in (or spilled from) registers.
// For shared-memory bases whose descriptors and addresses are loop-invariant.
__device__ __forceinline__ u32 opaque(u32 x) {
  asm volatile("" : "+r"(x));
  return x;
}

// ---- cp.async (Ampere-style asynchronous global -> shared copies) ---------------------
// src_bytes = 0 reads nothing and fills the 16 bytes with zeros: that is how rows past a
// sequence end never bring garbage (or NaN) into shared memory.
__device__ __forceinline__ void cp_async_16(u32 dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit_group() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
template <int N>  // until at most N of this thread's most recent groups are pending
__device__ __forceinline__ void cp_async_wait_group() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// ---- ldmatrix: four 8x8 b16 matrices per warp ----------------------------------------
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x2(u32 (&r)[2], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}
// The inverse of ldmatrix_x4 (sm_90): four 8x8 16-bit matrices, one register each in the
// mma fragment layout (lane l: row l / 4, columns 2 (l % 4), + 1), to the rows whose
// addresses lanes 0-7, 8-15, 16-23, 24-31 give.
__device__ __forceinline__ void stmatrix_x4(u32 addr, u32 r0, u32 r1, u32 r2, u32 r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n"
               ::"r"(addr), "r"(r0), "r"(r1), "r"(r2), "r"(r3) : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// ---- mma.sync m16n8k16, fp32 accumulate ----------------------------------------------
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1, bf16_t) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1, fp16_t) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---- float pair -> packed 16-bit pair (lo in the low half) ---------------------------
__device__ __forceinline__ u32 cvt_pack(float lo, float hi, bf16_t) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ u32 cvt_pack(float lo, float hi, fp16_t) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// ---- math ----------------------------------------------------------------------------
__device__ __forceinline__ float ex2(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
  return r;
}

// ---- programmatic dependent launch (sm_90): no-ops when launched without it --------
// The next kernel in the stream may be scheduled once every CTA of this one has called
// this (or exited).
__device__ __forceinline__ void grid_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;\n" ::); }
// Wait until the previous kernel in the stream has completed and its writes are visible.
__device__ __forceinline__ void grid_dependency_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }

// ---- flags between kernels running at once (gpu scope) ---------------------------------
// A release store is ordered after every write this thread saw before it; an acquire
// load before every access after it (its SASS drops the SM's L1, which other SMs'
// writes do not update). Neither goes through L1.
__device__ __forceinline__ void st_release_gpu(u32* ptr, u32 v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;\n" ::"l"(ptr), "r"(v) : "memory");
}
__device__ __forceinline__ u32 ld_acquire_gpu(const u32* ptr) {
  u32 v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(ptr) : "memory");
  return v;
}
// ---- named barriers: sync a subset of warps (id 0 is __syncthreads) -----------------
__device__ __forceinline__ void bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Signal a named barrier without waiting (producer side of a bar.sync by other warps);
// the memory accesses before it are ordered before whatever follows the matching bar.sync.
__device__ __forceinline__ void bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// ---- mbarriers and TMA (sm_90): bulk tensor copies that complete on a barrier -------
// A barrier counts one arrival (the thread that issues the copies) plus the bytes the
// copies promise (expect_tx); its phase flips when both are in. Waiters spin on the
// parity of the phase they wait for, starting at 0.
__device__ __forceinline__ void mbarrier_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes the inits visible to the async proxy (the TMA unit) too; a CTA barrier follows.
__device__ __forceinline__ void fence_mbarrier_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void mbarrier_arrive_expect_tx(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbarrier_wait(u32 bar, u32 parity) {
  asm volatile(
      "{\n.reg .pred done;\nretry:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra retry;\n}\n" ::"r"(bar), "r"(parity) : "memory");
}
// One box of a 4-D tensor map (encoded on the host, passed as a __grid_constant__
// parameter) into shared memory at dst; coordinates innermost first, in elements. Box
// parts outside the tensor are filled with zeros and still count their bytes.
__device__ __forceinline__ void tma_load_4d(u32 dst, const void* tensor_map, u32 bar, int c0, int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];\n"
      ::"r"(dst), "l"(tensor_map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar) : "memory");
}
// The same with an L2 eviction policy for the lines it reads (createpolicy, below).
__device__ __forceinline__ void tma_load_4d(u32 dst, const void* tensor_map, u32 bar, int c0, int c1, int c2, int c3,
                                            u64 l2_policy) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, {%2, %3, %4, %5}], [%6], %7;\n"
      ::"r"(dst), "l"(tensor_map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar), "l"(l2_policy) : "memory");
}
__device__ __forceinline__ void prefetch_tensor_map(const void* tensor_map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(tensor_map) : "memory");
}
// L2 eviction priorities for loads and stores: evict_last lines (kept until a later kernel
// reads them) go after every evict_normal line; evict_first lines go first.
__device__ __forceinline__ u64 l2_evict_last_policy() {
  u64 policy;
  asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}
__device__ __forceinline__ u64 l2_evict_first_policy() {
  u64 policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}
__device__ __forceinline__ void st_global_f2_hint(float* ptr, float a, float b, u64 policy) {
  asm volatile("st.global.L2::cache_hint.v2.f32 [%0], {%1, %2}, %3;\n" ::"l"(ptr), "f"(a), "f"(b), "l"(policy) : "memory");
}
// Bulk copy of `bytes` (a multiple of 16; both addresses 16-byte aligned) from shared to
// global memory by the TMA unit, in the issuing thread's bulk group: the warp goes on
// while the copy drains. The source may be overwritten once bulk_wait_read returns; the
// writes complete before the grid does, so later work in the stream sees them.
__device__ __forceinline__ void bulk_store(void* dst, u32 src, u32 bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(dst), "r"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bulk_commit_group() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
// Drop a 128-byte L2 line (128-byte aligned) without writing it back: its contents
// become undefined, and a dirty line costs no DRAM write.
__device__ __forceinline__ void discard_l2_line(const void* ptr) {
  asm volatile("discard.global.L2 [%0], 128;\n" ::"l"(ptr) : "memory");
}

// ---- wgmma (sm_90a): warpgroup MMA, B (and A for _ss) in shared memory ---------------
// Descriptors: bits 0-13 start address >> 4, 16-29 leading-dimension byte offset >> 4,
// 32-45 stride-dimension byte offset >> 4, 62-63 swizzle (1 = 128-byte). Our tiles are
// 128-byte rows in 1024-byte atoms of 8 rows (the swizzle XORs the 16-byte chunk index
// with the row within the atom), so SBO = 1024; LBO matters only for MN-major operands,
// where it is the distance between 64-element column chunks.
__device__ __forceinline__ u64 smem_desc(u32 addr, u32 lbo, u32 sbo) {
  return (u64)((addr & 0x3FFFF) >> 4) | ((u64)(lbo >> 4) << 16) | ((u64)(sbo >> 4) << 32) | (1ull << 62);
}
// The descriptor of an address `bytes` further (a compile-time offset in the callers): only
// the start-address field (bits 0-13, 16-byte units) moves, with no carry out of it below
// 256 KB, so one 32-bit add replaces the four uniform ops of a fresh smem_desc.
__device__ __forceinline__ u64 desc_plus(u64 desc, u32 bytes) {
  return ((desc >> 32) << 32) | (u32)((u32)desc + (bytes >> 4));
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit_group() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait_group() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// Generic-proxy writes to shared memory (st.shared, cp.async) that wgmma will read.
__device__ __forceinline__ void fence_proxy_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// D[64 x N] (+)= A[64 x 16] B[16 x N]: A K-major; B K-major for N = 64 (K rows of Q K^T),
// MN-major (imm-trans-b = 1) for N = 256 (V rows, dims contiguous). Accumulator layout =
// mma.sync m16n8's per warp: warp w of the group holds rows 16w..16w+15.
#define FLASHMLA_ACC8(d, i) \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define FLASHMLA_OUT8(d, i) \
  "=f"(d[i]), "=f"(d[i + 1]), "=f"(d[i + 2]), "=f"(d[i + 3]), "=f"(d[i + 4]), "=f"(d[i + 5]), "=f"(d[i + 6]), "=f"(d[i + 7])
// Operand lists of a 32- and a 128-register accumulator: "%0, ..., %31" and its constraints.
#define FLASHMLA_D32                                                                          \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                    \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define FLASHMLA_D128                                                                         \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                    \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "          \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "          \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "          \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "          \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "          \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define FLASHMLA_ACC32(d) FLASHMLA_ACC8(d, 0), FLASHMLA_ACC8(d, 8), FLASHMLA_ACC8(d, 16), FLASHMLA_ACC8(d, 24)
#define FLASHMLA_OUT32(d) FLASHMLA_OUT8(d, 0), FLASHMLA_OUT8(d, 8), FLASHMLA_OUT8(d, 16), FLASHMLA_OUT8(d, 24)
#define FLASHMLA_ACC128(d) FLASHMLA_ACC32(d), FLASHMLA_ACC8(d, 32), FLASHMLA_ACC8(d, 40), FLASHMLA_ACC8(d, 48), \
  FLASHMLA_ACC8(d, 56), FLASHMLA_ACC8(d, 64), FLASHMLA_ACC8(d, 72), FLASHMLA_ACC8(d, 80), FLASHMLA_ACC8(d, 88), \
  FLASHMLA_ACC8(d, 96), FLASHMLA_ACC8(d, 104), FLASHMLA_ACC8(d, 112), FLASHMLA_ACC8(d, 120)
// One definition per 16-bit input type: PTX spells it "bf16" or "f16".
#define FLASHMLA_DEFINE_WGMMA(TAG, PTX)                                                                   \
  __device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[32], u64 desc_a, u64 desc_b,              \
                                                     int accumulate, TAG) {                               \
    asm volatile(                                                                                         \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                      \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX "." PTX " {"                                    \
        FLASHMLA_D32                                                                                      \
        "}, %32, %33, p, 1, 1, 0, 0;\n}\n"                                                                \
        : FLASHMLA_ACC32(d)                                                                               \
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));                                                     \
  }                                                                                                       \
  /* The first k-step of a fresh accumulator: D = A B (scale-d 0), D write-only ("=f"), */ \
  /* so the compiler knows the old values are dead (otherwise they stay live, and      */ \
  /* count against the register budget, until this wgmma).                            */ \
  __device__ __forceinline__ void wgmma_m64n64k16_ss_first(float (&d)[32], u64 desc_a, u64 desc_b, TAG) {  \
    asm volatile(                                                                                         \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX "." PTX " {"                                    \
        FLASHMLA_D32                                                                                      \
        "}, %32, %33, 0, 1, 1, 0, 0;\n"                                                                   \
        : FLASHMLA_OUT32(d)                                                                               \
        : "l"(desc_a), "l"(desc_b));                                                                      \
  }                                                                                                       \
  __device__ __forceinline__ void wgmma_m64n64k16_rs_first(float (&d)[32], u32 a0, u32 a1, u32 a2, u32 a3, \
                                                           u64 desc_b, TAG) {                             \
    asm volatile(                                                                                         \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX "." PTX " {"                                    \
        FLASHMLA_D32                                                                                      \
        "}, {%32, %33, %34, %35}, %36, 0, 1, 1, 0;\n"                                                     \
        : FLASHMLA_OUT32(d)                                                                               \
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b));                                              \
  }                                                                                                       \
  /* A from registers (RS): a0..a3 = the A fragment of one k-slice, laid out like an   */ \
  /* m64n16 accumulator converted pairwise to 16-bit (KERNEL.md 4.4).                */ \
  __device__ __forceinline__ void wgmma_m64n64k16_rs(float (&d)[32], u32 a0, u32 a1, u32 a2, u32 a3,      \
                                                     u64 desc_b, int accumulate, TAG) {                               \
    asm volatile(                                                                                         \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                      \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX "." PTX " {"                                    \
        FLASHMLA_D32                                                                                      \
        "}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"                                                   \
        : FLASHMLA_ACC32(d)                                                                               \
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b), "r"(accumulate));                     \
  }                                                                                                       \
  __device__ __forceinline__ void wgmma_m64n256k16_rs(float (&d)[128], u32 a0, u32 a1, u32 a2, u32 a3,    \
                                                     u64 desc_b, TAG) {                                               \
    asm volatile(                                                                                         \
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n" /* scale-d: always accumulate */                       \
        "wgmma.mma_async.sync.aligned.m64n256k16.f32." PTX "." PTX " {"                                   \
        FLASHMLA_D128                                                                                     \
        "}, {%128, %129, %130, %131}, %132, p, 1, 1, 1;\n}\n"                                          \
        : FLASHMLA_ACC128(d)                                                                              \
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b));                                      \
  }                                                                                                       \
  __device__ __forceinline__ void wgmma_m64n256k16_ss(float (&d)[128], u64 desc_a, u64 desc_b,            \
                                                     int accumulate, TAG) {                               \
    asm volatile(                                                                                         \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                                                     \
        "wgmma.mma_async.sync.aligned.m64n256k16.f32." PTX "." PTX " {"                                   \
        FLASHMLA_D128                                                                                     \
        "}, %128, %129, p, 1, 1, 0, 1;\n}\n"                                                              \
        : FLASHMLA_ACC128(d)                                                                              \
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));                                                     \
  }
FLASHMLA_DEFINE_WGMMA(bf16_t, "bf16")
FLASHMLA_DEFINE_WGMMA(fp16_t, "f16")
#undef FLASHMLA_DEFINE_WGMMA
#undef FLASHMLA_ACC8
#undef FLASHMLA_OUT8
#undef FLASHMLA_D32
#undef FLASHMLA_D128
#undef FLASHMLA_ACC32
#undef FLASHMLA_OUT32
#undef FLASHMLA_ACC128

}  // namespace flashmla
