"""``--relay-via auto``: a node finds out by itself that it is behind NAT and picks its relay.

* the setting (``auto`` stands alone) and how it reaches the host config (no network);
* the address book: a peer we cannot reach takes new addresses from a third party's hello (a
  NATed node's relay circuit, announced once it chose a relay), a connected one does not;
* a real daemon and a real libp2p peer whose hellos carry hostile books (the upgrade rule, held);
* real libp2p hosts on loopback: ``choose_relay`` picks the connected peer that serves the relay
  ``hop`` protocol, at the address this host reached it at;
* as root with iptables: ``seedswarm bench nat --auto-relay``, two daemons behind NAT started
  with ``--relay-via auto`` learn they are private, reserve on the relay they chose, reach each
  other through it and train to one head. Skips, and prints why, elsewhere.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from seedswarm.bench.nat_net import nat_unavailable
from seedswarm.crypto.keys import Identity, peer_id_of
from seedswarm.gossip.libp2p import HostConfig, Libp2pHost
from seedswarm.gossip.libp2p.relay import choose_relay
from seedswarm.gossip.wire import PROTO_HELLO, Hello, decode_as, protocol_prefix
from seedswarm.node.core.genesis import Genesis
from seedswarm.node.daemon.config import AUTO_RELAY, ConfigError, NodeConfig, build_config
from seedswarm.node.daemon.peering import Peering
from tests.benchproc import run_bench_json, skip_unless_possible
from tests.test_daemon import Node, init_swarm

PREFIX = "/seedswarm/1/0123456789abcdef"
RELAY = "/ip4/10.0.0.1/tcp/4001/p2p/12D3KooWSgSv9syFCR85YjhjMEHhnRkM49HMqenVQqfmGbbVGk15"
RUN = bytes(32)


def test_auto_stands_alone_and_names_no_relay() -> None:
    cfg = build_config({}, {"relay_via": [AUTO_RELAY]})
    assert cfg.relay_via == (AUTO_RELAY,) and cfg.auto_relay and cfg.named_relays == ()
    named = NodeConfig(relay_via=(RELAY,))
    assert named.named_relays == (RELAY,) and not named.auto_relay
    with pytest.raises(ConfigError, match="'auto' stands alone"):
        NodeConfig(relay_via=(AUTO_RELAY, RELAY))
    with pytest.raises(ConfigError, match="not a multiaddr: 'automatic'"):
        NodeConfig(relay_via=("automatic",))


# --- the address book --------------------------------------------------------------------------------


class _Peers:
    """What Peering asks of its transport here: who is connected."""

    def __init__(self, connected: list[str]) -> None:
        self.connected = connected

    def peers(self) -> list[str]:
        return list(self.connected)


def _pid(n: int) -> str:
    return peer_id_of(Identity.from_seed(bytes([n]) * 32).public)


def _peering(connected: list[str]) -> Peering:
    return Peering(RUN, _pid(1), _Peers(connected), 8, lambda c, name: c.close(),  # type: ignore[arg-type]
                   lambda: 0, lambda: [], lambda p, r: None, lambda p, r, d: None, lambda k: None)


def _hello(sender: str, book: dict[str, list[str]]) -> Hello:
    return Hello.make(RUN, 0, [f"/ip4/10.0.0.9/tcp/4001/p2p/{sender}"], book)


def test_third_party_hello_updates_an_unreachable_peer_only() -> None:
    relay, natted, other = _pid(2), _pid(3), _pid(4)
    p = _peering(connected=[relay, other])
    private = f"/ip4/10.240.0.2/tcp/4001/p2p/{natted}"
    p.learn(relay, _hello(relay, {natted: [private], other: [f"/ip4/10.0.0.4/tcp/1/p2p/{other}"]}))
    assert p.book[natted] == [private]
    # the NATed node chose a relay: its circuit reaches us through a third party, first in line
    circuit = f"{RELAY}/p2p-circuit/p2p/{natted}"
    p.learn(relay, _hello(relay, {natted: [circuit], other: [f"/ip4/6.6.6.6/tcp/1/p2p/{other}"]}))
    assert p.book[natted] == [circuit, private]
    # a connected peer's addresses are its own hello's business, not a third party's
    assert p.book[other] == [f"/ip4/10.0.0.4/tcp/1/p2p/{other}"]
    # only that upgrade, once: later hellos cannot keep handing us new addresses to dial
    for i in range(6):
        p.learn(relay, _hello(relay, {natted: [f"/ip4/10.1.0.{i}/tcp/1/p2p/{natted}",
                                               f"/ip4/10.2.0.{i}/tcp/1/p2p-circuit/p2p/{natted}"]}))
    assert p.book[natted] == [circuit, private]
    # nor plain addresses for a peer we know only directly
    gone = _pid(5)
    p.book[gone] = [f"/ip4/10.0.0.5/tcp/1/p2p/{gone}"]
    p.learn(relay, _hello(relay, {gone: [f"/ip4/6.6.6.6/tcp/1/p2p/{gone}"]}))
    assert p.book[gone] == [f"/ip4/10.0.0.5/tcp/1/p2p/{gone}"]


def test_a_dial_tries_addresses_learned_while_it_waited() -> None:
    """The NATed peer's circuit arrives while we wait out a timeout at its private address: the
    same dial goes on to the circuit instead of giving up until the next peer exchange."""
    from seedswarm.gossip.transport import TransportError

    natted = _pid(3)
    private, circuit = f"/ip4/10.240.0.2/tcp/4001/p2p/{natted}", f"{RELAY}/p2p-circuit/p2p/{natted}"

    class Dialer(_Peers):
        def __init__(self) -> None:
            super().__init__([])
            self.dialled: list[str] = []
            self.news = True

        async def connect(self, addr: str) -> str:
            self.dialled.append(addr)
            if addr == private:  # the first time, the new address arrives during the timeout
                if self.news:
                    p.book[natted] = [circuit, private]
                    self.news = False
                raise TransportError("timed out")
            return natted

    async def main() -> None:
        ok = await p._dial(natted, [private])
        assert ok and t.dialled == [private, circuit]
        # nothing new: one pass over what it has, then it gives up
        t.dialled.clear()
        p.book[natted] = [private]
        assert not await p._dial(natted, [private]) and t.dialled == [private]

    t = Dialer()
    p = Peering(RUN, _pid(1), t, 8, lambda c, name: c.close(),  # type: ignore[arg-type]
                lambda: 0, lambda: [], lambda p, r: None, lambda p, r, d: None, lambda k: None)
    asyncio.run(main())


@pytest.mark.slow
async def test_a_real_daemon_takes_one_circuit_upgrade_from_hostile_hellos(tmp_path: Path) -> None:
    """A real daemon, a real libp2p peer sending hellos whose books are hostile: the daemon takes
    the one upgrade of an unreachable peer's entry to a relay circuit, ignores every later
    rewrite, entries for itself or for the sender, addresses naming another id, garbage and a
    full 64-entry book, keeps training, and its saved book shows exactly that."""
    genesis_path, data, _ = init_swarm(tmp_path)
    run_id = Genesis.load(genesis_path).run_id
    node = Node(genesis_path, data)
    atk: Libp2pHost | None = None
    try:
        st = await asyncio.to_thread(node.wait_round, 2)
        me = st["peer_id"]
        atk = Libp2pHost(HostConfig(identity_seed=Identity.generate().seed, listen=["/ip4/127.0.0.1/tcp/0"],
                                    protocol_prefix=protocol_prefix(run_id)))

        async def hello(peer: str, data: bytes) -> bytes:  # the daemon greets us too: answer, or be refused
            return Hello.make(run_id, 0, [], {}).encode()

        atk.set_request_handler(PROTO_HELLO, hello)
        await atk.start()
        assert await atk.connect(st["announce"][0]) == me
        x = _pid(9)  # a peer the daemon hears of and never reaches
        direct, circuit = f"/ip4/10.9.9.9/tcp/4001/p2p/{x}", f"{RELAY}/p2p-circuit/p2p/{x}"
        junk = {f"12D3KooW{'A' * 44}": ["/not/a/multiaddr"], me: [f"/ip4/6.6.6.6/tcp/1/p2p/{me}"],
                atk.peer_id: [f"/ip4/6.6.6.6/tcp/1/p2p/{atk.peer_id}"]}
        books: list[dict[str, list[str]]] = [
            {x: [direct]}, {x: [circuit]},  # heard of, then the upgrade
            *({x: [f"/ip4/10.3.0.{i}/tcp/1/p2p-circuit/p2p/{x}", f"/ip4/6.6.6.{i}/tcp/1/p2p/{x}"]}
              for i in range(20)),  # rewrites: ignored
            {x: [f"/ip4/6.6.6.6/tcp/1/p2p/{me}"], **junk},  # another id's address, itself, the sender
            {_pid(100 + i): [f"/ip4/10.4.0.{i}/tcp/1/p2p/{_pid(100 + i)}"] * 4 for i in range(64)},
        ]
        for book in books:
            answer = await atk.request(me, PROTO_HELLO, Hello.make(run_id, 0, [], book).encode(), timeout=20.0)
            assert decode_as(answer, Hello, run_id).run == run_id
        assert (await asyncio.to_thread(node.wait_round, st["round"] + 2))["round"] > st["round"]  # training on
    finally:
        if atk is not None:
            await atk.stop()
        code, _ = node.stop()
    assert code == 0, node.logs()[-3000:]
    saved = {e["id"]: e["addrs"] for e in json.loads((data / "peers.json").read_text())["peers"]}
    assert saved[x] == [circuit, direct]
    assert me not in saved and all(_pid(100 + i) in saved for i in range(64))


# --- real hosts on loopback ----------------------------------------------------------------------


def test_choose_relay_picks_the_peer_that_relays() -> None:
    async def main() -> None:
        def cfg(n: int, **kw: Any) -> HostConfig:
            return HostConfig(identity_seed=bytes([n]) * 32, listen=["/ip4/127.0.0.1/tcp/0"],
                              protocol_prefix=PREFIX, **kw)

        relay, plain, me = (Libp2pHost(cfg(1, relay_service=True, autonat=True)), Libp2pHost(cfg(2)),
                            Libp2pHost(cfg(3, autonat=True, auto_relay=True)))
        try:
            for h in (relay, plain, me):
                await h.start()
            await me.connect(plain.listen_addrs[0])
            await me.connect(relay.listen_addrs[0])

            async def chosen() -> tuple[str, list[str]] | None:
                info = choose_relay(me._host)
                return None if info is None else (str(info.peer_id), [str(a) for a in info.addrs])

            async with asyncio.timeout(60):  # identify tells which peer serves hop
                while (got := await me._bridge.call(chosen, "choose a relay")) is None:
                    await asyncio.sleep(0.1)
            assert got == (relay.peer_id, [relay.listen_addrs[0].rsplit("/p2p/", 1)[0]])
            # loopback is dialable: AutoNAT never calls this host private, so it adopts nothing
            assert me.relay_reservations() == [] and me.relay_circuits() == []
        finally:
            for h in (me, plain, relay):
                await h.stop()

    asyncio.run(main())


# --- as root: daemons behind NAT ------------------------------------------------------------------


@pytest.mark.slow
def test_natted_daemons_choose_the_relay_themselves(tmp_path: Path) -> None:
    skip_unless_possible("the auto-relay NAT run", nat_unavailable())
    # enough rounds for AutoNAT's verdict (its first check 5 s after start), the reservation and
    # the circuits to reach the other NATed node through the relay's hellos
    s, _ = run_bench_json(["nat", "--nodes", "3", "--rounds", "40", "--auto-relay", "--no-hole-punch", "--json",
                           "--quiet", "--dir", str(tmp_path / "run")], timeout=900)
    relay = s["relay"]
    why = json.dumps({k: s.get(k) for k in ("reachability", "relay", "heads", "relay_byte_share")}, indent=1)
    assert s["finished"] and s["honest_digest_agreement"] == 1.0, why
    assert len(set(s["heads"].values())) == 1 and len(set(s["model_digests"].values())) == 1, why
    relay_id = peer_id_of(Identity.load(tmp_path / "run" / "nodes" / "node-0" / "identity.key").public)
    assert relay["node-0"]["reachability"] == "public", why
    for n in ("node-1", "node-2"):
        assert relay[n]["reachability"] == "private", why  # AutoNAT: nobody can dial it
        assert relay[n]["reserved_on"] == [relay_id], why  # it chose node 0, the one relay
        assert relay[n]["relayed_peers"] == 1, why  # the other NATed node, through the relay
    assert relay["node-0"]["bytes_forwarded"] > 0, why
