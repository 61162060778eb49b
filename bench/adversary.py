"""Hostile peers for ``seedswarm bench chaos`` and ``seedswarm bench fuzz``.

Everything here talks to real daemons over real libp2p connections, from the outside: the
daemon's public wire surface (its direct-stream protocols and its gossip topic) is the only
thing it touches.

* :class:`RawPeer` is one hostile identity: a bare py-libp2p host (Noise, Yamux) running in
  the caller's ``trio.run``. It answers the daemon's ``hello`` (a peer that does not is
  disconnected at once), sends raw direct-stream frames (well formed or not) and holds streams
  open.
* Every hand-made pubsub byte goes out through :mod:`seedswarm.gossip.libp2p.hostile` (its
  ``send`` from a fresh throwaway host, ``build`` for the raw cases, ``signed_message`` for
  correctly signed pubsub messages); :func:`send_pubsub` only adds the hello answer and an
  outcome, :func:`publish` and :func:`envelope_mutant` only build the messages.
* :class:`Mutator` turns valid wire messages into hostile ones (bit flips, truncations,
  extensions, msgpack type confusion, field swaps, length lies, header lies, splices).
* :class:`Adversary` is the chaos bench's adversary: a seeded stream of hostile actions of
  every kind in :data:`KINDS` against the nodes the bench says are online.

Daemon defences this module has to live with (and which it therefore measures): the peer
policy (``node/core/peers.py``) bans a peer whose weighted strikes reach ``ban_at`` (30; a
malformed input weighs 3, a bad signature 5), so identities rotate at half of that; GossipSub
graylists a forwarder after about ten invalid messages (validator rejections and the pubsub
guard's penalised drops), so pubsub attacks come from throwaway identities; and an open swarm
asks a Join for proof of work (``node/core/admission.py``), so the Join flood pays for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.identity_utils import create_identity_from_seed
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.pb import rpc_pb2
from libp2p.utils import encode_varint_prefixed

from seedswarm import PROTOCOL_VERSION
from seedswarm.crypto.keys import Identity, peer_id_of
from seedswarm.gossip.libp2p import hostile
from seedswarm.gossip.libp2p.tuning import PUBSUB_RPC_OVERHEAD, muxer_options, security_options
from seedswarm.gossip.wire import (
    MAX_U,
    PROTO_CHAIN,
    PROTO_CKPT,
    PROTO_HELLO,
    PROTO_INPUTS,
    PROTO_MSG,
    TOPIC,
    ChainRequest,
    CheckpointRequest,
    Contribution,
    ContributionsRequest,
    FraudProof,
    Hello,
    Join,
    Message,
    Record,
    protocol_prefix,
)
from seedswarm.node.core.admission import solve_work
from seedswarm.node.core.peers import WEIGHTS, PolicyConfig
from seedswarm.node.core.reasons import Reason
from seedswarm.node.daemon.netstack import MAX_MESSAGE_BYTES

log = logging.getLogger("seedswarm.bench.adversary")

#: Every direct-stream protocol a daemon serves (``{protocol_prefix}/{name}``).
PROTOCOLS: tuple[str, ...] = (PROTO_MSG, PROTO_INPUTS, PROTO_CHAIN, PROTO_CKPT, PROTO_HELLO)
OTHER_RUN = b"\x42" * 32
ZERO32 = b"\x00" * 32
FRAME_HEADER_BYTES = 4  # the daemon's direct-stream framing: 4-byte big-endian length
STATUS_NAMES = {0: "answered", 1: "no-response", 2: "too-large", 3: "error", 4: "busy"}
#: 0xC1 is the one byte msgpack never uses: garbage that starts with it is malformed every time
#: (plain random bytes sometimes parse as a header with a wrong version: wrong-run instead).
GARBAGE = b"\xc1"
#: The peer policy bans a peer whose weighted strikes reach this; identities rotate at half.
STRIKES_TO_BAN = PolicyConfig().ban_at
ROTATE_AT_STRIKES = STRIKES_TO_BAN / 2
#: GossipSub graylists a forwarder after about ten invalid messages (score -10).
GRAYLIST_AFTER = 10
#: Raw pubsub cases (``hostile.KINDS`` but the valid message), each one attack of ``hostile.build``.
RAW_PUBSUB_CASES: tuple[str, ...] = tuple(k for k in hostile.KINDS if k != "valid")
#: Seconds a raw case keeps its connection after writing: a stalled frame must outlast the
#: victim's frame deadline (``io_timeout_s``, 10 s) to be dropped as such.
RAW_LINGER: dict[str, float] = {"stalled-rpc": 12.0}


def strikes(reason: Reason, n: int = 1) -> float:
    """What ``n`` inputs refused for ``reason`` cost a peer under the daemon's peer policy."""
    return n * WEIGHTS.get(reason, 1.0)


