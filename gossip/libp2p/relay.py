"""Circuit relay v2: how a node behind NAT is reached, and how a public node relays for it.

A host behind a NAT (or a firewall that drops inbound connections) can dial out but cannot be
dialled. With circuit relay v2 it keeps a connection to a public *relay*, reserves a slot there
(``RESERVE``) and announces ``<relay addr>/p2p-circuit/p2p/<its id>``; a peer that dials that
address opens a ``hop`` stream to the relay (``CONNECT``), the relay opens a ``stop`` stream to
the NATed host, and from then on pumps bytes between the two streams. The two ends run Noise and
Yamux over that pipe as over a TCP socket, so pubsub and our request streams work unchanged;
the relay sees only ciphertext.

py-libp2p 0.8.1 ships the protocol (``libp2p.relay.circuit_v2``). What this module adds, and why:

* ``GuardedCircuitProtocol``: the library's hop/stop service with
  - its handlers wrapped so that nothing a peer sends can raise out of the handler task
    (``guard``: counted in ``relay_errors``, the stream reset);
  - its byte pump replaced. The library keys its open circuits by *one* peer id
    (``_active_relays[peer]``) and, when a circuit ends, closes whatever that key holds, which
    is another circuit's streams as soon as one peer has two circuits (two NATed peers that dial
    each other at the same time do). Ours closes exactly the two streams it pumps. It also
    counts the forwarded bytes (``relay_bytes_forwarded``).
  - a reservation made for the connection's own peer, not for whatever id the message names;
* ``relay_limits``: the library's defaults (4 reservations per relay, 8 circuits per reserving
  peer, circuits cut after an hour or 1 GiB) suit a throwaway rendezvous, not a training swarm
  whose NATed nodes talk through the relay for the whole run.
* ``Relay``: the client side. A dial to a ``/p2p-circuit`` address goes through the library's
  ``CircuitV2Transport`` (the swarm itself skips circuit addresses); reservations are kept by
  ``keep_reservations`` (reserve as soon as a relay is connected, again after it reconnects,
  and before the reservation expires) rather than by the library's refresher, which never
  notices a relay that restarted and forgot the reservation.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

import multiaddr
import trio
from libp2p.abc import INetStream
from libp2p.connection_types import ConnectionType
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID, CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.constants import MAX_READ_LEN

from seedswarm.gossip.libp2p.api import Counters, HostError

log = logging.getLogger(__name__)

#: Reservations one relay holds (libp2p: 4). Each is a few hundred bytes of state.
RELAY_MAX_RESERVATIONS: Final = 256
#: Circuits open at once to one reserving (NATed) peer (libp2p: 8): a NATed node may be in
#: contact with every peer of a small swarm through the relay.
RELAY_MAX_CIRCUITS_PER_PEER: Final = 64
#: A reservation's lifetime on the relay (the client renews it well before, see
#: ``RESERVATION_RENEW_MARGIN_S``).
RESERVATION_TTL_S: Final = 3600
#: Renew a reservation this long before it expires.
RESERVATION_RENEW_MARGIN_S: Final = 300.0
#: How often the reservation keeper looks at its relays.
RESERVATION_CHECK_S: Final = 1.0
#: DCUtR sessions a peer may open to us at once, in all.
MAX_INBOUND_DCUTR: Final = 16
#: After a hole punch, the relayed connection is closed this long after the direct one is up.
RELAYED_CLOSE_GRACE_S: Final = 5.0
#: A circuit is never cut for its age or volume (libp2p: 1 hour, 1 GiB); ``data`` must be
#: positive (0 makes the library refuse every byte), so "unlimited" is this.
UNLIMITED_CIRCUIT_BYTES: Final = 1 << 62


def relay_limits() -> RelayLimits:
    return RelayLimits(duration=0, data=UNLIMITED_CIRCUIT_BYTES,
                       max_circuit_conns=RELAY_MAX_CIRCUITS_PER_PEER,
                       max_reservations=RELAY_MAX_RESERVATIONS, reservation_ttl=RESERVATION_TTL_S)


def is_circuit(addr: multiaddr.Multiaddr | str) -> bool:
    return "/p2p-circuit" in str(addr)


def is_relayed(conn: Any) -> bool:
    """Does this muxed or swarm connection run over a relay (not over its own socket)?"""
    try:
        if conn.get_connection_type() == ConnectionType.RELAYED:
            return True
        return any(is_circuit(a) for a in conn.get_transport_addresses() or [])
    except Exception:
        return False


def circuit_addr(relay: str, peer_id: str) -> str:
    """The address through which ``peer_id`` is reached via the relay at ``relay``
    (``.../p2p/<relay id>``)."""
    if "/p2p/" not in relay or is_circuit(relay):
        raise HostError(f"relay address {relay!r} must end with /p2p/<relay peer id>")
    return f"{relay}/p2p-circuit/p2p/{peer_id}"


Handler = Callable[[INetStream], Coroutine[Any, Any, None]]


def guard_handler(where: str, handler: Handler, on_error: Callable[[str, Exception], None]) -> Handler:
    """``handler`` that cannot raise: an exception is reported to ``on_error`` and the stream
    reset (a stream handler's exception would otherwise end in libp2p's own task)."""
    async def guarded(stream: INetStream) -> None:
        try:
            await handler(stream)
        except Exception as e:
            on_error(where, e)
            with contextlib.suppress(Exception):
                await stream.reset()
    return guarded


class GuardedCircuitProtocol(CircuitV2Protocol):
    """libp2p's circuit v2 hop/stop service, guarded, with a pump that closes only its own
    circuit and counts what it forwards (module doc)."""

    def __init__(self, host: Any, counters: Counters, allow_hop: bool,
                 on_error: Callable[[str, Exception], None]) -> None:
        super().__init__(host, limits=relay_limits(), allow_hop=allow_hop)
        self._counters = counters
        self._on_error = on_error
        self._handle_hop_stream = guard_handler(  # type: ignore[method-assign,assignment]
            "hop", self._handle_hop_stream, on_error)
        self._handle_stop_stream = guard_handler(  # type: ignore[method-assign,assignment]
            "stop", self._handle_stop_stream, on_error)

    async def _handle_reserve(self, stream: INetStream, msg: Any) -> None:
        """A reservation is always for the peer on the other end of the connection: the library
        takes the peer id the message names, so a stranger could fill every slot with made-up
        ids (and refresh a real peer's reservation)."""
        msg.ClearField("peer")
        await super()._handle_reserve(stream, msg)

    async def _relay_data(self, src_stream: INetStream, dst_stream: INetStream, peer_id: ID,
                          deadline: float | None = None,
                          circuit_data_limit: list[int] | None = None) -> None:
        """Copy one direction of a circuit until either side ends, then close both streams of
        this circuit (so the other direction ends too)."""
        try:
            while True:
                if deadline is not None and time.monotonic() > deadline:
                    break
                data = await src_stream.read(MAX_READ_LEN)
                if not data:
                    break
                if circuit_data_limit is not None:
                    if len(data) > circuit_data_limit[0]:
                        break
                    circuit_data_limit[0] -= len(data)
                with trio.fail_after(self.write_timeout):
                    await dst_stream.write(data)
                self._counters.inc("relay_bytes_forwarded", len(data))
        except Exception as e:  # a peer that went away mid-circuit: ordinary
            log.debug("circuit for %s ended: %s", peer_id, e)
        finally:
            with trio.CancelScope(shield=True):
                await self._close_stream(src_stream)
                await self._close_stream(dst_stream)


class GuardedDCUtR(DCUtRProtocol):
    """libp2p's DCUtR (hole punching over a relayed connection), guarded and counted.

    The library runs every inbound session a peer opens concurrently, and each one makes this
    host dial the addresses the peer sent: one relayed peer could open many. Here a peer gets one
    inbound session at a time and the host ``MAX_INBOUND_DCUTR`` in all; the rest are reset.
    """

    def __init__(self, host: Any, counters: Counters, on_error: Callable[[str, Exception], None]) -> None:
        super().__init__(host)
        self._counters = counters
        self._inbound: set[ID] = set()
        self._handle_dcutr_stream = guard_handler(  # type: ignore[method-assign,assignment]
            "dcutr", self._limited, on_error)

    async def _limited(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        if peer in self._inbound or len(self._inbound) >= MAX_INBOUND_DCUTR:
            self._counters.inc("hole_punch_refused")
            await stream.reset()
            return
        self._inbound.add(peer)
        try:
            await DCUtRProtocol._handle_dcutr_stream(self, stream)
        finally:
            self._inbound.discard(peer)

    def _schedule_relay_close(self, peer_id: ID) -> None:
        """Close the relayed connection ``RELAYED_CLOSE_GRACE_S`` after the direct one is up
        (libp2p: 60 s). Streams opened before the upgrade (GossipSub's among them) stay on the
        connection they were opened on, so until it closes the relay keeps carrying them."""
        if self._nursery is not None:
            self._nursery.start_soon(self._close_relayed_conns_after_grace, peer_id, RELAYED_CLOSE_GRACE_S)

    async def _perform_hole_punch(self, peer_id: ID, addrs: list[multiaddr.Multiaddr],
                                  as_responder: bool = False) -> bool:
        ok = await super()._perform_hole_punch(peer_id, addrs, as_responder)
        self._counters.inc("hole_punch_successes" if ok else "hole_punch_failures")
        if ok:
            log.info("direct connection to %s by hole punching (DCUtR)", peer_id)
        return ok


class Relay:
    """One host's circuit relay v2: the service (always: a host accepts relayed connections;
    with ``hop`` it relays for others), circuit dials and the reservation keeper."""

    def __init__(self, counters: Counters, hop: bool, relays: list[str],
                 on_error: Callable[[str, Exception], None], hole_punch: bool = True) -> None:
        self._counters = counters
        self.hop = hop
        self.hole_punch = hole_punch
        self._on_error = on_error
        self.relays: list[PeerInfo] = []
        for a in relays:
            if is_circuit(a):
                raise HostError(f"relay address {a!r} is itself a circuit address")
            try:
                self.relays.append(info_from_p2p_addr(multiaddr.Multiaddr(a)))
            except Exception as e:
                raise HostError(f"bad relay multiaddr {a!r} (need .../p2p/<relay peer id>): {e}") from e
        self._host: Any = None
        self.protocol: GuardedCircuitProtocol | None = None
        self._transport: CircuitV2Transport | None = None
        #: relay id -> (the connection the reservation was made on, when it expires)
        self._reserved: dict[ID, tuple[Any, float]] = {}

    def build(self, host: Any) -> tuple[GuardedCircuitProtocol, GuardedDCUtR | None]:
        """trio thread: the services to run (``background_trio_service``): circuit relay, and
        DCUtR unless ``hole_punch`` is off."""
        self._host = host
        self.protocol = GuardedCircuitProtocol(host, self._counters, self.hop, self._on_error)
        # STOP only: with CLIENT the library reserves a slot on the relay at every dial.
        self._transport = CircuitV2Transport(host, self.protocol, RelayConfig(roles=RelayRole.STOP))
        dcutr = GuardedDCUtR(host, self._counters, self._on_error) if self.hole_punch else None
        return self.protocol, dcutr

    def reserved(self) -> list[str]:
        """Relays that hold a reservation for us now (peer ids)."""
        return sorted(str(r) for r in self._reserved)

    def circuits(self) -> list[str]:
        """``<relay addr>/p2p/<relay id>`` of each relay holding a reservation for us now: what a
        peer dials, with ``/p2p-circuit/p2p/<our id>`` appended, to reach us."""
        return [f"{info.addrs[0]}/p2p/{info.peer_id}" for info in self.relays
                if info.peer_id in self._reserved and info.addrs]

    def adopt(self, info: PeerInfo) -> None:
        """trio thread: keep a reservation on this relay too, from the keeper's next pass."""
        if all(r.peer_id != info.peer_id for r in self.relays):
            self.relays.append(info)
            log.info("chose relay %s at %s (AutoNAT: this host is private)", info.peer_id, info.addrs[0])

    async def dial(self, addr: multiaddr.Multiaddr) -> None:
        """trio thread: connect to the peer of a circuit address through its relay."""
        assert self._transport is not None
        try:
            await self._transport.dial(addr)
        except Exception as e:
            raise HostError(f"relay dial {addr} failed: {e}") from e

    async def keep_reservations(self) -> None:
        """trio thread: hold a reservation on every configured relay while connected to it
        (the bootstrap keeper keeps the connection)."""
        assert self._host is not None
        network = self._host.get_network()
        while True:
            now = time.time()
            for info in self.relays:
                conns = network.get_connections(info.peer_id)
                conn = conns[0] if conns else None
                held = self._reserved.get(info.peer_id)
                if conn is None:
                    if held is not None:
                        log.info("relay %s disconnected; will reserve again on reconnect", info.peer_id)
                        self._reserved.pop(info.peer_id, None)
                    continue
                if held is not None and held[0] is conn and held[1] - now > RESERVATION_RENEW_MARGIN_S:
                    continue
                await self._reserve(info.peer_id, conn)
            await trio.sleep(RESERVATION_CHECK_S)

    async def _reserve(self, relay: ID, conn: Any) -> None:
        assert self._host is not None and self._transport is not None
        try:
            with trio.fail_after(15):
                stream = await self._host.new_stream(relay, [HOP_PROTOCOL_ID])
                try:
                    ok = await self._transport._make_reservation(stream, relay)
                finally:
                    with trio.move_on_after(2):
                        await stream.close()
        except Exception as e:
            self._counters.inc("relay_reservation_failures")
            log.info("reservation on relay %s failed: %s", relay, e)
            return
        if not ok:
            self._counters.inc("relay_reservation_failures")
            log.info("relay %s refused the reservation", relay)
            return
        expires = float(self._transport._reservations.get(relay, 0)) or time.time() + RESERVATION_TTL_S
        first = relay not in self._reserved
        self._reserved[relay] = (conn, expires)
        self._counters.inc("relay_reservations")
        if first:
            log.info("reserved a slot on relay %s (expires in %.0f s)", relay, expires - time.time())


def direct_peers_serving(host: Any, protocol: str) -> list[ID]:
    """trio thread: peers with a direct (not relayed) connection to us that said (identify)
    they serve ``protocol``. Asking any other peer opens a stream it never asked for on its
    connection: a client that is not a node of ours (a tool, a hostile peer, the fuzz bench's
    throwaway hosts) may reset the whole connection over it, and what it was sending is lost."""
    network, peerstore, me = host.get_network(), host.get_peerstore(), host.get_id()
    out = []
    for pid in list(host.get_connected_peers()):
        conns = network.get_connections(pid)
        if pid == me or not conns or all(is_relayed(c) for c in conns):
            continue
        try:
            serves = bool(peerstore.supports_protocols(pid, [protocol]))
        except Exception:  # noqa: BLE001 - an unknown or expired peer: not asked
            serves = False
        if serves:
            out.append(pid)
    return out


def choose_relay(host: Any) -> PeerInfo | None:
    """trio thread: a directly connected peer that serves the relay ``hop`` protocol, with the
    address this host reached it at (the remote end of a direct connection: dialable from here,
    where the addresses it lists may be private): the first by peer id, so that NATed hosts of
    one swarm tend to pick the same relay (their circuits then meet there). None while there is
    none."""
    network = host.get_network()
    for pid in sorted(direct_peers_serving(host, str(HOP_PROTOCOL_ID)), key=str):
        try:
            addrs = [a for c in network.get_connections(pid) if not is_relayed(c)
                     for a in c.get_transport_addresses() or [] if not is_circuit(a)]
        except Exception:  # noqa: BLE001 - a closing connection: not chosen
            continue
        if addrs:
            return PeerInfo(pid, addrs[:1])
    return None


__all__ = ["HOP_PROTOCOL_ID", "STOP_PROTOCOL_ID", "GuardedCircuitProtocol", "GuardedDCUtR", "Relay",
           "choose_relay", "circuit_addr", "direct_peers_serving", "guard_handler", "is_circuit", "is_relayed", "relay_limits"]
