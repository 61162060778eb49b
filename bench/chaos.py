"""``seedswarm bench chaos``: real daemons under a seeded schedule of faults and hostile traffic.

N ``seedswarm node`` processes (each in its own Linux network namespace when the bench runs as
root with iproute2, else on loopback) train while the bench

* SIGKILLs nodes and restarts them later with the same command (from their data dir),
* pauses nodes (SIGSTOP, then SIGCONT),
* cuts the link between pairs of nodes (namespaces only: a blackhole route each way; the pair
  keeps every other link, so gossip and sync must route around it),
* floods the topic with signed Joins from fresh keys, and
* runs :class:`seedswarm.bench.adversary.Adversary` (every kind in ``adversary.KINDS``).

It never takes more than a minority offline (killed, restarting or paused) at once, and every
daemon is honest (the adversary is an outsider with throwaway identities). At the end it stops
the faults, lets the swarm settle (bounded), and checks: every node runs, all report the same
head and model digest at the same round, the chain stores agree record by record up to the
common head, every killed node restarted with at least the records it had, no daemon exited
unless the bench killed it, and every daemon exits 0 on SIGTERM. Exit code 0 only if all hold.

Everything is read from the daemons' public surface: status.json, rounds.jsonl, chain.log (a
copy, opened with ChainStore), node.log, and the HTTP ``/status`` and ``/metrics`` endpoints.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from seedswarm.bench.adversary import (
    KINDS,
    RAW_PUBSUB_CASES,
    Adversary,
    Target,
    View,
)
from seedswarm.clihelp import parser
from seedswarm.sim.cluster import Cluster, ClusterConfig

NETNS_PORT = 4001
METRICS_PORT = 9100
LAG_ROUNDS = 2  # a node more than this many rounds under the best head is "behind"


# ---------------------------------------------------------------------------------------------
# network namespaces


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


# ---------------------------------------------------------------------------------------------
# configuration and the launcher


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


@dataclass
class NodeState:
    index: int
    phase: str = "starting"  # starting | up | paused | down (killed by us) | crashed
    spawned_at: float = 0.0
    pid: int = 0
    behind_since: float | None = None
    longest_behind_s: float = 0.0
    resume_at: float = 0.0  # when a pause / down period ends
    restart_floor: int | None = None  # rounds it had logged when killed
    restarts: list[dict[str, Any]] = field(default_factory=list)
    caught_up_after_spawn: float | None = None
    crash_streak: int = 0  # consecutive incarnations that exited on their own (restart backoff)
    log_offsets: list[int] = field(default_factory=list)  # node.log size at each spawn


#: Crash signatures: what a crashed incarnation's log says -> a short name for the report. The
#: first three were daemon bugs these benches found (fixed in main: the restart port check, the
#: pubsub guard); they stay here to name a regression at once.
CRASH_SIGNATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("restart refused: listen port in use (TIME_WAIT; the port pre-check regressed?)",
     ("cannot listen on", "ddress")),
    ("pubsub: a garbage RPC stopped the host (DecodeError; the guard regressed?)",
     ("Error parsing message with type 'pubsub.pb.RPC'",)),
    ("pubsub: a garbage key stopped the host (crypto.pb.PublicKey; the guard regressed?)",
     ("Error parsing message with type 'crypto.pb.PublicKey'",)),
    ("the libp2p host failed", ("libp2p host failed",)),
    ("a node task crashed", ("node task crashed",)),
    ("a task failed", ("task ", " failed: ")),
)


def crash_signature(log_text: str) -> str:
    for name, needles in CRASH_SIGNATURES:
        if all(n in log_text for n in needles):
            return name
    return "unknown (see the log tail)"


class ChaosCluster(Cluster):
    """The loopback launcher of ``sim/cluster.py`` with namespaces, metrics ports and restarts."""

    def __init__(self, cfg: ChaosConfig, net: Netns | None, log: TextIO) -> None:
        super().__init__(ClusterConfig(nodes=cfg.nodes, rounds=1, seed=cfg.seed, out=cfg.out, quiet=cfg.quiet), log)
        self.net = net
        self.rng = random.Random(cfg.seed ^ 0x5EED)

    def setup(self) -> None:
        super().setup()
        from seedswarm.crypto.keys import Identity, peer_id_of

        n = self.cfg.nodes
        self.keys = [Identity.load(self.node_dir(i) / "identity.key").public for i in range(n)]
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
        try:
            with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=timeout) as r:
                data: bytes = r.read()
                return data
        except (OSError, ValueError):
            return None

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


#: /metrics counters reported as transport-level refusals (summed over processes).
TRANSPORT_COUNTERS = ("gossip_rejected", "frames_too_large", "protocol_mismatches", "requests_failed",
                      "events_dropped", "handler_errors", "validator_errors", "send_failed_total",
                      "publish_failed_total", "peers_refused")
#: ``seedswarm_core_events{event}`` reported: inputs the core dropped without a rejection
#: (unknown or duplicate records, unknown checkpoints and inputs), its own rejections, sync work.
CORE_EVENTS_REPORTED = ("records.duplicate", "records.orphan", "records.known_bad", "records.held",
                        "checkpoints.missing", "checkpoints.unsolicited", "inputs.unavailable", "banned.",
                        "contributions.ignored", "rejected.", "sync.", "heads.", "equivocations")
_METRIC_RE = re.compile(r"^seedswarm_([a-z_]+)(?:\{([a-z_]+)=\"([^\"]*)\"\})? ([0-9.e+-]+)$")


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC_RE.match(line)
        if m:
            name, _, value, v = m.groups()
            out[f"{name}{{{value}}}" if value is not None else name] = float(v)
    return out


# ---------------------------------------------------------------------------------------------
# the run


class Chaos:
    def __init__(self, cfg: ChaosConfig, log: TextIO = sys.stderr) -> None:
        self.cfg = cfg
        self.log = log
        self.rng = random.Random(cfg.seed)
        self.failures: list[str] = []
        self.notes: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self.crashes: list[dict[str, Any]] = []
        self.status_by_pid: dict[tuple[int, int], dict[str, Any]] = {}
        self.metrics_by_pid: dict[tuple[int, int], dict[str, float]] = {}
        self.heads: dict[int, dict[int, str]] = {}
        self._rounds_offset: dict[int, int] = {}
        self.diverged_since: dict[tuple[int, int], float] = {}
        self.splits: list[dict[str, Any]] = []
        self.best_round = 0
        self.best_at = 0.0
        self.members_peak = 0
        self.round_marks: list[tuple[float, int, int]] = []  # (time, best round, most members seen)
        self.net: Netns | None = None
        self.link_reason: str | None = None
        self.pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="chaos-http")
        self._metrics_future: concurrent.futures.Future[None] | None = None

    def say(self, msg: str) -> None:
        if not self.cfg.quiet:
            print(msg, file=self.log, flush=True)

    # -- faults ---------------------------------------------------------------------------
    def online(self) -> list[int]:
        return [i for i, s in self.nodes.items() if s.phase == "up"]

    def offline_count(self) -> int:
        return sum(1 for s in self.nodes.values() if s.phase != "up")

    def may_take_offline(self) -> list[int]:
        """Nodes we may kill or pause now: a majority of all nodes stays up and synced."""
        n = self.cfg.nodes
        majority = n // 2 + 1
        if len(self.online()) - 1 < majority:
            return []
        return self.online()

    def kill(self, i: int, now: float, down_s: float) -> None:
        st, p = self.nodes[i], self.cl.procs[i]
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(10)
        st.phase, st.resume_at = "down", now + down_s
        st.restart_floor = self.cl.last_logged_round(i)
        st.behind_since = None
        self.counts["kills"] += 1
        self.event("kill", i, down_s=round(down_s, 1), rounds_logged=st.restart_floor)

    def spawn(self, i: int, now: float, why: str) -> None:
        st = self.nodes[i]
        st.log_offsets.append(self.cl.log_size(i))
        self.cl.spawn(i)
        st.phase, st.spawned_at, st.pid = "starting", now, self.cl.procs[i].pid
        st.caught_up_after_spawn = None
        st.behind_since = now
        if why != "start":
            self.counts["restarts"] += 1
            st.restarts.append({"at": now, "why": why, "floor": st.restart_floor, "pid": st.pid,
                                "log_offset": st.log_offsets[-1]})
            self.event("restart", i, why=why)

    def pause(self, i: int, now: float, pause_s: float) -> None:
        st = self.nodes[i]
        with contextlib.suppress(ProcessLookupError):
            self.cl.procs[i].send_signal(signal.SIGSTOP)
        st.phase, st.resume_at = "paused", now + pause_s
        st.behind_since = None
        self.counts["pauses"] += 1
        self.event("pause", i, pause_s=round(pause_s, 1))

    def resume(self, i: int, now: float) -> None:
        st = self.nodes[i]
        with contextlib.suppress(ProcessLookupError):
            self.cl.procs[i].send_signal(signal.SIGCONT)
        st.phase = "up"
        st.behind_since = now
        self.event("resume", i)

    def event(self, what: str, i: int | None = None, **kw: Any) -> None:
        e = {"t": round(time.time() - self.t0, 2), "event": what, **({"node": i} if i is not None else {}), **kw}
        self.events.append(e)
        self.say("  " + " ".join(f"{k}={v}" for k, v in e.items()))

    def draw_faults(self, start: float, end: float) -> list[tuple[float, str]]:
        """The seeded schedule: (time, kind). Targets are drawn when each fault is due."""
        kinds = ["kill", "pause"] + (["link"] if self.net is not None else [])
        weights = [3, 3] + ([3] if self.net is not None else [])
        out: list[tuple[float, str]] = []
        t = start + self.rng.expovariate(1 / self.cfg.fault_every_s)
        while t < end - 5:
            out.append((t, self.rng.choices(kinds, weights)[0]))
            t += self.rng.expovariate(1 / self.cfg.fault_every_s)
        if self.cfg.join_flood > 0:
            for frac in (0.3, 0.65):
                out.append((start + frac * (end - start), "join-flood"))
        return sorted(out)

    def do_fault(self, kind: str, now: float) -> None:
        n = self.cfg.nodes
        if kind == "join-flood":
            self.adversary.join_flood(self.cfg.join_flood)
            self.counts["join_floods"] += 1
            self.event("join-flood", joins=self.cfg.join_flood)
            return
        if kind == "link":
            assert self.net is not None
            free = [(i, j) for i in range(n) for j in range(i + 1, n) if (i, j) not in self.net.cut]
            if len(self.net.cut) >= max(1, n // 3) or not free:
                self.counts["faults_skipped"] += 1
                return
            i, j = self.rng.choice(free)
            dur = self.rng.uniform(5, 30)
            self.net.drop(i, j)
            self.link_heal.append((now + dur, i, j))
            self.counts["link_drops"] += 1
            self.event("link-drop", None, pair=f"{i}-{j}", seconds=round(dur, 1))
            return
        eligible = self.may_take_offline()
        if not eligible:
            self.counts["faults_skipped"] += 1
            return
        i = self.rng.choice(eligible)
        if kind == "kill":
            self.kill(i, now, self.rng.uniform(3, 20))
        else:
            self.pause(i, now, self.rng.uniform(2, 15))

    # -- observation ------------------------------------------------------------------------
    def read_rounds(self, i: int) -> None:
        path = self.cl.node_dir(i) / "rounds.jsonl"
        off = self._rounds_offset.get(i, 0)
        try:
            with open(path, "rb") as f:
                f.seek(off)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n")
        if end < 0:
            return
        self._rounds_offset[i] = off + end + 1
        h = self.heads.setdefault(i, {})
        for ln in data[: end + 1].splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                d = json.loads(ln)
                h[int(d["round"])] = str(d["head"])[:16]
        if len(h) > 4000:
            for r in sorted(h)[:-2000]:
                del h[r]

    def observe(self, now: float) -> dict[int, dict[str, Any]]:
        cfg = self.cfg
        statuses: dict[int, dict[str, Any]] = {}
        for i, st in self.nodes.items():
            p = self.cl.procs.get(i)
            if p is None:
                continue
            if st.phase in ("starting", "up", "paused") and p.poll() is not None:
                self.crashed(i, now, p.returncode)
                continue
            self.read_rounds(i)
            s = self.cl.read_status(i)
            if s is None:
                continue
            statuses[i] = s
            self.status_by_pid[(i, s["pid"])] = s
            if st.phase == "starting" and s.get("state") == "running":
                st.phase = "up"
                st.crash_streak = 0
                self.event("running", i, after_s=round(now - st.spawned_at, 1), round=s.get("round"))
        running = {i: s for i, s in statuses.items() if self.nodes[i].phase == "up"}
        rounds = [int(s["round"]) for s in running.values()]
        if rounds and max(rounds) > self.best_round:
            self.best_round, self.best_at = max(rounds), now
        members = max((int(s.get("members", 0)) for s in running.values()), default=0)
        self.round_marks.append((now, self.best_round, members))
        self.members_peak = max(self.members_peak, members)
        # behind the best head
        for i, st in self.nodes.items():
            if st.phase not in ("up", "starting"):
                continue
            r = int(statuses.get(i, {}).get("round", -1))
            behind = r < self.best_round - LAG_ROUNDS or st.phase == "starting"
            if behind and st.behind_since is None:
                st.behind_since = now
            elif not behind and st.behind_since is not None:
                st.longest_behind_s = max(st.longest_behind_s, now - st.behind_since)
                st.behind_since = None
                if st.caught_up_after_spawn is None:
                    st.caught_up_after_spawn = now - st.spawned_at
        # splits: two running nodes on different heads at the same round for a while
        up = sorted(running)
        for a_i, a in enumerate(up):
            for b in up[a_i + 1:]:
                ha, hb = self.heads.get(a, {}), self.heads.get(b, {})
                ra, rb = max(ha, default=-1), max(hb, default=-1)
                c = min(ra, rb)
                diverged = c >= 0 and c in ha and c in hb and ha[c] != hb[c]
                key = (a, b)
                if diverged:
                    since = self.diverged_since.setdefault(key, now)
                    if now - since > cfg.split_window_s and not any(s["pair"] == key and s["healed_at"] is None for s in self.splits):
                        self.splits.append({"pair": key, "round": c, "since": since - self.t0, "healed_at": None})
                        self.event("split", None, pair=f"{a}-{b}", round=c)
                elif key in self.diverged_since:
                    del self.diverged_since[key]
                    for s in self.splits:
                        if s["pair"] == key and s["healed_at"] is None:
                            s["healed_at"] = now - self.t0
                            self.event("split-healed", None, pair=f"{a}-{b}", after_s=round(now - self.t0 - s["since"], 1))
        return statuses

    def crashed(self, i: int, now: float, rc: int | None) -> None:
        st = self.nodes[i]
        start = st.log_offsets[-1] if st.log_offsets else 0
        sig = crash_signature(self.cl.log_text(i, start))
        self.crashes.append({"node": i, "pid": st.pid, "exit_code": rc, "t": round(now - self.t0, 1), "signature": sig,
                             "log_tail": self.cl.log_tail(i, 25, start)})
        self.event("CRASH", i, exit_code=rc, signature=sig[:60])
        st.phase = "crashed"
        st.behind_since = None
        st.restart_floor = max(st.restart_floor or 0, self.cl.last_logged_round(i))
        # a supervisor restarts it (backoff 2, 4, 8, 16, 30 s): the swarm stays at strength
        st.crash_streak += 1
        st.resume_at = now + min(30.0, 2.0 ** st.crash_streak)

    def rate(self, t0: float, t1: float) -> float | None:
        """Rounds per minute of the best head between t0 and t1 (absolute times)."""
        pts = [(t, r) for t, r, _ in self.round_marks if t0 <= t <= t1]
        if len(pts) < 2 or pts[-1][0] - pts[0][0] < 5:
            return None
        return round(60.0 * (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0]), 1)

    def flood_impact(self) -> list[dict[str, Any]]:
        """Liveness around each Join flood: ghost members sit on committees until expelled."""
        out = []
        for e in (x for x in self.events if x["event"] == "join-flood"):
            t = self.t0 + e["t"]
            after = [m for tt, _, m in self.round_marks if tt >= t]
            out.append({"t": e["t"], "joins": e["joins"], "rounds_per_min_30s_before": self.rate(t - 30, t),
                        "rounds_per_min_60s_after": self.rate(t, t + 60), "members_max_after": max(after, default=None),
                        "members_at_end": after[-1] if after else None})
        return out

    def poll_metrics(self) -> None:
        if self._metrics_future is not None and not self._metrics_future.done():
            return
        targets = [(i, self.nodes[i].pid) for i in self.online()]

        def work() -> None:
            for i, pid in targets:
                body = self.cl.http(i, "/metrics")
                if body is not None:
                    self.metrics_by_pid[(i, pid)] = parse_metrics(body.decode(errors="replace"))

        self._metrics_future = self.pool.submit(work)

    def update_view(self, statuses: dict[int, dict[str, Any]]) -> None:
        online = self.online()
        self.adversary.set_view(View(online=[self.cl.target(i) for i in online],
                                     status={f"node-{i}": statuses[i] for i in online if i in statuses}))

    def progress(self, now: float, end: float) -> None:
        c = self.counts
        phases = Counter(s.phase for s in self.nodes.values())
        cut = len(self.net.cut) if self.net is not None else 0
        left = max(0.0, end - now)
        self.say(f"chaos {now - self.t0:6.0f}s  ETA {int(left) // 60}:{int(left) % 60:02d}  round {self.best_round:5d}  "
                 f"up {phases['up']}/{self.cfg.nodes} paused {phases['paused']} down {phases['down'] + phases['crashed']} "
                 f"starting {phases['starting']} links-cut {cut} | kills {c['kills']} restarts {c['restarts']} "
                 f"pauses {c['pauses']} link-drops {c['link_drops']} floods {c['join_floods']} | "
                 f"hostile {self.adversary.tally.total} | splits {len(self.splits)} crashes {len(self.crashes)}")

    # -- main -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.t0 = time.time()
        if cfg.netns != "off":
            self.link_reason = netns_unavailable()
            if self.link_reason is None:
                self.net = Netns(cfg.nodes)
            elif cfg.netns == "on":
                raise RuntimeError(f"--netns on: {self.link_reason}")
        else:
            self.link_reason = "--netns off"
        if self.net is None:
            self.notes.append(f"link faults skipped: {self.link_reason} (nodes run on loopback)")
            self.say(f"chaos: link faults SKIPPED ({self.link_reason}); nodes run on loopback")
        try:
            if self.net is not None:
                self.net.up()
            return self._run()
        finally:
            with contextlib.suppress(Exception):
                self.cl.stop_all(grace=5.0)
            if self.net is not None:
                self.net.down()
            self.pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.cl = ChaosCluster(cfg, self.net, self.log)
        self.cl.setup()
        g = self.cl.genesis
        self.nodes = {i: NodeState(i) for i in range(cfg.nodes)}
        exclude = list(cfg.exclude)
        self.adversary = Adversary(g.run_id, self.cl.keys, g.directions * g.groups, cfg.seed, rate=cfg.hostile_rate,
                                   exclude=exclude, join_bits=g.join_pow_bits)
        where = f"network namespaces on {self.net.subnet}.0/24" if self.net else "loopback"
        self.say(f"chaos: {cfg.nodes} nodes ({where}), {cfg.minutes:g} min of faults, seed {cfg.seed}, "
                 f"run {g.run_id.hex()[:16]}, out {self.cl.out}")
        now = time.time()
        for i in range(cfg.nodes):
            self.spawn(i, now, "start")
        # start-up: every node running (bounded)
        deadline = now + cfg.startup_s
        last = 0.0
        while time.time() < deadline:
            now = time.time()
            self.observe(now)
            if len(self.online()) == cfg.nodes and self.best_round >= 3:
                break
            if self.crashes and not any(s.phase in ("starting", "up") for s in self.nodes.values()):
                break
            if now - last > 5:
                last = now
                self.say(f"chaos: starting, {len(self.online())}/{cfg.nodes} running, round {self.best_round}")
            time.sleep(0.5)
        else:
            self.failures.append(f"start-up: only {len(self.online())}/{cfg.nodes} nodes running after {cfg.startup_s:.0f} s")
        started = time.time()
        self.join_seconds = {f"node-{i}": round(self.nodes[i].caught_up_after_spawn or math.nan, 1) for i in self.nodes}
        end = started + 60.0 * cfg.minutes
        schedule = self.draw_faults(started, end)
        self.link_heal: list[tuple[float, int, int]] = []
        self.adversary.start()
        self.say(f"chaos: faults start ({len(schedule)} scheduled)")
        last = last_metrics = 0.0
        rounds_at_start = self.best_round
        while time.time() < end:
            now = time.time()
            statuses = self.observe(now)
            for i, s in self.nodes.items():
                if s.phase == "paused" and now >= s.resume_at:
                    self.resume(i, now)
                elif s.phase in ("down", "crashed") and now >= s.resume_at:
                    self.spawn(i, now, "after-kill" if s.phase == "down" else "after-crash")
            for item in [x for x in self.link_heal if x[0] <= now]:
                self.link_heal.remove(item)
                assert self.net is not None
                self.net.heal(item[1], item[2])
                self.event("link-heal", None, pair=f"{item[1]}-{item[2]}")
            while schedule and schedule[0][0] <= now:
                self.do_fault(schedule.pop(0)[1], now)
            self.update_view(statuses)
            if now - last_metrics > 10:
                last_metrics = now
                self.poll_metrics()
            if now - last > 5:
                last = now
                self.progress(now, end)
            time.sleep(0.4)
        fault_rounds = self.best_round - rounds_at_start
        return self.settle_and_check(started, fault_rounds)

    def settle_and_check(self, started: float, fault_rounds: int) -> dict[str, Any]:
        cfg = self.cfg
        self.say("chaos: faults stop; settling")
        self.adversary.stop()
        now = time.time()
        for i, s in self.nodes.items():
            if s.phase == "paused":
                self.resume(i, now)
            elif s.phase in ("down", "crashed"):
                self.spawn(i, now, "settle")
        if self.net is not None:
            for i, j in list(self.net.cut):
                self.net.heal(i, j)
            self.link_heal.clear()
        settle_start = time.time()
        settled = False
        last = 0.0
        while time.time() - settle_start < cfg.settle_s:
            now = time.time()
            st = self.observe(now)
            for i, ns in self.nodes.items():
                if ns.phase == "crashed" and now >= ns.resume_at:
                    self.spawn(i, now, "after-crash")
            up = self.online()
            if len(up) == cfg.nodes and all(i in st for i in up):
                rounds = [int(st[i]["round"]) for i in up]
                if max(rounds) - min(rounds) <= 1:
                    settled = True
                    break
            if now - last > 5:
                last = now
                self.progress(now, now)
            time.sleep(0.5)
        settle_s = time.time() - settle_start
        if not settled:
            lag = {f"node-{i}": (self.nodes[i].phase, (self.cl.read_status(i) or {}).get("round")) for i in self.nodes}
            self.failures.append(f"not settled within {cfg.settle_s:.0f} s: {lag}")
        # the consistent snapshot: every node's live /status at one round
        snapshot, method = self.snapshot()
        agreement = self.check_agreement(snapshot, method)
        # final metrics, then a graceful stop of every node
        self.poll_metrics()
        if self._metrics_future is not None:
            with contextlib.suppress(Exception):
                self._metrics_future.result(timeout=30)
        for i in self.nodes:
            final_st = self.cl.read_status(i)
            if final_st is not None:
                self.status_by_pid[(i, final_st["pid"])] = final_st
        exit_codes = self.stop_all()
        stores = self.check_stores(snapshot)
        restarts = self.check_restarts()
        return self.summary(started, settle_s, settled, snapshot, method, agreement, exit_codes, stores, restarts,
                            fault_rounds)

    def snapshot(self) -> tuple[dict[int, dict[str, Any]], str]:
        """Every node's live ``GET /status``, until all report the same round (bounded)."""
        last: dict[int, dict[str, Any]] = {}
        for _ in range(60):
            futs = {i: self.pool.submit(self.cl.http, i, "/status", 3.0) for i in self.nodes}
            got: dict[int, dict[str, Any]] = {}
            for i, f in futs.items():
                with contextlib.suppress(Exception):
                    body = f.result(timeout=10)
                    if body:
                        got[i] = json.loads(body)
            last = got
            if len(got) == len(self.nodes) and len({int(s["round"]) for s in got.values()}) == 1:
                return got, "same-round /status snapshot"
            time.sleep(0.3)
        return last, "latest /status (rounds differed in every attempt)"

    def check_agreement(self, snap: dict[int, dict[str, Any]], method: str) -> dict[str, Any]:
        missing = [i for i in self.nodes if i not in snap]
        if missing:
            self.failures.append(f"no /status from node(s) {missing} at the end")
        by_round: dict[int, list[int]] = {}
        for i, s in snap.items():
            by_round.setdefault(int(s["round"]), []).append(i)
        mismatches = []
        for r, ids in by_round.items():
            heads = {snap[i]["head"] for i in ids}
            digests = {snap[i]["model_digest"] for i in ids}
            if len(heads) > 1 or len(digests) > 1:
                mismatches.append({"round": r, "heads": {f"node-{i}": snap[i]["head"][:16] for i in ids},
                                   "digests": {f"node-{i}": snap[i]["model_digest"][:16] for i in ids}})
        if len(by_round) > 1:  # compare the heads of the lower rounds in the leaders' rounds.jsonl
            low = min(by_round)
            for i in self.nodes:
                self.read_rounds(i)
            for ids in by_round.values():
                for i in ids:
                    h = self.heads.get(i, {}).get(low)
                    ref = snap[by_round[low][0]]["head"][:16]
                    if h is not None and h != ref:
                        mismatches.append({"round": low, "node": f"node-{i}", "head": h, "expected": ref})
        if mismatches:
            self.failures.append(f"honest nodes disagree: {mismatches}")
        s0 = next(iter(snap.values()), {})
        return {"method": method, "rounds": sorted(by_round), "head": s0.get("head", "")[:16],
                "model_digest": s0.get("model_digest", "")[:16], "mismatches": mismatches}

    def stop_all(self) -> dict[str, int | None]:
        for p in self.cl.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGCONT)
        codes = self.cl.stop_all(grace=15.0)
        for i, c in codes.items():
            if c != 0 and self.nodes[i].phase in ("up", "starting", "paused"):
                start = self.nodes[i].log_offsets[-1] if self.nodes[i].log_offsets else 0
                self.crashes.append({"node": i, "exit_code": c, "t": "shutdown", "signature": f"exit {c} on SIGTERM (expected 0)",
                                     "log_tail": self.cl.log_tail(i, 25, start)})
        return {f"node-{i}": c for i, c in codes.items()}

    def check_stores(self, snap: dict[int, dict[str, Any]]) -> dict[str, Any]:
        from seedswarm.node.daemon.store import ChainStore

        stores: dict[int, list[bytes]] = {}
        holes: dict[str, list[int]] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for i in self.nodes:
                src = self.cl.node_dir(i) / "chain.log"
                dst = Path(tmp) / f"chain-{i}.log"
                try:
                    shutil.copyfile(src, dst)
                    cs = ChainStore(dst, self.cl.genesis.run_id)
                    stores[i] = cs.records()
                    if cs.holes():
                        holes[f"node-{i}"] = cs.holes()[:16]
                except Exception as e:  # noqa: BLE001 - reported as a failure
                    self.failures.append(f"node-{i}: cannot read its chain store: {e}")
        if not stores:
            return {}
        if holes:
            self.failures.append(f"chain stores with holes after a clean stop (rounds never re-fetched): {holes}")
        lengths = {i: len(s) for i, s in stores.items()}
        common = min(lengths.values())
        longest = max(stores.values(), key=len)
        diff: list[str] = []
        for i, s in stores.items():
            for r in range(len(s)):
                if r < len(longest) and s[r] != longest[r]:
                    diff.append(f"node-{i} round {r}")
                    break
        if diff:
            self.failures.append(f"chain stores differ (first differing record per node): {diff}")
        lost = {f"node-{i}": (lengths[i], int(snap[i]["round"])) for i in stores if i in snap and lengths[i] < int(snap[i]["round"])}
        if lost:
            self.failures.append(f"stores shorter than the round the node reported (records lost): {lost}")
        return {"lengths": {f"node-{i}": n for i, n in sorted(lengths.items())}, "common_head": common,
                "compared_rounds": common, "first_differences": diff, "holes": holes,
                "joins": self.joins_in(longest)}

    def joins_in(self, records: list[bytes]) -> dict[str, int]:
        """Public key (hex) -> round of the record that admitted it, over a chain's records."""
        from seedswarm.gossip.wire import Join, Record, WireError, decode_as

        run = self.cl.genesis.run_id
        out: dict[str, int] = {}
        for data in records:
            with contextlib.suppress(WireError):
                rec = decode_as(data, Record, run)
                for j in rec.joins:
                    with contextlib.suppress(WireError):
                        out[decode_as(j, Join, run).peer.hex()] = rec.round
        return out

    def flood_report(self, stores: dict[str, Any], rejected: Counter[str]) -> dict[str, Any]:
        """Each Join flood: what it cost, how many of its Joins a record admitted, and the
        refusals (``no-admission``: work short of the chain's difficulty at arrival; the rest
        of a flood is dropped from the pending set once admitted Joins raise the difficulty)."""
        joins = stores.get("joins", {}) if stores else {}
        floods = []
        for f in self.adversary.floods:
            admitted = sorted(joins[k.hex()] for k in f.keys if k.hex() in joins)
            floods.append({"round": f.round, "joins": len(f.keys), "bits": f.bits, "work_s": f.work_s,
                           "sent": f.outcome, "target": f.target, "admitted": len(admitted),
                           "admitted_in_rounds": admitted})
        return {"floods": floods, "admitted_total": sum(x["admitted"] for x in floods),
                "sent_total": sum(x["joins"] for x in floods),
                "no_admission_rejections": int(rejected.get("no-admission", 0)),
                "max_joins_per_record": self.cl.genesis.max_joins}

    def check_restarts(self) -> list[dict[str, Any]]:
        """A killed node restarts with at least the records it had logged (invariant 5).

        Each incarnation's part of node.log starts at the offset recorded when it was spawned;
        its "local chain at round N" line says how many records it found in its store.
        """
        out = []
        pat = re.compile(r"local chain at round (\d+)")
        for i, st in self.nodes.items():
            try:
                raw = (self.cl.node_dir(i) / "node.log").read_bytes()
            except OSError:
                raw = b""
            for rs in st.restarts:
                start = rs["log_offset"]
                later = [o for o in st.log_offsets if o > start]
                m = pat.search(raw[start: later[0] if later else None].decode(errors="replace"))
                local = int(m.group(1)) if m else None
                floor = rs.get("floor")
                ok = None if local is None else (floor is None or local >= floor)
                out.append({"node": i, "why": rs["why"], "rounds_logged_before": floor,
                            "local_chain_at_restart": local, "ok": ok})
                if ok is False:
                    self.failures.append(f"node-{i} restarted on {local} records but had logged {floor}: records lost")
        return out

    def summary(self, started: float, settle_s: float, settled: bool, snap: dict[int, dict[str, Any]], method: str,
                agreement: dict[str, Any], exit_codes: dict[str, int | None], stores: dict[str, Any],
                restarts: list[dict[str, Any]], fault_rounds: int) -> dict[str, Any]:
        cfg = self.cfg
        rejected: Counter[str] = Counter()
        last_by_pid: dict[tuple[int, int], dict[str, Any]] = self.status_by_pid
        for s in last_by_pid.values():
            for k, v in (s.get("rejected") or {}).items():
                rejected[k] += int(v)
        sync: Counter[str] = Counter()
        store_damage: Counter[str] = Counter()
        for s in last_by_pid.values():
            for k, v in (s.get("sync") or {}).items():
                if k != "behind" and isinstance(v, int):
                    sync[k] += v
            st_ = s.get("store") or {}
            store_damage["damaged_on_open"] += int(st_.get("damaged") or 0)
            store_damage["holes"] += len(st_.get("holes") or [])
            store_damage["archived_on_resync"] += len(st_.get("archived") or [])
        transport: Counter[str] = Counter()
        dropped: Counter[str] = Counter()
        core: Counter[str] = Counter()
        bans = 0
        for m in self.metrics_by_pid.values():
            for k, v in m.items():
                if k.startswith("gossip_dropped{"):
                    dropped[k[len("gossip_dropped{"):-1]] += int(v)
                elif k.startswith("core_events{"):
                    core[k[len("core_events{"):-1]] += int(v)
                elif k == "bans_total":
                    bans += int(v)
                elif k.startswith(TRANSPORT_COUNTERS):
                    transport[k] += int(v)
        sent, outcomes = self.adversary.tally.snapshot()
        behind = {f"node-{i}": round(max(s.longest_behind_s, (time.time() - s.behind_since) if s.behind_since else 0.0), 1)
                  for i, s in self.nodes.items()}
        rejoin = [round(s.caught_up_after_spawn, 1) for s in self.nodes.values() if s.restarts and s.caught_up_after_spawn]
        spawn_to_running = [e["after_s"] for e in self.events if e["event"] == "running"]
        agreeing = {i for i in snap if not any(f"node-{i}" in json.dumps(m) for m in agreement["mismatches"])} if settled else set()
        kills_survived = sum(1 for e in self.events if e["event"] == "kill" and e.get("node") in agreeing)
        by_sig = Counter(c.get("signature", "unclean shutdown") for c in self.crashes)
        for sig, n in by_sig.items():
            nodes = sorted({c["node"] for c in self.crashes if c.get("signature", "unclean shutdown") == sig})
            self.failures.append(f"{n} daemon exit(s) the bench did not cause, nodes {nodes}: {sig}")
        fault_s = max(1.0, 60.0 * cfg.minutes)
        return {
            "join_flood_impact": self.flood_impact(),
            "join_floods": self.flood_report(stores, rejected),
            "ok": not self.failures,
            "failures": self.failures,
            "notes": self.notes,
            "nodes": cfg.nodes,
            "honest_nodes": cfg.nodes,
            "adversary": "outside the swarm: throwaway identities, never a member",
            "transport": f"libp2p over {'network namespaces (link faults on)' if self.net else 'loopback (link faults off)'}",
            "minutes": cfg.minutes,
            "seed": cfg.seed,
            "rounds_during_faults": fault_rounds,
            "rounds_per_minute_during_faults": round(fault_rounds / (fault_s / 60.0), 1),
            "final_round": agreement.get("rounds", [None])[-1] if agreement.get("rounds") else None,
            "agreement": agreement,
            "stores": stores,
            "settled": settled,
            "settle_seconds": round(settle_s, 1),
            "faults": {"kills": self.counts["kills"], "kills_survived": kills_survived,
                       "restarts": self.counts["restarts"], "pauses": self.counts["pauses"],
                       "link_drops": self.counts["link_drops"], "join_floods": self.counts["join_floods"],
                       "faults_skipped_to_keep_a_majority": self.counts["faults_skipped"]},
            "hostile_sent_by_kind": dict(sorted(sent.items())),
            "hostile_sent_total": sum(sent.values()),
            "hostile_outcomes": dict(sorted(outcomes.items())),
            "adversary_identities": self.adversary.rotations,
            "adversary_errors": dict(self.adversary.errors),
            "rejected_by_reason": dict(sorted(rejected.items())),
            "transport_counters": dict(sorted(transport.items())),
            "gossip_dropped_by_reason": dict(sorted(dropped.items())),
            "core_events": {k: v for k, v in sorted(core.items()) if k.startswith(CORE_EVENTS_REPORTED)},
            "bans_total": bans,
            "sync": dict(sorted(sync.items())),
            "store_damage": dict(store_damage),
            "splits": {"detected": len(self.splits), "healed": sum(1 for s in self.splits if s["healed_at"] is not None),
                       "window_s": cfg.split_window_s, "list": self.splits},
            "longest_behind_s": max(behind.values(), default=0.0),
            "behind_s_by_node": behind,
            "join_seconds_initial": self.join_seconds,
            "spawn_to_running_s": spawn_to_running,
            "restart_to_caught_up_s": rejoin,
            "members_peak": self.members_peak,
            "members_final": {f"node-{i}": s.get("members") for i, s in sorted(snap.items())},
            "restarts_checked": restarts,
            "crashes": self.crashes,
            "crashes_by_signature": dict(by_sig),
            "exit_codes": exit_codes,
            "events": self.events,
            "out": str(self.cl.out),
            "wall_seconds": round(time.time() - self.t0, 1),
        }


