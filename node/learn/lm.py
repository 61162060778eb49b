"""The built-in ``lm`` task: fine-tune a small pretrained byte-level GPT on Python source code.

The regime MeZO and Ferret target, at a size a CPU simulates: a model pretrained centrally on
English prose (the Python docs' topic pages, ``lmdata.prose``) that the swarm fine-tunes on
private shards of Python standard-library sources (``lmdata.code``), with the validation loss
of held-out source files (nats per byte, lower is better) as the run's metric.

Pretraining is deterministic (seeded data order and initialisation, one thread, Adam without
foreach kernels) and cached on disk (:func:`pretrained`), because every node builds the initial
model itself and the genesis commits to its digest: ``sim`` builds it three times per run and
tests build it often, and a 300-step pretraining of the default model takes minutes of CPU.
Bits may still differ across CPU instruction sets or torch versions (as for ``digits``'
pretraining): where bits matter across hosts, every node must use the same cache file or the
genesis checkpoint. See docs/lm.md.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from seedswarm.node.files import atomic_write
from seedswarm.node.learn import lmdata
from seedswarm.node.learn.gpt import VOCAB, GPTConfig, build_gpt
from seedswarm.node.learn.taskcommon import (
    Shard,
    check_seed,
    draw,
    spread_shard,
    task_option,
    task_rng,
)
from seedswarm.node.learn.taskspec import TaskError

__all__ = ["LM_DEFAULTS", "LMTask", "cache_dir", "next_byte_loss", "pretrained"]

_MODEL, _PRETRAIN, _SHARD = 21, 22, 23  # purpose tags of the task's random streams
_CACHE_VERSION = 1  # bump when the pretraining procedure changes: old files are then ignored

LM_DEFAULTS: dict[str, Any] = {
    "layers": 4,
    "width": 128,
    "heads": 4,
    "context": 128,
    "mlp_ratio": 4,
    "pretrain_steps": 300,  # 0: start from the random initialisation
    "pretrain_batch": 16,
    "pretrain_lr": 3e-3,
    "code_bytes": 1_000_000,  # fine-tuning corpus budget (train + validation files)
    "val_fraction": 0.1,  # share of the chosen files held out for validation
    "eval_windows": 64,  # validation windows per evaluation: bounds its cost
    "min_shard": 16,  # windows per node at least (shards wrap and overlap beyond that)
    "cache": True,  # read and write the pretraining cache (cache_dir())
}


def next_byte_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The task's loss: mean cross-entropy of each next byte, nats per byte, over a batch
    ``(inputs, targets)`` of int64 ``(B, T)`` byte windows (``LMTask.loss``; the memory bench
    calls it on a model built without the task's data)."""
    x, y = batch
    return F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))


