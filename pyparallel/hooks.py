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
==============  =======================================================  ==================================

Example:
    >>> model = DistributedDataParallel(net)
    >>> state = hooks.Int8State()
    >>> model.register_comm_hook(state, hooks.int8_hook)
    >>> ... train ...; print(state.bytes_sent)
"""

# No `from __future__ import annotations` here: DDP's register_comm_hook compares the annotation objects
# with dist.GradBucket and torch.futures.Future[torch.Tensor], and strings would fail that check.
import torch
import torch.distributed as dist

from . import comm
from . import transport as transport_policy
from .ops import DEFAULT_BLOCK_SIZE


def _all_slots(cls) -> list[str]:
    return [s for klass in cls.__mro__ for s in getattr(klass, "__slots__", ())]


class HookState:
    """State shared by all hooks: the process group and traffic counters.

    Args:
        process_group: group to average over (default: the world).
        transport: ``"auto"`` (by host layout: shared memory on one host, hierarchical across hosts, see
            :mod:`pyparallel.transport`), ``"ring"``, ``"shm"``, ``"hierarchical"`` or ``"ipc"`` (CUDA). A hook's
            compression applies to the bytes that cross hosts; inside a host the reduction is exact.

    ``bytes_sent`` counts the bytes this rank put on the wire (across hosts) through the hook. The state pickles
    without its process group (set it again after unpickling, or leave None for the world), and
    ``state_dict()`` / ``load_state_dict()`` carry everything that must survive a checkpoint.
    """

    __slots__ = ("process_group", "transport", "bytes_sent", "buckets_reduced")

    def __init__(self, process_group: dist.ProcessGroup | None = None, transport: str = "auto"):
        self.process_group = process_group
        self.transport = transport_policy.check(transport, type(self).__name__)
        self.bytes_sent = 0
        self.buckets_reduced = 0

    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    def _count(self, sent: int) -> None:
        self.bytes_sent += sent

    def state_dict(self) -> dict:
        return {"bytes_sent": self.bytes_sent, "buckets_reduced": self.buckets_reduced}

    def load_state_dict(self, state: dict) -> None:
        self.bytes_sent = state["bytes_sent"]
        self.buckets_reduced = state["buckets_reduced"]

    def __getstate__(self) -> dict:
        return {s: getattr(self, s) for s in _all_slots(type(self)) if s != "process_group"}

    def __setstate__(self, state: dict) -> None:
        self.process_group = None
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
        error_feedback: keep what was not sent in a residual per bucket and add it to the next step's
            gradient (residuals are re-created when a bucket's shape changes, as DDP rebuilds buckets
            after the first iteration).
    """

    __slots__ = ("ratio", "warmup_steps", "error_feedback", "iteration", "residuals")

    def __init__(self, process_group: dist.ProcessGroup | None = None, ratio: float = 0.01, warmup_steps: int = 0,
                 error_feedback: bool = True, transport: str = "auto"):
        super().__init__(process_group, transport)
        if not 0 < ratio <= 1:
            raise ValueError(f"TopkState: ratio must be in (0, 1], got {ratio}")
        if warmup_steps < 0:
            raise ValueError(f"TopkState: warmup_steps must be >= 0, got {warmup_steps}")
        self.ratio, self.warmup_steps, self.error_feedback = ratio, warmup_steps, error_feedback
        self.iteration = 0
        self.residuals: dict[int, torch.Tensor] = {}

    def residual_for(self, bucket) -> torch.Tensor | None:
        if not self.error_feedback:
            return None
        buffer = bucket.buffer()
        r = self.residuals.get(bucket.index())
        if r is None or r.shape != buffer.shape or r.dtype != buffer.dtype or r.device != buffer.device:
            r = self.residuals[bucket.index()] = torch.zeros_like(buffer)
        return r

    def state_dict(self) -> dict:
        out = super().state_dict()
        out.update(iteration=self.iteration, residuals={i: r.clone() for i, r in self.residuals.items()})
        return out

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.iteration = state["iteration"]
        self.residuals = {int(i): r.clone() for i, r in state["residuals"].items()}


def _average(state: HookState, bucket, tensor: torch.Tensor, compression=None, op: str = "avg") -> torch.futures.Future:
    state.buckets_reduced += 1
    return comm.submit(tensor, state.process_group, op, compression, state.transport, on_bytes=state._count)


def allreduce_hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Exact average with pyparallel's ring; bitwise identical on every rank."""
    return _average(state, bucket, bucket.buffer())


def _cast_hook(state: HookState, bucket, dtype: torch.dtype) -> torch.futures.Future:
    buffer = bucket.buffer()
    # Divide before casting and communicating, so the sum of n values cannot overflow fp16.
    compressed = (buffer / state.world_size()).to(dtype)
    fut = _average(state, bucket, compressed, op="sum")

    def decompress(f: torch.futures.Future) -> torch.Tensor:
        buffer.copy_(f.value())
        return buffer

    return fut.then(decompress)


def fp16_hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average in fp16: half of fp32's bytes (like torch's fp16_compress_hook, on our ring)."""
    return _cast_hook(state, bucket, torch.float16)


def bf16_hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average in bf16: half of fp32's bytes, fp32's range."""
    return _cast_hook(state, bucket, torch.bfloat16)


def int8_hook(state: Int8State, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average through the int8 ring, which re-quantizes partial sums at every hop (about 1/4 of fp32's
    bytes); error bound in :class:`pyparallel.Int8`. Bitwise identical on every rank."""
    return _average(state, bucket, bucket.buffer(), comm.Int8(state.block_size))


def topk_hook(state: TopkState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average of every rank's top ``ratio`` entries (plus residual): a sparse all-gather of values and
    int32 indices, decoded in rank order, since index sets differ and cannot be summed on the way."""
    if state.iteration < state.warmup_steps:
        fut = _average(state, bucket, bucket.buffer())
    else:
        fut = _average(state, bucket, bucket.buffer(),
                       comm.Topk(ratio=state.ratio, residual=state.residual_for(bucket)))
    if bucket.is_last():
        state.iteration += 1
    return fut
