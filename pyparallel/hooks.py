"""Communication hooks for gradient buckets, backed by pyparallel's collectives.

Every hook has exactly the signature that ``torch.nn.parallel.DistributedDataParallel.register_comm_hook``
checks, ``hook(state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]``, so the same hook
runs under torch's DDP and under :class:`pyparallel.DataParallel`. Each hook averages the bucket over
the state's process group; the future's value is the averaged bucket.

==============  =======================================================  ==================================
hook            what travels                                              aggregation
==============  =======================================================  ==================================
allreduce_hook  the bucket, exact                                         our ring (fp32 adds per hop)
fp16_hook       bucket / n cast to fp16 (halves the bytes)               our ring, summed in fp16 per hop
bf16_hook       bucket / n cast to bf16                                   our ring, summed in bf16 per hop
int8_hook       blockwise int8 + fp32 scales (~1/4 of fp32)              ring that re-quantizes every hop
topk_hook       k values + int32 indices per rank, error feedback        sparse all-gather (not summable)
powersgd_hook   rank-r factors P (n x r) and Q (m x r) per matrix, the   our all-reduce, twice (P, then Q);
                rest exact; error feedback, warm start                    see :mod:`pyparallel.powersgd`
==============  =======================================================  ==================================

Every hook reduces the bucket's gradients in one canonical parameter order, and the top-k residuals are
kept per parameter, keyed by name (Note [Hook state keyed by parameter], param_keys.py): a checkpoint
loaded into a new DDP object, whose buckets are laid out differently, continues exactly. Give the hook
state the model (``state.register_model(model)``; pyparallel.DataParallel does it for you).

Example:
    >>> model = DistributedDataParallel(net)
    >>> state = hooks.Int8State()
    >>> state.register_model(net)
    >>> model.register_comm_hook(state, hooks.int8_hook)
    >>> ... train ...; print(state.bytes_sent)
"""

# No `from __future__ import annotations` here: DDP's register_comm_hook compares the annotation objects
# with dist.GradBucket and torch.futures.Future[torch.Tensor], and strings would fail that check.
import torch
import torch.distributed as dist
from torch import nn

from . import comm
from . import transport as transport_policy
from .ops import DEFAULT_BLOCK_SIZE
from .param_keys import Layout, ParameterKeys, layout_of

_RESIDUAL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _all_slots(cls) -> list[str]:
    return [s for klass in cls.__mro__ for s in getattr(klass, "__slots__", ())]


