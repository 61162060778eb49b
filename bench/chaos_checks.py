"""The chaos bench's end checks, once the faults have stopped and the swarm has settled.

Every node's live ``/status`` at one round (same head, same model digest), the chain stores
compared record by record after a clean stop, and every restart's local chain against what the
node had logged before it was killed. A mixin of :class:`seedswarm.bench.chaos.Chaos`; each
check appends what fails to ``failures``.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from seedswarm.bench.chaos_observe import ChaosObserver


class ChaosChecks(ChaosObserver):
    """The checks after the run (they re-read rounds.jsonl, hence the observer base)."""

    def live_statuses(self) -> dict[int, dict[str, Any]]:
        """Every node's live ``GET /status``, asked of all nodes at once.

        ``status.json`` is only rewritten every ``status_every_s``: at several rounds a second,
        files read one after another differ by more rounds than the nodes do.
        """
        futs = {i: self.pool.submit(self.cl.http, i, "/status", 3.0) for i in self.nodes}
        got: dict[int, dict[str, Any]] = {}
        for i, f in futs.items():
            with contextlib.suppress(Exception):
                body = f.result(timeout=10)
                if body:
                    got[i] = json.loads(body)
        return got

    def snapshot(self) -> tuple[dict[int, dict[str, Any]], str]:
        """Every node's live ``GET /status``, until all report the same round with a model and
        one head (bounded: about 20 s).

        Right after the faults stop (a cut link healed, a paused node resumed) the two sides of
        a partition may each hold a branch of a few rounds; the fork choice settles it within
        rounds, and on an idle machine rounds take tens of milliseconds, so a first same-round
        answer can still show both branches. A split that outlasts the bound is reported from
        the last same-round snapshot (or the latest answer), as before."""
        last: dict[int, dict[str, Any]] = {}
        same_round: dict[int, dict[str, Any]] | None = None
        for _ in range(60):
            last = self.live_statuses()
            if (len(last) == len(self.nodes) and len({int(s["round"]) for s in last.values()}) == 1
                    and all(s.get("model_digest") for s in last.values())):
                same_round = last
                if len({s["head"] for s in last.values()}) == 1:
                    return last, "same-round /status snapshot"
            time.sleep(0.3)
        if same_round is not None:
            return same_round, "same-round /status snapshot (heads still differed after about 20 s)"
        return last, "latest /status (rounds differed in every attempt)"

    def check_agreement(self, snap: dict[int, dict[str, Any]], method: str) -> dict[str, Any]:
        missing = [i for i in self.nodes if i not in snap]
        if missing:
            self.failures.append(f"no /status from node(s) {missing} at the end")
        by_round: dict[int, list[int]] = {}
        for i, s in snap.items():
            by_round.setdefault(int(s["round"]), []).append(i)
        mismatches = []
        for r, ids in by_round.items():
            heads = {snap[i]["head"] for i in ids}
            digests = {snap[i]["model_digest"] for i in ids}
            if len(heads) > 1 or len(digests) > 1:
                mismatches.append({"round": r, "heads": {f"node-{i}": snap[i]["head"][:16] for i in ids},
                                   "digests": {f"node-{i}": snap[i]["model_digest"][:16] for i in ids}})
        if len(by_round) > 1:  # compare the heads of the lower rounds in the leaders' rounds.jsonl
            low = min(by_round)
            for i in self.nodes:
                self.read_rounds(i)
            for ids in by_round.values():
                for i in ids:
                    h = self.heads.get(i, {}).get(low)
                    ref = snap[by_round[low][0]]["head"][:16]
                    if h is not None and h != ref:
                        mismatches.append({"round": low, "node": f"node-{i}", "head": h, "expected": ref})
        if mismatches:
            self.failures.append(f"honest nodes disagree: {mismatches}")
        s0 = next(iter(snap.values()), {})
        return {"method": method, "rounds": sorted(by_round), "head": s0.get("head", "")[:16],
                "model_digest": s0.get("model_digest", "")[:16], "mismatches": mismatches}

    def stop_all(self) -> dict[str, int | None]:
        for p in self.cl.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGCONT)
        codes = self.cl.stop_all(grace=15.0)
        for i, c in codes.items():
            if c != 0 and self.nodes[i].phase in ("up", "starting", "paused"):
                start = self.nodes[i].log_offsets[-1] if self.nodes[i].log_offsets else 0
                self.crashes.append({"node": i, "exit_code": c, "t": "shutdown", "signature": f"exit {c} on SIGTERM (expected 0)",
                                     "log_tail": self.cl.log_tail(i, 25, start)})
        return {f"node-{i}": c for i, c in codes.items()}

    def check_stores(self, snap: dict[int, dict[str, Any]]) -> dict[str, Any]:
        from seedswarm.node.daemon.store import ChainStore

        stores: dict[int, list[bytes]] = {}
        holes: dict[str, list[int]] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for i in self.nodes:
                src = self.cl.node_dir(i) / "chain.log"
                dst = Path(tmp) / f"chain-{i}.log"
                try:
                    shutil.copyfile(src, dst)
                    cs = ChainStore(dst, self.cl.genesis.run_id)
                    stores[i] = cs.records()
                    if cs.holes():
                        holes[f"node-{i}"] = cs.holes()[:16]
                except Exception as e:  # noqa: BLE001 - reported as a failure
                    self.failures.append(f"node-{i}: cannot read its chain store: {e}")
        if not stores:
            return {}
        if holes:
            self.failures.append(f"chain stores with holes after a clean stop (rounds never re-fetched): {holes}")
        lengths = {i: len(s) for i, s in stores.items()}
        common = min(lengths.values())
        longest = max(stores.values(), key=len)
        diff: list[str] = []
        for i, s in stores.items():
            for r in range(len(s)):
                if r < len(longest) and s[r] != longest[r]:
                    diff.append(f"node-{i} round {r}")
                    break
        if diff:
            self.failures.append(f"chain stores differ (first differing record per node): {diff}")
        lost = {f"node-{i}": (lengths[i], int(snap[i]["round"])) for i in stores if i in snap and lengths[i] < int(snap[i]["round"])}
        if lost:
            self.failures.append(f"stores shorter than the round the node reported (records lost): {lost}")
        return {"lengths": {f"node-{i}": n for i, n in sorted(lengths.items())}, "common_head": common,
                "compared_rounds": common, "first_differences": diff, "holes": holes,
                "joins": self.joins_in(longest)}

    def joins_in(self, records: list[bytes]) -> dict[str, int]:
        """Public key (hex) -> round of the record that admitted it, over a chain's records."""
        from seedswarm.gossip.wire import Join, Record, WireError, decode_as

        run = self.cl.genesis.run_id
        out: dict[str, int] = {}
        for data in records:
            with contextlib.suppress(WireError):
                rec = decode_as(data, Record, run)
                for j in rec.joins:
                    with contextlib.suppress(WireError):
                        out[decode_as(j, Join, run).peer.hex()] = rec.round
        return out

    def check_restarts(self) -> list[dict[str, Any]]:
        """A killed node restarts with at least the records it had logged (invariant 5).

        Each incarnation's part of node.log starts at the offset recorded when it was spawned;
        its "local chain at round N" line says how many records it found in its store.
        """
        out = []
        pat = re.compile(r"local chain at round (\d+)")
        for i, st in self.nodes.items():
            try:
                raw = (self.cl.node_dir(i) / "node.log").read_bytes()
            except OSError:
                raw = b""
            for rs in st.restarts:
                start = rs["log_offset"]
                later = [o for o in st.log_offsets if o > start]
                m = pat.search(raw[start: later[0] if later else None].decode(errors="replace"))
                local = int(m.group(1)) if m else None
                floor = rs.get("floor")
                ok = None if local is None else (floor is None or local >= floor)
                out.append({"node": i, "why": rs["why"], "rounds_logged_before": floor,
                            "local_chain_at_restart": local, "ok": ok})
                if ok is False:
                    self.failures.append(f"node-{i} restarted on {local} records but had logged {floor}: records lost")
        return out
