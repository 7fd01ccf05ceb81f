"""GPU correctness against the float32 reference (DESIGN.md section 5). Needs a Hopper GPU.

Run on the device through tools/gpu_check.sh; on a machine without one every test
here skips with the reason.
"""

import itertools
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU on this machine (GPU tests run on the device: tools/gpu_check.sh)",
                allow_module_level=True)
if torch.cuda.get_device_capability(0)[0] != 9:
    pytest.skip("GPU is not a Hopper (sm_90)", allow_module_level=True)

from mla_reference import assert_close, capture_graph, make_fp8_inputs, make_inputs, reference  # noqa: E402

import flashmla_jit  # noqa: E402
from flashmla_jit import dequantize_kv_cache_fp8, flash_mla_with_kvcache, get_mla_metadata  # noqa: E402

HERE = os.path.dirname(__file__)


def poison_allocator(*shapes_dtypes):
    """Fill the blocks the caching allocator will hand out next with NaN, so an output
    element the kernels forget to write shows up as NaN instead of a lucky zero."""
    for shape, dtype in shapes_dtypes:
        torch.empty(shape, dtype=dtype, device="cuda").fill_(float("nan"))


def run_case(batch, s_q, h_q, h_kv, seqlens, causal, dtype=torch.bfloat16, device="cuda", page_size=64, d=576,
             dv=512):
    q, k_cache, block_table, seqlens_t = make_inputs(batch, s_q, h_q, h_kv, seqlens, dtype=dtype, device=device,
                                                     page_size=page_size, d=d)
    sched, num_splits = get_mla_metadata(seqlens_t, s_q * h_q // h_kv, h_kv)
    with torch.cuda.device(device):
        poison_allocator(((batch, s_q, h_q, dv), dtype), ((batch, h_q, s_q), torch.float32))
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, seqlens_t, dv, sched, num_splits, causal=causal)
    ref_out, ref_lse = reference(q, k_cache, block_table, seqlens_t, dv, causal=causal)
    assert out.shape == (batch, s_q, h_q, dv) and out.dtype == dtype and out.device == q.device
    assert lse.shape == (batch, h_q, s_q) and lse.dtype == torch.float32
    assert out.is_contiguous() and lse.is_contiguous()  # the strides the kernels were given
    assert_close(out, lse, ref_out, ref_lse, f"b={batch} s_q={s_q} h_q={h_q} h_kv={h_kv} causal={causal}")


def _seqlens(batch, kind, gen):
    if kind == "fixed":
        return [4096] * batch
    if kind == "short":
        lens = [1, 20, 63, 64, 65, 140]
        return [lens[i % len(lens)] for i in range(batch)]
    if kind == "zeros":   # varlen with empty sequences
        return [0 if i % 3 == 0 else int(x) for i, x in enumerate(torch.randint(1, 3000, (batch,), generator=gen))]
    if kind == "long":
        return [16384 if i % 2 == 0 else int(x) for i, x in enumerate(torch.randint(1, 16384, (batch,), generator=gen))]
    return [int(x) for x in torch.randint(1, 5000, (batch,), generator=gen)]  # varlen


GRID = [
    # batch, s_q, h_q, h_kv, seqlens kind, causal
    (1, 1, 16, 1, "long", False),
    (1, 1, 128, 1, "long", False),
    (2, 2, 16, 1, "short", True),
    (2, 4, 3, 1, "short", True),
    (6, 1, 1, 1, "zeros", False),
    (6, 2, 9, 1, "varlen", True),
    (6, 4, 63, 1, "varlen", True),
    (64, 1, 64, 1, "zeros", False),
    (64, 2, 126, 2, "varlen", True),
    (64, 1, 128, 8, "varlen", False),
    (128, 1, 16, 1, "fixed", False),
    (128, 2, 128, 1, "varlen", True),
    (128, 1, 64, 2, "zeros", True),
    (6, 2, 16, 8, "short", True),
    (2, 1, 128, 2, "long", False),
    (2, 4, 128, 1, "long", True),
    (300, 1, 16, 1, "varlen", True),   # reordered on the cost line: the records carry the order
    (600, 1, 16, 1, "short", False),   # more requests than 4 a record: positions are requests
    (1, 1, 64, 1, "long", False),      # the one-chunk merge in 8 warps (at h16: in 16)
]


@pytest.mark.parametrize("batch,s_q,h_q,h_kv,kind,causal", GRID)
def test_grid_bf16(batch, s_q, h_q, h_kv, kind, causal):
    gen = torch.Generator().manual_seed(batch * 1000 + s_q * 100 + h_q)
    run_case(batch, s_q, h_q, h_kv, _seqlens(batch, kind, gen), causal)


@pytest.mark.parametrize("batch,s_q,h_q,h_kv,kind,causal", [g for g in GRID if g[0] <= 64][::2])
def test_grid_fp16(batch, s_q, h_q, h_kv, kind, causal):
    gen = torch.Generator().manual_seed(7 + batch)
    run_case(batch, s_q, h_q, h_kv, _seqlens(batch, kind, gen), causal, dtype=torch.float16)


@pytest.mark.parametrize("page_size", [1, 16, 32, 128, 256])
def test_page_sizes(page_size):
    # the page size is read from k_cache's shape; pages are gathered per token
    run_case(5, 2, 16, 1, [0, 1, 300, 1000, 2049], causal=True, page_size=page_size)
    run_case(3, 1, 128, 1, [77, 4000, 64], causal=False, page_size=page_size)


