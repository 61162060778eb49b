"""An in-memory network in virtual time, on which the daemon's own driver runs in tests.

As trio's ``MockClock`` lets a trio program be tested without waiting, :class:`VirtualTimeLoop`
is an asyncio event loop whose clock jumps to the next timer whenever nothing is ready, and
:class:`MemoryNetwork` connects :class:`MemoryTransport` instances (one per node) with per-link
latency, partitions and message loss, all scheduled on that loop. A test can then run several
real ``Daemon`` objects (sync, join, bans, shutdown) for minutes of protocol time in a fraction of
a second, deterministically: the same seed gives the same sequence of events.

Nothing here knows the protocol: it moves bytes between the same entry points the libp2p
adapter serves (``gossip.transport.Transport``).
"""

from __future__ import annotations

import asyncio
import random
import selectors
from collections import deque
from dataclasses import dataclass, field

from seedswarm.crypto.keys import peer_id_of
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


class _VirtualSelector(selectors.DefaultSelector):
    """Polls without blocking and moves the loop's clock forward by the time it would wait."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = super().select(0)
        if not events and timeout is not None and timeout > 0:
            self._loop.advance(timeout)
        elif not events and timeout is None:
            raise RuntimeError("virtual-time loop is idle with nothing scheduled: the program waits forever")
        return events


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` only moves when every task waits on a timer."""

    def __init__(self, start: float = 0.0) -> None:
        self._vtime = start
        super().__init__(_VirtualSelector(self))

    def time(self) -> float:
        return self._vtime

    def advance(self, dt: float) -> None:
        self._vtime += dt


@dataclass
class MemoryStats:
    transport_bytes_sent: int = 0
    transport_bytes_received: int = 0
    gossip_published: int = 0
    gossip_delivered: int = 0
    gossip_rejected: dict[str, int] = field(default_factory=dict)
    requests_served: int = 0
    requests_failed: int = 0
    protocol_mismatches: int = 0


class MemoryNetwork:
    """The links between in-memory transports: latency, partitions, loss, all seeded."""

    def __init__(self, latency: float = 0.01, loss: float = 0.0, seed: int = 0) -> None:
        self.latency = latency
        self.loss = loss
        self.rng = random.Random(seed)
        self.hosts: dict[str, MemoryTransport] = {}
        self.cut: set[frozenset[str]] = set()

    def transport(self, public_key: bytes, protocol_prefix: str = "") -> MemoryTransport:
        return MemoryTransport(self, peer_id_of(public_key), protocol_prefix)

    def partition(self, a: str, b: str) -> None:
        """Drop everything between ``a`` and ``b`` (connections stay up, as with a broken route)."""
        self.cut.add(frozenset((a, b)))

    def heal(self, a: str | None = None, b: str | None = None) -> None:
        if a is None or b is None:
            self.cut.clear()
        else:
            self.cut.discard(frozenset((a, b)))

    def passes(self, a: str, b: str) -> bool:
        if frozenset((a, b)) in self.cut:
            return False
        return not (self.loss and self.rng.random() < self.loss)


