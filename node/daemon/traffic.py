"""Bytes between the core and the transport: gossip and requests out, events and requests in.

Outbound: a ``Publish`` goes on the run's topic; a ``Send`` is a request whose answer (checked to
be the message type that request expects) is fed back to the core. Inbound: gossip the
validator passed goes to the core; a request is decoded (refusals counted by reason: malformed,
wrong run, wrong protocol version), handed to the core, and the core's ``Reply`` to exactly that
request is written back on its stream. Nothing here decides anything about the protocol.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from seedswarm.crypto.keys import peer_id_of
from seedswarm.gossip.transport import (
    GossipMessage,
    PeerConnected,
    PeerDisconnected,
    Transport,
    TransportError,
)
from seedswarm.gossip.wire import (
    GOSSIP_TYPES,
    PROTO_CHAIN,
    PROTO_CKPT,
    PROTO_HELLO,
    PROTO_INPUTS,
    PROTO_MSG,
    REQUESTS,
    RESPONSES,
    TOPIC,
    ChainRequest,
    CheckpointRequest,
    ContributionsRequest,
    Hello,
    Message,
    WireError,
    WrongRun,
    WrongVersion,
    decode,
    decode_as,
)
from seedswarm.node.core.effects import Effect, Reason, Reply
from seedswarm.node.core.joinplan import CHUNK_TIMEOUT_MAX
from seedswarm.node.core.protocol import NodeCore
from seedswarm.node.daemon.metrics import Metrics
from seedswarm.node.daemon.peering import Peering, effects_of_peer, key_of

log = logging.getLogger("seedswarm.daemon")

_PROTO_OF: dict[type[Message], str] = {ContributionsRequest: PROTO_INPUTS, ChainRequest: PROTO_CHAIN,
                                       CheckpointRequest: PROTO_CKPT}


def gossip_validator(run_id: bytes) -> Callable[[bytes, str], bool]:
    """A pure, thread-safe verdict on a gossip message: schema, size, run id, signature.

    It runs on the transport's thread before a message is forwarded (so invalid messages do not
    spread), and a rejection costs the forwarder score: hence no check that depends on local
    state (the round we are at); those happen in the core after delivery.
    """

    def validate(data: bytes, from_peer: str) -> bool:
        try:
            msg = decode(data, run_id)
        except WireError:
            return False
        if not isinstance(msg, GOSSIP_TYPES):
            return False
        return msg.signature_ok()

    return validate


class _Node(Protocol):
    core: NodeCore | None
    transport: Transport | None
    peering: Peering | None
    metrics: Metrics
    run_id: bytes

    def now(self) -> float: ...

    def handle(self, effects: list[Effect]) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> Any: ...

    def log_once(self, reason: str, peer: str, msg: str, *args: Any) -> None: ...

    def count_reject(self, reason: Reason, peer: str | None, detail: str = "") -> None: ...

    def reject_peer_id(self, peer: str, reason: Reason, detail: str = "") -> None: ...

    def mark(self, phase: str) -> None: ...


class Traffic:
    def __init__(self, node: _Node) -> None:
        self.d = node

    async def publish(self, msg: Message) -> None:
        assert self.d.transport is not None
        try:
            await self.d.transport.publish(TOPIC, msg.encode())
            self.d.metrics.inc("gossip_published_total", 1, "type", type(msg).__name__)
        except TransportError as e:
            self.d.metrics.inc("publish_failed_total")
            self.d.log_once("publish", type(msg).__name__, "cannot publish %s: %s", type(msg).__name__, e)

    async def send(self, to: bytes, msg: Message) -> None:
        assert self.d.transport is not None and self.d.peering is not None
        pid = peer_id_of(to)
        if not await self.d.peering.ensure(pid):
            self.d.metrics.inc("send_failed_total", 1, "type", type(msg).__name__, help="direct sends that found no route")
            return
        proto = _PROTO_OF.get(type(msg), PROTO_MSG)
        try:
            resp = await self.d.transport.request(pid, proto, msg.encode(), timeout=CHUNK_TIMEOUT_MAX if proto == PROTO_CKPT else 5.0)
        except TransportError as e:
            self.d.metrics.inc("send_failed_total", 1, "type", type(msg).__name__)
            log.debug("request %s to %s failed: %s", proto, pid, e)
            return
        if proto == PROTO_MSG or self.d.core is None:
            return
        try:
            answer = decode(resp, self.d.run_id)
            if not isinstance(answer, RESPONSES[proto]):
                raise WireError(f"expected {'/'.join(c.__name__ for c in RESPONSES[proto])}, got {type(answer).__name__}")
        except WireError as e:
            self.d.reject_peer_id(pid, Reason.BAD_RESPONSE, str(e))
            return
        if proto == PROTO_CHAIN:
            self.d.mark("chain_fetched")
        self.d.handle(self.d.core.on_message(self.d.now(), answer, to))

    def on_peer(self, peer: str, length: int) -> None:
        self.d.mark("first_peer")
        key = key_of(peer)
        if self.d.core is not None and key is not None:
            self.d.handle(self.d.core.on_peer(self.d.now(), key, length))

    async def pump(self) -> None:
        assert self.d.transport is not None and self.d.peering is not None
        while True:
            ev = await self.d.transport.next_event()
            core = self.d.core
            if isinstance(ev, GossipMessage) and core is not None:
                try:
                    msg = decode(ev.data, self.d.run_id)
                except WireError as e:  # the validator passed it: should not happen
                    self.d.count_reject(Reason.BAD_GOSSIP, ev.from_peer, str(e))
                    continue
                self.d.handle(core.on_message(self.d.now(), msg, None))
            elif isinstance(ev, PeerConnected):
                if core is not None and core.is_banned(key_of(ev.peer), self.d.now()):
                    self.d.spawn(self.d.peering.disconnect(ev.peer), "ban")
                else:
                    self.d.spawn(self.d.peering.greet(ev.peer), "hello")
            elif isinstance(ev, PeerDisconnected) and core is not None and (k := key_of(ev.peer)) is not None:
                core.on_peer_gone(k)

    def server(self, proto: str) -> Callable[[str, bytes], Coroutine[Any, Any, bytes | None]]:
        expect = REQUESTS[proto]

        async def serve(peer: str, data: bytes) -> bytes | None:
            core, key = self.d.core, key_of(peer)
            if core is None or self.d.peering is None:
                return None
            if key is None or core.is_banned(key, self.d.now()):
                return None
            try:
                msg = decode_as(data, expect, self.d.run_id)
            except WrongVersion as e:
                self.d.reject_peer_id(peer, Reason.PROTOCOL_VERSION, str(e))
                return None
            except WrongRun as e:
                self.d.reject_peer_id(peer, Reason.WRONG_RUN, str(e))
                if proto == PROTO_HELLO:
                    log.warning("refusing peer %s: %s", peer, e)
                    self.d.spawn(self.d.peering.disconnect(peer), "refuse")
                return None
            except WireError as e:
                self.d.reject_peer_id(peer, Reason.MALFORMED, str(e))
                return None
            if isinstance(msg, Hello):
                return await self.d.peering.on_hello(peer, msg)
            effects = core.on_message(self.d.now(), msg, key)
            reply = next((e.msg for e in effects if isinstance(e, Reply) and e.request is msg), None)
            self.d.handle(effects)
            if proto == PROTO_MSG:
                return None if effects_of_peer(effects, key) else b""
            return None if reply is None else reply.encode()

        return serve