@pytest.mark.parametrize("h_q,s_q", [(16, 1), (16, 2), (128, 1)])
def test_head_dim_512_without_rope(h_q, s_q):
    run_case(6, s_q, h_q, 1, [0, 1, 63, 700, 3000, 5000], causal=True, d=512)


@pytest.mark.parametrize("h_q,s_q,h_kv", [(16, 1, 1), (16, 2, 1), (128, 1, 1), (64, 2, 2), (3, 1, 1)])
def test_head_dims_320_256(h_q, s_q, h_kv):
    # a smaller MLA: latent 256 + rope 64, every row count on 32-row tiles
    run_case(6, s_q, h_q, h_kv, [0, 1, 63, 700, 3000, 9000], causal=True, d=320, dv=256)
    run_case(1, s_q, h_q, h_kv, [20000], causal=False, d=320, dv=256)  # split over every SM


@pytest.mark.parametrize("s_q,h_q,page_size", [(1, 64, 64), (2, 128, 128), (1, 128, 64)])
def test_seesaw_and_cp_async_kernels_agree(s_q, h_q, page_size, monkeypatch):
    """Caches of whole 64-token pages run the seesaw (TMA) kernel; FLASHMLA_JIT_SEESAW=0
    forces the cp.async kernel. Both match the reference, and each other, on odd and even
    block counts per part, NaN tails, out-of-range page ids past every seqlen."""
    from flashmla_jit import api, settings
    seqlens = [1, 63, 64, 65, 200, 4097, 3001, 130]
    q, k_cache, block_table, seqlens_t = make_inputs(len(seqlens), s_q, h_q, 1, seqlens, page_size=page_size)
    for i, n in enumerate(seqlens):  # garbage page ids past each sequence's pages
        block_table[i, -(-n // page_size):] = torch.randint(-5, 2 ** 30, (1,)).item()
    sched, num_splits = get_mla_metadata(seqlens_t, s_q * h_q, 1)
    ref_out, ref_lse = reference(q, k_cache, block_table, seqlens_t, 512, causal=True)
    outs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("FLASHMLA_JIT_SEESAW", flag)
        settings.get.cache_clear()
        api._plans.clear()
        out, lse = flash_mla_with_kvcache(q, k_cache, block_table, seqlens_t, 512, sched, num_splits, causal=True)
        plan = next(iter(api._plans.values()))
        assert plan.seesaw == (flag == "1")
        assert_close(out, lse, ref_out, ref_lse, f"seesaw={flag} s_q={s_q} h_q={h_q} page={page_size}")
        outs.append(out.float())
    settings.get.cache_clear()
    api._plans.clear()
    assert (outs[0] - outs[1]).abs().max().item() < 2e-2


@pytest.mark.parametrize("s_q,h_q,h_kv,wide", [(1, 16, 1, False), (2, 16, 1, True), (1, 128, 1, True),
                                              (2, 64, 1, False), (1, 128, 2, False), (3, 8, 1, True)])
def test_q_by_tma_and_cp_async_agree(s_q, h_q, h_kv, wide, monkeypatch):
    """The seesaw kernel loads Q tiles by TMA where a tile is one box per 64 columns
    (FLASHMLA_JIT_Q_TMA=0: by cp.async); both match the reference on contiguous q and on
    q rows inside wider rows (NaN between), where a box reaches past s_q (zeros) and on
    two KV heads."""
    from flashmla_jit import api, settings
    seqlens = [1, 64, 65, 700, 4097, 130]
    q, k_cache, block_table, seqlens_t = make_inputs(len(seqlens), s_q, h_q, h_kv, seqlens)
    if wide:  # q's rows inside 640-element rows whose tails hold NaN
        buf = torch.full((*q.shape[:-1], 640), float("nan"), dtype=q.dtype, device="cuda")
        buf[..., :576] = q
        q = buf[..., :576]
    sched, num_splits = get_mla_metadata(seqlens_t, s_q * h_q // h_kv, h_kv)
    ref_out, ref_lse = reference(q, k_cache, block_table, seqlens_t, 512, causal=True)
    for flag in ("1", "0"):
        monkeypatch.setenv("FLASHMLA_JIT_Q_TMA", flag)
        settings.get.cache_clear()
        api._plans.clear()
        poison_allocator(((*q.shape[:-1], 512), q.dtype))
        out, lse = flash_mla_with_kvcache(q, k_cache, block_table, seqlens_t, 512, sched, num_splits, causal=True)
        plan = next(iter(api._plans.values()))
        assert plan.seesaw and plan.decode_spec.q_tma == (flag == "1")
        assert_close(out, lse, ref_out, ref_lse, f"q_tma={flag} s_q={s_q} h_q={h_q} h_kv={h_kv} wide={wide}")
    settings.get.cache_clear()
    api._plans.clear()


def test_q_maps_take_each_calls_addresses():
    """A plan encodes its Q maps once; each call's q and q_pe addresses are patched in.
    The patched maps equal maps encoded for those addresses, byte for byte."""
    from flashmla_jit import api
    from flashmla_jit.params import SeesawParams
    api._plans.clear()
    for split in (False, True):
        q, k_cache, block_table, seqlens = make_inputs(2, 1, 64, 1, [300, 900])
        sched, ns = get_mla_metadata(seqlens, 64, 1)
        q_pe = q[..., 512:].clone() if split else None
        q_in = q[..., :512].clone() if split else q
        flash_mla_with_kvcache(q_in, k_cache, block_table, seqlens, 512, sched, ns, q_pe=q_pe)
        plan = [p for p in api._plans.values() if p.q_pe_split == split][0]
        assert plan.decode_spec.q_tma and plan.set_q_maps is not None
        other_q = torch.empty_like(q_in)
        other_pe = torch.empty_like(q_pe) if split else None
        q_addr = other_q.data_ptr()
        pe_addr = other_pe.data_ptr() if split else q_addr + 2 * 512
        params = SeesawParams.from_buffer_copy(plan.decode_template)
        plan.set_q_maps(params, q_addr, pe_addr)
        at = SeesawParams.q_latent.offset
        assert bytes(params)[at:at + 256] == plan._q_maps(q_addr, pe_addr)
        assert bytes(params)[at:at + 256] != plan.decode_template[at:at + 256]


@pytest.mark.parametrize("s_q,h_q", [(2, 128), (1, 64)])
def test_running_max_climbs_and_jumps(s_q, h_q):
    """Scores that climb along each sequence (a block's row max passes the running max by
    less than the seesaw's lazy slack, so P grows past 1 before the max moves), with one
    block far above the rest (the max must move and O be rescaled)."""
    seqlens = [4096, 3000, 640, 65]
    q, k_cache, block_table, seqlens_t = make_inputs(len(seqlens), s_q, h_q, 1, seqlens)
    for i, n in enumerate(seqlens):
        blocks = -(-n // 64)
        ramp = torch.linspace(1.0, 4.0, blocks, device="cuda")
        ramp[blocks // 2] = 8.0
        pages = block_table[i, :blocks].long()
        k_cache[pages] = (k_cache[pages].float() * ramp[:, None, None, None]).to(k_cache.dtype)
    sched, num_splits = get_mla_metadata(seqlens_t, s_q * h_q, 1)
    poison_allocator(((len(seqlens), s_q, h_q, 512), torch.bfloat16), ((len(seqlens), h_q, s_q), torch.float32))
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, seqlens_t, 512, sched, num_splits, causal=True)
    ref_out, ref_lse = reference(q, k_cache, block_table, seqlens_t, 512, causal=True)
    assert_close(out, lse, ref_out, ref_lse, f"climbing scores s_q={s_q} h_q={h_q}")


def test_caller_owned_out_and_lse():
    batch, s_q, h_q = 5, 2, 32
    q, k_cache, block_table, seqlens = make_inputs(batch, s_q, h_q, 1, [0, 50, 4000, 129, 9000])
    sched, splits = get_mla_metadata(seqlens, s_q * h_q, 1)
    # out as a strided view into a wider buffer: the kernels honour its strides
    wide = torch.full((batch, s_q, h_q, 640), float("nan"), dtype=q.dtype, device="cuda")
    out = wide[..., :512]
    lse = torch.full((batch, h_q, s_q), float("nan"), device="cuda")
    got_out, got_lse = flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, sched, splits,
                                              causal=True, out=out, lse=lse)
    assert got_out is out and got_lse is lse
    assert torch.isnan(wide[..., 512:]).all()  # nothing written outside the view
    ref_out, ref_lse = reference(q, k_cache, block_table, seqlens, 512, causal=True)
    assert_close(out, lse, ref_out, ref_lse, "caller-owned out/lse")


def test_out_alone_on_the_cached_path_and_scratch_returns_to_the_allocator():
    # Long sequences split across parts, so the fp32 scratch is used; out is passed, lse
    # is not. The repeated calls take the cached plan (scratch from the raw allocator).
    q, k_cache, block_table, seqlens = make_inputs(4, 2, 16, 1, [30000, 17, 9000, 64])
    sched, splits = get_mla_metadata(seqlens, 32, 1)
    ref_out, ref_lse = reference(q, k_cache, block_table, seqlens, 512, causal=True)
    out = torch.empty(4, 2, 16, 512, dtype=q.dtype, device="cuda")
    for call in range(3):
        out.fill_(float("nan"))
        poison_allocator(((4, 16, 2), torch.float32),)
        got_out, lse = flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, sched, splits, causal=True,
                                              out=out)
        assert got_out is out
        assert_close(out, lse, ref_out, ref_lse, f"out alone, call {call}")
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    for _ in range(5):
        flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, sched, splits, causal=True)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == allocated


@pytest.mark.parametrize("split_q,split_k", [(True, False), (False, True), (True, True)])
def test_split_latent_and_rope_inputs(split_q, split_k):
    batch, s_q, h_q = 4, 2, 64
    q, k_cache, block_table, seqlens = make_inputs(batch, s_q, h_q, 1, [3000, 0, 65, 7000])
    ref_out, ref_lse = reference(q, k_cache, block_table, seqlens, 512, causal=True)
    sched, splits = get_mla_metadata(seqlens, s_q * h_q, 1)
    # separate tensors (fresh storage, so nothing can read them as one concatenated row)
    args = dict(q_pe=q[..., 512:].clone() if split_q else None,
                k_pe_cache=k_cache[..., 512:].clone() if split_k else None)
    q_in = q[..., :512].clone() if split_q else q
    k_in = k_cache[..., :512].clone() if split_k else k_cache
    out, lse = flash_mla_with_kvcache(q_in, k_in, block_table, seqlens, 512, sched, splits, causal=True, **args)
    assert_close(out, lse, ref_out, ref_lse, f"split q={split_q} k={split_k}")


@pytest.mark.parametrize("h_q,causal", [(16, True), (128, True), (32, False)])
def test_ragged_queries(h_q, causal):
    counts = [1, 3, 0, 2, 4, 4]                      # query tokens per request (MTP / speculative)
    seqlens = [300, 5000, 100, 1, 2048, 70]          # request 3 sees fewer keys than its tokens
    batch, total_q = len(counts), sum(counts)
    _, k_cache, block_table, seqlens_t = make_inputs(batch, 1, h_q, 1, seqlens)
    q = torch.randn(total_q, h_q, 576, dtype=torch.bfloat16, device="cuda")
    cu = torch.tensor([0] + list(itertools.accumulate(counts)), dtype=torch.int32, device="cuda")
    sched, splits = get_mla_metadata(seqlens_t, max(counts) * h_q, 1)
    out = torch.full((total_q, h_q, 512), float("nan"), dtype=q.dtype, device="cuda")
    lse = torch.full((h_q, total_q), float("nan"), device="cuda")
    flash_mla_with_kvcache(q, k_cache, block_table, seqlens_t, 512, sched, splits, causal=causal,
                           cu_seqlens_q=cu, max_seqlen_q=max(counts), out=out, lse=lse)
    ref_out = torch.zeros(total_q, h_q, 512, device="cuda")
    ref_lse = torch.zeros(h_q, total_q, device="cuda")
    for i, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        if a == b:
            continue
        o, l = reference(q[None, a:b], k_cache, block_table[i:i + 1], seqlens_t[i:i + 1], 512, causal=causal)
        ref_out[a:b], ref_lse[:, a:b] = o[0], l[0]
    assert_close(out, lse, ref_out, ref_lse, f"ragged h_q={h_q}")


def test_repeated_signature_reads_each_calls_pointers():
    # The second call with the same shapes takes the cached plan: it must use the new
    # arrays, and work queued right after it must see every output (the combine kernel
    # starts early under programmatic dependent launch and waits on the GPU).
    for batch, h_q in ((1, 16), (128, 64)):  # a CTA per row chunk, and a warp per row
        calls = []
        for _ in range(2):
            lens = torch.randint(1, 3000, (batch,)).tolist()
            lens[0] = 3000  # same block-table width both times
            calls.append(make_inputs(batch, 1, h_q, 1, lens))
        for q, k_cache, block_table, seqlens in calls:
            sched, ns = get_mla_metadata(seqlens, h_q, 1)
            poison_allocator(((batch, 1, h_q, 512), torch.bfloat16), ((batch, h_q, 1), torch.float32))
            out, lse = flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, sched, ns)
            out_copy, lse_copy = out.clone(), lse.clone()  # same stream, no sync in between
            # the hot path allocates its outputs itself: as the first call's
            assert out.shape == (batch, 1, h_q, 512) and out.dtype == q.dtype and out.device == q.device
            assert lse.shape == (batch, h_q, 1) and lse.dtype == torch.float32 and lse.device == q.device
            assert out.is_contiguous() and lse.is_contiguous() and not out.requires_grad
            ref_out, ref_lse = reference(q, k_cache, block_table, seqlens, 512)
            assert_close(out_copy, lse_copy, ref_out, ref_lse, f"repeated call b={batch} h_q={h_q}")


