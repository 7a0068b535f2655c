"""Which transport carries a collective, and the per-group resources behind each (policy layer).

``"ring"``: our ring over the group's own point-to-point send/recv (Gloo, NCCL). ``"shm"``: every rank of
the group on one host reduces through one shared-memory segment (Note [Shared-memory collectives],
csrc/comm/shm.h). ``"hierarchical"``: shared memory inside each host, our ring across hosts among the
ranks of equal local index, shared memory again (Note [Hierarchical all-reduce]). ``"auto"`` picks from
facts every rank shares (the group's host layout, the tensor's device), so every rank picks the same:

* CUDA tensors: ring (NCCL) until a CUDA transport exists;
* every rank on one host (and more than one rank): shm;
* several hosts, more than one rank on some host, the same number on each: hierarchical;
* otherwise: ring.

Compression (int8, top-k) applies only where bytes cross hosts: exact inside a host, compressed across.

Host identity: ``PYPARALLEL_HOST`` when set (tests and link emulation), else torchrun's ``GROUP_RANK``
(the node's rank), else (hostname, boot id, network and pid namespaces). It is exchanged once per group
through the group's store, never by a collective on the group (the caller's thread may be running one).
"""

from __future__ import annotations

import atexit
import datetime
import os
import secrets
import socket
import threading
import time
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

_ops = torch.ops.pyparallel

TRANSPORTS = ("auto", "ring", "shm", "hierarchical")
# Bytes of one rank's slot in the segment (two sets of one slot per local rank): a round of the
# shared-memory all-reduce moves this much per rank. PYPARALLEL_SHM_SLOT_BYTES overrides (tests use small
# slots to stream tensors through many rounds).
DEFAULT_SLOT_BYTES = 1 << 20
# The hierarchical all-reduce goes through in pieces of this many bytes, so that one piece crosses hosts
# while the next is reduced inside the host (Note [Pipelined hierarchical all-reduce]). The bits depend on
# it, so every rank must use the same (the header check says so if not); PYPARALLEL_HIER_PIECE_BYTES
# overrides, 0 = one piece.
DEFAULT_PIECE_BYTES = 8 << 20
TWIN_SUFFIX = "/pyparallel-twin"  # kTwinSuffix in csrc/comm/transport.h
_DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


def host_identity() -> str:
    """This process's host, as the transport policy sees it (see the module docstring)."""
    if os.environ.get("PYPARALLEL_HOST"):
        return "env:" + os.environ["PYPARALLEL_HOST"]
    if os.environ.get("GROUP_RANK") is not None:
        return "torchrun-node:" + os.environ["GROUP_RANK"]
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
    except OSError:
        pass
    for ns in ("net", "pid"):  # shared memory and pid checks need the same kernel and pid namespace
        try:
            parts.append(os.readlink(f"/proc/self/ns/{ns}"))
        except OSError:
            pass
    return "/".join(parts)


@dataclass
class Layout:
    """Hosts of a group: ``hosts[h]`` lists the group ranks on host h (hosts ordered by first rank)."""

    rank: int
    hosts: list[list[int]]

    @property
    def host_index(self) -> int:
        return next(h for h, ranks in enumerate(self.hosts) if self.rank in ranks)

    @property
    def local_ranks(self) -> list[int]:
        return self.hosts[self.host_index]

    @property
    def local_rank(self) -> int:
        return self.local_ranks.index(self.rank)

    @property
    def uniform(self) -> bool:
        return len({len(h) for h in self.hosts}) == 1


