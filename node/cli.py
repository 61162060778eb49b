"""`seedswarm init | node | status`: the networked node's command line.

Every operator mistake (bad genesis, port in use, a data dir of another run, a bad TOML key)
ends as one line on stderr and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def _fail(cmd: str, msg: str) -> int:
    print(f"{PROG} {cmd}: {msg}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------------
# init


def make_genesis(args: argparse.Namespace, members: list[bytes]) -> Any:
    """A genesis from the `init` options."""
    from seedswarm.node.learn.initial import build_genesis, parse_task_options

    return build_genesis(
        members, task=args.task, task_options=parse_task_options(args.task_option), seed=args.seed,
        estimator=args.estimator, batch_size=args.batch_size, local_steps=args.local_steps,
        local_lr=args.local_lr, eps=args.eps, lr=args.lr, lr_half_life=args.lr_half_life,
        scale_exp=args.scale_exp, trainers=args.trainers, aggregators=args.aggregators,
        directions=args.directions, groups=args.groups, aggregator_rule=args.aggregator,
        join_delay=args.join_delay, expel_after=args.expel_after, round_timeout=args.round_timeout,
        min_round_time=args.min_round_time, quorum=args.quorum,
    )


def add_genesis_options(p: argparse.ArgumentParser) -> None:
    from seedswarm.node.core.genesis import default

    p.add_argument("--task", default=default("task"), help="'digits' or package.module:factory")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seed", type=int, default=default("seed"), help="model init and data seed")
    p.add_argument("--estimator", default=default("estimator"), choices=["fo", "zo"])
    p.add_argument("--trainers", type=int, default=default("trainers"), help="committee size s")
    p.add_argument("--aggregators", type=int, default=default("aggregators"))
    p.add_argument("--directions", type=int, default=default("directions"), help="K: bytes per trainer per round")
    p.add_argument("--groups", type=int, default=default("groups"))
    p.add_argument("--aggregator", default=default("aggregator_rule"), choices=RULES)
    p.add_argument("--lr", type=float, default=default("lr"), help="learning rate on the aggregated step")
    p.add_argument("--lr-half-life", type=int, default=default("lr_half_life"), help="rounds; lr / (1 + r / half_life); 0 = constant")
    p.add_argument("--local-lr", type=float, default=default("local_lr"))
    p.add_argument("--local-steps", type=int, default=default("local_steps"))
    p.add_argument("--batch-size", type=int, default=default("batch_size"))
    p.add_argument("--eps", type=float, default=default("eps"))
    p.add_argument("--scale-exp", type=int, default=default("scale_exp"), help="initial quantisation scale 2**scale_exp (scale rule)")
    p.add_argument("--round-timeout", type=float, default=default("round_timeout"))
    p.add_argument("--min-round-time", type=float, default=default("min_round_time"))
    p.add_argument("--quorum", type=float, default=default("quorum"))
    p.add_argument("--join-delay", type=int, default=default("join_delay"))
    p.add_argument("--expel-after", type=int, default=default("expel_after"))


def cmd_init(args: argparse.Namespace) -> int:
    from seedswarm.crypto.keys import Identity, KeyFileError, peer_id_of
    from seedswarm.node.core.genesis import GenesisError
    from seedswarm.node.files import OutPathError, check_out_file
    from seedswarm.node.learn.tasks import TaskError

    out = Path(args.out)
    try:
        check_out_file(out, force=args.force)
    except OutPathError as e:
        return _fail("init", str(e))
    members: list[bytes] = []
    try:
        for m in args.member:
            if len(m) != 64:
                raise ValueError
            members.append(bytes.fromhex(m))
    except ValueError:
        return _fail("init", "--member expects a 64-hex-digit Ed25519 public key (see data_dir/status.json or `seedswarm init --data-dir`)")
    ident = None
    if args.data_dir:
        key = Path(args.data_dir) / "identity.key"
        try:
            if key.exists():
                ident = Identity.load(key)
        except KeyFileError as e:
            return _fail("init", str(e))
    if not members and not args.data_dir:
        return _fail("init", "a swarm needs a founding member: pass --data-dir DIR (the first node's) or --member KEY")
    try:
        if ident is None and args.data_dir:
            ident = Identity.generate()
        if ident is not None and ident.public not in members:
            members.insert(0, ident.public)
        genesis = make_genesis(args, members)
    except (GenesisError, TaskError, ValueError) as e:
        return _fail("init", str(e))
    try:
        if ident is not None and args.data_dir:
            d = Path(args.data_dir)
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(d, 0o700)
            if not (d / "identity.key").exists():
                ident.save(d / "identity.key")
        genesis.save(out)
    except OSError as e:
        return _fail("init", f"cannot write {e.filename or out}: {e.strerror or e}")
    print(genesis.run_id.hex())
    print(f"wrote {out}: task {genesis.task}, {len(members)} founding member(s), trainers {genesis.trainers}, "
          f"K {genesis.directions}, lr {genesis.lr}", file=sys.stderr)
    if ident is not None:
        print(f"founding node identity in {args.data_dir}/identity.key (peer id {peer_id_of(ident.public)})",
              file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# node


def add_node_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="TOML file with the same settings (keys like data_dir)")
    p.add_argument("--genesis", default=None, help="genesis file (default genesis.json)")
    p.add_argument("--data-dir", default=None, help="identity key, chain store, checkpoints, status.json")
    p.add_argument("--listen", action="append", default=[], metavar="MULTIADDR",
                   help="e.g. /ip4/0.0.0.0/tcp/4001 (repeatable; default /ip4/0.0.0.0/tcp/4001)")
    p.add_argument("--announce", action="append", default=[], metavar="MULTIADDR",
                   help="address peers should dial (default: listen addresses, 0.0.0.0 expanded)")
    p.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                   help="a peer's full address /ip4/A/tcp/P/p2p/ID (repeatable)")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    p.add_argument("--metrics-port", type=int, default=None, help="serve /metrics (Prometheus) and /status")
    p.add_argument("--metrics-host", default=None, help="default 127.0.0.1")
    p.add_argument("--log-format", default=None, choices=["auto", "json", "text"])
    p.add_argument("--log-level", default=None)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--checkpoint-chunk-bytes", type=int, default=None)
    p.add_argument("--shard-index", type=int, default=None)
    p.add_argument("--shard-count", type=int, default=None)
    p.add_argument("--halt-at", type=int, default=None, help="stop taking duties at this round (0 = never)")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--sync-wait-s", type=float, default=None)
    p.add_argument("--min-peers", type=int, default=None,
                   help="wait (up to --sync-wait-s) for this many peers before taking duties")


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
        cli = {k: getattr(args, k) for k in ("genesis", "data_dir", "listen", "announce", "bootstrap", "device",
                                             "metrics_port", "metrics_host", "log_format", "log_level",
                                             "checkpoint_every", "checkpoint_chunk_bytes", "shard_index",
                                             "shard_count", "halt_at", "eval_every", "sync_wait_s", "min_peers")}
        cfg = build_config(file_values, cli)
    except ConfigError as e:
        return _fail("node", str(e))
    try:
        genesis = Genesis.load(cfg.genesis)
    except GenesisError as e:
        return _fail("node", str(e))
    if (err := _check_ports_free(cfg.listen)) is not None:
        return _fail("node", err)
    setup_logging(cfg.log_format, cfg.log_level)
    import torch

    torch.set_num_threads(1)  # small models; eight daemons share two cores
    from seedswarm.node.daemon.daemon import Daemon

    daemon = Daemon(cfg, genesis, started_at=started)
    try:
        daemon.prepare()
    except ConfigError as e:
        if (lock := getattr(daemon, "data_lock", None)) is not None:
            lock.release()  # an in-process caller may start another node on this data dir
        return _fail("node", str(e))
    rc = asyncio.run(_serve(daemon))
    # Everything is flushed and fsynced by now; skip the interpreter's teardown, which frees
    # torch's and libp2p's objects one by one and took seconds on a loaded machine: a stop
    # (SIGINT/SIGTERM) must return promptly.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


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
# status


def read_status(data_dir: str | None, url: str | None) -> dict[str, Any]:
    if url:
        u = url if url.rstrip("/").endswith("/status") else url.rstrip("/") + "/status"
        with urllib.request.urlopen(u, timeout=3) as r:  # noqa: S310 - operator-given URL
            d: dict[str, Any] = json.loads(r.read())
        d["_alive"] = True
        return d
    path = Path(data_dir or "seedswarm-data") / "status.json"
    d = json.loads(path.read_text())
    alive = False
    try:
        os.kill(int(d["pid"]), 0)
        alive = d.get("state") not in ("stopped",) and time.time() - float(d.get("updated_at", 0)) < 10
    except (OSError, KeyError, ValueError):
        alive = False
    d["_alive"] = alive
    return d


def format_status(d: dict[str, Any]) -> str:
    c = d.get("committee", {})
    duty = []
    if c.get("trainer_rank") is not None:
        duty.append(f"trainer rank {c['trainer_rank']} of {c.get('trainers')}")
    if c.get("aggregator_rank") is not None:
        duty.append(f"aggregator rank {c['aggregator_rank']} of {c.get('aggregators')}")
    state = d.get("state", "?") if d.get("_alive") else f"not running (last state {d.get('state', '?')})"
    acc = d.get("accuracy")
    lines = [
        f"node      {d.get('peer_id')}  {state}, pid {d.get('pid')}",
        f"run       {str(d.get('run_id', ''))[:16]}  protocol {d.get('protocol_version')}",
        f"round     {d.get('round')}  head {str(d.get('head', ''))[:16]}  model {str(d.get('model_digest', ''))[:16]}"
        + (f"  accuracy {acc:.3f}" if isinstance(acc, float) else ""),
        f"member    {'yes' if d.get('member') else 'no'} ({d.get('members')} members)  duty: {', '.join(duty) or 'none this round'}"
        + ("  [halted]" if d.get("halted") else ""),
        f"peers     {d.get('peers')}",
        f"bytes     sent {d.get('bytes_sent', 0) / 1e6:.2f} MB, received {d.get('bytes_received', 0) / 1e6:.2f} MB",
        f"listen    {' '.join(d.get('announce') or d.get('listen') or [])}",
    ]
    if d.get("rejected"):
        lines.append(f"rejected  {json.dumps(d['rejected'])}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    try:
        d = read_status(args.data_dir, args.url)
    except FileNotFoundError:
        return _fail("status", f"no status.json in {args.data_dir or 'seedswarm-data'}: has a node run there?")
    except (OSError, ValueError) as e:
        return _fail("status", f"cannot read the node's status: {e}")
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        print(format_status(d))
    return 0 if d.get("_alive") else 1


# ---------------------------------------------------------------------------------------------


def add_parsers(sub: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    p = sub.add_parser("init", help="write the genesis file of a new swarm and print its run id")
    p.add_argument("--out", default="genesis.json")
    p.add_argument("--data-dir", default=None, help="the founding node's data dir: its identity becomes a member")
    p.add_argument("--member", action="append", default=[], metavar="PUBKEY_HEX", help="another founding member")
    p.add_argument("--force", action="store_true")
    add_genesis_options(p)

    p = sub.add_parser("node", help="run a node (daemon) of a swarm")
    add_node_options(p)

    p = sub.add_parser("status", help="show a running node's round, head, model digest, peers, duty, bytes")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--url", default=None, help="http://HOST:METRICS_PORT of the node")
    p.add_argument("--json", action="store_true")
    return {"init": cmd_init, "node": cmd_node, "status": cmd_status}
