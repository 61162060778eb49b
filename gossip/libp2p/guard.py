"""The pubsub guard: every byte a peer sends on ``/meshsub/*`` goes through code that cannot take
the host down, and every drop is named.

py-libp2p 0.8.1 lets two inputs escape as exceptions that cancel a service and stop the host
(measured against live daemons; the stock behaviour is pinned in tests/test_pubsub_hostile.py):

* a frame whose body is not an RPC protobuf: ``DecodeError`` from ``ParseFromString`` in
  ``Pubsub.continuously_read_stream`` cancels the Swarm;
* a message whose ``key`` does not parse: ``signature_validator`` raises inside the
  ``push_msg`` task and cancels Pubsub.

It drops most other bad input silently (bad signatures, truncated or oversized frames, too many
subscriptions, ...), and it has no time limit on a frame: a peer that sends a header and stalls
holds a task forever. ``GuardedPubsub`` replaces the read loop with its own (the library's, each
failure classified, with a deadline per frame) and puts a signature check that never raises in
front of ``push_msg``. Every drop goes to ``on_drop(peer, reason, topics, exc)`` on the trio
thread; the host counts it (``HostStats.gossip_dropped``), logs it once per (reason, peer), and
charges the peer one invalid message (P4) unless an honest peer can cause it (``UNPENALISED``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, Final

import trio
from google.protobuf.message import DecodeError
from libp2p.abc import INetStream
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.exceptions import ParseError
from libp2p.io.exceptions import IOException
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import GossipsubEvent, Pubsub
from libp2p.pubsub.utils import maybe_consume_signed_record
from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX
from libp2p.stream_muxer.exceptions import MuxedConnError, MuxedStreamError
from libp2p.utils.varint import decode_uvarint

from seedswarm.gossip.libp2p.relay import is_relayed

log = logging.getLogger(__name__)

#: Why the guard dropped a peer's input (the keys of ``HostStats.gossip_dropped``).
DROP_REASONS: Final = {
    # Frame level: the inbound pubsub stream is reset (the peer may open another).
    "rpc-decode": "the frame is not an RPC protobuf (libp2p: DecodeError cancels the Swarm)",
    "bad-varint": "the length prefix is not a 64-bit varint (libp2p: ParseError, silent)",
    "oversized-rpc": "the length prefix is over max_inbound_rpc_size (libp2p: a WARNING)",
    "truncated-rpc": "the stream ended inside a frame (libp2p: a DEBUG line)",
    "stalled-rpc": "a frame did not arrive whole in time after its first byte (libp2p: waits forever)",
    "read-error": "reading the stream raised something unexpected (a backstop)",
    # RPC level: that RPC (or part) is dropped, the stream kept.
    "bad-peer-record": "its signed peer record is invalid (libp2p: an ERROR line, RPC dropped)",
    "too-many-subscriptions": "over max_subscriptions_per_rpc in one RPC (libp2p: a WARNING)",
    "too-many-topics": "a subscription over max_subscriptions_per_peer (libp2p: a WARNING)",
    "unsubscribed-topic": "a message on no topic of ours (libp2p: silent)",
    "rpc-error": "anything else raised while handling it, e.g. inside the router (a backstop)",
    # Message level: that message is dropped, before the topic validator.
    "no-signature": "strict signing, and the message carries no signature (libp2p: silent)",
    "no-key": "its author id embeds no key (libp2p: parses msg.key, which may raise)",
    "bad-key": "its key does not parse (libp2p: raises in push_msg and cancels Pubsub)",
    "key-mismatch": "its key is not its author's (libp2p: silent)",
    "bad-signature": "the signature does not verify (libp2p: silent)",
    "graylisted": "the forwarder's score is under the publish threshold (libp2p: silent)",
    "push-error": "anything else raised by push_msg (a backstop; never seen)",
}
#: Drops an honest peer can cause (a crash mid-frame, a stall, an unsubscribe race), and drops
#: that are already the consequence of a low score: counted and logged, never charged.
UNPENALISED: Final = frozenset({
    "truncated-rpc", "stalled-rpc", "read-error", "graylisted", "too-many-subscriptions",
    "unsubscribed-topic",
})

#: ``on_drop(peer, reason, topics, exc)``, called on the trio thread; must not raise.
DropHook = Callable[[ID, str, Sequence[str], BaseException | None], None]

#: The first byte of a peer id that embeds its public key (multihash code 0x00, "identity").
_IDENTITY_MULTIHASH: Final = b"\x00"
#: What reading a stream raises when the peer closed or reset it, or the connection died.
_CLOSED: Final = (IOException, MuxedConnError, MuxedStreamError, trio.ClosedResourceError,
                  trio.BrokenResourceError, EOFError)


class FrameDrop(Exception):
    """A bad pubsub frame; ``reason`` is a key of DROP_REASONS."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def _read_byte(stream: INetStream) -> bytes:
    try:
        return await stream.read(1)
    except EOFError:  # StreamEOF: the peer half-closed
        return b""


