"""Joining far behind: which checkpoint to trust, and which chunk to fetch from whom.

Records are tiny and every node checks each one, so a joiner always syncs the records; the
parameters are what it should not recompute by replaying thousands of rounds. So when the node's
model would start more than ``gap`` rounds behind the swarm, it asks a few peers for their newest
checkpoint manifest, waits until its own verified chain reaches a manifest's round, takes the
manifest that sits on that chain and that most peers serve (a checkpoint cannot prove it is
replay(genesis, records); agreement among independent peers is the evidence, and any node can
audit it by replaying), then fetches the chunks from every peer that serves it, ``parallel`` at a
time, round robin, each checked against the manifest on arrival (a bad chunk costs its sender a
strike and goes to the next server), and finally checks the whole blob's hash. Failure at any
step falls back to replay: nothing is lost but time.

Pure state: the node core feeds it messages and time and sends what it returns.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from seedswarm.crypto.hashing import h
from seedswarm.gossip.wire import MAX_CHUNK, CheckpointChunk, CheckpointManifest, CheckpointRequest

ZERO32 = b"\x00" * 32
IN_FLIGHT_BYTES = 1 << 20
"""Chunk bytes requested and not yet received, at most (fewer requests in flight when chunks are
large): on a 1 Mbit/s link what is in flight arrives within the 10 s a server may take to write
one frame."""
MIN_RATE = 128 * 1024
"""Bytes per second (1 Mbit/s) a server's link may fall to before a chunk request is given up:
each request's timeout is ``timeout`` plus the time the bytes in flight take at this rate."""


class CheckpointError(Exception):
    """A checkpoint (file, manifest or chunk) that does not check out."""


def blob_hash(blob: bytes) -> bytes:
    return h(b"seedswarm/checkpoint", blob)


def chunk_hash(chunk: bytes) -> bytes:
    return h(b"seedswarm/checkpoint-chunk", chunk)


def manifest_of(run: bytes, round_: int, head: bytes, blob: bytes, chunk_bytes: int) -> CheckpointManifest:
    """The content-addressed manifest of a checkpoint blob (chunks of ``chunk_bytes``)."""
    chunks = tuple(chunk_hash(blob[i : i + chunk_bytes]) for i in range(0, max(1, len(blob)), chunk_bytes))
    if len(chunks) > 16384:
        raise CheckpointError("checkpoint has too many chunks for a manifest: raise checkpoint_chunk_bytes")
    return CheckpointManifest(run=run, round=round_, head=head, state=blob_hash(blob), size=len(blob), chunks=chunks)


def check_chunk(manifest: CheckpointManifest, index: int, data: bytes) -> None:
    if not 0 <= index < len(manifest.chunks) or chunk_hash(data) != manifest.chunks[index]:
        raise CheckpointError(f"chunk {index} does not match the manifest")


def assemble(manifest: CheckpointManifest, chunks: Sequence[bytes]) -> bytes:
    blob = b"".join(chunks)
    if len(blob) != manifest.size or blob_hash(blob) != manifest.state:
        raise CheckpointError("assembled checkpoint does not match its manifest")
    return blob


def choose_manifest(
    manifests: Sequence[tuple[bytes, CheckpointManifest]], on_chain: Callable[[int, bytes], bool],
) -> tuple[CheckpointManifest, list[bytes]] | None:
    """The newest manifest on our verified chain that most peers agree on, and who serves it.

    ``on_chain(round, head)``: is ``head`` our chain's head after ``round`` records?
    """
    ok = [(p, m) for p, m in manifests if on_chain(m.round, m.head)]
    if not ok:
        return None
    votes = Counter(m.encode() for _, m in ok)
    newest = max(m.round for _, m in ok)
    best = max((m for _, m in ok if m.round == newest), key=lambda m: (votes[m.encode()], m.encode()))
    return best, [p for p, m in ok if m.encode() == best.encode()]


@dataclass
class PlanConfig:
    gap: int = 0  # rounds behind beyond which a checkpoint is fetched (0: never, always replay)
    ask: int = 5  # peers asked for their manifest
    parallel: int = 8  # chunk requests in flight at most (fewer when chunks are large: IN_FLIGHT_BYTES)
    timeout: float = 10.0  # seconds before a manifest or chunk request is given up on that peer
    manifest_wait: float = 30.0  # seconds to wait for the chain to reach a manifest before replaying


CHUNK_TIMEOUT_MAX = PlanConfig.timeout + IN_FLIGHT_BYTES / MIN_RATE
"""The longest a chunk request is waited for (the default ``timeout``, a full window): drivers
give their transport request this bound."""


@dataclass
class _Flight:
    peer: bytes
    sent: float