def test_back_to_back_split_calls_each_merge_their_own_partials():
    # Split pieces keep their partials in L2 and the merge drops each line after reading
    # it (no write-back): calls queued back to back reuse the same scratch lines, and each
    # merge must read its own call's partials, never a dropped line's older contents.
    for batch, h_q, lens in ((2, 128, [8192, 5000]), (64, 64, None)):  # a CTA per chunk, a warp per row
        lens = lens or torch.randint(1, 3000, (batch,)).tolist()
        _, k_cache, block_table, seqlens = make_inputs(batch, 1, h_q, 1, lens)
        sched, ns = get_mla_metadata(seqlens, h_q, 1)
        queries = [torch.randn(batch, 1, h_q, 576, dtype=torch.bfloat16, device="cuda") for _ in range(3)]
        results = [flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, sched, ns) for q in queries]
        assert ns.diff().max().item() > 1, "the case must split requests"
        for i, (q, (out, lse)) in enumerate(zip(queries, results)):
            ref_out, ref_lse = reference(q, k_cache, block_table, seqlens, 512)
            assert_close(out, lse, ref_out, ref_lse, f"back-to-back call {i} b={batch} h_q={h_q}")


@pytest.mark.parametrize("seesaw", ["1", "0"])
def test_merge_waits_for_its_pieces_over_stale_flags(seesaw, monkeypatch):
    # The combine kernel merges a request as soon as its pieces' flags (in the call's
    # scratch) say they are stored, while other decode CTAs still run; every decode CTA
    # zeroes its flags before the combine may start. Scratch drawn from memory full of
    # ones (every flag "set", partials denormal) must still merge each call's own pieces.
    from flashmla_jit import api, settings
    monkeypatch.setenv("FLASHMLA_JIT_SEESAW", seesaw)
    settings.get.cache_clear()
    api._plans.clear()
    try:
        for batch, h_q in ((128, 64), (4, 16), (40, 128)):  # a warp per row; CTAs per chunk
            lens = torch.randint(1, 6000, (batch,)).tolist()
            q, k_cache, block_table, seqlens = make_inputs(batch, 1, h_q, 1, lens)
            sched, ns = get_mla_metadata(seqlens, h_q, 1)
            assert ns.diff().max().item() > 1, "the case must split requests"
            ref_out, ref_lse = reference(q, k_cache, block_table, seqlens, 512)
            for trial in range(3):
                torch.cuda.empty_cache()  # then the only free block is the ones', freed at once:
                torch.ones(1 << 26, dtype=torch.int32, device="cuda")  # the call's buffers come from it
                out, lse = flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, sched, ns)
                assert_close(out, lse, ref_out, ref_lse, f"stale flags, seesaw={seesaw} b={batch} h_q={h_q} #{trial}")
    finally:
        monkeypatch.undo()
        settings.get.cache_clear()
        api._plans.clear()


