"""Fault-tolerant data parallelism on torchft: pyparallel's hooks and transports inside torchft's quorums.

torchft (a PyTorch project) keeps training going when a replica dies: a lighthouse server forms a quorum
of live replicas before every step, each replica's :class:`torchft.Manager` reconfigures a process group
over the quorum, a step in which a collective failed is discarded (the optimizer does not step), and a
replica that (re)joins heals by fetching a live peer's state over HTTP. This module plugs our pieces in:

* :class:`ManagedGroup`: torchft's reconfigurable Gloo group. Every quorum gets a new plain c10d group
  (torchft's wrapper is a Python object that our C++ collectives cannot use); we register that group
  under a name of its own, so ``pyparallel.all_reduce`` and the hooks run on it with any transport, and
  release everything pyparallel held for the previous quorum's group (worker thread, shared memory,
  collective counters, failure state) when torchft replaces it.
* :class:`ReplicaGroup`: replicas of several ranks (processes on one host, each with a manager of its
  own): the hooks reduce exactly inside the replica through shared memory and with their compression
  across replicas, on each local rank's managed group (Note [Replica groups of several ranks]).
* :func:`managed_hook` / :class:`ManagedHookState`: any DDP-style hook of :mod:`pyparallel.hooks`
  (int8, top-k, ...) run on the quorum's current group; an error (a dead peer, a timeout) is reported
  to the manager, so the step is discarded instead of crashing the replica.
* :class:`TrainingState`: what a healing replica receives from a live peer: the model, the optimizer,
  the hook state (counters, iteration, warm-up progress, PowerSGD's Qs and generator, ...) and the
  user's extras. Error feedback (top-k's residuals, PowerSGD's errors) is a per-replica memory of
  gradient that replica did not send, so a healed replica starts it at zero rather than with a copy of
  its donor's (a copy would send the donor's unsent gradient twice); everything else is copied.
* :class:`Optimizer`: torchft's optimizer wrapper, plus: the hook state of a discarded step is put back
  as it was when the step began (Note [Discarded steps]).
* :func:`make_manager`: a Manager with the settings this module relies on (synchronous quorum: a
  healing replica loads its donor's state before the step's forward pass and takes part in the step,
  so every replica runs the same hooks with the same hook state).

Example (one process per replica; ``torchft_lighthouse --min_replicas 1`` running at ``addr``)::

    group = fault_tolerance.ManagedGroup(timeout=timedelta(seconds=10))
    training = fault_tolerance.TrainingState(net, inner_optimizer, hooks.Int8State())
    manager = fault_tolerance.make_manager(group, training, lighthouse=addr, replica_id="replica0")
    model = fault_tolerance.data_parallel(manager, group, net, hooks.int8_hook, training.hook_state)
    optimizer = fault_tolerance.Optimizer(manager, inner_optimizer, training)    # torchft's, + rollback
    while manager.current_step() < total_steps:
        optimizer.zero_grad()                 # quorum; reconfigures the group; heals this replica if behind
        rank, n = manager.participating_rank(), manager.num_participants()
        loss_fn(model(x[rank::n]), y[rank::n]).backward()
        optimizer.step()                      # steps only if every replica's collectives succeeded, else
                                              # puts the hook state back as it was before the step
"""

# No `from __future__ import annotations`: DDP's register_comm_hook checks managed_hook's annotation objects.
import datetime
import socket
import threading

import torch
import torch.distributed as dist
from torch import nn

from . import comm, hooks
from . import transport as _transport
from .data_parallel import DataParallel
from .reference import shm_regions

try:
    import torchft
    from torchft.process_group import ProcessGroupDummy, ProcessGroupGloo
except ImportError as exc:  # torchft is optional: only this module needs it
    raise ImportError(f"pyparallel.fault_tolerance needs torchft ({exc}); `pip install torchft`") from exc


