"""The socket byte accounting: the kinds add up to what the sockets carried.

Three real hosts in one process exchange gossip and requests; every byte each one wrote to its
sockets must be in exactly one kind of ``HostStats.sent_by_kind()``. No timing assertions: the
ratio of socket bytes to the protocol's own is a bench figure (``seedswarm bench bytes``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from seedswarm.gossip.libp2p import GossipMessage, HostConfig, Libp2pHost
from seedswarm.gossip.libp2p.accounting import payload_kind, rpc_split
from seedswarm.gossip.libp2p.api import HostStats

PREFIX = "/seedswarm-test/1/accounting"


@pytest.fixture
async def hosts() -> AsyncIterator[list[Libp2pHost]]:
    hs = [Libp2pHost(HostConfig(identity_seed=bytes([40 + i]) * 32, listen=["/ip4/127.0.0.1/tcp/0"],
                                protocol_prefix=PREFIX, gossip_heartbeat_s=0.2)) for i in range(3)]
    await asyncio.gather(*(h.start() for h in hs))
    yield hs
    await asyncio.gather(*(h.stop() for h in hs))


async def _until(pred: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await pred():
            await asyncio.sleep(0.05)


async def test_kinds_add_up_to_the_socket_total(hosts: list[Libp2pHost]) -> None:
    a, b, c = hosts
    for h in hosts:
        await h.subscribe("t", lambda data, peer: True)

    async def echo(peer: str, data: bytes) -> bytes:
        return data[::-1]

    for h in hosts:
        h.set_request_handler("echo", echo)
    await a.connect(b.listen_addrs[0])
    await b.connect(c.listen_addrs[0])

    async def meshed() -> bool:
        return all([len(await h.topic_peers("t", mesh_only=True)) >= 1 for h in hosts])

    await _until(meshed)
    for i in range(5):
        await a.publish("t", b"record %d " % i + b"x" * 300)
    await a.request(b.peer_id, "echo", b"y" * 1000)
    await c.request(b.peer_id, "echo", b"z" * 50)
    got = 0
    async with asyncio.timeout(10):
        while got < 5:
            if isinstance(await c.next_event(), GossipMessage):
                got += 1
    await asyncio.sleep(0.5)  # a few heartbeats: IHAVE gossip, control traffic

    for h in hosts:
        s = h.stats
        kinds = s.sent_by_kind()
        assert sum(kinds.values()) == s.transport_bytes_sent
        # framing (Noise, Yamux, handshakes) is what is left, and never negative
        assert 0 < kinds["framing"] < s.transport_bytes_sent
        assert kinds["gossip-control"] >= 0 and kinds["multistream"] > 0
        assert kinds.get("identify", 0) > 0  # every new connection runs identify
    sa, sb = a.stats.sent_by_kind(), b.stats.sent_by_kind()
    # a published five 308-byte payloads to its mesh (b); b forwarded them to c
    assert sa["gossip-data"] >= 5 * 308 and sb["gossip-data"] >= 5 * 308
    # each copy's envelope: author id, seqno, topic, signature, field headers; no public key
    # (the author id embeds it) and no signed peer record on any RPC (tuning overrides)
    topic = len(PREFIX + "/t")
    assert 0 < sa["gossip-envelope"] <= 5 * (124 + topic)
    for h in hosts:
        assert "sender-record" not in h.stats.gossip_rpc_bytes_sent
        assert "idontwant" not in h.stats.gossip_rpc_bytes_sent
    # the request frames: 4-byte header + body; b answered both
    assert sa["stream/echo"] == 4 + 1000
    assert sb["stream/echo"] == (4 + 1 + 1000) + (4 + 1 + 50)
    # a's stream payload is b's received payload, kind by kind (one connection between them)
    assert b.stats.payload_bytes_received["stream/echo"] == sa["stream/echo"] + c.stats.sent_by_kind()["stream/echo"]


def test_sent_by_kind_splits_gossipsub_and_keeps_the_total() -> None:
    s = HostStats({}, {}, {}, {}, {}, {}, 0, 0, 0, 0, 0, 0, 0, 0,
                  transport_bytes_sent=1000,
                  payload_bytes_sent={"gossipsub": 600, "stream/msg": 100, "multistream": 50},
                  gossip_rpc_bytes_sent={"data": 300, "envelope": 150, "ihave": 40})
    kinds = s.sent_by_kind()
    assert kinds == {"stream/msg": 100, "multistream": 50, "gossip-data": 300, "gossip-envelope": 150,
                     "gossip-control": 150, "framing": 250}
    assert sum(kinds.values()) == 1000


def test_payload_kinds() -> None:
    assert payload_kind(None, PREFIX + "/") == "multistream"
    assert payload_kind(PREFIX + "/msg", PREFIX + "/") == "stream/msg"
    assert payload_kind("/meshsub/1.2.0", PREFIX + "/") == "gossipsub"
    assert payload_kind("/ipfs/id/1.0.0", PREFIX + "/") == "identify"
    assert payload_kind("/ipfs/ping/1.0.0", PREFIX + "/") == "ping"


def test_rpc_split_matches_the_encoding() -> None:
    from libp2p.pubsub.pb import rpc_pb2

    rpc = rpc_pb2.RPC()
    m = rpc.publish.add()
    m.data = b"d" * 200
    m.topicIDs.append("topic")
    m.seqno = b"12345678"
    m.signature = b"s" * 64
    rpc.subscriptions.add(subscribe=True, topicid="topic")
    rpc.control.ihave.add(topicID="topic", messageIDs=[b"a" * 40])
    rpc.control.graft.add(topicID="topic")
    parts = rpc_split(rpc)
    assert parts["data"] == 200
    # every part but the control field's own header (2 bytes here) is accounted for
    assert sum(parts.values()) == len(rpc.SerializeToString()) - 2


async def test_yamux_window_updates_wait_for_half_the_window(hosts: list[Libp2pHost]) -> None:
    """py-libp2p answers every read with a WINDOW_UPDATE frame; ours waits until half the window
    (128 KiB) was read, as go-yamux does. Small requests send none; a 1 MiB one still flows."""
    a, b, _ = hosts

    async def ok(peer: str, data: bytes) -> bytes:
        return b"k"

    b.set_request_handler("ok", ok)
    await a.connect(b.listen_addrs[0])
    await a.request(b.peer_id, "ok", b"warm")
    await asyncio.sleep(0.3)
    before = b.stats
    for _ in range(4):
        await a.request(b.peer_id, "ok", b"q" * 1000)
    after = b.stats
    framing = after.sent_by_kind()["framing"] - before.sent_by_kind()["framing"]
    # per request b writes about five Yamux frames (its stream's ACK, the multistream answer, the
    # response, FIN; 30 bytes each on the socket), not one more per frame it read (stock: 11)
    assert framing < 4 * 8 * 30
    big = b"z" * (1 << 20)
    assert await a.request(b.peer_id, "ok", big) == b"k"


def test_the_simulator_counts_gossip_at_the_daemons_mesh_degree() -> None:
    """``seedswarm bench bytes`` compares the sockets with the simulator's count of mesh copies."""
    from seedswarm.gossip.libp2p.tuning import GOSSIP_DEGREE
    from seedswarm.sim.engine import NetConfig

    assert NetConfig().gossip_degree == GOSSIP_DEGREE


