"""Bandwidth-limited links on one machine, for the benchmarks' ``--link-gbit G`` mode.

Each rank runs in its own network namespace with one interface, ``eth0``, the end of a veth pair whose
other end is plugged into a bridge in a hub namespace. Both ends of every veth are shaped with
``tc ... tbf rate G gbit``, so each rank's link carries at most G Gbit/s each way, as on a cluster of
hosts behind one switch. Addresses come from 198.18.0.0/24, the range set aside for benchmarking
(RFC 2544); nothing outside the namespaces made here is ever addressed. Everything is removed on exit.
Needs Linux, root, and iproute2's ``ip`` and ``tc`` with the tbf qdisc; refuses clearly otherwise.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys

SUBNET = "198.18.0"
IFNAME = "eth0"


class LinkEmulationError(RuntimeError):
    pass


def _run(*cmd: str) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise LinkEmulationError(f"`{' '.join(cmd)}` failed: {out.stderr.strip() or out.stdout.strip()}")


class LinkEmulation:
    """Context manager: ``ranks`` namespaces joined by links of ``gbit`` Gbit/s.

    Example:
        >>> with LinkEmulation(2, gbit=1.0) as net:
        ...     subprocess.run(net.command(0) + ["ip", "addr"])
    """

    def __init__(self, ranks: int, gbit: float):
        if gbit <= 0:
            raise ValueError(f"--link-gbit must be positive, got {gbit}")
        self.ranks, self.gbit = ranks, gbit
        tag = f"pp{os.getpid() % 100000}"
        self.hub = f"{tag}-hub"
        self.names = [f"{tag}-r{r}" for r in range(ranks)]
        self._veth = [(f"{tag}r{r}a", f"{tag}r{r}b") for r in range(ranks)]
        self._made: list[str] = []

    @staticmethod
    def check() -> None:
        """Raises LinkEmulationError saying why this machine cannot emulate links."""
        if not sys.platform.startswith("linux"):
            raise LinkEmulationError("--link-gbit needs Linux network namespaces")
        if os.geteuid() != 0:
            raise LinkEmulationError("--link-gbit needs root (ip netns, tc)")
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                raise LinkEmulationError(f"--link-gbit needs iproute2's `{tool}` on PATH")

    def address(self, rank: int) -> str:
        return f"{SUBNET}.{rank + 1}"

    def command(self, rank: int) -> list[str]:
        """Prefix that runs a command inside rank's namespace."""
        return ["ip", "netns", "exec", self.names[rank]]

    def _shape(self, ns: str, dev: str) -> None:
        rate_bytes = self.gbit * 1e9 / 8
        burst = max(256 * 1024, int(rate_bytes / 250))  # at least one timer tick's worth at HZ=250
        _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{self.gbit}gbit",
             "burst", str(burst), "latency", "100ms")

    def __enter__(self) -> "LinkEmulation":
        self.check()
        atexit.register(self.close)
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(sig)

            def handler(signum, frame, previous=previous):
                self.close()
                if callable(previous):
                    previous(signum, frame)
                raise SystemExit(128 + signum)

            signal.signal(sig, handler)
        try:
            self._add_ns(self.hub)
            _run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", self.hub, "link", "set", "br0", "up")
            for r, ns in enumerate(self.names):
                inner, outer = self._veth[r]
                self._add_ns(ns)
                _run("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
                _run("ip", "link", "set", inner, "netns", ns)
                _run("ip", "link", "set", outer, "netns", self.hub)
                _run("ip", "-n", ns, "link", "set", inner, "name", IFNAME)
                _run("ip", "-n", ns, "addr", "add", f"{self.address(r)}/24", "dev", IFNAME)
                _run("ip", "-n", ns, "link", "set", IFNAME, "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                _run("ip", "-n", self.hub, "link", "set", outer, "master", "br0")
                _run("ip", "-n", self.hub, "link", "set", outer, "up")
                self._shape(ns, IFNAME)
                self._shape(self.hub, outer)
        except BaseException:
            self.close()
            raise
        return self

    def _add_ns(self, ns: str) -> None:
        _run("ip", "netns", "add", ns)
        self._made.append(ns)

    def close(self) -> None:
        while self._made:  # deleting a namespace deletes the veth ends inside it
            subprocess.run(["ip", "netns", "del", self._made.pop()], capture_output=True)

    def __exit__(self, *exc) -> None:
        self.close()
