"""Every py-libp2p 0.8.1 default the adapter overrides, each with its reason.

docs/networking.md has the same list as a table, with the measurements behind it; a test pins
the overrides against library upgrades (tests/test_libp2p_host.py). Log levels and filters are
in ``logs``; the listen-port pre-check and the byte counters are in ``transport``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final, cast

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as _new_x25519_key_pair
from libp2p.custom_types import TMuxerOptions, TProtocol, TSecurityOptions
from libp2p.network.config import (
    HIGH_WATERMARK,
    LOW_WATERMARK,
    MIN_CONNECTIONS,
    ConnectionConfig,
    RetryConfig,
)
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStore, PeerStoreError
from libp2p.pubsub.gossipsub import PROTOCOL_ID as GOSSIPSUB_V10
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11 as GOSSIPSUB_V11
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.score import ScoreParams, TopicScoreParams
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream

from seedswarm.gossip.libp2p.api import Counters, HostConfig
from seedswarm.gossip.libp2p.transport import CountingUpgrader

#: GossipSub mesh degree (go-libp2p's D=6, D_lo=4 here for small swarms, D_hi=12).
GOSSIP_DEGREE: Final = 6
GOSSIP_DEGREE_LOW: Final = 4
GOSSIP_DEGREE_HIGH: Final = 12
#: Peer scoring (the libp2p defaults weigh nothing and never graylist anyone): only P4 (invalid
#: messages) carries weight. One rejected message costs 1 point, decaying by 0.5% a heartbeat
#: (half-life about 140 heartbeats). Below -5 a peer gets no IHAVE gossip from us; below -10
#: (more than ten rejected messages) its messages are dropped before validation, nothing is
#: published to it, and its GRAFTs are refused (graylisted).
SCORE_INVALID_WEIGHT: Final = 1.0
SCORE_INVALID_CAP: Final = 1000.0
SCORE_INVALID_DECAY: Final = 0.995
SCORE_GOSSIP_THRESHOLD: Final = -5.0
SCORE_PUBLISH_THRESHOLD: Final = -10.0
SCORE_GRAYLIST_THRESHOLD: Final = -10.0
SCORE_ACCEPT_PX_THRESHOLD: Final = 0.0
#: Extra room a pubsub RPC needs around one message (signature, key, signed peer record).
PUBSUB_RPC_OVERHEAD: Final = 64 * 1024
#: A pubsub frame whose header arrived must arrive whole within ``io_timeout_s`` plus its size
#: at this rate (libp2p: no limit, a peer that sends a header and stalls holds a task forever).
#: 64 KiB/s: a full 1 MiB frame gets 17 s more; an honest peer on any real link is far faster.
PUBSUB_FRAME_MIN_RATE: Final = 64 * 1024
#: Topics one remote peer may be subscribed to as far as we record (libp2p: 100), and
#: subscription entries accepted in one RPC (libp2p: 5000). A seedswarm node uses a few topics;
#: each recorded subscription is state a stranger makes us keep.
PUBSUB_MAX_TOPICS_PER_PEER: Final = 64
PUBSUB_MAX_SUBSCRIPTIONS_PER_RPC: Final = 64
#: GossipSub keeps every forwarded message (with its data) for equivocation checks, trimmed
#: only at 1000 entries; we trim it to this many each heartbeat to bound memory.
EQUIVOCATION_CACHE_MAX: Final = 128
#: Bootstrap peers that are not connected are redialled with this backoff (seconds).
BOOTSTRAP_BACKOFF_MIN: Final = 1.0
BOOTSTRAP_BACKOFF_MAX: Final = 30.0
#: How long a closed peer's addresses stay in the peerstore (libp2p default: 120 s), so that
#: ``request()`` can redial a peer that dropped.
PEER_ADDR_TTL_S: Final = 3600
#: How often the host sweeps expired peers out of the peerstore (``Libp2pHost._peerstore_cleanup``,
#: our guarded copy of libp2p's ``PeerStore.start_cleanup_task``, whose default is 300 s). Read
#: at each sweep, so a test can shorten it.
PEERSTORE_CLEANUP_INTERVAL_S: float = 60.0


def peerstore_cleanup_interval() -> float:
    """:data:`PEERSTORE_CLEANUP_INTERVAL_S`, read at call time (tests shorten it)."""
    return PEERSTORE_CLEANUP_INTERVAL_S
#: GossipSub protocols we speak: scoring needs 1.1; 1.2 adds IDONTWANT (saves bandwidth on large
#: messages); the 1.3+ extensions and topic observation are not needed (libp2p: up to 2.0).
GOSSIPSUB_PROTOCOLS: Final = (GOSSIPSUB_V11, GOSSIPSUB_V10)
#: A Yamux stream gives the bytes its reader consumed back to the sender (a WINDOW_UPDATE frame)
#: once they reach this fraction of its window (go-yamux: half). py-libp2p sends one for every
#: read: 30 bytes on the socket (a 12-byte header in a Noise frame) for each gossip RPC or
#: request frame received, a third of a small request's bytes.
YAMUX_RELEASE_DIVISOR: Final = 2


def security_options(key_pair: KeyPair) -> TSecurityOptions:
    """Noise only: ``new_host()`` otherwise also accepts ``/plaintext/2.0.0`` (and TLS, SECIO)."""
    noise = NoiseTransport(key_pair, noise_privkey=_new_x25519_key_pair().private_key)
    return {TProtocol(NOISE_PROTOCOL_ID): noise}


def muxer_options() -> TMuxerOptions:
    """Yamux only: Mplex measured at 33-40 MiB/s against Yamux's 190-330 MiB/s."""
    return {TProtocol(YAMUX_PROTOCOL_ID): Yamux}


