"""The networked node: an asyncio driver of the sans-IO :class:`NodeCore` over py-libp2p.

The simulator (``sim/engine.py``) and this daemon drive the same core; this one carries its
effects out for real:

* ``Publish``  -> GossipSub on the run's topic (records, joins, leaves, fraud proofs only: the
  network-wide rate stays at a few messages per second, DESIGN.md section 6);
* ``Send``     -> a direct libp2p stream with a versioned protocol id (contributions, record
  inputs, chain sync); answers come back as ``on_message`` calls;
* ``Estimate`` -> a worker thread (torch never runs on the loop or on the trio thread);
* ``Apply``    -> replay into :class:`ModelStates`, then the crash-safe :class:`ChainStore`
  (truncated to the common ancestor first on a fork switch), then a checkpoint every
  ``checkpoint_every`` rounds;
* ``Rejected`` -> metrics, one log line per (reason, peer), strikes towards a temporary ban.

Life of a node: replay the local store (newest local checkpoint on the chain, then the records
after it) -> start the libp2p host -> fetch the records after our head from the peer with the
highest head, and the newest checkpoint (chunks from several peers, each hash-checked) when one
is newer than ours -> start the core, announce Join if not a member -> run -> on SIGINT/SIGTERM
gossip a signed Leave, stop everything within ``shutdown_timeout_s`` (a watchdog thread ends the
process if anything hangs), exit 0.

Concurrency: everything that touches the core runs on the one asyncio loop, so the core needs no
locks. Every task belongs to the daemon (``_Tasks``) and is cancelled and awaited on shutdown.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import json
import logging
import math
import os
import random
import socket
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Coroutine, Sequence
from typing import Any

import msgpack
import numpy as np
import torch

from seedswarm import PROTOCOL_VERSION
from seedswarm.crypto.hashing import h
from seedswarm.crypto.keys import Identity, KeyFileError
from seedswarm.gossip.libp2p import (
    GossipMessage,
    HostConfig,
    HostError,
    Libp2pHost,
    PeerConnected,
    ProtocolMismatchError,
)
from seedswarm.gossip.wire import (
    ChainRequest,
    ChainResponse,
    CheckpointChunk,
    CheckpointManifest,
    CheckpointRequest,
    Contribution,
    ContributionsRequest,
    ContributionsResponse,
    FraudProof,
    Join,
    Leave,
    Message,
    Record,
    WireError,
    WrongRun,
    decode,
    decode_as,
)
from seedswarm.node.core.chain import ChainState, RecordError, checked_next_state, record_hash
from seedswarm.node.core.genesis import Genesis
from seedswarm.node.core.protocol import (
    Apply,
    CoreConfig,
    Effect,
    Estimate,
    NodeCore,
    Publish,
    Rejected,
    Send,
)
from seedswarm.node.daemon.config import ConfigError, NodeConfig
from seedswarm.node.daemon.metrics import Metrics, MetricsServer
from seedswarm.node.daemon.store import ChainStore, StoreError
from seedswarm.node.learn.checkpoint import (
    Checkpoint,
    CheckpointDir,
    CheckpointError,
    assemble,
    check_chunk,
    choose_manifest,
    decode_params,
    encode_params,
)
from seedswarm.node.learn.estimators import fo_project, zo_spsa
from seedswarm.node.learn.replay import ModelStates, bind_, model_digest
from seedswarm.node.learn.tasks import load_task

log = logging.getLogger("seedswarm.daemon")

TOPIC = "chain"  # gossip: Record, Join, Leave, FraudProof
PROTO_MSG = "msg"  # one-way direct messages (Contribution); answered with b"" as an ack
PROTO_INPUTS = "inputs"  # ContributionsRequest -> ContributionsResponse
PROTO_CHAIN = "chain"  # ChainRequest -> ChainResponse, answered from the store
PROTO_CKPT = "ckpt"  # CheckpointRequest -> CheckpointManifest (digest all zero) | CheckpointChunk
PROTO_HELLO = "hello"  # run check + peer exchange (listen addresses)
GOSSIP_TYPES = (Record, Join, Leave, FraudProof)
MAX_MESSAGE_BYTES = 1 << 20
CHAIN_PAGE = 256
STRIKES_TO_BAN = 30
BAN_SECONDS = 600.0
ZERO32 = b"\x00" * 32


def protocol_prefix(run_id: bytes) -> str:
    """``/seedswarm/<major>/<run id>``: topics and stream ids of other runs/versions never match."""
    return f"/seedswarm/{PROTOCOL_VERSION}/{run_id.hex()[:16]}"


class _Tasks:
    """Owner of fire-and-forget tasks: each is tracked, its error logged, all cancelled on close."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed: %r", task.get_name(), task.exception(), exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    async def aclose(self, timeout: float = 2.0) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)


def local_ipv4s() -> list[str]:
    """This host's IPv4 interface addresses (Linux ioctl), loopback last: to announce 0.0.0.0."""
    out: list[str] = []
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
                out.append(socket.inet_ntoa(raw[20:24]))
    return sorted(set(out), key=lambda a: (a.startswith("127."), a))


def _announce_addrs(listen_addrs: Sequence[str], configured: Sequence[str], peer_id: str) -> list[str]:
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


# ---------------------------------------------------------------------------------------------
# hello: run check and peer exchange, a small strict msgpack map


def encode_hello(run_id: bytes, addrs: Sequence[str], peers: dict[str, list[str]], round_: int) -> bytes:
    book = [[p, list(a)[:4]] for p, a in list(peers.items())[:64]]
    return msgpack.packb({"v": PROTOCOL_VERSION, "run": run_id, "round": round_, "addrs": list(addrs)[:8],
                          "peers": book}, use_bin_type=True)  # type: ignore[no-any-return]


