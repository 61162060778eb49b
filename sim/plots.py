"""A run's files: summary.json, PNG plots of the task's metric against rounds and bytes sent, and
``report.html`` (the dashboard page with the run's data: charts that can be hovered and zoomed).

The metric is the one summary.json names (``metric``: ``accuracy`` for digits, ``loss`` for
lm; a summary without it, from before metrics were per task, means accuracy), so the files are
``accuracy_vs_round.png`` and ``accuracy_vs_bytes.png`` for a classifier and
``loss_vs_round.png`` and ``loss_vs_bytes.png`` for a language model. Every plot's title names
the task, the protocol and the key settings, and the target is drawn as a dashed line.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from seedswarm.node.files import atomic_write
from seedswarm.node.report.page import settings_line

_LABELS = {"accuracy": "test accuracy", "loss": "validation loss (nats/byte)"}


def plot_names(metric: str = "accuracy") -> tuple[str, str]:
    """The two plot files of a run whose metric is ``metric``."""
    return f"{metric}_vs_round.png", f"{metric}_vs_bytes.png"


def write_outputs(out_dir: Path, summary: dict[str, Any]) -> None:
    """summary.json (written whole or not at all), the plots from metrics.jsonl and report.html."""
    from seedswarm.sim.report import sim_report

    atomic_write(out_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    write_plots(out_dir, summary.get("metric") or "accuracy", summary)
    sim_report(out_dir, summary)


def plot_title(summary: dict[str, Any] | None, what: str) -> str:
    """``what`` over a line naming the run: task, protocol, nodes and key settings."""
    if not summary:
        return f"seedswarm: {what}"
    cfg = summary.get("config", {})
    run = settings_line(str(summary.get("task")), cfg.get("task_options"), summary.get("protocol", "seedswarm"), cfg)
    return f"{what}, {summary.get('nodes')} nodes\n" + textwrap.fill(run, 100)


def write_plots(out_dir: Path, metric: str = "accuracy", summary: dict[str, Any] | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line]
    rows = [r for r in rows if r.get(metric) is not None]
    target = (summary or {}).get("target")
    hib = (summary or {}).get("higher_is_better", metric != "loss")
    written = []
    label_y = _LABELS.get(metric, metric)
    for x_key, name, label in (("round", plot_names(metric)[0], "round"),
                               ("bytes_total", plot_names(metric)[1], "bytes sent by all nodes")):
        fig, ax = plt.subplots(figsize=(7, 4.4), dpi=100)
        ax.plot([r[x_key] for r in rows], [r[metric] for r in rows], lw=1.5, marker="." if len(rows) < 60 else None,
                label=metric)
        if target is not None:
            ax.axhline(target, color="#c08000", ls="--", lw=1.2, label=f"target {target:g}")
        if x_key == "bytes_total":
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(label_y + (" (higher is better)" if hib else " (lower is better)"))
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        ax.set_title(plot_title(summary, f"{metric} vs {label}"), fontsize=8)
        fig.tight_layout()
        p = out_dir / name
        fig.savefig(p)
        plt.close(fig)
        written.append(p)
    return written
