"""Tests of the wire format (gossip/wire.py): round trips, signatures, hostile input.

``decode`` is the one function that sees bytes from strangers, so most of this file throws
garbage at it: random bytes, mutated valid messages, well-formed msgpack with the wrong types,
oversized inputs. The contract under test: whatever the input, ``decode`` either returns a
schema-valid :class:`Message` or raises :class:`WireError` (possibly :class:`WrongRun`), and
nothing else.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seedswarm import PROTOCOL_VERSION
from seedswarm.crypto.hashing import h, merkle_root
from seedswarm.crypto.keys import PUBKEY_SIZE, SIG_SIZE, Identity
from seedswarm.gossip import wire
from seedswarm.gossip.wire import (
    MAX_CHUNK,
    MAX_DIRECTIONS,
    MAX_MESSAGE,
    MAX_U,
    MESSAGE_TYPES,
    Attestation,
    ChainRequest,
    ChainResponse,
    CheckpointChunk,
    CheckpointManifest,
    CheckpointRequest,
    Contribution,
    ContributionsRequest,
    ContributionsResponse,
    Equivocation,
    FraudProof,
    Heartbeat,
    Hello,
    Join,
    Leave,
    Message,
    Record,
    WireError,
    WrongRun,
    decode,
    decode_as,
)

RUN = h(b"test/run", b"seedswarm-tests")
OTHER_RUN = h(b"test/run", b"another swarm")
ALICE = Identity.from_seed(bytes(range(32)))
BOB = Identity.from_seed(bytes(range(1, 33)))
CAROL = Identity.from_seed(bytes(range(2, 34)))
K = 64

ALL_CLASSES = list(MESSAGE_TYPES.values())
SIGNED_CLASSES = [c for c in ALL_CLASSES if c.SIGNER is not None]
_ids = [c.__name__ for c in ALL_CLASSES]
_signed_ids = [c.__name__ for c in SIGNED_CLASSES]

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _q(salt: int, k: int = K) -> bytes:
    """K one-byte projected gradients (avoiding 0x80, which the codec does not produce)."""
    return bytes(((i * 37 + salt * 11) % 255) for i in range(k))


def _build_samples() -> tuple[dict[type[Message], Message], list[Message]]:
    """One realistic, signed-where-applicable message of every type (and the nested ones)."""
    c1 = Contribution(run=RUN, round=7, peer=ALICE.public, q=_q(1)).signed(ALICE)
    c2 = Contribution(run=RUN, round=7, peer=ALICE.public, q=_q(2)).signed(ALICE)
    c3 = Contribution(run=RUN, round=7, peer=CAROL.public, q=_q(3)).signed(CAROL)
    join = Join(run=RUN, round=6, peer=CAROL.public, cert=b"admission-cert" * 4).signed(CAROL)
    leave = Leave(run=RUN, round=7, peer=ALICE.public).signed(ALICE)
    eq = Equivocation(run=RUN, a=c1.encode(), b=c2.encode())
    inputs = (c1.encode(), c3.encode())
    aggregate = b"".join(struct.pack(">h", (i * 97) % 2000 - 1000) for i in range(K))
    rec = Record(
        run=RUN, round=7, prev=h(b"test/prev", b"6"), aggregator=BOB.public,
        contributors=bytes([0b00000101]) + bytes(7), contrib_root=merkle_root(list(inputs)),
        aggregate=aggregate, joins=(join.encode(),), leaves=(leave.encode(),),
        evidence=(eq.encode(),),
    ).signed(BOB)
    rec_hash = h(b"seedswarm/record", rec.encode())
    state = h(b"test/state", b"8")
    samples: dict[type[Message], Message] = {
        Contribution: c1,
        Join: join,
        Leave: leave,
        Equivocation: eq,
        Record: rec,
        Heartbeat: Heartbeat(run=RUN, round=8, peer=ALICE.public, head=rec_hash),
        ChainRequest: ChainRequest(run=RUN, start=3, limit=64),
        ChainResponse: ChainResponse(run=RUN, start=7, head=8, records=(rec.encode(),)),
        ContributionsRequest: ContributionsRequest(run=RUN, round=7, record=rec_hash),
        ContributionsResponse: ContributionsResponse(run=RUN, round=7, record=rec_hash, contributions=inputs),
        CheckpointRequest: CheckpointRequest(run=RUN, digest=state, index=2),
        CheckpointChunk: CheckpointChunk(run=RUN, digest=state, index=2, total=3, data=bytes(range(256)) * 3),
        Attestation: Attestation(run=RUN, round=7, record=rec_hash, verifier=ALICE.public, ok=False).signed(ALICE),
        FraudProof: FraudProof(run=RUN, record=rec.encode(), contributions=inputs),
        CheckpointManifest: CheckpointManifest(
            run=RUN, round=8, head=rec_hash, state=state, size=2 * MAX_CHUNK + 17,
            chunks=tuple(h(b"test/chunk", bytes([i])) for i in range(3)),
        ),
        Hello: Hello.make(RUN, 9, ["/ip4/10.0.0.1/tcp/4001/p2p/12D3KooWAlice"],
                          {"12D3KooWBob": ["/ip4/10.0.0.2/tcp/4001/p2p/12D3KooWBob"]}),
    }
    nested: list[Message] = [c1, c2, c3, join, leave, eq, rec]
    return samples, nested


SAMPLES, NESTED = _build_samples()
VALID = [m.encode() for m in SAMPLES.values()]
# every signed message that legitimately exists anywhere in VALID (top level or nested)
KNOWN_SIGNED = {m for m in [*SAMPLES.values(), *NESTED] if m.SIGNER is not None}


def _decode_total(data: Any, **kw: Any) -> Message | None:
    """decode, asserting the contract: a schema-valid Message or WireError, nothing else."""
    try:
        msg = decode(data, **kw)
    except WireError:
        return None
    assert type(msg) in ALL_CLASSES
    _assert_schema_ok(msg)
    again = msg.encode()
    assert decode(again) == msg
    return msg


def _assert_schema_ok(msg: Message) -> None:
    assert type(msg.run) is bytes and len(msg.run) == 32
    for name, spec in msg.SCHEMA:
        v = getattr(msg, name)
        kind = spec[0]
        if kind == "u":
            assert type(v) is int and 0 <= v <= MAX_U, name
        elif kind == "bool":
            assert type(v) is bool, name
        elif kind == "b":
            assert type(v) is bytes and len(v) == spec[1], name
        elif kind == "bin":
            assert type(v) is bytes and len(v) <= spec[1], name
        elif kind == "list":
            assert type(v) is tuple and len(v) <= spec[1], name
            assert all(type(x) is bytes and len(x) <= spec[2] for x in v), name
        else:  # pragma: no cover
            raise AssertionError(kind)


# ---------------------------------------------------------------------------------------------
# round trips and signatures


def test_samples_cover_every_message_type() -> None:
    assert set(SAMPLES) == set(ALL_CLASSES)
    assert sorted(MESSAGE_TYPES) == list(range(1, len(MESSAGE_TYPES) + 1))
    for typ, cls in MESSAGE_TYPES.items():
        assert typ == cls.TYPE
        assert cls.MAX_SIZE <= MAX_MESSAGE
        assert cls.SCHEMA, cls
        if cls.SIGNER is not None:
            assert cls.SCHEMA[-1] == ("sig", ("b", SIG_SIZE))
            assert dict(cls.SCHEMA)[cls.SIGNER] == ("b", PUBKEY_SIZE)
            assert cls.DOMAIN
    domains = [c.DOMAIN for c in SIGNED_CLASSES]
    assert len(set(domains)) == len(domains)


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=_ids)
def test_round_trip(cls: type[Message]) -> None:
    msg = SAMPLES[cls]
    data = msg.encode()
    assert len(data) <= cls.MAX_SIZE
    for got in (decode(data), decode(data, run=RUN), decode(data, run=RUN, expect=cls), decode_as(data, cls, RUN)):
        assert type(got) is cls
        assert got == msg
        assert got.encode() == data
        assert hash(got) == hash(msg)  # list fields come back as tuples: messages stay hashable
    # bytes-like inputs are accepted too
    assert decode(bytearray(data)) == msg
    assert decode(memoryview(data)) == msg




@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_content_hash(cls: type[Message]) -> None:
    msg = SAMPLES[cls]
    got = decode(msg.encode())
    d = got.content_hash()
    assert d == msg.content_hash() == h(b"seedswarm/msg", msg.encode())
    assert len(d) == 32
    assert dataclasses.replace(msg, run=OTHER_RUN).content_hash() != d


def test_digest_distinguishes_messages() -> None:
    digests = {m.content_hash() for c, m in SAMPLES.items()}
    assert len(digests) == len(SAMPLES)


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=_ids)
def test_round_trip_extreme_values(cls: type[Message]) -> None:
    """Largest integers, empty byte strings and lists, zero-filled fixed-size fields."""
    kwargs: dict[str, Any] = {}
    for name, spec in cls.SCHEMA:
        kind = spec[0]
        kwargs[name] = {"u": MAX_U, "bool": True, "b": b"\x00" * (spec[1] if kind == "b" else 0),
                        "bin": b"", "list": ()}[kind]
    for ints in (MAX_U, 0):
        kw = {n: (ints if cls.SCHEMA[i][1][0] == "u" else v) for i, (n, v) in enumerate(kwargs.items())}
        msg = cls(run=b"\xff" * 32, **kw)
        assert decode(msg.encode()) == msg


def test_round_trip_at_field_limits() -> None:
    big_c = Contribution(run=RUN, round=MAX_U, peer=ALICE.public, q=b"\x7f" * MAX_DIRECTIONS).signed(ALICE)
    got = decode_as(big_c.encode(), Contribution, RUN)
    assert got == big_c and got.signature_ok()
    chunk = CheckpointChunk(run=RUN, digest=b"d" * 32, index=MAX_U, total=MAX_U, data=b"\xab" * MAX_CHUNK)
    assert decode_as(chunk.encode(), CheckpointChunk) == chunk
    mem = tuple(Join(run=RUN, round=i, peer=CAROL.public).signed(CAROL).encode() for i in range(64))
    rec = dataclasses.replace(SAMPLES[Record], joins=mem, leaves=()).signed(BOB)
    assert decode_as(rec.encode(), Record) == rec
    with pytest.raises(WireError):  # one join too many
        decode(dataclasses.replace(rec, joins=(*mem, mem[0])).encode())


def test_nested_messages_survive_byte_for_byte() -> None:
    resp = decode_as(SAMPLES[ChainResponse].encode(), ChainResponse, RUN)
    rec = decode_as(resp.records[0], Record, RUN)
    assert rec == SAMPLES[Record] and rec.signature_ok()
    for data in rec.joins + rec.leaves:
        assert decode(data, run=RUN).signature_ok()
    ev = decode_as(rec.evidence[0], Equivocation, RUN)
    a, b = decode_as(ev.a, Contribution, RUN), decode_as(ev.b, Contribution, RUN)
    assert a.signature_ok() and b.signature_ok()
    assert a.peer == b.peer and a.round == b.round and a.q != b.q
    fp = decode_as(SAMPLES[FraudProof].encode(), FraudProof, RUN)
    assert merkle_root(list(fp.contributions)) == decode_as(fp.record, Record).contrib_root
    for data in fp.contributions:
        assert decode_as(data, Contribution, RUN).signature_ok()


@pytest.mark.parametrize("cls", SIGNED_CLASSES, ids=_signed_ids)
def test_signed_types_verify(cls: type[Message]) -> None:
    msg = decode(SAMPLES[cls].encode(), run=RUN)
    assert msg.signature_ok()
    unsigned = dataclasses.replace(msg, sig=b"\x00" * SIG_SIZE)  # type: ignore[call-arg]
    assert not unsigned.signature_ok()
    assert unsigned.signed(_identity_of(msg)) == msg  # Ed25519 is deterministic


def test_unsigned_types_have_no_signature_to_check() -> None:
    for cls in ALL_CLASSES:
        if cls.SIGNER is None:
            assert SAMPLES[cls].signature_ok()


def _identity_of(msg: Message) -> Identity:
    pub = getattr(msg, msg.SIGNER)  # type: ignore[arg-type]
    return next(i for i in (ALICE, BOB, CAROL) if i.public == pub)


def _tweak(v: Any) -> Any:
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + 1 if v < MAX_U else v - 1
    if isinstance(v, bytes):
        return bytes([v[0] ^ 0x01]) + v[1:] if v else b"\x00"
    if isinstance(v, tuple):
        return v[:-1] if v else (b"extra",)
    raise AssertionError(type(v))  # pragma: no cover


@pytest.mark.parametrize("cls", SIGNED_CLASSES, ids=_signed_ids)
def test_modified_field_breaks_signature(cls: type[Message]) -> None:
    msg = SAMPLES[cls]
    assert msg.signature_ok()
    names = ["run", *(n for n, _ in cls.SCHEMA)]
    for name in names:
        bad = dataclasses.replace(msg, **{name: _tweak(getattr(msg, name))})
        assert bad != msg
        assert not bad.signature_ok(), f"{cls.__name__}.{name} is not covered by the signature"
        # and after a trip over the wire (a tampered signer key still decodes: 32 bytes)
        assert not decode(bad.encode()).signature_ok(), name
    # a valid key of someone else in the signer field
    other = BOB if getattr(msg, cls.SIGNER) != BOB.public else ALICE  # type: ignore[arg-type]
    stolen = dataclasses.replace(msg, **{cls.SIGNER: other.public})  # type: ignore[dict-item]
    assert not stolen.signature_ok()
    # the signer field must name the signing identity
    with pytest.raises(ValueError):
        msg.signed(other)


def test_signature_does_not_transfer_between_types() -> None:
    """Join and Leave share (round, peer); a Leave's signature makes no valid Join and back."""
    leave = Leave(run=RUN, round=9, peer=ALICE.public).signed(ALICE)
    join = Join(run=RUN, round=9, peer=ALICE.public, cert=b"").signed(ALICE)
    assert not dataclasses.replace(join, sig=leave.sig).signature_ok()
    assert not dataclasses.replace(leave, sig=join.sig).signature_ok()


