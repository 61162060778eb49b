"""Hashing, beacon and seed derivation.

One hash (SHA-256) everywhere, always with an explicit domain tag, so that a digest made for one
purpose (a record hash, a committee rank, a direction seed) can never be replayed as another.
"""

from __future__ import annotations

import hashlib
import struct

HASH_SIZE = 32


def part(p: bytes) -> bytes:
    """One length-prefixed part, as :func:`h` frames it."""
    return struct.pack(">I", len(p)) + p


def hasher(domain: bytes, *parts: bytes) -> hashlib._Hash:
    """The SHA-256 state of :func:`h` after ``domain`` and ``parts``: a search that varies only
    the last part (join work) copies it instead of hashing the fixed prefix again."""
    m = hashlib.sha256()
    m.update(struct.pack(">H", len(domain)))
    m.update(domain)
    for p in parts:
        m.update(part(p))
    return m


def h(domain: bytes, *parts: bytes) -> bytes:
    """SHA-256 over a domain tag and length-prefixed parts (unambiguous concatenation)."""
    return hasher(domain, *parts).digest()


def u64(x: int) -> bytes:
    return struct.pack(">Q", x & 0xFFFFFFFFFFFFFFFF)


_MASK64 = (1 << 64) - 1


def check_u64(name: str, x: int) -> int:
    """``x`` if it is an int in [0, 2**64); a TypeError or ValueError naming ``name`` otherwise."""
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if not 0 <= x <= _MASK64:
        raise ValueError(f"{name} must be in [0, 2**64), got {x}")
    return x


def stream_seed(round_seed: int, k: int) -> int:
    """64-bit seed of direction ``k`` of the round whose seed is ``round_seed``.

    SHA-256 under its own domain tag (as every derivation here), so streams of different
    (round, k) are unrelated and cannot collide with any other digest's use. Torch-free: the
    chain derives stream seeds; only the direction generator (``crypto.directions``) needs torch.
    """
    check_u64("round_seed", round_seed)
    check_u64("k", k)
    return int.from_bytes(h(b"seedswarm/direction-stream", u64(round_seed), u64(k))[:8], "big")


def beacon_of(record_hash: bytes) -> bytes:
    """Beacon of round r+1 is derived from the hash of record r (DESIGN.md 3.1)."""
    return h(b"seedswarm/beacon", record_hash)


def round_seed(beacon: bytes) -> int:
    """The 64-bit seed from which all of a round's shared directions are generated."""
    return int.from_bytes(h(b"seedswarm/round-seed", beacon)[:8], "big")


def rank_key(domain: bytes, beacon: bytes, peer: bytes) -> bytes:
    """Rendezvous-hashing key of a peer for one round (lower ranks first)."""
    return h(domain, beacon, peer)


def merkle_root(leaves: list[bytes]) -> bytes:
    """Merkle root over leaf byte strings (leaves and nodes hashed under distinct domains).

    An empty list has a fixed root. An odd node is promoted unchanged, so no leaf can be
    duplicated to forge a second preimage.
    """
    if not leaves:
        return h(b"seedswarm/merkle-empty")
    level = [h(b"seedswarm/merkle-leaf", leaf) for leaf in leaves]
    while len(level) > 1:
        nxt = [h(b"seedswarm/merkle-node", level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]
