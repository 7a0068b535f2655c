"""PowerSGD (Vogels et al., 2019): rank-r gradient compression with error feedback, on our all-reduce.

The algorithm is torch's ``ddp_comm_hooks.powerSGD_hook`` (same arguments, same random numbers, same
arithmetic up to the order of floating-point sums inside the all-reduce); what differs is where the
bytes go and what a checkpoint keeps:

- every collective is :func:`pyparallel.comm.submit` on the state's transport (our ring, shared memory
  on one host, hierarchical across hosts), asynchronous, in the same order on every rank;
- the state (error-feedback buffers, warm-start Qs) belongs to parameters, not to bucket indices. Torch
  keys it by ``bucket.index()``, which DDP renumbers when it rebuilds its buckets after the first
  iteration and in every new DDP object, so a resumed run cannot reuse it. Here a parameter's key is
  the order in which the hook first saw it (bucket order, then position in the bucket: the same in every
  run of the same model and wrapper), and ``state_dict()`` saves each parameter's error and Q under its
  key with the iteration and the RNG state, so that save -> rebuild model and DDP -> load continues
  bitwise (Note [PowerSGD state]).

Per bucket and iteration, once ``iter >= start_powerSGD_iter`` (before that: an exact average):

1. error feedback: add the parameter's remembered error, keep a copy of the sum;
2. every gradient viewed as an n x m matrix M (n = first dim) is compressed when that saves enough
   (``(n + m) * r * min_compression_rate < n * m``); the others are all-reduced together, uncompressed;
3. P = M Q (Q: m x r, warm-started from the last iteration, random at the first), all-reduce P (sum;
   in the same all-reduce as the uncompressed gradients, which torch sends apart), orthogonalise P,
   Q = M^T P, all-reduce Q (sum) and divide by the world size, M = P Q^T;
4. error = the copy - the result.

Example:
    >>> state = hooks.PowerSGDState(matrix_approximation_rank=2, start_powerSGD_iter=10)
    >>> ddp.register_comm_hook(state, hooks.powersgd_hook)      # or pyparallel.DataParallel(comm_hook=...)
    >>> torch.save({"hook": state.state_dict(), ...}, "ckpt.pt")  # later: state.load_state_dict(...)
"""

# Note [PowerSGD state]
# A parameter's key is an int: the number of parameters the hook had seen before it. Its error buffer
# and its Q live in flat per-bucket buffers (one add, one all-reduce per bucket), and the state keeps,
# per key, a view into the buffer of the bucket that holds the parameter now. When a parameter shows up
# in another bucket (DDP's rebuild, a new DDP object), the new bucket's buffers are filled from those
# views and the old bucket's buffers are dropped. load_state_dict() puts plain tensors in place of the
# views and forgets which parameter object had which key; the next iteration assigns the keys again in
# the order the hook sees the parameters, and checks each parameter's shape against the checkpoint's.
#
# Bitwise continuation needs the all-reduce to give the same bits for the same inputs wherever they sit
# in the buffer: true for shared memory (each element summed in rank order) and for 2 ranks (a + b), not
# for the ring on 3+ ranks when the resumed DDP object buckets differently (its first iteration puts all
# parameters in one bucket). pyparallel.DataParallel never rebuckets.

# No `from __future__ import annotations`: DDP's register_comm_hook checks the annotation objects.
import weakref

import torch
import torch.distributed as dist

from . import comm, hooks, ops
from .param_keys import check_dense

_RNG_KEYS = 624  # words of numpy's MT19937 state


def _orthogonalize(matrix: torch.Tensor, epsilon: float = 0.0) -> None:
    """Makes the r columns of the n x r ``matrix`` orthonormal, in place (torch's choice of method:
    Gram-Schmidt for r <= 2 and for fp16/bf16, QR otherwise). A zero column stays zero with
    ``epsilon == 0`` (torch means to do this but divides 0 by 0)."""
    r = matrix.shape[1]
    if r > 2 and matrix.dtype not in (torch.float16, torch.bfloat16):
        torch.linalg.qr(matrix, out=(matrix, matrix.new_empty(r, r)))
        return
    for i in range(r):
        col = matrix[:, i:i + 1]
        norm = torch.linalg.vector_norm(col, dim=0, keepdim=True)
        if epsilon == 0:
            col.div_(torch.where(norm == 0, torch.ones_like(norm), norm))
        else:
            col.div_(norm + epsilon)
        if i + 1 < r:
            rest = matrix[:, i + 1:]
            rest.sub_(torch.sum(col * rest, dim=0, keepdim=True) * col)


