"""Peer exchange: hellos on connect, an address book, dialing the peers we learn of.

Connecting is the driver's business (which addresses, how many peers); what a peer's chain length
means is the core's (``NodeCore.on_peer``). A hello checks the run id and protocol version (a
peer of another swarm is refused on both sides with a clear message), swaps address books, and
tells the core how long the peer's chain is, which is how a restarting or joining node learns
that it is behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from seedswarm.crypto.keys import public_key_of
from seedswarm.gossip.transport import ProtocolMismatch, Transport, TransportError
from seedswarm.gossip.wire import (
    PROTO_HELLO,
    Hello,
    WireError,
    WrongRun,
    WrongVersion,
    decode_as,
    protocol_prefix,
)
from seedswarm.node.core.effects import Effect, Reason, Rejected

log = logging.getLogger("seedswarm.daemon")

MAX_BOOK = 4096


def _circuit_news(held: list[str], heard: list[str]) -> bool:
    """Does a third party's entry bring a relay circuit for a peer we know only directly?"""
    return not any("/p2p-circuit/" in a for a in held) and any("/p2p-circuit/" in a for a in heard)


class Peering:
    def __init__(self, run_id: bytes, me: str, transport: Transport, max_peers: int,
                 spawn: Callable[[Coroutine[Any, Any, Any], str], Any],
                 chain_length: Callable[[], int], announce: Callable[[], list[str]],
                 on_peer: Callable[[str, int], None], reject: Callable[[str, Reason, str], None],
                 count: Callable[[str], None]) -> None:
        self.run_id = run_id
        self.me = me
        self.t = transport
        self.max_peers = max_peers
        self.spawn = spawn
        self.chain_length = chain_length
        self.announce = announce
        self.on_peer = on_peer
        self.reject = reject
        self.count = count
        self.book: dict[str, list[str]] = {}
        # peer id -> wall time of its last hello with us (the saved book ranks by it)
        self.seen: dict[str, float] = {}
        self._dialing: dict[str, asyncio.Task[bool]] = {}

    def hello(self) -> Hello:
        return Hello.make(self.run_id, self.chain_length(), self.announce(), dict(list(self.book.items())[:64]))

    def learn(self, peer: str, hello: Hello) -> None:
        try:
            addrs, book = hello.addresses(), hello.peer_book()
        except WireError as e:
            self.reject(peer, Reason.MALFORMED, str(e))
            return
        if addrs:
            self.book[peer] = [a for a in addrs if a.endswith(f"/p2p/{peer}")][:4]
        if peer in self.seen or len(self.seen) < MAX_BOOK:
            self.seen[peer] = time.time()
        connected = set(self.t.peers())
        for pid, a in book.items():
            good = [x for x in a if x.endswith(f"/p2p/{pid}")][:4]
            if pid == self.me or pid == peer or not good:
                continue
            if pid not in self.book:
                if len(self.book) >= MAX_BOOK:
                    continue
                self.book[pid] = good
            elif pid not in connected and _circuit_news(self.book[pid], good):
                # A NATed node announces its relay circuit once it chose one (--relay-via auto);
                # whoever learnt its private address first must hear of the circuit from others.
                # Only that upgrade, once per peer: otherwise any hello could make us redial
                # whatever addresses it names, again and again. A connected peer's own hello
                # is the authority on its addresses.
                self.book[pid] = (good + [x for x in self.book[pid] if x not in good])[:4]
        self.on_peer(peer, hello.round)

    async def on_hello(self, peer: str, hello: Hello) -> bytes:
        """An inbound hello (already decoded for our run): learn from it, answer with ours."""
        self.learn(peer, hello)
        return self.hello().encode()

    async def greet(self, peer: str) -> None:
        """Our hello to a newly connected peer; dial the peers we did not know."""
        try:
            resp = await self.t.request(peer, PROTO_HELLO, self.hello().encode(), timeout=5.0)
            hello = decode_as(resp, Hello, self.run_id)
        except ProtocolMismatch:
            log.warning("refusing peer %s: it does not speak %s (another run id or protocol version)",
                        peer, protocol_prefix(self.run_id))
            self.count("peers_refused")
            await self.disconnect(peer)
            return
        except WireError as e:  # another version, another run, or not a hello at all
            reason = Reason.PROTOCOL_VERSION if isinstance(e, WrongVersion) else \
                Reason.WRONG_RUN if isinstance(e, WrongRun) else Reason.MALFORMED
            if reason is not Reason.MALFORMED:
                log.warning("refusing peer %s: %s", peer, e)
            self.reject(peer, reason, str(e))
            await self.disconnect(peer)
            return
        except TransportError as e:
            log.debug("hello to %s failed: %s", peer, e)
            return
        self.learn(peer, hello)
        self.dial_known()

    def dial_known(self) -> None:
        connected = set(self.t.peers())
        for pid in list(self.book):
            if len(connected) >= self.max_peers:
                break
            if pid not in connected and pid != self.me and pid not in self._dialing:
                connected.add(pid)
                self.dial(pid)

    def dial(self, pid: str, addrs: Sequence[str] | None = None) -> asyncio.Task[bool]:
        task = self._dialing.get(pid)
        if task is None:
            task = self.spawn(self._dial(pid, list(addrs or self.book.get(pid, []))), "dial")
            self._dialing[pid] = task
            task.add_done_callback(lambda _t, p=pid: self._dialing.pop(p, None))
        return task

    async def _dial(self, pid: str, addrs: list[str]) -> bool:
        tried: set[str] = set()
        while addrs:
            for addr in addrs:
                tried.add(addr)
                try:
                    await self.t.connect(addr)
                    return True
                except TransportError as e:
                    log.debug("dial %s failed: %s", addr, e)
            # A hello may have brought new addresses meanwhile (a NATed peer's relay circuit,
            # while we waited out a timeout at its private address): try those before giving up.
            addrs = [a for a in self.book.get(pid, []) if a not in tried]
        return False

    async def ensure(self, pid: str) -> bool:
        """Connected to ``pid`` (dialing it from the address book if need be)?"""
        if pid in self.t.peers():
            return True
        if pid not in self.book:
            return False
        return bool(await asyncio.shield(self.dial(pid)))

    async def disconnect(self, peer: str) -> None:
        with contextlib.suppress(TransportError):
            await self.t.disconnect(peer)

    def exchange(self) -> None:
        """Now and then, a hello to a random peer: address books stay fresh, chains compared."""
        peers = self.t.peers()
        if peers:
            self.spawn(self.greet(random.choice(peers)), "px")

    def greet_all(self) -> None:
        """A hello to every connected peer: our addresses changed (a relay was chosen)."""
        for p in self.t.peers():
            self.spawn(self.greet(p), "px")

    def dial_bootstrap(self, addrs: Sequence[str]) -> None:
        """Dial the bootstrap peers we are not connected to (our own address excluded)."""
        connected = set(self.t.peers())
        for a in addrs:
            pid = a.rsplit("/p2p/", 1)[-1]
            if pid != self.me and pid not in connected:
                self.dial(pid, [a])


def key_of(peer_id: str) -> bytes | None:
    try:
        return public_key_of(peer_id)
    except ValueError:
        return None


def effects_of_peer(effects: list[Effect], peer: bytes | None) -> bool:
    """Did the core refuse something from ``peer`` in these effects?"""
    return any(isinstance(e, Rejected) and e.peer == peer for e in effects)
