"""A round timeout sized from the task's measured compute, for ``seedswarm init`` and ``cluster``.

Why: the round timeout is the longest an aggregator waits for contributions (the adaptive
deadline's upper bound, and the step between fallback aggregators). A trainer can contribute only
after it has applied the previous record and computed its estimate; when that takes longer than
the timeout, every record is published without it and the trainer is expelled after a few rounds
(issue 13: the 2 s default is far below an LM trainer's compute). The default fits the digits
task; a language model at K = 256 needs more, a 100M-parameter model much more. So the genesis
builder measures one round of a trainer's work on this machine (one local estimate with the
genesis's settings, one application of a record's worth of directions) and sizes the timeout at
:data:`SAFETY` times that, never below the default. The adaptive deadline still makes rounds as
short as the trainers allow: a larger bound only costs time when trainers are missing.

The figure is this machine's: the host that writes the genesis should be no faster than the
slowest trainer, or the operator passes ``--round-timeout``. It is printed with its parts.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from seedswarm.crypto.projection import add_directions_
from seedswarm.node.learn.estimators import local_estimate
from seedswarm.node.learn.replay import direction_scale

__all__ = ["SAFETY", "RoundCompute", "measure_round_compute", "sized_genesis"]

SAFETY = 3.0
"""Timeout over measured compute: slower trainers, a loaded host, the record's own travel."""


@dataclass(frozen=True)
class RoundCompute:
    """Seconds of one trainer's round on this machine."""

    estimate_s: float  # one local estimate (fo: forward, backward, projection; zo: 2K forwards)
    apply_s: float  # one record's directions added to the parameters (every node, every round)

    def round_timeout(self, floor: float) -> float:
        """``SAFETY`` times the round's compute, rounded up to 0.1 s, at least ``floor``."""
        return max(floor, math.ceil(10 * SAFETY * (self.estimate_s + self.apply_s)) / 10)

    def describe(self, timeout: float) -> str:
        """The line ``init`` and ``cluster`` print about the timeout they chose."""
        return (f"round timeout {timeout} s: a trainer's round measured here takes {self.estimate_s:.2f} s "
                f"(estimate) + {self.apply_s:.2f} s (apply); at least {SAFETY:g}x that and 2 s "
                f"(--round-timeout sets it)")


def measure_round_compute(task: Any, genesis: Any, model: torch.nn.Module | None = None,
                          repeats: int = 2) -> RoundCompute:
    """The fastest of ``repeats`` timed estimates and applications (after one untimed warm-up of
    the estimate), on the CPU with the genesis's batch size, estimator and K."""
    model = task.build_model() if model is None else model
    shard = task.shard(0, 1)
    rng = np.random.default_rng(0)
    streams = list(range(1, genesis.directions + 1))
    local_estimate(task, genesis, model, shard, rng, streams)
    est = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        local_estimate(task, genesis, model, shard, rng, streams)
        est = min(est, time.perf_counter() - t0)
    params = [p.detach().clone() for p in model.parameters()]  # what the daemon replays
    scale = direction_scale(model)
    every = list(range(1, genesis.total_directions + 1))
    coeffs = [1e-6] * len(every)
    apply = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            add_directions_(params, every, coeffs, scale)
        apply = min(apply, time.perf_counter() - t0)
    return RoundCompute(estimate_s=est, apply_s=apply)


def sized_genesis(genesis: Any, floor: float) -> tuple[Any, RoundCompute]:
    """``genesis`` with its round timeout sized from this machine's measured compute."""
    from seedswarm.node.learn.tasks import load_task

    task = load_task(genesis.task, dict(genesis.task_options), seed=genesis.seed)
    measured = measure_round_compute(task, genesis)
    return dataclasses.replace(genesis, round_timeout=measured.round_timeout(floor)), measured
