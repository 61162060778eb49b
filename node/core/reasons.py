"""Why an input was refused: one enum, shared by every layer that refuses something."""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    """Why an input was refused: one name per cause, used as the metric label.

    Drivers count them (``rejected_total{reason}``) and the peer policy weighs them; nothing
    branches on free strings.
    """

    # wire and transport
    MALFORMED = "malformed"  # bytes that do not decode as the expected message
    WRONG_RUN = "wrong-run"  # a well-formed message of another swarm
    PROTOCOL_VERSION = "protocol-version"  # a message of another protocol version
    BAD_RESPONSE = "bad-response"  # an answer that is not the message the request asked for
    BAD_GOSSIP = "bad-gossip"  # gossip the validator should have refused
    # signatures and membership
    BAD_SIGNATURE = "bad-signature"
    NO_ADMISSION = "no-admission"  # a Join without the admission certificate or work it needs
    MEMBERSHIP_FLOOD = "membership-flood"  # the pending Join/Leave set is full
    BAD_JOIN = "bad-join"
    BAD_LEAVE = "bad-leave"
    BAD_EVIDENCE = "bad-evidence"
    # contributions
    BAD_CONTRIBUTION = "bad-contribution"
    STALE_CONTRIBUTION = "stale-contribution"
    FUTURE_CONTRIBUTION = "future-contribution"
    NOT_TRAINER = "not-trainer"
    # records
    WRONG_ROUND = "wrong-round"
    WRONG_PARENT = "wrong-parent"
    NOT_AGGREGATOR = "not-aggregator"
    AGGREGATOR_RANK = "aggregator-rank"  # a fallback rank that never aggregates
    BAD_BITMAP = "bad-bitmap"
    BAD_AGGREGATE = "bad-aggregate"
    BAD_INPUTS = "bad-inputs"  # a record's inputs that do not match its commitment
    WRONG_AGGREGATE = "wrong-aggregate"  # inputs that prove the aggregate wrong (fraud)
    BAD_FRAUD_PROOF = "bad-fraud-proof"
    # sync and join
    BAD_CHAIN_RESPONSE = "bad-chain-response"
    DEEP_FORK = "deep-fork"  # a peer's chain leaves ours further back than max_undo
    BAD_CHECKPOINT = "bad-checkpoint"  # a manifest or chunk that does not check out
    UNSOLICITED = "unsolicited"  # a response nobody asked for
