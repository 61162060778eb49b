"""Benchmark: how long one node takes to join a running swarm, phase by phase, and its memory.

Starts N founding `seedswarm node` processes on loopback (the `seedswarm cluster` launcher of
``sim/cluster.py``: same genesis, same commands), lets them run ``--rounds-before`` rounds, then
starts ONE joiner and breaks its time down from the instant it was spawned, using the phase
times the daemon records in its status file (``phases``):

    interpreter      spawn -> `seedswarm node` entered (Python, the CLI and its imports)
    torch_import     -> torch imported (the CLI imports libp2p in a second thread meanwhile)
    modules_import   -> the daemon's modules (numpy, the core, learn, daemon) imported
    libp2p_import    -> libp2p's import finished too (by the CLI; where the daemon is started
                        otherwise, when its transport is built)
    identity         -> data dir locked, identity loaded or created
    model            -> task built, initial model checked against the genesis, local chain opened
    listening        -> host started, listening, topic subscribed
    first_peer       -> first connection to a peer
    chain_fetched    -> first answer to a chain request (the records)
    checkpoint       -> newest checkpoint downloaded in hash-checked chunks and installed
    first_apply      -> first round applied to its chain (the model may still wait for the checkpoint)
    join_sent        -> signed Join gossiped
    member           -> a record lists it as a member
    first_contribution -> it computed and sent its first contribution (committee duty)

The rows are in the order the phases happened (records arrive while the checkpoint downloads,
so the first round can be applied before it is in). A phase it did not pass (no checkpoint yet: the swarm was still below ``--checkpoint-every``)
is left out.

Where the bench may use two CPUs or more it gives the joiner a CPU of its own and pins the founders
to the others (``--cpus own``, the default): a joining host is its own machine, and on a 2-core box
eight founders training every round would otherwise take ~4/5 of the joiner's CPU and measure the
founders, not the join (torch's import: 1.2 s alone, 4.6 s among them). ``--cpus shared`` measures
that crowded case. Then, with the swarm idle between rounds, the proportional set size (PSS, from
``/proc/PID/smaps_rollup``) of the joiner and of a founder, and, with ``--imports``, the
interpreter's own import-time breakdown of a daemon's modules by top-level package
(``python -X importtime``).

Why: the time to join decides how fast a swarm absorbs new hosts and how soon a restarted node
is useful again; a process that pays seconds of imports before it dials anyone wastes them.

CLI: ``seedswarm bench join [--nodes 8] [--rounds-before 20] [--task-option KEY=VALUE]
[--cpus own|shared] [--imports] [--out DIR] [--json]``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from seedswarm.clihelp import parser
from seedswarm.node.daemon.config import DEFAULT_CHECKPOINT_CHUNK_BYTES
from seedswarm.node.files import OutPathError, prepare_out_dir
from seedswarm.sim.cluster import Cluster, ClusterConfig

#: The joiner's phases in the order a join passes them (the daemon's ``phases`` keys).
PHASES = ("main", "torch_import", "modules_import", "libp2p_import", "identity", "model", "listening",
          "first_peer", "chain_fetched", "checkpoint", "first_apply", "join_sent", "member", "first_contribution")
#: How each phase is shown: ``main`` is when the interpreter reached `seedswarm node`.
LABELS = {"main": "interpreter"}
#: Phases every successful join passes (the checkpoint only exists past --checkpoint-every).
REQUIRED = tuple(p for p in PHASES if p != "checkpoint")
#: What the daemon imports before its first round (the import-time probe's program).
DAEMON_IMPORTS = "import seedswarm.cli, torch, seedswarm.node.daemon.daemon, seedswarm.gossip.libp2p"


def pss_mib(pid: int) -> dict[str, float] | None:
    """Proportional and resident set size of ``pid`` in MiB (``/proc/PID/smaps_rollup``)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    out = {}
    for key in ("Pss", "Rss"):
        m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        if m:
            out[key.lower() + "_mib"] = round(int(m.group(1)) / 1024, 1)
    return out or None


def breakdown(phases: dict[str, float], spawned: float) -> list[dict[str, Any]]:
    """The phases in the order they happened (ties: join order), each with its time since spawn
    and its own duration (since the one before), so the durations add up to the last time."""
    rows, prev = [], spawned
    for name in sorted((p for p in PHASES if p in phases), key=lambda p: (phases[p], PHASES.index(p))):
        t = phases[name]
        rows.append({"phase": LABELS.get(name, name), "at_s": round(t - spawned, 3), "took_s": round(t - prev, 3)})
        prev = t
    return rows


