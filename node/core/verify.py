"""Verifying records: fetching their signed inputs, recomputing aggregates, fraud proofs.

Every record is checked without its inputs (``chain.check_record``). The trainers of the next
round, the nodes that would build on it, fetch the inputs from the record's aggregator and
recompute the aggregate before they contribute. A mismatch is gossiped as a fraud proof, which
makes every node drop the record. Trainers ask the aggregator first, then the record's other
verifiers (any node that checked the inputs serves them), so a crashed aggregator costs nothing.
A record whose inputs nobody shows stays in fork choice (missing data proves nothing, and local
judgements there would split honest nodes), but honest trainers never contribute on it, so the
rounds after it are empty until a proof or the inputs arrive: an aggregator can delay or omit,
never forge, and a withheld record's step is bounded by the public scale.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from seedswarm.gossip.wire import (
    ContributionsRequest,
    ContributionsResponse,
    FraudProof,
    Record,
    WireError,
    decode_as,
)
from seedswarm.node.core.chain import (
    ChainState,
    RecordError,
    check_contributions,
    check_record,
    record_hash,
)
from seedswarm.node.core.effects import Reason
from seedswarm.node.core.forks import ForkTree


@dataclass
class VerifyConfig:
    timeout: float = 2.0  # seconds a trainer waits for a record's inputs from one source
    sources: int = 8  # sources a trainer asks, one after the other, before it gives up
    keep_inputs: int = 8  # rounds of record inputs kept to serve verifiers


class Verifier:
    def __init__(self, me: bytes, run_id: bytes, tree: ForkTree, count: Callable[[str], None],
                 config: VerifyConfig | None = None) -> None:
        self.me = me
        self.run_id = run_id
        self.tree = tree
        self.count = count
        self.cfg = config or VerifyConfig()
        self.unverified: dict[bytes, tuple[float, int]] = {}  # record hash -> (last asked, sources asked)
        self.verified: set[bytes] = set()
        self.inputs: OrderedDict[bytes, tuple[int, list[bytes]]] = OrderedDict()  # record hash -> inputs

    def keep(self, rh: bytes, round_: int, inputs: list[bytes]) -> None:
        self.verified.add(rh)
        self.inputs[rh] = (round_, inputs)
        while len(self.inputs) > self.cfg.keep_inputs:
            self.inputs.popitem(last=False)

    def prune(self) -> None:
        self.verified = self.tree.keep_only(self.verified)

    def ask(self, now: float, rh: bytes, tries: int) -> tuple[bytes, ContributionsRequest] | None:
        """Ask source number ``tries`` for a record's inputs: its aggregator first, then the nodes
        that must have checked them (the next round's trainers, who verify before they build),
        then other members. A response is checked against the record's commitment, so it does
        not matter who sends it."""
        cand = self.tree.cand.get(rh)
        if cand is None or tries >= self.cfg.sources:
            self.unverified.pop(rh, None)
            if cand is not None:
                self.count("records.unverifiable")  # we stay on it, but never contribute on it
            return None
        sources = [cand.rec.aggregator]
        sources += [p for p in cand.state.committee.trainers if p not in sources]
        chosen = set(sources)  # the members are many (10,000 in bench scale); take what we need
        sources += itertools.islice((p for p in cand.state.members if p not in chosen), self.cfg.sources)
        sources = [p for p in sources if p != self.me]
        if tries >= len(sources):
            self.unverified.pop(rh, None)
            self.count("records.unverifiable")
            return None
        self.unverified[rh] = (now, tries + 1)
        if tries:
            self.count("inputs.retries")
        return sources[tries], ContributionsRequest(run=self.run_id, round=cand.rec.round, record=rh)

    def due(self, now: float) -> list[tuple[bytes, int]]:
        """Records whose source did not answer in time: (record hash, sources asked so far)."""
        return [(rh, tries) for rh, (asked, tries) in self.unverified.items() if now - asked > self.cfg.timeout]

    def next_wakeup(self) -> float:
        if not self.unverified:
            return float("inf")  # the common case, asked after every message a node handles
        return min((asked + self.cfg.timeout + 1e-6 for asked, _ in self.unverified.values()), default=float("inf"))

    def serve(self, msg: ContributionsRequest) -> ContributionsResponse | None:
        entry = self.inputs.get(msg.record)
        if entry is None:
            self.count("inputs.unavailable")
            return None
        return ContributionsResponse(run=self.run_id, round=entry[0], record=msg.record, contributions=tuple(entry[1]))

    def on_inputs(self, msg: ContributionsResponse) -> tuple[str, RecordError | None]:
        """Check a record's inputs: ("verified" | "fraud" | "retry" | "ignore", the error)."""
        rh = msg.record
        cand = self.tree.cand.get(rh)
        if rh not in self.unverified or cand is None:
            return "ignore", None
        try:
            check_contributions(cand.parent, cand.rec, msg.contributions)
        except RecordError as e:
            if e.reason is Reason.WRONG_AGGREGATE:
                # Provable: the signed inputs match the record's commitment but not its aggregate.
                self.unverified.pop(rh)
                self.count("fraud.detected")
                return "fraud", e
            # Inputs that do not match the commitment prove nothing about the record (the
            # sender lied, not the aggregator): ask the next source, do not build on it meanwhile.
            return "retry", e
        self.unverified.pop(rh)
        self.keep(rh, cand.rec.round, list(msg.contributions))
        return "verified", None

    def check_proof(self, msg: FraudProof) -> tuple[bytes | None, bool, RecordError | None]:
        """(record hash to drop, whether the proof is valid and worth passing on, error in the proof)."""
        try:
            rec = decode_as(msg.record, Record, self.run_id)
        except WireError as e:
            return None, False, RecordError(Reason.BAD_FRAUD_PROOF, str(e))
        rh = record_hash(rec)
        parent: ChainState | None = self.tree.state(rec.prev)
        if rh in self.tree.bad or parent is None:
            return None, False, None
        try:
            check_record(parent, rec)
        except RecordError:
            return rh, False, None  # invalid anyway
        try:
            check_contributions(parent, rec, msg.contributions)
        except RecordError as e:
            if e.reason is not Reason.WRONG_AGGREGATE:
                return None, False, RecordError(Reason.BAD_FRAUD_PROOF, str(e))
            self.count("fraud.accepted")
            return rh, True, None
        return None, False, RecordError(Reason.BAD_FRAUD_PROOF, "the record's aggregate is correct")
