"""``python -m pyparallel.train --fault-tolerant --replicas N``: replicas that survive each other's deaths.

The launcher (:func:`launch`) starts a torchft lighthouse (unless ``--lighthouse`` names one), starts N
replicas of ``--ranks-per-replica`` L processes each (default 1) and restarts a replica that dies, up to
``--max-restarts`` times per replica; a restarted replica rejoins the next quorum and heals from a live
peer. A replica is a unit: when one of its processes dies, the launcher kills the others and restarts
all L, which heal together (local rank l from local rank l of a live replica). The launcher
exits 0 once training is complete (every replica still running finished) and ``--json`` records the
test accuracy, the replicas that took part in every step and the longest stall.

A replica (:func:`replica_main`) trains the digits classifier under a :class:`torchft.Manager` with one of
pyparallel's hooks (:mod:`pyparallel.fault_tolerance`). Step s (counted in committed steps, which a healed
replica takes over from its donor) reads the s-th global batch of ``--batch-size`` x ``--replicas`` x L
samples; the n x L ranks of the step's quorum split it, so the data schedule does not depend on who is
alive, and training ends after the same number of steps however many replicas died on the way.

With ``--algo localsgd | diloco`` (one rank per replica, no --overlap, one fragment) a torchft step is a
round of ``--sync-every`` H inner steps (Note [Rounds under torchft], managed_local_sgd.py): the quorum
comes before the round, inner step j of round r reads global batch r H + j, split among the round's
quorum, and the round ends with the synchronisation, committed or discarded (then retried). The step
log, the participants and the stall then count rounds; ``--kill-at-step`` still names an inner step.

With L > 1 the replica's ranks form a Gloo group of their own (their store hosted by local rank 0, one
per incarnation) on which the shared-memory transport runs; each local rank has a torchft manager, and
the gradients are summed exactly inside the replica and reduced with the hook's compression across
replicas (Note [Replica groups of several ranks], fault_tolerance.py).

Fault injection: ``--kill-at-step S --kill-replica R`` makes replica R SIGKILL itself in step S (after
its forward pass, while its peers wait in the step's collectives), once (its first incarnation); with
L > 1 local rank ``--kill-local-rank`` (default 0) of it dies, and the launcher kills the rest.
"""

from __future__ import annotations

import copy
import datetime
import json
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn

_EXIT_GRACE_S = 30.0  # once a replica finished, how long the others get to finish too


def add_arguments(p) -> None:
    """The command-line options of fault-tolerant training (added to pyparallel.train's parser)."""
    g = p.add_argument_group("fault tolerance")
    g.add_argument("--fault-tolerant", action="store_true",
                   help="train with --replicas replica processes under torchft managers (one rank each)")
    g.add_argument("--replicas", type=int, default=3, help="replicas to start")
    g.add_argument("--ranks-per-replica", type=int, default=1,
                   help="processes per replica on this host (shared memory inside, compression across replicas)")
    g.add_argument("--lighthouse", metavar="ADDR", help="torchft lighthouse to use (default: start one)")
    g.add_argument("--min-replicas", type=int, default=1, help="a step commits only with this many replicas")
    g.add_argument("--max-restarts", type=int, default=3, help="restarts of each replica process")
    g.add_argument("--log-dir", metavar="DIR",
                   help="replica logs, step logs and final parameters (default: a new directory under /tmp)")
    g.add_argument("--kill-at-step", type=int, default=None,
                   help="fault injection: SIGKILL a replica (or a rank, first incarnation only) in this step "
                        "(localsgd / diloco: this inner step)")
    g.add_argument("--kill-replica", "--kill-rank", dest="kill_replica", type=int, default=0,
                   help="fault injection: the replica (--fault-tolerant) or rank (torchrun) to kill")
    g.add_argument("--kill-local-rank", type=int, default=0,
                   help="fault injection: which rank of the killed replica dies (--ranks-per-replica > 1)")


