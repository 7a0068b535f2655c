"""Bandwidth-limited links on one machine, for the benchmarks' ``--link-gbit G`` mode.

Each emulated host is a network namespace with one interface, ``eth0``, the end of a veth pair whose
other end is plugged into a bridge in a hub namespace. Both ends of every veth are shaped with
``tc ... tbf rate G gbit``, so each host's link carries at most G Gbit/s each way, as on a cluster of
hosts behind one switch. Several ranks may share one host's namespace (and so its one link and its
address); traffic between them stays inside the namespace, unshaped, as between processes of one
machine. Addresses come from 198.18.0.0/24, the range set aside for benchmarking (RFC 2544); nothing
outside the namespaces made here is ever addressed.

Everything is removed on exit, also on SIGINT, SIGTERM or SIGHUP. A launcher killed with SIGKILL cannot
clean up: the namespaces it made (named ``pp<pid>-...``) are removed by the next run, once no process
with that pid is alive. Needs Linux, root, and iproute2's ``ip`` and ``tc`` with the tbf qdisc; refuses
clearly otherwise.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import sys

SUBNET = "198.18.0"
IFNAME = "eth0"
_OUR_NS = re.compile(r"^pp(\d+)-(hub|h\d+)$")  # the names this module gives its namespaces


class LinkEmulationError(RuntimeError):
    pass


def _run(*cmd: str) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise LinkEmulationError(f"`{' '.join(cmd)}` failed: {out.stderr.strip() or out.stdout.strip()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def our_namespaces() -> list[str]:
    """Names of the namespaces this module made that still exist (any run's)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    names = [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
    return [name for name in names if _OUR_NS.match(name)]


def remove_stale() -> list[str]:
    """Removes the namespaces left by runs whose launcher is gone (killed with SIGKILL); returns them."""
    removed = []
    for name in our_namespaces():
        if not _alive(int(_OUR_NS.match(name).group(1))):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            removed.append(name)
    return removed


class LinkEmulation:
    """Context manager: ``hosts`` namespaces joined by links of ``gbit`` Gbit/s, one link per host.

    Example:
        >>> with LinkEmulation(2, gbit=1.0) as net:
        ...     subprocess.run(net.command(0) + ["ip", "addr"])
    """

    def __init__(self, hosts: int, gbit: float):
        if gbit <= 0:
            raise ValueError(f"--link-gbit must be positive, got {gbit}")
        if hosts < 1:
            raise ValueError(f"LinkEmulation: hosts must be >= 1, got {hosts}")
        self.hosts, self.gbit = hosts, gbit
        tag = f"pp{os.getpid()}"  # the whole pid: remove_stale() tells live runs from dead ones by it
        self.hub = f"{tag}-hub"
        self.names = [f"{tag}-h{h}" for h in range(hosts)]
        self._veth = [(f"{tag}h{h}a", f"{tag}h{h}b") for h in range(hosts)]  # <= 15 characters
        self._made: list[str] = []
        self._previous_handlers: dict[int, object] = {}

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

    def address(self, host: int) -> str:
        return f"{SUBNET}.{host + 1}"

    def command(self, host: int) -> list[str]:
        """Prefix that runs a command inside host's namespace."""
        return ["ip", "netns", "exec", self.names[host]]

    def _shape(self, ns: str, dev: str) -> None:
        rate_bytes = self.gbit * 1e9 / 8
        burst = max(256 * 1024, int(rate_bytes / 250))  # at least one timer tick's worth at HZ=250
        _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{self.gbit}gbit",
             "burst", str(burst), "latency", "100ms")

    def _install_handlers(self) -> None:
        # A signal becomes SystemExit in the main thread, so the `with` block (or the launcher's
        # `finally`) stops the ranks first and then removes the namespaces; atexit is the backstop.
        def handler(signum, frame):
            raise SystemExit(128 + signum)

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._previous_handlers[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)

    def __enter__(self) -> "LinkEmulation":
        self.check()
        remove_stale()
        atexit.register(self.close)
        self._install_handlers()
        try:
            self._add_ns(self.hub)
            _run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", self.hub, "link", "set", "br0", "up")
            for h, ns in enumerate(self.names):
                inner, outer = self._veth[h]
                self._add_ns(ns)
                _run("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
                try:
                    _run("ip", "link", "set", inner, "netns", ns)
                    _run("ip", "link", "set", outer, "netns", self.hub)
                except LinkEmulationError:
                    subprocess.run(["ip", "link", "del", inner], capture_output=True)  # still in the root ns
                    raise
                _run("ip", "-n", ns, "link", "set", inner, "name", IFNAME)
                _run("ip", "-n", ns, "addr", "add", f"{self.address(h)}/24", "dev", IFNAME)
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
        for sig, previous in self._previous_handlers.items():
            signal.signal(sig, previous)
        self._previous_handlers.clear()

    def __exit__(self, *exc) -> None:
        self.close()


def wire_tx_bytes() -> int | None:
    """Bytes this process's network namespace has sent on its emulated link (IFNAME), or None outside
    one (on loopback every rank shares ``lo``, so no per-rank count exists). Counts what reaches the
    wire: payload plus TCP/IP headers, every collective and store message included."""
    with open("/proc/self/net/dev") as f:
        for line in f:
            name, _, counters = line.partition(":")
            if name.strip() == IFNAME:
                return int(counters.split()[8])  # receive: 8 fields, then transmit bytes
    return None