# ---------------------------------------------------------------------------------------------
# (a) random bytes


@FAST
@given(st.binary(max_size=600))
def test_random_bytes_decode_or_wire_error(data: bytes) -> None:
    _decode_total(data)
    _decode_total(data, run=RUN, expect=Contribution)


@FAST
@given(
    st.integers(0, 15),
    st.sampled_from(sorted(MESSAGE_TYPES)),
    st.booleans(),
    st.binary(max_size=400),
)
def test_random_bytes_behind_a_valid_header(n: int, typ: int, with_run: bool, rest: bytes) -> None:
    """Random bytes after a plausible header reach the full unpacker and the field checks."""
    data = bytes([0x90 | n, PROTOCOL_VERSION, typ]) + (msgpack.packb(RUN) if with_run else b"") + rest
    _decode_total(data)


_msgpack_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=6)
    | st.binary(max_size=70)
)
_msgpack_any = st.recursive(
    _msgpack_leaf,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=3) | st.integers(0, 9), inner, max_size=3),
    max_leaves=12,
)


@FAST
@given(st.sampled_from(ALL_CLASSES), st.lists(_msgpack_any, max_size=11), st.booleans())
def test_arbitrary_msgpack_fields(cls: type[Message], fields: list[Any], good_run: bool) -> None:
    data = msgpack.packb([PROTOCOL_VERSION, cls.TYPE, RUN if good_run else b"x", *fields], use_bin_type=True)
    _decode_total(data)


