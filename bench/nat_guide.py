"""The README's "Behind NAT" guide, as written, in the NAT test bed (as root):
``python -m seedswarm.bench.nat_guide [DIR]``.

A relay founds the swarm with ``seedswarm init`` and ``seedswarm node --relay``; two hosts, each
behind its own masquerading router (:mod:`seedswarm.bench.nat_net`), join it with
``--bootstrap`` and ``--relay-via`` set to the address the relay logged. Once both are members and
connected to each other, the swarm runs 20 more rounds; ``seedswarm status`` of a NATed node is
printed, every node gets Ctrl+C (SIGINT), and each one's exit code, last round, head and model
digest are printed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from seedswarm.bench.nat_net import NatNet, nat_unavailable

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _seedswarm(*args: str, ns: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "seedswarm", *args]
    return ["ip", "netns", "exec", ns, *cmd] if ns else cmd


def _status(d: Path) -> dict[str, Any]:
    r = subprocess.run(_seedswarm("status", "--data-dir", str(d), "--json"), capture_output=True, text=True, env=ENV)
    try:
        out: dict[str, Any] = json.loads(r.stdout)
        return out
    except ValueError:
        return {}


def run(work: Path) -> int:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    genesis, dirs = work / "genesis.json", [work / f"d{i}" for i in range(3)]
    net = NatNet(public=1, natted=2)
    net.up()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        def node(ns: str, i: int, *extra: str) -> None:
            with open(work / f"n{i}.log", "wb") as log:
                procs.append(subprocess.Popen(
                    _seedswarm("node", "--genesis", str(genesis), "--data-dir", str(dirs[i]), "--listen",
                               "/ip4/0.0.0.0/tcp/4001", "--log-format", "text", *extra, ns=ns),
                    stdout=log, stderr=subprocess.STDOUT, env=ENV))

        r = subprocess.run(_seedswarm("init", "--out", str(genesis), "--data-dir", str(dirs[0]),
                                      "--min-round-time", "0.5", ns=net.pub_ns[0]), capture_output=True, text=True, env=ENV)
        print("init:", r.stdout.strip().splitlines()[0] if r.stdout.strip() else r.stderr.strip())
        node(net.pub_ns[0], 0, "--relay")
        relay = None
        deadline = time.time() + 120
        while relay is None and time.time() < deadline:
            time.sleep(0.5)
            for line in (work / "n0.log").read_text().splitlines():
                if "listening on " in line:
                    relay = line.split("listening on ")[1].split()[0]
        if relay is None:
            print("the relay did not log its address", file=sys.stderr)
            return 1
        print("relay address:", relay)
        started = {}
        for h in range(2):
            started[h + 1] = time.time()
            node(net.host_ns[h], h + 1, "--bootstrap", relay, "--relay-via", relay)
        met = 0
        deadline = time.time() + 300
        while time.time() < deadline:
            st = [_status(d) for d in dirs]
            low = min(s.get("round", 0) for s in st)
            if all(st[i].get("member") and st[i].get("peers") == 2 for i in (1, 2)):
                met = met or low
                if low > met + 20:
                    break
            time.sleep(1)
        print(subprocess.run(_seedswarm("status", "--data-dir", str(dirs[1])), capture_output=True, text=True,
                             env=ENV).stdout)
        for i, d in enumerate(dirs):
            s = _status(d)
            kinds = s.get("bytes_sent_by_kind") or {}
            first = s.get("first_apply_at")
            print(f"node {i}: member {s.get('member')}, round {s.get('round')}, peers {s.get('peers')}, "
                  f"relay {s.get('relay')}, relay share {kinds.get('relay', 0) / max(1, sum(kinds.values())):.3f}"
                  + (f", first round {first - started[i]:.2f} s after start" if i in started and first else ""))
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                print("exit code", p.wait(timeout=20))
            except subprocess.TimeoutExpired:
                p.kill()
                print("killed")
        for i, d in enumerate(dirs):
            s = _status(d)
            print(f"node {i}: stopped at round {s.get('round')}, head {str(s.get('head'))[:16]}, "
                  f"model {str(s.get('model_digest'))[:16]}")
        net.down()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if (why := nat_unavailable()) is not None:
        print(f"nat_guide: {why}", file=sys.stderr)
        return 2
    return run(Path(argv[0] if argv else "runs/nat-guide"))


if __name__ == "__main__":
    sys.exit(main())
