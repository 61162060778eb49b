"""The chaos bench's configuration and its launcher of ``seedswarm node`` processes.

:class:`ChaosCluster` is the loopback launcher of ``sim/cluster.py`` with what the chaos bench
adds: nodes in network namespaces (:mod:`seedswarm.bench.netns`) or on loopback ports
that survive a restart, a metrics port per node, restarts from the same data dir, and readers
of what each daemon writes (status.json, rounds.jsonl, node.log, the HTTP endpoints).
:class:`ChaosConfig` lives here because the launcher is built from it.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from seedswarm.bench.hostile_peer import Target, http_get
from seedswarm.bench.netns import Netns
from seedswarm.sim.cluster import Cluster, ClusterConfig

NETNS_PORT = 4001
METRICS_PORT = 9100


@dataclass
class ChaosConfig:
    nodes: int = 8
    minutes: float = 10.0
    seed: int = 0
    out: str = ""
    netns: str = "auto"  # auto | on | off
    fault_every_s: float = 10.0  # mean gap between faults
    hostile_rate: float = 4.0  # hostile actions per second (each one or a few messages)
    join_flood: int = 16  # Joins per flood (two floods per run; 0: none)
    exclude: list[str] = field(default_factory=list)  # hostile kinds or raw pubsub cases to skip
    settle_s: float = 240.0
    split_window_s: float = 5.0
    startup_s: float = 240.0
    quiet: bool = False


def _ports_outside_ephemeral(n: int, rng: random.Random) -> list[int]:
    """Loopback listen ports below the ephemeral range, so that while a node is down no
    outgoing connection can take its port (its restart would then fail: port in use)."""
    out: list[int] = []
    for _ in range(20000):
        if len(out) == n:
            break
        p = rng.randrange(20000, 32000)
        if p in out:
            continue
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                continue
        out.append(p)
    if len(out) < n:
        raise RuntimeError("no free listen ports")
    return out


class ChaosCluster(Cluster):
    """The loopback launcher of ``sim/cluster.py`` with namespaces, metrics ports and restarts."""

    def __init__(self, cfg: ChaosConfig, net: Netns | None, log: TextIO) -> None:
        super().__init__(ClusterConfig(nodes=cfg.nodes, rounds=1, seed=cfg.seed, out=cfg.out, quiet=cfg.quiet), log)
        self.net = net
        self.rng = random.Random(cfg.seed ^ 0x5EED)

    def setup(self) -> None:
        super().setup()
        from seedswarm.crypto.keys import peer_id_of

        n = self.cfg.nodes
        if self.net is not None:
            self.hosts = [self.net.ip(i) for i in range(n)]
            self.ports = [NETNS_PORT] * n
            self.metrics = [(self.net.ip(i), METRICS_PORT) for i in range(n)]
        else:
            self.hosts = ["127.0.0.1"] * n
            ports = _ports_outside_ephemeral(2 * n, self.rng)
            self.ports = ports[:n]
            self.metrics = [("127.0.0.1", p) for p in ports[n:]]
        self.addrs = [f"/ip4/{self.hosts[i]}/tcp/{self.ports[i]}/p2p/{peer_id_of(self.keys[i])}" for i in range(n)]

    def command(self, i: int) -> list[str]:
        n = self.cfg.nodes
        mhost, mport = self.metrics[i]
        cmd = [sys.executable, "-m", "seedswarm", "node", "--genesis", str(self.out / "genesis.json"),
               "--data-dir", str(self.node_dir(i)), "--listen", f"/ip4/{self.hosts[i]}/tcp/{self.ports[i]}",
               "--shard-index", str(i), "--shard-count", str(n), "--checkpoint-every", "10",
               "--checkpoint-chunk-bytes", "4096", "--log-format", "json", "--sync-wait-s", "15",
               "--min-peers", str(n - 1), "--metrics-port", str(mport), "--metrics-host", mhost]
        for j, a in enumerate(self.addrs):
            if j != i:
                cmd += ["--bootstrap", a]
        if self.net is not None:
            cmd = ["ip", "netns", "exec", self.net.ns(i), *cmd]
        return cmd

    def target(self, i: int) -> Target:
        return Target(name=f"node-{i}", addr=self.addrs[i], public_key=self.keys[i])

    def read_status(self, i: int) -> dict[str, Any] | None:
        try:
            d: dict[str, Any] = json.loads((self.node_dir(i) / "status.json").read_text())
        except (OSError, ValueError):
            return None
        p = self.procs.get(i)
        return d if p is not None and d.get("pid") == p.pid else None

    def http(self, i: int, path: str, timeout: float = 2.0) -> bytes | None:
        host, port = self.metrics[i]
        return http_get(f"http://{host}:{port}{path}", timeout)

    def log_text(self, i: int, start: int = 0) -> str:
        try:
            with open(self.node_dir(i) / "node.log", "rb") as f:
                f.seek(start)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_size(self, i: int) -> int:
        try:
            return (self.node_dir(i) / "node.log").stat().st_size
        except OSError:
            return 0

    def log_tail(self, i: int, lines: int = 15, start: int = 0) -> str:
        return "\n".join(self.log_text(i, start).splitlines()[-lines:])

    def last_logged_round(self, i: int) -> int:
        """The last round in rounds.jsonl: the node appended (and fsynced) that many records."""
        last = 0
        with contextlib.suppress(OSError):
            for ln in (self.node_dir(i) / "rounds.jsonl").read_text().splitlines()[-50:]:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    last = int(json.loads(ln)["round"])
        return last

