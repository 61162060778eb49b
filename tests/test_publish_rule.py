"""When a rank-0 aggregator publishes (node/core/aggregation.py, ``Aggregation.publish_delay``).

The adaptive deadline (twice the median time to quorum) lets a record go out without its slowest
trainer. That is fine once, but a record that leaves out a trainer on its last chance expels it,
so that record must wait the full round timeout: ``bench sweep`` found a fault-free 4-node run
(seed 8) in which one aggregator, rank 0 four rounds running, published each time on its
deadline and expelled a member that had sent every contribution.
"""

from __future__ import annotations

import dataclasses

from corenet import IDS, make_genesis

from seedswarm.node.core.aggregation import Aggregation, Deadline
from seedswarm.node.core.chain import ChainState


def _setup(missed: int) -> tuple[Aggregation, Deadline, bytes]:
    g = make_genesis(members=tuple(i.public for i in IDS[:4]), trainers=4, round_timeout=2.0, min_round_time=0.05)
    st = ChainState.initial(g)
    trainers = list(st.committee.trainers)
    slow = trainers[-1]
    st = dataclasses.replace(st, missed={slow: missed})
    me = trainers[0]
    agg = Aggregation(state=st, rank=0, started=0.0, me=me)
    for p in trainers[:-1]:  # every trainer but the slow one has reported: a quorum (3 of 4)
        agg.got[p] = object()  # type: ignore[assignment]  # publish_delay reads only who reported
    deadline = Deadline(g)
    for _ in range(8):
        deadline.learn(0.1)
    return agg, deadline, slow


def test_a_quorum_publishes_on_the_learned_deadline() -> None:
    agg, deadline, _ = _setup(missed=0)
    assert deadline.value() == 0.2
    assert agg.publish_delay(deadline) == 0.2


def test_a_record_that_would_expel_waits_the_round_timeout() -> None:
    g = make_genesis()
    agg, deadline, slow = _setup(missed=g.expel_after - 1)
    assert agg.publish_delay(deadline) == 2.0  # the round timeout, not 0.2
    agg.got[slow] = object()  # type: ignore[assignment]
    assert agg.publish_delay(deadline) == 0.05  # everyone reported: at once (the minimum round time)


def test_earlier_misses_do_not_slow_the_round() -> None:
    g = make_genesis()
    agg, deadline, _ = _setup(missed=g.expel_after - 2)
    assert agg.publish_delay(deadline) == 0.2
