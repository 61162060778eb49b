"""Wire messages: a strict msgpack schema with the protocol version and run id in every message.

Every message is one msgpack array ``[version, type, run_id, field...]``. Nested messages (the
records of a chain response, the contributions behind a record) travel as their exact encoded
bytes, so signatures stay checkable byte for byte after any number of hops.

The schema machinery (field specs, the :class:`Message` base, errors, size limits) is in
:mod:`seedswarm.gossip.schema`; import all of it from here. Decoding is hostile-input code. Sizes are checked before anything is unpacked (first the global
limit, then the per-type limit read from the three-element header), msgpack runs with hard
container limits, and every field is checked for type and length. Whatever is wrong, the one
exception that leaves :func:`decode` is :class:`WireError` (or its subclass :class:`WrongRun`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import msgpack

from seedswarm import PROTOCOL_VERSION
from seedswarm.crypto.keys import SIG_SIZE
from seedswarm.gossip.schema import (
    B32,
    BIN,
    BOOL,
    HASH_SIZE,
    LIST,
    MAX_CHUNK,
    MAX_COMMITTEE,
    MAX_DIRECTIONS,
    MAX_MEMBERSHIP_ENTRIES,
    MAX_MESSAGE,
    MAX_RECORDS_PER_RESPONSE,
    MAX_U,
    RUN_ID_SIZE,
    SIG,
    Message,
    U,
    WireError,
    WrongRun,
    WrongVersion,
    _check,
    _Spec,
)

# the messages, decoding and protocol names, and the schema's names (gossip/schema.py) re-exported
__all__ = ["Attestation", "B32", "BIN", "BOOL", "ChainRequest", "ChainResponse", "CheckpointChunk",
           "CheckpointManifest", "CheckpointRequest", "Contribution", "ContributionsRequest",
           "ContributionsResponse", "Equivocation", "FraudProof", "GOSSIP_TYPES", "HASH_SIZE", "Heartbeat",
           "Hello", "Join", "LIST", "Leave", "MAX_CHUNK", "MAX_COMMITTEE", "MAX_DIRECTIONS",
           "MAX_MEMBERSHIP_ENTRIES", "MAX_MESSAGE", "MAX_RECORDS_PER_RESPONSE", "MAX_U", "MESSAGE_TYPES",
           "Message", "PROTO_CHAIN", "PROTO_CKPT", "PROTO_HELLO", "PROTO_INPUTS", "PROTO_MSG", "REQUESTS",
           "RESPONSES", "RUN_ID_SIZE", "Record", "SIG", "TOPIC", "U", "WireError", "WrongRun",
           "WrongVersion", "decode", "decode_as", "protocol_prefix"]

_M = TypeVar("_M", bound=Message)
_NOSIG = b"\x00" * SIG_SIZE


@dataclass(frozen=True)
class Contribution(Message):
    """One trainer's K one-byte projected gradients for one round (sent to aggregators only)."""

    TYPE: ClassVar[int] = 1
    SCHEMA: ClassVar[tuple[tuple[str, _Spec], ...]] = (
        ("round", U), ("peer", B32), ("q", BIN(MAX_DIRECTIONS)), ("sig", SIG),
    )
    MAX_SIZE: ClassVar[int] = MAX_DIRECTIONS + 256
    SIGNER: ClassVar[str | None] = "peer"
    DOMAIN: ClassVar[bytes] = b"contribution"
    round: int = 0
    peer: bytes = b""
    q: bytes = b""
    sig: bytes = _NOSIG


@dataclass(frozen=True)
class Join(Message):
    """A signed request to become a member; valid in records of rounds [round, round + ttl]."""

    TYPE: ClassVar[int] = 2
    SCHEMA: ClassVar[tuple[tuple[str, _Spec], ...]] = (
        ("round", U), ("peer", B32), ("cert", BIN(256)), ("sig", SIG),
    )
    MAX_SIZE: ClassVar[int] = 512
    SIGNER: ClassVar[str | None] = "peer"
    DOMAIN: ClassVar[bytes] = b"join"
    round: int = 0
    peer: bytes = b""
    cert: bytes = b""
    sig: bytes = _NOSIG


@dataclass(frozen=True)
class Leave(Message):
    """A signed graceful departure."""

    TYPE: ClassVar[int] = 3
    SCHEMA: ClassVar[tuple[tuple[str, _Spec], ...]] = (("round", U), ("peer", B32), ("sig", SIG))
    MAX_SIZE: ClassVar[int] = 256
    SIGNER: ClassVar[str | None] = "peer"
    DOMAIN: ClassVar[bytes] = b"leave"
    round: int = 0
    peer: bytes = b""
    sig: bytes = _NOSIG


