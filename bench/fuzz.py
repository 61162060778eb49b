"""``seedswarm bench fuzz``: mutated and random messages against one live daemon.

One ``seedswarm node`` process trains alone (a one-member swarm, so it applies rounds as fast as
it can) while the fuzzer, from many throwaway identities at once, sends it

* **direct streams** on every protocol it serves (msg, inputs, chain, ckpt, hello): valid
  Contributions, ChainRequests, CheckpointRequests, ContributionsRequests and hellos of this
  run, mutated by :class:`~seedswarm.bench.mutator.Mutator` (bit flips, truncations,
  extensions, msgpack type confusion, field swaps and drops, length lies, header lies, run
  swaps, splices), random bytes, framing lies (a frame header that says more or less than
  follows), sometimes on the wrong protocol. One request per stream (the protocols allow no
  more), several streams in parallel per identity; an identity is dropped after 25 requests
  (the daemon bans a peer after 30 rejected inputs).
* **gossip** on hand-written ``/meshsub/1.1.0`` streams, many RPCs per stream and 50 messages
  per RPC: records, fraud proofs, joins and leaves that are *validly signed* but hostile in
  content (random fields re-signed, mutated records inside fraud proofs, out-of-window joins),
  which pass the topic validator and reach the protocol core; then a few byte-mutated ones
  that the validator rejects (GossipSub graylists a forwarder after about ten, so each
  identity sends eight).
* **raw pubsub frames** last (``--raw-frames on``): garbage RPCs, bad keys, bad varints,
  truncated and oversized RPCs (``hostile_pubsub.RAW_PUBSUB_CASES``). Two of them stop a stock
  py-libp2p 0.8.1 host, so they run after everything else has been measured.

It samples the daemon's RSS (``/proc/<pid>/status`` VmRSS) every second and its round, and
checks at the end: the process is alive, it applied rounds during the fuzz, RSS grew by less
than ``--rss-limit-mb`` after the warm-up, and the rejection counters moved. Exit code 0 only
if all hold (and, with raw frames, it survived them too).

This module is the entry point and the run (:meth:`Fuzzer.main`); the fuzzer's parts live
beside it: ``fuzz_victim`` (the daemon, the configuration), ``fuzz_messages`` (what is sent),
``fuzz_lanes`` (the senders and samplers) and ``fuzz_report`` (end checks, summary, table).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from seedswarm.bench.fuzz_lanes import FuzzLanes
from seedswarm.bench.fuzz_report import FuzzReport, table
from seedswarm.bench.fuzz_victim import FuzzConfig
from seedswarm.bench.hostile_peer import RawPeer, quiet_libp2p
from seedswarm.clihelp import parser


class Fuzzer(FuzzLanes, FuzzReport):
    """The fuzz run: the daemon past round 3, then every lane at once, the drain, the raw
    frames, and the summary."""

    async def main(self) -> dict[str, Any]:
        cfg = self.cfg
        quiet_libp2p()
        # the daemon: running and past round 3 (bounded)
        deadline = time.time() + 180
        st = None
        while time.time() < deadline:
            st = await trio.to_thread.run_sync(self.status)
            if st and st.get("state") == "running" and int(st["round"]) >= 3:
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.proc.returncode}:\n{self.log_tail()}")
            await trio.sleep(0.5)
        else:
            raise RuntimeError("the daemon did not reach round 3 within 180 s")
        self.refresh(st)
        probe = RawPeer(self.ctx.run_id)
        async with probe.running():
            await self.learn_chain(probe)
        self.say(f"fuzz: victim pid {self.proc.pid} at round {self.ctx.round}; {len(self.ctx.records)} real records, "
                 f"manifest {'yes' if self.ctx.manifest else 'no'}; sending {cfg.messages} messages")
        m0 = await trio.to_thread.run_sync(self.metrics)
        t0 = time.time()
        self.phase = "fuzz"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.sampler, t0)
            nursery.start_soon(self.gossip_accounting, m0)
            async with trio.open_nursery() as senders:
                for w in range(cfg.direct_workers):
                    senders.start_soon(self.direct_worker, w)
                senders.start_soon(self.gossip_lane, True)
                senders.start_soon(self.gossip_lane, False)

                async def watchdog() -> None:
                    while self.budget_left() and time.time() - t0 < cfg.timeout_s:
                        await trio.sleep(0.5)
                    self.phase = "drain"  # the senders finish what they are writing, then stop

                senders.start_soon(watchdog)
            self.say(f"fuzz: {self.tally.total} messages written in {time.time() - t0:.0f} s; "
                     "waiting for the node to read them all")
            self.drain_seconds = await self.drain()
            fuzz_s = time.time() - t0
            alive_fuzz = self.proc.poll() is None
            st1 = await trio.to_thread.run_sync(self.status)
            m1 = await trio.to_thread.run_sync(self.metrics)
            m2 = m1
            rss_fuzz = list(self.rss)
            raw_alive: bool | None = None
            if cfg.raw_frames and alive_fuzz:
                self.phase = "raw"
                await self.raw_frames()
                r_before = int(st1["round"]) if st1 else 0
                # still applying rounds after the raw frames, and every drop counted? (bounded)
                last: dict[str, float] = {}
                for _ in range(60):
                    st2 = await trio.to_thread.run_sync(self.status)
                    m2 = await trio.to_thread.run_sync(self.metrics)
                    drops = {k: v for k, v in m2.items() if k.startswith("gossip_dropped")}
                    raw_alive = self.proc.poll() is None and st2 is not None and int(st2["round"]) > r_before + 3
                    if raw_alive and drops == last or self.proc.poll() is not None:
                        break
                    last = drops
                    await trio.sleep(0.5)
            self.phase = "done"
            nursery.cancel_scope.cancel()
        return self.summarize(t0, fuzz_s, m0, m1, m2, st1, alive_fuzz, rss_fuzz, raw_alive)


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``seedswarm bench fuzz``."""
    d = FuzzConfig()
    ap = parser("seedswarm bench fuzz",
                "Mutated valid messages and random bytes against a live daemon, over real libp2p streams and "
                "raw pubsub RPCs; checks that it survives, keeps training, counts what it refused and keeps "
                "its memory flat.",
                ["seedswarm bench fuzz --messages 100000 --json",
                 "seedswarm bench fuzz --messages 5000 --raw-frames off"])
    ap.add_argument("--messages", type=int, default=d.messages, help="messages to send in all")
    ap.add_argument("--seed", type=int, default=d.seed, help="seed of the mutations")
    ap.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    ap.add_argument("--raw-frames", choices=("on", "off"), default="on",
                    help="raw pubsub frames at the end (every case of seedswarm.gossip.libp2p.hostile, three times)")
    ap.add_argument("--direct-workers", type=int, default=d.direct_workers,
                    help="identities sending on direct streams at once")
    ap.add_argument("--gossip-rate", type=float, default=d.gossip_rate, help="gossip messages written per second")
    ap.add_argument("--deep-share", type=float, default=d.deep_share,
                    help="share of gossip messages valid in form (they reach the core); the rest break the pubsub envelope")
    ap.add_argument("--rss-limit-mb", type=float, default=d.rss_limit_mb,
                    help="RSS may end at most this far above its warm-up level, and peak at most twice as far")
    ap.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds of fuzzing at most")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    if args.messages < 1:
        print("seedswarm bench fuzz: --messages must be positive", file=sys.stderr)
        return 2
    tmp = None
    out = args.out
    if out is None:
        tmp = tempfile.mkdtemp(prefix="seedswarm-fuzz-")
        out = tmp
    cfg = FuzzConfig(messages=args.messages, seed=args.seed, out=out, raw_frames=args.raw_frames == "on",
                     direct_workers=args.direct_workers, deep_share=args.deep_share,
                     gossip_rate=args.gossip_rate,
                     rss_limit_mb=args.rss_limit_mb, timeout_s=args.timeout, quiet=args.quiet)
    fz = Fuzzer(cfg)
    try:
        fz.start_daemon()
        summary = trio.run(fz.main)
    except KeyboardInterrupt:
        print("seedswarm bench fuzz: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one clear line
        print(f"seedswarm bench fuzz: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    finally:
        rc = fz.stop_daemon() if hasattr(fz, "proc") else None
    summary["exit_code_on_sigterm"] = rc
    if summary["alive_after_fuzz"] and summary["alive_after_raw_frames"] is not False and rc != 0:
        summary["failures"].append(f"the daemon exited {rc} on SIGTERM (expected 0)")
        summary["ok"] = False
    summary["out"] = out
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "fuzz.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary) if args.json else table(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
