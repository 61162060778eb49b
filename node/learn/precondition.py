"""Preconditioned directions: a per-coordinate scale ``s`` that every node holds bit-identically.

Why: with directions ``z ~ N(0, I)`` a round's expected update is ``-lr * g``, plain SGD, while
Adam divides each coordinate by the root mean square of its gradient. In a fine-tuned
transformer those differ by orders of magnitude between coordinates (embeddings of rare bytes
against layer norms), so one learning rate is too large for some and far too small for most,
and one-byte rounds reached 37 % of Adam's loss reduction (docs/lm.md). Drawing the directions
from ``N(0, D)`` instead, ``z' = s * z`` with ``s = sqrt(D)``, makes the expected update
``-lr * D * g``: a fixed diagonal preconditioner at no cost in bytes, because the direction is
still named by its seed.

What: ``D = 1 / (rms(g) + floor * mean(rms(g)))`` per coordinate, ``rms`` over ``batches``
batches of the task's data drawn by a generator seeded from the run's seed, at the initial
model, then normalised to mean 1 (so ``lr`` keeps its meaning for an average coordinate) and
``s = sqrt(D)`` rounded to a power of two. The rounding is what makes it a protocol object:

* multiplying by a power of two is exact in IEEE arithmetic, so replay with the scale is as
  bit-identical across devices and chunkings as without (``crypto.projection.add_directions_``);
* ``D`` comes from float gradients, whose last bits may differ between CPUs; rounded exponents
  rarely do, and the genesis's model digest covers ``s`` (:func:`initial_digest`), so a node
  whose scale differs refuses to start instead of forking.

The scale is held as bfloat16 (every power of two in range is exact there): two bytes per
trainable parameter, half a float32 copy. It is computed once per task object (the daemon and
the simulator build the initial model more than once).

Options, understood for every task (``load_task`` takes them off before the task's own factory
sees them): ``precondition`` (batches; 0, the default, is off), ``precondition_batch`` (samples
per batch, 16), ``precondition_floor`` (1e-3, relative to the mean rms; it bounds the scale
of coordinates whose gradient is zero at the initial model, such as LoRA's ``A`` while ``B``
is zero) and ``precondition_power`` (1: ``D = (rms + floor)^-power``; -1 spends the directions'
variance where the gradients are large instead, as sparse zeroth-order methods do) and
``precondition_cap`` (the largest scale, a power of two; none by default, 2 recommended for the
``lm`` task). Why a cap: the coordinates with the least gradient at the initial model get the
largest scale, and some have no gradient to give (a key bias, to which softmax is invariant;
the embedding rows of bytes the data never holds). In the default GPT 1 % of the coordinates
took 42 % of the directions' variance, and a projected update puts noise there in proportion
with nothing to pull it back; capping ``s`` at 2 let the same learning rate learn more
(docs/lm.md).

Limit: the batches come from ``task.shard(0, 1)``, the task's whole training split as the task
defines it. That is public in the built-in tasks (every node can read the corpus; the shards
only split the work); a task whose nodes hold truly private data should be given a public
sample to compute it on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from seedswarm.node.learn.replay import SCALE_ATTR, direction_scale, initial_digest
from seedswarm.node.learn.taskcommon import TaskWrapper, task_rng
from seedswarm.node.learn.taskspec import TaskError

__all__ = ["PRECONDITION_OPTIONS", "SCALE_ATTR", "Precondition", "PreconditionedTask", "compute_scale",
           "direction_scale", "initial_digest", "split_precondition_options"]  # the last two: replay.py's

PRECONDITION_OPTIONS = ("precondition", "precondition_batch", "precondition_floor", "precondition_power",
                        "precondition_cap")
_PRECOND = 51  # purpose tag of the batches' random stream
_MAX_EXP = 16  # |log2 s| at most: products stay far from float32's overflow and subnormals


@dataclass(frozen=True)
class Precondition:
    batches: int
    batch_size: int = 16
    floor: float = 1e-3
    power: float = 1.0  # D = (rms + floor)^-power: 1 is Adam's normalisation, -1 favours large gradients
    cap_exp: int = _MAX_EXP  # log2 of the largest scale


def split_precondition_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], Precondition | None]:
    """``options`` without the preconditioner's keys, and the :class:`Precondition` they ask for."""
    rest = {k: v for k, v in options.items() if k not in PRECONDITION_OPTIONS}
    batches = options.get("precondition", 0)
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
        raise TaskError(f"option 'precondition' must be a number of batches (an integer >= 0; 0: off), "
                        f"not {batches!r}")
    size = options.get("precondition_batch", 16)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise TaskError(f"option 'precondition_batch' must be a positive integer, not {size!r}")
    floor = options.get("precondition_floor", 1e-3)
    if isinstance(floor, bool) or not isinstance(floor, int | float) or not (math.isfinite(floor) and floor > 0):
        raise TaskError(f"option 'precondition_floor' must be a positive number, not {floor!r}")
    power = options.get("precondition_power", 1.0)
    if isinstance(power, bool) or not isinstance(power, int | float) or not (math.isfinite(power) and -2 <= power <= 2):
        raise TaskError(f"option 'precondition_power' must be a number in [-2, 2], not {power!r}")
    cap = options.get("precondition_cap", 2.0**_MAX_EXP)
    cap_exp = math.log2(cap) if isinstance(cap, int | float) and not isinstance(cap, bool) and cap > 0 else -1.0
    if not (0 <= cap_exp <= _MAX_EXP and cap_exp == int(cap_exp)):
        raise TaskError(f"option 'precondition_cap' must be a power of two from 1 to 2**{_MAX_EXP} (the largest "
                        f"scale), not {cap!r}")
    if not batches:
        if any(k in options for k in PRECONDITION_OPTIONS[1:]):
            raise TaskError("options 'precondition_batch', 'precondition_floor', 'precondition_power' and "
                            "'precondition_cap' need 'precondition' (the number of batches)")
        return rest, None
    return rest, Precondition(batches, size, float(floor), float(power), int(cap_exp))


