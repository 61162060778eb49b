"""Network namespaces for ``seedswarm bench chaos``: the link faults.

When the bench runs as root with iproute2, every node gets its own Linux network namespace on
a bridge, so that the link between two nodes can be cut (a blackhole route each way) while
each keeps every other link. Plain ``ip`` commands with no project imports, kept apart so the
bench's run loop reads without the plumbing; :func:`netns_unavailable` says why the bench
falls back to loopback (and skips link faults) elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys


def netns_unavailable() -> str | None:
    """Why link faults cannot run here (None: they can)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "not root: cannot create network namespaces"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"sscprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


class Netns:
    """One namespace per node on a bridge in the root namespace (where the bench and its
    adversary run). A cut link is a blackhole route in both namespaces of the pair."""

    def __init__(self, n: int) -> None:
        self.n = n
        tag = os.getpid() % 100000
        self.tag = tag
        used = _ip("-4", "addr").stdout + _ip("-4", "route").stdout
        third = next((x for x in [tag % 250, *range(250)] if f"10.231.{x}." not in used), None)
        if third is None:
            raise RuntimeError("no free 10.231.x.0/24 subnet")
        self.subnet = f"10.231.{third}"
        self.bridge = f"sscbr{tag}"
        self.names = [f"ssc{tag}n{i}" for i in range(n)]
        self.cut: set[tuple[int, int]] = set()
        self._up = False

    def ns(self, i: int) -> str:
        return self.names[i]

    def ip(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    def up(self) -> None:
        self._up = True
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.subnet}.254/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, ns in enumerate(self.names):
            outer, inner = f"sv{self.tag}o{i}", f"sv{self.tag}i{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "master", self.bridge)
            _ip("link", "set", outer, "up")
            _ip("-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def down(self) -> None:
        if not self._up:
            return
        for ns in self.names:
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.bridge, check=False)
        self._up = False

    def drop(self, i: int, j: int) -> None:
        _ip("-n", self.ns(i), "route", "add", "blackhole", f"{self.ip(j)}/32")
        _ip("-n", self.ns(j), "route", "add", "blackhole", f"{self.ip(i)}/32")
        self.cut.add((min(i, j), max(i, j)))

    def heal(self, i: int, j: int) -> None:
        _ip("-n", self.ns(i), "route", "del", "blackhole", f"{self.ip(j)}/32", check=False)
        _ip("-n", self.ns(j), "route", "del", "blackhole", f"{self.ip(i)}/32", check=False)
        self.cut.discard((min(i, j), max(i, j)))

