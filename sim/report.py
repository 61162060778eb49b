"""``report.html`` next to ``summary.json``: the dashboard page (``seedswarm.node.report``) with a
run's data inline, for ``sim`` (the swarm as one series: metrics.jsonl) and ``cluster`` (every
node side by side: its card, and one series per node in every chart, from its rounds.jsonl)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from seedswarm.node.report.page import settings_line, write

REPORT = "report.html"

_SIM_FIGURES = ("initial_metric", "final_metric", "target", "rounds_to_target", "bytes_to_target", "rounds",
                "total_bytes", "bytes_per_trainer_per_round", "bytes_per_node_per_round", "honest_digest_agreement",
                "final_members", "virtual_seconds", "wall_seconds", "rejected")
_CLUSTER_FIGURES = ("finished", "rounds", "final_accuracy", "honest_digest_agreement", "running_nodes",
                    "distinct_heads", "round_latency_p50_s", "round_latency_p95_s", "bytes_per_node_per_round",
                    "join_seconds_max", "killed", "joined", "wall_seconds")


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with contextlib.suppress(OSError):
        for ln in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                rows.append(json.loads(ln))
    return rows


def _figures(summary: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k.replace("_", " "): summary[k] for k in keys if k in summary and summary[k] not in (None, {}, [])}


def sim_report(out_dir: Path, summary: dict[str, Any]) -> Path:
    """report.html of a ``sim`` (or baseline) run, from its metrics.jsonl and summary."""
    cfg = summary.get("config", {})
    rows = []
    for r in _jsonl(out_dir / "metrics.jsonl"):
        row = {k: v for k, v in r.items() if k not in ("time", "bytes_total", "wall")}
        rows.append({**row, "t": r.get("time"), "sent": r.get("bytes_total")})
    protocol = summary.get("protocol", "seedswarm")
    title = (f"seedswarm sim: {protocol} on task {summary.get('task')}, {summary.get('nodes')} simulated nodes, "
             f"{cfg.get('rounds', summary.get('rounds'))} rounds")
    extra = [f"seed {cfg.get('seed')}", f"latency {cfg.get('latency_ms')} ms"]
    if cfg.get("byzantine"):
        extra.append(f"{cfg['byzantine']:.0%} Byzantine ({cfg.get('attack')})")
    return write(out_dir / REPORT, {
        "title": title,
        "subtitle": settings_line(str(summary.get("task")), cfg.get("task_options"), protocol, cfg) + ", "
        + ", ".join(extra),
        "metric": summary.get("metric") or "accuracy", "higher_is_better": summary.get("higher_is_better", True),
        "target": summary.get("target"), "bytes_label": "bytes sent by all nodes",
        "bytes_chart_title": "bytes sent by all nodes", "latency_title": "round latency (virtual seconds per round)",
        "members_title": "members (solid) and nodes online (dashed)",
        "nodes": [{"name": f"swarm ({summary.get('nodes_total', summary.get('nodes'))} nodes)", "status": None,
                   "rows": rows}],
        "summary": _figures(summary, _SIM_FIGURES),
    })


def _task_metric(task: str, options: list[str], seed: int) -> tuple[str, bool, float | None]:
    try:
        from seedswarm.node.learn.initial import parse_task_options
        from seedswarm.node.learn.tasks import load_task, task_metric

        m = task_metric(load_task(task, parse_task_options(options), seed=seed))
        return m.key, m.higher_is_better, m.default_target
    except Exception:  # noqa: BLE001 - the report still shows everything else
        return "accuracy", True, None


def cluster_report(out_dir: Path, summary: dict[str, Any], nodes: dict[int, dict[str, Any]],
                   spawned_at: dict[int, float]) -> Path:
    """report.html of a ``cluster`` run: every node (``nodes``: its last status) side by side."""
    cfg = summary.get("config", {})
    metric, hib, target = _task_metric(str(cfg.get("task")), list(cfg.get("task_options") or []), int(cfg.get("seed", 0)))
    shown = []
    for i in sorted(spawned_at):
        rows = [r for r in _jsonl(out_dir / "nodes" / f"node-{i}" / "rounds.jsonl") if r.get("t", 0) >= spawned_at[i]]
        name = f"node-{i}" + (" (killed)" if f"node-{i}" in summary.get("killed", []) else "") + \
            (" (joined)" if f"node-{i}" in summary.get("joined", []) else "")
        shown.append({"name": name, "status": nodes.get(i), "rows": rows})
    settings = {**cfg, "aggregator": cfg.get("aggregator")}
    return write(out_dir / REPORT, {
        "title": f"seedswarm cluster: {summary.get('nodes_total')} node processes on loopback, task {cfg.get('task')}, "
                 f"{cfg.get('rounds')} rounds",
        "subtitle": settings_line(str(cfg.get("task")), cfg.get("task_options"), "seedswarm", settings)
        + f", round timeout {cfg.get('round_timeout')} s"
        + (f", evaluated every {cfg['eval_every']} rounds" if cfg.get("eval_every") else ""),
        "metric": metric, "higher_is_better": hib, "target": target, "bytes_label": "bytes sent by the node",
        "nodes": shown, "summary": _figures(summary, _CLUSTER_FIGURES),
    })
