"""Pure-PyTorch references for every compiled op.

They define the expected results in the tests and are the baselines in ``benchmarks/kernels.py``. They
follow the same fp32 arithmetic as the kernels (Note [Int8 arithmetic]), so deterministic outputs match
bitwise; they are written the way a PyTorch user would write them (vectorized tensor ops), not as loops.
"""

from __future__ import annotations

import torch

INT8_MAX = 127.0
MIN_ABSMAX = 2.0**-120  # blocks below this quantize to zero: 127 / absmax would overflow fp32


def _blocks(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, int]:
    """x flattened to fp32 and zero-padded to whole blocks, shaped (nblocks, block_size)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    nblocks = -(-n // block_size)
    return torch.nn.functional.pad(flat, (0, nblocks * block_size - n)).view(nblocks, block_size), n


def quantize_int8(x, block_size, stochastic=False, generator=None):
    blocks, n = _blocks(x, block_size)
    absmax = blocks.abs().amax(dim=1)  # propagates NaN
    special = (absmax < MIN_ABSMAX) | ~torch.isfinite(absmax)
    # Tensor-by-tensor division: `127 / t` and `t / 127` may be computed through a reciprocal in PyTorch
    # (two roundings); the kernels divide once, correctly rounded.
    full127 = torch.full_like(absmax, INT8_MAX)
    v = blocks * (full127 / absmax)[:, None]
    if stochastic:
        v = torch.floor(v + torch.rand(v.shape, generator=generator, device=v.device))
    else:
        v = torch.round(v)  # half to even
    q = torch.where(special[:, None], 0.0, v.clamp(-INT8_MAX, INT8_MAX)).to(torch.int8)
    scales = torch.where(absmax < MIN_ABSMAX, 0.0, torch.where(torch.isfinite(absmax), absmax / full127, absmax))
    return q.reshape(-1)[:n].reshape(x.shape), scales


def dequantize_int8(q, scales, block_size, dtype=None):
    blocks, n = _blocks(q, block_size)
    out = (blocks * scales[:, None]).reshape(-1)[:n]
    return out.reshape(q.shape).to(dtype or torch.float32)


def dequantize_add_(acc, q, scales, block_size):
    acc.add_(dequantize_int8(q, scales, block_size).view(acc.shape))
    return acc


def quantize_int8_into_(q, scales, x, block_size, add_q=None, add_scales=None, divisor=1.0):
    y = x.reshape(-1).float()
    if add_q is not None:
        y = y + dequantize_int8(add_q.reshape(-1), add_scales, block_size)
    if divisor != 1.0:
        y = y / torch.full_like(y, divisor)
    q_new, s_new = quantize_int8(y, block_size)
    q.view(-1).copy_(q_new)
    scales.copy_(s_new)


def dequantize_int8_into_(out, q, scales, block_size):
    out.view(-1).copy_(dequantize_int8(q.reshape(-1), scales, block_size, out.dtype))


def topk_compress(x, k, residual=None, index_dtype=torch.int64):
    y = x.reshape(-1) if residual is None else residual.view(-1).add_(x.reshape(-1))
    # Magnitudes as fp32 bit patterns: integer order is magnitude order with NaN above Inf, as in the kernels.
    keys = y.float().abs().view(torch.int32)
    _, idx = torch.topk(keys, k, sorted=False)
    if k:  # torch.topk breaks ties arbitrarily: keep everything above the k-th key, then the first ties
        threshold = keys[idx].min()
        above = (keys > threshold).nonzero().view(-1)
        ties = (keys == threshold).nonzero().view(-1)[: k - above.numel()]
        idx = torch.cat([above, ties])
    idx, _ = torch.sort(idx)
    values = y[idx]
    if residual is not None:
        residual.view(-1)[idx] = 0
    return values, idx.to(index_dtype)


def scatter_add_(out, indices, values):
    out.view(-1).index_add_(0, indices.long(), values)
    return out


def bucket_assignment(tensors, size_limits):
    """Note [Bucket assignment], written out in Python."""
    open_bucket: dict = {}  # (dtype, device) -> [bucket id, bytes, limit]
    opened: dict = {}
    buckets: list[list[int]] = []
    for i in reversed(range(len(tensors))):
        t = tensors[i]
        key = (t.dtype, t.device)
        if key not in open_bucket:
            n = opened.get(key, 0)
            opened[key] = n + 1
            open_bucket[key] = [len(buckets), 0, size_limits[min(n, len(size_limits) - 1)]]
            buckets.append([])
        slot = open_bucket[key]
        buckets[slot[0]].append(i)
        slot[1] += t.numel() * t.element_size()
        if slot[1] >= slot[2]:
            del open_bucket[key]
    return buckets


def bucket_flatten(tensors, out):
    torch.cat([t.reshape(-1) for t in tensors], out=out)
    return out


def bucket_unflatten(flat, tensors):
    for t, piece in zip(tensors, torch.split(flat, [t.numel() for t in tensors])):
        t.copy_(piece.view(t.shape))


# Collectives: given every rank's input, what each rank must end up with. They follow the ring's order of
# additions (Note [Dense ring], Note [Int8 ring]) so the results are bitwise those of the C++ ring.

DENSE_ALIGN = 16


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def ring_partition(numel: int, n: int, align: int, segment_elems: int) -> list[list[slice]]:
    """The ring's ``Partition`` (csrc/comm/ring.cpp) written out: ``[c][j]`` is segment j of chunk c.

    n chunks of ``ceil(ceil(numel / n) / align) * align`` elements (the last ones shorter or empty), each
    cut into the same number of pipeline segments of an aligned size near ``segment_elems``; a chunk up to
    one segment long stays whole.
    """
    per_chunk = _ceil_div(_ceil_div(numel, n), align) * align
    target = max(align, segment_elems // align * align)
    segments = max(1, _ceil_div(per_chunk, target))
    per_segment = _ceil_div(_ceil_div(per_chunk, segments), align) * align
    out = []
    for c in range(n):
        begin, end = min(c * per_chunk, numel), min((c + 1) * per_chunk, numel)
        out.append([slice(min(begin + j * per_segment, end), min(begin + (j + 1) * per_segment, end))
                    for j in range(segments)])
    return out


def _chunks(numel: int, n: int, align: int) -> list[slice]:
    """Chunk c of the ring: its segments end to end."""
    return [slice(segs[0].start, segs[-1].stop) for segs in ring_partition(numel, n, align, 1 << 62)]


CARRY_BYTES = 64 << 10  # kCarryBytes, csrc/comm/transport.h


def dense_all_reduce(inputs: list[torch.Tensor], average: bool = False) -> torch.Tensor:
    """``all_reduce(transport="ring")`` on CPU: a tensor of at most CARRY_BYTES travels with the header check
    and is summed in rank order in fp32 (Note [Carried header]); larger ones take the ring."""
    if inputs[0].numel() * inputs[0].element_size() <= CARRY_BYTES and len(inputs) > 1:
        return shm_all_reduce(inputs, average)
    return ring_all_reduce(inputs, average)


def ring_all_reduce(inputs: list[torch.Tensor], average: bool = False) -> torch.Tensor:
    """Chunk c is summed as x_c + x_{c+1} + ... (ranks mod n), each hop in fp32 rounded to the dtype."""
    n, dtype = len(inputs), inputs[0].dtype
    flats = [x.reshape(-1) for x in inputs]
    out = torch.empty_like(flats[0])
    for c, sl in enumerate(_chunks(out.numel(), n, DENSE_ALIGN)):
        acc = flats[c][sl]
        for j in range(1, n):
            x = flats[(c + j) % n][sl]
            if average and j == n - 1:
                acc = (acc + x) / n if dtype == torch.float32 else ((acc.float() + x.float()) / n).to(dtype)
            else:
                acc = acc + x  # fp16/bf16: computed in fp32, rounded once, like the ring's hop
        out[sl] = acc
    return out.view(inputs[0].shape)


def ring_all_reduce_int8(inputs: list[torch.Tensor], average: bool = False, block_size: int = 256) -> torch.Tensor:
    """Chunk c is quantized at every hop: q = Q(x_c); then q = Q(deq(q) + x_{c+j}); the last (/ n if average)."""
    n = len(inputs)
    flats = [x.reshape(-1) for x in inputs]
    out = torch.empty_like(flats[0])
    for c, sl in enumerate(_chunks(out.numel(), n, block_size)):
        if sl.start == sl.stop:
            continue
        q, s = quantize_int8(flats[c][sl], block_size)
        for j in range(1, n):
            acc = flats[(c + j) % n][sl].float() + dequantize_int8(q, s, block_size)
            if average and j == n - 1:
                acc = acc / torch.full_like(acc, n)  # one correctly rounded division, as in quantize_int8_into_
            q, s = quantize_int8(acc, block_size)
        out[sl] = dequantize_int8(q, s, block_size, out.dtype)
    return out.view(inputs[0].shape)


def int8_ring_error_bound(inputs: list[torch.Tensor], block_size: int = 256) -> torch.Tensor:
    """Per-element bound ((1 + 1/254)^n - 1) * S, S = sum over ranks of the block's absmax (see comm.Int8)."""
    n = len(inputs)
    s = sum(_blocks(x, block_size)[0].abs().amax(dim=1).double() for x in inputs)
    numel = inputs[0].numel()
    return (((1 + 1 / 254) ** n - 1) * s).repeat_interleave(block_size)[:numel].view(inputs[0].shape)