def compute_scale(task: Any, model: nn.Module, spec: Precondition, seed: int) -> tuple[torch.Tensor, ...]:
    """The power-of-two scale of ``model``'s parameters (module docstring), bfloat16.

    Deterministic: seeded batches, one thread (as the tasks' pretraining), float64 sums, the
    model in eval mode (no dropout; normalisation layers read their statistics, never update
    them). The model's parameters, ``.grad`` and buffers are not written.
    """
    params = list(model.parameters())
    rng = task_rng(seed, _PRECOND)
    shard = task.shard(0, 1)
    sq = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    flags = [p.requires_grad for p in params]
    training = model.training
    model.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for _ in range(spec.batches):
                loss = task.loss(model, task.batch(shard, rng, spec.batch_size))
                # autograd.grad returns the gradients without accumulating them into .grad
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for a, g in zip(sq, grads, strict=True):
                    if g is not None:
                        a.add_(g.detach().to(torch.float64).square())
    finally:
        torch.set_num_threads(threads)
        model.train(training)
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
    rms = [(a / spec.batches).sqrt() for a in sq]
    total = sum(r.numel() for r in rms)
    mean_rms = float(sum(r.sum() for r in rms)) / max(1, total)
    if not (math.isfinite(mean_rms) and mean_rms > 0):
        return tuple(torch.ones(p.shape, dtype=torch.bfloat16) for p in params)  # no signal: no scale
    d = [(r + spec.floor * mean_rms) ** -spec.power for r in rms]
    mean_d = float(sum(x.sum() for x in d)) / total
    return tuple(torch.exp2(torch.round(torch.log2((x / mean_d).sqrt())).clamp(-_MAX_EXP, spec.cap_exp))
                 .to(torch.bfloat16) for x in d)


class PreconditionedTask(TaskWrapper):
    """A task whose initial model carries a direction scale (:data:`SCALE_ATTR`)."""

    def __init__(self, inner: Any, spec: Precondition, seed: int) -> None:
        super().__init__(inner)
        self.spec = spec
        self.seed = seed
        self._scale: tuple[torch.Tensor, ...] | None = None

    def build_model(self) -> nn.Module:
        model: nn.Module = self.inner.build_model()
        if self._scale is None:
            self._scale = compute_scale(self.inner, model, self.spec, self.seed)
        setattr(model, SCALE_ATTR, self._scale)
        return model