def test_misaligned_q_is_refused_on_the_cached_path():
    q, k_cache, block_table, seqlens = make_inputs(2, 1, 16, 1, [100, 200])
    sched, ns = get_mla_metadata(seqlens, 16, 1)
    flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, sched, ns)
    base = torch.randn(q.numel() + 1, dtype=q.dtype, device="cuda")
    shifted = base[1:].view(q.shape)  # same shape and strides, 2 bytes off alignment
    with pytest.raises(ValueError, match="q must start at a 16-byte aligned address"):
        flash_mla_with_kvcache(shifted, k_cache, block_table, seqlens, 512, sched, ns)


def test_seqlen_shorter_than_s_q_sees_nothing():
    # causal rows with seqlen - s_q + i < 0 see no key: out 0, lse +inf
    run_case(4, 4, 16, 1, [0, 1, 2, 3], causal=True)


def test_all_empty():
    run_case(3, 1, 16, 1, [0, 0, 0], causal=False)


@pytest.mark.parametrize("seesaw", ["1", "0"])
def test_block_table_reaching_past_int32_tokens(seesaw, monkeypatch):
    """2^25 + 1 columns of 64-token pages address 2^31 + 64 tokens, past int32: the seesaw
    kernel clamps that reach to INT_MAX, the cp.async kernel holds it in 64 bits. Both
    read each sequence's own pages only (the columns past them hold random page ids)."""
    from flashmla_jit import api, settings
    monkeypatch.setenv("FLASHMLA_JIT_SEESAW", seesaw)
    settings.get.cache_clear()
    api._plans.clear()
    seqlens = [4097, 1, 300]
    q, k_cache, block_table, seqlens_t = make_inputs(len(seqlens), 2, 128, 1, seqlens)
    wide = torch.randint(-2 ** 31, 2 ** 31 - 1, (len(seqlens), 2 ** 25 + 1), dtype=torch.int32, device="cuda")
    wide[:, :block_table.shape[1]] = block_table  # 400 MB
    sched, num_splits = get_mla_metadata(seqlens_t, 2 * 128, 1)
    out, lse = flash_mla_with_kvcache(q, k_cache, wide, seqlens_t, 512, sched, num_splits, causal=True)
    assert next(iter(api._plans.values())).seesaw == (seesaw == "1")
    settings.get.cache_clear()
    api._plans.clear()
    ref_out, ref_lse = reference(q, k_cache, block_table, seqlens_t, 512, causal=True)
    assert_close(out, lse, ref_out, ref_lse, f"block table of 2^25 + 1 columns, seesaw={seesaw}")


