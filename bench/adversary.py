"""Hostile peers for ``seedswarm bench chaos`` and ``seedswarm bench fuzz``.

Everything here talks to real daemons over real libp2p connections, from the outside: the
daemon's public wire surface (its direct-stream protocols and its gossip topic) is the only
thing it touches. It is the one place besides the adapter that imports py-libp2p, on purpose:
the adapter exists to make hostile input impossible to send, and this module must send it.

* :class:`RawPeer` is one hostile identity: a bare py-libp2p host (Noise, Yamux) running in
  the caller's ``trio.run``. It answers the daemon's ``hello`` (a peer that does not is
  disconnected at once), sends raw direct-stream frames (well formed or not), holds streams
  open, and writes GossipSub RPCs by hand on its own ``/meshsub/1.1.0`` stream.
* :func:`send_raw_pubsub` is the one function that writes hand-made pubsub frames. It is the
  swap point for ``seedswarm.gossip.libp2p.hostile`` once that module is in main.
* :class:`Mutator` turns valid wire messages into hostile ones (bit flips, truncations,
  extensions, msgpack type confusion, field swaps, length lies, header lies, splices).
* :class:`Adversary` is the chaos bench's adversary: a seeded stream of hostile actions of
  every kind in :data:`KINDS` against the nodes the bench says are online.

Daemon defences this module has to live with (and which it therefore measures): a peer whose
inputs are rejected 30 times is banned (so identities rotate well before that), and a GossipSub
forwarder is graylisted after about ten messages its validator rejects (so validator-rejected
gossip goes out in small batches from throwaway identities).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import Ed25519PublicKey
from libp2p.crypto.x25519 import create_new_key_pair as _new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.identity_utils import create_identity_from_seed
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.utils import encode_varint_prefixed
from libp2p.utils.varint import encode_uvarint

from seedswarm import PROTOCOL_VERSION
from seedswarm.crypto.keys import Identity
from seedswarm.gossip.wire import (
    MAX_U,
    ChainRequest,
    CheckpointRequest,
    Contribution,
    ContributionsRequest,
    FraudProof,
    Join,
    Leave,
    Message,
    Record,
)
from seedswarm.node.daemon.daemon import (
    MAX_MESSAGE_BYTES,
    PROTO_CHAIN,
    PROTO_CKPT,
    PROTO_HELLO,
    PROTO_INPUTS,
    PROTO_MSG,
    TOPIC,
    encode_hello,
    protocol_prefix,
)

log = logging.getLogger("seedswarm.bench.adversary")

#: Every direct-stream protocol a daemon serves (``{protocol_prefix}/{name}``).
PROTOCOLS: tuple[str, ...] = (PROTO_MSG, PROTO_INPUTS, PROTO_CHAIN, PROTO_CKPT, PROTO_HELLO)
#: The GossipSub protocol the raw pubsub frames are written on.
MESHSUB = "/meshsub/1.1.0"
OTHER_RUN = b"\x42" * 32
ZERO32 = b"\x00" * 32
FRAME_HEADER_BYTES = 4  # the daemon's direct-stream framing: 4-byte big-endian length
STATUS_NAMES = {0: "answered", 1: "no-response", 2: "too-large", 3: "error", 4: "busy"}
#: 0xC1 is the one byte msgpack never uses: garbage that starts with it is malformed every time
#: (plain random bytes sometimes parse as a header with a wrong version: wrong-run instead).
GARBAGE = b"\xc1"
#: The daemon bans a peer after this many rejected inputs; identities rotate well before.
STRIKES_TO_BAN = 30
ROTATE_AFTER_STRIKES = 20
#: GossipSub graylists a forwarder after about ten validator rejections (score -10).
GRAYLIST_AFTER = 10
#: Raw pubsub cases that stop the libp2p host of a stock py-libp2p 0.8.1 node (LIBP2P-NOTES.md,
#: "Hostile input inside py-libp2p itself"): the guard of the adapter package fixes them.
FATAL_ON_STOCK_LIBP2P = ("garbage-rpc", "bad-key")


def _quiet_libp2p() -> None:
    for name in ("libp2p", "libp2p.pubsub", "libp2p.kad_dht", "libp2p.transport.tcp.tcp",
                 "libp2p.network.swarm", "libp2p.host.basic_host", "libp2p.tools.anyio_service"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def peer_id_of(public_key: bytes) -> str:
    """The libp2p peer id of a raw Ed25519 public key (a chain identity)."""
    return str(ID.from_pubkey(Ed25519PublicKey.from_bytes(public_key)).to_base58())


def topic_of(run_id: bytes) -> str:
    """The run's gossip topic as GossipSub names it (the adapter prefixes topic names)."""
    return f"{protocol_prefix(run_id)}/{TOPIC}"


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(FRAME_HEADER_BYTES, "big") + payload


@dataclass(frozen=True)
class Target:
    """A daemon to attack: its name in the bench, full multiaddr (with /p2p/) and keys."""

    name: str
    addr: str
    public_key: bytes

    @property
    def peer_id(self) -> str:
        return peer_id_of(self.public_key)


