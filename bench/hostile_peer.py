"""What every hostile client of ``seedswarm bench chaos`` and ``seedswarm bench fuzz`` shares.

The chaos adversary (:mod:`seedswarm.bench.adversary`) and the fuzzer (:mod:`seedswarm.bench.fuzz`)
talk to real daemons over real libp2p connections, from the outside: the daemon's public wire
surface (its direct-stream protocols and its gossip topic) is the only thing they touch. This
module gives both one hostile identity and one account of the daemon's defences:

* :class:`RawPeer` is one hostile identity: a bare py-libp2p host (Noise, Yamux) running in
  the caller's ``trio.run``. It answers the daemon's ``hello`` (a peer that does not is
  disconnected at once), sends raw direct-stream frames (well formed or not) and holds streams
  open.
* :class:`Target` names a daemon to attack; :class:`Tally` counts what was sent and what came
  back; :func:`frame` is the daemon's direct-stream framing.

Daemon defences the hostile peers have to live with (and which they therefore measure): the
peer policy (``node/core/peers.py``) bans a peer whose weighted strikes reach ``ban_at`` (30; a
malformed input weighs 3, a bad signature 5), so identities rotate at half of that
(:data:`ROTATE_AT_STRIKES`, :func:`strikes`); GossipSub graylists a forwarder after about ten
invalid messages (:data:`GRAYLIST_AFTER`: validator rejections and the pubsub guard's penalised
drops), so pubsub attacks come from throwaway identities.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.identity_utils import create_identity_from_seed
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from seedswarm.crypto.keys import Identity, peer_id_of
from seedswarm.gossip.libp2p.tuning import muxer_options, security_options
from seedswarm.gossip.wire import (
    PROTO_CHAIN,
    PROTO_CKPT,
    PROTO_HELLO,
    PROTO_INPUTS,
    PROTO_MSG,
    TOPIC,
    Hello,
    protocol_prefix,
)
from seedswarm.node.core.peers import WEIGHTS, PolicyConfig
from seedswarm.node.core.reasons import Reason
from seedswarm.node.daemon.netstack import MAX_MESSAGE_BYTES

#: Every direct-stream protocol a daemon serves (``{protocol_prefix}/{name}``).
PROTOCOLS: tuple[str, ...] = (PROTO_MSG, PROTO_INPUTS, PROTO_CHAIN, PROTO_CKPT, PROTO_HELLO)
#: A run id no daemon of the bench has: well-formed messages "of another run".
OTHER_RUN = b"\x42" * 32
FRAME_HEADER_BYTES = 4  # the daemon's direct-stream framing: 4-byte big-endian length
STATUS_NAMES = {0: "answered", 1: "no-response", 2: "too-large", 3: "error", 4: "busy"}
#: 0xC1 is the one byte msgpack never uses: garbage that starts with it is malformed every time
#: (plain random bytes sometimes parse as a header with a wrong version: wrong-run instead).
GARBAGE = b"\xc1"
#: The peer policy bans a peer whose weighted strikes reach this; identities rotate at half.
STRIKES_TO_BAN = PolicyConfig().ban_at
ROTATE_AT_STRIKES = STRIKES_TO_BAN / 2
#: GossipSub graylists a forwarder after about ten invalid messages (score -10).
GRAYLIST_AFTER = 10


def strikes(reason: Reason, n: int = 1) -> float:
    """What ``n`` inputs refused for ``reason`` cost a peer under the daemon's peer policy."""
    return n * WEIGHTS.get(reason, 1.0)


