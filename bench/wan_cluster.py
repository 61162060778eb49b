"""The launcher of ``seedswarm bench wan``: ``seedswarm cluster``'s daemons, one per namespace.

:class:`WanCluster` is the loopback launcher of ``sim/cluster.py`` (same daemons, same genesis,
same end condition: every node at ``--rounds`` on one head, same summary) with each node
listening on its own namespace's address, started under ``ip netns exec``, plus what only a
real link shows: the bytes at each node's interface and each daemon's CPU seconds, sampled
once every node has applied a few rounds (so start-up, torch imports and the initial sync are
left out) and again just before the daemons are stopped.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, TextIO

from seedswarm.bench.netns import Netns, link_bytes
from seedswarm.bench.wan_profile import HostLink
from seedswarm.sim.cluster import Cluster, ClusterConfig

LISTEN_PORT = 4001
WARMUP_ROUNDS = 3  # rounds every node must have applied before the measured window opens


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of process ``pid`` so far (from /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    """One node's counters at one instant of the run."""

    t: float
    round: int
    link_rx: int
    link_tx: int
    transport_sent: int
    cpu: float


class WanCluster(Cluster):
    """``seedswarm cluster`` with each daemon in its namespace behind an emulated access link."""

    def __init__(self, cfg: ClusterConfig, net: Netns, dev: list[str], links: list[HostLink], log: TextIO) -> None:
        super().__init__(cfg, log)
        self.net = net
        self.dev = dev  # each node's interface inside its namespace (a veth end or a TUN device)
        self.links = links
        self.base: dict[int, Sample] = {}
        self.end: dict[int, Sample] = {}
        self.cpu_total: dict[int, float] = {}
        self.final: dict[int, dict[str, Any]] = {}  # each node's last status before the stop

    def place(self, peer_ids: list[str]) -> None:
        self.hosts = [self.net.ip(i) for i in range(len(peer_ids))]
        self.ports = [LISTEN_PORT] * len(peer_ids)
        self.addrs = [f"/ip4/{h}/tcp/{LISTEN_PORT}/p2p/{pid}" for h, pid in zip(self.hosts, peer_ids, strict=True)]

    def command(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.net.ns(i), *super().command(i)]

    def header(self) -> str:
        return super().header().replace("on 127.0.0.1", f"in network namespaces on {self.net.subnet}.0/24")

    def sample(self, i: int, status: dict[str, Any]) -> Sample | None:
        p = self.procs.get(i)
        lb = link_bytes(self.net.ns(i), self.dev[i])
        cpu = cpu_seconds(p.pid) if p is not None else None
        if lb is None or cpu is None:
            return None
        return Sample(time.time(), int(status["round"]), lb[0], lb[1], int(status.get("bytes_sent", 0)), cpu)

    def statuses(self) -> dict[int, dict[str, Any]]:
        st = super().statuses()
        if not self.base and len(st) == self.cfg.nodes and \
                min(int(d["round"]) for d in st.values()) >= WARMUP_ROUNDS:
            for i, d in st.items():
                if (s := self.sample(i, d)) is not None:
                    self.base[i] = s
        return st

    def stop_all(self, grace: float = 10.0) -> dict[int, int | None]:
        st = super().statuses()
        self.final.update(st)
        for i, d in st.items():
            if (s := self.sample(i, d)) is not None:
                self.end[i] = s
        for i, p in self.procs.items():
            if (c := cpu_seconds(p.pid)) is not None:
                self.cpu_total[i] = c
        return super().stop_all(grace)

    def window(self) -> dict[str, Any]:
        """Per node and per round over the measured window: link and transport bytes, CPU."""
        rows: dict[str, dict[str, float]] = {}
        for i, b in sorted(self.base.items()):
            e = self.end.get(i)
            if e is None or e.round <= b.round:
                continue
            n = e.round - b.round
            rows[f"node-{i}"] = {
                "rounds": n,
                "link_bytes_sent_per_round": round((e.link_tx - b.link_tx) / n, 1),
                "link_bytes_received_per_round": round((e.link_rx - b.link_rx) / n, 1),
                "transport_bytes_sent_per_round": round((e.transport_sent - b.transport_sent) / n, 1),
                "cpu_seconds_per_round": round((e.cpu - b.cpu) / n, 4),
                "cpu_share": round((e.cpu - b.cpu) / max(1e-9, e.t - b.t), 3),
            }
        return rows
