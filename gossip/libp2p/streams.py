"""Direct request/response streams: framing, serving, requesting, and refused protocol ids.

Protocol id ``f"{protocol_prefix}/{name}"``, negotiated by multistream-select, one request per
stream::

    requester -> responder : [u32 big-endian length n][n bytes request]          then FIN
    responder -> requester : [u32 big-endian length m][1 byte status][m-1 bytes]  then FIN

Both sides read eagerly, the whole frame at once, so no Yamux stream stalls (Yamux fails a
writer whose window stays shut for 5 s). Every frame read is bounded by ``io_timeout_s``, a
handler by ``handler_timeout_s``, a request by its ``timeout``. Handlers run on the asyncio
loop, never on the trio thread: CPU work there starves gossip.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any, Final, cast

import trio
from libp2p.abc import IMultiselectCommunicator, INetStream
from libp2p.custom_types import TProtocol
from libp2p.host.exceptions import StreamFailure
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.id import ID
from libp2p.protocol_muxer.multiselect import Multiselect

from seedswarm.gossip.libp2p.api import (
    Counters,
    FrameTooLargeError,
    HostConfig,
    HostError,
    ProtocolMismatchError,
    RemoteError,
    RequestHandler,
    RequestTimeoutError,
)
from seedswarm.gossip.libp2p.bridge import TrioBridge
from seedswarm.gossip.libp2p.common import LogOnce, check_name, reason

log = logging.getLogger(__name__)

#: Direct-stream frame header: 4-byte big-endian payload length.
FRAME_HEADER_BYTES: Final = 4
#: First byte of every response frame (the rest is the handler's payload).
STATUS_OK: Final = 0
STATUS_NO_RESPONSE: Final = 1  # the handler returned None
STATUS_TOO_LARGE: Final = 2  # the request frame was over the responder's limit (not read)
STATUS_ERROR: Final = 3  # the handler raised, timed out, or returned something invalid
STATUS_BUSY: Final = 4  # too many inbound requests in flight on the responder


async def read_exact(stream: INetStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(n - len(buf))
        if not chunk:
            raise StreamError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def read_header(stream: INetStream) -> int:
    return int.from_bytes(await read_exact(stream, FRAME_HEADER_BYTES), "big")


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(FRAME_HEADER_BYTES, "big") + payload


async def dispose(stream: INetStream, graceful: bool) -> None:
    """Close (FIN) or reset a stream, shielded and bounded: cleanup must never hang."""
    with trio.CancelScope(shield=True), trio.move_on_after(1.0), contextlib.suppress(Exception):
        if graceful:
            await stream.close()
        else:
            await stream.reset()


def classify_refusal(prefix: str, proposed: str) -> str:
    """Why we refuse ``proposed`` (a ``/seedswarm/...`` id we do not serve), given our prefix
    ``/seedswarm/<major>/<run>``: ``no-handler`` (our prefix), ``protocol-version`` (the
    segments before the run differ), else ``wrong-run``."""
    if proposed.startswith(prefix + "/"):
        return "no-handler"
    ours = prefix.strip("/").split("/")
    theirs = proposed.strip("/").split("/")
    if theirs[: len(ours) - 1] != ours[:-1]:
        return "protocol-version"
    return "wrong-run"


_REFUSAL_TEXT: Final = {
    "protocol-version": "another protocol version",
    "wrong-run": "our protocol version, another run",
}


class _ObservingCommunicator(IMultiselectCommunicator):
    """Sees each protocol id a remote proposes on an inbound stream."""

    def __init__(self, inner: IMultiselectCommunicator, observe: Callable[[IMultiselectCommunicator, str], None]) -> None:
        self._inner = inner
        self._observe = observe

    async def write(self, msg_str: str) -> None:
        await self._inner.write(msg_str)

    async def read(self) -> str:
        command = await self._inner.read()
        self._observe(self._inner, command)
        return command


class ObservingMultiselect(Multiselect):
    """libp2p's responder-side negotiation, plus a look at every proposed protocol id.

    BasicHost only logs a failed inbound negotiation at DEBUG, so a peer of another run or
    version would fail silently on our side.
    """

    def __init__(self, inner: Multiselect, observe: Callable[[IMultiselectCommunicator, str], None]) -> None:
        super().__init__(inner.handlers)  # the same dict: handlers added later are seen
        self._observe = observe

    async def negotiate(self, communicator: IMultiselectCommunicator, negotiate_timeout: int = 30) -> Any:
        return await super().negotiate(_ObservingCommunicator(communicator, self._observe), negotiate_timeout)


class Streams:
    """The direct-stream half of one host: its handlers, inbound serving, outbound requests."""

    def __init__(self, config: HostConfig, my_id: ID, counters: Counters, bridge: TrioBridge[Any],
                 log_once: LogOnce) -> None:
        self.config = config
        self._id = my_id
        self._counters = counters
        self._bridge = bridge
        self._log_once = log_once
        self._handlers: dict[str, RequestHandler] = {}
        self._handler_tasks: set[asyncio.Task[Any]] = set()
        self._inbound_inflight = 0
        self.host: Any = None  # the libp2p BasicHost, set on the trio thread when built

    def protocol_id(self, name: str) -> TProtocol:
        check_name("protocol", name)
        return TProtocol(f"{self.config.protocol_prefix}/{name}")

    # -- serving ------------------------------------------------------------------------

    def set_request_handler(self, protocol: str, handler: RequestHandler) -> None:
        """asyncio side; see Libp2pHost.set_request_handler."""
        self.protocol_id(protocol)
        self._handlers[protocol] = handler
        if self._bridge.state in ("starting", "running"):
            self._bridge.to_trio(self.register, protocol)

    def attach(self, host: Any) -> None:
        """trio side, before listening: no window without handlers."""
        self.host = host
        host.multiselect = ObservingMultiselect(host.multiselect, self._observe_proposal)
        for name in list(self._handlers):
            self.register(name)

    def register(self, name: str) -> None:
        if self.host is None:
            return  # registered by attach()
        self.host.set_stream_handler(self.protocol_id(name), functools.partial(self._serve_stream, name))

    def cancel_handler_tasks(self) -> None:
        """asyncio side, once the host stopped: their answers have nowhere to go now."""
        for task in list(self._handler_tasks):
            task.cancel()

    def _observe_proposal(self, communicator: IMultiselectCommunicator, command: str) -> None:
        """trio thread: a remote proposed ``command`` on an inbound stream."""
        if not command.startswith("/seedswarm/"):
            return
        if self.host is not None and command in self.host.multiselect.handlers:
            return
        why = classify_refusal(self.config.protocol_prefix, command)
        self._counters.inc("protocol_mismatches")
        self._counters.add("protocol_mismatches_by_reason", why)
        try:
            peer = str(communicator.read_writer.muxed_conn.peer_id)  # type: ignore[attr-defined]
        except Exception:
            peer = "?"
        if why == "no-handler":
            self._log_once(("no_handler", command), logging.WARNING,
                           "peer %s asked for %s, which this node does not serve (no handler)", peer, command)
        else:
            self._log_once(("mismatch", command), logging.WARNING,
                           "peer %s asked for %s but this node speaks %s: different run or protocol version (%s: %s)",
                           peer, command, self.config.protocol_prefix, why, _REFUSAL_TEXT[why])

    async def _serve_stream(self, name: str, stream: INetStream) -> None:
        """trio thread: one inbound request: read a frame, ask asyncio, write the answer."""
        graceful = False
        try:
            peer = str(stream.muxed_conn.peer_id)
            io = self.config.io_timeout_s
            try:
                with trio.fail_after(io):
                    n = await read_header(stream)
                if n > self.config.max_message_bytes:
                    # Refused before reading it: the body is never buffered.
                    self._counters.inc("frames_too_large")
                    self._log_once(("too_large_in", peer, name), logging.WARNING,
                                   "peer %s sent a %d-byte request on %s (limit %d); refused",
                                   peer, n, name, self.config.max_message_bytes)
                    with trio.move_on_after(io):
                        await stream.write(frame(bytes([STATUS_TOO_LARGE])))
                        await cast(Any, stream).close_write()  # NetStream: half-close (FIN)
                        # Give the requester a moment to read the verdict, then reset:
                        # a reset drops whatever it buffered, the verdict included.
                        await trio.sleep(min(1.0, io))
                    return
                with trio.fail_after(io):
                    body = await read_exact(stream, n)
            except trio.TooSlowError:
                self._counters.inc("requests_failed")
                self._log_once(("read_timeout", peer, name), logging.INFO,
                               "peer %s was too slow sending a request on %s", peer, name)
                return
            except Exception as e:
                self._counters.inc("requests_failed")
                log.debug("reading a request on %s from %s failed: %s", name, peer, reason(e))
                return
            self._counters.add("stream_bytes_received", name, FRAME_HEADER_BYTES + n)
            if self._inbound_inflight >= self.config.queue_size:
                status, payload = STATUS_BUSY, b""
            else:
                self._inbound_inflight += 1
                try:
                    status, payload = await self._run_handler(name, peer, body)
                finally:
                    self._inbound_inflight -= 1
            out = frame(bytes([status]) + payload)
            with trio.fail_after(io):
                await stream.write(out)
            self._counters.add("stream_bytes_sent", name, len(out))
            if status == STATUS_OK:
                self._counters.inc("requests_served")
            graceful = True
        except trio.TooSlowError:
            self._counters.inc("requests_failed")
        except Exception as e:
            self._counters.inc("requests_failed")
            log.debug("serving %s failed: %s", name, reason(e))
        finally:
            await dispose(stream, graceful)

    async def _run_handler(self, name: str, peer: str, body: bytes) -> tuple[int, bytes]:
        """trio thread: run the asyncio handler and wait for its (status, payload)."""
        send, recv = trio.open_memory_channel[tuple[int, bytes]](1)

        def deliver(result: tuple[int, bytes]) -> None:  # trio thread
            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                send.send_nowait(result)

        if not self._bridge.post(self._dispatch_request, name, peer, body, deliver):
            return STATUS_ERROR, b""
        with trio.move_on_after(self.config.handler_timeout_s + 1.0):
            return await recv.receive()
        return STATUS_ERROR, b""

    def _dispatch_request(self, name: str, peer: str, body: bytes,
                          deliver: Callable[[tuple[int, bytes]], None]) -> None:
        """asyncio loop: start the user's handler as a task."""
        task = asyncio.get_running_loop().create_task(self._run_user_handler(name, peer, body))
        self._handler_tasks.add(task)

        def done(t: asyncio.Task[tuple[int, bytes]]) -> None:
            self._handler_tasks.discard(t)
            result = (STATUS_ERROR, b"") if t.cancelled() or t.exception() else t.result()
            self._bridge.to_trio(deliver, result)

        task.add_done_callback(done)

    async def _run_user_handler(self, name: str, peer: str, body: bytes) -> tuple[int, bytes]:
        handler = self._handlers.get(name)
        if handler is None:
            return STATUS_ERROR, b""
        try:
            result = await asyncio.wait_for(handler(peer, body), self.config.handler_timeout_s)
        except TimeoutError:
            self._counters.inc("handler_errors")
            self._log_once(("handler_timeout", name), logging.WARNING,
                           "handler for %s took over %.1f s; the requester got an error",
                           name, self.config.handler_timeout_s)
            return STATUS_ERROR, b""
        except Exception as e:
            self._counters.inc("handler_errors")
            self._log_once(("handler_error", name, type(e).__name__), logging.ERROR,
                           "handler for %s raised %s", name, reason(e))
            log.debug("handler traceback", exc_info=e)
            return STATUS_ERROR, b""
        if result is None:
            return STATUS_NO_RESPONSE, b""
        if not isinstance(result, bytes | bytearray | memoryview):
            self._counters.inc("handler_errors")
            self._log_once(("handler_type", name), logging.ERROR,
                           "handler for %s returned %s, not bytes", name, type(result).__name__)
            return STATUS_ERROR, b""
        if len(result) > self.config.max_message_bytes:
            self._counters.inc("frames_too_large")
            self._log_once(("too_large_out", name), logging.ERROR,
                           "handler for %s returned %d bytes, over max_message_bytes=%d",
                           name, len(result), self.config.max_message_bytes)
            return STATUS_ERROR, b""
        return STATUS_OK, bytes(result)

    # -- requesting ---------------------------------------------------------------------

    async def request(self, peer: ID, protocol: str, data: bytes, timeout: float) -> bytes:
        """asyncio side; see Libp2pHost.request."""
        pid = self.protocol_id(protocol)
        if peer == self._id:
            raise HostError("cannot send a request to ourselves")
        limit = self.config.max_message_bytes
        if len(data) > limit:
            self._counters.inc("frames_too_large")
            raise FrameTooLargeError(f"request of {len(data)} bytes on {pid} is over max_message_bytes={limit}")
        out = frame(bytes(data))

        async def op() -> bytes:
            try:
                with trio.fail_after(timeout):
                    return await self._do_request(peer, protocol, pid, out)
            except trio.TooSlowError:
                self._counters.inc("requests_failed")
                raise RequestTimeoutError(f"request {pid} to peer {peer} timed out after {timeout} s") from None
            except HostError:
                self._counters.inc("requests_failed")
                raise

        return await self._bridge.call(op, f"request {pid} from {peer}")

    async def _do_request(self, peer: ID, name: str, pid: TProtocol, out: bytes) -> bytes:
        host = self.host
        assert host is not None
        try:
            stream = await host.new_stream(peer, [pid])
        except StreamFailure as e:
            raise self._negotiation_error(peer, pid, e) from e
        except trio.TooSlowError:
            raise
        except Exception as e:
            raise HostError(f"cannot reach peer {peer} for {pid}: {reason(e)}") from e
        self._counters.inc("requests_sent")
        body = await self._exchange(stream, peer, name, pid, out)
        status, payload = body[0], body[1:]
        if status == STATUS_OK:
            return payload
        if status == STATUS_TOO_LARGE:
            raise FrameTooLargeError(f"peer {peer} refused the {pid} request: {len(out) - FRAME_HEADER_BYTES} bytes is over its limit")
        if status == STATUS_NO_RESPONSE:
            raise RemoteError(f"peer {peer} has no response to this {pid} request")
        if status == STATUS_BUSY:
            raise RemoteError(f"peer {peer} is busy (too many requests in flight); retry later")
        raise RemoteError(f"peer {peer} failed to handle the {pid} request (status {status})")

    async def _exchange(self, stream: INetStream, peer: ID, name: str, pid: TProtocol, out: bytes) -> bytes:
        """Write the request while reading the response: a responder may refuse (too large)
        before we finished writing, and must not wait on our writer to say so.

        The writer is shielded from cancellation: cancelling a write half-way through a Noise
        frame would corrupt the whole connection. It ends on its own: it completes, or the
        stream is reset (which we do on every failure path), or Yamux gives up on a window
        that stays shut for 5 s.
        """
        writer_done = trio.Event()
        write_errors: list[BaseException] = []

        async def writer() -> None:
            with trio.CancelScope(shield=True):
                try:
                    await stream.write(out)
                    self._counters.add("stream_bytes_sent", name, len(out))
                    await cast(Any, stream).close_write()  # NetStream: half-close (FIN)
                except Exception as e:
                    write_errors.append(e)
                finally:
                    writer_done.set()

        body: bytes | None = None
        error: HostError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            try:
                body = await self._read_response(stream, peer, pid)
            except HostError as e:
                error = e
            except Exception as e:
                why = reason(write_errors[0]) if write_errors else reason(e)
                error = RemoteError(f"peer {peer} closed the {pid} stream without a response ({why})")
                error.__cause__ = e
            finally:
                if body is None or not writer_done.is_set():
                    await dispose(stream, graceful=False)  # also unblocks the writer
        if error is not None:
            raise error
        assert body is not None
        await dispose(stream, graceful=True)
        self._counters.add("stream_bytes_received", name, FRAME_HEADER_BYTES + len(body))
        return body

    async def _read_response(self, stream: INetStream, peer: ID, pid: TProtocol) -> bytes:
        limit = self.config.max_message_bytes + 1  # + status byte
        n = await read_header(stream)
        if n == 0 or n > limit:
            self._counters.inc("frames_too_large")
            raise FrameTooLargeError(f"peer {peer} answered {pid} with a {n}-byte frame (limit {limit}); refused")
        return await read_exact(stream, n)

    def _negotiation_error(self, peer: ID, pid: TProtocol, err: BaseException) -> HostError:
        text = " ".join(str(x) for x in (err, err.__cause__) if x is not None)
        if "not supported" in text or " na" in text:
            prefix = self.config.protocol_prefix + "/"
            try:
                theirs = [str(p) for p in self.host.get_peerstore().get_protocols(peer)]
            except Exception:
                theirs = []
            if any(p.startswith(prefix) for p in theirs):
                return ProtocolMismatchError(f"peer {peer} speaks {self.config.protocol_prefix} but does not serve {pid}")
            return ProtocolMismatchError(f"peer {peer} does not speak {pid}: different run or protocol version")
        if "timed out" in text:
            return RequestTimeoutError(f"peer {peer} did not answer protocol negotiation for {pid}: {text}")
        return HostError(f"cannot open a {pid} stream to peer {peer}: {text}")
