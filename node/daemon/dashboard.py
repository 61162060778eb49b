"""The daemon's live dashboard: ``GET /`` serves the page (``seedswarm.node.report``), which polls
``GET /status`` and ``GET /history?since=SEQ``.

:class:`History` keeps the last ``maxlen`` per-round rows in memory (bounded: a node that runs
for weeks keeps the same few hundred kilobytes), the same rows the daemon appends to
``rounds.jsonl``: round, wall time, bytes sent and received at the transport, members, peers,
and on evaluated rounds the evaluation (``accuracy``, ``loss``, ...). Each row gets a sequence
number so the page asks only for the rows it has not seen.
"""

from __future__ import annotations

import collections
import json
from typing import Any, Protocol

from seedswarm.gossip.transport import Transport
from seedswarm.node.core.genesis import Genesis
from seedswarm.node.daemon.config import NodeConfig
from seedswarm.node.daemon.metrics import Handler
from seedswarm.node.learn.taskcommon import task_metric
from seedswarm.node.report.page import finite, render, settings_line


class History:
    """The last ``maxlen`` rows, numbered."""

    def __init__(self, maxlen: int = 4000) -> None:
        self.rows: collections.deque[dict[str, Any]] = collections.deque(maxlen=maxlen)
        self.seq = -1

    def add(self, row: dict[str, Any]) -> None:
        self.seq += 1
        self.rows.append({**row, "seq": self.seq})

    def since(self, seq: int, limit: int = 5000) -> list[dict[str, Any]]:
        out = [r for r in self.rows if r["seq"] > seq]
        return out[-limit:]


class Daemon(Protocol):
    """The parts of the daemon the dashboard reads."""

    cfg: NodeConfig
    genesis: Genesis
    task: Any
    transport: Transport | None
    evaluation: dict[str, float]
    history: History
    peer_id: str
    run_id: bytes


def round_row(d: Daemon, r: int, now: float, members: int, evaluated: bool) -> dict[str, Any]:
    """One round's row (for ``rounds.jsonl`` and the history), after the round was applied."""
    t = d.transport
    s = t.stats if t is not None else None
    row: dict[str, Any] = {"round": r, "t": now, "sent": getattr(s, "transport_bytes_sent", 0),
                           "recv": getattr(s, "transport_bytes_received", 0), "members": members,
                           "peers": len(t.peers()) if t is not None and t.running else 0}
    if evaluated:
        row.update(d.evaluation)
    return row


def meta(d: Daemon) -> dict[str, Any]:
    """What the page says about the run: title, task metric and its target, key settings."""
    g = d.genesis
    m = task_metric(d.task)
    settings = {"estimator": g.estimator, "trainers": g.trainers, "directions": g.directions, "groups": g.groups,
                "aggregator": g.aggregator_rule, "lr": g.lr, "batch_size": g.batch_size}
    return {"title": f"seedswarm node {d.peer_id[:16]}\u2026 (run {d.run_id.hex()[:16]})",
            "subtitle": settings_line(g.task, dict(g.task_options), "seedswarm", settings)
            + (f"; evaluated every {d.cfg.eval_every} rounds" if d.cfg.eval_every else "; evaluated when halting"),
            "metric": m.key, "higher_is_better": m.higher_is_better, "target": m.default_target,
            "bytes_label": "bytes sent by this node", "name": f"node {d.peer_id[:12]}\u2026"}


def routes(d: Daemon) -> dict[str, Handler]:
    """``/`` (the page) and ``/history`` for the daemon's :class:`MetricsServer`."""

    def page(_q: dict[str, list[str]]) -> tuple[bytes, str]:
        data = {"live": True, **meta(d), "nodes": [], "poll_ms": max(500, int(d.cfg.status_every_s * 1000))}
        return render(data).encode(), "text/html; charset=utf-8"

    def history(q: dict[str, list[str]]) -> tuple[bytes, str]:
        try:
            since = int(q.get("since", ["-1"])[0])
        except ValueError:
            since = -1
        h = d.history
        body = finite({"meta": meta(d), "seq": h.seq, "rows": h.since(since)})
        return json.dumps(body, separators=(",", ":"), default=str).encode(), "application/json"

    return {"/": page, "/index.html": page, "/history": history}
