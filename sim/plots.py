"""A run's files: summary.json, and PNG plots of the task's metric against rounds and bytes sent.

The metric is the one summary.json names (``metric``: ``accuracy`` for digits, ``loss`` for
lm; a summary without it, from before metrics were per task, means accuracy), so the files are
``accuracy_vs_round.png`` and ``accuracy_vs_bytes.png`` for a classifier and
``loss_vs_round.png`` and ``loss_vs_bytes.png`` for a language model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from seedswarm.node.files import atomic_write

_LABELS = {"accuracy": "test accuracy", "loss": "validation loss (nats/byte)"}


def plot_names(metric: str = "accuracy") -> tuple[str, str]:
    """The two plot files of a run whose metric is ``metric``."""
    return f"{metric}_vs_round.png", f"{metric}_vs_bytes.png"


def write_outputs(out_dir: Path, summary: dict[str, Any]) -> None:
    """summary.json (written whole or not at all) and the plots from metrics.jsonl."""
    atomic_write(out_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    write_plots(out_dir, summary.get("metric") or "accuracy")


def write_plots(out_dir: Path, metric: str = "accuracy") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line]
    rows = [r for r in rows if r.get(metric) is not None]
    written = []
    label_y = _LABELS.get(metric, metric)
    for x_key, name, label in (("round", plot_names(metric)[0], "round"),
                               ("bytes_total", plot_names(metric)[1], "bytes sent by all nodes")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        ax.plot([r[x_key] for r in rows], [r[metric] for r in rows], lw=1.5)
        if x_key == "bytes_total":
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(label_y)
        ax.grid(alpha=0.3)
        ax.set_title(f"seedswarm: {metric} vs {label}")
        fig.tight_layout()
        p = out_dir / name
        fig.savefig(p)
        plt.close(fig)
        written.append(p)
    return written
