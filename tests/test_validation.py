"""Bad input raises a clear TypeError/ValueError naming the argument (CPU tensors suffice)."""

import pathlib

import pytest

torch = pytest.importorskip("torch")

from flashmla_jit import api, flash_mla_with_kvcache, get_mla_metadata, settings, spec  # noqa: E402
from flashmla_jit.tensors import describe  # noqa: E402


def good(batch=2, s_q=1, h_q=16, h_kv=1, pages=8, page=64, d=576):
    return dict(
        q=torch.randn(batch, s_q, h_q, d, dtype=torch.bfloat16),
        k_cache=torch.randn(pages, page, h_kv, d, dtype=torch.bfloat16),
        block_table=torch.zeros(batch, 4, dtype=torch.int32),
        cache_seqlens=torch.full((batch,), 100, dtype=torch.int32),
        head_dim_v=512,
        tile_scheduler_metadata=torch.zeros(132, 8, dtype=torch.int32),
        num_splits=torch.zeros(batch + 1, dtype=torch.int32),
    )


def call(**overrides):
    args = good()
    args.update(overrides)
    return flash_mla_with_kvcache(**args)


CASES = [
    (dict(q=torch.randn(2, 1, 16, 576)), TypeError, "q must have dtype bf16 or fp16, got fp32"),
    (dict(q=torch.randn(2, 16, 576, dtype=torch.bfloat16)), ValueError, "q must be 4-D"),
    (dict(q=[1, 2, 3]), TypeError, "q must be a torch tensor"),
    (dict(k_cache=torch.randn(8, 64, 1, 576, dtype=torch.float16)), TypeError, "k_cache must have q's dtype"),
    (dict(k_cache=torch.randn(8, 64, 576, dtype=torch.bfloat16)), ValueError, "k_cache must be 4-D"),
    (dict(k_cache=torch.randn(8, 64, 1, 512, dtype=torch.bfloat16)), ValueError, "k_cache head_dim must equal q's"),
    (dict(head_dim_v=256), ValueError, "unsupported head dims (d=576, head_dim_v=256)"),
    (dict(k_cache=torch.randn(8, 64, 3, 576, dtype=torch.bfloat16)), ValueError, "h_q (16, q.shape[-2]) must be a multiple of h_kv (3"),
    (dict(q=torch.randn(2, 1, 576, 16, dtype=torch.bfloat16).transpose(2, 3)), ValueError, "q must have a contiguous last dimension"),
    (dict(q=torch.randn(2, 1, 16, 580, dtype=torch.bfloat16)[..., :576]), ValueError, "q stride of dim 2 must be a multiple of 8"),
    (dict(block_table=torch.zeros(2, 4, dtype=torch.int64)), TypeError, "block_table must have dtype int32"),
    (dict(block_table=torch.zeros(3, 4, dtype=torch.int32)), ValueError, "block_table must have 2 rows"),
    (dict(block_table=torch.zeros(8, dtype=torch.int32)), ValueError, "block_table must be 2-D"),
    (dict(cache_seqlens=torch.zeros(3, dtype=torch.int32)), ValueError, "cache_seqlens must have shape (2,)"),
    (dict(cache_seqlens=torch.zeros(2, dtype=torch.float32)), TypeError, "cache_seqlens must have dtype int32"),
    (dict(num_splits=torch.zeros(5, dtype=torch.int32)), ValueError, "metadata made for batch 4, but q has batch 2"),
    (dict(tile_scheduler_metadata=torch.zeros(132, 4, dtype=torch.int32)), ValueError, "tile_scheduler_metadata must come from get_mla_metadata"),
    ({}, ValueError, "q must be on a CUDA device, got cpu"),
    (dict(q_pe=torch.randn(2, 1, 16, 64, dtype=torch.bfloat16)), ValueError,
     "with q_pe given, q holds the latent columns only: its last dim must be head_dim_v = 512, got 576"),
    (dict(q=torch.randn(2, 1, 16, 512, dtype=torch.bfloat16), q_pe=torch.randn(2, 1, 8, 64, dtype=torch.bfloat16)),
     ValueError, "q_pe must have shape (2, 1, 16) + (rope_dim,) like q"),
    (dict(q=torch.randn(2, 1, 16, 512, dtype=torch.bfloat16), q_pe=torch.randn(2, 1, 16, 64)), TypeError,
     "q_pe must have q's dtype bf16, got fp32"),
    (dict(k_cache=torch.randn(8, 64, 1, 512, dtype=torch.bfloat16), k_pe_cache=torch.randn(8, 32, 1, 64, dtype=torch.bfloat16)),
     ValueError, "k_pe_cache must have shape (8, 64, 1) + (rope_dim,) like k_cache"),
    (dict(out=torch.empty(2, 1, 16, 256, dtype=torch.bfloat16)), ValueError, "out must have shape (2, 1, 16, 512)"),
    (dict(out=torch.empty(2, 1, 16, 512, dtype=torch.float16)), TypeError, "out must have dtype bf16, got fp16"),
    (dict(lse=torch.empty(2, 1, 16)), ValueError, "lse must have shape (2, 16, 1)"),
    (dict(lse=torch.empty(2, 16, 1, dtype=torch.bfloat16)), TypeError, "lse must have dtype fp32"),
    (dict(lse=torch.empty(2, 16, 2)[..., :1]), ValueError, "lse must be contiguous"),
]