class Tally:
    """Thread-safe counters: hostile messages sent by kind, and what came back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()

    def add(self, kind: str, n: int = 1, outcome: str | None = None) -> None:
        with self._lock:
            self.sent[kind] += n
            if outcome is not None:
                self.outcomes[f"{kind}:{outcome}"] += n

    def outcome(self, kind: str, outcome: str, n: int = 1) -> None:
        with self._lock:
            self.outcomes[f"{kind}:{outcome}"] += n

    def snapshot(self) -> tuple[dict[str, int], dict[str, int]]:
        with self._lock:
            return dict(self.sent), dict(self.outcomes)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.sent.values())


# ---------------------------------------------------------------------------------------------
# raw py-libp2p peer


async def _read_exact(stream: Any, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = await stream.read(n - len(buf))
        except Exception:  # StreamEOF, reset: the stream ended
            chunk = b""
        if not chunk:
            raise EOFError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def _dispose(stream: Any, graceful: bool = True) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1.0), contextlib.suppress(Exception):
        await (stream.close() if graceful else stream.reset())


class RawPeer:
    """One hostile identity: a bare py-libp2p host run inside the caller's trio run.

    Use ``async with peer.running():``. The libp2p key and the chain identity are one Ed25519
    key (as in the daemon), so ``peer.identity`` signs wire messages as this peer.
    """

    def __init__(self, run_id: bytes, seed: bytes | None = None, max_response: int = MAX_MESSAGE_BYTES + 1) -> None:
        self.seed = seed if seed is not None else os.urandom(32)
        self.identity = Identity.from_seed(self.seed)
        self.key_pair = create_identity_from_seed(self.seed)
        self.id = ID.from_pubkey(self.key_pair.public_key)
        self.run_id = run_id
        self.prefix = protocol_prefix(run_id)
        self.topic = topic_of(run_id)
        self.max_response = max_response
        kp = self.key_pair
        self.host: Any = new_host(
            key_pair=kp,
            sec_opt={TProtocol(NOISE_PROTOCOL_ID): NoiseTransport(kp, noise_privkey=_new_x25519_key_pair().private_key)},
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
            connection_config=ConnectionConfig(max_connections_per_peer=1, dial_timeout=5.0),
            enable_mDNS=False, enable_upnp=False,
        )
        self.host.set_stream_handler(TProtocol(f"{self.prefix}/{PROTO_HELLO}"), self._serve_hello)
        self.hello_run = run_id  # what our hello answers claim (OTHER_RUN: a peer of another run)

    @property
    def public(self) -> bytes:
        return self.identity.public

    async def _serve_hello(self, stream: Any) -> None:
        """Answer the daemon's hello just well enough not to be disconnected."""
        try:
            with trio.fail_after(5):
                n = int.from_bytes(await _read_exact(stream, FRAME_HEADER_BYTES), "big")
                if n <= 4096:
                    await _read_exact(stream, n)
                await stream.write(frame(b"\x00" + encode_hello(self.hello_run, [], {}, 0)))
        except Exception:
            pass
        finally:
            await _dispose(stream)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[RawPeer]:
        async with self.host.run([]):
            try:
                yield self
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(2.0), contextlib.suppress(Exception):
                    await self.host.close()

    async def connect(self, target: Target, timeout: float = 6.0) -> None:
        info = info_from_p2p_addr(multiaddr.Multiaddr(target.addr))
        with trio.fail_after(timeout):
            await self.host.connect(info)

    async def open(self, target: Target, protocol: str, timeout: float = 6.0) -> Any:
        """A new stream to ``target`` on ``protocol`` (a daemon protocol name or a full id)."""
        pid = protocol if protocol.startswith("/meshsub") else f"{self.prefix}/{protocol}"
        with trio.fail_after(timeout):
            await self.connect(target, timeout)
            return await self.host.new_stream(ID.from_base58(target.peer_id), [TProtocol(pid)])

    async def request(self, target: Target, protocol: str, payload: bytes = b"", *, raw: bytes | None = None,
                      timeout: float = 12.0, half_close: bool = True) -> tuple[str, bytes]:
        """Write one frame (or the ``raw`` bytes) on a new stream; read the answer frame.

        Returns (outcome, payload): outcome is the daemon's status (answered, no-response,
        too-large, error, busy) or what happened to the stream (timeout, reset, refused, ...).
        """
        data = raw if raw is not None else frame(payload)
        try:
            with trio.fail_after(timeout):
                try:
                    stream = await self.open(target, protocol, timeout)
                except trio.TooSlowError:
                    raise
                except Exception as e:
                    text = str(e)
                    return ("refused" if "protocol" in text.lower() or "negotiat" in text.lower() else "unreachable"), b""
                answered = False
                try:
                    async with trio.open_nursery() as nursery:
                        async def writer() -> None:
                            with contextlib.suppress(Exception):
                                await stream.write(data)
                                if half_close:
                                    await stream.close_write()

                        nursery.start_soon(writer)
                        try:
                            n = int.from_bytes(await _read_exact(stream, FRAME_HEADER_BYTES), "big")
                            if n == 0 or n > self.max_response:
                                return "bad-frame", b""
                            body = await _read_exact(stream, n)
                            answered = True
                        except EOFError:
                            return "closed", b""
                        finally:
                            if not answered:
                                await _dispose(stream, graceful=False)
                            nursery.cancel_scope.cancel()
                finally:
                    await _dispose(stream, graceful=answered)
                return STATUS_NAMES.get(body[0], f"status-{body[0]}"), body[1:]
        except trio.TooSlowError:
            return "timeout", b""
        except Exception as e:  # noqa: BLE001 - a hostile client reports, never raises
            return f"error-{type(e).__name__}", b""

    # -- gossip, by hand -------------------------------------------------------------------

    def pubsub_message(self, data: bytes, *, signature: bytes | None = None, from_id: bytes | None = None,
                       topic: str | None = None) -> Any:
        """A GossipSub message carrying ``data``, correctly signed unless ``signature`` is given."""
        kp = self.key_pair
        msg = rpc_pb2.Message(data=data, topicIDs=[topic or self.topic], seqno=os.urandom(8),
                              from_id=from_id if from_id is not None else self.id.to_bytes())
        msg.signature = signature if signature is not None else kp.private_key.sign(
            PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString())
        msg.key = kp.public_key.serialize()
        return msg

    def publish_frame(self, datas: Sequence[bytes], **kw: Any) -> bytes:
        """One varint-framed RPC publishing every item of ``datas`` (each its own message)."""
        rpc = rpc_pb2.RPC(publish=[self.pubsub_message(d, **kw) for d in datas])
        return bytes(encode_varint_prefixed(rpc.SerializeToString()))

    def rpc_frame(self, msgs: Sequence[Any]) -> bytes:
        """One varint-framed RPC publishing ready-made pubsub messages."""
        return bytes(encode_varint_prefixed(rpc_pb2.RPC(publish=list(msgs)).SerializeToString()))

    def envelope_mutant(self, data: bytes, rng: random.Random) -> tuple[str, Any]:
        """A valid signed pubsub message carrying ``data``, then one envelope field broken.

        Never a garbage ``key`` next to a ``from_id`` that embeds no key: that one stops a
        stock py-libp2p host (raw case ``bad-key``), which the fuzzer sends last.
        """
        op = rng.choice(("sig-flip", "sig-random", "sig-truncated", "data-after-signing", "seqno-after-signing",
                         "other-author", "no-signature", "topic-unsubscribed"))
        # a real signature only where the mutation starts from one (signing is the client's cost)
        real = op in ("sig-flip", "data-after-signing", "seqno-after-signing", "topic-unsubscribed")
        m = self.pubsub_message(data, signature=None if real else b"\x00" * 64)
        if op == "sig-flip":
            b = bytearray(m.signature)
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            m.signature = bytes(b)
        elif op == "sig-random":
            m.signature = os.urandom(64)
        elif op == "sig-truncated":
            m.signature = m.signature[: rng.randrange(64)]
        elif op == "data-after-signing":
            m.data = data + b"\x00" if not data else data[:-1] + bytes([data[-1] ^ 1])
        elif op == "seqno-after-signing":
            m.seqno = os.urandom(8)
        elif op == "other-author":
            m.from_id = ID.from_pubkey(create_identity_from_seed(os.urandom(32)).public_key).to_bytes()
        elif op == "no-signature":
            m.ClearField("signature")
        else:
            del m.topicIDs[:]
            m.topicIDs.append(os.urandom(6).hex())
        return op, m

    def subscribe_frame(self) -> bytes:
        rpc = rpc_pb2.RPC(subscriptions=[rpc_pb2.RPC.SubOpts(subscribe=True, topicid=self.topic)])
        return bytes(encode_varint_prefixed(rpc.SerializeToString()))


