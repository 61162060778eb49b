"""Task specs: the module part of ``MODULE:factory`` (``package.module`` from ``sys.path``, or a
Python file), and :class:`TaskError`, the error of every task problem.

A spec whose module part ends in ``.py`` or contains a path separator
(``path/to/file.py:factory``, ``./mytask.py:make``) names a file: it is loaded as a module of
its own (under a name derived from its resolved path, so two files called ``task.py`` in
different folders never collide) and loaded once per process. A relative path is relative to
the current directory of the process that loads the task (every node of a swarm loads it from
the genesis's spec, so each host needs the file at that path). Raises :class:`TaskError`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType


class TaskError(ValueError):
    """A task spec, its options or its factory is wrong (the message says how to fix it)."""


def is_file_spec(module: str) -> bool:
    """Does the module part of a spec name a file rather than an importable module?"""
    return module.endswith(".py") or "/" in module or os.sep in module


def _module_name(path: Path) -> str:
    stem = re.sub(r"\W", "_", path.stem) or "task"
    return f"seedswarm_task_{stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"


def load_file_module(spec_module: str) -> ModuleType:
    """The Python file ``spec_module`` as a module (cached in ``sys.modules``)."""
    path = Path(spec_module).expanduser()
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise TaskError(f"task file {spec_module!r} not found{where}")
    path = path.resolve()
    name = _module_name(path)
    if (cached := sys.modules.get(name)) is not None:
        return cached
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TaskError(f"task file {spec_module!r} cannot be loaded as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: dataclasses and pickling look it up
    try:
        spec.loader.exec_module(module)
    except BaseException as e:
        sys.modules.pop(name, None)
        if isinstance(e, KeyboardInterrupt | SystemExit):
            raise
        raise TaskError(f"task file {spec_module!r} failed to import: {type(e).__name__}: {e}") from e
    return module


def import_task_module(spec_module: str) -> ModuleType:
    """The module named by a spec's module part: a file (see :func:`is_file_spec`) or a module
    importable from ``sys.path``."""
    if is_file_spec(spec_module):
        return load_file_module(spec_module)
    try:
        return importlib.import_module(spec_module)
    except ModuleNotFoundError as e:
        if e.name is not None and (spec_module == e.name or spec_module.startswith(e.name + ".")):
            raise TaskError(f"task module {spec_module!r} not found (is it on sys.path? a file needs "
                            "a path: ./name.py:factory)") from e
        raise TaskError(f"task module {spec_module!r} failed to import: {e}") from e
    except Exception as e:
        raise TaskError(f"task module {spec_module!r} failed to import: {e!r}") from e
