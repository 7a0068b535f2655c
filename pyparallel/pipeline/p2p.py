"""Point-to-point transfers between neighbouring stages (peers are global ranks of the default group).

Between two ranks, messages in one direction are matched in the order they were posted (Gloo and NCCL
alike), and the pipeline posts them in the same order on both sides; so no tags are needed.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist


class InFlight(NamedTuple):
    """A posted send: its handle, and the tensor it reads (kept alive until the send completes)."""

    work: dist.Work
    tensor: torch.Tensor


def send_op(tensor: torch.Tensor, peer: int) -> dist.P2POp:
    return dist.P2POp(dist.isend, tensor.contiguous(), peer)


def recv_op(tensor: torch.Tensor, peer: int) -> dist.P2POp:
    return dist.P2POp(dist.irecv, tensor, peer)


def post(sends: list[dist.P2POp], recvs: list[dist.P2POp]) -> list[InFlight]:
    """Posts ``sends`` and ``recvs`` as one batch and waits for the receives.

    One batch because NCCL runs a pair's operations one after the other in posting order: a receive
    posted alone ahead of a send that the peer is waiting for would deadlock, while the operations of one
    batch progress together (this is also how torch.distributed.pipelining fuses them).

    Returns:
        The sends still in flight. Gloo gives one handle per operation and its sends keep running in the
        background; NCCL gives one handle for the whole batch, which is then waited here (a wait only
        orders the current CUDA stream after the transfer; the host goes on).
    """
    ops = sends + recvs
    if not ops:
        return []
    works = dist.batch_isend_irecv(ops)
    if len(works) != len(ops):  # coalesced into one handle
        for work in works:
            work.wait()
        return []
    for work in works[len(sends):]:
        work.wait()
    return [InFlight(work, op.tensor) for work, op in zip(works, sends)]


def still_running(in_flight: list[InFlight]) -> list[InFlight]:
    """Drops the sends that have completed, so their tensors can be freed."""
    return [s for s in in_flight if not s.work.is_completed()]


def wait_all(in_flight: list[InFlight]) -> None:
    for sent in in_flight:
        sent.work.wait()


def send_object(obj: Any, peer: int, device: torch.device) -> None:
    dist.send_object_list([obj], dst=peer, device=device)


def recv_object(peer: int, device: torch.device) -> Any:
    received = [None]
    dist.recv_object_list(received, src=peer, device=device)
    return received[0]


def send_ints(values: list[int], peer: int, device: torch.device) -> None:
    dist.send(torch.tensor(values, dtype=torch.int64, device=device), dst=peer)


def recv_ints(count: int, peer: int, device: torch.device) -> list[int]:
    received = torch.empty(count, dtype=torch.int64, device=device)
    dist.recv(received, src=peer)
    return received.tolist()
