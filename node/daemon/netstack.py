"""The daemon's real network: the libp2p transport with the node's settings, and the
addresses it announces.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
from collections.abc import Sequence

from seedswarm.crypto.keys import Identity
from seedswarm.gossip import transport as tp
from seedswarm.gossip.wire import protocol_prefix
from seedswarm.node.daemon.config import MAX_MESSAGE_BYTES, NodeConfig


def local_ipv4s() -> list[str]:
    """This host's IPv4 interface addresses (Linux ioctl), loopback last: to announce 0.0.0.0."""
    out: list[str] = []
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
                out.append(socket.inet_ntoa(raw[20:24]))
    return sorted(set(out), key=lambda a: (a.startswith("127."), a))


def announce_addrs(listen_addrs: Sequence[str], configured: Sequence[str], peer_id: str,
                   relay_via: Sequence[str] = ()) -> list[str]:
    """The addresses a node hands its peers. Behind NAT (``relay_via``): its circuit addresses
    through each relay, then only the ``configured`` ones: its listen addresses are private and
    a peer that dials them waits out a timeout before it tries the next one."""
    circuits = [f"{r}/p2p-circuit/p2p/{peer_id}" for r in relay_via]
    if relay_via:
        return circuits + [a if "/p2p/" in a else f"{a}/p2p/{peer_id}" for a in configured]
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


def load_libp2p() -> None:
    """Import libp2p (about a second of start-up) before the transport is built, so that the
    caller chooses when: `seedswarm node` does it while its garbage collector is off."""
    import seedswarm.gossip.libp2p  # noqa: F401


def libp2p_transport(identity: Identity, node: NodeConfig, run_id: bytes) -> tp.Transport:
    from seedswarm.gossip.libp2p import HostConfig, HostError, Libp2pHost

    # Its bootstrap keeper redials the bootstrap peers with backoff (the daemon need not).

    # The NAT machinery runs where it serves: hole punching upgrades relayed connections, which
    # only a node behind NAT (--relay-via) has; AutoNAT answers and asks on relays and on nodes
    # behind them. A node with neither keeps its host as lean as before: every extra service
    # acts on each of its connections, hostile ones included (the fuzz bench measured it).
    # With --relay-via auto the node may be behind NAT: it asks (AutoNAT) and chooses a relay.
    natted = bool(node.relay_via)
    cfg = HostConfig(identity_seed=identity.seed, listen=list(node.listen), bootstrap=list(node.bootstrap),
                     protocol_prefix=protocol_prefix(run_id), max_message_bytes=MAX_MESSAGE_BYTES,
                     relay_service=node.relay, relays=list(node.named_relays), auto_relay=node.auto_relay,
                     hole_punch=natted and not node.no_hole_punch, autonat=natted or node.relay)
    try:
        host = Libp2pHost(cfg)
    except HostError as e:
        raise tp.TransportError(str(e)) from e
    return host
