"""What py-libp2p logs, and how much of it reaches the application's log.

On import libp2p sets its root logger to ``propagate=False`` with no handler (unless
LIBP2P_DEBUG is set), so its warnings go to ``logging.lastResort`` (raw stderr) and bypass the
daemon's configuration. ``install_log_policy()`` (called by the first ``Libp2pHost.start()``,
never at import) lets them propagate, quiets the loggers that warn about harmless things many
times a second, and demotes to DEBUG the ERROR lines libp2p writes for ordinary events:

* a peer that closes or dies (SIGKILL) while we open a stream, read from it or answer its
  identify: multistream ``handshake read failed``, Yamux ``Incomplete read`` / ``Error reading
  data`` / ``Error in handle_incoming`` / ``RawConnError during connection handling``,
  identify ``Error sending identify response`` (with a traceback);
* a connection that fails its security or muxer handshake (the caller gets a HostError);
* a failed protocol negotiation (another run or version): BasicHost's multi-line ERROR. The
  adapter raises ``ProtocolMismatchError`` (requester) and logs one line (responder) itself;
* pubsub handing a last message to a service nursery that just closed, on shutdown.

A demoted line is still there at DEBUG for whoever enables that logger. The whole policy is
left alone when LIBP2P_DEBUG is set: the operator asked for libp2p's own logging.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import Final

#: Logger levels (libp2p's own are NOTSET; one sets itself to INFO).
QUIET_LOGGERS: Final = {
    "libp2p.kad_dht": logging.ERROR,
    # everything pubsub says about a peer's input is counted by the guard (HostStats.gossip_dropped)
    "libp2p.pubsub": logging.ERROR,
    # sets itself to INFO and logs its state on every cycle
    "libp2p.network.auto_connector": logging.WARNING,
    # logs an ERROR for every failed dial (a bootstrap peer that is not up yet, a departed
    # peer); the bootstrap keeper and the daemon report failed dials themselves, once
    "libp2p.transport.tcp.tcp": logging.CRITICAL,
    # circuit relay v2 logs an ERROR for each ordinary end of a relay stream (a client that
    # closes its stream after a reservation, a circuit whose peer left) and for each bad message
    # a peer sends; what matters is counted (HostStats.relay_*) and logged once by the adapter
    "libp2p.relay.circuit_v2": logging.CRITICAL,
}

#: logger -> messages (regular expressions, matched at the start) that are ordinary events.
ORDINARY: Final = {
    "libp2p.protocol_muxer.multiselect_client": (
        r"MultiselectClient handshake: (read|write) failed",
    ),
    "libp2p.stream_muxer.yamux.yamux": (
        r"Incomplete read for (SYN |ACK )?data on stream",
        r"Error reading data for stream",
        r"Error in handle_incoming for peer \S+: (RawConnError|IncompleteReadError|ConnectionClosedError"
        r"|StreamEOF|StreamReset|ClosedResourceError|BrokenResourceError|IOException|OSError)",
        r"RawConnError during connection handling",
        r"Error closing secured_conn for peer",
    ),
    "libp2p.identity.identify.identify": (
        r"Error sending identify response to \S+: [^\n]*(Stream(Error|Reset|Closed|EOF)|ConnectionClosedError"
        r"|reset by|closed|broken)",
    ),
    "libp2p.identity.identify_push.identify_push": (
        r"Error pushing identify to peer \S+: [^\n]*(Stream|reset|closed|broken|Connection)",
    ),
    # a dial or an inbound connection that fails its handshake (the peer died half-way, or is
    # not who the address said): the caller gets a HostError, the dial policy owns retries
    "libp2p.network.swarm": (
        r"failed to upgrade security for peer",
        r"fail to upgrade mux for peer",
    ),
    "libp2p.host.basic_host": (r"Failed to open stream to peer",),
    "libp2p.tools.anyio_service.TrioManager.Swarm": (r".*Nursery is closed to new arrivals",),
    "libp2p.tools.anyio_service.TrioManager.Pubsub": (r".*Nursery is closed to new arrivals",),
}

_lock = threading.Lock()
_installed = False


class DemoteOrdinary(logging.Filter):
    """Turns a matching WARNING/ERROR record into DEBUG (dropped unless DEBUG is enabled)."""

    def __init__(self, logger_name: str, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self._logger = logging.getLogger(logger_name)
        self._pattern = re.compile("|".join(f"(?:{p})" for p in patterns), re.DOTALL)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG:
            return True
        text = record.getMessage()
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:  # the shutdown noise is only visible in the exception group
            text += " " + repr(exc) + " " + str(getattr(exc, "exceptions", ""))
        if not self._pattern.match(text):
            return True
        if not self._logger.isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info, record.exc_text = None, None  # a debug line, not a traceback
        return True


def install_log_policy() -> None:
    """Idempotent, process-wide (logging is): see the module docstring."""
    global _installed
    with _lock:
        if _installed or os.environ.get("LIBP2P_DEBUG"):
            return
        _installed = True
        logging.getLogger("libp2p").propagate = True
        for name, level in QUIET_LOGGERS.items():
            logging.getLogger(name).setLevel(level)
        for name, patterns in ORDINARY.items():
            logging.getLogger(name).addFilter(DemoteOrdinary(name, patterns))
