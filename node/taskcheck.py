"""`seedswarm task check SPEC`: does a task give a swarm what it needs, before anyone runs it?

Every node builds the task itself from the genesis's spec, options and seed, so what must hold is
determinism across calls and across processes, plus the shapes and keys the protocol reads. The
checks, in order (a failure of the first two stops the rest):

1. load: the spec resolves and the factory returns a Task;
2. model: ``build_model()`` gives float32 parameters, identical when built twice and when built
   by a second instance of the task (another node);
3. shards: ``shard(i, count)`` is the same data on every call and in a second instance, never
   empty, and cheap enough for a 10,000-node simulation;
4. batches: ``batch(shard, rng, size)`` draws only from the generator it is given (same seed,
   same batch), and what it returns;
5. loss: a finite scalar tensor, differentiable (for ``fo``);
6. evaluate: returns numbers for ``accuracy``, ``loss`` and the task's metric (``task_metric``:
   what ``--target`` is compared with, accuracy unless the task declares another), and leaves
   the model unchanged;
7. one local estimate per estimator: what a trainer computes each round, timed.

Exit code 0 when nothing failed (warnings allowed), 1 otherwise, 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass
class Check:
    name: str
    status: str  # OK, WARN or FAIL
    detail: str


def _digest(obj: Any) -> str:
    """A digest of data: arrays, tensors, Shards, and containers of them, by value."""
    import torch

    hsh = hashlib.sha256()

    def feed(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().contiguous().cpu()
            hsh.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            hsh.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, np.ndarray):
            a = np.ascontiguousarray(o)
            hsh.update(f"A{a.dtype}{a.shape}".encode() + a.tobytes())
        elif isinstance(o, list | tuple):
            hsh.update(f"L{len(o)}".encode())
            for x in o:
                feed(x)
        elif isinstance(o, dict):
            hsh.update(f"D{len(o)}".encode())
            for k in sorted(o, key=repr):
                feed(k)
                feed(o[k])
        elif hasattr(o, "indices") and isinstance(o.indices, np.ndarray):  # Shard
            feed(o.indices)
        else:
            hsh.update(repr(o).encode())

    feed(obj)
    return hsh.hexdigest()


def _shapes(batch: Any) -> str:
    import torch

    if isinstance(batch, torch.Tensor | np.ndarray):
        dtype = str(batch.dtype).replace("torch.", "")
        return f"{dtype}{list(batch.shape)}"
    if isinstance(batch, list | tuple):
        return "(" + ", ".join(_shapes(x) for x in batch) + ")"
    return type(batch).__name__


def _ms(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def check_task(spec: str, options: dict[str, Any], seed: int = 0, *, batch_size: int = 64,
               directions: int = 64, estimators: tuple[str, ...] = ("fo", "zo"),
               count: int = 8) -> Iterator[Check]:
    """Run the checks one by one (a generator, so a caller can print each as it finishes)."""
    import torch

    from seedswarm.crypto.hashing import stream_seed
    from seedswarm.node.core.genesis import Genesis
    from seedswarm.node.learn.estimators import local_estimate
    from seedswarm.node.learn.replay import model_digest
    from seedswarm.node.learn.tasks import load_task, param_count, task_metric
    from seedswarm.node.learn.trainable import SubsetTask, trainable_summary

    def guarded(name: str, fn: Callable[[], Check]) -> Check:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a plug-in's bug is a finding, not a crash
            return Check(name, FAIL, f"{type(e).__name__}: {e}")

    torch.set_num_threads(1)  # as in sim and node: timings comparable with theirs
    t0 = time.perf_counter()
    try:
        task = load_task(spec, options, seed=seed)
        other = load_task(spec, options, seed=seed)  # what a second node builds
    except Exception as e:  # noqa: BLE001
        yield Check("load", FAIL, str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}")
        return
    kind = f"{type(task.inner).__name__} (a trainable subset)" if isinstance(task, SubsetTask) else type(task).__name__
    yield Check("load", OK, f"{kind} {task.name!r} in {_ms((time.perf_counter() - t0) / 2)}")

    state: dict[str, Any] = {}

    def model() -> Check:
        t = time.perf_counter()
        m = task.build_model()
        took = time.perf_counter() - t
        if not isinstance(m, torch.nn.Module):
            return Check("model", FAIL, f"build_model() returned {type(m).__name__}, not a torch.nn.Module")
        params = list(m.parameters())
        if not params:
            return Check("model", FAIL, "the model has no parameters")
        bad = sorted({str(p.dtype) for p in params if p.dtype != torch.float32})
        if bad:
            return Check("model", FAIL, f"parameters must be float32, found {', '.join(bad)}")
        d = model_digest(params)
        if model_digest(list(task.build_model().parameters())) != d:
            return Check("model", FAIL, "build_model() gave different parameters the second time: every node "
                         "builds the initial model itself, so it must depend only on (options, seed)")
        if model_digest(list(other.build_model().parameters())) != d:
            return Check("model", FAIL, "a second instance of the task (another node) built different "
                         "parameters: draw them from a generator seeded with the task's seed")
        state["model"] = m
        sub = trainable_summary(m)
        what = (f"{sub['trainable']:,} trainable float32 parameters ({sub['frozen']:,} frozen"
                + (f", LoRA on {sub['lora_layers']} layers)" if sub["lora_layers"] else ")")
                if sub["frozen"] or sub["lora_layers"] else f"{param_count(m):,} float32 parameters")
        return Check("model", OK, f"{what}, identical when built twice and by another instance ({_ms(took)})")

    yield (c := guarded("model", model))
    if c.status == FAIL:
        return
    m = state["model"]

    def shards() -> Check:
        for i in sorted({0, 1 % count, count - 1}):
            a, b, c2 = task.shard(i, count), task.shard(i, count), other.shard(i, count)
            if _digest(a) != _digest(b):
                return Check("shards", FAIL, f"shard({i}, {count}) gave different data on two calls: a node's "
                             "private data must be a function of (index, count) and the seed")
            if _digest(a) != _digest(c2):
                return Check("shards", FAIL, f"shard({i}, {count}) differs between two instances of the task "
                             "(two nodes): seed its randomness from the task's seed")
            if hasattr(a, "__len__") and len(a) == 0:
                return Check("shards", FAIL, f"shard({i}, {count}) is empty")
        t = time.perf_counter()
        for i in range(0, 10_000, 100):
            task.shard(i, 10_000)
        per = (time.perf_counter() - t) / 100
        state["shard"] = task.shard(1 % count, count)
        size = f"{len(state['shard'])} examples" if hasattr(state["shard"], "__len__") else "ok"
        msg = (f"deterministic across calls and instances; shard(1, {count}): {size}; "
               f"{_ms(per)} per shard at 10,000 nodes")
        return Check("shards", WARN if per * 10_000 > 5 else OK,
                     msg + (" (slow for a 10,000-node simulation: return index arrays)" if per * 10_000 > 5 else ""))

    yield (c := guarded("shards", shards))
    if c.status == FAIL:
        return

    def batches() -> Check:
        b1 = task.batch(state["shard"], np.random.default_rng(7), batch_size)
        b2 = task.batch(state["shard"], np.random.default_rng(7), batch_size)
        if _digest(b1) != _digest(b2):
            return Check("batches", FAIL, "two batches drawn with equally seeded generators differ: draw only "
                         "from the rng argument (the node owns the randomness)")
        state["batch"] = b1
        return Check("batches", OK, f"batch(shard, rng, {batch_size}) -> {_shapes(b1)}, reproducible from the rng")

    yield (c := guarded("batches", batches))
    if c.status == FAIL:
        return

    def loss() -> Check:
        v = task.loss(m, state["batch"])
        if not isinstance(v, torch.Tensor) or v.numel() != 1:
            return Check("loss", FAIL, f"loss() must return a scalar tensor, got {_shapes(v)}")
        x = float(v.detach().reshape(()).item())
        if not math.isfinite(x):
            return Check("loss", FAIL, f"loss() is not finite ({x})")
        if not v.requires_grad:
            return Check("loss", WARN, f"{x:.4f}, but not differentiable: only --estimator zo can train it")
        return Check("loss", OK, f"{x:.4f}, a differentiable scalar")

    yield guarded("loss", loss)

    def evaluate() -> Check:
        before = model_digest(list(m.parameters()))
        t = time.perf_counter()
        ev = task.evaluate(m)
        took = time.perf_counter() - t
        if not isinstance(ev, dict):
            return Check("evaluate", FAIL, f"evaluate() must return a dict, got {type(ev).__name__}")
        metric = task_metric(task)
        keys = list(dict.fromkeys(("accuracy", "loss", metric.key)))
        missing = [k for k in keys if k not in ev]
        if missing:
            return Check("evaluate", FAIL, f"evaluate() returned {sorted(map(str, ev))} without "
                         f"{' and '.join(repr(k) for k in missing)}: {metric.key!r} is the task's metric "
                         "(what --target is compared with); 'accuracy' and 'loss' are logged with it")
        bad = [k for k in keys if isinstance(ev[k], bool) or not isinstance(ev[k], int | float)
               or not math.isfinite(ev[k])]
        if bad:
            return Check("evaluate", FAIL, f"evaluate()[{bad[0]!r}] must be a finite number, got {ev[bad[0]]!r}")
        if model_digest(list(m.parameters())) != before:
            return Check("evaluate", FAIL, "evaluate() changed the model's parameters")
        text = f"accuracy {ev['accuracy']:.4f}, loss {ev['loss']:.4f} ({_ms(took)})"
        if metric.key == "accuracy" and metric.higher_is_better and not 0 <= ev["accuracy"] <= 1:
            return Check("evaluate", WARN, text + ": accuracy outside [0, 1]; --target (default 0.9) assumes a "
                         "share, higher is better")
        target = "" if metric.default_target is None else f", default target {metric.default_target:g}"
        return Check("evaluate", OK, text + f"; --target is compared with {metric.key} ({metric.direction}"
                     f"{target})")

    yield guarded("evaluate", evaluate)

    for est in estimators:
        def estimate(est: str = est) -> Check:
            genesis = Genesis(task=spec, seed=seed, estimator=est, batch_size=batch_size, directions=directions)
            streams = [stream_seed(0x5EED, k) for k in range(directions)]
            before = model_digest(list(m.parameters()))
            t = time.perf_counter()
            g = local_estimate(task, genesis, m, state["shard"], np.random.default_rng(1), streams)
            took = time.perf_counter() - t
            if len(g) != directions or not all(math.isfinite(x) for x in g):
                return Check(f"estimate {est}", FAIL, f"expected {directions} finite values, got {len(g)}")
            if model_digest(list(m.parameters())) != before:
                return Check(f"estimate {est}", FAIL, "the estimate changed the model's parameters")
            return Check(f"estimate {est}", OK, f"one trainer's round, K={directions} directions: {_ms(took)}")

        yield guarded(f"estimate {est}", estimate)


# ---------------------------------------------------------------------------------------------
# command line


def add_parser(sub: Any) -> None:
    from seedswarm.clihelp import TASK_OPTION_HELP, subcommand

    p = subcommand(sub, "task", help="check a task (model, data, loss, evaluation) before running it",
                   description="Tools for training tasks (docs/tasks.md).",
                   examples=["seedswarm task check digits", "seedswarm task check ./wine_task.py:make --task-option hidden=16"])
    tsub = p.add_subparsers(dest="task_cmd", required=True, metavar="ACTION")
    c = subcommand(
        tsub, "check", help="validate a task: determinism, shapes, metric keys, timing",
        description="Build the task as every node would and check it: the model builds identically twice, "
                    "shards are deterministic (same index, same data), batches come from the given generator, "
                    "the loss is a finite scalar, evaluate() returns 'accuracy' and 'loss', and one local "
                    "estimate per estimator runs (timed). Exit code 0 if nothing failed, 1 otherwise.",
        examples=["seedswarm task check digits --task-option hidden=128",
                  "seedswarm task check ./wine_task.py:make --task-option hidden=16 --seed 7",
                  "seedswarm task check mypkg.tasks:make --estimator zo"])
    c.add_argument("spec", metavar="SPEC", help="'digits', package.module:factory or path/to/file.py:factory")
    c.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE", help=TASK_OPTION_HELP)
    c.add_argument("--seed", type=int, default=0, help="the seed passed to the factory (a run's --seed)")
    c.add_argument("--batch-size", type=int, default=64, help="examples per batch, as a run's --batch-size")
    c.add_argument("--directions", type=int, default=64, help="K directions of the timed local estimate")
    c.add_argument("--estimator", choices=["fo", "zo", "both"], default="both",
                   help="which estimator's local estimate to run (fo: projected SGD step; zo: SPSA)")
    c.add_argument("--shards", type=int, default=8, metavar="COUNT", help="shard count of the determinism check")


def run_command(args: argparse.Namespace) -> int:
    from seedswarm.node.learn.initial import parse_task_options
    from seedswarm.node.learn.tasks import TaskError

    try:
        options = parse_task_options(args.task_option)
    except TaskError as e:
        print(f"seedswarm task check: {e}", file=sys.stderr)
        return 2
    if args.batch_size < 1 or args.directions < 1 or args.shards < 2 or args.seed < 0:
        print("seedswarm task check: --batch-size and --directions must be positive, --shards at least 2, "
              "--seed not negative", file=sys.stderr)
        return 2
    estimators = ("fo", "zo") if args.estimator == "both" else (args.estimator,)
    opts = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "none"
    print(f"checking task {args.spec} (options: {opts}; seed {args.seed})", flush=True)
    counts = {OK: 0, WARN: 0, FAIL: 0}
    for c in check_task(args.spec, options, args.seed, batch_size=args.batch_size, directions=args.directions,
                        estimators=estimators, count=args.shards):
        counts[c.status] += 1
        print(f"  {c.status:<4}  {c.name:<11} {c.detail}", flush=True)
    if counts[FAIL]:
        print(f"task check: {counts[FAIL]} problem(s) found", flush=True)
        return 1
    warn = f" ({counts[WARN]} warning(s))" if counts[WARN] else ""
    print(f"task check: {args.spec} is ready to train{warn}", flush=True)
    return 0
