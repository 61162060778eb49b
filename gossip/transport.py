"""The transport a node driver talks to: gossip on a topic, request/response streams, peers.

Two implementations: the libp2p adapter (``gossip.libp2p``: TCP, Noise, Yamux, GossipSub) and
the in-memory, virtual-time network (``gossip.memory``) on which the daemon's own driver runs in
deterministic tests. The daemon depends on this interface only, so everything it decides can be
tested without sockets and without sleeping.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

# A request handler: (peer id, request bytes) -> response bytes, or None to answer nothing.
RequestHandler = Callable[[str, bytes], Awaitable[bytes | None]]
# A gossip validator: (data, forwarder peer id) -> accept. Pure and thread-safe: it may run on the
# transport's own thread, before a message is forwarded.
Validator = Callable[[bytes, str], bool]


class TransportError(Exception):
    """A transport operation failed (peer unreachable, stream reset, timeout, host stopped)."""


class TransportClosed(TransportError):
    """The transport is stopped."""


class ProtocolMismatch(TransportError):
    """The peer does not speak this protocol id (another run or protocol version)."""


class RequestTimeout(TransportError, TimeoutError):
    """No answer within the request's timeout."""


@dataclass(frozen=True)
class GossipMessage:
    topic: str
    data: bytes
    from_peer: str  # the forwarder (GossipSub hides the origin)


@dataclass(frozen=True)
class PeerConnected:
    peer: str


@dataclass(frozen=True)
class PeerDisconnected:
    peer: str


Event = GossipMessage | PeerConnected | PeerDisconnected


class Transport(Protocol):
    """What a node driver needs of its network."""

    @property
    def running(self) -> bool: ...

    @property
    def listen_addrs(self) -> list[str]: ...

    @property
    def stats(self) -> Any:
        """A dataclass of counters (numbers, or dicts of numbers by label) for metrics."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def set_request_handler(self, protocol: str, handler: RequestHandler) -> None: ...

    async def subscribe(self, topic: str, validator: Validator) -> None: ...

    async def publish(self, topic: str, data: bytes) -> None: ...

    async def topic_peers(self, topic: str) -> list[str]: ...

    async def request(self, peer_id: str, protocol: str, data: bytes, timeout: float = 10.0) -> bytes: ...

    async def next_event(self) -> Event: ...

    def peers(self) -> list[str]: ...

    async def connect(self, multiaddr_str: str) -> str: ...

    async def disconnect(self, peer_id: str) -> None: ...
