"""compute-sanitizer racecheck against a kernel that is race-free by construction, in
the seesaw kernel's barrier pattern: does racecheck report races there?

  compute-sanitizer --tool racecheck python tools/racecheck_arrive.py arrive   # producer arrive
  compute-sanitizer --tool racecheck python tools/racecheck_arrive.py sync     # both sync

Two warpgroups loop: __syncthreads; a named-barrier handoff (warpgroup 0 bar.arrive,
warpgroup 1 bar.sync, as the seesaw's Max / P handoffs); each warpgroup writes its own
half of a shared array; __syncthreads; everyone reads both halves. Every read is
separated from every write of another thread by a CTA-wide barrier, in every mode.
On the H100 image (2026-11-26) racecheck reports a hazard in `arrive` mode (and none
with a single iteration, or in `sync` mode): the same kind of report it gives for the
seesaw kernel's epilogue row-sum exchange, whose accesses are likewise separated by
__syncthreads. The result is checked, so a real race would also show as a wrong sum.
"""
import sys

import cupy as cp

SOURCE = r"""
extern "C" __global__ void handoff(float* out, int producer_arrives, int iters) {
  __shared__ float slot[128];
  const int tid = threadIdx.x, wg = tid / 128, row = (tid % 128) / 4;
  float acc = 0.f;
  for (int it = 0; it < iters; ++it) {
    __syncthreads();
    if (producer_arrives && wg == 0) asm volatile("bar.arrive 1, 256;" ::: "memory");
    else asm volatile("bar.sync 1, 256;" ::: "memory");
    if (tid % 4 == 0) slot[wg * 64 + row] = tid + it;
    __syncthreads();
    acc += slot[row] + slot[64 + row];
  }
  out[blockIdx.x * 256 + tid] = acc;
}
"""

mode = sys.argv[1] if len(sys.argv) > 1 else "arrive"
iters = 3
kernel = cp.RawModule(code=SOURCE).get_function("handoff")
out = cp.empty(2 * 256, dtype=cp.float32)
kernel((2,), (256,), (out, cp.int32(mode == "arrive"), cp.int32(iters)))
tid = cp.arange(256) % 128
row_base = (tid // 4) * 4  # the writer of slot[row] in warpgroup 0 is thread 4 * row
expected = sum((row_base + it) + (row_base + 128 + it) for it in range(iters)).astype(cp.float32)
assert bool((out.reshape(2, 256) == expected[None]).all()), "wrong sums: a real race"
print(f"racecheck_arrive {mode}: sums correct")