def _matrix_shape(shape: torch.Size) -> tuple[int, int] | None:
    """(n, m) of a gradient viewed as a matrix, None for a scalar or an empty tensor."""
    if len(shape) == 0 or shape.numel() == 0:
        return None
    return shape[0], shape.numel() // shape[0]


class _Layout:
    """One bucket's parameters (by key): which are compressed, and the flat buffers for P, Q and errors."""

    __slots__ = ("keys", "numels", "compressed", "uncompressed", "first", "plain", "p_memory", "q_memory", "ps", "qs",
                 "error", "errors", "has_error", "has_q")

    def __init__(self, keys, shapes, rank, min_compression_rate, like: torch.Tensor):
        self.keys = keys
        self.numels = [s.numel() for s in shapes]
        by_shape: dict[tuple[int, int], list[int]] = {}  # torch's order: grouped by matrix shape
        self.uncompressed = []
        for i, shape in enumerate(shapes):
            nm = _matrix_shape(shape)
            if nm is not None and (nm[0] + nm[1]) * min(nm[0], nm[1], rank) * min_compression_rate < nm[0] * nm[1]:
                by_shape.setdefault(nm, []).append(i)
            else:
                self.uncompressed.append(i)
        self.compressed = []  # (position in bucket, n, m, r)
        for (n, m), members in by_shape.items():
            self.compressed += [(i, n, m, min(n, m, rank)) for i in members]
        # The first all-reduce carries the uncompressed gradients and P together (torch sends them apart):
        # one collective fewer per bucket, the same sums.
        n_plain = sum(self.numels[i] for i in self.uncompressed)
        self.first = like.new_empty(n_plain + sum(n * r for _, n, _, r in self.compressed))
        self.plain, self.p_memory = self.first[:n_plain], self.first[n_plain:]
        self.q_memory = like.new_empty(sum(m * r for _, _, m, r in self.compressed))
        self.ps, self.qs, p_at, q_at = [], [], 0, 0
        for _, n, m, r in self.compressed:
            self.ps.append(self.p_memory[p_at:p_at + n * r].view(n, r))
            self.qs.append(self.q_memory[q_at:q_at + m * r].view(m, r))
            p_at, q_at = p_at + n * r, q_at + m * r
        self.error = like.new_zeros(sum(self.numels))
        self.errors = list(self.error.split(self.numels))  # per parameter
        self.has_error = False  # no error remembered yet: nothing to add (x + 0 would turn -0 into +0)
        self.has_q = False      # Qs hold last iteration's values (else they are drawn at random)


