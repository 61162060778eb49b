"""Tasks: what a swarm trains (a model, private data shards, a loss, an evaluation).

The protocol core never looks inside a task: it builds the initial model from it, asks it for
a node's local batch and loss (to estimate projected gradients, ``node/learn/estimators.py``), and for
held-out metrics. A task is anything that satisfies the :class:`Task` protocol; most tasks
subclass :class:`BaseTask`, which supplies sharding (IID or Dirichlet label skew), batch
sampling, cross-entropy loss and accuracy/loss evaluation over in-memory tensors, so that a new
task is a data loader plus ``build_model``. See ``docs/tasks.md`` for a worked example.

Tasks are named by a spec: a built-in name (``digits``), ``package.module:factory`` or
``path/to/file.py:factory``, where ``factory(options: dict, seed: int) -> Task`` (:func:`load_task`).

Determinism: everything a task returns is a pure function of ``(options, seed)`` and the
arguments, so that every node of a run builds the same initial model (the genesis commits to it)
and a simulator can rebuild any node's shard. Random draws use numpy's PCG64 ``Generator`` seeded
from ``SeedSequence([seed, purpose])``, never torch's global RNG, so building a task or a model
has no side effect on the caller's random state.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seedswarm.node.learn.taskcommon import (
    Metric,
    Shard,
    check_index,
    draw,
    task_metric,
    task_option,
)
from seedswarm.node.learn.taskcommon import check_seed as _check_seed
from seedswarm.node.learn.taskcommon import task_rng as _rng
from seedswarm.node.learn.taskspec import TaskError, import_task_module, is_file_spec
from seedswarm.node.learn.trainable import SubsetTask, split_subset_options

__all__ = [
    "BUILTIN_TASKS",
    "BaseTask",
    "DigitsTask",
    "Metric",
    "Shard",
    "Task",
    "TaskError",
    "digits_param_count",
    "load_task",
    "param_count",
    "task_metric",
]


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
_SPLIT, _MODEL, _IID, _DIRICHLET = 1, 2, 3, 4


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


# ---------------------------------------------------------------------------------------------
# Built-in task: digits


DIGITS_FEATURES = 64
DIGITS_CLASSES = 10
DIGITS_TEST_FRACTION = 0.2

_DIGITS_DEFAULTS: dict[str, Any] = {
    "hidden": 32,
    "layers": 1,
    "partition": "iid",
    "alpha": 0.5,
    # 128, not 16: digits has 1,438 training images, so a disjoint split among 100 simulated
    # nodes leaves 14 each, and a 14-image shard's gradient is mostly that shard's own noise
    # (per direction |mean| ~ 0.4 x the spread across trainers). At that signal-to-noise ratio an
    # omniscient 20 % minority can bias any aggregate by about the gradient itself (the
    # heterogeneity lower bound of Karimireddy et al. 2022), which no rule can undo: measured in
    # docs/byzantine.md ("per-node data"). Real participants hold hundreds of samples or more;
    # nodes now sample 128 images each (windows overlap above 11 nodes).
    "min_shard": 128,
    "pretrain": False,
    "pretrain_classes": 5,
    "pretrain_steps": 100,
    "pretrain_lr": 0.003,
}


def digits_param_count(hidden: int = 32, layers: int = 1) -> int:
    """Parameters of the digits MLP: 64 -> hidden (x ``layers``, ReLU) -> 10, with biases."""
    return (
        DIGITS_FEATURES * hidden
        + hidden
        + (layers - 1) * (hidden * hidden + hidden)
        + hidden * DIGITS_CLASSES
        + DIGITS_CLASSES
    )


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits as (pixels float64 [n, 64], labels int64 [n]).

    The file ships inside scikit-learn, so nothing is downloaded. It is read straight from the
    package folder: importing ``sklearn.datasets`` costs 1.7 CPU-s (scipy.stats and more), paid by
    every daemon at start-up, 14 s of a loaded 2-core machine when 8 daemons start at once.
    ``tests/test_tasks.py`` checks the arrays equal ``load_digits()``'s.
    """
    import gzip
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt") as f:
                data = np.loadtxt(f, delimiter=",")
            return np.ascontiguousarray(data[:, :-1]), data[:, -1].astype(np.int64)
    raise TaskError("the digits task needs scikit-learn's bundled digits.csv.gz: pip install scikit-learn")