def decode_hello(data: bytes) -> dict[str, Any]:
    """Raises ValueError on anything but a well-formed hello."""
    try:
        d = msgpack.unpackb(data, raw=False, max_bin_len=64, max_str_len=256, max_array_len=256, max_map_len=16)
    except Exception as e:
        raise ValueError(f"malformed hello: {type(e).__name__}") from None
    if not isinstance(d, dict) or type(d.get("v")) is not int or type(d.get("run")) is not bytes:
        raise ValueError("malformed hello")
    addrs = d.get("addrs", [])
    peers = d.get("peers", [])
    if not isinstance(addrs, list) or not all(isinstance(a, str) and a.startswith("/") for a in addrs):
        raise ValueError("malformed hello addresses")
    book: dict[str, list[str]] = {}
    if not isinstance(peers, list):
        raise ValueError("malformed hello peers")
    for item in peers:
        if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                or not isinstance(item[1], list) or not all(isinstance(a, str) and a.startswith("/") for a in item[1])):
            raise ValueError("malformed hello peers")
        book[item[0]] = item[1]
    return {"v": d["v"], "run": d["run"], "round": d.get("round", 0), "addrs": addrs, "peers": book}


def gossip_validator(run_id: bytes):  # type: ignore[no-untyped-def]
    """A pure, thread-safe verdict on a gossip message: schema, size, run id, signature.

    It runs on the trio thread before a message is forwarded (so invalid messages do not
    spread), and a rejection costs the forwarder score: hence no check that depends on local
    state (the round we are at); those happen in the core after delivery.
    """

    def validate(data: bytes, from_peer: str) -> bool:
        try:
            msg = decode(data, run_id)
        except WireError:
            return False
        if not isinstance(msg, GOSSIP_TYPES):
            return False
        return not (isinstance(msg, (Record, Join, Leave)) and not msg.signature_ok())

    return validate


# ---------------------------------------------------------------------------------------------


