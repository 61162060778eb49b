"""The networked node as users run it: `seedswarm init`, `seedswarm node` as a real OS process,
`seedswarm status`; clean exit on SIGINT/SIGTERM; restart from the store; bad settings."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from seedswarm import cli
from seedswarm.node import cli as daemon_cli

PY = [sys.executable, "-m", "seedswarm"]
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def init_swarm(tmp: Path, *extra: str) -> tuple[Path, Path, str]:
    """A one-member swarm: genesis + the founding node's data dir. Returns (genesis, data dir, run id).

    `seedswarm init` runs in-process (the CLI's own main): a subprocess would spend seconds
    importing torch on a busy machine.
    """
    genesis, data = tmp / "genesis.json", tmp / "node0"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        rc = cli.main(["init", "--out", str(genesis), "--data-dir", str(data), "--trainers", "4", *extra])
    assert rc == 0
    return genesis, data, buf.getvalue().strip()


def wait_for(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def status_of(data: Path) -> dict[str, Any] | None:
    try:
        return json.loads((data / "status.json").read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


class Node:
    def __init__(self, genesis: Path, data: Path, *extra: str) -> None:
        self.data = data
        self.log = open(data.parent / f"{data.name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([*PY, "node", "--genesis", str(genesis), "--data-dir", str(data),
                                      "--listen", "/ip4/127.0.0.1/tcp/0", "--log-format", "json", *extra],
                                     stdout=self.log, stderr=self.log, env=ENV)

    def status(self) -> dict[str, Any] | None:
        s = status_of(self.data)
        return s if s and s.get("pid") == self.proc.pid else None

    def wait_round(self, r: int, timeout: float = 60) -> dict[str, Any]:
        return wait_for(lambda: (s := self.status()) and s["round"] >= r and s, timeout, f"round {r}")  # type: ignore[no-any-return]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 8.0) -> tuple[int, float]:
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log.close()
        return rc, time.monotonic() - t0

    def logs(self) -> str:
        return (self.data.parent / f"{self.data.name}.log").read_text()


def test_init_writes_genesis_with_safe_permissions(tmp_path: Path) -> None:
    genesis, data, run_id = init_swarm(tmp_path)
    from seedswarm.node.core.genesis import Genesis

    g = Genesis.load(genesis)
    assert g.run_id.hex() == run_id and len(g.members) == 1 and g.trainers == 4 and g.model_digest
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "identity.key").stat().st_mode) == 0o600
    # refuses to overwrite without --force
    assert cli.main(["init", "--out", str(genesis), "--data-dir", str(data)]) == 2


def _free_port() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


def test_bad_settings_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon_cli, "setup_logging", lambda *a: None)
    genesis, data, _ = init_swarm(tmp_path)
    before = sorted(p.name for p in data.iterdir())

    def run(*argv: str) -> str:
        assert cli.main(["node", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "genesis is not valid JSON" in run("--genesis", str(bad), "--data-dir", str(data))
    assert "cannot read genesis file" in run("--genesis", str(tmp_path / "missing.json"), "--data-dir", str(data))
    toml = tmp_path / "node.toml"
    toml.write_text('genesis = "x"\nlisten_adress = ["/ip4/127.0.0.1/tcp/1"]\n')
    assert "unknown setting 'listen_adress'" in run("--config", str(toml))
    sock, port = _free_port()
    with sock:
        assert "Address already in use" in run("--genesis", str(genesis), "--data-dir", str(data),
                                               "--listen", f"/ip4/127.0.0.1/tcp/{port}")
    # a data dir that holds another swarm's chain
    other, _, _ = init_swarm(tmp_path / "other")
    (data / "chain.log").write_bytes(b"")
    from seedswarm.node.core.genesis import Genesis
    from seedswarm.node.daemon.store import ChainStore

    ChainStore(data / "chain.log", Genesis.load(genesis).run_id)
    assert "holds the chain of run" in run("--genesis", str(other), "--data-dir", str(data), "--listen", "/ip4/127.0.0.1/tcp/0")
    assert sorted(p.name for p in data.iterdir()) == sorted([*before, "chain.log", "lock"])


def test_toml_config_and_cli_override(tmp_path: Path) -> None:
    from seedswarm.node.daemon.config import ConfigError, build_config, load_toml

    f = tmp_path / "node.toml"
    f.write_text('data-dir = "/srv/ss"\nlisten = "/ip4/0.0.0.0/tcp/4001"\nmetrics_port = 9100\n')
    cfg = build_config(load_toml(f), {"metrics_port": 9200, "listen": [], "bootstrap": None})
    assert cfg.data_dir == "/srv/ss" and cfg.listen == ("/ip4/0.0.0.0/tcp/4001",) and cfg.metrics_port == 9200
    with pytest.raises(ConfigError, match="must be a number"):
        build_config({"metrics_port": "x"}, {})
    with pytest.raises(ConfigError, match="/p2p/"):
        build_config({"bootstrap": ["/ip4/1.2.3.4/tcp/1"]}, {})


@pytest.mark.slow
def test_node_trains_stops_on_signals_and_resumes_from_store(tmp_path: Path, nodes: list[Node]) -> None:
    """SIGINT: Leave, exit 0 quickly. Restart: local replay to the same head and digest, then go
    on. SIGTERM: same. The status command reads the running node."""
    genesis, data, run_id = init_swarm(tmp_path)
    n = Node(genesis, data, "--checkpoint-every", "5", "--metrics-port", "0", "--eval-every", "4")
    nodes.append(n)
    st = n.wait_round(8)
    assert st["run_id"] == run_id and st["member"] and st["committee"]["trainer_rank"] == 0
    # the whole evaluation is in the status (an lm task's metric is its loss, not accuracy)
    ev = wait_for(lambda: (s := n.status()) and s["evaluation"] and s, 120, "an evaluation")["evaluation"]
    assert set(ev) >= {"accuracy", "loss"} and 0.0 <= ev["accuracy"] <= 1.0 and ev["loss"] > 0, ev
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["status", "--data-dir", str(data)]) == 0
    assert "round" in buf.getvalue() and "trainer rank 0" in buf.getvalue() and " loss " in buf.getvalue(), buf.getvalue()
    rc, took = n.stop(signal.SIGINT)
    assert rc == 0 and took < 6.0, (rc, took, n.logs()[-2000:])
    final = status_of(data)
    assert final is not None and final["state"] == "stopped"
    assert "stop requested" in n.logs()

    # The store replays to exactly the head and model the node had when it stopped.
    from seedswarm.node.core.genesis import Genesis
    from seedswarm.node.daemon.config import NodeConfig
    from seedswarm.node.daemon.daemon import Daemon

    d = Daemon(NodeConfig(data_dir=str(data), checkpoint_every=5), Genesis.load(genesis))
    d.prepare()
    assert d.chain.head.round == final["round"] and d.chain.head.head.hex() == final["head"]
    assert d.digest_hex() == final["model_digest"] and d.chain.base_round > 0  # from a local checkpoint
    d.data_lock.release()  # as a stopped node would: the next node takes this data dir

    n2 = Node(genesis, data)
    nodes.append(n2)
    n2.wait_round(final["round"] + 3)
    assert f"local chain at round {final['round']}" in n2.logs()
    rc, took = n2.stop(signal.SIGTERM)
    assert rc == 0 and took < 6.0, (rc, took)


@pytest.mark.slow
def test_one_node_per_data_dir_and_a_damaged_store_loses_one_record(tmp_path: Path, nodes: list[Node]) -> None:
    """A second daemon on a data dir in use exits 2 with one line naming the holder, and the
    first runs on. A byte flipped in the middle of the stopped node's chain store costs that one
    record: the node restarts on the records before it (logging the damage), and goes on."""
    genesis, data, _ = init_swarm(tmp_path)
    n = Node(genesis, data, "--checkpoint-every", "0")
    nodes.append(n)
    n.wait_round(6)
    second = subprocess.run([*PY, "node", "--genesis", str(genesis), "--data-dir", str(data),
                             "--listen", "/ip4/127.0.0.1/tcp/0"], capture_output=True, text=True, env=ENV, timeout=120)
    assert second.returncode == 2, second.stderr[-2000:]
    err = second.stderr.strip().splitlines()
    assert err == [f"seedswarm node: data dir {data} is in use by another seedswarm node (pid {n.proc.pid}); "
                   "stop it or use another --data-dir"], second.stderr[-2000:]
    at = n.status()
    assert at is not None and n.proc.poll() is None
    n.wait_round(at["round"] + 2)  # the first one keeps running
    rc, _ = n.stop(signal.SIGTERM)
    assert rc == 0
    final = status_of(data)
    assert final is not None and final["round"] >= 8

    from seedswarm.node.daemon.store import SYNC, ChainStore

    log = data / "chain.log"
    clean = log.read_bytes()
    starts = [i for i in range(len(clean)) if clean.startswith(SYNC, i)]
    assert len(starts) == final["round"]

    def damaged(*rounds: int) -> bytes:
        raw = bytearray(clean)
        for r in rounds:
            raw[starts[r] + 60] ^= 0xFF  # inside the payload of round r
        return bytes(raw)

    # Catching up fills the holes from a peer and keeps the records after them: a copy of the
    # data dir with two holes syncs (in-process, against a stub host serving the clean chain) to
    # the very same file, head and model.
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    (copy / "chain.log").write_bytes(damaged(2, 4))
    (copy / "lock").unlink()
    assert _sync_from_stub_peer(genesis, copy, clean) == (final["round"], final["head"], final["model_digest"])
    assert (copy / "chain.log").read_bytes() == clean

    log.write_bytes(damaged(3))
    n2 = Node(genesis, data, "--checkpoint-every", "0")
    nodes.append(n2)
    n2.wait_round(final["round"] + 2)
    logs = n2.logs()
    assert "round 3 damaged" in logs and "will re-fetch from peers" in logs
    assert "local chain at round 3" in logs
    rc, _ = n2.stop(signal.SIGTERM)
    assert rc == 0
    from seedswarm.node.core.genesis import Genesis

    s = ChainStore(log, Genesis.load(genesis).run_id)
    assert s.holes() == [] and s.damaged == 0 and len(s) >= final["round"] + 2


def _sync_from_stub_peer(genesis: Path, data: Path, chain: bytes) -> tuple[int, str, str]:
    """Run a daemon on ``data`` (the real driver, in virtual time on the in-memory network)
    against one stub peer that serves the store bytes ``chain``; returns (head round, head,
    model digest) once it holds the peer's whole chain."""
    import asyncio

    from seedswarm.crypto.keys import Identity
    from seedswarm.gossip.memory import MemoryNetwork, VirtualTimeLoop
    from seedswarm.gossip.wire import (
        PROTO_CHAIN,
        PROTO_HELLO,
        ChainRequest,
        ChainResponse,
        Hello,
        decode_as,
        protocol_prefix,
    )
    from seedswarm.node.core.genesis import Genesis
    from seedswarm.node.daemon.config import NodeConfig
    from seedswarm.node.daemon.daemon import Daemon
    from seedswarm.node.daemon.store import ChainStore

    g = Genesis.load(genesis)
    (data.parent / "peer.log").write_bytes(chain)
    peer = ChainStore(data.parent / "peer.log", g.run_id)
    net = MemoryNetwork(latency=0.005)
    prefix = protocol_prefix(g.run_id)
    stub = net.transport(Identity.from_seed(b"\x07" * 32).public, prefix)

    async def serve_chain(_peer: str, payload: bytes) -> bytes:
        req = decode_as(payload, ChainRequest, g.run_id)
        return ChainResponse(run=g.run_id, start=req.start, head=len(peer),
                             records=tuple(peer.records(req.start, min(req.limit, 256)))).encode()

    async def hello(_peer: str, payload: bytes) -> bytes:
        return Hello.make(g.run_id, len(peer), [], {}).encode()

    stub.set_request_handler(PROTO_CHAIN, serve_chain)
    stub.set_request_handler(PROTO_HELLO, hello)
    cfg = NodeConfig(data_dir=str(data), checkpoint_every=0, halt_at=len(peer), sync_wait_s=5,
                     bootstrap=(stub.listen_addrs[0],))
    d = Daemon(cfg, g, transport=lambda ident, _cfg, _run: net.transport(ident.public, prefix), inline_estimates=True)
    d.prepare()
    assert d.chain.store.damaged > 0 and d.chain.head.round == d.chain.store.valid_prefix() < len(peer)

    async def main() -> None:
        await stub.start()
        run = asyncio.create_task(d.run())
        for _ in range(10_000):  # virtual seconds: no real waiting
            await asyncio.sleep(0.05)
            if d.core is not None and d.chain.head.round >= len(peer):
                break
        d.request_stop()
        assert await run == 0

    loop = VirtualTimeLoop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert d.chain.store.holes() == []
    return d.chain.head.round, d.chain.head.head.hex(), d.digest_hex()


@pytest.mark.slow
def test_join_work_runs_off_the_event_loop(tmp_path: Path, nodes: list[Node]) -> None:
    """A joiner facing join work that takes hours (32 bits: what a Join flood can make of the
    difficulty) keeps following the chain and refreshing its status while it searches, and stops
    at once on SIGTERM. The search once ran inside the core, on the event loop: the node froze."""
    genesis, data, _ = init_swarm(tmp_path)
    g = json.loads(genesis.read_text())
    g["join_pow_bits"] = 32
    # at most two rounds a second: a joiner starting half a minute later (torch imports on a
    # busy machine) has little to replay, and its replay runs on the loop (see docs/operations.md)
    g["min_round_time"] = 0.5
    genesis.write_text(json.dumps(g))
    founder = Node(genesis, data)
    nodes.append(founder)
    addr = wait_for(lambda: (s := founder.status()) and s["round"] >= 2 and s["listen"] and s["listen"][0],
                    120, "the founder's first rounds")
    joiner = Node(genesis, tmp_path / "node1", "--bootstrap", addr)
    nodes.append(joiner)
    st = wait_for(lambda: (s := joiner.status()) and s["solving_join_work"] and s, 240, "the joiner's work")
    # while the worker thread hashes, the loop applies records and rewrites the status
    later = wait_for(lambda: (s := joiner.status()) and s["round"] >= st["round"] + 3 and s, 120,
                     "rounds applied during the work")
    assert later["solving_join_work"] and not later["member"], later
    rc, took = joiner.stop(signal.SIGTERM)
    assert rc == 0 and took < 8.0, (rc, took, joiner.logs()[-2000:])
