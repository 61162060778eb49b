"""What the chaos bench knows while it runs: per node (:class:`NodeState`) and in all
(:class:`ChaosState`).

The bench (:class:`seedswarm.bench.chaos.Chaos`) is one object assembled from mixins, one per
concern, each in its own module: faults (:mod:`~seedswarm.bench.chaos_faults`), observation
(:mod:`~seedswarm.bench.chaos_observe`), end checks (:mod:`~seedswarm.bench.chaos_checks`) and
the report (:mod:`~seedswarm.bench.chaos_report`). They share this base: its state, the event
log and the list of running nodes.
"""

from __future__ import annotations

import concurrent.futures
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO

from seedswarm.bench.adversary import Adversary
from seedswarm.bench.chaos_cluster import ChaosCluster, ChaosConfig
from seedswarm.bench.netns import Netns


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


class ChaosState:
    """The bench's state, shared by its mixins (the attributes declared below are set by
    :meth:`seedswarm.bench.chaos.Chaos.run`)."""

    t0: float
    cl: ChaosCluster
    nodes: dict[int, NodeState]
    adversary: Adversary
    link_heal: list[tuple[float, int, int]]
    join_seconds: dict[str, float]

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
        self.pool = concurrent.futures.ThreadPoolExecutor(cfg.nodes + 2, thread_name_prefix="chaos-http")
        self._metrics_future: concurrent.futures.Future[None] | None = None

    def say(self, msg: str) -> None:
        if not self.cfg.quiet:
            print(msg, file=self.log, flush=True)

    def online(self) -> list[int]:
        return [i for i, s in self.nodes.items() if s.phase == "up"]

    def offline_count(self) -> int:
        return sum(1 for s in self.nodes.values() if s.phase != "up")

    def event(self, what: str, i: int | None = None, **kw: Any) -> None:
        e = {"t": round(time.time() - self.t0, 2), "event": what, **({"node": i} if i is not None else {}), **kw}
        self.events.append(e)
        self.say("  " + " ".join(f"{k}={v}" for k, v in e.items()))
