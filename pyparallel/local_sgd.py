"""Low-communication data parallelism: :class:`LocalSGD` and :class:`DiLoCo`.

Each rank trains its own copy of the model with its own (inner) optimizer and the ranks synchronise only
every ``sync_every`` = H steps. Both classes wrap the inner optimizer: call ``step()`` where you called the
inner optimizer's, and they synchronise when it is due (the way torch's ``PostLocalSGDOptimizer`` does).

Note [Periodic synchronisation]
-------------------------------
theta_i: the model on rank i; phi: the anchor, the last synchronised model, identical on every rank;
avg: pyparallel's all-reduce average (with the chosen compression and transport); a round: the H inner
steps between two synchronisations (of one fragment, see below).

* LocalSGD, exact (no compression, no overlap): theta_i <- avg_j(theta_j); phi <- theta_i.
* LocalSGD with compression or overlap: the round's progress (the pseudo-gradient) delta_i = phi - theta_i
  is reduced instead of the parameters (a parameter does not survive int8 or top-k, a difference does);
  phi <- phi - avg(delta); theta_i <- phi.
* DiLoCo: delta_i = phi - theta_i; phi.grad <- avg(delta); the outer optimizer steps on phi (default SGD,
  lr 0.7, momentum 0.9, Nesterov); theta_i <- phi. With outer SGD lr 1 and no momentum it is LocalSGD.
* compression "topk" keeps, per rank, what was not sent in a residual that is added to the next round's
  delta (error feedback across rounds); "int8" is the int8 ring. Both apply to bytes that cross hosts
  (on one host the reduction is exact, see :mod:`pyparallel.transport`).
* overlap (the all-reduce hidden behind a whole round and applied one round late; no inner step is
  discarded or counted twice): each rank keeps s_i, its model when its current round started. At
  synchronisation r, delta_{r,i} = s_i - theta_i (the rank's progress in round r) is launched in the
  background; then the result launched at r - 1 (in flight during round r) is waited for and moves the
  anchor, phi_r = outer(phi_{r-1}, Delta_{r-1}); the rank goes on from theta_i <- (theta_i - s_i) + phi_r,
  the new anchor plus its own round now in flight, and s_i <- theta_i. At the first synchronisation nothing
  has arrived yet: the rank goes on from where it is (s_i <- theta_i). With LocalSGD's outer step
  (phi - Delta) each rank's own progress is thereby replaced by the average one round later. The anchor is
  bitwise identical on every rank after every synchronisation; the models differ by each rank's latest
  round until :meth:`finish` applies what is in flight and sets every model to the anchor. (Streaming
  DiLoCo overlaps tau < H steps and mixes local and global parameters; here tau = H unless overlap_steps
  says otherwise, below. The simpler rule,
  restarting every rank from the anchor without its own round, trained far worse: digits, 2 ranks, H = 8,
  DiLoCo 11% against 93% with this rule (96% without overlap), LocalSGD 45% against 98%.)
* overlap_steps tau < H: the result launched at synchronisation r lands tau inner steps later, inside
  the round: phi_r = outer(phi_{r-1}, Delta_r); theta_i <- (theta_i - s_i) + phi_r (the new anchor plus
  the rank's progress since the launch) and s_i <- phi_r, so that the next delta, s_i - theta_i, is the
  rank's progress over its whole round. The all-reduce then only needs to be hidden behind tau inner
  steps, and the average reaches every rank tau steps after launch instead of H (on the charlm task at
  1 Gbit/s an int8 sync of the 2.5M-parameter model takes about two inner steps).
* fragments F (Streaming DiLoCo): the parameters are split, in registration order, into F contiguous
  fragments of about equal size; fragment f synchronises after inner steps t with
  t mod H == (f + 1) * H / F mod H, so one fragment is in flight every H / F steps and each fragment
  synchronises every H steps (H must be a multiple of F). Every fragment has its own anchor slice, outer
  optimizer and (with overlap) its own result in flight.

After every synchronisation of a fragment, its parameters are bitwise identical on every rank (they are
copied from phi, which every rank computes from the same bits); with overlap, its anchor is. Buffers
(e.g. BatchNorm statistics) are broadcast from rank 0 at construction and then stay local. The parameters
must already be identical on every rank at construction (seed your model): a difference raises, naming
the parameters.

Example:
    >>> model = make_model()                                     # the same initial weights on every rank
    >>> inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    >>> opt = pyparallel.DiLoCo(model, inner, sync_every=50, compression="int8", overlap=True)
    >>> for x, y in batches:
    ...     opt.zero_grad()
    ...     loss_fn(model(x), y).backward()
    ...     opt.step()                                           # every 50th call also synchronises
    >>> opt.finish()                                             # every rank now holds the same model
    >>> torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, f"ckpt.rank{rank}.pt")
"""

