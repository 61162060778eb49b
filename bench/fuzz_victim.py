"""The fuzzer's victim, one ``seedswarm node`` process, and the state the fuzzer keeps.

:class:`FuzzVictim` starts the daemon (``seedswarm init``, then ``seedswarm node`` on loopback
with a metrics port), reads it the way an operator would (``/status``, ``/metrics``, its RSS
from ``/proc``, its log) and stops it with SIGTERM. It is the base of
:class:`seedswarm.bench.fuzz.Fuzzer`, whose other parts (messages, lanes, report) each live in
their own module; so it also holds the counters they share. :class:`FuzzConfig` and
:class:`Context` (what the fuzzer knows about the victim's run) live here for the same reason.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seedswarm.bench.chaos_observe import parse_metrics
from seedswarm.bench.hostile_peer import Tally, Target, http_get
from seedswarm.bench.mutator import Mutator
from seedswarm.crypto.keys import Identity, peer_id_of
from seedswarm.gossip.wire import CheckpointManifest
from seedswarm.node.daemon.traffic import gossip_validator


@dataclass
class FuzzConfig:
    messages: int = 100_000
    seed: int = 0
    out: str = ""
    raw_frames: bool = True
    direct_workers: int = 6
    streams_per_worker: int = 3
    deep_share: float = 0.15  # share of gossip messages that reach the core (the rest: broken envelopes)
    gossip_rate: float = 700.0  # gossip messages written per second, all sessions together
    rss_limit_mb: float = 50.0
    warmup_s: float = 15.0
    drain_s: float = 120.0
    timeout_s: float = 3600.0
    quiet: bool = False


@dataclass
class Context:
    """What the fuzzer knows about the victim: enough to build valid messages of its run."""

    run_id: bytes
    target: Target
    directions: int
    round: int = 0
    head: bytes = b""
    records: list[bytes] = field(default_factory=list)
    record_hashes: list[bytes] = field(default_factory=list)
    manifest: CheckpointManifest | None = None


class FuzzVictim:
    """The fuzzer's state and its daemon; the base of the fuzzer's mixins."""

    def __init__(self, cfg: FuzzConfig, log: Any = sys.stderr) -> None:
        self.cfg = cfg
        self.log = log
        self.rng = random.Random(cfg.seed)
        self.mut = Mutator(random.Random(cfg.seed + 1))
        self.tally = Tally()
        self.ops: Counter[str] = Counter()
        self.rss: list[tuple[float, float]] = []
        self.rounds: list[tuple[float, int]] = []
        self.identities = 0
        self.errors: Counter[str] = Counter()
        self.phase = "setup"
        self.waiting: dict[str, tuple[int, threading.Event]] = {}  # lane -> (messages, release)
        self.consumed: dict[str, float] = {}
        self.stalled: set[str] = set()
        self.slowest_metrics_poll_s = 0.0  # the longest the node took to answer /metrics (gossip_accounting)

    def say(self, msg: str) -> None:
        if not self.cfg.quiet:
            print(msg, file=self.log, flush=True)

    def start_daemon(self) -> None:
        from seedswarm import cli
        from seedswarm.node.core.genesis import Genesis
        from seedswarm.sim.cluster import free_ports

        out = Path(self.cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        self.genesis_path, self.data = out / "genesis.json", out / "node"
        if self.data.exists():
            raise RuntimeError(f"{self.data} exists: use a new --out folder")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            rc = cli.main(["init", "--out", str(self.genesis_path), "--data-dir", str(self.data), "--trainers", "4",
                           "--seed", str(self.cfg.seed)])
        if rc != 0:
            raise RuntimeError("seedswarm init failed")
        g = Genesis.load(self.genesis_path)
        port, self.metrics_port = free_ports(2)
        key = Identity.load(self.data / "identity.key").public
        self.validator = gossip_validator(g.run_id)
        self.ctx = Context(run_id=g.run_id, directions=g.directions * g.groups,
                           target=Target("victim", f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id_of(key)}", key))
        self.logf = open(out / "node.log", "ab")  # noqa: SIM115 - closed in stop_daemon
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "seedswarm", "node", "--genesis", str(self.genesis_path), "--data-dir", str(self.data),
             "--listen", f"/ip4/127.0.0.1/tcp/{port}", "--metrics-port", str(self.metrics_port), "--log-format", "json"],
            stdin=subprocess.DEVNULL, stdout=self.logf, stderr=self.logf, env=env, start_new_session=True)

    def http(self, path: str, timeout: float = 5.0) -> bytes | None:
        return http_get(f"http://127.0.0.1:{self.metrics_port}{path}", timeout)

    def status(self) -> dict[str, Any] | None:
        body = self.http("/status")
        with contextlib.suppress(ValueError, TypeError):
            return dict(json.loads(body)) if body else None
        return None

    def metrics(self) -> dict[str, float]:
        body = self.http("/metrics")
        return parse_metrics(body.decode(errors="replace")) if body else {}

    def rss_mb(self) -> float | None:
        try:
            for ln in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if ln.startswith("VmRSS:"):
                    return int(ln.split()[1]) / 1024.0
        except OSError:
            return None
        return None

    def stop_daemon(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        self.logf.close()
        return self.proc.returncode

    def log_tail(self, n: int = 25) -> str:
        try:
            return "\n".join((Path(self.cfg.out) / "node.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""
