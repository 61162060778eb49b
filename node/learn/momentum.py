"""Momentum across rounds: a second replayed tensor per parameter, bit-identical on every node.

Why: at 4,096 directions a round, one group of trainers, the `lm` task's projected update is
nearly noise-free, and what limits it is the step size: plain preconditioned steps reach 74 % of
Adam's loss reduction at lr 10 and diverge at 11 (docs/lm.md). An exponential average of the
rounds' updates damps the oscillating, high-curvature part of the step, so a larger rate stays
stable: ``momentum=0.5`` at lr 14 reached 79 % in the central proxy and 80 % in the simulator
with the guarded mean (docs/lm.md).

What: with ``Δ_r`` the round's update (``-lr_r Σ_k c_k (s ⊙ z_k)``, what a record applies without
momentum), every node keeps ``m`` and applies

    m ← β m + Δ_r,    θ ← θ + (1 − β) m

so a constant update moves θ by ``Δ`` per round, as without momentum. ``β`` is ``1 − 2^-j``
(``j`` from 1 to 8: 0.5, 0.75, ... 0.99609375), so ``(1 − β) m`` is exact (a power of two only
moves the exponent), and the other two operations are single IEEE roundings in a fixed order:
replay stays as bit-identical across machines, chunkings and devices as ``add_directions_``.

Where it lives: the replay state is the parameters followed by their momentum buffers
(:func:`replay_state`), so the state cache, the digests every node compares, and checkpoints cover
both, and a joiner installs both. Only ``bind_`` (``replay.py``) looks at the parameters alone.
A task option every task understands (``--task-option momentum=0.5``), so the genesis's task
options, hence the run id, commit to it.

Cost: one more full copy of the trainable parameters per kept state (the state cache's byte
budget counts it) and per checkpoint; no bytes on the wire.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from seedswarm.node.learn.taskcommon import TaskWrapper
from seedswarm.node.learn.taskspec import TaskError

__all__ = ["MOMENTUM_ATTR", "MomentumTask", "direction_momentum", "replay_state", "split_momentum_option",
           "step_with_momentum_", "with_buffers"]

MOMENTUM_ATTR = "seedswarm_momentum"
"""Root-module attribute: the replayed momentum ``β`` (absent: none)."""

_MAX_J = 8


def split_momentum_option(options: Mapping[str, Any]) -> tuple[dict[str, Any], float]:
    """``options`` without ``momentum``, and the ``β`` it asks for (0.0: none)."""
    rest = {k: v for k, v in options.items() if k != "momentum"}
    beta = options.get("momentum", 0.0)
    ok = isinstance(beta, int | float) and not isinstance(beta, bool) and (
        beta == 0 or any(beta == 1.0 - 2.0**-j for j in range(1, _MAX_J + 1)))
    if not ok:
        raise TaskError(f"option 'momentum' must be 0 or 1 - 2**-j for j from 1 to {_MAX_J} "
                        f"(0.5, 0.75, 0.875, ...: replay stays exact), not {beta!r}")
    return rest, float(beta)


def direction_momentum(model: nn.Module) -> float:
    """The model's replayed momentum ``β`` (0.0: none)."""
    return float(getattr(model, MOMENTUM_ATTR, 0.0))


def with_buffers(params: Sequence[torch.Tensor], beta: float) -> list[torch.Tensor]:
    """A replay state: ``params`` (the same tensors), then with momentum (``beta`` > 0) one new
    zero buffer each."""
    return list(params) + ([torch.zeros_like(p) for p in params] if beta else [])


def replay_state(model: nn.Module) -> list[torch.Tensor]:
    """What replay moves at the genesis: the model's own parameters, detached (not copies), then
    its momentum buffers if any (:func:`with_buffers`)."""
    return with_buffers([p.detach() for p in model.parameters()], direction_momentum(model))


def step_with_momentum_(state: list[torch.Tensor], beta: float,
                        add_update: Callable[[list[torch.Tensor]], None]) -> None:
    """``m ← β m + Δ`` (``add_update(m)`` adds ``Δ`` in place), then ``θ ← θ + (1 − β) m``."""
    n = len(state) // 2
    if len(state) != 2 * n or not 0 < beta < 1:
        raise ValueError(f"a momentum state has a buffer per parameter and 0 < beta < 1, not {len(state)} "
                         f"tensors and {beta}")
    theta, m = state[:n], state[n:]
    rest = 1.0 - beta
    if rest != 2.0 ** round(math.log2(rest)):
        raise ValueError(f"1 - beta must be a power of two, not {rest}")
    with torch.no_grad():
        for t in m:
            t.mul_(beta)
        add_update(m)
        for p, t in zip(theta, m, strict=True):
            p.add_(t * rest)  # t * rest is exact: one rounding, in the addition


class MomentumTask(TaskWrapper):
    """A task whose initial model carries the replayed momentum (:data:`MOMENTUM_ATTR`)."""

    def __init__(self, inner: Any, beta: float) -> None:
        super().__init__(inner)
        self.beta = beta

    def build_model(self) -> nn.Module:
        model: nn.Module = self.inner.build_model()
        setattr(model, MOMENTUM_ATTR, self.beta)
        return model