@functools.lru_cache(maxsize=8)
def _digits_split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features in [0, 1] (pixel / 16) and a seeded stratified 80/20 split (cached per seed)."""
    pixels, labels = digits_arrays()
    x = pixels / 16.0
    y = labels
    rng = _rng(seed, _SPLIT)
    test_mask = np.zeros(y.shape[0], dtype=bool)
    for c in range(DIGITS_CLASSES):
        idx = np.flatnonzero(y == c)
        n_test = int(round(DIGITS_TEST_FRACTION * idx.shape[0]))
        test_mask[rng.permutation(idx)[:n_test]] = True
    tr, te = np.flatnonzero(~test_mask), np.flatnonzero(test_mask)
    as_x = lambda i: torch.from_numpy(x[i].astype(np.float32))  # noqa: E731
    as_y = lambda i: torch.from_numpy(y[i].copy())  # noqa: E731
    return as_x(tr), as_y(tr), as_x(te), as_y(te)


def _digits_mlp(hidden: int, layers: int, seed: int) -> nn.Sequential:
    """The MLP with PyTorch's default Linear init ranges, drawn from a seeded numpy generator.

    ``fork_rng`` leaves torch's global RNG untouched; each tensor is then filled with
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (the range ``nn.Linear`` uses) from PCG64, whose stream
    is specified and stable, so the initial parameters are bit-identical on every machine.
    """
    widths = [DIGITS_FEATURES] + [hidden] * layers + [DIGITS_CLASSES]
    mods: list[nn.Module] = []
    rng = _rng(seed, _MODEL, hidden, layers)
    for i in range(len(widths) - 1):
        # Not ``skip_init``: its meta-device path imports torch's symbolic-shapes machinery
        # (0.8 CPU-s at every daemon's start); drawing torch's default init once is cheaper.
        with torch.random.fork_rng(devices=[]):
            lin = nn.Linear(widths[i], widths[i + 1], dtype=torch.float32)
        bound = 1.0 / math.sqrt(widths[i])
        with torch.no_grad():
            for p in (lin.weight, lin.bias):
                vals = rng.uniform(-bound, bound, size=tuple(p.shape)).astype(np.float32)
                p.copy_(torch.from_numpy(vals))
        mods.append(lin)
        if i < len(widths) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


@functools.lru_cache(maxsize=8)
def _digits_pretrained(
    seed: int, hidden: int, layers: int, classes: int, steps: int, lr: float
) -> tuple[torch.Tensor, ...]:
    """Centrally pretrained parameters (cached in-process: a simulator builds many nodes).

    Full-batch Adam over the training samples of classes ``0..classes-1`` (in split order: no
    sampling at all), 10-way cross-entropy, ``steps`` steps. Deterministic: the data, order and
    initial model are fixed by ``seed``; it runs with ``torch.set_num_threads(1)`` (restored
    afterwards), so the result does not depend on the caller's thread count. It may still differ
    across CPU instruction sets (AVX2 vs AVX-512 kernels); every node of a run must therefore
    use the genesis checkpoint, not its own pretraining, wherever bits matter.
    """
    x_tr, y_tr, _, _ = _digits_split(seed)
    keep = y_tr < classes
    x, y = x_tr[keep], y_tr[keep]
    model = _digits_mlp(hidden, layers, seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            opt = torch.optim.Adam(model.parameters(), lr=lr, foreach=False)
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    out = tuple(p.detach().clone() for p in model.parameters())
    for t in out:
        t.requires_grad_(False)
    return out


def _opt(opts: Mapping[str, Any], key: str, kind: type, ok: Any, what: str) -> Any:
    return task_option("digits", opts, _DIGITS_DEFAULTS, key, kind, ok, what)


class DigitsTask(BaseTask):
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), an MLP classifier.

    Features are pixel/16 in [0, 1]; a seeded stratified 20% test split (359 images) is held out;
    the 1438 training images are sharded among nodes (``partition``, ``alpha``, ``min_shard``:
    see :class:`BaseTask`). The model is ``64 -> hidden (x layers, ReLU) -> 10``:

    ======  ======  ==========
    hidden  layers  parameters
    ======  ======  ==========
    32      1       2,410
    128     1       9,610
    4000    1       300,010
    13334   1       1,000,060
    1000    2       1,076,010
    ======  ======  ==========

    (:func:`digits_param_count` computes it.) With ``pretrain=True`` the initial model is first
    trained centrally on classes ``0..pretrain_classes-1`` only (``_digits_pretrained``), and the
    swarm then fine-tunes on all ten classes (the MeZO/Ferret fine-tuning regime).
    """

    name = "digits"

    def __init__(self, options: Mapping[str, Any] | None = None, seed: int = 0) -> None:
        opts = dict(options or {})
        unknown = sorted(set(opts) - set(_DIGITS_DEFAULTS))
        if unknown:
            raise TaskError(f"unknown digits option(s) {unknown}; known: {sorted(_DIGITS_DEFAULTS)}")
        pos_int = lambda v: v >= 1  # noqa: E731
        self.hidden = _opt(opts, "hidden", int, pos_int, "a positive integer")
        self.layers = _opt(opts, "layers", int, pos_int, "a positive integer")
        self.pretrain = _opt(opts, "pretrain", bool, lambda v: True, "a bool")
        self.pretrain_classes = _opt(
            opts, "pretrain_classes", int, lambda v: 1 <= v <= DIGITS_CLASSES, "an integer in [1, 10]"
        )
        self.pretrain_steps = _opt(opts, "pretrain_steps", int, lambda v: v >= 0, "an integer >= 0")
        self.pretrain_lr = _opt(
            opts, "pretrain_lr", float, lambda v: math.isfinite(v) and v > 0, "a positive number"
        )
        self.options = {k: opts.get(k, d) for k, d in _DIGITS_DEFAULTS.items()}
        seed = _check_seed(seed)
        x_tr, y_tr, x_te, y_te = _digits_split(seed)
        super().__init__(
            x_tr,
            y_tr,
            x_te,
            y_te,
            seed=seed,
            partition=opts.get("partition", _DIGITS_DEFAULTS["partition"]),
            alpha=opts.get("alpha", _DIGITS_DEFAULTS["alpha"]),
            min_shard=opts.get("min_shard", _DIGITS_DEFAULTS["min_shard"]),
        )

    def build_model(self) -> nn.Module:
        model = _digits_mlp(self.hidden, self.layers, self.seed)
        if self.pretrain:
            state = _digits_pretrained(
                self.seed,
                self.hidden,
                self.layers,
                self.pretrain_classes,
                self.pretrain_steps,
                self.pretrain_lr,
            )
            with torch.no_grad():
                for p, s in zip(model.parameters(), state, strict=True):
                    p.copy_(s)
        return model


