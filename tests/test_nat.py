"""Behind NAT: circuit relay v2 (``--relay``, ``--relay-via``).

* the settings and the addresses a NATed node announces (no network);
* three real libp2p hosts on loopback: a relay and two clients that reach each other only
  through it (request streams, gossip, byte accounting), and a live relay that gets garbage on
  its relay protocols and keeps relaying;
* as root with iptables: ``seedswarm bench nat``, a relay daemon and two daemons each behind its
  own masquerading router, which have no route to each other, train to the same head and model
  digest. Skips, and prints why, elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest
import trio
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import PROTOCOL_ID as DCUTR_PROTOCOL_ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, PeerId
from libp2p.relay.circuit_v2.pb.dcutr_pb2 import HolePunch
from libp2p.utils.varint import encode_varint_prefixed
from multiaddr import Multiaddr

from seedswarm.bench.nat_net import nat_unavailable
from seedswarm.gossip.libp2p import GossipMessage, HostConfig, HostError, Libp2pHost
from seedswarm.gossip.libp2p.relay import HOP_PROTOCOL_ID, STOP_PROTOCOL_ID, circuit_addr
from seedswarm.node import cli as node_cli
from seedswarm.node.daemon.config import ConfigError, NodeConfig, build_config, load_toml
from seedswarm.node.daemon.netstack import announce_addrs
from tests.benchproc import run_bench_json, skip_unless_possible

PREFIX = "/seedswarm/1/0123456789abcdef"
RELAY = "/ip4/10.0.0.1/tcp/4001/p2p/12D3KooWSgSv9syFCR85YjhjMEHhnRkM49HMqenVQqfmGbbVGk15"
ME = "12D3KooWHeFj2EQtvbhoeCfypm1DwVcfMbmpSM32nPnXWH4viVey"
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


# --- settings ------------------------------------------------------------------------------------


def test_relay_flags_reach_the_config() -> None:
    p = argparse.ArgumentParser()
    node_cli.add_node_options(p)
    a = p.parse_args(["--relay", "--relay-via", RELAY, "--relay-via", RELAY.replace("10.0.0.1", "10.0.0.2")])
    assert a.relay is True and len(a.relay_via) == 2
    cfg = build_config({}, {"relay": a.relay, "relay_via": a.relay_via})
    assert cfg.relay and cfg.relay_via == (RELAY, RELAY.replace("10.0.0.1", "10.0.0.2"))
    # not given: off, and an empty --relay-via does not override the file
    b = p.parse_args([])
    assert b.relay is None and b.relay_via == []
    cfg = build_config({"relay_via": [RELAY]}, {"relay": b.relay, "relay_via": b.relay_via})
    assert not cfg.relay and cfg.relay_via == (RELAY,)
    assert not cfg.no_hole_punch  # hole punching is on unless switched off
    c = p.parse_args(["--no-hole-punch"])
    assert build_config({}, {"no_hole_punch": c.no_hole_punch}).no_hole_punch is True


def test_relay_settings_from_toml_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "node.toml"
    f.write_text(f'relay = true\nrelay-via = ["{RELAY}"]\n')
    cfg = build_config(load_toml(f), {})
    assert cfg.relay and cfg.relay_via == (RELAY,)
    with pytest.raises(ConfigError, match="relay address .* must be a relay's own address"):
        NodeConfig(relay_via=("/ip4/10.0.0.1/tcp/4001",))
    with pytest.raises(ConfigError, match="must be a relay's own address"):
        NodeConfig(relay_via=(f"{RELAY}/p2p-circuit/p2p/{ME}",))
    with pytest.raises(ConfigError, match="relay must be true or false"):
        build_config({"relay": "yes"}, {})
    with pytest.raises(ConfigError, match="no_hole_punch must be true or false"):
        build_config({"no_hole_punch": 1}, {})


def test_natted_node_announces_its_circuit_addresses_only() -> None:
    listen = ["/ip4/10.240.0.2/tcp/4001"]
    assert announce_addrs(listen, [], ME, [RELAY]) == [f"{RELAY}/p2p-circuit/p2p/{ME}"]
    # configured addresses (a LAN neighbour may dial them) come after the circuits
    assert announce_addrs(listen, ["/ip4/192.168.1.5/tcp/4001"], ME, [RELAY]) == \
        [f"{RELAY}/p2p-circuit/p2p/{ME}", f"/ip4/192.168.1.5/tcp/4001/p2p/{ME}"]
    assert announce_addrs(listen, [], ME) == listen  # no relay: as before
    assert circuit_addr(RELAY, ME) == f"{RELAY}/p2p-circuit/p2p/{ME}"
    with pytest.raises(HostError, match="must end with /p2p/"):
        circuit_addr("/ip4/10.0.0.1/tcp/4001", ME)


def test_bad_relay_address_is_refused_by_the_host() -> None:
    base = {"identity_seed": bytes(32), "listen": ["/ip4/127.0.0.1/tcp/0"], "protocol_prefix": PREFIX}
    with pytest.raises(HostError, match="is itself a circuit address"):
        Libp2pHost(HostConfig(**base, relays=[f"{RELAY}/p2p-circuit/p2p/{ME}"]))
    with pytest.raises(HostError, match="bad relay multiaddr"):
        Libp2pHost(HostConfig(**base, relays=["/ip4/10.0.0.1/tcp/4001"]))


# --- real hosts on loopback ------------------------------------------------------------------------


def _cfg(n: int, **kw: object) -> HostConfig:
    base: dict[str, object] = {"identity_seed": bytes([n]) * 32, "listen": ["/ip4/127.0.0.1/tcp/0"],
                               "protocol_prefix": PREFIX}
    return HostConfig(**(base | kw))  # type: ignore[arg-type]


async def _until(cond: object, what: str, timeout: float = 60.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():  # type: ignore[operator]
            await asyncio.sleep(0.05)
    assert cond(), what  # type: ignore[operator]


class Trio3:
    """A relay and two clients that hold a reservation on it."""

    def __init__(self, hole_punch: bool = False) -> None:
        self.hole_punch = hole_punch
        self.relay = Libp2pHost(_cfg(1, relay_service=True, hole_punch=hole_punch))

    async def __aenter__(self) -> Trio3:
        await self.relay.start()
        self.relay_addr = self.relay.listen_addrs[0]  # /ip4/127.0.0.1/tcp/P/p2p/<relay id>
        assert self.relay_addr.endswith(f"/p2p/{self.relay.peer_id}")
        self.a = Libp2pHost(_cfg(2, relays=[self.relay_addr], hole_punch=self.hole_punch))
        self.b = Libp2pHost(_cfg(3, relays=[self.relay_addr], hole_punch=self.hole_punch))
        await self.a.start()
        await self.b.start()
        await _until(lambda: self.a.relay_reservations() and self.b.relay_reservations(), "reservations")
        return self

    async def __aexit__(self, *exc: object) -> None:
        for h in (self.a, self.b, self.relay):
            await h.stop()


async def _echo(peer: str, data: bytes) -> bytes:
    return b"echo:" + data


def test_two_clients_reach_each_other_through_the_relay() -> None:
    async def main() -> None:
        async with Trio3() as t:
            a, b, relay = t.a, t.b, t.relay
            assert a.relay_reservations() == [relay.peer_id]
            a.set_request_handler("echo", _echo)
            assert await b.connect(circuit_addr(t.relay_addr, a.peer_id)) == a.peer_id
            payload = bytes(range(256)) * 800  # 200 KiB: several Yamux windows through the pipe
            assert await b.request(a.peer_id, "echo", payload) == b"echo:" + payload
            await _until(lambda: a.relayed_peers() == [b.peer_id] and b.relayed_peers() == [a.peer_id],
                         "the two clients see each other as relayed peers")
            for h in (a, b, relay):
                await h.subscribe("t", lambda d, p: True)
            got: list[bytes] = []

            async def pump() -> None:
                while True:
                    ev = await a.next_event()
                    if isinstance(ev, GossipMessage) and ev.from_peer == b.peer_id:
                        got.append(ev.data)
                        return

            task = asyncio.create_task(pump())
            async with asyncio.timeout(60):
                while not got:  # until the meshes formed, a publish may reach nobody yet
                    await b.publish("t", b"hello %d" % len(got))
                    await asyncio.wait([task], timeout=1.0)
            assert got[0].startswith(b"hello")
            # accounting: what went through the relay is counted once, as 'relay', on every host
            for h in (a, b, relay):
                s = h.stats
                kinds = s.sent_by_kind()
                assert all(v >= 0 for v in kinds.values()), kinds
                assert sum(kinds.values()) == s.transport_bytes_sent
                assert kinds.get("relay", 0) > len(payload), kinds
            assert relay.stats.relay_bytes_forwarded > 2 * len(payload)
            assert a.stats.relay_bytes_forwarded == 0 and relay.stats.relay_errors == 0

    asyncio.run(main())


def test_relayed_connection_is_upgraded_to_a_direct_one() -> None:
    """With hole punching on (the default), a relayed connection between two peers that can
    reach each other directly (here: loopback) becomes direct (DCUtR), and stays usable."""

    async def main() -> None:
        async with Trio3(hole_punch=True) as t:
            t.a.set_request_handler("echo", _echo)
            await t.b.connect(circuit_addr(t.relay_addr, t.a.peer_id))
            await _until(lambda: t.b.peers() and not t.b.relayed_peers() and not t.a.relayed_peers(),
                         "a direct connection next to the relayed one", timeout=90)
            assert t.a.peer_id in t.b.peers()
            assert await t.b.request(t.a.peer_id, "echo", b"direct") == b"echo:direct"

    asyncio.run(main())


def test_reservation_is_renewed_after_the_relay_restarts() -> None:
    """A relay that restarts forgets every reservation: the client redials it (bootstrap keeper)
    and reserves again on the new connection, so it stays reachable through it."""

    async def main() -> None:
        async with Trio3() as t:
            port = Multiaddr(t.relay.listen_addrs[0]).value_for_protocol("tcp")
            await t.relay.stop()
            await _until(lambda: not t.a.relay_reservations(), "the client noticed the relay left")
            t.relay = Libp2pHost(_cfg(1, relay_service=True, listen=[f"/ip4/127.0.0.1/tcp/{port}"]))
            await t.relay.start()
            await _until(lambda: t.a.relay_reservations() == [t.relay.peer_id] and t.b.relay_reservations(),
                         "reserved again on the restarted relay", timeout=90)
            t.a.set_request_handler("echo", _echo)
            await t.b.connect(circuit_addr(t.relay_addr, t.a.peer_id))
            assert await t.b.request(t.a.peer_id, "echo", b"after restart") == b"echo:after restart"

    asyncio.run(main())


def test_relay_survives_garbage_on_its_protocols() -> None:
    """Garbage on the hop protocol (the relay) and the stop protocol (a client): each is
    answered or reset, nothing stops, and circuits still work afterwards."""

    async def send_raw(host: Libp2pHost, to: str, proto: str, data: bytes) -> bytes:
        async def op() -> bytes:
            s = await host._host.new_stream(ID.from_base58(to), [proto])
            reply = b""
            try:
                await s.write(data)
                with trio.move_on_after(3):
                    reply = await s.read(4096)
            except Exception:
                pass  # a reset is a fine answer
            finally:
                with trio.move_on_after(2):
                    await s.reset()
            return reply

        return await host._bridge.call(op, "raw stream")

    def framed(msg: HopMessage) -> bytes:
        return encode_varint_prefixed(msg.SerializeToString())

    garbage = [
        b"\xff" * 12,  # a varint that never ends
        b"\x05hello",  # a framed body that is not a HopMessage
        b"\xfe\xff\xff\xff\x0f",  # a frame length of 4 GiB
        framed(HopMessage(type=HopMessage.CONNECT)),  # CONNECT to nobody
        framed(HopMessage(type=HopMessage.CONNECT, peer=PeerId(id=b"junk"))),  # to a peer id that is not one
        framed(HopMessage(type=HopMessage.RESERVE, peer=PeerId(id=b"\x00" * 40))),  # someone else's slot
        framed(HopMessage(type=HopMessage.STATUS, status=999)),
        b"",
    ]

    async def main() -> None:
        async with Trio3(hole_punch=True) as t:
            await t.a.connect(circuit_addr(t.relay_addr, t.b.peer_id))  # DCUtR needs a connection
            for g in garbage:
                await send_raw(t.a, t.relay.peer_id, HOP_PROTOCOL_ID, g)
                await send_raw(t.relay, t.b.peer_id, STOP_PROTOCOL_ID, g)
                await send_raw(t.a, t.b.peer_id, DCUTR_PROTOCOL_ID, g)
            # a DCUtR CONNECT naming addresses that lead nowhere: answered, dialled, no harm
            bogus = HolePunch(type=HolePunch.CONNECT, ObsAddrs=[b"\x00\x01junk", b"\xff" * 30])
            await send_raw(t.a, t.b.peer_id, DCUTR_PROTOCOL_ID, encode_varint_prefixed(bogus.SerializeToString()))
            assert t.relay.running and t.a.running and t.b.running
            # the reservation for someone else's (made-up) id went to the connection's own peer
            assert t.relay._relay.protocol is not None
            held = {str(p) for p in t.relay._relay.protocol.resource_manager._reservations}
            assert held == {t.a.peer_id, t.b.peer_id}
            print(f"\nafter garbage: relay: relay_errors={t.relay.stats.relay_errors}; b: relay_errors="
                  f"{t.b.stats.relay_errors}, hole_punch_refused={t.b.stats.hole_punch_refused}")
            # then the real thing still works
            t.b.set_request_handler("echo", _echo)
            await t.a.connect(circuit_addr(t.relay_addr, t.b.peer_id))
            assert await t.a.request(t.b.peer_id, "echo", b"still here") == b"echo:still here"
            assert t.relay.running

    asyncio.run(main())


def test_autonat_dial_back_is_a_new_connection() -> None:
    """AutoNAT: a peer asked to dial us back must open a new connection. py-libp2p 0.8.1's server
    called host.connect(), which returned the connection the request came on, so it answered
    'reachable' to everyone, NATed peers included. Here an address nobody listens on is
    reported unreachable, the real one reachable, and two hosts on loopback learn 'public'."""
    import socket

    from libp2p.host.autonat.pb.autonat_pb2 import Message

    async def main() -> None:
        x = Libp2pHost(_cfg(5, autonat=True, hole_punch=False))
        await x.start()
        y = Libp2pHost(_cfg(6, autonat=True, hole_punch=False, bootstrap=[x.listen_addrs[0]]))
        # z listens on 0.0.0.0 (the README's command), which is no use to a server (it dials only
        # z's observed IP, and libp2p records no loopback observations): z must not ask, rather
        # than be told 'private' and warn that nobody can dial it
        z = Libp2pHost(_cfg(7, autonat=True, hole_punch=False, bootstrap=[x.listen_addrs[0]],
                            listen=["/ip4/0.0.0.0/tcp/0"]))
        await z.start()
        await y.start()
        try:
            await _until(lambda: x.peer_id in y.peers(), "connected")
            with socket.socket() as s:  # a port nobody listens on (closed again at once)
                s.bind(("127.0.0.1", 0))
                dead = f"/ip4/127.0.0.1/tcp/{s.getsockname()[1]}"

            async def ask(addr: str) -> int:
                async def op() -> int:
                    assert y._reachability is not None
                    status, _ = await y._reachability._service.query_server(
                        ID.from_base58(x.peer_id), addrs=[Multiaddr(addr).to_bytes()], timeout=20)
                    return status
                return await y._bridge.call(op, "autonat query")

            assert await ask(dead) == int(Message.E_DIAL_ERROR)
            assert await ask(y.listen_addrs[0]) == int(Message.OK)
            assert x.peer_id in y.peers()  # the dial-back connection was closed, not ours
            await _until(lambda: x.reachability() == "public" and y.reachability() == "public",
                         "both learn they are reachable", timeout=90)
            assert z.reachability() == "unknown" and x.peer_id in z.peers()
        finally:
            await z.stop()
            await y.stop()
            await x.stop()

    asyncio.run(main())


# --- as root: daemons behind NAT ------------------------------------------------------------------


def _bench_nat(tmp_path: Path, *extra: str) -> dict[str, object]:
    """``seedswarm bench nat`` with 3 nodes (a relay and two NATed hosts); its JSON summary,
    after the checks every run must pass."""
    skip_unless_possible("the NAT bench", nat_unavailable())
    s, pid = run_bench_json(["nat", "--nodes", "3", "--rounds", "6", "--json", "--quiet",
                        "--dir", str(tmp_path / "run"), *extra], timeout=900)
    why = json.dumps({k: s.get(k) for k in ("reachability", "relay", "heads", "relay_byte_share")}, indent=1)
    # the premise: the NATed hosts reach the relay and cannot reach each other, nor be dialled
    assert s["reachability"] == {"natted_to_public": True, "natted_to_natted_private": False,
                                 "natted_to_natted_router": False, "public_to_natted_private": False,
                                 "public_to_natted_router": False}, why
    assert s["finished"] and s["honest_digest_agreement"] == 1.0 and s["rounds"] >= 6, why
    assert len(set(s["heads"].values())) == 1 and len(set(s["model_digests"].values())) == 1, why
    assert len(s["heads"]) == 3, why
    for n in ("node-1", "node-2"):
        assert s["relay"][n]["reserved_on"] and s["nat_join_seconds"][n] > 0, why
        # AutoNAT may not have settled in a short run, but never calls a NATed host reachable
        assert s["relay"][n]["reachability"] in ("private", "unknown"), why
    # the NATed hosts met through the relay: it forwarded their first bytes at least
    assert s["relay"]["node-0"]["bytes_forwarded"] > 0, why
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"snp{pid % 100000}" not in left
    return s


@pytest.mark.slow
def test_two_natted_daemons_train_through_a_relay(tmp_path: Path) -> None:
    """No hole punching: every byte between the two NATed daemons crosses the relay."""
    s = _bench_nat(tmp_path, "--no-hole-punch")
    relay = s["relay"]
    assert isinstance(relay, dict)
    shares = s["relay_byte_share"]
    assert isinstance(shares, dict)
    for n in ("node-1", "node-2"):
        assert relay[n]["relayed_peers"] == 1 and relay[n]["hole_punches"] == 0, relay  # each other, via node 0
        assert shares[n] > 0.05, shares


@pytest.mark.slow
def test_natted_daemons_punch_a_hole_and_train_directly(tmp_path: Path) -> None:
    """Routers that drop unsolicited SYNs (most home routers): DCUtR, coordinated through the
    relay, gives the two NATed daemons a direct connection."""
    # long enough that the relayed connection is closed (RELAYED_CLOSE_GRACE_S, 5 s after the
    # direct one is up) before the stop: on an idle machine 3 nodes run 12 rounds in under a
    # second, and a run that short stopped 30 ms after the punch with the relayed one still open
    s = _bench_nat(tmp_path, "--routers", "drop", "--rounds", "150")
    relay = s["relay"]
    assert isinstance(relay, dict)
    for n in ("node-1", "node-2"):
        assert relay[n]["relayed_peers"] == 0, relay
    assert relay["node-1"]["hole_punches"] + relay["node-2"]["hole_punches"] >= 1, relay
