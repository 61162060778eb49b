"""A run's files: summary.json, and PNG plots of accuracy against rounds and bytes sent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from seedswarm.node.files import atomic_write


def write_outputs(out_dir: Path, summary: dict[str, Any]) -> None:
    """summary.json (written whole or not at all) and the plots from metrics.jsonl."""
    atomic_write(out_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    write_plots(out_dir)


def write_plots(out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line]
    rows = [r for r in rows if "accuracy" in r]
    written = []
    for x_key, name, label in (("round", "accuracy_vs_round.png", "round"),
                               ("bytes_total", "accuracy_vs_bytes.png", "bytes sent by all nodes")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        ax.plot([r[x_key] for r in rows], [r["accuracy"] for r in rows], lw=1.5)
        if x_key == "bytes_total":
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.set_title(f"seedswarm: accuracy vs {label}")
        fig.tight_layout()
        p = out_dir / name
        fig.savefig(p)
        plt.close(fig)
        written.append(p)
    return written
