"""What the core asks its driver to do, and why it refuses an input.

The core never acts: every call returns a list of these effects, and a driver (the asyncio daemon
or the virtual-time simulator) carries them out. Keeping them plain frozen dataclasses lets a test
compare the effect sequences of two drivers fed the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from seedswarm.gossip.wire import Message, Record
from seedswarm.node.core.chain import ChainState
from seedswarm.node.core.reasons import Reason

__all__ = ["Apply", "Ban", "Effect", "Estimate", "InstallCheckpoint", "Notice", "Publish", "Reason", "Rejected",
           "Reply", "Resync", "Send", "SolveWork"]


@dataclass(frozen=True)
class Publish:
    """Gossip to every node of the swarm (records, joins, leaves, fraud proofs)."""

    msg: Message


@dataclass(frozen=True)
class Send:
    """Send to one peer over a direct stream (contributions, requests)."""

    to: bytes
    msg: Message


@dataclass(frozen=True)
class Reply:
    """The answer to ``request``, a direct request from ``to``: the driver writes it on that stream."""

    to: bytes
    request: Message
    msg: Message


@dataclass(frozen=True)
class Estimate:
    """Compute the local projected gradients on these direction streams, then call on_estimate."""

    round: int
    head: bytes
    streams: tuple[int, ...]


@dataclass(frozen=True)
class SolveWork:
    """Find the join work of an open swarm (``admission.solve_work``), then call on_join_work.

    An effect, not a call inside the core: the work takes 2**bits hashes, about 0.1 s at the base
    16 bits but minutes once a Join flood has raised the difficulty, and a daemon must keep
    serving and stopping meanwhile (it solves in a worker thread)."""

    round: int
    bits: int


@dataclass(frozen=True)
class Apply:
    """Move the model: start from the parameters of ``base`` and apply ``steps`` in order.

    ``base`` is the current head in the common case (one step); after a fork switch it is the
    common ancestor, whose parameters the driver kept (at most ``max_undo`` rounds back). The
    driver persists the records (truncating its store to ``base.round`` first) and updates the
    model; while ``catching_up`` it may persist only and rebuild the model once, after the
    checkpoint it is about to receive.
    """

    base: ChainState
    steps: tuple[tuple[ChainState, Record], ...]  # (state before the record, record)
    head: ChainState
    catching_up: bool = False


@dataclass(frozen=True)
class InstallCheckpoint:
    """A verified checkpoint (every chunk hash-checked, the whole blob hash-checked) at a round
    of our own verified chain: the driver decodes it, checks it against its model, keeps it, and
    replays the records after it."""

    round: int
    head: bytes
    blob: bytes


@dataclass(frozen=True)
class Rejected:
    """Bad input from a peer: count it under ``reason``, log it once per (reason, peer)."""

    peer: bytes | None
    reason: Reason
    detail: str = ""


@dataclass(frozen=True)
class Ban:
    """Stop talking to ``peer`` until ``until`` (core time): close its connections, refuse it."""

    peer: bytes
    until: float
    strikes: int


@dataclass(frozen=True)
class Resync:
    """Peers agree on a chain that left ours ``fork_round`` records in, deeper than we may undo.

    The driver keeps what it has (it archives the stored records after ``fork_round``, it never
    deletes them), restarts its core from the state after ``fork_round`` records and catches up.
    """

    fork_round: int
    voters: tuple[bytes, ...]


@dataclass(frozen=True)
class Notice:
    """Something an operator should see once, with a counter (a fork detected, a resync)."""

    what: str
    detail: str


Effect = Publish | Send | Reply | Estimate | SolveWork | Apply | InstallCheckpoint | Rejected | Ban | Resync | Notice
