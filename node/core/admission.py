"""Who may join, and at what cost: admission certificates, join work, probation.

An open swarm admits any key, and keys are free, so without a cost one peer can flood it with
Joins: measured before this module, 200 Joins sent in 3 s were all admitted within 4 records,
the sybils filled the committees, never contributed, and the swarm stalled for good. Four rules,
all functions of the chain (so every node applies the same ones):

* **Bounded admissions.** A record admits at most ``genesis.max_joins`` Joins.
* **Work.** In an open swarm a Join carries a nonce (in its ``cert`` field) whose hash with the
  run, the key and the Join's round has ``join_bits(state)`` leading zero bits. The difficulty
  starts at ``genesis.join_pow_bits`` and rises by one bit for every two Joins admitted in the
  last ``join_ttl`` rounds beyond a free allowance (an eighth of the members, at least
  ``max_joins``), so a burst of Joins costs the flooder exponentially more work while an
  occasional joiner, or ordinary churn in a large swarm, pays a fraction of a second.
* **Probation.** Until it has contributed ``genesis.probation`` times, a new member holds at most
  a ``probation_share`` of a round's trainer seats (together with the other new members) and
  ranks as an aggregator only after every veteran: new keys cannot fill a committee, and a key
  that never contributes never leaves probation (time alone does not vouch for anyone).
* **Silent newcomers leave.** A member on probation that misses a trainer duty counts the miss
  even in a record without contributions (veterans do not: an empty record proves nothing about
  them), so sybils that never contribute are expelled however sparse the records are.

Permissioned swarms (``genesis.admission_key``) need the swarm key's certificate instead of work.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from seedswarm.crypto.hashing import h, hasher, part, u64
from seedswarm.crypto.keys import Identity, verify
from seedswarm.node.core.genesis import Genesis

MAX_JOIN_BITS = 40  # beyond this a Join is never accepted (2**40 hashes: out of reach, on purpose)


def issue_certificate(swarm_key: Identity, run_id: bytes, peer: bytes) -> bytes:
    """The admission certificate of ``peer`` in a permissioned swarm (signed by the swarm key)."""
    return swarm_key.sign(b"admission", run_id, peer)


#: A swarm admits this share of its membership per ``join_ttl`` rounds at the base difficulty.
FREE_JOIN_SHARE = 1 / 8


def free_joins(genesis: Genesis, members: int) -> int:
    """Joins admitted in the last ``join_ttl`` rounds that do not raise the difficulty."""
    return max(genesis.max_joins, int(members * FREE_JOIN_SHARE))


def join_bits(genesis: Genesis, recent_joins: int, members: int = 0) -> int:
    """Leading zero bits a Join's work must have, given the Joins admitted in the last ttl rounds
    and the swarm's size: one bit more for every two Joins beyond :func:`free_joins`.

    The free allowance grows with the swarm, because the same join rate is a flood for three
    members and ordinary churn for a thousand: with a fixed rule (one bit per two recent Joins
    from the first), 1 % of a 10,000-node swarm joining at once pushed the difficulty past 40
    bits, and the last joiners could never get in."""
    if not genesis.join_pow_bits:
        return 0
    extra = max(0, recent_joins - free_joins(genesis, members)) // 2
    return min(MAX_JOIN_BITS, genesis.join_pow_bits + extra)


_WORK_DOMAIN = b"seedswarm/join-work"


def _work_digest(run_id: bytes, peer: bytes, round_: int, nonce: bytes) -> int:
    return int.from_bytes(h(_WORK_DOMAIN, run_id, peer, u64(round_), nonce), "big")


@functools.lru_cache(maxsize=8192)
def work_ok(run_id: bytes, peer: bytes, round_: int, nonce: bytes, bits: int) -> bool:
    """One hash: does ``nonce`` carry ``bits`` bits of work for this Join?

    Memoised (a pure function): a gossiped Join is re-announced and reaches a simulator's every
    node, which would otherwise hash it once per node per copy."""
    if bits <= 0:
        return True
    if len(nonce) > 16:
        return False
    return _work_digest(run_id, peer, round_, nonce) >> (256 - bits) == 0


class WorkAbandoned(Exception):
    """``solve_work`` was told to stop (the node is shutting down)."""


def solve_work(run_id: bytes, peer: bytes, round_: int, bits: int, max_tries: int = 1 << 34,
               stop: Callable[[], bool] | None = None) -> bytes:
    """A nonce with ``bits`` bits of work (expected 2**bits hashes). Deterministic: the same
    inputs give the same nonce, so a simulation replays exactly. ``stop`` is asked every 65,536
    tries (a few hundredths of a second): true abandons the search (WorkAbandoned)."""
    if bits <= 0:
        return b""
    # The digest of _work_digest with the fixed prefix hashed once, the nonce's length prefix
    # included (every nonce tried is 8 bytes), and the leading bytes compared instead of the
    # whole digest converted to an int: the hash is a search here, a check in work_ok.
    base = hasher(_WORK_DOMAIN, run_id, peer, u64(round_))
    base.update(part(bytes(8))[:-8])  # the length prefix every 8-byte nonce shares
    zero_bytes, rest = divmod(bits, 8)
    zeros = bytes(zero_bytes)
    top = 0xFF >> rest if rest else 0xFF  # the next byte must be <= top, i.e. its first `rest` bits zero
    for i in range(max_tries):
        if stop is not None and not i & 0xFFFF and stop():
            raise WorkAbandoned(f"join work abandoned after {i} tries")
        nonce = i.to_bytes(8, "big")
        m = base.copy()
        m.update(nonce)
        d = m.digest()
        if d[:zero_bytes] == zeros and (not rest or d[zero_bytes] <= top):
            assert work_ok(run_id, peer, round_, nonce, bits)
            return nonce
    raise ValueError(f"no nonce with {bits} bits of work within {max_tries} tries")


def admission_ok(genesis: Genesis, run_id: bytes, peer: bytes, round_: int, cert: bytes, bits: int) -> bool:
    """A Join's admission: the swarm key's certificate (permissioned) or enough work (open)."""
    if genesis.admission_key:
        return verify(genesis.admission_key, b"admission", run_id, peer, cert)
    return work_ok(run_id, peer, round_, cert, bits)