class _GroupResources:
    """Everything the transports need for one process group, set up once, on first use."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = weakref.ref(group)  # never keeps the group alive (Note [Group lifetimes], comm.py)
        self.name = group.group_name
        self.store = _store_of(group)
        self.timeout = _group_timeout(group)
        self.rank, self.size = group.rank(), group.size()
        # Every rank adds once per incarnation of the group, so a re-created group with the same name
        # never reads its predecessor's keys.
        generation = -(-self.store.add(f"pyparallel/{self.name}/generation", 1) // self.size)
        self.prefix = f"pyparallel/{self.name}/{generation}"
        self.layout = self._exchange_layout()
        self.piece_bytes = int(os.environ.get("PYPARALLEL_HIER_PIECE_BYTES", DEFAULT_PIECE_BYTES))
        self.shm_comm: str | None = None
        self.cross_group: str | None = None
        self.twin: str | None = None
        self._lock = threading.Lock()
        self._private: list[tuple[str, dist.ProcessGroup]] = []  # our own groups: inter-host, twin

    def _exchange_layout(self) -> Layout:
        self.store.set(f"{self.prefix}/host/{self.rank}", host_identity())
        keys = [f"{self.prefix}/host/{r}" for r in range(self.size)]
        self.store.wait(keys, self.timeout)
        hosts: dict[str, list[int]] = {}
        for r, key in enumerate(keys):
            hosts.setdefault(self.store.get(key).decode(), []).append(r)
        return Layout(self.rank, list(hosts.values()))

    def shared_memory(self) -> str:
        """Name of this host's shared-memory communicator (attached on first call)."""
        with self._lock:
            if self.shm_comm is None:
                self.shm_comm = self._attach_segment()
            return self.shm_comm

    def _attach_segment(self) -> str:
        layout, timeout_s = self.layout, self.timeout.total_seconds()
        comm = f"{self.prefix}/shm"
        key = f"{self.prefix}/shm/{layout.host_index}"
        local = layout.local_ranks
        if layout.local_rank == 0:
            slot = int(os.environ.get("PYPARALLEL_SHM_SLOT_BYTES", DEFAULT_SLOT_BYTES))
            segment = f"/pyparallel-{os.getpid()}-{secrets.token_hex(8)}"  # unique per job and group
            _ops.shm_attach(comm, segment, 0, len(local), local, slot, True, timeout_s)
            try:
                self.store.set(f"{key}/segment", f"{segment} {slot}")
                # Unlink once every local rank has mapped it: from then on nothing of ours is in
                # /dev/shm, whatever happens to the processes.
                deadline = time.monotonic() + timeout_s
                while self.store.add(f"{key}/mapped", 0) < len(local) - 1:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"shared memory: ranks {local[1:]} of this host did not map segment "
                                           f"{segment} within the group's timeout ({timeout_s:.0f} s)")
                    time.sleep(0.001)
            finally:
                _ops.shm_unlink(segment)
        else:
            self.store.wait([f"{key}/segment"], self.timeout)
            segment, slot = self.store.get(f"{key}/segment").decode().split()
            _ops.shm_attach(comm, segment, layout.local_rank, len(local), local, int(slot), False, timeout_s)
            self.store.add(f"{key}/mapped", 1)
        return comm

    def _private_gloo_group(self, name: str, members: list[int]) -> dist.ProcessGroup:
        """A Gloo group of ours over ``members`` (ranks of this group), built from the group's store and
        registered by name for the C++ collectives: no collective on the caller's group, and no torch group
        counter that the caller's own new_group calls could put out of step."""
        store = dist.PrefixStore(name + "/", self.store)
        me = members.index(self.rank)
        backend = dist.ProcessGroupGloo(store, me, len(members), self.timeout)
        pg = dist.ProcessGroup(store, me, len(members))
        pg._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, backend)
        pg._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
        pg._set_group_name(name)
        torch._C._distributed_c10d._register_process_group(name, pg)
        self._private.append((name, pg))  # keeps it alive until release()
        return pg

    def inter_host_group(self) -> str:
        """Name of the group of this rank and the ranks of equal local index on the other hosts."""
        with self._lock:
            if self.cross_group is None:
                layout = self.layout
                name = f"{self.prefix}/cross{layout.local_rank}"
                self._private_gloo_group(name, [host[layout.local_rank] for host in layout.hosts])
                self.cross_group = name
            return self.cross_group

    def ensure_twin(self) -> None:
        """The group's twin for our header checks and small all-reduces (Note [Carried header],
        csrc/comm/transport.h), registered as the group's name + TWIN_SUFFIX, where C++ looks for it."""
        with self._lock:
            if self.twin is None:
                self._private_gloo_group(self.name + TWIN_SUFFIX, list(range(self.size)))
                self.twin = self.name + TWIN_SUFFIX

    def release(self) -> None:
        if self.shm_comm is not None:
            _ops.shm_detach(self.shm_comm)
        for name, pg in self._private:
            pg.shutdown()
            torch._C._distributed_c10d._unregister_process_group(name)
            _ops.release_group(name)
        self._private.clear()
        _ops.release_group(self.name)