def test_non_default_stream():
    q, k_cache, block_table, seqlens = make_inputs(8, 2, 16, 1, [300, 5000, 64, 0, 1, 2000, 129, 4096])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sched, num_splits = get_mla_metadata(seqlens, 32, 1)
        out, lse = flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, sched, num_splits, causal=True)
    stream.synchronize()  # only this stream: the work must have been enqueued on it
    ref_out, ref_lse = reference(q, k_cache, block_table, seqlens, 512, causal=True)
    assert_close(out, lse, ref_out, ref_lse, "side stream")


def test_cuda_graph_replay_after_seqlens_change():
    batch, s_q, h_q = 16, 2, 64
    q, k_cache, block_table, seqlens = make_inputs(batch, s_q, h_q, 1, [8192] * batch, nan_tail=False)
    static_lens = torch.randint(1, 8192, (batch,), dtype=torch.int32, device="cuda")
    def step():
        sched, ns = get_mla_metadata(static_lens, s_q * h_q, 1)
        return flash_mla_with_kvcache(q, k_cache, block_table, static_lens, 512, sched, ns, causal=True)

    replay, (out, lse) = capture_graph(step)
    for trial in range(3):
        new_lens = torch.randint(0, 8192, (batch,), dtype=torch.int32, device="cuda")
        new_lens[trial] = 0
        static_lens.copy_(new_lens)
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        replay()
        torch.cuda.synchronize()
        ref_out, ref_lse = reference(q, k_cache, block_table, static_lens, 512, causal=True)
        assert_close(out, lse, ref_out, ref_lse, f"graph replay {trial}")


