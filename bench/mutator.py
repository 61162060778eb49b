"""Seeded mutations that turn valid wire messages into hostile ones (chaos adversary, fuzzer).

:class:`Mutator` makes bit flips, truncations, extensions, msgpack type confusion, field swaps,
length lies, header lies and splices; :func:`with_version` relabels a message's protocol
version. Pure byte work with no network, kept apart from the peers that send the results.
"""

from __future__ import annotations

import random
from typing import Any

import msgpack

from seedswarm import PROTOCOL_VERSION
from seedswarm.bench.hostile_peer import OTHER_RUN
from seedswarm.gossip.wire import MAX_U

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