# ---------------------------------------------------------------------------------------------
# (b) mutated valid encodings

_INTERESTING_BYTES = [
    0x00, 0x01, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6,
    0xC7, 0xCA, 0xCB, 0xCC, 0xCD, 0xCE, 0xCF, 0xD0, 0xD3, 0xD4, 0xD9, 0xDC, 0xDD, 0xDE, 0xDF, 0xE0, 0xFF,
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "duplicate", "splice"]))
        n = len(data)
        if op == "flip" and n:
            data[draw(st.integers(0, n - 1))] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and n:
            # favour the first bytes: that is where the headers and small fields are
            i = draw(st.integers(0, min(n - 1, 48)) | st.integers(0, n - 1))
            data[i] = draw(st.sampled_from(_INTERESTING_BYTES) | st.integers(0, 255))
        elif op == "truncate":
            data = data[: draw(st.integers(0, n))]
        elif op == "insert":
            i = draw(st.integers(0, n))
            data[i:i] = draw(st.binary(min_size=1, max_size=12))
        elif op == "delete" and n:
            i = draw(st.integers(0, n - 1))
            del data[i : draw(st.integers(i + 1, min(n, i + 40)))]
        elif op == "duplicate" and n:
            i = draw(st.integers(0, n - 1))
            j = draw(st.integers(i + 1, min(n, i + 80)))
            data[j:j] = data[i:j]
        elif op == "splice":
            other = draw(st.sampled_from(VALID))
            i, j = draw(st.integers(0, n)), draw(st.integers(0, len(other)))
            data = data[:i] + bytearray(other[j:])
    return bytes(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_encodings(data: bytes) -> None:
    msg = _decode_total(data)
    if msg is not None and msg.SIGNER is not None and msg not in KNOWN_SIGNED:
        # whatever a mutation produced, it cannot carry a valid signature
        assert not msg.signature_ok(), msg


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=_ids)
def test_every_truncation_is_rejected(cls: type[Message]) -> None:
    data = SAMPLES[cls].encode()
    step = max(1, len(data) // 300)
    for cut in [*range(0, len(data), step), len(data) - 1]:
        with pytest.raises(WireError):
            decode(data[:cut])


# ---------------------------------------------------------------------------------------------
# (c) structurally valid msgpack with the wrong types

_WRONG_ANY: list[Any] = [None, 0.0, 1.5, float("nan"), "", "text", {}, {"a": 1}, {1: b"x"}, [], [[b"x"]],
                         msgpack.ExtType(1, b"x")]


def _bad_values(spec: tuple[Any, ...]) -> list[Any]:
    kind = spec[0]
    if kind == "u":
        return [*_WRONG_ANY, -1, -(2**63), MAX_U + 1, 2**64 - 1, True, False, b"\x01", b"", [5], "5"]
    if kind == "bool":
        return [*_WRONG_ANY, 0, 1, -1, b"\x01", "true", [True]]
    if kind == "b":
        n = spec[1]
        return [*_WRONG_ANY, 0, 7, -1, True, b"", b"\x00" * (n - 1), b"\x00" * (n + 1), b"\x00" * (2 * n),
                "a" * n, [b"\x00" * n]]
    if kind == "bin":
        return [*[v for v in _WRONG_ANY if v != ""], 0, 3, -1, True, b"\x00" * (spec[1] + 1), "abc", [b"ab"]]
    if kind == "list":
        items, item_bytes = spec[1], spec[2]
        return [v for v in _WRONG_ANY if v != [] and v != [[b"x"]]] + [
            b"", b"abc", 0, True, [1], [b"ok", 2], [None], ["str"], [True], [[b"nested"]], [{}], [1.0],
            [b"\x00" * (item_bytes + 1)], [b""] * (items + 1),
        ]
    raise AssertionError(kind)  # pragma: no cover


def _field_specs(cls: type[Message]) -> list[tuple[int, str, tuple[Any, ...]]]:
    """(index in the array, name, spec) for run and every schema field."""
    return [(2, "run", ("b", 32)), *((3 + i, n, s) for i, (n, s) in enumerate(cls.SCHEMA))]


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=_ids)
def test_wrong_type_in_every_field(cls: type[Message]) -> None:
    base = SAMPLES[cls]._values()
    accepted = []
    for idx, name, spec in _field_specs(cls):
        for bad in _bad_values(spec):
            vals = list(base)
            vals[idx] = bad
            data = msgpack.packb(vals, use_bin_type=True)
            try:
                decode(data)
            except WireError:
                continue
            accepted.append((name, repr(bad)[:60]))
    assert not accepted, f"{cls.__name__} accepted wrong-typed fields: {accepted}"


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=_ids)
def test_wrong_header_types_and_field_counts(cls: type[Message]) -> None:
    base = SAMPLES[cls]._values()
    cases: list[list[Any]] = []
    for bad_version in [True, False, None, 1.0, "1", b"\x01", [1], {}]:
        cases.append([bad_version, *base[1:]])
    for bad_type in [True, None, float(cls.TYPE), str(cls.TYPE), bytes([cls.TYPE]), [cls.TYPE], -1, 0, 99, 2**32]:
        cases.append([base[0], bad_type, *base[2:]])
    cases.append(base[:-1])  # a field missing
    cases.append([*base, b""])  # one field too many
    cases.append([*base, 0])
    cases.append(base[:2])  # header only
    cases.append(base[:3])
    for vals in cases:
        with pytest.raises(WireError):
            decode(msgpack.packb(vals, use_bin_type=True))
    # not an array at all, or the message wrapped in another container
    enc = SAMPLES[cls].encode()
    for outer in (enc, [enc], [base], {"m": base}, base[3:] if len(base) > 3 else 0, None, 7):
        with pytest.raises(WireError):
            decode(msgpack.packb(outer, use_bin_type=True))


