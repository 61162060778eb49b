"""The daemon's real network: the libp2p transport with the node's settings, and the
addresses it announces.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
from collections.abc import Sequence
from typing import Any

from seedswarm.crypto.keys import Identity
from seedswarm.gossip import transport as tp
from seedswarm.gossip.wire import protocol_prefix
from seedswarm.node.daemon.config import NodeConfig

MAX_MESSAGE_BYTES = 1 << 20


def local_ipv4s() -> list[str]:
    """This host's IPv4 interface addresses (Linux ioctl), loopback last: to announce 0.0.0.0."""
    out: list[str] = []
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
                out.append(socket.inet_ntoa(raw[20:24]))
    return sorted(set(out), key=lambda a: (a.startswith("127."), a))


def announce_addrs(listen_addrs: Sequence[str], configured: Sequence[str], peer_id: str) -> list[str]:
    if configured:
        return [a if "/p2p/" in a else f"{a}/p2p/{peer_id}" for a in configured]
    out: list[str] = []
    for a in listen_addrs:
        if a.startswith("/ip4/0.0.0.0/"):
            ips = local_ipv4s()
            non_loop = [ip for ip in ips if not ip.startswith("127.")]
            out += [a.replace("/ip4/0.0.0.0/", f"/ip4/{ip}/", 1) for ip in (non_loop or ips)]
        else:
            out.append(a)
    return out


class _Libp2pTransport:
    """The libp2p host as a ``Transport``: its events and errors in the transport's types."""

    dials_bootstrap = True  # its bootstrap keeper redials them with backoff

    def __init__(self, host: Any) -> None:
        self.host = host

    def __getattr__(self, name: str) -> Any:
        return getattr(self.host, name)

    @property
    def running(self) -> bool:
        return bool(self.host.running)

    @property
    def listen_addrs(self) -> list[str]:
        return list(self.host.listen_addrs)

    @property
    def stats(self) -> Any:
        return self.host.stats

    async def _call(self, coro: Any) -> Any:
        from seedswarm.gossip.libp2p_host import HostError, ProtocolMismatchError

        try:
            return await coro
        except ProtocolMismatchError as e:
            raise tp.ProtocolMismatch(str(e)) from e
        except HostError as e:
            raise tp.TransportError(str(e)) from e

    async def start(self) -> None:
        await self._call(self.host.start())

    async def stop(self) -> None:
        await self.host.stop()

    async def publish(self, topic: str, data: bytes) -> None:
        await self._call(self.host.publish(topic, data))

    async def request(self, peer_id: str, protocol: str, data: bytes, timeout: float = 10.0) -> bytes:
        return bytes(await self._call(self.host.request(peer_id, protocol, data, timeout=timeout)))

    async def connect(self, multiaddr_str: str) -> str:
        return str(await self._call(self.host.connect(multiaddr_str)))

    async def disconnect(self, peer_id: str) -> None:
        await self._call(self.host.disconnect(peer_id))

    async def next_event(self) -> tp.Event:
        from seedswarm.gossip import libp2p_host as lh

        ev = await self._call(self.host.next_event())
        if isinstance(ev, lh.GossipMessage):
            return tp.GossipMessage(ev.topic, ev.data, ev.from_peer)
        if isinstance(ev, lh.PeerConnected):
            return tp.PeerConnected(ev.peer)
        return tp.PeerDisconnected(ev.peer)


def libp2p_transport(identity: Identity, node: NodeConfig, run_id: bytes) -> tp.Transport:
    from seedswarm.gossip.libp2p_host import HostConfig, HostError, Libp2pHost

    cfg = HostConfig(identity_seed=identity.seed, listen=list(node.listen), bootstrap=list(node.bootstrap),
                     protocol_prefix=protocol_prefix(run_id), max_message_bytes=MAX_MESSAGE_BYTES)
    try:
        host = Libp2pHost(cfg)
    except HostError as e:
        raise tp.TransportError(str(e)) from e
    return _Libp2pTransport(host)  # type: ignore[return-value]
