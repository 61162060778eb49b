"""The node's socket bytes by what they were for: the transport's kinds named after the protocol.

The libp2p adapter counts what it wrote by protocol id and GossipSub part
(``HostStats.sent_by_kind``); only the daemon knows which of our protocols is which duty, so
the names are given here: the run's gossip topic carries the records (and joins, leaves, fraud
proofs), ``msg`` the contributions, ``inputs`` the verification fetches, ``chain`` and ``ckpt``
the sync. The in-memory transport counts none of this (an empty dict).
"""

from __future__ import annotations

from typing import Any, Final

from seedswarm.gossip.wire import PROTO_CHAIN, PROTO_CKPT, PROTO_HELLO, PROTO_INPUTS, PROTO_MSG

#: Transport kind -> the kind reported (status ``bytes_sent_by_kind``, ``rounds.jsonl``).
KIND_NAMES: Final = {
    "gossip-data": "records",
    f"stream/{PROTO_MSG}": "contributions",
    f"stream/{PROTO_INPUTS}": "verification",
    f"stream/{PROTO_CHAIN}": "sync",
    f"stream/{PROTO_CKPT}": "sync",
    f"stream/{PROTO_HELLO}": "hello",
}
#: The order of the table (``seedswarm cluster``, ``seedswarm bench bytes``); others go last.
KIND_ORDER: Final = ("records", "contributions", "verification", "sync", "hello", "gossip-envelope",
                     "gossip-control", "identify", "identify-push", "ping", "relay", "dcutr", "autonat",
                     "multistream", "framing")
#: The kinds that are the protocol's own messages (as the simulator counts them); the rest is
#: what the transport adds.
PROTOCOL_KINDS: Final = frozenset({"records", "contributions", "verification", "sync"})


def sent_by_kind(stats: Any) -> dict[str, int]:
    """Bytes this node wrote to its sockets, by kind; they add up to ``transport_bytes_sent``."""
    split = getattr(stats, "sent_by_kind", None)
    if split is None:
        return {}
    out: dict[str, int] = {}
    for kind, n in split().items():
        name = KIND_NAMES.get(kind, kind)
        out[name] = out.get(name, 0) + n
    return out