@dataclass(frozen=True)
class Equivocation(Message):
    """Evidence: two different contributions signed by one peer for one round."""

    TYPE: ClassVar[int] = 4
    SCHEMA: ClassVar[tuple[tuple[str, _Spec], ...]] = (
        ("a", BIN(Contribution.MAX_SIZE)), ("b", BIN(Contribution.MAX_SIZE)),
    )
    MAX_SIZE: ClassVar[int] = 2 * Contribution.MAX_SIZE + 128
    a: bytes = b""
    b: bytes = b""


@dataclass(frozen=True)
class Record(Message):
    """The round's outcome, gossiped to everyone: small by design (what N nodes all receive).

    The contributions themselves are not inside: ``contrib_root`` commits to them (a Merkle
    root over their encodings in trainer-rank order) and ``contributors`` is a bitmap over the
    round's trainer ranks. Anyone may fetch them and recompute ``aggregate``.
    """

    TYPE: ClassVar[int] = 5
    SCHEMA: ClassVar[tuple[tuple[str, _Spec], ...]] = (
        ("round", U),
        ("prev", B32),
        ("aggregator", B32),
        ("contributors", BIN(MAX_COMMITTEE // 8)),
        ("contrib_root", B32),
        ("aggregate", BIN(2 * MAX_DIRECTIONS)),
        ("joins", LIST(MAX_MEMBERSHIP_ENTRIES, Join.MAX_SIZE)),
        ("leaves", LIST(MAX_MEMBERSHIP_ENTRIES, Leave.MAX_SIZE)),
        ("evidence", LIST(16, Equivocation.MAX_SIZE)),
        ("sig", SIG),
    )
    MAX_SIZE: ClassVar[int] = 160 * 1024
    SIGNER: ClassVar[str | None] = "aggregator"
    DOMAIN: ClassVar[bytes] = b"record"
    round: int = 0
    prev: bytes = b""
    aggregator: bytes = b""
    contributors: bytes = b""
    contrib_root: bytes = b""
    aggregate: bytes = b""
    joins: tuple[bytes, ...] = ()
    leaves: tuple[bytes, ...] = ()
    evidence: tuple[bytes, ...] = ()
    sig: bytes = _NOSIG


@dataclass(frozen=True)
class Heartbeat(Message):
    """A routing hint (never consensus input): which round and head a peer is at."""

    TYPE: ClassVar[int] = 6
    SCHEMA: ClassVar[tuple[tuple[str, _Spec], ...]] = (("round", U), ("peer", B32), ("head", B32))
    MAX_SIZE: ClassVar[int] = 256
    round: int = 0
    peer: bytes = b""
    head: bytes = b""


@dataclass(frozen=True)
class ChainRequest(Message):
    TYPE: ClassVar[int] = 7
    SCHEMA: ClassVar[tuple[tuple[str, _Spec], ...]] = (("start", U), ("limit", U))
    MAX_SIZE: ClassVar[int] = 128
    start: int = 0
    limit: int = 0


@dataclass(frozen=True)
class ChainResponse(Message):
    TYPE: ClassVar[int] = 8
    SCHEMA: ClassVar[tuple[tuple[str, _Spec], ...]] = (
        ("start", U), ("head", U), ("records", LIST(MAX_RECORDS_PER_RESPONSE, Record.MAX_SIZE)),
    )
    MAX_SIZE: ClassVar[int] = 4 * 1024 * 1024
    start: int = 0
    head: int = 0
    records: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class ContributionsRequest(Message):
    TYPE: ClassVar[int] = 9
    SCHEMA: ClassVar[tuple[tuple[str, _Spec], ...]] = (("round", U), ("record", B32))
    MAX_SIZE: ClassVar[int] = 128
    round: int = 0
    record: bytes = b""


@dataclass(frozen=True)
class ContributionsResponse(Message):
    TYPE: ClassVar[int] = 10
    SCHEMA: ClassVar[tuple[tuple[str, _Spec], ...]] = (
        ("round", U), ("record", B32), ("contributions", LIST(MAX_COMMITTEE, Contribution.MAX_SIZE)),
    )
    MAX_SIZE: ClassVar[int] = 4 * 1024 * 1024
    round: int = 0
    record: bytes = b""
    contributions: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class CheckpointRequest(Message):
    TYPE: ClassVar[int] = 11
    SCHEMA: ClassVar[tuple[tuple[str, _Spec], ...]] = (("digest", B32), ("index", U))
    MAX_SIZE: ClassVar[int] = 128
    digest: bytes = b""
    index: int = 0


@dataclass(frozen=True)
class CheckpointChunk(Message):
    """One content-addressed piece of a checkpoint (verified against the manifest's hash)."""

    TYPE: ClassVar[int] = 12
    SCHEMA: ClassVar[tuple[tuple[str, _Spec], ...]] = (
        ("digest", B32), ("index", U), ("total", U), ("data", BIN(MAX_CHUNK)),
    )
    MAX_SIZE: ClassVar[int] = MAX_CHUNK + 256
    digest: bytes = b""
    index: int = 0
    total: int = 0
    data: bytes = b""


@dataclass(frozen=True)
class Attestation(Message):
    """A sampled verifier's signed statement that it recomputed a record's aggregate."""

    TYPE: ClassVar[int] = 13
    SCHEMA: ClassVar[tuple[tuple[str, _Spec], ...]] = (
        ("round", U), ("record", B32), ("verifier", B32), ("ok", BOOL), ("sig", SIG),
    )
    MAX_SIZE: ClassVar[int] = 256
    SIGNER: ClassVar[str | None] = "verifier"
    DOMAIN: ClassVar[bytes] = b"attestation"
    round: int = 0
    record: bytes = b""
    verifier: bytes = b""
    ok: bool = True
    sig: bytes = _NOSIG


@dataclass(frozen=True)
class FraudProof(Message):
    """A record plus the inputs that show its aggregate is wrong: rejects it everywhere."""

    TYPE: ClassVar[int] = 14
    SCHEMA: ClassVar[tuple[tuple[str, _Spec], ...]] = (
        ("record", BIN(Record.MAX_SIZE)), ("contributions", LIST(MAX_COMMITTEE, Contribution.MAX_SIZE)),
    )
    MAX_SIZE: ClassVar[int] = 4 * 1024 * 1024 + Record.MAX_SIZE
    record: bytes = b""
    contributions: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class CheckpointManifest(Message):
    """Which chunks make up the model state after a given round (content addressed)."""

    TYPE: ClassVar[int] = 15
    SCHEMA: ClassVar[tuple[tuple[str, _Spec], ...]] = (
        ("round", U), ("head", B32), ("state", B32), ("size", U), ("chunks", LIST(16384, HASH_SIZE)),
    )
    MAX_SIZE: ClassVar[int] = 16384 * 34 + 256
    round: int = 0
    head: bytes = b""
    state: bytes = b""
    size: int = 0
    chunks: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Hello(Message):
    """Peer exchange on connect: our chain length (a sync hint), how to reach us, peers we know.

    Addresses are multiaddr strings in UTF-8; each ``book`` entry is a peer id and up to four of
    its addresses, newline-separated. :func:`hello_book` parses them strictly.
    """

    TYPE: ClassVar[int] = 16
    SCHEMA: ClassVar[tuple[tuple[str, _Spec], ...]] = (
        ("round", U), ("addrs", LIST(8, 256)), ("book", LIST(64, 1200)),
    )
    MAX_SIZE: ClassVar[int] = 96 * 1024
    round: int = 0
    addrs: tuple[bytes, ...] = ()
    book: tuple[bytes, ...] = ()

    @classmethod
    def make(cls, run: bytes, round_: int, addrs: list[str], book: dict[str, list[str]]) -> Hello:
        entries = tuple("\n".join([pid, *a[:4]]).encode() for pid, a in list(book.items())[:64])
        return cls(run=run, round=round_, addrs=tuple(a.encode() for a in addrs[:8]), book=entries)

    def addresses(self) -> list[str]:
        return _addrs(self.addrs)

    def peer_book(self) -> dict[str, list[str]]:
        """Peer id -> addresses; raises WireError on anything but text multiaddrs."""
        out: dict[str, list[str]] = {}
        for entry in self.book:
            pid, *addrs = _text(entry).split("\n")
            if not pid or not pid.isalnum() or len(addrs) > 4:
                raise WireError("hello: malformed peer entry")
            out[pid] = _addrs(a.encode() for a in addrs)
        return out


def _text(b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("hello: address is not UTF-8") from None


def _addrs(items: Any) -> list[str]:
    out = [_text(a) for a in items]
    if not all(a.startswith("/") and a.isprintable() and " " not in a for a in out):
        raise WireError("hello: not a multiaddr")
    return out


MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Contribution, Join, Leave, Equivocation, Record, Heartbeat, ChainRequest, ChainResponse,
        ContributionsRequest, ContributionsResponse, CheckpointRequest, CheckpointChunk,
        Attestation, FraudProof, CheckpointManifest, Hello,
    )
}
_MAX_ANY = max(c.MAX_SIZE for c in MESSAGE_TYPES.values())
_MAX_ITEMS = 16 + max(spec[1] for c in MESSAGE_TYPES.values() for _, spec in c.SCHEMA if spec[0] == "list")
assert _MAX_ANY <= MAX_MESSAGE


def _header(data: bytes) -> tuple[int, int, type[Message]]:
    """Read (array length, version, class) from the first bytes without unpacking the rest."""
    up = msgpack.Unpacker(max_buffer_size=len(data) or 1, max_bin_len=0, max_str_len=0,
                          max_array_len=64, max_map_len=0, max_ext_len=0)
    up.feed(data)
    try:
        n = up.read_array_header()
        version = up.unpack()
        typ = up.unpack()
    except Exception as e:  # msgpack raises many types on garbage; all mean "malformed"
        raise WireError(f"malformed message header: {type(e).__name__}") from None
    if type(version) is not int or type(typ) is not int:
        raise WireError("malformed message header")
    if version != PROTOCOL_VERSION:
        raise WrongVersion(f"protocol version {version}, this node speaks {PROTOCOL_VERSION}")
    cls = MESSAGE_TYPES.get(typ)
    if cls is None:
        raise WireError(f"unknown message type {typ}")
    return n, version, cls


def decode(data: bytes, run: bytes | None = None, expect: type[_M] | None = None) -> Message:
    """Decode one message; raise WireError (WrongRun for another swarm or version) on anything bad.

    ``run``: the run id this node belongs to (None: accept any, for tools).
    ``expect``: the message class the caller wants (anything else is an error).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError("expected bytes")
    data = bytes(data)
    if len(data) > MAX_MESSAGE:
        raise WireError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE}-byte limit")
    if not data:
        raise WireError("empty message")
    n, _, cls = _header(data)
    if len(data) > cls.MAX_SIZE:
        raise WireError(f"{cls.__name__} of {len(data)} bytes exceeds its {cls.MAX_SIZE}-byte limit")
    if expect is not None and cls is not expect:
        raise WireError(f"expected {expect.__name__}, got {cls.__name__}")
    if n != 3 + len(cls.SCHEMA):
        raise WireError(f"{cls.__name__}: expected {3 + len(cls.SCHEMA)} fields, got {n}")
    try:
        vals = msgpack.unpackb(
            data, raw=False, use_list=True, strict_map_key=True, max_bin_len=cls.MAX_SIZE,
            max_str_len=0, max_array_len=_MAX_ITEMS, max_map_len=0, max_ext_len=0,
        )
    except Exception as e:
        raise WireError(f"malformed {cls.__name__}: {type(e).__name__}") from None
    if type(vals) is not list or len(vals) != n:
        raise WireError(f"malformed {cls.__name__}")
    got_run = _check("run", B32, vals[2])
    if run is not None and got_run != run:
        raise WrongRun(f"{cls.__name__} for run {got_run.hex()}, this node is on run {run.hex()}")
    kwargs = {name: _check(name, spec, v) for (name, spec), v in zip(cls.SCHEMA, vals[3:], strict=True)}
    msg = cls(run=got_run, **kwargs)
    # One message, one byte string: seen-caches, Merkle roots and hashes over raw bytes must not
    # be foolable by a re-encoding (wider ints, longer headers) of the same content.
    if msg.encode() != data:
        raise WireError(f"{cls.__name__} is not in canonical encoding")
    return msg


def decode_as(data: bytes, cls: type[_M], run: bytes | None = None) -> _M:
    """Decode bytes that must be of one message class."""
    msg = decode(data, run, expect=cls)
    assert isinstance(msg, cls)
    return msg


# ---------------------------------------------------------------------------------------------
# where messages travel: one gossip topic and five request/response stream protocols per run

TOPIC = "chain"  # gossip: Record, Join, Leave, FraudProof (a few messages per second, network-wide)
GOSSIP_TYPES: tuple[type[Message], ...] = (Record, Join, Leave, FraudProof)
PROTO_MSG = "msg"  # Contribution, answered with b"" as an ack
PROTO_INPUTS = "inputs"  # ContributionsRequest -> ContributionsResponse
PROTO_CHAIN = "chain"  # ChainRequest -> ChainResponse
PROTO_CKPT = "ckpt"  # CheckpointRequest -> CheckpointManifest (digest all zero) | CheckpointChunk
PROTO_HELLO = "hello"  # Hello -> Hello (run check, chain length, peer exchange)
REQUESTS: dict[str, type[Message]] = {
    PROTO_MSG: Contribution, PROTO_INPUTS: ContributionsRequest, PROTO_CHAIN: ChainRequest,
    PROTO_CKPT: CheckpointRequest, PROTO_HELLO: Hello,
}
RESPONSES: dict[str, tuple[type[Message], ...]] = {
    PROTO_INPUTS: (ContributionsResponse,), PROTO_CHAIN: (ChainResponse,),
    PROTO_CKPT: (CheckpointManifest, CheckpointChunk), PROTO_HELLO: (Hello,),
}


def protocol_prefix(run_id: bytes) -> str:
    """``/seedswarm/<major>/<run id>``: topics and stream ids of other runs or versions never match."""
    return f"/seedswarm/{PROTOCOL_VERSION}/{run_id.hex()[:16]}"