def import_times(python: str = sys.executable) -> dict[str, float]:
    """Seconds of import per top-level package (``-X importtime`` self times, summed), largest first."""
    res = subprocess.run([python, "-X", "importtime", "-c", DAEMON_IMPORTS], capture_output=True, text=True,
                         timeout=300)
    per: dict[str, int] = {}
    for line in res.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if m:
            top = m.group(2).split(".")[0]
            per[top] = per.get(top, 0) + int(m.group(1))
    return {k: round(v / 1e6, 3) for k, v in sorted(per.items(), key=lambda kv: -kv[1])}


class JoinBench:
    """N founders, then one joiner; ``run()`` returns the result dict (see the module doc)."""

    def __init__(self, nodes: int, rounds_before: int, out: str, task_options: list[str],
                 checkpoint_every: int = 10, timeout: float = 300.0, idle_s: float = 2.0, quiet: bool = True,
                 own_cpu: bool = True) -> None:
        self.rounds_before = rounds_before
        self.cpus = cpu_layout(own_cpu)
        self.timeout = timeout
        self.idle_s = idle_s
        # --halt-at far beyond the measurement: the swarm must still be training when the joiner arrives
        self.cluster = Cluster(ClusterConfig(nodes=nodes, rounds=rounds_before + 100_000, join_nodes=1,
                                             join_at=rounds_before, task_options=task_options,
                                             checkpoint_every=checkpoint_every, out=out, quiet=quiet, eval_every=0,
                                             checkpoint_chunk_bytes=DEFAULT_CHECKPOINT_CHUNK_BYTES))  # the node's
        self.joiner = nodes

    def _wait(self, what: str, cond: Any, deadline: float) -> dict[int, dict[str, Any]]:
        c = self.cluster
        while time.time() < deadline:
            st = c.statuses()
            if cond(st):
                return st
            dead = [i for i, p in c.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"node(s) {dead} exited while waiting for {what} "
                                   f"(see {c.node_dir(dead[0])}/node.log)")
            time.sleep(0.1)
        raise TimeoutError(f"timed out waiting for {what}")

    def run(self) -> dict[str, Any]:
        c, j = self.cluster, self.joiner
        nodes = c.cfg.nodes
        t0 = time.time()
        deadline = t0 + self.timeout
        c.setup()
        try:
            for i in range(nodes):
                c.spawn(i, self.cpus["founders"])
            st = self._wait(f"round {self.rounds_before}", lambda s: all(
                s.get(i, {}).get("round", 0) >= self.rounds_before for i in range(nodes)), deadline)
            swarm_round = max(st[i]["round"] for i in range(nodes))
            c.spawn(j, self.cpus["joiner"])
            try:  # the joiner gets the whole --timeout from its own start, however long the warm-up took
                st = self._wait("the joiner's first contribution",
                                lambda s: "first_contribution" in s.get(j, {}).get("phases", {}), time.time() + self.timeout)
            except TimeoutError as e:  # say how far it got: a slow swarm is not a stuck joiner
                st = c.statuses()
                got = breakdown(st.get(j, {}).get("phases", {}), c.spawned_at[j])
                reached = ", ".join(f"{r['phase']} {r['at_s']:.1f} s" for r in got) or "none"
                raise TimeoutError(f"{e} ({self.timeout:.0f} s after the joiner started; its phases so far: {reached}; "
                                   f"swarm at round {max((x.get('round', 0) for x in st.values()), default=0)})") from None
            # idle: between rounds the daemons wait on their sockets; sample both, then stop
            time.sleep(self.idle_s)
            pss = {"joiner": pss_mib(c.procs[j].pid), "founder": pss_mib(c.procs[0].pid)}
            cpus = {"joiner": sorted(os.sched_getaffinity(c.procs[j].pid)),  # as the kernel has them
                    "founders": sorted(os.sched_getaffinity(c.procs[0].pid))}
            st = c.statuses()
        finally:
            codes = c.stop_all()
        js = st[j]
        rows = breakdown(js["phases"], c.spawned_at[j])
        first = next(r["at_s"] for r in rows if r["phase"] == "first_apply")
        return {
            "nodes": nodes, "swarm_round_at_join": swarm_round, "task_options": c.cfg.task_options,
            "params": _param_count(c), "first_round_applied_s": first,
            "member_s": next(r["at_s"] for r in rows if r["phase"] == "member"),
            "checkpoint_round": js.get("checkpoint_round"), "phases": rows, "idle_memory_mib": pss,
            "cpus": cpus,
            "exit_codes": {f"node-{i}": code for i, code in codes.items()}, "wall_seconds": round(time.time() - t0, 1),
        }


