"""Tests of crypto/keys.py (identities, key files, signatures) and crypto/hashing.py."""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seedswarm.crypto.hashing import (
    HASH_SIZE,
    beacon_of,
    h,
    merkle_root,
    rank_key,
    round_seed,
    u64,
)
from seedswarm.crypto.keys import (
    KEY_FILE_MAGIC,
    PUBKEY_SIZE,
    SIG_SIZE,
    Identity,
    KeyFileError,
    verify,
)

SEED = bytes(range(32))
RUN = h(b"test/run", b"a")
RUN2 = h(b"test/run", b"b")


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


# ---------------------------------------------------------------------------------------------
# identities and key files


def test_from_seed_is_deterministic() -> None:
    a, b = Identity.from_seed(SEED), Identity.from_seed(SEED)
    assert a.public == b.public
    assert a.seed == SEED
    assert len(a.public) == PUBKEY_SIZE
    assert a.sign(b"d", RUN, b"p") == b.sign(b"d", RUN, b"p")  # Ed25519 signatures are deterministic
    assert Identity.from_seed(bytes(32)).public != a.public
    assert Identity.from_seed(a.seed).public == a.public


@pytest.mark.parametrize("n", [0, 16, 31, 33, 64])
def test_from_seed_wrong_length(n: int) -> None:
    with pytest.raises(ValueError):
        Identity.from_seed(b"\x01" * n)


def test_generate_is_random() -> None:
    assert Identity.generate().public != Identity.generate().public


def test_save_load_roundtrip(tmp_path: Path) -> None:
    ident = Identity.generate()
    path = tmp_path / "sub" / "dir" / "node.key"  # parents are created
    ident.save(path)
    assert _mode(path) == 0o600
    assert path.read_bytes().startswith(KEY_FILE_MAGIC)
    loaded = Identity.load(path)
    assert loaded.public == ident.public and loaded.seed == ident.seed
    assert Identity.load(str(path)).public == ident.public
    assert [p.name for p in path.parent.iterdir()] == ["node.key"]  # no temporary file left


def test_save_mode_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "k"
        Identity.generate().save(path)
    finally:
        os.umask(old)
    assert _mode(path) == 0o600


