"""Gossip: GossipSub construction, topic validators, delivery into the bridge, and what the
guard's drops cost a peer. Everything here runs on the trio thread.
"""

from __future__ import annotations

import contextvars
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import GossipSub

from seedswarm.gossip.libp2p.accounting import count_rpc
from seedswarm.gossip.libp2p.api import (
    Counters,
    Event,
    FrameTooLargeError,
    GossipMessage,
    HostConfig,
    HostError,
    Validator,
)
from seedswarm.gossip.libp2p.common import LogOnce, check_name, reason
from seedswarm.gossip.libp2p.guard import UNPENALISED, GuardedPubsub
from seedswarm.gossip.libp2p.tuning import (
    PUBSUB_FRAME_MIN_RATE,
    TunedQueues,
    build_gossipsub,
    pubsub_options,
    trim_router_state,
)

log = logging.getLogger(__name__)

# Set in the trio task that publishes: the wrapped validator records our own verdict there,
# because libp2p silently drops a local publish its own validator rejects.
_own_publish_verdicts: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar(
    "seedswarm_own_publish_verdicts", default=None
)


class Gossip:
    """The pubsub half of one host. ``build()`` once the libp2p host exists; the ``*_op``
    coroutines are what the facade runs on the trio thread through the bridge."""

    def __init__(self, config: HostConfig, my_id: ID, counters: Counters,
                 emit: Callable[[Event], None], log_once: LogOnce) -> None:
        self.config = config
        self._id = my_id
        self._peer_id = my_id.to_base58()
        self._counters = counters
        self._emit = emit
        self._log_once = log_once
        self._prefix = config.protocol_prefix + "/"
        self.pubsub: GuardedPubsub | None = None
        self.gossipsub: GossipSub | None = None
        self.subscribed: set[str] = set()  # full topic names

    def topic(self, name: str) -> str:
        """The wire name of a short topic name (HostError if the name is not boring)."""
        check_name("topic", name)
        return self._prefix + name

    def build(self, host: Any) -> tuple[GuardedPubsub, GossipSub]:
        gossipsub = build_gossipsub(self.config)
        pubsub = GuardedPubsub(
            host,
            gossipsub,
            on_drop=self.on_drop,
            on_rpc_sent=functools.partial(count_rpc, self._counters),
            frame_stall_s=self.config.io_timeout_s,
            frame_min_rate=PUBSUB_FRAME_MIN_RATE,
            **pubsub_options(self.config),
        )
        setattr(pubsub, "notify_subscriptions", self._deliver)  # noqa: B010 - see _deliver
        pubsub.peer_queues = TunedQueues(self.config)
        self.pubsub, self.gossipsub = pubsub, gossipsub
        return pubsub, gossipsub

    def heartbeat(self) -> None:
        """Once per heartbeat, from the host's maintenance task."""
        if self.gossipsub is not None:
            trim_router_state(self.gossipsub, self.subscribed)

    def close(self) -> None:
        # Pubsub's seen-message cache runs a sweeper *thread* that nothing ever stops: one
        # leaked thread per host otherwise.
        seen = getattr(self.pubsub, "seen_messages", None)
        if seen is not None:
            seen.stop()

    # -- operations (trio side) ---------------------------------------------------------

    async def subscribe_op(self, full: str, short: str, validator: Validator) -> None:
        assert self.pubsub is not None
        wrapped = functools.partial(self._validate, short, validator)
        self.pubsub.set_topic_validator(full, wrapped, False)
        if full in self.subscribed:
            return  # re-subscribe: the validator was replaced above
        self.subscribed.add(full)
        await self.pubsub.subscribe(full)  # its 32-slot channel stays unused: see _deliver

    async def publish_op(self, full: str, short: str, payload: bytes) -> None:
        assert self.pubsub is not None
        verdicts: list[bool] = []
        token = _own_publish_verdicts.set(verdicts)
        try:
            await self.pubsub.publish(full, payload)
        finally:
            _own_publish_verdicts.reset(token)
        if verdicts and not all(verdicts):
            # libp2p also counted it against our own score: undo that, or ten bad local
            # publishes would silently mute us.
            gs = self.gossipsub
            if gs is not None and gs.scorer is not None:
                gs.scorer.invalid_messages.pop(self._id, None)
            raise HostError(f"our own validator rejected the message published on {short}; it was not sent")
        self._counters.add("gossip_bytes_published", short, len(payload))

    async def topic_peers_op(self, full: str, mesh_only: bool) -> list[str]:
        assert self.pubsub is not None and self.gossipsub is not None
        if mesh_only:
            return sorted(str(p) for p in self.gossipsub.mesh.get(full, ()))
        return sorted(str(p) for p in self.pubsub.peer_topics.get(full, ()))

    def check_size(self, topic: str, data: bytes) -> None:
        if len(data) > self.config.max_message_bytes:
            self._counters.inc("frames_too_large")
            raise FrameTooLargeError(
                f"cannot publish {len(data)} bytes on {topic}: over max_message_bytes={self.config.max_message_bytes}"
            )

    # -- callbacks from libp2p (trio side) ---------------------------------------------

    def _validate(self, topic: str, validator: Validator, forwarder: ID, msg: Any) -> bool:
        """The libp2p sync validator around the user's validator."""
        data: bytes = msg.data
        try:
            origin = ID(msg.from_id).to_base58()
        except Exception:
            return False
        own = forwarder == self._id
        if len(data) > self.config.max_message_bytes:
            ok = False
            self._counters.inc("frames_too_large")
        else:
            try:
                ok = bool(validator(data, origin))
            except Exception as e:
                ok = False
                self._counters.inc("validator_errors")
                self._log_once(("validator_error", topic, type(e).__name__), logging.ERROR,
                               "validator of topic %s raised %s (treated as a rejection)",
                               topic, reason(e))
        if own:
            verdicts = _own_publish_verdicts.get()
            if verdicts is not None:
                verdicts.append(ok)
        elif not ok:
            self._counters.add("gossip_rejected", topic)
            self._log_once(("rejected", topic, str(forwarder)), logging.INFO,
                           "rejected a message on %s forwarded by %s (author %s); further rejections from it are only counted",
                           topic, forwarder, origin)
        return ok

    def _deliver(self, msg: Any) -> None:
        """Replaces ``Pubsub.notify_subscriptions`` on our Pubsub instance.

        libp2p hands each validated message to a per-topic channel of 32 slots that someone
        must drain, and drops (WARNING, on a logger we quiet) when it is full. We take the
        message synchronously instead, straight into the bounded bridge queue where a drop
        is counted: no channel to overflow when many messages arrive in one RPC (IWANT
        replies), and one task hop less.
        """
        try:
            origin = ID(msg.from_id).to_base58()
        except Exception:
            return
        if origin == self._peer_id:
            return  # our own publish, echoed by pubsub
        data = bytes(msg.data)
        for full in msg.topicIDs:
            if not full.startswith(self._prefix) or full not in self.subscribed:
                continue
            topic = full[len(self._prefix):]
            self._counters.add("gossip_messages_received", topic)
            self._counters.add("gossip_bytes_received", topic, len(data))
            self._emit(GossipMessage(topic, data, origin))

    def on_drop(self, peer: ID, why: str, topics: Sequence[str], exc: BaseException | None) -> None:
        """The guard dropped a peer's input. Count it, log it once per (reason, peer), and
        (except for reasons an honest peer can cause) charge the peer one invalid message (P4)
        on each of our topics involved, or on all of ours when the fault is below the message
        level (a bad frame): graylisted after about ten."""
        self._counters.add("gossip_dropped", why)
        penalised = why not in UNPENALISED
        self._log_once(("dropped", why, str(peer)), logging.WARNING if penalised else logging.INFO,
                       "dropped pubsub input from %s: %s%s; further ones are only counted",
                       peer, why, f" ({reason(exc)})" if exc is not None else "")
        gs = self.gossipsub
        if not penalised or gs is None or gs.scorer is None or peer == self._id:
            return
        ours = [t for t in topics if t in self.subscribed] or sorted(self.subscribed)
        for t in ours:
            gs.scorer.on_invalid_message(peer, t)
