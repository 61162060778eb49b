"""The daemon's work that must not run on its event loop: local estimates (torch) and join work
(up to 2**40 hashes once a Join flood has raised the difficulty).

Both run in the daemon's one worker thread, or inline in virtual-time tests, and hand their
result back to the core (``on_estimate``, ``on_join_work``). A mixin of
:class:`~seedswarm.node.daemon.daemon.Daemon`: the attributes below are the daemon's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from typing import Any

import numpy as np
import torch

from seedswarm.crypto.keys import Identity
from seedswarm.node.core.admission import WorkAbandoned, solve_work
from seedswarm.node.core.effects import Effect, Estimate, SolveWork
from seedswarm.node.core.genesis import Genesis
from seedswarm.node.core.protocol import NodeCore
from seedswarm.node.daemon.localchain import LocalChain
from seedswarm.node.daemon.metrics import Metrics
from seedswarm.node.learn.estimators import local_estimate
from seedswarm.node.learn.replay import bind_
from seedswarm.node.learn.tasks import Task

log = logging.getLogger("seedswarm.daemon")


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
    _executor: concurrent.futures.ThreadPoolExecutor | None
    _stop: asyncio.Event
    _solving: bool = False

    def mark(self, phase: str) -> None:
        """Defined by the daemon: when a start-up phase first completed."""
        raise NotImplementedError

    def handle(self, effects: list[Effect]) -> None:
        raise NotImplementedError  # the daemon's

    def now(self) -> float:
        raise NotImplementedError  # the daemon's

    async def _off_loop(self, fn: functools.partial[Any]) -> Any:
        if self._executor is None:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def _estimate(self, e: Estimate) -> None:
        params = self.chain.params(e.head)
        if params is None:
            return
        values = await self._off_loop(functools.partial(self._compute_estimate, params, e.streams))
        if self.core is not None:
            self.metrics.inc("estimates_total", help="local estimates computed (committee duty)")
            self.mark("first_contribution")
            self.handle(self.core.on_estimate(self.now(), e.round, e.head, values))

    def _compute_estimate(self, params: list[torch.Tensor], streams: tuple[int, ...]) -> list[float]:
        """Worker thread: one local estimate, with the function the simulator calls."""
        return local_estimate(self.task, self.genesis, bind_(self._work_model, params), self.shard, self.rng,
                              streams, self.device)

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