async def read_rpc_frame(stream: INetStream, limit: int, stall_s: float, min_rate: float) -> bytes | None:
    """One varint-framed pubsub RPC, or None at a clean end of stream (between frames).

    libp2p's ``read_varint_prefixed_bytes_limited``, except that it says why a frame is bad
    (``FrameDrop``), refuses an oversized one before reading its body, and gives a frame whose
    first byte arrived ``stall_s`` plus its length at ``min_rate`` to arrive whole. Between
    frames it waits as long as the peer likes: pubsub streams idle for long stretches.
    """
    first = await _read_byte(stream)
    if not first:
        return None
    deadline = trio.current_time() + stall_s
    header = bytearray(first)
    with trio.move_on_at(deadline) as scope:
        while header[-1] & 0x80:
            if len(header) >= 10:
                raise FrameDrop("bad-varint")
            b = await _read_byte(stream)
            if not b:
                raise FrameDrop("truncated-rpc")
            header += b
    if scope.cancelled_caught:
        raise FrameDrop("stalled-rpc")
    try:
        n = decode_uvarint(bytes(header))
    except ParseError:
        raise FrameDrop("bad-varint") from None
    if n > limit:
        raise FrameDrop("oversized-rpc")  # refused before reading: never buffered
    body = bytearray()
    with trio.move_on_at(deadline + n / min_rate):
        while len(body) < n:
            try:
                chunk = await stream.read(n - len(body))
            except EOFError:
                chunk = b""
            if not chunk:
                raise FrameDrop("truncated-rpc")
            body += chunk
        return bytes(body)
    raise FrameDrop("stalled-rpc")


def signature_problem(msg: Any, embedded_keys_only: bool) -> str | None:
    """libp2p's ``signature_validator``, returning why it fails instead of raising.

    ``embedded_keys_only``: accept only authors whose peer id embeds its key (an identity
    multihash: every Ed25519 seedswarm node); ``msg.key`` is then never parsed.
    """
    if not msg.signature:
        return "no-signature"
    try:
        sender = ID(msg.from_id)
        key = sender.extract_public_key()  # None unless an identity multihash
    except Exception:
        return "bad-key"
    if key is None:
        if embedded_keys_only or not msg.key:
            return "no-key"
        try:
            key = deserialize_public_key(msg.key)
        except Exception:
            return "bad-key"
    try:
        if ID.from_pubkey(key) != sender:
            return "key-mismatch"
    except Exception:
        return "bad-key"
    signed = rpc_pb2.Message(data=msg.data, topicIDs=msg.topicIDs, from_id=msg.from_id, seqno=msg.seqno)
    try:
        ok = key.verify(PUBSUB_SIGNING_PREFIX.encode() + signed.SerializeToString(), msg.signature)
    except Exception:
        ok = False
    return None if ok else "bad-signature"


