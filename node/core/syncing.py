"""The node core's catch-up: when to ask for the chain, what to do with the answer, and the
checkpoint download of a node that joins far behind.

A part of :class:`~seedswarm.node.core.protocol.NodeCore` kept in its own file (the rules are in
``sync`` and ``joinplan``; this is where the core applies them to its own state).
"""

from __future__ import annotations

from typing import Protocol

from seedswarm.gossip.wire import (
    ChainResponse,
    CheckpointChunk,
    CheckpointManifest,
    CheckpointRequest,
    Record,
    WireError,
)
from seedswarm.node.core.chain import ChainState
from seedswarm.node.core.effects import (
    Apply,
    Effect,
    InstallCheckpoint,
    Notice,
    Reason,
    Reply,
    Resync,
    Send,
)
from seedswarm.node.core.forks import ForkTree
from seedswarm.node.core.joinplan import ZERO32, JoinPlan, PlanConfig
from seedswarm.node.core.peers import PeerPolicy
from seedswarm.node.core.sync import PAGE, ChainSync, History


class _CoreCfg(Protocol):
    sync_after: float
    max_undo: int
    checkpoint_gap: int
    model_round: int


class _Core(Protocol):
    """What of the node core the catch-up code uses (the core is the one class that mixes it in)."""

    me: bytes
    run_id: bytes
    cfg: _CoreCfg
    tree: ForkTree
    sync: ChainSync
    policy: PeerPolicy
    history: History
    _plan_cfg: PlanConfig
    _paging: bool
    _waiting: bool
    _last_progress: float

    @property
    def head(self) -> ChainState: ...

    @property
    def round(self) -> int: ...

    def _count(self, key: str, n: int = 1) -> None: ...

    def reject(self, now: float, peer: bytes | None, reason: Reason, detail: str = "") -> list[Effect]: ...

    def _on_record(self, now: float, rec: Record, peer: bytes | None) -> list[Effect]: ...

    def _enter_round(self, now: float) -> list[Effect]: ...

    def _end_wait(self, now: float) -> list[Effect]: ...

    def _maybe_join(self, now: float) -> list[Effect]: ...


#: checkpoint downloads started again after the servers no longer had the chosen one
MAX_REPLANS = 2


