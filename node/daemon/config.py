"""Settings of one daemon: a TOML file and the command line, merged into one frozen value.

Why one dataclass for both: an operator keeps the stable settings (data dir, listen and
bootstrap addresses, metrics port) in a file and overrides one or two on the command line, and
the daemon, the tests and the cluster launcher all build the same :class:`NodeConfig`. The TOML
keys are the command-line option names with ``_`` for ``-``; an unknown key is an error (a typo
must not silently fall back to a default).

Example ``node.toml``::

    genesis = "genesis.json"
    data_dir = "/var/lib/seedswarm"
    listen = ["/ip4/0.0.0.0/tcp/4001"]
    bootstrap = ["/ip4/10.0.0.1/tcp/4001/p2p/12D3KooW..."]
    metrics_port = 9101
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A setting that cannot work; the CLI prints it as one line and exits 2."""


DEVICES = ("auto", "cpu", "cuda")

DEFAULT_STATE_CACHE_MB = 1024
"""Memory for the model states a node keeps for fork switches (``localchain.STATE_BUDGET_BYTES``
says why the count of states alone is not enough): 16 states up to 16M float32 parameters,
never fewer than 2."""
LOG_FORMATS = ("auto", "json", "text")

MAX_MESSAGE_BYTES = 1 << 20
"""The largest frame a daemon sends or accepts on a direct stream or in gossip."""
MAX_CHECKPOINT_CHUNK_BYTES = MAX_MESSAGE_BYTES - 1024
"""A checkpoint chunk travels in one response frame with its envelope (digest, index, total)."""
DEFAULT_CHECKPOINT_CHUNK_BYTES = 512 * 1024
"""Why this large: a chunk costs one request, and py-libp2p's per-request cost dominates small
ones. Measured on loopback (two real hosts, 8 requests in flight, a busy 2-core machine):
64 KiB chunks move 5.8 MB/s, 256 KiB 12.9 MB/s, 1 MiB 19.4 MB/s; a 10M-parameter joiner took
24 s to fetch its 40 MB checkpoint in 64 KiB chunks. The joiner bounds the bytes it has in
flight (``joinplan.IN_FLIGHT_BYTES``), so a slow link is not flooded."""


AUTO_RELAY = "auto"
"""The ``relay_via`` value of ``--relay-via auto``: the node learns whether it is behind NAT
(AutoNAT) and chooses a relay among its peers by itself."""