class PowerSGDState(hooks.HookState):
    """State of :func:`powersgd_hook`; the arguments are torch's ``PowerSGDState``'s.

    Args:
        process_group: group to average over (default: the world).
        transport: ``"auto"``, ``"ring"``, ``"shm"`` or ``"hierarchical"`` (:mod:`pyparallel.transport`).
        matrix_approximation_rank: r, the rank of the approximation (1-4 is typical; larger is more exact
            and sends more).
        start_powerSGD_iter: iterations averaged exactly before compression starts (torch suggests 10% of
            the run). Unlike torch's, any value >= 0 works under DDP: the state follows parameters across
            DDP's bucket rebuild.
        min_compression_rate: a gradient is compressed only if its n x m matrix shrinks by more than this
            factor, ``(n + m) * r * rate < n * m``; the others (biases, small layers) are averaged exactly.
        use_error_feedback: add what compression lost to the next iteration's gradient.
        warm_start: start each iteration's power step from the last iteration's Q.
        orthogonalization_epsilon: added to every column norm when orthogonalising.
        random_seed: seed of the generator (numpy's, as in torch) that draws each bucket's first Q; the
            same on every rank.

    ``state_dict()`` / ``load_state_dict()`` carry the iteration, the generator's state and every
    parameter's error and Q (Note [PowerSGD state]); the state pickles without its process group.
    """

    __slots__ = ("matrix_approximation_rank", "start_powerSGD_iter", "min_compression_rate", "use_error_feedback",
                 "warm_start", "orthogonalization_epsilon", "random_seed", "rng", "iter",
                 "total_numel_before_compression", "total_numel_after_compression",
                 "_key_of", "_next_key", "_shape_of", "_bucket_layouts", "_layout_of_key", "_error_of", "_q_of")

    def __init__(self, process_group: dist.ProcessGroup | None = None, transport: str = "auto",
                 matrix_approximation_rank: int = 1, start_powerSGD_iter: int = 1_000,
                 min_compression_rate: float = 2, use_error_feedback: bool = True, warm_start: bool = True,
                 orthogonalization_epsilon: float = 0, random_seed: int = 0):
        super().__init__(process_group, transport)
        _check_int("matrix_approximation_rank", matrix_approximation_rank, 1)
        _check_int("start_powerSGD_iter", start_powerSGD_iter, 0)
        _check_int("random_seed", random_seed, 0)
        if not isinstance(min_compression_rate, (int, float)) or isinstance(min_compression_rate, bool) \
                or not min_compression_rate > 0:
            raise ValueError(f"PowerSGDState: min_compression_rate must be a number > 0, got {min_compression_rate!r}")
        if not isinstance(orthogonalization_epsilon, (int, float)) or not orthogonalization_epsilon >= 0:
            raise ValueError("PowerSGDState: orthogonalization_epsilon must be a number >= 0, got "
                             f"{orthogonalization_epsilon!r}")
        self.matrix_approximation_rank = matrix_approximation_rank
        self.start_powerSGD_iter = start_powerSGD_iter
        self.min_compression_rate = min_compression_rate
        self.use_error_feedback = bool(use_error_feedback)
        self.warm_start = bool(warm_start)
        self.orthogonalization_epsilon = orthogonalization_epsilon
        self.random_seed = random_seed
        # numpy is imported here, not at module level: `import pyparallel` must work where numpy is not
        # installed (torch does not require it; the GPU check's bare machine may lack it).
        import numpy as np

        self.rng = np.random.RandomState(random_seed)
        self.iter = 0
        self.total_numel_before_compression = 0
        self.total_numel_after_compression = 0
        self._forget_parameters()
        self._error_of: dict[int, torch.Tensor] = {}  # key -> flat error (a view into a layout's buffer)
        self._q_of: dict[int, torch.Tensor] = {}      # key -> m x r Q (a view into a layout's buffer)

    def _forget_parameters(self) -> None:
        self._key_of: dict[int, tuple[weakref.ref, int]] = {}  # id(param) -> (weak ref, key)
        self._next_key = 0
        self._shape_of: dict[int, tuple[int, ...]] = {}        # key -> parameter shape
        self._bucket_layouts: dict[tuple[int, ...], _Layout] = {}
        self._layout_of_key: dict[int, tuple[int, ...]] = {}

    # ---- statistics (as torch's) ----

    def compression_stats(self) -> tuple[float, int, int]:
        """(compression rate, elements before compression, elements after), over the compressed iterations."""
        after = self.total_numel_after_compression
        return (self.total_numel_before_compression / after if after else 0,
                self.total_numel_before_compression, after)

    # ---- keys and layouts (Note [PowerSGD state]) ----

    def _param_keys(self, params: list[torch.Tensor]) -> tuple[int, ...]:
        """The parameters' keys: with a registered model (``register_model``; DataParallel and
        ``python -m pyparallel.train`` register theirs) its position in the model, as every hook keys its
        state (Note [Hook state keyed by parameter], param_keys.py), so a checkpoint outlives a change of
        wrapper or bucketing; without one, the order the hook first sees the parameters in."""
        out = []
        for p in params:
            entry = self._key_of.get(id(p))
            if entry is None or entry[0]() is not p:
                if self.model_registered:
                    key = self._keys.key(p)[0]
                else:
                    key = self._next_key
                    self._next_key += 1
                expected = self._shape_of.get(key)
                if expected is not None and expected != tuple(p.shape):
                    raise ValueError(f"PowerSGDState: parameter {key} (by model position or first sight) has "
                                     f"shape {tuple(p.shape)}, but the state holds one of shape {expected} (from "
                                     "load_state_dict): the model or its bucketing differs from the checkpoint's")
                self._shape_of[key] = tuple(p.shape)
                entry = self._key_of[id(p)] = (weakref.ref(p), key)
            out.append(entry[1])
        return tuple(out)

    def _layout(self, keys: tuple[int, ...], bucket) -> _Layout:
        buffer = bucket.buffer()
        layout = self._bucket_layouts.get(keys)
        if layout is not None and layout.error.dtype == buffer.dtype and layout.error.device == buffer.device:
            return layout
        layout = _Layout(keys, [torch.Size(self._shape_of[k]) for k in keys], self.matrix_approximation_rank,
                         self.min_compression_rate, buffer)
        # Carry over what the parameters had in their previous bucket (or from a checkpoint).
        for key, view in zip(keys, layout.errors):
            old = self._error_of.get(key)
            if old is not None:
                view.copy_(old)
                layout.has_error = True
        # Every key of a bucket that went through a compressed iteration has a Q (0 x r if it is sent
        # uncompressed), so a bucket draws random Qs once, as torch's does, even with nothing to draw. A Q
        # that does not fit (min_compression_rate changed since the checkpoint) makes the bucket draw anew.
        layout.has_q = all(k in self._q_of for k in keys)
        for (i, *_), q in zip(layout.compressed, layout.qs):
            old = self._q_of.get(keys[i])
            if old is not None and old.shape == q.shape:
                q.copy_(old)
            else:
                layout.has_q = False
        for key, view in zip(keys, layout.errors):
            stale = self._layout_of_key.get(key)
            if stale is not None:
                self._bucket_layouts.pop(stale, None)
            self._layout_of_key[key] = keys
            if layout.has_error:
                self._error_of[key] = view
        for i in layout.uncompressed:
            self._q_of[keys[i]] = layout.q_memory.new_empty(0, self.matrix_approximation_rank)
        for (i, *_), q in zip(layout.compressed, layout.qs):
            self._q_of[keys[i]] = q
        self._bucket_layouts[keys] = layout
        return layout

    def reset_error_feedback(self) -> None:
        """Forgets every parameter's error (HookState.reset_error_feedback): the next iteration adds none,
        as in a fresh state. The Qs, the iteration and the generator are kept: every rank must use the
        same ones (a Q is the all-reduced result of the last iteration, the same on every rank)."""
        self._error_of = {}
        for layout in self._bucket_layouts.values():
            layout.has_error = False
            layout.error.zero_()

    def _remember_errors(self, layout: _Layout) -> None:
        layout.has_error = True
        for key, view in zip(layout.keys, layout.errors):
            self._error_of[key] = view

    # ---- checkpoints ----

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue bitwise: counters, iteration, RNG state, and per
        parameter key its shape, error (if any) and Q (if any). Tensors are copies; ints, floats and
        tensors only, so ``torch.load(..., weights_only=True)`` reads it."""
        import numpy as np  # lazily: see __init__

        out = super().state_dict()
        name, keys, pos, has_gauss, cached = self.rng.get_state()
        out.update(
            iter=self.iter, matrix_approximation_rank=self.matrix_approximation_rank,
            rng={"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                 "cached_gaussian": float(cached)},
            total_numel_before_compression=self.total_numel_before_compression,
            total_numel_after_compression=self.total_numel_after_compression,
            shapes={k: list(s) for k, s in self._shape_of.items()},
            errors={k: e.detach().clone() for k, e in self._error_of.items()},
            qs={k: q.detach().clone() for k, q in self._q_of.items()},
        )
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict`'s output; raises TypeError / ValueError naming what is wrong."""
        if not isinstance(state, dict):
            raise TypeError(f"PowerSGDState.load_state_dict: expected a dict, got {type(state).__name__}")
        required = ("bytes_sent", "buckets_reduced", "iter", "matrix_approximation_rank", "rng", "shapes", "errors",
                    "qs", "total_numel_before_compression", "total_numel_after_compression")
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"PowerSGDState.load_state_dict: missing {', '.join(missing)}")
        for name in ("bytes_sent", "buckets_reduced", "iter", "total_numel_before_compression",
                     "total_numel_after_compression"):
            _check_int(f"state['{name}']", state[name], 0)
        if state["matrix_approximation_rank"] != self.matrix_approximation_rank:
            raise ValueError(f"PowerSGDState.load_state_dict: the checkpoint has matrix_approximation_rank="
                             f"{state['matrix_approximation_rank']!r}, this state {self.matrix_approximation_rank}")
        rng = _check_rng(state["rng"])
        shapes = _check_tensor_dict(state["shapes"], "shapes", lambda v: isinstance(v, (list, tuple)) and all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v), "a list of ints")
        errors = _check_tensor_dict(state["errors"], "errors", lambda v: isinstance(v, torch.Tensor) and v.dim() == 1,
                                    "a 1-D tensor")
        qs = _check_tensor_dict(state["qs"], "qs", lambda v: isinstance(v, torch.Tensor) and v.dim() == 2,
                                "a 2-D tensor")
        for k in list(errors) + list(qs):
            if k not in shapes:
                raise ValueError(f"PowerSGDState.load_state_dict: parameter {k} has a buffer but no shape")
        for k, e in errors.items():
            if e.numel() != torch.Size(shapes[k]).numel():
                raise ValueError(f"PowerSGDState.load_state_dict: errors[{k}] has {e.numel()} elements, its "
                                 f"parameter's shape {tuple(shapes[k])} has {torch.Size(shapes[k]).numel()}")
        super().load_state_dict(state)
        self.iter = state["iter"]
        self.total_numel_before_compression = state["total_numel_before_compression"]
        self.total_numel_after_compression = state["total_numel_after_compression"]
        self.rng.set_state(rng)
        self._forget_parameters()
        self._shape_of = {k: tuple(v) for k, v in shapes.items()}
        self._error_of = {k: e.detach().clone() for k, e in errors.items()}
        self._q_of = {k: q.detach().clone() for k, q in qs.items()}

    _CONFIG = ("matrix_approximation_rank", "start_powerSGD_iter", "min_compression_rate", "use_error_feedback",
               "warm_start", "orthogonalization_epsilon", "random_seed", "transport")

    def __getstate__(self) -> dict:
        return {"config": {name: getattr(self, name) for name in self._CONFIG}, "state": self.state_dict()}

    def __setstate__(self, pickled: dict) -> None:
        self.__init__(None, **pickled["config"])
        self.load_state_dict(pickled["state"])


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"PowerSGDState: {name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"PowerSGDState: {name} must be >= {minimum}, got {value}")


