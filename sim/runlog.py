"""A run's per-round log, shared by the seedswarm simulator and the baselines.

It owns ``metrics.jsonl`` (one line per round), the latest evaluation, and the first round and
byte count at which the task's metric reached the target (``bytes_to_target``), so every
protocol of the comparison measures these the same way. It also feeds the run's progress bar
(``progress.py``): rounds done, accuracy, loss and bytes.

The metric is the one the task declares (``taskcommon.Metric``): ``accuracy``, higher is better,
for classifiers such as ``digits`` (reached at the first evaluation with ``accuracy >= target``);
the validation ``loss`` in nats per byte, lower is better, for ``lm`` (reached at the first
evaluation with ``loss <= target``). Every evaluation writes ``accuracy`` and ``loss`` to
``metrics.jsonl``, plus the task's other numeric figures (``perplexity`` for ``lm``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from seedswarm.node.learn.taskcommon import Metric
from seedswarm.progress import Progress


class RunLog:
    def __init__(self, out_dir: Path | None, target: float | None, eval_every: int, last_round: int,
                 progress: Progress | None = None, metric: Metric | None = None) -> None:
        """``target`` None: the metric's ``default_target`` (None again: no target, never reached)."""
        self.progress = progress
        self.metric = metric if metric is not None else Metric()
        self.target = self.metric.default_target if target is None else target
        self.eval_every = eval_every
        self.last_round = last_round
        self.acc: float | None = None
        self.loss: float | None = None
        self.value: float | None = None  # the metric's latest value
        self.first: float | None = None  # ... and the initial model's (else the first evaluation's)
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
                for k, v in ev.items():
                    if k not in line and isinstance(v, int | float) and not isinstance(v, bool):
                        line[k] = v if math.isfinite(v) else None
                if (self.bytes_to_target is None and self.target is not None and self.value is not None
                        and self.metric.reached(self.value, self.target)):
                    self.bytes_to_target, self.round_to_target = line["bytes_total"], r
        if self._file is not None:
            self._file.write(json.dumps(line) + "\n")
            self._file.flush()  # one line per evaluation: `tail -f` shows an hour-long run as it goes
        if self.progress is not None:
            self.progress.update(r, acc=self.acc, loss=self.loss, bytes=line["bytes_total"], online=line.get("online"))

    def set_eval(self, ev: dict[str, float]) -> None:
        self.acc, self.loss = ev["accuracy"], ev["loss"]
        v = ev.get(self.metric.key)
        if v is None:
            raise KeyError(f"evaluate() returned no {self.metric.key!r}, the task's metric")
        self.value = float(v)
        if self.first is None:
            self.first = self.value

    def set_initial(self, ev: dict[str, float]) -> None:
        """The initial model's evaluation (``initial_metric``; not a round, not in metrics.jsonl)."""
        v = ev.get(self.metric.key)
        self.first = None if v is None else float(v)

    def outcome(self) -> dict[str, Any]:
        """The summary fields every protocol reports the same way (in summary.json's order)."""
        return {"final_accuracy": self.acc, "final_loss": self.loss, "metric": self.metric.key,
                "higher_is_better": self.metric.higher_is_better, "initial_metric": self.first,
                "final_metric": self.value, "target": self.target,
                "bytes_to_target": self.bytes_to_target, "rounds_to_target": self.round_to_target}

    def acc_text(self) -> str:
        return f"{self.acc:.3f}" if self.acc is not None else "-"

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
