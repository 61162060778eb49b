"""One core, two drivers: the same join scenario through the simulator and through the daemon's
own driver (real ``Daemon`` objects, in virtual time on the in-memory network), and the joiner's
core takes the same protocol steps in the same order in both.

Also on the daemon driver: a hostile peer that serves a chain forking deeper than ``max_undo``
never makes a node cut more than ``max_undo`` rounds of its store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from seedswarm.crypto.keys import Identity, peer_id_of
from seedswarm.gossip.memory import MemoryNetwork, VirtualTimeLoop
from seedswarm.gossip.wire import (
    PROTO_CHAIN,
    PROTO_HELLO,
    ChainRequest,
    ChainResponse,
    CheckpointRequest,
    Hello,
    Join,
    Record,
    decode_as,
    protocol_prefix,
)
from seedswarm.node.core.chain import ChainState, build_record, checked_next_state
from seedswarm.node.core.effects import Apply, InstallCheckpoint, Publish, Send
from seedswarm.node.core.genesis import Genesis
from seedswarm.node.core.joinplan import ZERO32
from seedswarm.node.core.protocol import CoreConfig
from seedswarm.node.daemon.config import NodeConfig
from seedswarm.node.daemon.daemon import Daemon
from seedswarm.node.learn.initial import build_genesis
from seedswarm.sim.engine import NetConfig, Simulation

FOUNDERS = [Identity.from_seed(bytes([0x30 + i]) * 32) for i in range(3)]
JOINER = Identity.from_seed(b"\x3f" * 32)
JOIN_AT = 25
EVERY = 10
TASK = {"hidden": 16}


def _genesis() -> Genesis:
    return build_genesis([i.public for i in FOUNDERS], task="digits", task_options=TASK, seed=3,
                         trainers=3, directions=16, round_timeout=1.0, min_round_time=0.1, join_pow_bits=6)


def _label(e: Any) -> str | None:
    if isinstance(e, Send) and isinstance(e.msg, ChainRequest):
        return "ask-chain"
    if isinstance(e, Send) and isinstance(e.msg, CheckpointRequest):
        return "ask-manifest" if e.msg.digest == ZERO32 else "ask-chunk"
    if isinstance(e, InstallCheckpoint):
        return f"install@{e.round}"
    if isinstance(e, Apply):
        return "apply"
    if isinstance(e, Publish) and isinstance(e.msg, Join):
        return "join"
    return None


def _phases(effects: list[Any]) -> list[str]:
    """Protocol steps in the order they first happened, up to the Join."""
    out: list[str] = []
    for e in effects:
        lab = _label(e)
        if lab is not None and lab not in out:
            out.append(lab)
        if lab == "join":
            break
    return out


def _sim_join(g: Genesis) -> list[Any]:
    from seedswarm.node.learn.tasks import load_task

    task = load_task(g.task, dict(g.task_options), seed=g.seed)
    sim = Simulation.create(g, task, [], NetConfig(latency_ms=10.0), seed=3,
                            core_config=CoreConfig(auto_join=True, checkpoint_gap=EVERY),
                            checkpoint_every=EVERY, checkpoint_chunk_bytes=4096)
    sim.shard_count = 4
    root = ChainState.initial(g)
    for ident in FOUNDERS:
        sim.add_node(ident, root)
    sim.start()
    sim.run(JOIN_AT, max_time=600.0)
    joiner = sim.add_node(JOINER, root)
    seen: list[Any] = []
    handle = sim.handle

    def spy(node: Any, effects: list[Any]) -> None:
        if node is joiner:
            seen.extend(effects)
        handle(node, effects)

    sim.handle = spy  # type: ignore[method-assign]
    sim.start_node(joiner, join=True)
    sim.run(JOIN_AT + 30, max_time=sim.now + 600.0)
    assert joiner.core.is_member(), "the simulated joiner never became a member"
    return seen


def _run_daemons(tmp: Path, g: Genesis, script: Callable[[list[Daemon], MemoryNetwork], Any],
                 idents: list[Identity], extra: dict[int, dict[str, Any]] | None = None) -> Any:
    """Real Daemon objects on one in-memory network, in virtual time; ``script`` drives them."""
    net = MemoryNetwork(latency=0.005, seed=1)
    prefix = protocol_prefix(g.run_id)
    daemons = []
    for i, ident in enumerate(idents):
        data = tmp / f"node{i}"
        data.mkdir(parents=True, exist_ok=True)
        ident.save(data / "identity.key")
        kw: dict[str, Any] = dict(data_dir=str(data), checkpoint_every=EVERY, checkpoint_chunk_bytes=4096,
                                  shard_count=4, shard_index=i % 4, status_every_s=1.0)
        kw.update((extra or {}).get(i, {}))
        d = Daemon(NodeConfig(**kw), g, transport=lambda ident_, _c, _r: net.transport(ident_.public, prefix),
                   inline_estimates=True)
        d.prepare()
        daemons.append(d)
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(script(daemons, net))
    finally:
        loop.close()
        for d in daemons:
            if d.data_lock.held:
                d.data_lock.release()


async def _until(pred: Callable[[], bool], limit: float, what: str) -> None:
    for _ in range(int(limit / 0.05)):
        if pred():
            return
        await asyncio.sleep(0.05)  # virtual time: costs nothing
    raise AssertionError(f"not within {limit} virtual seconds: {what}")


async def _founders_at(founders: list[Daemon], round_: int) -> list[asyncio.Task[int]]:
    """Start the founders, connect them all to each other, and wait until round ``round_``."""
    tasks = [asyncio.create_task(d.run()) for d in founders]
    await _until(lambda: all(d.transport is not None for d in founders), 10, "founders listening")
    for a in founders:
        for b in founders:
            if a is not b:
                await a.transport.connect(b.transport.listen_addrs[0])  # type: ignore[union-attr]
    await _until(lambda: founders[0].core is not None and founders[0].core.round >= round_, 600, f"round {round_}")
    return tasks


BOOT = f"/memory/{peer_id_of(FOUNDERS[0].public)}/p2p/{peer_id_of(FOUNDERS[0].public)}"


def _daemon_join(tmp: Path, g: Genesis) -> list[Any]:
    seen: list[Any] = []

    async def script(ds: list[Daemon], net: MemoryNetwork) -> list[Any]:
        founders, joiner = ds[:3], ds[3]
        tasks = await _founders_at(founders, JOIN_AT)
        handle = joiner.handle

        def spy(effects: list[Any]) -> None:
            seen.extend(effects)
            handle(effects)

        joiner.handle = spy  # type: ignore[method-assign]
        tasks.append(asyncio.create_task(joiner.run()))
        await _until(lambda: joiner.core is not None and joiner.core.is_member(), 600, "the joiner is a member")
        for d in ds:
            d.request_stop()
        codes = await asyncio.gather(*tasks)
        assert codes == [0, 0, 0, 0]
        return seen

    return _run_daemons(tmp, g, script, [*FOUNDERS, JOINER], {3: {"bootstrap": (BOOT,)}})  # type: ignore[no-any-return]


@pytest.mark.slow
def test_one_join_through_both_drivers_takes_the_same_protocol_steps(tmp_path: Path) -> None:
    g = _genesis()
    sim_steps = _phases(_sim_join(g))
    daemon_steps = _phases(_daemon_join(tmp_path, g))
    assert sim_steps == ["ask-chain", "ask-manifest", "apply", "ask-chunk", f"install@{EVERY * (JOIN_AT // EVERY)}",
                         "join"], sim_steps
    assert daemon_steps == sim_steps


def test_a_joiner_into_a_halted_swarm_gets_its_model_without_another_round(tmp_path: Path) -> None:
    """The founders take no duties from round JOIN_AT on (``halt_at``) but keep serving. A joiner
    catches up from their checkpoint and records, and its model reaches their head when the
    download ends (the core's empty ``Apply``), with their digest, though no round follows."""
    g = _genesis()

    async def script(ds: list[Daemon], net: MemoryNetwork) -> tuple[str, str, int, int]:
        founders, joiner = ds[:3], ds[3]
        tasks = await _founders_at(founders, JOIN_AT)
        await _until(lambda: all(d.digest_hex() for d in founders), 600, "the founders' models")
        tasks.append(asyncio.create_task(joiner.run()))
        await _until(lambda: joiner.core is not None and joiner.core.round >= JOIN_AT and bool(joiner.digest_hex()),
                     600, "the joiner's model at the founders' head")
        out = (founders[0].digest_hex(), joiner.digest_hex(), founders[0].core.round,  # type: ignore[union-attr]
               joiner.chain.base_round)
        for d in ds:
            d.request_stop()
        assert await asyncio.gather(*tasks) == [0, 0, 0, 0]
        return out

    extra: dict[int, dict[str, Any]] = {i: {"halt_at": JOIN_AT} for i in range(3)}
    extra[3] = {"bootstrap": (BOOT,)}
    want, got, head, base = _run_daemons(tmp_path, g, script, [*FOUNDERS, JOINER], extra)
    assert head == JOIN_AT  # halted: no round after the join
    assert base == JOIN_AT  # from the checkpoint the founders wrote when they halted
    assert got == want


def test_a_hostile_peer_cannot_cut_the_daemons_store_beyond_max_undo(tmp_path: Path) -> None:
    """A founder restarts from its store (30 rounds) and its only peer serves a chain that leaves
    it at round 1 (valid empty records signed by a member as a fallback aggregator). The daemon
    notes the deep fork, keeps its store, and never cuts more than max_undo rounds."""
    g = _genesis()
    liar = FOUNDERS[1]

    async def grow(ds: list[Daemon], net: MemoryNetwork) -> int:
        d = ds[0]
        t = asyncio.create_task(d.run())
        await _until(lambda: d.core is not None and d.core.round >= 30, 600, "round 30 alone")
        d.request_stop()
        assert await t == 0
        return d.chain.head.round

    # a swarm whose two other founders are silent: founder 0 builds a chain alone (fallback ranks)
    stored = _run_daemons(tmp_path, g, grow, [FOUNDERS[0]])
    assert stored >= 30
    # the liar's chain: its own valid empty records from the genesis on
    st = ChainState.initial(g)
    fake: list[bytes] = []
    for _ in range(90):
        rec, _ = build_record(st, liar, [])
        fake.append(rec.encode())
        st = checked_next_state(st, rec)

    async def attack(ds: list[Daemon], net: MemoryNetwork) -> tuple[int, int]:
        d = ds[0]
        stub = net.transport(liar.public, protocol_prefix(g.run_id))

        async def chain(_p: str, payload: bytes) -> bytes:
            req = decode_as(payload, ChainRequest, g.run_id)
            return ChainResponse(run=g.run_id, start=req.start, head=len(fake),
                                 records=tuple(fake[req.start:][: min(req.limit, 256)])).encode()

        async def hello(_p: str, payload: bytes) -> bytes:
            return Hello.make(g.run_id, len(fake), [], {}).encode()

        stub.set_request_handler(PROTO_CHAIN, chain)
        stub.set_request_handler(PROTO_HELLO, hello)
        await stub.start()
        t = asyncio.create_task(d.run())
        await _until(lambda: d.transport is not None and d.core is not None, 10, "started")
        await d.transport.connect(stub.listen_addrs[0])  # type: ignore[union-attr]
        await _until(lambda: d.core is not None and d.core.counters.get("rejected.deep-fork", 0) >= 1, 300,
                     "the deep fork noticed")
        low = d.chain.head.round
        for _ in range(200):  # 10 virtual seconds of the liar's pages
            await asyncio.sleep(0.05)
            low = min(low, d.chain.head.round)
        d.request_stop()
        assert await t == 0
        return low, d.core.counters.get("sync.resyncs", 0) if d.core else 0

    low, resyncs = _run_daemons(tmp_path, g, attack, [FOUNDERS[0]])
    assert resyncs == 0
    assert low >= stored - CoreConfig().max_undo, (low, stored)


def test_the_daemon_bans_a_peer_that_keeps_sending_garbage_and_stops_cleanly(tmp_path: Path) -> None:
    """The peer policy lives in the core (strikes by reason, a ban, forgiveness over time); the
    driver carries the ban out by dropping the connection and refusing the peer's streams."""
    from seedswarm.gossip.transport import TransportError
    from seedswarm.gossip.wire import PROTO_MSG

    g = _genesis()
    evil = Identity.from_seed(b"\x66" * 32)

    async def script(ds: list[Daemon], net: MemoryNetwork) -> tuple[int, int, bool, float]:
        d = ds[0]
        t = asyncio.create_task(d.run())
        await _until(lambda: d.core is not None and d.core.round >= 3, 120, "training")
        atk = net.transport(evil.public, protocol_prefix(g.run_id))

        async def hello(_p: str, _payload: bytes) -> bytes:
            return Hello.make(g.run_id, 0, [], {}).encode()

        atk.set_request_handler(PROTO_HELLO, hello)
        await atk.start()
        pid = await atk.connect(d.transport.listen_addrs[0])  # type: ignore[union-attr]
        refused = 0
        for _ in range(40):
            try:
                await atk.request(pid, PROTO_MSG, b"\xc1" + bytes(40), timeout=2.0)
            except TransportError:
                refused += 1
            if pid not in atk.peers():
                break
        dropped = pid not in atk.peers()
        r0 = d.core.round if d.core else 0
        await _until(lambda: d.core is not None and d.core.round >= r0 + 3, 120, "training after the ban")
        d.request_stop()
        t0 = d.now()
        assert await t == 0
        return refused, int(d.metrics.total("bans_total")), dropped, d.now() - t0

    refused, bans, dropped, stop_s = _run_daemons(tmp_path, g, script, [FOUNDERS[0]])
    assert refused >= 5 and bans == 1 and dropped
    assert stop_s < 5.0


def test_preconditioned_directions_replay_the_same_on_the_daemon_driver(tmp_path: Path) -> None:
    """Three daemons on a genesis with a direction scale (``precondition``) halt at one head with
    one model digest, and an independent replay of their stored records with the initial model's
    scale gives exactly that model (without the scale it does not)."""
    from seedswarm.node.learn.replay import (
        ModelStates,
        direction_scale,
        initial_digest,
        model_digest,
    )
    from seedswarm.node.learn.tasks import load_task

    opts = {**TASK, "precondition": 2}
    g = build_genesis([i.public for i in FOUNDERS], task="digits", task_options=opts, seed=3, trainers=3,
                      directions=16, round_timeout=1.0, min_round_time=0.1, join_pow_bits=6, lr=0.3)
    halt = 8

    async def script(ds: list[Daemon], net: MemoryNetwork) -> tuple[set[str], set[int], list[bytes]]:
        tasks = await _founders_at(ds, halt)
        await _until(lambda: all(d.core is not None and d.core.round == halt and d.digest_hex() for d in ds),
                     600, "every founder's model at the halt")
        out = ({d.digest_hex() for d in ds}, {d.chain.head.round for d in ds}, ds[0].chain.store.records())
        for d in ds:
            d.request_stop()
        assert await asyncio.gather(*tasks) == [0, 0, 0]
        return out

    digests, rounds, records = _run_daemons(tmp_path, g, script, FOUNDERS, {i: {"halt_at": halt} for i in range(3)})
    assert rounds == {halt} and len(digests) == 1 and len(records) == halt
    model = load_task(g.task, dict(g.task_options), seed=g.seed).build_model()
    assert initial_digest(model) == g.model_digest
    scale = direction_scale(model)
    assert scale is not None
    steps, st = [], ChainState.initial(g)
    for data in records:
        rec = decode_as(data, Record, g.run_id)
        steps.append((st, rec))
        st = checked_next_state(st, rec)
    params = [p.detach().clone() for p in model.parameters()]
    root = ChainState.initial(g)
    replayed = ModelStates(root, params, scale=scale).advance(root, steps)
    assert model_digest(replayed).hex() in digests
    plain = ModelStates(root, params).advance(root, steps)
    assert model_digest(plain).hex() not in digests


def test_an_evaluation_that_raises_costs_a_counter_not_the_node(tmp_path: Path) -> None:
    """A task whose evaluate() raises (a plug-in's bug, or a diverged model overflowing): the
    daemon counts it and keeps training; it used to stop the node."""
    g = _genesis()

    async def script(ds: list[Daemon], net: MemoryNetwork) -> tuple[float, int]:
        def broken(_model: Any) -> dict[str, float]:
            raise OverflowError("math range error")

        ds[0].task.evaluate = broken  # type: ignore[method-assign]
        tasks = await _founders_at(ds, 6)
        for d in ds:
            d.request_stop()
        assert await asyncio.gather(*tasks) == [0, 0, 0]
        return ds[0].metrics.get("evaluation_errors_total"), ds[0].chain.head.round

    errors, head = _run_daemons(tmp_path, g, script, FOUNDERS, {i: {"eval_every": 1} for i in range(3)})
    assert errors >= 3 and head >= 6
