"""What every task module shares: :class:`Shard`, seeded generators, and the task's metric.

Kept apart from ``tasks.py`` so that built-in tasks in their own modules (``lm.py``) can use
these without importing the registry that names them (``tasks.py`` imports them lazily).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from seedswarm.node.learn.taskspec import TaskError


@dataclass(frozen=True, eq=False)
class Shard:
    """The private local data of node ``index`` of ``count``.

    ``indices`` is a read-only int64 array of positions in the task's training split (not a copy
    of the data), so that a simulator can hold shards for many thousands of nodes.
    """

    index: int
    count: int
    indices: np.ndarray = field(repr=False)

    def __len__(self) -> int:
        return int(self.indices.shape[0])


def task_rng(seed: int, purpose: int, *more: int) -> np.random.Generator:
    """A PCG64 generator for one purpose of one task seed (independent streams per purpose)."""
    return np.random.default_rng(np.random.SeedSequence([seed, purpose, *more]))


def check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or int(seed) < 0:
        raise TaskError(f"seed must be a non-negative integer, not {seed!r}")
    return int(seed)


def check_index(index: object, count: object) -> None:
    """The arguments of ``shard(index, count)`` (ValueError: a caller's bug, not a bad task)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer, not {count!r}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ValueError(f"index must be an integer in [0, {count}), not {index!r}")


@dataclass(frozen=True)
class Metric:
    """A task's primary metric: the key of ``evaluate()`` that targets and plots follow.

    A task declares it with class attributes ``metric`` (default ``"accuracy"``),
    ``higher_is_better`` (default True) and optionally ``default_target`` (the ``--target`` a
    run uses when none is given); a task without them keeps the original convention: accuracy,
    higher is better, target 0.9. Accuracy suits classifiers; a language model's natural measure
    is the validation loss in nats per byte, where lower is better.
    """

    key: str = "accuracy"
    higher_is_better: bool = True
    default_target: float | None = 0.9

    def reached(self, value: float, target: float) -> bool:
        return value >= target if self.higher_is_better else value <= target

    @property
    def direction(self) -> str:
        return "higher is better" if self.higher_is_better else "lower is better"


def task_metric(task: Any) -> Metric:
    """The metric ``task`` declares (see :class:`Metric`); TaskError for ill-typed declarations."""
    key = getattr(task, "metric", "accuracy")
    hib = getattr(task, "higher_is_better", True)
    target = getattr(task, "default_target", 0.9 if key == "accuracy" and hib else None)
    if not isinstance(key, str) or not key:
        raise TaskError(f"task {getattr(task, 'name', '?')!r}: 'metric' must be a key of evaluate(), not {key!r}")
    if not isinstance(hib, bool):
        raise TaskError(f"task {getattr(task, 'name', '?')!r}: 'higher_is_better' must be a bool, not {hib!r}")
    if target is not None and (isinstance(target, bool) or not isinstance(target, int | float)
                               or not math.isfinite(target)):
        raise TaskError(f"task {getattr(task, 'name', '?')!r}: 'default_target' must be a number or None, "
                        f"not {target!r}")
    return Metric(key, hib, None if target is None else float(target))


def task_option(task: str, opts: Mapping[str, Any], defaults: Mapping[str, Any], key: str, kind: type,
                ok: Callable[[Any], bool], what: str) -> Any:
    """Option ``key`` of a built-in task (its default when absent), checked: an int is accepted
    where a float is asked, a bool never where an int is; TaskError naming the task otherwise."""
    v = opts.get(key, defaults[key])
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if (kind is int and isinstance(v, bool)) or not isinstance(v, kind) or not ok(v):
        raise TaskError(f"{task} option {key!r} must be {what}, not {v!r}")
    return v


def spread_shard(perm: np.ndarray, index: int, count: int, min_shard: int) -> Shard:
    """Node ``index`` of ``count``'s slice of the seeded permutation ``perm``: disjoint slices
    while there are ``min_shard`` samples per node, wrapping (and overlapping) beyond."""
    check_index(index, count)
    n = int(perm.shape[0])
    start = index * n // count
    size = max(min_shard, (index + 1) * n // count - start)
    if start + size <= n:
        return Shard(index, count, perm[start : start + size])
    idx = perm[(start + np.arange(size)) % n]
    idx.setflags(write=False)
    return Shard(index, count, idx)


def draw(shard: Shard, rng: np.random.Generator, size: int) -> np.ndarray:
    """``min(size, len(shard))`` distinct sample indices of the shard, drawn with ``rng`` (a
    writable copy: torch takes it as is)."""
    if size < 1:
        raise ValueError(f"batch size must be positive, not {size}")
    n = len(shard)
    if n == 0:
        raise ValueError(f"shard {shard.index}/{shard.count} is empty")
    return shard.indices.copy() if size >= n else shard.indices[rng.choice(n, size, replace=False)]


class TaskWrapper:
    """A task that changes how the initial model is built and delegates everything else.

    ``load_task`` wraps a task in one for the options every task understands (a trainable
    subset, ``trainable.py``; a direction scale, ``precondition.py``). Attributes the wrapper does
    not define (``metric``, ``num_train``, a task's own fields) are the inner task's.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name: str = inner.name

    def __getattr__(self, key: str) -> Any:
        if key == "inner":  # not set yet (copy, pickle): no recursion
            raise AttributeError(key)
        return getattr(self.inner, key)

    def build_model(self) -> Any:
        return self.inner.build_model()

    def shard(self, index: int, count: int) -> Any:
        return self.inner.shard(index, count)

    def batch(self, shard: Any, rng: Any, size: int) -> Any:
        return self.inner.batch(shard, rng, size)

    def loss(self, model: Any, batch: Any) -> Any:
        return self.inner.loss(model, batch)

    def evaluate(self, model: Any) -> dict[str, float]:
        result: dict[str, float] = self.inner.evaluate(model)
        return result
