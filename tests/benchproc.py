"""Run a ``seedswarm bench ...`` command as a child process and read its ``--json`` line
(shared by the namespace benches' tests: one place that kills a bench left running), and skip
a test, saying why, where its namespaces cannot be built."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def run_bench_json(args: list[str], timeout: float = 300) -> tuple[dict[str, Any], int]:
    """``python -m seedswarm bench ARGS``; asserts exit 0 and returns the last stdout line as JSON,
    and the bench's pid (benches name what they create after it)."""
    p = subprocess.Popen([sys.executable, "-m", "seedswarm", "bench", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, f"exit {p.returncode}\nstdout: {out[-3000:]}\nstderr: {err[-3000:]}"
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result, p.pid


def skip_unless_possible(what: str, reason: str | None) -> None:
    """Skip the calling test when ``reason`` (a probe's "why not here") is set; the line is
    printed too, so a ``-q`` run shows why a root-only test did not run."""
    if reason:
        print(f"\nSKIP {what}: {reason}")
        pytest.skip(reason)