def _group_timeout(group: dist.ProcessGroup) -> datetime.timedelta:
    for device in (torch.device("cpu"), torch.device("cuda")):
        try:
            return group._get_backend(device).options._timeout
        except (RuntimeError, AttributeError):
            continue
    return _DEFAULT_TIMEOUT


_resources: dict[str, _GroupResources] = {}
_resources_lock = threading.Lock()
# Stores of groups built outside torch.distributed's registry (torchft's per-quorum groups, see
# pyparallel.fault_tolerance), by group name: the transports exchange host identities through them.
_adopted_stores: dict[str, dist.Store] = {}


def adopt(group: dist.ProcessGroup, store: dist.Store) -> None:
    """Lets the transports use ``group``, which ``torch.distributed`` does not know (it was not made by
    ``init_process_group`` / ``new_group``), with ``store`` as its rendezvous store. ``group`` must be
    registered under its name with c10d (our C++ collectives find groups by name); :func:`release`
    forgets it."""
    with _resources_lock:
        _adopted_stores[group.group_name] = store


def _store_of(group: dist.ProcessGroup) -> dist.Store:
    entry = dist.distributed_c10d._world.pg_map.get(group)
    if entry is not None:
        return entry[1]
    store = _adopted_stores.get(group.group_name)
    if store is None:
        raise ValueError(f"process group '{group.group_name}' was not made by torch.distributed "
                         "(init_process_group / new_group), so pyparallel cannot find its store; "
                         "register it with pyparallel.transport.adopt(group, store)")
    return store


def resources(group: dist.ProcessGroup) -> _GroupResources:
    with _resources_lock:
        res = _resources.get(group.group_name)
        if res is not None and res.group() is not group:  # a new group under an old name
            res.release()
            res = None
        if res is None:
            res = _resources[group.group_name] = _GroupResources(group)
        return res


@atexit.register
def _release_all() -> None:
    with _resources_lock:
        held = list(_resources.values())
        _resources.clear()
    for res in held:
        res.release()


def release_name(name: str) -> None:
    """Frees what pyparallel holds for the group named ``name`` (shared-memory mapping, inter-host groups,
    its failure state); called by :mod:`pyparallel.comm` when the group is released or gone."""
    with _resources_lock:
        res = _resources.pop(name, None)
        _adopted_stores.pop(name, None)
    if res is not None:
        res.release()
    else:
        _ops.release_group(name)


def check(transport: str, who: str) -> str:
    """Returns ``transport``, or raises a ValueError naming ``who`` if it is not one of TRANSPORTS."""
    if transport not in TRANSPORTS:
        raise ValueError(f"{who}: transport must be one of {', '.join(map(repr, TRANSPORTS))}, got {transport!r}")
    return transport


def choose(tensor: torch.Tensor, group: dist.ProcessGroup, transport: str) -> str:
    """The transport that runs ``tensor``'s collective on ``group`` (the same on every rank)."""
    check(transport, "all_reduce")
    if transport == "ring" or group.size() == 1:
        return "ring"
    if tensor.is_cuda:
        if transport != "auto":
            raise ValueError(f"transport={transport!r} needs CPU tensors (CUDA tensors use the ring over NCCL)")
        return "ring"
    layout = resources(group).layout
    if transport == "auto":
        if len(layout.hosts) == 1:
            return "shm"
        if layout.uniform and len(layout.hosts[0]) > 1:
            return "hierarchical"
        return "ring"
    if transport == "shm" and len(layout.hosts) != 1:
        raise ValueError(f"transport='shm' needs every rank of the group on one host; the group spans "
                         f"{len(layout.hosts)} hosts (ranks by host: {layout.hosts})")
    if transport == "hierarchical" and not layout.uniform:
        raise ValueError(f"transport='hierarchical' needs the same number of ranks on every host; ranks by "
                         f"host: {layout.hosts}")
    return transport