def test_graph_with_padded_batch_and_caller_metadata_buffers():
    # Captured once at batch 16; each replay runs `active` real requests. Metadata goes
    # to fixed caller buffers (computed once per step, read by every "layer"), padding
    # rows do no work and keep whatever the caller left in out / lse.
    cap, s_q, h_q = 16, 1, 16
    q, k_cache, block_table, _ = make_inputs(cap, s_q, h_q, 1, [6000] * cap, nan_tail=False)
    lens = torch.randint(1, 6000, (cap,), dtype=torch.int32, device="cuda")
    num_seqs = torch.tensor([cap], dtype=torch.int32, device="cuda")
    sched, ns = get_mla_metadata(lens, s_q * h_q, 1)
    out = torch.empty(cap, s_q, h_q, 512, dtype=torch.bfloat16, device="cuda")
    lse = torch.empty(cap, h_q, s_q, device="cuda")
    layers = 2
    outs = [torch.empty_like(out) for _ in range(layers)]
    lses = [torch.empty_like(lse) for _ in range(layers)]

    def step():
        get_mla_metadata(lens, s_q * h_q, 1, num_seqs=num_seqs, out=(sched, ns))
        for o, l in zip(outs, lses):
            flash_mla_with_kvcache(q, k_cache, block_table, lens, 512, sched, ns, out=o, lse=l)

    replay, _ = capture_graph(step)
    for active in (16, 5, 1, 0):
        num_seqs.fill_(active)
        new_lens = torch.randint(0, 6000, (cap,), dtype=torch.int32, device="cuda")
        new_lens[active:] = torch.randint(6000, 100000, (cap - active,), dtype=torch.int32)  # stale garbage
        lens.copy_(new_lens)
        for o, l in zip(outs, lses):
            o.fill_(7.0)
            l.fill_(7.0)
        replay()
        torch.cuda.synchronize()
        ref_out, ref_lse = reference(q[:active], k_cache, block_table[:active], lens[:active], 512)
        for o, l in zip(outs, lses):
            if active:
                assert_close(o[:active], l[:active], ref_out, ref_lse, f"padded graph, active={active}")
            assert (o[active:] == 7.0).all() and (l[active:] == 7.0).all(), f"padding written, active={active}"
        assert ns[active:].eq(ns[active]).all()  # no pieces for padding
        assert (sched[:, 5] == active).all()


def test_metadata_matches_python_model():
    from sched_model import plan
    from flashmla_jit.api import OVERHEAD_BLOCKS, whole_slack
    gen = torch.Generator().manual_seed(3)
    for batch, rows, h_kv, equal in [(1, 16, 1, False), (7, 128, 1, False), (128, 16, 1, False),
                                     (300, 256, 2, False), (2000, 64, 1, False), (128, 16, 1, True),
                                     (128, 128, 1, True), (128, 256, 1, True), (1500, 64, 1, True),
                                     (32, 128, 1, True), (16, 16, 1, True), (4, 128, 1, True), (40, 64, 2, False)]:
        lens = torch.randint(0, 20000, (batch,), generator=gen, dtype=torch.int32)
        if equal:  # every request the same length (the aligned payloads)
            lens[:] = lens[0]
        else:
            lens[::5] = 0
        pct, blocks = whole_slack(rows)
        sched, ns = get_mla_metadata(lens.cuda(), rows, h_kv)
        exp_sched, exp_ns = plan(lens.tolist(), sched.shape[0], 64, OVERHEAD_BLOCKS, whole_slack_pct=pct,
                                 whole_slack_blocks=blocks)
        assert ns.cpu().tolist() == exp_ns
        assert sched.cpu().tolist() == exp_sched
        if equal and pct:  # aligned: whole requests, or each request in k whole parts
            assert len({exp_ns[i + 1] - exp_ns[i] for i in range(batch)}) == 1
        active = batch // 3  # padding past it, counted on the GPU
        sched, ns = get_mla_metadata(lens.cuda(), rows, h_kv, num_seqs=torch.tensor([active], device="cuda",
                                                                                      dtype=torch.int32))
        exp_sched, exp_ns = plan(lens.tolist(), sched.shape[0], 64, OVERHEAD_BLOCKS, active=active,
                                 whole_slack_pct=pct, whole_slack_blocks=blocks)
        assert (ns.cpu().tolist(), sched.cpu().tolist()) == (exp_ns, exp_sched)
    # Pairs on the line that cut fewer pieces (kept), and ones that cut more (index order kept).
    for lens in ([i * 37 % 3000 + 64 for i in range(100)], [64 * (1 + i % 9) + i for i in range(100)]):
        sched, ns = get_mla_metadata(torch.tensor(lens, dtype=torch.int32, device="cuda"), 16, 1)
        pct, blocks = whole_slack(16)
        exp_sched, exp_ns = plan(lens, sched.shape[0], 64, OVERHEAD_BLOCKS, whole_slack_pct=pct,
                                 whole_slack_blocks=blocks)
        assert (ns.cpu().tolist(), sched.cpu().tolist()) == (exp_ns, exp_sched)


def test_torch_compile_fullgraph_traces_the_ops():
    batch, s_q, h_q = 4, 2, 16
    q, k_cache, block_table, seqlens = make_inputs(batch, s_q, h_q, 1, [500, 0, 4000, 64])

    def step(q, k_cache, block_table, seqlens):
        sched, splits = get_mla_metadata(seqlens, s_q * h_q, 1)
        out, lse = flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, sched, splits, causal=True)
        return out * 2, lse

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out2, lse = compiled(q, k_cache, block_table, seqlens)
    ref_out, ref_lse = reference(q, k_cache, block_table, seqlens, 512, causal=True)
    assert_close(out2 / 2, lse, ref_out, ref_lse, "torch.compile")


# ---- FP8 KV caches: the reference runs on the dequantized cache ---------------------------

def fp8_reference_cache(k8, k_scale, kv_format):
    # per tensor: the exact fp8 * k_scale (the kernel scales S and O in fp32); 656: bf16, as
    # FlashMLA's dequantizer (the kernel's values match it up to a rare bf16 ulp)
    return dequantize_kv_cache_fp8(k8, k_scale, torch.float32 if kv_format == "fp8_e4m3" else torch.bfloat16)


