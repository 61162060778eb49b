"""The TCP level: the listen-port pre-check and the transport byte counters.

Both are owned by one host instance; nothing here patches libp2p.

Byte counting: every TCP connection of a host, dialled or accepted, goes through
``swarm.upgrader.upgrade_security(raw_conn, ...)`` before anything else is read or written on it.
``CountingUpgrader`` (our instance replaces the swarm's) wraps the socket stream inside that
``RawConnection`` with ``CountedStream`` there, below Noise, so the counts include encryption,
muxing and gossip forwarding: what the operator's network carries. Only the few bytes the
listener may peek at before the upgrade (none for plain TCP in 0.8.1) are missed.
"""

from __future__ import annotations

import socket
from typing import Any

import multiaddr
from libp2p.abc import IRawConnection, ISecureConn
from libp2p.connection_types import ConnectionType
from libp2p.custom_types import TMuxerOptions, TSecurityOptions
from libp2p.io.abc import ReadWriteCloser
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.transport.upgrader import TransportUpgrader

from seedswarm.gossip.libp2p.api import Counters, HostError


def tcp_host_port(ma: multiaddr.Multiaddr) -> tuple[socket.AddressFamily, str, int]:
    protos = [p.name for p in ma.protocols()]
    if len(protos) != 2 or protos[1] != "tcp" or protos[0] not in ("ip4", "ip6"):
        raise HostError(f"cannot listen on {ma}: only /ip4/<addr>/tcp/<port> and /ip6/... are supported")
    family = socket.AF_INET if protos[0] == "ip4" else socket.AF_INET6
    return family, str(ma.value_for_protocol(protos[0])), int(ma.value_for_protocol("tcp"))


def claim_listen_port(ma: multiaddr.Multiaddr) -> multiaddr.Multiaddr:
    """Check that a TCP listen address is free; turn port 0 into a concrete free port.

    py-libp2p binds listeners with SO_REUSEPORT (for hole punching), so a second host on the
    same port *succeeds* and the kernel splits inbound connections between the two. We bind
    once ourselves first, without SO_REUSEPORT, to detect a port that is really in use.

    With SO_REUSEADDR: the connections of a host that just stopped or crashed linger in
    TIME-WAIT (or FIN-WAIT) on this port for up to a minute; a plain bind counts them as 'in
    use', so a restart with the same command failed for about 60 s. SO_REUSEADDR ignores them
    and still fails on a live listener (pinned by tests/test_libp2p_host.py).
    """
    family, host, port = tcp_host_port(ma)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise HostError(f"cannot listen on {ma}: {e.strerror or e}") from e
        real_port = sock.getsockname()[1]
    finally:
        sock.close()
    proto = "ip4" if family == socket.AF_INET else "ip6"
    return multiaddr.Multiaddr(f"/{proto}/{host}/tcp/{real_port}")


def listen_address_problem(addr: str) -> str | None:
    """What ``Libp2pHost.start()`` would say about listening on ``addr``, or None if it is free.

    For callers that must refuse a busy port before they write anything (the node CLI): the
    same check, SO_REUSEADDR included, so a restart right after a stop is not refused.
    """
    try:
        ma = multiaddr.Multiaddr(addr)
    except Exception as e:
        return f"bad listen multiaddr {addr!r}: {e}"
    try:
        claim_listen_port(ma)
    except HostError as e:
        return str(e)
    return None


class CountedStream(ReadWriteCloser):
    """A connection's socket stream that counts the bytes it moves into a host's Counters."""

    def __init__(self, inner: ReadWriteCloser, counters: Counters) -> None:
        self._inner = inner
        self._counters = counters

    async def write(self, data: bytes) -> None:
        await self._inner.write(data)
        self._counters.inc("transport_bytes_sent", len(data))

    async def read(self, n: int | None = None) -> bytes:
        data = await self._inner.read(n)
        self._counters.inc("transport_bytes_received", len(data))
        return data

    async def close(self) -> None:
        await self._inner.close()

    def get_remote_address(self) -> tuple[str, int] | None:
        return self._inner.get_remote_address()

    def __getattr__(self, name: str) -> Any:  # anything else a transport stream offers
        return getattr(self._inner, name)


class CountingUpgrader(TransportUpgrader):
    """libp2p's upgrader that first makes the raw connection count its bytes (see module doc)."""

    def __init__(self, security: TSecurityOptions, muxers: TMuxerOptions, counters: Counters) -> None:
        super().__init__(security, muxers)
        self._counters = counters

    async def upgrade_security(
        self, raw_conn: IRawConnection, is_initiator: bool, peer_id: ID | None = None
    ) -> ISecureConn:
        # A relayed connection (circuit relay v2) runs over a stream of our connection to the
        # relay, whose socket already counts its bytes: it is not counted a second time.
        if isinstance(raw_conn, RawConnection) and not isinstance(raw_conn.stream, CountedStream) \
                and raw_conn.get_connection_type() != ConnectionType.RELAYED:
            raw_conn.stream = CountedStream(raw_conn.stream, self._counters)
        return await super().upgrade_security(raw_conn, is_initiator, peer_id)
