"""`seedswarm init | node | status`: the networked node's command line.

Every operator mistake (bad genesis, port in use, a data dir of another run, a bad TOML key)
ends as one line on stderr and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from seedswarm.clihelp import fail
from seedswarm.sampling.aggregators import RULES

PROG = "seedswarm"


# ---------------------------------------------------------------------------------------------
# logging


class JsonFormatter(logging.Formatter):
    """One JSON object per line: machine-readable logs for a fleet of nodes."""

    def format(self, record: logging.LogRecord) -> str:
        d: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                             "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d)


def setup_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json" or (fmt == "auto" and not sys.stderr.isatty()):
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


# ---------------------------------------------------------------------------------------------
# init


def make_genesis(args: argparse.Namespace, members: list[bytes]) -> tuple[Any, Any]:
    """A genesis from the `init` options, and the measured round (None with ``--round-timeout``):
    without that option the timeout is sized from this machine's compute per round
    (``node/learn/calibrate.py``)."""
    from seedswarm.node.core.genesis import default
    from seedswarm.node.learn.initial import build_genesis, parse_task_options

    g = build_genesis(
        members, task=args.task, task_options=parse_task_options(args.task_option), seed=args.seed,
        estimator=args.estimator, batch_size=args.batch_size, local_steps=args.local_steps,
        local_lr=args.local_lr, eps=args.eps, lr=args.lr, lr_half_life=args.lr_half_life,
        scale_exp=args.scale_exp, trainers=args.trainers, aggregators=args.aggregators,
        directions=args.directions, groups=args.groups, aggregator_rule=args.aggregator,
        join_delay=args.join_delay, expel_after=args.expel_after,
        round_timeout=default("round_timeout") if args.round_timeout is None else args.round_timeout,
        min_round_time=args.min_round_time, quorum=args.quorum,
    )
    if args.round_timeout is not None:
        return g, None
    from seedswarm.node.learn.calibrate import sized_genesis

    return sized_genesis(g, default("round_timeout"))


def add_genesis_options(p: argparse.ArgumentParser) -> None:
    from seedswarm.clihelp import (
        AGGREGATOR_HELP,
        DIRECTIONS_HELP,
        ESTIMATOR_HELP,
        GROUPS_HELP,
        TASK_HELP,
        TASK_OPTION_HELP,
    )
    from seedswarm.node.core.genesis import default

    g = p.add_argument_group("swarm settings (written into the genesis; every node follows them)")
    g.add_argument("--task", default=default("task"), help=TASK_HELP)
    g.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE", help=TASK_OPTION_HELP)
    g.add_argument("--seed", type=int, default=default("seed"), help="seed of the initial model and the data shards")
    g.add_argument("--estimator", default=default("estimator"), choices=["fo", "zo"], help=ESTIMATOR_HELP)
    g.add_argument("--trainers", type=int, default=default("trainers"), help="trainers per round (the committee)")
    g.add_argument("--aggregators", type=int, default=default("aggregators"),
                   help="aggregators per round, ranked: rank 0 publishes the round's record, the others back it up")
    g.add_argument("--directions", type=int, default=default("directions"), help=DIRECTIONS_HELP)
    g.add_argument("--groups", type=int, default=default("groups"), help=GROUPS_HELP)
    g.add_argument("--aggregator", default=default("aggregator_rule"), choices=RULES, help=AGGREGATOR_HELP)
    g.add_argument("--lr", type=float, default=default("lr"), help="learning rate of the step every node applies each round")
    g.add_argument("--lr-half-life", type=int, default=default("lr_half_life"),
                   help="the learning rate decays as lr / (1 + round / N); 0 keeps it constant")
    g.add_argument("--local-lr", type=float, default=default("local_lr"), help="fo only: a trainer's local SGD learning rate")
    g.add_argument("--local-steps", type=int, default=default("local_steps"),
                   help="fo only: local SGD steps whose update is projected on the directions")
    g.add_argument("--batch-size", type=int, default=default("batch_size"), help="examples in a trainer's batch")
    g.add_argument("--eps", type=float, default=default("eps"), help="zo only: size of the SPSA perturbation")
    g.add_argument("--scale-exp", type=int, default=default("scale_exp"),
                   help="one-byte values start at scale 2**N (the scale then follows a public rule)")
    g.add_argument("--round-timeout", type=float, default=None,
                   help="seconds an aggregator waits for contributions at most (default: 3x a trainer's round "
                        f"as measured on this machine, at least {default('round_timeout')})")
    g.add_argument("--min-round-time", type=float, default=default("min_round_time"), help="seconds a round lasts at least")
    g.add_argument("--quorum", type=float, default=default("quorum"),
                   help="share of the trainers an aggregator waits for before its deadline")
    g.add_argument("--join-delay", type=int, default=default("join_delay"),
                   help="rounds between a node's admission and its first committee seat")
    g.add_argument("--expel-after", type=int, default=default("expel_after"),
                   help="a member that misses this many duties in a row is expelled")


def cmd_init(args: argparse.Namespace) -> int:
    from seedswarm.crypto.keys import Identity, KeyFileError, peer_id_of
    from seedswarm.node.core.genesis import GenesisError
    from seedswarm.node.files import OutPathError, check_out_file
    from seedswarm.node.learn.tasks import TaskError

    out = Path(args.out)
    try:
        check_out_file(out, force=args.force)
    except OutPathError as e:
        return fail("init", str(e))
    members: list[bytes] = []
    try:
        for m in args.member:
            if len(m) != 64:
                raise ValueError
            members.append(bytes.fromhex(m))
    except ValueError:
        return fail("init", "--member expects a 64-hex-digit Ed25519 public key (see data_dir/status.json or `seedswarm init --data-dir`)")
    ident = None
    if args.data_dir:
        key = Path(args.data_dir) / "identity.key"
        try:
            if key.exists():
                ident = Identity.load(key)
        except KeyFileError as e:
            return fail("init", str(e))
    if not members and not args.data_dir:
        return fail("init", "a swarm needs a founding member: pass --data-dir DIR (the first node's) or --member KEY")
    try:
        if ident is None and args.data_dir:
            ident = Identity.generate()
        if ident is not None and ident.public not in members:
            members.insert(0, ident.public)
        genesis, measured = make_genesis(args, members)
    except (GenesisError, TaskError, ValueError) as e:
        return fail("init", str(e))
    try:
        if ident is not None and args.data_dir:
            d = Path(args.data_dir)
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(d, 0o700)
            if not (d / "identity.key").exists():
                ident.save(d / "identity.key")
        genesis.save(out)
    except OSError as e:
        return fail("init", f"cannot write {e.filename or out}: {e.strerror or e}")
    print(genesis.run_id.hex())
    print(f"wrote {out}: task {genesis.task}, {len(members)} founding member(s), trainers {genesis.trainers}, "
          f"K {genesis.directions}, lr {genesis.lr}", file=sys.stderr)
    if measured is not None:
        print(measured.describe(genesis.round_timeout), file=sys.stderr)
    if ident is not None:
        print(f"founding node identity in {args.data_dir}/identity.key (peer id {peer_id_of(ident.public)})",
              file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# node


# (option, argparse keywords): each is also a TOML key (``-`` read as ``_``) of node/daemon/config.py
NODE_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("--genesis", {"metavar": "FILE", "help": "the swarm's genesis file (written by `seedswarm init`)"}),
    ("--data-dir", {"metavar": "DIR", "help": "identity key, chain store, checkpoints, saved peers, status.json"}),
    ("--listen", {"action": "append", "metavar": "MULTIADDR", "help": "address to listen on (repeatable)"}),
    ("--announce", {"action": "append", "metavar": "MULTIADDR",
                    "help": "address peers should dial, e.g. behind NAT (repeatable; none: the listen addresses, "
                            "0.0.0.0 expanded)"}),
    ("--bootstrap", {"action": "append", "metavar": "MULTIADDR",
                     "help": "a peer's full address /ip4/A/tcp/P/p2p/ID to join through (repeatable)"}),
    ("--relay", {"action": "store_true",
                 "help": "serve as a circuit relay for peers behind NAT (needs a public address; see 'Behind NAT' "
                         "in the README)"}),
    ("--relay-via", {"action": "append", "metavar": "MULTIADDR",
                     "help": "behind NAT: reserve a slot on this relay /ip4/A/tcp/P/p2p/ID and be reached through "
                             "it (repeatable); or 'auto': ask peers whether this node can be dialled (AutoNAT) and, "
                             "if not, reserve on a connected peer that runs --relay"}),
    ("--no-hole-punch", {"action": "store_true",
                         "help": "keep relayed connections relayed: no hole punching (DCUtR) to make them direct"}),
    ("--device", {"choices": ["auto", "cpu", "cuda"], "help": "where the model runs (auto: cuda when available)"}),
    ("--metrics-port", {"type": int, "metavar": "PORT", "help": "serve /metrics (Prometheus), /status and a live dashboard at / on this port (0: off)"}),
    ("--metrics-host", {"metavar": "HOST", "help": "address the metrics endpoint binds"}),
    ("--log-format", {"choices": ["auto", "json", "text"],
                      "help": "log lines as JSON or text (auto: text on a terminal, JSON otherwise)"}),
    ("--log-level", {"metavar": "LEVEL", "help": "DEBUG, INFO, WARNING or ERROR"}),
    ("--checkpoint-every", {"type": int, "help": "write a model checkpoint every N rounds for joining nodes (0: never)"}),
    ("--checkpoint-chunk-bytes", {"type": int, "help": "size of one checkpoint download chunk"}),
    ("--state-cache-mb", {"type": int, "metavar": "MB",
                          "help": "memory for recent model states kept to undo rounds after a fork switch (each is a "
                                  "full copy of the parameters; at least 2 are kept; a deeper switch replays from a "
                                  "checkpoint)"}),
    ("--shard-index", {"type": int, "help": "which data shard this node trains on (-1: derived from its key)"}),
    ("--shard-count", {"type": int, "help": "how many shards the training data is cut into"}),
    ("--halt-at", {"type": int, "help": "stop taking duties at this round and keep serving peers (0: never)"}),
    ("--eval-every", {"type": int, "help": "evaluate the model every N rounds, shown by `status` (0: when halting)"}),
    ("--sync-wait-s", {"type": float, "help": "seconds to wait for peers and the chain before starting alone"}),
    ("--mdns", {"action": "store_true", "help": "find nodes of the run on the LAN with mDNS (no bootstrap needed there)"}),
    ("--min-peers", {"type": int, "help": "wait (up to --sync-wait-s) for this many peers before taking duties"}),
]
# settings only a --config file sets
TOML_ONLY = {
    "checkpoints_kept": "checkpoints kept on disk; older ones are deleted",
    "max_peers": "dial more known peers only while connected to fewer than this",
    "status_every_s": "seconds between refreshes of status.json",
    "shutdown_timeout_s": "after SIGINT/SIGTERM, seconds before a watchdog ends the node",
}


def _node_default(name: str) -> str:
    from seedswarm.clihelp import show_default
    from seedswarm.node.daemon.config import NodeConfig

    value = getattr(NodeConfig(), name)
    return ("on" if value else "off") if isinstance(value, bool) else show_default(value) or "none"


def config_keys_text() -> str:
    """Every key of a ``--config`` TOML file with its default and meaning (the ``node`` epilog)."""
    from seedswarm.node.daemon.config import NodeConfig

    helps = {o[2:].replace("-", "_"): kw["help"] for o, kw in NODE_OPTIONS} | TOML_ONLY
    names = [f.name for f in dataclasses.fields(NodeConfig) if f.name != "extra"]
    width = max(len(n) for n in names)
    lines = ["--config FILE.toml keys (the options above with _ for -; an unknown key is an error; the command "
             "line wins over the file):"]
    for n in names:
        lines.append(f"  {n:<{width}}  {helps.get(n, '')} [default: {_node_default(n)}]"
                     + (" (file only)" if n in TOML_ONLY else ""))
    return "\n".join(lines)


def add_node_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="FILE.toml",
                   help="TOML file with any of the settings below (keys listed at the end; default: none)")
    for opt, kw in NODE_OPTIONS:
        name = opt[2:].replace("-", "_")
        kw = dict(kw, help=f"{kw['help']} (default: {_node_default(name)})")
        p.add_argument(opt, default=[] if kw.get("action") == "append" else None, **kw)


def _check_ports_free(listen: tuple[str, ...]) -> str | None:
    """A plain bind of every fixed TCP port: 'port in use' must fail before anything is written."""
    for a in listen:
        parts = a.strip("/").split("/")
        if len(parts) >= 4 and parts[0] in ("ip4", "ip6") and parts[2] == "tcp":
            try:
                port = int(parts[3])
            except ValueError:
                return f"bad listen address {a!r}"
            if port == 0:
                continue
            fam = socket.AF_INET if parts[0] == "ip4" else socket.AF_INET6
            with socket.socket(fam, socket.SOCK_STREAM) as s:
                # as a listener binds: a restart must not trip over its old sockets in TIME-WAIT
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((parts[1], port))
                except OSError as e:
                    return f"cannot listen on {a}: {e.strerror}"
        else:
            return f"unsupported listen address {a!r} (expected /ip4/ADDR/tcp/PORT)"
    return None


def cmd_node(args: argparse.Namespace) -> int:
    from seedswarm.node.core.genesis import Genesis, GenesisError
    from seedswarm.node.daemon.config import ConfigError, build_config, load_toml

    started = time.time()
    try:
        file_values = load_toml(args.config) if args.config else {}
        cli = {k: getattr(args, k) for k in ("genesis", "data_dir", "listen", "announce", "bootstrap", "relay",
                                             "relay_via", "no_hole_punch", "device",
                                             "metrics_port", "metrics_host", "log_format", "log_level",
                                             "checkpoint_every", "checkpoint_chunk_bytes", "state_cache_mb",
                                             "shard_index",
                                             "shard_count", "halt_at", "eval_every", "sync_wait_s", "min_peers", "mdns")}
        cfg = build_config(file_values, cli)
    except ConfigError as e:
        return fail("node", str(e))
    try:
        genesis = Genesis.load(cfg.genesis)
    except GenesisError as e:
        return fail("node", str(e))
    if (err := _check_ports_free(cfg.listen)) is not None:
        return fail("node", err)
    setup_logging(cfg.log_format, cfg.log_level)
    # No cyclic GC while torch, libp2p and the model load: they make hundreds of thousands of
    # objects that live as long as the process, and each collection walks them all again
    # (see `seedswarm bench join`). Frozen once prepared, they are never scanned again.
    gc.disable()
    try:
        daemon = _load_daemon(cfg, genesis, started)
        try:
            daemon.prepare()
        except ConfigError as e:
            if (lock := getattr(daemon, "data_lock", None)) is not None:
                lock.release()  # an in-process caller may start another node on this data dir
            return fail("node", str(e))
    finally:
        gc.freeze()
        gc.enable()
    rc = asyncio.run(_serve(daemon))
    # Everything is flushed and fsynced by now; skip the interpreter's teardown, which frees
    # torch's and libp2p's objects one by one and took seconds on a loaded machine: a stop
    # (SIGINT/SIGTERM) must return promptly.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def _load_daemon(cfg: Any, genesis: Any, started: float) -> Any:
    """Import what a node runs on (torch, our modules, libp2p) and make its daemon, noting when
    each import finished (the daemon marks the later phases) for `seedswarm bench join`.

    libp2p is imported in a second thread while this one imports torch: the two share no
    module (our libp2p side is torch- and numpy-free, ``tests/test_cli_imports.py``), and part of
    each (reading files, loading shared libraries) leaves the GIL to the other, which took about
    a second off a joiner's start on two cores. Should either side fail (importlib refuses a
    circular import met across threads), it is retried alone, so an error surfaces as it would
    have without the thread."""
    import threading

    from seedswarm.node.daemon import netstack

    failed: list[BaseException] = []

    def libp2p_import() -> None:
        try:
            netstack.load_libp2p()
        except BaseException as e:  # noqa: BLE001 - retried (and raised) on the main thread
            failed.append(e)

    worker = threading.Thread(target=libp2p_import, name="seedswarm-import-libp2p", daemon=True)
    worker.start()
    try:
        import torch
    except RuntimeError:  # importlib's _DeadlockError (a circular import met across threads): alone
        worker.join()
        import torch

    torch.set_num_threads(1)  # small models; eight daemons share two cores
    torch_at = time.time()
    from seedswarm.node.daemon.daemon import Daemon

    daemon = Daemon(cfg, genesis, started_at=started)
    modules_at = time.time()
    worker.join()
    if failed:
        netstack.load_libp2p()
    daemon.phases.update(main=started, torch_import=torch_at, modules_import=modules_at, libp2p_import=time.time())
    return daemon


async def _serve(daemon: Any) -> int:
    from seedswarm.node.daemon.config import ConfigError

    loop = asyncio.get_running_loop()
    hits = [0]

    def on_signal(signame: str) -> None:
        hits[0] += 1
        if hits[0] > 1:
            logging.getLogger("seedswarm.daemon").error("second %s: exiting now", signame)
            logging.shutdown()
            os._exit(1)
        daemon.request_stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        return int(await daemon.run())
    except ConfigError as e:
        print(f"{PROG} node: {e}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------------------------


def add_parsers(sub: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    from seedswarm.clihelp import subcommand

    p = subcommand(
        sub, "init", help="write the genesis file of a new swarm and print its run id",
        description="Write the genesis file of a new swarm: every setting all its nodes must agree on, and "
                    "the founding members. Prints the run id (the genesis's hash). The file is public: copy "
                    "it to every host.",
        examples=["seedswarm init --out genesis.json --data-dir ~/ss-data          # this host founds the swarm",
                  "seedswarm init --out genesis.json --member KEY1 --member KEY2 --trainers 8"])
    p.add_argument("--out", default="genesis.json", metavar="FILE",
                   help="genesis file to write (an existing one needs --force)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="the founding node's data dir: its identity (created if missing) becomes a member "
                        "(default: none)")
    p.add_argument("--member", action="append", default=[], metavar="PUBKEY_HEX",
                   help="another founding member's public key, 64 hex digits (repeatable)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    add_genesis_options(p)

    p = subcommand(
        sub, "node", help="run a node (daemon) of a swarm",
        description="Run one node of a swarm: join it through --bootstrap peers (or found it), train when "
                    "on a committee, serve the round records and model checkpoints to peers. Ctrl+C (SIGTERM) leaves cleanly. "
                    "Settings: command line > --config file > defaults.",
        examples=["seedswarm node --genesis genesis.json --data-dir ~/ss-data --listen /ip4/0.0.0.0/tcp/4001",
                  "seedswarm node --config node.toml --bootstrap /ip4/10.0.0.1/tcp/4001/p2p/12D3KooW..."],
        more=config_keys_text() + "\n\nMore: docs/operations.md.")
    add_node_options(p)

    p = subcommand(
        sub, "status", help="show a running node's round, head, model digest, peers, duty, bytes",
        description="Show a node's round, head, model digest, membership, duty, peers and bytes, from its "
                    "data dir's status.json or its HTTP endpoint. Exit code 0 if the node is running, 1 if not.",
        examples=["seedswarm status --data-dir ~/ss-data", "seedswarm status --url http://127.0.0.1:9101 --json"])
    p.add_argument("--data-dir", default=None, metavar="DIR", help="the node's data dir (default: seedswarm-data)")
    p.add_argument("--url", default=None, metavar="URL",
                   help="ask the node over HTTP instead: http://HOST:PORT of its --metrics-port (default: none)")
    p.add_argument("--json", action="store_true", help="print the whole status as JSON")
    from seedswarm.node.statuscmd import cmd_status

    return {"init": cmd_init, "node": cmd_node, "status": cmd_status}