async def send_raw_pubsub(peer: RawPeer, target: Target, frames: Sequence[bytes], *, half_close: bool = False,
                          linger: float = 0.3, timeout: float = 10.0) -> str:
    """Open a GossipSub stream from ``peer`` to ``target`` and write ``frames`` as they are.

    The one place that writes hand-made pubsub bytes: swap it for
    ``seedswarm.gossip.libp2p.hostile`` once that module is in main. Returns an outcome.
    """
    try:
        with trio.fail_after(timeout):
            stream = await peer.open(target, MESHSUB, timeout)
            try:
                for f in frames:
                    await stream.write(f)
                if half_close:
                    await stream.close_write()
                await trio.sleep(linger)
            finally:
                await _dispose(stream, graceful=False)
        return "written"
    except trio.TooSlowError:
        return "timeout"
    except Exception as e:  # noqa: BLE001
        return f"error-{type(e).__name__}"


def raw_pubsub_frames(case: str, peer: RawPeer, data: bytes, rpc_limit: int = MAX_MESSAGE_BYTES + 64 * 1024) -> tuple[list[bytes], bool]:
    """Hand-made GossipSub frames for one hostile ``case`` (after /tmp/p2pguard/hostile.py).

    Returns (frames, half_close). ``data`` is the payload the pubsub messages carry.
    """
    def rpc(*msgs: Any, **kw: Any) -> bytes:
        return bytes(encode_varint_prefixed(rpc_pb2.RPC(publish=list(msgs), **kw).SerializeToString()))

    topic = peer.topic
    if case == "garbage-rpc":  # a varint frame whose body is not an RPC protobuf
        return [bytes(encode_varint_prefixed(b"\xff" * 16 + os.urandom(16)))], False
    if case == "bad-key":  # from_id embeds no key (sha256 multihash) and `key` is garbage
        sha_pid = b"\x12\x20" + hashlib.sha256(os.urandom(8)).digest()
        m = rpc_pb2.Message(data=data, topicIDs=[topic], seqno=os.urandom(8), from_id=sha_pid,
                            signature=b"\x01" * 64, key=b"\xde\xad\xbe\xef not a PublicKey")
        return [rpc(m)], False
    if case == "bad-signature":  # right key, wrong signature bytes
        return [rpc(peer.pubsub_message(data, signature=bytes(64)))], False
    if case == "key-mismatch":  # signed by us, claims another author
        other = ID.from_pubkey(create_identity_from_seed(os.urandom(32)).public_key).to_bytes()
        return [rpc(peer.pubsub_message(data, from_id=other))], False
    if case == "no-signature":
        m = peer.pubsub_message(data)
        m.ClearField("signature")
        return [rpc(m)], False
    if case == "truncated-rpc":  # header says 100 bytes, 50 arrive, then FIN
        return [bytes(encode_uvarint(100)) + b"\x00" * 50], True
    if case == "oversized-rpc":  # header over the victim's RPC limit (body never sent in full)
        return [bytes(encode_uvarint(rpc_limit + 1)) + b"\x00" * 1024], False
    if case == "bad-varint":  # 11 continuation bytes: not a 64-bit varint
        return [b"\xff" * 11], False
    if case == "empty-rpcs":
        return [b"\x00" * 10, bytes(encode_varint_prefixed(b""))], False
    if case == "control-junk":  # every control kind, random ids and topics
        c = rpc_pb2.ControlMessage(
            ihave=[rpc_pb2.ControlIHave(topicID=t, messageIDs=[os.urandom(n) for n in (0, 1, 40, 300)])
                   for t in (topic, "", "\x00" * 50)],
            iwant=[rpc_pb2.ControlIWant(messageIDs=[os.urandom(n) for n in (0, 3, 64)])],
            graft=[rpc_pb2.ControlGraft(topicID=t) for t in (topic, "", "nope")],
            prune=[rpc_pb2.ControlPrune(topicID=t, backoff=b) for t, b in ((topic, 2**64 - 1), ("", 0))],
        )
        return [bytes(encode_varint_prefixed(rpc_pb2.RPC(control=c).SerializeToString()))], False
    if case == "subscription-junk":
        subs = [rpc_pb2.RPC.SubOpts(subscribe=bool(i % 2), topicid=os.urandom(8).hex()) for i in range(200)]
        return [bytes(encode_varint_prefixed(rpc_pb2.RPC(subscriptions=subs).SerializeToString()))], False
    raise ValueError(f"unknown raw pubsub case {case!r}")


