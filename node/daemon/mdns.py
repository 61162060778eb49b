"""mDNS on a LAN (``seedswarm node --mdns``): announce this node, hear the others, no bootstrap list.

Why our own small module over zeroconf rather than py-libp2p's ``libp2p.discovery.mdns`` (0.8.1):
that one lives inside the libp2p host on the trio thread, calls back on zeroconf's own thread,
writes the host's peerstore from there and reports discoveries through a process-wide singleton;
it advertises the host's transport addresses (``/ip4/0.0.0.0/...`` for a node listening on every
interface) and finds its own IP by "connecting" a UDP socket to 8.8.8.8, which fails on an
isolated LAN and falls back to 127.0.0.1. Here zeroconf's asyncio API runs on the daemon's own
event loop (no thread), the records carry the addresses the node announces to its peers, and a
discovery is only a hint: the peer is dialled through :class:`Peering` and greeted, so the
hello's run-id check refuses a node of another run exactly as it does a bootstrap peer.

Records follow the libp2p mDNS spec as py-libp2p writes them (service ``_p2p._udp.local.``, a
random instance name, TXT ``dnsaddr=<multiaddr>/p2p/<id>``, ``dnsaddr2=`` ...), so a py-libp2p
node and this one hear each other. A LAN is trusted no more than the internet: lookups are
sequential, bounded by a small queue, and each at most :data:`LOOKUP_TIMEOUT_MS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger("seedswarm.daemon")

SERVICE_TYPE = "_p2p._udp.local."
LOOKUP_TIMEOUT_MS = 3000
MAX_PENDING = 64  # service names waiting to be looked up; more (a flood) are dropped
MAX_NAMES = 4096  # names already looked up, not asked again (bounded: a flood cannot grow it)


def _ipv4_of(addr: str) -> str | None:
    parts = addr.strip("/").split("/")
    if len(parts) >= 4 and parts[0] == "ip4" and parts[2] == "tcp":
        return parts[1]
    return None


def txt_addrs(properties: dict[bytes, bytes | None]) -> list[str]:
    """The multiaddrs of a peer's TXT record (keys ``dnsaddr``, ``dnsaddr2``, ...), in key order."""
    out: list[tuple[str, str]] = []
    for k, v in properties.items():
        if not isinstance(k, bytes) or not k.startswith(b"dnsaddr") or not isinstance(v, bytes):
            continue
        with contextlib.suppress(UnicodeDecodeError):
            out.append((k.decode("ascii"), v.decode("utf-8")))
    return [v for _, v in sorted(out, key=lambda kv: (len(kv[0]), kv[0]))][:8]


class LanDiscovery:
    """Announce ``announce`` (this node's dialable addresses) and report peers heard on the LAN
    to ``on_peer(peer id, multiaddrs)`` on the event loop."""

    def __init__(self, peer_id: str, run_id: bytes, announce: list[str],
                 on_peer: Callable[[str, list[str]], None]) -> None:
        self.peer_id = peer_id
        self.run_id = run_id
        self.addrs = [a for a in announce if (ip := _ipv4_of(a)) is not None and not ip.startswith("127.")]
        self.on_peer = on_peer
        #: announcements heard that named no usable peer (lookup failed or raised, no address,
        #: addresses of several peers): the LAN is untrusted, so each costs a count, never a task
        self.ignored = 0
        self.name = f"{secrets.token_hex(16)}.{SERVICE_TYPE}"
        self._queue: asyncio.Queue[str] = asyncio.Queue(MAX_PENDING)
        self._asked: set[str] = set()
        self._azc: Any = None
        self._browser: Any = None
        self._closed = False

    def _service(self) -> Any:
        from zeroconf import ServiceInfo

        ips = sorted({ip for a in self.addrs if (ip := _ipv4_of(a)) is not None})
        port = int(self.addrs[0].strip("/").split("/")[3])
        props = {(b"dnsaddr" if i == 0 else f"dnsaddr{i + 1}".encode()): a.encode()
                 for i, a in enumerate(self.addrs[:8])}
        return ServiceInfo(SERVICE_TYPE, self.name, port=port, properties=props,
                           server=f"{self.name.split('.')[0]}.local.",
                           addresses=[socket.inet_aton(ip) for ip in ips])

    async def run(self) -> None:
        """Announce and listen until cancelled (the daemon's task group owns this task)."""
        if not self.addrs:
            log.warning("mDNS: no LAN address to announce (listening on loopback only?): mDNS is off")
            return
        try:
            from zeroconf import IPVersion, ServiceStateChange
            from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf
        except ImportError:
            log.warning("mDNS: the zeroconf package is not installed: mDNS is off")
            return
        ips = sorted({ip for a in self.addrs if (ip := _ipv4_of(a)) is not None})
        try:
            # only the interfaces we announce: not every interface of the host (docker bridges, VPNs)
            self._azc = AsyncZeroconf(interfaces=ips, ip_version=IPVersion.V4Only)
        except OSError as e:
            log.warning("mDNS: cannot open the multicast socket on %s: %s: mDNS is off", ips, e)
            return

        def changed(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
            if (state_change in (ServiceStateChange.Added, ServiceStateChange.Updated)
                    and name != self.name and name not in self._asked):
                with contextlib.suppress(asyncio.QueueFull):
                    self._queue.put_nowait(name)

        try:
            await (await self._azc.async_register_service(self._service()))
            self._browser = AsyncServiceBrowser(self._azc.zeroconf, SERVICE_TYPE, handlers=[changed])
            log.info("mDNS: announcing %s on %s", " ".join(self.addrs), " ".join(ips))
            while True:
                name = await self._queue.get()
                if name in self._asked:
                    continue
                if len(self._asked) < MAX_NAMES:
                    self._asked.add(name)
                await self._lookup(name)
        finally:
            await self.aclose()

    async def _lookup(self, name: str) -> None:
        from zeroconf.asyncio import AsyncServiceInfo

        info = AsyncServiceInfo(SERVICE_TYPE, name)
        try:
            found = await info.async_request(self._azc.zeroconf, LOOKUP_TIMEOUT_MS)
        except Exception as e:  # noqa: BLE001 - a malformed answer on the LAN must not stop the node
            log.debug("mDNS: lookup of %s failed: %r", name, e)
            self.ignored += 1
            return
        if not found:
            self._asked.discard(name)  # a later announcement may answer
            return
        addrs = txt_addrs(dict(info.properties or {}))
        pids = {a.rsplit("/p2p/", 1)[-1] for a in addrs if "/p2p/" in a}
        if len(pids) == 1:
            self.on_peer(pids.pop(), addrs)
        else:
            self.ignored += 1
            log.debug("mDNS: %s announced no usable address (%d peer ids)", name, len(pids))

    async def aclose(self) -> None:
        """Say goodbye on the LAN and close the sockets (idempotent; bounded by zeroconf's own
        timeouts, and the daemon's stop watchdog above them)."""
        if self._closed or self._azc is None:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            if self._browser is not None:
                await self._browser.async_cancel()
            await asyncio.wait_for(self._azc.async_close(), 2.0)

    def close(self) -> None:
        """Close from synchronous code (the daemon's stop): without a goodbye if not yet closed."""
        if self._closed or self._azc is None:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._azc.zeroconf.close()
