"""``seedswarm bench nat``: a swarm whose trainers sit behind NAT and meet through a relay.

Node 0 runs on a public address with ``--relay`` (circuit relay v2); every other node runs in a
"home" behind its own masquerading router (:mod:`seedswarm.bench.nat_net`), starts with
``--relay-via <node 0>`` and bootstraps from node 0 alone. The NATed nodes cannot dial each
other (the bench checks that first), so every byte between two of them goes through the relay.
The swarm trains until every node reaches ``--rounds`` on one head (``seedswarm cluster``'s end
condition); the bench reports agreement on head and model digest, each NATed node's time from
process start to its first applied round, and the share of each node's socket bytes that went
through the relay (``relay`` in ``bytes_sent_by_kind``).

Needs root, iproute2 and iptables; every namespace is removed on exit, Ctrl+C and errors
included.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from seedswarm.bench.nat_net import ROUTERS, NatNet, nat_unavailable
from seedswarm.clihelp import parser
from seedswarm.sim.cluster import Cluster, ClusterConfig

PORT = 4001


class NatCluster(Cluster):
    """``seedswarm cluster``'s daemons: node 0 public and a relay, the others behind NAT."""

    def __init__(self, cfg: ClusterConfig, net: NatNet, log: Any = None, hole_punch: bool = True,
                 auto_relay: bool = False) -> None:
        super().__init__(cfg, log)
        self.net = net
        self.hole_punch = hole_punch
        self.auto_relay = auto_relay
        self.final: dict[int, dict[str, Any]] = {}  # each node's last status before the stop

    def ns(self, i: int) -> str:
        return self.net.pub_ns[0] if i == 0 else self.net.host_ns[i - 1]

    def place(self, peer_ids: list[str]) -> None:
        self.hosts = [self.net.public_ip(0)] + [self.net.private_ip(h) for h in range(len(peer_ids) - 1)]
        self.ports = [PORT] * len(peer_ids)
        self.relay_addr = f"/ip4/{self.hosts[0]}/tcp/{PORT}/p2p/{peer_ids[0]}"
        # how the others reach each node: the relay directly, a NATed node through the relay
        self.addrs = [self.relay_addr] + [f"{self.relay_addr}/p2p-circuit/p2p/{pid}" for pid in peer_ids[1:]]

    def command(self, i: int) -> list[str]:
        base = super().command(i)
        cmd: list[str] = []
        skip = False
        for a in base:  # the cluster's bootstrap list (nodes 0 and 1) is replaced
            if skip:
                skip = False
            elif a == "--bootstrap":
                skip = True
            else:
                cmd.append(a)
        via = "auto" if self.auto_relay else self.relay_addr
        cmd += ["--relay"] if i == 0 else ["--relay-via", via, "--bootstrap", self.relay_addr]
        if not self.hole_punch:
            cmd += ["--no-hole-punch"]
        return ["ip", "netns", "exec", self.ns(i), *cmd]

    def stop_all(self, grace: float = 10.0) -> dict[int, int | None]:
        self.final.update(super().statuses())
        return super().stop_all(grace)

    def header(self) -> str:
        return super().header().replace(
            "on 127.0.0.1", f"(node 0 a public relay, {self.cfg.nodes - 1} behind NAT) in network namespaces")


def relay_shares(final: dict[int, dict[str, Any]]) -> dict[str, float]:
    """Per node, the share of the bytes it wrote to its sockets that were relay traffic: on a
    NATed node what it exchanged with peers through the relay, on the relay what it forwarded."""
    out = {}
    for i, d in sorted(final.items()):
        kinds = d.get("bytes_sent_by_kind") or {}
        total = sum(kinds.values())
        if total:
            out[f"node-{i}"] = round(kinds.get("relay", 0) / total, 4)
    return out


