"""`seedswarm cluster`: N real daemon processes on loopback, the local multi-node mode.

Unlike ``sim`` nothing is simulated: every node is a ``seedswarm node`` OS process with its own
libp2p host, store and model, talking over TCP. The launcher writes a genesis whose founding
members are the first N nodes, starts them (bootstrapping from nodes 0 and 1; peer exchange does
the rest), optionally starts ``--join-nodes`` more at round ``--join-at`` (they join through
chain sync and a chunked checkpoint download) and SIGKILLs ``--kill-nodes`` at ``--kill-at``.
Every node halts its duties at ``--rounds``, so the running ones converge on one head; once
each has moved its model there too, the launcher reads their status files, stops them with
SIGTERM and writes ``summary.json``.

Children run in their own session (a terminal's Ctrl+C reaches only the launcher, which stops
them in order) and with PR_SET_PDEATHSIG, so they die even if the launcher is SIGKILLed.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from seedswarm.node.core.genesis import GenesisOptions, default
from seedswarm.progress import Progress
from seedswarm.sim.bytestable import kind_rates, mean_rates


@dataclass
class ClusterConfig(GenesisOptions):
    nodes: int = 8
    rounds: int = 60
    seed: int = 0
    task_options: list[str] = field(default_factory=list)
    round_timeout: float | None = None  # None: sized from this machine's compute (node/learn/calibrate.py)
    join_nodes: int = 0
    join_at: int = -1
    kill_nodes: int = 0
    kill_at: int = -1
    checkpoint_every: int = 10
    checkpoint_chunk_bytes: int = 4096
    timeout: float = 0.0  # 0: automatic (start-up plus a generous per-round budget)
    eval_every: int = 10  # every node evaluates its model every N rounds (0: only when halting)
    metrics_port: int = 0  # node i serves /metrics, /status and the dashboard on port P + i (0: none)
    out: str = "runs/cluster"
    quiet: bool = False


def _pdeathsig() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        d: dict[str, Any] = json.loads(path.read_text())
        return d
    except (OSError, ValueError):
        return None


def _percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


class Cluster:
    def __init__(self, cfg: ClusterConfig, log: TextIO | None = None) -> None:
        self.cfg = cfg
        self.log = sys.stderr if log is None else log
        self.out = Path(cfg.out)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.keys: list[bytes] = []  # every node's public key, joiners included (setup)
        self.spawned_at: dict[int, float] = {}
        self.killed: list[int] = []
        self.joined: list[int] = []
        self.stop_requested = False
        self._logs: list[Any] = []
        self.progress: Progress | None = None

    def say(self, msg: str) -> None:
        if self.progress is not None:
            self.progress.note(msg)
        elif not self.cfg.quiet:
            print(msg, file=self.log, flush=True)

    def node_dir(self, i: int) -> Path:
        return self.out / "nodes" / f"node-{i}"

    def setup(self) -> None:
        from seedswarm.crypto.keys import Identity, peer_id_of
        from seedswarm.node.learn.initial import build_genesis, parse_task_options

        cfg = self.cfg
        total = cfg.nodes + cfg.join_nodes
        self.out.mkdir(parents=True, exist_ok=True)
        idents = []
        for i in range(total):
            d = self.node_dir(i)
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            key = d / "identity.key"
            ident = Identity.load(key) if key.exists() else Identity.generate()
            if not key.exists():
                ident.save(key)
            idents.append(ident)
        floor = default("round_timeout")
        self.genesis = build_genesis(
            [idents[i].public for i in range(cfg.nodes)], task=cfg.task,
            task_options=parse_task_options(cfg.task_options), seed=cfg.seed, **cfg.genesis_fields(),
            round_timeout=floor if cfg.round_timeout is None else cfg.round_timeout,
        )
        if cfg.round_timeout is None:
            from seedswarm.node.learn.calibrate import sized_genesis

            self.genesis, measured = sized_genesis(self.genesis, floor)
            if self.genesis.round_timeout > floor:
                self.say(measured.describe(self.genesis.round_timeout))
        self.genesis.save(self.out / "genesis.json")
        self.keys = [x.public for x in idents]
        self.place([peer_id_of(k) for k in self.keys])

    def place(self, peer_ids: list[str]) -> None:
        """Where each node listens: free loopback ports here; ``bench wan`` puts every node
        at its own network namespace's address instead."""
        self.hosts = ["127.0.0.1"] * len(peer_ids)
        self.ports = free_ports(len(peer_ids))
        self.addrs = [f"/ip4/{h}/tcp/{p}/p2p/{pid}" for h, p, pid in zip(self.hosts, self.ports, peer_ids, strict=True)]

    def command(self, i: int) -> list[str]:
        cfg = self.cfg
        boot = [a for j, a in enumerate(self.addrs[:2]) if j != i] if cfg.nodes > 1 else []
        founding = i < cfg.nodes
        cmd = [sys.executable, "-m", "seedswarm", "node", "--genesis", str(self.out / "genesis.json"),
               "--data-dir", str(self.node_dir(i)), "--listen", f"/ip4/{self.hosts[i]}/tcp/{self.ports[i]}",
               "--halt-at", str(cfg.rounds), "--shard-index", str(i), "--shard-count", str(cfg.nodes + cfg.join_nodes),
               "--checkpoint-every", str(cfg.checkpoint_every), "--checkpoint-chunk-bytes", str(cfg.checkpoint_chunk_bytes),
               "--log-format", "json", "--sync-wait-s", "30" if founding else "15",
               "--min-peers", str(cfg.nodes - 1 if founding else 1), "--eval-every", str(cfg.eval_every)]
        if cfg.metrics_port:
            cmd += ["--metrics-port", str(cfg.metrics_port + i)]
        for a in boot:
            cmd += ["--bootstrap", a]
        return cmd

    def spawn(self, i: int, cpus: frozenset[int] | None = None) -> None:
        """Start node ``i``; ``cpus`` pins it (from before its first instruction) to those CPUs."""
        logf = open(self.node_dir(i) / "node.log", "ab")  # noqa: SIM115 - closed in finish()
        self._logs.append(logf)
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

        def pre_exec() -> None:  # in the child between fork and exec: every thread it starts inherits the pin
            _pdeathsig()
            if cpus:
                os.sched_setaffinity(0, cpus)

        self.spawned_at[i] = time.time()
        self.procs[i] = subprocess.Popen(self.command(i), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                         env=env, start_new_session=True, preexec_fn=pre_exec)

    def statuses(self) -> dict[int, dict[str, Any]]:
        out = {}
        for i in self.procs:
            d = _read_json(self.node_dir(i) / "status.json")
            if d is not None and d.get("pid") == self.procs[i].pid:
                out[i] = d
        return out

    def running(self) -> list[int]:
        return [i for i, p in self.procs.items() if p.poll() is None and i not in self.killed]

    def header(self) -> str:
        cfg = self.cfg
        extra = "".join([f", {cfg.join_nodes} join at round {cfg.join_at}" if cfg.join_nodes else "",
                         f", {cfg.kill_nodes} killed at round {cfg.kill_at}" if cfg.kill_nodes else ""])
        return (f"seedswarm cluster: {cfg.nodes} node processes on 127.0.0.1{extra}, {cfg.rounds} rounds, task "
                f"{cfg.task}, estimator {cfg.estimator}, {cfg.trainers} trainers, K={cfg.directions} directions, "
                f"aggregator {cfg.aggregator}, lr {cfg.lr}, run {self.genesis.run_id.hex()[:16]} -> {self.out}")

    def run(self) -> dict[str, Any]:
        t0 = time.time()
        self.setup()
        with Progress(self.cfg.rounds, header=self.header(), stream=self.log, quiet=self.cfg.quiet) as progress:
            self.progress = progress
            try:
                return self._run(t0)
            finally:
                self.progress = None

    def _run(self, t0: float) -> dict[str, Any]:
        cfg = self.cfg
        assert self.progress is not None
        self.say(f"starting {cfg.nodes} node processes (each loads torch and the task first: seconds)")
        if cfg.metrics_port:
            self.say(f"live dashboards: http://127.0.0.1:{cfg.metrics_port}/ ... "
                     f"http://127.0.0.1:{cfg.metrics_port + cfg.nodes + cfg.join_nodes - 1}/")
        for i in range(cfg.nodes):
            self.spawn(i)
        timeout = cfg.timeout or (60.0 + 3.0 * cfg.rounds * max(1.0, self.genesis.round_timeout)
                                  + 20.0 * (cfg.join_nodes > 0))
        finished = False
        interrupted = False
        try:
            while time.time() - t0 < timeout:
                if self.stop_requested:
                    interrupted = True
                    break
                st = self.statuses()
                alive = self.running()
                rounds = [st[i]["round"] for i in alive if i in st]
                best = max(rounds, default=0)
                if cfg.join_nodes and not self.joined and best >= cfg.join_at >= 0:
                    for i in range(cfg.nodes, cfg.nodes + cfg.join_nodes):
                        self.spawn(i)
                        self.joined.append(i)
                    self.say(f"round {best}: started {cfg.join_nodes} joining node(s)")
                # Kill only once the joiners are members: the scenario is "two join, then two die".
                joined_ok = all(st.get(i, {}).get("member") for i in self.joined) or \
                    any(time.time() - self.spawned_at[i] > 60 for i in self.joined)
                if cfg.kill_nodes and not self.killed and best >= cfg.kill_at >= 0 and joined_ok \
                        and (self.joined or not cfg.join_nodes):
                    victims = [i for i in range(cfg.nodes - 1, 1, -1) if i in alive][: cfg.kill_nodes]
                    for i in victims:
                        self.procs[i].send_signal(signal.SIGKILL)
                        self.procs[i].wait()
                        self.killed.append(i)
                    self.say(f"round {best}: SIGKILLed node(s) {victims}")
                for i, p in self.procs.items():
                    if p.poll() is not None and i not in self.killed and not getattr(p, "_reported", False):
                        p._reported = True  # type: ignore[attr-defined]
                        self.say(f"node {i} exited with code {p.returncode} (see {self.node_dir(i)}/node.log)")
                waiting_join = cfg.join_nodes and not self.joined
                waiting_kill = cfg.kill_nodes and not self.killed
                if alive and not waiting_join and not waiting_kill and all(i in st for i in alive):
                    heads = {st[i]["head"] for i in alive}
                    # the model too: a record is applied on the loop and the model follows in the
                    # worker thread, so a status can show the last head before its model digest
                    if all(st[i]["round"] >= cfg.rounds and st[i].get("model_digest") for i in alive) \
                            and len(heads) == 1:
                        finished = True
                        break
                if not alive:
                    break
                if best:
                    up = [st[i] for i in alive if i in st]
                    accs = [d["accuracy"] for d in up if isinstance(d.get("accuracy"), float)]
                    self.progress.update(best, acc=max(accs) if accs else None, running=len(alive),
                                         members=max((d.get("members", 0) for d in up), default=0),
                                         bytes=sum(d.get("bytes_sent", 0) for d in up))
                time.sleep(0.25)
        except KeyboardInterrupt:
            interrupted = True
        if not finished and not interrupted:
            self.say("cluster: timed out before every running node reached the last round on one head")
        final = self.statuses()
        alive = self.running()
        exit_codes = self.stop_all()
        summary = self.summarize(t0, final, alive, exit_codes, finished, interrupted)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        from seedswarm.sim.report import cluster_report

        cluster_report(self.out, summary, final, self.spawned_at)
        return summary

    def stop_all(self, grace: float = 10.0) -> dict[int, int | None]:
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.time() + grace
        for p in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.0, deadline - time.time()))
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in self._logs:
            f.close()
        return {i: p.returncode for i, p in self.procs.items()}

    def summarize(self, t0: float, final: dict[int, dict[str, Any]], alive: list[int],
                  exit_codes: dict[int, int | None], finished: bool, interrupted: bool) -> dict[str, Any]:
        cfg = self.cfg
        honest = [i for i in alive if i in final]
        digests: dict[str, int] = {}
        for i in honest:
            digests[final[i]["model_digest"]] = digests.get(final[i]["model_digest"], 0) + 1
        top = max(digests.items(), key=lambda kv: kv[1]) if digests else ("", 0)
        agreement = top[1] / len(alive) if alive else 0.0
        majority = [i for i in honest if final[i]["model_digest"] == top[0]]
        rounds_done = max((final[i]["round"] for i in majority), default=0)
        acc = next((final[i].get("accuracy") for i in majority if final[i].get("accuracy") is not None), None)
        # per-round times (first node to reach each round) and bytes measured at the transport
        first_t: dict[int, float] = {}
        bytes_rate: dict[int, float] = {}
        kind_rate: list[dict[str, float]] = []
        metrics_lines = []
        for i in self.procs:
            lines = []
            with contextlib.suppress(OSError):
                for ln in (self.node_dir(i) / "rounds.jsonl").read_text().splitlines():
                    with contextlib.suppress(ValueError):
                        lines.append(json.loads(ln))
            lines = [x for x in lines if x.get("t", 0) >= self.spawned_at.get(i, 0)]
            for x in lines:
                r = int(x["round"])
                first_t[r] = min(first_t.get(r, math.inf), float(x["t"]))
            if i in alive and len(lines) >= 2 and lines[-1]["round"] > lines[0]["round"]:
                bytes_rate[i] = (lines[-1]["sent"] - lines[0]["sent"]) / (lines[-1]["round"] - lines[0]["round"])
                kind_rate.append(kind_rates(lines))
        rs = sorted(first_t)
        lat = [first_t[r] - first_t[r - 1] for r in rs if r - 1 in first_t]
        for r in rs:
            metrics_lines.append({"round": r, "time": round(first_t[r] - t0, 3)})
        with open(self.out / "metrics.jsonl", "w") as f:
            for line in metrics_lines:
                f.write(json.dumps(line) + "\n")
        # process start -> first round applied: founding nodes (start-up) and mid-run joiners
        join_seconds = {f"node-{i}": (final[i]["first_apply_at"] - self.spawned_at[i])
                        for i in sorted(final) if final[i].get("first_apply_at")}
        joiner_seconds = {k: v for k, v in join_seconds.items() if int(k.split("-")[1]) in self.joined}
        return {
            "protocol": "seedswarm",
            "transport": "libp2p (TCP, Noise, Yamux, GossipSub), one OS process per node, loopback",
            "task": cfg.task,
            "nodes": cfg.nodes,
            "nodes_total": len(self.procs),
            "rounds": rounds_done,
            "finished": finished,
            "interrupted": interrupted,
            "final_accuracy": acc,
            "honest_digest_agreement": agreement,
            "running_nodes": len(alive),
            "distinct_heads": len({final[i]["head"] for i in honest}),
            "join_seconds": join_seconds,
            "join_seconds_max": max(join_seconds.values(), default=None),
            "join_seconds_joiners": joiner_seconds,
            # process start -> chain fetched, checkpoint loaded, records replayed (before Join)
            "sync_seconds": {f"node-{i}": (final[i]["synced_at"] - self.spawned_at[i])
                             for i in self.joined if i in final and final[i].get("synced_at")},
            "round_latency_p50_s": _percentile(lat, 0.5),
            "round_latency_p95_s": _percentile(lat, 0.95),
            "round_latency_mean_s": statistics.fmean(lat) if lat else None,
            "bytes_per_node_per_round": statistics.fmean(bytes_rate.values()) if bytes_rate else None,
            "bytes_per_node_per_round_by_node": {f"node-{i}": round(v, 1) for i, v in sorted(bytes_rate.items())},
            # the same bytes by what they were for (records, ..., gossip-control, framing)
            "bytes_per_node_per_round_by_kind": {k: round(v, 1) for k, v in mean_rates(kind_rate).items()},
            "bytes_sent_per_node": {f"node-{i}": final[i].get("bytes_sent") for i in sorted(final)},
            # the longest any node's event loop was held (its networking waited as long)
            "loop_lag_max_s": max((final[i].get("loop_lag_max_s") or 0.0 for i in final), default=None),
            "killed": [f"node-{i}" for i in self.killed],
            "joined": [f"node-{i}" for i in self.joined],
            "exit_codes": {f"node-{i}": c for i, c in sorted(exit_codes.items())},
            "rejected": {f"node-{i}": final[i].get("rejected") for i in sorted(final) if final[i].get("rejected")},
            "wall_seconds": time.time() - t0,
            "genesis_run_id": self.genesis.run_id.hex(),
            "config": asdict(cfg),
        }