class Daemon:
    """One node. ``await prepare()`` (local state; ConfigError on bad settings), ``await run()``."""

    def __init__(self, cfg: NodeConfig, genesis: Genesis, started_at: float | None = None) -> None:
        self.cfg = cfg
        self.genesis = genesis
        self.run_id = genesis.run_id
        self.started_wall = started_at if started_at is not None else time.time()
        self.metrics = Metrics()
        self.core: NodeCore | None = None
        self.host: Libp2pHost | None = None
        self.state = "new"
        self.checkpoint: Checkpoint | None = None
        self.first_apply_wall: float | None = None
        self.member_since_wall: float | None = None
        self.synced_wall: float | None = None
        self._recent_checkpoints: OrderedDict[bytes, Checkpoint] = OrderedDict()
        self.accuracy: float | None = None
        self.addrbook: dict[str, list[str]] = {}
        self.announce: list[str] = []
        self._tasks = _Tasks()
        self._stop = asyncio.Event()
        self._rearm = asyncio.Event()
        self._timer_at = math.inf
        self._pending_gossip: deque[Message] = deque(maxlen=512)
        self._strikes: dict[str, int] = {}
        self._banned: dict[str, float] = {}
        self._logged: set[tuple[str, str]] = set()
        self._dialing: dict[str, asyncio.Task[bool]] = {}
        self._peer_ids: dict[bytes, str] = {}
        self._digest: tuple[bytes, str] = (b"", "")
        self._exit_code = 0
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._metrics_server: MetricsServer | None = None
        self._rounds_log: Any = None
        self._last_join = 0.0
        self.heads: list[bytes] = []
        self.head: ChainState = ChainState.initial(genesis)
        self.base_round = 0

    # ------------------------------------------------------------------ local state
    def prepare(self) -> None:
        """Open the data dir, identity, store, task and model; replay the local chain.

        Raises ConfigError with one clear line for anything the operator must fix.
        """
        cfg, g = self.cfg, self.genesis
        data = cfg.data_path
        try:
            data.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(data, 0o700)
        except OSError as e:
            raise ConfigError(f"cannot create data dir {data}: {e.strerror}") from None
        try:
            self.identity = Identity.load_or_create(data / "identity.key")
        except KeyFileError as e:
            raise ConfigError(str(e)) from None
        try:
            self.store = ChainStore(data / "chain.log", self.run_id)
        except StoreError as e:
            raise ConfigError(str(e)) from None
        run_file = data / "run_id"
        if not run_file.exists():
            run_file.write_text(self.run_id.hex() + "\n")
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available")
        self.device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
        try:
            self.task = load_task(g.task, dict(g.task_options), seed=g.seed)
        except ValueError as e:
            raise ConfigError(f"genesis task: {e}") from None
        model = self.task.build_model()
        genesis_params = [p.detach().clone() for p in model.parameters()]
        if g.model_digest and model_digest(genesis_params) != g.model_digest:
            raise ConfigError("this build's initial model does not match the genesis model digest "
                              "(different seedswarm/torch version or task options)")
        self._genesis_params = [p.to(self.device) for p in genesis_params]
        self._work_model = self.task.build_model().to(self.device)
        self._eval_model = self.task.build_model().to(self.device)
        count = cfg.shard_count
        index = cfg.shard_index if cfg.shard_index >= 0 else int.from_bytes(h(b"seedswarm/shard", self.identity.public)[:4], "big") % count
        self.shard = self.task.shard(index, count)
        self.rng = np.random.default_rng([int.from_bytes(self.identity.public[:8], "big"), int(time.time_ns() & 0xFFFFFFFF)])
        self.ckdir = CheckpointDir(data / "checkpoints", self.run_id, cfg.checkpoint_chunk_bytes, cfg.checkpoints_kept)
        self.peer_id = Libp2pHost.peer_id_of(self.identity.public)
        self._rebuild()
        log.info("node %s: run %s, local chain at round %d (model from round %d), data dir %s",
                 self.peer_id, self.run_id.hex()[:16], self.head.round, self.base_round, data)

    def _rebuild(self) -> None:
        """Chain states from genesis over the stored records (cut at the first invalid one), then
        the model from the newest local checkpoint on that chain plus the records after it."""
        records = self.store.records()
        states = [ChainState.initial(self.genesis)]
        decoded: list[Record] = []
        for i, data in enumerate(records):
            try:
                rec = decode_as(data, Record, self.run_id)
                states.append(checked_next_state(states[-1], rec))
            except (WireError, RecordError) as e:
                log.warning("stored record %d is invalid (%s): keeping the %d records before it", i, e, i)
                self.store.truncate(i)
                break
            decoded.append(rec)
        self.heads = [s.head for s in states]
        base, params = 0, self._genesis_params
        self.checkpoint = None
        for ck in self.ckdir.load_all():
            if ck.round < len(self.heads) and self.heads[ck.round] == ck.head:
                try:
                    _, _, params = decode_params(ck.blob, self._genesis_params)
                except CheckpointError as e:
                    log.warning("local checkpoint of round %d unusable: %s", ck.round, e)
                    continue
                base, self.checkpoint = ck.round, ck
                self._remember(ck)
                break
        self.base_round = base
        self.states = ModelStates(states[base], params, keep=64)
        self.states.advance(states[base], [(states[i], decoded[i]) for i in range(base, len(decoded))])
        self.head = states[-1]

    # ------------------------------------------------------------------ status
    def digest_hex(self) -> str:
        if self._digest[0] != self.head.head:
            params = self.states.get(self.head.head)
            self._digest = (self.head.head, model_digest(params).hex() if params is not None else "")
        return self._digest[1]

    def status(self) -> dict[str, Any]:
        st = self.core.head if self.core is not None else self.head
        stats = self.host.stats if self.host is not None else None
        me = self.identity.public
        return {
            "state": self.state,
            "pid": os.getpid(),
            "peer_id": self.peer_id,
            "public_key": me.hex(),
            "run_id": self.run_id.hex(),
            "protocol_version": PROTOCOL_VERSION,
            "round": st.round,
            "head": st.head.hex(),
            "model_digest": self.digest_hex(),
            "member": me in st.members,
            "members": len(st.members),
            "committee": {
                "trainer_rank": st.trainer_rank.get(me),
                "aggregator_rank": st.committee.aggregators.index(me) if me in st.committee.aggregators else None,
                "trainers": len(st.committee.trainers),
                "aggregators": len(st.committee.aggregators),
            },
            "halted": bool(self.cfg.halt_at and st.round >= self.cfg.halt_at),
            "peers": len(self.host.peers()) if self.host is not None and self.host.running else 0,
            "peer_ids": self.host.peers() if self.host is not None and self.host.running else [],
            "listen": self.host.listen_addrs if self.host is not None else [],
            "announce": self.announce,
            "bytes_sent": stats.transport_bytes_sent if stats else 0,
            "bytes_received": stats.transport_bytes_received if stats else 0,
            "checkpoint_round": self.checkpoint.round if self.checkpoint else None,
            "accuracy": self.accuracy,
            "started_at": self.started_wall,
            "synced_at": self.synced_wall,
            "first_apply_at": self.first_apply_wall,
            "member_since": self.member_since_wall,
            "rejected": {v: int(n) for (name, _, v), n in self.metrics.counters.items() if name == "rejected_total"},
            "updated_at": time.time(),
        }

    def _write_status(self) -> None:
        path = self.cfg.data_path / "status.json"
        tmp = path.with_name(".status.json.tmp")
        try:
            tmp.write_text(json.dumps(self.status(), indent=2) + "\n")
            os.replace(tmp, path)
        except OSError as e:
            self._log_once("status", "", logging.WARNING, "cannot write %s: %s", path, e)

    def _update_metrics(self) -> None:
        m, st = self.metrics, (self.core.head if self.core is not None else self.head)
        m.set("round", st.round, help="rounds applied (the chain head's round)")
        m.set("members", len(st.members), help="members in the chain's membership set")
        m.set("member", float(self.identity.public in st.members))
        if self.host is not None:
            s = self.host.stats
            m.set("peers", len(self.host.peers()) if self.host.running else 0, help="connected peers")
            m.set("transport_bytes_sent", s.transport_bytes_sent, help="bytes written to TCP sockets")
            m.set("transport_bytes_received", s.transport_bytes_received, help="bytes read from TCP sockets")
            for topic, n in s.gossip_rejected.items():
                m.set("gossip_rejected", n, "topic", topic, help="gossip messages rejected by the validator")
            for why, n in s.gossip_dropped.items():
                m.set("gossip_dropped", n, "reason", why, help="pubsub input dropped below the validator, by reason")
            m.set("frames_too_large", s.frames_too_large, help="direct-stream frames refused for size")
            m.set("protocol_mismatches", s.protocol_mismatches, help="streams for another run/version")
            m.set("validator_errors", s.validator_errors)
            m.set("events_dropped", s.events_dropped)
            m.set("requests_served", s.requests_served)
            m.set("requests_failed", s.requests_failed)
        if self.core is not None:
            for k, v in self.core.counters.items():
                m.set("core_events", v, "event", k)

    def rejected_total(self) -> int:
        """Every input refused anywhere (core, direct streams, gossip validator, frame limits)."""
        s = self.host.stats if self.host is not None else None
        extra = (sum(s.gossip_rejected.values()) + s.frames_too_large + s.protocol_mismatches) if s else 0
        return int(self.metrics.total("rejected_total")) + extra

    def _log_once(self, reason: str, peer: str, level: int, msg: str, *args: Any) -> None:
        if (reason, peer) in self._logged or len(self._logged) > 10000:
            return
        self._logged.add((reason, peer))
        log.log(level, msg, *args)

    def _reject(self, reason: str, peer: str | None, detail: str = "") -> None:
        self.metrics.inc("rejected_total", 1, "reason", reason, help="inputs rejected, by reason")
        who = peer or "gossip"
        self._log_once(reason, who, logging.WARNING, "rejected input from %s: %s %s", who, reason, detail)
        if peer is None:
            return
        self._strikes[peer] = n = self._strikes.get(peer, 0) + 1
        if n >= STRIKES_TO_BAN and peer not in self._banned:
            self._banned[peer] = time.monotonic() + BAN_SECONDS
            log.warning("banning peer %s for %.0f s after %d rejected inputs", peer, BAN_SECONDS, n)
            if self.host is not None:
                self._tasks.spawn(self._disconnect(peer), "ban")

    def _is_banned(self, peer: str) -> bool:
        until = self._banned.get(peer)
        if until is None:
            return False
        if time.monotonic() > until:
            del self._banned[peer]
            self._strikes.pop(peer, None)
            return False
        return True

    async def _disconnect(self, peer: str) -> None:
        assert self.host is not None
        with contextlib.suppress(HostError):
            await self.host.disconnect(peer)

    # ------------------------------------------------------------------ run
    def request_stop(self) -> None:
        """Signal handler: start a graceful stop (Leave, flush, exit 0)."""
        if not self._stop.is_set():
            log.info("stop requested: leaving the swarm")
            self._stop.set()

    async def run(self) -> int:
        """Start the host and serve until request_stop(); returns the exit code."""
        loop = asyncio.get_running_loop()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="seedswarm-estimate")
        try:
            await self._start_host()
            if self.cfg.metrics_port:
                self._metrics_server = MetricsServer(self.cfg.metrics_host, self.cfg.metrics_port,
                                                     self._render_metrics, self.status)
                try:
                    await self._metrics_server.start()
                except OSError as e:
                    raise ConfigError(f"cannot serve metrics on {self.cfg.metrics_host}:{self.cfg.metrics_port}: {e.strerror}") from None
            self._rounds_log = open(self.cfg.data_path / "rounds.jsonl", "a", buffering=1)  # noqa: SIM115 - closed in _shutdown
            self.state = "syncing"
            self._write_status()
            main = [
                loop.create_task(self._pump(), name="pump"),
                loop.create_task(self._startup(), name="startup"),
                loop.create_task(self._periodic(), name="periodic"),
            ]
            stop = loop.create_task(self._stop.wait(), name="stop")
            done, _ = await asyncio.wait([*main, stop], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stop and not t.cancelled() and t.exception() is not None:
                    log.error("node task %s crashed: %r", t.get_name(), t.exception(), exc_info=t.exception())
                    self._exit_code = 1
            if stop not in done and self._exit_code == 0:
                await self._stop.wait()  # startup finished normally; keep running
            await self._shutdown(main + [stop])
        finally:
            await self._close()
        return self._exit_code

    async def _start_host(self) -> None:
        cfg = HostConfig(
            identity_seed=self.identity.seed, listen=list(self.cfg.listen), bootstrap=list(self.cfg.bootstrap),
            protocol_prefix=protocol_prefix(self.run_id), max_message_bytes=MAX_MESSAGE_BYTES,
        )
        try:
            host = Libp2pHost(cfg)
        except HostError as e:
            raise ConfigError(str(e)) from None
        for name, handler in ((PROTO_MSG, self._on_msg), (PROTO_INPUTS, self._on_inputs),
                              (PROTO_CHAIN, self._on_chain), (PROTO_CKPT, self._on_ckpt),
                              (PROTO_HELLO, self._on_hello)):
            host.set_request_handler(name, handler)
        try:
            await host.start()
        except HostError as e:
            raise ConfigError(str(e)) from None
        self.host = host
        await host.subscribe(TOPIC, gossip_validator(self.run_id))
        self.announce = _announce_addrs(host.listen_addrs, self.cfg.announce, self.peer_id)
        log.info("listening on %s", " ".join(self.announce))

    async def _startup(self) -> None:
        await self._initial_sync()
        now = time.monotonic()
        core = NodeCore(self.genesis, self.identity, CoreConfig(halt_at=self.cfg.halt_at), base=self.head)
        self.core = core
        self.state = "running"
        self.synced_wall = time.time()
        self._handle(core.start(now))
        while self._pending_gossip:
            self._handle(core.on_message(now, self._pending_gossip.popleft(), None))
        if not core.is_member():
            await self._announce_join()
        else:
            self.member_since_wall = time.time()
        self._write_status()
        await self._timer_loop()

    async def _announce_join(self) -> None:
        assert self.core is not None and self.host is not None
        if self.cfg.halt_at and self.core.round >= self.cfg.halt_at:
            return
        self._last_join = time.monotonic()
        # A publish before any peer of the topic is known goes nowhere: wait (bounded) for one.
        for _ in range(50):
            if await self.host.topic_peers(TOPIC):
                break
            await asyncio.sleep(0.1)
        self._last_join = time.monotonic()
        log.info("announcing Join at round %d", self.core.round)
        self._handle(self.core.join(time.monotonic()))

    async def _shutdown(self, main: list[asyncio.Task[Any]]) -> None:
        self.state = "stopping"
        watchdog = threading.Timer(self.cfg.shutdown_timeout_s, _watchdog_exit, args=(self.cfg.shutdown_timeout_s,))
        watchdog.daemon = True
        watchdog.start()
        try:
            if self.core is not None and self.host is not None and self.host.running:
                for e in self.core.leave(time.monotonic()):
                    if isinstance(e, Publish):
                        with contextlib.suppress(HostError, TimeoutError):
                            await asyncio.wait_for(self.host.publish(TOPIC, e.msg.encode()), 1.0)
                            log.info("gossiped Leave at round %d", self.core.round)
                            await asyncio.sleep(0.3)  # let the trio side write it out
            for t in main:
                t.cancel()
            await asyncio.wait(main, timeout=2.0)
            await self._tasks.aclose()
        finally:
            watchdog.cancel()

    async def _close(self) -> None:
        if self._metrics_server is not None:
            await self._metrics_server.stop()
        if self.host is not None:
            await self.host.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self.state = "stopped"
        if hasattr(self, "store"):
            self._write_status()
        if self._rounds_log is not None:
            self._rounds_log.close()

    def _render_metrics(self) -> str:
        self._update_metrics()
        return self.metrics.render()

    async def _periodic(self) -> None:
        """Status file, metrics, re-announcing a Join that no record took, peer exchange."""
        tick = 0
        while True:
            await asyncio.sleep(self.cfg.status_every_s)
            tick += 1
            self._update_metrics()
            self._write_status()
            core = self.core
            if core is not None and not core.is_member() and not core.leaving \
                    and time.monotonic() - self._last_join > 10.0:
                await self._announce_join()
            if tick % 15 == 0 and self.host is not None:
                peers = self.host.peers()
                if peers:
                    self._tasks.spawn(self._hello(random.choice(peers)), "px")

    # ------------------------------------------------------------------ timers and effects
    def _arm(self) -> None:
        if self.core is None:
            return
        t = self.core.next_wakeup(time.monotonic())
        if t < self._timer_at:
            self._timer_at = t
            self._rearm.set()

    async def _timer_loop(self) -> None:
        assert self.core is not None
        self._timer_at = self.core.next_wakeup(time.monotonic())
        while True:
            delay = self._timer_at - time.monotonic()
            if delay > 0:
                self._rearm.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._rearm.wait(), min(delay, 1.0))
                continue
            self._timer_at = math.inf
            now = time.monotonic()
            self._handle(self.core.on_timer(now))
            self._timer_at = min(self._timer_at, self.core.next_wakeup(now))

    def _handle(self, effects: list[Effect]) -> None:
        for e in effects:
            if isinstance(e, Apply):
                self._apply(e)
            elif isinstance(e, Publish):
                self._tasks.spawn(self._publish(e.msg), "publish")
            elif isinstance(e, Send):
                self._tasks.spawn(self._send(e.to, e.msg), f"send-{type(e.msg).__name__}")
            elif isinstance(e, Estimate):
                self._tasks.spawn(self._estimate(e), "estimate")
            elif isinstance(e, Rejected):
                pid = self._peer_id_of(e.peer) if e.peer else None
                self._reject(e.reason, pid, e.detail)
        self._arm()

    def _apply(self, e: Apply) -> None:
        try:
            params = self.states.advance(e.base, e.steps)
        except KeyError as err:
            log.error("cannot apply: %s; rebuilding from the store", err)
            params = None
        if len(self.store) > e.base.round:
            self.metrics.inc("fork_switches_total", help="head switches that undid stored rounds")
            log.info("fork switch: undoing %d stored round(s) back to round %d", len(self.store) - e.base.round, e.base.round)
            self.store.truncate(e.base.round)
            del self.heads[e.base.round + 1 :]
        for _, rec in e.steps:
            self.store.append(rec.encode())
            self.heads.append(record_hash(rec))
        self.head = e.head
        if params is None:
            self._rebuild()
            params = self.states.get(self.head.head)
        now = time.time()
        if self.first_apply_wall is None and e.steps:
            self.first_apply_wall = now
            log.info("first round applied %.2f s after start (round %d)", now - self.started_wall, self.head.round)
        if self.member_since_wall is None and self.identity.public in self.head.members:
            self.member_since_wall = now
            log.info("member of the swarm from round %d", self.head.round)
        r = self.head.round
        self.metrics.inc("rounds_applied_total", len(e.steps), help="records applied")
        if params is not None:
            halting = bool(self.cfg.halt_at and r == self.cfg.halt_at)
            if self.cfg.checkpoint_every and r % self.cfg.checkpoint_every == 0 and r > 0 or halting:
                self._save_checkpoint(r, params)
            if (self.cfg.eval_every and r % self.cfg.eval_every == 0) or halting:
                self.accuracy = float(self.task.evaluate(bind_(self._eval_model, params))["accuracy"])
        if self._rounds_log is not None and self.host is not None:
            s = self.host.stats
            self._rounds_log.write(json.dumps({"round": r, "t": now, "sent": s.transport_bytes_sent,
                                               "recv": s.transport_bytes_received,
                                               "head": self.head.head.hex()[:16]}) + "\n")

    def _save_checkpoint(self, r: int, params: Sequence[torch.Tensor]) -> None:
        ck = Checkpoint.from_blob(self.run_id, encode_params(r, self.head.head, params), self.cfg.checkpoint_chunk_bytes)
        try:
            self.ckdir.save(ck)
        except OSError as e:
            self._log_once("checkpoint", "", logging.WARNING, "cannot save checkpoint: %s", e)
            return
        self.checkpoint = ck
        self._remember(ck)

    def _remember(self, ck: Checkpoint) -> None:
        self._recent_checkpoints[ck.manifest.state] = ck
        while len(self._recent_checkpoints) > max(2, self.cfg.checkpoints_kept + 1):
            self._recent_checkpoints.popitem(last=False)

    async def _publish(self, msg: Message) -> None:
        assert self.host is not None
        try:
            await self.host.publish(TOPIC, msg.encode())
            self.metrics.inc("gossip_published_total", 1, "type", type(msg).__name__)
        except HostError as e:
            self.metrics.inc("publish_failed_total")
            self._log_once("publish", type(msg).__name__, logging.WARNING, "cannot publish %s: %s", type(msg).__name__, e)

    def _peer_id_of(self, key: bytes) -> str:
        pid = self._peer_ids.get(key)
        if pid is None:
            try:
                pid = Libp2pHost.peer_id_of(key)
            except Exception:
                pid = key.hex()[:16]
            if len(self._peer_ids) < 100000:
                self._peer_ids[key] = pid
        return pid

    def _key_of(self, peer_id: str) -> bytes | None:
        try:
            return Libp2pHost.public_key_of(peer_id)
        except ValueError:
            return None

    async def _ensure_connected(self, pid: str) -> bool:
        assert self.host is not None
        if pid in self.host.peers():
            return True
        if pid not in self.addrbook:
            return False
        task = self._dialing.get(pid)
        if task is None:
            task = self._tasks.spawn(self._dial(pid), "dial")
            self._dialing[pid] = task
            task.add_done_callback(lambda _t, p=pid: self._dialing.pop(p, None))
        return bool(await asyncio.shield(task))

    async def _dial(self, pid: str) -> bool:
        assert self.host is not None
        for addr in self.addrbook.get(pid, []):
            try:
                await self.host.connect(addr)
                return True
            except HostError as e:
                log.debug("dial %s failed: %s", addr, e)
        return False

    async def _send(self, to: bytes, msg: Message) -> None:
        assert self.host is not None
        pid = self._peer_id_of(to)
        if isinstance(msg, ChainRequest) and pid not in self.host.peers():
            peers = self.host.peers()  # any connected peer can serve the chain
            if peers:
                pid = random.choice(peers)
        if not await self._ensure_connected(pid):
            self.metrics.inc("send_failed_total", 1, "type", type(msg).__name__, help="direct sends that found no route")
            return
        name = PROTO_INPUTS if isinstance(msg, ContributionsRequest) else PROTO_CHAIN if isinstance(msg, ChainRequest) else PROTO_MSG
        try:
            resp = await self.host.request(pid, name, msg.encode(), timeout=5.0)
        except HostError as e:
            self.metrics.inc("send_failed_total", 1, "type", type(msg).__name__)
            log.debug("request %s to %s failed: %s", name, pid, e)
            return
        if name == PROTO_MSG or self.core is None:
            return
        expect = ContributionsResponse if name == PROTO_INPUTS else ChainResponse
        try:
            answer = decode_as(resp, expect, self.run_id)
        except WireError as e:
            self._reject("bad-response", pid, str(e))
            return
        self._handle(self.core.on_message(time.monotonic(), answer, self._key_of(pid)))

    async def _estimate(self, e: Estimate) -> None:
        params = self.states.get(e.head)
        if params is None or self._executor is None:
            return
        loop = asyncio.get_running_loop()
        values = await loop.run_in_executor(self._executor, self._compute_estimate, params, e.streams)
        if self.core is not None:
            self.metrics.inc("estimates_total", help="local estimates computed (committee duty)")
            self._handle(self.core.on_estimate(time.monotonic(), e.round, e.head, values))

    def _compute_estimate(self, params: Sequence[torch.Tensor], streams: tuple[int, ...]) -> list[float]:
        """Worker thread: one local estimate, exactly as the simulator computes it."""
        g, dev = self.genesis, self.device
        model = bind_(self._work_model, params)

        def on_dev(b: Any) -> Any:
            return tuple(x.to(dev) for x in b) if dev.type != "cpu" else b

        if g.estimator == "fo":
            batches = [on_dev(self.task.batch(self.shard, self.rng, g.batch_size)) for _ in range(g.local_steps)]
            return fo_project(model, lambda m, t: self.task.loss(m, batches[t]), streams, steps=g.local_steps, lr=g.local_lr)
        batch = on_dev(self.task.batch(self.shard, self.rng, g.batch_size))
        return zo_spsa(model, lambda m: self.task.loss(m, batch), streams, g.eps)

    # ------------------------------------------------------------------ inbound
    async def _pump(self) -> None:
        assert self.host is not None
        while True:
            ev = await self.host.next_event()
            if isinstance(ev, GossipMessage):
                try:
                    msg = decode(ev.data, self.run_id)
                except WireError as e:  # the validator passed it: should not happen
                    self._reject("bad-gossip", ev.from_peer, str(e))
                    continue
                if self.core is None:
                    self._pending_gossip.append(msg)
                else:
                    self._handle(self.core.on_message(time.monotonic(), msg, None))
            elif isinstance(ev, PeerConnected):
                if self._is_banned(ev.peer):
                    self._tasks.spawn(self._disconnect(ev.peer), "ban")
                else:
                    self._tasks.spawn(self._hello(ev.peer), "hello")
            if not self.host.running:
                return

    def _decode_direct(self, data: bytes, cls: type[Message], peer: str) -> Message | None:
        try:
            return decode_as(data, cls, self.run_id)
        except WrongRun as e:
            self._reject("wrong-run", peer, str(e))
        except WireError as e:
            self._reject("malformed", peer, str(e))
        return None

    async def _on_msg(self, peer: str, data: bytes) -> bytes | None:
        if self._is_banned(peer):
            return None
        msg = self._decode_direct(data, Contribution, peer)
        if not isinstance(msg, Contribution):
            return None
        if not msg.signature_ok():  # cheap, and spares the core a forged input
            self._reject("bad-signature", peer, "contribution")
            return None
        if self.core is not None:
            self._handle(self.core.on_message(time.monotonic(), msg, self._key_of(peer)))
        return b""

    async def _on_inputs(self, peer: str, data: bytes) -> bytes | None:
        if self._is_banned(peer) or self.core is None:
            return None
        msg = self._decode_direct(data, ContributionsRequest, peer)
        key = self._key_of(peer)
        if msg is None or key is None:
            return None
        answer: bytes | None = None
        rest: list[Effect] = []
        for e in self.core.on_message(time.monotonic(), msg, key):
            if isinstance(e, Send) and e.to == key and isinstance(e.msg, ContributionsResponse) and answer is None:
                answer = e.msg.encode()
            else:
                rest.append(e)
        self._handle(rest)
        return answer

    async def _on_chain(self, peer: str, data: bytes) -> bytes | None:
        if self._is_banned(peer):
            return None
        msg = self._decode_direct(data, ChainRequest, peer)
        if not isinstance(msg, ChainRequest):
            return None
        records: list[bytes] = []
        size = 0
        for rec in self.store.records(msg.start, min(msg.limit, CHAIN_PAGE)):
            size += len(rec) + 8
            if size > MAX_MESSAGE_BYTES - 4096:
                break
            records.append(rec)
        return ChainResponse(run=self.run_id, start=msg.start, head=len(self.store), records=tuple(records)).encode()

    async def _on_ckpt(self, peer: str, data: bytes) -> bytes | None:
        if self._is_banned(peer):
            return None
        msg = self._decode_direct(data, CheckpointRequest, peer)
        if not isinstance(msg, CheckpointRequest):
            return None
        if msg.digest == ZERO32:
            ck = self.checkpoint
            if ck is None or ck.round >= len(self.heads) or self.heads[ck.round] != ck.head:
                return None
            self.metrics.inc("checkpoint_manifests_served_total")
            return ck.manifest.encode()
        # Any recent checkpoint, not only the newest: a joiner that got a manifest a moment ago
        # keeps fetching its chunks while we write the next one.
        found = self._recent_checkpoints.get(msg.digest)
        if found is None or not 0 <= msg.index < len(found.manifest.chunks):
            return None
        ck = found
        self.metrics.inc("checkpoint_chunks_served_total")
        return CheckpointChunk(run=self.run_id, digest=msg.digest, index=msg.index,
                               total=len(ck.manifest.chunks), data=ck.chunk(msg.index)).encode()

    async def _on_hello(self, peer: str, data: bytes) -> bytes | None:
        if self._is_banned(peer):
            return None
        try:
            hello = decode_hello(data)
        except ValueError as e:
            self._reject("malformed", peer, str(e))
            return None
        if hello["run"] != self.run_id or hello["v"] != PROTOCOL_VERSION:
            self._reject("wrong-run", peer, "hello")
            log.warning("refusing peer %s: it is on run %s protocol %d, this node is on run %s protocol %d",
                        peer, hello["run"].hex()[:16], hello["v"], self.run_id.hex()[:16], PROTOCOL_VERSION)
            self._tasks.spawn(self._disconnect(peer), "refuse")
            return None
        self._learn(peer, hello)
        return encode_hello(self.run_id, self.announce, self.addrbook, self.head.round)

    def _learn(self, peer: str, hello: dict[str, Any]) -> None:
        if hello["addrs"]:
            self.addrbook[peer] = [a for a in hello["addrs"] if a.endswith(f"/p2p/{peer}")][:4]
        if len(self.addrbook) < 4096:
            for pid, addrs in hello["peers"].items():
                if pid != self.peer_id and pid not in self.addrbook:
                    good = [a for a in addrs if a.endswith(f"/p2p/{pid}")][:4]
                    if good:
                        self.addrbook[pid] = good

    async def _hello(self, peer: str) -> None:
        """Check the peer's run, swap address books, dial the peers we do not know yet."""
        assert self.host is not None
        try:
            resp = await self.host.request(peer, PROTO_HELLO, encode_hello(self.run_id, self.announce, self.addrbook, self.head.round), timeout=5.0)
            hello = decode_hello(resp)
        except ProtocolMismatchError:
            log.warning("refusing peer %s: it does not speak %s (another run id or protocol version)",
                        peer, protocol_prefix(self.run_id))
            self.metrics.inc("peers_refused_total", help="peers of another run or protocol version")
            await self._disconnect(peer)
            return
        except (HostError, ValueError) as e:
            log.debug("hello to %s failed: %s", peer, e)
            return
        if hello["run"] != self.run_id or hello["v"] != PROTOCOL_VERSION:
            log.warning("refusing peer %s: it is on run %s protocol %d", peer, hello["run"].hex()[:16], hello["v"])
            await self._disconnect(peer)
            return
        self._learn(peer, hello)
        connected = set(self.host.peers())
        for pid in list(self.addrbook):
            if len(connected) >= self.cfg.max_peers:
                break
            if pid not in connected and pid != self.peer_id and pid not in self._dialing and not self._is_banned(pid):
                connected.add(pid)
                task = self._tasks.spawn(self._dial(pid), "px-dial")
                self._dialing[pid] = task
                task.add_done_callback(lambda _t, p=pid: self._dialing.pop(p, None))

    # ------------------------------------------------------------------ joining
    async def _initial_sync(self) -> None:
        """Before the core starts: fetch the records after our head and, when peers hold a newer
        checkpoint than our model's base, the checkpoint (so catching up is replay of a few
        records, not of the whole chain)."""
        assert self.host is not None
        if not self.cfg.bootstrap and self.cfg.min_peers <= 0:
            return
        deadline = time.monotonic() + self.cfg.sync_wait_s
        while len(self.host.peers()) < max(1, self.cfg.min_peers) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # let hellos bring in a few more peers
        peers = self.host.peers()
        if not peers:
            log.warning("no peer reachable within %.0f s: starting from the local chain (round %d)",
                        self.cfg.sync_wait_s, self.head.round)
            return
        local_round = self.head.round
        for _ in range(1000):  # bounded: pages of CHAIN_PAGE records
            best = await self._probe_heads(peers)
            if best is None or best[1] <= len(self.store):
                break
            if not await self._fetch_records(best[0]):
                break
        if self.head.round > local_round:
            log.info("fetched records %d..%d from peers", local_round, self.head.round - 1)
        await self._maybe_fetch_checkpoint(peers)

    async def _probe_heads(self, peers: Sequence[str]) -> tuple[str, int] | None:
        assert self.host is not None
        probe = ChainRequest(run=self.run_id, start=len(self.store), limit=0).encode()
        sample = random.sample(list(peers), min(4, len(peers)))

        async def ask(p: str) -> tuple[str, int] | None:
            try:
                resp = decode_as(await self.host.request(p, PROTO_CHAIN, probe, timeout=5.0), ChainResponse, self.run_id)  # type: ignore[union-attr]
                return p, resp.head
            except (HostError, WireError):
                return None

        answers = [a for a in await asyncio.gather(*(ask(p) for p in sample)) if a is not None]
        return max(answers, key=lambda a: a[1]) if answers else None

    async def _fetch_records(self, peer: str) -> bool:
        """One page from ``peer``, overlapping our last few records to detect a fork."""
        assert self.host is not None
        start = max(0, len(self.store) - 4)
        try:
            resp = decode_as(await self.host.request(peer, PROTO_CHAIN, ChainRequest(run=self.run_id, start=start, limit=CHAIN_PAGE).encode(), timeout=10.0),
                             ChainResponse, self.run_id)
        except (HostError, WireError) as e:
            log.info("chain sync from %s failed: %s", peer, e)
            return False
        if resp.start != start or not resp.records:
            return False
        progressed = False
        for i, data in enumerate(resp.records):
            idx = start + i
            if idx < len(self.store):
                if self.store[idx] == data:
                    continue
                log.warning("our stored chain forks from the peers' at round %d: undoing %d round(s)", idx, len(self.store) - idx)
                self.store.truncate(idx)
                self._rebuild()
            try:
                rec = decode_as(data, Record, self.run_id)
                nxt = checked_next_state(self.head, rec)
            except (WireError, RecordError) as e:
                self._reject("bad-chain-response", peer, str(e))
                return progressed
            self.store.append(data)
            self.heads.append(nxt.head)
            self.head = nxt
            progressed = True
        return progressed

    async def _maybe_fetch_checkpoint(self, peers: Sequence[str]) -> None:
        assert self.host is not None
        have = self.states.get(self.head.head) is not None
        manifests: list[tuple[str, CheckpointManifest]] = []
        if self.head.round - self.base_round > max(1, self.cfg.checkpoint_every) or not have:
            probe = CheckpointRequest(run=self.run_id, digest=ZERO32, index=0).encode()
            sample = random.sample(list(peers), min(5, len(peers)))

            async def ask(p: str) -> None:
                try:
                    m = decode_as(await self.host.request(p, PROTO_CKPT, probe, timeout=5.0), CheckpointManifest, self.run_id)  # type: ignore[union-attr]
                    manifests.append((p, m))
                except (HostError, WireError):
                    pass

            await asyncio.gather(*(ask(p) for p in sample))
        choice = choose_manifest(manifests, self.heads)
        if choice is not None and choice[0].round > self.base_round:
            manifest, servers = choice
            t0 = time.monotonic()
            try:
                blob = await self._download(manifest, servers)
                ck = Checkpoint.from_blob(self.run_id, blob, self.cfg.checkpoint_chunk_bytes)
                decode_params(blob, self._genesis_params)
                self.ckdir.save(ck)
                self.metrics.inc("checkpoints_downloaded_total")
                log.info("downloaded the checkpoint of round %d (%d bytes, %d chunks from %d peers) in %.2f s",
                         manifest.round, manifest.size, len(manifest.chunks), len(servers), time.monotonic() - t0)
            except CheckpointError as e:
                log.warning("checkpoint download failed (%s): replaying from round %d instead", e, self.base_round)
        if self.states.get(self.head.head) is None or (choice is not None and choice[0].round > self.base_round):
            self._rebuild()

    async def _download(self, manifest: CheckpointManifest, servers: Sequence[str]) -> bytes:
        """Chunks from several peers at once, round robin, each checked against the manifest."""
        assert self.host is not None
        host = self.host
        chunks: list[bytes | None] = [None] * len(manifest.chunks)
        sem = asyncio.Semaphore(8)
        per_peer: dict[str, int] = {}

        async def fetch(i: int) -> None:
            async with sem:
                for attempt in range(2 * len(servers)):
                    p = servers[(i + attempt) % len(servers)]
                    req = CheckpointRequest(run=self.run_id, digest=manifest.state, index=i).encode()
                    try:
                        c = decode_as(await host.request(p, PROTO_CKPT, req, timeout=10.0), CheckpointChunk, self.run_id)
                        check_chunk(manifest, i, c.data)
                    except (HostError, WireError, CheckpointError) as e:
                        if isinstance(e, CheckpointError):
                            self._reject("bad-checkpoint-chunk", p, str(e))
                        continue
                    chunks[i] = c.data
                    per_peer[p] = per_peer.get(p, 0) + 1
                    return

        await asyncio.gather(*(fetch(i) for i in range(len(chunks))))
        if any(c is None for c in chunks):
            raise CheckpointError("some chunks could not be fetched from any peer")
        log.info("checkpoint chunks per peer: %s", {p[-8:]: n for p, n in per_peer.items()})
        return assemble(manifest, [c for c in chunks if c is not None])


def _watchdog_exit(timeout: float) -> None:
    log.error("shutdown did not finish within %.1f s: exiting now", timeout)
    logging.shutdown()
    os._exit(1)
