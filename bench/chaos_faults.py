"""The chaos bench's faults: the seeded schedule, and kills, restarts, pauses, link drops and
Join floods carried out on it.

A mixin of :class:`seedswarm.bench.chaos.Chaos`. A kill or a pause never takes the bench
below a majority of nodes up (:meth:`ChaosFaults.may_take_offline`), and at most ``N // 3``
links (at least one) are cut at once; a fault that would break either is skipped and counted.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess

from seedswarm.bench.chaos_state import ChaosState


class ChaosFaults(ChaosState):
    """Draws the fault schedule and carries out each fault when it is due."""

    def may_take_offline(self) -> list[int]:
        """Nodes we may kill or pause now: a majority of all nodes stays up and synced."""
        n = self.cfg.nodes
        majority = n // 2 + 1
        if len(self.online()) - 1 < majority:
            return []
        return self.online()

    def kill(self, i: int, now: float, down_s: float) -> None:
        st, p = self.nodes[i], self.cl.procs[i]
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(10)
        st.phase, st.resume_at = "down", now + down_s
        st.restart_floor = self.cl.last_logged_round(i)
        st.behind_since = None
        self.counts["kills"] += 1
        self.event("kill", i, down_s=round(down_s, 1), rounds_logged=st.restart_floor)

    def spawn(self, i: int, now: float, why: str) -> None:
        st = self.nodes[i]
        st.log_offsets.append(self.cl.log_size(i))
        self.cl.spawn(i)
        st.phase, st.spawned_at, st.pid = "starting", now, self.cl.procs[i].pid
        st.caught_up_after_spawn = None
        st.behind_since = now
        if why != "start":
            self.counts["restarts"] += 1
            st.restarts.append({"at": now, "why": why, "floor": st.restart_floor, "pid": st.pid,
                                "log_offset": st.log_offsets[-1]})
            self.event("restart", i, why=why)

    def pause(self, i: int, now: float, pause_s: float) -> None:
        st = self.nodes[i]
        with contextlib.suppress(ProcessLookupError):
            self.cl.procs[i].send_signal(signal.SIGSTOP)
        st.phase, st.resume_at = "paused", now + pause_s
        st.behind_since = None
        self.counts["pauses"] += 1
        self.event("pause", i, pause_s=round(pause_s, 1))

    def resume(self, i: int, now: float) -> None:
        st = self.nodes[i]
        with contextlib.suppress(ProcessLookupError):
            self.cl.procs[i].send_signal(signal.SIGCONT)
        st.phase = "up"
        st.behind_since = now
        self.event("resume", i)

    def draw_faults(self, start: float, end: float) -> list[tuple[float, str]]:
        """The seeded schedule: (time, kind). Targets are drawn when each fault is due."""
        kinds = ["kill", "pause"] + (["link"] if self.net is not None else [])
        weights = [3, 3] + ([3] if self.net is not None else [])
        out: list[tuple[float, str]] = []
        t = start + self.rng.expovariate(1 / self.cfg.fault_every_s)
        while t < end - 5:
            out.append((t, self.rng.choices(kinds, weights)[0]))
            t += self.rng.expovariate(1 / self.cfg.fault_every_s)
        if self.cfg.join_flood > 0:
            for frac in (0.3, 0.65):
                out.append((start + frac * (end - start), "join-flood"))
        return sorted(out)

    def do_fault(self, kind: str, now: float) -> None:
        n = self.cfg.nodes
        if kind == "join-flood":
            self.adversary.join_flood(self.cfg.join_flood)
            self.counts["join_floods"] += 1
            self.event("join-flood", joins=self.cfg.join_flood)
            return
        if kind == "link":
            assert self.net is not None
            free = [(i, j) for i in range(n) for j in range(i + 1, n) if (i, j) not in self.net.cut]
            if len(self.net.cut) >= max(1, n // 3) or not free:
                self.counts["faults_skipped"] += 1
                return
            i, j = self.rng.choice(free)
            dur = self.rng.uniform(5, 30)
            self.net.drop(i, j)
            self.link_heal.append((now + dur, i, j))
            self.counts["link_drops"] += 1
            self.event("link-drop", None, pair=f"{i}-{j}", seconds=round(dur, 1))
            return
        eligible = self.may_take_offline()
        if not eligible:
            self.counts["faults_skipped"] += 1
            return
        i = self.rng.choice(eligible)
        if kind == "kill":
            self.kill(i, now, self.rng.uniform(3, 20))
        else:
            self.pause(i, now, self.rng.uniform(2, 15))
