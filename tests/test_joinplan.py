"""The checkpoint download's request window: bounded bytes in flight, timeouts that follow them.

Large chunks are cheap on a fast link (one request each) and dangerous on a slow one (eight
half-megabyte requests at 1 Mbit/s outlast any fixed timeout), so the plan keeps at most
``IN_FLIGHT_BYTES`` requested and gives each request the time those bytes take at ``MIN_RATE``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from seedswarm.gossip.wire import MAX_CHUNK, CheckpointChunk
from seedswarm.node.core.joinplan import (
    CHUNK_TIMEOUT_MAX,
    IN_FLIGHT_BYTES,
    MIN_RATE,
    JoinPlan,
    PlanConfig,
    manifest_of,
)
from seedswarm.node.daemon.config import (
    DEFAULT_CHECKPOINT_CHUNK_BYTES,
    MAX_CHECKPOINT_CHUNK_BYTES,
    ConfigError,
    NodeConfig,
)

RUN = b"r" * 32
SERVERS = [bytes([i]) * 32 for i in range(1, 4)]


def _plan(blob: bytes, chunk_bytes: int) -> JoinPlan:
    plan = JoinPlan(run_id=RUN, cfg=PlanConfig(), started=0.0, base_round=0)
    plan.manifest = manifest_of(RUN, 10, b"h" * 32, blob, chunk_bytes)
    plan.servers = list(SERVERS)
    return plan


@pytest.mark.parametrize("chunk_bytes, in_flight", [(4096, 8), (64 * 1024, 8), (512 * 1024, 2), (MAX_CHUNK, 1)])
def test_requests_in_flight_follow_the_chunk_size(chunk_bytes: int, in_flight: int) -> None:
    plan = _plan(bytes(range(256)) * (40 * chunk_bytes // 256), chunk_bytes)
    sent = plan.requests(0.0)
    assert len(sent) == in_flight
    assert in_flight * chunk_bytes <= max(IN_FLIGHT_BYTES, chunk_bytes)
    assert plan.requests(0.1) == []  # the window is full
    # the timeout is the base plus the window's bytes at the minimum rate
    timeout = 10.0 + in_flight * chunk_bytes / MIN_RATE
    assert plan.next_wakeup() == pytest.approx(timeout)
    assert timeout <= CHUNK_TIMEOUT_MAX + 1e-9
    assert plan.requests(timeout - 0.01) == []  # not given up yet
    again = plan.requests(timeout + 0.01)  # given up: retried, each on the next server
    assert [r.index for _, r in again] == [r.index for _, r in sent]
    assert all(p2 != p1 for (p1, _), (p2, _) in zip(sent, again, strict=True))


def test_an_arriving_chunk_opens_the_window() -> None:
    blob = bytes(range(256)) * (6 * 512 * 1024 // 256)
    plan = _plan(blob, 512 * 1024)
    first = plan.requests(0.0)
    peer, req = first[0]
    data = blob[req.index * 512 * 1024:(req.index + 1) * 512 * 1024]
    assert plan.on_chunk(peer, CheckpointChunk(run=RUN, digest=req.digest, index=req.index, total=6, data=data)) is None
    nxt = plan.requests(0.5)
    assert len(nxt) == 1 and nxt[0][1].index == 2


def test_a_manifest_claiming_giant_chunks_cannot_stretch_the_timeout() -> None:
    plan = _plan(b"x" * 1000, 1000)
    assert plan.manifest is not None
    plan.manifest = type(plan.manifest)(run=RUN, round=10, head=b"h" * 32, state=plan.manifest.state,
                                        size=1 << 40, chunks=plan.manifest.chunks)  # a lie: 1 TiB in one chunk
    assert len(plan.requests(0.0)) == 1
    assert plan.next_wakeup() <= CHUNK_TIMEOUT_MAX


def test_the_node_default_chunk_fits_a_frame_and_a_too_large_one_is_refused(tmp_path: Path) -> None:
    assert 64 * 1024 < DEFAULT_CHECKPOINT_CHUNK_BYTES <= MAX_CHECKPOINT_CHUNK_BYTES
    assert NodeConfig(genesis=str(tmp_path / "g.json"), data_dir=str(tmp_path)).checkpoint_chunk_bytes \
        == DEFAULT_CHECKPOINT_CHUNK_BYTES
    NodeConfig(genesis=str(tmp_path / "g.json"), data_dir=str(tmp_path), checkpoint_chunk_bytes=MAX_CHECKPOINT_CHUNK_BYTES)
    with pytest.raises(ConfigError, match="checkpoint_chunk_bytes"):
        NodeConfig(genesis=str(tmp_path / "g.json"), data_dir=str(tmp_path),
                   checkpoint_chunk_bytes=MAX_CHECKPOINT_CHUNK_BYTES + 1)
