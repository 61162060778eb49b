"""`seedswarm bench fuzz` at CI size: 100,000 mutated and random messages against one live
daemon over real libp2p streams (every direct protocol) and hand-written pubsub RPCs.

The daemon must stay up, keep applying rounds, keep its memory flat and count what it refused.
The raw pubsub frames go last; two of them stop a stock py-libp2p 0.8.1 host (LIBP2P-NOTES.md),
which is an expected failure, named, until the adapter's guard is in main.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

MESSAGES = 100_000


def _run_fuzz(out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "seedswarm", "bench", "fuzz", "--messages", str(MESSAGES), "--seed", "1",
           "--json", "--quiet", "--out", str(out), "--timeout", "400",
           "--deep-share", "0.1", "--gossip-rate", "900"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode in (0, 1), f"bench failed to run (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
def test_fuzz_ci_size(tmp_path: Path) -> None:
    s = _run_fuzz(tmp_path / "fuzz")
    why = json.dumps({k: s[k] for k in ("failures", "messages", "rss_mb", "rounds_applied_during_fuzz")}, indent=1)
    assert s["messages"] >= MESSAGES, why
    # every direct protocol and both gossip layers were hit
    for proto in ("msg", "inputs", "chain", "ckpt", "hello"):
        assert s["sent_by_channel"].get(f"direct:{proto}", 0) >= 20, s["sent_by_channel"]
    assert s["sent_by_channel"]["gossip:deep (validator-passing)"] > 5000, s["sent_by_channel"]
    # alive, training, flat, counting
    assert s["alive_after_fuzz"], why
    assert s["rounds_applied_during_fuzz"] >= 20, why
    assert s["rss_mb"]["residual_after_drain"] < 50 and s["rss_mb"]["growth_after_warmup"] < 100, why
    rejected = s["rejected_by_reason"]
    assert rejected.get("malformed", 0) > 100 and rejected.get("bad-fraud-proof", 0) > 100, rejected
    assert s["gossip_rejected_by_validator"] > 0 and s["transport_counters"]["frames_too_large"] > 0, s
    # raw pubsub frames, last
    if s["alive_after_raw_frames"] is False:
        tail = s["failures"][-1]
        if "Error parsing message with type 'pubsub.pb.RPC'" in tail or "crypto.pb.PublicKey" in tail:
            pytest.xfail("py-libp2p 0.8.1 bug, guard not in main yet: a garbage varint-framed RPC on /meshsub/1.1.0 "
                         "raises DecodeError in Pubsub.continuously_read_stream (or a message whose from_id embeds "
                         "no key carries a garbage `key`: crypto.pb.PublicKey), which stops the libp2p host; the "
                         "daemon then exits 1 ('node task pump crashed: HostClosedError')")
    assert s["alive_after_raw_frames"], why
    assert s["ok"], why
    assert s["exit_code_on_sigterm"] == 0, why
