"""The public types of the libp2p adapter: configuration, errors, events and counters.

Nothing here imports libp2p or trio, so the types can be named (and the counters read) without
paying for the library import.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from seedswarm.gossip.transport import (
    Event,
    GossipMessage,
    PeerConnected,
    PeerDisconnected,
    ProtocolMismatch,
    RequestHandler,
    RequestTimeout,
    TransportClosed,
    TransportError,
    Validator,
)

__all__ = [
    "Event",
    "FrameTooLargeError",
    "GossipMessage",
    "HostClosedError",
    "HostConfig",
    "HostError",
    "HostStats",
    "PeerConnected",
    "PeerDisconnected",
    "ProtocolMismatchError",
    "RemoteError",
    "RequestHandler",
    "RequestTimeoutError",
    "Validator",
]


class HostError(TransportError):
    """A network operation failed; the message says which peer and why."""


class HostClosedError(HostError, TransportClosed):
    """The host is not running (never started, stopped, or its thread died)."""


class ProtocolMismatchError(HostError, ProtocolMismatch):
    """The peer does not serve the requested protocol id (other run, other version)."""


class FrameTooLargeError(HostError):
    """A frame is over ``max_message_bytes`` (ours or the peer's)."""


class RequestTimeoutError(HostError, RequestTimeout):
    """A request did not complete within its timeout."""


class RemoteError(HostError):
    """The peer received the request but did not answer it (no response, error, busy)."""


@dataclass(frozen=True, kw_only=True)
class HostConfig:
    """Configuration of one libp2p host (keyword-only).

    Topic names and request protocol ids are ``f"{protocol_prefix}/{name}"``: peers of another
    run (run id in the prefix) or another protocol version never share a topic and fail
    protocol negotiation on streams.
    """

    #: 32-byte Ed25519 seed (``Identity.seed``): the libp2p identity IS the chain identity.
    identity_seed: bytes
    #: Multiaddrs to listen on, ``/ip4/<addr>/tcp/<port>`` or ``/ip6/...``; port 0 = any free.
    listen: list[str]
    #: Full peer multiaddrs (``.../p2p/<peer id>``); our own id is dropped. Dialled at start
    #: and redialled while disconnected (backoff 1 s doubling to 30 s).
    bootstrap: list[str] = field(default_factory=list)
    #: ``"/seedswarm/<major>/<run id hex[:16]>"``. The adapter reads the last segment as the
    #: run and the ones before it as the version when it classifies a refused stream.
    protocol_prefix: str
    max_message_bytes: int = 1 << 20
    gossip_heartbeat_s: float = 1.0
    queue_size: int = 1024
    #: Bound on reading or writing one frame of a direct stream, and on a stall inside a pubsub
    #: frame (see ``tuning.PUBSUB_FRAME_MIN_RATE``).
    io_timeout_s: float = 10.0
    #: Bound on an asyncio request handler; past it the requester gets RemoteError.
    handler_timeout_s: float = 30.0
    #: Bound on one dial (connect, bootstrap, or the implicit dial of request()).
    dial_timeout_s: float = 5.0
    #: Open connections at most, inbound and outbound (libp2p's ``max_connections``).
    max_connections: int = 300
    #: Bound on start(); stop() always returns within about stop_timeout_s + 2 s.
    start_timeout_s: float = 15.0
    stop_timeout_s: float = 3.0
    #: Serve as a circuit relay v2 (``hop``) for peers behind NAT (``relay.py``). Every host
    #: accepts relayed connections whatever this says.
    relay_service: bool = False
    #: Relays (``.../p2p/<relay id>``) to reserve a slot on, so that peers reach this host at
    #: ``<relay>/p2p-circuit/p2p/<our id>``; they are dialled and redialled like bootstrap peers.
    relays: list[str] = field(default_factory=list)
    #: Try to replace a relayed connection with a direct one by hole punching (DCUtR), where
    #: both NATs allow it; the relay carries the coordination.
    hole_punch: bool = True
    #: Learn whether peers can dial this host (AutoNAT, ``autonat.py``): ``Libp2pHost.reachability``.
    autonat: bool = False
    #: Choose a relay by itself: once AutoNAT finds this host private, reserve a slot on a
    #: directly connected peer that offers the relay service (``relay.choose_relay``); its
    #: circuit base then shows in ``Libp2pHost.relay_circuits``. Needs ``autonat``.
    auto_relay: bool = False


# Events, validators and handlers are the transport interface's own (gossip.transport): the
# daemon drives this adapter and the in-memory network through the same types.


@dataclass(frozen=True)
class HostStats:
    """A snapshot of the host's counters. Per-name dicts use short topic/protocol names."""

    stream_bytes_sent: dict[str, int]
    stream_bytes_received: dict[str, int]
    gossip_bytes_published: dict[str, int]
    gossip_bytes_received: dict[str, int]
    gossip_messages_received: dict[str, int]
    gossip_rejected: dict[str, int]
    requests_sent: int
    requests_served: int
    requests_failed: int
    frames_too_large: int
    #: Inbound streams refused because we do not serve the proposed ``/seedswarm/...`` id
    #: (total; ``protocol_mismatches_by_reason`` splits it).
    protocol_mismatches: int
    handler_errors: int
    validator_errors: int
    events_dropped: int
    #: Bytes written to / read from the TCP sockets of this host (Noise, Yamux, GossipSub
    #: framing, forwarding and retransmission of other peers' gossip included): what the
    #: operator's network actually carries.
    transport_bytes_sent: int = 0
    transport_bytes_received: int = 0
    #: Pubsub input dropped below the topic validator, by reason (``guard.DROP_REASONS``): what
    #: py-libp2p would have dropped silently, or crashed on. Counted for every peer.
    gossip_dropped: dict[str, int] = field(default_factory=dict)
    #: ``protocol_mismatches`` by reason: ``protocol-version`` (another ``/seedswarm/<major>``),
    #: ``wrong-run`` (our version, another run id), ``no-handler`` (our prefix, a name we do not
    #: serve).
    protocol_mismatches_by_reason: dict[str, int] = field(default_factory=dict)
    #: Stream payload by kind (``accounting.payload_kind``: ``stream/<name>`` for ours,
    #: ``gossipsub``, ``identify``, ``identify-push``, ``ping``, ``multistream`` for the
    #: negotiation): what the muxed streams carried, above Yamux and Noise.
    payload_bytes_sent: dict[str, int] = field(default_factory=dict)
    payload_bytes_received: dict[str, int] = field(default_factory=dict)
    #: The pubsub RPCs we wrote, by part (``accounting.rpc_split``): ``data``, ``envelope``,
    #: ``subscriptions``, ``ihave``, ``iwant``, ``graft``, ``prune``, ``idontwant``.
    gossip_rpc_bytes_sent: dict[str, int] = field(default_factory=dict)
    #: ``PeerStoreError``s that py-libp2p's peerstore raised in a background path (its expiry
    #: sweep, or dropping the signed record of a peer whose addresses expired) and that the
    #: adapter caught (``tuning.guard_peerstore``, ``Libp2pHost._peerstore_cleanup``): unguarded,
    #: each one stopped the host.
    peerstore_errors: int = 0
    #: Circuit relay v2 (``relay.py``): bytes this host forwarded between two other peers (as a
    #: relay), reservations it made or renewed on its relays and the attempts that failed, and
    #: relay-protocol input that raised in the handler (caught; the stream was reset).
    relay_bytes_forwarded: int = 0
    relay_reservations: int = 0
    relay_reservation_failures: int = 0
    relay_errors: int = 0
    #: DCUtR: hole punches that gave a direct connection, that did not, and inbound sessions
    #: refused (one per peer at a time, ``relay.MAX_INBOUND_DCUTR`` in all).
    hole_punch_successes: int = 0
    hole_punch_failures: int = 0
    hole_punch_refused: int = 0
    #: AutoNAT dial-back requests refused (one per peer at a time, 8 in all).
    autonat_refused: int = 0

    def sent_by_kind(self) -> dict[str, int]:
        """Every byte this host wrote to its sockets, by kind; the values add up to
        ``transport_bytes_sent``.

        The stream payloads by kind, with ``gossipsub`` divided into ``gossip-data`` (what was
        published and forwarded), ``gossip-envelope`` (author, seqno, signature, topic) and
        ``gossip-control`` (subscriptions, IHAVE, IWANT, GRAFT, PRUNE, IDONTWANT, and the RPC
        frames); ``framing`` is the rest: Noise and Yamux frames, window updates, stream
        open/close, and the security and muxer negotiation of each connection.
        """
        out = {k: v for k, v in self.payload_bytes_sent.items() if k != "gossipsub"}
        gossip = self.payload_bytes_sent.get("gossipsub", 0)
        rpc = self.gossip_rpc_bytes_sent
        if gossip or rpc:
            data, envelope = rpc.get("data", 0), rpc.get("envelope", 0)
            out["gossip-data"] = data
            out["gossip-envelope"] = envelope
            out["gossip-control"] = gossip - data - envelope
        out["framing"] = self.transport_bytes_sent - sum(out.values())
        return out


class Counters:
    """Mutable counters behind ``HostStats``: written on the trio thread, read from asyncio.

    One lock, held for a dict update: cheap next to anything that is counted.
    """

    _DICTS = (
        "stream_bytes_sent",
        "stream_bytes_received",
        "gossip_bytes_published",
        "gossip_bytes_received",
        "gossip_messages_received",
        "gossip_rejected",
        "gossip_dropped",
        "protocol_mismatches_by_reason",
        "payload_bytes_sent",
        "payload_bytes_received",
        "gossip_rpc_bytes_sent",
    )
    _INTS = (
        "requests_sent",
        "requests_served",
        "requests_failed",
        "frames_too_large",
        "protocol_mismatches",
        "handler_errors",
        "validator_errors",
        "events_dropped",
        "transport_bytes_sent",
        "transport_bytes_received",
        "peerstore_errors",
        "relay_bytes_forwarded",
        "relay_reservations",
        "relay_reservation_failures",
        "relay_errors",
        "hole_punch_successes",
        "hole_punch_failures",
        "hole_punch_refused",
        "autonat_refused",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dicts: dict[str, dict[str, int]] = {k: {} for k in self._DICTS}
        self._ints: dict[str, int] = dict.fromkeys(self._INTS, 0)

    def add(self, counter: str, key: str, n: int = 1) -> None:
        with self._lock:
            d = self._dicts[counter]
            d[key] = d.get(key, 0) + n

    def inc(self, counter: str, n: int = 1) -> None:
        with self._lock:
            self._ints[counter] += n

    def snapshot(self) -> HostStats:
        with self._lock:
            dicts = {k: dict(v) for k, v in self._dicts.items()}
            ints = dict(self._ints)
        return HostStats(**dicts, **ints)  # type: ignore[arg-type]
