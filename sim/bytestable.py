"""The socket bytes of a real cluster by kind, per node per round, as a table.

Each daemon appends ``sent_by_kind`` (its socket bytes so far, by what they were for) to every
line of its ``rounds.jsonl``. A node's rate of a kind is its growth from the first line to the
last one divided by the rounds between them (the same window as ``bytes_per_node_per_round``,
so the kinds add up to it); the cluster's rate is the mean over the nodes.
"""

from __future__ import annotations

import statistics
from typing import Any


def kind_rates(lines: list[dict[str, Any]]) -> dict[str, float]:
    """One node's bytes sent per round by kind, from its ``rounds.jsonl`` lines ({} if unknown)."""
    with_kinds = [x for x in lines if isinstance(x.get("sent_by_kind"), dict)]
    if len(with_kinds) < 2:
        return {}
    first, last = with_kinds[0], with_kinds[-1]
    rounds = last["round"] - first["round"]
    if rounds <= 0:
        return {}
    a, b = first["sent_by_kind"], last["sent_by_kind"]
    return {k: (b.get(k, 0) - a.get(k, 0)) / rounds for k in set(a) | set(b)}


def mean_rates(per_node: list[dict[str, float]]) -> dict[str, float]:
    """The mean over nodes of each kind's rate (a node without a kind counts 0)."""
    per_node = [r for r in per_node if r]
    if not per_node:
        return {}
    kinds = set().union(*per_node)
    return {k: statistics.fmean(r.get(k, 0.0) for r in per_node) for k in kinds}


def table(rates: dict[str, float], protocol_bytes: float | None = None, note: str = "") -> str:
    """``kind  bytes/node/round  share`` rows, largest first, the total, and (given the
    protocol's own bytes per node per round) the ratio total / protocol."""
    total = sum(rates.values())
    rows = sorted(rates.items(), key=lambda kv: -kv[1])
    width = max([len("total"), *(len(k) for k in rates)])
    out = [f"{'kind':<{width}}  {'bytes/node/round':>16}  {'share':>6}"]
    for k, v in rows:
        out.append(f"{k:<{width}}  {v:>16,.0f}  {v / total if total else 0.0:>6.1%}")
    out.append(f"{'total':<{width}}  {total:>16,.0f}  {1.0 if total else 0.0:>6.1%}")
    if protocol_bytes:
        out.append(f"protocol's own bytes per node per round{note}: {protocol_bytes:,.0f}; "
                   f"total / protocol = {total / protocol_bytes:.2f}")
    return "\n".join(out)
