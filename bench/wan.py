"""``seedswarm bench wan``: real daemons over emulated wide-area links.

N ``seedswarm node`` processes (the daemons ``seedswarm cluster`` starts) each run in their own
Linux network namespace behind an access link with the latency, jitter, loss and bandwidth of
a named profile (:mod:`seedswarm.bench.wan_profile`; per-host values drawn from ``--seed``).
The links are ``tc netem`` on a veth pair per node on a bridge where the kernel has
``sch_netem``; elsewhere the same model runs in user space over one TUN device per namespace
(:mod:`seedswarm.bench.wan_link`). The swarm trains until every node reaches ``--rounds`` on
one head (``seedswarm cluster``'s end condition), then the bench reports what a WAN changes:
round latency, rounds per minute, agreement, bytes per node per round at the interface and at
the transport, CPU seconds per node, join times, and whether the adaptive deadline and the
quorum let a slow trainer hold the others up: per node, the committee seats it held and how
many records carried its contribution, replayed from a node's chain (``--slow-host MBIT`` puts
the last host on a thin link, a straggler).

Needs root and iproute2; every namespace (and the emulator) is removed on exit, Ctrl+C and
errors included.
"""

from __future__ import annotations

import contextlib
import json
import select
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from seedswarm.bench.netns import Netns, netem_unavailable, netns_unavailable
from seedswarm.bench.wan_cluster import WanCluster
from seedswarm.bench.wan_profile import PROFILES, HostLink, ProfileError, host_links, path_rtt_ms
from seedswarm.bench.wan_report import chain_duties, deadline_report, table
from seedswarm.clihelp import parser
from seedswarm.sim.cluster import ClusterConfig

LINK_MODES = ("auto", "netem", "user")


class WanError(RuntimeError):
    """The bench cannot run here, or its links could not be built (one line, for the user)."""


@dataclass
class WanConfig:
    profile: str = "continent"
    nodes: int = 4
    rounds: int = 30
    seed: int = 0
    link: str = "auto"  # auto | netem | user
    dir: str = ""
    timeout: float = 0.0  # 0: from the nodes and rounds
    trainers: int = ClusterConfig.trainers  # the genesis's committee size
    round_timeout: float = 0.0  # the genesis's cap on the aggregation deadline (0: the profile's)
    slow_mbit: float = 0.0  # the last host's link rate instead of the profile's (0: the profile's)
    quiet: bool = False


def link_mode(wanted: str) -> str:
    """The link emulation to use ("netem" or "user"), or :class:`WanError` saying why none."""
    if (why := netns_unavailable()) is not None:
        raise WanError(why)
    netem = netem_unavailable()
    if wanted == "netem" and netem is not None:
        raise WanError(f"--link netem: {netem}")
    if wanted == "user" or netem is not None:
        return "user"
    return "netem"