@pytest.mark.parametrize("overrides,exc,message", CASES, ids=[c[2][:40] for c in CASES])
def test_bad_input(overrides, exc, message):
    with pytest.raises(exc) as info:
        call(**overrides)
    assert message in str(info.value)


def test_ragged_bad_input():
    ragged = dict(q=torch.randn(5, 16, 576, dtype=torch.bfloat16), cu_seqlens_q=torch.tensor([0, 2, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="max_seqlen_q must be a positive int with cu_seqlens_q"):
        call(**ragged)
    with pytest.raises(ValueError, match=r"q must be 3-D \(total_q, h_q, head_dim\) with cu_seqlens_q"):
        call(cu_seqlens_q=ragged["cu_seqlens_q"], max_seqlen_q=3)
    with pytest.raises(ValueError, match=r"cu_seqlens_q must have shape \(3,\)"):
        call(q=ragged["q"], cu_seqlens_q=torch.tensor([0, 5], dtype=torch.int32), max_seqlen_q=3)
    with pytest.raises(TypeError, match="cu_seqlens_q must have dtype int32"):
        call(q=ragged["q"], cu_seqlens_q=torch.tensor([0, 2, 5]), max_seqlen_q=3)
    with pytest.raises(ValueError, match=r"out must have shape \(5, 16, 512\)"):
        call(**ragged, max_seqlen_q=3, out=torch.empty(2, 1, 16, 512, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"lse must have shape \(16, 5\)"):
        call(**ragged, max_seqlen_q=3, lse=torch.empty(2, 16, 1))
    with pytest.raises(ValueError, match="q must be on a CUDA device"):  # everything else is well formed
        call(**ragged, max_seqlen_q=3)


def test_validate_mode_cu_seqlens():
    with pytest.raises(ValueError, match="cu_seqlens_q must rise from 0 to total_q = 5"):
        api._validate_cu_seqlens(describe(torch.tensor([0, 3, 2], dtype=torch.int32), "cu_seqlens_q"), 5, 4)
    with pytest.raises(ValueError, match="a request of 3 query tokens, more than max_seqlen_q = 2"):
        api._validate_cu_seqlens(describe(torch.tensor([0, 3, 5], dtype=torch.int32), "cu_seqlens_q"), 5, 2)


def test_dlpack_host_array_is_named():
    import numpy as np
    with pytest.raises(ValueError, match=r"q must be on a CUDA device, got a numpy.ndarray on DLPack device type 1"):
        call(q=np.zeros((2, 1, 16, 576), np.float16))


def test_metadata_bad_input():
    with pytest.raises(TypeError, match="cache_seqlens must have dtype int32"):
        get_mla_metadata(torch.zeros(4, dtype=torch.int64), 16, 1)
    with pytest.raises(ValueError, match="num_heads_per_head_k must be a positive int"):
        get_mla_metadata(torch.zeros(4, dtype=torch.int32), 0, 1)
    with pytest.raises(ValueError, match="num_heads_k must be a positive int"):
        get_mla_metadata(torch.zeros(4, dtype=torch.int32), 16, 1.5)
    with pytest.raises(ValueError, match="cache_seqlens must be on a CUDA device"):
        get_mla_metadata(torch.zeros(4, dtype=torch.int32), 16, 1)


def _on_device(t, device):
    d = describe(t, "x")
    d.device = device
    return d


def test_mixed_devices(monkeypatch):
    a, b = _on_device(torch.zeros(2), 0), _on_device(torch.zeros(2), 1)
    with pytest.raises(ValueError, match="one CUDA device, got q on cuda:0, k_cache on cuda:1"):
        api._check_device({"q": a, "k_cache": b})


def test_not_hopper(monkeypatch):
    from flashmla_jit import driver
    monkeypatch.setattr(driver, "compute_capability", lambda device: (8, 0))
    with pytest.raises(ValueError, match="needs a Hopper GPU.*sm_80"):
        api._check_device({"q": _on_device(torch.zeros(2), 0)})


def test_validate_mode_block_table_too_small():
    table = describe(torch.zeros(2, 2, dtype=torch.int32), "block_table")
    lens = describe(torch.tensor([100, 129], dtype=torch.int32), "cache_seqlens")
    with pytest.raises(ValueError, match="block_table is too small: sequence 1 has 129 tokens = 3 pages"):
        api._validate_on_host(table, lens, 64, 10)


def test_validate_mode_page_out_of_range():
    table = describe(torch.tensor([[0, 1], [2, 10]], dtype=torch.int32), "block_table")
    lens = describe(torch.tensor([100, 70], dtype=torch.int32), "cache_seqlens")
    with pytest.raises(ValueError, match=r"block_table row 1 holds page ids outside \[0, 10\)"):
        api._validate_on_host(table, lens, 64, 10)


def test_validate_mode_negative_seqlen():
    table = describe(torch.zeros(1, 2, dtype=torch.int32), "block_table")
    lens = describe(torch.tensor([-1], dtype=torch.int32), "cache_seqlens")
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\] = -1 is negative"):
        api._validate_on_host(table, lens, 64, 10)


def test_metadata_graph_arguments():
    lens = torch.full((4,), 100, dtype=torch.int32)
    sched, ns = torch.zeros(132, 8, dtype=torch.int32), torch.zeros(5, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"num_seqs must be in \[0, 4\]"):
        get_mla_metadata(lens, 16, 1, num_seqs=5)
    with pytest.raises(TypeError, match="num_seqs must have dtype int32"):
        get_mla_metadata(lens, 16, 1, num_seqs=torch.tensor([2]))
    with pytest.raises(ValueError, match="num_seqs must be an int or a 1-element int32 array"):
        get_mla_metadata(lens, 16, 1, num_seqs=torch.tensor([2, 3], dtype=torch.int32))
    with pytest.raises(TypeError, match=r"out must be a \(tile_scheduler_metadata, num_splits\) pair"):
        get_mla_metadata(lens, 16, 1, out=sched)
    with pytest.raises(ValueError, match=r"out\[0\] \(tile_scheduler_metadata\) must have shape \(num_parts, 8\)"):
        get_mla_metadata(lens, 16, 1, out=(torch.zeros(132, 4, dtype=torch.int32), ns))
    with pytest.raises(ValueError, match=r"out\[1\] \(num_splits\) must have shape \(5,\)"):
        get_mla_metadata(lens, 16, 1, out=(sched, torch.zeros(4, dtype=torch.int32)))
    with pytest.raises(TypeError, match=r"out\[1\] \(num_splits\) must have dtype int32"):
        get_mla_metadata(lens, 16, 1, out=(sched, torch.zeros(5)))
    with pytest.raises(ValueError, match="cache_seqlens must be on a CUDA device"):  # well formed otherwise
        get_mla_metadata(lens, 16, 1, num_seqs=3, out=(sched, ns))


# ---- FP8 caches ---------------------------------------------------------------------------

def fp8_cache(last=576, pages=8, page=64, dtype=torch.float8_e4m3fn):
    return torch.zeros(pages, page, 1, last, dtype=torch.uint8).view(dtype)


FP8_CASES = [
    (dict(k_cache=torch.zeros(8, 64, 1, 576, dtype=torch.float8_e5m2)), TypeError,
     "k_cache must have q's dtype bf16, or be an FP8 cache (float8_e4m3fn, or uint8 holding e4m3 bytes), got float8_e5m2"),
    (dict(k_cache=fp8_cache()), ValueError, "k_scale is required with a per-tensor FP8 k_cache (last dim 576)"),
    (dict(k_scale=0.5), ValueError, "k_scale applies only to an FP8 k_cache, but k_cache is bf16"),
    (dict(k_cache=fp8_cache(), k_scale=torch.ones(1, dtype=torch.float16)), TypeError, "k_scale must have dtype fp32, got fp16"),
    (dict(k_cache=fp8_cache(), k_scale=torch.ones(2)), ValueError, "k_scale must hold exactly one element, got shape (2,)"),
    (dict(k_cache=fp8_cache(), k_scale="0.5"), TypeError, "k_scale must be a float or a 1-element float32 tensor, got builtins.str"),
    (dict(k_cache=fp8_cache(), k_scale=-1.0), ValueError, "k_scale must be a positive finite number, got -1.0"),
    (dict(k_cache=fp8_cache(), k_scale=float("nan")), ValueError, "k_scale must be a positive finite number, got nan"),
    (dict(k_cache=fp8_cache(), k_scale=True), TypeError, "k_scale must be a float or a 1-element float32 tensor, got builtins.bool"),
    (dict(q=torch.randn(2, 1, 16, 512, dtype=torch.bfloat16), k_cache=fp8_cache(512), k_scale=1.0,
          k_pe_cache=torch.zeros(8, 64, 1, 64, dtype=torch.bfloat16)), ValueError, "k_pe_cache is not supported with an FP8 k_cache"),
    (dict(k_cache=fp8_cache(600), k_scale=1.0), ValueError, "an FP8 k_cache must have last dim 576 or 512 (per-tensor e4m3, with k_scale) or 656"),
    (dict(q=torch.randn(2, 1, 16, 576, dtype=torch.float16), k_cache=fp8_cache(656)), TypeError,
     "q must be bf16 with the 656-byte FP8 k_cache (its rope part is bf16), got fp16"),
    (dict(k_cache=fp8_cache(656), k_scale=1.0), ValueError, "k_scale must be None with the 656-byte FP8 k_cache"),
    (dict(q=torch.randn(2, 1, 16, 512, dtype=torch.bfloat16), k_cache=fp8_cache(656)), ValueError,
     "q's head_dim must be 576 and head_dim_v 512, got head_dim 512, head_dim_v 512"),
    (dict(k_cache=fp8_cache(656), head_dim_v=256), ValueError, "got head_dim 576, head_dim_v 256"),
    (dict(k_cache=torch.zeros(8, 64, 1, 584, dtype=torch.uint8)[..., :576], k_scale=1.0), ValueError,
     "k_cache stride of dim 1 must be a multiple of 16 elements (16 bytes)"),
    (dict(q=torch.randn(2, 1, 16, 576, dtype=torch.float32), k_cache=fp8_cache(), k_scale=1.0), TypeError,
     "q must have dtype bf16 or fp16, got fp32"),
    # well formed: every check passes up to the device one
    (dict(k_cache=fp8_cache(), k_scale=0.25), ValueError, "q must be on a CUDA device"),
    (dict(k_cache=fp8_cache(512), q=torch.randn(2, 1, 16, 512, dtype=torch.float16), k_scale=torch.tensor(0.25)),
     ValueError, "q must be on a CUDA device"),
    (dict(k_cache=fp8_cache(656, dtype=torch.uint8)), ValueError, "q must be on a CUDA device"),
    (dict(k_cache=fp8_cache(656), q=torch.randn(2, 1, 16, 512, dtype=torch.bfloat16),
          q_pe=torch.randn(2, 1, 16, 64, dtype=torch.bfloat16)), ValueError, "q must be on a CUDA device"),
]


@pytest.mark.parametrize("overrides,exc,message", FP8_CASES, ids=[c[2][:48] for c in FP8_CASES])
def test_fp8_bad_input(overrides, exc, message):
    with pytest.raises(exc) as info:
        call(**overrides)
    assert message in str(info.value)


def test_fp8_k_scale_on_another_device():
    q, k = describe(torch.zeros(2, 1, 16, 576, dtype=torch.bfloat16), "q"), describe(fp8_cache(), "k_cache")
    k.device = 0
    with pytest.raises(ValueError, match="k_scale must be on k_cache's device, got the host"):
        api._kv_format(k, q, describe(torch.ones(1), "k_scale"), None)
    with pytest.raises(ValueError, match="k_scale must be on k_cache's device, got cuda:1"):
        api._kv_format(k, q, _on_device(torch.ones(()), 1), None)


def test_fp8_formats():
    q = describe(torch.zeros(2, 1, 16, 576, dtype=torch.bfloat16), "q")
    assert api._kv_format(describe(fp8_cache(), "k"), q, 0.5, None) == ("fp8_e4m3", None, 0.5)
    fmt, st, value = api._kv_format(describe(fp8_cache(dtype=torch.uint8), "k"), q,
                                    describe(torch.tensor([2.0]), "k_scale"), None)
    assert (fmt, st.shape, value) == ("fp8_e4m3", (1,), 1.0)
    assert api._kv_format(describe(fp8_cache(656), "k"), q, None, None) == ("fp8_656", None, 1.0)
    assert api._kv_format(describe(torch.zeros(1, 1, 1, 576, dtype=torch.bfloat16), "k"), q, None, None) == ("same", None, 1.0)


def host_plan(s_q=1, h_q=16, h_kv=1, page_size=64, causal=False):
    """A decode plan built on the host (no GPU): batch 2, q (2, s_q, h_q, 576), 8 pages of
    page_size tokens, a 4-page block table, 132 scheduler parts."""
    q = describe(torch.zeros(2, s_q, h_q, 576, dtype=torch.bfloat16), "q")
    k = describe(torch.zeros(8, page_size, h_kv, 576, dtype=torch.bfloat16), "k_cache")
    bt = describe(torch.zeros(2, 4, dtype=torch.int32), "block_table")
    sched = describe(torch.zeros(132, 8, dtype=torch.int32), "tile_scheduler_metadata")
    return api._DecodePlan(q, k, bt, sched, None, None, None, None, 0, 2, s_q, h_q, h_kv, 576, 512, None, causal,
                           (2, s_q, h_q, 512), (2, h_q, s_q), ("same", None, 1.0))


def test_plan_fills_every_size_and_stride():
    # The per-signature plan prefills all but the pointers of both kernels' parameters.
    plan = host_plan(s_q=3, h_q=16, causal=True)
    # 48 rows per KV head: a 64-row tile on 64-token pages runs the seesaw (TMA) kernel
    assert plan.seesaw and plan.decode_spec.seesaw
    assert plan.kv_geometry == ((512, 1, 64, 8, 576, 576, 64 * 576), (64, 1, 64, 8, 576, 576, 64 * 576))
    dp, cp = plan.decode_params.p, plan.combine_params
    assert (dp.q_batch_stride, dp.q_seq_stride, dp.q_head_stride) == (3 * 16 * 576, 16 * 576, 576)
    assert (dp.q_pe_batch_stride, dp.k_pe_page_stride) == (3 * 16 * 576, 64 * 576)
    assert (dp.rows, dp.max_blocks, dp.page_size, dp.num_pages) == (48, 4, 64, 8)
    for p in (dp, cp):
        assert (p.o_batch_stride, p.o_seq_stride, p.o_head_stride) == (3 * 16 * 512, 16 * 512, 512)
        assert (p.lse_batch_stride, p.lse_head_stride, p.lse_seq_stride) == (48, 3, 1)
        assert (p.batch, p.s_q, p.h_q, p.h_kv, p.heads_per_kv) == (2, 3, 16, 1, 16)
    # 16 heads per KV head: Q tiles by TMA, a box of 64 columns x 16 heads x 4 tokens (the
    # 4th past s_q = 3 loads zeros), q seen as (columns, heads, tokens, requests)
    assert plan.decode_spec.q_tma
    strides = (576, 16 * 576, 3 * 16 * 576)
    assert plan.q_geometry == (((512, 16, 3, 2), strides, (64, 16, 4, 1)), ((64, 16, 3, 2), strides, (64, 16, 4, 1)))
    # 132 parts for 2 requests: 67 pieces each, merged by a CTA per half row (2 chunks)
    assert cp.rows == 48 and plan.combine_spec.merge_chunks == 2
    assert plan.decode_grid == (1, 1, 132) and plan.combine_grid == (2 * 48 * 2, 1, 1)


@pytest.mark.parametrize("batch,num_parts,rows,chunks", [(1, 132, 16, 1), (1, 66, 128, 2), (4, 132, 16, 2),
                                                     (4, 66, 128, 4), (16, 132, 16, 4), (16, 66, 128, 0),
                                                     (32, 66, 128, 0), (128, 132, 64, 0)])
def test_merge_grid_is_the_faster_one_measured(batch, num_parts, rows, chunks):
    # H100 merge tails after the decode kernel (docs/PERF.md v15), e.g. b = 16 h128: a warp
    # per row 7.5 us, a CTA per row 20.3; b = 4 h128: 12.0 against 7.6.
    decode_ctas = num_parts * max(1, rows // 64)
    assert api.merge_grid(batch, 1, rows, num_parts, 512, decode_ctas)[0] == chunks


@pytest.mark.parametrize("batch,rows,warps", [(1, 16, 16), (1, 32, 16), (1, 64, 8), (2, 16, 8)])
def test_one_chunk_merge_takes_16_warps_where_each_cta_has_an_sm(batch, rows, warps):
    # b = 1 h16 32K: 64 CTAs of 16 warps merged 0.9 us sooner than of 8; b = 4 h128's
    # 512 CTAs of 16 warps (one an SM) 5 us later (docs/PERF.md v19)
    chunks, merge_warps = api.merge_grid(batch, 1, rows, 132, 512, 132)
    assert (chunks == 1, merge_warps) == (batch == 1, warps)
    api.combine_spec("bf16", 576, 512, chunks, merge_warps)  # a valid spec


def test_merge_loads_mirror_the_kernel():
    combine = pathlib.Path(__file__).parent.parent / "kernels" / "flashmla" / "combine.cuh"
    assert f"kMergeLoads = kWarps == 16 ? {spec.MERGE_LOADS[16]} : {spec.MERGE_LOADS[8]};" in combine.read_text()


@pytest.mark.parametrize("pieces_per_request", [2, 30, 60, 130, 300])
def test_many_pieces_grid_holds_a_request_in_one_round_when_it_can(pieces_per_request):
    chunks, warps = api.merge_grid(1, 1, 16, pieces_per_request - 1, 512, 132)
    assert chunks in (1, 2, 4)
    fits = warps * (spec.MERGE_LOADS[warps] // chunks) >= pieces_per_request
    assert fits or chunks == 1  # past 144 (8 warps) or 160 (16) pieces: one chunk a CTA, in rounds
    assert chunks == 4 or 8 * (spec.MERGE_LOADS[8] // (2 * chunks)) < pieces_per_request


@pytest.mark.parametrize("h_q, page_size, env, seesaw", [(128, 64, None, True), (128, 128, None, True),
                                                         (32, 64, None, True), (17, 64, None, True),
                                                         (16, 64, None, True), (1, 64, None, True), (128, 16, None, False),
                                                         (128, 64, "0", False)])
def test_plan_picks_the_seesaw_kernel_for_whole_64_token_pages(h_q, page_size, env, seesaw, monkeypatch):
    if env is not None:
        monkeypatch.setenv("FLASHMLA_JIT_SEESAW", env)
    settings.get.cache_clear()
    try:
        plan = host_plan(h_q=h_q, page_size=page_size)
        assert plan.seesaw == seesaw and plan.decode_spec.seesaw == seesaw
        assert plan.decode_spec.tile_rows == (64 if seesaw else spec.tile_rows_for(h_q))
        assert plan.decode_grid[0] == -(-h_q // plan.decode_spec.tile_rows)
    finally:
        settings.get.cache_clear()


@pytest.mark.parametrize("h_q, h_kv, env, q_tma", [(128, 1, None, True), (64, 1, None, True), (256, 2, None, True),
                                                   (16, 1, None, True), (1, 1, None, True), (48, 1, None, False),
                                                   (96, 1, None, False), (128, 1, "0", False)])
def test_seesaw_loads_q_by_tma_where_a_tile_is_one_box(h_q, h_kv, env, q_tma, monkeypatch):
    """A 64-row Q tile is one TMA box per 64 columns when a KV head's heads are a multiple
    of 64 or divide 64; other head counts (and FLASHMLA_JIT_Q_TMA=0) copy Q by cp.async."""
    if env is not None:
        monkeypatch.setenv("FLASHMLA_JIT_Q_TMA", env)
    settings.get.cache_clear()
    try:
        plan = host_plan(h_q=h_q, h_kv=h_kv)
        assert plan.seesaw and plan.decode_spec.q_tma == q_tma and (plan.q_geometry is not None) == q_tma
        assert ("q_tma" in plan.decode_spec.name) == q_tma
        assert plan.decode_spec.name_expression.endswith(f"{'true' if q_tma else 'false'}>")
    finally:
        settings.get.cache_clear()
    with pytest.raises(ValueError, match="q_tma"):
        spec.KernelSpec("decode", tile_rows=64, q_tma=True)


def test_q_tile_geometry_of_ragged_split_and_strided_queries():
    """The Q maps see a packed ragged q as one request of every token, a split q_pe through
    its own strides, and give extent-1 dimensions a stride TMA accepts (any is unused)."""
    ragged = describe(torch.zeros(7, 32, 512, dtype=torch.bfloat16), "q")
    q_pe = describe(torch.zeros(7, 32, 128, dtype=torch.bfloat16)[..., :64], "q_pe")
    latent, rope = api.q_tile_geometry(ragged, q_pe, True, 32, 576, 512)
    assert latent == ((512, 32, 7, 1), (512, 32 * 512, 8), (64, 32, 2, 1))
    assert rope == ((64, 32, 7, 1), (128, 32 * 128, 8), (64, 32, 2, 1))
    # one request, one token, 128 heads of a wider row: the extent-1 strides become 8
    wide = describe(torch.zeros(1, 1, 128, 640, dtype=torch.bfloat16)[..., :576], "q")
    latent, rope = api.q_tile_geometry(wide, None, False, 128, 576, 512)
    assert latent == ((512, 128, 1, 1), (640, 8, 8), (64, 64, 1, 1))
    assert rope == ((64, 128, 1, 1), (640, 8, 8), (64, 64, 1, 1))
    assert api.q_tile_geometry(wide, None, False, 128, 512, 512)[1] is None  # no rope part
    # a reversed token order (cupy allows negative strides; TMA strides are unsigned): cp.async
    from flashmla_jit.tensors import Tensor
    reversed_tokens = Tensor(None, "cupy", 1 << 20, (2, 4, 16, 576), (4 * 16 * 576, -16 * 576, 576, 1), "bf16", 0)
    assert api.q_tile_geometry(reversed_tokens, None, False, 16, 576, 512) is None


def _fake_tile_map(layout):
    """A stand-in for driver.tile_map (no driver here): 128 bytes holding the address at
    bytes 16-23 ("plain"), split over two places ("split"), or scrambled ("other")."""
    def tile_map(address, dims, strides, box):
        body = bytearray(hash((dims, strides, box)).to_bytes(8, "little", signed=True) * 16)
        a = address.to_bytes(8, "little")
        if layout == "plain":
            body[16:24] = a
        elif layout == "split":
            body[16:20], body[40:44] = a[:4], a[4:]
        else:
            body[16:24] = (address * 0x9E3779B1 % 2 ** 64).to_bytes(8, "little")
        return bytes(body)
    return tile_map


@pytest.mark.parametrize("layout, offset", [("plain", 16), ("split", None), ("other", None)])
def test_tensor_map_address_offset_found_only_for_a_plain_u64(layout, offset, monkeypatch):
    from flashmla_jit import driver
    monkeypatch.setattr(driver, "tile_map", _fake_tile_map(layout))
    driver.tensor_map_address_offset.cache_clear()
    try:
        assert driver.tensor_map_address_offset() == offset
    finally:
        driver.tensor_map_address_offset.cache_clear()


@pytest.mark.parametrize("layout", ["plain", "other"])
def test_each_call_sets_its_q_addresses_in_the_q_maps(layout, monkeypatch):
    """Patched (the driver keeps the address as a plain u64) or encoded anew, the Q maps of
    a call equal the maps encoded for its q and q_pe addresses, and nothing else moves."""
    from flashmla_jit import driver
    from flashmla_jit.params import SeesawParams
    monkeypatch.setattr(driver, "tile_map", _fake_tile_map(layout))
    driver.tensor_map_address_offset.cache_clear()
    try:
        plan = host_plan(h_q=64)
        plan._encode_q_maps(0x7000_0000, 0x7000_0400)
        at = SeesawParams.q_latent.offset
        for q_addr in (0x7000_0000, 0x1234_5670, 0x7F00_0000_0010):
            params = SeesawParams.from_buffer_copy(plan.decode_template)
            plan.set_q_maps(params, q_addr, q_addr + 1024)
            raw = bytes(params)
            assert raw[at:at + 256] == plan._q_maps(q_addr, q_addr + 1024)
            assert raw[:at] + raw[at + 256:] == plan.decode_template[:at] + plan.decode_template[at + 256:]
    finally:
        driver.tensor_map_address_offset.cache_clear()


@pytest.mark.parametrize("h_q, s_q, evict_first",
                         [(128, 2, True), (128, 1, True), (64, 2, True), (96, 1, True), (64, 1, False), (32, 2, False)])
def test_seesaw_loads_kv_evict_first_above_64_rows(h_q, s_q, evict_first):
    """Above 64 query rows per KV head (two or more m-block CTAs read each KV block) the
    seesaw variant with evict-first KV loads runs (faster there, slower at or below:
    docs/PERF.md v21, v25); the spec's name says which."""
    s = spec.decode_spec("bf16", 576, 512, True, s_q, s_q * h_q, "same", True)
    assert s.kv_evict_first == evict_first
    assert ("evict_first" in s.name) == evict_first
    assert s.name_expression.endswith(f"{'true' if evict_first else 'false'}, false>")
    with pytest.raises(ValueError, match="kv_evict_first"):
        spec.KernelSpec("decode", tile_rows=64, kv_evict_first=True)
