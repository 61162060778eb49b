"""Operator mistakes on the command line: one clear line on stderr and exit code 2, never a
traceback, and nothing overwritten (DESIGN.md invariant 6 for the tools)."""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from seedswarm.cli import main
from seedswarm.node.core.genesis import Genesis
from seedswarm.node.files import DataDirLock

KEY = "ab" * 32
TINY_SIM = ["--nodes", "4", "--rounds", "1", "--trainers", "2", "--directions", "4", "--task-option", "hidden=8",
            "--eval-every", "1", "--quiet"]


def fails(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one line on stderr. Returns the line."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def unwritable(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody may create files in (root ignores permission bits: use sysfs, which
    refuses new entries to everyone)."""
    if os.geteuid() == 0:
        if not Path("/sys/kernel").is_dir():
            pytest.skip("running as root without /sys: no folder is unwritable")
        yield Path("/sys")
        return
    d = tmp_path / "read-only"
    d.mkdir()
    d.chmod(0o500)
    yield d
    d.chmod(0o700)


# ---------------------------------------------------------------------------------------------
# --out


@pytest.mark.parametrize("cmd", ["sim", "cluster"])
def test_out_folder_that_cannot_be_used(cmd: str, tmp_path: Path, unwritable: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me\n")
    extra = TINY_SIM if cmd == "sim" else ["--nodes", "3"]
    line = fails(capsys, [cmd, *extra, "--out", str(a_file)])
    assert line == f"seedswarm {cmd}: --out {a_file} is a file, not a folder: choose another --out"
    line = fails(capsys, [cmd, *extra, "--out", str(a_file / "run")])
    assert line == f"seedswarm {cmd}: cannot write to --out {a_file / 'run'}: Not a directory"
    line = fails(capsys, [cmd, *extra, "--out", str(unwritable / "run")])
    assert line.startswith(f"seedswarm {cmd}: cannot write to --out {unwritable / 'run'}: ")
    assert a_file.read_text() == "keep me\n" and not (unwritable / "run").exists()


def test_init_out_that_cannot_be_used(tmp_path: Path, unwritable: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me\n")
    base = ["init", "--member", KEY, "--trainers", "2", "--task-option", "hidden=8"]
    assert fails(capsys, [*base, "--out", str(a_file)]) == f"seedswarm init: {a_file} exists (use --force to overwrite)"
    assert fails(capsys, [*base, "--out", str(tmp_path)]) == f"seedswarm init: --out {tmp_path} is a folder: give a file name"
    line = fails(capsys, [*base, "--out", str(a_file / "sub" / "genesis.json")])
    assert line == f"seedswarm init: cannot write --out {a_file / 'sub' / 'genesis.json'}: {a_file} is a file, not a folder"
    line = fails(capsys, [*base, "--out", str(unwritable / "genesis.json")])
    assert line.startswith(f"seedswarm init: cannot write --out {unwritable / 'genesis.json'}: ")
    # a data dir under a file: one line too, and no genesis written
    out = tmp_path / "g.json"
    line = fails(capsys, ["init", "--out", str(out), "--data-dir", str(a_file / "node"), "--trainers", "2",
                          "--task-option", "hidden=8"])
    assert line.startswith("seedswarm init: cannot write ") and "Not a directory" in line
    assert not out.exists() and a_file.read_text() == "keep me\n"


def test_sim_refuses_to_overwrite_a_run_folder_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["sim", *TINY_SIM, "--out", str(out)]) == 0
    capsys.readouterr()
    before = (out / "summary.json").read_bytes()
    line = fails(capsys, ["sim", *TINY_SIM, "--out", str(out)])
    assert line == (f"seedswarm sim: --out {out} already holds files (a previous run?): use --force to "
                    "overwrite it, or choose another --out")
    assert (out / "summary.json").read_bytes() == before
    assert main(["sim", *TINY_SIM, "--seed", "1", "--out", str(out), "--force"]) == 0
    assert json.loads((out / "summary.json").read_text())["config"]["seed"] == 1
    # an existing empty folder is fine (e.g. made by mktemp)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["sim", *TINY_SIM, "--out", str(empty)]) == 0


def _stub_cluster_run(monkeypatch: pytest.MonkeyPatch, seen: dict[str, Any]) -> None:
    from seedswarm.sim import cluster

    def run(self: cluster.Cluster) -> dict[str, Any]:
        seen["out"] = self.out
        seen["nodes_left"] = (self.out / "nodes").exists()
        keys = ("honest_digest_agreement", "rounds", "running_nodes", "final_accuracy", "join_seconds",
                "round_latency_p50_s", "round_latency_p95_s", "bytes_per_node_per_round", "wall_seconds")
        return {**dict.fromkeys(keys, 0), "interrupted": False, "finished": True}

    monkeypatch.setattr(cluster.Cluster, "run", run)


def test_cluster_refuses_a_run_folder_and_force_clears_its_nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    (out / "nodes" / "node-0").mkdir(parents=True)
    (out / "nodes" / "node-0" / "chain.log").write_bytes(b"an old run's chain")
    (out / "summary.json").write_text("{}\n")
    line = fails(capsys, ["cluster", "--nodes", "3", "--out", str(out)])
    assert "already holds files" in line and "--force" in line
    assert (out / "nodes" / "node-0" / "chain.log").exists()
    seen: dict[str, Any] = {}
    _stub_cluster_run(monkeypatch, seen)
    with DataDirLock(out / "nodes" / "node-0"):  # a node of the old run still running: refused
        line = fails(capsys, ["cluster", "--nodes", "3", "--out", str(out), "--force"])
    assert line == (f"seedswarm cluster: --force: a node of the old run is still running in "
                    f"{out / 'nodes' / 'node-0'} (pid {os.getpid()}): stop it first")
    assert (out / "nodes" / "node-0" / "chain.log").exists() and not seen
    assert main(["cluster", "--nodes", "3", "--trainers", "3", "--out", str(out), "--force"]) == 0
    assert seen == {"out": out, "nodes_left": False}


# ---------------------------------------------------------------------------------------------
# --trainers above --nodes: supported by the protocol (the committee is every member), so a note


def test_trainers_above_nodes_is_a_note_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["sim", *TINY_SIM, "--trainers", "6", "--out", str(tmp_path / "a")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert ("seedswarm sim: note: --trainers 6 is above --nodes 4: every member trains each round "
            "(committees of 4)") in err
    assert main(["sim", *TINY_SIM, "--out", str(tmp_path / "b")]) == 0
    assert "note:" not in capsys.readouterr().err
    _stub_cluster_run(monkeypatch, {})
    assert main(["cluster", "--nodes", "3", "--trainers", "8", "--join-nodes", "2", "--join-at", "5",
                 "--out", str(tmp_path / "c")]) == 0
    assert ("seedswarm cluster: note: --trainers 8 is above --nodes 3: every member trains each round "
            "(committees of 3, up to 5 as nodes join)") in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# task factories


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    mod = tmp_path / "plugins" / "brokentask.py"
    mod.parent.mkdir()
    mod.write_text(textwrap.dedent("""
        def runtime(options, seed):
            raise RuntimeError("no GPU here")

        def keyerror(options, seed):
            return options["path"]

        def valueerror(options, seed):
            raise ValueError("option 'size' must be positive")
    """))
    monkeypatch.syspath_prepend(str(mod.parent))
    return "brokentask"


@pytest.mark.parametrize("factory,message", [
    ("runtime", "task factory 'brokentask:runtime' failed: RuntimeError: no GPU here"),
    ("keyerror", "task factory 'brokentask:keyerror' failed: KeyError: 'path'"),
    ("valueerror", "option 'size' must be positive"),
])
def test_task_factory_errors(plugin: str, factory: str, message: str, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    task = f"{plugin}:{factory}"
    assert fails(capsys, ["sim", *TINY_SIM, "--task", task, "--out", str(tmp_path / "s")]) == f"seedswarm sim: {message}"
    assert fails(capsys, ["init", "--member", KEY, "--task", task, "--out", str(tmp_path / "g.json")]) == \
        f"seedswarm init: {message}"
    assert not (tmp_path / "g.json").exists()


def test_load_task_wraps_factory_exceptions(plugin: str) -> None:
    from seedswarm.node.learn.tasks import TaskError, load_task

    with pytest.raises(TaskError, match=r"'brokentask:runtime' failed: RuntimeError: no GPU here") as e:
        load_task(f"{plugin}:runtime")
    assert isinstance(e.value.__cause__, RuntimeError)
    with pytest.raises(ValueError, match="must be positive"):  # a ValueError passes as is
        load_task(f"{plugin}:valueerror")


# ---------------------------------------------------------------------------------------------
# genesis files


@pytest.fixture
def genesis_json() -> dict[str, Any]:
    d: dict[str, Any] = json.loads(Genesis(members=(bytes.fromhex(KEY),), model_digest=b"\x01" * 32).to_json())
    return d


def _node_fails(capsys: pytest.CaptureFixture[str], tmp_path: Path, content: bytes) -> str:
    f = tmp_path / "genesis.json"
    f.write_bytes(content)
    data = tmp_path / "data"
    line = fails(capsys, ["node", "--genesis", str(f), "--data-dir", str(data), "--listen", "/ip4/127.0.0.1/tcp/0"])
    assert not data.exists()  # rejected before anything is written
    return line


def test_genesis_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _node_fails(capsys, tmp_path, b'{"task": "digits\xff\xfe"}')
    assert line == (f"seedswarm node: genesis file {tmp_path / 'genesis.json'} is not UTF-8 text "
                    "(byte 0xff at offset 16): is it a genesis file?")


@pytest.mark.parametrize("drop,named", [(["trainers"], "trainers"), (["members", "seed"], "seed, members")])
def test_genesis_missing_field_is_rejected(drop: list[str], named: str, genesis_json: dict[str, Any],
                                           tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for k in drop:
        del genesis_json[k]
    line = _node_fails(capsys, tmp_path, json.dumps(genesis_json).encode())
    assert line == (f"seedswarm node: genesis is missing field(s) {named}: a genesis file must hold every "
                    "field (`seedswarm init` writes them all)")


@pytest.mark.parametrize("field,value,message", [
    ("trainers", "x", 'trainers: expected an integer, got "x"'),
    ("trainers", True, "trainers: expected an integer, got true"),
    ("trainers", 16.0, "trainers: expected an integer, got 16.0"),
    ("seed", None, "seed: expected an integer, got null"),
    ("directions", [64], "directions: expected an integer, got [64]"),
    ("lr", "0.1", 'lr: expected a number, got "0.1"'),
    ("lr", False, "lr: expected a number, got false"),
    ("lr", float("nan"), "lr: expected a finite number, got NaN"),
    ("quorum", {"v": 1}, 'quorum: expected a number, got {"v": 1}'),
    ("task", 7, "task: expected a string, got 7"),
    ("task_options", [1, 2], "task_options: expected an object (JSON {...}), got [1, 2]"),
    ("task_options", "hidden=8", 'task_options: expected an object (JSON {...}), got "hidden=8"'),
    ("members", KEY, "members: expected a list of 64-hex-digit public keys, got"),
    ("members", ["zz"], 'members[0]: expected a 64-hex-digit public key, got "zz"'),
    ("members", [KEY, "abcd"], 'members[1]: expected a 64-hex-digit public key, got "abcd"'),
    ("members", [7], "members[0]: expected a 64-hex-digit public key, got 7"),
    ("admission_key", 5, "admission_key: expected a hex string, got 5"),
    ("model_digest", "not hex", 'model_digest: expected a hex string, got "not hex"'),
    ("version", "1", 'version: expected an integer, got "1"'),
])
def test_genesis_bad_type_names_the_field(field: str, value: Any, message: str, genesis_json: dict[str, Any],
                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    genesis_json[field] = value
    line = _node_fails(capsys, tmp_path, json.dumps(genesis_json).encode())
    assert line.startswith(f"seedswarm node: invalid genesis: {message}"), line


def test_genesis_reports_every_bad_field_at_once(genesis_json: dict[str, Any], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    genesis_json.update(trainers="x", lr=True)
    line = _node_fails(capsys, tmp_path, json.dumps(genesis_json).encode())
    assert "lr: expected a number, got true" in line and 'trainers: expected an integer, got "x"' in line


def test_genesis_round_trips_every_field(genesis_json: dict[str, Any]) -> None:
    """to_json writes every field and from_json reads it back to the same run id; an integer
    written where a float is declared stays an integer (the run id hashes values as written)."""
    g = Genesis.from_json(json.dumps(genesis_json))
    assert set(genesis_json) == set(Genesis.__dataclass_fields__)
    assert json.loads(g.to_json()) == genesis_json and g.run_id == Genesis.from_json(g.to_json()).run_id
    genesis_json["quorum"] = 1
    assert Genesis.from_json(json.dumps(genesis_json)).quorum == 1


# ---------------------------------------------------------------------------------------------
# runs never clobber runs


def test_default_run_folders_never_collide(tmp_path: Path) -> None:
    from seedswarm.node.files import OutPathError, new_run_dir

    base = tmp_path / "runs" / "sim-20260101-000000"
    made = [new_run_dir(base) for _ in range(3)]
    assert [p.name for p in made] == [base.name, f"{base.name}-2", f"{base.name}-3"]
    assert all(p.is_dir() and not any(p.iterdir()) for p in made)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OutPathError, match="cannot create"):
        new_run_dir(tmp_path / "a-file" / "sim")


def test_benches_refuse_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "byz"
    old.mkdir()
    (old / "results.json").write_text("{}")
    line = fails(capsys, ["bench", "byzantine", "--quick", "--out", str(old)])
    assert line.startswith(f"seedswarm bench byzantine: --out {old} already holds files") and "--force" in line
    saved = tmp_path / "protocols.json"
    saved.write_text("{}")
    line = fails(capsys, ["bench", "protocols", "--quick", "--out", str(saved)])
    assert line == f"seedswarm bench protocols: {saved} exists (use --force to overwrite)"
    assert saved.read_text() == "{}" and (old / "results.json").read_text() == "{}"


def test_sim_refuses_a_negative_direction_cache(capsys: pytest.CaptureFixture[str]) -> None:
    line = fails(capsys, ["sim", *TINY_SIM, "--direction-cache-mb", "-1"])
    assert line == "seedswarm sim: --direction-cache-mb must be >= 0"
