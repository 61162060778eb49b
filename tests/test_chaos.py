"""`seedswarm bench chaos` at CI size: 4 real daemons, about 75 s of seeded kills, pauses, link
drops (in network namespaces when the test runs as root, else on loopback without them), Join
floods with real join work, and hostile traffic of every kind (every raw pubsub case of
``seedswarm.gossip.libp2p.hostile`` included), then the bench's own end checks.

Every check of the bench is asserted on its own, so a failure says which one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def _run_chaos(out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "seedswarm", "bench", "chaos", "--nodes", "4", "--minutes", "1.25", "--seed", "3",
           "--fault-every", "6", "--join-flood", "3", "--json", "--quiet", "--out", str(out)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode in (0, 1), f"bench failed to run (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
def test_chaos_ci_size(tmp_path: Path) -> None:
    s = _run_chaos(tmp_path / "chaos")
    why = json.dumps({k: s[k] for k in ("failures", "faults", "agreement", "stores", "settled", "adversary_errors")},
                     indent=1)
    # the faults and the adversary really ran
    f = s["faults"]
    assert f["kills"] + f["pauses"] >= 2, why
    assert f["join_floods"] == 2, why
    if "namespaces" in s["transport"]:
        assert f["link_drops"] >= 1, why
    assert s["hostile_sent_total"] > 100 and len(s["hostile_sent_by_kind"]) >= 15, s["hostile_sent_by_kind"]
    assert sum(s["rejected_by_reason"].values()) > 50, s["rejected_by_reason"]
    for reason in ("malformed", "wrong-run", "bad-signature"):
        assert s["rejected_by_reason"].get(reason, 0) > 0, s["rejected_by_reason"]
    assert sum(s["gossip_dropped_by_reason"].values()) > 0, s["gossip_dropped_by_reason"]
    floods = s["join_floods"]
    assert len(floods["floods"]) == 2 and all(x["sent"] == "written" for x in floods["floods"]), floods
    assert floods["admitted_total"] <= floods["sent_total"], floods
    # the end checks, one by one
    assert s["settled"], why
    a = s["agreement"]
    assert not a["mismatches"] and len(a["rounds"]) == 1, why
    st = s["stores"]
    assert st["compared_rounds"] >= a["rounds"][0] - 1 > 10 and not st["first_differences"] and not st["holes"], why
    assert all(r["ok"] is not False for r in s["restarts_checked"]), s["restarts_checked"]
    assert all(c == 0 for c in s["exit_codes"].values()), s["exit_codes"]
    assert s["splits"]["detected"] == s["splits"]["healed"], s["splits"]
    assert f["kills"] == 0 or f["kills_survived"] == f["kills"], why
    assert not s["crashes"], "\n\n".join(f"node-{c['node']} exit {c['exit_code']}: {c.get('signature')}\n{c['log_tail']}"
                                         for c in s["crashes"])
    assert s["ok"], why
