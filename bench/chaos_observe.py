"""What the chaos bench watches while it runs: each daemon's status, rounds, crashes and
metrics, the best head, nodes behind it and splits between nodes.

A mixin of :class:`seedswarm.bench.chaos.Chaos`, called every loop iteration. Also the readers
of a daemon's public surface that the fuzzer shares (:func:`parse_metrics`) and the crash
signatures that name a crashed incarnation by its log.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import Counter
from typing import Any

from seedswarm.bench.adversary import View
from seedswarm.bench.chaos_state import ChaosState

LAG_ROUNDS = 2  # a node more than this many rounds under the best head is "behind"

#: Crash signatures: what a crashed incarnation's log says -> a short name for the report. The
#: first three were daemon bugs these benches found (fixed in main: the restart port check, the
#: pubsub guard); they stay here to name a regression at once.
CRASH_SIGNATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("restart refused: listen port in use (TIME_WAIT; the port pre-check regressed?)",
     ("cannot listen on", "ddress")),
    ("pubsub: a garbage RPC stopped the host (DecodeError; the guard regressed?)",
     ("Error parsing message with type 'pubsub.pb.RPC'",)),
    ("pubsub: a garbage key stopped the host (crypto.pb.PublicKey; the guard regressed?)",
     ("Error parsing message with type 'crypto.pb.PublicKey'",)),
    ("the libp2p host failed", ("libp2p host failed",)),
    ("a node task crashed", ("node task crashed",)),
    ("a task failed", ("task ", " failed: ")),
)


def crash_signature(log_text: str) -> str:
    for name, needles in CRASH_SIGNATURES:
        if all(n in log_text for n in needles):
            return name
    return "unknown (see the log tail)"


_METRIC_RE = re.compile(r"^seedswarm_([a-z_]+)(?:\{([a-z_]+)=\"([^\"]*)\"\})? ([0-9.e+-]+)$")


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC_RE.match(line)
        if m:
            name, _, value, v = m.groups()
            out[f"{name}{{{value}}}" if value is not None else name] = float(v)
    return out


class ChaosObserver(ChaosState):
    """Reads every daemon each loop iteration: phases, the best head, lag, splits, crashes."""

    def read_rounds(self, i: int) -> None:
        path = self.cl.node_dir(i) / "rounds.jsonl"
        off = self._rounds_offset.get(i, 0)
        try:
            with open(path, "rb") as f:
                f.seek(off)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n")
        if end < 0:
            return
        self._rounds_offset[i] = off + end + 1
        h = self.heads.setdefault(i, {})
        for ln in data[: end + 1].splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                d = json.loads(ln)
                h[int(d["round"])] = str(d["head"])[:16]
        if len(h) > 4000:
            for r in sorted(h)[:-2000]:
                del h[r]

    def observe(self, now: float) -> dict[int, dict[str, Any]]:
        cfg = self.cfg
        statuses: dict[int, dict[str, Any]] = {}
        for i, st in self.nodes.items():
            p = self.cl.procs.get(i)
            if p is None:
                continue
            if st.phase in ("starting", "up", "paused") and p.poll() is not None:
                self.crashed(i, now, p.returncode)
                continue
            self.read_rounds(i)
            s = self.cl.read_status(i)
            if s is None:
                continue
            statuses[i] = s
            self.status_by_pid[(i, s["pid"])] = s
            if st.phase == "starting" and s.get("state") == "running":
                st.phase = "up"
                st.crash_streak = 0
                self.event("running", i, after_s=round(now - st.spawned_at, 1), round=s.get("round"))
        running = {i: s for i, s in statuses.items() if self.nodes[i].phase == "up"}
        rounds = [int(s["round"]) for s in running.values()]
        if rounds and max(rounds) > self.best_round:
            self.best_round, self.best_at = max(rounds), now
        members = max((int(s.get("members", 0)) for s in running.values()), default=0)
        self.round_marks.append((now, self.best_round, members))
        self.members_peak = max(self.members_peak, members)
        # behind the best head
        for i, st in self.nodes.items():
            if st.phase not in ("up", "starting"):
                continue
            r = int(statuses.get(i, {}).get("round", -1))
            behind = r < self.best_round - LAG_ROUNDS or st.phase == "starting"
            if behind and st.behind_since is None:
                st.behind_since = now
            elif not behind and st.behind_since is not None:
                st.longest_behind_s = max(st.longest_behind_s, now - st.behind_since)
                st.behind_since = None
                if st.caught_up_after_spawn is None:
                    st.caught_up_after_spawn = now - st.spawned_at
        # splits: two running nodes on different heads at the same round for a while
        up = sorted(running)
        for a_i, a in enumerate(up):
            for b in up[a_i + 1:]:
                ha, hb = self.heads.get(a, {}), self.heads.get(b, {})
                ra, rb = max(ha, default=-1), max(hb, default=-1)
                c = min(ra, rb)
                diverged = c >= 0 and c in ha and c in hb and ha[c] != hb[c]
                key = (a, b)
                if diverged:
                    since = self.diverged_since.setdefault(key, now)
                    if now - since > cfg.split_window_s and not any(s["pair"] == key and s["healed_at"] is None for s in self.splits):
                        self.splits.append({"pair": key, "round": c, "since": since - self.t0, "healed_at": None})
                        self.event("split", None, pair=f"{a}-{b}", round=c)
                elif key in self.diverged_since:
                    del self.diverged_since[key]
                    for s in self.splits:
                        if s["pair"] == key and s["healed_at"] is None:
                            s["healed_at"] = now - self.t0
                            self.event("split-healed", None, pair=f"{a}-{b}", after_s=round(now - self.t0 - s["since"], 1))
        return statuses

    def crashed(self, i: int, now: float, rc: int | None) -> None:
        st = self.nodes[i]
        start = st.log_offsets[-1] if st.log_offsets else 0
        sig = crash_signature(self.cl.log_text(i, start))
        self.crashes.append({"node": i, "pid": st.pid, "exit_code": rc, "t": round(now - self.t0, 1), "signature": sig,
                             "log_tail": self.cl.log_tail(i, 25, start)})
        self.event("CRASH", i, exit_code=rc, signature=sig[:60])
        st.phase = "crashed"
        st.behind_since = None
        st.restart_floor = max(st.restart_floor or 0, self.cl.last_logged_round(i))
        # a supervisor restarts it (backoff 2, 4, 8, 16, 30 s): the swarm stays at strength
        st.crash_streak += 1
        st.resume_at = now + min(30.0, 2.0 ** st.crash_streak)

    def poll_metrics(self) -> None:
        if self._metrics_future is not None and not self._metrics_future.done():
            return
        targets = [(i, self.nodes[i].pid) for i in self.online()]

        def work() -> None:
            for i, pid in targets:
                body = self.cl.http(i, "/metrics")
                if body is not None:
                    self.metrics_by_pid[(i, pid)] = parse_metrics(body.decode(errors="replace"))

        self._metrics_future = self.pool.submit(work)

    def update_view(self, statuses: dict[int, dict[str, Any]]) -> None:
        online = self.online()
        self.adversary.set_view(View(online=[self.cl.target(i) for i in online],
                                     status={f"node-{i}": statuses[i] for i in online if i in statuses}))

    def progress(self, now: float, end: float) -> None:
        c = self.counts
        phases = Counter(s.phase for s in self.nodes.values())
        cut = len(self.net.cut) if self.net is not None else 0
        left = max(0.0, end - now)
        self.say(f"chaos {now - self.t0:6.0f}s  ETA {int(left) // 60}:{int(left) % 60:02d}  round {self.best_round:5d}  "
                 f"up {phases['up']}/{self.cfg.nodes} paused {phases['paused']} down {phases['down'] + phases['crashed']} "
                 f"starting {phases['starting']} links-cut {cut} | kills {c['kills']} restarts {c['restarts']} "
                 f"pauses {c['pauses']} link-drops {c['link_drops']} floods {c['join_floods']} | "
                 f"hostile {self.adversary.tally.total} | splits {len(self.splits)} crashes {len(self.crashes)}")
