"""The libp2p adapter: a py-libp2p 0.8.1 host on its own trio thread behind a small asyncio bridge.

This package is the only part of seedswarm that imports ``libp2p`` or ``trio``; the simulator
and the in-memory transport never touch it. The daemon uses ``Libp2pHost`` and the types below;
docs/networking.md describes the API, the wire format of direct streams, every overridden
library default, the guard, and the measurements.

Modules, from the bottom up (each imports only the ones above it):

- ``api``: the public types, with no libp2p import: ``HostConfig``, ``HostError`` and its
  subclasses, the events (``GossipMessage``, ``PeerConnected``, ``PeerDisconnected``),
  ``HostStats`` and the ``Counters`` behind it.
- ``common``: names, exception text, log-once.
- ``bridge``: ``TrioBridge``, the trio thread, the bounded asyncio <-> trio calls and event
  queue, and the host's lifecycle (start, health, bounded stop).
- ``transport``: the TCP level: the listen-port pre-check (SO_REUSEADDR) and the transport
  byte counters, installed per host through its own upgrader (nothing is patched).
- ``accounting``: the socket bytes by kind: each stream's payload under its protocol id, each
  pubsub RPC we write split into data, envelope and control (``HostStats.sent_by_kind``).
- ``tuning``: every py-libp2p default we override, each with its reason: security and
  muxers, connection and retry settings, GossipSub and peer scoring, pubsub limits, queue
  sizes, and the per-heartbeat trimming of state libp2p never frees.
- ``logs``: where libp2p's log lines go; ordinary disconnects are DEBUG, not ERROR.
- ``guard``: ``GuardedPubsub``: every pubsub byte a peer sends goes through code that cannot
  take the host down; each drop has a named reason (``DROP_REASONS``).
- ``streams``: direct request/response streams: framing, serving, requesting, and the
  classification of refused protocol ids (``protocol-version``, ``wrong-run``, ``no-handler``).
- ``pubsub``: ``Gossip``: GossipSub construction, topic validators, delivery into the bridge,
  and what a drop costs the peer (P4 score).
- ``host``: ``Libp2pHost``, the facade: peers, dialling, bootstrap, and the trio main.
- ``hostile``: a hostile pubsub client for tests and the chaos bench (not imported here).
"""

from seedswarm.gossip.libp2p.api import (
    Event,
    FrameTooLargeError,
    GossipMessage,
    HostClosedError,
    HostConfig,
    HostError,
    HostStats,
    PeerConnected,
    PeerDisconnected,
    ProtocolMismatchError,
    RemoteError,
    RequestHandler,
    RequestTimeoutError,
    Validator,
)
from seedswarm.gossip.libp2p.guard import DROP_REASONS, UNPENALISED
from seedswarm.gossip.libp2p.host import Libp2pHost
from seedswarm.gossip.libp2p.transport import listen_address_problem

__all__ = [
    "DROP_REASONS",
    "UNPENALISED",
    "Event",
    "FrameTooLargeError",
    "GossipMessage",
    "HostClosedError",
    "HostConfig",
    "HostError",
    "HostStats",
    "Libp2pHost",
    "PeerConnected",
    "PeerDisconnected",
    "ProtocolMismatchError",
    "RemoteError",
    "RequestHandler",
    "RequestTimeoutError",
    "Validator",
    "listen_address_problem",
]