class ManagedGroup(ProcessGroupGloo):
    """torchft's reconfigurable Gloo process group, usable by pyparallel's collectives.

    torchft calls :meth:`configure` on every quorum change; the group of the new quorum is a plain c10d
    ``ProcessGroup`` with a Gloo backend. We name it after the quorum (``pyparallel-ft/quorum<id>/rank<r>``,
    the same on every member), register it with c10d (our C++ ops find groups by name) and with
    :mod:`pyparallel.transport` (with its store, for the shared-memory transport), and release the
    previous quorum's group first, so no collective counter, failure mark, worker thread or shared-memory
    segment of a dead quorum leaks into the next one.

    With several ranks per replica (``replica_group``: the c10d group of this replica's L processes),
    torchft gives each local rank l a manager of its own, and this group of local rank l connects local
    rank l of every replica in the quorum; the hooks then run on a :class:`ReplicaGroup` made of the two
    (:meth:`hook_group`): exact inside the replica, compressed across replicas.

    Args:
        timeout: timeout of the group's operations and store (a dead peer that does not close its
            connections is noticed after this long).
        replica_group: this replica's own group (every rank on this host), or None for one rank per
            replica.
    """

    def __init__(self, timeout: datetime.timedelta = datetime.timedelta(seconds=60),
                 replica_group: dist.ProcessGroup | None = None):
        super().__init__(timeout=timeout)
        self._current: dist.ProcessGroup | None = None
        self._hook_group: ReplicaGroup | None = None
        self._current_lock = threading.Lock()
        self.generations = 0  # groups created so far (one per quorum change)
        self.replica_group = replica_group if replica_group is not None and replica_group.size() > 1 else None

    @property
    def ranks_per_replica(self) -> int:
        return 1 if self.replica_group is None else self.replica_group.size()

    def _create_pg(self, store: dist.Store, rank: int, world_size: int) -> dist.ProcessGroup:
        pg = super()._create_pg(store, rank, world_size)
        # The same name on every member (the transports key their store exchanges by it); unique in this
        # process as long as the previous group is released first, which configure() does.
        name = f"pyparallel-ft/quorum{self._quorum_id}/rank{self._group_rank or 0}"
        pg._set_group_name(name)
        torch._C._distributed_c10d._register_process_group(name, pg)
        _transport.adopt(pg, store)
        hook_group = ReplicaGroup(self.replica_group, pg) if self.replica_group is not None else None
        with self._current_lock:
            self._current, self._hook_group = pg, hook_group
            self.generations += 1
        return pg

    def configure(self, *args, **kwargs) -> None:
        self._release_current()  # before torchft drops it: our worker thread may still hold its name
        super().configure(*args, **kwargs)

    def current(self) -> dist.ProcessGroup:
        """The plain c10d group of the current quorum (pass it to ``pyparallel.all_reduce``)."""
        with self._current_lock:
            if self._current is None:
                raise RuntimeError("ManagedGroup: no quorum yet (the manager configures the group in start_quorum)")
            return self._current

    def hook_group(self):
        """What the hooks reduce on: the quorum's group, or with several ranks per replica the
        :class:`ReplicaGroup` of this replica's group and the quorum's group."""
        with self._current_lock:
            if self._current is None:
                raise RuntimeError("ManagedGroup: no quorum yet (the manager configures the group in start_quorum)")
            return self._hook_group if self._hook_group is not None else self._current

    def _release_current(self) -> None:
        with self._current_lock:
            pg, self._current = self._current, None
            hook_group, self._hook_group = self._hook_group, None
        if hook_group is not None:  # first: its collectives run on the quorum's group
            comm.release(hook_group)
        if pg is not None:
            comm.release(pg)  # waits for our queued collectives on it (each bounded by the group's timeout)
            torch._C._distributed_c10d._unregister_process_group(pg.group_name)

    def shutdown(self) -> None:
        self._release_current()
        super().shutdown()


# Note [Replica groups of several ranks]
# A replica of L ranks (processes on one host) reduces hierarchically: the exact sum inside the replica
# through shared memory, each local rank l all-reduces region l of it across replicas on its managed
# group (local rank l of every replica, torchft's group of manager l) with the hook's compression, and
# the replica's ranks gather the regions. This is Note [Hierarchical all-reduce] with replicas for
# hosts, and the bits are the same: the regions are the shared-memory regions, and top-k sends the same
# fraction of each region, so pyparallel.reference.hierarchical_all_reduce (hosts = replicas, one piece)
# models it exactly. It is composed here, in Python, rather than by the C++ hierarchical op (which could
# take this replica's shared-memory segment and the managed group by name) for the failure path: when
# the cross-replica step fails on some local ranks only (a replica died after finishing the exchange of
# one region, before another's), the C++ op raises on those ranks and skips the gather, so their
# siblings wait in the gather until the timeout and the replica's shared-memory communicator is failed
# for good (Note [Shared-memory collectives]): every later step would fail until the replica restarts.
# Here every local rank always runs the same shared-memory collectives, the gather carries a failure
# count, and a cross-replica failure anywhere raises on every rank of the replica (each reports to its
# manager, and should_commit discards the step on all of them). The price: the exact sum is a full
# shared-memory all-reduce and the gather another (the C++ op does half of each), on this host's memory.

