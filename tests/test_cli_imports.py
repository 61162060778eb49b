"""`seedswarm node` imports libp2p in a second thread while its main thread imports torch
(``node.cli._load_daemon``). That is safe only while the two share no module that either could
be importing at the same moment: pin that our libp2p side pulls in neither torch nor numpy,
and that the node command's start-up still records its import phases in order."""

from __future__ import annotations

import json
import subprocess
import sys


def test_the_libp2p_side_imports_neither_torch_nor_numpy() -> None:
    code = ("import sys\n"
            "from seedswarm.node.daemon import netstack\n"
            "netstack.load_libp2p()\n"
            "import libp2p.pubsub.gossipsub\n"
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_node_loads_both_stacks_and_records_the_phases(tmp_path: object) -> None:
    """The CLI's loader imports torch and libp2p (one in a thread) and hands back a daemon whose
    phase times are ordered: torch, then modules, then libp2p joined."""
    code = ("import json, time\n"
            "from seedswarm.node import cli\n"
            "from seedswarm.node.daemon.config import NodeConfig\n"
            "from seedswarm.node.learn.initial import build_genesis\n"
            "from seedswarm.crypto.keys import Identity\n"
            "import sys\n"
            "g = build_genesis([Identity.from_seed(b'\\x01' * 32).public], task='digits', task_options={'hidden': 8})\n"
            f"cfg = NodeConfig(data_dir={str(tmp_path)!r})\n"
            "t = time.time()\n"
            "d = cli._load_daemon(cfg, g, t)\n"
            "p = d.phases\n"
            "print(json.dumps({'ok': p['main'] <= p['torch_import'] <= p['modules_import'] <= p['libp2p_import'],\n"
            "                  'mods': [m in sys.modules for m in ('torch', 'libp2p.pubsub.gossipsub')]}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"ok": True, "mods": [True, True]}, got