def test_save_overwrites_and_fixes_a_stale_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "k"
    stale = tmp_path / "k.tmp"
    stale.write_bytes(b"junk from a crash")
    stale.chmod(0o644)
    first, second = Identity.generate(), Identity.generate()
    first.save(path)
    second.save(path)
    assert _mode(path) == 0o600
    assert Identity.load(path).public == second.public
    assert not stale.exists()


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604, 0o660, 0o606, 0o620, 0o610, 0o601, 0o777])
def test_load_refuses_group_or_world_accessible_file(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "k"
    Identity.generate().save(path)
    path.chmod(mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        Identity.load(path)
    with pytest.raises(KeyFileError):
        Identity.load_or_create(path)  # an existing bad file is never silently replaced
    path.chmod(0o600)
    Identity.load(path)
    path.chmod(0o400)  # read-only for the owner is fine
    Identity.load(path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x00\xff\xfe garbage",
        SEED.hex().encode() + b"\n",  # no magic line
        KEY_FILE_MAGIC,  # magic, no key
        KEY_FILE_MAGIC + b"zz" * 32 + b"\n",  # not hex
        KEY_FILE_MAGIC + SEED.hex()[:-2].encode() + b"\n",  # 31 bytes
        KEY_FILE_MAGIC + (SEED + b"\x00").hex().encode() + b"\n",  # 33 bytes
        KEY_FILE_MAGIC + b"\xff\xfe\x80" * 10,  # not UTF-8
        KEY_FILE_MAGIC.replace(b"v1", b"v2") + SEED.hex().encode() + b"\n",
    ],
    ids=["empty", "binary", "no-magic", "magic-only", "not-hex", "short", "long", "not-utf8", "wrong-version"],
)
def test_load_refuses_garbage(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "k"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError):
        Identity.load(path)


def test_load_accepts_whitespace_around_the_hex(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes(KEY_FILE_MAGIC + b"  " + SEED.hex().upper().encode() + b"\r\n")
    path.chmod(0o600)
    assert Identity.load(path).seed == SEED


def test_load_missing_or_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError):
        Identity.load(tmp_path / "missing")
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    with pytest.raises(KeyFileError):
        Identity.load(d)


def test_load_or_create_is_stable(tmp_path: Path) -> None:
    path = tmp_path / "state" / "node.key"
    a = Identity.load_or_create(path)
    assert path.exists() and _mode(path) == 0o600
    before = path.read_bytes()
    b = Identity.load_or_create(path)
    c = Identity.load_or_create(str(path))
    assert a.public == b.public == c.public
    assert path.read_bytes() == before  # loading never rewrites the file
    assert Identity.load_or_create(tmp_path / "other.key").public != a.public


def test_saved_file_format(tmp_path: Path) -> None:
    path = tmp_path / "k"
    Identity.from_seed(SEED).save(path)
    assert path.read_bytes() == KEY_FILE_MAGIC + SEED.hex().encode() + b"\n"


# ---------------------------------------------------------------------------------------------
# signatures

ALICE = Identity.from_seed(SEED)
BOB = Identity.from_seed(bytes(range(1, 33)))


def test_sign_verify() -> None:
    sig = ALICE.sign(b"contribution", RUN, b"payload")
    assert len(sig) == SIG_SIZE
    assert verify(ALICE.public, b"contribution", RUN, b"payload", sig) is True


def test_domain_separation() -> None:
    sig = ALICE.sign(b"join", RUN, b"payload")
    for other in (b"leave", b"joi", b"join\x00", b"", b"JOIN"):
        assert verify(ALICE.public, other, RUN, b"payload", sig) is False
    # the domain is length-prefixed: moving bytes across its end changes the signed input
    sig2 = ALICE.sign(b"ab", RUN, b"payload")
    assert verify(ALICE.public, b"a", b"b" + RUN[:-1], RUN[-1:] + b"payload", sig2) is False


def test_run_separation() -> None:
    sig = ALICE.sign(b"record", RUN, b"payload")
    assert verify(ALICE.public, b"record", RUN2, b"payload", sig) is False
    assert verify(ALICE.public, b"record", RUN[:-1] + bytes([RUN[-1] ^ 1]), b"payload", sig) is False


def test_payload_tamper() -> None:
    payload = bytes(range(200))
    sig = ALICE.sign(b"record", RUN, payload)
    for i in (0, 1, 100, 199):
        bad = bytearray(payload)
        bad[i] ^= 0x40
        assert verify(ALICE.public, b"record", RUN, bytes(bad), sig) is False
    assert verify(ALICE.public, b"record", RUN, payload[:-1], sig) is False
    assert verify(ALICE.public, b"record", RUN, payload + b"\x00", sig) is False
    assert verify(ALICE.public, b"record", RUN, b"", sig) is False


def test_signature_tamper_and_wrong_key() -> None:
    sig = ALICE.sign(b"record", RUN, b"x")
    assert verify(BOB.public, b"record", RUN, b"x", sig) is False
    for i in (0, 31, 32, 63):
        bad = bytearray(sig)
        bad[i] ^= 0x01
        assert verify(ALICE.public, b"record", RUN, b"x", bytes(bad)) is False


@pytest.mark.parametrize(
    ("public", "sig"),
    [
        (b"", b""),
        (ALICE.public[:31], ALICE.sign(b"d", RUN, b"x")),
        (ALICE.public + b"\x00", ALICE.sign(b"d", RUN, b"x")),
        (ALICE.public, ALICE.sign(b"d", RUN, b"x")[:63]),
        (ALICE.public, ALICE.sign(b"d", RUN, b"x") + b"\x00"),
        (ALICE.public, b""),
        (b"", ALICE.sign(b"d", RUN, b"x")),
        (b"\x00" * 32, b"\x00" * 64),  # small-order point, zero signature
        (b"\xff" * 32, b"\xff" * 64),  # not a curve point / S >= L
    ],
)
def test_bad_keys_and_lengths_return_false(public: bytes, sig: bytes) -> None:
    assert verify(public, b"d", RUN, b"x", sig) is False


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40), st.binary(max_size=8), st.binary(max_size=40), st.binary(max_size=80))
def test_verify_never_raises_on_bytes(public: bytes, domain: bytes, payload: bytes, sig: bytes) -> None:
    assert verify(public, domain, RUN, payload, sig) is False


