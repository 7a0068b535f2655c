"""Real multi-process tests without paying process start-up per test.

A :class:`WorkerPool` starts ``world_size`` spawned processes once, each joined to one Gloo process group
(FileStore rendezvous), and then runs many test cases in them: ``pool.run(fn, *args)`` calls
``fn(*args)`` on every rank and returns the per-rank results. ``fn`` must be a module-level function
(it is pickled by reference). Every call has a deadline: a rank that does not answer in time fails the
test, and the pool is killed, so a hang never stalls CI.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import tempfile
import time
import traceback


class RankFailed(AssertionError):
    pass


def _worker_main(rank, world_size, init_file, conn, pg_timeout_s, threads):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)  # several ranks share few cores: no oversubscription
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=pg_timeout_s))
    while True:
        msg = conn.recv()
        if msg is None:
            break
        fn, args = msg
        try:
            conn.send(("ok", fn(*args)))
        except BaseException:  # report everything, including assertion failures, to the parent
            conn.send(("error", traceback.format_exc()))
    dist.destroy_process_group()


class WorkerPool:
    def __init__(self, world_size: int, pg_timeout_s: float = 30.0, threads: int = 1):
        self.world_size = world_size
        self._dir = tempfile.mkdtemp(prefix="pyparallel-pool-")
        ctx = mp.get_context("spawn")
        self._conns, self._procs = [], []
        init_file = os.path.join(self._dir, "store")
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(rank, world_size, init_file, child, pg_timeout_s, threads),
                               daemon=True)
            proc.start()
            self._conns.append(parent)
            self._procs.append(proc)

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def run(self, fn, *args, timeout: float = 120.0) -> list:
        """fn(*args) on every rank; returns the results by rank or raises with every failing rank's report."""
        outcomes = self.outcomes(fn, *args, timeout=timeout)
        errors = [f"--- rank {r}: {status} ---\n{value}" for r, (status, value) in enumerate(outcomes) if status != "ok"]
        if errors:
            if any(status == "timeout" for status, _ in outcomes):
                raise TimeoutError(f"{fn.__name__} did not finish within {timeout:.0f} s (pool killed):\n" + "\n".join(errors))
            raise RankFailed(f"{fn.__name__} failed on {len(errors)} rank(s):\n" + "\n".join(errors))
        return [value for _, value in outcomes]

    def outcomes(self, fn, *args, timeout: float = 120.0) -> list[tuple[str, object]]:
        """fn(*args) on every rank; per rank ("ok", result), ("error", traceback), ("died", None) or
        ("timeout", None). A dead or late rank gets the pool killed once every rank has been heard from."""
        if not self.alive:
            raise RuntimeError("worker pool is not running")
        for conn in self._conns:
            conn.send((fn, args))
        deadline = time.monotonic() + timeout
        outcomes, broken = [], False
        for conn in self._conns:
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                outcomes.append(("timeout", None))
                broken = True
                continue
            try:
                outcomes.append(conn.recv())
            except (EOFError, OSError):  # the rank's end of the pipe is gone
                outcomes.append(("died", None))
                broken = True
        if broken:
            self.kill()
        return outcomes

    def kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(5)
        self._procs = []

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + 10
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
        self.kill()


def kill_rank_one_during_all_reduces(group, tensor, transport: str):
    """The body of a pool case: rank 1 SIGKILLs itself 0.3 s into a loop of large ``transport`` all-reduces
    of ``tensor`` on ``group`` (set up by one call first). Every other rank returns (first, later) for
    :func:`assert_survivors_named_the_dead_rank`."""
    import signal
    import threading

    import torch.distributed as dist

    import pyparallel

    pyparallel.all_reduce(tensor, group=group, transport=transport)  # set up (segment / buffers mapped)
    if dist.get_rank() == 1:
        threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    deadline = time.monotonic() + 30
    first = later = None
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        try:
            pyparallel.all_reduce(tensor, group=group, transport=transport)
        except RuntimeError as e:
            first = (time.monotonic() - t0, str(e).splitlines()[0])
            break
    t1 = time.monotonic()
    try:
        pyparallel.all_reduce(tensor.new_ones(4), group=group, transport=transport)
    except RuntimeError as e:
        later = (time.monotonic() - t1, str(e).splitlines()[0])
    return first, later


def train_cli(overrides: dict) -> dict:
    """``python -m pyparallel.train`` in a pool worker: the ring transport, one torch thread, no progress
    bar, then ``overrides`` (argument names as attributes); its summary without the per-epoch curve."""
    from pyparallel.train import parser, run

    args = parser().parse_args(["--transport", "ring", "--no-progress", "--threads", "1"])
    for key, value in overrides.items():
        setattr(args, key, value)
    result = run(args)
    result.pop("curve", None)
    return result


def assert_resume_is_bitwise(pool, options: dict, epochs: int, stop_at: int, directory: str) -> list:
    """Trains ``epochs`` epochs straight, then ``stop_at`` epochs with a checkpoint and a resumed run to
    ``epochs``: both must take the same steps and end with bitwise-equal parameters on every rank. Returns
    the straight run's per-rank summaries."""
    import torch

    prefix = os.path.join(directory, "ckpt")
    straight = pool.run(train_cli, dict(options, epochs=epochs), timeout=300)
    pool.run(train_cli, dict(options, epochs=stop_at, checkpoint=prefix), timeout=300)
    resumed = pool.run(train_cli, dict(options, epochs=epochs, resume=prefix), timeout=300)
    for a, b in zip(straight, resumed):
        assert a["steps"] == b["steps"]
        assert all(torch.equal(p, q) for p, q in zip(a["final_parameters"], b["final_parameters"]))
    return straight


def assert_survivors_named_the_dead_rank(outcomes, dead: int, timeout_s: float) -> None:
    """For ``pool.outcomes`` of a case in which rank ``dead`` is SIGKILLed mid-collective and every other rank
    returns (first, later): its first failing collective as (seconds, first line of the error) and the next
    collective's likewise. Each survivor must have raised, naming the dead rank, within ``timeout_s`` (the
    group's timeout), and its next collective must have raised at once, saying an earlier one failed."""
    assert outcomes[dead][0] == "died"
    for rank, (status, value) in enumerate(outcomes):
        if rank == dead:
            continue
        assert status == "ok", value
        first, later = value
        assert first is not None, "the surviving rank must raise"
        elapsed, message = first
        assert f"rank {dead}" in message and "died" in message, message
        assert elapsed < timeout_s, f"raised after {elapsed:.1f} s (group timeout {timeout_s:.0f} s)"
        assert later is not None and later[0] < 1 and "earlier" in later[1], later


def assert_rank_one_killed_is_named(case, timeout: float) -> None:
    """Runs ``case`` (rank 1 SIGKILLs itself, see :func:`kill_rank_one_during_all_reduces`) in a fresh pool of
    3 ranks with a 10 s group timeout (the pool does not survive it) and checks the survivors' outcomes."""
    pool = WorkerPool(3, pg_timeout_s=10)
    try:
        outcomes = pool.outcomes(case, timeout=timeout)
    finally:
        pool.kill()
    assert_survivors_named_the_dead_rank(outcomes, dead=1, timeout_s=10)