RAW_PUBSUB_CASES = ("garbage-rpc", "bad-key", "bad-signature", "key-mismatch", "no-signature", "truncated-rpc",
                    "oversized-rpc", "bad-varint", "empty-rpcs", "control-junk", "subscription-junk")


# ---------------------------------------------------------------------------------------------
# mutations of valid messages


_CONFUSERS: tuple[Any, ...] = (
    0, 1, -1, 2**64 - 1, -(2**63), 2**63, 1.5, float("nan"), "", "x" * 40, b"", b"\x00" * 31, b"\x00" * 33,
    b"\xff" * 64, [], [b"\x00" * 32] * 3, {}, {"a": 1}, None, True, False, [[[[[]]]]],
)


class Mutator:
    """Seeded mutations of encoded messages. Every result differs from its input."""

    OPS = ("flip", "set-byte", "truncate", "extend", "insert", "delete", "type-confusion", "field-swap",
           "field-drop", "field-dup", "length-lie", "header-lie", "run-swap", "splice", "int-extreme")

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def random_bytes(self, n: int) -> bytes:
        return self.rng.getrandbits(8 * n).to_bytes(n, "big") if n > 0 else b""

    def mutate(self, data: bytes, other: bytes | None = None) -> tuple[str, bytes]:
        for _ in range(8):
            op = self.rng.choice(self.OPS)
            out = self._apply(op, data, other)
            if out is not None and out != data:
                return op, out
        return "extend", data + self.random_bytes(1 + self.rng.randrange(16))

    def _fields(self, data: bytes) -> list[Any] | None:
        try:
            v = msgpack.unpackb(data, raw=True, strict_map_key=False)
        except Exception:
            return None
        return v if isinstance(v, list) and v else None

    def _apply(self, op: str, data: bytes, other: bytes | None) -> bytes | None:
        r, n = self.rng, len(data)
        if op == "flip" and n:
            b = bytearray(data)
            for _ in range(1 + r.randrange(8)):
                i = r.randrange(n)
                b[i] ^= 1 << r.randrange(8)
            return bytes(b)
        if op == "set-byte" and n:
            b = bytearray(data)
            for _ in range(1 + r.randrange(4)):
                b[r.randrange(n)] = r.choice((0x00, 0xFF, 0x7F, 0x80, 0xC0, 0xC1, 0xC4, 0xDC, 0xDD, 0xDE, 0xDF,
                                              r.randrange(256)))
            return bytes(b)
        if op == "truncate" and n > 1:
            return data[: r.randrange(n)]
        if op == "extend":
            return data + self.random_bytes(1 + r.randrange(64))
        if op == "insert":
            i = r.randrange(n + 1)
            return data[:i] + self.random_bytes(1 + r.randrange(16)) + data[i:]
        if op == "delete" and n > 1:
            i = r.randrange(n)
            return data[:i] + data[i + 1 + r.randrange(min(16, n - i)):]
        if op == "splice" and other:
            return data[: r.randrange(n + 1)] + other[r.randrange(len(other) + 1):]
        if op == "header-lie" and n > 3:
            b = bytearray(data)
            b[1 + r.randrange(2)] = r.choice((0x00, 0x02, 0x0F, 0x63, 0x7F, 0xCC, 0xFF))
            return bytes(b)
        if op == "length-lie":
            b = bytearray(data)
            spots = [i for i, x in enumerate(b) if x in (0xC4, 0xC5, 0xC6, 0xDC, 0xDD) or 0x90 <= x <= 0x9F]
            if not spots:
                return None
            i = r.choice(spots)
            x = b[i]
            if 0x90 <= x <= 0x9F:
                b[i] = 0x90 | r.randrange(16)
            elif i + 1 < n:
                b[i + 1] = r.choice((0x00, 0xFF, (b[i + 1] + 1) & 0xFF, (b[i + 1] - 1) & 0xFF))
            return bytes(b)
        fields = self._fields(data)
        if fields is None:
            return None
        if op == "type-confusion":
            fields[r.randrange(len(fields))] = r.choice(_CONFUSERS)
        elif op == "field-swap" and len(fields) > 1:
            i, j = r.sample(range(len(fields)), 2)
            fields[i], fields[j] = fields[j], fields[i]
        elif op == "field-drop":
            del fields[r.randrange(len(fields))]
        elif op == "field-dup":
            i = r.randrange(len(fields))
            fields.insert(i, fields[i])
        elif op == "run-swap" and len(fields) > 2:
            fields[2] = OTHER_RUN
        elif op == "int-extreme":
            ints = [i for i, v in enumerate(fields) if isinstance(v, int) and not isinstance(v, bool)]
            if not ints:
                return None
            fields[r.choice(ints)] = r.choice((0, MAX_U, 2**64 - 1, 2**32, 2**31 - 1, 1 << 40))
        else:
            return None
        try:
            return bytes(msgpack.packb(fields, use_bin_type=False))
        except Exception:
            return None