class SyncMixin(_Core):
    plan: JoinPlan | None = None  # the checkpoint download under way, if any
    _plans_failed: int = 0  # downloads given up because the servers no longer had the checkpoint
    # ------------------------------------------------------------------ peers
    def on_peer(self, now: float, peer: bytes, length: int = 0) -> list[Effect]:
        """The driver connected to ``peer``, which says its chain holds ``length`` records (a
        hint: only records that check out move us). A peer ahead of us triggers a sync."""
        if peer == self.me or self.policy.is_banned(peer, now):
            return []
        self.sync.hint(peer, length, now)
        if length > self.round + 1:
            return self._sync_soon(now) + self._maybe_plan(now)
        return []

    def on_peer_gone(self, peer: bytes) -> None:
        self.sync.forget(peer)

    def _sync_peers(self) -> list[bytes]:
        known = [p for p in self.sync.peer_heads if p != self.me]
        return known or [p for p in self.head.members if p != self.me]

    # ------------------------------------------------------------------ asking
    def _ask_chain(self, now: float, exclude: set[bytes] | None = None) -> list[Effect]:
        banned = {p for p in self._sync_peers() if self.policy.is_banned(p, now)}
        skip = (exclude or set()) | banned | set(self.sync.asks)
        # A peer that already told us about a deep fork has had its say: ask the others, whose
        # agreement (or not) decides whether we give up our chain.
        voted = {p for fk in self.sync.forks.values() for p in fk.voters}
        peer = self.sync.pick(now, self._sync_peers(), skip | voted) or self.sync.pick(now, self._sync_peers(), skip)
        self._count("sync.requests")
        if peer is None:
            return []
        return [Send(peer, self.sync.request(now, peer, self.tree.root().round))]

    def _sync_soon(self, now: float) -> list[Effect]:
        """A record from the future arrived: ask for the chain, at most a few times per sync_after."""
        if self.sync.outstanding() or now - self.sync.last_request <= self.cfg.sync_after / 4:
            return []
        return self._ask_chain(now)

    def _sync_timer(self, now: float) -> list[Effect]:
        out: list[Effect] = []
        for p in self.sync.expired(now):
            self._count("sync.timeouts")
            out += self._ask_chain(now, exclude={p})
        stalled = now - self._last_progress > self.cfg.sync_after
        if stalled and not self.sync.outstanding() and now - self.sync.last_request > self.cfg.sync_after:
            self._paging = False
            out += self._ask_chain(now)
        if self.plan is not None and not self.plan.done:
            out += self._plan_progress(now)
        return out

    def _sync_wakeup(self, now: float) -> float:
        cfg = self.cfg
        if now - self._last_progress > cfg.sync_after:
            t = max(self.sync.last_request + cfg.sync_after, now + 1e-3)
        else:
            t = self._last_progress + cfg.sync_after + 1e-6
        if self.sync.asks:
            t = min(t, min(a.sent for a in self.sync.asks.values()) + self.sync.cfg.request_timeout + 1e-6)
        if self.plan is not None:
            t = min(t, self.plan.next_wakeup() + 1e-6)
        return t

    # ------------------------------------------------------------------ answers
    def _on_chain_response(self, now: float, resp: ChainResponse, peer: bytes) -> list[Effect]:
        ask = self.sync.take(peer, resp)
        try:
            recs = ChainSync.decode(resp, self.run_id)
        except WireError as e:
            return self.reject(now, peer, Reason.BAD_CHAIN_RESPONSE, str(e))
        self.sync.hint(peer, resp.head, now)
        if ask is None:
            self._count("sync.unsolicited")  # late (we gave up on it) or unasked: use, never follow up
        if ask is not None and ask.deep:
            return self._on_probe(now, peer, ask.start, ask.origin, recs)
        out: list[Effect] = []
        before = self.head
        first = next((i for i, r in enumerate(recs) if self.tree.state(r.prev) is not None), None)
        if recs and first is None and recs[0].round <= self.round:
            if self.history.head_at(recs[0].round) == recs[0].prev:
                return []  # our own chain, from before the window (our root moved on meanwhile)
            # Their record at the root of our window does not build on our chain: their chain
            # left ours before it. Look further back for the fork point.
            if ask is None:
                return []
            self._count("sync.deep_fork_probes")
            return [Send(peer, self.sync.request(now, peer, recs[0].round, max(0, recs[0].round - 16)))]
        self._paging = True  # settled history: no fallback hold, no duties while we page
        for rec in recs[first or 0:]:
            out += self._on_record(now, rec, peer)
        advanced = self.head.round > before.round
        more = ask is not None and advanced and len(recs) >= PAGE and resp.head > self.round
        self._paging = more
        if more:
            out.append(Send(peer, self.sync.request(now, peer, self.tree.root().round)))
        elif self._waiting:
            out += self._end_wait(now)  # we heard the swarm and hold its chain: duties from now on
        elif advanced:
            out += self._enter_round(now)  # caught up with this peer: take this round's duties
        elif ask is not None and resp.head > self.round + 1:
            self._count("sync.no_progress")  # they claim more but showed nothing that helps
        out += self._maybe_plan(now) + self._maybe_join(now)
        return out

    def _on_probe(self, now: float, peer: bytes, start: int, origin: int, recs: list[Record]) -> list[Effect]:
        fp = ChainSync.fork_point(recs, self.history)
        if fp is None:
            if start == 0:
                return self.reject(now, peer, Reason.BAD_CHAIN_RESPONSE, "chain shares no record with ours")
            back = max(0, start - 2 * (origin - start + 1))
            return [Send(peer, self.sync.request(now, peer, origin, back))]
        fork_round, their = fp
        if fork_round >= self.tree.root().round:
            return []  # inside our window after all (the chain moved meanwhile): normal sync handles it
        fk = self.sync.vote(peer, fork_round, their, now)
        out: list[Effect] = [
            *self.reject(now, peer, Reason.DEEP_FORK, f"their chain left ours at round {fork_round}"),
            Notice("deep-fork", f"peer's chain left ours at round {fork_round}, {self.round - fork_round} "
                                f"rounds back (we may undo {self.cfg.max_undo}); {len(fk.voters)} peer(s) say so"),
        ]
        verdict = self.sync.verdict(now)
        if verdict is not None:
            self._count("sync.resyncs")
            self.sync.clear_forks()
            out.append(Resync(verdict.fork_round, tuple(sorted(verdict.voters))))
        return out

    # ------------------------------------------------------------------ joining far behind
    def _maybe_plan(self, now: float, replan: bool = False) -> list[Effect]:
        """A checkpoint download when the model is more than ``checkpoint_gap`` rounds behind the
        best chain known. ``replan``: the previous download failed while our chain caught up (its
        records are stored, the model still waits at ``model_round``): replaying is the cost."""
        gap = self.cfg.checkpoint_gap
        if gap <= 0 or self.plan is not None:
            return []
        model_at = self.cfg.model_round if replan else max(self.cfg.model_round, self.round)
        if max(self.sync.best_known(now), self.round) - model_at <= gap:
            return []
        plan = JoinPlan(self.run_id, self._plan_cfg, now, self.cfg.model_round)
        self.plan = plan
        self._count("checkpoints.plans")
        peers = sorted(self._sync_peers(), key=lambda p: -self.sync.peer_heads.get(p, (0, 0.0))[0])
        return [Send(p, req) for p, req in plan.ask_manifests(now, peers)]

    def _on_chain(self, round_: int, head: bytes) -> bool:
        st = self.tree.state(head)
        if st is not None:
            return st.round == round_
        return self.history.head_at(round_) == head

    def _plan_progress(self, now: float) -> list[Effect]:
        plan = self.plan
        if plan is None or plan.done:
            return []
        out: list[Effect] = []
        if plan.manifest is None and not plan.choose(now, self._on_chain):
            if plan.done:
                out.append(Notice("checkpoint", f"replaying instead: {plan.failed}"))
                out.append(Apply(self.tree.head, (), self.tree.head))  # replay what was stored meanwhile
            return out
        out += [Send(p, req) for p, req in plan.requests(now)]
        blob = plan.blob()
        if blob is not None and plan.manifest is not None:
            self._count("checkpoints.installed")
            self._plans_failed = 0
            out.append(InstallCheckpoint(plan.manifest.round, plan.manifest.head, blob))
        if plan.done and plan.failed:
            self._count("checkpoints.failed")
            if plan.unavailable and self._plans_failed < MAX_REPLANS:
                # The servers pruned the checkpoint while we fetched it (a slow joiner, fast
                # rounds): ask again for the newest one rather than replay the whole chain.
                self._plans_failed += 1
                self.plan = None
                again = self._maybe_plan(now, replan=True)
                if self.plan is not None:
                    return out + [Notice("checkpoint", f"asking for a newer checkpoint: {plan.failed}")] + again
                self.plan = plan  # close enough to the head now: replay the rest
            out.append(Notice("checkpoint", f"replaying instead: {plan.failed}"))
        if plan.done:
            # The model waited for this checkpoint (``Apply.catching_up``): move it to the head now,
            # not at the next live round, which a halted or stalled swarm may never have.
            out.append(Apply(self.tree.head, (), self.tree.head))
            out += self._enter_round(now) + self._maybe_join(now)
        return out

    def _on_checkpoint(self, now: float, msg: CheckpointManifest | CheckpointChunk, peer: bytes) -> list[Effect]:
        plan = self.plan
        if plan is None or plan.done:
            self._count("checkpoints.unsolicited")
            return []
        if isinstance(msg, CheckpointManifest):
            plan.on_manifest(peer, msg)
            return self._plan_progress(now)
        err = plan.on_chunk(peer, msg)
        if err is not None:
            return self.reject(now, peer, Reason.BAD_CHECKPOINT, err) + self._plan_progress(now)
        return self._plan_progress(now)

    # ------------------------------------------------------------------ checkpoints we serve
    def _serve_checkpoint(self, msg: CheckpointRequest, peer: bytes) -> list[Effect]:
        if msg.digest == ZERO32:
            m = self.history.manifest()
            if m is None:
                self._count("checkpoints.none")
                return []
            self._count("checkpoints.manifests_served")
            return [Reply(peer, msg, m)]
        data = self.history.chunk(msg.digest, msg.index)
        if data is None:
            self._count("checkpoints.missing")
            return []
        m = self.history.manifest()
        total = len(m.chunks) if m is not None and m.state == msg.digest else 0
        self._count("checkpoints.chunks_served")
        return [Reply(peer, msg, CheckpointChunk(run=self.run_id, digest=msg.digest, index=msg.index,
                                                 total=total, data=data))]
