"""LocalSGD and DiLoCo on torchft: rounds that survive a dead replica (:mod:`pyparallel.fault_tolerance`).

Note [Rounds under torchft]
---------------------------
A round (the ``sync_every`` = H inner steps between two synchronisations, Note [Periodic
synchronisation] in local_sgd.py) is one torchft step, as in torchft's own DiLoCo (one quorum per
synchronisation, should_commit after it):

* :meth:`start_round` runs the quorum before the round's first inner step (torchft's DiLoCo runs it just
  before the synchronisation; here it comes first so that a replica knows the quorum's size and its rank
  in it when it reads the round's data, and a replica that (re)joins heals from a live peer before it
  trains: the model, which is the anchor at a round's start, the inner optimizer, the anchor, the outer
  optimizer's state, the counters and the round, ``manager.current_step()``; its top-k residual starts
  at zero, as a hook's error feedback does);
* the replica then trains H inner steps on its own, and the H-th ``step()`` synchronises on the quorum's
  current group: the pseudo-gradient (or, for exact LocalSGD, the parameters) is summed over the quorum
  with the chosen compression and divided by the number of participants of that round; an error (a peer
  died during the round, a timeout) is reported to the manager;
* if ``manager.should_commit()``, the anchor moves (outer step) and the model is set to it; otherwise
  the round is discarded on this replica: the model goes back to the anchor, the anchor and the outer
  optimizer are untouched, and the inner optimizer's state, the top-k residual and the counters go back
  to the round's start (a copy taken in start_round), so the retried round (the same round index, so the
  same data) starts exactly as the discarded one did.

Every participant of a committed round computes the new anchor from the same reduced bits: anchors, and
models after every synchronisation, are bitwise equal on every replica. Not supported: ``overlap=True``
(a reduction in flight across a round would outlive the quorum it was launched on, and a discarded sync
would have to undo two rounds) and ``fragments > 1`` (each fragment's synchronisation would be a torchft
step of its own, with its own rollback); both raise. One rank per replica.

A restarted replica asks for a quorum at once, while its peers ask only at their next round's start: if
a round lasts longer than the lighthouse's join timeout and ``min_replicas`` allows it, the newcomer may
first form a quorum of its own (it trains a round alone, then heals from its peers at their next quorum).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torchft

from .fault_tolerance import ManagedGroup, detached_copy
from .local_sgd import DiLoCo, LocalSGD


def unsupported(who: str, overlap: bool, fragments: int, ranks_per_replica: int) -> str | None:
    """Why LocalSGD / DiLoCo with these options cannot run on torchft (Note [Rounds under torchft]), or None."""
    if overlap:
        return (f"{who}: overlap=True is not supported under fault tolerance: a reduction in flight across a round "
                "would outlive the quorum it was launched on (Note [Rounds under torchft]); use overlap=False")
    if fragments != 1:
        return (f"{who}: fragments > 1 is not supported under fault tolerance (each fragment's synchronisation "
                "would be a torchft step of its own); use fragments=1")
    if ranks_per_replica != 1:
        return f"{who}: one rank per replica (got replicas of {ranks_per_replica} ranks)"
    return None


class _ManagedRounds:
    """The torchft side of :class:`ManagedLocalSGD` and :class:`ManagedDiLoCo` (Note [Rounds under torchft])."""

    def __init__(self, manager: torchft.Manager, group: ManagedGroup, model, optimizer, sync_every: int, **kwargs):
        who = type(self).__name__
        if not isinstance(group, ManagedGroup):
            raise TypeError(f"{who}: group must be a pyparallel.fault_tolerance.ManagedGroup, got {type(group).__name__}")
        why = unsupported(who, bool(kwargs.get("overlap")), kwargs.get("fragments", 1), group.ranks_per_replica)
        if why:
            raise ValueError(why)
        if "process_group" in kwargs:
            raise TypeError(f"{who}: no process_group: every round synchronises on the quorum's group "
                            "(group.current())")
        if getattr(manager, "_use_async_quorum", False):
            raise ValueError(f"{who}: the manager must use the synchronous quorum (make_manager's): a healing "
                             "replica loads its peer's state before its round")
        if not dist.is_initialized():
            raise RuntimeError(f"{who}: initialize this replica's own process group first (one rank, e.g. "
                               "dist.init_process_group('gloo', store=..., rank=0, world_size=1)): construction "
                               "checks the model on it, as LocalSGD / DiLoCo do on theirs")
        self.manager, self.group = manager, group
        self.last_round_committed: bool | None = None
        self._in_round = False
        self._round_start: dict | None = None
        super().__init__(model, optimizer, sync_every, **kwargs)  # checks on the default group: the replica's own
        # What a healing peer receives besides the model and the inner optimizer (TrainingState's).
        manager.register_state_dict_fn(f"pyparallel-{who}", self._load_heal_state, self._heal_state)

    # ---- rounds ----

    def start_round(self) -> int:
        """The quorum of the round about to begin: reconfigures the group, heals this replica from a live
        peer if it is behind, and keeps a copy of what a discarded round must restore. Returns the round's
        index (``manager.current_step()``: committed rounds so far)."""
        if self._in_round:
            raise RuntimeError(f"{type(self).__name__}.start_round: the round in progress has not synchronised yet "
                               f"(call step() {self.sync_every} times per round)")
        self.manager.start_quorum()
        flats = [flat for frag in self._fragments for flat in frag.flats]
        self._round_start = {
            "inner": copy.deepcopy(self.optim.state_dict()), "step": self._step, "rounds": self.rounds,
            "residual": [flat.residual.clone() if flat.residual is not None else None for flat in flats],
        }
        self._in_round = True
        return self.manager.current_step()

    def step(self, closure=None):
        if not self._in_round:
            raise RuntimeError(f"{type(self).__name__}.step: call start_round() before a round's first inner step")
        return super().step(closure)

    def finish(self) -> None:
        if self._in_round or any(frag.since for frag in self._fragments):
            raise RuntimeError(f"{type(self).__name__}.finish: under fault tolerance every round ends with its "
                               f"synchronisation (after {self.sync_every} inner steps); there is nothing to finish "
                               "between rounds, and a round cannot be cut short")

    @torch.no_grad()
    def _sync(self, frag) -> None:
        manager = self.manager
        self.rounds += 1
        frag.since = 0
        self._fill(frag, 0)
        participants = 0
        if not manager.errored():
            try:
                manager.wait_quorum()
                participants = manager.num_participants()
                if not manager.is_participating():  # a spare: contributes nothing
                    for flat in frag.flats:
                        flat.buffers[0].zero_()
                self.process_group = self.group.current()
                self._wait(frag, (self._launch(frag.flats, 0, op="sum"), 0))
            except Exception as exc:  # noqa: BLE001 (every failure of the round goes to the manager)
                manager.report_error(exc)
        committed = manager.should_commit()
        if committed:
            for flat in frag.flats:
                flat.buffers[0].div_(participants)
            self._apply(frag, 0)
        else:
            self._discard_round()
        self._reset_model(frag)  # to the new anchor, or back to the unchanged one
        self._in_round = False
        self.last_round_committed = committed

    def _discard_round(self) -> None:
        saved = self._round_start
        self.optim.load_state_dict(saved["inner"])
        self._step, self.rounds = saved["step"], saved["rounds"]
        flats = [flat for frag in self._fragments for flat in frag.flats]
        for flat, residual in zip(flats, saved["residual"]):
            if residual is not None:
                flat.residual.copy_(residual)

    # ---- healing ----

    def _heal_state(self) -> dict:
        # A copy: the donor goes on with its round while the healing replica downloads it. state_dict()
        # already copies anchors, starts and residuals; only the outer optimizers' state is live.
        state = self.state_dict()
        del state["inner"]  # TrainingState sends it
        for frag in state["fragments"]:
            frag["outer"] = detached_copy(frag["outer"])
        return state

    def _load_heal_state(self, state: dict) -> None:
        state = dict(state, inner=None)
        self._check_loadable(state)
        self._load_sync_state(state)
        self.reset_error_feedback()

    def _config(self) -> dict:
        config = super()._config()
        del config["world_size"]  # the quorum's size changes from round to round by design
        return config


class ManagedLocalSGD(_ManagedRounds, LocalSGD):
    """:class:`pyparallel.LocalSGD` on torchft (Note [Rounds under torchft]).

    Args:
        manager: the replica's :class:`torchft.Manager` (:func:`pyparallel.fault_tolerance.make_manager`,
            whose TrainingState holds the model and the inner optimizer); this registers the rest of what
            a healing replica needs with it.
        group: the :class:`~pyparallel.fault_tolerance.ManagedGroup` the manager was built with.
        model, optimizer, sync_every, compression, transport: as in :class:`pyparallel.LocalSGD`.
    """


class ManagedDiLoCo(_ManagedRounds, DiLoCo):
    """:class:`pyparallel.DiLoCo` on torchft (Note [Rounds under torchft]).

    Args:
        manager, group: as in :class:`ManagedLocalSGD`.
        model, optimizer, sync_every, outer_optimizer, compression, transport: as in :class:`pyparallel.DiLoCo`.

    Example (one process per replica; its own group of one rank initialized)::

        group = fault_tolerance.ManagedGroup(timeout=timedelta(seconds=10))
        training = fault_tolerance.TrainingState(net, inner)          # model + inner optimizer
        manager = fault_tolerance.make_manager(group, training, lighthouse=addr, replica_id="replica0")
        opt = fault_tolerance.ManagedDiLoCo(manager, group, net, inner, sync_every=20, compression="int8")
        while manager.current_step() < rounds:
            r = opt.start_round()                # quorum; heals this replica if behind
            rank, n = manager.participating_rank(), manager.num_participants()
            for j in range(20):
                opt.zero_grad()
                loss_fn(net(x[r, j][rank::n]), y[r, j][rank::n]).backward()
                opt.step()                       # the 20th synchronises: committed, or discarded
    """
