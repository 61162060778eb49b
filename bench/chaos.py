"""``seedswarm bench chaos``: real daemons under a seeded schedule of faults and hostile traffic.

N ``seedswarm node`` processes (each in its own Linux network namespace when the bench runs as
root with iproute2, else on loopback) train while the bench

* SIGKILLs nodes and restarts them later with the same command (from their data dir),
* pauses nodes (SIGSTOP, then SIGCONT),
* cuts the link between pairs of nodes (namespaces only: a blackhole route each way; the pair
  keeps every other link, so gossip and sync must route around it),
* floods the topic with signed Joins from fresh keys, and
* runs :class:`seedswarm.bench.adversary.Adversary` (every kind in ``adversary.KINDS``).

It never takes more than a minority offline (killed, restarting or paused) at once, and every
daemon is honest (the adversary is an outsider with throwaway identities). At the end it stops
the faults, lets the swarm settle (bounded), and checks: every node runs, all report the same
head and model digest at the same round, the chain stores agree record by record up to the
common head, every killed node restarted with at least the records it had, no daemon exited
unless the bench killed it, and every daemon exits 0 on SIGTERM. Exit code 0 only if all hold.

Everything is read from the daemons' public surface: status.json, rounds.jsonl, chain.log (a
copy, opened with ChainStore), node.log, and the HTTP ``/status`` and ``/metrics`` endpoints.

This module is the entry point and the run loop; the bench's parts live beside it:
``chaos_cluster`` (configuration, launcher), ``netns`` (namespaces and link faults, shared with ``bench wan``), ``chaos_faults``,
``chaos_observe``, ``chaos_checks`` (the end checks) and ``chaos_report`` (summary, table).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

from seedswarm.bench.adversary import KINDS, Adversary
from seedswarm.bench.chaos_checks import ChaosChecks
from seedswarm.bench.chaos_cluster import ChaosCluster, ChaosConfig
from seedswarm.bench.chaos_faults import ChaosFaults
from seedswarm.bench.chaos_report import ChaosReport, table
from seedswarm.bench.chaos_state import NodeState
from seedswarm.bench.hostile_pubsub import RAW_PUBSUB_CASES
from seedswarm.bench.netns import Netns, netns_unavailable
from seedswarm.clihelp import parser


class Chaos(ChaosFaults, ChaosChecks, ChaosReport):
    """The bench: start-up, the fault loop, settling, then the end checks and the summary."""

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.t0 = time.time()
        if cfg.netns != "off":
            self.link_reason = netns_unavailable()
            if self.link_reason is None:
                self.net = Netns(cfg.nodes)
            elif cfg.netns == "on":
                raise RuntimeError(f"--netns on: {self.link_reason}")
        else:
            self.link_reason = "--netns off"
        if self.net is None:
            self.notes.append(f"link faults skipped: {self.link_reason} (nodes run on loopback)")
            self.say(f"chaos: link faults SKIPPED ({self.link_reason}); nodes run on loopback")
        try:
            if self.net is not None:
                self.net.up()
            return self._run()
        finally:
            with contextlib.suppress(Exception):
                self.cl.stop_all(grace=5.0)
            if self.net is not None:
                self.net.down()
            self.pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.cl = ChaosCluster(cfg, self.net, self.log)
        self.cl.setup()
        g = self.cl.genesis
        self.nodes = {i: NodeState(i) for i in range(cfg.nodes)}
        exclude = list(cfg.exclude)
        self.adversary = Adversary(g.run_id, self.cl.keys, g.directions * g.groups, cfg.seed, rate=cfg.hostile_rate,
                                   exclude=exclude, join_bits=g.join_pow_bits)
        where = f"network namespaces on {self.net.subnet}.0/24" if self.net else "loopback"
        self.say(f"chaos: {cfg.nodes} nodes ({where}), {cfg.minutes:g} min of faults, seed {cfg.seed}, "
                 f"run {g.run_id.hex()[:16]}, out {self.cl.out}")
        now = time.time()
        for i in range(cfg.nodes):
            self.spawn(i, now, "start")
        # start-up: every node running (bounded)
        deadline = now + cfg.startup_s
        last = 0.0
        while time.time() < deadline:
            now = time.time()
            self.observe(now)
            if len(self.online()) == cfg.nodes and self.best_round >= 3:
                break
            if self.crashes and not any(s.phase in ("starting", "up") for s in self.nodes.values()):
                break
            if now - last > 5:
                last = now
                self.say(f"chaos: starting, {len(self.online())}/{cfg.nodes} running, round {self.best_round}")
            time.sleep(0.5)
        else:
            self.failures.append(f"start-up: only {len(self.online())}/{cfg.nodes} nodes running after {cfg.startup_s:.0f} s")
        started = time.time()
        self.join_seconds = {f"node-{i}": round(self.nodes[i].caught_up_after_spawn or math.nan, 1) for i in self.nodes}
        end = started + 60.0 * cfg.minutes
        schedule = self.draw_faults(started, end)
        self.link_heal: list[tuple[float, int, int]] = []
        self.adversary.start()
        self.say(f"chaos: faults start ({len(schedule)} scheduled)")
        last = last_metrics = 0.0
        rounds_at_start = self.best_round
        while time.time() < end:
            now = time.time()
            statuses = self.observe(now)
            for i, s in self.nodes.items():
                if s.phase == "paused" and now >= s.resume_at:
                    self.resume(i, now)
                elif s.phase in ("down", "crashed") and now >= s.resume_at:
                    self.spawn(i, now, "after-kill" if s.phase == "down" else "after-crash")
            for item in [x for x in self.link_heal if x[0] <= now]:
                self.link_heal.remove(item)
                assert self.net is not None
                self.net.heal(item[1], item[2])
                self.event("link-heal", None, pair=f"{item[1]}-{item[2]}")
            while schedule and schedule[0][0] <= now:
                self.do_fault(schedule.pop(0)[1], now)
            self.update_view(statuses)
            if now - last_metrics > 10:
                last_metrics = now
                self.poll_metrics()
            if now - last > 5:
                last = now
                self.progress(now, end)
            time.sleep(0.4)
        fault_rounds = self.best_round - rounds_at_start
        return self.settle_and_check(started, fault_rounds)

    def settle_and_check(self, started: float, fault_rounds: int) -> dict[str, Any]:
        cfg = self.cfg
        self.say("chaos: faults stop; settling")
        self.adversary.stop()
        now = time.time()
        for i, s in self.nodes.items():
            if s.phase == "paused":
                self.resume(i, now)
            elif s.phase in ("down", "crashed"):
                self.spawn(i, now, "settle")
        if self.net is not None:
            for i, j in list(self.net.cut):
                self.net.heal(i, j)
            self.link_heal.clear()
        settle_start = time.time()
        settled = False
        last = 0.0
        while time.time() - settle_start < cfg.settle_s:
            now = time.time()
            st = self.observe(now)
            for i, ns in self.nodes.items():
                if ns.phase == "crashed" and now >= ns.resume_at:
                    self.spawn(i, now, "after-crash")
            up = self.online()
            if len(up) == cfg.nodes and all(i in st for i in up):
                live = self.live_statuses()
                rounds = [int(live[i]["round"]) for i in up if i in live]
                # A round may close mid-poll; a node that has just caught up from records stored
                # ahead of its model reports no digest until its next live round rebuilds it.
                modelled = all(live[i].get("model_digest") for i in up if i in live)
                if len(rounds) == cfg.nodes and max(rounds) - min(rounds) <= 2 and modelled:
                    settled = True
                    break
            if now - last > 5:
                last = now
                self.progress(now, now)
            time.sleep(0.5)
        settle_s = time.time() - settle_start
        if not settled:
            lag = {f"node-{i}": (self.nodes[i].phase, (self.cl.read_status(i) or {}).get("round")) for i in self.nodes}
            self.failures.append(f"not settled within {cfg.settle_s:.0f} s: {lag}")
        # the consistent snapshot: every node's live /status at one round
        snapshot, method = self.snapshot()
        agreement = self.check_agreement(snapshot, method)
        # final metrics, then a graceful stop of every node
        self.poll_metrics()
        if self._metrics_future is not None:
            with contextlib.suppress(Exception):
                self._metrics_future.result(timeout=30)
        for i in self.nodes:
            final_st = self.cl.read_status(i)
            if final_st is not None:
                self.status_by_pid[(i, final_st["pid"])] = final_st
        exit_codes = self.stop_all()
        stores = self.check_stores(snapshot)
        restarts = self.check_restarts()
        return self.summary(started, settle_s, settled, snapshot, method, agreement, exit_codes, stores, restarts,
                            fault_rounds)


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``seedswarm bench chaos``."""
    d = ChaosConfig()
    ap = parser("seedswarm bench chaos",
                "Real daemons under seeded kills, pauses, link drops, Join floods and hostile traffic; checks "
                "at the end that every node agrees on one head, the chain stores are identical and no daemon "
                "crashed.",
                ["seedswarm bench chaos --nodes 8 --minutes 10 --json",
                 "seedswarm bench chaos --nodes 4 --minutes 2 --netns off --exclude slow-stream"])
    ap.add_argument("--nodes", type=int, default=d.nodes, help="honest daemons (at least 3)")
    ap.add_argument("--minutes", type=float, default=d.minutes, help="minutes of faults")
    ap.add_argument("--seed", type=int, default=d.seed, help="seed of the fault schedule and the hostile traffic")
    ap.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    ap.add_argument("--out", default=None, help="output folder (default: runs/chaos-<time>)")
    ap.add_argument("--netns", choices=("auto", "on", "off"), default=d.netns,
                    help="run nodes in network namespaces (needed for link drops; auto: when root)")
    ap.add_argument("--fault-every", type=float, default=d.fault_every_s, help="mean seconds between faults")
    ap.add_argument("--hostile-rate", type=float, default=d.hostile_rate, help="hostile actions per second")
    ap.add_argument("--join-flood", type=int, default=d.join_flood, help="Joins per flood (two floods; 0: none)")
    ap.add_argument("--exclude", default="", metavar="KIND,...",
                    help=f"hostile kinds or raw pubsub cases to skip (default: none; kinds: {', '.join(KINDS)}; "
                         f"cases: {', '.join(RAW_PUBSUB_CASES)})")
    ap.add_argument("--settle", type=float, default=d.settle_s, help="seconds allowed to settle after the faults")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    if args.nodes < 3:
        print("seedswarm bench chaos: --nodes must be at least 3", file=sys.stderr)
        return 2
    if args.minutes <= 0:
        print("seedswarm bench chaos: --minutes must be positive", file=sys.stderr)
        return 2
    out = args.out or str(Path("runs") / time.strftime("chaos-%Y%m%d-%H%M%S"))
    cfg = ChaosConfig(nodes=args.nodes, minutes=args.minutes, seed=args.seed, out=out, netns=args.netns,
                      fault_every_s=args.fault_every, hostile_rate=args.hostile_rate, join_flood=args.join_flood,
                      exclude=[x for x in args.exclude.split(",") if x], settle_s=args.settle, quiet=args.quiet)
    chaos = Chaos(cfg)
    old = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        summary = chaos.run()
    except KeyboardInterrupt:
        print("seedswarm bench chaos: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one clear line
        print(f"seedswarm bench chaos: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, old)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "chaos.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        print(table(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

