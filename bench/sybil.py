"""`seedswarm bench sybil`: a flood of Joins from fresh keys against a small open swarm.

Keys cost nothing, so an open swarm must make joining cost the flooder, not the swarm
(node/core/admission.py): work that gets harder as joins come in, a bounded number of admissions
per record, probation (new members hold at most a quarter of the trainer seats and no aggregator
rank until they have contributed) and expulsion of silent newcomers even by empty records. This
bench runs the simulator (the real protocol core) on an open swarm of ``--nodes`` members, has an
outsider gossip ``--joins`` Joins (each with the work the chain asks for when it is sent) at round
``--at``, and reports how many were admitted, when the last sybil was expelled, and the swarm's
rate (rounds per virtual second) before, during and after, against the same run without the flood.

    seedswarm bench sybil --nodes 3 --joins 200 --json
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from seedswarm.clihelp import parser
from seedswarm.crypto.hashing import h
from seedswarm.crypto.keys import Identity
from seedswarm.progress import Progress


def _run(nodes: int, joins: int, at: int, rounds: int, seed: int) -> dict[str, Any]:
    from seedswarm.gossip.wire import Join
    from seedswarm.node.core.admission import solve_work
    from seedswarm.node.core.chain import ChainState
    from seedswarm.sim.runner import SimConfig, build

    sim = build(SimConfig(nodes=nodes, rounds=rounds, seed=seed, quiet=True, eval_every=1 << 30))
    genesis_members = set(sim.genesis.members)
    times: dict[int, float] = {}
    members: dict[int, int] = {}
    admitted: set[bytes] = set()
    sybil_keys: set[bytes] = set()
    t0 = time.monotonic()

    def on_round(s: Any, st: ChainState) -> None:
        times[st.round] = s.now
        members[st.round] = len(st.members)
        admitted.update(p for p in st.members if p not in genesis_members)
        if st.round == at and joins:
            outsider = s.add_node(Identity.from_seed(h(b"bench/sybil-outsider", bytes([seed]))), st)
            outsider.online = False  # a gossip source, nothing more
            for i in range(joins):
                ident = Identity.from_seed(h(b"bench/sybil", seed.to_bytes(4, "big"), i.to_bytes(4, "big")))
                sybil_keys.add(ident.public)
                work = solve_work(st.run_id, ident.public, st.round, st.join_bits)
                s._publish(outsider, Join(run=st.run_id, round=st.round, peer=ident.public, cert=work).signed(ident))

    sim.on_round = on_round
    sim.start()
    sim.run(rounds, max_wall=3600)
    last = max(times)

    def rate(a: int, b: int) -> float | None:
        a, b = max(a, 1), min(b, last)
        return None if b <= a or a not in times or b not in times else round((b - a) / (times[b] - times[a]), 3)

    still = [r for r, m in members.items() if m > nodes]
    gone_at = max(still) + 1 if still else None
    return {
        "nodes": nodes, "joins": joins, "flood_round": at, "rounds": last,
        "admitted": len(admitted & sybil_keys), "max_members": max(members.values()),
        "final_members": members[last], "all_expelled_by_round": gone_at,
        "rounds_to_recover": (gone_at - at) if gone_at else 0,
        "rate_before": rate(at - 20, at), "rate_during": rate(at, gone_at or at + 20),
        "rate_after": rate((gone_at or at) + 10, last),
        "wall_seconds": round(time.monotonic() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = parser("seedswarm bench sybil",
               "A flood of join requests from fresh keys against a small open swarm: how many are admitted, "
               "how fast the swarm expels them, and its speed before, during and after (against a run without "
               "the flood).",
               ["seedswarm bench sybil --nodes 3 --joins 200 --json"])
    p.add_argument("--nodes", type=int, default=3, help="honest founding members")
    p.add_argument("--joins", type=int, default=200, help="join requests from fresh keys in the flood")
    p.add_argument("--at", type=int, default=30, help="round of the flood")
    p.add_argument("--rounds", type=int, default=400, help="rounds to simulate")
    p.add_argument("--seed", type=int, default=0, help="simulation seed")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    a = p.parse_args(argv)
    if a.nodes < 1 or a.joins < 0 or not 20 <= a.at < a.rounds - 30:
        print("seedswarm bench sybil: need --nodes >= 1, --joins >= 0 and 20 <= --at < --rounds - 30", file=sys.stderr)
        return 2
    header = (f"sybil: {a.joins} Joins against an open swarm of {a.nodes} at round {a.at}, {a.rounds} rounds "
              "(and a clean run for the baseline)")
    with Progress(2, unit="run", header=header) as progress:
        progress.update(0, running="flood")
        flood = _run(a.nodes, a.joins, a.at, a.rounds, a.seed)
        progress.update(1, running="clean")
        clean = _run(a.nodes, 0, a.at, a.rounds, a.seed)
        progress.update(2, running=None)
    res = {"flood": flood, "clean": clean,
           "rate_after_vs_clean": round(flood["rate_after"] / clean["rate_after"], 3)
           if flood["rate_after"] and clean["rate_after"] else None}
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"admitted {flood['admitted']} of {a.joins} (at most {flood['max_members']} members at once); "
              f"every sybil expelled by round {flood['all_expelled_by_round']} "
              f"({flood['rounds_to_recover']} rounds after the flood)")
        print(f"rounds per virtual second: before {flood['rate_before']}, during {flood['rate_during']}, "
              f"after {flood['rate_after']} (clean run: {clean['rate_after']}; ratio {res['rate_after_vs_clean']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
