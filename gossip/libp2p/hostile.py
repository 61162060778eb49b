"""A hostile GossipSub peer, for the tests and the chaos bench.

It is a real py-libp2p host (Noise, Yamux) that dials a victim, opens a raw ``/meshsub/1.x``
stream and writes hand-made varint-framed RPCs, bypassing its own pubsub entirely. Each attack
is an ``Attack`` (the bytes, and whether to half-close afterwards) built by a function of this
module; ``send()`` delivers one from trio, ``send_async()`` from asyncio (a worker thread runs
its own ``trio.run``), and the ``send_*`` shortcuts cover the cases the chaos bench uses::

    victim = host.listen_addrs[0]                      # .../p2p/<peer id>
    topic = f"{prefix}/chain"                          # the wire name of a topic
    await hostile.send_garbage_rpc(victim)             # (a) a frame that is not an RPC
    await hostile.send_bad_key(victim, topic)          # (b) a key that does not parse
    await hostile.send_bad_signature(victim, topic)    # (c) a forged signature
    await hostile.send_truncated(victim)               # (d) a frame cut short, then FIN
    await hostile.send_oversized(victim)               # (e) a length over the RPC limit
    await hostile.send_wrong_topic(victim, topic + "x")  # (f) valid, on a topic not subscribed

Every shortcut takes ``protocol=`` (``MESHSUB_V11`` by default, or ``MESHSUB_V10``), ``seed=``
(the attacker's 32-byte identity seed; random by default; ``peer_id_of_seed`` names it),
``linger=`` (seconds to keep the connection open after writing) and ``handlers=`` (streams the
attacker serves meanwhile, e.g. the victim's handshake), and returns the attacker's peer id. ``build(kind, topic)``
makes any attack of ``KINDS`` by name.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.identity_utils import create_identity_from_seed
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX
from libp2p.utils import encode_varint_prefixed
from libp2p.utils.varint import encode_uvarint

from seedswarm.gossip.libp2p.tuning import PUBSUB_RPC_OVERHEAD, muxer_options, security_options

MESHSUB_V10: Final = "/meshsub/1.0.0"
MESHSUB_V11: Final = "/meshsub/1.1.0"
#: A default victim's pubsub RPC limit: ``max_message_bytes`` (1 MiB) + ``PUBSUB_RPC_OVERHEAD``.
DEFAULT_RPC_LIMIT: Final = (1 << 20) + PUBSUB_RPC_OVERHEAD


@dataclass(frozen=True)
class Attack:
    """Raw bytes for a pubsub stream; ``half_close``: send FIN after them."""

    frames: tuple[bytes, ...]
    half_close: bool = False


def _rpc(*msgs: rpc_pb2.Message, sender_record: bytes = b"") -> bytes:
    rpc = rpc_pb2.RPC(publish=list(msgs))
    if sender_record:
        rpc.senderRecord = sender_record
    return bytes(encode_varint_prefixed(rpc.SerializeToString()))


def signed_message(kp: KeyPair, topic: str, data: bytes, from_id: bytes | None = None) -> rpc_pb2.Message:
    """A correctly signed pubsub message (what ``Pubsub.publish`` builds)."""
    msg = rpc_pb2.Message(
        data=data, topicIDs=[topic], seqno=os.urandom(8),
        from_id=from_id if from_id is not None else ID.from_pubkey(kp.public_key).to_bytes(),
    )
    msg.signature = kp.private_key.sign(PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString())
    msg.key = kp.public_key.serialize()
    return msg


def _forged(kp: KeyPair, topic: str, data: bytes) -> rpc_pb2.Message:
    msg = signed_message(kp, topic, data)
    msg.signature = bytes(64)
    return msg


def valid(kp: KeyPair, topic: str, data: bytes = b"valid via a raw stream") -> Attack:
    """A correctly signed message: checks the framing (the victim must deliver it)."""
    return Attack((_rpc(signed_message(kp, topic, data)),))


def garbage_rpc() -> Attack:
    """(a) A well-framed body that is not an RPC protobuf (stock libp2p: the Swarm dies)."""
    return Attack((bytes(encode_varint_prefixed(b"\xff" * 16)),))


def bad_key(topic: str) -> Attack:
    """(b) An author id that embeds no key (sha256 multihash) and a ``key`` that does not
    parse (stock libp2p: push_msg raises and Pubsub dies)."""
    sha_pid = b"\x12\x20" + hashlib.sha256(b"no key in here").digest()
    msg = rpc_pb2.Message(data=b"evil", topicIDs=[topic], seqno=os.urandom(8), from_id=sha_pid,
                          signature=b"\x01" * 64, key=b"\xde\xad\xbe\xef not a PublicKey")
    return Attack((_rpc(msg),))


def bad_signature(kp: KeyPair, topic: str, count: int = 1) -> Attack:
    """(c) The right key with a forged signature, ``count`` times (one RPC each)."""
    return Attack(tuple(_rpc(_forged(kp, topic, b"forged %d" % i)) for i in range(count)))


def truncated() -> Attack:
    """(d) A header announcing 100 bytes, 50 of them, then FIN."""
    return Attack((encode_uvarint(100) + b"\x00" * 50,), half_close=True)


def oversized(limit: int = DEFAULT_RPC_LIMIT) -> Attack:
    """(e) A header over the victim's RPC limit (the body is never sent in full)."""
    return Attack((encode_uvarint(limit + 1) + b"\x00" * 1024,))


