"""The address book on disk: the peers a node learned, kept across restarts.

Why: a node learns peers from its bootstrap list and from the books that hellos carry, but that
book lived only in memory, so a node restarted after its bootstrap peers were gone could not find
the swarm again. ``peers.json`` in the data dir keeps the most useful entries (peers we were
connected to, most recently seen first, then peers we only heard of), bounded by
:data:`MAX_SAVED`, and the daemon dials them at start next to its bootstrap list.

The file is written atomically (temp file, fsync, rename) and read defensively: it is as
untrusted as the network (another run's data dir copied in, a truncated disk, a hand edit), so a
file that does not parse, belongs to another run, or is too large is ignored with one clear
reason (:class:`BookFileError`), and bad entries (addresses that are not multiaddrs ending in
``/p2p/<the entry's id>``, our own id) are dropped one by one. Nothing here touches the network.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from seedswarm.crypto.keys import public_key_of
from seedswarm.node.files import atomic_write

BOOK_FILE = "peers.json"
FORMAT = 1
MAX_SAVED = 256
"""Entries kept on disk: far more than a node dials (``max_peers``), few enough that the file
stays a few tens of kB and loads in milliseconds."""
MAX_ADDRS = 4
MAX_FILE_BYTES = 1 << 20
MAX_ADDR_LEN = 256


class BookFileError(ValueError):
    """The book file cannot be used (the daemon logs the reason once and starts without it)."""


@dataclass(frozen=True)
class Entry:
    peer_id: str
    addrs: tuple[str, ...]
    seen: float = 0.0  # wall time we last talked to it (0: only heard of it from other peers)


def valid_addr(addr: object, peer_id: str) -> bool:
    """A multiaddr that parses and names ``peer_id`` as its last component (relay addresses
    ``.../p2p/R/p2p-circuit/p2p/<id>`` included)."""
    if not isinstance(addr, str) or not addr.startswith("/") or len(addr) > MAX_ADDR_LEN:
        return False
    if not addr.endswith(f"/p2p/{peer_id}") or not addr.isprintable() or " " in addr:
        return False
    # the id itself is checked by valid_peer_id; parsing it again here would cost 6x (~66 us)
    where = addr[:-len(f"/p2p/{peer_id}")]
    known = _PARSED.get(where)
    if known is None:
        known = _parses(where)
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[where] = known
    return known


# The parser costs 10-90 us an address (idle or loaded machine) and the book is ranked on the event
# loop every few seconds: each address is parsed once (bounded, so hostile books cannot grow it).
_PARSED: dict[str, bool] = {}
_PARSED_MAX = 8192


def _parses(where: str) -> bool:
    if not where:
        return False
    from multiaddr import Multiaddr  # parses every protocol libp2p dials (and rejects the rest)

    try:
        return bool(Multiaddr(where).protocols())
    except Exception:  # noqa: BLE001 - the parser raises several unrelated types on bad input
        return False


def valid_peer_id(peer_id: object) -> bool:
    if not isinstance(peer_id, str):
        return False
    try:
        public_key_of(peer_id)
    except ValueError:
        return False
    return True


def rank(book: Mapping[str, Iterable[str]], seen: Mapping[str, float], me: str,
         limit: int = MAX_SAVED) -> list[Entry]:
    """The entries worth keeping: peers we talked to, most recently first, then peers we only
    heard of (in the order we learned them); our own id and unusable addresses left out."""
    # sorted first, checked until the bound is reached: a book of 4096 peers costs ~limit checks
    order = sorted(book, key=lambda pid: -float(seen.get(pid, 0.0)))  # stable: heard-of keep their order
    out: list[Entry] = []
    for pid in order:
        if len(out) >= limit:
            break
        if pid == me or not valid_peer_id(pid):
            continue
        good = tuple(a for a in list(book[pid])[:2 * MAX_ADDRS] if valid_addr(a, pid))[:MAX_ADDRS]
        if good:
            out.append(Entry(pid, good, float(seen.get(pid, 0.0))))
    return out


def encode(run_id: bytes, entries: Iterable[Entry]) -> bytes:
    doc = {"format": FORMAT, "run_id": run_id.hex(), "saved_at": time.time(),
           "peers": [{"id": e.peer_id, "addrs": list(e.addrs), "seen": e.seen} for e in entries]}
    return (json.dumps(doc, indent=1) + "\n").encode()


def save(path: Path, run_id: bytes, entries: list[Entry]) -> None:
    """Replace the book file atomically (OSError on a full or read-only disk: the caller logs)."""
    atomic_write(path, encode(run_id, entries), mode=0o600)


def decode(data: bytes, run_id: bytes, me: str, limit: int = MAX_SAVED) -> tuple[list[Entry], int]:
    """(usable entries, entries dropped); BookFileError when the file as a whole is unusable."""
    if len(data) > MAX_FILE_BYTES:
        raise BookFileError(f"larger than {MAX_FILE_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise BookFileError(f"not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("peers"), list):
        raise BookFileError(f"not a format-{FORMAT} address book")
    if doc.get("run_id") != run_id.hex():
        run = doc.get("run_id")
        raise BookFileError(f"written for another run ({str(run)[:16]!r}, this run is {run_id.hex()[:16]})")
    out: list[Entry] = []
    dropped = 0
    ids: set[str] = set()
    items: list[object] = doc["peers"]
    for n, item in enumerate(items):
        if len(out) >= limit or n >= 2 * limit:  # a hostile file of junk costs a bounded time
            dropped += len(items) - n
            break
        pid = item.get("id") if isinstance(item, dict) else None
        addrs = item.get("addrs") if isinstance(item, dict) else None
        seen = item.get("seen", 0.0) if isinstance(item, dict) else None
        if (pid == me or pid in ids or not valid_peer_id(pid) or not isinstance(addrs, list)
                or not isinstance(seen, int | float) or isinstance(seen, bool)):
            dropped += 1
            continue
        assert isinstance(pid, str)
        good = tuple(a for a in addrs[:MAX_ADDRS] if valid_addr(a, pid))
        if not good:
            dropped += 1
            continue
        ids.add(pid)
        out.append(Entry(pid, good, float(seen)))
    return out, dropped


def load(path: Path, run_id: bytes, me: str, limit: int = MAX_SAVED) -> tuple[list[Entry], int]:
    """Read the book file: ([], 0) when there is none; BookFileError when it cannot be used."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return [], 0
    except OSError as e:
        raise BookFileError(f"cannot read it: {e.strerror}") from None
    return decode(data, run_id, me, limit)
