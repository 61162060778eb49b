"""The genesis: every parameter of a swarm that all nodes must agree on, and its hash, the run id.

Everything a node derives (committees, scales, learning rates, the model itself) is a function
of the genesis and the chain of records, so two nodes with the same genesis file and the same
records hold the same state. The run id names the swarm on the wire: topics, protocol ids and
every message carry it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from seedswarm import PROTOCOL_VERSION
from seedswarm.crypto.hashing import h
from seedswarm.sampling.aggregators import DEFAULT_RULE, RULES

ESTIMATORS = ("fo", "zo")


class GenesisError(ValueError):
    """A genesis file or value that cannot define a swarm."""


def lr_schedule(lr: float, half_life: int, r: int) -> float:
    """The step size of round ``r``: ``lr / (1 + r / half_life)``, or ``lr`` when ``half_life`` is 0.

    A Python-float function of public numbers, so every node computes the same bits; the tools
    that model the update (``bench lm_proxy``) use it too, so they follow the protocol's rule."""
    return lr if half_life <= 0 else lr / (1.0 + r / half_life)


@dataclass(frozen=True)
class Genesis:
    # --- the learning problem
    task: str = "digits"
    task_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    estimator: str = "fo"  # "fo": local gradient projected (Ferret); "zo": SPSA (MeZO)
    batch_size: int = 64
    local_steps: int = 1  # fo: local SGD steps whose update is projected
    local_lr: float = 0.5  # fo: their learning rate
    eps: float = 1e-3  # zo: SPSA perturbation size
    lr: float = 0.08  # server-side learning rate on the aggregated direction step
    lr_half_life: int = 0  # rounds; 0 keeps lr constant, else lr / (1 + r / half_life)
    scale_exp: int = -6  # initial public quantisation scale 2**scale_exp
    # --- committees
    members: tuple[bytes, ...] = ()  # founding members (32-byte Ed25519 public keys)
    trainers: int = 16  # s
    aggregators: int = 2  # a (ranked; rank 0 publishes, the others back it up)
    directions: int = 64  # K bytes per trainer per round
    groups: int = 1  # G: trainer rank i measures direction group i % G
    aggregator_rule: str = DEFAULT_RULE
    byzantine_share: float = 0.2  # the share the trim f is sized for
    p_fail: float = 1e-6  # target per-round probability that f is exceeded
    # --- membership and timing (rounds, seconds)
    join_delay: int = 2  # a member joined in round j sits on committees from j + join_delay
    join_ttl: int = 32  # a Join/Leave signed at round j is valid in records j..j+ttl
    expel_after: int = 4  # consecutive missed duties before expulsion by the records
    round_timeout: float = 2.0  # upper bound of the adaptive aggregation deadline
    min_round_time: float = 0.05  # lower bound
    quorum: float = 0.75  # share of trainers an aggregator waits for before its deadline
    max_joins: int = 4  # Joins one record may admit (node/core/admission.py)
    join_pow_bits: int = 16  # open swarms: bits of work a Join needs when nobody joined lately (0: none)
    probation: int = 2  # contributions a new member makes before it leaves probation (bounded seats, no aggregation)
    probation_share: float = 0.25  # share of a round's trainer seats the members on probation may hold
    admission_key: bytes = b""  # non-empty: permissioned swarm, Joins need a certificate
    model_digest: bytes = b""  # digest of the initial model (checked by every node)
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        problems = []
        if self.estimator not in ESTIMATORS:
            problems.append(f"estimator must be one of {ESTIMATORS}, not {self.estimator!r}")
        for name in ("trainers", "aggregators", "directions", "groups", "batch_size", "local_steps", "expel_after"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                problems.append(f"{name} must be a positive integer")
        if isinstance(self.lr_half_life, bool) or not isinstance(self.lr_half_life, int) or self.lr_half_life < 0:
            problems.append("lr_half_life must be an integer >= 0 (rounds; 0 keeps lr constant)")
        if self.directions * self.groups > 4096:
            problems.append("directions × groups must be at most 4096")
        if self.trainers > 4096:
            problems.append("trainers must be at most 4096")
        for name in ("lr", "local_lr", "eps", "round_timeout", "min_round_time"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                problems.append(f"{name} must be a positive number")
        if self.aggregator_rule not in RULES:
            problems.append(f"aggregator_rule must be one of {', '.join(RULES)}, not {self.aggregator_rule!r}")
        if not 0 <= self.byzantine_share < 0.5:
            problems.append("byzantine_share must be in [0, 0.5)")
        if not 0 < self.p_fail < 1:
            problems.append("p_fail must be in (0, 1)")
        if not 0 < self.quorum <= 1:
            problems.append("quorum must be in (0, 1]")
        if not isinstance(self.max_joins, int) or not 1 <= self.max_joins <= 64:
            problems.append("max_joins must be an integer in [1, 64]")
        if not isinstance(self.join_pow_bits, int) or not 0 <= self.join_pow_bits <= 32:
            problems.append("join_pow_bits must be an integer in [0, 32]")
        if not isinstance(self.probation, int) or self.probation < 0:
            problems.append("probation must be a non-negative integer")
        if not isinstance(self.probation_share, (int, float)) or not 0 < self.probation_share <= 1:
            problems.append("probation_share must be in (0, 1]")
        if any(len(m) != 32 for m in self.members) or len(set(self.members)) != len(self.members):
            problems.append("members must be distinct 32-byte public keys")
        if self.version != PROTOCOL_VERSION:
            problems.append(f"genesis is for protocol version {self.version}, this node speaks {PROTOCOL_VERSION}")
        if problems:
            raise GenesisError("invalid genesis: " + "; ".join(problems))

    # ---- identity
    def canonical(self) -> bytes:
        d = dataclasses.asdict(self)
        d["members"] = sorted(self.members)
        return msgpack.packb(_canon(d), use_bin_type=True)

    @functools.cached_property
    def run_id(self) -> bytes:
        # Cached (the genesis is frozen): with 10,000 members the canonical form takes 0.1 s,
        # and every joiner's initial state asks for it.
        return h(b"seedswarm/genesis", self.canonical())

    @property
    def total_directions(self) -> int:
        return self.directions * self.groups

    def lr_at(self, r: int) -> float:
        return lr_schedule(self.lr, self.lr_half_life, r)

    # ---- files (JSON: readable, diffable; bytes as hex)
    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["members"] = [m.hex() for m in self.members]
        d["admission_key"] = self.admission_key.hex()
        d["model_digest"] = self.model_digest.hex()
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Genesis:
        """Parse a genesis file: every field present (the run id hashes all of them, so a
        missing one would silently take this build's default and split the swarm), each of its
        type. Any problem is a GenesisError naming the field(s)."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise GenesisError(f"genesis is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise GenesisError(f"genesis must be a JSON object, got {_show(d)}")
        unknown = set(d) - set(_FIELDS)
        if unknown:
            raise GenesisError(f"unknown genesis fields: {sorted(unknown)}")
        missing = [name for name in _FIELDS if name not in d]
        if missing:
            raise GenesisError(f"genesis is missing field(s) {', '.join(missing)}: a genesis file "
                               "must hold every field (`seedswarm init` writes them all)")
        problems = []
        values: dict[str, Any] = {}
        for name, kind in _KIND.items():
            try:
                values[name] = _parse_field(name, kind, d[name])
            except GenesisError as e:
                problems.append(str(e))
        if problems:
            raise GenesisError("invalid genesis: " + "; ".join(problems))
        return cls(**values)

    def save(self, path: str | Path) -> None:
        from seedswarm.node.files import atomic_write

        atomic_write(Path(path), self.to_json().encode() + b"\n")

    @classmethod
    def load(cls, path: str | Path) -> Genesis:
        try:
            raw = Path(path).read_bytes()
        except OSError as e:
            raise GenesisError(f"cannot read genesis file {path}: {e.strerror}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GenesisError(f"genesis file {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                               f"{e.start}): is it a genesis file?") from None
        return cls.from_json(text)

    def replace(self, **changes: Any) -> Genesis:
        return dataclasses.replace(self, **changes)


def _canon(v: Any) -> Any:
    """Canonical form for hashing: maps with sorted keys, floats as their exact repr."""
    if isinstance(v, dict):
        return [[k, _canon(v[k])] for k in sorted(v)]
    if isinstance(v, (list, tuple)):
        return [_canon(x) for x in v]
    if isinstance(v, float):
        return ["f", v.hex()]
    return v


def default(name: str) -> Any:
    """The default of genesis field ``name``.

    `seedswarm sim`, `seedswarm cluster` and `seedswarm init` start from these, so a default
    is changed in one place and the three tools cannot drift apart.
    """
    f = _FIELDS[name]
    if f.default is dataclasses.MISSING:
        raise KeyError(f"genesis field {name!r} has no plain default")
    return f.default


_FIELDS = {f.name: f for f in dataclasses.fields(Genesis)}


def _show(v: Any, most: int = 40) -> str:
    """A value as it reads in the JSON file, shortened."""
    try:
        text = json.dumps(v)
    except (TypeError, ValueError):
        text = repr(v)
    return text if len(text) <= most else text[: most - 3] + "..."


def _parse_field(name: str, kind: str, v: Any) -> Any:
    """The JSON value ``v`` of genesis field ``name`` as the field's Python value, or a
    GenesisError saying what was expected (JSON booleans are not integers here, and an integer
    field takes no 16.0: values hash into the run id exactly as they are written)."""

    def bad(expected: str) -> GenesisError:
        return GenesisError(f"{name}: expected {expected}, got {_show(v)}")

    if kind == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad("an integer")
        return v
    if kind == "float":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad("a number")
        if not math.isfinite(v):
            raise bad("a finite number")
        return v  # an integer stays one: the run id hashes 1 and 1.0 differently
    if kind == "str":
        if not isinstance(v, str):
            raise bad("a string")
        return v
    if kind == "dict":
        if not isinstance(v, dict):
            raise bad("an object (JSON {...})")
        return v
    if kind == "keys":
        if not isinstance(v, list):
            raise bad("a list of 64-hex-digit public keys")
        out = []
        for i, m in enumerate(v):
            key = _hex(m)
            if key is None or len(key) != 32:
                raise GenesisError(f"{name}[{i}]: expected a 64-hex-digit public key, got {_show(m)}")
            out.append(key)
        return tuple(out)
    if kind == "hex":
        b = _hex(v)
        if b is None:
            raise bad("a hex string")
        return b
    raise AssertionError(f"no parser for genesis field kind {kind!r}")


def _hex(v: Any) -> bytes | None:
    if not isinstance(v, str):
        return None
    try:
        return bytes.fromhex(v)
    except ValueError:
        return None


# How each field is read from JSON, from its annotation. A new field of a new type fails here,
# at import, until a parser exists for it (a test also pins that every field round-trips).
_KIND = {f.name: {"str": "str", "int": "int", "float": "float", "dict[str, Any]": "dict",
                  "tuple[bytes, ...]": "keys", "bytes": "hex"}[str(f.type)] for f in dataclasses.fields(Genesis)}


@dataclass
class GenesisOptions:
    """The genesis settings that `seedswarm sim` and `seedswarm cluster` both take, at their defaults.

    Both configs extend this class, so the two tools expose one set of names with one set of
    defaults (those of :class:`Genesis`).
    """

    task: str = default("task")
    estimator: str = default("estimator")
    trainers: int = default("trainers")
    directions: int = default("directions")
    groups: int = default("groups")
    aggregator: str = default("aggregator_rule")
    lr: float = default("lr")
    lr_half_life: int = default("lr_half_life")
    local_lr: float = default("local_lr")
    batch_size: int = default("batch_size")
    local_steps: int = default("local_steps")
    eps: float = default("eps")

    def genesis_fields(self) -> dict[str, Any]:
        """These options as :class:`Genesis` keyword arguments (``aggregator`` is ``aggregator_rule``)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(GenesisOptions)}
        d["aggregator_rule"] = d.pop("aggregator")
        d.pop("task")
        return d