def with_version(data: bytes, version: int) -> bytes:
    """The same message under another protocol version (msgpack fixint at byte 1)."""
    assert 0 <= version < 128 and data[1] == PROTOCOL_VERSION
    return data[:1] + bytes([version]) + data[2:]


# ---------------------------------------------------------------------------------------------
# the chaos adversary


@dataclass
class View:
    """What the bench tells the adversary about the swarm (replaced wholesale, never mutated)."""

    online: list[Target] = field(default_factory=list)
    status: dict[str, dict[str, Any]] = field(default_factory=dict)  # target name -> status.json


#: kind -> (weight in the seeded schedule, what it is)
KINDS: dict[str, tuple[float, str]] = {
    "garbage-frame": (6, "0xC1 + random bytes on every direct protocol"),
    "truncated-frame": (3, "frame header promises more than arrives, then FIN"),
    "oversized-frame": (2, "frame header over the 1 MiB limit"),
    "truncated-message": (3, "a valid message cut short, on its own protocol"),
    "wrong-run": (3, "a well-formed message of another run id"),
    "wrong-version": (3, "a well-formed message under protocol version 99"),
    "wrong-run-hello": (1, "a hello claiming another run (the node refuses and disconnects)"),
    "forged-signature": (3, "a contribution claiming a member's key, random signature"),
    "non-member-contribution": (3, "a validly signed contribution from a non-member, to an aggregator"),
    "huge-chain-request": (2, "ChainRequest start 0, limit 2**63-1 (and start 2**63-1)"),
    "bad-checkpoint-request": (2, "CheckpointRequest of an unknown digest / index out of range"),
    "unknown-inputs-request": (1, "ContributionsRequest for a record nobody has"),
    "held-stream": (1, "streams opened, two header bytes written, then held"),
    "slow-stream": (1, "a valid request written one byte every 1.5 s"),
    "gossip-garbage": (2, "garbage and other-run records published on the topic"),
    "gossip-forged-record": (2, "a record with a member's key and a random signature"),
    "gossip-replayed-record": (3, "an old valid record published again"),
    "gossip-non-aggregator-record": (2, "a validly signed record from a non-member on the current head"),
    "gossip-bad-fraud-proof": (2, "fraud proofs whose record is garbage or correct"),
    "raw-pubsub": (3, "hand-made pubsub RPCs: garbage, bad key, bad signature, truncated, oversized, ..."),
    "join-flood": (0, "signed Joins from fresh keys (scheduled by the bench, not drawn)"),
}