def _check_tensor_dict(d, name: str, ok, what: str) -> dict:
    if not isinstance(d, dict):
        raise TypeError(f"PowerSGDState.load_state_dict: state['{name}'] must be a dict, got {type(d).__name__}")
    for k, v in d.items():
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise TypeError(f"PowerSGDState.load_state_dict: state['{name}'] keys must be parameter keys (ints >= 0), "
                            f"got {k!r}")
        if not ok(v):
            raise TypeError(f"PowerSGDState.load_state_dict: state['{name}'][{k}] must be {what}, got "
                            f"{type(v).__name__}")
    return d


def _check_rng(rng) -> tuple:
    if not isinstance(rng, dict) or set(rng) != {"keys", "pos", "has_gauss", "cached_gaussian"}:
        raise TypeError("PowerSGDState.load_state_dict: state['rng'] must be a dict with keys, pos, has_gauss, "
                        f"cached_gaussian, got {rng!r:.200}")
    keys = rng["keys"]
    if not isinstance(keys, torch.Tensor) or keys.shape != (_RNG_KEYS,) or keys.is_floating_point():
        raise TypeError(f"PowerSGDState.load_state_dict: state['rng']['keys'] must be an integer tensor of "
                        f"{_RNG_KEYS} words")
    if not isinstance(rng["pos"], int) or not isinstance(rng["has_gauss"], int) \
            or not isinstance(rng["cached_gaussian"], float):
        raise TypeError("PowerSGDState.load_state_dict: state['rng'] pos and has_gauss must be ints, "
                        "cached_gaussian a float")
    import numpy as np  # lazily: see PowerSGDState.__init__

    return ("MT19937", keys.numpy().astype(np.uint32), rng["pos"], rng["has_gauss"], rng["cached_gaussian"])


