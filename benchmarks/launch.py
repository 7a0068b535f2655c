"""Start one process per rank for a benchmark, on loopback or inside emulated links (netns.py).

Each rank runs ``python SCRIPT ARGS --worker --rank R --master HOST:PORT``; the worker joins a Gloo
process group at ``tcp://HOST:PORT``. Rank 0's output goes to our stdout, the others' is discarded.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from netns import IFNAME, LinkEmulation, LinkEmulationError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, argv: list[str], ranks: int, link_gbit: float | None, timeout_s: float) -> int:
    """Runs the ranks to completion; returns the worst exit code (2 when links cannot be emulated)."""
    net = None
    if link_gbit is not None:
        try:
            LinkEmulation.check()
        except LinkEmulationError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        net = LinkEmulation(ranks, link_gbit)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = []
    try:
        if net is not None:
            net.__enter__()
            master, env["GLOO_SOCKET_IFNAME"] = f"{net.address(0)}:29500", IFNAME
        else:
            master, env["GLOO_SOCKET_IFNAME"] = f"127.0.0.1:{free_port()}", "lo"
        for r in range(ranks):
            prefix = net.command(r) if net is not None else []
            cmd = prefix + [sys.executable, os.path.abspath(script)] + argv + ["--worker", "--rank", str(r),
                                                                              "--master", master]
            procs.append(subprocess.Popen(cmd, env=env, stdout=None if r == 0 else subprocess.DEVNULL))
        deadline = time.monotonic() + timeout_s
        codes = [p.wait(timeout=max(1, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        print(f"error: the benchmark ranks did not finish within {timeout_s:.0f} s", file=sys.stderr)
        codes = [1]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        if net is not None:
            net.close()
    return max(codes)