def run(nodes: int, rounds: int, out: Path, seed: int = 0, quiet: bool = True, trainers: int = 0,
        hole_punch: bool = True, routers: str = "drop", auto_relay: bool = False) -> dict[str, Any]:
    """Build the test bed, run the swarm in it, tear it down; the summary (``cluster``'s, plus
    ``relay_byte_share``, ``nat_join_seconds`` and ``reachability``)."""
    net = NatNet(public=1, natted=nodes - 1, routers=routers)
    net.up()
    try:
        # the premise: NATed hosts reach the public relay, never each other nor are reached
        reach = net.reachability(PORT + 1)
        # generous: three daemons start, reserve on the relay and punch holes on a machine that may
        # be busy with other work (CI); a run that ends early reports finished=false
        cfg = ClusterConfig(nodes=nodes, rounds=rounds, seed=seed, out=str(out), quiet=quiet, eval_every=0,
                            timeout=max(300.0, 60.0 + 10.0 * rounds))
        if trainers:
            cfg.trainers = trainers
        cluster = NatCluster(cfg, net, hole_punch=hole_punch, auto_relay=auto_relay)
        t0 = time.time()
        summary = cluster.run()
        summary["transport"] = "libp2p over circuit relay v2: node 0 public relay, the others behind NAT"
        summary["reachability"] = reach
        summary["hole_punch"] = hole_punch
        summary["routers"] = routers
        summary["relay_choice"] = "auto (AutoNAT, then a connected relay)" if auto_relay else "--relay-via node 0"
        statuses = cluster.final
        summary["relay_byte_share"] = relay_shares(statuses)
        summary["nat_join_seconds"] = {k: round(v, 2) for k, v in summary["join_seconds"].items() if k != "node-0"}
        summary["heads"] = {f"node-{i}": d.get("head") for i, d in statuses.items()}
        summary["model_digests"] = {f"node-{i}": d.get("model_digest") for i, d in statuses.items()}
        summary["relay"] = {f"node-{i}": d.get("relay") for i, d in statuses.items()}
        summary["bench_seconds"] = round(time.time() - t0, 1)
        return summary
    finally:
        net.down()


def main(argv: list[str] | None = None) -> int:
    p = parser("seedswarm bench nat",
               "A swarm behind NAT: node 0 is a public circuit relay (seedswarm node --relay), the others each "
               "sit behind their own masquerading router (iptables) and reach each other only through it. Prints "
               "head and model-digest agreement, each NATed node's time to its first round, and the share of bytes "
               "that went through the relay. Needs root, iproute2 and iptables.",
               examples=["seedswarm bench nat --nodes 3 --rounds 8 --json   # as root"])
    p.add_argument("--nodes", type=int, default=3, help="node processes: 1 public relay + the rest behind NAT")
    p.add_argument("--rounds", type=int, default=8, help="every node stops taking duties at this round")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and the data shards")
    p.add_argument("--dir", default="", metavar="DIR", help="where the nodes' data go (default: runs/nat-<time>)")
    p.add_argument("--routers", choices=ROUTERS, default="drop",
                   help="how a home router answers an unsolicited connection: drop it (most home routers; "
                        "hole punching can work) or reject it with a RST (Linux's default; it cannot)")
    p.add_argument("--no-hole-punch", action="store_true",
                   help="start the nodes with --no-hole-punch: every byte between NATed nodes crosses the relay")
    p.add_argument("--auto-relay", action="store_true",
                   help="start the NATed nodes with --relay-via auto: each finds out it is behind NAT (AutoNAT) "
                        "and chooses the relay itself")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = p.parse_args(argv)
    if args.nodes < 3 or args.rounds < 1:
        print("seedswarm bench nat: --nodes must be at least 3 (a relay and two NATed hosts), --rounds positive",
              file=sys.stderr)
        return 2
    if args.nodes > 60:
        print("seedswarm bench nat: --nodes: at most 60", file=sys.stderr)
        return 2
    if (why := nat_unavailable()) is not None:
        print(f"seedswarm bench nat: {why}", file=sys.stderr)
        return 2
    out = Path(args.dir or f"runs/nat-{time.strftime('%Y%m%d-%H%M%S')}")
    s = run(args.nodes, args.rounds, out, seed=args.seed, quiet=args.quiet, hole_punch=not args.no_hole_punch,
            routers=args.routers, auto_relay=args.auto_relay)
    if args.json:
        print(json.dumps(s))
    else:
        print(f"nat: {args.nodes} nodes (1 public relay), {s['rounds']} rounds, finished {s['finished']}, "
              f"digest agreement {s['honest_digest_agreement']}, reachability: "
              f"{s['reachability']}")
        print(f"  time to first round behind NAT (s): {s['nat_join_seconds']}")
        print(f"  share of socket bytes through the relay: {s['relay_byte_share']}")
        print(f"  relay state per node: {s['relay']}")
    return 0 if s["finished"] and s["honest_digest_agreement"] == 1.0 else 1
