"""Start one process per rank for a benchmark, on loopback or inside emulated links (netns.py).

Each rank runs ``python SCRIPT ARGS --worker --rank R --master HOST:PORT``; the worker joins a Gloo
process group at ``tcp://HOST:PORT`` (or ``env://``: the environment below carries the same). Rank 0's
output goes to our stdout, the others' is discarded.

Hosts: ``hosts`` emulated hosts, ranks spread evenly (rank r on host ``r // (ranks // hosts)``). Every
rank gets torchrun's environment, so host-aware code sees the layout: RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, GROUP_RANK (the host), GROUP_WORLD_SIZE, ROLE_RANK, ROLE_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT, and ``PYPARALLEL_HOST=host<index>`` (pyparallel's host override). With ``link_gbit`` each
host is a network namespace with one shaped link, shared by its ranks; without, all ranks use
loopback and the hosts exist only in the environment. Default: one host per rank with links (each rank
on its own machine), one host for all ranks without (they are on this machine).

Ranks die with the launcher (PR_SET_PDEATHSIG), so a killed launcher leaves no rank behind.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

from netns import IFNAME, LinkEmulation, LinkEmulationError

_PR_SET_PDEATHSIG = 1


def cpu_model() -> str:
    """The CPU's model name, for benchmark headers ("?" where /proc/cpuinfo does not say)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_hosts(ranks: int, link_gbit: float | None) -> int:
    return ranks if link_gbit is not None else 1


def host_of(rank: int, ranks: int, hosts: int) -> int:
    return rank // (ranks // hosts)


def check_hosts(ranks: int, hosts: int) -> str | None:
    """Why ``ranks`` cannot be spread evenly over ``hosts`` (None when they can)."""
    if hosts < 1:
        return f"--hosts must be >= 1, got {hosts}"
    if ranks % hosts:
        return f"{ranks} ranks cannot be spread evenly over {hosts} hosts (-n must be a multiple of --hosts)"
    return None


def rank_env(rank: int, ranks: int, hosts: int, master_addr: str, master_port: int) -> dict[str, str]:
    """torchrun's variables for one rank (and pyparallel's host override)."""
    per_host = ranks // hosts
    host = host_of(rank, ranks, hosts)
    return dict(RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank % per_host),
                LOCAL_WORLD_SIZE=str(per_host), GROUP_RANK=str(host), GROUP_WORLD_SIZE=str(hosts),
                ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(ranks), MASTER_ADDR=master_addr,
                MASTER_PORT=str(master_port), PYPARALLEL_HOST=f"host{host}")


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the launcher's own cleanup still kills the ranks on a normal exit or a signal


def _code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal s: 128 + s, as a shell


def _wait(procs: list[subprocess.Popen], timeout_s: float, grace_s: float = 30.0) -> list[int]:
    """Waits for all ranks. When one fails, the others (stuck in a collective with it, until their
    process-group timeout) get ``grace_s`` seconds to finish, then are killed."""
    deadline = time.monotonic() + timeout_s
    while any(p.poll() is None for p in procs):
        failed = [r for r, p in enumerate(procs) if p.returncode not in (None, 0)]
        if failed:
            deadline = min(deadline, time.monotonic() + grace_s)
        if time.monotonic() > deadline:
            late = [r for r, p in enumerate(procs) if p.poll() is None]
            why = f"rank {failed[0]} failed" if failed else f"they did not finish within {timeout_s:.0f} s"
            print(f"error: killing ranks {late}: {why}", file=sys.stderr)
            for r in late:
                procs[r].kill()
            return [_code(p.wait()) for p in procs] + [1]
        time.sleep(0.05)
    return [_code(p.returncode) for p in procs]


def launch(script: str, argv: list[str], ranks: int, link_gbit: float | None, timeout_s: float,
           hosts: int | None = None) -> int:
    """Runs the ranks to completion; returns the worst exit code (2 when the layout or the links are
    refused)."""
    hosts = default_hosts(ranks, link_gbit) if hosts is None else hosts
    why = check_hosts(ranks, hosts)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    net = None
    if link_gbit is not None:
        try:
            LinkEmulation.check()
        except LinkEmulationError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        net = LinkEmulation(hosts, link_gbit)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = []
    codes = [1]
    try:
        if net is not None:
            net.__enter__()
            master_addr, master_port, env["GLOO_SOCKET_IFNAME"] = net.address(0), 29500, IFNAME
        else:
            master_addr, master_port, env["GLOO_SOCKET_IFNAME"] = "127.0.0.1", free_port(), "lo"
        for r in range(ranks):
            prefix = net.command(host_of(r, ranks, hosts)) if net is not None else []
            cmd = prefix + [sys.executable, os.path.abspath(script)] + argv + [
                "--worker", "--rank", str(r), "--master", f"{master_addr}:{master_port}"]
            procs.append(subprocess.Popen(cmd, env=dict(env, **rank_env(r, ranks, hosts, master_addr, master_port)),
                                          stdout=None if r == 0 else subprocess.DEVNULL,
                                          preexec_fn=_die_with_parent))
        codes = _wait(procs, timeout_s)
    except (KeyboardInterrupt, SystemExit) as e:
        code = 130 if isinstance(e, KeyboardInterrupt) else (e.code if isinstance(e.code, int) else 1)
        why = signal.Signals(code - 128).name if 128 < code < 128 + signal.NSIG else f"exit {code}"
        print(f"error: interrupted ({why}); stopping the ranks", file=sys.stderr)
        codes = [code]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
        if net is not None:
            net.close()
    return max(codes)
