"""A run's per-round log, shared by the seedswarm simulator and the baselines.

It owns ``metrics.jsonl`` (one line per round), the latest evaluation, and the first round and
byte count at which accuracy reached the target (``bytes_to_target``), so every protocol of the
comparison measures these the same way. It also feeds the run's progress bar (``progress.py``):
rounds done, accuracy, loss and bytes.

The metric is the ``accuracy`` a task's ``evaluate`` returns (``loss`` is logged next to it):
the target is reached at the first evaluation with ``accuracy >= target``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from seedswarm.progress import Progress


class RunLog:
    def __init__(self, out_dir: Path | None, target: float, eval_every: int, last_round: int,
                 progress: Progress | None = None) -> None:
        self.progress = progress
        self.target = target
        self.eval_every = eval_every
        self.last_round = last_round
        self.acc: float | None = None
        self.loss: float | None = None
        self.bytes_to_target: int | None = None
        self.round_to_target: int | None = None
        self._file: TextIO | None = None
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(out_dir / "metrics.jsonl", "w")  # noqa: SIM115 - closed by close()

    def round(self, line: dict[str, Any], evaluate: Callable[[], dict[str, float] | None]) -> None:
        """Log one round; ``line`` has ``round`` and ``bytes_total``. ``evaluate`` is called on
        evaluation rounds only (it may return None when there is no model to evaluate)."""
        r = line["round"]
        if r % self.eval_every == 0 or r >= self.last_round:
            ev = evaluate()
            if ev is not None:
                self.set_eval(ev)
                line["accuracy"], line["loss"] = ev["accuracy"], ev["loss"]
                if self.bytes_to_target is None and ev["accuracy"] >= self.target:
                    self.bytes_to_target, self.round_to_target = line["bytes_total"], r
        if self._file is not None:
            self._file.write(json.dumps(line) + "\n")
        if self.progress is not None:
            self.progress.update(r, acc=self.acc, loss=self.loss, bytes=line["bytes_total"], online=line.get("online"))

    def set_eval(self, ev: dict[str, float]) -> None:
        self.acc, self.loss = ev["accuracy"], ev["loss"]

    def outcome(self) -> dict[str, Any]:
        """The summary fields every protocol reports the same way (in summary.json's order)."""
        return {"final_accuracy": self.acc, "final_loss": self.loss, "target": self.target,
                "bytes_to_target": self.bytes_to_target, "rounds_to_target": self.round_to_target}

    def acc_text(self) -> str:
        return f"{self.acc:.3f}" if self.acc is not None else "-"

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