def check_arguments(args) -> None:
    if args.replicas < 1:
        raise SystemExit(f"pyparallel.train: --replicas must be >= 1, got {args.replicas}")
    if not 1 <= args.min_replicas <= args.replicas:
        raise SystemExit(f"pyparallel.train: --min-replicas must be in [1, --replicas={args.replicas}], "
                         f"got {args.min_replicas}")
    if args.ranks_per_replica < 1:
        raise SystemExit(f"pyparallel.train: --ranks-per-replica must be >= 1, got {args.ranks_per_replica}")
    if args.ranks_per_replica > 1 and args.transport not in ("auto", "hierarchical"):
        raise SystemExit("pyparallel.train: with --ranks-per-replica > 1 a replica sums exactly through shared memory "
                         "and the hook compresses across replicas: --transport must be auto or hierarchical, got "
                         f"{args.transport}")
    if not 0 <= args.kill_local_rank < args.ranks_per_replica:
        raise SystemExit(f"pyparallel.train: --kill-local-rank must be in [0, {args.ranks_per_replica}), "
                         f"got {args.kill_local_rank}")
    if args.max_restarts < 0:
        raise SystemExit(f"pyparallel.train: --max-restarts must be >= 0, got {args.max_restarts}")
    if args.kill_at_step is not None and not 0 <= args.kill_replica < args.replicas:
        raise SystemExit(f"pyparallel.train: --kill-replica must be in [0, {args.replicas}), got {args.kill_replica}")
    if args.algo != "ddp":  # checked here too, before any replica starts
        from .fault_tolerance import unsupported  # (managed_local_sgd's: it is imported through fault_tolerance)

        why = unsupported(f"pyparallel.train --fault-tolerant --algo {args.algo}", args.overlap, args.fragments,
                          args.ranks_per_replica)
        if why:
            raise SystemExit(why)


# ---- launcher ----

def _rank_file(run_dir: str, index: int, local_rank: int, what: str) -> str:
    """replica{index}.{what}, and replica{index}.rank{l}.{what} for the replica's other local ranks."""
    return os.path.join(run_dir, f"replica{index}" + (f".rank{local_rank}" if local_rank else "") + f".{what}")


