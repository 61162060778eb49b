"""Help that teaches: every option of every command says what it does and shows its default,
every command has a description and an example, and ``--version`` names both versions.

Each ``--help`` is run in-process through ``seedswarm.cli.main`` (as a user types it) and its
text is read back, so what is checked is what people see.
"""

from __future__ import annotations

import dataclasses
import re

import pytest

from seedswarm import PROTOCOL_VERSION, __version__
from seedswarm.cli import BENCHES, main

COMMANDS = [["sim"], ["init"], ["node"], ["status"], ["cluster"], ["task"], ["task", "check"],
            *[["bench", b] for b in BENCHES]]
ENTRY = re.compile(r"^  (-\S.*?)(?:\s{2,}(\S.*))?$")


def help_text(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ")
    return out


def options(text: str) -> dict[str, str]:
    """Option invocation ('--nodes N') -> its description, read from the help text."""
    found: dict[str, str] = {}
    current: str | None = None
    for line in text.splitlines():
        m = ENTRY.match(line)
        if m:
            current = m.group(1).strip()
            found[current] = (m.group(2) or "").strip()
        elif current is not None and line.startswith("   ") and line.strip():
            found[current] = (found[current] + " " + line.strip()).strip()
        else:
            current = None
    return found


def problems(text: str) -> list[str]:
    bad = []
    for invocation, desc in options(text).items():
        takes_value = any(not t.startswith("-") for t in invocation.replace(",", " ").split())
        if not desc:
            bad.append(f"{invocation}: no description")
        elif takes_value and "default" not in desc.lower():
            bad.append(f"{invocation}: default not shown")
    return bad


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_option_is_described(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(capsys, argv)
    assert len(options(text)) >= 1 and "-h, --help" in options(text)
    bad = problems(text)
    assert not bad, f"seedswarm {' '.join(argv)} --help:\n" + "\n".join(bad)


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda c: " ".join(c))
def test_commands_have_a_description_and_an_example(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(capsys, argv)
    usage_end = text.index("\n\n")
    description = text[usage_end:].strip().split("\n\n")[0]
    assert not description.startswith(("options:", "positional")), f"{argv}: no description"
    assert re.search(r"^examples?:\n  seedswarm ", text, re.M), f"{argv}: no example"


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(capsys, [])
    for cmd in ("sim", "init", "node", "status", "cluster", "task", "bench"):
        assert re.search(rf"^    {cmd}\s+\S", text, re.M), cmd
    assert main(["bench", "--help"]) == 0
    bench = capsys.readouterr().out
    for name in BENCHES:
        assert re.search(rf"^  {name}\s+\S", bench, re.M), name


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"seedswarm {__version__} (protocol version {PROTOCOL_VERSION})"


@pytest.mark.parametrize("cmd", ["sim", "cluster", "init"])
def test_estimators_are_explained_where_chosen(cmd: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = " ".join(help_text(capsys, [cmd]).split())
    assert "fo: a local SGD step projected on the shared directions (Ferret)" in text
    assert "zo: two forward passes per direction, SPSA (MeZO)" in text


def test_node_help_lists_every_config_key(capsys: pytest.CaptureFixture[str]) -> None:
    from seedswarm.node.daemon.config import NodeConfig

    text = help_text(capsys, ["node"])
    epilog = text.split("--config FILE.toml keys", 1)[1]
    for f in dataclasses.fields(NodeConfig):
        if f.name != "extra":
            assert re.search(rf"^  {f.name}\s+\S.*\[default: ", epilog, re.M), f.name


def test_no_internal_jargon(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in COMMANDS:
        text = help_text(capsys, argv).lower()
        for word in ("issue 4", "issue's", "acceptance criteria"):
            assert word not in text, (argv, word)
