"""Two "hosts" as Linux network namespaces joined by a veth pair: the multi-host guide
(docs/multihost.md), run the way a new user would, with real addresses and no loopback.

Needs root and iproute2 (`ip netns`); otherwise it skips and says why.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from seedswarm.bench.netns import netns_unavailable
from tests.benchproc import skip_unless_possible
from tests.test_daemon import ENV, init_swarm, wait_for

A_IP, B_IP = "10.213.7.1", "10.213.7.2"


def _skip_reason() -> str | None:
    why = netns_unavailable()  # the benches' own check (seedswarm.bench.netns)
    if why and why.startswith("iproute2"):
        return f"{why}; .ci/run installs it when it can (apt-get install iproute2)"
    return f"{why} (run as root, or see docs/multihost.md)" if why else None


def _sh(*cmd: str) -> None:
    subprocess.run(list(cmd), check=True, capture_output=True, text=True)


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, str]]:
    skip_unless_possible("test_netns", _skip_reason())
    a, b = f"ssa{os.getpid()}", f"ssb{os.getpid()}"
    va, vb = f"va{os.getpid()}"[:15], f"vb{os.getpid()}"[:15]
    try:
        _sh("ip", "netns", "add", a)
        _sh("ip", "netns", "add", b)
        _sh("ip", "link", "add", va, "type", "veth", "peer", "name", vb)
        _sh("ip", "link", "set", va, "netns", a)
        _sh("ip", "link", "set", vb, "netns", b)
        for ns, dev, ip in ((a, va, A_IP), (b, vb, B_IP)):
            _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.slow
def test_two_hosts_in_network_namespaces(tmp_path: Path, two_hosts: tuple[str, str]) -> None:
    ns_a, ns_b = two_hosts
    # Both hosts are founding members (B's key is made first and named in the genesis): a joiner
    # racing a first node that trains alone at dozens of rounds a second makes a flaky test on a
    # loaded machine; joining mid-run is covered on loopback by tests/test_cluster.py.
    from seedswarm.crypto.keys import Identity, peer_id_of

    data_b = tmp_path / "node1"
    data_b.mkdir(mode=0o700)
    ident_b = Identity.generate()
    ident_b.save(data_b / "identity.key")
    genesis, data_a, run_id = init_swarm(tmp_path, "--min-round-time", "0.5", "--member", ident_b.public.hex())
    peer_a = peer_id_of(Identity.load(data_a / "identity.key").public)
    py = [sys.executable, "-m", "seedswarm", "node", "--genesis", str(genesis), "--log-format", "json",
          "--listen", "/ip4/0.0.0.0/tcp/4001", "--halt-at", "60"]
    procs: list[subprocess.Popen[bytes]] = []
    logs = [open(tmp_path / f"{n}.log", "wb") for n in ("a", "b")]  # noqa: SIM115 - closed below
    try:
        # host A: the first node; it waits (up to 60 s) for one peer before it starts the chain
        procs.append(subprocess.Popen(["ip", "netns", "exec", ns_a, *py, "--data-dir", str(data_a),
                                       "--min-peers", "1", "--sync-wait-s", "60", "--metrics-port", "9101"],
                                      stdout=logs[0], stderr=logs[0], env=ENV))
        # host B: dials A's address on the shared link
        procs.append(subprocess.Popen(["ip", "netns", "exec", ns_b, *py, "--data-dir", str(data_b),
                                       "--min-peers", "1", "--bootstrap", f"/ip4/{A_IP}/tcp/4001/p2p/{peer_a}"],
                                      stdout=logs[1], stderr=logs[1], env=ENV))

        def both_done() -> tuple[dict, dict] | None:  # type: ignore[type-arg]
            out = []
            for d in (data_a, data_b):
                try:
                    out.append(json.loads((d / "status.json").read_text()))
                except (OSError, ValueError):
                    return None
            a, b = out
            if a["round"] >= 60 and b["round"] >= 60 and a["head"] == b["head"]:
                return a, b
            return None

        a, b = wait_for(both_done, 150, "both hosts at round 60 on one head")
        assert a["model_digest"] == b["model_digest"] and a["run_id"] == run_id
        assert b["member"] and b["members"] == 2
        assert any(addr.startswith(f"/ip4/{A_IP}/tcp/4001/") for addr in a["announce"]), a["announce"]
        # status over the metrics port, from inside host A's namespace
        st = subprocess.run(["ip", "netns", "exec", ns_a, sys.executable, "-m", "seedswarm", "status",
                             "--url", "http://127.0.0.1:9101"], capture_output=True, text=True, timeout=60, env=ENV)
        assert st.returncode == 0 and "round     60" in st.stdout, st.stdout + st.stderr
        t0 = time.monotonic()
        for p in procs:
            p.send_signal(2)  # Ctrl+C
        assert [p.wait(10) for p in procs] == [0, 0]
        assert time.monotonic() - t0 < 8
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            with contextlib.suppress(Exception):
                f.close()
