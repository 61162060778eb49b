"""Fork choice over a bounded window: the states of the last ``max_undo`` rounds and every valid
record on top of them.

The head is the deepest state reachable from the window's root; between two records of one round
the one with more contributions wins, then the lower aggregator rank, then the lower hash. Every
node applying this rule to the same records picks the same head, and no node ever undoes more
than ``max_undo`` rounds: the root never moves back.
"""

from __future__ import annotations

from dataclasses import dataclass

from seedswarm.gossip.wire import Record
from seedswarm.node.core.chain import ChainState, ranks_of


@dataclass
class Candidate:
    rec: Record
    parent: ChainState
    state: ChainState


@dataclass(frozen=True)
class HeadChange:
    """The head moved: apply ``steps`` from ``base`` (an ancestor of both heads) to reach ``head``."""

    base: ChainState
    steps: tuple[tuple[ChainState, Record], ...]
    head: ChainState
    undone: int  # rounds of the old head undone (0: the head only moved forward)


class ForkTree:
    def __init__(self, root: ChainState, max_undo: int) -> None:
        self.max_undo = max_undo
        self.head = root
        self.states: dict[bytes, ChainState] = {root.head: root}  # recent states by head hash
        self.seen_at: dict[bytes, float] = {}  # state head -> when this node first had it
        self.children: dict[bytes, dict[bytes, Candidate]] = {}  # parent head -> record hash -> candidate
        self.cand: dict[bytes, Candidate] = {}  # record hash (= child head) -> candidate
        self.bad: set[bytes] = set()  # records proven or found invalid (change it with mark_bad)
        # The common case, made cheap: since the last choose(), the only change was one record
        # that extends the head (the head was the best tip, so its first child is the new one).
        self._extends: bytes | None = None
        self._changed = False
        self._root: ChainState | None = None  # the root at the last prune

    def state(self, head: bytes) -> ChainState | None:
        return self.states.get(head)

    def has(self, prev: bytes, rh: bytes) -> bool:
        return rh in self.children.get(prev, {})

    def record_of(self, st: ChainState) -> Candidate | None:
        return self.cand.get(st.head)

    def add(self, now: float, rh: bytes, rec: Record, parent: ChainState, child: ChainState) -> None:
        kids = self.children.setdefault(rec.prev, {})
        simple = not self._changed and rec.prev == self.head.head and not kids and rh not in self.bad
        kids[rh] = self.cand[rh] = Candidate(rec, parent, child)
        self.states[rh] = child
        self.seen_at.setdefault(rh, now)
        self._extends = rh if simple else None
        self._changed = True

    def mark_bad(self, rh: bytes) -> None:
        """A record proven or found invalid: fork choice never picks it (nor what builds on it)."""
        self.bad.add(rh)
        self._extends = None
        self._changed = True

    # ------------------------------------------------------------------ the rule
    @staticmethod
    def _quality(c: Candidate) -> tuple[int, int, bytes]:
        rank = c.parent.aggregator_rank(c.rec.aggregator)
        return (-len(ranks_of(c.rec.contributors)), rank if rank is not None else 1 << 30, c.state.head)

    def _best_tip(self, st: ChainState) -> tuple[int, list[Candidate]]:
        """Deepest reachable tip from st; ties broken by record quality at the first fork."""
        best_depth, best_key, best_path = st.round, None, []
        stack: list[tuple[ChainState, list[Candidate]]] = [(st, [])]
        # Iterative depth-first search (a long catch-up makes deep trees; no recursion limit).
        results: list[tuple[int, list[Candidate]]] = []
        while stack:
            cur, path = stack.pop()
            kids = [c for h, c in self.children.get(cur.head, {}).items() if h not in self.bad]
            if not kids:
                results.append((cur.round, path))
                continue
            for c in kids:
                stack.append((c.state, [*path, c]))
        for depth, path in results:
            key = tuple(self._quality(c) for c in path)
            if best_key is None or depth > best_depth or (depth == best_depth and key < best_key):
                best_depth, best_key, best_path = depth, key, path
        return best_depth, best_path

    def root(self) -> ChainState:
        """The oldest state kept: nothing before it can change."""
        st = self.head
        while st.round > 0 and self.head.round - st.round < self.max_undo:
            cand = self.record_of(st)
            if cand is None or cand.parent.head not in self.states:
                # Never below what we hold: when the head falls back (its record proven bad),
                # the walk would otherwise reach a pruned state and prune() would drop them all.
                break
            st = cand.parent
        return st

    def path_to(self, root: ChainState, st: ChainState) -> list[Candidate]:
        path: list[Candidate] = []
        while st.head != root.head:
            cand = self.record_of(st)
            if cand is None:
                break
            path.append(cand)
            st = cand.parent
        return path[::-1]

    def choose(self) -> HeadChange | None:
        """Apply the rule; move the head if it changed."""
        extends, self._extends, self._changed = self._extends, None, False
        if extends is not None:
            # The head was the deepest tip, and the new record is its only child: the one
            # deepest tip now, whatever the other branches hold (same answer as the search).
            c = self.cand[extends]
            old = self.head
            self.head = c.state
            self.prune()
            return HeadChange(old, ((c.parent, c.rec),), c.state, 0)
        root = self.root()
        _, path = self._best_tip(root)
        new_head = path[-1].state if path else root
        if new_head is self.head:
            return None
        old_chain = {c.state.head for c in self.path_to(root, self.head)}
        old_chain.add(root.head)
        i = 0
        while i < len(path) and path[i].state.head in old_chain:
            i += 1
        base = path[i - 1].state if i > 0 else root
        steps = tuple((c.parent, c.rec) for c in path[i:])
        undone = self.head.round - base.round if base is not self.head else 0
        self.head = new_head
        self.prune()
        return HeadChange(base, steps, new_head, undone)

    def prune(self) -> None:
        """Forget what fell out of the window (every state not built on the root)."""
        root = self.root()
        old, self._root = self._root, root
        if old is not None and root.head == old.head:
            return  # the root did not move: everything held still builds on it
        cand = self.record_of(root)
        if old is not None and cand is not None and cand.parent.head == old.head:
            # The common case (the head moved one round on): the window lost its oldest state
            # and whatever branched off it but the new root. Same result as the search below.
            self._drop_subtree(old.head, spare=root.head)
        else:
            keep = {root.head}
            frontier = [root.head]
            while frontier:
                h = frontier.pop()
                for rh in self.children.get(h, {}):
                    keep.add(rh)
                    frontier.append(rh)
            for h in [h for h in self.states if h not in keep]:
                self._forget(h)
        if len(self.bad) > 1024:
            self.bad = {h for h in self.bad if h in self.states}

    def _drop_subtree(self, h: bytes, spare: bytes) -> None:
        """Forget state ``h`` and everything built on it, except the subtree of ``spare``."""
        frontier = [h]
        while frontier:
            x = frontier.pop()
            frontier.extend(c for c in self.children.get(x, {}) if c != spare)
            self._forget(x)

    def _forget(self, h: bytes) -> None:
        self.states.pop(h, None)
        self.seen_at.pop(h, None)
        self.children.pop(h, None)
        self.cand.pop(h, None)

    def keep_only(self, keep: set[bytes]) -> set[bytes]:
        """The subset of ``keep`` still in the window (callers prune their own per-record sets)."""
        return {h for h in keep if h in self.states}
