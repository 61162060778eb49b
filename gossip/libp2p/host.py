"""``Libp2pHost``: the facade the daemon uses. It assembles the pieces (bridge, transport,
tuning, streams, pubsub and its guard), owns peers, dialling and the bootstrap keeper, and runs
the host's trio main.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import multiaddr
import trio
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.identity_utils import create_identity_from_seed
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service

from seedswarm.gossip.libp2p.accounting import install_stream_counter
from seedswarm.gossip.libp2p.api import (
    Counters,
    Event,
    HostClosedError,
    HostConfig,
    HostError,
    HostStats,
    PeerConnected,
    PeerDisconnected,
    RequestHandler,
    Validator,
)
from seedswarm.gossip.libp2p.autonat import PRIVATE, UNKNOWN, FreshDialAutoNAT, Reachability
from seedswarm.gossip.libp2p.bridge import TrioBridge
from seedswarm.gossip.libp2p.common import LogOnce, reason
from seedswarm.gossip.libp2p.logs import install_log_policy
from seedswarm.gossip.libp2p.pubsub import Gossip
from seedswarm.gossip.libp2p.relay import Relay, choose_relay, is_circuit, is_relayed
from seedswarm.gossip.libp2p.streams import Streams
from seedswarm.gossip.libp2p.transport import claim_listen_port
from seedswarm.gossip.libp2p.tuning import (
    BOOTSTRAP_BACKOFF_MAX,
    BOOTSTRAP_BACKOFF_MIN,
    PEER_ADDR_TTL_S,
    build_libp2p_host,
    peerstore_cleanup_interval,
    release_window_lazily,
)

log = logging.getLogger(__name__)

#: How often a host with ``auto_relay`` and no relay yet looks for one.
AUTO_RELAY_CHECK_S = 2.0


def _parse_peer_addr(addr: str) -> PeerInfo:
    try:
        return info_from_p2p_addr(multiaddr.Multiaddr(addr))
    except Exception as e:
        raise HostError(f"bad peer multiaddr {addr!r} (need .../p2p/<peer id>): {e}") from e


class _PeerNotifee(INotifee):
    """Connection events -> PeerConnected/PeerDisconnected (first open, last close)."""

    def __init__(self, owner: Libp2pHost) -> None:
        self._owner = owner

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        # Called before multistream-select writes a byte on the stream (accounting.py).
        release_window_lazily(getattr(stream, "muxed_stream", None))
        # A relayed connection's bytes are already counted once, as the relay stream's payload
        # on our connection to the relay (kind ``relay``): counting its streams too would count
        # them twice.
        if not is_relayed(getattr(stream, "muxed_conn", None)):
            install_stream_counter(stream, self._owner._counters, self._owner._prefix)
        await trio.lowlevel.checkpoint()

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        await trio.lowlevel.checkpoint()

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._owner._on_conn_change(conn, +1)
        await trio.lowlevel.checkpoint()

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._owner._on_conn_change(conn, -1)
        await trio.lowlevel.checkpoint()

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        await trio.lowlevel.checkpoint()

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        await trio.lowlevel.checkpoint()


class Libp2pHost:
    """A libp2p host (TCP, Noise, Yamux, GossipSub) on a trio thread, driven from asyncio.

    Lifecycle: ``start()`` once, then ``stop()`` (idempotent, bounded, joins the thread); or
    ``async with Libp2pHost(cfg) as host``. All methods must be called from the asyncio loop
    that ran ``start()``.
    """

    dials_bootstrap = True  # the bootstrap keeper redials HostConfig.bootstrap with backoff

    def __init__(self, config: HostConfig) -> None:
        if len(config.identity_seed) != 32:
            raise HostError("identity_seed must be the 32-byte Ed25519 seed of the node's identity")
        prefix = config.protocol_prefix
        if not prefix.startswith("/") or prefix.endswith("/") or any(c.isspace() for c in prefix):
            raise HostError(f"invalid protocol_prefix {prefix!r}: expected like /seedswarm/1/<run>")
        if config.max_message_bytes <= 0 or config.max_message_bytes >= 1 << 31:
            raise HostError("max_message_bytes must be in [1, 2**31)")
        if config.queue_size <= 0:
            raise HostError("queue_size must be positive")
        if not config.listen:
            raise HostError("at least one listen address is required")
        self.config = config
        self._key_pair = create_identity_from_seed(config.identity_seed)
        self._id = ID.from_pubkey(self._key_pair.public_key)
        self.peer_id: str = self._id.to_base58()
        self.listen_addrs: list[str] = []

        self._counters = Counters()
        self._prefix = prefix + "/"  # of our protocol ids, for the byte accounting
        self._log_once = LogOnce()
        self._bridge: TrioBridge[Event] = TrioBridge(
            f"libp2p-{self.peer_id[-8:]}", config.queue_size, on_finished=self._on_finished
        )
        self._streams = Streams(config, self._id, self._counters, self._bridge, self._log_once)
        self._gossip = Gossip(config, self._id, self._counters, self._emit, self._log_once)
        self._relay = Relay(self._counters, config.relay_service, list(config.relays), self._relay_error,
                            config.hole_punch)

        # trio side (only touched on the trio thread once it runs)
        self._host: Any = None
        self._conn_counts: dict[str, int] = {}
        self._peers_snapshot: tuple[str, ...] = ()
        self._relayed_snapshot: tuple[str, ...] = ()
        self._reachability: Reachability | None = None
        self._bootstrap: list[PeerInfo] = []
        self._listen_mas: list[multiaddr.Multiaddr] = []

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Libp2pHost:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the host; returns once it listens. Raises HostError with the reason."""
        if self._bridge.state != "new":
            raise HostError(f"start() called on a host that is {self._bridge.state}")
        install_log_policy()
        listen: list[multiaddr.Multiaddr] = []
        for addr in self.config.listen:
            try:
                ma = multiaddr.Multiaddr(addr)
            except Exception as e:
                raise HostError(f"bad listen multiaddr {addr!r}: {e}") from e
            listen.append(claim_listen_port(ma))
        self._listen_mas = listen
        self._bootstrap = []
        for addr in [*self.config.bootstrap, *self.config.relays]:
            info = _parse_peer_addr(addr)
            if info.peer_id == self._id:
                log.debug("dropping own peer id from the bootstrap list: %s", addr)
                continue
            if any(b.peer_id == info.peer_id for b in self._bootstrap):
                continue  # a relay that is also a bootstrap peer
            self._bootstrap.append(info)
        self.listen_addrs = await self._bridge.start(self._run_host, self.config.start_timeout_s)

    async def stop(self) -> None:
        """Stop the host from any state: cancel the trio nursery, close the host, join the
        thread. Idempotent; returns within about ``stop_timeout_s + 2`` seconds."""
        await self._bridge.stop(self.config.stop_timeout_s)

    @property
    def running(self) -> bool:
        return self._bridge.running

    def _on_finished(self) -> None:
        self._streams.cancel_handler_tasks()

    async def _run_host(self) -> None:
        """trio thread: build, listen, serve until stop is requested, close."""
        host = build_libp2p_host(self._key_pair, self._listen_mas, self.config, self._counters,
                                 self._peerstore_error)
        host.get_network().register_notifee(_PeerNotifee(self))
        pubsub, gossipsub = self._gossip.build(host)
        relay, dcutr = self._relay.build(host)
        self._host = host
        self._streams.attach(host)
        network = host.get_network()
        try:
            async with host.run([]):
                # Listen address by address: Swarm.listen() only returns one bool for all,
                # and BasicHost.run() ignores it.
                for ma in self._listen_mas:
                    if not await network.listen(ma):
                        raise HostError(f"cannot listen on {ma} (address in use or unavailable)")
                # The auto-connector redials every peer the peerstore ever saw (departed ones
                # included) every 10 s while under 50 connections; we own the dial policy.
                await network.auto_connector.stop()
                async with background_trio_service(pubsub), background_trio_service(gossipsub), \
                        background_trio_service(relay), \
                        (background_trio_service(dcutr) if dcutr else contextlib.nullcontext()):
                    await pubsub.wait_until_ready()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._maintenance)
                        if self._relay.relays or self.config.auto_relay:
                            nursery.start_soon(self._relay.keep_reservations)
                        if self.config.autonat:
                            self._reachability = Reachability(
                                host, FreshDialAutoNAT(host, self._counters, self._relay_error),
                                has_relay=bool(self.config.relays) or self.config.relay_service
                                or self.config.auto_relay)
                            nursery.start_soon(self._reachability.run)
                            if self.config.auto_relay:
                                nursery.start_soon(self._auto_relay)
                        nursery.start_soon(self._peerstore_cleanup)
                        if self._bootstrap:
                            nursery.start_soon(self._bootstrap_keeper)
                        await self._bridge.serve(nursery, [str(a) for a in host.get_addrs()])
                with trio.move_on_after(2.0) as cs:
                    cs.shield = True
                    await host.close()
        finally:
            self._gossip.close()

    async def _maintenance(self) -> None:
        """Per heartbeat: trim what libp2p never trims; refresh the peer snapshot."""
        assert self._host is not None
        while True:
            await trio.sleep(self.config.gossip_heartbeat_s)
            self._gossip.heartbeat()
            connected = {str(p) for p in self._host.get_connected_peers()}
            connected.discard(self.peer_id)
            self._peers_snapshot = tuple(sorted(connected))
            network = self._host.get_network()
            self._relayed_snapshot = tuple(sorted(
                str(p) for p in self._host.get_connected_peers()
                if (conns := network.get_connections(p)) and all(is_relayed(c) for c in conns)))

    async def _auto_relay(self) -> None:
        """trio thread: once AutoNAT says peers cannot dial us, adopt a relay among our direct
        peers (``relay.choose_relay``); look again while there is none to adopt."""
        assert self._host is not None and self._reachability is not None
        while not self._relay.relays:
            if self._reachability.status == PRIVATE and (info := choose_relay(self._host)) is not None:
                self._relay.adopt(info)
                return
            await trio.sleep(AUTO_RELAY_CHECK_S)

    async def _peerstore_cleanup(self) -> None:
        """libp2p's ``PeerStore.start_cleanup_task``, guarded: sweep expired peers every
        ``tuning.PEERSTORE_CLEANUP_INTERVAL_S``; an error costs a counter and a log line.

        libp2p's task runs the sweep bare in our nursery, and in 0.8.1 the sweep raised
        ``PeerStoreError('peer ID is expired')`` for a peer with a signed record whose addresses
        had expired, which stopped the node (``tuning.guard_peerstore`` fixes that cause). Any
        other error of the sweep leaves the peerstore as it was, to be swept again next time.
        """
        assert self._host is not None
        peerstore = self._host.get_peerstore()
        while True:
            await trio.sleep(peerstore_cleanup_interval())
            try:
                peerstore._cleanup_expired_records()
            except Exception as e:
                self._peerstore_error("cleanup", e)

    def _relay_error(self, where: str, e: Exception) -> None:
        """trio thread: a relay-protocol handler raised (a peer's bad input); caught."""
        self._counters.inc("relay_errors")
        self._log_once(("relay", where, type(e).__name__), logging.WARNING,
                       "circuit relay %s handler error, stream reset (counted in relay_errors): %s",
                       where, reason(e))

    def reachability(self) -> str:
        """``public``, ``private`` or ``unknown``: can peers dial this host (AutoNAT)?"""
        return self._reachability.status if self._reachability is not None else UNKNOWN

    def relayed_peers(self) -> list[str]:
        """Connected peers reached only through a relay (refreshed every heartbeat)."""
        return list(self._relayed_snapshot)

    def relay_reservations(self) -> list[str]:
        """Relays that hold a reservation for this host now (peer ids; a snapshot)."""
        return self._relay.reserved()

    def relay_circuits(self) -> list[str]:
        """``<relay addr>/p2p/<relay id>`` of each relay holding a reservation for this host now:
        peers reach it at that plus ``/p2p-circuit/p2p/<its id>`` (a snapshot)."""
        return self._relay.circuits()

    def _peerstore_error(self, where: str, e: Exception) -> None:
        """trio thread: a peerstore error the adapter swallowed (see ``_peerstore_cleanup``)."""
        self._counters.inc("peerstore_errors")
        self._log_once(("peerstore", where, type(e).__name__), logging.WARNING,
                       "py-libp2p peerstore error in %s, ignored (counted in peerstore_errors): %s",
                       where, reason(e))

    async def _bootstrap_keeper(self) -> None:
        """Dial bootstrap peers now, and redial any that is not connected, with backoff."""
        assert self._host is not None
        network = self._host.get_network()
        backoff: dict[ID, float] = {}
        next_try: dict[ID, float] = {}
        inflight: set[ID] = set()

        async def dial(info: PeerInfo) -> None:
            try:
                await self._dial(info)
                backoff.pop(info.peer_id, None)
            except Exception as e:
                b = min(max(BOOTSTRAP_BACKOFF_MIN, backoff.get(info.peer_id, 0.0) * 2), BOOTSTRAP_BACKOFF_MAX)
                backoff[info.peer_id] = b
                next_try[info.peer_id] = trio.current_time() + b
                self._log_once(("bootstrap", str(info.peer_id)), logging.INFO,
                               "bootstrap peer %s not reachable yet (%s); retrying every <= %.0f s",
                               info.peer_id, reason(e), BOOTSTRAP_BACKOFF_MAX)
            finally:
                inflight.discard(info.peer_id)

        async with trio.open_nursery() as nursery:
            while True:
                now = trio.current_time()
                for info in self._bootstrap:
                    pid = info.peer_id
                    if pid in inflight or network.get_connections(pid) or next_try.get(pid, 0.0) > now:
                        continue
                    inflight.add(pid)
                    nursery.start_soon(dial, info)
                await trio.sleep(0.5)

    async def _dial(self, info: PeerInfo) -> None:
        host = self._host
        assert host is not None
        network = host.get_network()
        # A failed dial puts the peer in a negative cache that refuses later dials for a while
        # (even after it came back up): an explicit dial always tries for real.
        unblock = getattr(network, "unblock_peer", None)
        if unblock is not None:
            unblock(info.peer_id)
        circuits = [a for a in info.addrs if is_circuit(a)]
        if circuits:
            # The swarm skips /p2p-circuit addresses: dial through the relay ourselves.
            if network.get_connections(info.peer_id):
                return
            with trio.fail_after(self.config.dial_timeout_s * 2):  # two hops: relay, then peer
                await self._relay.dial(circuits[0].encapsulate(multiaddr.Multiaddr(f"/p2p/{info.peer_id}")))
            return
        host.get_peerstore().add_addrs(info.peer_id, info.addrs, PEER_ADDR_TTL_S)
        with trio.fail_after(self.config.dial_timeout_s):
            await host.connect(info)

    def _emit(self, ev: Event) -> None:
        """trio thread: hand an event to asyncio without ever blocking; count a full queue."""
        if not self._bridge.emit(ev):
            self._counters.inc("events_dropped")
            self._log_once(("events_dropped",), logging.WARNING,
                           "event queue full (%d): dropping events; is next_event() being drained?",
                           self.config.queue_size)

    # -- peers ---------------------------------------------------------------------------

    def _on_conn_change(self, conn: INetConn, delta: int) -> None:
        try:
            peer = str(conn.muxed_conn.peer_id)
        except Exception:
            return
        if peer == self.peer_id:
            return
        before = self._conn_counts.get(peer, 0)
        after = max(0, before + delta)
        if after:
            self._conn_counts[peer] = after
        else:
            self._conn_counts.pop(peer, None)
        if before == 0 and after > 0:
            self._peers_snapshot = tuple(sorted(set(self._peers_snapshot) | {peer}))
            self._emit(PeerConnected(peer))
        elif before > 0 and after == 0:
            self._peers_snapshot = tuple(p for p in self._peers_snapshot if p != peer)
            self._emit(PeerDisconnected(peer))

    async def connect(self, multiaddr_str: str) -> str:
        """Dial a peer by its full multiaddr (with /p2p/<id>); returns its peer id."""
        info = _parse_peer_addr(multiaddr_str)
        if info.peer_id == self._id:
            raise HostError(f"refusing to dial our own peer id ({multiaddr_str})")

        async def op() -> str:
            try:
                await self._dial(info)
            except trio.TooSlowError:
                raise HostError(f"cannot connect to {multiaddr_str}: timed out after {self.config.dial_timeout_s} s") from None
            except Exception as e:
                raise HostError(f"cannot connect to {multiaddr_str}: {reason(e)}") from e
            return str(info.peer_id)

        return await self._bridge.call(op, f"connect to {multiaddr_str}")

    async def disconnect(self, peer_id: str) -> None:
        """Close every connection to a peer (it may reconnect; ban lists are the daemon's)."""
        pid = self._peer(peer_id)

        async def op() -> None:
            assert self._host is not None
            with trio.move_on_after(self.config.io_timeout_s):
                await self._host.disconnect(pid)

        await self._bridge.call(op, f"disconnect {peer_id}")

    def peers(self) -> list[str]:
        """Currently connected peer ids (a snapshot; never includes ourselves)."""
        return list(self._peers_snapshot)

    @staticmethod
    def _peer(peer_id: str) -> ID:
        try:
            return ID.from_base58(peer_id)
        except Exception as e:
            raise HostError(f"not a peer id: {peer_id!r}") from e

    # -- gossip --------------------------------------------------------------------------

    async def subscribe(self, topic: str, validator: Validator) -> None:
        """Subscribe to a topic; ``validator(data, from_peer)`` gates delivery and forwarding.

        The validator runs on the trio thread before a message is delivered or forwarded:
        keep it cheap, pure and thread-safe. A rejected message is not forwarded, is counted
        in ``stats.gossip_rejected``, and costs the forwarding peer score (graylisted after
        about ten). libp2p caches a verdict per message id for 5 minutes.
        """
        full = self._gossip.topic(topic)
        await self._bridge.call(lambda: self._gossip.subscribe_op(full, topic, validator), f"subscribe to {topic}")

    async def publish(self, topic: str, data: bytes) -> None:
        """Publish on a topic (subscribed or not). Raises if our own validator rejects it."""
        full = self._gossip.topic(topic)
        self._gossip.check_size(topic, data)
        payload = bytes(data)
        await self._bridge.call(lambda: self._gossip.publish_op(full, topic, payload), f"publish on {topic}")

    async def topic_peers(self, topic: str, mesh_only: bool = False) -> list[str]:
        """Peers known to subscribe to a topic, or (``mesh_only``) those in our GossipSub mesh
        for it. A publish on a subscribed topic goes to mesh peers at once; other subscribers
        learn of it by IHAVE gossip at the next heartbeats."""
        full = self._gossip.topic(topic)
        return await self._bridge.call(lambda: self._gossip.topic_peers_op(full, mesh_only),
                                       f"list peers of {topic}")

    # -- events --------------------------------------------------------------------------

    async def next_event(self) -> Event:
        """The next gossip message or peer event. Raises HostClosedError once stopped."""
        return await self._bridge.next_event()

    async def events(self) -> AsyncIterator[Event]:
        """Iterate over events until the host stops."""
        while True:
            try:
                yield await self.next_event()
            except HostClosedError:
                return

    # -- direct streams ------------------------------------------------------------------

    def set_request_handler(self, protocol: str, handler: RequestHandler) -> None:
        """Serve ``f"{protocol_prefix}/{protocol}"``: ``handler(from_peer, request)`` runs on
        the asyncio loop and returns the response bytes, or None for no response."""
        self._streams.set_request_handler(protocol, handler)

    async def request(self, peer_id: str, protocol: str, data: bytes, timeout: float = 10.0) -> bytes:
        """Send one request frame on ``f"{protocol_prefix}/{protocol}"``; return the response.

        Dials the peer if needed (its address must be known: connected once, or bootstrap).
        Raises ProtocolMismatchError, FrameTooLargeError, RequestTimeoutError, RemoteError or
        HostError, each with the peer and the reason.
        """
        return await self._streams.request(self._peer(peer_id), protocol, data, timeout)

    # -- stats ---------------------------------------------------------------------------

    @property
    def stats(self) -> HostStats:
        """A consistent snapshot of the counters."""
        return self._counters.snapshot()