def powersgd_hook(state: PowerSGDState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """PowerSGD average of the bucket (module docstring): an exact average before
    ``state.start_powerSGD_iter``, then rank-``r`` compression of the gradients that gain from it and an
    exact average of the rest, with error feedback and warm start. Two all-reduces per bucket: the
    uncompressed gradients with P, then Q (skipped when empty); results bitwise identical on every rank.
    Works under torch's DDP (``register_comm_hook``) and :class:`pyparallel.DataParallel`."""
    check_dense(bucket)
    params = bucket.parameters()
    keys = state._param_keys(params)
    compress = state.iter >= state.start_powerSGD_iter
    if compress:  # before anything changes
        hooks.check_compressible(bucket, "powersgd_hook")
    if bucket.is_last():  # the last bucket of an iteration is launched after all others
        state.iter += 1
    if not compress:
        return hooks.allreduce_hook(state, bucket)

    state.buckets_reduced += 1
    layout = state._layout(keys, bucket)
    buffer = bucket.buffer()
    group, world, transport = state.process_group, state.world_size(), state.transport
    grads = bucket.gradients()
    state.total_numel_before_compression += sum(layout.numels)
    state.total_numel_after_compression += sum(layout.numels[i] for i in layout.uncompressed) + sum(
        (n + m) * r for _, n, m, r in layout.compressed)

    if state.use_error_feedback:
        if layout.has_error:
            buffer.add_(layout.error)
        before = buffer.clone()

    uncompressed = [grads[i] for i in layout.uncompressed]
    if uncompressed:
        ops.bucket_flatten(uncompressed, layout.plain)
    matrices = [grads[i].view(n, m) for i, n, m, _ in layout.compressed]
    if state.warm_start and layout.has_q:
        for q in layout.qs:
            _orthogonalize(q, state.orthogonalization_epsilon)
    else:  # the same seed on every rank, a new one per draw (torch's scheme, one draw per bucket)
        generator = torch.Generator().manual_seed(int(state.rng.randint(1_000_000_000)))
        for q in layout.qs:
            q.copy_(torch.randn(q.shape, generator=generator, dtype=q.dtype))
            _orthogonalize(q, state.orthogonalization_epsilon)
        layout.has_q = True
    for matrix, q, p in zip(matrices, layout.qs, layout.ps):
        torch.matmul(matrix, q, out=p)

    def finish(fut: torch.futures.Future) -> torch.Tensor:
        # Runs on the group's worker thread (or here, if the future is already done); a collective issued
        # from it runs at once, so every rank issues this bucket's Q before the next bucket's collectives.
        fut.value()  # raises if the all-reduce failed
        if uncompressed:
            ops.bucket_unflatten(layout.plain.div_(world), uncompressed)
        if layout.compressed:
            for p in layout.ps:
                _orthogonalize(p, state.orthogonalization_epsilon)
            for matrix, p, q in zip(matrices, layout.ps, layout.qs):
                torch.matmul(matrix.t(), p, out=q)
            comm.submit(layout.q_memory, group, "sum", None, transport, on_bytes=state._count).wait()
            layout.q_memory.div_(world)
            for matrix, p, q in zip(matrices, layout.ps, layout.qs):
                torch.matmul(p, q.t(), out=matrix)
        if state.use_error_feedback:
            torch.sub(before, buffer, out=layout.error)
            state._remember_errors(layout)
        return buffer

    if layout.first.numel() == 0:  # an empty bucket
        done = torch.futures.Future()
        done.set_result(buffer)
        return done
    last = comm.submit(layout.first, group, "sum", None, transport, on_bytes=state._count)
    return last.then(finish)