from __future__ import annotations

import functools
import hashlib

import torch
import torch.distributed as dist
from torch import nn

from . import comm, ops
from .consistency import broadcast_from_first_rank
from .transport import check as check_transport

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def default_outer_optimizer(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """DiLoCo's outer optimizer: SGD, lr 0.7, momentum 0.9, Nesterov (Douillard et al., 2023)."""
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


def outer_sgd(lr: float = 0.7, momentum: float = 0.9, nesterov: bool | None = None):
    """A factory for an outer SGD (Nesterov whenever there is momentum, unless told otherwise)."""
    if not lr > 0:
        raise ValueError(f"outer_sgd: the outer learning rate must be > 0, got {lr}")
    nesterov = momentum > 0 if nesterov is None else nesterov
    return functools.partial(torch.optim.SGD, lr=lr, momentum=momentum, nesterov=nesterov)


class _Flat:
    """The parameters of one fragment with one (dtype, device), synchronised as one flat tensor."""

    __slots__ = ("indices", "params", "anchor", "anchor_views", "start", "buffers", "buffer_views", "residual")

    def __init__(self, indices: list[int], params: list[torch.Tensor], overlap: bool, topk: bool):
        self.indices = indices  # positions among the model's trainable parameters
        self.params = [params[i].detach() for i in indices]
        self.anchor = ops.bucket_flatten(self.params)
        self.anchor_views = self._views(self.anchor)
        # overlap: this rank's model when its current round started (anchor + the previous round's progress)
        self.start = self.anchor.clone() if overlap else self.anchor
        self.buffers = [torch.empty_like(self.anchor) for _ in range(2 if overlap else 1)]
        self.buffer_views = [self._views(b) for b in self.buffers]
        self.residual = torch.zeros_like(self.anchor) if topk else None

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [piece.view(p.shape) for p, piece in zip(self.params, flat.split([p.numel() for p in self.params]))]


class _Fragment:
    __slots__ = ("index", "offset", "flats", "outer", "pending", "next_buffer", "since", "due")

    def __init__(self, index: int, offset: int, flats: list[_Flat]):
        self.index, self.offset, self.flats = index, offset, flats
        self.outer: torch.optim.Optimizer | None = None
        # overlap: (futures or None once waited, buffer index) of the result in flight
        self.pending: tuple[list | None, int] | None = None
        self.next_buffer = 0
        self.since = 0  # inner steps since this fragment last synchronised
        self.due = 0    # overlap_steps < sync_every: the inner step at which the result in flight lands


def _split(params: list[torch.Tensor], fragments: int, who: str) -> list[list[int]]:
    """Contiguous runs of parameter indices, about equal in elements: a parameter joins the current
    fragment while its midpoint lies within the fragment's share; every fragment gets at least one."""
    if fragments > len(params):
        raise ValueError(f"{who}: fragments={fragments} exceeds the number of trainable parameters ({len(params)})")
    sizes = [p.numel() for p in params]
    total = sum(sizes)
    out, start, seen = [], 0, 0
    for f in range(fragments - 1):
        end, seen = start + 1, seen + sizes[start]
        last = len(params) - (fragments - 1 - f)  # leave one parameter for each fragment still to come
        while end < last and seen + sizes[end] / 2 <= total * (f + 1) / fragments:
            seen, end = seen + sizes[end], end + 1
        out.append(list(range(start, end)))
        start = end
    out.append(list(range(start, len(params))))
    return out


def _by_kind(tensors: list[torch.Tensor], indices: list[int]) -> list[list[int]]:
    """``indices`` grouped by the (dtype, device) of ``tensors[i]``, groups in order of first appearance."""
    groups: dict = {}
    for i in indices:
        groups.setdefault((tensors[i].dtype, tensors[i].device), []).append(i)
    return list(groups.values())


def _check_identical(names: list[str], params: list[torch.Tensor], group, who: str) -> None:
    """Raises on every rank when some parameter differs (bitwise) between ranks."""
    mine = [hashlib.sha256(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).digest()
            for p in params]
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    differ = [names[i] for i in range(len(params)) if any(d[i] != everyone[0][i] for d in everyone)]
    if differ:
        shown = ", ".join(differ[:8]) + (" ..." if len(differ) > 8 else "")
        raise ValueError(f"{who}: the model's parameters differ across ranks ({len(differ)} of {len(params)}: "
                         f"{shown}); every rank must start from the same weights (seed the model's "
                         "initialisation, or load one checkpoint everywhere)")


def _spec(spec) -> str:
    return "absent" if spec is None else f"{spec[0]} {spec[1]}"


class _PeriodicSync(torch.optim.Optimizer):
    """The machinery of Note [Periodic synchronisation]; LocalSGD and DiLoCo choose what is reduced and
    how the anchor moves. Subclasses torch.optim.Optimizer (without its constructor, as
    PostLocalSGDOptimizer does) so LR schedulers accept it; ``param_groups`` are the inner optimizer's."""

    _outer_factory = None  # DiLoCo's

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, sync_every: int, *,
                 process_group: dist.ProcessGroup | None = None, compression=None, transport: str = "auto",
                 overlap: bool = False, fragments: int = 1, overlap_steps: int | None = None):
        who = type(self).__name__
        if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(f"{who}: sync_every must be an integer >= 1, got {sync_every!r}")
        if isinstance(fragments, bool) or not isinstance(fragments, int) or fragments < 1:
            raise ValueError(f"{who}: fragments must be an integer >= 1, got {fragments!r}")
        if sync_every % fragments:
            raise ValueError(f"{who}: sync_every ({sync_every}) must be a multiple of fragments ({fragments}): "
                             "one fragment synchronises every sync_every / fragments steps")
        if overlap_steps is not None:
            if not overlap:
                raise ValueError(f"{who}: overlap_steps needs overlap=True")
            if isinstance(overlap_steps, bool) or not isinstance(overlap_steps, int) \
                    or not 1 <= overlap_steps <= sync_every:
                raise ValueError(f"{who}: overlap_steps must be an integer in [1, sync_every = {sync_every}], "
                                 f"got {overlap_steps!r}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{who}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not dist.is_initialized():
            raise RuntimeError(f"{who}: torch.distributed is not initialized (call dist.init_process_group first)")
        self.transport = check_transport(transport, who)
        self.compression = self._parse_compression(compression, who)
        self.model, self.optim = model, optimizer
        self.defaults = optimizer.defaults
        self.process_group = process_group
        self.sync_every, self.overlap, self.num_fragments = sync_every, bool(overlap), fragments
        self.overlap_steps = (overlap_steps or sync_every) if overlap else None  # tau: inner steps in flight
        self.bytes_sent = 0  # bytes this rank sent across hosts, all synchronisations together
        self.rounds = 0      # fragment synchronisations done
        self._step = 0
        self._deltas = self.compression is not None or self.overlap or self._outer_factory is not None

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"{who}: the model has no parameters that require gradients")
        names, params = [n for n, _ in named], [p for _, p in named]
        # What a checkpoint must match: the anchors are flat per (fragment, dtype), so their shapes alone
        # let a model of other shapes with as many elements load (a transposed weight, swapped layers).
        self._param_specs = [[n, list(p.shape), str(p.dtype).removeprefix("torch.")] for n, p in named]
        ours = {id(p) for p in params}
        stray = [i for i, g in enumerate(optimizer.param_groups) for p in g["params"] if id(p) not in ours]
        if stray:
            raise ValueError(f"{who}: the optimizer holds parameters that are not trainable parameters of the model "
                             f"(param groups {sorted(set(stray))})")
        bad = [f"{n} ({p.dtype})" for n, p in named if p.dtype not in DTYPES]
        if bad:
            raise ValueError(f"{who}: parameters must be float32, float16 or bfloat16: {', '.join(bad[:8])}")
        broadcast_from_first_rank(list(model.buffers()), process_group)
        _check_identical(names, params, process_group, who)

        topk = isinstance(self.compression, comm.Topk)
        step = sync_every // fragments
        self._fragments = []
        with torch.no_grad():
            for f, indices in enumerate(_split(params, fragments, who)):
                flats = [_Flat(kind, params, self.overlap, topk) for kind in _by_kind(params, indices)]
                frag = _Fragment(f, (f + 1) * step % sync_every, flats)
                if self._outer_factory is not None:
                    frag.outer = self._make_outer([v for flat in flats for v in flat.anchor_views], who)
                self._fragments.append(frag)
        self._anchors: list[torch.Tensor] = [None] * len(params)  # type: ignore[list-item]
        for flat in (flat for frag in self._fragments for flat in frag.flats):
            for i, anchor in zip(flat.indices, flat.anchor_views):
                self._anchors[i] = anchor

    # ---- optimizer interface ----

    @property
    def state(self):  # type: ignore[override]
        return self.optim.state

    @property
    def param_groups(self):  # type: ignore[override]
        # The inner optimizer's, read each time: its load_state_dict() replaces the list (a resume, a heal
        # under torchft, a discarded round), and an LR scheduler must keep reaching the live one.
        return self.optim.param_groups

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(sync_every={self.sync_every}, compression={self.compression}, "
                f"overlap={self.overlap}, fragments={self.num_fragments}, transport={self.transport!r}, "
                f"inner={self.optim!r})")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optim.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group) -> None:
        raise RuntimeError(f"{type(self).__name__}: parameters cannot be added after construction (the "
                           "synchronised layout is fixed); build a new wrapper")

    def step(self, closure=None):
        """The inner optimizer's step, then the synchronisation of every fragment that is due."""
        loss = self.optim.step(closure) if closure is not None else self.optim.step()
        self._step += 1
        for frag in self._fragments:
            frag.since += 1
        with torch.no_grad():
            for frag in self._fragments:
                if self._lands_early and frag.pending is not None and self._step == frag.due:
                    self._land(frag)
                if self._step % self.sync_every == frag.offset:
                    self._sync(frag)
        return loss

    @property
    def _lands_early(self) -> bool:
        """overlap_steps < sync_every: a result lands within the round after its launch, not at the next sync."""
        return self.overlap and self.overlap_steps < self.sync_every

    @torch.no_grad()
    def finish(self) -> None:
        """Synchronises the steps taken since each fragment's last synchronisation and applies what is in
        flight (overlap). Afterwards every rank holds the same model, equal to the anchor. Call it at the
        end of training or before evaluating the consensus model; training may continue afterwards."""
        for frag in self._fragments:
            if self._lands_early and frag.pending is not None and frag.since:
                self._land(frag)  # the steps since it was launched are then synchronised below
            if frag.since:
                self._sync(frag)
            if frag.pending is not None:
                self._apply(frag, self._wait(frag, frag.pending))
                frag.pending = None
                self._reset_model(frag)
                for flat in frag.flats:
                    flat.start.copy_(flat.anchor)

    @property
    def num_steps(self) -> int:
        """Inner steps taken."""
        return self._step

    def global_parameters(self) -> list[torch.Tensor]:
        """The anchor (the last synchronised model, identical on every rank) as one tensor per trainable
        parameter, in ``model.parameters()`` order: views into the wrapper's state, read them only."""
        return list(self._anchors)

    def load_global_parameters(self, module: nn.Module) -> None:
        """Copies the anchor into ``module``'s trainable parameters (a model of the same architecture,
        e.g. a copy kept for evaluating the consensus model while training goes on)."""
        params = [p for p in module.parameters() if p.requires_grad]
        if [p.shape for p in params] != [a.shape for a in self._anchors]:
            raise ValueError(f"load_global_parameters: the module's trainable parameters do not match the model's "
                             f"({len(params)} vs {len(self._anchors)} tensors, or different shapes)")
        with torch.no_grad():
            for dst, src in zip(params, self._anchors):
                dst.copy_(src)

    # ---- synchronisation ----

    def _fill(self, frag: _Fragment, b: int) -> None:
        """Buffer ``b`` of the fragment's flats: the round's progress start - theta (start is the anchor
        without overlap), or the parameters themselves (exact LocalSGD)."""
        for flat in frag.flats:
            ops.bucket_flatten(flat.params, flat.buffers[b])
            if self._deltas:
                torch.sub(flat.start, flat.buffers[b], out=flat.buffers[b])

    def _launch(self, flats: list[_Flat], b: int, op: str = "avg") -> list[torch.futures.Future]:
        futures = []
        for flat in flats:
            compression = self.compression
            if isinstance(compression, comm.Topk):
                compression = comm.Topk(ratio=compression.ratio, k=compression.k, residual=flat.residual)
            futures.append(comm.submit(flat.buffers[b], self.process_group, op, compression, self.transport,
                                       on_bytes=self._count))
        return futures

    def _count(self, sent: int) -> None:  # on the group's worker thread, the only writer
        self.bytes_sent += sent

    def _wait(self, frag: _Fragment, pending: tuple[list | None, int]) -> int:
        futures, b = pending
        try:
            for fut in futures or ():
                fut.wait()
        except RuntimeError as exc:
            raise RuntimeError(
                f"{type(self).__name__}: the all-reduce of fragment {frag.index} (inner step {self._step}) failed: "
                f"{str(exc).splitlines()[0]}. Every rank of the group must call step() the same number of times "
                "(and finish() at the same points)") from exc
        return b

    def _sync(self, frag: _Fragment) -> None:
        self.rounds += 1
        frag.since = 0
        b = frag.next_buffer
        self._fill(frag, b)
        futures = self._launch(frag.flats, b)
        if not self.overlap:
            self._wait(frag, (futures, b))
            self._apply(frag, b)
            self._reset_model(frag)
            return
        previous, frag.pending, frag.next_buffer = frag.pending, (futures, b), 1 - b
        if self._lands_early:  # the previous result landed overlap_steps after its launch (step or finish)
            assert previous is None, "a result in flight at the next synchronisation"
            frag.due = self._step + self.overlap_steps
        if previous is None:  # nothing has arrived yet: go on from here
            for flat in frag.flats:
                ops.bucket_flatten(flat.params, flat.start)
            return
        free = self._wait(frag, previous)
        self._apply(frag, free)
        for flat in frag.flats:  # theta <- (theta - start) + anchor: the new anchor plus this round's progress
            ops.bucket_flatten(flat.params, flat.buffers[free])
            torch.sub(flat.buffers[free], flat.start, out=flat.start)
            flat.start.add_(flat.anchor)
            ops.bucket_unflatten(flat.start, flat.params)

    def _land(self, frag: _Fragment) -> None:
        """overlap_steps < sync_every: the result launched overlap_steps ago moves the anchor, and the rank
        goes on from the new anchor plus its progress since the launch: theta <- (theta - start) + anchor,
        start <- anchor (so that the next pseudo-gradient is the whole round's progress)."""
        free = self._wait(frag, frag.pending)
        frag.pending = None
        self._apply(frag, free)
        for flat in frag.flats:
            ops.bucket_flatten(flat.params, flat.buffers[free])
            torch.sub(flat.buffers[free], flat.start, out=flat.buffers[free])
            flat.buffers[free].add_(flat.anchor)
            ops.bucket_unflatten(flat.buffers[free], flat.params)
            flat.start.copy_(flat.anchor)

    def _apply(self, frag: _Fragment, b: int) -> None:
        """Moves the fragment's anchor by the reduced buffer ``b``."""
        if not self._deltas:  # exact LocalSGD: the buffer is the average model
            for flat in frag.flats:
                flat.anchor.copy_(flat.buffers[b])
        elif frag.outer is None:  # LocalSGD on deltas
            for flat in frag.flats:
                flat.anchor.sub_(flat.buffers[b])
        else:
            for flat in frag.flats:
                for anchor, grad in zip(flat.anchor_views, flat.buffer_views[b]):
                    anchor.grad = grad
            frag.outer.step()

    def _reset_model(self, frag: _Fragment) -> None:
        for flat in frag.flats:
            ops.bucket_unflatten(flat.anchor, flat.params)

    # ---- configuration ----

    @staticmethod
    def _parse_compression(compression, who: str):
        if compression is None or compression == "none":
            return None
        if compression == "int8":
            return comm.Int8()
        if compression == "topk":
            return comm.Topk()
        if isinstance(compression, comm.Int8):
            if compression.block_size <= 0:
                raise ValueError(f"{who}: Int8 block_size must be positive, got {compression.block_size}")
            return compression
        if isinstance(compression, comm.Topk):
            if compression.residual is not None:
                raise ValueError(f"{who}: pass Topk without a residual; the wrapper keeps one per rank and fragment "
                                 "(error feedback across rounds)")
            if compression.k is None:
                compression.k_for(1)  # validates the ratio
            elif compression.k < 0:
                raise ValueError(f"{who}: Topk k must be >= 0, got {compression.k}")
            return compression
        raise ValueError(f"{who}: compression must be None, 'int8', 'topk', pyparallel.Int8(...) or "
                         f"pyparallel.Topk(...), got {compression!r}")

    def _make_outer(self, params: list[torch.Tensor], who: str) -> torch.optim.Optimizer:
        outer = self._outer_factory(params)
        if not isinstance(outer, torch.optim.Optimizer):
            raise TypeError(f"{who}: outer_optimizer must return a torch.optim.Optimizer, got {type(outer).__name__}")
        for g in outer.param_groups:
            lr = g.get("lr")
            if lr is None or not float(lr) > 0:
                raise ValueError(f"{who}: the outer learning rate must be > 0, got {lr}")
        return outer

    # ---- checkpoints ----

    def state_dict(self) -> dict:  # type: ignore[override]
        """Everything a resumed run needs besides the model's own state_dict: the inner optimizer, the
        step, anchors, outer optimizers, top-k residuals and (overlap) the result in flight, which is
        waited for here (a local wait: every rank launched it at the same step), so a checkpoint costs at
        most that all-reduce's remaining time; it is not applied, so the resumed run goes on exactly as
        this one does. Per rank: the residuals are."""
        fragments = []
        topk = isinstance(self.compression, comm.Topk)
        for frag in self._fragments:
            pending = None
            if frag.pending is not None:
                b = self._wait(frag, frag.pending)
                frag.pending = (None, b)
                pending = [flat.buffers[b].clone() for flat in frag.flats]
            fragments.append({
                "anchor": [flat.anchor.clone() for flat in frag.flats],
                "start": [flat.start.clone() for flat in frag.flats] if self.overlap else None,
                "residual": [flat.residual.clone() for flat in frag.flats] if topk else None,
                "pending": pending,
                "since": frag.since,
                "due": frag.due,
                "outer": frag.outer.state_dict() if frag.outer is not None else None,
            })
        return {"algorithm": type(self).__name__, "config": self._config(), "step": self._step,
                "rounds": self.rounds, "bytes_sent": self.bytes_sent, "inner": self.optim.state_dict(),
                "fragments": fragments, "parameters": [[n, list(s), d] for n, s, d in self._param_specs]}

    def load_state_dict(self, state: dict) -> None:  # type: ignore[override]
        self._check_loadable(state)
        self.optim.load_state_dict(state["inner"])
        self._load_sync_state(state)

    def reset_error_feedback(self) -> None:
        """Zeroes the top-k residuals (a replica that heals from a live peer under torchft: what its own
        rounds did not send is no one else's, see pyparallel.fault_tolerance)."""
        for flat in (flat for frag in self._fragments for flat in frag.flats):
            if flat.residual is not None:
                flat.residual.zero_()

    def _check_loadable(self, state: dict) -> None:
        """Raises, before anything is changed, if ``state`` is not a state_dict() of this configuration."""
        who = type(self).__name__
        if not isinstance(state, dict) or "config" not in state:
            raise ValueError(f"{who}.load_state_dict: not a state_dict of LocalSGD / DiLoCo")
        if state.get("algorithm") != who or state["config"] != self._config():
            raise ValueError(f"{who}.load_state_dict: the checkpoint was made by {state.get('algorithm')} with "
                             f"{state['config']}, this is {who} with {self._config()}")
        saved_specs = state.get("parameters")  # (absent from checkpoints made before it was saved)
        if saved_specs is not None and saved_specs != self._param_specs:
            theirs = {n: (s, d) for n, s, d in saved_specs}
            mine = {n: (s, d) for n, s, d in self._param_specs}
            diffs = [f"{n}: {_spec(theirs.get(n))} in the checkpoint, {_spec(mine.get(n))} here"
                     for n in list(mine) + [n for n in theirs if n not in mine] if theirs.get(n) != mine.get(n)]
            diffs = diffs or ["the same parameters in another order"]
            raise ValueError(f"{who}.load_state_dict: the checkpoint is of another model (trainable parameters "
                             f"differ: {'; '.join(diffs[:4])}{' ...' if len(diffs) > 4 else ''})")
        for frag, saved in zip(self._fragments, state["fragments"]):
            topk = isinstance(self.compression, comm.Topk)
            for key in ("anchor",) + (("start",) if self.overlap else ()) + (("residual",) if topk else ()):
                self._check_like(saved[key], [flat.anchor for flat in frag.flats], f"{who}.load_state_dict: {key}")
            if saved["pending"] is not None:
                self._check_like(saved["pending"], [flat.anchor for flat in frag.flats],
                                 f"{who}.load_state_dict: pending")

    def _load_sync_state(self, state: dict) -> None:
        """Everything of a checked ``state`` but the inner optimizer."""
        with torch.no_grad():
            for frag, saved in zip(self._fragments, state["fragments"]):
                if frag.pending is not None:  # ours in flight: it must finish before its buffer is reused
                    self._wait(frag, frag.pending)
                frag.pending = None
                for i, flat in enumerate(frag.flats):
                    flat.anchor.copy_(saved["anchor"][i])
                    if self.overlap:
                        flat.start.copy_(saved["start"][i])
                    if flat.residual is not None:
                        flat.residual.copy_(saved["residual"][i])
                    if saved["pending"] is not None:
                        flat.buffers[0].copy_(saved["pending"][i])
                if saved["pending"] is not None:
                    frag.pending, frag.next_buffer = (None, 0), 1
                else:
                    frag.next_buffer = 0
                frag.since = saved["since"]
                frag.due = saved.get("due", 0)
                if frag.outer is not None:
                    frag.outer.load_state_dict(saved["outer"])
        self._step, self.rounds, self.bytes_sent = state["step"], state["rounds"], state["bytes_sent"]

    def _config(self) -> dict:
        c = self.compression
        kind = None if c is None else ("int8", c.block_size) if isinstance(c, comm.Int8) else ("topk", c.ratio, c.k)
        config = {"sync_every": self.sync_every, "overlap": self.overlap, "fragments": self.num_fragments,
                  "compression": kind, "world_size": dist.get_world_size(self.process_group)}
        if self._lands_early:  # (checkpoints of the one-round overlap stay loadable)
            config["overlap_steps"] = self.overlap_steps
        return config

    @staticmethod
    def _check_like(saved, like: list[torch.Tensor], what: str) -> None:
        if len(saved) != len(like) or any(s.shape != t.shape or s.dtype != t.dtype for s, t in zip(saved, like)):
            raise ValueError(f"{what}: tensors {[(tuple(s.shape), s.dtype) for s in saved]} do not match the model's "
                             f"{[(tuple(t.shape), t.dtype) for t in like]}")