def run_fp8_case(batch, s_q, h_q, h_kv, seqlens, causal, kv_format, dtype=torch.bfloat16, page_size=64, d=576,
                 scale_as="tensor", cache_as=torch.float8_e4m3fn):
    q, k8, k_scale, table, lens = make_fp8_inputs(batch, s_q, h_q, h_kv, seqlens, kv_format, dtype=dtype,
                                                  page_size=page_size, d=d)
    ref_out, ref_lse = reference(q, fp8_reference_cache(k8, k_scale, kv_format), table, lens, 512, causal=causal)
    if k_scale is not None and scale_as == "tensor":    # vLLM passes a 1-element float32 tensor
        k_scale = torch.tensor([k_scale], dtype=torch.float32, device=q.device)
    elif k_scale is not None and scale_as == "scalar_tensor":
        k_scale = torch.tensor(k_scale, dtype=torch.float32, device=q.device)
    sched, num_splits = get_mla_metadata(lens, s_q * h_q // h_kv, h_kv)
    poison_allocator(((batch, s_q, h_q, 512), dtype), ((batch, h_q, s_q), torch.float32))
    out, lse = flash_mla_with_kvcache(q, k8.view(cache_as), table, lens, 512, sched, num_splits, causal=causal,
                                      k_scale=k_scale)
    assert out.shape == (batch, s_q, h_q, 512) and out.dtype == dtype
    assert_close(out, lse, ref_out, ref_lse, f"{kv_format} b={batch} s_q={s_q} h_q={h_q} h_kv={h_kv} "
                                             f"page={page_size} causal={causal}")


FP8_SEQLENS = [0, 1, 63, 64, 65, 300, 1000, 4097]


@pytest.mark.parametrize("kv_format", ["fp8_e4m3", "fp8_656"])
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("s_q", [1, 2])
@pytest.mark.parametrize("h_q", [16, 128])
def test_fp8_grid(kv_format, page_size, s_q, h_q):
    run_fp8_case(len(FP8_SEQLENS), s_q, h_q, 1, FP8_SEQLENS, True, kv_format, page_size=page_size)


@pytest.mark.parametrize("kv_format", ["fp8_e4m3", "fp8_656"])
@pytest.mark.parametrize("h_q", [16, 64, 128])
def test_fp8_long_split_sequences(kv_format, h_q):
    # few long requests: many split pieces, so the combine sees k_scale-scaled partials
    run_fp8_case(2, 1, h_q, 1, [16384, 9000], False, kv_format)
    run_fp8_case(128, 1, h_q, 1, [4096] * 128, False, kv_format)


@pytest.mark.parametrize("scale_as", ["float", "tensor", "scalar_tensor"])
def test_fp8_k_scale_forms(scale_as):
    run_fp8_case(4, 2, 32, 1, [0, 100, 3000, 64], True, "fp8_e4m3", scale_as=scale_as)


def test_fp8_per_tensor_fp16_queries_and_other_shapes():
    run_fp8_case(6, 2, 16, 1, [5, 0, 700, 64, 2000, 129], True, "fp8_e4m3", dtype=torch.float16)
    run_fp8_case(6, 1, 128, 1, [5, 0, 700, 64, 2000, 129], False, "fp8_e4m3", dtype=torch.float16)
    run_fp8_case(6, 2, 16, 1, [5, 0, 700, 64, 2000, 129], True, "fp8_e4m3", d=512)     # no rope part
    run_fp8_case(5, 2, 64, 2, [1, 300, 0, 4000, 65], True, "fp8_e4m3")                   # h_kv = 2
    run_fp8_case(5, 2, 64, 2, [1, 300, 0, 4000, 65], True, "fp8_656")
    run_fp8_case(4, 4, 9, 1, [0, 1, 2, 3000], True, "fp8_656")                           # odd heads, seqlen < s_q
    run_fp8_case(4, 1, 16, 1, [77, 0, 4000, 64], False, "fp8_656", cache_as=torch.uint8)  # uint8 bytes
    run_fp8_case(4, 1, 16, 1, [77, 0, 4000, 64], False, "fp8_e4m3", cache_as=torch.uint8)


def test_fp8_656_from_flashmla_padded_pages():
    # FlashMLA's quantizer slices (pages, page_size + 1, 656) buffers: page stride != page_size * 656
    q, k8, _, table, lens = make_fp8_inputs(4, 2, 16, 1, [300, 0, 4000, 65], "fp8_656")
    padded = torch.empty(k8.shape[0], 65, 1, 656, dtype=k8.dtype, device="cuda")[:, :64]
    padded.copy_(k8)
    sched, splits = get_mla_metadata(lens, 32, 1)
    out, lse = flash_mla_with_kvcache(q, padded, table, lens, 512, sched, splits, causal=True)
    ref_out, ref_lse = reference(q, dequantize_kv_cache_fp8(k8), table, lens, 512, causal=True)
    assert_close(out, lse, ref_out, ref_lse, "656 with padded pages")


def test_fp8_656_split_q_pe():
    q, k8, _, table, lens = make_fp8_inputs(4, 2, 64, 1, [300, 0, 4000, 65], "fp8_656")
    sched, splits = get_mla_metadata(lens, 128, 1)
    out, lse = flash_mla_with_kvcache(q[..., :512].clone(), k8, table, lens, 512, sched, splits, causal=True,
                                      q_pe=q[..., 512:].clone())
    ref_out, ref_lse = reference(q, dequantize_kv_cache_fp8(k8), table, lens, 512, causal=True)
    assert_close(out, lse, ref_out, ref_lse, "656 with split q_pe")


def test_fp8_ragged_queries():
    counts, seqlens = [1, 3, 0, 2], [300, 5000, 100, 1]
    _, k8, k_scale, table, lens = make_fp8_inputs(4, 1, 16, 1, seqlens, "fp8_e4m3")
    q = torch.randn(sum(counts), 16, 576, dtype=torch.bfloat16, device="cuda")
    cu = torch.tensor([0] + list(itertools.accumulate(counts)), dtype=torch.int32, device="cuda")
    sched, splits = get_mla_metadata(lens, max(counts) * 16, 1)
    out, lse = flash_mla_with_kvcache(q, k8, table, lens, 512, sched, splits, causal=True, cu_seqlens_q=cu,
                                      max_seqlen_q=max(counts), k_scale=k_scale)
    deq = fp8_reference_cache(k8, k_scale, "fp8_e4m3")
    for i, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        if a == b:
            continue
        o, l = reference(q[None, a:b], deq, table[i:i + 1], lens[i:i + 1], 512, causal=True)
        assert_close(out[None, a:b], lse[None, :, a:b], o, l, f"fp8 ragged request {i}")


def test_fp8_k_scale_is_read_on_the_device_in_a_graph():
    # the scale tensor changes in place between replays; the kernel must read it each time
    batch, s_q, h_q = 8, 2, 16
    q, k8, k_scale, table, lens = make_fp8_inputs(batch, s_q, h_q, 1, [3000] * batch, "fp8_e4m3", nan_tail=False)
    scale_t = torch.tensor([k_scale], dtype=torch.float32, device="cuda")
    def step():
        sched, ns = get_mla_metadata(lens, s_q * h_q, 1)
        return flash_mla_with_kvcache(q, k8, table, lens, 512, sched, ns, causal=True, k_scale=scale_t)

    replay, (out, lse) = capture_graph(step)
    for factor in (1.0, 0.5, 3.0):
        scale_t.fill_(k_scale * factor)
        replay()
        torch.cuda.synchronize()
        ref_out, ref_lse = reference(q, dequantize_kv_cache_fp8(k8, k_scale * factor, torch.float32), table, lens,
                                     512, causal=True)
        assert_close(out, lse, ref_out, ref_lse, f"graph replay, k_scale x{factor}")


def test_fp8_torch_compile_with_k_scale_tensor():
    q, k8, k_scale, table, lens = make_fp8_inputs(4, 2, 16, 1, [500, 0, 4000, 64], "fp8_e4m3")
    scale_t = torch.tensor([k_scale], dtype=torch.float32, device="cuda")

    def step(q, k8, table, lens, scale_t):
        sched, splits = get_mla_metadata(lens, 32, 1)
        return flash_mla_with_kvcache(q, k8, table, lens, 512, sched, splits, causal=True, k_scale=scale_t)

    torch._dynamo.reset()
    out, lse = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k8, table, lens, scale_t)
    ref_out, ref_lse = reference(q, fp8_reference_cache(k8, k_scale, "fp8_e4m3"), table, lens, 512, causal=True)
    assert_close(out, lse, ref_out, ref_lse, "fp8 torch.compile")