class MemoryTransport:
    def __init__(self, net: MemoryNetwork, peer_id: str, protocol_prefix: str = "") -> None:
        self.net = net
        self.peer_id = peer_id
        self.prefix = protocol_prefix
        self._running = False
        self._handlers: dict[str, RequestHandler] = {}
        self._topics: dict[str, Validator] = {}
        self._peers: set[str] = set()
        self._events: asyncio.Queue[Event] | None = None
        self._seen: deque[bytes] = deque(maxlen=4096)
        self._seen_set: set[bytes] = set()
        self._stats = MemoryStats()

    # ------------------------------------------------------------------ lifecycle
    @property
    def running(self) -> bool:
        return self._running

    @property
    def listen_addrs(self) -> list[str]:
        return [f"/memory/{self.peer_id}/p2p/{self.peer_id}"]

    @property
    def stats(self) -> MemoryStats:
        return self._stats

    async def start(self) -> None:
        if self.peer_id in self.net.hosts and self.net.hosts[self.peer_id].running:
            raise TransportError(f"peer {self.peer_id} is already listening")
        self._events = asyncio.Queue()
        self.net.hosts[self.peer_id] = self
        self._running = True

    async def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        for p in list(self._peers):
            self._drop(p)
        if self.net.hosts.get(self.peer_id) is self:
            del self.net.hosts[self.peer_id]

    def _emit(self, ev: Event) -> None:
        if self._events is not None and self._running:
            self._events.put_nowait(ev)

    # ------------------------------------------------------------------ peers
    def peers(self) -> list[str]:
        return sorted(self._peers)

    def _other(self, pid: str) -> MemoryTransport:
        other = self.net.hosts.get(pid)
        if other is None or not other.running:
            raise TransportError(f"peer {pid} is not reachable")
        return other

    async def connect(self, multiaddr_str: str) -> str:
        if not self._running:
            raise TransportClosed("transport is stopped")
        pid = multiaddr_str.rsplit("/p2p/", 1)[-1]
        other = self._other(pid)
        if pid == self.peer_id:
            raise TransportError("cannot dial ourselves")
        await asyncio.sleep(2 * self.net.latency)  # a round trip to set up
        if pid not in self._peers:
            self._peers.add(pid)
            other._peers.add(self.peer_id)
            self._emit(PeerConnected(pid))
            other._emit(PeerConnected(self.peer_id))
        return pid

    async def disconnect(self, peer_id: str) -> None:
        self._drop(peer_id)

    def _drop(self, pid: str) -> None:
        if pid in self._peers:
            self._peers.discard(pid)
            self._emit(PeerDisconnected(pid))
        other = self.net.hosts.get(pid)
        if other is not None and self.peer_id in other._peers:
            other._peers.discard(self.peer_id)
            other._emit(PeerDisconnected(self.peer_id))

    # ------------------------------------------------------------------ gossip
    async def subscribe(self, topic: str, validator: Validator) -> None:
        self._topics[topic] = validator

    async def topic_peers(self, topic: str) -> list[str]:
        return [p for p in self.peers() if topic in self.net.hosts[p]._topics]

    async def publish(self, topic: str, data: bytes) -> None:
        if not self._running:
            raise TransportClosed("transport is stopped")
        self._stats.gossip_published += 1
        self._mark_seen(data)
        self._flood(topic, data, exclude=None)

    def _mark_seen(self, data: bytes) -> bool:
        key = data[:64] + len(data).to_bytes(4, "big") + data[-64:]
        if key in self._seen_set:
            return False
        if len(self._seen) == self._seen.maxlen:
            self._seen_set.discard(self._seen[0])
        self._seen.append(key)
        self._seen_set.add(key)
        return True

    def _flood(self, topic: str, data: bytes, exclude: str | None) -> None:
        loop = asyncio.get_running_loop()
        for p in self.peers():
            if p == exclude or not self.net.passes(self.peer_id, p):
                continue
            self._stats.transport_bytes_sent += len(data)
            loop.call_later(self.net.latency, self._arrive_at, p, topic, data)

    def _arrive_at(self, pid: str, topic: str, data: bytes) -> None:
        other = self.net.hosts.get(pid)
        if other is not None and other.running and self.peer_id in other._peers:
            other._on_gossip(topic, data, self.peer_id)

    def _on_gossip(self, topic: str, data: bytes, frm: str) -> None:
        self._stats.transport_bytes_received += len(data)
        validator = self._topics.get(topic)
        if validator is None or not self._mark_seen(data):
            return
        if not validator(data, frm):
            self._stats.gossip_rejected[topic] = self._stats.gossip_rejected.get(topic, 0) + 1
            return
        self._stats.gossip_delivered += 1
        self._emit(GossipMessage(topic, data, frm))
        self._flood(topic, data, exclude=frm)

    # ------------------------------------------------------------------ requests
    def set_request_handler(self, protocol: str, handler: RequestHandler) -> None:
        self._handlers[protocol] = handler

    async def request(self, peer_id: str, protocol: str, data: bytes, timeout: float = 10.0) -> bytes:
        if not self._running:
            raise TransportClosed("transport is stopped")
        if peer_id not in self._peers:
            raise TransportError(f"not connected to {peer_id}")
        other = self._other(peer_id)
        if other.prefix != self.prefix or protocol not in other._handlers:
            self._stats.protocol_mismatches += 1
            raise ProtocolMismatch(f"{peer_id} does not speak {self.prefix}/{protocol}")
        self._stats.transport_bytes_sent += len(data)
        try:
            return await asyncio.wait_for(self._exchange(other, protocol, data), timeout)
        except TimeoutError:
            self._stats.requests_failed += 1
            raise RequestTimeout(f"no answer from {peer_id} within {timeout} s") from None

    async def _exchange(self, other: MemoryTransport, protocol: str, data: bytes) -> bytes:
        await asyncio.sleep(self.net.latency)
        if not self.net.passes(self.peer_id, other.peer_id) or not other.running:
            await asyncio.sleep(3600)  # lost: the caller's timeout fires
        other._stats.transport_bytes_received += len(data)
        answer = await other._handlers[protocol](self.peer_id, data)
        other._stats.requests_served += 1
        if answer is None:
            raise TransportError(f"{other.peer_id} answered nothing")
        other._stats.transport_bytes_sent += len(answer)
        await asyncio.sleep(self.net.latency)
        if not self.net.passes(other.peer_id, self.peer_id):
            await asyncio.sleep(3600)
        self._stats.transport_bytes_received += len(answer)
        return answer

    # ------------------------------------------------------------------ events
    async def next_event(self) -> Event:
        if self._events is None:
            raise TransportClosed("transport is not started")
        if not self._running and self._events.empty():
            raise TransportClosed("transport is stopped")
        return await self._events.get()

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"MemoryTransport({self.peer_id[-8:]}, peers={len(self._peers)})"

