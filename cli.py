"""The `seedswarm` command line: one entry point, each subcommand implemented next to its code.

``sim`` lives in :mod:`seedswarm.sim.cli`; ``bench NAME`` runs ``seedswarm.bench.NAME.main``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from seedswarm.node import cli as node_cli

BENCHES = ("replay", "protocols", "byzantine", "scale", "sweep", "sybil", "chaos", "fuzz")


def _bench(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHES:
        known = ", ".join(BENCHES)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"seedswarm bench: unknown benchmark {argv[0]!r} (choose: {known})", file=sys.stderr)
            return 2
        print(f"usage: seedswarm bench {{{known}}} [options]   ('seedswarm bench NAME --help' for each)")
        return 0
    try:
        module = importlib.import_module(f"seedswarm.bench.{argv[0]}")
    except ModuleNotFoundError:
        print(f"seedswarm bench: {argv[0]!r} is not available in this build", file=sys.stderr)
        return 2
    return int(module.main(argv[1:]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    from seedswarm.sim import cli as sim_cli
    from seedswarm.sim import cluster

    parser = argparse.ArgumentParser(prog="seedswarm", description="Decentralized training by seeds and one-byte gradients.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sim_cli.add_parser(sub)
    sub.add_parser("bench", help=f"benchmarks: seedswarm bench {{{','.join(BENCHES)}}} --help")
    commands = {"sim": sim_cli.run_command}
    commands.update(node_cli.add_parsers(sub))
    cluster.add_parser(sub)
    commands["cluster"] = cluster.run_command
    args = parser.parse_args(argv)
    return int(commands[args.cmd](args))


if __name__ == "__main__":
    raise SystemExit(main())
