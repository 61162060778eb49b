"""Fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path

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