def wrong_topic(kp: KeyPair, topic: str) -> Attack:
    """(f) A valid, signed message on a topic the victim does not subscribe to."""
    return Attack((_rpc(signed_message(kp, topic, b"valid, wrong topic")),))


def stalled() -> Attack:
    """A header announcing 100 bytes, 10 of them, then nothing (no FIN): the victim must give
    up on the frame by itself (send with a ``linger`` over its deadline)."""
    return Attack((encode_uvarint(100) + b"\x00" * 10,))


def key_mismatch(kp: KeyPair, topic: str, claimed: KeyPair) -> Attack:
    """Signed by ``kp``, claiming ``claimed`` as the author."""
    other = ID.from_pubkey(claimed.public_key).to_bytes()
    return Attack((_rpc(signed_message(kp, topic, b"impersonation", from_id=other)),))


def no_signature(kp: KeyPair, topic: str) -> Attack:
    msg = signed_message(kp, topic, b"unsigned")
    msg.ClearField("signature")
    return Attack((_rpc(msg),))


def bad_varint() -> Attack:
    """Eleven continuation bytes: not a 64-bit varint."""
    return Attack((b"\xff" * 11,))


def bad_peer_record(kp: KeyPair, topic: str) -> Attack:
    """A garbage signed peer record next to a valid publish (the whole RPC is dropped)."""
    return Attack((_rpc(signed_message(kp, topic, b"with a bad record"), sender_record=b"\x01garbage"),))


def bad_then_valid(kp: KeyPair, topic: str) -> Attack:
    """A message-level drop keeps the stream: the valid message after it arrives."""
    return Attack((_rpc(_forged(kp, topic, b"forged")), _rpc(signed_message(kp, topic, b"valid after bad"))))


def flood_then_valid(kp: KeyPair, topic: str, count: int = 15) -> Attack:
    """``count`` forged messages, then a valid one: graylisted after about ten."""
    return Attack(bad_signature(kp, topic, count).frames + (_rpc(signed_message(kp, topic, b"valid after flood")),))


def control_junk(topic: str, topics: int = 4) -> Attack:
    """Every control kind with random ids, ``topics`` made-up topics and junk PX records."""
    made_up = [topic, "", "\x00" * 50] + [os.urandom(8).hex() for _ in range(topics)]
    c = rpc_pb2.ControlMessage(
        ihave=[rpc_pb2.ControlIHave(topicID=t, messageIDs=[os.urandom(n) for n in (0, 1, 40, 300)]) for t in made_up],
        iwant=[rpc_pb2.ControlIWant(messageIDs=[os.urandom(n) for n in (0, 3, 64)] + [b"zz"])],
        graft=[rpc_pb2.ControlGraft(topicID=t) for t in made_up],
        prune=[rpc_pb2.ControlPrune(topicID=t, backoff=2**64 - 1,
                                    peers=[rpc_pb2.PeerInfo(peerID=os.urandom(7), signedPeerRecord=os.urandom(20))])
               for t in made_up],
        idontwant=[rpc_pb2.ControlIDontWant(messageIDs=[os.urandom(n) for n in (0, 5, 2000)])],
    )
    return Attack((bytes(encode_varint_prefixed(rpc_pb2.RPC(control=c).SerializeToString())),))


