"""Hand-made pubsub traffic of the hostile peers: built here, sent by
:mod:`seedswarm.gossip.libp2p.hostile`.

Every hand-made pubsub byte of the chaos adversary and the fuzzer goes out through ``hostile``
(its ``send`` from a fresh throwaway host, ``build`` for the raw cases, ``signed_message`` for
correctly signed pubsub messages); :func:`send_pubsub` only adds the hello answer and an
outcome, :func:`rpc`, :func:`publish` and :func:`envelope_mutant` only build the messages. A
module of its own so that both benches build and send pubsub attacks one way, apart from the
direct-stream peer (:mod:`seedswarm.bench.hostile_peer`).
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Sequence
from typing import Any

import trio
from libp2p.identity_utils import create_identity_from_seed
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.utils import encode_varint_prefixed

from seedswarm.bench.hostile_peer import Target, hello_handlers
from seedswarm.gossip.libp2p import hostile
from seedswarm.gossip.libp2p.tuning import PUBSUB_RPC_OVERHEAD
from seedswarm.node.daemon.netstack import MAX_MESSAGE_BYTES

#: Raw pubsub cases (``hostile.KINDS`` but the valid message), each one attack of ``hostile.build``.
RAW_PUBSUB_CASES: tuple[str, ...] = tuple(k for k in hostile.KINDS if k != "valid")
#: Seconds a raw case keeps its connection after writing: a stalled frame must outlast the
#: victim's frame deadline (``io_timeout_s``, 10 s) to be dropped as such.
RAW_LINGER: dict[str, float] = {"stalled-rpc": 12.0}


def rpc(msgs: Sequence[Any]) -> bytes:
    """One varint-framed RPC publishing ready-made pubsub messages (``hostile.signed_message``
    or :func:`envelope_mutant`)."""
    return bytes(encode_varint_prefixed(rpc_pb2.RPC(publish=list(msgs)).SerializeToString()))


def publish(seed: bytes, topic: str, datas: Sequence[bytes]) -> hostile.Attack:
    """One RPC publishing every item of ``datas`` on ``topic``, correctly signed by ``seed``."""
    kp = create_identity_from_seed(seed)
    return hostile.Attack((rpc([hostile.signed_message(kp, topic, d) for d in datas]),))


def envelope_mutant(kp: Any, topic: str, data: bytes, rng: random.Random) -> tuple[str, Any]:
    """A signed pubsub message carrying ``data``, then one envelope field broken (the pubsub
    guard drops it before the topic validator, and charges the forwarder for it)."""
    op = rng.choice(("sig-flip", "sig-random", "sig-truncated", "data-after-signing", "seqno-after-signing",
                     "other-author", "no-signature", "topic-unsubscribed"))
    m = hostile.signed_message(kp, topic, data)
    if op == "sig-flip":
        b = bytearray(m.signature)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        m.signature = bytes(b)
    elif op == "sig-random":
        m.signature = os.urandom(64)
    elif op == "sig-truncated":
        m.signature = m.signature[: rng.randrange(64)]
    elif op == "data-after-signing":
        m.data = data + b"\x00" if not data else data[:-1] + bytes([data[-1] ^ 1])
    elif op == "seqno-after-signing":
        m.seqno = os.urandom(8)
    elif op == "other-author":
        m.from_id = ID.from_pubkey(create_identity_from_seed(os.urandom(32)).public_key).to_bytes()
    elif op == "no-signature":
        m.ClearField("signature")
    else:
        del m.topicIDs[:]
        m.topicIDs.append(os.urandom(6).hex())
    return op, m


async def send_pubsub(target: Target, attack: hostile.Attack, run_id: bytes, *, seed: bytes | None = None,
                      linger: float = 0.3, timeout: float = 10.0, release: threading.Event | None = None) -> str:
    """``hostile.send`` from a fresh host (identity ``seed``) that answers the node's hello;
    returns an outcome (written, timeout, error-...) instead of raising. The connection stays
    ``linger`` seconds after the last write, or until ``release`` is set."""
    try:
        with trio.fail_after(timeout + linger + 5.0):
            await hostile.send(target.addr, attack, seed=seed, linger=linger, timeout=timeout,
                               handlers=hello_handlers(run_id), release=release)
        return "written"
    except trio.TooSlowError:
        return "timeout"
    except Exception as e:  # noqa: BLE001 - a hostile client reports, never raises
        return f"error-{_leaf_names(e)}"


def _leaf_names(e: BaseException) -> str:
    """An exception's type name; for a group (a trio nursery's), its leaves' names."""
    if isinstance(e, BaseExceptionGroup):
        return "+".join(sorted({_leaf_names(x) for x in e.exceptions}))
    return type(e).__name__


def raw_pubsub(case: str, topic: str, seed: bytes) -> tuple[hostile.Attack, float]:
    """The raw pubsub ``case`` (one of RAW_PUBSUB_CASES) and how long to linger after it."""
    return hostile.build(case, topic, seed, limit=MAX_MESSAGE_BYTES + PUBSUB_RPC_OVERHEAD), RAW_LINGER.get(case, 0.5)
