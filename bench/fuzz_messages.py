"""The fuzzer's messages: valid messages of the victim's run, and hostile variants of them.

Valid direct requests (Contributions, ChainRequests, CheckpointRequests, ContributionsRequests,
hellos) built from what the fuzzer learnt of the run (its round, head, real records and
checkpoint manifest); hostile direct requests made from them (mutations, random bytes, framing
lies, the wrong protocol); gossip payloads that the node's topic validator accepts but that are
hostile in content, and byte-mutated ones it rejects. A mixin of
:class:`seedswarm.bench.fuzz.Fuzzer`: building messages, apart from sending them
(:mod:`seedswarm.bench.fuzz_lanes`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from seedswarm.bench.fuzz_victim import FuzzVictim
from seedswarm.bench.hostile_peer import GARBAGE, PROTOCOLS, RawPeer, frame
from seedswarm.crypto.keys import Identity
from seedswarm.gossip.wire import (
    MAX_U,
    PROTO_CHAIN,
    PROTO_CKPT,
    PROTO_HELLO,
    PROTO_INPUTS,
    PROTO_MSG,
    ChainRequest,
    ChainResponse,
    CheckpointManifest,
    CheckpointRequest,
    Contribution,
    ContributionsRequest,
    FraudProof,
    Hello,
    Join,
    Leave,
    Record,
    decode_as,
)


class FuzzMessages(FuzzVictim):
    """What to send: built from the victim's run, checked with its own topic validator."""

    def refresh(self, st: dict[str, Any] | None) -> None:
        if st:
            self.ctx.round = int(st["round"])
            self.ctx.head = bytes.fromhex(st["head"])

    async def learn_chain(self, peer: RawPeer) -> None:
        """Real records and the checkpoint manifest, fetched the way a peer would."""
        ctx = self.ctx
        out, body = await peer.request(ctx.target, PROTO_CHAIN, ChainRequest(run=ctx.run_id, start=max(0, ctx.round - 64), limit=64).encode())
        if out == "answered":
            from seedswarm.node.core.chain import record_hash

            resp = decode_as(body, ChainResponse, ctx.run_id)
            ctx.records = list(resp.records)
            ctx.record_hashes = [record_hash(decode_as(r, Record, ctx.run_id)) for r in resp.records]
        out, body = await peer.request(ctx.target, PROTO_CKPT, CheckpointRequest(run=ctx.run_id, digest=bytes(32), index=0).encode())
        if out == "answered":
            with contextlib.suppress(Exception):
                ctx.manifest = decode_as(body, CheckpointManifest, ctx.run_id)

    def valid_direct(self, peer: RawPeer) -> tuple[str, bytes]:
        """(protocol, a valid request of this run) for a direct stream."""
        ctx, r = self.ctx, self.rng
        k = r.randrange(6)
        if k == 0:
            return PROTO_MSG, Contribution(run=ctx.run_id, round=ctx.round, peer=peer.public,
                                           q=self.mut.random_bytes(ctx.directions)).signed(peer.identity).encode()
        if k == 1:
            return PROTO_CHAIN, ChainRequest(run=ctx.run_id, start=r.randrange(max(1, ctx.round + 2)),
                                             limit=r.choice((0, 1, 16, 256, MAX_U))).encode()
        if k == 2:
            digest = ctx.manifest.state if ctx.manifest is not None and r.random() < 0.7 else bytes(32)
            return PROTO_CKPT, CheckpointRequest(run=ctx.run_id, digest=digest, index=r.randrange(64)).encode()
        if k == 3:
            rh = r.choice(ctx.record_hashes) if ctx.record_hashes else os.urandom(32)
            return PROTO_INPUTS, ContributionsRequest(run=ctx.run_id, round=max(0, ctx.round - 1), record=rh).encode()
        if k == 4:
            return PROTO_HELLO, Hello.make(ctx.run_id, ctx.round, [f"/ip4/127.0.0.1/tcp/4001/p2p/{peer.id.to_base58()}"],
                                           {}).encode()
        return PROTO_MSG, r.choice(ctx.records) if ctx.records else b""

    def hostile_direct(self, peer: RawPeer) -> tuple[str, str, bytes]:
        """(op, protocol, raw bytes to write) for one hostile direct request."""
        r = self.rng
        proto, valid = self.valid_direct(peer)
        x = r.random()
        if x < 0.06:
            n = r.randrange(1, 2048)
            return "random-bytes", r.choice(PROTOCOLS), frame(self.mut.random_bytes(n))
        if x < 0.09:
            return "garbage", r.choice(PROTOCOLS), frame(GARBAGE + self.mut.random_bytes(r.randrange(300)))
        if x < 0.13:  # the frame header lies about the length
            _, data = self.mut.mutate(valid)
            lie = max(0, len(data) + r.choice((-8, -1, 1, 64, 1 << 19)))
            return "frame-length-lie", proto, lie.to_bytes(4, "big") + data
        if x < 0.16:
            return "frame-oversized", proto, (r.randrange(1 << 20 | 1, 1 << 31)).to_bytes(4, "big") + bytes(1024)
        op, data = self.mut.mutate(valid, r.choice(self.ctx.records) if self.ctx.records else None)
        if r.random() < 0.15:
            proto = r.choice(PROTOCOLS)  # a valid-looking message on the wrong protocol
            op += "+wrong-protocol"
        return op, proto, frame(data)

    def passing_gossip(self, peer: Identity) -> tuple[str, bytes]:
        """A gossip payload the topic validator accepts (signed, canonical) but that is hostile."""
        ctx, r = self.ctx, self.rng
        k = r.random()
        if k < 0.45:  # a record signed by us, random fields: reaches the core's record checks
            near = ctx.round + r.choice((0, 0, 1, 2, -1, 1000))
            prev = ctx.head if r.random() < 0.6 else (r.choice(ctx.record_hashes) if ctx.record_hashes and r.random() < 0.5 else os.urandom(32))
            joins = tuple(self.mut.mutate(j)[1][:400] for j in r.sample(ctx.records, min(len(ctx.records), r.randrange(3)))) if ctx.records else ()
            rec = Record(run=ctx.run_id, round=max(0, near), prev=prev, aggregator=peer.public,
                         contributors=self.mut.random_bytes(r.randrange(1, 4)), contrib_root=os.urandom(32),
                         aggregate=self.mut.random_bytes(2 * r.choice((ctx.directions, ctx.directions, 1, 3))),
                         joins=joins, evidence=tuple(self.mut.random_bytes(r.randrange(1, 80)) for _ in range(r.randrange(2))),
                         ).signed(peer)
            return "signed-record", rec.encode()
        if k < 0.8:  # a fraud proof around a real (or mutated) record, mutated contributions
            base = r.choice(ctx.records) if ctx.records else GARBAGE
            inner = base if r.random() < 0.3 else self.mut.mutate(base)[1]
            contribs = tuple(self.mut.random_bytes(r.randrange(1, 300)) for _ in range(r.randrange(4)))
            return "fraud-proof", FraudProof(run=ctx.run_id, record=inner[:150_000], contributions=contribs).encode()
        if k < 0.92:  # a join signed by a fresh key, outside its validity window, without work
            ident = Identity.from_seed(os.urandom(32))
            rnd = r.choice((ctx.round + 10**6, MAX_U))
            return "signed-join-out-of-window", Join(run=ctx.run_id, round=rnd, peer=ident.public,
                                                     cert=self.mut.random_bytes(r.randrange(0, 64))).signed(ident).encode()
        return "signed-leave-non-member", Leave(run=ctx.run_id, round=ctx.round, peer=peer.public).signed(peer).encode()

    def failing_gossip(self, peer: Identity) -> tuple[str, bytes]:
        """A byte-mutated gossip payload the node's topic validator rejects (it costs GossipSub
        score). Checked with that validator: a mutation inside a fraud proof's record, say,
        leaves a valid fraud proof, which would be delivered instead."""
        r = self.rng
        for _ in range(8):
            if r.random() < 0.15:
                op, data = "random-bytes", self.mut.random_bytes(r.randrange(1, 1024))
            else:
                base = r.choice(self.ctx.records) if self.ctx.records and r.random() < 0.5 else self.passing_gossip(peer)[1]
                op, data = self.mut.mutate(base)
            if not self.validator(data, ""):
                return op, data
        return "garbage", GARBAGE + self.mut.random_bytes(r.randrange(1, 256))

    def deep_gossip(self, peer: Identity) -> tuple[str, bytes]:
        """passing_gossip, checked with the node's topic validator (each deep message must be
        delivered: the lane's accounting counts on it)."""
        for _ in range(8):
            op, data = self.passing_gossip(peer)
            if self.validator(data, ""):
                return op, data
        raise AssertionError("passing_gossip built eight messages the node's validator rejects")
