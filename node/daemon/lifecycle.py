"""The daemon's life around its main loop: start-up milestones, the periodic chores, the stop
watchdog.

Kept apart from :mod:`seedswarm.node.daemon.daemon` so that the driver stays about moving
effects. The milestones (``Daemon.phases``, ``synced_at``, ``first_apply_at``, ``member_since``
in the status file) are what ``seedswarm cluster`` reports as ``join_seconds`` and what
``seedswarm bench join`` breaks a join down with.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Protocol

from seedswarm.node.core.effects import Apply
from seedswarm.node.daemon import status as status_mod
from seedswarm.node.daemon.discovery import Discovery
from seedswarm.node.daemon.netstack import announce_addrs
from seedswarm.node.daemon.peering import Peering

log = logging.getLogger("seedswarm.daemon")


class _Node(status_mod.Daemon, Protocol):
    peering: Peering | None
    discovery: Discovery

    def mark(self, phase: str) -> None: ...

    def _dial_bootstrap(self) -> None: ...


def note_apply(d: _Node, e: Apply, now: float) -> None:
    """Milestones an applied round can reach: in sync, first round applied, member."""
    core = d.core
    if core is not None and d.synced_wall is None and core.in_sync(d.now()):
        d.synced_wall = now
    if d.first_apply_wall is None and e.steps:
        d.mark("first_apply")
        d.first_apply_wall = now
        log.info("first round applied %.2f s after start (round %d)", now - d.started_wall, e.head.round)
    if d.member_since_wall is None and d.identity.public in e.head.members:
        d.member_since_wall = now
        d.mark("member")
        log.info("member of the swarm from round %d", e.head.round)


async def periodic(d: _Node) -> None:
    """Status file and metrics; peer exchange; bootstrap peers when we have none."""
    tick = 0
    while True:
        await asyncio.sleep(d.cfg.status_every_s)
        tick += 1
        core, t, peering = d.core, d.transport, d.peering
        if core is not None and d.synced_wall is None and core.in_sync(d.now()):
            d.synced_wall = time.time()
        status_mod.update_metrics(d)
        status_mod.write_status_file(d)
        if peering is not None and t is not None:
            if not t.peers():
                d._dial_bootstrap()
            if follow_auto_relay(d):
                peering.greet_all()  # our new address, now rather than at the next exchanges
            elif tick % 15 == 0:
                peering.exchange()
        d.discovery.tick()


def follow_auto_relay(d: _Node) -> bool:
    """``--relay-via auto``: once the host holds a reservation on a relay it chose (AutoNAT
    found it private), announce the circuit through it instead of the listen addresses nobody
    can dial, as a node given ``--relay-via`` does from the start. True when that changed."""
    t = d.transport
    circuits_of = getattr(t, "relay_circuits", None)  # the libp2p host's; not every transport has relays
    if not d.cfg.auto_relay or t is None or circuits_of is None or not (circuits := circuits_of()):
        return False
    announce = announce_addrs(t.listen_addrs, d.cfg.announce, d.peer_id, circuits)
    if announce == d.announce:
        return False
    d.announce = announce
    log.info("behind NAT (AutoNAT): reached through relay %s; announcing %s", ", ".join(circuits),
             " ".join(d.announce))
    return True


LAG_TICK_S = 0.1
STALL_S = 0.25


async def watch_loop_lag(d: _Node) -> None:
    """How late the event loop wakes a 100 ms timer. Whatever holds the loop (a slow handler,
    torch work that belongs in the worker thread) delays every peer's request and every gossip
    heartbeat by as much; ``loop_lag_max_s`` in the status and ``loop_stalls_total`` (over
    STALL_S) make it visible."""
    loop = asyncio.get_running_loop()
    while True:
        t0 = loop.time()
        await asyncio.sleep(LAG_TICK_S)
        lag = loop.time() - t0 - LAG_TICK_S
        d.loop_lag_max_s = max(d.loop_lag_max_s, lag)
        if lag > STALL_S:
            d.metrics.inc("loop_stalls_total", help=f"event loop wake-ups later than {STALL_S} s")


def watchdog_exit(timeout: float) -> None:
    """The stop watchdog's end: a hung transport cannot keep the process alive."""
    log.error("shutdown did not finish within %.1f s: exiting now", timeout)
    logging.shutdown()
    os._exit(1)