class GuardedPubsub(Pubsub):
    """libp2p's Pubsub, made to survive and report hostile input (see the module docstring)."""

    def __init__(self, *args: Any, on_drop: DropHook, frame_stall_s: float, frame_min_rate: float,
                 embedded_keys_only: bool = True, precheck_signatures: bool = True,
                 on_rpc_sent: Callable[[rpc_pb2.RPC], None] | None = None, send_peer_records: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_drop = on_drop
        self._on_rpc_sent = on_rpc_sent
        self._send_peer_records = send_peer_records
        self._frame_stall_s = frame_stall_s
        self._frame_min_rate = frame_min_rate
        self._embedded_keys_only = embedded_keys_only
        self._precheck_signatures = precheck_signatures  # False only to test the backstop

    def _drop(self, peer: ID, reason: str, topics: Sequence[str] = (), exc: BaseException | None = None) -> None:
        try:
            self._on_drop(peer, reason, list(topics), exc)
        except Exception:
            log.exception("pubsub drop hook failed")

    async def write_msg(self, stream: INetStream, rpc_msg: rpc_pb2.RPC) -> bool:
        """Pubsub.write_msg without the sender's signed peer record (unless
        ``send_peer_records``), then ``on_rpc_sent(rpc)`` for an RPC that was written (the byte
        accounting splits it into data, envelope and control; every RPC passes here).

        py-libp2p attaches our signed peer record (about 200 bytes: our addresses, signed) to
        nearly every RPC, control-only ones and each forwarded message included: at a few
        small messages a second it was most of the GossipSub control bytes. Peers already get
        it from identify on every new connection; go-libp2p never sends it in pubsub RPCs.

        Nor with each message its author's public key (38 bytes) where the author's peer id
        embeds it (an identity multihash, as every Ed25519 id): the signature does not cover
        the key, and receivers (libp2p's validator, and our check, which accepts no other
        authors) take it from the id first, as go-libp2p does.
        """
        if not self._send_peer_records and rpc_msg.senderRecord:
            rpc_msg.ClearField("senderRecord")
        for m in rpc_msg.publish:
            if m.key and m.from_id[:1] == _IDENTITY_MULTIHASH:
                m.ClearField("key")
        ok = await super().write_msg(stream, rpc_msg)
        # an RPC on a relayed connection is counted as relay bytes (relay.py), not split here
        if ok and self._on_rpc_sent is not None and not is_relayed(getattr(stream, "muxed_conn", None)):
            try:
                self._on_rpc_sent(rpc_msg)
            except Exception:
                log.exception("pubsub sent-RPC hook failed")
        return ok

    async def continuously_read_stream(self, stream: INetStream) -> None:
        """Pubsub.continuously_read_stream (0.8.1) with every failure caught and classified.

        A bad frame resets the stream, as go-libp2p does on any read error; unlike libp2p we
        keep the peer's pubsub state (a dead-peer cleanup would also wipe the score we just
        charged). A bad RPC inside a good frame is dropped and the stream kept. Nothing but
        cancellation leaves this method.
        """
        peer = stream.muxed_conn.peer_id
        fatal: str | None = None
        error: BaseException | None = None
        try:
            while self.manager.is_running:
                frame = await read_rpc_frame(stream, self.max_inbound_rpc_size,
                                             self._frame_stall_s, self._frame_min_rate)
                if frame is None:
                    return  # the peer closed its stream between frames
                rpc = rpc_pb2.RPC()
                try:
                    rpc.ParseFromString(frame)
                except DecodeError as e:
                    fatal, error = "rpc-decode", e
                    break
                try:
                    await self._handle_inbound_rpc(peer, stream, rpc, len(frame))
                except _CLOSED:
                    raise
                except Exception as e:
                    self._drop(peer, "rpc-error", (), e)
        except FrameDrop as e:
            fatal = e.reason
        except _CLOSED:
            return  # connection closed or reset: nothing to report
        except Exception as e:
            fatal, error = "read-error", e
        if fatal is None:
            return
        self._drop(peer, fatal, (), error)
        with trio.CancelScope(shield=True), trio.move_on_after(1.0), contextlib.suppress(Exception):
            await stream.reset()

    async def _handle_inbound_rpc(self, peer: ID, stream: INetStream, rpc: Any, size: int) -> None:
        """The body of libp2p's read loop for one parsed RPC (0.8.1, pubsub.py:564-626)."""
        if not maybe_consume_signed_record(rpc, self.host, peer):
            self._drop(peer, "bad-peer-record")
            return
        event = GossipsubEvent()
        event.peer_id = peer.pretty()
        event.message_size = size
        if rpc.publish:
            event.publish = True
            for msg in rpc.publish:
                if not self._is_subscribed_to_msg(msg):
                    self._drop(peer, "unsubscribed-topic", list(msg.topicIDs))
                elif self.manager.is_running:
                    self.manager.run_task(self.push_msg, peer, msg)
        if rpc.subscriptions:
            event.subopts = True
            if len(rpc.subscriptions) > self.max_subscriptions_per_rpc:
                self._drop(peer, "too-many-subscriptions")
            else:
                for sub in rpc.subscriptions:
                    self.handle_subscription(peer, sub)
        if rpc.HasField("control"):
            event.control = True
            await self.router.handle_rpc(rpc, peer)
        metrics = getattr(stream, "metric_send_channel", None)
        if metrics is not None:
            await metrics.send(event)

    def handle_subscription(self, origin_id: ID, sub_message: rpc_pb2.RPC.SubOpts) -> None:
        """libp2p's, plus a named drop where it would ignore a subscription over the limit."""
        topic = sub_message.topicid
        if (sub_message.subscribe
                and origin_id not in self.peer_topics.get(topic, ())
                and self._peer_subscription_count.get(origin_id, 0) >= self.max_subscriptions_per_peer):
            self._drop(origin_id, "too-many-topics")
            return
        super().handle_subscription(origin_id, sub_message)

    async def push_msg(self, msg_forwarder: ID, msg: Any) -> None:
        """Pubsub.push_msg that never raises for a remote message and counts its drops.

        The cheap gates run first, in libp2p's order (blacklist and seen: libp2p drops them;
        the score gate: counted), then the signature check without exceptions; libp2p's
        push_msg then repeats them (one more Ed25519 verification per new message, see
        docs/networking.md for the cost) and validates, delivers and forwards. Our own
        publishes go straight through.
        """
        if msg_forwarder == self.my_id:
            await super().push_msg(msg_forwarder, msg)
            return
        topics = list(msg.topicIDs)
        try:
            if (self._precheck_signatures and not self.is_peer_blacklisted(msg_forwarder)
                    and not self._is_msg_seen(msg)):
                scorer = getattr(self.router, "scorer", None)
                if scorer is not None and not scorer.allow_publish(msg_forwarder, topics):
                    self._drop(msg_forwarder, "graylisted", topics)
                    return
                if self.strict_signing:
                    problem = signature_problem(msg, self._embedded_keys_only)
                    if problem is not None:
                        self._drop(msg_forwarder, problem, topics)
                        return
            await super().push_msg(msg_forwarder, msg)
        except Exception as e:  # a backstop: a raising push_msg task cancels Pubsub
            self._drop(msg_forwarder, "push-error", topics, e)
