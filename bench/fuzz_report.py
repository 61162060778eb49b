"""The fuzzer's report: the checks at the end, the JSON summary and the table printed from it.

:meth:`FuzzReport.summarize` turns what was sent, the victim's counters before and after, its
RSS samples and rounds into one dict with the failures of the end checks (alive, rounds
applied, RSS flat after the warm-up, rejection counters moved, raw frames survived and
counted); ``--json`` prints it and ``fuzz.json`` holds it; :func:`table` formats it for people.
A mixin of :class:`seedswarm.bench.fuzz.Fuzzer`.
"""

from __future__ import annotations

from typing import Any

from seedswarm.bench.fuzz_victim import FuzzVictim


class FuzzReport(FuzzVictim):
    """The end checks and the summary of one fuzz run."""

    def summarize(self, t0: float, fuzz_s: float, m0: dict[str, float], m1: dict[str, float], m2: dict[str, float],
                  st1: dict[str, Any] | None,
                  alive: bool, rss: list[tuple[float, float]], raw_alive: bool | None) -> dict[str, Any]:
        cfg = self.cfg
        failures: list[str] = []
        sent, outcomes = self.tally.snapshot()
        total = sum(v for k, v in sent.items() if not k.startswith("raw-pubsub"))
        rounds_in = [r for t, r in self.rounds if t <= fuzz_s]
        advanced = (max(rounds_in) - min(rounds_in)) if rounds_in else 0
        warm = [x for t, x in rss if t >= min(cfg.warmup_s, fuzz_s / 5)]
        rss_start = rss[0][1] if rss else None
        rss_warm = warm[0] if warm else None
        rss_peak = max((x for _, x in rss), default=None)
        rss_end = rss[-1][1] if rss else None
        growth = (max(warm) - rss_warm) if warm and rss_warm is not None else None
        # after the drain: what stayed (a leak) as opposed to what was buffered while we wrote
        residual = (rss_end - rss_warm) if rss_end is not None and rss_warm is not None else None

        def delta(prefix: str, a: dict[str, float] = m0, b: dict[str, float] = m1) -> dict[str, int]:
            keys = {k for k in (*a, *b) if k.startswith(prefix)}
            return {k[len(prefix):].strip("{}") or prefix: int(b.get(k, 0) - a.get(k, 0)) for k in sorted(keys)
                    if b.get(k, 0) - a.get(k, 0)}

        rejected = delta("rejected_total")
        gossip_rejected = sum(delta("gossip_rejected").values())
        transport = {k: int(m1.get(k, 0) - m0.get(k, 0)) for k in
                     ("frames_too_large", "protocol_mismatches", "requests_failed", "requests_served", "events_dropped",
                      "peers_refused_total", "validator_errors", "handler_errors")}
        core = delta("core_events")
        dropped = delta("gossip_dropped")
        raw_dropped = delta("gossip_dropped", m1, m2)
        moved = sum(rejected.values()) + gossip_rejected + sum(dropped.values())
        if not alive:
            failures.append(f"the daemon died during the fuzz (exit {self.proc.returncode}):\n{self.log_tail()}")
        if advanced < 5:
            failures.append(f"the daemon applied only {advanced} rounds during the fuzz")
        if growth is None or growth >= 2 * cfg.rss_limit_mb:
            failures.append(f"RSS peaked {growth} MB above its warm-up level (limit {2 * cfg.rss_limit_mb} MB)")
        if residual is None or residual >= cfg.rss_limit_mb:
            failures.append(f"RSS stayed {residual} MB above its warm-up level after the drain (limit {cfg.rss_limit_mb} MB)")
        if moved < total // 100:
            failures.append(f"rejection counters moved by {moved} for {total} hostile messages")
        if total < cfg.messages:
            failures.append(f"only {total} of {cfg.messages} messages were sent (timeout or the daemon died)")
        if raw_alive is False:
            failures.append(f"the daemon stopped applying rounds after the raw pubsub frames:\n{self.log_tail()}")
        elif raw_alive and not raw_dropped.get("rpc-decode") or raw_alive and not raw_dropped.get("no-key"):
            failures.append(f"the pubsub guard did not count the raw frames it dropped: {raw_dropped}")
        return {
            "ok": not failures,
            "failures": failures,
            "messages": total,
            "messages_per_second": round(total / max(fuzz_s, 1e-9), 1),
            "fuzz_seconds": round(fuzz_s, 1),
            "drain_seconds": round(getattr(self, "drain_seconds", 0.0), 1),
            "seed": cfg.seed,
            "sent_by_channel": dict(sorted(sent.items())),
            "mutations": dict(sorted(self.ops.items())),
            "direct_outcomes": {k: v for k, v in sorted(outcomes.items()) if k.startswith("direct:")},
            "raw_pubsub": {k: v for k, v in sorted(outcomes.items()) if k.startswith("raw-pubsub:")},
            "identities": self.identities,
            "alive_after_fuzz": alive,
            "alive_after_raw_frames": raw_alive,
            "rounds_applied_during_fuzz": advanced,
            "round_at_end": int(st1["round"]) if st1 else None,
            "rss_mb": {"start": rss_start, "after_warmup": rss_warm, "peak": rss_peak, "end": rss_end,
                       "growth_after_warmup": round(growth, 1) if growth is not None else None,
                       "residual_after_drain": round(residual, 1) if residual is not None else None,
                       "limit": cfg.rss_limit_mb, "peak_limit": 2 * cfg.rss_limit_mb},
            "rss_samples": [(round(t, 1), round(x, 1)) for t, x in rss[:: max(1, len(rss) // 60)]],
            "rejected_by_reason": rejected,
            "gossip_rejected_by_validator": gossip_rejected,
            "transport_counters": transport,
            "gossip_dropped_by_reason": dropped,
            "raw_pubsub_dropped_by_reason": raw_dropped,
            "bans": int(m1.get("bans_total", 0) - m0.get("bans_total", 0)),
            "core_rejections": {k: v for k, v in core.items() if k.startswith("rejected.")},
            "core_events": core,
            "client_errors": dict(self.errors),
            "slowest_metrics_poll_s": round(self.slowest_metrics_poll_s, 2),
        }


def table(s: dict[str, Any]) -> str:
    r = s["rss_mb"]
    lines = [
        f"seedswarm bench fuzz: {s['messages']} hostile messages in {s['fuzz_seconds']} s, drain included "
        f"({s['messages_per_second']}/s, {s['identities']} identities), seed {s['seed']}",
        "",
        f"{'RESULT':30s} {'PASS' if s['ok'] else 'FAIL'}",
    ]
    lines += [f"  FAILURE: {f}" for f in s["failures"]]
    lines += [
        f"{'alive after the fuzz':30s} {s['alive_after_fuzz']}",
        f"{'alive after raw pubsub frames':30s} {s['alive_after_raw_frames']}",
        f"{'rounds applied during the fuzz':30s} {s['rounds_applied_during_fuzz']}",
        f"{'RSS MB start/warm/peak/end':30s} {r['start']:.0f} / {r['after_warmup']:.0f} / {r['peak']:.0f} / {r['end']:.0f}"
        f"  (peak - warm {r['growth_after_warmup']} MB, limit {r['peak_limit']}; end - warm {r['residual_after_drain']} MB,"
        f" limit {r['limit']})" if r["start"] else "RSS: not sampled",
        "",
        "sent by channel:",
    ]
    lines += [f"  {k:40s} {v}" for k, v in s["sent_by_channel"].items()]
    lines.append("rejected by the daemon (rejected_total{reason}):")
    lines += [f"  {k:40s} {v}" for k, v in s["rejected_by_reason"].items()]
    lines.append(f"  {'gossip validator (gossip_rejected)':40s} {s['gossip_rejected_by_validator']}")
    lines.append(f"  {'peers banned (bans_total)':40s} {s['bans']}")
    lines.append("pubsub guard drops (gossip_dropped{reason}):")
    lines += [f"  {k:40s} {v}" for k, v in s["gossip_dropped_by_reason"].items()]
    lines.append("raw pubsub frames sent, and the guard's drops after them:")
    lines += [f"  {k:40s} {v}" for k, v in s["raw_pubsub"].items()]
    lines += [f"  dropped: {k:31s} {v}" for k, v in s["raw_pubsub_dropped_by_reason"].items()]
    lines.append("core events (core_events{event}, refusals and drops):")
    lines += [f"  {k:40s} {v}" for k, v in s["core_events"].items()
              if k.startswith(("rejected.", "records.duplicate", "records.orphan", "records.known_bad",
                               "checkpoints.missing", "inputs.unavailable", "banned."))]
    lines.append("transport counters:")
    lines += [f"  {k:40s} {v}" for k, v in s["transport_counters"].items()]
    lines.append("mutations (top 12):")
    lines += [f"  {k:40s} {v}" for k, v in sorted(s["mutations"].items(), key=lambda kv: -kv[1])[:12]]
    return "\n".join(lines)


