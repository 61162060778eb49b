"""The networked node: an asyncio driver of the sans-IO :class:`NodeCore` over a transport.

The core decides everything (rounds, fork choice, sync, joining, checkpoints to fetch, bans);
this driver moves bytes, runs timers, runs the learning code and persists:

* ``Publish``  -> gossip on the run's topic (records, joins, leaves, fraud proofs only);
* ``Send``     -> a request on a direct stream; the answer is fed back to the core;
* ``Reply``    -> the answer written on the inbound stream that asked;
* ``Estimate`` / ``SolveWork`` -> a worker thread (``offloop``: torch and join work never run on
  the loop or on the transport's thread);
* ``Apply`` / ``InstallCheckpoint`` / ``Resync`` -> :class:`LocalChain`: records are stored on
  the loop; the model (replay, checkpoints written and installed, evaluation) follows in the
  same worker thread, in effect order (``offloop._model_job``), so a large model never stalls
  networking; a resync waits for the worker before it cuts the store;
* ``Rejected`` / ``Ban`` / ``Notice`` -> metrics, one log line per (reason, peer), disconnects.

Every task belongs to one ``asyncio.TaskGroup`` opened in :meth:`run`; on SIGINT/SIGTERM the node
gossips a signed Leave, cancels them all and closes the transport within ``shutdown_timeout_s``
(a watchdog thread ends the process if anything hangs), exit 0. Time is the event loop's clock,
so the same driver runs in virtual time on ``gossip.memory`` in tests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import torch

from seedswarm.crypto.hashing import h
from seedswarm.crypto.keys import Identity, KeyFileError, peer_id_of
from seedswarm.gossip.transport import (
    Transport,
    TransportError,
)
from seedswarm.gossip.wire import (
    REQUESTS,
    TOPIC,
    Join,
    WireError,
)
from seedswarm.node.core.effects import (
    Apply,
    Ban,
    Effect,
    Estimate,
    InstallCheckpoint,
    Notice,
    Publish,
    Reason,
    Rejected,
    Reply,
    Resync,
    Send,
    SolveWork,
)
from seedswarm.node.core.genesis import Genesis
from seedswarm.node.core.protocol import CoreConfig, NodeCore
from seedswarm.node.daemon import dashboard, lifecycle
from seedswarm.node.daemon import status as status_mod
from seedswarm.node.daemon.config import ConfigError, NodeConfig
from seedswarm.node.daemon.discovery import Discovery
from seedswarm.node.daemon.localchain import LocalChain
from seedswarm.node.daemon.metrics import Metrics, MetricsServer
from seedswarm.node.daemon.offloop import OffLoopWork
from seedswarm.node.daemon.peering import Peering, key_of
from seedswarm.node.daemon.store import ChainStore, CheckpointDir, StoreError
from seedswarm.node.daemon.traffic import Traffic, gossip_validator
from seedswarm.node.files import DataDirInUse, DataDirLock
from seedswarm.node.learn.momentum import direction_momentum, with_buffers
from seedswarm.node.learn.replay import bind_, direction_scale, initial_digest, model_digest
from seedswarm.node.learn.tasks import load_task

log = logging.getLogger("seedswarm.daemon")

TransportFactory = Callable[[Identity, NodeConfig, bytes], Transport]  # (identity, settings, run id)


class Daemon(OffLoopWork):
    """One node: ``prepare()`` (local state; ConfigError on bad settings), then ``await run()``."""

    def __init__(self, cfg: NodeConfig, genesis: Genesis, started_at: float | None = None,
                 transport: TransportFactory | None = None, inline_estimates: bool = False) -> None:
        self.cfg = cfg
        self.genesis = genesis
        self.run_id = genesis.run_id
        self.started_wall = started_at if started_at is not None else time.time()
        self._make_transport = transport
        self._inline = inline_estimates  # virtual-time tests: estimates on the loop, deterministic
        self.metrics = Metrics()
        self.core: NodeCore | None = None
        self.transport: Transport | None = None
        self.peering: Peering | None = None
        self.state = "new"
        self.loop_lag_max_s = 0.0  # lifecycle.watch_loop_lag
        self.evaluation: dict[str, float] = {}  # the last evaluate() (an lm task's metric is its loss)
        self.announce: list[str] = []
        self.first_apply_wall: float | None = None
        self.member_since_wall: float | None = None
        self.synced_wall: float | None = None
        # Wall time at which each start-up phase first completed (``seedswarm bench join`` reads
        # them from status.json to break a join down; the CLI adds its import phases).
        self.phases: dict[str, float] = {}
        self._stop = asyncio.Event()
        self._rearm = asyncio.Event()
        self._timer_at = math.inf
        self._logged: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._tg: asyncio.TaskGroup | None = None
        self._digest: tuple[bytes, str] = (b"", "")
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._metrics_server: MetricsServer | None = None
        self._rounds_log: Any = None
        self.history = dashboard.History()  # the live dashboard's per-round rows (bounded)
        self.traffic = Traffic(self)
        self.discovery = Discovery(self)  # the saved address book and mDNS
        self._watchdog: threading.Timer | None = None

    @property
    def accuracy(self) -> float | None:
        return self.evaluation.get("accuracy")

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def mark(self, phase: str) -> None:
        """Record when ``phase`` first completed (later calls keep the first time)."""
        self.phases.setdefault(phase, time.time())

    # ------------------------------------------------------------------ local state
    def prepare(self) -> None:
        """Lock and open the data dir, identity, store, task and model; replay the local chain.

        Raises ConfigError with one clear line for anything the operator must fix.
        """
        cfg, g = self.cfg, self.genesis
        data = cfg.data_path
        try:
            data.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(data, 0o700)
        except OSError as e:
            raise ConfigError(f"cannot create data dir {data}: {e.strerror}") from None
        # One node per data dir, before the identity and the store are touched; held until
        # _close (the kernel drops it when the process dies, SIGKILL included).
        self.data_lock = DataDirLock(data)
        try:
            self.data_lock.acquire()
        except DataDirInUse as e:
            raise ConfigError(str(e)) from None
        except OSError as e:
            raise ConfigError(f"cannot lock data dir {data}: {e.strerror}") from None
        try:
            self.identity = Identity.load_or_create(data / "identity.key")
            store = ChainStore(data / "chain.log", self.run_id)
        except (KeyFileError, StoreError) as e:
            raise ConfigError(str(e)) from None
        self.mark("identity")
        run_file = data / "run_id"
        if not run_file.exists():
            run_file.write_text(self.run_id.hex() + "\n")
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available")
        use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if use_cuda else "cpu")
        try:
            self.task = load_task(g.task, dict(g.task_options), seed=g.seed)
        except ValueError as e:
            raise ConfigError(f"genesis task: {e}") from None
        initial = self.task.build_model()
        # the parameters, copied, and the momentum buffers if any (created once, not copied again)
        genesis_params = with_buffers([p.detach().clone() for p in initial.parameters()], direction_momentum(initial))
        scale = direction_scale(initial)
        if g.model_digest and initial_digest(initial) != g.model_digest:
            raise ConfigError("this build's initial model does not match the genesis model digest "
                              "(different seedswarm/torch version or task options)")
        self._work_model = initial.to(self.device)  # no second build: bound to the genesis below
        self._eval_model = self.task.build_model().to(self.device)
        count = cfg.shard_count
        index = cfg.shard_index if cfg.shard_index >= 0 else \
            int.from_bytes(h(b"seedswarm/shard", self.identity.public)[:4], "big") % count
        self.shard = self.task.shard(index, count)
        self.rng = np.random.default_rng([int.from_bytes(self.identity.public[:8], "big"), int(time.time_ns() & 0xFFFFFFFF)])
        ckdir = CheckpointDir(data / "checkpoints", self.run_id, cfg.checkpoint_chunk_bytes, cfg.checkpoints_kept)
        self.chain = LocalChain(g, store, ckdir, [p.to(self.device) for p in genesis_params], cfg.checkpoint_every,
                                state_budget_bytes=cfg.state_cache_mb << 20, scale=scale,
                                momentum=direction_momentum(initial))
        # Until their first use, the two working models point at the genesis parameters (only
        # ever read: estimators and evaluation never write a parameter) instead of each holding
        # a full copy of its own (400 MB apiece at 100M float32 parameters).
        bind_(self._work_model, self.chain.genesis_params)
        bind_(self._eval_model, self.chain.genesis_params)
        self.peer_id = peer_id_of(self.identity.public)
        self.mark("model")
        log.info("node %s: run %s, local chain at round %d (model from round %d), data dir %s",
                 self.peer_id, self.run_id.hex()[:16], self.chain.head.round, self.chain.base_round, data)

    def _new_core(self) -> NodeCore:
        cfg = self.cfg
        finds = bool(self.discovery.loaded) or cfg.mdns  # may find peers as a bootstrap list would
        wait = cfg.sync_wait_s if (cfg.bootstrap or cfg.min_peers > 0 or finds) else 0.0
        return NodeCore(self.genesis, self.identity, CoreConfig(
            halt_at=cfg.halt_at, auto_join=True, checkpoint_gap=cfg.checkpoint_every,
            model_round=self.chain.base_round, startup_wait=wait,
        ), base=self.chain.head, history=self.chain)

    # ------------------------------------------------------------------ status
    def digest_hex(self) -> str:
        head = self.core.head.head if self.core is not None else self.chain.head.head
        if self._digest[0] != head:
            params = self.chain.states.peek(head) if not self.chain.dirty else None
            if params is None:
                return ""  # the model waits for a checkpoint or the next live round: ask again later
            self._digest = (head, model_digest(params).hex())
        return self._digest[1]

    def status(self) -> dict[str, Any]:
        return status_mod.status(self)

    def log_once(self, reason: str, peer: str, msg: str, *args: Any, level: int = logging.WARNING) -> None:
        if (reason, peer) in self._logged or len(self._logged) > 10000:
            return
        self._logged.add((reason, peer))
        log.log(level, msg, *args)

    def rejected_total(self) -> int:
        return int(self.metrics.total("rejected_total"))

    # ------------------------------------------------------------------ run
    def request_stop(self) -> None:
        """Signal handler: start a graceful stop (Leave, flush, exit 0)."""
        if not self._stop.is_set():
            log.info("stop requested: leaving the swarm")
            self._stop.set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A task owned by the node's task group; its failure is logged, never fatal."""
        assert self._tg is not None

        async def guarded() -> Any:
            try:
                return await coro
            except (TransportError, WireError) as e:
                log.debug("%s: %s", name, e)
            except Exception as e:
                log.error("task %s failed: %r", name, e, exc_info=e)
            return None

        try:
            task = self._tg.create_task(guarded(), name=name)
        except RuntimeError:  # the group is shutting down: nothing new starts
            coro.close()
            done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done  # type: ignore[return-value]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def run(self) -> int:
        """Start the transport and serve until request_stop(); returns the exit code."""
        code = 0
        if not self._inline:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="seedswarm-estimate")
        try:
            await self._start_transport()
            if self.cfg.metrics_port:
                self._metrics_server = MetricsServer(self.cfg.metrics_host, self.cfg.metrics_port,
                                                     self._render_metrics, self.status, dashboard.routes(self))
                try:
                    await self._metrics_server.start()
                except OSError as e:
                    raise ConfigError(f"cannot serve metrics on {self.cfg.metrics_host}:{self.cfg.metrics_port}: "
                                      f"{e.strerror}") from None
            self._rounds_log = open(self.cfg.data_path / "rounds.jsonl", "a", buffering=1)  # noqa: SIM115 - closed in _close
            try:
                async with asyncio.TaskGroup() as tg:
                    self._tg = tg
                    self.core = self._new_core()
                    self.state = "running"
                    main = [tg.create_task(self.traffic.pump(), name="pump"),
                            tg.create_task(self._timer_loop(), name="timers"),
                            tg.create_task(self._periodic(), name="periodic"),
                            tg.create_task(lifecycle.watch_loop_lag(self), name="loop-lag")]
                    self.handle(self.core.start(self.now()))
                    self._dial_bootstrap()
                    self.discovery.start()
                    status_mod.write_status_file(self)
                    await self._stop.wait()
                    await self._shutdown(main)
            except* Exception as eg:
                for err in eg.exceptions:
                    log.error("node task crashed: %r", err, exc_info=err)
                code = 1
        finally:
            await self._close()
        return code

    async def _start_transport(self) -> None:
        if self._make_transport is None:
            from seedswarm.node.daemon.netstack import libp2p_transport

            self._make_transport = libp2p_transport
        t = self._make_transport(self.identity, self.cfg, self.run_id)
        self.mark("libp2p_import")  # the transport is built: libp2p is imported
        for name in REQUESTS:
            t.set_request_handler(name, self.traffic.server(name))
        try:
            await t.start()
        except TransportError as e:
            raise ConfigError(str(e)) from None
        self.transport = t
        await t.subscribe(TOPIC, gossip_validator(self.run_id))
        from seedswarm.node.daemon.netstack import announce_addrs

        self.announce = announce_addrs(t.listen_addrs, self.cfg.announce, self.peer_id, self.cfg.named_relays)
        self.peering = Peering(self.run_id, self.peer_id, t, self.cfg.max_peers, self.spawn,
                               lambda: self.core.round if self.core is not None else self.chain.head.round,
                               lambda: self.announce, self.traffic.on_peer, self.reject_peer_id,
                               lambda k: self.metrics.inc(f"{k}_total"))
        self.discovery.load()
        self.mark("listening")
        log.info("listening on %s", " ".join(self.announce))

    def _dial_bootstrap(self) -> None:
        # The libp2p transport keeps its bootstrap peers dialled itself; others need us to.
        t = self.transport
        if self.peering is not None and t is not None and self.cfg.bootstrap and not getattr(t, "dials_bootstrap", False):
            self.peering.dial_bootstrap(self.cfg.bootstrap)

    async def _shutdown(self, main: list[asyncio.Task[Any]]) -> None:
        self.state = "stopping"
        # Bounds the whole stop, _close included: a hung transport cannot keep the process alive.
        self._watchdog = threading.Timer(self.cfg.shutdown_timeout_s, lifecycle.watchdog_exit, args=(self.cfg.shutdown_timeout_s,))
        self._watchdog.daemon = True
        self._watchdog.start()
        t, core = self.transport, self.core
        if core is not None and t is not None and t.running:
            for e in core.leave(self.now()):
                if isinstance(e, Publish):
                    with contextlib.suppress(TransportError, TimeoutError):
                        await asyncio.wait_for(t.publish(TOPIC, e.msg.encode()), 1.0)
                        log.info("gossiped Leave at round %d", core.round)
                        await asyncio.sleep(0.3)  # let the transport write it out
        for task in [*main, *self._tasks]:
            task.cancel()

    async def _close(self) -> None:
        t0 = time.monotonic()
        if self._metrics_server is not None:
            await self._metrics_server.stop()
        self.discovery.close()
        if self.transport is not None:
            await self.transport.stop()
        log.debug("transport stopped in %.2f s", time.monotonic() - t0)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self.state = "stopped"
        if hasattr(self, "chain"):
            status_mod.write_status_file(self)
            self.chain.close()
        if self._rounds_log is not None:
            self._rounds_log.close()
        if hasattr(self, "data_lock"):
            self.data_lock.release()
        if self._watchdog is not None:
            self._watchdog.cancel()

    def _render_metrics(self) -> str:
        status_mod.update_metrics(self)
        return self.metrics.render()

    async def _periodic(self) -> None:
        await lifecycle.periodic(self)

    # ------------------------------------------------------------------ timers and effects
    def _arm(self) -> None:
        if self.core is None:
            return
        t = self.core.next_wakeup(self.now())
        if t < self._timer_at:
            self._timer_at = t
            self._rearm.set()

    async def _timer_loop(self) -> None:
        assert self.core is not None
        self._timer_at = self.core.next_wakeup(self.now())
        while True:
            delay = self._timer_at - self.now()
            if delay > 0:
                self._rearm.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._rearm.wait(), min(delay, 1.0))
                continue
            self._timer_at = math.inf
            core = self.core
            self.handle(core.on_timer(self.now()))
            self._timer_at = min(self._timer_at, self.core.next_wakeup(self.now()))

    def handle(self, effects: list[Effect]) -> None:
        for e in effects:
            if isinstance(e, Apply):
                self._apply(e)
            elif isinstance(e, Publish):
                if isinstance(e.msg, Join):
                    self.mark("join_sent")
                self.spawn(self.traffic.publish(e.msg), "publish")
            elif isinstance(e, Send):
                self.spawn(self.traffic.send(e.to, e.msg), f"send-{type(e.msg).__name__}")
            elif isinstance(e, Estimate):
                self.spawn(self._estimate(e), "estimate")
            elif isinstance(e, SolveWork):
                self.spawn(self._solve_work(e), "join-work")
            elif isinstance(e, Rejected):
                self.count_reject(e.reason, peer_id_of(e.peer) if e.peer else None, e.detail)
            elif isinstance(e, Ban):
                self._ban(e)
            elif isinstance(e, InstallCheckpoint):
                self._model_job(functools.partial(self.chain.install, e, self.cfg.checkpoint_chunk_bytes),
                                functools.partial(self._installed, e), "installing a checkpoint")
            elif isinstance(e, Resync):
                self._resync(e)
                return
            elif isinstance(e, Notice):
                self.metrics.inc("notices_total", 1, "what", e.what)
                self.log_once(f"notice-{e.what}", e.detail[:40], "%s: %s", e.what, e.detail)
            elif isinstance(e, Reply):
                pass  # answered by the request handler that asked (see _server)
        self._arm()

    def count_reject(self, reason: Reason, peer: str | None, detail: str = "") -> None:
        self.metrics.inc("rejected_total", 1, "reason", str(reason), help="inputs rejected, by reason")
        who = peer or "gossip"
        self.log_once(str(reason), who, "rejected input from %s: %s %s", who, reason, detail)

    def reject_peer_id(self, peer: str, reason: Reason, detail: str = "") -> None:
        """A refusal at the driver's level (undecodable bytes): counted and struck in the core."""
        if self.core is None:
            self.count_reject(reason, peer, detail)
            return
        self.handle(self.core.reject(self.now(), key_of(peer), reason, detail))

    def _ban(self, e: Ban) -> None:
        pid = peer_id_of(e.peer)
        log.warning("banning peer %s for %.0f s (ban %d)", pid, e.until - self.now(), e.strikes)
        self.metrics.inc("bans_total")
        if self.peering is not None:
            self.spawn(self.peering.disconnect(pid), "ban")

    def _apply(self, e: Apply) -> None:
        """The records are stored here, on the loop; the model follows in the worker thread
        (``_move_model``: replay, checkpoint, evaluation), so a large model never stalls the
        node's networking; the round's row is written when the worker is done."""
        follow = self.chain.record_steps(e)
        now = time.time()
        lifecycle.note_apply(self, e, now)
        r = e.head.round
        self.metrics.inc("rounds_applied_total", len(e.steps), help="records applied")
        if e.base.round < r - len(e.steps):
            self.metrics.inc("fork_switches_total", help="head switches that undid stored rounds")
        halting = bool(self.cfg.halt_at and r == self.cfg.halt_at)
        self._model_job(functools.partial(self._move_model, e, follow, halting),
                        functools.partial(self._model_moved, e, now), f"applying round {r}")

    def _resync(self, e: Resync) -> None:
        """Enough peers agree on a chain that left ours deeper than max_undo: keep ours aside,
        restart the core from the fork point and catch up (from a checkpoint when far behind)."""
        log.warning("our chain left the swarm's %d rounds back (at round %d; %d peers agree): archiving our "
                    "records after it and resyncing", self.chain.head.round - e.fork_round, e.fork_round, len(e.voters))
        self.metrics.inc("resyncs_total", help="deep forks resolved by resyncing from the peers' chain")
        self._drain()  # the worker finishes what it was given before the store is cut
        self.chain.archive_after(e.fork_round)
        self.core = self._new_core()
        now = self.now()
        effects = self.core.start(now)
        for v in e.voters:
            effects += self.core.on_peer(now, v, self.chain.head.round + 1)
        self._timer_at = math.inf
        self.handle(effects)
