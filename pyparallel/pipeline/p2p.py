"""Point-to-point transfers between neighbouring stages (peers are global ranks of the default group).

Between two ranks, messages in one direction are matched in the order they were posted (Gloo and NCCL
alike), and the pipeline posts them in the same order on both sides; so no tags are needed.

Note [When to post receives]
Gloo sends are rendezvous: the bytes move only once the receiver has posted its receive, and then the
sender's I/O thread must get a core, which on a busy machine costs about a millisecond. So with Gloo a
stage posts the receive of its next action before it computes the current one, and the transfer happens
while it computes. NCCL cannot do that: it runs the operations between two ranks one after the other in
posting order, so a receive posted ahead of a send that the peer is waiting for deadlocks (GPipe's
last forward send and first backward receive, for one). There the receive of an action is posted in one
batch with the sends of the previous action, whose operations progress together; this is also how
torch.distributed.pipelining fuses them.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import torch
import torch.distributed as dist


class Receive(NamedTuple):
    """What an action receives before it runs: a tensor of ``shape`` and ``dtype`` from ``peer``; ``what``
    names it in errors."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    peer: int
    what: str = "a receive"


@contextlib.contextmanager
def naming_the_transfer(what: str):
    """Re-raises a transfer that failed (the group's timeout, a closed connection) saying what this rank was
    waiting for and why that happens: the backend's message names neither the peer nor the step."""
    try:
        yield
    except RuntimeError as exc:
        message = (f"{what} failed: {exc}\nThe peer raised during this step (see its error), died, or did not call "
                   "step() for this batch: every rank of the pipeline must call step() once per batch")
        try:
            new = type(exc)(message)  # the same type (DistBackendError), for callers that catch it
        except Exception:
            new = RuntimeError(message)
        raise new from exc


class StageTransfers:
    """The receives and sends of one stage for one step, posted as Note [When to post receives] says.

    Args:
        receives: per action, in execution order, what it receives (None if nothing).
        device: where receive buffers live.
        prefetch: post each receive one action early (Gloo); False batches it with the previous action's
            sends (NCCL).

    Example:
        >>> transfers = StageTransfers([Receive((4, 8), torch.float32, 0), None], "cpu", prefetch=True)
        >>> x = transfers.receive(0); transfers.send(x * 2, peer=2); transfers.receive(1); transfers.finish()
    """

    def __init__(self, receives: list[Receive | None], device: torch.device, prefetch: bool):
        self._receives, self._device, self._prefetch = receives, device, prefetch
        self._posted: dict[int, tuple[torch.Tensor, list[dist.Work]]] = {}
        self._unposted_sends: list[dist.P2POp] = []
        self._sends: list[tuple[dist.Work, list[torch.Tensor]]] = []  # in flight, with the tensors they read

    def receive(self, action: int) -> torch.Tensor | None:
        """The tensor that action number ``action`` receives (None if it receives nothing), once it has arrived."""
        if self._prefetch:
            for k in (action, action + 1):
                if k < len(self._receives) and k not in self._posted and self._receives[k] is not None:
                    buffer = self._buffer(k)
                    self._posted[k] = buffer, [dist.irecv(buffer, self._receives[k].peer)]
        else:
            recv = [] if self._receives[action] is None else [dist.P2POp(dist.irecv, self._buffer(action),
                                                                          self._receives[action].peer)]
            works = self._post_batch(recv)
            if recv:
                self._posted[action] = recv[0].tensor, works
        if action not in self._posted:
            return None
        buffer, works = self._posted.pop(action)
        spec = self._receives[action]
        with naming_the_transfer(spec.what):
            for work in works:
                work.wait()
        self._sends = [(work, t) for work, t in self._sends if not work.is_completed()]
        return buffer

    def send(self, tensor: torch.Tensor, peer: int) -> None:
        tensor = tensor.contiguous()
        if self._prefetch:
            self._sends.append((dist.isend(tensor, peer), [tensor]))
        else:
            self._unposted_sends.append(dist.P2POp(dist.isend, tensor, peer))

    def finish(self) -> None:
        """Posts what is left and waits until every send has completed."""
        self._post_batch([])
        with naming_the_transfer(f"rank {dist.get_rank()}: this step's sends"):
            for work, _ in self._sends:
                work.wait()
        self._sends = []

    def _buffer(self, action: int) -> torch.Tensor:
        spec = self._receives[action]
        return torch.empty(spec.shape, dtype=spec.dtype, device=self._device)

    def _post_batch(self, recvs: list[dist.P2POp]) -> list[dist.Work]:
        """Posts the pending sends with ``recvs`` in one batch; returns what to wait for before using the receive."""
        sends, self._unposted_sends = self._unposted_sends, []
        if not sends and not recvs:
            return []
        works = dist.batch_isend_irecv(sends + recvs)
        if len(works) != len(sends) + len(recvs):  # coalesced into one handle (NCCL): wait for all of it;
            # a wait only orders the current CUDA stream after the transfer, the host goes on
            self._sends += [(work, [op.tensor for op in sends]) for work in works]
            return works
        self._sends += [(work, [op.tensor]) for work, op in zip(works, sends)]
        return works[len(sends):]


def send_object(obj: Any, peer: int, device: torch.device) -> None:
    with naming_the_transfer(f"rank {dist.get_rank()}: the step handshake's send to rank {peer}"):
        dist.send_object_list([obj], dst=peer, device=device)


def recv_object(peer: int, device: torch.device) -> Any:
    received = [None]
    with naming_the_transfer(f"rank {dist.get_rank()}: the step handshake's receive from rank {peer}"):
        dist.recv_object_list(received, src=peer, device=device)
    return received[0]


def send_ints(values: list[int], peer: int, device: torch.device) -> None:
    with naming_the_transfer(f"rank {dist.get_rank()}: the step handshake's send to rank {peer}"):
        dist.send(torch.tensor(values, dtype=torch.int64, device=device), dst=peer)


def recv_ints(count: int, peer: int, device: torch.device) -> list[int]:
    received = torch.empty(count, dtype=torch.int64, device=device)
    with naming_the_transfer(f"rank {dist.get_rank()}: the step handshake's receive from rank {peer}"):
        dist.recv(received, src=peer)
    return received.tolist()