def topk_all_reduce(inputs: list[torch.Tensor], k: int, residuals: list | None = None, average: bool = False):
    """Each rank's top-k (with its residual), decoded by index_add_ in rank order (an average adds
    values / n); updates the residuals."""
    out = torch.zeros_like(inputs[0]).reshape(-1)
    for r, x in enumerate(inputs):
        values, indices = topk_compress(x, k, residuals[r] if residuals else None)
        out.index_add_(0, indices, values / len(inputs) if average else values)
    return out.view(inputs[0].shape)


SHM_ALIGN = 16  # elements: regions of the shared-memory collectives (csrc/comm/shm.cpp, kAlign)


def shm_regions(numel: int, n: int) -> list[slice]:
    """Region q of a tensor of numel elements on n local ranks (Note [Shared-memory collectives])."""
    per = -(-(-(-numel // n)) // SHM_ALIGN) * SHM_ALIGN if numel else 0
    return [slice(min(q * per, numel), min((q + 1) * per, numel)) for q in range(n)]


def shm_all_reduce(inputs: list[torch.Tensor], average: bool = False) -> torch.Tensor:
    """Sum over ranks in rank order, accumulated in fp32, divided by n when averaging, rounded once."""
    acc = inputs[0].reshape(-1).float().clone()
    for x in inputs[1:]:
        acc += x.reshape(-1).float()
    if average:
        acc = acc / torch.full_like(acc, len(inputs))  # true division, elementwise, as the kernel does
    return acc.to(inputs[0].dtype).view(inputs[0].shape)


def hierarchical_all_reduce(inputs: list[torch.Tensor], hosts: list[list[int]], average: bool = False,
                            compression: str | None = None, block_size: int = 256, k: int = 0,
                            residuals: list | None = None, piece_bytes: int = 0) -> torch.Tensor:
    """Note [Hierarchical all-reduce]: each host's sum (shm order), each region all-reduced across hosts by
    the ring the compression names (residuals: per rank, updated in place for the region it owns), divided
    by the world size when averaging, gathered; piece after piece of ``piece_bytes`` (0: one piece, Note
    [Pipelined hierarchical all-reduce]). ``hosts[h]`` lists host h's ranks in local order."""
    numel, world = inputs[0].numel(), len(inputs)
    sums = [shm_all_reduce([inputs[r] for r in host]).reshape(-1) for host in hosts]
    out = torch.empty_like(sums[0])
    piece = max(numel, 1) if piece_bytes == 0 else max(1, piece_bytes // inputs[0].element_size())
    for p0 in range(0, max(numel, 1), piece):
        p1 = min(numel, p0 + piece)
        for l, local in enumerate(shm_regions(p1 - p0, len(hosts[0]))):
            region = slice(p0 + local.start, p0 + local.stop)
            parts = [s[region].clone() for s in sums]
            if compression is None:
                got = ring_all_reduce(parts)
            elif compression == "int8":
                got = ring_all_reduce_int8(parts, block_size=block_size)
            else:
                m = region.stop - region.start
                k_region = min(m, -(-k * m // numel)) if numel else 0
                res = [residuals[host[l]].reshape(-1)[region] for host in hosts] if residuals is not None else None
                got = topk_all_reduce(parts, k_region, res)
            if average:
                got = got.div_(world)
            out[region] = got
    return out.view(inputs[0].shape)


# PowerSGD (torch's powerSGD_hook, pyparallel.powersgd): every rank at once, one bucket layout, plain loops.

def _gram_schmidt(m: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Orthonormal columns: QR for r > 2 (fp32), else Gram-Schmidt; a zero column stays zero."""
    m = m.clone()
    if m.shape[1] > 2 and m.dtype not in (torch.float16, torch.bfloat16):
        # In place through out=, as torch's hook does: linalg.qr(m).Q differs in the last bits.
        torch.linalg.qr(m, out=(m, m.new_empty(m.shape[1], m.shape[1])))
        return m
    for i in range(m.shape[1]):
        norm = torch.linalg.vector_norm(m[:, i:i + 1], dim=0, keepdim=True)
        if epsilon == 0:
            norm = torch.where(norm == 0, torch.ones_like(norm), norm)
        else:
            norm = norm + epsilon
        m[:, i:i + 1] = m[:, i:i + 1] / norm
        if i + 1 < m.shape[1]:
            col = m[:, i:i + 1]
            m[:, i + 1:] = m[:, i + 1:] - torch.sum(col * m[:, i + 1:], dim=0, keepdim=True) * col
    return m


class PowerSGD:
    """What every rank's PowerSGD hook returns, computed for all ranks in one process.

    ``step(buckets)`` takes ``buckets[b][r]``: rank r's gradients in bucket b (a list of tensors, the
    bucket's order; the last bucket ends the iteration) and returns the averaged gradients in the same
    structure. ``all_reduce(list of every rank's tensor) -> the sum`` is the collective to model
    (:func:`dense_all_reduce` for our ring on CPU, :func:`shm_all_reduce` for shared memory); before
    ``start_iter`` buckets are averaged with ``all_reduce(..., average=True)``. State is kept per bucket
    index: the layout must not change.
    """

    def __init__(self, world_size: int, rank: int = 1, start_iter: int = 0, min_compression_rate: float = 2,
                 error_feedback: bool = True, warm_start: bool = True, epsilon: float = 0, seed: int = 0,
                 all_reduce=dense_all_reduce):
        import numpy as np

        self.n, self.rank, self.start_iter, self.rate = world_size, rank, start_iter, min_compression_rate
        self.error_feedback, self.warm_start, self.epsilon = error_feedback, warm_start, epsilon
        self.rng = np.random.RandomState(seed)
        self.all_reduce = all_reduce
        self.iter = 0
        self.errors: dict = {}  # bucket -> [flat error per rank]
        self.qs: dict = {}      # bucket -> {position in bucket: Q}

    def step(self, buckets: list[list[list[torch.Tensor]]]) -> list[list[list[torch.Tensor]]]:
        out = [self._bucket(b, grads) for b, grads in enumerate(buckets)]
        self.iter += 1
        return out

    def _bucket(self, b: int, grads: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        n, shapes = self.n, [g.shape for g in grads[0]]
        flats = [torch.cat([g.reshape(-1) for g in rank_grads]) for rank_grads in grads]
        if self.iter < self.start_iter:
            avg = self.all_reduce(flats, average=True)
            return [self._split(avg, shapes) for _ in range(n)]
        if self.error_feedback and b in self.errors:
            flats = [f + e for f, e in zip(flats, self.errors[b])]
        per_rank = [self._split(f, shapes) for f in flats]
        # Which tensors are compressed: n x m views that shrink by more than the rate; grouped by shape.
        groups: dict = {}
        plain = []
        for i, s in enumerate(shapes):
            rows = s[0] if len(s) and s.numel() else 0
            cols = s.numel() // rows if rows else 0
            r = min(rows, cols, self.rank)
            if rows and (rows + cols) * r * self.rate < rows * cols:
                groups.setdefault((rows, cols), []).append(i)
            else:
                plain.append(i)
        order = [(i, rows, cols, min(rows, cols, self.rank)) for (rows, cols), idx in groups.items() for i in idx]
        qs = self.qs.get(b)
        if not self.warm_start or qs is None:
            gen = torch.Generator().manual_seed(int(self.rng.randint(1_000_000_000)))  # even with nothing to draw
            qs = {i: _gram_schmidt(torch.randn((cols, r), generator=gen, dtype=flats[0].dtype), self.epsilon)
                  for i, rows, cols, r in order}
        else:
            qs = {i: _gram_schmidt(q, self.epsilon) for i, q in qs.items()}
        result = [list(t.clone() for t in ranks) for ranks in per_rank]
        ms = [[per_rank[r][i].reshape(rows, cols) for i, rows, cols, _ in order] for r in range(n)]
        # One all-reduce for the uncompressed gradients and P, as the hook sends them.
        sent = self.all_reduce([torch.cat([t[i].reshape(-1) for i in plain]
                                          + [(m @ qs[i]).reshape(-1) for m, (i, *_) in zip(ms[r], order)])
                                for r, t in enumerate(per_rank)])
        n_plain = sum(shapes[i].numel() for i in plain)
        pieces = self._split(sent[:n_plain] / n, [shapes[i] for i in plain])
        for ranks in result:
            for i, piece in zip(plain, pieces):
                ranks[i] = piece.clone()
        if order:
            ps = {i: _gram_schmidt(p.view(rows, r), self.epsilon)
                  for (i, rows, _, r), p in zip(order, sent[n_plain:].split([rows * r for _, rows, _, r in order]))}
            q_sum = self.all_reduce([torch.cat([(m.t() @ ps[i]).reshape(-1) for m, (i, *_) in zip(ms[r], order)])
                                     for r in range(n)]) / n
            qs = {i: q.view(cols, r) for (i, _, cols, r), q in zip(order, q_sum.split([c * r for _, _, c, r in order]))}
            for ranks in result:
                for i, *_ in order:
                    ranks[i] = (ps[i] @ qs[i].t()).view(shapes[i])
        self.qs[b] = qs
        if self.error_feedback:
            self.errors[b] = [f - torch.cat([t.reshape(-1) for t in ranks]) for f, ranks in zip(flats, result)]
        return result

    @staticmethod
    def _split(flat: torch.Tensor, shapes) -> list[torch.Tensor]:
        return [piece.view(s) for piece, s in zip(flat.split([s.numel() for s in shapes]), shapes)]
# LocalSGD / DiLoCo (Note [Periodic synchronisation], pyparallel/local_sgd.py), every rank simulated in one
# process. The anchor is one copy (every rank computes the same bits); the reduction is a function of all
# ranks' flat inputs, so a test can plug in the reference of the transport and compression it runs.


def fragment_layout(params: list[torch.Tensor], fragments: int) -> list[list[list[int]]]:
    """fragment -> flats -> parameter indices: contiguous fragments (a parameter joins while its midpoint is
    within the fragment's share of the elements, at least one each), then grouped by (dtype, device)."""
    sizes = [p.numel() for p in params]
    cuts, start = [], 0
    for f in range(fragments - 1):
        end, share = start + 1, sum(sizes) * (f + 1) / fragments
        while end < len(params) - (fragments - 1 - f) and sum(sizes[:end]) + sizes[end] / 2 <= share:
            end += 1
        cuts.append(range(start, end))
        start = end
    cuts.append(range(start, len(params)))
    layout = []
    for cut in cuts:
        kinds: dict = {}
        for i in cut:
            kinds.setdefault((params[i].dtype, params[i].device), []).append(i)
        layout.append(list(kinds.values()))
    return layout


class PeriodicSync:
    """LocalSGD (``outer_factory=None``) or DiLoCo over ``params[r]`` (rank r's trainable parameters, which
    the caller's inner optimizers update in place; a synchronisation overwrites them).

    ``reduce(key, inputs) -> average`` gets every rank's flat tensor (key: (fragment, flat), for per-rank
    residuals) and returns what every rank receives; the default is the exact mean in rank order.
    ``deltas``: LocalSGD reduces the round's progress (anchor - theta; start - theta with ``overlap``)
    instead of theta (the implementation does so with compression or overlap). Call :meth:`step` after
    every rank's inner step and :meth:`finish` where the implementation's finish() is called.
    """

    def __init__(self, params: list[list[torch.Tensor]], sync_every: int, outer_factory=None, reduce=None,
                 deltas: bool = False, overlap: bool = False, fragments: int = 1, overlap_steps: int | None = None):
        self.params, self.sync_every, self.overlap = params, sync_every, overlap
        self.tau = overlap_steps or sync_every  # overlap: a result lands tau inner steps after its launch
        self.due = [None] * fragments
        self.reduce = reduce or (lambda key, xs: shm_all_reduce(xs, average=True))
        self.deltas = deltas or overlap or outer_factory is not None
        self.layout = fragment_layout(params[0], fragments)
        self.offsets = [(f + 1) * (sync_every // fragments) % sync_every for f in range(fragments)]
        self.step_count = 0
        self.since = [0] * fragments
        with torch.no_grad():
            self.anchors = [[torch.cat([params[0][i].detach().reshape(-1) for i in flat]) for flat in frag]
                            for frag in self.layout]
        self.views = [[list(a.split([params[0][i].numel() for i in flat])) for a, flat in zip(anchors, frag)]
                      for anchors, frag in zip(self.anchors, self.layout)]
        for views, frag in zip(self.views, self.layout):
            for vs, flat in zip(views, frag):
                vs[:] = [v.view(params[0][i].shape) for v, i in zip(vs, flat)]
        self.outer = [outer_factory([v for vs in views for v in vs]) if outer_factory else None for views in self.views]
        self.pending: list = [None] * fragments
        # overlap: per fragment, flat and rank, the rank's model when its current round started
        self.starts = [[[a.clone() for _ in params] for a in anchors] for anchors in self.anchors]

    def step(self) -> None:
        self.step_count += 1
        self.since = [s + 1 for s in self.since]
        for f, offset in enumerate(self.offsets):
            if self.due[f] == self.step_count:
                self.land(f)
            if self.step_count % self.sync_every == offset:
                self.sync(f)

    @torch.no_grad()
    def land(self, f: int) -> None:
        """tau < H: the result launched tau steps ago moves the anchor; each rank goes on from the new anchor
        plus its progress since the launch, and that anchor is its round's start."""
        self.apply(f, self.pending[f])
        self.pending[f], self.due[f] = None, None
        for j, flat in enumerate(self.layout[f]):
            for r in range(len(self.params)):
                self.unflat(r, flat, (self.flat(r, flat) - self.starts[f][j][r]) + self.anchors[f][j])
                self.starts[f][j][r] = self.anchors[f][j].clone()

    @torch.no_grad()
    def sync(self, f: int) -> None:
        self.since[f] = 0
        results = []
        for j, flat in enumerate(self.layout[f]):
            thetas = [self.flat(r, flat) for r in range(len(self.params))]
            if not self.deltas:
                inputs = thetas
            elif self.overlap:
                inputs = [start - t for start, t in zip(self.starts[f][j], thetas)]
            else:
                inputs = [self.anchors[f][j] - t for t in thetas]
            results.append(self.reduce((f, j), inputs))
        if not self.overlap:
            self.apply(f, results)
            self.reset(f)
            return
        previous, self.pending[f] = self.pending[f], results
        if self.tau < self.sync_every:
            self.due[f] = self.step_count + self.tau
        if previous is not None:
            self.apply(f, previous)
        for j, flat in enumerate(self.layout[f]):
            for r in range(len(self.params)):
                theta = self.flat(r, flat)
                if previous is None:  # nothing has arrived yet: the rank goes on from where it is
                    self.starts[f][j][r] = theta
                else:  # the new anchor plus the progress of the round just launched
                    self.starts[f][j][r] = (theta - self.starts[f][j][r]) + self.anchors[f][j]
                    self.unflat(r, flat, self.starts[f][j][r])

    @torch.no_grad()
    def finish(self) -> None:
        for f in range(len(self.layout)):
            if self.due[f] is not None and self.since[f]:
                self.land(f)
            if self.since[f]:
                self.sync(f)
            if self.pending[f] is not None:
                self.apply(f, self.pending[f])
                self.pending[f], self.due[f] = None, None
                self.reset(f)
                self.starts[f] = [[a.clone() for _ in self.params] for a in self.anchors[f]]

    def flat(self, r: int, flat: list[int]) -> torch.Tensor:
        return torch.cat([self.params[r][i].detach().reshape(-1) for i in flat])

    def unflat(self, r: int, flat: list[int], value: torch.Tensor) -> None:
        for i, piece in zip(flat, value.split([self.params[r][i].numel() for i in flat])):
            self.params[r][i].detach().copy_(piece.view(self.params[r][i].shape))

    def apply(self, f: int, results: list[torch.Tensor]) -> None:
        if not self.deltas:
            for anchor, avg in zip(self.anchors[f], results):
                anchor.copy_(avg)
        elif self.outer[f] is None:
            for anchor, avg in zip(self.anchors[f], results):
                anchor.sub_(avg)
        else:
            for views, avg, flat in zip(self.views[f], results, self.layout[f]):
                grads = avg.split([self.params[0][i].numel() for i in flat])
                for v, g in zip(views, grads):
                    v.grad = g.view(v.shape)
            self.outer[f].step()

    def reset(self, f: int) -> None:
        for r in range(len(self.params)):
            for anchor, flat in zip(self.anchors[f], self.layout[f]):
                self.unflat(r, flat, anchor)
