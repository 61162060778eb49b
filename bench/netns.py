"""Network namespaces for the benches that run real daemons on emulated links.

``seedswarm bench chaos`` and ``seedswarm bench wan`` both put every node in its own Linux
network namespace, so each daemon has its own address, sockets and interface counters. Two
ways to join the namespaces:

* :meth:`Netns.up` with ``links=True``: a veth pair per node on a bridge in the root namespace
  (where the chaos bench and its adversary run). A cut link is a blackhole route in both
  namespaces of the pair; :meth:`Netns.shape` sets a node's access link with ``tc`` (netem for
  delay, jitter, loss and rate), which needs the kernel's ``sch_netem``.
* ``links=False``: bare namespaces (loopback only); ``bench wan`` then adds one TUN device per
  namespace, fed by its user-space link emulator (:mod:`seedswarm.bench.wan_link`), on kernels
  built without netem.

Plain ``ip``/``tc`` commands with no project imports, kept apart so the benches' run loops
read without the plumbing; :func:`netns_unavailable` and :func:`netem_unavailable` say why a
bench falls back (or stops) elsewhere, in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys


class NetnsError(RuntimeError):
    """An ``ip`` or ``tc`` command failed while building or shaping the namespaces."""


def netns_unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
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


def netem_unavailable() -> str | None:
    """Why ``tc qdisc ... netem`` cannot shape a link here (None: it can). Probed on the
    loopback of a throwaway namespace, so nothing outside it is touched."""
    if (why := netns_unavailable()) is not None:
        return why
    if shutil.which("tc") is None:
        return "`tc` (iproute2) is not installed"
    probe = f"sscnetem{os.getpid()}"
    subprocess.run(["ip", "netns", "add", probe], capture_output=True)
    try:
        r = subprocess.run(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                            "delay", "1ms"], capture_output=True, text=True)
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if r.returncode != 0:
        return f"tc netem is unavailable (kernel without sch_netem?): {r.stderr.strip()}"
    return None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; a failure raises :class:`NetnsError` with ip's own message."""
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def tc(ns: str, *args: str) -> None:
    """Run ``tc ARGS`` inside namespace ``ns`` (the root namespace when ``ns`` is empty)."""
    cmd = ["tc", *args] if not ns else ["ip", "netns", "exec", ns, "tc", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)}: {r.stderr.strip()}")


def link_bytes(ns: str, dev: str) -> tuple[int, int] | None:
    """(received, sent) bytes of interface ``dev`` in namespace ``ns``, from the kernel's
    counters: every byte that crossed the node's access link, headers and retransmissions
    included. None when the namespace or device is gone."""
    r = ip("-n", ns, "-s", "-j", "link", "show", "dev", dev, check=False)
    try:
        st = json.loads(r.stdout)[0]["stats64"]
        return int(st["rx"]["bytes"]), int(st["tx"]["bytes"])
    except (ValueError, LookupError, TypeError):
        return None


class Netns:
    """One namespace per node, on a bridge in the root namespace (``links=True``) or bare."""

    def __init__(self, n: int, prefix: str = "ssc") -> None:
        self.n = n
        tag = os.getpid() % 100000
        self.tag = tag
        used = ip("-4", "addr").stdout + ip("-4", "route").stdout
        third = next((x for x in [tag % 250, *range(250)] if f"10.231.{x}." not in used), None)
        if third is None:
            raise NetnsError("no free 10.231.x.0/24 subnet")
        self.subnet = f"10.231.{third}"
        self.prefix = prefix
        self.bridge = f"{prefix}br{tag}"
        self.names = [f"{prefix}{tag}n{i}" for i in range(n)]
        self.cut: set[tuple[int, int]] = set()
        self.links = True
        self._up = False

    def ns(self, i: int) -> str:
        return self.names[i]

    def ip(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    def outer(self, i: int) -> str:
        """Node ``i``'s veth end on the bridge (its egress is the node's downlink)."""
        return f"sv{self.tag}o{i}"

    def inner(self, i: int) -> str:
        """Node ``i``'s interface inside its namespace (its egress is the node's uplink)."""
        return f"sv{self.tag}i{i}"

    def up(self, links: bool = True) -> None:
        self._up = True
        self.links = links
        if links:
            ip("link", "add", self.bridge, "type", "bridge")
            ip("addr", "add", f"{self.subnet}.254/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
        for i, ns in enumerate(self.names):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
            if not links:
                continue
            outer, inner = self.outer(i), self.inner(i)
            ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            ip("link", "set", inner, "netns", ns)
            ip("link", "set", outer, "master", self.bridge)
            ip("link", "set", outer, "up")
            ip("-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", inner)
            ip("-n", ns, "link", "set", inner, "up")

    def down(self) -> None:
        if not self._up:
            return
        for ns in self.names:
            ip("netns", "del", ns, check=False)
        if self.links:
            ip("link", "del", self.bridge, check=False)
        self._up = False

    def shape(self, i: int, one_way_ms: float, jitter_ms: float, loss: float, rate_mbit: float) -> None:
        """Node ``i``'s access link with netem: ``one_way_ms`` (± ``jitter_ms``) each way, so
        two nodes see ``2 * (one_way_i + one_way_j)`` of round trip; ``loss`` on the uplink
        only (one draw per packet per direction of a path); ``rate_mbit`` both ways. The queue
        holds far more than a bandwidth-delay product, so losses are the profile's, not tail
        drops."""
        jitter = [f"{jitter_ms:.3f}ms"] if jitter_ms > 0 else []
        common = ["delay", f"{one_way_ms:.3f}ms", *jitter, "rate", f"{rate_mbit:g}mbit", "limit", "100000"]
        tc(self.ns(i), "qdisc", "replace", "dev", self.inner(i), "root", "netem", *common,
           *(["loss", f"{100 * loss:g}%"] if loss > 0 else []))
        tc("", "qdisc", "replace", "dev", self.outer(i), "root", "netem", *common)

    def drop(self, i: int, j: int) -> None:
        ip("-n", self.ns(i), "route", "add", "blackhole", f"{self.ip(j)}/32")
        ip("-n", self.ns(j), "route", "add", "blackhole", f"{self.ip(i)}/32")
        self.cut.add((min(i, j), max(i, j)))

    def heal(self, i: int, j: int) -> None:
        ip("-n", self.ns(i), "route", "del", "blackhole", f"{self.ip(j)}/32", check=False)
        ip("-n", self.ns(j), "route", "del", "blackhole", f"{self.ip(i)}/32", check=False)
        self.cut.discard((min(i, j), max(i, j)))
