"""Small helpers every module of the adapter uses: names, exception text, log-once."""

from __future__ import annotations

import logging
from typing import Any, Final

import trio

from seedswarm.gossip.libp2p.api import HostError

#: The adapter's own logger: every module's dedup'd lines go here (``LogOnce``).
log = logging.getLogger("seedswarm.gossip.libp2p")

#: How many distinct log-once keys a host remembers before it forgets them all (a hostile peer
#: cycling identities must not grow this without bound; forgetting only repeats a log line).
LOG_ONCE_MAX: Final = 4096


def check_name(kind: str, name: str) -> None:
    """multistream-select is newline-delimited and topics are plain strings: keep names boring."""
    if not name or len(name) > 100 or not all(c.isalnum() or c in "-_." for c in name):
        raise HostError(f"invalid {kind} name {name!r}: use 1-100 characters of [A-Za-z0-9._-]")


def flatten(exc: BaseException) -> BaseException:
    """The first leaf of an exception group (libp2p raises through trio nurseries)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def is_cancellation(exc: BaseException) -> bool:
    """trio.Cancelled, possibly wrapped in exception groups by nurseries."""
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(is_cancellation(e) for e in exc.exceptions)
    return False


def reason(exc: BaseException) -> str:
    """One line: the leaf exception and up to three causes (libp2p wraps errors deeply)."""
    exc = flatten(exc)
    parts = [f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__]
    cause = exc.__cause__
    while cause is not None and len(parts) < 4:
        cause = flatten(cause)
        if str(cause):
            parts.append(str(cause))
        cause = cause.__cause__
    return " <- ".join(parts)


class LogOnce:
    """Log a line the first time its key is seen: hostile or broken peers repeat themselves,
    and the counters (``HostStats``) carry the totals. Thread-safe enough: a race logs twice."""

    def __init__(self, logger: logging.Logger = log, limit: int = LOG_ONCE_MAX) -> None:
        self._logger = logger
        self._limit = limit
        self._seen: set[tuple[str, ...]] = set()

    def __call__(self, key: tuple[str, ...], level: int, msg: str, *args: Any) -> None:
        if key in self._seen:
            return
        if len(self._seen) >= self._limit:
            self._seen.clear()
        self._seen.add(key)
        self._logger.log(level, msg, *args)