def _lm(options: Mapping[str, Any] | None, seed: int) -> Task:
    """The byte-level GPT task (``node/learn/lm.py``), imported only when asked for."""
    from seedswarm.node.learn.lm import LMTask

    return LMTask(options, seed)


def _hf(options: Mapping[str, Any] | None, seed: int) -> Task:
    """A local Hugging Face causal LM on a local text file (``node/learn/hf.py``; ``seedswarm[hf]``)."""
    from seedswarm.node.learn.hf import HFTask

    return HFTask(options, seed)


BUILTIN_TASKS: dict[str, Any] = {"digits": DigitsTask, "lm": _lm, "hf": _hf}
"""Built-in task factories by name: ``factory(options, seed) -> Task``."""


def load_task(spec: str, options: dict[str, Any] | None = None, seed: int = 0) -> Task:
    """Build the task named by ``spec`` with ``options`` and ``seed``.

    ``spec`` is a built-in name (see :data:`BUILTIN_TASKS`), ``package.module:factory`` or
    ``path/to/file.py:factory`` (:mod:`.taskspec`; the factory may be a dotted attribute path,
    e.g. ``pkg.mod:MyTask`` or ``pkg.mod:Tasks.create``), called as ``factory(options, seed)``
    with the options as given (the command line's ``--task-option`` values JSON-typed) and the
    run's seed; the result must satisfy :class:`Task`. The options ``trainable``, ``lora``,
    ``lora_targets`` and ``lora_alpha`` are every task's: the factory never sees them, and the
    task comes back wrapped in a :class:`~.trainable.SubsetTask` that applies them. Every problem
    raises :class:`TaskError` with a message naming the spec, except a ValueError the factory
    raises itself (its message is about the options), which passes through unchanged.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise TaskError(f"task spec must be a non-empty string, not {spec!r}")
    if options is not None and not isinstance(options, Mapping):
        raise TaskError(f"task options must be a dict, not {type(options).__name__}")
    opts = dict(options or {})
    spec = spec.strip()
    if ":" not in spec:
        factory = BUILTIN_TASKS.get(spec)
        if factory is None:
            hint = f": name its factory, e.g. '{spec}:make'" if is_file_spec(spec) else ""
            raise TaskError(
                f"unknown task {spec!r}{hint}: use a built-in ({', '.join(sorted(BUILTIN_TASKS))}), "
                "'package.module:factory' or 'path/to/file.py:factory'"
            )
    else:
        mod_name, _, attr_path = spec.partition(":")
        if not mod_name or not attr_path or ":" in attr_path:
            raise TaskError(f"bad task spec {spec!r}: expected 'package.module:factory' or 'file.py:factory'")
        module = import_task_module(mod_name)
        factory = module
        for part in attr_path.split("."):
            try:
                factory = getattr(factory, part)
            except AttributeError:
                what = "file" if is_file_spec(mod_name) else "module"
                raise TaskError(f"task {what} {mod_name!r} has no attribute {attr_path!r}") from None
        if not callable(factory):
            raise TaskError(f"task factory {spec!r} is not callable")
    seed = _check_seed(seed)
    opts, subset = split_subset_options(opts)  # trainable=, lora=: for every task (trainable.py)
    try:
        task = factory(opts, seed)
    except ValueError:
        raise  # TaskError, or the factory's own "bad option" message: callers report it as is
    except Exception as e:
        # A plug-in's bug or environment problem (a missing file, a KeyError) is still a bad
        # task from the caller's view: one clear error naming the factory, not a traceback.
        raise TaskError(f"task factory {spec!r} failed: {type(e).__name__}: {e}") from e
    missing = [
        m
        for m in ("build_model", "shard", "batch", "loss", "evaluate")
        if not callable(getattr(task, m, None))
    ]
    if missing or not isinstance(getattr(task, "name", None), str) or not isinstance(task, Task):
        what = f"missing methods {missing}" if missing else "no string 'name'"
        raise TaskError(
            f"task factory {spec!r} returned {type(task).__name__}, which is not a Task ({what})"
        )
    return task if subset is None else SubsetTask(task, subset, seed)