@st.composite
def wrong_typed(draw: st.DrawFn) -> bytes:
    cls = draw(st.sampled_from(ALL_CLASSES))
    vals = list(SAMPLES[cls]._values())
    specs = _field_specs(cls)
    for _ in range(draw(st.integers(1, 3))):
        idx, _, spec = draw(st.sampled_from(specs))
        vals[idx] = draw(st.sampled_from(_bad_values(spec)))
    return bytes(msgpack.packb(vals, use_bin_type=True))


@FAST
@given(wrong_typed())
def test_wrong_types_property(data: bytes) -> None:
    with pytest.raises(WireError):
        decode(data)


# ---------------------------------------------------------------------------------------------
# (d) oversized inputs are rejected before anything is unpacked


@pytest.fixture
def no_unpackb(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record every call of msgpack.unpackb (decode turns its exceptions into WireError, so a
    raising stub would be swallowed: the test checks the list instead)."""
    calls: list[int] = []
    real = msgpack.unpackb

    def spy(data: bytes, *a: Any, **kw: Any) -> Any:
        calls.append(len(data))
        return real(data, *a, **kw)

    monkeypatch.setattr(wire.msgpack, "unpackb", spy)
    return calls


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=_ids)
def test_over_type_limit_rejected_before_unpacking(cls: type[Message], no_unpackb: list[int]) -> None:
    enc = SAMPLES[cls].encode()
    decode(enc)  # the spy works
    assert no_unpackb == [len(enc)]
    no_unpackb.clear()
    # a real header of this type followed by padding up to one byte over the limit
    n_fields = 3 + len(cls.SCHEMA)
    head = bytes([0x90 | n_fields, PROTOCOL_VERSION, cls.TYPE]) + msgpack.packb(RUN)
    data = head + b"\x00" * (cls.MAX_SIZE + 1 - len(head))
    with pytest.raises(WireError, match=str(cls.MAX_SIZE)) as exc:
        decode(data)
    assert not isinstance(exc.value, WrongRun)
    # the valid encoding with trailing bytes up to the limit + 1
    with pytest.raises(WireError, match=str(cls.MAX_SIZE)):
        decode(enc + b"\x00" * (cls.MAX_SIZE + 1 - len(enc)))
    assert no_unpackb == []


def test_over_global_limit_rejected_before_any_parsing(
    monkeypatch: pytest.MonkeyPatch, no_unpackb: list[int]
) -> None:
    def no_header(*a: Any, **kw: Any) -> Any:
        raise AssertionError("the header of an oversized message was parsed")

    enc = SAMPLES[FraudProof].encode()
    data = enc + b"\x00" * (MAX_MESSAGE + 1 - len(enc))
    monkeypatch.setattr(wire.msgpack, "Unpacker", no_header)
    for blob in (data, bytearray(data), memoryview(data), b"\xff" * (MAX_MESSAGE + 1)):
        with pytest.raises(WireError, match=str(MAX_MESSAGE)):
            decode(blob)
    assert no_unpackb == []


def test_declared_huge_containers_are_rejected_cheaply() -> None:
    """Headers claiming 4 GiB of bytes or 2**32 items in a short message fail fast."""
    big_bin = bytes([0x97, PROTOCOL_VERSION, Contribution.TYPE]) + b"\xc6\xff\xff\xff\xff" + b"\x00" * 40
    big_array = b"\xdd\xff\xff\xff\xff" + bytes([PROTOCOL_VERSION, ChainResponse.TYPE]) + b"\x00" * 40
    big_list = msgpack.packb([PROTOCOL_VERSION, ChainResponse.TYPE, RUN, 0, 0])[:-1] + b"\xdd\xff\xff\xff\xff"
    big_map = bytes([0x93, PROTOCOL_VERSION, Heartbeat.TYPE]) + b"\xdf\xff\xff\xff\xff"
    for data in (big_bin, big_array, big_list, big_map):
        with pytest.raises(WireError):
            decode(data)


def test_encode_refuses_oversized_message() -> None:
    with pytest.raises(WireError, match=str(Contribution.MAX_SIZE)):
        Contribution(run=RUN, round=1, peer=ALICE.public, q=b"\x00" * (Contribution.MAX_SIZE + 1)).encode()
    with pytest.raises(WireError):
        Heartbeat(run=RUN, round=1, peer=b"p" * 300, head=b"h" * 32).encode()


# ---------------------------------------------------------------------------------------------
# (e) run ids, versions, types, expectations, trailing bytes, non-bytes input


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=_ids)
def test_wrong_run_raises_wrong_run(cls: type[Message]) -> None:
    msg = dataclasses.replace(SAMPLES[cls], run=OTHER_RUN)
    data = msg.encode()
    assert decode(data) == msg  # run=None: tools accept any run
    with pytest.raises(WrongRun):
        decode(data, run=RUN)
    with pytest.raises(WrongRun):
        decode_as(data, cls, RUN)
    assert decode(data, run=OTHER_RUN) == msg


@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1, 255, 2**32])
def test_wrong_protocol_version_raises_wrong_run(version: int) -> None:
    for msg in SAMPLES.values():
        vals = msg._values()
        vals[0] = version
        with pytest.raises(WrongRun, match="protocol version"):
            decode(msgpack.packb(vals, use_bin_type=True))
        with pytest.raises(WrongRun):
            decode(msgpack.packb(vals, use_bin_type=True), run=RUN)


@pytest.mark.parametrize("typ", [0, len(MESSAGE_TYPES) + 1, 99, 127, 2**16])
def test_unknown_type_is_wire_error(typ: int) -> None:
    vals = SAMPLES[Heartbeat]._values()
    vals[1] = typ
    with pytest.raises(WireError, match="unknown message type") as exc:
        decode(msgpack.packb(vals, use_bin_type=True))
    assert not isinstance(exc.value, WrongRun)


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=_ids)
def test_expect_mismatch(cls: type[Message]) -> None:
    data = SAMPLES[cls].encode()
    other = Heartbeat if cls is not Heartbeat else Contribution
    with pytest.raises(WireError, match="expected"):
        decode(data, expect=other)
    with pytest.raises(WireError):
        decode_as(data, other)
    with pytest.raises(WireError):
        decode_as(data, other, RUN)
    assert decode_as(data, cls) == SAMPLES[cls]


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=_ids)
@pytest.mark.parametrize("tail", [b"\x00", b"\xc0", b"\x90", b"\xff\xff", "msg"], ids=["zero", "nil", "array", "ff", "msg"])
def test_trailing_garbage(cls: type[Message], tail: bytes | str) -> None:
    data = SAMPLES[cls].encode()
    extra = SAMPLES[Heartbeat].encode() if tail == "msg" else tail
    assert isinstance(extra, bytes)
    with pytest.raises(WireError):
        decode(data + extra)


@pytest.mark.parametrize("bad", [None, 0, 1.5, "text", [1, 2], {"a": b"b"}, b"\x93\x01\x06".decode("latin-1"),
                                 [b"\x96"], object(), True])
def test_non_bytes_input(bad: Any) -> None:
    with pytest.raises(WireError):
        decode(bad)


def test_empty_input() -> None:
    with pytest.raises(WireError):
        decode(b"")
    with pytest.raises(WireError):
        decode(bytearray())


def test_wire_error_hierarchy() -> None:
    assert issubclass(WrongRun, WireError)
    assert issubclass(WireError, Exception)
    assert not issubclass(WireError, (ValueError, TypeError))


# ---------------------------------------------------------------------------------------------
# sizes


def test_contribution_size_k64() -> None:
    """A trainer's whole upload per round: K bytes plus at most 160 bytes of framing."""
    for rnd in (0, 7, 2**31, MAX_U):
        c = Contribution(run=RUN, round=rnd, peer=ALICE.public, q=_q(5)).signed(ALICE)
        assert len(c.encode()) <= K + 160
    # exactly: 3 header + 34 run + 9 round (worst case) + 34 peer + 66 q + 66 sig = 212
    assert len(Contribution(run=RUN, round=MAX_U, peer=ALICE.public, q=_q(5)).encode()) == 212


def test_record_size_k64_64_trainers() -> None:
    """The record every node receives each round, K=64 directions (one group), 64 trainers.

    Framing: 3 header + 34 run + 9 round + 34 prev + 34 aggregator + 10 bitmap (8 bytes for 64
    trainers) + 34 contrib_root + 2 + 2K aggregate (int16 per direction) + 3 empty lists + 66 sig
    = 229 + 2K bytes = 357 bytes for K=64 (bin16 framing adds 1 byte once 2K > 255).
    """
    trainers = 64
    rec = Record(
        run=RUN, round=MAX_U, prev=b"p" * 32, aggregator=BOB.public, contributors=b"\xff" * (trainers // 8),
        contrib_root=b"c" * 32, aggregate=b"\x01\x02" * K,
    ).signed(BOB)
    size = len(rec.encode())
    assert size == 229 + 2 * K == 357
    assert size <= 2 * K + 300
    # membership entries are carried whole: each join adds its full encoding plus framing
    join = SAMPLES[Join].encode()
    with_join = dataclasses.replace(rec, joins=(join,)).encode()
    assert len(with_join) - size <= len(join) + 3


# ---------------------------------------------------------------------------------------------
# regressions of bugs found by these tests


def test_checkpoint_manifest_with_many_chunks_round_trips() -> None:
    man = CheckpointManifest(
        run=RUN, round=1, head=b"h" * 32, state=b"s" * 32, size=5000 * MAX_CHUNK,
        chunks=tuple(h(b"test/chunk", i.to_bytes(4, "big")) for i in range(5000)),
    )
    data = man.encode()
    assert len(data) <= CheckpointManifest.MAX_SIZE
    assert decode(data) == man


def _noncanonical_variants() -> list[tuple[bytes, Message]]:
    hb = SAMPLES[Heartbeat]
    assert isinstance(hb, Heartbeat)
    run_bin8 = msgpack.packb(RUN, use_bin_type=True)
    out = []
    # round 8 as uint64 instead of a positive fixint
    out.append((b"\x96\x01\x06" + run_bin8 + b"\xcf" + struct.pack(">Q", hb.round)
                + msgpack.packb(hb.peer) + msgpack.packb(hb.head), hb))
    # array16 header instead of fixarray
    out.append((b"\xdc\x00\x06" + hb.encode()[1:], hb))
    # run id as bin16 instead of bin8
    out.append((b"\x96\x01\x06\xc5\x00\x20" + RUN + hb.encode()[3 + len(run_bin8):], hb))
    # a signed contribution whose round is re-encoded as uint32: a second byte string that
    # carries the same, valid signature
    c = SAMPLES[Contribution]
    enc = c.encode()
    at = 3 + len(run_bin8)
    assert enc[at] == c.round  # type: ignore[attr-defined]
    out.append((enc[:at] + b"\xce" + struct.pack(">I", c.round) + enc[at + 1:], c))  # type: ignore[attr-defined]
    return out


def test_decode_accepts_only_canonical_encodings() -> None:
    for data, _ in _noncanonical_variants():
        with pytest.raises(WireError):
            decode(data)
