"""Pure-Python twin of kernels/flashmla/metadata.cuh: the split-KV plan.

The GPU kernel must produce exactly plan()'s output (tests/test_gpu.py); the CPU
tests check the plan's properties (every block of every request done exactly once,
parts balanced) on this model.
"""


def plan(seqlens, num_parts, block_n, overhead, active=None, whole_slack_pct=0, whole_slack_blocks=0):
    """Returns (sched records [num_parts][8], num_splits [batch + 1]). Requests at or past
    `active` (default: all active) are padding: no piece. An aligned payload is taken when
    it is at most whole_slack_pct percent or whole_slack_blocks blocks above the equal one:
    whole requests per part when there are more requests than parts, else a request per k
    parts (each request padded on the line to whole parts, so no part holds two pieces)."""
    batch = len(seqlens)
    active = batch if active is None else min(max(active, 0), batch)
    blocks = [-(-max(n, 0) // block_n) if i < active else 0 for i, n in enumerate(seqlens)]
    costs = [nb + overhead if nb > 0 else 0 for nb in blocks]
    total = sum(costs)
    payload = max(1, -(-total // num_parts))
    count = sum(1 for c in costs if c > 0)
    max_cost = max(costs, default=0)
    pad = count <= num_parts
    aligned = -(-max_cost // (num_parts // count)) if pad and count else max_cost * -(-count // num_parts)
    if (count and (aligned * 100 <= payload * (100 + whole_slack_pct) or aligned - payload <= whole_slack_blocks)
            and (not pad or sum(-(-c // aligned) for c in costs) <= num_parts)):
        payload = aligned
    else:
        pad = False
    # A request's length on the cost line: its cost, or padded to whole parts (each request starts a part).
    lines = [-(-c // payload) * payload if pad else c for c in costs]
    total = sum(lines)
    begin = [None] * (num_parts + 1)
    num_splits, start, piece_start = [], 0, 0
    for i, (nb, cost, line) in enumerate(zip(blocks, costs, lines)):
        first_part = (start + overhead) // payload
        pieces = (start + overhead + nb - 1) // payload - first_part + 1 if nb > 0 else 0
        num_splits.append(piece_start)
        q = -(-start // payload)
        while cost > 0 and q * payload < start + cost and q < num_parts:
            begin[q] = [i, min(max(q * payload - start - overhead, 0), nb), piece_start + q - first_part]
            q += 1
        start += line
        piece_start += pieces
    num_splits.append(piece_start)
    for q in range(num_parts + 1):
        if q * payload >= total:
            begin[q] = [active, 0, piece_start]
    sched = [begin[q][:2] + begin[q + 1][:2] + [begin[q][2], active, 0, 0] for q in range(num_parts)]
    return sched, num_splits


def pieces_of(sched, num_splits, seqlens, block_n):
    """Walk the plan as the decode kernel does: yields (part, request, lo, hi, split index)."""
    batch = len(seqlens)
    for part, (b_req, b_blk, e_req, e_blk, b_split, *_) in enumerate(sched):
        req = b_req
        while req <= e_req and req < batch:
            nb = -(-seqlens[req] // block_n)
            lo = b_blk if req == b_req else 0
            hi = e_blk if req == e_req else nb
            if lo < hi:
                split = b_split if req == b_req else num_splits[req]
                yield part, req, lo, hi, split
            req += 1