def connection_config(config: HostConfig) -> ConnectionConfig:
    """libp2p's connection settings. The limits are its defaults for 300 open connections, scaled
    down (in the order ConnectionConfig checks them) for a smaller ``config.max_connections``."""
    cap = config.max_connections
    high = min(HIGH_WATERMARK, cap)
    low = min(LOW_WATERMARK, high)
    return ConnectionConfig(
        # max_connections_per_peer=1: with the default (3) every dial waits out a 250 ms
        # happy-eyeballs delay; with 1 a loopback connect takes ~5 ms.
        max_connections_per_peer=1,
        max_connections=cap, high_watermark=high, low_watermark=low,
        min_connections=min(MIN_CONNECTIONS, low, max(0, cap - 1)),
        dial_timeout=config.dial_timeout_s,
        outbound_stream_protocol_negotiation_timeout=config.io_timeout_s,
        inbound_stream_protocol_negotiation_timeout=config.io_timeout_s,
    )


def build_libp2p_host(key_pair: KeyPair, listen: list[multiaddr.Multiaddr], config: HostConfig,
                      counters: Counters,
                      on_peerstore_error: Callable[[str, Exception], None]) -> Any:
    """``new_host()`` with our overrides. Any: callers reach BasicHost/Swarm attributes IHost lacks.

    ``on_peerstore_error`` hears of each peerstore error ``guard_peerstore`` swallows."""
    security, muxers = security_options(key_pair), muxer_options()
    host: Any = new_host(
        key_pair=key_pair,
        sec_opt=security,
        muxer_opt=muxers,
        listen_addrs=listen,
        enable_mDNS=False,  # binds every interface via zeroconf; bootstrap lists suffice
        enable_upnp=False,
        connection_config=connection_config(config),
        negotiate_timeout=max(1, int(config.io_timeout_s)),
    )
    network = host.get_network()
    # One quick retry instead of 3 with backoff: dial failures surface in ~0.1 s, and the
    # daemon and the bootstrap keeper own the retry policy.
    network.retry_config = RetryConfig(max_retries=1, initial_delay=0.05, max_delay=0.5)
    # Same security and muxers, plus this host's transport byte counters (transport.py).
    network.upgrader = CountingUpgrader(security, muxers, counters)
    # py-libp2p 0.8.1 takes an inbound slot (max_connections - min_connections of them) for each
    # inbound connection and gives it back only when the swarm stops: the handler that holds it
    # awaits the swarm's end, not the connection's. After 250 inbound connections in a node's
    # life (peers coming and going, or one client with throwaway keys in a few seconds) the host
    # refused every new one while its peer list was empty. The cap that counts open connections
    # (max_connections, checked before the handshake and when a connection is registered) stays.
    network._inbound_limiter = trio.CapacityLimiter(math.inf)
    guard_peerstore(host.get_peerstore(), on_peerstore_error)
    return host