class Adversary:
    """A seeded stream of hostile actions against the online nodes, on its own trio thread.

    ``set_view`` (any thread) says who is online; ``start``/``stop``; ``tally`` counts what was
    sent by kind and what the daemons answered. ``join_flood(n)`` queues a flood of Joins.
    """

    def __init__(self, run_id: bytes, members: Sequence[bytes], directions: int, seed: int, rate: float = 4.0,
                 workers: int = 3, exclude: Sequence[str] = (), raw_cases: Sequence[str] = RAW_PUBSUB_CASES) -> None:
        self.run_id = run_id
        self.members = list(members)
        self.directions = directions
        self.rng = random.Random(seed)
        self.rate = rate
        self.workers = workers
        self.exclude = set(exclude)
        self.raw_cases = [c for c in raw_cases if c not in self.exclude]
        self.tally = Tally()
        self._view = View()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._floods: list[int] = []
        self._lock = threading.Lock()
        self._peer: RawPeer | None = None
        self._strikes: Counter[str] = Counter()
        self.rotations = 0
        self.errors: Counter[str] = Counter()
        self.flood_keys: list[bytes] = []
        self.mutator = Mutator(random.Random(seed + 1))
        kinds = [k for k, (w, _) in KINDS.items() if w > 0 and k not in self.exclude]
        if not self.raw_cases and "raw-pubsub" in kinds:
            kinds.remove("raw-pubsub")
        self._kinds = kinds
        self._weights = [KINDS[k][0] for k in kinds]

    # -- control (any thread) ----------------------------------------------------------------
    def set_view(self, view: View) -> None:
        self._view = view

    def join_flood(self, n: int) -> None:
        with self._lock:
            self._floods.append(n)

    def start(self) -> None:
        _quiet_libp2p()
        self._thread = threading.Thread(target=self._main, name="adversary", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 20.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- trio side ------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            trio.run(self._run)
        except BaseException as e:  # noqa: BLE001 - the bench reports it
            self.errors[f"adversary crashed: {type(e).__name__}: {e}"] += 1
            log.exception("adversary crashed")

    async def _run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_stop, nursery.cancel_scope)
            for w in range(self.workers):
                nursery.start_soon(self._worker, w)

    async def _watch_stop(self, scope: trio.CancelScope) -> None:
        while not self._stop.is_set():
            await trio.sleep(0.2)
        scope.cancel()

    async def _worker(self, w: int) -> None:
        # Each worker keeps one identity until it has collected ROTATE_AFTER_STRIKES rejections
        # at some node (the daemon bans at 30), then starts a fresh one.
        while not self._stop.is_set():
            peer = RawPeer(self.run_id)
            strikes: Counter[str] = Counter()
            self.rotations += 1
            try:
                async with peer.running():
                    while not self._stop.is_set() and max(strikes.values(), default=0) < ROTATE_AFTER_STRIKES:
                        await trio.sleep(self.rng.expovariate(self.rate / self.workers))
                        with self._lock:
                            flood = self._floods.pop(0) if self._floods else 0
                        view = self._view
                        if not view.online:
                            continue
                        target = self.rng.choice(view.online)
                        try:
                            with trio.fail_after(40):
                                if flood:
                                    await self._join_flood(peer, target, flood)
                                    continue
                                kind = self.rng.choices(self._kinds, self._weights)[0]
                                strikes[target.name] += await self._act(kind, peer, target, view, strikes)
                        except trio.TooSlowError:
                            self.errors["action timed out"] += 1
                        if peer.hello_run != self.run_id:
                            break  # told a node we are on another run: it disconnects us
            except Exception as e:  # noqa: BLE001 - keep attacking with a new identity
                self.errors[f"{type(e).__name__}"] += 1
                await trio.sleep(0.5)

    def _status(self, view: View, target: Target) -> dict[str, Any]:
        return view.status.get(target.name, {})

    def _contribution(self, peer: RawPeer, round_: int, key: bytes | None = None) -> Contribution:
        c = Contribution(run=self.run_id, round=round_, peer=key or peer.public, q=self.mutator.random_bytes(self.directions))
        return c if key is not None else c.signed(peer.identity)

    async def _act(self, kind: str, peer: RawPeer, target: Target, view: View, strikes: Counter[str]) -> int:
        """Carry out one hostile action; return how many rejections (strikes) it should cost."""
        st = self._status(view, target)
        rnd = int(st.get("round", 0))
        head = bytes.fromhex(st["head"]) if st.get("head") else os.urandom(32)
        t = self.tally
        if kind == "garbage-frame":
            for proto in PROTOCOLS:
                out, _ = await peer.request(target, proto, GARBAGE + self.mutator.random_bytes(self.rng.randrange(1, 300)))
                t.add(kind, 1, out)
            return len(PROTOCOLS)
        if kind == "truncated-frame":
            proto = self.rng.choice(PROTOCOLS)
            raw = (100).to_bytes(FRAME_HEADER_BYTES, "big") + GARBAGE + bytes(49)
            out, _ = await peer.request(target, proto, raw=raw, timeout=15)
            t.add(kind, 1, out)
            return 0
        if kind == "oversized-frame":
            proto = self.rng.choice(PROTOCOLS)
            raw = (2 * MAX_MESSAGE_BYTES).to_bytes(FRAME_HEADER_BYTES, "big") + bytes(64 * 1024)
            out, _ = await peer.request(target, proto, raw=raw, half_close=False)
            t.add(kind, 1, out)
            return 0
        if kind == "truncated-message":
            proto, msg = self._valid_request(peer, rnd, head)
            data = msg.encode()
            out, _ = await peer.request(target, proto, data[: self.rng.randrange(1, len(data))])
            t.add(kind, 1, out)
            return 1
        if kind == "wrong-run":
            c = Contribution(run=OTHER_RUN, round=rnd, peer=peer.public, q=bytes(self.directions)).signed(peer.identity)
            out, _ = await peer.request(target, PROTO_MSG, c.encode())
            t.add(kind, 1, out)
            out, _ = await peer.request(target, PROTO_CHAIN, ChainRequest(run=OTHER_RUN, start=0, limit=10).encode())
            t.add(kind, 1, out)
            return 2
        if kind == "wrong-version":
            proto, msg = self._valid_request(peer, rnd, head)
            out, _ = await peer.request(target, proto, with_version(msg.encode(), 99))
            t.add(kind, 1, out)
            return 1
        if kind == "wrong-run-hello":
            peer.hello_run = OTHER_RUN
            out, _ = await peer.request(target, PROTO_HELLO, encode_hello(OTHER_RUN, [], {}, rnd))
            t.add(kind, 1, out)
            return STRIKES_TO_BAN  # the node disconnects us: this identity is spent
        if kind == "forged-signature":
            key = self.rng.choice(self.members)
            c = Contribution(run=self.run_id, round=rnd, peer=key, q=bytes(self.directions), sig=os.urandom(64))
            out, _ = await peer.request(target, PROTO_MSG, c.encode())
            t.add(kind, 1, out)
            return 1
        if kind == "non-member-contribution":
            aggs = [x for x in view.online if self._status(view, x).get("committee", {}).get("aggregator_rank") == 0]
            dest = aggs[0] if aggs else target
            rnd = int(self._status(view, dest).get("round", rnd))
            out, _ = await peer.request(dest, PROTO_MSG, self._contribution(peer, rnd).encode())
            t.add(kind, 1, out)
            strikes[dest.name] += 1
            return 0
        if kind == "huge-chain-request":
            for start, limit in ((0, MAX_U), (MAX_U, MAX_U), (max(0, rnd - 5), 2**32)):
                out, body = await peer.request(target, PROTO_CHAIN, ChainRequest(run=self.run_id, start=start, limit=limit).encode())
                t.add(kind, 1, out)
                if body:
                    t.outcome(kind, f"answer-bytes-{len(body) // 10000 * 10}k")
            return 0
        if kind == "bad-checkpoint-request":
            reqs = [CheckpointRequest(run=self.run_id, digest=os.urandom(32), index=0),
                    CheckpointRequest(run=self.run_id, digest=os.urandom(32), index=MAX_U)]
            out, body = await peer.request(target, PROTO_CKPT, CheckpointRequest(run=self.run_id, digest=ZERO32, index=0).encode())
            t.add("checkpoint-manifest-request", 1, out)  # valid: not hostile, needed for the next
            if out == "answered" and len(body) > 100:
                with contextlib.suppress(Exception):
                    from seedswarm.gossip.wire import CheckpointManifest, decode_as

                    m = decode_as(body, CheckpointManifest, self.run_id)
                    reqs += [CheckpointRequest(run=self.run_id, digest=m.state, index=len(m.chunks)),
                             CheckpointRequest(run=self.run_id, digest=m.state, index=MAX_U)]
            for req in reqs:
                out, _ = await peer.request(target, PROTO_CKPT, req.encode())
                t.add(kind, 1, out)
            return 0
        if kind == "unknown-inputs-request":
            creq = ContributionsRequest(run=self.run_id, round=rnd, record=os.urandom(32))
            out, _ = await peer.request(target, PROTO_INPUTS, creq.encode())
            t.add(kind, 1, out)
            return 0
        if kind == "held-stream":
            await self._held(peer, target, kind, slow=False)
            return 0
        if kind == "slow-stream":
            await self._held(peer, target, kind, slow=True)
            return 0
        if kind.startswith("gossip-"):
            return await self._gossip(kind, peer, target, rnd, head)
        if kind == "raw-pubsub":
            case = self.rng.choice(self.raw_cases)
            # a throwaway identity per case: several cases cost GossipSub score
            throwaway = RawPeer(self.run_id)
            data = FraudProof(run=self.run_id, record=GARBAGE + os.urandom(16)).encode()
            async with throwaway.running():
                frames, half = raw_pubsub_frames(case, throwaway, data)
                out = await send_raw_pubsub(throwaway, target, frames, half_close=half)
            t.add(f"raw-pubsub:{case}", 1, out)
            return 0
        raise AssertionError(kind)

    def _valid_request(self, peer: RawPeer, rnd: int, head: bytes) -> tuple[str, Message]:
        choice = self.rng.randrange(4)
        if choice == 0:
            return PROTO_MSG, self._contribution(peer, rnd)
        if choice == 1:
            return PROTO_CHAIN, ChainRequest(run=self.run_id, start=max(0, rnd - 3), limit=3)
        if choice == 2:
            return PROTO_CKPT, CheckpointRequest(run=self.run_id, digest=ZERO32, index=0)
        return PROTO_INPUTS, ContributionsRequest(run=self.run_id, round=max(0, rnd - 1), record=head)

    async def _held(self, peer: RawPeer, target: Target, kind: str, slow: bool) -> None:
        """Streams that never finish their request: the node must time them out (10 s)."""
        n = 1 if slow else 4

        async def one() -> None:
            proto = self.rng.choice(PROTOCOLS)
            t0 = time.monotonic()
            try:
                stream = await peer.open(target, proto)
            except Exception:
                self.tally.add(kind, 1, "unreachable")
                return
            outcome = "held-to-our-limit"
            try:
                with trio.move_on_after(25):
                    if slow:
                        data = frame(ChainRequest(run=self.run_id, start=0, limit=1).encode())
                        for b in data:
                            await stream.write(bytes([b]))
                            await trio.sleep(1.5)
                    else:
                        await stream.write(b"\x00\x00")
                    await stream.read(1)  # the node times us out: EOF or reset
                    outcome = "answered"
            except Exception:
                outcome = f"closed-by-node-after-{int(time.monotonic() - t0) // 5 * 5}s"
            finally:
                await _dispose(stream, graceful=False)
            self.tally.add(kind, 1, outcome)

        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)

    async def _gossip(self, kind: str, peer: RawPeer, target: Target, rnd: int, head: bytes) -> int:
        t = self.tally
        datas: list[bytes] = []
        if kind == "gossip-garbage":
            datas = [GARBAGE + os.urandom(100),
                     Record(run=OTHER_RUN, round=rnd, prev=head, aggregator=peer.public, contributors=b"\x01",
                            contrib_root=os.urandom(32), aggregate=bytes(2 * self.directions)).signed(peer.identity).encode()]
        elif kind == "gossip-forged-record":
            datas = [Record(run=self.run_id, round=rnd, prev=head, aggregator=self.rng.choice(self.members),
                            contributors=b"\x01", contrib_root=os.urandom(32), aggregate=bytes(2 * self.directions),
                            sig=os.urandom(64)).encode()]
        elif kind == "gossip-non-aggregator-record":
            datas = [Record(run=self.run_id, round=rnd, prev=head, aggregator=peer.public, contributors=b"\x01",
                            contrib_root=os.urandom(32), aggregate=bytes(2 * self.directions)).signed(peer.identity).encode()]
        elif kind == "gossip-replayed-record":
            out, body = await peer.request(target, PROTO_CHAIN, ChainRequest(run=self.run_id, start=max(0, rnd - 40), limit=3).encode())
            t.add("chain-request-for-replay", 1, out)  # valid: fetches the records to replay
            if out == "answered":
                from seedswarm.gossip.wire import ChainResponse, decode_as

                with contextlib.suppress(Exception):
                    datas = list(decode_as(body, ChainResponse, self.run_id).records)
            if not datas:
                return 0
        elif kind == "gossip-bad-fraud-proof":
            datas = [FraudProof(run=self.run_id, record=GARBAGE + os.urandom(40)).encode(),
                     FraudProof(run=self.run_id, record=self.mutator.random_bytes(64)).encode()]
        else:
            raise AssertionError(kind)
        out = await send_raw_pubsub(peer, target, [peer.subscribe_frame(), peer.publish_frame(datas)], linger=0.2)
        t.add(kind, len(datas), out)
        return 0

    async def _join_flood(self, peer: RawPeer, target: Target, n: int) -> None:
        st = self._status(self._view, target)
        rnd = int(st.get("round", 0))
        datas = []
        for _ in range(n):
            ident = Identity.generate()
            self.flood_keys.append(ident.public)
            datas.append(Join(run=self.run_id, round=rnd, peer=ident.public).signed(ident).encode())
        out = await send_raw_pubsub(peer, target, [peer.subscribe_frame(), peer.publish_frame(datas)], linger=0.5)
        self.tally.add("join-flood", n, out)


def leave_message(run_id: bytes, ident: Identity, round_: int) -> bytes:
    return Leave(run=run_id, round=round_, peer=ident.public).signed(ident).encode()


def run_trio_in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """``trio.run(fn, *args)`` on a fresh thread, from synchronous code; returns its result."""
    box: dict[str, Any] = {}

    def main() -> None:
        try:
            box["result"] = trio.run(fn, *args)
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    th = threading.Thread(target=main, daemon=True)
    th.start()
    th.join()
    if "error" in box:
        raise box["error"]
    return box.get("result")
