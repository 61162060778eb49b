"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from seedswarm.node.learn import lm


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Its own cache folder for the test (never the user's ~/.cache) and a cold in-process cache.

    The ``lm`` task pretrains once and caches the result on disk and in the process; modules that
    build it use this fixture (``pytestmark = pytest.mark.usefixtures("private_cache")``)."""
    monkeypatch.setenv("SEEDSWARM_CACHE", str(tmp_path / "cache"))
    lm.pretrained.cache_clear()
    return tmp_path / "cache"


@pytest.fixture
def nodes() -> Iterator[list[Any]]:
    """Daemon processes a test starts (objects with a ``proc``): killed at the end if still running."""
    started: list[Any] = []
    yield started
    for n in started:
        if n.proc.poll() is None:
            n.proc.kill()
            n.proc.wait()