def subscription_junk(topic: str, count: int = 200, per_rpc: int = 50, too_many: int = 100) -> Attack:
    """``count`` subscriptions to made-up topics, ``per_rpc`` per RPC, then one RPC of
    ``too_many`` (over the victim's per-RPC limit)."""
    subs = [rpc_pb2.RPC.SubOpts(subscribe=True, topicid=os.urandom(8).hex()) for _ in range(count)]
    frames = [subs[i:i + per_rpc] for i in range(0, count, per_rpc)]
    frames.append([rpc_pb2.RPC.SubOpts(subscribe=True, topicid=f"{topic}-{i}") for i in range(too_many)])
    return Attack(tuple(bytes(encode_varint_prefixed(rpc_pb2.RPC(subscriptions=s).SerializeToString()))
                        for s in frames))


def empty_rpcs() -> Attack:
    """Zero-length frames and an empty RPC: harmless, nothing to count."""
    return Attack((b"\x00" * 10, bytes(encode_varint_prefixed(b""))))


#: Attacks ``build()`` makes by name.
KINDS: Final = (
    "valid", "garbage-rpc", "bad-key", "bad-signature", "key-mismatch", "no-signature", "truncated-rpc",
    "oversized-rpc", "stalled-rpc", "bad-varint", "bad-peer-record", "wrong-topic", "bad-then-valid",
    "flood-then-valid", "control-junk", "subscription-junk", "empty-rpcs",
)


def build(kind: str, topic: str, seed: bytes, limit: int = DEFAULT_RPC_LIMIT) -> Attack:
    """The attack ``kind`` (one of KINDS) on ``topic``, signed with the identity of ``seed``."""
    kp = create_identity_from_seed(seed)
    makers = {
        "valid": lambda: valid(kp, topic),
        "garbage-rpc": garbage_rpc,
        "bad-key": lambda: bad_key(topic),
        "bad-signature": lambda: bad_signature(kp, topic),
        "key-mismatch": lambda: key_mismatch(kp, topic, create_identity_from_seed(hashlib.sha256(seed).digest())),
        "no-signature": lambda: no_signature(kp, topic),
        "truncated-rpc": truncated,
        "oversized-rpc": lambda: oversized(limit),
        "stalled-rpc": stalled,
        "bad-varint": bad_varint,
        "bad-peer-record": lambda: bad_peer_record(kp, topic),
        "wrong-topic": lambda: wrong_topic(kp, topic + "-not-subscribed"),
        "bad-then-valid": lambda: bad_then_valid(kp, topic),
        "flood-then-valid": lambda: flood_then_valid(kp, topic),
        "control-junk": lambda: control_junk(topic),
        "subscription-junk": lambda: subscription_junk(topic),
        "empty-rpcs": empty_rpcs,
    }
    if kind not in makers:
        raise ValueError(f"unknown attack {kind!r}; one of {', '.join(KINDS)}")
    return makers[kind]()


def peer_id_of_seed(seed: bytes) -> str:
    return str(ID.from_pubkey(create_identity_from_seed(seed).public_key))


#: ``handlers`` of ``send()``: protocol id -> trio stream handler of the attacker's host.
StreamHandlers = Mapping[str, Callable[[INetStream], Awaitable[None]]]


