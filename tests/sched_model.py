"""Pure-Python twin of kernels/flashmla/metadata.cuh: the split-KV plan.

The GPU kernel must produce exactly plan()'s output (tests/test_gpu.py); the CPU
tests check the plan's properties (every block of every request done exactly once,
parts balanced) on this model.
"""

import itertools

ORDER_PER_RECORD = 4  # u16 request indices in ints 6-7 of a record (kOrderPerRecord)
MAX_ORDER = 1024      # requests the metadata kernel reorders at most (kMetadataThreads)
MAX_PAYLOAD = 1024    # payloads it reorders for at most (kPackMaxPayload: its residue table)


def pack_order(costs, payload):
    """The order to lay requests on the cost line in, so that fewer straddle a cut
    (metadata.cuh, pack_order): first pairs of requests whose costs add up to a multiple
    of the payload (each pair then ends on a cut), then requests of whole payloads, then
    the rest, then those of cost 0; index order within each. Residue classes r and
    payload - r (r < payload - r, by r ascending) pair their requests in index order; the
    class payload / 2 pairs its own."""
    by_residue = {}
    for i, c in enumerate(costs):
        if c > 0:
            by_residue.setdefault(c % payload, []).append(i)
    pairs = []
    for r in range(1, payload):
        mine, partners = by_residue.get(r, []), by_residue.get(payload - r, [])
        if r < payload - r:
            pairs += [i for pair in zip(mine, partners) for i in pair]
        elif r == payload - r:
            pairs += mine[:len(mine) // 2 * 2]
    paired = set(pairs)
    whole = by_residue.get(0, [])
    rest = [i for i, c in enumerate(costs) if c > 0 and c % payload and i not in paired]
    return pairs + whole + rest + [i for i, c in enumerate(costs) if c <= 0]


def plan(seqlens, num_parts, block_n, overhead, active=None, whole_slack_pct=0, whole_slack_blocks=0, reorder=True):
    """Returns (sched records [num_parts][8], num_splits [batch + 1]). Requests at or past
    `active` (default: all active) are padding: no piece. An aligned payload is taken when
    it is at most whole_slack_pct percent or whole_slack_blocks blocks above the equal one:
    whole requests per part when there are more requests than parts, else a request per k
    parts (each request padded on the line to whole parts, so no part holds two pieces).
    Under equal payloads requests are laid in pack_order's order (reorder=False: in index
    order, for comparisons) when requests are more than half the parts, the batch fits
    the records and the payload the residue table."""
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
    took = bool(count and (aligned * 100 <= payload * (100 + whole_slack_pct) or
                           aligned - payload <= whole_slack_blocks)
                and (not pad or sum(-(-c // aligned) for c in costs) <= num_parts))
    if took:
        payload = aligned
    else:
        pad = False
    # A request's length on the cost line: its cost, or padded to whole parts (each request starts a part).
    lines = [-(-c // payload) * payload if pad else c for c in costs]
    total = sum(lines)
    packed = reorder and not took and 2 * count > num_parts and \
        batch <= min(MAX_ORDER, ORDER_PER_RECORD * num_parts) and payload <= MAX_PAYLOAD
    order = list(range(batch))

    def pieces_of(start, nb):  # the parts a request's blocks fall in, starting at `start`
        return (start + overhead + nb - 1) // payload - (start + overhead) // payload + 1 if nb > 0 else 0

    def line_pieces(order):  # pieces the line cuts the requests into, laid in this order
        start, pieces = 0, 0
        for i in order:
            pieces += pieces_of(start, blocks[i])
            start += lines[i]
        return pieces
    if packed:  # kept when it cuts fewer pieces (pairs can lose when requests span several parts)
        reordered = pack_order(costs, payload)
        if line_pieces(reordered) < line_pieces(order):
            order = reordered
    # Positions on the line: request order[pos] at starts[pos]; pieces per request.
    starts, pieces, start = [], [0] * batch, 0
    for i in order:
        starts.append(start)
        pieces[i] = pieces_of(start, blocks[i])
        start += lines[i]
    num_splits = [0, *itertools.accumulate(pieces)]
    begin = [None] * (num_parts + 1)
    for pos, (i, start) in enumerate(zip(order, starts)):
        first_part = (start + overhead) // payload
        q = -(-start // payload)
        while costs[i] > 0 and q * payload < start + costs[i] and q < num_parts:
            begin[q] = [pos, min(max(q * payload - start - overhead, 0), blocks[i]), num_splits[i] + q - first_part]
            q += 1
    for q in range(num_parts + 1):
        if q * payload >= total:
            begin[q] = [active, 0, num_splits[batch]]
    # Ints 6-7 of record q: the requests at positions 4q .. 4q + 3, u16 each (when the
    # batch fits the records; else positions are requests).
    fits = batch <= ORDER_PER_RECORD * num_parts
    at = [(order[pos] if fits and pos < batch else 0) for pos in range(ORDER_PER_RECORD * num_parts)]
    sched = [begin[q][:2] + begin[q + 1][:2] + [begin[q][2], active, at[4 * q] | at[4 * q + 1] << 16,
                                                 at[4 * q + 2] | at[4 * q + 3] << 16] for q in range(num_parts)]
    return sched, num_splits


def request_at(sched, pos, batch):
    """The request at position `pos` of the parts' walk (params.cuh, request_at)."""
    if batch > ORDER_PER_RECORD * len(sched):
        return pos
    word = sched[pos // 4][6 + pos % 4 // 2]
    return word >> 16 * (pos % 2) & 0xFFFF


def pieces_of(sched, num_splits, seqlens, block_n):
    """Walk the plan as the decode kernel does: yields (part, request, lo, hi, split index)."""
    batch = len(seqlens)
    for part, (b_pos, b_blk, e_pos, e_blk, b_split, *_) in enumerate(sched):
        pos = b_pos
        while pos <= e_pos and pos < batch:
            req = request_at(sched, pos, batch)
            nb = -(-seqlens[req] // block_n)
            lo = b_blk if pos == b_pos else 0
            hi = e_blk if pos == e_pos else nb
            if lo < hi:
                split = b_split if pos == b_pos else num_splits[req]
                yield part, req, lo, hi, split
            pos += 1


def zeroed_flags(sched, part, batch):
    """The split indices whose flags part `part`'s decode CTAs zero before the combine may
    start (params.cuh, decode_start_pieces): its first piece's and, when it ends inside a
    request, its last piece's (the next part's first, minus one). Split indices go by
    request index while the line may be reordered, so the last can lie below the first."""
    rec = sched[part]
    first = rec[4]
    last = sched[part + 1][4] - 1 if rec[3] > 0 and part + 1 < len(sched) else first
    return {first} | ({last} if last < batch + len(sched) else set())
