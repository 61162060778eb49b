"""What a running node tells its operator: the status document, the metrics, the status file.

``status.json`` in the data dir (rewritten atomically every ``status_every_s``) and ``GET /status``
carry the same document; ``GET /metrics`` is the Prometheus exposition of the same numbers plus
the core's and the transport's counters.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Protocol

from seedswarm import PROTOCOL_VERSION
from seedswarm.crypto.keys import Identity
from seedswarm.gossip.transport import Transport
from seedswarm.node.core.protocol import NodeCore
from seedswarm.node.daemon.bytekinds import sent_by_kind
from seedswarm.node.daemon.config import NodeConfig
from seedswarm.node.daemon.discovery import Discovery
from seedswarm.node.daemon.localchain import LocalChain
from seedswarm.node.daemon.metrics import Metrics


class Daemon(Protocol):
    """The parts of the daemon its status is made of."""

    cfg: NodeConfig
    core: NodeCore | None
    chain: LocalChain
    transport: Transport | None
    identity: Identity
    metrics: Metrics
    run_id: bytes
    peer_id: str
    state: str
    announce: list[str]
    evaluation: dict[str, float]
    _solving: bool
    started_wall: float
    synced_wall: float | None
    first_apply_wall: float | None
    member_since_wall: float | None
    phases: dict[str, float]
    loop_lag_max_s: float
    discovery: Discovery

    @property
    def accuracy(self) -> float | None: ...

    def now(self) -> float: ...

    def digest_hex(self) -> str: ...

    def log_once(self, reason: str, peer: str, msg: str, *args: Any) -> None: ...



def relay_status(t: Any, stats: Any) -> dict[str, Any]:
    """Relays that hold a reservation for us, peers we reach only through a relay, the bytes we
    forwarded for others as a relay, and hole punches (zeros on a transport without relays)."""
    return {
        "reserved_on": t.relay_reservations() if hasattr(t, "relay_reservations") else [],
        "relayed_peers": len(t.relayed_peers()) if hasattr(t, "relayed_peers") else 0,
        "bytes_forwarded": getattr(stats, "relay_bytes_forwarded", 0),
        "reachability": t.reachability() if hasattr(t, "reachability") else "unknown",
        "hole_punches": getattr(stats, "hole_punch_successes", 0),
        "hole_punch_failures": getattr(stats, "hole_punch_failures", 0),
    }

def status(d: Daemon) -> dict[str, Any]:
    core = d.core
    st = core.head if core is not None else d.chain.head
    t = d.transport
    stats = t.stats if t is not None else None
    me = d.identity.public
    running = t is not None and t.running
    counters = core.counters if core is not None else {}
    return {
        "state": d.state,
        "syncing": core is not None and not core.in_sync(d.now()),
        "pid": os.getpid(),
        "peer_id": d.peer_id,
        "public_key": me.hex(),
        "run_id": d.run_id.hex(),
        "protocol_version": PROTOCOL_VERSION,
        "round": st.round,
        "head": st.head.hex(),
        "model_digest": d.digest_hex(),
        "member": me in st.members,
        "solving_join_work": d._solving,  # in the worker thread; the node keeps serving meanwhile
        "members": len(st.members),
        "committee": {
            "trainer_rank": st.trainer_rank.get(me),
            "aggregator_rank": st.committee.aggregators.index(me) if me in st.committee.aggregators else None,
            "trainers": len(st.committee.trainers),
            "aggregators": len(st.committee.aggregators),
        },
        "halted": bool(d.cfg.halt_at and st.round >= d.cfg.halt_at),
        "peers": len(t.peers()) if running and t is not None else 0,
        "peer_ids": t.peers() if running and t is not None else [],
        "listen": t.listen_addrs if t is not None else [],
        "announce": d.announce,
        "bytes_sent": getattr(stats, "transport_bytes_sent", 0),
        "bytes_received": getattr(stats, "transport_bytes_received", 0),
        # what the bytes sent were for (records, contributions, ..., gossip-control, framing)
        "bytes_sent_by_kind": sent_by_kind(stats),
        "gossip_rpc_bytes_sent": dict(getattr(stats, "gossip_rpc_bytes_sent", {})),
        # circuit relay v2 (docs/networking.md, "Behind NAT")
        "relay": relay_status(t if running else None, stats),
        "checkpoint_round": ck.round if (ck := d.chain.checkpoint) is not None else None,
        # the longest the event loop was held (by a handler, or work that belongs in the worker)
        "loop_lag_max_s": round(d.loop_lag_max_s, 4),
        "accuracy": d.accuracy,
        "evaluation": d.evaluation,
        "started_at": d.started_wall,
        "synced_at": d.synced_wall,
        "first_apply_at": d.first_apply_wall,
        "member_since": d.member_since_wall,
        "phases": dict(d.phases),  # start-up phase -> wall time it first completed
        "rejected": {v: int(n) for (name, _, v), n in d.metrics.counters.items() if name == "rejected_total"},
        "sync": {
            "forks_switched": counters.get("heads.switched", 0),
            "deep_forks_detected": counters.get("rejected.deep-fork", 0),
            "resyncs": counters.get("sync.resyncs", 0),
            "requests": counters.get("sync.requests", 0),
            "behind": core.sync.behind(st.round, d.now()) if core is not None else 0,
        },
        "discovery": d.discovery.status(),
        "store": {"holes": d.chain.store.holes()[:16], "damaged": d.chain.store.damaged,
                  "archived": [str(p) for p in d.chain.archived]},
        "updated_at": time.time(),
    }


#: HostStats dicts keyed by a kind of bytes (exported with a ``kind`` label).
_KIND_LABELLED = frozenset({"payload_bytes_sent", "payload_bytes_received", "gossip_rpc_bytes_sent"})


def write_status_file(d: Daemon) -> None:
    path = d.cfg.data_path / "status.json"
    tmp = path.with_name(".status.json.tmp")
    try:
        tmp.write_text(json.dumps(status(d), indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        d.log_once("status", "", "cannot write %s: %s", path, e)


def update_metrics(d: Daemon) -> None:
    m, core = d.metrics, d.core
    st = core.head if core is not None else d.chain.head
    m.set("round", st.round, help="rounds applied (the chain head's round)")
    m.set("members", len(st.members), help="members in the chain's membership set")
    m.set("member", float(d.identity.public in st.members))
    m.set("loop_lag_max_seconds", d.loop_lag_max_s, help="longest the event loop was late for a 100 ms timer")
    t = d.transport
    if t is not None:
        m.set("peers", len(t.peers()) if t.running else 0, help="connected peers")
        for f in dataclasses.fields(t.stats):
            v = getattr(t.stats, f.name)
            if isinstance(v, dict):
                label = ("topic" if f.name == "gossip_rejected" else
                         "kind" if f.name in _KIND_LABELLED else "reason")
                for k, n in v.items():
                    m.set(f.name, n, label, str(k))
            elif isinstance(v, int | float):
                m.set(f.name, v)
        for k, n in sent_by_kind(t.stats).items():
            m.set("bytes_sent_by_kind", n, "kind", k, help="bytes written to the sockets, by what they were for")
    if core is not None:
        for k, v in core.counters.items():
            m.set("core_events", v, "event", k)
        m.set("bans_total", core.policy.bans_total, help="peers banned by the peer policy")
    m.set("store_holes", len(d.chain.store.holes()), help="damaged records waiting to be re-fetched")