def quiet_libp2p() -> None:
    for name in ("libp2p", "libp2p.pubsub", "libp2p.kad_dht", "libp2p.transport.tcp.tcp",
                 "libp2p.network.swarm", "libp2p.host.basic_host", "libp2p.tools.anyio_service"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def topic_of(run_id: bytes) -> str:
    """The run's gossip topic as GossipSub names it (the adapter prefixes topic names)."""
    return f"{protocol_prefix(run_id)}/{TOPIC}"


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(FRAME_HEADER_BYTES, "big") + payload


@dataclass(frozen=True)
class Target:
    """A daemon to attack: its name in the bench, full multiaddr (with /p2p/) and keys."""

    name: str
    addr: str
    public_key: bytes

    @property
    def peer_id(self) -> str:
        return peer_id_of(self.public_key)


class Tally:
    """Thread-safe counters: hostile messages sent by kind, and what came back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()

    def add(self, kind: str, n: int = 1, outcome: str | None = None) -> None:
        with self._lock:
            self.sent[kind] += n
            if outcome is not None:
                self.outcomes[f"{kind}:{outcome}"] += n

    def outcome(self, kind: str, outcome: str, n: int = 1) -> None:
        with self._lock:
            self.outcomes[f"{kind}:{outcome}"] += n

    def snapshot(self) -> tuple[dict[str, int], dict[str, int]]:
        with self._lock:
            return dict(self.sent), dict(self.outcomes)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.sent.values())


# ---------------------------------------------------------------------------------------------
# raw py-libp2p peer


async def _read_exact(stream: Any, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = await stream.read(n - len(buf))
        except Exception:  # StreamEOF, reset: the stream ended
            chunk = b""
        if not chunk:
            raise EOFError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def dispose(stream: Any, graceful: bool = True) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1.0), contextlib.suppress(Exception):
        await (stream.close() if graceful else stream.reset())


async def answer_hello(stream: Any, run_id: bytes) -> None:
    """Answer the daemon's hello request (sent to every new peer) with a hello of ``run_id``."""
    try:
        with trio.fail_after(5):
            n = int.from_bytes(await _read_exact(stream, FRAME_HEADER_BYTES), "big")
            if n <= 4096:
                await _read_exact(stream, n)
            await stream.write(frame(b"\x00" + Hello.make(run_id, 0, [], {}).encode()))
    except Exception:
        pass
    finally:
        await dispose(stream)


def hello_handlers(run_id: bytes) -> dict[str, Callable[[INetStream], Awaitable[None]]]:
    """``handlers`` for ``hostile.send``: a node disconnects a peer that has no hello, which
    would cut an attack short while it is being read."""

    async def serve(stream: INetStream) -> None:
        await answer_hello(stream, run_id)

    return {f"{protocol_prefix(run_id)}/{PROTO_HELLO}": serve}


class RawPeer:
    """One hostile identity: a bare py-libp2p host run inside the caller's trio run.

    Use ``async with peer.running():``. The libp2p key and the chain identity are one Ed25519
    key (as in the daemon), so ``peer.identity`` signs wire messages as this peer.
    """

    def __init__(self, run_id: bytes, seed: bytes | None = None, max_response: int = MAX_MESSAGE_BYTES + 1) -> None:
        self.seed = seed if seed is not None else os.urandom(32)
        self.identity = Identity.from_seed(self.seed)
        self.key_pair = create_identity_from_seed(self.seed)
        self.id = ID.from_pubkey(self.key_pair.public_key)
        self.run_id = run_id
        self.prefix = protocol_prefix(run_id)
        self.topic = topic_of(run_id)
        self.max_response = max_response
        kp = self.key_pair
        self.host: Any = new_host(
            key_pair=kp, sec_opt=security_options(kp), muxer_opt=muxer_options(),
            connection_config=ConnectionConfig(max_connections_per_peer=1, dial_timeout=5.0),
            enable_mDNS=False, enable_upnp=False,
        )
        self.host.set_stream_handler(TProtocol(f"{self.prefix}/{PROTO_HELLO}"), self._serve_hello)
        self.hello_run = run_id  # what our hello answers claim (OTHER_RUN: a peer of another run)

    @property
    def public(self) -> bytes:
        return self.identity.public

    async def _serve_hello(self, stream: Any) -> None:
        await answer_hello(stream, self.hello_run)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[RawPeer]:
        async with self.host.run([]):
            try:
                yield self
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(2.0), contextlib.suppress(Exception):
                    await self.host.close()

    async def connect(self, target: Target, timeout: float = 6.0) -> None:
        info = info_from_p2p_addr(multiaddr.Multiaddr(target.addr))
        with trio.fail_after(timeout):
            await self.host.connect(info)

    async def open(self, target: Target, protocol: str, timeout: float = 6.0) -> Any:
        """A new stream to ``target`` on the daemon protocol ``protocol``."""
        with trio.fail_after(timeout):
            await self.connect(target, timeout)
            return await self.host.new_stream(ID.from_base58(target.peer_id), [TProtocol(f"{self.prefix}/{protocol}")])

    async def request(self, target: Target, protocol: str, payload: bytes = b"", *, raw: bytes | None = None,
                      timeout: float = 12.0, half_close: bool = True) -> tuple[str, bytes]:
        """Write one frame (or the ``raw`` bytes) on a new stream; read the answer frame.

        Returns (outcome, payload): outcome is the daemon's status (answered, no-response,
        too-large, error, busy) or what happened to the stream (timeout, reset, refused, ...).
        """
        data = raw if raw is not None else frame(payload)
        try:
            with trio.fail_after(timeout):
                try:
                    stream = await self.open(target, protocol, timeout)
                except trio.TooSlowError:
                    raise
                except Exception as e:
                    text = str(e)
                    return ("refused" if "protocol" in text.lower() or "negotiat" in text.lower() else "unreachable"), b""
                answered = False
                try:
                    async with trio.open_nursery() as nursery:
                        async def writer() -> None:
                            with contextlib.suppress(Exception):
                                await stream.write(data)
                                if half_close:
                                    await stream.close_write()

                        nursery.start_soon(writer)
                        try:
                            n = int.from_bytes(await _read_exact(stream, FRAME_HEADER_BYTES), "big")
                            if n == 0 or n > self.max_response:
                                return "bad-frame", b""
                            body = await _read_exact(stream, n)
                            answered = True
                        except EOFError:
                            return "closed", b""
                        finally:
                            if not answered:
                                await dispose(stream, graceful=False)
                            nursery.cancel_scope.cancel()
                finally:
                    await dispose(stream, graceful=answered)
                return STATUS_NAMES.get(body[0], f"status-{body[0]}"), body[1:]
        except trio.TooSlowError:
            return "timeout", b""
        except Exception as e:  # noqa: BLE001 - a hostile client reports, never raises
            return f"error-{type(e).__name__}", b""


def http_get(url: str, timeout: float) -> bytes | None:
    """A daemon's ``/status`` or ``/metrics`` body, or None when it does not answer (both benches
    poll nodes that may be killed, paused or flooded at that moment)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            data: bytes = r.read()
            return data
    except (OSError, ValueError):
        return None