# ---------------------------------------------------------------------------------------------
# output


def table(s: dict[str, Any]) -> str:
    f = s["faults"]
    lines = [
        f"seedswarm bench chaos: {s['nodes']} nodes, {s['minutes']:g} min of faults, seed {s['seed']}  ({s['transport']})",
        "",
        f"{'RESULT':28s} {'PASS' if s['ok'] else 'FAIL'}",
    ]
    for x in s["failures"]:
        lines.append(f"  FAILURE: {x}")
    for x in s["notes"]:
        lines.append(f"  note: {x}")
    a = s["agreement"]
    st = s["stores"]
    lines += [
        f"{'same head and model':28s} {'yes' if not a['mismatches'] and s['settled'] else 'NO'}  "
        f"(round {a['rounds']}, head {a['head']}, model {a['model_digest']}; {a['method']})",
        f"{'chain stores agree':28s} {'yes' if st and not st.get('first_differences') else 'NO'}  "
        f"(records compared: {st.get('compared_rounds')}, lengths {st.get('lengths')})",
        f"{'restarts kept their records':28s} {sum(r['ok'] is True for r in s['restarts_checked'])}/"
        f"{sum(r['ok'] is not None for r in s['restarts_checked'])} (restarts that opened their store)",
        f"{'crashed daemons':28s} {len(s['crashes'])}" + "".join(f"\n  {n:3d} x {k}" for k, n in s["crashes_by_signature"].items()),
        f"{'settled in':28s} {s['settle_seconds']} s",
        "",
        f"{'kills (survived)':28s} {f['kills']} ({f['kills_survived']})",
        f"{'restarts':28s} {f['restarts']}",
        f"{'pauses':28s} {f['pauses']}",
        f"{'link drops':28s} {f['link_drops']}",
        f"{'join floods':28s} {f['join_floods']}  (members peak {s['members_peak']})"
        + "".join(f"\n  flood at {x['t']:.0f} s: {x['joins']} joins, rounds/min {x['rounds_per_min_30s_before']} before -> "
                  f"{x['rounds_per_min_60s_after']} in the next minute, members up to {x['members_max_after']}, "
                  f"{x['members_at_end']} at the end" for x in s["join_flood_impact"])
        + "".join(f"\n  flood at round {x['round']}: {x['joins']} joins with {x['bits']} bits of work ({x['work_s']} s "
                  f"to compute), {x['admitted']} admitted (rounds {x['admitted_in_rounds']})"
                  for x in s["join_floods"]["floods"])
        + f"\n  no-admission rejections {s['join_floods']['no_admission_rejections']}",
        f"{'faults skipped (majority)':28s} {f['faults_skipped_to_keep_a_majority']}",
        f"{'rounds during faults':28s} {s['rounds_during_faults']} ({s['rounds_per_minute_during_faults']}/min)",
        f"{'splits detected / healed':28s} {s['splits']['detected']} / {s['splits']['healed']}  (status.json sync, "
        f"sum over processes: {s['sync']})",
        f"{'store damage':28s} {s['store_damage']}",
        f"{'longest behind the best':28s} {s['longest_behind_s']} s",
        f"{'initial join (s)':28s} {s['join_seconds_initial']}",
        f"{'restart -> caught up (s)':28s} {s['restart_to_caught_up_s']}",
        "",
        f"hostile messages sent: {s['hostile_sent_total']} ({s['adversary_identities']} identities)",
    ]
    for k, v in s["hostile_sent_by_kind"].items():
        lines.append(f"  {k:36s} {v}")
    lines.append("rejected by the daemons (sum over processes, status.json `rejected`):")
    for k, v in s["rejected_by_reason"].items():
        lines.append(f"  {k:36s} {v}")
    lines.append("transport-level refusals (/metrics, sum over processes):")
    for k, v in s["transport_counters"].items():
        lines.append(f"  {k:36s} {v}")
    lines.append("pubsub guard drops (gossip_dropped{reason}, sum over processes):")
    for k, v in s["gossip_dropped_by_reason"].items():
        lines.append(f"  {k:36s} {v}")
    lines.append(f"core events (core_events{{event}}, sum over processes; bans {s['bans_total']}):")
    for k, v in s["core_events"].items():
        lines.append(f"  {k:36s} {v}")
    shown: set[str] = set()
    for c in s["crashes"]:  # one log tail per signature: the others are alike
        sig = c.get("signature", "")
        if sig in shown:
            continue
        shown.add(sig)
        lines += ["", f"CRASH node-{c['node']} exit {c['exit_code']} at {c['t']} s ({sig}); log tail:", c["log_tail"]]
    lines.append(f"\nout: {s['out']} (node logs in nodes/*/node.log)  wall {s['wall_seconds']} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``seedswarm bench chaos``."""
    d = ChaosConfig()
    ap = parser("seedswarm bench chaos",
                "Real daemons under seeded kills, pauses, link drops, Join floods and hostile traffic; checks "
                "at the end that every node agrees on one head, the chain stores are identical and no daemon "
                "crashed.",
                ["seedswarm bench chaos --nodes 8 --minutes 10 --json",
                 "seedswarm bench chaos --nodes 4 --minutes 2 --netns off --exclude slow-stream"])
    ap.add_argument("--nodes", type=int, default=d.nodes, help="honest daemons (at least 3)")
    ap.add_argument("--minutes", type=float, default=d.minutes, help="minutes of faults")
    ap.add_argument("--seed", type=int, default=d.seed, help="seed of the fault schedule and the hostile traffic")
    ap.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    ap.add_argument("--out", default=None, help="output folder (default: runs/chaos-<time>)")
    ap.add_argument("--netns", choices=("auto", "on", "off"), default=d.netns,
                    help="run nodes in network namespaces (needed for link drops; auto: when root)")
    ap.add_argument("--fault-every", type=float, default=d.fault_every_s, help="mean seconds between faults")
    ap.add_argument("--hostile-rate", type=float, default=d.hostile_rate, help="hostile actions per second")
    ap.add_argument("--join-flood", type=int, default=d.join_flood, help="Joins per flood (two floods; 0: none)")
    ap.add_argument("--exclude", default="", metavar="KIND,...",
                    help=f"hostile kinds or raw pubsub cases to skip (default: none; kinds: {', '.join(KINDS)}; "
                         f"cases: {', '.join(RAW_PUBSUB_CASES)})")
    ap.add_argument("--settle", type=float, default=d.settle_s, help="seconds allowed to settle after the faults")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    if args.nodes < 3:
        print("seedswarm bench chaos: --nodes must be at least 3", file=sys.stderr)
        return 2
    if args.minutes <= 0:
        print("seedswarm bench chaos: --minutes must be positive", file=sys.stderr)
        return 2
    out = args.out or str(Path("runs") / time.strftime("chaos-%Y%m%d-%H%M%S"))
    cfg = ChaosConfig(nodes=args.nodes, minutes=args.minutes, seed=args.seed, out=out, netns=args.netns,
                      fault_every_s=args.fault_every, hostile_rate=args.hostile_rate, join_flood=args.join_flood,
                      exclude=[x for x in args.exclude.split(",") if x], settle_s=args.settle, quiet=args.quiet)
    chaos = Chaos(cfg)
    old = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        summary = chaos.run()
    except KeyboardInterrupt:
        print("seedswarm bench chaos: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one clear line
        print(f"seedswarm bench chaos: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, old)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "chaos.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        print(table(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

