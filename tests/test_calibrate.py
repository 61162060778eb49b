"""The round timeout sized from the task's measured compute (node/learn/calibrate.py).

A task whose trainers need more than the default timeout per round gets a genesis that waits for
them (they were cut off and expelled before); the default task keeps the default; an explicit
``--round-timeout`` wins; the rule is ``SAFETY`` times the measured round, rounded up.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seedswarm import cli
from seedswarm.crypto.keys import Identity
from seedswarm.node.core.genesis import Genesis, default
from seedswarm.node.learn.calibrate import SAFETY, RoundCompute, measure_round_compute
from seedswarm.node.learn.initial import build_genesis
from seedswarm.node.learn.tasks import load_task

KEY = Identity.from_seed(b"\x07" * 32).public.hex()
SLEEP = 0.8  # seconds the slow task's loss takes: 3 x 0.8 is over the 2 s default


def test_the_rule() -> None:
    assert RoundCompute(0.01, 0.001).round_timeout(2.0) == 2.0
    assert RoundCompute(0.61, 0.52).round_timeout(2.0) == pytest.approx(3.4)  # 3 x 1.13 = 3.39, up to 3.4
    assert RoundCompute(10.0, 5.0).round_timeout(2.0) == SAFETY * 15.0


def test_measure_sees_the_estimate_and_the_application() -> None:
    task = load_task("digits", {"hidden": 16}, seed=0)
    g = build_genesis([bytes.fromhex(KEY)], task="digits", task_options={"hidden": 16}, directions=64)
    m = measure_round_compute(task, g)
    assert 0 < m.estimate_s < 5 and 0 < m.apply_s < 5


@pytest.fixture
def slow_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "seedswarm_test_slowtask.py").write_text(
        "import time\n"
        "from seedswarm.node.learn.tasks import DigitsTask\n"
        "class Slow(DigitsTask):\n"
        "    def loss(self, model, batch):\n"
        f"        time.sleep({SLEEP})\n"
        "        return super().loss(model, batch)\n"
        "def factory(options, seed):\n"
        "    return Slow(options, seed)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "seedswarm_test_slowtask:factory"


def test_init_waits_for_a_slow_trainer_and_says_so(tmp_path: Path, slow_task: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "g.json"
    assert cli.main(["init", "--member", KEY, "--task", slow_task, "--task-option", "hidden=8",
                     "--out", str(out)]) == 0
    g = Genesis.load(out)
    assert g.round_timeout >= SAFETY * SLEEP > default("round_timeout")
    err = capsys.readouterr().err
    assert f"round timeout {g.round_timeout} s" in err and "--round-timeout" in err


def test_an_explicit_timeout_wins_and_the_default_task_keeps_the_default(tmp_path: Path, slow_task: str) -> None:
    out = tmp_path / "g.json"
    assert cli.main(["init", "--member", KEY, "--task", slow_task, "--task-option", "hidden=8",
                     "--round-timeout", "1.5", "--out", str(out)]) == 0
    assert Genesis.load(out).round_timeout == 1.5
    plain = tmp_path / "plain.json"
    assert cli.main(["init", "--member", KEY, "--task-option", "hidden=8", "--out", str(plain)]) == 0
    assert json.loads(plain.read_text())["round_timeout"] == default("round_timeout")
