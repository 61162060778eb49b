"""The daemon's work that must not run on its event loop: moving the model (replaying records,
installing and writing checkpoints, evaluating), local estimates (torch), and join work (up to
2**40 hashes once a Join flood has raised the difficulty).

All of it runs in the daemon's one worker thread, or inline in virtual-time tests. One thread
means first in, first out: an estimate for a head runs after the replay that reaches it, an
``Apply`` after the checkpoint install before it, without any other bookkeeping. Results come
back to the loop (``_model_job``'s callback, the core's ``on_estimate`` and ``on_join_work``).
A mixin of :class:`~seedswarm.node.daemon.daemon.Daemon`: the attributes below are the daemon's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import logging
import time
from collections.abc import Callable
from typing import Any, TextIO, TypeVar

import numpy as np
import torch

from seedswarm.crypto.keys import Identity
from seedswarm.gossip.transport import Transport
from seedswarm.node.core.admission import WorkAbandoned, solve_work
from seedswarm.node.core.effects import Apply, Effect, Estimate, InstallCheckpoint, SolveWork
from seedswarm.node.core.genesis import Genesis
from seedswarm.node.core.protocol import NodeCore
from seedswarm.node.daemon import bytekinds, dashboard
from seedswarm.node.daemon.config import NodeConfig
from seedswarm.node.daemon.localchain import LocalChain
from seedswarm.node.daemon.metrics import Metrics
from seedswarm.node.learn.estimators import local_estimate
from seedswarm.node.learn.replay import bind_
from seedswarm.node.learn.tasks import Task

log = logging.getLogger("seedswarm.daemon")

_T = TypeVar("_T")


class OffLoopWork:
    genesis: Genesis
    run_id: bytes
    identity: Identity
    core: NodeCore | None
    chain: LocalChain
    metrics: Metrics
    task: Task
    shard: Any
    rng: np.random.Generator
    device: torch.device
    _work_model: torch.nn.Module
    _eval_model: torch.nn.Module
    _executor: concurrent.futures.ThreadPoolExecutor | None
    _stop: asyncio.Event
    _solving: bool = False
    cfg: NodeConfig
    transport: Transport | None
    evaluation: dict[str, float]
    history: dashboard.History
    peer_id: str
    _rounds_log: TextIO | None

    def mark(self, phase: str) -> None:
        """Defined by the daemon: when a start-up phase first completed."""
        raise NotImplementedError

    def handle(self, effects: list[Effect]) -> None:
        raise NotImplementedError  # the daemon's

    def now(self) -> float:
        raise NotImplementedError  # the daemon's

    def log_once(self, reason: str, peer: str, msg: str, *args: Any, level: int = logging.WARNING) -> None:
        raise NotImplementedError  # the daemon's

    async def _off_loop(self, fn: functools.partial[Any]) -> Any:
        if self._executor is None:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _model_job(self, fn: Callable[[], _T], then: Callable[[_T], None], what: str) -> None:
        """``fn`` in the worker, after everything handed to it before; ``then(result)`` back on
        the loop. Submitted now, not from a task, so jobs keep the order of the core's effects.
        A job that raises costs a counter and a log line, and the model is rebuilt from the
        store at the next ``Apply`` (the records are stored already: nothing is lost)."""
        if self._executor is None:
            then(fn())
            return
        loop = asyncio.get_running_loop()
        fut = self._executor.submit(fn)

        def done(f: concurrent.futures.Future[_T]) -> None:
            if f.cancelled():
                return  # shutting down
            err = f.exception()
            if err is not None:
                self.metrics.inc("model_errors_total", help="model updates that raised in the worker thread")
                log.error("%s failed: %r", what, err, exc_info=err)
                with self.chain.lock:
                    self.chain.dirty = True
                return
            then(f.result())

        def back(f: concurrent.futures.Future[_T]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: the process is stopping
                loop.call_soon_threadsafe(done, f)

        fut.add_done_callback(back)

    def _drain(self) -> None:
        """Block until the worker has done everything handed to it (before the store is cut)."""
        if self._executor is not None:
            with contextlib.suppress(concurrent.futures.CancelledError, RuntimeError):
                self._executor.submit(lambda: None).result()

    async def _estimate(self, e: Estimate) -> None:
        values = await self._off_loop(functools.partial(self._compute_estimate, e.head, e.streams))
        if values is not None and self.core is not None:
            self.metrics.inc("estimates_total", help="local estimates computed (committee duty)")
            self.mark("first_contribution")
            self.handle(self.core.on_estimate(self.now(), e.round, e.head, values))

    def _compute_estimate(self, head: bytes, streams: tuple[int, ...]) -> list[float] | None:
        """Worker thread: one local estimate at ``head``, with the function the simulator calls
        (None when the model is not there: it waits for a checkpoint)."""
        params = self.chain.params(head)
        if params is None:
            return None
        return local_estimate(self.task, self.genesis, bind_(self._work_model, params), self.shard, self.rng,
                              streams, self.device)

    def _installed(self, e: InstallCheckpoint, ok: bool) -> None:
        if ok:
            self.mark("checkpoint")
            self.metrics.inc("checkpoints_downloaded_total")
            log.info("downloaded the checkpoint of round %d (%d bytes)", e.round, len(e.blob))

    def _move_model(self, e: Apply, follow: bool, halting: bool) -> dict[str, float] | Exception | None:
        """Worker thread: the model at the new head, its checkpoint when due, and the evaluation
        when due (its metrics, or the exception it raised); None when nothing was evaluated."""
        moved = self.chain.advance_model(e) if follow else None
        if moved is None:
            return None
        st, params = moved
        self.chain.maybe_checkpoint(params, force=halting, at=st)
        r = st.round
        if not ((self.cfg.eval_every and r % self.cfg.eval_every == 0) or halting):
            return None
        try:
            return {k: float(v) for k, v in self.task.evaluate(bind_(self._eval_model, params)).items()}
        except Exception as err:  # noqa: BLE001 - a task's bug or a diverged model never stops the node
            return err

    def _model_moved(self, e: Apply, now: float, ev: dict[str, float] | Exception | None) -> None:
        r = e.head.round
        evaluated = isinstance(ev, dict)
        if isinstance(ev, dict):
            self.evaluation = ev
        elif isinstance(ev, Exception):
            self.metrics.inc("evaluation_errors_total", help="evaluations that raised (the round still counts)")
            self.log_once("evaluation", type(ev).__name__, "evaluation at round %d failed: %s: %s", r,
                          type(ev).__name__, ev)
        if self.transport is not None and e.steps:  # not for the model catching up to its head
            row = dashboard.round_row(self, r, now, len(e.head.members), evaluated)
            self.history.add(row)
            if self._rounds_log is not None:
                # the byte breakdown goes to the file only (the history stays small)
                kinds = bytekinds.sent_by_kind(self.transport.stats)
                self._rounds_log.write(json.dumps({**row, "head": e.head.head.hex()[:16], "sent_by_kind": kinds}) + "\n")

    def _yield_or_stop(self) -> bool:
        """Asked by the search every 65,536 hashes (about 70 ms): hand the GIL to the event loop
        for a moment (a pure-Python search would otherwise hold it for whole switch intervals
        at every turn of the loop), and say whether the node is stopping."""
        time.sleep(0.002)
        return self._stop.is_set()

    async def _solve_work(self, e: SolveWork) -> None:
        if self._solving:
            return  # one search at a time: the core asks again after rejoin_after
        self._solving = True
        t0 = time.monotonic()
        try:
            nonce = await self._off_loop(functools.partial(solve_work, self.run_id, self.identity.public, e.round,
                                                           e.bits, stop=self._yield_or_stop))
        except WorkAbandoned:
            return
        finally:
            self._solving = False
        took = time.monotonic() - t0
        self.metrics.inc("join_work_seconds_total", took, help="seconds spent on join work")
        if took > 5:
            log.info("join work of %d bits took %.1f s", e.bits, took)
        if self.core is not None:
            self.handle(self.core.on_join_work(self.now(), e.round, nonce))
