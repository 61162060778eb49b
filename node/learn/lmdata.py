"""The ``lm`` task's text: data that is already on every machine with a Python, read as bytes.

* **Pretraining prose**: the Python documentation's topic texts that ship in the standard
  library as ``pydoc_data/topics.py`` (the ``help()`` pages: English prose with code samples,
  about 465 kB in 3.11), joined in sorted key order.
* **Fine-tuning code**: Python standard-library source files under
  ``sysconfig.get_paths()['stdlib']``, test suites and third-party packages excluded. The
  candidates are ordered by a seeded hash of their relative path, taken in that order until
  ``budget`` bytes, and the first ``val_fraction`` of the chosen files (at least one) is the
  validation split: a split by file, so no validation byte comes from a file trained on.

Nothing is downloaded. The bytes depend on the Python version (3.11.7 and 3.12.1 ship
different docs and sources), so every node of a swarm must run the same Python minor release
for its pretrained model, and hence the genesis digest, to match; :attr:`Corpus.digest` names
the exact bytes.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                            "__pycache__", "lib2to3", "turtledemo", "ensurepip", "venv"})
_SEPARATOR = b"\n\n"  # between documents: a boundary a byte model can learn


@dataclass(frozen=True, eq=False)
class Corpus:
    """Bytes as a uint8 tensor, and where they came from."""

    data: torch.Tensor = field(repr=False)
    files: tuple[str, ...]
    digest: str

    def __len__(self) -> int:
        return int(self.data.shape[0])


def _corpus(parts: list[bytes], names: list[str]) -> Corpus:
    blob = _SEPARATOR.join(parts)
    digest = hashlib.sha256(blob).hexdigest()
    arr = np.frombuffer(blob, dtype=np.uint8).copy()
    return Corpus(torch.from_numpy(arr), tuple(names), digest)


@functools.lru_cache(maxsize=2)
def prose() -> Corpus:
    """The pretraining prose: ``pydoc_data.topics.topics`` values in sorted key order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # a stripped Python (some distributions split it out)
        raise FileNotFoundError(f"pydoc_data.topics is not installed with this Python: {e}") from e
    keys = sorted(topics)
    return _corpus([topics[k].encode("utf-8") for k in keys], [f"pydoc_data/topics.py:{k}" for k in keys])


def stdlib_sources() -> tuple[Path, list[str]]:
    """The standard library's directory and its candidate ``.py`` files (sorted relative paths)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for here, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _EXCLUDED_DIRS]  # prune: site-packages is large
        rel_dir = Path(here).relative_to(root)
        found += [(rel_dir / n).as_posix() for n in names if n.endswith(".py") and not n.startswith("test_")]
    if not found:
        raise FileNotFoundError(f"no Python sources found under {root}")
    return root, sorted(found)


def _order_key(seed: int, rel: str) -> bytes:
    return hashlib.sha256(f"seedswarm/lm-code/{seed}/{rel}".encode()).digest()


@functools.lru_cache(maxsize=4)
def code(seed: int, budget: int, val_fraction: float, max_file: int = 200_000) -> tuple[Corpus, Corpus]:
    """The fine-tuning (train, validation) split of standard-library sources.

    Files larger than ``max_file`` bytes are skipped (one huge module would dominate a small
    budget). Raises FileNotFoundError when the sources are missing (a Python without them).
    """
    root, rels = stdlib_sources()
    chosen: list[tuple[str, bytes]] = []
    total = 0
    for rel in sorted(rels, key=lambda r: _order_key(seed, r)):
        if total >= budget:
            break
        data = (root / rel).read_bytes()
        if not data.strip() or len(data) > max_file:
            continue
        chosen.append((rel, data))
        total += len(data)
    if len(chosen) < 2:
        raise FileNotFoundError(f"fewer than two usable source files under {root}")
    n_val = min(len(chosen) - 1, max(1, round(val_fraction * len(chosen))))
    val, train = chosen[:n_val], chosen[n_val:]
    return (_corpus([d for _, d in train], [r for r, _ in train]),
            _corpus([d for _, d in val], [r for r, _ in val]))


def window_starts(length: int, context: int) -> int:
    """How many training windows of ``context + 1`` bytes a corpus holds at stride ``context``
    (consecutive windows share one byte, so every byte after the first is a target once)."""
    return max(0, (length - 1) // context)


def windows(data: torch.Tensor, starts: torch.Tensor, context: int) -> torch.Tensor:
    """The int64 windows ``data[s : s + context + 1]`` for each start, one row each."""
    idx = starts.reshape(-1, 1) + torch.arange(context + 1).reshape(1, -1)
    return data[idx].to(torch.int64)


def spread_windows(data: torch.Tensor, context: int, count: int) -> torch.Tensor:
    """At most ``count`` windows spread evenly over ``data`` (a fixed validation set: the same
    windows at every evaluation, their number bounding its cost)."""
    span = int(data.shape[0]) - context - 1
    k = min(count, span // context + 1)
    starts = np.unique(np.linspace(0, span, k).round().astype(np.int64))
    return windows(data, torch.from_numpy(starts), context)