class LocalSGD(_PeriodicSync):
    """Local SGD / periodic model averaging: every ``sync_every`` inner steps the parameters are
    averaged over the process group (Note [Periodic synchronisation]).

    Args:
        model: the model; its trainable parameters must be identical on every rank (checked here), its
            buffers are broadcast from rank 0 here.
        optimizer: the inner optimizer over (some of) ``model``'s parameters.
        sync_every: H >= 1, inner steps between synchronisations (of each fragment).
        process_group: the group to average over (default: the world).
        compression: None, ``"int8"`` / :class:`pyparallel.Int8`, ``"topk"`` / :class:`pyparallel.Topk`
            (ratio or k; the residual is kept by the wrapper: error feedback across rounds). With
            compression the round's progress is reduced instead of the parameters.
        transport: ``"auto"``, ``"ring"``, ``"shm"`` or ``"hierarchical"`` (see :func:`pyparallel.all_reduce`).
        overlap: launch the all-reduce in the background and apply it one round late (see the Note).
        overlap_steps: with overlap, apply the result tau inner steps after its launch instead (1 <= tau <=
            sync_every; default sync_every: one round), as Streaming DiLoCo's tau.
        fragments: synchronise F contiguous parts of the model on a staggered schedule (H % F == 0).

    Example:
        >>> opt = pyparallel.LocalSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=8)
        >>> loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
    """