def test_signature_malleability_s_plus_l_rejected() -> None:
    """Ed25519's S must be < L: adding L to a valid S gives another 64-byte string that must fail."""
    ell = 2**252 + 27742317777372353535851937790883648493
    sig = ALICE.sign(b"d", RUN, b"x")
    s = int.from_bytes(sig[32:], "little") + ell
    if s < 2**256:
        assert verify(ALICE.public, b"d", RUN, b"x", sig[:32] + s.to_bytes(32, "little")) is False


def test_run_ids_must_be_32_bytes() -> None:
    """Run ids are fixed-length, which keeps (run, payload) unambiguous in the signing input."""
    with pytest.raises(ValueError):
        ALICE.sign(b"record", b"\x01" * 31, b"\x02payload")
    sig = ALICE.sign(b"record", b"\x01" * 32, b"payload")
    assert verify(ALICE.public, b"record", b"\x01" * 31, b"\x01payload", sig) is False


IDENTITY_POINT = b"\x01" + b"\x00" * 31  # the neutral element of edwards25519 (order 1)


@pytest.mark.parametrize(("domain", "payload"), [(b"join", b"x"), (b"contribution", b"\x00" * 64)], ids=["join", "contribution"])
def test_small_order_public_key_is_rejected(domain: bytes, payload: bytes) -> None:
    assert verify(IDENTITY_POINT, domain, RUN, payload, IDENTITY_POINT + b"\x00" * 32) is False


# ---------------------------------------------------------------------------------------------
# hashing


def test_h_format_known_answer() -> None:
    """The framing is consensus-critical: pin it (>H domain length, >I per part)."""
    expected = hashlib.sha256(b"\x00\x03dom" + b"\x00\x00\x00\x02ab" + b"\x00\x00\x00\x00").digest()
    assert h(b"dom", b"ab", b"") == expected
    assert len(h(b"d")) == HASH_SIZE == 32


def test_h_is_unambiguous() -> None:
    d = b"seedswarm/test"
    assert h(d, b"ab", b"c") != h(d, b"a", b"bc")
    assert h(d, b"abc") != h(d, b"ab", b"c")
    assert h(d, b"") != h(d)
    assert h(d, b"", b"") != h(d, b"")
    assert h(d, b"a", b"") != h(d, b"", b"a")


def test_h_is_domain_separated() -> None:
    assert h(b"a", b"x") != h(b"b", b"x")
    assert h(b"ab", b"c") != h(b"a", b"bc")
    assert h(b"a", b"b") != h(b"ab")
    assert h(b"", b"x") != h(b"x")


@settings(max_examples=200, deadline=None)
@given(
    st.tuples(st.binary(max_size=4), st.lists(st.binary(max_size=4), max_size=4)),
    st.tuples(st.binary(max_size=4), st.lists(st.binary(max_size=4), max_size=4)),
)
def test_h_injective_property(a: tuple[bytes, list[bytes]], b: tuple[bytes, list[bytes]]) -> None:
    if a != b:
        assert h(a[0], *a[1]) != h(b[0], *b[1])
    else:
        assert h(a[0], *a[1]) == h(b[0], *b[1])


