"""Seesaw decode calls (b requests of s_k tokens, or lengths drawn around s_k as
tools/bench.py's varlen rows; causal, bf16) launched with a
diagnostic buffer in k_scale, which the TRACE and CTATIME builds write to (through the
API, which passes none, they would write to address 0). Used by tools/seesaw_trace.py,
tools/cta_timeline.py, tools/pair_timeline.py and tools/clock_under_load.py; import it
after setting FLASHMLA_JIT_DEFINES."""
import math

import torch
from mla_reference import make_inputs

from flashmla_jit import api, driver, get_mla_metadata


def launcher(batch, s_k, h_q, s_q, make_buffer, varlen=False):
    """(launch, buffer): make_buffer(plan) -> a GPU tensor; launch() queues one call with
    the buffer in k_scale, on the current stream."""
    lens = [s_k] * batch
    if varlen:  # the bench's varlen row (bench imports triton: only where needed)
        from bench import config_lens
        lens = config_lens(batch, s_k, h_q, True)
    q, k, bt, sl = make_inputs(batch, s_q, h_q, 1, lens, nan_tail=False)
    sched, splits = get_mla_metadata(sl, s_q * h_q, 1)
    # The plan of this call, made without a launch through the API.
    arrays = (q, k, bt, sl, sched, splits) + (None,) * 6
    described = [api._describe_arg(x, n) if x is not None else None for x, n in zip(arrays, api._ARG_NAMES)]
    plan = api._plan(described, 512, None, True, None, None)
    assert plan.seesaw
    buffer = make_buffer(plan)
    inputs = (q, k, bt, sl, sched, splits)
    ptrs = [x.data_ptr() for x in inputs] + [0] * 6

    def launch():
        # out, lse and scratch are freed on return, after the launches: the allocators are stream ordered
        out, lse, scratch, launches = plan.prepare(ptrs, q, None, None, torch.cuda.current_stream().cuda_stream)
        launches[0][2].p.k_scale = buffer.data_ptr()
        driver.launch_all(plan.device, launches)

    # The inputs live as long as launch: with their addresses alone they were freed when
    # launcher returned, and the kernel read blocks the allocator handed out again (the
    # timelines of docs/PERF.md v13-v20; PERF.md v21).
    launch.inputs = inputs
    return launch, buffer


def cta_stamps(plan):
    """The CTATIME build's buffer: 32 int64 stamps per CTA of the decode grid."""
    return torch.zeros(math.prod(plan.decode_grid), 32, dtype=torch.int64, device="cuda")


def stamp_ghz(t) -> float:
    """SM clock from CTATIME stamps (clock64 ticks over globaltimer ns), median over CTAs."""
    return ((t[:, 3] - t[:, 2]) / (t[:, 1] - t[:, 0])).median().item()


def run_with_buffer(batch, s_k, h_q, s_q, make_buffer, varlen=False):
    """make_buffer(plan) -> a zeroed int64 GPU tensor; returns (it after the third run
    (caches and clocks warm), zeroed before each run; that run's time in µs by CUDA events,
    decode + merge, to check the stamps' span against)."""
    launch, buffer = launcher(batch, s_k, h_q, s_q, make_buffer, varlen)
    for _ in range(3):
        buffer.zero_()
        torch.cuda._sleep(int(1e7))  # the GPU busy while the host queues the launches
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launch()
        end.record()
        torch.cuda.synchronize()
    return buffer, start.elapsed_time(end) * 1e3