def _count(state: dict, key: str, who: str) -> int:
    """state[key], checked to be a non-negative int (bool excluded), for load_state_dict."""
    if key not in state:
        raise ValueError(f"{who}.load_state_dict: missing {key!r}")
    value = state[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{who}.load_state_dict: {key} must be a non-negative int, got {value!r}")
    if value < 0:
        raise ValueError(f"{who}.load_state_dict: {key} must be a non-negative int, got {value}")
    return value


class HookState:
    """State shared by all hooks: the process group, the parameters' keys and traffic counters.

    Args:
        process_group: group to average over (default: the world).
        transport: ``"auto"`` (by host layout: shared memory on one host, hierarchical across hosts, see
            :mod:`pyparallel.transport`), ``"ring"``, ``"shm"``, ``"hierarchical"`` or ``"ipc"`` (CUDA). A hook's
            compression applies to the bytes that cross hosts; inside a host the reduction is exact.

    ``bytes_sent`` counts the bytes this rank put on the wire (across hosts) through the hook. The state pickles
    without its process group and its registered model (set them again after unpickling), and
    ``state_dict()`` / ``load_state_dict()`` carry everything that must survive a checkpoint.
    """

    __slots__ = ("process_group", "transport", "bytes_sent", "buckets_reduced", "_keys", "_layouts")
    _TRANSIENT = ("process_group", "_keys", "_layouts")  # not pickled: rebuilt empty

    def __init__(self, process_group: dist.ProcessGroup | None = None, transport: str = "auto"):
        self.process_group = process_group
        self.transport = transport_policy.check(transport, type(self).__name__)
        self.bytes_sent = 0
        self.buckets_reduced = 0
        self._keys = ParameterKeys()
        self._layouts: dict = {}

    def register_model(self, model: nn.Module) -> "HookState":
        """Keys per-parameter state by the names of ``model.named_parameters()`` and fixes the canonical
        order in which buckets are reduced (Note [Hook state keyed by parameter]). Call it once, before
        training or loading a checkpoint; returns the state."""
        self._keys = ParameterKeys(model)
        self._layouts = {}
        return self

    @property
    def model_registered(self) -> bool:
        return self._keys.registered

    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    def layout(self, bucket) -> Layout:
        """The canonical order of ``bucket``'s gradients (param_keys.Layout)."""
        return layout_of(bucket, self._keys, self._layouts)

    def _count(self, sent: int) -> None:
        self.bytes_sent += sent

    def reset_error_feedback(self) -> None:
        """Forgets what error feedback remembered (nothing for a hook without it). A replica that heals
        from a live peer calls it after loading the peer's state (pyparallel.fault_tolerance): the
        remembered error is gradient that this replica did not send, and a copy of the peer's would send
        the peer's twice."""

    def state_dict(self) -> dict:
        return {"bytes_sent": self.bytes_sent, "buckets_reduced": self.buckets_reduced}

    def _check_state_dict(self, state: dict) -> dict:
        """The validated values of ``state`` this class loads; raises before anything is changed."""
        who = type(self).__name__
        if not isinstance(state, dict):
            raise TypeError(f"{who}.load_state_dict: expected a dict, got {type(state).__name__}")
        return {"bytes_sent": _count(state, "bytes_sent", who), "buckets_reduced": _count(state, "buckets_reduced", who)}

    def load_state_dict(self, state: dict) -> None:
        for name, value in self._check_state_dict(state).items():
            setattr(self, name, value)

    def __getstate__(self) -> dict:
        return {s: getattr(self, s) for s in _all_slots(type(self)) if s not in self._TRANSIENT}

    def __setstate__(self, state: dict) -> None:
        self.process_group = None
        self._keys, self._layouts = ParameterKeys(), {}
        for name, value in state.items():
            setattr(self, name, value)


class Int8State(HookState):
    """State of :func:`int8_hook`. ``block_size``: elements per quantization block."""

    __slots__ = ("block_size",)

    def __init__(self, process_group: dist.ProcessGroup | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                 transport: str = "auto"):
        super().__init__(process_group, transport)
        if block_size <= 0:
            raise ValueError(f"Int8State: block_size must be positive, got {block_size}")
        self.block_size = block_size


class TopkState(HookState):
    """State of :func:`topk_hook`.

    Args:
        process_group: group to average over.
        ratio: fraction of each bucket's elements every rank sends, in (0, 1].
        warmup_steps: iterations reduced densely (exactly) before sparsification starts; an iteration
            ends with the bucket whose ``is_last()`` is true.
        error_feedback: keep what was not sent in a residual and add it to the next step's gradient.

    Residuals are kept per parameter (``residuals[name]``, 1-D, a view into the flat residual of the
    parameter's current bucket), so they follow a parameter when buckets are rebuilt or a checkpoint is
    loaded into a new DDP object.

    Non-finite gradients (Note [Non-finite top-k steps]) never stay in a residual: a rank whose bucket
    holds a NaN or Inf sends it without error feedback (its residual is left as it was), so the NaN/Inf
    reaches every rank's result and every rank's GradScaler skips the step; a reduced bucket that is not
    finite counts in ``nonfinite_buckets`` on every rank, and any non-finite entry a residual got anyway
    (more of them than k, or another rank's, summed in by the hierarchical transport) is set to 0.
    """

    __slots__ = ("ratio", "warmup_steps", "error_feedback", "iteration", "residuals", "nonfinite_buckets",
                 "_flat")
    _TRANSIENT = HookState._TRANSIENT + ("residuals", "_flat")

    def __init__(self, process_group: dist.ProcessGroup | None = None, ratio: float = 0.01, warmup_steps: int = 0,
                 error_feedback: bool = True, transport: str = "auto"):
        super().__init__(process_group, transport)
        if not 0 < ratio <= 1:
            raise ValueError(f"TopkState: ratio must be in (0, 1], got {ratio}")
        if warmup_steps < 0:
            raise ValueError(f"TopkState: warmup_steps must be >= 0, got {warmup_steps}")
        self.ratio, self.warmup_steps, self.error_feedback = ratio, warmup_steps, error_feedback
        self.iteration = 0
        self.nonfinite_buckets = 0
        self.residuals: dict[str, torch.Tensor] = {}
        self._flat: dict[tuple[str, ...], torch.Tensor] = {}  # canonical names of a bucket -> flat residual

    def residual_for(self, bucket) -> torch.Tensor | None:
        """The flat residual of ``bucket`` in canonical order (None without error feedback). Made on first
        use of a bucket layout from each parameter's residual so far (zeros for a new parameter); the
        parameters' entries in ``residuals`` then become views into it."""
        if not self.error_feedback:
            return None
        layout = self.layout(bucket)
        buffer = bucket.buffer()
        flat = self._flat.get(layout.names)
        if flat is None or flat.dtype != buffer.dtype or flat.device != buffer.device:
            flat = torch.zeros_like(buffer)
            for name, view in zip(layout.names, layout.split(flat)):
                old = self.residuals.get(name)
                if old is not None:
                    if old.numel() != view.numel():
                        raise ValueError(f"TopkState: the residual of {name!r} has {old.numel()} elements but the "
                                         f"parameter has {view.numel()}")
                    view.copy_(old.reshape(-1))
                self.residuals[name] = view
            # A flat residual that shares a parameter with this one is out of date from now on.
            mine = set(layout.names)
            for names in [n for n in self._flat if mine.intersection(n)]:
                del self._flat[names]
            self._flat[layout.names] = flat
        return flat

    def reset_error_feedback(self) -> None:
        """Zeroes every residual (HookState.reset_error_feedback)."""
        for r in self.residuals.values():
            r.zero_()

    def residual_of(self, param: torch.Tensor) -> torch.Tensor | None:
        """The residual (1-D) of ``param``, or None if none was made yet."""
        return self.residuals.get(self._keys.key(param)[1])

    def state_dict(self) -> dict:
        out = super().state_dict()
        out.update(iteration=self.iteration, nonfinite_buckets=self.nonfinite_buckets,
                   residuals={name: r.clone() for name, r in self.residuals.items()})
        return out

    def _check_state_dict(self, state: dict) -> dict:
        checked = super()._check_state_dict(state)
        who = type(self).__name__
        checked["iteration"] = _count(state, "iteration", who)
        checked["nonfinite_buckets"] = _count(state, "nonfinite_buckets", who) if "nonfinite_buckets" in state else 0
        if "residuals" not in state:
            raise ValueError(f"{who}.load_state_dict: missing 'residuals'")
        residuals = state["residuals"]
        if not isinstance(residuals, dict):
            raise TypeError(f"{who}.load_state_dict: residuals must be a dict of parameter name -> tensor, got "
                            f"{type(residuals).__name__}")
        out = {}
        for name, r in residuals.items():
            if not isinstance(name, str):
                raise TypeError(f"{who}.load_state_dict: residuals must be keyed by parameter name, got the key "
                                f"{name!r} (a checkpoint from before residuals were kept per parameter?)")
            if not isinstance(r, torch.Tensor):
                raise TypeError(f"{who}.load_state_dict: the residual of {name!r} must be a tensor, got "
                                f"{type(r).__name__}")
            if r.dtype not in _RESIDUAL_DTYPES:
                raise TypeError(f"{who}.load_state_dict: the residual of {name!r} must be float32, float16 or "
                                f"bfloat16, got {r.dtype}")
            if r.requires_grad:
                raise ValueError(f"{who}.load_state_dict: the residual of {name!r} requires grad; the error "
                                 "feedback updates it in place, which autograd forbids (save r.detach())")
            if self._keys.registered:
                numel = self._keys.numel(name)
                if numel is None:
                    raise ValueError(f"{who}.load_state_dict: {name!r} is not a parameter of the registered model")
                if r.numel() != numel:
                    raise ValueError(f"{who}.load_state_dict: the residual of {name!r} has {r.numel()} elements but "
                                     f"the parameter has {numel}")
            out[name] = r.detach().reshape(-1).clone()
        checked["residuals"] = out
        return checked

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._flat = {}  # rebuilt from the loaded per-parameter residuals on first use

    def __getstate__(self) -> dict:
        out = super().__getstate__()
        out["residuals"] = {name: r.clone() for name, r in self.residuals.items()}  # no shared flat storage
        return out

    def __setstate__(self, state: dict) -> None:
        self._flat = {}
        super().__setstate__(state)


def _average(state: HookState, bucket, tensor: torch.Tensor, compression=None, op: str = "avg",
             on_start=None) -> torch.futures.Future:
    state.buckets_reduced += 1
    return comm.submit(tensor, state.process_group, op, compression, state.transport, on_bytes=state._count,
                       on_start=on_start)


def check_compressible(bucket, who: str) -> None:
    """Raises, when the hook is called, if our compressed collectives cannot take the bucket's dtype
    (float64, e.g.): raised later, from the collective, it would reach DDP as an error about an internal op."""
    dtype = bucket.buffer().dtype
    if dtype not in comm.DTYPES:
        raise TypeError(f"{who}: bucket {bucket.index()} holds {dtype} gradients; pyparallel's collectives reduce "
                        "float32, float16 and bfloat16 only: keep these parameters in one of those, or use "
                        "allreduce_hook (it averages other dtypes exactly with torch.distributed.all_reduce)")


def _reduce(state: HookState, bucket, compression=None) -> torch.futures.Future:
    """Averages the bucket in canonical order (Note [Hook state keyed by parameter]); the future's value
    is the bucket's buffer."""
    buffer = bucket.buffer()
    layout = state.layout(bucket)
    fut = _average(state, bucket, layout.gather(buffer), compression)
    return fut if layout.identity else fut.then(lambda f: layout.scatter(f.value(), buffer))


def allreduce_hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Exact average with pyparallel's ring; bitwise identical on every rank.

    It is every trainer's default hook (:mod:`pyparallel.reducer`), so a bucket of a dtype that our
    collectives do not reduce (float64, e.g. a pipeline checked against a float64 reference) is averaged
    by ``torch.distributed.all_reduce`` instead, as torch's own ``allreduce_hook`` does."""
    buffer = bucket.buffer()
    if buffer.dtype not in comm.DTYPES:
        return _torch_average(state, buffer)
    return _reduce(state, bucket)


def _torch_average(state: HookState, tensor: torch.Tensor) -> torch.futures.Future:
    state.buckets_reduced += 1
    n = state.world_size()
    state._count(2 * (n - 1) * tensor.numel() * tensor.element_size() // n)  # what a ring all-reduce sends
    tensor.div_(n)
    work = dist.all_reduce(tensor, group=state.process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _cast_hook(state: HookState, bucket, dtype: torch.dtype) -> torch.futures.Future:
    buffer = bucket.buffer()
    layout = state.layout(bucket)
    # Divide before casting and communicating, so the sum of n values cannot overflow fp16.
    compressed = (layout.gather(buffer) / state.world_size()).to(dtype)
    fut = _average(state, bucket, compressed, op="sum")
    return fut.then(lambda f: layout.scatter(f.value(), buffer))


def fp16_hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average in fp16: half of fp32's bytes (like torch's fp16_compress_hook, on our ring)."""
    return _cast_hook(state, bucket, torch.float16)


def bf16_hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average in bf16: half of fp32's bytes, fp32's range."""
    return _cast_hook(state, bucket, torch.bfloat16)


def int8_hook(state: Int8State, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average through the int8 ring, which re-quantizes partial sums at every hop (about 1/4 of fp32's
    bytes); error bound in :class:`pyparallel.Int8`. Bitwise identical on every rank."""
    check_compressible(bucket, "int8_hook")
    return _reduce(state, bucket, comm.Int8(state.block_size))


def _finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``: one reading pass (aminmax propagates NaN), about 4 ms per 13M fp32 elements
    on one core of the development VM, where isfinite().all() takes 50 times longer."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


# Note [Non-finite top-k steps]
# AMP's GradScaler skips the optimizer step when a gradient is NaN or Inf; with error feedback such a
# value must not stay in the residual, or it poisons every later step. Two checks, each one pass:
# * Just before the collective (on the group's worker thread, so a CUDA check never stalls backward), a
#   rank whose bucket holds a NaN or Inf drops the residual from this call: its residual stays as it was,
#   and the bucket goes out plain. NaN and Inf have the largest magnitudes, so they are selected, and
#   the reduced bucket, the same on every rank, is not finite: every rank's GradScaler skips the step.
#   (Ranks with finite gradients update their residuals as usual: what they sent is dropped with the
#   skipped step, like any gradient of a skipped step. Restoring their residuals exactly would need a
#   copy of every residual at every step: 5x the cost of this check, for a rare event.)
# * After it, a reduced bucket that is not finite is counted on every rank (nonfinite_buckets), and any
#   non-finite entry in this rank's residual is set to 0: those left over when a rank had more than k
#   of them, or another rank's that the hierarchical transport summed into the region this rank owns.
#   A non-finite entry anywhere in a residual would have been selected and sent, so it always shows in
#   the reduced bucket, and checking the reduced bucket is enough.


def _sparse(state: TopkState, bucket) -> torch.futures.Future:
    buffer = bucket.buffer()
    layout = state.layout(bucket)
    tensor = layout.gather(buffer)
    residual = state.residual_for(bucket)
    compression = comm.Topk(ratio=state.ratio, residual=residual)

    def check_input() -> None:  # Note [Non-finite top-k steps]
        if residual is not None and not _finite(tensor):
            compression.residual = None

    fut = _average(state, bucket, tensor, compression, on_start=check_input)

    def finish(f: torch.futures.Future) -> torch.Tensor:
        reduced = f.value()
        if not _finite(reduced):
            state.nonfinite_buckets += 1
            if residual is not None:
                torch.nan_to_num_(residual, nan=0.0, posinf=0.0, neginf=0.0)
        return layout.scatter(reduced, buffer)

    return fut.then(finish)


def topk_hook(state: TopkState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average of every rank's top ``ratio`` entries (plus residual): a sparse all-gather of values and
    int32 indices, decoded in rank order, since index sets differ and cannot be summed on the way. NaN
    and Inf gradients never stay in a residual (Note [Non-finite top-k steps])."""
    check_compressible(bucket, "topk_hook")
    fut = _reduce(state, bucket) if state.iteration < state.warmup_steps else _sparse(state, bucket)
    if bucket.is_last():
        state.iteration += 1
    return fut


# PowerSGD lives in its own module (it needs HookState, defined above).
from .powersgd import PowerSGDState, powersgd_hook  # noqa: E402,F401
