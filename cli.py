"""The `seedswarm` command line: one entry point, each subcommand implemented next to its code.

``sim`` lives in :mod:`seedswarm.sim.cli`; ``init``, ``node``, ``status`` in
:mod:`seedswarm.node.cli`; ``task check`` in :mod:`seedswarm.node.taskcheck`; ``cluster`` in
:mod:`seedswarm.sim.cluster`; ``bench NAME`` runs ``seedswarm.bench.NAME.main``. Every parser
uses :mod:`seedswarm.clihelp`, so every option shows what it does and its default.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from seedswarm import PROTOCOL_VERSION, __version__
from seedswarm.node import cli as node_cli

BENCHES: dict[str, str] = {
    "replay": "how fast a node regenerates and applies a round's directions",
    "protocols": "seedswarm against MoDeST and D-PSGD: bytes and rounds to a target accuracy",
    "byzantine": "final accuracy under attack, per aggregator and share of attackers",
    "scale": "how far the simulator scales on one machine (rounds per second, memory)",
    "sweep": "fault-free simulations over seeds and swarm sizes: no running node may be expelled",
    "sybil": "a flood of join requests from fresh keys against a small open swarm",
    "chaos": "real node processes under crashes, partitions and hostile peers",
    "wan": "real node processes over emulated WAN links (latency, jitter, loss, bandwidth per host)",
    "nat": "real node processes behind NAT (iptables masquerade) that train through a circuit relay",
    "fuzz": "malformed and hostile messages against a real node process",
    "lm": "the swarm fine-tunes a pretrained GPT: share of centralized Adam's loss reduction, bytes against MoDeST",
    "bytes": "bytes real daemons send at their sockets, by kind, against the protocol's own",
    "join": "one joiner into a running swarm: its start-up and join, phase by phase, and idle memory",
    "lm_proxy": "the lm update with its projection noise drawn in closed form: a minute per sweep point",
    "lm_memory": "peak memory of zeroth-order, first-order and Adam steps on a 57M-parameter GPT",
}


def version_text() -> str:
    return f"seedswarm {__version__} (protocol version {PROTOCOL_VERSION})"


def bench_help() -> str:
    width = max(len(n) for n in BENCHES)
    lines = ["usage: seedswarm bench NAME [options]", "",
             "Benchmarks and checks that produce the project's figures. Each has its own --help.", "",
             "benchmarks:"]
    lines += [f"  {n:<{width}}  {d}" for n, d in BENCHES.items()]
    lines += ["", "example:", "  seedswarm bench scale --sizes 100,1000 --rounds 40"]
    return "\n".join(lines)


def _bench(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(bench_help())
        return 0
    if argv[0] not in BENCHES:
        print(f"seedswarm bench: unknown benchmark {argv[0]!r} (choose: {', '.join(BENCHES)})", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"seedswarm.bench.{argv[0]}")
    except ImportError as e:
        print(f"seedswarm bench: {argv[0]!r} is not available in this build ({e})", file=sys.stderr)
        return 2
    return int(module.main(argv[1:]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    from seedswarm.clihelp import HelpFormatter

    # `init`, `node` and `status` need only their own parsers: building the others imports the
    # simulator (and torch through it) before a node has even read its settings (measured with
    # `seedswarm bench join`). Any other first word gets the full parser, its help and its errors.
    light = argv[:1] in (["init"], ["node"], ["status"])
    parser = argparse.ArgumentParser(
        prog="seedswarm", formatter_class=HelpFormatter,
        description="Decentralized training by seeds and one-byte gradients: simulate a swarm, run real "
                    "nodes, and measure. Each command has its own --help, with examples.",
        epilog="examples:\n  seedswarm sim                      # the main demo: 100 simulated nodes\n"
               "  seedswarm sim --help\n  seedswarm task check ./my_task.py:make\n"
               "  seedswarm bench --help             # the benchmarks")
    parser.add_argument("--version", action="version", version=version_text(),
                        help="print the package version and the protocol version, and exit")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    if light:
        commands = node_cli.add_parsers(sub)
    else:
        from seedswarm.node import taskcheck
        from seedswarm.sim import cli as sim_cli
        from seedswarm.sim import clustercli

        sim_cli.add_parser(sub)
        commands = {"sim": sim_cli.run_command}
        commands.update(node_cli.add_parsers(sub))
        clustercli.add_parser(sub)
        commands["cluster"] = clustercli.run_command
        taskcheck.add_parser(sub)
        commands["task"] = taskcheck.run_command
        sub.add_parser("bench", help="benchmarks: seedswarm bench --help lists them")
    args = parser.parse_args(argv)
    return int(commands[args.cmd](args))


if __name__ == "__main__":
    raise SystemExit(main())
