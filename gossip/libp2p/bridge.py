"""A trio thread behind a small, typed, bounded asyncio bridge, and its lifecycle.

py-libp2p is trio-native and the daemon is asyncio, so the host runs inside ``trio.run`` on a
dedicated thread:

* asyncio -> trio: ``call(op)`` starts the coroutine ``op`` in the host's nursery with
  ``TrioToken.run_sync_soon``; its outcome comes back to an ``asyncio.Future`` through
  ``loop.call_soon_threadsafe``. An ``asyncio.Semaphore`` bounds the operations in flight
  (``HostConfig.queue_size``), so a stalled host pushes back on its callers instead of
  queueing without limit.
* trio -> asyncio: ``emit(event)`` puts into a bounded, thread-safe ``queue.Queue``; the trio
  side never blocks on it (a full queue drops, the caller counts), and wakes the loop with one
  coalesced ``call_soon_threadsafe``.

Lifecycle: new -> starting -> running -> stopping -> stopped. ``stop()`` works from any state,
is idempotent, and is bounded: it asks trio to stop, cancels the root scope if that takes over
``stop_timeout_s``, and abandons the (daemon) thread if even that hangs. One bridge hop costs
about 50 µs (measured): nothing next to a round.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

import trio

from seedswarm.gossip.libp2p.api import HostClosedError, HostError
from seedswarm.gossip.libp2p.common import flatten, is_cancellation, reason

log = logging.getLogger(__name__)

T = TypeVar("T")
E = TypeVar("E")


class TrioBridge(Generic[E]):
    """Owns the trio thread of one host, the calls into it and the events out of it.

    All ``async`` methods and ``start``/``stop`` run on the asyncio loop that called
    ``start()``; ``post``, ``to_trio`` and ``emit`` may be called from either thread.
    """

    def __init__(self, name: str, queue_size: int, on_finished: Callable[[], None] | None = None) -> None:
        self.name = name
        self.state = "new"  # new -> starting -> running -> stopping -> stopped
        self._on_finished_hook = on_finished
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started_fut: asyncio.Future[list[str]] | None = None
        self._finished_fut: asyncio.Future[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._stop_requested = threading.Event()
        self._slots = asyncio.Semaphore(queue_size)
        self._pending: set[asyncio.Future[Any]] = set()
        # trio -> asyncio events
        self._events: queue.Queue[E] = queue.Queue(maxsize=queue_size)
        self._event_ready = asyncio.Event()
        self._wake_scheduled = False
        # trio side (only touched on the trio thread once it runs)
        self._token: trio.lowlevel.TrioToken | None = None
        self._root_scope: trio.CancelScope | None = None
        self._stop_event: trio.Event | None = None
        self.nursery: trio.Nursery | None = None

    # -- lifecycle (asyncio side) -------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.state == "running" and self._thread is not None and self._thread.is_alive()

    async def start(self, main: Callable[[], Awaitable[None]], timeout: float) -> list[str]:
        """Run ``main()`` in ``trio.run`` on a new thread; return what it hands to ``serve()``.

        ``main`` builds whatever it needs, then calls ``serve(nursery, result)``, which returns
        when stop is requested. An exception before that fails ``start()`` (HostError as is,
        anything else wrapped); a timeout stops the thread and raises HostError.
        """
        if self.state != "new":
            raise HostError(f"start() called on a host that is {self.state}")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._started_fut = loop.create_future()
        self._finished_fut = loop.create_future()
        self.state = "starting"
        self._thread = threading.Thread(target=self._thread_main, args=(main,), name=self.name, daemon=True)
        self._thread.start()
        try:
            result = await asyncio.wait_for(asyncio.shield(self._started_fut), timeout)
        except TimeoutError:
            await self.stop(timeout)
            raise HostError(f"host did not start within {timeout} s") from None
        except BaseException:
            await self.stop(timeout)
            raise
        if self.state == "starting":
            self.state = "running"
        return result

    async def stop(self, timeout: float) -> None:
        """Stop from any state: ask trio to stop, cancel it after ``timeout``, join the thread."""
        if self.state == "new":
            self.state = "stopped"
            return
        if self._stop_task is None:
            self._stop_task = asyncio.get_running_loop().create_task(self._stop_impl(timeout))
        await asyncio.shield(self._stop_task)

    async def _stop_impl(self, timeout: float) -> None:
        if self.state != "stopped":
            self.state = "stopping"
        self._stop_requested.set()
        self.to_trio(self._trio_request_stop)
        finished = await self._wait_finished(timeout)
        if not finished:
            log.warning("%s did not stop in %.1f s; cancelling it", self.name, timeout)
            self.to_trio(self._trio_force_stop)
            finished = await self._wait_finished(2.0)
        if self._thread is not None:
            self._thread.join(timeout=0.5 if finished else 0.05)
            if self._thread.is_alive():
                log.error("%s is still alive after stop(); abandoning it (daemon thread)", self.name)
        self._on_finished()

    async def _wait_finished(self, timeout: float) -> bool:
        fut = self._finished_fut
        if fut is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
            return True
        except TimeoutError:
            return False

    def _on_finished(self) -> None:
        """On the loop, once the trio thread has ended (or been abandoned)."""
        self.state = "stopped"
        if self._started_fut is not None and not self._started_fut.done():
            self._started_fut.set_exception(HostClosedError("host stopped before it started"))
        if self._finished_fut is not None and not self._finished_fut.done():
            self._finished_fut.set_result(None)
        for fut in list(self._pending):
            if not fut.done():
                fut.set_exception(HostClosedError("host stopped"))
        self._pending.clear()
        if self._on_finished_hook is not None:
            self._on_finished_hook()
        self._event_ready.set()

    def _fail_start(self, err: BaseException) -> None:
        if self._started_fut is not None and not self._started_fut.done():
            self._started_fut.set_exception(err)

    def _set_started(self, result: list[str]) -> None:
        if self._started_fut is not None and not self._started_fut.done():
            self._started_fut.set_result(result)

    # -- the trio thread ----------------------------------------------------------------

    def _thread_main(self, main: Callable[[], Awaitable[None]]) -> None:
        try:
            trio.run(self._trio_main, main)
        except BaseException as e:  # noqa: BLE001 - must report whatever killed the thread
            log.error("%s crashed: %s", self.name, reason(e), exc_info=e)
            self.post(self._fail_start, HostError(f"libp2p host crashed: {reason(e)}"))
        finally:
            self.post(self._on_finished)

    async def _trio_main(self, main: Callable[[], Awaitable[None]]) -> None:
        self._stop_event = trio.Event()
        with trio.CancelScope() as root:
            self._root_scope = root
            self._token = trio.lowlevel.current_trio_token()
            if self._stop_requested.is_set():
                return
            try:
                await main()
            except HostError as e:
                self.post(self._fail_start, e)
            except Exception as e:
                # After start this is a crash of a running host: say so loudly.
                level = logging.ERROR if self.state == "running" else logging.DEBUG
                log.log(level, "%s failed: %s", self.name, reason(e), exc_info=e)
                self.post(self._fail_start, HostError(f"libp2p host failed: {reason(e)}"))

    async def serve(self, nursery: trio.Nursery, result: list[str]) -> None:
        """trio side, called by ``main``: calls run in ``nursery`` from now on; ``start()``
        returns ``result``. Returns (the nursery cancelled) once stop is requested."""
        self.nursery = nursery
        self.post(self._set_started, result)
        assert self._stop_event is not None
        try:
            await self._stop_event.wait()
        finally:
            self.nursery = None
        nursery.cancel_scope.cancel()

    def _trio_request_stop(self) -> None:
        if self._stop_event is not None:
            self._stop_event.set()
        if self.nursery is None and self._root_scope is not None:
            self._root_scope.cancel()  # still starting: abandon the start

    def _trio_force_stop(self) -> None:
        if self._root_scope is not None:
            self._root_scope.cancel()

    # -- primitives ---------------------------------------------------------------------

    def post(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Run fn(*args) on the asyncio loop (from any thread). False if the loop is gone."""
        loop = self._loop
        if loop is None:
            return False
        try:
            loop.call_soon_threadsafe(fn, *args)
            return True
        except RuntimeError:  # loop closed
            return False

    def to_trio(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Run fn(*args) on the trio thread (from any thread). False if trio is not running."""
        token = self._token
        if token is None:
            return False
        try:
            token.run_sync_soon(fn, *args)
            return True
        except trio.RunFinishedError:
            return False

    async def call(self, op: Callable[[], Coroutine[Any, Any, T]], what: str) -> T:
        """Run op() in the host's nursery on the trio thread; await its result from asyncio.

        Errors arrive as HostError (HostClosedError once the host stops). Cancelling the
        awaiting asyncio task cancels ``op`` on the trio side.
        """
        if self.state != "running":
            raise HostClosedError(f"cannot {what}: host is {self.state}")
        loop = asyncio.get_running_loop()
        async with self._slots:  # bounds the operations in flight across the bridge
            fut: asyncio.Future[T] = loop.create_future()
            scope_box: list[trio.CancelScope] = []
            abandoned = [False]  # set by asyncio when the caller is cancelled
            self._pending.add(fut)

            def settle(result: Any, error: BaseException | None) -> None:
                if fut.done():
                    return
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(result)

            async def runner() -> None:
                result: Any = None
                error: BaseException | None = None
                try:
                    with trio.CancelScope() as cs:
                        scope_box.append(cs)
                        if abandoned[0]:
                            cs.cancel()
                        result = await op()
                    if cs.cancelled_caught:
                        error = HostError(f"{what}: cancelled")
                except HostError as e:
                    error = e
                except BaseException as e:
                    if is_cancellation(e):  # the host is stopping: let trio unwind
                        self.post(settle, None, HostClosedError(f"{what}: host stopping"))
                        raise
                    leaf = flatten(e)
                    error = leaf if isinstance(leaf, HostError) else HostError(f"{what} failed: {reason(e)}")
                    if error is not leaf:
                        error.__cause__ = leaf
                self.post(settle, result, error)

            def spawn() -> None:
                nursery = self.nursery
                if nursery is None:
                    self.post(settle, None, HostClosedError(f"cannot {what}: host stopping"))
                    return
                nursery.start_soon(runner)

            if not self.to_trio(spawn):
                self._pending.discard(fut)
                raise HostClosedError(f"cannot {what}: host is not running")
            try:
                return await fut
            except asyncio.CancelledError:
                # Either the runner sees the flag when it starts, or its scope already
                # exists when this callback runs on the trio thread.
                abandoned[0] = True
                self.to_trio(lambda: scope_box[0].cancel() if scope_box else None)
                raise
            finally:
                self._pending.discard(fut)

    def emit(self, ev: E) -> bool:
        """trio thread: hand an event to asyncio without ever blocking. False: queue full."""
        try:
            self._events.put_nowait(ev)
        except queue.Full:
            return False
        if not self._wake_scheduled:
            self._wake_scheduled = True
            self.post(self._wake)
        return True

    def _wake(self) -> None:
        self._wake_scheduled = False
        self._event_ready.set()

    def pending_events(self) -> int:
        """How many events wait in the queue (approximate while the trio side runs)."""
        return self._events.qsize()

    async def next_event(self) -> E:
        """The next event. Raises HostClosedError once the host has stopped (or never ran)."""
        while True:
            try:
                return self._events.get_nowait()
            except queue.Empty:
                pass
            if self.state in ("stopped", "new"):
                raise HostClosedError(f"host is {self.state}")
            self._event_ready.clear()
            try:
                return self._events.get_nowait()
            except queue.Empty:
                pass
            await self._event_ready.wait()