class DiLoCo(_PeriodicSync):
    """DiLoCo (Douillard et al., 2023) and Streaming DiLoCo (fragments, overlap): every ``sync_every``
    inner steps the pseudo-gradient anchor - theta is averaged and an outer optimizer moves the anchor,
    which every rank then continues from (Note [Periodic synchronisation]).

    Args:
        model, optimizer, sync_every, process_group, compression, transport, overlap, fragments: as in
            :class:`LocalSGD`.
        outer_optimizer: ``factory(params) -> torch.optim.Optimizer`` building the outer optimizer over
            the anchor tensors of one fragment (called once per fragment). Default:
            :func:`default_outer_optimizer` (SGD, lr 0.7, momentum 0.9, Nesterov); :func:`outer_sgd`
            makes others. Every learning rate must be > 0.

    Example:
        >>> inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> opt = pyparallel.DiLoCo(model, inner, sync_every=50, outer_optimizer=outer_sgd(lr=0.7),
        ...                         compression="int8", overlap=True)
        >>> loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, sync_every: int = 50,
                 outer_optimizer=None, **kwargs):
        self._outer_factory = outer_optimizer if outer_optimizer is not None else default_outer_optimizer
        if not callable(self._outer_factory):
            raise TypeError(f"DiLoCo: outer_optimizer must be a callable params -> Optimizer, got {outer_optimizer!r}")
        super().__init__(model, optimizer, sync_every, **kwargs)