class Emulator:
    """The user-space link emulator process (``python -m seedswarm.bench.wan_link``)."""

    def __init__(self, net: Netns, links: list[HostLink], stats: Path, seed: int) -> None:
        self.devs = [f"ssw{net.tag}t{i}" for i in range(net.n)]
        self.stats_path = stats
        self.spec = {"hosts": [{"index": i, "ns": net.ns(i), "addr": net.ip(i), "dev": self.devs[i],
                                "link": links[i].as_dict()} for i in range(net.n)],
                     "prefix_len": 24, "seed": seed, "stats": str(stats)}
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 60.0) -> None:
        self.proc = p = subprocess.Popen([sys.executable, "-m", "seedswarm.bench.wan_link"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(json.dumps(self.spec) + "\n")
        p.stdin.flush()
        ready, _, _ = select.select([p.stdout], [], [], timeout)
        line = p.stdout.readline().strip() if ready else ""
        if line != "ready":
            raise WanError(f"link emulator did not start: {line or f'no answer in {timeout:.0f} s'}")

    def stop(self) -> dict[str, Any]:
        p = self.proc
        if p is None:
            return {}
        if p.poll() is None:
            with contextlib.suppress(OSError):
                assert p.stdin is not None
                p.stdin.close()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.proc = None
        try:
            d: dict[str, Any] = json.loads(self.stats_path.read_text())
            return d
        except (OSError, ValueError):
            return {}


def _latencies(metrics_jsonl: Path) -> list[float]:
    """Seconds between consecutive rounds (first node to reach each), as the cluster measures."""
    first: dict[int, float] = {}
    with contextlib.suppress(OSError):
        for ln in metrics_jsonl.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError):
                x = json.loads(ln)
                first[int(x["round"])] = float(x["time"])
    return [first[r] - first[r - 1] for r in sorted(first) if r - 1 in first]


def _mean(xs: list[float]) -> float | None:
    return round(statistics.fmean(xs), 4) if xs else None


class WanBench:
    """One run: namespaces and links up, the cluster, the figures; everything torn down after."""

    def __init__(self, cfg: WanConfig, log: TextIO = sys.stderr) -> None:
        self.cfg = cfg
        self.log = log
        self.links = host_links(cfg.profile, cfg.nodes, cfg.seed)
        if cfg.slow_mbit:  # one straggler on a thin link: does it still contribute, does it hold anyone up?
            self.links[-1] = replace(self.links[-1], rate_mbit=cfg.slow_mbit)
        self.cluster: WanCluster | None = None

    def say(self, msg: str) -> None:
        if not self.cfg.quiet:
            print(msg, file=self.log, flush=True)

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        mode = link_mode(cfg.link)
        out = Path(cfg.dir)
        net = Netns(cfg.nodes, prefix="ssw")
        emu: Emulator | None = None
        emu_stats: dict[str, Any] = {}
        try:
            net.up(links=mode == "netem")
            if mode == "netem":
                devs = [net.inner(i) for i in range(cfg.nodes)]
                for h in self.links:
                    net.shape(h.host, h.one_way_ms, h.jitter_ms, h.loss, h.rate_mbit)
            else:
                emu = Emulator(net, self.links, out / "link-emulator.json", cfg.seed)
                devs = emu.devs
                emu.start()
            self.say(f"wan: {cfg.nodes} namespaces on {net.subnet}.0/24, profile {cfg.profile} "
                     f"({PROFILES[cfg.profile].about}), links by {'tc netem' if mode == 'netem' else 'the user-space emulator'}")
            timeout = cfg.timeout or 90.0 + 12.0 * cfg.nodes + 8.0 * cfg.rounds
            ccfg = ClusterConfig(nodes=cfg.nodes, rounds=cfg.rounds, seed=cfg.seed, out=str(out), timeout=timeout,
                                 eval_every=0, quiet=cfg.quiet, trainers=cfg.trainers,
                                 round_timeout=cfg.round_timeout or PROFILES[cfg.profile].round_timeout)
            self.cluster = cl = WanCluster(ccfg, net, devs, self.links, self.log)
            summary = cl.run()
        finally:
            if self.cluster is not None:
                with contextlib.suppress(Exception):
                    self.cluster.stop_all(grace=5.0)
            if emu is not None:
                emu_stats = emu.stop()
            net.down()
        return self.figures(summary, mode, emu_stats)

    def figures(self, summary: dict[str, Any], mode: str, emu_stats: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        cl = self.cluster
        assert cl is not None
        g = cl.genesis
        rows = cl.window()
        lat = _latencies(Path(cfg.dir) / "metrics.jsonl")
        try:
            counts, duties = chain_duties(cl.node_dir(0) / "chain.log", g)
        except (OSError, ValueError) as e:
            self.say(f"wan: cannot read node-0's chain store: {e}")
            counts, duties = [], {}
        by_node = {f"node-{i}": duties.get(pk, {"seats": 0, "contributed": 0}) for i, pk in enumerate(cl.keys)}
        cpu = {f"node-{i}": round(c, 2) for i, c in sorted(cl.cpu_total.items())}
        rtts = [path_rtt_ms(a, b) for a in self.links for b in self.links if a.host < b.host]
        mean_lat = summary.get("round_latency_mean_s")
        s = dict(summary)
        s.pop("config", None)
        s.update({
            "bench": "wan",
            "profile": cfg.profile,
            "seed": cfg.seed,
            "link_emulation": "tc netem on veth pairs on a bridge" if mode == "netem"
            else "user-space TUN emulator (bench/wan_link.py; the kernel has no sch_netem)",
            "transport": "libp2p (TCP, Noise, Yamux, GossipSub), one OS process per node, one network namespace each",
            "hosts": [h.as_dict() | {"one_way_ms": h.one_way_ms} for h in self.links],
            "path_rtt_ms_min": round(min(rtts), 1) if rtts else None,
            "path_rtt_ms_max": round(max(rtts), 1) if rtts else None,
            "rounds_per_minute": round(60.0 / mean_lat, 2) if mean_lat else None,
            "window": {
                "what": "from the moment every node had applied 3 rounds to just before the stop",
                "link_bytes_sent_per_node_per_round": _mean([r["link_bytes_sent_per_round"] for r in rows.values()]),
                "link_bytes_received_per_node_per_round":
                    _mean([r["link_bytes_received_per_round"] for r in rows.values()]),
                "transport_bytes_sent_per_node_per_round":
                    _mean([r["transport_bytes_sent_per_round"] for r in rows.values()]),
                "cpu_seconds_per_node_per_round": _mean([r["cpu_seconds_per_round"] for r in rows.values()]),
                "cpu_share_per_node": _mean([r["cpu_share"] for r in rows.values()]),
                "by_node": rows,
            },
            # members on each node's final chain: a swarm that expelled its slow trainers can
            # still agree on one head, so agreement alone does not say the swarm held together
            "members_final": {f"node-{i}": d.get("members") for i, d in sorted(cl.final.items())},
            "cpu_seconds_per_node": cpu,
            "cpu_seconds_per_node_mean": _mean(list(cpu.values())),
            "link_emulator": emu_stats,
            "deadline": deadline_report(counts, min(g.trainers, cfg.nodes), lat, g),
            # per node, from node-0's chain: committee seats in records that hold any contribution,
            # and how many of those carried this node's (a straggler that still contributes)
            "contributions_by_node": by_node,
            "slow_host": {"node": f"node-{cfg.nodes - 1}", "rate_mbit": cfg.slow_mbit} if cfg.slow_mbit else None,
        })
        return s


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``seedswarm bench wan``."""
    ap = parser("seedswarm bench wan",
                "Real daemons, each in its own network namespace behind an emulated access link (latency, "
                "jitter, loss, bandwidth from a profile); reports round latency, rounds per minute, agreement, "
                "bytes and CPU per node per round, join times and what the aggregation deadline did. Needs root "
                "and iproute2.",
                ["seedswarm bench wan --profile world --nodes 16 --rounds 40",
                 "seedswarm bench wan --profile continent --nodes 4 --rounds 10 --json --out wan.json"])
    ap.add_argument("--profile", choices=tuple(PROFILES), default="continent",
                    help="; ".join(f"{p.name}: {p.about}" for p in PROFILES.values()).replace("%", "%%"))
    ap.add_argument("--nodes", type=int, default=4, help="daemons, one namespace each (at least 2)")
    ap.add_argument("--rounds", type=int, default=30, help="every node stops taking duties at this round")
    ap.add_argument("--seed", type=int, default=0, help="seed of the per-host links, the model and the data shards")
    ap.add_argument("--trainers", type=int, default=WanConfig.trainers,
                    help="trainers per round (the genesis's committee; every one trains on the shared CPUs)")
    ap.add_argument("--round-timeout", type=float, default=0.0,
                    help="seconds an aggregator waits for contributions at most, the cap on the adaptive deadline "
                         "(0: the profile's: 2 s, 4 s for world)")
    ap.add_argument("--slow-host", type=float, default=0.0, metavar="MBIT",
                    help="give the last host a link of MBIT Mbit/s both ways instead of the profile's (a straggler)")
    ap.add_argument("--link", choices=LINK_MODES, default="auto",
                    help="tc netem, or the user-space emulator (auto: netem where the kernel has it)")
    ap.add_argument("--dir", default=None, metavar="DIR", help="run folder for the nodes (default: a new runs/wan-<time>)")
    ap.add_argument("--timeout", type=float, default=0.0, help="give up after this many seconds (0: from nodes and rounds)")
    ap.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    ap.add_argument("--out", default=None, metavar="FILE", help="also write the JSON summary to FILE, refused if it exists (default: only DIR/wan.json)")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return run_main(ap.parse_args(argv))


def run_main(args: Any) -> int:
    from seedswarm.node.files import OutPathError, new_run_dir, prepare_out_dir

    def fail(msg: str) -> int:
        print(f"seedswarm bench wan: {msg}", file=sys.stderr)
        return 2

    if args.nodes < 2:
        return fail("--nodes must be at least 2")
    if args.nodes > 250:
        return fail("--nodes must be at most 250 (one /24 of namespaces)")
    if args.rounds < 1:
        return fail("--rounds must be positive")
    if args.trainers < 1 or args.round_timeout < 0:
        return fail("--trainers must be positive and --round-timeout not negative")
    if args.slow_host < 0:
        return fail("--slow-host must not be negative (0: the profile's rate)")
    if args.out and Path(args.out).exists():
        return fail(f"--out {args.out} exists: choose another file")
    try:
        link_mode(args.link)
        run_dir = prepare_out_dir(args.dir) if args.dir else new_run_dir(Path("runs") / time.strftime("wan-%Y%m%d-%H%M%S"))
    except (WanError, OutPathError) as e:
        return fail(str(e))
    cfg = WanConfig(profile=args.profile, nodes=args.nodes, rounds=args.rounds, seed=args.seed, link=args.link,
                    dir=str(run_dir), timeout=args.timeout, quiet=args.quiet, trainers=args.trainers,
                    round_timeout=args.round_timeout, slow_mbit=args.slow_host)
    bench = WanBench(cfg)

    def on_signal(signum: int, _frame: Any) -> None:
        if bench.cluster is None:
            raise KeyboardInterrupt  # still building the links: unwind (run() tears them down)
        bench.cluster.stop_requested = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        summary = bench.run()
    except KeyboardInterrupt:
        return fail("interrupted") and 130
    except (WanError, ProfileError, RuntimeError, OSError) as e:
        return fail(f"{type(e).__name__}: {e}")
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    text = json.dumps(summary, indent=2, default=str) + "\n"
    (run_dir / "wan.json").write_text(text)
    if args.out:
        Path(args.out).write_text(text)
    print(json.dumps(summary, default=str) if args.json else table(summary))
    if summary["interrupted"]:
        return 130
    return 0 if summary["finished"] and summary["honest_digest_agreement"] == 1.0 else 1
