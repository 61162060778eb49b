"""The one genesis builder: genesis settings plus the digest of the task's initial model.

`seedswarm init`, `seedswarm sim` and `seedswarm cluster` all build their genesis here, so the
three cannot drift apart. It lives in the learning layer because the model digest needs the
task's model (torch); the genesis itself (``node.core.genesis``) stays torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from seedswarm.node.core.genesis import Genesis
from seedswarm.node.learn.replay import initial_digest
from seedswarm.node.learn.tasks import TaskError, load_task


def parse_task_options(pairs: Iterable[str]) -> dict[str, Any]:
    """``["hidden=4000", "pretrain=true"]`` -> ``{"hidden": 4000, "pretrain": True}``.

    A value is read as JSON when it parses (numbers, booleans, lists) and kept as a string
    otherwise, so ``--task-option name=wine`` needs no quotes.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise TaskError(f"--task-option expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def build_genesis(members: Iterable[bytes], task: str = "digits", task_options: Mapping[str, Any] | None = None,
                  seed: int = 0, **fields: Any) -> Genesis:
    """A genesis for ``members`` whose ``model_digest`` is the task's initial model's.

    ``fields`` are any other :class:`Genesis` fields. Raises TaskError for a bad task and
    GenesisError for bad settings.
    """
    options = dict(task_options or {})
    built = load_task(task, options, seed=seed)
    try:
        model = built.build_model()
    except ValueError:
        raise
    except Exception as e:  # a plug-in's bug: one line for the command line, not a traceback
        raise TaskError(f"task {task!r}: build_model() failed: {type(e).__name__}: {e}") from e
    return Genesis(task=task, task_options=options, seed=seed, members=tuple(members),
                   model_digest=initial_digest(model), **fields)