async def send(victim: str, attack: Attack, *, protocol: str = MESHSUB_V11, seed: bytes | None = None,
               linger: float = 1.0, timeout: float = 10.0, release: threading.Event | None = None,
               handlers: StreamHandlers | None = None) -> str:
    """trio: dial ``victim`` (a full multiaddr with /p2p/), open a raw ``protocol`` stream,
    write the attack, keep the connection ``linger`` seconds (or until ``release`` is set,
    whichever comes first), close. Returns the attacker's peer id.

    ``handlers`` are served by the attacker's host meanwhile: a victim that disconnects peers
    failing its handshake (a seedswarm node asks every new peer for its hello) would otherwise
    cut the connection while the attack is being read.
    """
    kp = create_identity_from_seed(seed if seed is not None else os.urandom(32))
    host = new_host(key_pair=kp, sec_opt=security_options(kp), muxer_opt=muxer_options(),
                    connection_config=ConnectionConfig(max_connections_per_peer=1),
                    enable_mDNS=False, enable_upnp=False)
    for pid, handler in (handlers or {}).items():
        host.set_stream_handler(TProtocol(pid), handler)
    info = info_from_p2p_addr(multiaddr.Multiaddr(victim))
    async with host.run([]):
        with trio.fail_after(timeout):
            await host.connect(info)
            stream = await host.new_stream(info.peer_id, [TProtocol(protocol)])
            for f in attack.frames:
                await stream.write(f)
            if attack.half_close:
                await stream.close()  # FIN: the victim's next read hits EOF mid-frame
        with trio.move_on_after(linger):
            while release is None or not release.is_set():
                await trio.sleep(0.02)
        await host.close()
    return str(host.get_id())


async def send_async(victim: str, attack: Attack, *, protocol: str = MESHSUB_V11, seed: bytes | None = None,
                     linger: float = 1.0, timeout: float = 10.0, release: threading.Event | None = None,
                     handlers: StreamHandlers | None = None) -> str:
    """asyncio: ``send()`` in a worker thread with its own trio run."""
    run = functools.partial(send, victim, attack, protocol=protocol, seed=seed, linger=linger,
                            timeout=timeout, release=release, handlers=handlers)
    return await asyncio.to_thread(trio.run, run)


def _seed(seed: bytes | None) -> bytes:
    return seed if seed is not None else os.urandom(32)


async def send_garbage_rpc(victim: str, *, protocol: str = MESHSUB_V11, seed: bytes | None = None,
                           linger: float = 1.0, handlers: StreamHandlers | None = None) -> str:
    """(a) One frame that is not an RPC protobuf."""
    return await send_async(victim, garbage_rpc(), protocol=protocol, seed=seed, linger=linger, handlers=handlers)


async def send_bad_key(victim: str, topic: str, *, protocol: str = MESHSUB_V11, seed: bytes | None = None,
                       linger: float = 1.0, handlers: StreamHandlers | None = None) -> str:
    """(b) One message whose key does not parse, on ``topic`` (the victim must subscribe to it)."""
    return await send_async(victim, bad_key(topic), protocol=protocol, seed=seed, linger=linger, handlers=handlers)


async def send_bad_signature(victim: str, topic: str, *, count: int = 1, protocol: str = MESHSUB_V11,
                             seed: bytes | None = None, linger: float = 1.0,
                             handlers: StreamHandlers | None = None) -> str:
    """(c) ``count`` messages with forged signatures on ``topic``."""
    seed = _seed(seed)
    attack = bad_signature(create_identity_from_seed(seed), topic, count)
    return await send_async(victim, attack, protocol=protocol, seed=seed, linger=linger, handlers=handlers)


async def send_truncated(victim: str, *, protocol: str = MESHSUB_V11, seed: bytes | None = None,
                         linger: float = 1.0, handlers: StreamHandlers | None = None) -> str:
    """(d) A frame cut short by FIN."""
    return await send_async(victim, truncated(), protocol=protocol, seed=seed, linger=linger, handlers=handlers)


async def send_oversized(victim: str, limit: int = DEFAULT_RPC_LIMIT, *, protocol: str = MESHSUB_V11,
                         seed: bytes | None = None, linger: float = 1.0,
                         handlers: StreamHandlers | None = None) -> str:
    """(e) A frame header over ``limit`` (the victim's ``max_message_bytes + 64 KiB``)."""
    return await send_async(victim, oversized(limit), protocol=protocol, seed=seed, linger=linger, handlers=handlers)


async def send_wrong_topic(victim: str, topic: str, *, protocol: str = MESHSUB_V11, seed: bytes | None = None,
                           linger: float = 1.0, handlers: StreamHandlers | None = None) -> str:
    """(f) A valid signed message on ``topic``, which the victim should not subscribe to."""
    seed = _seed(seed)
    attack = wrong_topic(create_identity_from_seed(seed), topic)
    return await send_async(victim, attack, protocol=protocol, seed=seed, linger=linger, handlers=handlers)