def cpu_layout(own_cpu: bool) -> dict[str, frozenset[int] | None]:
    """The joiner's CPU and the founders' (None: unpinned). ``own_cpu`` with one CPU: nothing to split."""
    avail = sorted(os.sched_getaffinity(0))
    if not own_cpu or len(avail) < 2:
        return {"founders": None, "joiner": None}
    return {"founders": frozenset(avail[:-1]), "joiner": frozenset(avail[-1:])}


def _param_count(c: Cluster) -> int | None:
    options = c.genesis.task_options
    try:
        from seedswarm.node.learn.tasks import load_task

        model = load_task(c.genesis.task, dict(options), seed=c.genesis.seed).build_model()
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - a figure for the report only
        return None


def render(res: dict[str, Any]) -> str:
    lines = [f"one joiner into {res['nodes']} running daemons (digits, {res['params'] or '?'} parameters, "
             f"joined at round {res['swarm_round_at_join']}): first round applied {res['first_round_applied_s']:.2f} s "
             f"after spawn, member at {res['member_s']:.2f} s",
             f"CPUs: joiner {res['cpus']['joiner']}, founders {res['cpus']['founders']}",
             f"{'phase':<20} {'took s':>8} {'at s':>8}"]
    lines += [f"{r['phase']:<20} {r['took_s']:>8.3f} {r['at_s']:>8.3f}" for r in res["phases"]]
    for who, m in res["idle_memory_mib"].items():
        if m:
            lines.append(f"idle {who}: PSS {m.get('pss_mib')} MiB, RSS {m.get('rss_mib')} MiB")
    if res.get("imports"):
        top = ", ".join(f"{k} {v:.2f}" for k, v in list(res["imports"].items())[:8])
        lines.append(f"import seconds by package (-X importtime, self): {top}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser("seedswarm bench join", __doc__.split("\n\n")[0] if __doc__ else "",
               examples=["seedswarm bench join --nodes 8 --rounds-before 20",
                         "seedswarm bench join --nodes 4 --task-option hidden=150000 --json   # about 10M parameters"])
    p.add_argument("--nodes", type=int, default=8, help="founding daemon processes already running")
    p.add_argument("--rounds-before", type=int, default=20, help="rounds the swarm runs before the joiner starts")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a digits task option, e.g. hidden=150000 for a model of about 10M parameters")
    p.add_argument("--checkpoint-every", type=int, default=10, help="rounds between the checkpoints a joiner downloads")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="give up after this many seconds of the swarm's warm-up, or of the joiner's start")
    p.add_argument("--cpus", choices=("own", "shared"), default="own",
                   help="own: the joiner gets a CPU to itself and the founders the others, as on its own host; "
                        "shared: all processes share every CPU")
    p.add_argument("--imports", action="store_true", help="also measure the daemon's imports with -X importtime")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="cluster output folder, refused if it holds files (default: a temporary one)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    if args.nodes < 1 or args.rounds_before < 1:
        print("seedswarm bench join: --nodes and --rounds-before must be positive", file=sys.stderr)
        return 2
    try:
        out = str(prepare_out_dir(args.out)) if args.out else tempfile.mkdtemp(prefix="seedswarm-join-")
    except OutPathError as e:
        print(f"seedswarm bench join: {e}", file=sys.stderr)
        return 2
    bench = JoinBench(args.nodes, args.rounds_before, out, args.task_option, args.checkpoint_every, args.timeout,
                      quiet=args.json, own_cpu=args.cpus == "own")
    try:
        res = bench.run()
    except (RuntimeError, TimeoutError) as e:
        print(f"seedswarm bench join: {e}", file=sys.stderr)
        return 1
    if args.imports:
        res["imports"] = import_times()
    print(json.dumps(res, indent=2) if args.json else render(res))
    return 0