def cache_dir() -> Path:
    """``$SEEDSWARM_CACHE``, else ``$XDG_CACHE_HOME/seedswarm``, else ``~/.cache/seedswarm``."""
    if env := os.environ.get("SEEDSWARM_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "seedswarm"


def _pretrain_key(cfg: GPTConfig, seed: int, steps: int, batch: int, lr: float) -> dict[str, Any]:
    """Everything the pretrained bits depend on (the cache file is named by its hash)."""
    return {"version": _CACHE_VERSION, "model": asdict(cfg), "seed": seed, "steps": steps, "batch": batch,
            "lr": lr, "data": lmdata.prose().digest, "torch": torch.__version__}


def _log(msg: str) -> None:
    print(f"seedswarm lm: {msg}", file=sys.stderr, flush=True)


def _lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over the first 10 % of steps, then cosine decay to a tenth."""
    warm = max(1, steps // 10)
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * t)))


def _pretrain(cfg: GPTConfig, seed: int, steps: int, batch: int, lr: float) -> tuple[torch.Tensor, ...]:
    model = build_gpt(cfg, task_rng(seed, _MODEL))
    data = lmdata.prose().data
    rng = task_rng(seed, _PRETRAIN)
    hi = len(data) - cfg.context - 1
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.95), foreach=False)
    t0 = last = time.monotonic()
    announced = False
    with torch.enable_grad():
        for step in range(steps):
            starts = torch.from_numpy(rng.integers(0, hi, size=batch))
            w = lmdata.windows(data, starts, cfg.context)
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, steps, lr)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(w[:, :-1]).reshape(-1, VOCAB), w[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=False)
            opt.step()
            now = time.monotonic()
            if now - last > 5.0 or (announced and step + 1 == steps):
                if not announced:
                    _log(f"pretraining on {len(data):,} bytes of pydoc topics ({steps} steps; cached "
                         f"afterwards in {cache_dir()})")
                    announced = True
                eta = (now - t0) / (step + 1) * (steps - step - 1)
                _log(f"pretrain step {step + 1}/{steps}: loss {loss.item():.3f} nats/byte, "
                     f"{now - t0:.0f} s, about {eta:.0f} s left")
                last = now
    return tuple(p.detach().clone() for p in model.parameters())


def _read_cache(path: Path, key: dict[str, Any]) -> tuple[torch.Tensor, ...] | None:
    try:
        blob = torch.load(io.BytesIO(path.read_bytes()), weights_only=True)
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - a torn or foreign file: recompute and overwrite it
        _log(f"ignoring unreadable pretraining cache {path}: {type(e).__name__}: {e}")
        return None
    if not isinstance(blob, dict) or blob.get("key") != json.dumps(key, sort_keys=True):
        return None
    params = blob.get("params")
    if not isinstance(params, list) or not all(isinstance(t, torch.Tensor) for t in params):
        return None
    return tuple(params)


@functools.lru_cache(maxsize=4)
def pretrained(cfg: GPTConfig, seed: int, steps: int, batch: int, lr: float,
               use_cache: bool = True) -> tuple[torch.Tensor, ...]:
    """The pretrained parameters (``model.parameters()`` order), from the cache when there.

    Cached in-process too (a simulator builds the model several times). The file is written
    atomically (:func:`seedswarm.node.files.atomic_write`), so a crash or a concurrent writer never leaves a half
    file; a file that does not load, or whose key differs, is recomputed. An unwritable
    cache folder only costs the next run the pretraining again (a note on stderr).
    """
    key = _pretrain_key(cfg, seed, steps, batch, lr)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir() / f"lm-pretrain-{digest}.pt"
    if use_cache and (hit := _read_cache(path, key)) is not None:
        return hit
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the result must not depend on the caller's thread count
    try:
        params = _pretrain(cfg, seed, steps, batch, lr)
    finally:
        torch.set_num_threads(threads)
    if use_cache:
        buf = io.BytesIO()
        torch.save({"key": json.dumps(key, sort_keys=True), "params": list(params)}, buf)
        try:
            atomic_write(path, buf.getvalue())
        except OSError as e:
            _log(f"cannot write the pretraining cache {path}: {e.strerror or e}")
    return params


def _opt(opts: Mapping[str, Any], key: str, kind: type, ok: Any, what: str) -> Any:
    return task_option("lm", opts, LM_DEFAULTS, key, kind, ok, what)


class LMTask:
    """Byte-level next-byte prediction: a tied GPT (``gpt.py``), pretrained on prose, fine-tuned
    on standard-library code.

    Samples are windows of ``context + 1`` bytes of the training files at stride ``context``;
    ``shard`` gives node ``i`` a window of a seeded permutation of them (disjoint while there
    are at least ``min_shard`` windows per node, wrapping and overlapping beyond, as
    :class:`~seedswarm.node.learn.tasks.BaseTask`'s ``iid``). ``batch`` returns ``(inputs,
    targets)``, int64 ``(B, context)`` each. ``evaluate`` reads ``eval_windows`` fixed windows
    spread evenly over the validation files: ``loss`` (nats per byte), ``perplexity``,
    ``bits_per_byte`` and ``accuracy`` (of the most likely next byte).
    """

    name = "lm"
    metric = "loss"
    higher_is_better = False
    default_target: float | None = 2.4

    def __init__(self, options: Mapping[str, Any] | None = None, seed: int = 0) -> None:
        opts = dict(options or {})
        unknown = sorted(set(opts) - set(LM_DEFAULTS))
        if unknown:
            raise TaskError(f"unknown lm option(s) {unknown}; known: {sorted(LM_DEFAULTS)}")
        self.seed = check_seed(seed)
        pos = lambda v: v >= 1  # noqa: E731
        vals = {k: _opt(opts, k, int, pos, "a positive integer")
                for k in ("layers", "width", "heads", "context", "mlp_ratio", "pretrain_batch", "eval_windows",
                          "min_shard")}
        self.cfg = GPTConfig(vals["layers"], vals["width"], vals["heads"], vals["context"], vals["mlp_ratio"])
        try:
            self.cfg.check()
        except ValueError as e:
            raise TaskError(str(e)) from None
        self.pretrain_steps = _opt(opts, "pretrain_steps", int, lambda v: v >= 0, "an integer >= 0")
        self.pretrain_batch = vals["pretrain_batch"]
        self.pretrain_lr = _opt(opts, "pretrain_lr", float, lambda v: math.isfinite(v) and v > 0, "a positive number")
        budget = _opt(opts, "code_bytes", int, lambda v: v >= 10_000, "an integer >= 10000")
        val_fraction = _opt(opts, "val_fraction", float, lambda v: 0 < v < 1, "a number in (0, 1)")
        self.min_shard = vals["min_shard"]
        self.use_cache = _opt(opts, "cache", bool, lambda v: True, "a bool")
        self.options = {k: opts.get(k, d) for k, d in LM_DEFAULTS.items()}
        try:
            self.train, self.val = lmdata.code(self.seed, budget, val_fraction)
        except OSError as e:
            raise TaskError(f"lm: cannot read the standard-library sources: {e}") from e
        ctx = self.cfg.context
        n = lmdata.window_starts(len(self.train), ctx)
        if n < 1 or len(self.val) < ctx + 2:
            raise TaskError(f"lm: context {ctx} is too long for the corpus (code_bytes={budget})")
        perm = task_rng(self.seed, _SHARD).permutation(n).astype(np.int64)
        perm.setflags(write=False)
        self._perm = perm
        self._eval = lmdata.spread_windows(self.val.data, ctx, vals["eval_windows"])

    @property
    def num_train(self) -> int:
        return int(self._perm.shape[0])

    def build_model(self) -> nn.Module:
        model = build_gpt(self.cfg, task_rng(self.seed, _MODEL))
        if self.pretrain_steps:
            state = pretrained(self.cfg, self.seed, self.pretrain_steps, self.pretrain_batch, self.pretrain_lr,
                               self.use_cache)
            with torch.no_grad():
                for p, s in zip(model.parameters(), state, strict=True):
                    if p.shape != s.shape:
                        raise TaskError(f"lm: cached parameter of shape {tuple(s.shape)} for {tuple(p.shape)}")
                    p.copy_(s)
        return model

    def shard(self, index: int, count: int) -> Shard:
        return spread_shard(self._perm, index, count, self.min_shard)

    def batch(self, shard: Shard, rng: np.random.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``min(size, len(shard))`` distinct windows of the shard, drawn with ``rng``."""
        pos = draw(shard, rng, size)
        ctx = self.cfg.context
        w = lmdata.windows(self.train.data, torch.from_numpy(pos * ctx), ctx)
        return w[:, :-1], w[:, 1:]

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return next_byte_loss(model, batch)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        total, correct, count = 0.0, 0, 0
        with torch.no_grad():
            for w in self._eval.split(16):
                logits = model(w[:, :-1]).reshape(-1, VOCAB)
                y = w[:, 1:].reshape(-1)
                total += float(F.cross_entropy(logits, y, reduction="sum").to(torch.float64))
                correct += int((logits.argmax(dim=1) == y).sum())
                count += int(y.numel())
        loss = total / count
        # exp overflows past 709 nats: a diverged model has an infinite perplexity, not an error
        return {"loss": loss, "perplexity": math.exp(loss) if loss < 709.0 else math.inf,
                "bits_per_byte": loss / math.log(2),
                "accuracy": correct / count}
