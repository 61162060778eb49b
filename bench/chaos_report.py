"""The chaos bench's report: the JSON summary of a run and the table printed from it.

:meth:`ChaosReport.summary` gathers what the run observed (faults, hostile traffic and what the
daemons refused, sync, splits, crashes, Join floods) into one dict, which is what ``--json``
prints and ``chaos.json`` holds; :func:`table` formats that dict for people. A mixin of
:class:`seedswarm.bench.chaos.Chaos`.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

from seedswarm.bench.chaos_state import ChaosState

#: /metrics counters reported as transport-level refusals (summed over processes).
TRANSPORT_COUNTERS = ("gossip_rejected", "frames_too_large", "protocol_mismatches", "requests_failed",
                      "events_dropped", "handler_errors", "validator_errors", "send_failed_total",
                      "publish_failed_total", "peers_refused")
#: ``seedswarm_core_events{event}`` reported: inputs the core dropped without a rejection
#: (unknown or duplicate records, unknown checkpoints and inputs), its own rejections, sync work.
CORE_EVENTS_REPORTED = ("records.duplicate", "records.orphan", "records.known_bad", "records.held",
                        "checkpoints.missing", "checkpoints.unsolicited", "inputs.unavailable", "banned.",
                        "contributions.ignored", "rejected.", "sync.", "heads.", "equivocations")


class ChaosReport(ChaosState):
    """The summary of a run, and the Join flood figures in it."""

    def rate(self, t0: float, t1: float) -> float | None:
        """Rounds per minute of the best head between t0 and t1 (absolute times)."""
        pts = [(t, r) for t, r, _ in self.round_marks if t0 <= t <= t1]
        if len(pts) < 2 or pts[-1][0] - pts[0][0] < 5:
            return None
        return round(60.0 * (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0]), 1)

    def flood_impact(self) -> list[dict[str, Any]]:
        """Liveness around each Join flood: ghost members sit on committees until expelled."""
        out = []
        for e in (x for x in self.events if x["event"] == "join-flood"):
            t = self.t0 + e["t"]
            after = [m for tt, _, m in self.round_marks if tt >= t]
            out.append({"t": e["t"], "joins": e["joins"], "rounds_per_min_30s_before": self.rate(t - 30, t),
                        "rounds_per_min_60s_after": self.rate(t, t + 60), "members_max_after": max(after, default=None),
                        "members_at_end": after[-1] if after else None})
        return out

    def flood_report(self, stores: dict[str, Any], rejected: Counter[str]) -> dict[str, Any]:
        """Each Join flood: what it cost, how many of its Joins a record admitted, and the
        refusals (``no-admission``: work short of the chain's difficulty at arrival; the rest
        of a flood is dropped from the pending set once admitted Joins raise the difficulty)."""
        joins = stores.get("joins", {}) if stores else {}
        floods = []
        for f in self.adversary.floods:
            admitted = sorted(joins[k.hex()] for k in f.keys if k.hex() in joins)
            floods.append({"round": f.round, "joins": len(f.keys), "bits": f.bits, "work_s": f.work_s,
                           "sent": f.outcome, "target": f.target, "admitted": len(admitted),
                           "admitted_in_rounds": admitted})
        return {"floods": floods, "admitted_total": sum(x["admitted"] for x in floods),
                "sent_total": sum(x["joins"] for x in floods),
                "no_admission_rejections": int(rejected.get("no-admission", 0)),
                "max_joins_per_record": self.cl.genesis.max_joins}

    def summary(self, started: float, settle_s: float, settled: bool, snap: dict[int, dict[str, Any]], method: str,
                agreement: dict[str, Any], exit_codes: dict[str, int | None], stores: dict[str, Any],
                restarts: list[dict[str, Any]], fault_rounds: int) -> dict[str, Any]:
        cfg = self.cfg
        rejected: Counter[str] = Counter()
        last_by_pid: dict[tuple[int, int], dict[str, Any]] = self.status_by_pid
        for s in last_by_pid.values():
            for k, v in (s.get("rejected") or {}).items():
                rejected[k] += int(v)
        sync: Counter[str] = Counter()
        store_damage: Counter[str] = Counter()
        for s in last_by_pid.values():
            for k, v in (s.get("sync") or {}).items():
                if k != "behind" and isinstance(v, int):
                    sync[k] += v
            st_ = s.get("store") or {}
            store_damage["damaged_on_open"] += int(st_.get("damaged") or 0)
            store_damage["holes"] += len(st_.get("holes") or [])
            store_damage["archived_on_resync"] += len(st_.get("archived") or [])
        transport: Counter[str] = Counter()
        dropped: Counter[str] = Counter()
        core: Counter[str] = Counter()
        bans = 0
        for m in self.metrics_by_pid.values():
            for k, v in m.items():
                if k.startswith("gossip_dropped{"):
                    dropped[k[len("gossip_dropped{"):-1]] += int(v)
                elif k.startswith("core_events{"):
                    core[k[len("core_events{"):-1]] += int(v)
                elif k == "bans_total":
                    bans += int(v)
                elif k.startswith(TRANSPORT_COUNTERS):
                    transport[k] += int(v)
        sent, outcomes = self.adversary.tally.snapshot()
        behind = {f"node-{i}": round(max(s.longest_behind_s, (time.time() - s.behind_since) if s.behind_since else 0.0), 1)
                  for i, s in self.nodes.items()}
        rejoin = [round(s.caught_up_after_spawn, 1) for s in self.nodes.values() if s.restarts and s.caught_up_after_spawn]
        spawn_to_running = [e["after_s"] for e in self.events if e["event"] == "running"]
        agreeing = {i for i in snap if not any(f"node-{i}" in json.dumps(m) for m in agreement["mismatches"])} if settled else set()
        kills_survived = sum(1 for e in self.events if e["event"] == "kill" and e.get("node") in agreeing)
        by_sig = Counter(c.get("signature", "unclean shutdown") for c in self.crashes)
        for sig, n in by_sig.items():
            nodes = sorted({c["node"] for c in self.crashes if c.get("signature", "unclean shutdown") == sig})
            self.failures.append(f"{n} daemon exit(s) the bench did not cause, nodes {nodes}: {sig}")
        fault_s = max(1.0, 60.0 * cfg.minutes)
        return {
            "join_flood_impact": self.flood_impact(),
            "join_floods": self.flood_report(stores, rejected),
            "ok": not self.failures,
            "failures": self.failures,
            "notes": self.notes,
            "nodes": cfg.nodes,
            "honest_nodes": cfg.nodes,
            "adversary": "outside the swarm: throwaway identities, never a member",
            "transport": f"libp2p over {'network namespaces (link faults on)' if self.net else 'loopback (link faults off)'}",
            "minutes": cfg.minutes,
            "seed": cfg.seed,
            "rounds_during_faults": fault_rounds,
            "rounds_per_minute_during_faults": round(fault_rounds / (fault_s / 60.0), 1),
            "final_round": agreement.get("rounds", [None])[-1] if agreement.get("rounds") else None,
            "agreement": agreement,
            "stores": stores,
            "settled": settled,
            "settle_seconds": round(settle_s, 1),
            "faults": {"kills": self.counts["kills"], "kills_survived": kills_survived,
                       "restarts": self.counts["restarts"], "pauses": self.counts["pauses"],
                       "link_drops": self.counts["link_drops"], "join_floods": self.counts["join_floods"],
                       "faults_skipped_to_keep_a_majority": self.counts["faults_skipped"]},
            "hostile_sent_by_kind": dict(sorted(sent.items())),
            "hostile_sent_total": sum(sent.values()),
            "hostile_outcomes": dict(sorted(outcomes.items())),
            "adversary_identities": self.adversary.rotations,
            "adversary_errors": dict(self.adversary.errors),
            "rejected_by_reason": dict(sorted(rejected.items())),
            "transport_counters": dict(sorted(transport.items())),
            "gossip_dropped_by_reason": dict(sorted(dropped.items())),
            "core_events": {k: v for k, v in sorted(core.items()) if k.startswith(CORE_EVENTS_REPORTED)},
            "bans_total": bans,
            "sync": dict(sorted(sync.items())),
            "store_damage": dict(store_damage),
            "splits": {"detected": len(self.splits), "healed": sum(1 for s in self.splits if s["healed_at"] is not None),
                       "window_s": cfg.split_window_s, "list": self.splits},
            "longest_behind_s": max(behind.values(), default=0.0),
            "behind_s_by_node": behind,
            "join_seconds_initial": self.join_seconds,
            "spawn_to_running_s": spawn_to_running,
            "restart_to_caught_up_s": rejoin,
            "members_peak": self.members_peak,
            "members_final": {f"node-{i}": s.get("members") for i, s in sorted(snap.items())},
            "restarts_checked": restarts,
            "crashes": self.crashes,
            "crashes_by_signature": dict(by_sig),
            "exit_codes": exit_codes,
            "events": self.events,
            "out": str(self.cl.out),
            "wall_seconds": round(time.time() - self.t0, 1),
        }


def table(s: dict[str, Any]) -> str:
    f = s["faults"]
    lines = [
        f"seedswarm bench chaos: {s['nodes']} nodes, {s['minutes']:g} min of faults, seed {s['seed']}  ({s['transport']})",
        "",
        f"{'RESULT':28s} {'PASS' if s['ok'] else 'FAIL'}",
    ]
    for x in s["failures"]:
        lines.append(f"  FAILURE: {x}")
    for x in s["notes"]:
        lines.append(f"  note: {x}")
    a = s["agreement"]
    st = s["stores"]
    lines += [
        f"{'same head and model':28s} {'yes' if not a['mismatches'] and s['settled'] else 'NO'}  "
        f"(round {a['rounds']}, head {a['head']}, model {a['model_digest']}; {a['method']})",
        f"{'chain stores agree':28s} {'yes' if st and not st.get('first_differences') else 'NO'}  "
        f"(records compared: {st.get('compared_rounds')}, lengths {st.get('lengths')})",
        f"{'restarts kept their records':28s} {sum(r['ok'] is True for r in s['restarts_checked'])}/"
        f"{sum(r['ok'] is not None for r in s['restarts_checked'])} (restarts that opened their store)",
        f"{'crashed daemons':28s} {len(s['crashes'])}" + "".join(f"\n  {n:3d} x {k}" for k, n in s["crashes_by_signature"].items()),
        f"{'settled in':28s} {s['settle_seconds']} s",
        "",
        f"{'kills (survived)':28s} {f['kills']} ({f['kills_survived']})",
        f"{'restarts':28s} {f['restarts']}",
        f"{'pauses':28s} {f['pauses']}",
        f"{'link drops':28s} {f['link_drops']}",
        f"{'join floods':28s} {f['join_floods']}  (members peak {s['members_peak']})"
        + "".join(f"\n  flood at {x['t']:.0f} s: {x['joins']} joins, rounds/min {x['rounds_per_min_30s_before']} before -> "
                  f"{x['rounds_per_min_60s_after']} in the next minute, members up to {x['members_max_after']}, "
                  f"{x['members_at_end']} at the end" for x in s["join_flood_impact"])
        + "".join(f"\n  flood at round {x['round']}: {x['joins']} joins with {x['bits']} bits of work ({x['work_s']} s "
                  f"to compute), {x['admitted']} admitted (rounds {x['admitted_in_rounds']})"
                  for x in s["join_floods"]["floods"])
        + f"\n  no-admission rejections {s['join_floods']['no_admission_rejections']}",
        f"{'faults skipped (majority)':28s} {f['faults_skipped_to_keep_a_majority']}",
        f"{'rounds during faults':28s} {s['rounds_during_faults']} ({s['rounds_per_minute_during_faults']}/min)",
        f"{'splits detected / healed':28s} {s['splits']['detected']} / {s['splits']['healed']}  (status.json sync, "
        f"sum over processes: {s['sync']})",
        f"{'store damage':28s} {s['store_damage']}",
        f"{'longest behind the best':28s} {s['longest_behind_s']} s",
        f"{'initial join (s)':28s} {s['join_seconds_initial']}",
        f"{'restart -> caught up (s)':28s} {s['restart_to_caught_up_s']}",
        "",
        f"hostile messages sent: {s['hostile_sent_total']} ({s['adversary_identities']} identities)",
    ]
    for k, v in s["hostile_sent_by_kind"].items():
        lines.append(f"  {k:36s} {v}")
    lines.append("rejected by the daemons (sum over processes, status.json `rejected`):")
    for k, v in s["rejected_by_reason"].items():
        lines.append(f"  {k:36s} {v}")
    lines.append("transport-level refusals (/metrics, sum over processes):")
    for k, v in s["transport_counters"].items():
        lines.append(f"  {k:36s} {v}")
    lines.append("pubsub guard drops (gossip_dropped{reason}, sum over processes):")
    for k, v in s["gossip_dropped_by_reason"].items():
        lines.append(f"  {k:36s} {v}")
    lines.append(f"core events (core_events{{event}}, sum over processes; bans {s['bans_total']}):")
    for k, v in s["core_events"].items():
        lines.append(f"  {k:36s} {v}")
    shown: set[str] = set()
    for c in s["crashes"]:  # one log tail per signature: the others are alike
        sig = c.get("signature", "")
        if sig in shown:
            continue
        shown.add(sig)
        lines += ["", f"CRASH node-{c['node']} exit {c['exit_code']} at {c['t']} s ({sig}); log tail:", c["log_tail"]]
    lines.append(f"\nout: {s['out']} (node logs in nodes/*/node.log)  wall {s['wall_seconds']} s")
    return "\n".join(lines)


