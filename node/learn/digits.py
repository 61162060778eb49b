"""The built-in ``digits`` task: scikit-learn's bundled 8x8 digits and an MLP classifier.

The default task of ``seedswarm sim`` and of every quick start: small enough that a laptop
simulates thousands of nodes, with an optional central pretraining on half the classes for the
fine-tuning regime. See :class:`DigitsTask`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seedswarm.node.learn.basetask import BaseTask
from seedswarm.node.learn.taskcommon import check_seed as _check_seed
from seedswarm.node.learn.taskcommon import task_option
from seedswarm.node.learn.taskcommon import task_rng as _rng
from seedswarm.node.learn.taskspec import TaskError

__all__ = ["DIGITS_CLASSES", "DIGITS_FEATURES", "DigitsTask", "digits_arrays", "digits_param_count"]

# Purpose tags of the task's random streams (BaseTask's sharding uses 3 and 4).
_SPLIT, _MODEL = 1, 2

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
