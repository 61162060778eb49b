"""`seedswarm bench fuzz` at CI size: 100,000 mutated and random messages against one live
daemon over real libp2p streams (every direct protocol) and pubsub RPCs written by hand
(``seedswarm.gossip.libp2p.hostile``).

The daemon must stay up, keep applying rounds, keep its memory flat and count what it refused;
then every raw pubsub case of the hostile module, three times: the pubsub guard must drop and
count them (a garbage RPC and a key that does not parse used to stop the host) while the node
keeps training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from seedswarm.bench.hostile_pubsub import RAW_PUBSUB_CASES

MESSAGES = 100_000


def _run_fuzz(out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "seedswarm", "bench", "fuzz", "--messages", str(MESSAGES), "--seed", "1",
           "--json", "--quiet", "--out", str(out), "--timeout", "400",
           "--deep-share", "0.05", "--gossip-rate", "1200"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode in (0, 1), f"bench failed to run (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
def test_fuzz_ci_size(tmp_path: Path) -> None:
    s = _run_fuzz(tmp_path / "fuzz")
    why = json.dumps({k: s[k] for k in ("failures", "messages", "rss_mb", "rounds_applied_during_fuzz",
                                        "client_errors")}, indent=1)
    assert s["messages"] >= MESSAGES, why
    # every direct protocol and both gossip layers were hit
    for proto in ("msg", "inputs", "chain", "ckpt", "hello"):
        assert s["sent_by_channel"].get(f"direct:{proto}", 0) >= 20, s["sent_by_channel"]
    # the deep lane is paced at its share (5 %, about 5,000 of the 100,000) and stops with the run;
    # on a loaded machine it may fall a little short of its share, never to a few batches
    assert s["sent_by_channel"]["gossip:deep (validator-passing)"] >= 2000, s["sent_by_channel"]
    # alive, training, flat, counting
    assert s["alive_after_fuzz"], why
    assert s["rounds_applied_during_fuzz"] >= 20, why
    assert s["rss_mb"]["residual_after_drain"] < 50 and s["rss_mb"]["growth_after_warmup"] < 100, why
    rejected = s["rejected_by_reason"]
    assert rejected.get("malformed", 0) > 100 and rejected.get("bad-fraud-proof", 0) > 100, rejected
    assert rejected.get("no-admission", 0) > 100, rejected  # Joins without work, refused before a slot
    assert s["gossip_rejected_by_validator"] > 0 and s["transport_counters"]["frames_too_large"] > 0, s
    dropped = s["gossip_dropped_by_reason"]
    assert dropped.get("bad-signature", 0) > 0 and dropped.get("graylisted", 0) > 1000, dropped
    # every gossip message on a connection that stayed up was accounted for by the node
    # (delivered, refused or dropped); a loaded machine may cut a few of the ~60 connections
    errors = s["client_errors"]
    # A deep-lane batch (1,000 messages that reach the core) can take the node more than 15 s to
    # count on an idle machine, where its own rounds run flat out: with the former 15 s window
    # 3 to 4 of the 5 deep connections were reported as stalled, with the 45 s window none (and
    # the same tree before this session failed alike, so it was the window, not a regression).
    # Up to two are still allowed; a third, or any broken-envelope lane, fails the test.
    stalled = {k: v for k, v in errors.items() if "accounted" in k}
    assert sum(stalled.values()) <= 2 and not any(k.startswith("gossip:broken") for k in stalled), errors
    assert sum(v for k, v in errors.items() if "connection cut" in k) <= 5, errors
    # raw pubsub frames, last: every case sent, dropped by the guard and counted, node alive
    assert set(RAW_PUBSUB_CASES) <= {k.split(":")[1] for k in s["raw_pubsub"]}, s["raw_pubsub"]
    raw = s["raw_pubsub_dropped_by_reason"]
    for reason in ("rpc-decode", "no-key", "bad-varint", "oversized-rpc", "truncated-rpc", "stalled-rpc"):
        assert raw.get(reason, 0) >= 1, raw
    assert s["alive_after_raw_frames"], why
    assert s["ok"], why
    assert s["exit_code_on_sigterm"] == 0, why
