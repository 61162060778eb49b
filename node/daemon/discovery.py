"""Finding peers beyond the bootstrap list: the saved address book and (with ``--mdns``) the LAN.

Why a module of its own: the bootstrap list is the operator's, peer exchange (``peering``) is the
protocol's, and this is what a node remembers and overhears on its own. It feeds both sources
into :class:`Peering`, so every peer found here is dialled the same way and greeted with the same
hello: a peer of another run (or a stale entry now used by something else) is refused exactly as
before, whichever way it was found.

* At start, ``peers.json`` (:mod:`addrbook`) is loaded into the peering book and its peers are
  dialled next to the bootstrap peers; while the node has no peer at all it redials every peer it
  knows of (saved or learned since), most recently seen first.
* The book is saved every :data:`SAVE_EVERY_TICKS` status ticks when it changed, and at shutdown.
* ``--mdns`` announces the node on the LAN and dials the nodes it hears (:mod:`mdns`).

Status: ``discovery.book_loaded`` / ``book_answered`` (loaded peers that completed a hello with
us in this process) / ``book_saved`` / ``mdns_found`` / ``mdns_ignored`` (announcements heard on
the LAN that named no usable peer: the LAN is untrusted); the same numbers are metrics.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Protocol

from seedswarm.gossip.transport import Transport
from seedswarm.node.daemon import addrbook
from seedswarm.node.daemon.config import NodeConfig
from seedswarm.node.daemon.metrics import Metrics
from seedswarm.node.daemon.peering import Peering

log = logging.getLogger("seedswarm.daemon")

SAVE_EVERY_TICKS = 10
"""Status ticks (``status_every_s``, 1 s by default) between saves of a changed book: a node killed
with SIGKILL loses at most the peers of the last few seconds, and an idle swarm writes nothing."""
REDIAL_EVERY_TICKS = 10


class _Node(Protocol):
    cfg: NodeConfig
    run_id: bytes
    peer_id: str
    metrics: Metrics
    transport: Transport | None
    peering: Peering | None
    announce: list[str]

    def spawn(self, coro: Any, name: str) -> Any: ...

    def log_once(self, reason: str, peer: str, msg: str, *args: Any) -> None: ...


class Discovery:
    """The saved book and mDNS of one daemon; built once its peering exists."""

    def __init__(self, node: _Node) -> None:
        self.d = node
        self.path: Path = node.cfg.data_path / addrbook.BOOK_FILE
        self.loaded: list[addrbook.Entry] = []
        self.saved = 0
        self.mdns_found: set[str] = set()
        self.mdns_refused = 0  # announcements whose peer id or every address did not check out
        self._last: list[addrbook.Entry] | None = None
        self._mdns: Any = None
        self._tick = 0

    # ------------------------------------------------------------------ the saved book
    def load(self) -> int:
        """Read ``peers.json`` into the peering book; how many peers it gave (0 on any problem)."""
        assert self.d.peering is not None
        try:
            entries, dropped = addrbook.load(self.path, self.d.run_id, self.d.peer_id)
        except addrbook.BookFileError as e:
            log.warning("ignoring the saved address book %s: %s", self.path, e)
            self.d.metrics.inc("book_file_errors_total", help="saved address books ignored as unusable")
            return 0
        if dropped:
            log.info("saved address book: dropped %d unusable entries", dropped)
        book = self.d.peering.book
        for entry in entries:
            book.setdefault(entry.peer_id, list(entry.addrs))
        self.loaded = entries
        self._last = entries
        if entries:
            log.info("loaded %d peers from the saved address book %s", len(entries), self.path)
        return len(entries)

    def dial_saved(self, entries: list[addrbook.Entry] | None = None) -> None:
        """Dial the saved peers (default: those loaded at start), most recently seen first, up to
        ``max_peers`` connections; bootstrap peers are left to the transport that keeps them."""
        p, t = self.d.peering, self.d.transport
        if p is None or t is None:
            return
        connected = set(t.peers())
        if getattr(t, "dials_bootstrap", False):
            connected |= {a.rsplit("/p2p/", 1)[-1] for a in self.d.cfg.bootstrap}
        for e in self.loaded if entries is None else entries:
            if len(connected) >= self.d.cfg.max_peers:
                break
            if e.peer_id not in connected:
                connected.add(e.peer_id)
                p.dial(e.peer_id, e.addrs)

    def answered(self) -> int:
        """Saved peers that completed a hello with this process (they are alive and of our run)."""
        seen = self.d.peering.seen if self.d.peering is not None else {}
        return sum(1 for e in self.loaded if e.peer_id in seen)

    def entries(self) -> list[addrbook.Entry]:
        p, t = self.d.peering, self.d.transport
        if p is None:
            return []
        seen = dict(p.seen)
        now = time.time()
        for pid in (t.peers() if t is not None and t.running else []):
            if pid in seen:  # connected and greeted: seen now
                seen[pid] = now
        for e in self.loaded:  # saved peers not heard from in this process keep their old date
            seen.setdefault(e.peer_id, e.seen)
        return addrbook.rank(p.book, seen, self.d.peer_id)

    def save(self, force: bool = False) -> bool:
        entries = self.entries()
        if not entries or (not force and self._same(entries)):
            return False
        try:
            addrbook.save(self.path, self.d.run_id, entries)
        except OSError as e:
            self.d.log_once("book-save", "", "cannot save the address book %s: %s", self.path, e)
            return False
        self._last = entries
        self.saved = len(entries)
        return True

    def _same(self, entries: list[addrbook.Entry]) -> bool:
        """Unchanged but for the dates (a save per tick for fresh dates alone would be waste)."""
        last = self._last or []
        return [(e.peer_id, e.addrs) for e in entries] == [(e.peer_id, e.addrs) for e in last]

    # ------------------------------------------------------------------ life
    def start(self) -> None:
        """Dial the saved peers; start mDNS when asked for."""
        self.dial_saved()
        if self.d.cfg.mdns:
            from seedswarm.node.daemon.mdns import LanDiscovery

            self._mdns = LanDiscovery(self.d.peer_id, self.d.run_id, self.d.announce, self.on_lan_peer)
            self.d.spawn(self._mdns.run(), "mdns")

    def on_lan_peer(self, pid: str, addrs: list[str]) -> None:
        """A node announced itself on the LAN: dial it (the hello checks its run)."""
        p, t = self.d.peering, self.d.transport
        if p is None or t is None or pid == self.d.peer_id:
            return
        good = [a for a in addrs if addrbook.valid_addr(a, pid)][:addrbook.MAX_ADDRS]
        if not good or not addrbook.valid_peer_id(pid):
            self.mdns_refused += 1
            return
        if pid not in self.mdns_found:
            self.mdns_found.add(pid)
            log.info("mDNS: found %s at %s", pid, " ".join(good))
            self.d.metrics.inc("mdns_found_total", help="distinct peers heard on the LAN through mDNS")
        if pid not in t.peers() and len(t.peers()) < self.d.cfg.max_peers:
            p.dial(pid, good)

    def tick(self) -> None:
        """Each status tick: redial the saved peers while alone; save a changed book now and then."""
        self._tick += 1
        t = self.d.transport
        if self._tick % REDIAL_EVERY_TICKS == 0 and t is not None and not t.peers():
            self.dial_saved(self.entries())  # alone: every peer we know of, saved or learned since
        if self._tick % SAVE_EVERY_TICKS == 0:
            self.save()
        m = self.d.metrics
        m.set("book_peers_loaded", len(self.loaded), help="peers loaded from the saved address book at start")
        m.set("book_peers_answered", self.answered(), help="saved peers that answered our hello since start")
        m.set("book_peers_saved", self.saved, help="peers in the address book at its last save")
        if self._mdns is not None:
            m.set("mdns_ignored", self.mdns_ignored(), help="announcements heard on the LAN that named no usable peer")

    def close(self) -> None:
        """At shutdown, before the transport stops: save the book, stop announcing. Never raises:
        nothing here may keep the transport from closing."""
        try:
            if self._mdns is not None:
                self._mdns.close()
            self.save(force=True)
        except Exception as e:  # noqa: BLE001 - a bug here must not turn a clean stop into a hang
            log.error("saving the address book at shutdown failed: %r", e, exc_info=e)

    def mdns_ignored(self) -> int:
        """Announcements that named no usable peer: those the listener dropped (no single peer id,
        a failed lookup) and those refused here (no address or peer id that parses)."""
        return self.mdns_refused + (self._mdns.ignored if self._mdns is not None else 0)

    def status(self) -> dict[str, Any]:
        return {"book_file": str(self.path), "book_loaded": len(self.loaded), "book_answered": self.answered(),
                "book_saved": self.saved, "mdns": self.d.cfg.mdns, "mdns_found": len(self.mdns_found),
                "mdns_ignored": self.mdns_ignored()}