@dataclass(frozen=True)
class NodeConfig:
    genesis: str = "genesis.json"
    data_dir: str = "seedswarm-data"
    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/4001",)
    #: addresses other peers should dial (default: the listen addresses, 0.0.0.0 expanded to
    #: this host's interface addresses)
    announce: tuple[str, ...] = ()
    bootstrap: tuple[str, ...] = ()
    #: serve as a circuit relay v2 for peers behind NAT (a node with a public address)
    relay: bool = False
    #: relays (``.../p2p/<relay id>``) to reserve a slot on: a node behind NAT is then reached at
    #: ``<relay>/p2p-circuit/p2p/<its id>``, which it announces instead of its listen addresses;
    #: or ``("auto",)``: let AutoNAT tell whether the node is behind NAT and, if so, reserve on a
    #: connected peer that serves as a relay (``AUTO_RELAY``)
    relay_via: tuple[str, ...] = ()
    #: never try to turn a relayed connection into a direct one by hole punching (DCUtR)
    no_hole_punch: bool = False
    device: str = "auto"
    metrics_port: int = 0  # 0: no HTTP endpoint
    metrics_host: str = "127.0.0.1"
    log_format: str = "auto"
    log_level: str = "INFO"
    #: write a content-addressed checkpoint every this many rounds (0: never)
    checkpoint_every: int = 10
    checkpoint_chunk_bytes: int = DEFAULT_CHECKPOINT_CHUNK_BYTES
    checkpoints_kept: int = 2
    #: MiB for the recent model states kept to undo rounds after a fork switch (each is a full
    #: parameter copy; at least 2 are kept whatever this says)
    state_cache_mb: int = DEFAULT_STATE_CACHE_MB
    #: data shard: index/count of the task's training set (default: derived from the key)
    shard_index: int = -1
    shard_count: int = 16
    #: stop taking committee duties at this round (0: never); the node keeps serving peers.
    #: The cluster launcher uses it so that every node ends on the same head.
    halt_at: int = 0
    #: evaluate the model every this many rounds (0: only when halting) and report it in status
    eval_every: int = 0
    #: how long to wait for a first peer and the chain before starting alone
    sync_wait_s: float = 10.0
    #: wait (up to sync_wait_s) for this many peers before taking duties: founding nodes of a
    #: swarm started together would otherwise expel the ones that start a few seconds late
    min_peers: int = 0
    max_peers: int = 64
    #: announce this node on the LAN with mDNS and dial the nodes of the run heard there
    mdns: bool = False
    status_every_s: float = 1.0
    #: a node exits 0 within this bound after SIGINT/SIGTERM, or the watchdog ends it
    shutdown_timeout_s: float = 6.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def auto_relay(self) -> bool:
        """``--relay-via auto``: the host finds out whether it is behind NAT and picks its relay."""
        return self.relay_via == (AUTO_RELAY,)

    @property
    def named_relays(self) -> tuple[str, ...]:
        """The relays the operator named (none with ``--relay-via auto``: the host's own choice
        shows in ``Libp2pHost.relay_circuits`` once it holds a reservation there)."""
        return () if self.auto_relay else self.relay_via

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.device not in DEVICES:
            problems.append(f"device must be one of {DEVICES}, not {self.device!r}")
        if self.log_format not in LOG_FORMATS:
            problems.append(f"log_format must be one of {LOG_FORMATS}, not {self.log_format!r}")
        if not 0 <= self.metrics_port < 65536:
            problems.append("metrics_port must be in 0..65535")
        if not self.listen:
            problems.append("at least one listen address is required")
        auto = AUTO_RELAY in self.relay_via
        if auto and len(self.relay_via) > 1:
            problems.append(f"relay_via {AUTO_RELAY!r} stands alone: either the node chooses its relay or you do")
        for a in (*self.listen, *self.bootstrap, *self.announce, *(() if auto else self.relay_via)):
            if not isinstance(a, str) or not a.startswith("/"):
                problems.append(f"not a multiaddr: {a!r}")
        for a in self.bootstrap:
            if "/p2p/" not in a:
                problems.append(f"bootstrap address {a!r} must end with /p2p/<peer id>")
        for a in () if auto else self.relay_via:
            if "/p2p/" not in a or "/p2p-circuit" in a:
                problems.append(f"relay address {a!r} must be a relay's own address ending with /p2p/<relay id>")
        for name in ("relay", "no_hole_punch"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, not {getattr(self, name)!r}")
        if self.checkpoint_every < 0 or self.checkpoints_kept < 1:
            problems.append("checkpoint_every >= 0, checkpoints_kept >= 1")
        if not 256 <= self.checkpoint_chunk_bytes <= MAX_CHECKPOINT_CHUNK_BYTES:
            problems.append(f"checkpoint_chunk_bytes must be between 256 and {MAX_CHECKPOINT_CHUNK_BYTES} (a chunk "
                            f"travels in one frame of at most {MAX_MESSAGE_BYTES} bytes), not {self.checkpoint_chunk_bytes}")
        if self.shard_count < 1 or self.shard_index >= self.shard_count:
            problems.append("shard_index must be below shard_count (or -1 for automatic)")
        if self.state_cache_mb < 0:
            problems.append("state_cache_mb must be >= 0")
        if self.halt_at < 0 or self.eval_every < 0 or self.max_peers < 1:
            problems.append("halt_at and eval_every must be >= 0, max_peers >= 1")
        if not isinstance(self.mdns, bool):
            problems.append(f"mdns must be true or false, not {self.mdns!r}")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)


_FIELDS = {f.name: f for f in dataclasses.fields(NodeConfig) if f.name != "extra"}
_LISTS = {"listen", "announce", "bootstrap", "relay_via"}


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML settings file; keys use ``_`` or ``-``. Raises ConfigError."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in _FIELDS:
            raise ConfigError(f"config file {path}: unknown setting {key!r} (known: {', '.join(sorted(_FIELDS))})")
        out[name] = value
    return out


def build_config(file_values: dict[str, Any], cli_values: dict[str, Any]) -> NodeConfig:
    """Defaults < TOML file < command line (a CLI value of None means 'not given')."""
    merged: dict[str, Any] = {}
    for source in (file_values, cli_values):
        for k, v in source.items():
            if v is None or k not in _FIELDS:
                continue
            if k in _LISTS and isinstance(v, list) and not v and source is cli_values:
                continue  # an empty repeatable option means "not given"
            merged[k] = v
    for k in _LISTS:
        if k in merged:
            v = merged[k]
            if isinstance(v, str):
                v = [v]
            if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
                raise ConfigError(f"{k} must be a list of multiaddr strings")
            merged[k] = tuple(v)
    for k, v in merged.items():
        want = type(_FIELDS[k].default) if _FIELDS[k].default is not dataclasses.MISSING else None
        if want in (int, float) and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ConfigError(f"{k} must be a number, not {v!r}")
        if want is int and isinstance(v, float):
            raise ConfigError(f"{k} must be an integer, not {v!r}")
        if want is str and not isinstance(v, str):
            raise ConfigError(f"{k} must be a string, not {v!r}")
    try:
        return NodeConfig(**merged)
    except TypeError as e:
        raise ConfigError(str(e)) from None
