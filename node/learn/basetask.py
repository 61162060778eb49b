"""The task protocol and :class:`BaseTask`, the base of in-memory classification tasks.

Split from the registry (``tasks.py``) so that a built-in task module (``digits.py``) can
subclass :class:`BaseTask` while the registry imports every built-in, with no import cycle.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seedswarm.node.learn.taskcommon import (
    Shard,
    check_index,
    draw,
)
from seedswarm.node.learn.taskcommon import check_seed as _check_seed
from seedswarm.node.learn.taskcommon import task_rng as _rng
from seedswarm.node.learn.taskspec import TaskError

__all__ = ["BaseTask", "Task", "param_count"]

@runtime_checkable
class Task(Protocol):
    """What the node needs from a training task.

    * ``name``: a short identifier (goes into logs and the genesis description).
    * ``build_model()``: a fresh float32 ``nn.Module``, deterministic in the task's seed and
      options (every node must build bit-identical initial parameters).
    * ``shard(index, count)``: the private local data of node ``index`` of ``count``;
      deterministic and cheap (a simulator calls it for 10,000 nodes).
    * ``batch(shard, rng, size)``: a minibatch drawn from a shard with the caller's generator.
    * ``loss(model, batch)``: the scalar training loss of ``model`` on ``batch``.
    * ``evaluate(model)``: metrics on a held-out test split, at least ``accuracy`` and ``loss``;
      called every few rounds, so it must be fast and must not modify ``model``.

    Optional attributes ``metric``, ``higher_is_better``, ``default_target`` (:func:`task_metric`)
    pick what targets and plots follow; not protocol members, so older tasks still qualify.
    """

    name: str

    def build_model(self) -> nn.Module: ...

    def shard(self, index: int, count: int) -> Shard: ...

    def batch(self, shard: Shard, rng: np.random.Generator, size: int) -> Any: ...

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module) -> dict[str, float]: ...


def param_count(model: nn.Module) -> int:
    """Number of (distinct) scalar parameters of a model: the dimension the directions live in."""
    return sum(p.numel() for p in model.parameters())


# Purpose tags of the task's random streams.
_IID, _DIRICHLET = 3, 4  # 1 and 2 are the digits task's (digits.py)


class BaseTask:
    """A supervised classification task over in-memory tensors: subclass and add ``build_model``.

    The constructor takes the train/test tensors (features float32, labels int64 in
    ``[0, num_classes)``) and the partition settings; the base class then provides ``shard``,
    ``batch``, ``loss`` (cross-entropy of ``model(x)`` against ``y``) and ``evaluate``
    (``accuracy`` and mean ``loss`` on the whole test split). Override ``loss``/``evaluate`` for
    other objectives.

    Partitions (``partition``):

    * ``"iid"``: a seeded permutation of the training split cut into ``count`` contiguous
      windows: an exact partition while ``n_train // count >= min_shard``.
    * ``"dirichlet"``: label skew as in Hsu et al. 2019: node ``i`` draws a class mix
      ``q_i ~ Dir(alpha * 1)`` and takes its samples from per-class pools with running cursors,
      so shards are disjoint while each class pool lasts. Small ``alpha`` (0.1) gives nodes that
      see one or two classes; large ``alpha`` (100) is close to IID.

    In both, every shard has at least ``min_shard`` samples: once there are more nodes than
    ``n_train / min_shard``, windows wrap around and overlap (each sample is then shared by about
    ``count * min_shard / n_train`` nodes), so a 10,000-node simulation on a small data set still
    gives every node a usable batch.
    """

    name: str = "task"
    metric: str = "accuracy"
    higher_is_better: bool = True
    default_target: float | None = 0.9

    def __init__(
        self,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        *,
        seed: int = 0,
        partition: str = "iid",
        alpha: float = 0.5,
        min_shard: int = 16,
    ) -> None:
        self.seed = _check_seed(seed)
        if x_train.shape[0] != y_train.shape[0] or x_test.shape[0] != y_test.shape[0]:
            raise TaskError("features and labels have different lengths")
        if x_train.shape[0] == 0 or x_test.shape[0] == 0:
            raise TaskError("empty train or test split")
        if partition not in ("iid", "dirichlet"):
            raise TaskError(f"partition must be 'iid' or 'dirichlet', not {partition!r}")
        if isinstance(alpha, bool) or not (
            isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0
        ):
            raise TaskError(f"alpha must be a positive number, not {alpha!r}")
        if isinstance(min_shard, bool) or not isinstance(min_shard, int) or min_shard < 1:
            raise TaskError(f"min_shard must be a positive integer, not {min_shard!r}")
        self.x_train = x_train.to(torch.float32).contiguous()
        self.y_train = y_train.to(torch.int64).contiguous()
        self.x_test = x_test.to(torch.float32).contiguous()
        self.y_test = y_test.to(torch.int64).contiguous()
        self.num_classes = int(max(self.y_train.max().item(), self.y_test.max().item())) + 1
        self.partition = partition
        self.alpha = float(alpha)
        self.min_shard = min_shard
        n = self.num_train
        perm = _rng(self.seed, _IID).permutation(n).astype(np.int64)
        perm.setflags(write=False)
        self._perm = perm
        labels = self.y_train.numpy()
        pools = []
        for c in range(self.num_classes):
            pool = np.flatnonzero(labels == c).astype(np.int64)
            pool = pool[_rng(self.seed, _DIRICHLET, 0, c).permutation(pool.shape[0])]
            pool.setflags(write=False)
            pools.append(pool)
        self._pools = pools
        self._dirichlet_plan = functools.lru_cache(maxsize=8)(self._make_dirichlet_plan)

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    def build_model(self) -> nn.Module:
        raise NotImplementedError("a task must define build_model()")

    # -- sharding -------------------------------------------------------------------------------

    def _window(self, index: int, count: int) -> tuple[int, int]:
        """Start and size of node ``index``'s window (sizes >= min_shard, starts spread evenly)."""
        n = self.num_train
        start = index * n // count
        size = max(self.min_shard, (index + 1) * n // count - start)
        return start, size

    def _make_dirichlet_plan(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-node class counts (count x C) and per-class cursor offsets, for one node count."""
        sizes = np.array([self._window(i, count)[1] for i in range(count)], dtype=np.int64)
        rng = _rng(self.seed, _DIRICHLET, 1, count)
        present = np.array([p.shape[0] > 0 for p in self._pools])
        conc = np.where(present, self.alpha, 0.0)
        mix = np.zeros((count, self.num_classes))
        mix[:, present] = rng.dirichlet(conc[present], size=count)
        mix /= mix.sum(axis=1, keepdims=True)
        counts = rng.multinomial(sizes, mix).astype(np.int64)
        offsets = np.cumsum(counts, axis=0) - counts
        counts.setflags(write=False)
        offsets.setflags(write=False)
        return counts, offsets

    def shard(self, index: int, count: int) -> Shard:
        check_index(index, count)
        n = self.num_train
        if self.partition == "iid":
            start, size = self._window(index, count)
            if start + size <= n:
                idx = self._perm[start : start + size]  # a view: no copy
            else:
                idx = self._perm[(start + np.arange(size)) % n]
                idx.setflags(write=False)
            return Shard(index, count, idx)
        counts, offsets = self._dirichlet_plan(count)
        parts = []
        for c, pool in enumerate(self._pools):
            m = int(counts[index, c])
            if m:
                parts.append(pool[(int(offsets[index, c]) + np.arange(m)) % pool.shape[0]])
        idx = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        idx.setflags(write=False)
        return Shard(index, count, idx)

    # -- batches, loss, evaluation --------------------------------------------------------------

    def batch(
        self, shard: Shard, rng: np.random.Generator, size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``min(size, len(shard))`` distinct samples of the shard, drawn with ``rng``."""
        idx = torch.from_numpy(draw(shard, rng, size))
        return self.x_train.index_select(0, idx), self.y_train.index_select(0, idx)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            logits = model(self.x_test)
            loss = F.cross_entropy(logits, self.y_test)
            acc = (logits.argmax(dim=1) == self.y_test).to(torch.float64).mean()
        return {"accuracy": float(acc), "loss": float(loss)}
