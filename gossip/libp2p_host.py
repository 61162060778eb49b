"""The libp2p adapter: a py-libp2p host on its own trio thread behind a small asyncio bridge.

This is the only module of seedswarm that imports ``libp2p`` or ``trio``. py-libp2p is
trio-native and the daemon is asyncio, so the host runs inside ``trio.run`` on a dedicated
thread and the daemon talks to it through a typed, bounded bridge:

* asyncio -> trio: every operation (connect, publish, request, ...) is a small coroutine that
  ``TrioToken.run_sync_soon`` starts in the host's nursery; its outcome comes back to an
  ``asyncio.Future`` through ``loop.call_soon_threadsafe``. An ``asyncio.Semaphore`` bounds the
  number of operations in flight (``HostConfig.queue_size``).
* trio -> asyncio: gossip messages and peer events go into a bounded, thread-safe
  ``queue.Queue``; the trio side never blocks on it (a full queue drops and counts), and wakes
  the loop with one coalesced ``call_soon_threadsafe``. Inbound requests are dispatched to
  handlers that run on the asyncio loop (never on the trio thread: CPU work there starves
  gossip), and the handler's answer is handed back with ``run_sync_soon``.

Every libp2p default that is wrong for us is overridden here, each with its reason; see
``docs/networking.md`` for the list and the measurements behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import os
import queue
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar, Union, cast

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IMultiselectCommunicator, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.ed25519 import Ed25519PublicKey
from libp2p.crypto.x25519 import create_new_key_pair as _new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.exceptions import StreamFailure
from libp2p.identity_utils import create_identity_from_seed
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.protocol_muxer.multiselect import Multiselect
from libp2p.pubsub.gossipsub import PROTOCOL_ID as GOSSIPSUB_V10
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11 as GOSSIPSUB_V11
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V12 as GOSSIPSUB_V12
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.score import ScoreParams, TopicScoreParams
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

__all__ = [
    "Event",
    "FrameTooLargeError",
    "GossipMessage",
    "HostClosedError",
    "HostConfig",
    "HostError",
    "HostStats",
    "Libp2pHost",
    "PeerConnected",
    "PeerDisconnected",
    "ProtocolMismatchError",
    "RemoteError",
    "RequestHandler",
    "RequestTimeoutError",
    "Validator",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# Tunables that are not per-node configuration. Each is a deliberate override; see
# docs/networking.md.

#: Direct-stream frame header: 4-byte big-endian payload length.
FRAME_HEADER_BYTES: Final = 4
#: First byte of every response frame (the rest is the handler's payload).
STATUS_OK: Final = 0
STATUS_NO_RESPONSE: Final = 1  # the handler returned None
STATUS_TOO_LARGE: Final = 2  # the request frame was over the responder's limit (not read)
STATUS_ERROR: Final = 3  # the handler raised, timed out, or returned something invalid
STATUS_BUSY: Final = 4  # too many inbound requests in flight on the responder

#: GossipSub mesh degree (go-libp2p's D=6, D_lo=4 here, D_hi=12).
GOSSIP_DEGREE: Final = 6
GOSSIP_DEGREE_LOW: Final = 4
GOSSIP_DEGREE_HIGH: Final = 12
#: Peer scoring: only P4 (invalid messages) carries weight. One rejected message costs 1 point,
#: decaying by 0.5% a heartbeat (half-life about 140 heartbeats). Below -5 a peer gets no
#: IHAVE gossip from us; below -10 (more than ten rejected messages) its messages are dropped
#: before validation, nothing is published to it, and its GRAFTs are refused (graylisted).
SCORE_INVALID_WEIGHT: Final = 1.0
SCORE_INVALID_CAP: Final = 1000.0
SCORE_INVALID_DECAY: Final = 0.995
SCORE_GOSSIP_THRESHOLD: Final = -5.0
SCORE_PUBLISH_THRESHOLD: Final = -10.0
SCORE_GRAYLIST_THRESHOLD: Final = -10.0
SCORE_ACCEPT_PX_THRESHOLD: Final = 0.0
#: Extra room a pubsub RPC needs around one message (signature, key, signed peer record).
PUBSUB_RPC_OVERHEAD: Final = 64 * 1024
#: GossipSub keeps every forwarded message (with its data) for equivocation checks, trimmed
#: only at 1000 entries; we trim it to this many each heartbeat to bound memory.
EQUIVOCATION_CACHE_MAX: Final = 128
#: Bootstrap peers that are not connected are redialled with this backoff (seconds).
BOOTSTRAP_BACKOFF_MIN: Final = 1.0
BOOTSTRAP_BACKOFF_MAX: Final = 30.0
#: How long a closed peer's addresses stay in the peerstore (libp2p default: 120 s).
PEER_ADDR_TTL_S: Final = 3600
#: Loggers that warn about harmless things at high rates.
_QUIET_LOGGERS: Final = {
    "libp2p.kad_dht": logging.ERROR,
    "libp2p.pubsub": logging.ERROR,
    # sets itself to INFO and logs its state on every cycle
    "libp2p.network.auto_connector": logging.WARNING,
    # logs an ERROR for every failed dial (a bootstrap peer that is not up yet, a departed
    # peer); the bootstrap keeper and the daemon report failed dials themselves, once
    "libp2p.transport.tcp.tcp": logging.CRITICAL,
}
_LOG_ONCE_MAX: Final = 4096


# ---------------------------------------------------------------------------------------------
# Public types


class HostError(Exception):
    """A network operation failed; the message says which peer and why."""


class HostClosedError(HostError):
    """The host is not running (never started, stopped, or its thread died)."""


class ProtocolMismatchError(HostError):
    """The peer does not serve the requested protocol id (other run, other version)."""


class FrameTooLargeError(HostError):
    """A frame is over ``max_message_bytes`` (ours or the peer's)."""


class RequestTimeoutError(HostError, TimeoutError):
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
    #: e.g. ``"/seedswarm/1/<run id hex[:16]>"``.
    protocol_prefix: str
    max_message_bytes: int = 1 << 20
    gossip_heartbeat_s: float = 1.0
    queue_size: int = 1024
    #: Bound on reading or writing one frame of a direct stream.
    io_timeout_s: float = 10.0
    #: Bound on an asyncio request handler; past it the requester gets RemoteError.
    handler_timeout_s: float = 30.0
    #: Bound on one dial (connect, bootstrap, or the implicit dial of request()).
    dial_timeout_s: float = 5.0
    #: Bound on start(); stop() always returns within about stop_timeout_s + 2 s.
    start_timeout_s: float = 15.0
    stop_timeout_s: float = 3.0


@dataclass(frozen=True)
class GossipMessage:
    """A validated gossip message. ``from_peer`` is its signed author, not the forwarder."""

    topic: str
    data: bytes
    from_peer: str


@dataclass(frozen=True)
class PeerConnected:
    peer: str


@dataclass(frozen=True)
class PeerDisconnected:
    peer: str


Event = Union[GossipMessage, PeerConnected, PeerDisconnected]  # noqa: UP007 (runtime alias)
#: ``validator(data, from_peer) -> bool``; runs on the trio thread, so it must be cheap, pure
#: and thread-safe (no asyncio objects, no state that changes the verdict over time).
Validator = Callable[[bytes, str], bool]
#: ``handler(from_peer, request) -> response | None``; runs on the asyncio loop.
RequestHandler = Callable[[str, bytes], Awaitable[bytes | None]]


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
    protocol_mismatches: int
    handler_errors: int
    validator_errors: int
    events_dropped: int
    #: Bytes written to / read from the TCP sockets of this host (Noise, Yamux, GossipSub
    #: framing, forwarding and retransmission of other peers' gossip included): what the
    #: operator's network actually carries.
    transport_bytes_sent: int = 0
    transport_bytes_received: int = 0


class _Stats:
    """Mutable counters, written on the trio thread and snapshotted from asyncio."""

    _DICTS = (
        "stream_bytes_sent",
        "stream_bytes_received",
        "gossip_bytes_published",
        "gossip_bytes_received",
        "gossip_messages_received",
        "gossip_rejected",
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


# ---------------------------------------------------------------------------------------------
# Transport byte counting
#
# Every libp2p connection of a host runs in that host's own trio.run(), so a trio RunVar names
# the host whose counters a raw socket read or write belongs to, even with many hosts in one
# process (the tests). RawConnection is the layer right above the TCP socket: below Noise, so
# the counts include encryption, muxing and gossip forwarding overheads.

_TRANSPORT_STATS: trio.lowlevel.RunVar[_Stats] = trio.lowlevel.RunVar("seedswarm_transport_stats")


def _install_transport_counters() -> None:
    if getattr(RawConnection, "_seedswarm_counted", False):
        return
    inner_write = RawConnection.write
    inner_read = RawConnection.read

    async def write(self: RawConnection, data: bytes) -> None:
        await inner_write(self, data)
        with contextlib.suppress(LookupError, RuntimeError):
            _TRANSPORT_STATS.get().inc("transport_bytes_sent", len(data))

    async def read(self: RawConnection, n: int | None = None) -> bytes:
        data = await inner_read(self, n)
        with contextlib.suppress(LookupError, RuntimeError):
            _TRANSPORT_STATS.get().inc("transport_bytes_received", len(data))
        return data

    RawConnection.write = write  # type: ignore[method-assign]
    RawConnection.read = read  # type: ignore[method-assign]
    RawConnection._seedswarm_counted = True  # type: ignore[attr-defined]


_install_transport_counters()


# ---------------------------------------------------------------------------------------------
# Small helpers


def _configure_libp2p_logging() -> None:
    """Route libp2p's logs into the application's logging, minus the known-noisy ones.

    On import libp2p sets its root logger to ``propagate=False`` with no handler unless
    LIBP2P_DEBUG is set, so its warnings go to ``logging.lastResort`` (raw stderr) and bypass
    the daemon's configuration. We let them propagate instead, and quiet the DHT and pubsub
    loggers that warn about harmless events many times a second.
    """
    if os.environ.get("LIBP2P_DEBUG"):
        return  # the operator asked for libp2p's own debug logging: leave it alone
    root = logging.getLogger("libp2p")
    root.propagate = True
    for name, level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    # BasicHost logs a multi-line ERROR for every failed protocol negotiation; we turn that
    # failure into a clear HostError (requester) and one log line (responder) ourselves.
    logging.getLogger("libp2p.host.basic_host").addFilter(_DropNegotiationNoise())
    # On shutdown pubsub may hand one last message to a service nursery that just closed; the
    # service manager logs that as an ERROR with a long traceback. Nothing is lost but the
    # message to a host that is going away.
    for name in ("libp2p.tools.anyio_service.TrioManager.Swarm", "libp2p.tools.anyio_service.TrioManager.Pubsub"):
        logging.getLogger(name).addFilter(_DropShutdownNoise())


class _DropShutdownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += repr(record.exc_info[1]) + str(getattr(record.exc_info[1], "exceptions", ""))
        return "Nursery is closed to new arrivals" not in text


class _DropNegotiationNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to open stream to peer")


_configure_libp2p_logging()


def _check_name(kind: str, name: str) -> None:
    # multistream-select is newline-delimited and topics are plain strings: keep names boring.
    if not name or len(name) > 100 or not all(c.isalnum() or c in "-_." for c in name):
        raise HostError(f"invalid {kind} name {name!r}: use 1-100 characters of [A-Za-z0-9._-]")


def _flatten(exc: BaseException) -> BaseException:
    """The first leaf of an exception group (libp2p raises through trio nurseries)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _is_cancellation(exc: BaseException) -> bool:
    """trio.Cancelled, possibly wrapped in exception groups by nurseries."""
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_cancellation(e) for e in exc.exceptions)
    return False


def _reason(exc: BaseException) -> str:
    exc = _flatten(exc)
    parts = [f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__]
    cause = exc.__cause__
    while cause is not None and len(parts) < 4:
        cause = _flatten(cause)
        if str(cause):
            parts.append(str(cause))
        cause = cause.__cause__
    return " <- ".join(parts)


def _tcp_host_port(ma: multiaddr.Multiaddr) -> tuple[socket.AddressFamily, str, int]:
    protos = [p.name for p in ma.protocols()]
    if len(protos) != 2 or protos[1] != "tcp" or protos[0] not in ("ip4", "ip6"):
        raise HostError(f"cannot listen on {ma}: only /ip4/<addr>/tcp/<port> and /ip6/... are supported")
    family = socket.AF_INET if protos[0] == "ip4" else socket.AF_INET6
    return family, str(ma.value_for_protocol(protos[0])), int(ma.value_for_protocol("tcp"))


def _claim_listen_port(ma: multiaddr.Multiaddr) -> multiaddr.Multiaddr:
    """Check that a TCP listen address is free; turn port 0 into a concrete free port.

    py-libp2p binds listeners with SO_REUSEPORT (for hole punching), so a second host on the
    same port *succeeds* and the kernel splits inbound connections between the two. A plain
    bind (SO_REUSEADDR only, so TIME_WAIT leftovers of our previous run do not count) detects
    a port that is really in use; for port 0 it also picks a port nobody holds.
    """
    family, host, port = _tcp_host_port(ma)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise HostError(f"cannot listen on {ma}: {e.strerror or e}") from e
        real_port = sock.getsockname()[1]
    finally:
        sock.close()
    proto = "ip4" if family == socket.AF_INET else "ip6"
    return multiaddr.Multiaddr(f"/{proto}/{host}/tcp/{real_port}")


def _parse_peer_addr(addr: str) -> PeerInfo:
    try:
        return info_from_p2p_addr(multiaddr.Multiaddr(addr))
    except Exception as e:
        raise HostError(f"bad peer multiaddr {addr!r} (need .../p2p/<peer id>): {e}") from e


async def _read_exact(stream: INetStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(n - len(buf))
        if not chunk:
            raise StreamError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def _read_header(stream: INetStream) -> int:
    return int.from_bytes(await _read_exact(stream, FRAME_HEADER_BYTES), "big")


def _frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(FRAME_HEADER_BYTES, "big") + payload


async def _dispose(stream: INetStream, graceful: bool) -> None:
    """Close (FIN) or reset a stream, shielded and bounded: cleanup must never hang."""
    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
        try:
            if graceful:
                await stream.close()
            else:
                await stream.reset()
        except Exception:
            pass


# Set in the trio task that publishes: the wrapped validator records our own verdict there,
# because libp2p silently drops a local publish its own validator rejects.
_own_publish_verdicts: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar(
    "seedswarm_own_publish_verdicts", default=None
)


class _PeerNotifee(INotifee):
    """Connection events -> PeerConnected/PeerDisconnected (first open, last close)."""

    def __init__(self, owner: Libp2pHost) -> None:
        self._owner = owner

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        await trio.lowlevel.checkpoint()

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        await trio.lowlevel.checkpoint()

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._owner._on_conn_change(conn, +1)
        await trio.lowlevel.checkpoint()

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._owner._on_conn_change(conn, -1)
        await trio.lowlevel.checkpoint()

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        await trio.lowlevel.checkpoint()

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        await trio.lowlevel.checkpoint()


class _TunedQueues(dict[ID, Any]):
    """Pubsub's per-peer outbound RPC queues, resized as pubsub creates them.

    libp2p creates each with room for 32 RPCs (one publish is one RPC) and a 1 MiB RPC
    limit, and silently drops (a DEBUG line) what does not fit: a burst of 33 publishes
    lost messages, and a ``max_message_bytes`` message, once wrapped in an RPC with its
    signature and signed peer record, was over 1 MiB and never sent.
    """

    def __init__(self, max_rpcs: int, max_rpc_bytes: int) -> None:
        super().__init__()
        self._max_rpcs = max_rpcs
        self._max_rpc_bytes = max_rpc_bytes

    def __setitem__(self, peer: ID, rpc_queue: Any) -> None:
        rpc_queue.max_message_size = self._max_rpc_bytes
        inner = getattr(rpc_queue, "_queue", None)
        if inner is not None:
            inner.max_size = self._max_rpcs
        super().__setitem__(peer, rpc_queue)


class _ObservingCommunicator(IMultiselectCommunicator):
    """Sees each protocol id a remote proposes on an inbound stream."""

    def __init__(self, inner: IMultiselectCommunicator, owner: Libp2pHost) -> None:
        self._inner = inner
        self._owner = owner

    async def write(self, msg_str: str) -> None:
        await self._inner.write(msg_str)

    async def read(self) -> str:
        command = await self._inner.read()
        self._owner._observe_proposal(self._inner, command)
        return command


class _ObservingMultiselect(Multiselect):
    """libp2p's responder-side negotiation, plus one log line for a foreign seedswarm id.

    BasicHost only logs a failed inbound negotiation at DEBUG, so a peer of another run or
    version would fail silently on our side.
    """

    def __init__(self, inner: Multiselect, owner: Libp2pHost) -> None:
        super().__init__(inner.handlers)  # the same dict: handlers added later are seen
        self._owner = owner

    async def negotiate(self, communicator: IMultiselectCommunicator, negotiate_timeout: int = 30) -> Any:
        return await super().negotiate(_ObservingCommunicator(communicator, self._owner), negotiate_timeout)


# ---------------------------------------------------------------------------------------------
# The host


class Libp2pHost:
    """A libp2p host (TCP, Noise, Yamux, GossipSub) on a trio thread, driven from asyncio.

    Lifecycle: ``start()`` once, then ``stop()`` (idempotent, bounded, joins the thread); or
    ``async with Libp2pHost(cfg) as host``. All methods must be called from the asyncio loop
    that ran ``start()``.
    """

    def __init__(self, config: HostConfig) -> None:
        if len(config.identity_seed) != 32:
            raise HostError("identity_seed must be the 32-byte Ed25519 seed of the node's identity")
        prefix = config.protocol_prefix
        if not prefix.startswith("/") or prefix.endswith("/") or any(c.isspace() for c in prefix):
            raise HostError(f"invalid protocol_prefix {prefix!r}: expected like /seedswarm/1/<run>")
        if config.max_message_bytes <= 0 or config.max_message_bytes >= 1 << 31:
            raise HostError("max_message_bytes must be in [1, 2**31)")
        if config.queue_size <= 0:
            raise HostError("queue_size must be positive")
        if not config.listen:
            raise HostError("at least one listen address is required")
        self.config = config
        self._key_pair = create_identity_from_seed(config.identity_seed)
        self._id = ID.from_pubkey(self._key_pair.public_key)
        self.peer_id: str = self._id.to_base58()
        self.listen_addrs: list[str] = []

        # lifecycle (asyncio side)
        self._state = "new"  # new -> starting -> running -> stopping -> stopped
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started_fut: asyncio.Future[list[str]] | None = None
        self._finished_fut: asyncio.Future[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._stop_requested = threading.Event()
        self._slots = asyncio.Semaphore(config.queue_size)
        self._pending: set[asyncio.Future[Any]] = set()
        self._handlers: dict[str, RequestHandler] = {}
        self._handler_tasks: set[asyncio.Task[Any]] = set()

        # trio -> asyncio event queue
        self._events: queue.Queue[Event] = queue.Queue(maxsize=config.queue_size)
        self._event_ready = asyncio.Event()
        self._wake_scheduled = False

        # trio side (only touched on the trio thread once it runs)
        self._token: trio.lowlevel.TrioToken | None = None
        self._root_scope: trio.CancelScope | None = None
        self._stop_event: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._host: Any = None
        self._pubsub: Pubsub | None = None
        self._gossipsub: GossipSub | None = None
        self._conn_counts: dict[str, int] = {}
        self._subscribed: set[str] = set()
        self._peers_snapshot: tuple[str, ...] = ()
        self._bootstrap: list[PeerInfo] = []
        self._listen_mas: list[multiaddr.Multiaddr] = []
        self._inbound_inflight = 0
        self._logged_once: set[tuple[str, ...]] = set()
        self._stats = _Stats()

    # -- identity ------------------------------------------------------------------------

    @staticmethod
    def peer_id_of(public_key: bytes) -> str:
        """The libp2p peer id of a raw 32-byte Ed25519 public key (a chain identity)."""
        if len(public_key) != 32:
            raise ValueError("an Ed25519 public key is 32 bytes")
        return ID.from_pubkey(Ed25519PublicKey.from_bytes(public_key)).to_base58()

    @staticmethod
    def public_key_of(peer_id: str) -> bytes:
        """The raw 32-byte Ed25519 public key inside a peer id (inverse of peer_id_of)."""
        try:
            key = ID.from_base58(peer_id).extract_public_key()
        except Exception as e:
            raise ValueError(f"not a peer id: {peer_id!r}") from e
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"peer id {peer_id!r} does not embed an Ed25519 key")
        return key.to_bytes()

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Libp2pHost:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the host; returns once it listens. Raises HostError with the reason."""
        if self._state != "new":
            raise HostError(f"start() called on a host that is {self._state}")
        loop = asyncio.get_running_loop()
        self._loop = loop
        listen: list[multiaddr.Multiaddr] = []
        for addr in self.config.listen:
            try:
                ma = multiaddr.Multiaddr(addr)
            except Exception as e:
                raise HostError(f"bad listen multiaddr {addr!r}: {e}") from e
            listen.append(_claim_listen_port(ma))
        self._listen_mas = listen
        self._bootstrap = []
        for addr in self.config.bootstrap:
            info = _parse_peer_addr(addr)
            if info.peer_id == self._id:
                log.debug("dropping own peer id from the bootstrap list: %s", addr)
                continue
            self._bootstrap.append(info)

        self._started_fut = loop.create_future()
        self._finished_fut = loop.create_future()
        self._state = "starting"
        self._thread = threading.Thread(
            target=self._thread_main, name=f"libp2p-{self.peer_id[-8:]}", daemon=True
        )
        self._thread.start()
        try:
            addrs = await asyncio.wait_for(asyncio.shield(self._started_fut), self.config.start_timeout_s)
        except TimeoutError:
            await self.stop()
            raise HostError(f"host did not start within {self.config.start_timeout_s} s") from None
        except BaseException:
            await self.stop()
            raise
        self.listen_addrs = addrs
        if self._state == "starting":
            self._state = "running"

    async def stop(self) -> None:
        """Stop the host from any state: cancel the trio nursery, close the host, join the
        thread. Idempotent; returns within about ``stop_timeout_s + 2`` seconds."""
        if self._state == "new":
            self._state = "stopped"
            return
        if self._stop_task is None:
            self._stop_task = asyncio.get_running_loop().create_task(self._stop_impl())
        await asyncio.shield(self._stop_task)

    async def _stop_impl(self) -> None:
        if self._state != "stopped":
            self._state = "stopping"
        self._stop_requested.set()
        self._to_trio(self._trio_request_stop)
        finished = await self._wait_finished(self.config.stop_timeout_s)
        if not finished:
            log.warning("libp2p host %s did not stop in %.1f s; cancelling it", self.peer_id, self.config.stop_timeout_s)
            self._to_trio(self._trio_force_stop)
            finished = await self._wait_finished(2.0)
        if self._thread is not None:
            self._thread.join(timeout=0.5 if finished else 0.05)
            if self._thread.is_alive():
                log.error("libp2p thread of %s is still alive after stop(); abandoning it (daemon thread)", self.peer_id)
        self._on_finished()

    async def _wait_finished(self, timeout: float) -> bool:
        fut = self._finished_fut
        if fut is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
            return True
        except TimeoutError:
            return False

    def _on_finished(self) -> None:
        """On the loop, once the trio thread has ended (or been abandoned)."""
        self._state = "stopped"
        if self._started_fut is not None and not self._started_fut.done():
            self._started_fut.set_exception(HostClosedError("host stopped before it started"))
        if self._finished_fut is not None and not self._finished_fut.done():
            self._finished_fut.set_result(None)
        for fut in list(self._pending):
            if not fut.done():
                fut.set_exception(HostClosedError("host stopped"))
        self._pending.clear()
        for task in list(self._handler_tasks):
            task.cancel()  # their answers have nowhere to go now
        self._event_ready.set()

    def _thread_main(self) -> None:
        try:
            trio.run(self._trio_main)
        except BaseException as e:  # noqa: BLE001 - must report whatever killed the thread
            log.error("libp2p host %s crashed: %s", self.peer_id, _reason(e), exc_info=e)
            self._post(self._fail_start, HostError(f"libp2p host crashed: {_reason(e)}"))
        finally:
            self._post(self._on_finished)

    def _fail_start(self, err: BaseException) -> None:
        if self._started_fut is not None and not self._started_fut.done():
            self._started_fut.set_exception(err)

    # -- trio main -----------------------------------------------------------------------

    async def _trio_main(self) -> None:
        _TRANSPORT_STATS.set(self._stats)
        self._stop_event = trio.Event()
        with trio.CancelScope() as root:
            self._root_scope = root
            self._token = trio.lowlevel.current_trio_token()
            if self._stop_requested.is_set():
                return
            try:
                await self._run_host()
            except HostError as e:
                self._post(self._fail_start, e)
            except Exception as e:
                log.debug("libp2p host failed", exc_info=e)
                self._post(self._fail_start, HostError(f"libp2p host failed: {_reason(e)}"))

    def _trio_request_stop(self) -> None:
        if self._stop_event is not None:
            self._stop_event.set()
        if self._nursery is None and self._root_scope is not None:
            self._root_scope.cancel()  # still starting: abandon the start

    def _trio_force_stop(self) -> None:
        if self._root_scope is not None:
            self._root_scope.cancel()

    def _build_host(self) -> Any:
        kp = self._key_pair
        # Noise only, Yamux only: new_host() otherwise also accepts /plaintext/2.0.0 (and
        # TLS, SECIO), and Mplex (5-8x slower than Yamux here).
        noise = NoiseTransport(kp, noise_privkey=_new_x25519_key_pair().private_key)
        host: Any = new_host(  # Any: we reach BasicHost/Swarm attributes IHost lacks
            key_pair=kp,
            sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
            listen_addrs=self._listen_mas,
            enable_mDNS=False,  # binds every interface via zeroconf; bootstrap lists suffice
            enable_upnp=False,
            # max_connections_per_peer=1: with the default (3) every dial waits out a
            # 250 ms happy-eyeballs delay; with 1 a loopback connect takes ~5 ms.
            connection_config=ConnectionConfig(
                max_connections_per_peer=1,
                dial_timeout=self.config.dial_timeout_s,
                outbound_stream_protocol_negotiation_timeout=self.config.io_timeout_s,
                inbound_stream_protocol_negotiation_timeout=self.config.io_timeout_s,
            ),
            negotiate_timeout=max(1, int(self.config.io_timeout_s)),
        )
        # One quick retry instead of 3 with backoff: dial failures surface in ~0.1 s, and the
        # daemon/bootstrap keeper own the retry policy.
        host.get_network().retry_config = RetryConfig(max_retries=1, initial_delay=0.05, max_delay=0.5)
        host.multiselect = _ObservingMultiselect(host.multiselect, self)
        host.get_network().register_notifee(_PeerNotifee(self))
        return host

    def _build_pubsub(self, host: Any) -> tuple[Pubsub, GossipSub]:
        score = ScoreParams(
            p4_invalid_messages=TopicScoreParams(
                weight=SCORE_INVALID_WEIGHT, cap=SCORE_INVALID_CAP, decay=SCORE_INVALID_DECAY
            ),
            # P1-P3 (mesh time, deliveries) and P5-P7 stay at weight 0: on loopback clusters
            # every peer shares one IP (P7 would punish them all), and P5's GRAFT-flood
            # heuristics are not trusted yet. Thresholds are explicit: the libp2p defaults
            # are -inf, so nothing would ever be graylisted.
            gossip_threshold=SCORE_GOSSIP_THRESHOLD,
            publish_threshold=SCORE_PUBLISH_THRESHOLD,
            graylist_threshold=SCORE_GRAYLIST_THRESHOLD,
            accept_px_threshold=SCORE_ACCEPT_PX_THRESHOLD,
        )
        gossipsub = GossipSub(
            protocols=[GOSSIPSUB_V12, GOSSIPSUB_V11, GOSSIPSUB_V10],
            degree=GOSSIP_DEGREE,
            degree_low=GOSSIP_DEGREE_LOW,
            degree_high=GOSSIP_DEGREE_HIGH,
            # default 120 s; trio.sleep takes a float (the int annotation is libp2p's)
            heartbeat_interval=cast(int, self.config.gossip_heartbeat_s),
            heartbeat_initial_delay=0.1,
            do_px=False,
            score_params=score,
            # adaptive gossip pushed the heartbeat from 1 s to 60 s on every node
            adaptive_gossip_enabled=False,
            # spam protection silently drops over 10 msg/s per topic per peer, own included
            spam_protection_enabled=False,
        )
        pubsub = Pubsub(
            host,
            gossipsub,
            strict_signing=True,  # from_peer is authenticated: the author's key signs it
            max_inbound_rpc_size=self.config.max_message_bytes + PUBSUB_RPC_OVERHEAD,
        )
        setattr(pubsub, "notify_subscriptions", self._deliver)  # noqa: B010 - see _deliver
        pubsub.peer_queues = _TunedQueues(
            max_rpcs=max(32, self.config.queue_size),
            max_rpc_bytes=self.config.max_message_bytes + PUBSUB_RPC_OVERHEAD,
        )
        return pubsub, gossipsub

    async def _run_host(self) -> None:
        host = self._build_host()
        pubsub, gossipsub = self._build_pubsub(host)
        self._host, self._pubsub, self._gossipsub = host, pubsub, gossipsub
        for name in list(self._handlers):  # before listening: no window without handlers
            self._register_stream_handler(name)
        network = host.get_network()
        try:
            async with host.run([]):
                # Listen address by address: Swarm.listen() only returns one bool for all,
                # and BasicHost.run() ignores it.
                for ma in self._listen_mas:
                    if not await network.listen(ma):
                        raise HostError(f"cannot listen on {ma} (address in use or unavailable)")
                # The auto-connector redials every peer the peerstore ever saw (departed ones
                # included) every 10 s while under 50 connections; we own the dial policy.
                await network.auto_connector.stop()
                async with background_trio_service(pubsub), background_trio_service(gossipsub):
                    await pubsub.wait_until_ready()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._maintenance)
                        nursery.start_soon(host.get_peerstore().start_cleanup_task, 60)
                        if self._bootstrap:
                            nursery.start_soon(self._bootstrap_keeper)
                        self._nursery = nursery
                        addrs = [str(a) for a in host.get_addrs()]
                        self._post(self._set_started, addrs)
                        assert self._stop_event is not None
                        await self._stop_event.wait()
                        self._nursery = None
                        nursery.cancel_scope.cancel()
                with trio.move_on_after(2.0) as cs:
                    cs.shield = True
                    await host.close()
        finally:
            self._nursery = None
            # Pubsub's seen-message cache runs a sweeper *thread* that nothing ever stops:
            # one leaked thread per host otherwise.
            seen = getattr(pubsub, "seen_messages", None)
            if seen is not None:
                seen.stop()

    def _set_started(self, addrs: list[str]) -> None:
        if self._started_fut is not None and not self._started_fut.done():
            self._started_fut.set_result(addrs)

    async def _maintenance(self) -> None:
        """Per heartbeat: clear caches that grow without bound; refresh the peer snapshot."""
        gs = self._gossipsub
        assert gs is not None and self._host is not None
        while True:
            await trio.sleep(self.config.gossip_heartbeat_s)
            # With adaptive gossip off nothing ever trims this (about 32 B a message).
            gs.recent_message_deliveries.clear()
            if len(gs.equivocation_detection) > EQUIVOCATION_CACHE_MAX:
                keys = list(gs.equivocation_detection)
                for k in keys[: len(keys) - EQUIVOCATION_CACHE_MAX]:
                    del gs.equivocation_detection[k]
            connected = {str(p) for p in self._host.get_connected_peers()}
            connected.discard(self.peer_id)
            self._peers_snapshot = tuple(sorted(connected))

    async def _bootstrap_keeper(self) -> None:
        """Dial bootstrap peers now, and redial any that is not connected, with backoff."""
        assert self._host is not None
        network = self._host.get_network()
        backoff: dict[ID, float] = {}
        next_try: dict[ID, float] = {}
        inflight: set[ID] = set()

        async def dial(info: PeerInfo) -> None:
            try:
                await self._dial(info)
                backoff.pop(info.peer_id, None)
            except Exception as e:
                b = min(max(BOOTSTRAP_BACKOFF_MIN, backoff.get(info.peer_id, 0.0) * 2), BOOTSTRAP_BACKOFF_MAX)
                backoff[info.peer_id] = b
                next_try[info.peer_id] = trio.current_time() + b
                self._log_once(("bootstrap", str(info.peer_id)), logging.INFO,
                               "bootstrap peer %s not reachable yet (%s); retrying every <= %.0f s",
                               info.peer_id, _reason(e), BOOTSTRAP_BACKOFF_MAX)
            finally:
                inflight.discard(info.peer_id)

        async with trio.open_nursery() as nursery:
            while True:
                now = trio.current_time()
                for info in self._bootstrap:
                    pid = info.peer_id
                    if pid in inflight or network.get_connections(pid) or next_try.get(pid, 0.0) > now:
                        continue
                    inflight.add(pid)
                    nursery.start_soon(dial, info)
                await trio.sleep(0.5)

    async def _dial(self, info: PeerInfo) -> None:
        host = self._host
        assert host is not None
        network = host.get_network()
        # A failed dial puts the peer in a negative cache that refuses later dials for a while
        # (even after it came back up): an explicit dial always tries for real.
        unblock = getattr(network, "unblock_peer", None)
        if unblock is not None:
            unblock(info.peer_id)
        host.get_peerstore().add_addrs(info.peer_id, info.addrs, PEER_ADDR_TTL_S)
        with trio.fail_after(self.config.dial_timeout_s):
            await host.connect(info)

    # -- bridge primitives ---------------------------------------------------------------

    def _post(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Run fn(*args) on the asyncio loop (from any thread). False if the loop is gone."""
        loop = self._loop
        if loop is None:
            return False
        try:
            loop.call_soon_threadsafe(fn, *args)
            return True
        except RuntimeError:  # loop closed
            return False

    def _to_trio(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Run fn(*args) on the trio thread (from any thread). False if trio is not running."""
        token = self._token
        if token is None:
            return False
        try:
            token.run_sync_soon(fn, *args)
            return True
        except trio.RunFinishedError:
            return False

    async def _call(self, op: Callable[[], Coroutine[Any, Any, T]], what: str) -> T:
        """Run op() in the host's nursery on the trio thread; await its result from asyncio."""
        if self._state != "running":
            raise HostClosedError(f"cannot {what}: host is {self._state}")
        loop = asyncio.get_running_loop()
        async with self._slots:  # bounds the operations in flight across the bridge
            fut: asyncio.Future[T] = loop.create_future()
            scope_box: list[trio.CancelScope] = []
            abandoned = [False]  # set by asyncio when the caller is cancelled
            self._pending.add(fut)

            def settle(result: Any, error: BaseException | None) -> None:
                if fut.done():
                    return
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(result)

            async def runner() -> None:
                result: Any = None
                error: BaseException | None = None
                try:
                    with trio.CancelScope() as cs:
                        scope_box.append(cs)
                        if abandoned[0]:
                            cs.cancel()
                        result = await op()
                    if cs.cancelled_caught:
                        error = HostError(f"{what}: cancelled")
                except HostError as e:
                    error = e
                except BaseException as e:
                    if _is_cancellation(e):  # the host is stopping: let trio unwind
                        self._post(settle, None, HostClosedError(f"{what}: host stopping"))
                        raise
                    leaf = _flatten(e)
                    error = leaf if isinstance(leaf, HostError) else HostError(f"{what} failed: {_reason(e)}")
                    if error is not leaf:
                        error.__cause__ = leaf
                self._post(settle, result, error)

            def spawn() -> None:
                nursery = self._nursery
                if nursery is None:
                    self._post(settle, None, HostClosedError(f"cannot {what}: host stopping"))
                    return
                nursery.start_soon(runner)

            if not self._to_trio(spawn):
                self._pending.discard(fut)
                raise HostClosedError(f"cannot {what}: host is not running")
            try:
                return await fut
            except asyncio.CancelledError:
                # Either the runner sees the flag when it starts, or its scope already
                # exists when this callback runs on the trio thread.
                abandoned[0] = True
                self._to_trio(lambda: scope_box[0].cancel() if scope_box else None)
                raise
            finally:
                self._pending.discard(fut)

    def _emit(self, ev: Event) -> None:
        """trio thread: hand an event to asyncio without ever blocking."""
        try:
            self._events.put_nowait(ev)
        except queue.Full:
            self._stats.inc("events_dropped")
            self._log_once(("events_dropped",), logging.WARNING,
                           "event queue full (%d): dropping events; is next_event() being drained?",
                           self.config.queue_size)
            return
        if not self._wake_scheduled:
            self._wake_scheduled = True
            self._post(self._wake)

    def _wake(self) -> None:
        self._wake_scheduled = False
        self._event_ready.set()

    def _log_once(self, key: tuple[str, ...], level: int, msg: str, *args: Any) -> None:
        if key in self._logged_once:
            return
        if len(self._logged_once) >= _LOG_ONCE_MAX:
            self._logged_once.clear()
        self._logged_once.add(key)
        log.log(level, msg, *args)

    # -- peers ---------------------------------------------------------------------------

    def _on_conn_change(self, conn: INetConn, delta: int) -> None:
        try:
            peer = str(conn.muxed_conn.peer_id)
        except Exception:
            return
        if peer == self.peer_id:
            return
        before = self._conn_counts.get(peer, 0)
        after = max(0, before + delta)
        if after:
            self._conn_counts[peer] = after
        else:
            self._conn_counts.pop(peer, None)
        if before == 0 and after > 0:
            self._peers_snapshot = tuple(sorted(set(self._peers_snapshot) | {peer}))
            self._emit(PeerConnected(peer))
        elif before > 0 and after == 0:
            self._peers_snapshot = tuple(p for p in self._peers_snapshot if p != peer)
            self._emit(PeerDisconnected(peer))

    async def connect(self, multiaddr_str: str) -> str:
        """Dial a peer by its full multiaddr (with /p2p/<id>); returns its peer id."""
        info = _parse_peer_addr(multiaddr_str)
        if info.peer_id == self._id:
            raise HostError(f"refusing to dial our own peer id ({multiaddr_str})")

        async def op() -> str:
            try:
                await self._dial(info)
            except trio.TooSlowError:
                raise HostError(f"cannot connect to {multiaddr_str}: timed out after {self.config.dial_timeout_s} s") from None
            except Exception as e:
                raise HostError(f"cannot connect to {multiaddr_str}: {_reason(e)}") from e
            return str(info.peer_id)

        return await self._call(op, f"connect to {multiaddr_str}")

    async def disconnect(self, peer_id: str) -> None:
        """Close every connection to a peer (it may reconnect; ban lists are the daemon's)."""
        pid = self._peer(peer_id)

        async def op() -> None:
            assert self._host is not None
            with trio.move_on_after(self.config.io_timeout_s):
                await self._host.disconnect(pid)

        await self._call(op, f"disconnect {peer_id}")

    def peers(self) -> list[str]:
        """Currently connected peer ids (a snapshot; never includes ourselves)."""
        return list(self._peers_snapshot)

    @staticmethod
    def _peer(peer_id: str) -> ID:
        try:
            return ID.from_base58(peer_id)
        except Exception as e:
            raise HostError(f"not a peer id: {peer_id!r}") from e

    # -- gossip --------------------------------------------------------------------------

    def _topic(self, name: str) -> str:
        _check_name("topic", name)
        return f"{self.config.protocol_prefix}/{name}"

    async def subscribe(self, topic: str, validator: Validator) -> None:
        """Subscribe to a topic; ``validator(data, from_peer)`` gates delivery and forwarding.

        The validator runs on the trio thread before a message is delivered or forwarded:
        keep it cheap, pure and thread-safe. A rejected message is not forwarded, is counted
        in ``stats.gossip_rejected``, and costs the forwarding peer score (graylisted after
        about ten). libp2p caches a verdict per message id for 5 minutes.
        """
        full = self._topic(topic)
        wrapped = functools.partial(self._validate, topic, validator)

        async def op() -> None:
            assert self._pubsub is not None and self._nursery is not None
            self._pubsub.set_topic_validator(full, wrapped, False)
            if full in self._subscribed:
                return  # re-subscribe: the validator was replaced above
            self._subscribed.add(full)
            await self._pubsub.subscribe(full)  # its 32-slot channel stays unused: see _deliver

        await self._call(op, f"subscribe to {topic}")

    def _validate(self, topic: str, validator: Validator, forwarder: ID, msg: Any) -> bool:
        """trio thread: the libp2p sync validator around the user's validator."""
        data: bytes = msg.data
        try:
            origin = ID(msg.from_id).to_base58()
        except Exception:
            return False
        own = forwarder == self._id
        if len(data) > self.config.max_message_bytes:
            ok = False
            self._stats.inc("frames_too_large")
        else:
            try:
                ok = bool(validator(data, origin))
            except Exception as e:
                ok = False
                self._stats.inc("validator_errors")
                self._log_once(("validator_error", topic, type(e).__name__), logging.ERROR,
                               "validator of topic %s raised %s (treated as a rejection)",
                               topic, _reason(e))
        if own:
            verdicts = _own_publish_verdicts.get()
            if verdicts is not None:
                verdicts.append(ok)
        elif not ok:
            self._stats.add("gossip_rejected", topic)
            self._log_once(("rejected", topic, str(forwarder)), logging.INFO,
                           "rejected a message on %s forwarded by %s (author %s); further rejections from it are only counted",
                           topic, forwarder, origin)
        return ok

    def _deliver(self, msg: Any) -> None:
        """trio thread: replaces ``Pubsub.notify_subscriptions`` on our Pubsub instance.

        libp2p hands each validated message to a per-topic channel of 32 slots that someone
        must drain, and drops (WARNING, on a logger we quiet) when it is full. We take the
        message synchronously instead, straight into the bounded bridge queue where a drop
        is counted: no channel to overflow when many messages arrive in one RPC (IWANT
        replies), and one task hop less.
        """
        try:
            origin = ID(msg.from_id).to_base58()
        except Exception:
            return
        if origin == self.peer_id:
            return  # our own publish, echoed by pubsub
        prefix = self.config.protocol_prefix + "/"
        data = bytes(msg.data)
        for full in msg.topicIDs:
            if not full.startswith(prefix) or full not in self._subscribed:
                continue
            topic = full[len(prefix):]
            self._stats.add("gossip_messages_received", topic)
            self._stats.add("gossip_bytes_received", topic, len(data))
            self._emit(GossipMessage(topic, data, origin))

    async def publish(self, topic: str, data: bytes) -> None:
        """Publish on a topic (subscribed or not). Raises if our own validator rejects it."""
        full = self._topic(topic)
        if len(data) > self.config.max_message_bytes:
            self._stats.inc("frames_too_large")
            raise FrameTooLargeError(
                f"cannot publish {len(data)} bytes on {topic}: over max_message_bytes={self.config.max_message_bytes}"
            )
        payload = bytes(data)

        async def op() -> None:
            assert self._pubsub is not None
            verdicts: list[bool] = []
            token = _own_publish_verdicts.set(verdicts)
            try:
                await self._pubsub.publish(full, payload)
            finally:
                _own_publish_verdicts.reset(token)
            if verdicts and not all(verdicts):
                # libp2p also counted it against our own score: undo that, or ten bad local
                # publishes would silently mute us.
                gs = self._gossipsub
                if gs is not None and gs.scorer is not None:
                    gs.scorer.invalid_messages.pop(self._id, None)
                raise HostError(f"our own validator rejected the message published on {topic}; it was not sent")
            self._stats.add("gossip_bytes_published", topic, len(payload))

        await self._call(op, f"publish on {topic}")

    async def topic_peers(self, topic: str, mesh_only: bool = False) -> list[str]:
        """Peers known to subscribe to a topic, or (``mesh_only``) those in our GossipSub mesh
        for it. A publish on a subscribed topic goes to mesh peers at once; other subscribers
        learn of it by IHAVE gossip at the next heartbeats."""
        full = self._topic(topic)

        async def op() -> list[str]:
            assert self._pubsub is not None and self._gossipsub is not None
            if mesh_only:
                return sorted(str(p) for p in self._gossipsub.mesh.get(full, ()))
            return sorted(str(p) for p in self._pubsub.peer_topics.get(full, ()))

        return await self._call(op, f"list peers of {topic}")

    # -- events --------------------------------------------------------------------------

    async def next_event(self) -> Event:
        """The next gossip message or peer event. Raises HostClosedError once stopped."""
        while True:
            try:
                return self._events.get_nowait()
            except queue.Empty:
                pass
            if self._state in ("stopped", "new"):
                raise HostClosedError(f"host is {self._state}")
            self._event_ready.clear()
            try:
                return self._events.get_nowait()
            except queue.Empty:
                pass
            await self._event_ready.wait()

    async def events(self) -> AsyncIterator[Event]:
        """Iterate over events until the host stops."""
        while True:
            try:
                yield await self.next_event()
            except HostClosedError:
                return

    # -- direct streams ------------------------------------------------------------------

    def _protocol_id(self, name: str) -> TProtocol:
        _check_name("protocol", name)
        return TProtocol(f"{self.config.protocol_prefix}/{name}")

    def set_request_handler(self, protocol: str, handler: RequestHandler) -> None:
        """Serve ``f"{protocol_prefix}/{protocol}"``: ``handler(from_peer, request)`` runs on
        the asyncio loop and returns the response bytes, or None for no response."""
        self._protocol_id(protocol)
        self._handlers[protocol] = handler
        if self._state in ("starting", "running"):
            self._to_trio(self._register_stream_handler, protocol)

    def _register_stream_handler(self, name: str) -> None:
        host = self._host
        if host is None:
            return  # registered when the host is built
        host.set_stream_handler(self._protocol_id(name), functools.partial(self._serve_stream, name))

    def _observe_proposal(self, communicator: IMultiselectCommunicator, command: str) -> None:
        """trio thread: a remote proposed ``command`` on an inbound stream."""
        if not command.startswith("/seedswarm/"):
            return
        host = self._host
        if host is not None and command in host.multiselect.handlers:
            return
        self._stats.inc("protocol_mismatches")
        try:
            peer = str(communicator.read_writer.muxed_conn.peer_id)  # type: ignore[attr-defined]
        except Exception:
            peer = "?"
        if command.startswith(self.config.protocol_prefix + "/"):
            self._log_once(("no_handler", command), logging.WARNING,
                           "peer %s asked for %s, which this node does not serve (no handler)", peer, command)
        else:
            self._log_once(("mismatch", command), logging.WARNING,
                           "peer %s asked for %s but this node speaks %s: different run or protocol version",
                           peer, command, self.config.protocol_prefix)

    async def _serve_stream(self, name: str, stream: INetStream) -> None:
        """trio thread: one inbound request: read a frame, ask asyncio, write the answer."""
        graceful = False
        try:
            peer = str(stream.muxed_conn.peer_id)
            io = self.config.io_timeout_s
            try:
                with trio.fail_after(io):
                    n = await _read_header(stream)
                if n > self.config.max_message_bytes:
                    # Refused before reading it: the body is never buffered.
                    self._stats.inc("frames_too_large")
                    self._log_once(("too_large_in", peer, name), logging.WARNING,
                                   "peer %s sent a %d-byte request on %s (limit %d); refused",
                                   peer, n, name, self.config.max_message_bytes)
                    with trio.move_on_after(io):
                        await stream.write(_frame(bytes([STATUS_TOO_LARGE])))
                        await cast(Any, stream).close_write()  # NetStream: half-close (FIN)
                        # Give the requester a moment to read the verdict, then reset:
                        # a reset drops whatever it buffered, the verdict included.
                        await trio.sleep(min(1.0, io))
                    return
                with trio.fail_after(io):
                    body = await _read_exact(stream, n)
            except trio.TooSlowError:
                self._stats.inc("requests_failed")
                self._log_once(("read_timeout", peer, name), logging.INFO,
                               "peer %s was too slow sending a request on %s", peer, name)
                return
            except Exception as e:
                self._stats.inc("requests_failed")
                log.debug("reading a request on %s from %s failed: %s", name, peer, _reason(e))
                return
            self._stats.add("stream_bytes_received", name, FRAME_HEADER_BYTES + n)
            if self._inbound_inflight >= self.config.queue_size:
                status, payload = STATUS_BUSY, b""
            else:
                self._inbound_inflight += 1
                try:
                    status, payload = await self._run_handler(name, peer, body)
                finally:
                    self._inbound_inflight -= 1
            frame = _frame(bytes([status]) + payload)
            with trio.fail_after(io):
                await stream.write(frame)
            self._stats.add("stream_bytes_sent", name, len(frame))
            if status == STATUS_OK:
                self._stats.inc("requests_served")
            graceful = True
        except trio.TooSlowError:
            self._stats.inc("requests_failed")
        except Exception as e:
            self._stats.inc("requests_failed")
            log.debug("serving %s failed: %s", name, _reason(e))
        finally:
            await _dispose(stream, graceful)

    async def _run_handler(self, name: str, peer: str, body: bytes) -> tuple[int, bytes]:
        """trio thread: run the asyncio handler and wait for its (status, payload)."""
        send, recv = trio.open_memory_channel[tuple[int, bytes]](1)

        def deliver(result: tuple[int, bytes]) -> None:  # trio thread
            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                send.send_nowait(result)

        if not self._post(self._dispatch_request, name, peer, body, deliver):
            return STATUS_ERROR, b""
        with trio.move_on_after(self.config.handler_timeout_s + 1.0):
            return await recv.receive()
        return STATUS_ERROR, b""

    def _dispatch_request(self, name: str, peer: str, body: bytes,
                          deliver: Callable[[tuple[int, bytes]], None]) -> None:
        """asyncio loop: start the user's handler as a task."""
        loop = self._loop
        assert loop is not None
        task = loop.create_task(self._run_user_handler(name, peer, body))
        self._handler_tasks.add(task)

        def done(t: asyncio.Task[tuple[int, bytes]]) -> None:
            self._handler_tasks.discard(t)
            result = (STATUS_ERROR, b"") if t.cancelled() or t.exception() else t.result()
            self._to_trio(deliver, result)

        task.add_done_callback(done)

    async def _run_user_handler(self, name: str, peer: str, body: bytes) -> tuple[int, bytes]:
        handler = self._handlers.get(name)
        if handler is None:
            return STATUS_ERROR, b""
        try:
            result = await asyncio.wait_for(handler(peer, body), self.config.handler_timeout_s)
        except TimeoutError:
            self._stats.inc("handler_errors")
            self._log_once(("handler_timeout", name), logging.WARNING,
                           "handler for %s took over %.1f s; the requester got an error",
                           name, self.config.handler_timeout_s)
            return STATUS_ERROR, b""
        except Exception as e:
            self._stats.inc("handler_errors")
            self._log_once(("handler_error", name, type(e).__name__), logging.ERROR,
                           "handler for %s raised %s", name, _reason(e), )
            log.debug("handler traceback", exc_info=e)
            return STATUS_ERROR, b""
        if result is None:
            return STATUS_NO_RESPONSE, b""
        if not isinstance(result, bytes | bytearray | memoryview):
            self._stats.inc("handler_errors")
            self._log_once(("handler_type", name), logging.ERROR,
                           "handler for %s returned %s, not bytes", name, type(result).__name__)
            return STATUS_ERROR, b""
        if len(result) > self.config.max_message_bytes:
            self._stats.inc("frames_too_large")
            self._log_once(("too_large_out", name), logging.ERROR,
                           "handler for %s returned %d bytes, over max_message_bytes=%d",
                           name, len(result), self.config.max_message_bytes)
            return STATUS_ERROR, b""
        return STATUS_OK, bytes(result)

    async def request(self, peer_id: str, protocol: str, data: bytes, timeout: float = 10.0) -> bytes:
        """Send one request frame on ``f"{protocol_prefix}/{protocol}"``; return the response.

        Dials the peer if needed (its address must be known: connected once, or bootstrap).
        Raises ProtocolMismatchError, FrameTooLargeError, RequestTimeoutError, RemoteError or
        HostError, each with the peer and the reason.
        """
        pid = self._protocol_id(protocol)
        peer = self._peer(peer_id)
        if peer == self._id:
            raise HostError("cannot send a request to ourselves")
        limit = self.config.max_message_bytes
        if len(data) > limit:
            self._stats.inc("frames_too_large")
            raise FrameTooLargeError(f"request of {len(data)} bytes on {pid} is over max_message_bytes={limit}")
        frame = _frame(bytes(data))

        async def op() -> bytes:
            try:
                with trio.fail_after(timeout):
                    return await self._do_request(peer, protocol, pid, frame)
            except trio.TooSlowError:
                self._stats.inc("requests_failed")
                raise RequestTimeoutError(f"request {pid} to peer {peer_id} timed out after {timeout} s") from None
            except HostError:
                self._stats.inc("requests_failed")
                raise

        return await self._call(op, f"request {pid} from {peer_id}")

    async def _do_request(self, peer: ID, name: str, pid: TProtocol, frame: bytes) -> bytes:
        host = self._host
        assert host is not None
        try:
            stream = await host.new_stream(peer, [pid])
        except StreamFailure as e:
            raise self._negotiation_error(peer, pid, e) from e
        except trio.TooSlowError:
            raise
        except Exception as e:
            raise HostError(f"cannot reach peer {peer} for {pid}: {_reason(e)}") from e
        self._stats.inc("requests_sent")
        body = await self._exchange(stream, peer, name, pid, frame)
        status, payload = body[0], body[1:]
        if status == STATUS_OK:
            return payload
        if status == STATUS_TOO_LARGE:
            raise FrameTooLargeError(f"peer {peer} refused the {pid} request: {len(frame) - FRAME_HEADER_BYTES} bytes is over its limit")
        if status == STATUS_NO_RESPONSE:
            raise RemoteError(f"peer {peer} has no response to this {pid} request")
        if status == STATUS_BUSY:
            raise RemoteError(f"peer {peer} is busy (too many requests in flight); retry later")
        raise RemoteError(f"peer {peer} failed to handle the {pid} request (status {status})")

    async def _exchange(self, stream: INetStream, peer: ID, name: str, pid: TProtocol, frame: bytes) -> bytes:
        """Write the request while reading the response: a responder may refuse (too large)
        before we finished writing, and must not wait on our writer to say so.

        The writer is shielded from cancellation: cancelling a write half-way through a Noise
        frame would corrupt the whole connection. It ends on its own: it completes, or the
        stream is reset (which we do on every failure path), or Yamux gives up on a window
        that stays shut for 5 s.
        """
        writer_done = trio.Event()
        write_errors: list[BaseException] = []

        async def writer() -> None:
            with trio.CancelScope(shield=True):
                try:
                    await stream.write(frame)
                    self._stats.add("stream_bytes_sent", name, len(frame))
                    await cast(Any, stream).close_write()  # NetStream: half-close (FIN)
                except Exception as e:
                    write_errors.append(e)
                finally:
                    writer_done.set()

        body: bytes | None = None
        error: HostError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            try:
                body = await self._read_response(stream, peer, pid)
            except HostError as e:
                error = e
            except Exception as e:
                why = _reason(write_errors[0]) if write_errors else _reason(e)
                error = RemoteError(f"peer {peer} closed the {pid} stream without a response ({why})")
                error.__cause__ = e
            finally:
                if body is None or not writer_done.is_set():
                    await _dispose(stream, graceful=False)  # also unblocks the writer
        if error is not None:
            raise error
        assert body is not None
        await _dispose(stream, graceful=True)
        self._stats.add("stream_bytes_received", name, FRAME_HEADER_BYTES + len(body))
        return body

    async def _read_response(self, stream: INetStream, peer: ID, pid: TProtocol) -> bytes:
        limit = self.config.max_message_bytes + 1  # + status byte
        n = await _read_header(stream)
        if n == 0 or n > limit:
            self._stats.inc("frames_too_large")
            raise FrameTooLargeError(f"peer {peer} answered {pid} with a {n}-byte frame (limit {limit}); refused")
        return await _read_exact(stream, n)

    def _negotiation_error(self, peer: ID, pid: TProtocol, err: BaseException) -> HostError:
        text = " ".join(str(x) for x in (err, err.__cause__) if x is not None)
        if "not supported" in text or " na" in text:
            prefix = self.config.protocol_prefix + "/"
            try:
                theirs = [str(p) for p in self._host.get_peerstore().get_protocols(peer)]
            except Exception:
                theirs = []
            if any(p.startswith(prefix) for p in theirs):
                return ProtocolMismatchError(f"peer {peer} speaks {self.config.protocol_prefix} but does not serve {pid}")
            return ProtocolMismatchError(f"peer {peer} does not speak {pid}: different run or protocol version")
        if "timed out" in text:
            return RequestTimeoutError(f"peer {peer} did not answer protocol negotiation for {pid}: {text}")
        return HostError(f"cannot open a {pid} stream to peer {peer}: {text}")

    # -- stats ---------------------------------------------------------------------------

    @property
    def stats(self) -> HostStats:
        """A consistent snapshot of the counters."""
        return self._stats.snapshot()

    @property
    def running(self) -> bool:
        return self._state == "running" and self._thread is not None and self._thread.is_alive()

