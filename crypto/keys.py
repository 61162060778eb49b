"""Ed25519 identities and domain-separated signatures.

A node's identity is one Ed25519 key. On the wire and in the chain a peer is named by its raw
32-byte public key; the libp2p adapter derives the libp2p peer id from the same key, so one
file is both the chain identity and the network identity.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PUBKEY_SIZE = 32
SIG_SIZE = 64
KEY_FILE_MAGIC = b"seedswarm-ed25519-v1\n"


class KeyFileError(Exception):
    """A key file is missing, malformed or readable by others."""


_P = 2**255 - 19
_D = (-121665 * pow(121666, _P - 2, _P)) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


@functools.lru_cache(maxsize=65536)
def is_weak_public_key(public: bytes) -> bool:
    """True for encodings that are not canonical curve points or have small order.

    OpenSSL accepts small-order keys, and with one of them a fixed signature verifies for any
    message (anyone could sign "as" that peer). libsodium rejects them; so do we: decompress the
    point and check that 8·P is not the identity.
    """
    if len(public) != PUBKEY_SIZE:
        return True
    y = int.from_bytes(public, "little") & ((1 << 255) - 1)
    sign = public[31] >> 7
    if y >= _P:
        return True
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x = u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P) % _P
    if (v * x * x - u) % _P:
        x = x * _SQRT_M1 % _P
        if (v * x * x - u) % _P:
            return True  # not on the curve
    if x == 0 and sign:
        return True
    if x & 1 != sign:
        x = _P - x
    # three doublings in extended coordinates (a = -1)
    X, Y, Z = x, y, 1
    for _ in range(3):
        A, B = X * X % _P, Y * Y % _P
        C = 2 * Z * Z % _P
        E = ((X + Y) ** 2 - A - B) % _P
        G = (B - A) % _P
        F = (G - C) % _P
        H = (-A - B) % _P
        X, Y, Z = E * F % _P, G * H % _P, F * G % _P
    return X == 0 and Y == Z


def _signing_input(domain: bytes, run_id: bytes, payload: bytes) -> bytes:
    # Domain (message type) and run id are bound into every signature: a signature made for
    # one message type or one swarm verifies for no other.
    return b"seedswarm/sig\x00" + len(domain).to_bytes(1, "big") + domain + run_id + payload


@dataclass(frozen=True)
class Identity:
    """A private Ed25519 key with its public half."""

    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """Deterministic identity from 32 bytes (the simulator and tests use this)."""
        if len(seed) != 32:
            raise ValueError("an Ed25519 seed is 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def seed(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    @property
    def public(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def sign(self, domain: bytes, run_id: bytes, payload: bytes) -> bytes:
        if len(run_id) != 32:
            raise ValueError("run ids are 32 bytes")
        return self.private.sign(_signing_input(domain, run_id, payload))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key with 0600 permissions, atomically (never a half-written key)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.unlink(missing_ok=True)  # never reuse a stale temp file with looser permissions
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, KEY_FILE_MAGIC + self.seed.hex().encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o600)
        os.replace(tmp, p)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        p = Path(path)
        try:
            st = p.stat()
            data = p.read_bytes()
        except OSError as e:
            raise KeyFileError(f"cannot read key file {p}: {e.strerror}") from e
        if st.st_mode & 0o077:
            raise KeyFileError(f"key file {p} is readable by others (mode {oct(st.st_mode & 0o777)}); chmod 600 it")
        if not data.startswith(KEY_FILE_MAGIC):
            raise KeyFileError(f"{p} is not a seedswarm key file")
        try:
            seed = bytes.fromhex(data[len(KEY_FILE_MAGIC):].strip().decode())
            return cls.from_seed(seed)
        except (ValueError, UnicodeDecodeError) as e:
            raise KeyFileError(f"{p}: malformed key: {e}") from e

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        if Path(path).exists():
            return cls.load(path)
        ident = cls.generate()
        ident.save(path)
        return ident


def verify(public: bytes, domain: bytes, run_id: bytes, payload: bytes, sig: bytes) -> bool:
    """True iff sig is public's signature of payload under this domain and run id."""
    if not all(isinstance(x, bytes) for x in (public, domain, run_id, payload, sig)):
        return False
    if len(public) != PUBKEY_SIZE or len(sig) != SIG_SIZE or len(run_id) != 32:
        return False
    if is_weak_public_key(public):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(sig, _signing_input(domain, run_id, payload))
    except (InvalidSignature, ValueError):
        return False
    return True


# ---------------------------------------------------------------------------------------------
# libp2p peer ids of chain identities (no libp2p import: the core and the in-memory transport
# name peers exactly as the libp2p adapter does)

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}
# identity multihash (0x00, length 36) of the protobuf PublicKey {Type: Ed25519 (1), Data: 32 bytes}
_PEER_ID_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])


def _b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = _B58[r] + out
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + out


def _b58decode(text: str) -> bytes:
    n = 0
    for c in text:
        n = n * 58 + _B58_INDEX[c]
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * (len(text) - len(text.lstrip("1"))) + body


def peer_id_of(public_key: bytes) -> str:
    """The libp2p peer id (base58) of a raw 32-byte Ed25519 public key."""
    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return _b58encode(_PEER_ID_PREFIX + public_key)


def public_key_of(peer_id: str) -> bytes:
    """The raw Ed25519 public key inside a peer id (inverse of :func:`peer_id_of`); ValueError
    for anything else (another key type, a hashed id, not base58)."""
    if not isinstance(peer_id, str) or len(peer_id) > 128:
        raise ValueError("not a peer id")
    try:
        raw = _b58decode(peer_id)
    except KeyError:
        raise ValueError(f"not a peer id: {peer_id[:60]!r}") from None
    if len(raw) != 38 or not raw.startswith(_PEER_ID_PREFIX):
        raise ValueError(f"peer id {peer_id[:60]!r} does not embed an Ed25519 key")
    return raw[6:]
