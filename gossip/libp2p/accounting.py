"""Where a host's socket bytes go, by kind: always-on counters, cheap enough to leave on.

Three places are counted, each owned by one host instance (nothing in libp2p is patched):

* the socket (``transport.CountedStream``, below Noise): ``transport_bytes_sent/received``;
* every muxed stream, per protocol id (``CountedMuxedStream``, installed by the host's
  notifee when libp2p opens the stream, before multistream-select writes a byte): the payload
  the stream carried, by kind (``payload_kind``); what a stream writes before its protocol is
  agreed is the multistream-select negotiation;
* every pubsub RPC we write (``rpc_split``, called from ``GuardedPubsub.write_msg``): how much
  of the ``/meshsub`` payload is message data, message envelope (author, seqno, signature,
  topic), the sender's signed peer record, subscriptions and each kind of control (IHAVE,
  IWANT, GRAFT, PRUNE, IDONTWANT).

``HostStats.sent_by_kind()`` puts them together; the socket total minus every stream's payload
is Noise and Yamux framing (plus the security and muxer negotiation, below any stream). One
lock per write, a dict update: nothing next to a Noise encryption.
"""

from __future__ import annotations

from typing import Any, Final

from libp2p.abc import IMuxedStream
from libp2p.pubsub.pb import rpc_pb2

from seedswarm.gossip.libp2p.api import Counters

#: Kind of the circuit relay streams: on a node behind NAT, what it exchanged with peers through
#: a relay; on the relay, what it forwarded.
RELAY: Final = "relay"
#: Kinds of stream payload that are not our own protocols (``/ipfs/...`` protocols of libp2p).
LIBP2P_KINDS: Final = {
    "/ipfs/id/1.0.0": "identify",
    "/ipfs/id/push/1.0.0": "identify-push",
    "/ipfs/ping/1.0.0": "ping",
    # circuit relay v2: the reservation and connect messages, then every byte of the relayed
    # connections that run over these streams (their own streams are not counted again)
    "/libp2p/circuit/relay/0.2.0/hop": RELAY,
    "/libp2p/circuit/relay/0.2.0/stop": RELAY,
    "/libp2p/dcutr": "dcutr",
    "/libp2p/autonat/1.0.0": "autonat",
}
#: Kind of the bytes a stream moves before its protocol is agreed.
MULTISTREAM: Final = "multistream"
#: Kind of every GossipSub stream (``/meshsub/<version>``); ``rpc_split`` divides it.
GOSSIPSUB: Final = "gossipsub"


def payload_kind(protocol_id: str | None, prefix: str) -> str:
    """The kind a stream's payload is counted under: ``stream/<name>`` for our own protocols
    (``<prefix>/<name>``), ``gossipsub``, ``identify``/``identify-push``/``ping``, or the id.

    Only ids that negotiation accepted get here (ours, or libp2p's), so the set is small.
    """
    if protocol_id is None:
        return MULTISTREAM
    if protocol_id.startswith(prefix):
        return "stream/" + protocol_id[len(prefix):]
    if protocol_id.startswith("/meshsub/"):
        return GOSSIPSUB
    return LIBP2P_KINDS.get(protocol_id, protocol_id)


class CountedMuxedStream:
    """A net stream's muxed stream that counts what it carries under its protocol's kind.

    The kind is looked up at each read and write (the protocol is set on the net stream after
    negotiation, and a negotiation's own bytes count as ``multistream``). Everything else is
    the inner Yamux stream's.
    """

    def __init__(self, inner: IMuxedStream, net_stream: Any, counters: Counters, prefix: str) -> None:
        self._inner = inner
        self._net = net_stream
        self._counters = counters
        self._prefix = prefix

    def _kind(self) -> str:
        return payload_kind(getattr(self._net, "protocol_id", None), self._prefix)

    async def write(self, data: bytes) -> None:
        await self._inner.write(data)
        self._counters.add("payload_bytes_sent", self._kind(), len(data))

    async def read(self, n: int | None = None) -> bytes:
        data = await self._inner.read(n)
        self._counters.add("payload_bytes_received", self._kind(), len(data))
        return data

    def __getattr__(self, name: str) -> Any:  # close, reset, muxed_conn, ... as the inner stream
        return getattr(self._inner, name)


def install_stream_counter(net_stream: Any, counters: Counters, prefix: str) -> None:
    """Make a just-opened net stream count its payload (idempotent)."""
    inner = getattr(net_stream, "muxed_stream", None)
    if inner is not None and not isinstance(inner, CountedMuxedStream):
        net_stream.muxed_stream = CountedMuxedStream(inner, net_stream, counters, prefix)


def _varint_size(n: int) -> int:
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


def _fields(items: Any) -> int:
    """Bytes a repeated protobuf field takes on the wire: per item a tag, its length, its body."""
    total = 0
    for item in items:
        n = item.ByteSize()
        total += 1 + _varint_size(n) + n
    return total


def rpc_split(rpc: rpc_pb2.RPC) -> dict[str, int]:
    """One written RPC's bytes by part (the rest of its frame is the varint and field headers).

    ``data``: the messages' payloads (what the application published); ``envelope``: the rest of
    each message (author, seqno, topic, signature, key); ``sender-record``: the signed peer record
    py-libp2p attaches to RPCs; then subscriptions and control by type.
    """
    out: dict[str, int] = {}
    if rpc.publish:
        data = sum(len(m.data) for m in rpc.publish)
        out["data"] = data
        out["envelope"] = _fields(rpc.publish) - data
    if rpc.senderRecord:
        n = len(rpc.senderRecord)
        out["sender-record"] = 1 + _varint_size(n) + n
    if rpc.subscriptions:
        out["subscriptions"] = _fields(rpc.subscriptions)
    if rpc.HasField("control"):
        c = rpc.control
        for name, items in (("ihave", c.ihave), ("iwant", c.iwant), ("graft", c.graft),
                            ("prune", c.prune), ("idontwant", c.idontwant)):
            if items:
                out[name] = _fields(items)
    return out


def count_rpc(counters: Counters, rpc: rpc_pb2.RPC) -> None:
    """Count one RPC we wrote (``HostStats.gossip_rpc_bytes_sent``)."""
    for part, n in rpc_split(rpc).items():
        counters.add("gossip_rpc_bytes_sent", part, n)