class ReplicaGroup:
    """Every rank of the quorum's replicas, as :mod:`pyparallel.comm` and the hooks see them
    (Note [Replica groups of several ranks]): ``all_reduce(t, group=ReplicaGroup(...))`` sums exactly
    inside this replica and with the given compression across replicas; bitwise identical on every rank
    of every replica.

    Args:
        replica: this replica's own group (its L ranks, on one host: shared memory).
        cross: local rank l of every replica (torchft's group of this rank's manager).
    """

    def __init__(self, replica: dist.ProcessGroup, cross: dist.ProcessGroup):
        self.replica, self.cross = replica, cross
        self.group_name = f"{cross.group_name}+replica"  # its own worker thread in pyparallel.comm

    def size(self) -> int:
        return self.replica.size() * self.cross.size()

    def rank(self) -> int:
        return self.cross.rank() * self.replica.size() + self.replica.rank()

    def pyparallel_all_reduce(self, tensor: torch.Tensor, average: bool, compression, transport: str) -> int:
        """Called by :func:`pyparallel.comm.collective` on the group's worker thread; returns the bytes
        this rank sent across replicas."""
        if transport not in ("auto", "hierarchical"):
            raise ValueError(f"ReplicaGroup: replicas of {self.replica.size()} ranks reduce hierarchically (shared "
                             f"memory inside a replica, the compression across replicas): transport must be "
                             f"'auto' or 'hierarchical', got {transport!r}")
        if tensor.is_cuda:
            raise ValueError("ReplicaGroup: CPU tensors only (the replica's ranks reduce through shared memory)")
        code, params = comm._kind(compression)
        flat = tensor.view(-1) if tensor.is_contiguous() else tensor.contiguous().view(-1)
        numel, local, l = flat.numel(), self.replica.size(), self.replica.rank()
        # The replica's steps go through all_reduce, which orders them with any other collective of this
        # process on the replica's group (its worker's lock); the sum is exact, on every local rank.
        comm.all_reduce(flat, group=self.replica, transport="shm")
        region = shm_regions(numel, local)[l]
        mine = flat[region]
        if code == 2:  # top-k: the same fraction of the region as of the tensor, as the C++ op sends
            m = region.stop - region.start
            k = min(m, -(-params.k_for(numel) * m // numel)) if numel else 0
            residual = params.residual.view(-1)[region] if params.residual is not None else None
            compression = comm.Topk(k=k, residual=residual)
        sent, error = 0, None
        try:
            sent = comm.collective(mine, self.cross, False, compression, "ring")
            if average:
                mine.div_(self.size())
        except Exception as exc:  # noqa: BLE001 (told to the siblings, raised below on every local rank)
            error = exc
        # The gather: every region zero but this rank's, summed exactly (x + 0 == x), and the failures.
        flat[:region.start].zero_()
        flat[region.stop:].zero_()
        failed = torch.tensor([0.0 if error is None else 1.0])
        comm.all_reduce(failed, group=self.replica, transport="shm")
        comm.all_reduce(flat, group=self.replica, transport="shm")
        if failed.item():
            if error is not None:
                raise error
            raise RuntimeError(f"ReplicaGroup: the cross-replica all-reduce failed on {int(failed.item())} other "
                               f"rank(s) of this replica (their managers report it)")
        if flat.data_ptr() != tensor.data_ptr():
            tensor.copy_(flat.view(tensor.shape))
        return sent


class ManagedHookState:
    """State of :func:`managed_hook`: the manager, the group it configures, and the hook it runs.

    Args:
        manager: the replica's :class:`torchft.Manager`.
        group: the :class:`ManagedGroup` the manager was built with.
        hook: a hook with DDP's signature, e.g. :func:`pyparallel.hooks.int8_hook`.
        hook_state: its state; its ``process_group`` is set to the quorum's group before every call.
    """

    __slots__ = ("manager", "group", "hook", "hook_state")

    def __init__(self, manager: torchft.Manager, group: ManagedGroup, hook, hook_state):
        if not isinstance(group, ManagedGroup):
            raise TypeError(f"ManagedHookState: group must be a pyparallel.fault_tolerance.ManagedGroup, got "
                            f"{type(group).__name__}")
        self.manager, self.group, self.hook, self.hook_state = manager, group, hook, hook_state


def _completed(tensor: torch.Tensor) -> torch.futures.Future:
    fut = torch.futures.Future()
    fut.set_result(tensor)
    return fut


def managed_hook(state: ManagedHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Runs ``state.hook`` on the quorum's current group, averaging over the replicas that take part.

    Errors never propagate: they are reported to the manager (which then discards the step in
    ``should_commit``) and the future completes with the bucket unchanged. Once the step has failed,
    later buckets skip communication altogether, as torchft's own ``Manager.allreduce`` does.
    """
    manager, buffer = state.manager, bucket.buffer()
    if manager.errored():
        return _completed(buffer)
    try:
        manager.wait_quorum()
        participants = manager.num_participants()
        replicas = state.group.current().size()  # one member per replica in the quorum
        if not manager.is_participating():  # a spare (FIXED_WITH_SPARES): contributes nothing
            buffer.zero_()
        state.hook_state.process_group = state.group.hook_group()
        fut = state.hook(state.hook_state, bucket)
    except Exception as exc:  # noqa: BLE001 (every failure of the step goes to the manager)
        manager.report_error(exc)
        return _completed(buffer)
    if participants != replicas:
        # The hook averaged over every replica of the group, non-participants' zeros included.
        scale = replicas / participants

        def rescale(f: torch.futures.Future) -> torch.Tensor:
            return f.value().mul_(scale)

        fut = fut.then(rescale)
    return manager.wrap_future(fut, buffer)


def data_parallel(manager: torchft.Manager, group: ManagedGroup, module: nn.Module, hook, hook_state,
                  wrapper: str = "pyparallel", bucket_cap_mb: float = 25) -> nn.Module:
    """``module`` wrapped so that backward averages gradients over the quorum with ``hook``.

    Args:
        wrapper: ``"pyparallel"`` (:class:`pyparallel.DataParallel` over this process's default group,
            which holds this replica's ranks: one rank per replica means a group of one, several the
            ``replica_group`` of the ManagedGroup) or ``"torch"``
            (torch's DistributedDataParallel, built as torchft builds it: a dummy group for its start-up
            broadcast, and ``find_unused_parameters=True``, which stops DDP from rebuilding its buckets
            after the first step, so the bucket layout, and with it the hook state keyed by bucket, is
            the same on a healed replica as on its peers).
    """
    state = ManagedHookState(manager, group, hook, hook_state)
    if isinstance(hook_state, hooks.HookState) and not hook_state.model_registered:
        hook_state.register_model(module)  # per-parameter state keyed by name (Note [Hook state keyed by parameter])
    if wrapper == "pyparallel":
        if not dist.is_initialized():
            raise RuntimeError("fault_tolerance.data_parallel: initialize this replica's own process group first (its "
                               "ranks only, e.g. dist.init_process_group('gloo', store=..., rank=0, world_size=1))")
        if dist.get_world_size() != group.ranks_per_replica:
            raise ValueError(f"fault_tolerance.data_parallel: the default group of this process has "
                             f"{dist.get_world_size()} ranks, but the ManagedGroup was built for replicas of "
                             f"{group.ranks_per_replica} (pass ManagedGroup(replica_group=...) the replica's group)")
        # Its start-up broadcast runs on the default group: the replica's ranks start from local rank 0's model.
        return DataParallel(module, bucket_cap_mb=bucket_cap_mb, comm_hook=managed_hook, hook_state=state)
    if wrapper == "torch":
        ddp = nn.parallel.DistributedDataParallel(module, process_group=ProcessGroupDummy(0, 1),
                                                  find_unused_parameters=True, bucket_cap_mb=bucket_cap_mb)
        ddp.register_comm_hook(state, managed_hook)
        return ddp
    raise ValueError(f"fault_tolerance.data_parallel: wrapper must be 'pyparallel' or 'torch', got {wrapper!r}")


def detached_copy(tree):
    """``tree`` (dicts, lists, tuples) with every tensor replaced by a detached copy."""
    from torch.utils._pytree import tree_map_only

    return tree_map_only(torch.Tensor, lambda t: t.detach().clone(), tree)


class TrainingState:
    """Everything a healing replica needs from a live peer: registered with the manager by
    :func:`make_manager`, sent by a donor at quorum time and loaded by the healing replica before its
    first step.

    Args:
        module: the model.
        optimizer: the inner optimizer (not torchft's wrapper).
        hook_state: the communication hook's state (:mod:`pyparallel.hooks`); its ``state_dict()`` is
            copied (top-k's iteration, PowerSGD's Qs, iteration and generator, counters), then the healed
            replica forgets the error feedback (``reset_error_feedback()``: top-k's residuals, PowerSGD's
            errors): it holds gradient that this replica's own earlier steps did not send.
        extra: optional ``(state_dict, load_state_dict)`` pair for anything else (data position, RNG).
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, hook_state=None, extra=None):
        self.module, self.optimizer, self.hook_state, self.extra = module, optimizer, hook_state, extra
        self.heals = 0

    def state_dict(self) -> dict:
        """A copy (:func:`detached_copy`): torchft serves a donor's state from memory while the donor goes
        on (with LocalSGD / DiLoCo, through a whole round before its next should_commit)."""
        out = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.hook_state is not None:
            out["hook"] = self.hook_state.state_dict()
        if self.extra is not None:
            out["extra"] = self.extra[0]()
        return detached_copy(out)

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.hook_state is not None:
            if "hook" not in state:
                raise ValueError("TrainingState: the donor sent no hook state, but this replica has one")
            self.hook_state.load_state_dict(state["hook"])
        for part in (self.optimizer, self.hook_state):  # the hook's, and DiLoCo's / LocalSGD's top-k residual
            reset = getattr(part, "reset_error_feedback", None)
            if reset is not None:
                reset()
        if self.extra is not None:
            self.extra[1](state["extra"])
        self.heals += 1

    def hook_snapshot(self):
        """The hook state now (a copy), for :meth:`restore_hook` if the step is discarded."""
        return None if self.hook_state is None else self.hook_state.state_dict()

    def restore_hook(self, snapshot) -> None:
        """Puts the hook state back to ``snapshot`` (Note [Discarded steps]); ``bytes_sent`` keeps counting:
        the discarded step's bytes did go on the wire."""
        if snapshot is None:
            return
        sent = getattr(self.hook_state, "bytes_sent", None)
        self.hook_state.load_state_dict(snapshot)
        if sent is not None:
            self.hook_state.bytes_sent = sent


# Note [Discarded steps]
# torchft discards a step in which a collective failed on some replica (should_commit is False): the
# optimizer does not step. The hook state has moved on by then: top-k's residual took in this step's
# unsent gradient and its iteration advanced, PowerSGD's errors, Qs, iteration and generator changed
# (and after a failure between its two all-reduces, its Qs are this replica's own partial values). Left
# so, the retried step starts from another state than the step it replaces, and the replicas' Qs may
# differ. Optimizer keeps a copy of the hook state from the start of every step (after the quorum, so
# after any heal) and puts it back when the step is discarded: a discarded step leaves no trace but the
# bytes it sent. The price is one copy of the hook state per step (state_dict(): for top-k and PowerSGD
# a copy of their error feedback, the size of the model; for int8 two counters).

class Optimizer(torchft.Optimizer):
    """torchft's optimizer wrapper (``zero_grad()`` starts the step's quorum, which heals this replica if
    it is behind; ``step()`` steps the inner optimizer only if ``manager.should_commit()``) that also
    rolls the hook state back when the step is discarded (Note [Discarded steps]).

    Args:
        manager: the replica's :class:`torchft.Manager`.
        optim: the inner optimizer.
        training: the :class:`TrainingState` registered with the manager (its ``hook_state`` is rolled back).

    ``committed``: whether the last ``step()`` committed.
    """

    def __init__(self, manager: torchft.Manager, optim: torch.optim.Optimizer, training: TrainingState):
        if not isinstance(training, TrainingState):
            raise TypeError(f"fault_tolerance.Optimizer: training must be a TrainingState, got {type(training).__name__}")
        super().__init__(manager, optim)
        self.training = training
        self.committed: bool | None = None
        self._snapshot = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)  # the quorum; a heal loads the donor's hook state before the copy
        self._snapshot = self.training.hook_snapshot()

    def step(self, closure=None) -> None:
        if closure is not None:
            raise ValueError("fault_tolerance.Optimizer: closures are not supported (torchft's wrapper neither)")
        self.committed = self.manager.should_commit()
        if self.committed:
            self.optim.step()
        else:
            self.training.restore_hook(self._snapshot)
        self._snapshot = None


def make_manager(group: ManagedGroup, training: TrainingState, *, lighthouse: str, replica_id: str,
                 min_replicas: int = 1, timeout: datetime.timedelta = datetime.timedelta(seconds=60),
                 quorum_timeout: datetime.timedelta | None = None, store: dist.TCPStore | None = None,
                 store_host: str | None = None, hostname: str | None = None, init_sync: bool = True,
                 max_failed_steps: int | None = 10, rank: int = 0, world_size: int = 1) -> torchft.Manager:
    """A :class:`torchft.Manager` for local rank ``rank`` of this replica (of ``world_size`` ranks), with
    ``training`` as the state a healing peer gets (local rank l heals from local rank l of its donor).

    Args:
        group: the replica's :class:`ManagedGroup`.
        lighthouse: the lighthouse's address (``http://host:port``).
        replica_id: a name for this replica, the same across its restarts (torchft appends a uuid).
        min_replicas: steps commit only with at least this many replicas in the quorum.
        timeout: collectives, commit votes and checkpoint transfers fail after this long.
        quorum_timeout: how long a quorum may take (default: ``timeout``).
        store: this replica's TCPStore (default: a new one on a free port, hosted here; with several
            ranks per replica, local rank 0 hosts it and every rank passes it). The quorum's process
            groups rendezvous through one replica's store; local rank 0's manager runs the replica's
            manager server, and the replica's managers agree in should_commit.
        store_host: the name other replicas reach ``store`` by (default: this host's name).
        hostname: the name other replicas and the lighthouse reach this replica's manager server by
            (default: this host's name; give an address when replicas live in network namespaces of
            their own, where the host's name does not lead to this replica).
        init_sync: heal every replica from one peer at step 0 (keep it unless every replica builds
            bitwise-identical initial state).
        max_failed_steps: raise (ending the replica, which its launcher may restart) after this many
            discarded steps in a row; None retries forever.

    The quorum is synchronous (``use_async_quorum=False``): a replica that must heal loads its donor's
    state before the forward pass and takes part in that very step, so its hook runs with the same hook
    state as its peers' (with torchft's asynchronous quorum a healing replica sits out a step that its
    hook state would then miss).
    """
    store_host = store_host or socket.gethostname()
    if store is None:
        if world_size != 1:
            raise ValueError("make_manager: with several ranks per replica, pass the replica's store (hosted by "
                             "local rank 0)")
        store = dist.TCPStore(store_host, 0, is_master=True, wait_for_workers=False, timeout=timeout)
    manager = torchft.Manager(
        pg=group, load_state_dict=None, state_dict=None, min_replica_size=min_replicas,
        use_async_quorum=False, timeout=timeout, quorum_timeout=quorum_timeout or timeout,
        connect_timeout=timeout, rank=rank, world_size=world_size, store_addr=store_host,
        store_port=store.port, lighthouse_addr=lighthouse, replica_id=replica_id, init_sync=init_sync,
        max_retries=max_failed_steps, hostname=hostname or socket.gethostname())
    manager.register_state_dict_fn("pyparallel", training.load_state_dict, training.state_dict)
    manager._pyparallel_store = store  # the manager's servers talk to it: it must live as long
    return manager


def start_lighthouse(min_replicas: int = 1, bind: str = "[::]:0", join_timeout_ms: int = 1000,
                     heartbeat_timeout_ms: int = 2000):
    """Starts a torchft lighthouse in this process; returns the server (``.address()``, ``.shutdown()``).

    Args:
        join_timeout_ms: how long a quorum waits for replicas that heartbeat but have not asked to join:
            after a replica dies, the survivors' next quorum forms once this has passed (the dead
            replica still counts as heartbeating for ``heartbeat_timeout_ms``), so it sets their stall.
            Too short, and a replica that is merely slower than its peers drops out of quorums.
        heartbeat_timeout_ms: a replica silent this long is dead.
    """
    from torchft.coordination import LighthouseServer

    return LighthouseServer(bind=bind, min_replicas=min_replicas, join_timeout_ms=join_timeout_ms,
                            heartbeat_timeout_ms=heartbeat_timeout_ms)


# LocalSGD / DiLoCo rounds on torchft live in their own module (they need ManagedGroup, defined above).
from .managed_local_sgd import ManagedDiLoCo, ManagedLocalSGD, unsupported  # noqa: E402,F401