def test_u64_and_derivations() -> None:
    assert u64(1) == b"\x00" * 7 + b"\x01"
    assert u64(2**64 + 5) == u64(5)
    assert u64(-1) == b"\xff" * 8
    b1 = beacon_of(b"r" * 32)
    assert len(b1) == 32 and b1 != beacon_of(b"s" * 32)
    assert b1 != h(b"seedswarm/round-seed", b"r" * 32)
    seed = round_seed(b1)
    assert 0 <= seed < 2**64 and seed == round_seed(b1) and seed != round_seed(beacon_of(b"s" * 32))
    assert seed == struct.unpack(">Q", h(b"seedswarm/round-seed", b1)[:8])[0]
    assert rank_key(b"trainer", b1, b"p" * 32) == h(b"trainer", b1, b"p" * 32)
    assert rank_key(b"trainer", b1, b"p" * 32) != rank_key(b"aggregator", b1, b"p" * 32)


# merkle


def test_merkle_empty_is_fixed() -> None:
    assert merkle_root([]) == merkle_root([]) == h(b"seedswarm/merkle-empty")
    assert merkle_root([]) != merkle_root([b""])


def test_merkle_single_leaf_is_hashed() -> None:
    assert merkle_root([b"a"]) == h(b"seedswarm/merkle-leaf", b"a")
    assert merkle_root([b"a"]) != b"a"
    # a 32-byte leaf is not taken for an interior node
    x = h(b"seedswarm/merkle-leaf", b"x")
    assert merkle_root([x]) != x


def test_merkle_order_sensitive() -> None:
    a, b, c = b"a", b"b", b"c"
    assert merkle_root([a, b]) != merkle_root([b, a])
    assert merkle_root([a, b, c]) != merkle_root([a, c, b])
    assert merkle_root([a, b, c]) != merkle_root([c, b, a])


def test_merkle_odd_counts() -> None:
    leaves = [bytes([i]) * 3 for i in range(17)]
    roots = [merkle_root(leaves[:n]) for n in range(18)]
    assert len(set(roots)) == len(roots)
    # three leaves: node(node(a, b), leaf(c)), the odd one promoted unchanged
    la, lb, lc = (h(b"seedswarm/merkle-leaf", x) for x in leaves[:3])
    assert roots[3] == h(b"seedswarm/merkle-node", h(b"seedswarm/merkle-node", la, lb), lc)


def test_merkle_no_second_preimage_by_duplicating_the_last_leaf() -> None:
    a, b, c, d, e = b"a", b"b", b"c", b"d", b"e"
    assert merkle_root([a, b, c]) != merkle_root([a, b, c, c])
    assert merkle_root([a]) != merkle_root([a, a])
    assert merkle_root([a, b, c, d, e]) != merkle_root([a, b, c, d, e, e])
    assert merkle_root([a, b, c, d, e]) != merkle_root([a, b, c, d, e, e, e, e])


def test_merkle_interior_nodes_are_not_leaves() -> None:
    """Presenting the level-1 hashes as leaves gives a different root (leaf/node domains)."""
    leaves = [b"a", b"b", b"c", b"d"]
    lh = [h(b"seedswarm/merkle-leaf", x) for x in leaves]
    level1 = [h(b"seedswarm/merkle-node", lh[0], lh[1]), h(b"seedswarm/merkle-node", lh[2], lh[3])]
    assert merkle_root(leaves) == h(b"seedswarm/merkle-node", *level1)
    assert merkle_root(level1) != merkle_root(leaves)
    assert merkle_root([lh[0] + lh[1]]) != merkle_root(leaves[:2])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from([b"", b"a", b"b", b"ab"]), max_size=9),
    st.lists(st.sampled_from([b"", b"a", b"b", b"ab"]), max_size=9),
)
def test_merkle_injective_property(x: list[bytes], y: list[bytes]) -> None:
    assert (merkle_root(x) == merkle_root(y)) == (x == y)
    assert merkle_root(x) == merkle_root(list(x))
