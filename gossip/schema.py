"""The wire schema machinery: field specs, their checks, the :class:`Message` base class and
the errors and size limits every message shares.

Split from :mod:`seedswarm.gossip.wire` (the messages themselves, decoding, protocol names),
which re-exports everything here; import from there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, cast

import msgpack

from seedswarm import PROTOCOL_VERSION
from seedswarm.crypto.hashing import h
from seedswarm.crypto.keys import SIG_SIZE, Identity, verify

_Self = TypeVar("_Self", bound="Message")

RUN_ID_SIZE = 32
HASH_SIZE = 32
MAX_MESSAGE = 5 * 1024 * 1024
MAX_DIRECTIONS = 4096  # K times groups: bytes in a contribution, int16 entries in an aggregate
MAX_COMMITTEE = 4096
MAX_MEMBERSHIP_ENTRIES = 64
MAX_CHUNK = 1024 * 1024
MAX_RECORDS_PER_RESPONSE = 1024
MAX_U = (1 << 63) - 1


class WireError(Exception):
    """Bytes that are not a valid seedswarm message (malformed, oversized, wrong type...)."""


class WrongRun(WireError):
    """A well-formed message of another swarm (run id) or another protocol version."""


class WrongVersion(WrongRun):
    """A message of another protocol version (counted apart from another swarm's)."""


# ---------------------------------------------------------------------------------------------
# field specs: ("u",) unsigned int; ("b", n) exactly n bytes; ("bin", max) up to max bytes;
# ("list", max_items, max_item_bytes) a list of bin; ("bool",)


_Spec = tuple[Any, ...]
U: _Spec = ("u",)
B32: _Spec = ("b", 32)
SIG: _Spec = ("b", SIG_SIZE)
BOOL: _Spec = ("bool",)


def BIN(n: int) -> _Spec:  # noqa: N802 - reads as a type in the schema tables below
    return ("bin", n)


def LIST(items: int, item_bytes: int) -> _Spec:  # noqa: N802
    return ("list", items, item_bytes)


def _check(name: str, spec: _Spec, v: Any) -> Any:
    kind = spec[0]
    if kind == "u":
        if type(v) is not int or v < 0 or v > MAX_U:
            raise WireError(f"field {name}: expected an unsigned integer")
        return v
    if kind == "bool":
        if type(v) is not bool:
            raise WireError(f"field {name}: expected a boolean")
        return v
    if kind == "b":
        if type(v) is not bytes or len(v) != spec[1]:
            raise WireError(f"field {name}: expected exactly {spec[1]} bytes")
        return v
    if kind == "bin":
        if type(v) is not bytes or len(v) > spec[1]:
            raise WireError(f"field {name}: expected at most {spec[1]} bytes")
        return v
    if kind == "list":
        if type(v) is not list or len(v) > spec[1]:
            raise WireError(f"field {name}: expected a list of at most {spec[1]} items")
        for item in v:
            if type(item) is not bytes or len(item) > spec[2]:
                raise WireError(f"field {name}: list items must be at most {spec[2]} bytes")
        return tuple(v)
    raise AssertionError(kind)  # pragma: no cover


@dataclass(frozen=True)
class Message:
    """Base of all wire messages. Subclasses declare TYPE, SCHEMA, MAX_SIZE (and SIGNER)."""

    TYPE: ClassVar[int]
    SCHEMA: ClassVar[tuple[tuple[str, _Spec], ...]]
    MAX_SIZE: ClassVar[int]
    SIGNER: ClassVar[str | None] = None  # name of the field holding the signer's public key
    DOMAIN: ClassVar[bytes] = b""

    run: bytes

    def _values(self) -> list[Any]:
        out: list[Any] = [PROTOCOL_VERSION, self.TYPE, self.run]
        for name, _ in self.SCHEMA:
            v = getattr(self, name)
            out.append(list(v) if isinstance(v, tuple) else v)
        return out

    def encode(self) -> bytes:
        cached = self.__dict__.get("_encoded")
        if cached is not None:
            return cached
        data: bytes = msgpack.packb(self._values(), use_bin_type=True)
        if len(data) > self.MAX_SIZE:
            raise WireError(f"{type(self).__name__} of {len(data)} bytes exceeds {self.MAX_SIZE}")
        object.__setattr__(self, "_encoded", data)  # immutable message: encode once
        return data

    def signing_payload(self) -> bytes:
        """The bytes a signature covers: the encoding without the trailing signature field."""
        vals = self._values()
        assert self.SCHEMA[-1][0] == "sig"
        packed: bytes = msgpack.packb(vals[:-1], use_bin_type=True)
        return packed

    def signed(self: _Self, identity: Identity) -> _Self:
        assert self.SIGNER is not None
        if getattr(self, self.SIGNER) != identity.public:
            raise ValueError("signer field does not match the signing identity")
        sig = identity.sign(self.DOMAIN, self.run, self.signing_payload())
        return dataclasses.replace(self, sig=sig)  # type: ignore[call-arg]

    def signature_ok(self) -> bool:
        # Memoised on the (immutable) message: a simulator hands one gossiped object to every
        # node, and Ed25519 verification is the bulk of a large simulation's CPU otherwise.
        cached = self.__dict__.get("_sig_ok")
        if cached is not None:
            return bool(cached)
        ok = self.SIGNER is None or verify(
            getattr(self, self.SIGNER), self.DOMAIN, self.run, self.signing_payload(), cast(Any, self).sig
        )
        object.__setattr__(self, "_sig_ok", ok)
        return ok

    def content_hash(self) -> bytes:
        return h(b"seedswarm/msg", self.encode())