def guard_peerstore(peerstore: PeerStore, on_error: Callable[[str, Exception], None]) -> None:
    """Make this peerstore's ``maybe_delete_peer_record`` total: it must never raise.

    py-libp2p 0.8.1's version drops a peer's signed record when ``addrs(peer)`` is empty, but
    ``addrs()`` *raises* ``PeerStoreError('peer ID is expired')`` once the peer's address TTL
    has passed (and 'peer ID not found' when it has no entry). Its expiry sweep
    (``_cleanup_expired_records``) calls it for exactly those peers, so the first expired peer
    that had sent a signed record (identify and pubsub both deliver one) made the sweep raise in
    the host's nursery and stopped the node (seen in the WAN bench, docs/networking.md). The same
    method runs under ``get_peer_record`` (GossipSub peer exchange, Kademlia) and the record
    limit. Expired or unknown means "no live addresses", which is the case the method exists
    for: the record is dropped, and ``on_error`` (count it, log it once) is told.
    """

    def maybe_delete_peer_record(peer_id: ID) -> None:
        if peer_id not in peerstore.peer_record_map:
            return
        try:
            live = peerstore.addrs(peer_id)
        except PeerStoreError as e:
            on_error("maybe_delete_peer_record", e)
            live = []
        if not live:
            peerstore.peer_record_map.pop(peer_id, None)

    # An instance attribute shadows the method for every caller, libp2p's own included.
    peerstore.maybe_delete_peer_record = maybe_delete_peer_record  # type: ignore[method-assign]


def release_window_lazily(muxed_stream: Any) -> None:
    """Make one Yamux stream send WINDOW_UPDATE only when half its window was read (go-yamux's
    rule) instead of after every read (``YAMUX_RELEASE_DIVISOR``).

    Installed by the host on each stream it opens or accepts, before any byte is read. The
    window itself stays 256 KiB (the receive-window auto-tuning is skipped; a loopback or LAN
    link fills 256 KiB anyway); flow control is unchanged: unread bytes are never released.
    """
    if not isinstance(muxed_stream, YamuxStream):
        return
    s = muxed_stream

    async def release(*, bytes_read: int = 0) -> None:
        increment = 0
        async with s.window_lock:
            s._pending_recv_release += bytes_read
            if s._pending_recv_release >= s.target_recv_window // YAMUX_RELEASE_DIVISOR:
                increment, s._pending_recv_release = s._pending_recv_release, 0
                s.recv_window += increment
        if increment > 0:  # never hold window_lock across the write (libp2p's rule)
            await s.send_window_update(increment, skip_lock=True)

    s._auto_tune_and_send_window_update = release  # type: ignore[method-assign]


def score_params() -> ScoreParams:
    return ScoreParams(
        p4_invalid_messages=TopicScoreParams(
            weight=SCORE_INVALID_WEIGHT, cap=SCORE_INVALID_CAP, decay=SCORE_INVALID_DECAY
        ),
        # P1-P3 (mesh time, deliveries) and P5-P7 stay at weight 0: on loopback clusters every
        # peer shares one IP (P7 would punish them all), and P5's GRAFT-flood heuristics are
        # not trusted yet. Thresholds are explicit: the libp2p defaults are -inf, so nothing
        # would ever be graylisted.
        gossip_threshold=SCORE_GOSSIP_THRESHOLD,
        publish_threshold=SCORE_PUBLISH_THRESHOLD,
        graylist_threshold=SCORE_GRAYLIST_THRESHOLD,
        accept_px_threshold=SCORE_ACCEPT_PX_THRESHOLD,
    )