def test_the_cluster_table_of_kinds() -> None:
    from seedswarm.sim.bytestable import kind_rates, mean_rates, table

    lines = [{"round": 10, "sent": 100, "sent_by_kind": {"records": 50, "framing": 50}},
             {"round": 12, "sent": 500, "sent_by_kind": {"records": 250, "framing": 150, "ping": 100}}]
    rates = kind_rates(lines)
    assert rates == {"records": 100.0, "framing": 50.0, "ping": 50.0}
    assert sum(rates.values()) == (500 - 100) / 2
    assert kind_rates(lines[:1]) == {} and kind_rates([{"round": 1, "sent": 3}] * 2) == {}
    assert mean_rates([rates, {"records": 300.0}, {}]) == {"records": 200.0, "framing": 25.0, "ping": 25.0}
    text = table(rates, protocol_bytes=100.0)
    assert text.splitlines()[1].startswith("records") and "50.0%" in text
    assert "total / protocol = 2.00" in text


def test_bench_bytes_reports_the_ratio(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """From a finished cluster run: the table's kinds, the simulator's protocol bytes for the same
    settings, and the ratio (no cluster is started here)."""
    from dataclasses import asdict

    from seedswarm.bench import bytes as bench_bytes
    from seedswarm.sim.cluster import ClusterConfig

    kinds = {"records": 2000.0, "verification": 1500.0, "framing": 700.0}
    cfg = asdict(ClusterConfig(nodes=3, rounds=3))
    (tmp_path / "summary.json").write_text(json.dumps(
        {"nodes": 3, "rounds": 3, "honest_digest_agreement": 1.0, "config": cfg,
         "bytes_per_node_per_round_by_kind": kinds}))
    assert bench_bytes.main(["--from", str(tmp_path), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["socket_bytes_per_node_per_round"] == 4200.0
    assert res["protocol_bytes_per_node_per_round"] > 0
    assert res["ratio"] == pytest.approx(4200.0 / res["protocol_bytes_per_node_per_round"])
    assert res["protocol_by_kind"]["records"] > 0
    assert bench_bytes.main(["--from", str(tmp_path / "missing")]) == 2