def _quiet_libp2p() -> None:
    for name in ("libp2p", "libp2p.pubsub", "libp2p.kad_dht", "libp2p.transport.tcp.tcp",
                 "libp2p.network.swarm", "libp2p.host.basic_host", "libp2p.tools.anyio_service"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


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


async def answer_hello(stream: Any, run_id: bytes) -> None:
    """Answer the daemon's hello request (sent to every new peer) with a hello of ``run_id``."""
    try:
        with trio.fail_after(5):
            n = int.from_bytes(await _read_exact(stream, FRAME_HEADER_BYTES), "big")
            if n <= 4096:
                await _read_exact(stream, n)
            await stream.write(frame(b"\x00" + Hello.make(run_id, 0, [], {}).encode()))
    except Exception:
        pass
    finally:
        await _dispose(stream)


def hello_handlers(run_id: bytes) -> dict[str, Callable[[INetStream], Awaitable[None]]]:
    """``handlers`` for ``hostile.send``: a node disconnects a peer that has no hello, which
    would cut an attack short while it is being read."""

    async def serve(stream: INetStream) -> None:
        await answer_hello(stream, run_id)

    return {f"{protocol_prefix(run_id)}/{PROTO_HELLO}": serve}


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
            key_pair=kp, sec_opt=security_options(kp), muxer_opt=muxer_options(),
            connection_config=ConnectionConfig(max_connections_per_peer=1, dial_timeout=5.0),
            enable_mDNS=False, enable_upnp=False,
        )
        self.host.set_stream_handler(TProtocol(f"{self.prefix}/{PROTO_HELLO}"), self._serve_hello)
        self.hello_run = run_id  # what our hello answers claim (OTHER_RUN: a peer of another run)

    @property
    def public(self) -> bytes:
        return self.identity.public

    async def _serve_hello(self, stream: Any) -> None:
        await answer_hello(stream, self.hello_run)

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
        """A new stream to ``target`` on the daemon protocol ``protocol``."""
        with trio.fail_after(timeout):
            await self.connect(target, timeout)
            return await self.host.new_stream(ID.from_base58(target.peer_id), [TProtocol(f"{self.prefix}/{protocol}")])

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


# ---------------------------------------------------------------------------------------------
# pubsub: built here, sent by seedswarm.gossip.libp2p.hostile


def rpc(msgs: Sequence[Any]) -> bytes:
    """One varint-framed RPC publishing ready-made pubsub messages (``hostile.signed_message``
    or :func:`envelope_mutant`)."""
    return bytes(encode_varint_prefixed(rpc_pb2.RPC(publish=list(msgs)).SerializeToString()))


def publish(seed: bytes, topic: str, datas: Sequence[bytes]) -> hostile.Attack:
    """One RPC publishing every item of ``datas`` on ``topic``, correctly signed by ``seed``."""
    kp = create_identity_from_seed(seed)
    return hostile.Attack((rpc([hostile.signed_message(kp, topic, d) for d in datas]),))


def envelope_mutant(kp: Any, topic: str, data: bytes, rng: random.Random) -> tuple[str, Any]:
    """A signed pubsub message carrying ``data``, then one envelope field broken (the pubsub
    guard drops it before the topic validator, and charges the forwarder for it)."""
    op = rng.choice(("sig-flip", "sig-random", "sig-truncated", "data-after-signing", "seqno-after-signing",
                     "other-author", "no-signature", "topic-unsubscribed"))
    m = hostile.signed_message(kp, topic, data)
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


async def send_pubsub(target: Target, attack: hostile.Attack, run_id: bytes, *, seed: bytes | None = None,
                      linger: float = 0.3, timeout: float = 10.0, release: threading.Event | None = None) -> str:
    """``hostile.send`` from a fresh host (identity ``seed``) that answers the node's hello;
    returns an outcome (written, timeout, error-...) instead of raising. The connection stays
    ``linger`` seconds after the last write, or until ``release`` is set."""
    try:
        with trio.fail_after(timeout + linger + 5.0):
            await hostile.send(target.addr, attack, seed=seed, linger=linger, timeout=timeout,
                               handlers=hello_handlers(run_id), release=release)
        return "written"
    except trio.TooSlowError:
        return "timeout"
    except Exception as e:  # noqa: BLE001 - a hostile client reports, never raises
        return f"error-{_leaf_names(e)}"


