"""Which transport carries a collective, and the per-group resources behind each (policy layer).

``"ring"``: our ring over the group's own point-to-point send/recv (Gloo, NCCL). ``"shm"``: every rank of
the group on one host reduces through one shared-memory segment (Note [Shared-memory collectives],
csrc/comm/shm.h). ``"hierarchical"``: shared memory inside each host, our ring across hosts among the
ranks of equal local index, shared memory again (Note [Hierarchical all-reduce]). ``"ipc"``: CUDA tensors
of processes on one node, reduced by one kernel per rank that reads the other ranks' device buffers
through CUDA IPC (Note [CUDA IPC all-reduce], csrc/comm/ipc.h). ``"auto"`` picks from facts every rank
shares (the group's host layout, the tensor's device, whether CUDA IPC could be set up on every rank),
so every rank picks the same:

* CUDA tensors, every rank on one host, CUDA IPC enabled on every rank (``PYPARALLEL_CUDA_IPC=1``, see
  below) and set up on every rank: ipc; otherwise ring (over NCCL when the group has it, else over CUDA
  IPC point-to-point, Note [CUDA IPC transport]: how several processes that share one GPU run the rings);
* every rank on one host (and more than one rank): shm;
* several hosts, more than one rank on some host, the same number on each: hierarchical;
* otherwise: ring.

Compression (int8, top-k) applies only where bytes cross hosts: exact inside a host, compressed across.

CUDA IPC has not yet run on a GPU (issue 12), so ``"auto"`` picks it only where ``PYPARALLEL_CUDA_IPC=1``
is set on every rank; ``transport="ipc"`` asks for it explicitly. Setting it up is a handshake through
the group's store on the first collective of each CUDA device: every rank allocates its buffer and
publishes its IPC handle (or why it could not), then opens every peer's (or says why not); one failure
anywhere and no rank uses it (``"auto"`` falls back to the ring, ``"ipc"`` raises the reason on every
rank). Buffer size: ``PYPARALLEL_IPC_BUFFER_BYTES`` (two staging sets and an outbox of that many bytes
per rank, default 8 MiB), grid: ``PYPARALLEL_IPC_BLOCKS`` (default: the device's multiprocessors, at most 64); the
smallest over the ranks is used, and at most a GPU's multiprocessors divided by the ranks that share it
(:func:`ipc_grid`: under MPS the blocks of every rank on a GPU must fit on it at once).

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

TRANSPORTS = ("auto", "ring", "shm", "hierarchical", "ipc")
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
# CUDA IPC: bytes per staging set (each rank allocates two, and an outbox as large), and the grid's bound.
DEFAULT_IPC_BUFFER_BYTES = 8 << 20
DEFAULT_IPC_MAX_BLOCKS = 64
IPC_MAX_RANKS = 8  # kIpcMaxRanks (csrc/comm/ipc.h)
IPC_MAX_BLOCKS = 128  # kIpcMaxBlocks


def cuda_ipc_enabled() -> bool:
    """Whether this process lets ``transport="auto"`` pick CUDA IPC (``PYPARALLEL_CUDA_IPC=1``)."""
    return os.environ.get("PYPARALLEL_CUDA_IPC") == "1"


def cuda_ipc_built() -> bool:
    """Whether this build of pyparallel has the CUDA IPC transport (CUDA builds only; its CatchAll kernels
    show up under CompositeImplicitAutograd)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("pyparallel::ipc_create", "CompositeImplicitAutograd")


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
    cuda_ipc_enabled: bool = False  # PYPARALLEL_CUDA_IPC=1 on every rank

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
        # shared_buffer calls so far: the same count on every local rank, also after a call that failed on
        # some ranks only, so it names each buffer alike everywhere (its id in the published locations)
        self.buffers = 0
        self.cross_group: str | None = None
        self.twin: str | None = None
        # CUDA IPC, by this rank's device index: (communicator name, None) once set up, or (None, why not).
        self.ipc: dict[int, tuple[str | None, str | None]] = {}
        self._lock = threading.Lock()
        self._private: list[tuple[str, dist.ProcessGroup]] = []  # our own groups: inter-host, twin

    def _exchange_layout(self) -> Layout:
        self.store.set(f"{self.prefix}/host/{self.rank}", f"{int(cuda_ipc_enabled())} {host_identity()}")
        keys = [f"{self.prefix}/host/{r}" for r in range(self.size)]
        self._wait(keys, "did not start their first pyparallel collective on it")
        hosts: dict[str, list[int]] = {}
        gates = []
        for r, key in enumerate(keys):
            gate, host = self.store.get(key).decode().split(" ", 1)
            gates.append(gate == "1")
            hosts.setdefault(host, []).append(r)
        return Layout(self.rank, list(hosts.values()), all(gates))

    def shared_memory(self) -> str:
        """Name of this host's shared-memory communicator (attached on first call)."""
        with self._lock:
            if self.shm_comm is None:
                self.shm_comm = self._attach_segment()
            return self.shm_comm

    def _attach_segment(self) -> str:
        comm = f"{self.prefix}/shm"
        local, timeout_s = self.layout.local_ranks, self.timeout.total_seconds()

        def attach(segment: str, slot: str | None) -> str:
            slot = slot or os.environ.get("PYPARALLEL_SHM_SLOT_BYTES", str(DEFAULT_SLOT_BYTES))
            create = self.layout.local_rank == 0
            _ops.shm_attach(comm, segment, self.layout.local_rank, len(local), local, int(slot), create, timeout_s)
            return slot

        self._share_segment(f"{self.prefix}/shm/{self.layout.host_index}", "segment", attach)
        return comm

    def shared_buffer(self, nbytes: int, keep_free: int = 0) -> torch.Tensor:
        """This rank's part (a uint8 tensor of at least ``nbytes``) of a new buffer segment that every
        local rank maps (Note [Registered buffers], csrc/comm/shm.h). Collective over the host's ranks.
        The host's first rank refuses it (so every local rank raises) unless ``keep_free`` bytes of
        /dev/shm would stay free besides it."""
        comm = self.shared_memory()
        with self._lock:
            serial, self.buffers = self.buffers, self.buffers + 1
        stride = max(4096, -(-nbytes // 4096) * 4096)
        part: list[torch.Tensor] = []

        def attach(segment: str, _: str | None) -> str:
            if keep_free and self.layout.local_rank == 0:
                fs = os.statvfs("/dev/shm")
                free = fs.f_bavail * fs.f_frsize
                if stride * len(self.layout.local_ranks) + keep_free > free:
                    raise RuntimeError(f"shm_empty: {stride * len(self.layout.local_ranks)} bytes of shared memory "
                                       f"would leave less than {keep_free} of the {free} free in /dev/shm")
            part.append(_ops.shm_map_buffer(comm, segment, stride, self.layout.local_rank == 0, serial))
            return str(stride)

        self._share_segment(f"{self.prefix}/shm/{self.layout.host_index}/buffer/{serial}", "buffer", attach)
        return part[0]

    def _share_segment(self, key: str, what: str, attach) -> None:
        """The host's first rank creates a segment under a fresh name with ``attach(name, None)``, which
        returns a parameter for the others; they map it with ``attach(name, parameter)``; the creator
        unlinks it once every local rank has mapped it: from then on nothing of ours is in /dev/shm,
        whatever happens to the processes. A rank that cannot map it says why in the store, so that every
        local rank raises (naming it) instead of the others going on with a segment it lacks."""
        layout, timeout_s = self.layout, self.timeout.total_seconds()
        local = layout.local_ranks
        if layout.local_rank == 0:
            segment = f"/pyparallel-{os.getpid()}-{secrets.token_hex(8)}"  # unique per job and group
            try:
                param = attach(segment, None)
            except RuntimeError as exc:
                # attach may have created (and reserved) the segment before failing, e.g. to map it
                _ops.shm_unlink(segment)
                self.store.set(f"{key}/segment", f"! {_first_line(exc)}")  # the others raise too, now
                raise
            try:
                self.store.set(f"{key}/segment", f"{segment} {param}")
                self._wait_mapped(key, what, segment)
            finally:
                _ops.shm_unlink(segment)
        else:
            self._wait([f"{key}/segment"], f"(this host's first rank) did not create the shared-memory {what}",
                       ranks=[local[0]])
            segment, param = self.store.get(f"{key}/segment").decode().split(" ", 1)
            if segment == "!":
                raise RuntimeError(f"shared memory: rank {local[0]} (this host's first rank) could not create the "
                                   f"{what}: {param}")
            try:
                attach(segment, param)
            except RuntimeError as exc:
                self.store.set(f"{key}/failed", f"rank {self.rank}: {_first_line(exc)}")
                raise
            finally:
                self.store.set(f"{key}/mapped/{layout.local_rank}", "1")  # who, for the timeout's message
                self.store.add(f"{key}/mapped", 1)
            self._wait_mapped(key, what, segment)

    def _wait_mapped(self, key: str, what: str, segment: str) -> None:
        local, timeout_s = self.layout.local_ranks, self.timeout.total_seconds()
        deadline = time.monotonic() + timeout_s
        while self.store.add(f"{key}/mapped", 0) < len(local) - 1:
            if time.monotonic() > deadline:
                try:
                    missing = [local[q] for q in range(1, len(local)) if not self.store.check([f"{key}/mapped/{q}"])]
                except RuntimeError:  # the store is gone too
                    missing = local[1:]
                raise RuntimeError(f"shared memory: ranks {missing} of this host did not map {what} "
                                   f"{segment} within the group's timeout ({timeout_s:.0f} s)")
            time.sleep(0.001)
        if self.store.check([f"{key}/failed"]):
            raise RuntimeError(f"shared memory: a rank of this host could not map {what} {segment}: "
                               f"{self.store.get(f'{key}/failed').decode()}")

    def _private_gloo_group(self, name: str, members: list[int]) -> dist.ProcessGroup:
        """A Gloo group of ours over ``members`` (ranks of this group), built from the group's store and
        registered by name for the C++ collectives: no collective on the caller's group, and no torch group
        counter that the caller's own new_group calls could put out of step."""
        store = dist.PrefixStore(name + "/", self.store)
        me = members.index(self.rank)
        try:
            backend = dist.ProcessGroupGloo(store, me, len(members), self.timeout)
        except RuntimeError as exc:  # torch says only "Wait timeout": say what and whom we waited for
            raise RuntimeError(f"pyparallel: ranks {members} of process group '{self.name}' did not all set up its private "
                               f"Gloo group '{name}' within the group's timeout ({self.timeout.total_seconds():.0f} s): "
                               f"did every rank call the same collective with the same transport? ({_first_line(exc)})"
                               ) from exc
        pg = dist.ProcessGroup(store, me, len(members))
        pg._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, backend)
        pg._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
        pg._set_group_name(name)
        torch._C._distributed_c10d._register_process_group(name, pg)
        self._private.append((name, pg))  # keeps it alive until release()
        return pg

    def cuda_ipc(self, device: torch.device) -> tuple[str | None, str | None]:
        """(name of this group's CUDA IPC communicator on ``device``, None), set up on first call (a
        handshake through the store that every rank makes at the same collective), or (None, why it
        cannot be used), the same answer on every rank."""
        with self._lock:
            index = torch.device(device).index
            if index not in self.ipc:
                self.ipc[index] = self._attach_ipc(index, len(self.ipc))
            return self.ipc[index]

    def _gather(self, key: str, value: str) -> list[str]:
        """Every rank's ``value`` for ``key``, by rank (through the store)."""
        self.store.set(f"{key}/{self.rank}", value)
        keys = [f"{key}/{r}" for r in range(self.size)]
        self._wait(keys, "did not set up CUDA IPC")
        return [self.store.get(k).decode() for k in keys]

    def _wait(self, keys: list[str], what: str, ranks: list[int] | None = None) -> None:
        """store.wait(keys), ``keys[i]`` being set by rank ``ranks[i]`` (default: rank i). On timeout, an error
        that names the ranks that did not set theirs and what they did not do, instead of torch's bare
        "Wait timeout": a rank that calls another collective, or the same one with another transport, ends
        up here."""
        try:
            self.store.wait(keys, self.timeout)
        except RuntimeError as exc:  # torch's DistStoreError
            ranks = list(range(len(keys))) if ranks is None else ranks
            try:
                missing = [r for r, k in zip(ranks, keys) if not self.store.check([k])]
            except RuntimeError:
                missing = ranks
            raise RuntimeError(f"pyparallel: rank(s) {missing} of process group '{self.name}' {what} within the group's "
                               f"timeout ({self.timeout.total_seconds():.0f} s): did every rank call the same collective "
                               f"with the same transport?") from exc

    def _attach_ipc(self, device: int, serial: int) -> tuple[str | None, str | None]:
        layout, timeout_s = self.layout, self.timeout.total_seconds()
        if len(layout.hosts) != 1:
            return None, (f"CUDA IPC needs every rank of the group on one node; the group spans {len(layout.hosts)} "
                          f"hosts (ranks by host: {layout.hosts})")
        if self.size > IPC_MAX_RANKS:
            return None, f"CUDA IPC supports at most {IPC_MAX_RANKS} ranks, the group has {self.size}"
        comm = key = f"{self.prefix}/ipc{serial}"  # the communicator's name, and its keys in the store
        # Round 1: allocate and export (or say why not), with what the others must agree on. Whatever goes
        # wrong is published, never raised here: the other ranks would wait for this one until the timeout.
        mine = "fail pyparallel was built without CUDA"
        created = False
        if cuda_ipc_built():
            try:
                capacity = int(os.environ.get("PYPARALLEL_IPC_BUFFER_BYTES", DEFAULT_IPC_BUFFER_BYTES))
                sms = torch.cuda.get_device_properties(device).multi_processor_count
                blocks = int(os.environ.get("PYPARALLEL_IPC_BLOCKS", min(sms, DEFAULT_IPC_MAX_BLOCKS)))
                handle = _ops.ipc_create(comm, device, self.rank, self.size, list(range(self.size)), capacity,
                                         timeout_s)
                created = True
                mine = f"ok {handle} {os.getpid()} {capacity} {min(blocks, sms, IPC_MAX_BLOCKS)} {sms}"
            except (RuntimeError, ValueError, AssertionError) as exc:  # AssertionError: torch without CUDA
                mine = "fail " + _first_line(exc)
        everyone = self._gather(f"{key}/created", mine)
        why = _first_failure(everyone, "could not set up its CUDA IPC buffer")
        if why is None:
            parts = [e.split() for e in everyone]
            handles = " ".join(p[1] for p in parts)
            pids = [int(p[2]) for p in parts]
            capacity = min(int(p[3]) for p in parts)
            blocks = ipc_grid(parts)
            try:
                _ops.ipc_open(comm, handles, pids, capacity, blocks)
                mine = "ok"
            except (RuntimeError, ValueError) as exc:
                mine = "fail " + _first_line(exc)
            # Round 2: everyone could open everyone's buffer.
            why = _first_failure(self._gather(f"{key}/opened", mine), "could not open the other ranks' CUDA IPC buffers")
        if why is not None:
            if created:
                _ops.ipc_detach(comm)
            return None, why
        return comm, None

    def _close_ipc(self, comm: str) -> None:
        """Frees this rank's CUDA IPC buffer, once every rank's last kernel is done with it: each rank arrives
        here only after its own last collective returned (the host waits for its kernel), so a store barrier
        is enough. Bounded (a dead peer, or a store that is gone, must not hold up the release)."""
        key = f"{comm}/closing"
        try:
            self.store.add(key, 1)
            deadline = time.monotonic() + min(self.timeout.total_seconds(), 10.0)
            while self.store.add(key, 0) < self.size and time.monotonic() < deadline:
                time.sleep(0.001)
        except (RuntimeError, OSError):  # the store is gone: its group's processes are going away too
            pass
        _ops.ipc_detach(comm)

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
        for comm, _ in self.ipc.values():
            if comm is not None:
                self._close_ipc(comm)
        for name, pg in self._private:
            pg.shutdown()
            torch._C._distributed_c10d._unregister_process_group(name)
            _ops.release_group(name)
        self._private.clear()
        _ops.release_group(self.name)


def ipc_grid(answers: list[list[str]]) -> int:
    """The grid of the CUDA IPC kernels, the same on every rank, from every rank's round-1 answer
    ``["ok", "<handle>:<PCI bus id>", pid, capacity, blocks, SMs]``: the smallest grid asked for, and at most
    a GPU's SMs divided by the ranks that share that GPU.

    Why the second bound: block b of every rank spins until block b of every other rank has arrived (Note
    [CUDA IPC all-reduce]), so all the blocks of the ranks on one GPU must be able to run at once. Under
    MPS the kernels of processes sharing a GPU run side by side and are not time-sliced, and a block of
    ours takes a whole SM (512 threads x 128 registers), so with more blocks than SMs the blocks that got
    an SM would wait for blocks that never get one, until the timeout: 2 ranks x 64 blocks on a 114-SM
    H100 PCIe, 3 ranks on a 132-SM H100 SXM. (Time-sliced processes, the default, each get the whole GPU
    in turn; the bound costs them nothing at 2 ranks per GPU.)"""
    blocks = min(int(a[4]) for a in answers)
    sharing: dict[str, list[int]] = {}
    for a in answers:
        sharing.setdefault(a[1].partition(":")[2], []).append(int(a[5]))
    fit = min(min(sms) // len(sms) for sms in sharing.values())
    return max(1, min(blocks, fit))


def _first_line(exc: BaseException) -> str:
    """An exception's message without the C++ backtrace that torch appends, on one line."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _first_failure(answers: list[str], what: str) -> str | None:
    """None if every rank answered "ok ...", else the first failing rank's reason (the same on every rank)."""
    for r, answer in enumerate(answers):
        status, _, why = answer.partition(" ")
        if status != "ok":
            return f"rank {r} {what}: {why}"
    return None


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


def _has_nccl(group: dist.ProcessGroup) -> bool:
    try:
        return "nccl" in str(dist.get_backend(group)).lower()
    except (RuntimeError, ValueError):
        return False


def ring_group_name(tensor: torch.Tensor, group: dist.ProcessGroup) -> str:
    """The name the ring collectives run on for ``tensor``: the group itself (Gloo for CPU tensors, NCCL for
    CUDA tensors), or, for CUDA tensors on a group without NCCL (a Gloo group of processes that may share
    one GPU), its CUDA IPC communicator, whose point-to-point exchanges carry the ring (every rank on one
    node). The same answer on every rank."""
    if not tensor.is_cuda or group.size() == 1 or _has_nccl(group):
        return group.group_name
    comm, why = resources(group).cuda_ipc(tensor.device)
    if comm is None:
        raise RuntimeError(f"all_reduce: CUDA tensors on a group without NCCL ({dist.get_backend(group)}) go through "
                           f"CUDA IPC between its ranks, which cannot be used: {why}")
    return comm


def choose(tensor: torch.Tensor, group: dist.ProcessGroup, transport: str) -> str:
    """The transport that runs ``tensor``'s collective on ``group`` (the same on every rank)."""
    check(transport, "all_reduce")
    if transport == "ipc" and not tensor.is_cuda:
        raise ValueError(f"transport='ipc' needs CUDA tensors, got a tensor on {tensor.device}")
    if transport == "ring" or group.size() == 1:
        return "ring"
    if tensor.is_cuda:
        if transport not in ("auto", "ipc"):
            raise ValueError(f"transport={transport!r} needs CPU tensors (CUDA tensors use 'ipc' or the ring over NCCL)")
        res = resources(group)
        if transport == "auto" and not (res.layout.cuda_ipc_enabled and len(res.layout.hosts) == 1):
            return "ring"
        comm, why = res.cuda_ipc(tensor.device)
        if comm is not None:
            return "ipc"
        if transport == "ipc":
            raise RuntimeError(f"transport='ipc': {why}")
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
