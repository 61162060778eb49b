"""`seedswarm bench chaos` at CI size: 4 real daemons, about 75 s of seeded kills, pauses, link
drops (in network namespaces when the test runs as root, else on loopback without them), Join
floods and hostile traffic of every kind, then the bench's own end checks.

The two raw pubsub cases that stop a stock py-libp2p 0.8.1 host (``garbage-rpc``, ``bad-key``)
are left out here: tests/test_fuzz.py sends them last, to one daemon, and says what happened.
Every check of the bench is asserted on its own, so that a known daemon bug (matched by its log
signature) is the only thing that can turn this test into an expected failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from seedswarm.bench.chaos import CRASH_SIGNATURES

TIME_WAIT_BUG = CRASH_SIGNATURES[0][0]


def _run_chaos(out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "seedswarm", "bench", "chaos", "--nodes", "4", "--minutes", "1.25", "--seed", "3",
           "--fault-every", "6", "--join-flood", "3", "--exclude", "garbage-rpc,bad-key", "--json", "--quiet",
           "--out", str(out)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode in (0, 1), f"bench failed to run (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
def test_chaos_ci_size(tmp_path: Path) -> None:
    s = _run_chaos(tmp_path / "chaos")
    why = json.dumps({k: s[k] for k in ("failures", "faults", "agreement", "stores", "settled")}, indent=1)
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
    # the end checks, one by one
    assert s["settled"], why
    a = s["agreement"]
    assert not a["mismatches"] and len(a["rounds"]) == 1, why
    st = s["stores"]
    assert st["compared_rounds"] >= a["rounds"][0] - 1 > 10 and not st["first_differences"], why
    assert all(r["ok"] is not False for r in s["restarts_checked"]), s["restarts_checked"]
    assert all(c == 0 for c in s["exit_codes"].values()), s["exit_codes"]
    assert s["splits"]["detected"] == s["splits"]["healed"], s["splits"]
    assert f["kills"] == 0 or f["kills_survived"] == f["kills"], why
    unknown = [c for c in s["crashes"] if c.get("signature") != TIME_WAIT_BUG]
    assert not unknown, "\n\n".join(f"node-{c['node']} exit {c['exit_code']}: {c.get('signature')}\n{c['log_tail']}" for c in unknown)
    if s["crashes"]:
        pytest.xfail(
            "daemon bug: `seedswarm node` cannot restart on its port for ~60 s after it was SIGKILLed "
            "(node/cli.py _check_ports_free binds without SO_REUSEADDR, so the dead process's TIME_WAIT "
            f"sockets make it exit 2 'Address already in use'); restarts refused: {len(s['crashes'])}")
    assert s["ok"], why
