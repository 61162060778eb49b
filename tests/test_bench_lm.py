"""``seedswarm bench lm`` (bench/lm.py) on a tiny GPT: the three arms run and compare honestly.

These are not the benchmark's figures (docs/lm.md has those); they check that the arms get the
same samples, that the comparison is computed from this run's own curves, and that the output
holds what the README quotes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seedswarm.bench import lm as bench_lm

pytestmark = pytest.mark.usefixtures("private_cache")  # tests/conftest.py


def test_bench_lm_quick_compares_three_arms(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lm.json"
    argv = ["--quick", "--rounds", "6", "--eval-every", "3", "--adam-lr", "3e-3", "1e-2", "--json", "--out", str(out)]
    assert bench_lm.main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert r == json.loads(out.read_text())
    b = r["bench"]
    assert b["rounds"] == 6 and b["nodes"] == 12 and r["params"] == 21_984
    # Adam: both learning rates ran on the swarm's per-round sample count; the best is the reference.
    assert r["samples_per_round"] == b["trainers"] * b["batch_size"] * b["local_steps"]
    assert set(r["adam_curves"]) == {"0.003", "0.01"}
    finals = {k: c[-1][1] for k, c in r["adam_curves"].items()}
    assert r["adam_final_loss"] == min(finals.values()) < r["initial_loss"]
    assert [rd for rd, _ in r["adam_curves"]["0.01"]] == [0, 3, 6]
    # The swarm started from the same model, ran every round, and agreed on it.
    ss = r["seedswarm"]
    assert ss["curve"][0][1] == pytest.approx(r["initial_loss"], abs=1e-6)
    assert ss["rounds"] >= 6 and ss["honest_digest_agreement"] == 1.0
    assert ss["final_metric"] == dict(map(tuple, ss["curve"]))[6]  # compared at the same round as Adam
    gain = r["initial_loss"] - r["adam_final_loss"]
    assert r["share_of_adam"] == pytest.approx((r["initial_loss"] - ss["final_metric"]) / gain)
    # A trainer's upload is its K one-byte projections plus a bounded envelope.
    assert 64 < ss["bytes_per_trainer_per_round"] <= r["trainer_bytes_budget"] == 64 + 160
    # MoDeST ran against the same target; its messages are whole models.
    md = r["modest"]
    assert md["bytes_per_trainer_per_round"] > 4 * r["params"]
    assert r["target"] == pytest.approx(r["initial_loss"] - 0.5 * gain, abs=1e-4)
    if ss["bytes_to_target"] and md["bytes_to_target"]:
        assert r["modest_bytes_ratio"] == pytest.approx(md["bytes_to_target"] / ss["bytes_to_target"])
    text = bench_lm.report(r)
    assert "share of Adam's loss reduction" in text and "K+160" in text
    # A sweep over the swarm's settings reuses Adam's deterministic curves instead of rerunning them.
    capsys.readouterr()
    assert bench_lm.main(argv[:-3] + ["--directions", "32", "--no-modest", "--json", "--adam-from", str(out)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["adam_curves"] == r["adam_curves"] and "modest" not in again
    assert again["bench"]["directions"] == 32 and again["trainer_bytes_budget"] == 32 + 160
    with pytest.raises(SystemExit):
        bench_lm.main(argv[:-3] + ["--rounds", "3", "--adam-from", str(out)])  # Adam ran 6 steps there
    assert "other settings" in capsys.readouterr().err
    # ... and adding an arm to a finished swarm run reuses the swarm's arm (same settings, target).
    assert bench_lm.main(argv[:-3] + ["--no-modest", "--json", "--adam-from", str(out), "--swarm-from", str(out)]) == 0
    third = json.loads(capsys.readouterr().out)
    assert third["seedswarm"] == dict(ss, reused=True) and third["share_of_adam"] == r["share_of_adam"]
    for other in (["--directions", "32"], ["--target", "2.0"]):  # the swarm's settings, or the target, differ
        with pytest.raises(SystemExit):
            bench_lm.main(argv[:-3] + [*other, "--no-modest", "--adam-from", str(out), "--swarm-from", str(out)])
        assert "--swarm-from" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an earlier result is never overwritten without --force
        bench_lm.main(argv)
    assert "exists" in capsys.readouterr().err and json.loads(out.read_text()) == r


def test_bench_lm_refuses_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        bench_lm.main(["--quick", "--rounds", "0"])
    assert e.value.code == 2 and "must be positive" in capsys.readouterr().err
