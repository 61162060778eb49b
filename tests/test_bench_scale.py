"""`seedswarm bench scale`: one child process per size, a table against the smallest size."""

from __future__ import annotations

import json

from seedswarm.bench.scale import churn_config, main


def test_churn_config_has_every_kind_of_churn():
    cfg = churn_config(1000, 40, seed=3)
    assert cfg.join_nodes == 10 and 0 < cfg.join_at < 40
    assert cfg.leave_nodes == 10 and 0 < cfg.leave_at < 40
    assert cfg.crash_fraction > 0 and 0 < cfg.crash_at < 40


def test_scale_bench_runs_each_size_and_reports_ratios(capsys):
    assert main(["--sizes", "6,12", "--rounds", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["nodes"] for r in out["rows"]] == [6, 12]
    for r in out["rows"]:
        assert r["rounds"] >= 6 and r["rounds_per_second"] > 0 and r["peak_rss_mb"] > 50
        assert r["honest_digest_agreement"] == 1.0


def test_scale_bench_bad_arguments(capsys):
    assert main(["--sizes", "ten"]) == 2
    assert "--sizes expects integers" in capsys.readouterr().err
    assert main(["--sizes", "1", "--rounds", "4"]) == 2
