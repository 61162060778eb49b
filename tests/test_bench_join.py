"""`seedswarm bench join`: one joiner into a small running swarm of real daemons, its start-up
broken down phase by phase. Pins that the breakdown is complete, ordered and adds up, and that
idle memory is read for both processes; no timing thresholds (the machine is shared)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from seedswarm.bench.join import PHASES, REQUIRED, breakdown, cpu_layout, pss_mib
from tests.test_daemon import ENV, PY


def test_breakdown_orders_by_time_and_adds_up() -> None:
    # records can arrive while the checkpoint downloads: first_apply before checkpoint
    phases = {"main": 10.5, "torch_import": 11.0, "modules_import": 11.2, "checkpoint": 13.0, "first_apply": 12.5}
    rows = breakdown(phases, spawned=10.0)
    assert [r["phase"] for r in rows] == ["interpreter", "torch_import", "modules_import", "first_apply", "checkpoint"]
    assert rows[-1]["at_s"] == pytest.approx(3.0)
    assert sum(r["took_s"] for r in rows) == pytest.approx(rows[-1]["at_s"])
    assert all(r["took_s"] >= 0 for r in rows)


def test_pss_of_this_process() -> None:
    m = pss_mib(os.getpid())
    assert m is not None and 0 < m["pss_mib"] <= m["rss_mib"]
    assert pss_mib(2**22 + 7) is None  # no such process


@pytest.mark.slow
def test_one_joiner_into_three_founders(tmp_path: Path) -> None:
    res = subprocess.run([*PY, "bench", "join", "--nodes", "3", "--rounds-before", "12", "--checkpoint-every", "10",
                          "--timeout", "150", "--out", str(tmp_path / "run"), "--json"],
                         capture_output=True, text=True, timeout=200, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    rows = out["phases"]
    names = [r["phase"] for r in rows]
    # complete: every phase of a join, each once (the checkpoint only where the joiner chose one
    # over replaying the records from the genesis)
    label = {"main": "interpreter"}
    assert len(names) == len(set(names))
    assert {label.get(p, p) for p in REQUIRED} <= set(names) <= {label.get(p, p) for p in PHASES}, names
    # ordered: in time, and the start-up steps in the order the daemon takes them
    ats = [r["at_s"] for r in rows]
    assert ats == sorted(ats) and ats[0] > 0
    pos = {n: i for i, n in enumerate(names)}
    # (not chain_fetched before first_apply: with the joiner on a CPU of its own, 1 run in 6 marked
    # its first applied round 7 ms before the first chain answer; the order of those two is not
    # what this test is about, and the cause was not traced)
    for a, b in [("interpreter", "torch_import"), ("torch_import", "modules_import"), ("modules_import", "identity"),
                 ("identity", "model"), ("modules_import", "libp2p_import"), ("model", "listening"),
                 ("libp2p_import", "listening"),
                 ("listening", "first_peer"), ("first_peer", "chain_fetched"), ("first_peer", "first_apply"),
                 ("first_peer", "checkpoint"), ("join_sent", "member"), ("member", "first_contribution")]:
        assert a not in pos or b not in pos or pos[a] < pos[b], (a, b, names)
    # adds up: the durations sum to the last phase's time; the headline figures are rows of it
    assert sum(r["took_s"] for r in rows) == pytest.approx(ats[-1], abs=0.01)
    assert out["first_round_applied_s"] == next(r["at_s"] for r in rows if r["phase"] == "first_apply")
    assert out["member_s"] <= ats[-1]
    assert out["swarm_round_at_join"] >= 12
    for who in ("joiner", "founder"):
        m = out["idle_memory_mib"][who]
        assert m is not None and 0 < m["pss_mib"] <= m["rss_mib"]
    assert set(out["exit_codes"].values()) == {0}
    assert out["params"] == 2410
    # the joiner ran on a CPU of its own, as on its own host (where there are two CPUs to split)
    avail = sorted(os.sched_getaffinity(0))
    if len(avail) >= 2:
        assert out["cpus"] == {"joiner": avail[-1:], "founders": avail[:-1]}


def test_cpu_layout() -> None:
    avail = frozenset(os.sched_getaffinity(0))
    assert cpu_layout(own_cpu=False) == {"founders": None, "joiner": None}
    own = cpu_layout(own_cpu=True)
    if len(avail) < 2:
        assert own == {"founders": None, "joiner": None}
    else:
        assert own["joiner"] is not None and own["founders"] is not None
        assert len(own["joiner"]) == 1 and own["joiner"] | own["founders"] == avail
        assert not own["joiner"] & own["founders"]
