"""AutoNAT: does a node learn whether peers can dial it? (``reachability`` in status.)

A node asks a few peers it is directly connected to to dial it back at its listen addresses
(AutoNAT v1, ``/libp2p/autonat/1.0.0``): one that succeeds means the node is reachable
(``public``); failures from several, and no success, mean it is not (``private``): behind NAT
or a firewall, and without ``--relay-via`` its peers can never dial it, which the daemon says.

py-libp2p 0.8.1 ships the protocol (``libp2p.host.autonat``) but its server "dials back" with
``host.connect()``, which returns the connection the request itself came over: every requester
was told it is reachable, a NATed one included. ``FreshDialAutoNAT`` dials a new connection (the
swarm's ``dial_addr``, as DCUtR does), closes it, and serves one request per peer at a time (each
costs a dial), with its handler guarded. The server still dials only addresses at the
requester's observed IP (the library's rule against using us to dial third parties).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final

import trio
from libp2p.host.autonat import AutoNATService
from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from seedswarm.gossip.libp2p.api import Counters
from seedswarm.gossip.libp2p.relay import (
    direct_peers_serving,
    guard_handler,
    is_circuit,
)

log = logging.getLogger(__name__)

#: Reachability as status reports it.
UNKNOWN: Final = "unknown"
PUBLIC: Final = "public"
PRIVATE: Final = "private"
#: Peers asked per check, and the failures (with no success) that make a node ``private`` (or
#: one, when only one peer answered).
SERVERS_PER_CHECK: Final = 4
FAILURES_FOR_PRIVATE: Final = 2
#: First check this long after start (peers must be connected first), then every interval.
FIRST_CHECK_S: Final = 5.0
CHECK_INTERVAL_S: Final = 600.0
RECHECK_UNKNOWN_S: Final = 10.0
#: One dial-back, and one query, at most this long.
DIAL_BACK_TIMEOUT_S: Final = 5.0
QUERY_TIMEOUT_S: Final = 15.0
#: Dial-back requests served at once, in all.
MAX_INBOUND_AUTONAT: Final = 8


class FreshDialAutoNAT(AutoNATService):
    """libp2p's AutoNAT v1 service whose dial-back is a new connection (module doc)."""

    def __init__(self, host: Any, counters: Counters, on_error: Callable[[str, Exception], None]) -> None:
        super().__init__(host, serve=False)
        self._counters = counters
        self._inbound: set[ID] = set()
        host.set_stream_handler(AUTONAT_PROTOCOL_ID, guard_handler("autonat", self._limited, on_error))

    async def _limited(self, stream: Any) -> None:
        peer = stream.muxed_conn.peer_id
        if peer in self._inbound or len(self._inbound) >= MAX_INBOUND_AUTONAT:
            self._counters.inc("autonat_refused")
            await stream.reset()
            return
        self._inbound.add(peer)
        try:
            await self.handle_stream(stream)
        finally:
            self._inbound.discard(peer)

    async def _try_dial(self, peer_id: ID, addrs: list[bytes]) -> bytes | None:
        network = self.host.get_network()
        for addr in addrs:
            try:
                with trio.fail_after(DIAL_BACK_TIMEOUT_S):
                    conn = await network.dial_addr(Multiaddr(addr), peer_id)
            except Exception as e:
                log.debug("AutoNAT dial-back to %s at %s failed: %s", peer_id, Multiaddr(addr), e)
                continue
            with trio.move_on_after(2):
                await conn.close()
            return bytes(addr)
        return None


def dial_back_addrs(host: Any) -> list[bytes]:
    """The addresses we ask to be dialled back at: our listen addresses with a concrete IP, and
    each IP peers observed us at (identify) with each listen port. A wildcard listen address
    (``0.0.0.0``) is useless to a server, which dials only our observed IP: without the observed
    ones a public node listening on ``0.0.0.0`` was judged private. A NATed node is observed at
    its router's address, where nothing answers, which is the verdict it should get. (libp2p
    records no loopback observations: on loopback a wildcard listener has nothing to send.)"""
    listen = [a for a in host.get_addrs() if not is_circuit(a)]
    ports: set[str] = set()
    out: dict[str, Multiaddr] = {}
    for a in listen:
        try:
            ip, port = a.value_for_protocol("ip4"), a.value_for_protocol("tcp")
        except Exception:
            continue
        ports.add(port)
        if ip != "0.0.0.0":
            out[f"{ip}:{port}"] = Multiaddr(f"/ip4/{ip}/tcp/{port}")
    manager = getattr(host, "_observed_addr_manager", None)
    observed: list[Any] = []
    if manager is not None:
        try:
            observed = list(manager.addrs(min_observers=1))
        except Exception as e:
            log.debug("no observed addresses: %s", e)
    for o in observed:
        try:
            ip = o.value_for_protocol("ip4")
        except Exception:
            continue
        for port in ports:
            out.setdefault(f"{ip}:{port}", Multiaddr(f"/ip4/{ip}/tcp/{port}"))
    return [m.to_bytes() for m in out.values()]


class Reachability:
    """The client side: ask directly connected peers now and then; keep the verdict."""

    def __init__(self, host: Any, service: FreshDialAutoNAT, has_relay: bool) -> None:
        self._host = host
        self._service = service
        self._has_relay = has_relay
        self.status = UNKNOWN

    def _on_change(self, status: str) -> None:
        if status == PRIVATE and not self._has_relay:
            log.warning("peers cannot dial this node (AutoNAT: %s; behind NAT or a firewall?) and it has no "
                        "relay: only peers it dials itself reach it. Use a relay (--relay-via) or open the port",
                        status)
        else:
            log.info("reachability (AutoNAT): %s", status)

    def _servers(self) -> list[ID]:
        """Directly connected peers that said (identify) they serve AutoNAT (no other is asked:
        ``relay.direct_peers_serving``)."""
        return direct_peers_serving(self._host, str(AUTONAT_PROTOCOL_ID))[:SERVERS_PER_CHECK]

    async def check(self) -> str:
        """trio thread: one round of queries; returns (and keeps) the verdict."""
        successes = failures = 0
        addrs = dial_back_addrs(self._host)
        if not addrs:  # only a wildcard listen address and nothing observed yet: no question to ask
            return self.status
        for server in self._servers():
            try:
                status, _ = await self._service.query_server(server, addrs, timeout=QUERY_TIMEOUT_S)
            except Exception as e:
                log.debug("AutoNAT query to %s failed: %s", server, e)
                continue  # the server did not answer: no verdict about us
            if status == int(Message.OK):
                successes += 1
            else:
                failures += 1
        # one server that reached us settles it; refusals need two servers, or the only one
        enough = failures >= min(FAILURES_FOR_PRIVATE, failures + successes) > 0
        new = PUBLIC if successes else PRIVATE if enough else self.status
        if new != self.status:
            self.status = new
            self._on_change(new)
        return new

    async def run(self) -> None:
        """trio thread: check after start, then every ``CHECK_INTERVAL_S`` (sooner while unknown)."""
        await trio.sleep(FIRST_CHECK_S)
        while True:
            await self.check()
            await trio.sleep(RECHECK_UNKNOWN_S if self.status == UNKNOWN else CHECK_INTERVAL_S)
