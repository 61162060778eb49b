"""Benchmark: the bytes real daemons send at their sockets against the protocol's own bytes.

Runs ``seedswarm cluster`` (N daemon processes on loopback, real libp2p: TCP, Noise, Yamux,
GossipSub), or reads a finished cluster run (``--from DIR``), and prints what each node sent per
round at its sockets, by kind: records (the run's gossip topic), contributions, verification
fetches, sync, hello, the GossipSub envelope of each message copy (author, seqno, topic,
signature) and control, identify, ping, multistream-select, and the Noise and Yamux framing (the
socket total minus every stream's payload). The kinds add up to the total.

The protocol's own bytes per node per round are the simulator's (``seedswarm sim`` ->
``bytes_per_node_per_round``: every record with its GossipSub mesh copies, contributions,
verification fetches, as encoded messages) for the same nodes, rounds, seed and genesis
settings, so the ratio total / protocol is what the transport adds.

CLI: ``seedswarm bench bytes [--nodes 8] [--rounds 60] [--seed 0] [--out DIR] [--from DIR]
[--json]``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

from seedswarm.clihelp import parser
from seedswarm.node.core.genesis import GenesisOptions
from seedswarm.node.files import OutPathError, prepare_out_dir
from seedswarm.sim.bytestable import table
from seedswarm.sim.cluster import Cluster, ClusterConfig
from seedswarm.sim.runner import SimConfig, run

#: The simulator's message types, by the kind the daemons report them under.
SIM_KINDS = {"Record": "records", "Join": "records", "Leave": "records", "FraudProof": "records",
             "Contribution": "contributions", "ContributionsRequest": "verification",
             "ContributionsResponse": "verification", "ChainRequest": "sync", "ChainResponse": "sync",
             "CheckpointRequest": "sync", "CheckpointManifest": "sync", "CheckpointChunk": "sync"}


def protocol_bytes(cfg: dict[str, Any]) -> dict[str, Any]:
    """The simulator's bytes per node per round for a cluster's settings (total and by kind)."""
    genesis = {f.name: cfg[f.name] for f in fields(GenesisOptions) if f.name in cfg}
    options = dict(o.split("=", 1) for o in cfg.get("task_options", []))
    sim = run(SimConfig(nodes=cfg["nodes"], rounds=cfg["rounds"], seed=cfg["seed"], task_options=options,
                        quiet=True, **genesis))
    per = max(1, sim["nodes_total"]) * max(1, sim["rounds"])
    kinds: dict[str, float] = {}
    for name, n in sim["bytes_by_kind"].items():
        k = SIM_KINDS.get(name, name)
        kinds[k] = kinds.get(k, 0.0) + n / per
    return {"bytes_per_node_per_round": sim["bytes_per_node_per_round"], "by_kind": kinds,
            "rounds": sim["rounds"], "honest_digest_agreement": sim["honest_digest_agreement"]}


def main(argv: list[str] | None = None) -> int:
    p = parser("seedswarm bench bytes", __doc__.split("\n\n")[0] if __doc__ else "",
               examples=["seedswarm bench bytes --nodes 8 --rounds 60 --out runs/bytes",
                         "seedswarm bench bytes --from runs/cluster-20261202-054400   # a finished cluster run"])
    p.add_argument("--nodes", type=int, default=8, help="daemon processes")
    p.add_argument("--rounds", type=int, default=60, help="rounds every node runs")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and data shards")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="cluster output folder, refused if it holds files (default: a temporary one)")
    p.add_argument("--from", dest="source", default=None, metavar="DIR",
                   help="read a finished `seedswarm cluster` run instead of starting one (default: none, start one)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    args = p.parse_args(argv)
    if args.source:
        try:
            summary = json.loads((Path(args.source) / "summary.json").read_text())
        except (OSError, ValueError) as e:
            print(f"seedswarm bench bytes: cannot read {args.source}/summary.json: {e}", file=sys.stderr)
            return 2
    else:
        try:  # a previous run's node data dirs would be resumed, not started afresh
            out = str(prepare_out_dir(args.out)) if args.out else tempfile.mkdtemp(prefix="seedswarm-bytes-")
        except OutPathError as e:
            print(f"seedswarm bench bytes: {e}", file=sys.stderr)
            return 2
        summary = Cluster(ClusterConfig(nodes=args.nodes, rounds=args.rounds, seed=args.seed, out=out,
                                        quiet=args.json)).run()
    kinds = summary.get("bytes_per_node_per_round_by_kind") or {}
    if not kinds:
        print("seedswarm bench bytes: the cluster run has no byte breakdown (nodes of an older version?)",
              file=sys.stderr)
        return 1
    ref = protocol_bytes(summary["config"])
    total = sum(kinds.values())
    result = {"nodes": summary["nodes"], "rounds": summary["rounds"],
              "honest_digest_agreement": summary["honest_digest_agreement"],
              "socket_bytes_per_node_per_round": total, "by_kind": kinds,
              "protocol_bytes_per_node_per_round": ref["bytes_per_node_per_round"],
              "protocol_by_kind": ref["by_kind"], "ratio": total / ref["bytes_per_node_per_round"]}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{summary['nodes']} daemons on loopback, {summary['rounds']} rounds, "
              f"honest_digest_agreement {summary['honest_digest_agreement']}: bytes sent at the sockets")
        print(table(kinds, ref["bytes_per_node_per_round"], note=" (seedswarm sim, same settings)"))
        own = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(ref["by_kind"].items(), key=lambda kv: -kv[1]))
        print(f"the simulator's kinds: {own}")
    return 0