def test_second_gpu():
    if torch.cuda.device_count() < 2:
        pytest.skip("only one GPU on this machine")
    run_case(4, 2, 16, 1, [100, 4000, 0, 9000], causal=True, device="cuda:1")


def test_cupy_without_torch():
    pytest.importorskip("cupy")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
    res = subprocess.run([sys.executable, os.path.join(HERE, "cupy_check.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "cupy ok" in res.stdout


def test_import_is_lazy_on_gpu_machine():
    code = "import sys, flashmla_jit; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch','cupy','cuda')))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)))
    assert res.stdout.strip() == "[]", res.stdout + res.stderr


COMPILE_FIRST = """
import sys, torch
from mla_reference import assert_close, make_inputs, reference
from flashmla_jit import flash_mla_with_kvcache, get_mla_metadata
q, k, bt, sl = make_inputs(3, 2, 16, 1, [700, 0, 3000])
def step(q, k, bt, sl):
    sched, splits = get_mla_metadata(sl, 32, 1)
    return flash_mla_with_kvcache(q, k, bt, sl, 512, sched, splits, causal=True)
if sys.argv[1] == "compile":  # the very first call of the process is inside a trace
    out, lse = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, bt, sl)
else:
    out, lse = step(q, k, bt, sl)
assert_close(out, lse, *reference(q, k, bt, sl, 512, causal=True), sys.argv[1])
print(sys.argv[1], "ok, ops registered:", "flashmla_jit.torch_ops" in sys.modules)
"""


@pytest.mark.parametrize("mode", ["compile", "eager"])
def test_custom_ops_register_on_first_trace_only(mode):
    # Eager-only processes skip torch.library's registration (~17 ms of the first call);
    # a process whose first call is inside torch.compile registers them then.
    res = subprocess.run([sys.executable, "-c", COMPILE_FIRST, mode], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE])))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{mode} ok, ops registered: {mode == 'compile'}" in res.stdout, res.stdout


def test_version():
    assert isinstance(flashmla_jit.__version__, str)