def _leaf_names(e: BaseException) -> str:
    """An exception's type name; for a group (a trio nursery's), its leaves' names."""
    if isinstance(e, BaseExceptionGroup):
        return "+".join(sorted({_leaf_names(x) for x in e.exceptions}))
    return type(e).__name__


def raw_pubsub(case: str, topic: str, seed: bytes) -> tuple[hostile.Attack, float]:
    """The raw pubsub ``case`` (one of RAW_PUBSUB_CASES) and how long to linger after it."""
    return hostile.build(case, topic, seed, limit=MAX_MESSAGE_BYTES + PUBSUB_RPC_OVERHEAD), RAW_LINGER.get(case, 0.5)


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
    "raw-pubsub": (3, "hand-made pubsub RPCs (hostile.build): garbage, bad key, bad signature, truncated, ..."),
    "join-flood": (0, "Joins from fresh keys with the genesis' join work (scheduled by the bench, not drawn)"),
}


@dataclass
class Flood:
    """One Join flood: the keys, the round their Joins name, the work they carry."""

    round: int
    bits: int
    keys: list[bytes]
    work_s: float
    outcome: str
    target: str


class Adversary:
    """A seeded stream of hostile actions against the online nodes, on its own trio thread.

    ``set_view`` (any thread) says who is online; ``start``/``stop``; ``tally`` counts what was
    sent by kind and what the daemons answered. ``join_flood(n)`` queues a flood of ``n`` Joins,
    each with ``join_bits`` bits of work (the genesis' ``join_pow_bits``: the difficulty of a
    chain with no recent joins, so the later Joins of a flood fall short once the first are in).
    """

    def __init__(self, run_id: bytes, members: Sequence[bytes], directions: int, seed: int, rate: float = 4.0,
                 workers: int = 3, exclude: Sequence[str] = (), raw_cases: Sequence[str] = RAW_PUBSUB_CASES,
                 join_bits: int = 16) -> None:
        self.run_id = run_id
        self.topic = topic_of(run_id)
        self.members = list(members)
        self.directions = directions
        self.rng = random.Random(seed)
        self.rate = rate
        self.workers = workers
        self.join_bits = join_bits
        self.exclude = set(exclude)
        self.raw_cases = [c for c in raw_cases if c not in self.exclude]
        self.tally = Tally()
        self._view = View()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._floods: list[int] = []
        self._lock = threading.Lock()
        self.rotations = 0
        self.errors: Counter[str] = Counter()
        self.floods: list[Flood] = []
        self.mutator = Mutator(random.Random(seed + 1))
        kinds = [k for k, (w, _) in KINDS.items() if w > 0 and k not in self.exclude]
        if not self.raw_cases and "raw-pubsub" in kinds:
            kinds.remove("raw-pubsub")
        self._kinds = kinds
        self._weights = [KINDS[k][0] for k in kinds]

    @property
    def flood_keys(self) -> list[bytes]:
        return [k for f in self.floods for k in f.keys]

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

    def stop(self, timeout: float = 30.0) -> None:
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
        # Each worker keeps one identity until its weighted strikes at some node reach
        # ROTATE_AT_STRIKES (the peer policy bans at STRIKES_TO_BAN), then starts a fresh one.
        while not self._stop.is_set():
            peer = RawPeer(self.run_id)
            struck: defaultdict[str, float] = defaultdict(float)
            self.rotations += 1
            try:
                async with peer.running():
                    while not self._stop.is_set() and max(struck.values(), default=0) < ROTATE_AT_STRIKES:
                        await trio.sleep(self.rng.expovariate(self.rate / self.workers))
                        with self._lock:
                            flood = self._floods.pop(0) if self._floods else 0
                        view = self._view
                        if not view.online:
                            continue
                        target = self.rng.choice(view.online)
                        if flood:
                            await self._join_flood(target, flood)
                            continue
                        try:
                            with trio.fail_after(40):
                                kind = self.rng.choices(self._kinds, self._weights)[0]
                                struck[target.name] += await self._act(kind, peer, target, view, struck)
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

    async def _act(self, kind: str, peer: RawPeer, target: Target, view: View, struck: defaultdict[str, float]) -> float:
        """Carry out one hostile action; return the strikes it should cost at ``target``."""
        st = self._status(view, target)
        rnd = int(st.get("round", 0))
        head = bytes.fromhex(st["head"]) if st.get("head") else os.urandom(32)
        t = self.tally
        if kind == "garbage-frame":
            for proto in PROTOCOLS:
                out, _ = await peer.request(target, proto, GARBAGE + self.mutator.random_bytes(self.rng.randrange(1, 300)))
                t.add(kind, 1, out)
            return strikes(Reason.MALFORMED, len(PROTOCOLS))
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
            return strikes(Reason.MALFORMED)
        if kind == "wrong-run":
            c = Contribution(run=OTHER_RUN, round=rnd, peer=peer.public, q=bytes(self.directions)).signed(peer.identity)
            out, _ = await peer.request(target, PROTO_MSG, c.encode())
            t.add(kind, 1, out)
            out, _ = await peer.request(target, PROTO_CHAIN, ChainRequest(run=OTHER_RUN, start=0, limit=10).encode())
            t.add(kind, 1, out)
            return strikes(Reason.WRONG_RUN, 2)
        if kind == "wrong-version":
            proto, msg = self._valid_request(peer, rnd, head)
            out, _ = await peer.request(target, proto, with_version(msg.encode(), 99))
            t.add(kind, 1, out)
            return strikes(Reason.PROTOCOL_VERSION)
        if kind == "wrong-run-hello":
            peer.hello_run = OTHER_RUN
            out, _ = await peer.request(target, PROTO_HELLO, Hello.make(OTHER_RUN, rnd, [], {}).encode())
            t.add(kind, 1, out)
            return STRIKES_TO_BAN  # the node disconnects us: this identity is spent
        if kind == "forged-signature":
            key = self.rng.choice(self.members)
            c = Contribution(run=self.run_id, round=rnd, peer=key, q=bytes(self.directions), sig=os.urandom(64))
            out, _ = await peer.request(target, PROTO_MSG, c.encode())
            t.add(kind, 1, out)
            return strikes(Reason.BAD_SIGNATURE)
        if kind == "non-member-contribution":
            aggs = [x for x in view.online if self._status(view, x).get("committee", {}).get("aggregator_rank") == 0]
            dest = aggs[0] if aggs else target
            rnd = int(self._status(view, dest).get("round", rnd))
            out, _ = await peer.request(dest, PROTO_MSG, self._contribution(peer, rnd).encode())
            t.add(kind, 1, out)
            struck[dest.name] += strikes(Reason.NOT_TRAINER)
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
            await self._gossip(kind, peer, target, rnd, head)
            return 0
        if kind == "raw-pubsub":
            case = self.rng.choice(self.raw_cases)
            seed = os.urandom(32)  # a throwaway identity per case: several cases cost GossipSub score
            attack, linger = raw_pubsub(case, self.topic, seed)
            out = await send_pubsub(target, attack, self.run_id, seed=seed, linger=linger)
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

    async def _gossip(self, kind: str, peer: RawPeer, target: Target, rnd: int, head: bytes) -> None:
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
                return
        elif kind == "gossip-bad-fraud-proof":
            datas = [FraudProof(run=self.run_id, record=GARBAGE + os.urandom(40)).encode(),
                     FraudProof(run=self.run_id, record=self.mutator.random_bytes(64)).encode()]
        else:
            raise AssertionError(kind)
        seed = os.urandom(32)  # the pubsub author: throwaway (validator rejections cost it score)
        out = await send_pubsub(target, publish(seed, self.topic, datas), self.run_id, seed=seed, linger=0.3)
        t.add(kind, len(datas), out)

    async def _join_flood(self, target: Target, n: int) -> None:
        """``n`` Joins from fresh keys, each with ``join_bits`` of work at the target's round,
        published in one RPC. The work is done on a worker thread (it is the flood's cost)."""
        rnd = int(self._status(self._view, target).get("round", 0))
        bits = self.join_bits

        def make() -> tuple[list[bytes], list[bytes], float]:
            t0 = time.monotonic()
            keys, datas = [], []
            for _ in range(n):
                ident = Identity.generate()
                cert = solve_work(self.run_id, ident.public, rnd, bits)
                keys.append(ident.public)
                datas.append(Join(run=self.run_id, round=rnd, peer=ident.public, cert=cert).signed(ident).encode())
            return keys, datas, time.monotonic() - t0

        keys, datas, work_s = await trio.to_thread.run_sync(make)
        seed = os.urandom(32)
        out = await send_pubsub(target, publish(seed, self.topic, datas), self.run_id, seed=seed, linger=0.5)
        self.floods.append(Flood(round=rnd, bits=bits, keys=keys, work_s=round(work_s, 1), outcome=out,
                                 target=target.name))
        self.tally.add("join-flood", n, out)