def build_gossipsub(config: HostConfig) -> GossipSub:
    return GossipSub(
        protocols=list(GOSSIPSUB_PROTOCOLS),
        degree=GOSSIP_DEGREE,
        degree_low=GOSSIP_DEGREE_LOW,
        degree_high=GOSSIP_DEGREE_HIGH,
        # default 120 s; trio.sleep takes a float (the int annotation is libp2p's)
        heartbeat_interval=cast(int, config.gossip_heartbeat_s),
        heartbeat_initial_delay=0.1,
        do_px=False,  # peer exchange would hand our peers to strangers
        score_params=score_params(),
        # adaptive gossip pushed the heartbeat from 1 s to 60 s on every node
        adaptive_gossip_enabled=False,
        # spam protection silently drops over 10 msg/s per topic per peer, own included
        spam_protection_enabled=False,
    )


def pubsub_options(config: HostConfig) -> dict[str, Any]:
    """Keyword arguments of ``Pubsub`` (``guard.GuardedPubsub``)."""
    return {
        "strict_signing": True,  # from_peer is authenticated: the author's key signs it
        # libp2p: 1 MiB including signature and signed peer record, so a max_message_bytes
        # message never fit
        "max_inbound_rpc_size": config.max_message_bytes + PUBSUB_RPC_OVERHEAD,
        "max_subscriptions_per_peer": PUBSUB_MAX_TOPICS_PER_PEER,
        "max_subscriptions_per_rpc": PUBSUB_MAX_SUBSCRIPTIONS_PER_RPC,
    }


class TunedQueues(dict[ID, Any]):
    """Pubsub's per-peer outbound RPC queues, resized as pubsub creates them.

    libp2p creates each with room for 32 RPCs (one publish is one RPC) and a 1 MiB RPC
    limit, and silently drops (a DEBUG line) what does not fit: a burst of 33 publishes
    lost messages, and a ``max_message_bytes`` message, once wrapped in an RPC with its
    signature and signed peer record, was over 1 MiB and never sent.
    """

    def __init__(self, config: HostConfig) -> None:
        super().__init__()
        self._max_rpcs = max(32, config.queue_size)
        self._max_rpc_bytes = config.max_message_bytes + PUBSUB_RPC_OVERHEAD

    def __setitem__(self, peer: ID, rpc_queue: Any) -> None:
        rpc_queue.max_message_size = self._max_rpc_bytes
        inner = getattr(rpc_queue, "_queue", None)
        if inner is not None:
            inner.max_size = self._max_rpcs
        super().__setitem__(peer, rpc_queue)


def trim_router_state(gs: GossipSub, keep: set[str]) -> int:
    """Per heartbeat: bound what GossipSub keeps that only a sweep would ever free.

    * ``recent_message_deliveries``: only adaptive gossip (off) trims it; ~32 B a message.
    * ``equivocation_detection``: every forwarded message with its data, up to 1000.
    * per-topic score entries and PRUNE backoffs for topics outside ``keep`` (ours, and the
      mesh and fanout ones): a peer's control junk (GRAFT/PRUNE/IHAVE for made-up topics)
      creates four score entries per (peer, topic) through the score gates, and a PRUNE
      backoff that lives until the topic is checked again, which for a made-up topic is never.
      Entries for topics we do not use affect nothing we do, so dropping them is free.

    Returns the number of per-topic entries dropped.
    """
    gs.recent_message_deliveries.clear()
    if len(gs.equivocation_detection) > EQUIVOCATION_CACHE_MAX:
        keys = list(gs.equivocation_detection)
        for k in keys[: len(keys) - EQUIVOCATION_CACHE_MAX]:
            del gs.equivocation_detection[k]
    keep = keep | set(gs.mesh) | set(gs.fanout)
    dropped = 0
    scorer = gs.scorer
    if scorer is not None:
        for table in (scorer.time_in_mesh, scorer.first_message_deliveries,
                      scorer.mesh_message_deliveries, scorer.invalid_messages):
            for peer in list(table):
                per_topic = table[peer]
                for topic in [t for t in per_topic if t not in keep]:
                    del per_topic[topic]
                    dropped += 1
                if not per_topic:
                    del table[peer]
    for topic in [t for t in gs.back_off if t not in keep]:
        dropped += len(gs.back_off.pop(topic))
    return dropped