@dataclass
class JoinPlan:
    """One checkpoint download. States: asking -> waiting (for the chain) -> fetching -> done."""

    run_id: bytes
    cfg: PlanConfig
    started: float
    base_round: int  # the round our model could start from without a checkpoint
    manifests: dict[bytes, CheckpointManifest] = field(default_factory=dict)
    asked: dict[bytes, float] = field(default_factory=dict)
    manifest: CheckpointManifest | None = None
    servers: list[bytes] = field(default_factory=list)
    chunks: dict[int, bytes] = field(default_factory=dict)
    flights: dict[int, _Flight] = field(default_factory=dict)
    tries: dict[int, int] = field(default_factory=dict)
    done: bool = False
    failed: str = ""
    #: the failure was the servers' (they no longer have the checkpoint: pruned while we were
    #: slow), not a lie: a new plan on a newer manifest may succeed where this one could not
    unavailable: bool = False

    def ask_manifests(self, now: float, peers: Sequence[bytes]) -> list[tuple[bytes, CheckpointRequest]]:
        out = []
        for p in peers[: self.cfg.ask]:
            if p not in self.asked:
                self.asked[p] = now
                out.append((p, CheckpointRequest(run=self.run_id, digest=ZERO32, index=0)))
        return out

    def on_manifest(self, peer: bytes, m: CheckpointManifest) -> bool:
        """Keep a solicited manifest (False: nobody asked that peer, or it is not worth having)."""
        if peer not in self.asked or self.manifest is not None or m.round <= self.base_round:
            return False
        self.manifests[peer] = m
        return True

    def choose(self, now: float, on_chain: Callable[[int, bytes], bool]) -> bool:
        """Pick the manifest once the chain reaches one; give up after ``manifest_wait``."""
        if self.manifest is not None or self.done:
            return self.manifest is not None
        pick = choose_manifest(list(self.manifests.items()), on_chain)
        if pick is not None:
            self.manifest, self.servers = pick
            return True
        if now - self.started > self.cfg.manifest_wait:
            self.fail("no manifest on our verified chain from the peers asked")
        return False

    def _window(self) -> tuple[int, float]:
        """Requests in flight at most, and each one's timeout, for the chosen manifest's chunks."""
        m = self.manifest
        chunk = min(MAX_CHUNK, -(-m.size // max(1, len(m.chunks)))) if m is not None else MAX_CHUNK
        parallel = max(1, min(self.cfg.parallel, IN_FLIGHT_BYTES // max(1, chunk)))
        return parallel, self.cfg.timeout + parallel * chunk / MIN_RATE

    def requests(self, now: float) -> list[tuple[bytes, CheckpointRequest]]:
        """Chunk requests to send now (new ones and retries of timed-out ones)."""
        m = self.manifest
        if m is None or self.done:
            return []
        out: list[tuple[bytes, CheckpointRequest]] = []
        parallel, timeout = self._window()
        for i, f in list(self.flights.items()):
            if now - f.sent > timeout:
                del self.flights[i]
        for i in range(len(m.chunks)):
            if len(self.flights) >= parallel:
                break
            if i in self.chunks or i in self.flights:
                continue
            tries = self.tries.get(i, 0)
            if tries >= 2 * max(1, len(self.servers)):
                self.fail(f"chunk {i} could not be fetched from any peer")
                self.unavailable = True
                return []
            peer = self.servers[(i + tries) % len(self.servers)]
            self.tries[i] = tries + 1
            self.flights[i] = _Flight(peer, now)
            out.append((peer, CheckpointRequest(run=self.run_id, digest=m.state, index=i)))
        return out

    def on_chunk(self, peer: bytes, c: CheckpointChunk) -> str | None:
        """Take a chunk; returns an error for a chunk that does not match (the sender lied)."""
        m = self.manifest
        f = self.flights.get(c.index)
        if m is None or c.digest != m.state or f is None or f.peer != peer:
            return None  # late, duplicate or unsolicited: ignore quietly
        del self.flights[c.index]
        try:
            check_chunk(m, c.index, c.data)
        except CheckpointError as e:
            return str(e)
        self.chunks[c.index] = c.data
        return None

    def blob(self) -> bytes | None:
        """The checked blob once every chunk is in (then the plan is done)."""
        m = self.manifest
        if m is None or self.done or len(self.chunks) < len(m.chunks):
            return None
        self.done = True
        try:
            return assemble(m, [self.chunks[i] for i in range(len(m.chunks))])
        except CheckpointError as e:
            self.failed = str(e)
            return None

    def fail(self, why: str) -> None:
        self.done = True
        self.failed = why

    def next_wakeup(self) -> float:
        if self.done:
            return float("inf")
        timeout = self._window()[1]
        t = [f.sent + timeout for f in self.flights.values()]
        if self.manifest is None:
            t.append(self.started + self.cfg.manifest_wait)
        return min(t, default=float("inf"))
