"""Fork choice (node/core/forks.py): the fast path for a record that extends the head gives the
same answers as the full search, over random trees with competing records, invalid records and
a bounded undo window; and the window never loses the states it needs."""

from __future__ import annotations

import dataclasses
import random

from corenet import make_genesis

from seedswarm.crypto.hashing import h
from seedswarm.gossip.wire import Record
from seedswarm.node.core.chain import ChainState, bitmap_of
from seedswarm.node.core.forks import ForkTree, HeadChange


class SearchOnly(ForkTree):
    """The reference: every choose() runs the full search, every prune() the full walk."""

    def choose(self) -> HeadChange | None:
        self._extends = None
        return super().choose()

    def prune(self) -> None:
        self._root = None
        super().prune()


def _summary(c: HeadChange | None) -> tuple[object, ...] | None:
    if c is None:
        return None
    return (c.base.head, tuple(p.head for p, _ in c.steps), c.head.head, c.undone)


def test_the_fast_path_agrees_with_the_search() -> None:
    g = make_genesis()
    root = ChainState.initial(g)
    members = sorted(root.members)
    fast_paths = 0
    for seed in range(40):
        rng = random.Random(seed)
        fast, ref = ForkTree(root, max_undo=4), SearchOnly(root, max_undo=4)
        for step in range(120):
            if rng.random() < 0.08 and len(fast.cand) > 1:
                rh = rng.choice(sorted(fast.cand))
                fast.mark_bad(rh)
                ref.mark_bad(rh)
            else:
                # mostly extend the head, sometimes a competitor near it
                parent = fast.head if rng.random() < 0.75 else rng.choice(list(fast.states.values()))
                rec = Record(run=g.run_id, round=parent.round + 1, prev=parent.head,
                             aggregator=rng.choice(members),
                             contributors=bitmap_of(rng.sample(range(5), rng.randint(0, 5)), 5))
                rh = h(b"test-record", parent.head, bytes([step % 256, seed]), rec.contributors, rec.aggregator)
                child = dataclasses.replace(parent, round=parent.round + 1, head=rh)
                fast.add(float(step), rh, rec, parent, child)
                ref.add(float(step), rh, rec, parent, child)
            fast_paths += fast._extends is not None
            assert _summary(fast.choose()) == _summary(ref.choose()), (seed, step)
            assert fast.head.head == ref.head.head and set(fast.states) == set(ref.states)
            assert set(fast.cand) == set(ref.cand) and set(fast.children) == set(ref.children)
            # the window always holds the head and its root (a head that fell back to the root
            # when the record after it was proven bad once made prune() drop every state)
            assert fast.head.head in fast.states and fast.root().head in fast.states
    assert fast_paths > 1000  # the fast path was taken, and checked, many times
