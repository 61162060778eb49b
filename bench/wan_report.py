"""What ``seedswarm bench wan`` reports beyond ``seedswarm cluster``'s summary.

:func:`deadline_report` answers "does a slow trainer hold the others up?" from the chain itself:
how many of each round's trainers made it into the record (the aggregator publishes once all
reported, or once a quorum did and the adaptive deadline passed, or at the round timeout), and
how many rounds took longer than the round timeout. :func:`table` is the human summary.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any


def chain_duties(chain_log: Path, genesis: Any) -> tuple[list[int], dict[bytes, dict[str, int]]]:
    """Replay a stored chain's committees (read from a copy, so a daemon still writing its store is
    never disturbed): the number of contributions each record carries, and for every trainer its
    ``seats`` (rounds it sat on the committee of a record that holds some contribution; an empty
    record says nothing about anyone) and how many of them carried its contribution."""
    from seedswarm.gossip.wire import Record, decode_as
    from seedswarm.node.core.chain import ChainState, checked_next_state, ranks_of
    from seedswarm.node.daemon.store import ChainStore

    counts: list[int] = []
    duties: dict[bytes, dict[str, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "chain.log"
        shutil.copyfile(chain_log, copy)
        state = ChainState.initial(genesis)
        for data in ChainStore(copy, genesis.run_id).records():
            rec = decode_as(data, Record, genesis.run_id)
            ranks = set(ranks_of(rec.contributors))
            counts.append(len(ranks))
            for rank, peer in enumerate(state.committee.trainers if ranks else ()):
                d = duties.setdefault(peer, {"seats": 0, "contributed": 0})
                d["seats"] += 1
                d["contributed"] += rank in ranks
            state = checked_next_state(state, rec)
    return counts, duties


def deadline_report(counts: list[int], trainers: int, latencies: list[float], genesis: Any) -> dict[str, Any]:
    """Where the aggregation deadline and quorum stood over the run (``latencies``: the time
    between consecutive rounds, as the cluster summary measures it)."""
    quorum = max(1, -(-int(trainers * genesis.quorum * 1000) // 1000))  # as aggregation.quorum_count
    full = sum(1 for c in counts if c >= trainers)
    over = [x for x in latencies if x >= genesis.round_timeout]
    return {
        "trainers_per_round": trainers,
        "quorum": quorum,
        "round_timeout_s": genesis.round_timeout,
        "min_round_time_s": genesis.min_round_time,
        "records": len(counts),
        "records_with_every_trainer": full,
        "records_below_quorum": sum(1 for c in counts if c < quorum),
        "contributions_min": min(counts, default=None),
        "contributions_median": statistics.median(counts) if counts else None,
        "rounds_at_or_over_round_timeout": len(over),
        "round_latency_max_s": round(max(latencies), 3) if latencies else None,
        "contributions_per_record": counts,
    }


def _fmt(x: Any, unit: str = "", nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}{unit}"
    return f"{x}{unit}"


def table(s: dict[str, Any]) -> str:
    """The summary a person reads (``--json`` prints everything)."""
    w = s["window"]
    d = s["deadline"]
    members = [m for m in s["members_final"].values() if m is not None]
    lines = [
        f"seedswarm bench wan: profile {s['profile']}, {s['nodes']} nodes, {s['rounds']} rounds, seed {s['seed']} "
        f"(links: {s['link_emulation']})",
        "",
        f"{'honest_digest_agreement':34s} {s['honest_digest_agreement']}",
        f"{'finished (all on one head)':34s} {s['finished']}",
        f"{'members at the end (min-max)':34s} {min(members, default='-')}-{max(members, default='-')} of {s['nodes']}",
        f"{'round latency p50 / p95':34s} {_fmt(s['round_latency_p50_s'], ' s')} / {_fmt(s['round_latency_p95_s'], ' s')}",
        f"{'rounds per minute':34s} {_fmt(s['rounds_per_minute'], '', 1)}",
        f"{'link bytes sent / node / round':34s} {_fmt(w['link_bytes_sent_per_node_per_round'], ' B', 0)}"
        "  (IP packets at the node's interface)",
        f"{'transport bytes sent / node / round':34s} {_fmt(w['transport_bytes_sent_per_node_per_round'], ' B', 0)}"
        "  (the daemon's count above TCP)",
        f"{'CPU seconds / node / round':34s} {_fmt(w['cpu_seconds_per_node_per_round'], ' s', 4)}",
        f"{'CPU seconds / node (whole run)':34s} {_fmt(s['cpu_seconds_per_node_mean'], ' s', 1)}",
        f"{'join seconds (max)':34s} {_fmt(s['join_seconds_max'], ' s', 1)}",
        f"{'records with every trainer':34s} {d['records_with_every_trainer']}/{d['records']} "
        f"(quorum {d['quorum']} of {d['trainers_per_round']}, min {d['contributions_min']})",
        f"{'rounds >= round timeout':34s} {d['rounds_at_or_over_round_timeout']} "
        f"(timeout {d['round_timeout_s']} s, slowest round {_fmt(d['round_latency_max_s'], ' s')})",
        f"{'wall seconds':34s} {_fmt(s['wall_seconds'], ' s', 0)}",
        "",
        "host  rtt_ms  jitter_ms  loss   rate_mbit  join_s  contributed/seats",
    ]
    by_node = s.get("contributions_by_node") or {}
    for h in s["hosts"]:
        j = s["join_seconds"].get(f"node-{h['host']}")
        c = by_node.get(f"node-{h['host']}")
        duty = f"{c['contributed']}/{c['seats']}" if c else "-"
        lines.append(f"{h['host']:>4}  {h['rtt_ms']:>6}  {h['jitter_ms']:>9}  {h['loss']:<5}  {h['rate_mbit']:>9}  "
                     f"{_fmt(j, '', 1):>6}  {duty:>17}")
    return "\n".join(lines)
