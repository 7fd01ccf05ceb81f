"""The split-KV plan (tests/sched_model.py, twin of kernels/flashmla/metadata.cuh)."""

import random

import pytest

from sched_model import pieces_of, plan, request_at, zeroed_flags

CASES = [
    ([4096] * 128, 132), ([16384] * 128, 132), ([65536], 132), ([0, 0, 0], 132), ([1], 132),
    ([0, 100, 0, 5000, 64, 65], 66), ([8192] * 128, 33), ([20] * 3000, 132), ([131072, 5, 0, 77], 1),
]


def random_case(seed):
    rng = random.Random(seed)
    batch = rng.choice([1, 2, 7, 64, 300, 2000])
    lens = [rng.choice([0, rng.randint(1, 70), rng.randint(1, 40000)]) for _ in range(batch)]
    return lens, rng.choice([1, 16, 33, 66, 132])


@pytest.mark.parametrize("lens,parts", CASES + [random_case(s) for s in range(40)])
def test_plan_covers_every_block_once(lens, parts):
    sched, num_splits = plan(lens, parts, 64, 5)
    assert len(sched) == parts and len(num_splits) == len(lens) + 1
    seen = {}
    pieces_per_req = {}
    for part, req, lo, hi, split in pieces_of(sched, num_splits, lens, 64):
        for blk in range(lo, hi):
            assert (req, blk) not in seen, f"block {blk} of request {req} done twice"
            seen[req, blk] = part
        pieces_per_req.setdefault(req, []).append(split)
    expected = {(r, b) for r, n in enumerate(lens) for b in range(-(-n // 64))}
    assert set(seen) == expected
    for req, n in enumerate(lens):
        splits = pieces_per_req.get(req, [])
        count = num_splits[req + 1] - num_splits[req]
        assert len(splits) == count
        # split indices of a request are its own contiguous range, in order
        assert splits == list(range(num_splits[req], num_splits[req] + count))
    assert num_splits[-1] <= len(lens) + parts  # scratch is sized for this


def varlen_case(seed):  # the bench's kind of varlen batch: the line is reordered (pack_order)
    rng = random.Random(seed)
    return [rng.randint(1, 6000) for _ in range(128)], 132


@pytest.mark.parametrize("lens,parts", CASES + [random_case(s) for s in range(40)] + [varlen_case(s) for s in range(8)])
def test_every_piece_a_part_publishes_has_its_flag_zeroed_by_that_part(lens, parts):
    # The few-pieces merge reads a split request's piece flags while decode CTAs still run
    # (params.cuh): a piece flagged in the scratch by an earlier call and never zeroed by its
    # own part would be merged before it is stored.
    sched, num_splits = plan(lens, parts, 64, 5)
    for part, req, lo, hi, split in pieces_of(sched, num_splits, lens, 64):
        if num_splits[req + 1] - num_splits[req] > 1:
            assert split in zeroed_flags(sched, part, len(lens)), f"piece {split} of request {req} in part {part}"


def test_varlen_cases_reorder_the_line():  # else the flag test above misses reordered lines
    for seed in range(8):
        lens, parts = varlen_case(seed)
        sched, _ = plan(lens, parts, 64, 5)
        assert any(request_at(sched, pos, len(lens)) != pos for pos in range(len(lens)))


@pytest.mark.parametrize("lens,parts", CASES + [random_case(s) for s in range(40, 60)])
def test_plan_balances_parts(lens, parts):
    overhead = 5
    sched, num_splits = plan(lens, parts, 64, overhead)
    load = [0] * parts
    for part, req, lo, hi, split in pieces_of(sched, num_splits, lens, 64):
        load[part] += hi - lo + overhead
    total = sum(-(-n // 64) + overhead for n in lens if n > 0)
    payload = max(1, -(-total // parts))
    # a part does at most its payload of blocks plus one extra overhead per piece boundary
    assert max(load) <= payload + 2 * overhead


@pytest.mark.parametrize("active", [0, 1, 5, 7])
def test_padding_requests_get_no_work(active):
    # A batch captured at 8 with `active` real requests: the padding's seqlens hold stale
    # values, yet no part visits them and every record carries the active count.
    lens = [3000, 0, 70, 9000, 64, 1, 20000, 4000]
    sched, num_splits = plan(lens, 33, 64, 5, active=active)
    real, _ = plan(lens[:active], 33, 64, 5)
    assert all(rec[5] == active for rec in sched)
    assert num_splits[active:] == [num_splits[active]] * (9 - active)  # no pieces past the active ones
    done = {(req, blk) for _, req, lo, hi, _ in pieces_of(sched, num_splits, lens, 64) for blk in range(lo, hi)}
    assert done == {(r, b) for r in range(active) for b in range(-(-lens[r] // 64))}
    assert [rec[:5] for rec in sched] == [rec[:5] for rec in real]  # same plan as the real batch alone


@pytest.mark.parametrize("lens,parts,slack,slack_blocks,whole", [
    ([4096] * 128, 132, 10, 0, True),      # b = 128 on 132 parts: equal payloads would cut nearly every request
    ([4096] * 128, 66, 10, 0, True),       # two requests a part, 3 % above the equal payload
    ([4096] * 128, 33, 0, 0, False),       # no slack: the equal payload splits
    ([4096] * 128, 33, 0, 12, True),       # compute-bound 4K: 8 blocks above the equal payload
    ([16384] * 128, 33, 0, 12, False),     # compute-bound 16K: 31 blocks above, split
    ([4096] * 100, 132, 10, 0, False),     # 32 idle parts would be 32 % of the time: split
    ([4096] * 127 + [8192], 132, 10, 0, False),  # one long request makes whole payloads too long
    ([0, 4096, 0, 4096], 2, 10, 0, True)])      # empty requests count for nothing
def test_whole_request_payload(lens, parts, slack, slack_blocks, whole):
    sched, num_splits = plan(lens, parts, 64, 5, whole_slack_pct=slack, whole_slack_blocks=slack_blocks)
    nonempty = sum(1 for n in lens if n > 0)
    assert (num_splits[-1] == nonempty) == whole
    total = sum(-(-n // 64) + 5 for n in lens if n > 0)
    load = [0] * parts
    for part, req, lo, hi, split in pieces_of(sched, num_splits, lens, 64):
        load[part] += hi - lo + 5
    equal_payload = -(-total // parts)
    assert max(load) <= max(equal_payload * (100 + slack) / 100, equal_payload + slack_blocks) + 2 * 5
    done = sorted((req, blk) for _, req, lo, hi, _ in pieces_of(sched, num_splits, lens, 64) for blk in range(lo, hi))
    assert done == [(r, b) for r, n in enumerate(lens) for b in range(-(-n // 64))]


@pytest.mark.parametrize("lens,parts,pieces", [
    ([8192] * 32, 66, 2),      # b = 32 h128: equal payloads cut most requests in 3, two pieces a part
    ([32768] * 16, 66, 4),     # b = 16 h128
    ([32768] * 4, 132, 33),    # b = 4 h16
    ([8192] * 64, 66, 1),      # k = 1: whole requests, one a part
    ([8192] * 31 + [8000], 66, 2)])  # nearly equal: the shorter request pads to whole parts too
def test_aligned_payload_gives_each_part_one_piece(lens, parts, pieces):
    sched, num_splits = plan(lens, parts, 64, 5, whole_slack_pct=10)
    assert [num_splits[i + 1] - num_splits[i] for i in range(len(lens))] == [pieces] * len(lens)
    per_part = [0] * parts
    for part, *_ in pieces_of(sched, num_splits, lens, 64):
        per_part[part] += 1
    assert max(per_part) == 1
    done = sorted((req, blk) for _, req, lo, hi, _ in pieces_of(sched, num_splits, lens, 64) for blk in range(lo, hi))
    assert done == [(r, b) for r, n in enumerate(lens) for b in range(-(-n // 64))]


@pytest.mark.parametrize("lens,parts", [([100, 40000, 3000], 132), ([8192] * 30 + [16384] * 2, 66)])
def test_aligned_payload_is_refused_past_the_slack(lens, parts):
    # Unequal requests: the largest cost over k is far above the equal payload.
    assert plan(lens, parts, 64, 5, whole_slack_pct=10) == plan(lens, parts, 64, 5)


def normal_lengths(batch, mean, seed):
    """normal(mean, mean / 2) clipped to [1, 2 mean], as tools/bench.py draws varlen batches."""
    rng = random.Random(seed)
    return [min(max(int(rng.gauss(mean, mean / 2)), 1), 2 * mean) for _ in range(batch)]


@pytest.mark.parametrize("batch,mean,parts", [(128, 8192, 132), (128, 4096, 132), (256, 16384, 132),
                                              (256, 4096, 132)])
def test_reordering_cuts_fewer_requests(batch, mean, parts):
    # One or two requests a part: laid in index order nearly every request straddles a
    # cut (each piece an fp32 partial, each cut request a merge). Pairs that add up to
    # whole payloads end on cuts, and no part gets longer than in index order.
    lens = normal_lengths(batch, mean, batch + mean)
    sched, num_splits = plan(lens, parts, 64, 5)
    _, index_order_splits = plan(lens, parts, 64, 5, reorder=False)
    cut = sum(1 for i in range(batch) if num_splits[i + 1] - num_splits[i] > 1)
    index_order_cut = sum(1 for i in range(batch) if index_order_splits[i + 1] - index_order_splits[i] > 1)
    assert cut <= 0.85 * index_order_cut, (cut, index_order_cut)

    def loads(sched, num_splits):  # blocks plus an overhead per piece
        load = [0] * parts
        for part, req, lo, hi, split in pieces_of(sched, num_splits, lens, 64):
            load[part] += hi - lo + 5
        return load
    assert max(loads(sched, num_splits)) <= max(loads(*plan(lens, parts, 64, 5, reorder=False)))
    # The records carry the order: every request at exactly one position.
    assert sorted(request_at(sched, pos, batch) for pos in range(batch)) == list(range(batch))


@pytest.mark.parametrize("lens,parts", [([64 * (1 + i % 9) + i for i in range(100)], 132)] +
                         [random_case(s) for s in range(60, 90)])
def test_reordering_never_cuts_more_pieces(lens, parts):
    # Pairs can lose to index order when requests span several parts (the first case:
    # 159 pieces against 148); the plan then keeps index order.
    _, num_splits = plan(lens, parts, 64, 5)
    _, index_order_splits = plan(lens, parts, 64, 5, reorder=False)
    assert num_splits[-1] <= index_order_splits[-1]


def test_order_is_left_alone_when_the_records_cannot_hold_it():
    # More requests than 4 a record: positions are requests (ints 6-7 unused).
    lens = normal_lengths(600, 2048, 1)
    sched, num_splits = plan(lens, 132, 64, 5)
    assert sched == plan(lens, 132, 64, 5, reorder=False)[0]
    assert all(rec[6] == rec[7] == 0 for rec in sched)