class _Replica:
    """One replica slot: its current processes (L of them, forked from a server that has torch imported
    already, so a restart takes about a second, not the many seconds of a cold start) and its history."""

    def __init__(self, index: int, args, context):
        self.index, self.args, self.context = index, args, context
        self.run_dir = args.ft_run_dir
        self.incarnation = -1
        self.procs = []
        self.exits: list[int] = []

    def start(self) -> None:
        self.incarnation += 1
        self.procs = []
        for local_rank in range(self.args.ranks_per_replica):
            args = copy.copy(self.args)
            args.ft_replica_index, args.ft_incarnation, args.ft_local_rank = self.index, self.incarnation, local_rank
            log = _rank_file(self.run_dir, self.index, local_rank, "log")
            proc = self.context.Process(target=_replica_entry, args=(args, log),
                                        name=f"pyparallel-replica{self.index}-rank{local_rank}")
            proc.start()
            self.procs.append(proc)

    def poll(self) -> int | None:
        """0 once every process of the replica exited 0; the exit status of the first that failed (the
        others are killed then: the replica restarts as a unit); None while it runs."""
        codes = [p.exitcode for p in self.procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            self.kill()
            return failed[0]
        return 0 if all(c == 0 for c in codes) else None

    def kill(self) -> None:
        for proc in self.procs:
            if proc.exitcode is None:
                proc.kill()
        for proc in self.procs:
            proc.join()

    def stepped(self) -> bool:
        """Whether the current incarnation has taken part in a step."""
        try:
            with open(os.path.join(self.run_dir, f"replica{self.index}.steps.jsonl")) as f:
                return any(json.loads(line)["incarnation"] == self.incarnation for line in f if line.strip())
        except OSError:
            return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(os.path.join(self.run_dir, f"replica{self.index}.log"), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


def _replica_entry(args, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    replica_main(args)


def _exit_text(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"


def launch(args) -> dict:
    """Runs the lighthouse (unless given), the replicas and their restarts; returns the run's summary."""
    check_arguments(args)
    # torchft's servers log every quorum at INFO; its Rust logger reads this when torchft is imported.
    os.environ.setdefault("RUST_LOG", "warn")
    from .fault_tolerance import start_lighthouse

    lighthouse = None
    address = args.lighthouse
    if address is None:
        lighthouse = start_lighthouse(min_replicas=args.min_replicas)
        address = lighthouse.address()
    args = copy.copy(args)
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
    args.lighthouse, args.ft_run_dir = address, args.log_dir or tempfile.mkdtemp(prefix="pyparallel-ft-")
    run_dir = args.ft_run_dir
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["pyparallel.train", "pyparallel.fault_tolerance"])
    replicas = [_Replica(i, args, context) for i in range(args.replicas)]
    say = (lambda msg: print(f"pyparallel.train: {msg}", file=sys.stderr, flush=True))
    say(f"lighthouse {address}, {args.replicas} replicas, logs in {run_dir}")
    t_start = time.time()
    finished_at = None
    failed = None

    def interrupted(signum, frame):
        raise SystemExit(f"pyparallel.train: interrupted by {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        for r in replicas:
            r.start()
        running = set(range(args.replicas))
        while running:
            time.sleep(0.05)
            for r in [replicas[i] for i in sorted(running)]:
                rc = r.poll()
                if rc is None:
                    continue
                r.exits.append(rc)
                if rc == 0:
                    running.discard(r.index)
                    finished_at = finished_at or time.time()
                    continue
                say(f"replica {r.index} (incarnation {r.incarnation}) {_exit_text(rc)} "
                    f"after {time.time() - t_start:.1f} s")
                if finished_at is not None:
                    running.discard(r.index)  # training is complete: nothing to rejoin
                elif r.incarnation < args.max_restarts:
                    r.start()
                    say(f"replica {r.index} restarted (restart {r.incarnation} of at most {args.max_restarts})")
                else:  # the others may still finish without it
                    say(f"replica {r.index} is not restarted again (--max-restarts {args.max_restarts})")
                    running.discard(r.index)
                    if not running:
                        failed = f"every replica died; the last one ({_exit_text(rc)}):\n{r.log_tail()}"
            if finished_at is not None:  # training is complete: a restarted replica has nothing to rejoin
                for i in sorted(running):
                    if replicas[i].incarnation > 0 and not replicas[i].stepped():
                        replicas[i].kill()
                        running.discard(i)
                        say(f"replica {i} stopped: training completed before it rejoined")
            if running and finished_at is not None and time.time() - finished_at > _EXIT_GRACE_S:
                failed = (f"replicas {sorted(running)} did not finish within {_EXIT_GRACE_S:.0f} s of the first "
                          "finished replica:\n" + "\n".join(replicas[i].log_tail() for i in sorted(running)))
                break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for r in replicas:
            r.kill()
        if lighthouse is not None:
            lighthouse.shutdown()
    if failed:
        raise SystemExit(f"pyparallel.train: fault-tolerant training failed: {failed}")
    summary = collect(run_dir, replicas, time.time() - t_start)
    return summary


def collect(run_dir: str, replicas: list[_Replica], seconds: float) -> dict:
    """The run's summary from the replicas' step logs (local rank 0's) and final states (every rank's)."""
    finals, events, digests = {}, [], {}
    for r in replicas:
        for local_rank in range(r.args.ranks_per_replica):
            path = _rank_file(run_dir, r.index, local_rank, "final.json")
            if os.path.exists(path):
                with open(path) as f:
                    final = json.load(f)
                digests[r.index if local_rank == 0 else f"{r.index}.{local_rank}"] = final["parameter_digest"]
                if local_rank == 0:
                    finals[r.index] = final
        log = os.path.join(run_dir, f"replica{r.index}.steps.jsonl")
        if os.path.exists(log):
            with open(log) as f:
                events += [dict(json.loads(line), replica=r.index) for line in f if line.strip()]
    if not finals:
        raise SystemExit(f"pyparallel.train: no replica finished (logs in {run_dir})")
    committed = sorted({(e["step"], e["participants"]) for e in events if e["committed"]})
    participants = {}
    for step, n in committed:
        participants[step] = max(n, participants.get(step, 0))
    # Stall: the longest wall-clock gap between two consecutive committed steps of one replica incarnation.
    stall, stall_at = 0.0, None
    by_life: dict = {}
    for e in events:
        if e["committed"]:
            by_life.setdefault((e["replica"], e["incarnation"]), []).append((e["step"], e["end"]))
    for life in by_life.values():
        life.sort()
        for (s0, t0), (s1, t1) in zip(life, life[1:]):
            if t1 - t0 > stall:
                stall, stall_at = t1 - t0, s1
    rejoined = {}
    for (replica, incarnation), life in by_life.items():
        if incarnation > 0:
            rejoined.setdefault(replica, []).append(life[0][0])
    first = finals[min(finals)]
    return {
        "replicas": len(replicas), "ranks_per_replica": replicas[0].args.ranks_per_replica,
        "hook": first["hook"], "algo": first.get("algo", "ddp"), "sync_every": first.get("sync_every", 1),
        "steps": first["steps"],
        "test_accuracy": first["test_accuracy"],
        "test_accuracy_by_replica": {i: f["test_accuracy"] for i, f in finals.items()},
        # Over every rank of every replica that finished.
        "parameters_equal": len(set(digests.values())) == 1, "parameter_digests": digests,
        "restarts": {r.index: r.incarnation for r in replicas},
        "heals": {i: f["heals"] for i, f in finals.items()},
        "rejoined_at_step": rejoined,
        "participants_per_step": [participants[s] for s in sorted(participants)],
        "longest_stall_s": stall, "longest_stall_step": stall_at,
        "seconds": seconds, "run_dir": run_dir,
        "steps_log": [{k: e[k] for k in ("replica", "incarnation", "step", "committed", "participants", "start",
                                         "end")} for e in sorted(events, key=lambda e: e["end"])],
    }


def summary_text(s: dict) -> str:
    n = s["participants_per_step"]
    full = sum(1 for p in n if p == s["replicas"])
    per = s.get("ranks_per_replica", 1)
    steps = (f"{s['hook']} hook, {s['steps']} steps" if s.get("algo", "ddp") == "ddp" else
             f"{s['hook']}, {s['steps']} rounds of {s['sync_every']} inner steps (a step below is a round)")
    return (f"pyparallel.train: fault-tolerant, {s['replicas']} replicas"
            + (f" of {per} ranks" if per > 1 else "") + f", {steps} in {s['seconds']:.1f} s\n"
            f"  test accuracy      {100 * s['test_accuracy']:.2f}% (replica 0), parameters equal on every "
            f"finished {'rank' if per > 1 else 'replica'}: {s['parameters_equal']}\n"
            f"  participants       {full} of {len(n)} steps with all {s['replicas']}, fewest {min(n) if n else 0}\n"
            f"  restarts           {s['restarts']}, heals {s['heals']}, restarted replicas rejoined at steps "
            f"{s['rejoined_at_step']}\n"
            f"  longest stall      {s['longest_stall_s']:.2f} s (before step {s['longest_stall_step']})")


# ---- one replica ----

def _wait_for_peers(run_dir: str, index: int | None, replicas: int, timeout_s: float) -> None:
    """First incarnations start together, so the first quorum holds every replica (a replica that comes
    later joins and heals, which is what restarts exercise; at start-up it would only blur the run).
    ``index``: this replica's, which it marks ready (None: only wait, for a replica's other ranks)."""
    if index is not None:
        open(os.path.join(run_dir, f"ready{index}"), "w").close()
    deadline = time.monotonic() + timeout_s
    while not all(os.path.exists(os.path.join(run_dir, f"ready{i}")) for i in range(replicas)):
        if time.monotonic() > deadline:
            return  # the launcher reports a replica that never came up
        time.sleep(0.02)


def _replica_store(run_dir: str, index: int, incarnation: int, local_rank: int, timeout: datetime.timedelta):
    """This replica incarnation's TCPStore: hosted by local rank 0 on a free port, which it announces in a
    file of the run directory (written whole, then renamed); the other local ranks read it and connect."""
    path = os.path.join(run_dir, f"replica{index}.incarnation{incarnation}.store")
    host = socket.gethostname()
    if local_rank == 0:
        store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=timeout)
        with open(path + ".tmp", "w") as f:
            f.write(str(store.port))
        os.replace(path + ".tmp", path)
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"replica {index}: local rank 0 did not announce its store within {timeout}")
        time.sleep(0.02)
    with open(path) as f:
        port = int(f.read())
    return dist.TCPStore(host, port, is_master=False, timeout=timeout)


def _die_with_launcher() -> None:
    """A replica gets SIGKILL when its parent dies, however it dies (Linux's parent-death signal). The
    parent is the launcher's fork server, which exits when the launcher does."""
    launcher = os.getppid()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != launcher:  # it died before the call
        os._exit(1)


def _note(msg: str) -> None:
    print(f"[{datetime.datetime.now().isoformat(timespec='milliseconds')}] {msg}", flush=True)


def replica_main(args) -> None:
    """One replica process: trains until the committed step count (with --algo localsgd / diloco: the
    committed round count) reaches the run's total."""
    from . import fault_tolerance as ft
    from .train import HOOKS, evaluate, load_digits_split, make_model, parameter_digest

    _die_with_launcher()
    index, run_dir, incarnation = args.ft_replica_index, args.ft_run_dir, args.ft_incarnation
    local_rank, local_size = args.ft_local_rank, args.ranks_per_replica
    _note(f"replica {index} rank {local_rank} incarnation {incarnation} started")
    torch.set_num_threads(args.threads or 1)
    timeout = datetime.timedelta(seconds=args.timeout)
    # This replica's own group (its ranks; one rank: a group of one, which pyparallel.DataParallel needs).
    # With several ranks its shared-memory steps wait for a sibling while that sibling's cross-replica
    # step runs, which may take the whole group timeout before it fails: so it waits longer than that.
    store = _replica_store(run_dir, index, incarnation, local_rank, timeout) if local_size > 1 else \
        dist.TCPStore(socket.gethostname(), 0, is_master=True, wait_for_workers=False, timeout=timeout)
    replica_timeout = timeout if local_size == 1 else 2 * timeout + datetime.timedelta(seconds=5)
    dist.init_process_group("gloo", store=dist.PrefixStore("replica", store), rank=local_rank, world_size=local_size,
                            timeout=replica_timeout)

    data = load_digits_split(args.seed)
    model = make_model(args.hidden, args.layers, args.seed)
    periodic = args.algo != "ddp"
    hook_state = None
    if not periodic:
        hook, make_state = HOOKS[args.hook]
        hook_state = make_state(args)
    inner = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    training = ft.TrainingState(model, inner, hook_state)
    group = ft.ManagedGroup(timeout=timeout, replica_group=dist.group.WORLD if local_size > 1 else None)
    manager = ft.make_manager(group, training, lighthouse=args.lighthouse, replica_id=f"replica{index}",
                              min_replicas=args.min_replicas, timeout=timeout, store=store,
                              rank=local_rank, world_size=local_size)
    if periodic:
        train = _rounds(args, manager, group, model, inner, training, data)
    else:
        wrapped = ft.data_parallel(manager, group, model, hook, hook_state, wrapper=args.ddp,
                                   bucket_cap_mb=args.bucket_cap_mb)
        optimizer = ft.Optimizer(manager, inner, training)  # torchft's wrapper; rolls back a discarded step's hook state
        train = _steps(args, manager, wrapped, optimizer, training, data)
    _note("manager up")
    if incarnation == 0:
        _wait_for_peers(run_dir, index if local_rank == 0 else None, args.replicas, args.timeout)
    with open(_rank_file(run_dir, index, local_rank, "steps.jsonl"), "a") as log:
        train(log)
    accuracy = evaluate(model, data[2], data[3], torch.device("cpu"))
    digest = parameter_digest(model)
    with open(_rank_file(run_dir, index, local_rank, "final.json"), "w") as f:
        json.dump({"hook": describe(args), "algo": args.algo, "sync_every": args.sync_every if periodic else 1,
                   "steps": manager.current_step(), "test_accuracy": accuracy,
                   "heals": training.heals, "incarnation": incarnation, "parameter_digest": digest,
                   "group_generations": group.generations}, f)
    torch.save([p.detach().clone() for p in model.parameters()], _rank_file(run_dir, index, local_rank, "params.pt"))
    manager.shutdown(wait=False)
    group.shutdown()
    dist.destroy_process_group()


def describe(args) -> str:
    """The hook (--algo ddp) or the periodic algorithm with its H and compression."""
    if args.algo == "ddp":
        return args.hook
    return f"{args.algo} H={args.sync_every}" + (f" {args.compression}" if args.compression != "none" else "")


def _schedule(args, x_train):
    """(total steps, batch(step) -> the step's global batch indices). Step s reads the s-th global batch of
    --batch-size x --replicas x L samples, whoever is alive."""
    global_batch = args.batch_size * args.replicas * args.ranks_per_replica
    steps_per_epoch = len(x_train) // global_batch
    total = args.epochs * steps_per_epoch
    if args.max_steps is not None:
        total = min(total, args.max_steps)

    def batch(step: int) -> torch.Tensor:
        epoch, s = divmod(step, steps_per_epoch)
        perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        return perm[s * global_batch:(s + 1) * global_batch]

    return total, batch


def _kill_if_asked(args, step: int) -> None:
    if (args.kill_at_step == step and args.kill_replica == args.ft_replica_index and args.ft_incarnation == 0
            and args.kill_local_rank == args.ft_local_rank):
        os.kill(os.getpid(), signal.SIGKILL)


def _steps(args, manager, wrapped, optimizer, training, data):
    """--algo ddp: one torchft step per training step, the hook reducing gradients on the quorum's group."""
    x_train, y_train = data[0], data[1]
    total, batch = _schedule(args, x_train)
    local_rank, local_size = args.ft_local_rank, args.ranks_per_replica
    loss_fn = nn.CrossEntropyLoss()

    def train(log) -> None:
        stepped = False
        while manager.current_step() < total:
            start = time.time()
            optimizer.zero_grad(set_to_none=True)  # quorum: reconfigures the group, heals if behind
            step = manager.current_step()
            if step >= total:  # healed to the end: the peers finished meanwhile
                break
            if not stepped:
                _note(f"first quorum: step {step}, {manager.num_participants()} replicas, heals {training.heals}")
                stepped = True
            rank, n = manager.participating_rank(), manager.num_participants()
            # The quorum's n replicas x L ranks split the global batch: rank l of replica r takes r L + l.
            idx = batch(step)[rank * local_size + local_rank::n * local_size]
            loss = loss_fn(wrapped(x_train[idx]), y_train[idx])
            _kill_if_asked(args, step)
            loss.backward()
            optimizer.step()  # only if every replica of the quorum succeeded
            _log(log, args, manager, step, manager.current_step() > step, n, rank, loss.item(), start)

    return train


def _rounds(args, manager, group, model, inner, training, data):
    """--algo localsgd / diloco: one torchft step per round of --sync-every inner steps (Note [Rounds under
    torchft], managed_local_sgd.py). Inner step j of round r reads global batch r H + j, split among the
    round's quorum; the run is total // H rounds (the tail of fewer than H steps is not trained)."""
    from . import fault_tolerance as ft
    from .local_sgd import outer_sgd
    from .train import periodic_compression

    x_train, y_train = data[0], data[1]
    total, batch = _schedule(args, x_train)
    h = args.sync_every
    rounds = max(1, total // h)
    common = dict(compression=periodic_compression(args), transport=args.transport)
    if args.algo == "diloco":
        algo = ft.ManagedDiLoCo(manager, group, model, inner, h,
                                outer_optimizer=outer_sgd(args.outer_lr, args.outer_momentum), **common)
    else:
        algo = ft.ManagedLocalSGD(manager, group, model, inner, h, **common)
    loss_fn = nn.CrossEntropyLoss()

    def train(log) -> None:
        started = False
        while manager.current_step() < rounds:
            start = time.time()
            r = algo.start_round()  # quorum: reconfigures the group, heals if behind
            if r >= rounds:  # healed to the end: the peers finished meanwhile
                break
            if not started:
                _note(f"first quorum: round {r}, {manager.num_participants()} replicas, heals {training.heals}")
                started = True
            rank, n = manager.participating_rank(), manager.num_participants()
            for j in range(h):
                idx = batch(r * h + j)[rank::n]
                algo.zero_grad()
                loss = loss_fn(model(x_train[idx]), y_train[idx])
                _kill_if_asked(args, r * h + j)
                loss.backward()
                algo.step()  # the H-th synchronises: committed, or discarded and retried
            _log(log, args, manager, r, algo.last_round_committed, n, rank, loss.item(), start)

    return train


def _log(log, args, manager, step, committed, n, rank, loss, start) -> None:
    log.write(json.dumps({"incarnation": args.ft_incarnation, "step": step, "committed": committed,
                          "participants": n, "rank": rank, "quorum": manager._quorum_id, "loss": loss,
                          "start": start, "end": time.time()}) + "\n")
    log.flush()


def main(args) -> None:
    summary = launch(args)
    print(summary_text(summary), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
