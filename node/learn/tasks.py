"""Tasks: what a swarm trains (a model, private data shards, a loss, an evaluation).

The protocol core never looks inside a task: it builds the initial model from it, asks it for
a node's local batch and loss (to estimate projected gradients, ``node/learn/estimators.py``), and for
held-out metrics. A task is anything that satisfies the :class:`Task` protocol; most tasks
subclass :class:`~.basetask.BaseTask` (``basetask.py``), which supplies sharding (IID or Dirichlet label skew), batch
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

from collections.abc import Mapping
from typing import Any

from seedswarm.node.learn.basetask import BaseTask, Task, param_count
from seedswarm.node.learn.digits import DigitsTask, digits_param_count
from seedswarm.node.learn.lowprecision import AutocastTask, split_autocast_option
from seedswarm.node.learn.momentum import MomentumTask, split_momentum_option
from seedswarm.node.learn.precondition import PreconditionedTask, split_precondition_options
from seedswarm.node.learn.taskcommon import Metric, Shard, task_metric
from seedswarm.node.learn.taskcommon import check_seed as _check_seed
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
    task comes back wrapped in a :class:`~.trainable.SubsetTask` that applies them; so are
    ``precondition`` and its ``precondition_*`` options
    (:class:`~.precondition.PreconditionedTask`), ``autocast``
    (:class:`~.lowprecision.AutocastTask`) and ``momentum`` (:class:`~.momentum.MomentumTask`). Every problem
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
    opts, precondition = split_precondition_options(opts)  # precondition=: every task's (precondition.py)
    opts, autocast = split_autocast_option(opts)  # autocast=bf16: every task's (lowprecision.py)
    opts, momentum = split_momentum_option(opts)  # momentum=0.5: every task's (momentum.py)
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
    if subset is not None:
        task = SubsetTask(task, subset, seed)
    if precondition is not None:  # after the subset: the scale covers exactly the trainable parameters
        task = PreconditionedTask(task, precondition, seed)
    if momentum:
        task = MomentumTask(task, momentum)
    if autocast is not None:  # outermost: the preconditioner's scale comes from float32 passes
        task = AutocastTask(task, autocast)
    return task
