"""Help text that teaches: every option says what it does and shows its default.

Every parser of the command line (``seedswarm SUBCOMMAND`` and ``seedswarm bench NAME``) is made
with :func:`parser` or :func:`subcommand`, whose formatter appends ``(default: X)`` to an
option's help unless the help already says what the default is, and keeps the line breaks of
descriptions and epilogs (the examples). ``tests/test_help.py`` walks every ``--help`` and fails
on an option without a description.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from typing import Any

ESTIMATOR_HELP = ("how a trainer measures the gradient along the shared directions. fo: a local SGD "
                  "step projected on the shared directions (Ferret); zo: two forward passes per "
                  "direction, SPSA (MeZO)")
"""The one description of ``--estimator`` (sim, cluster, init and task check)."""
TASK_HELP = ("what to train: 'digits' or 'lm' (built in; docs/lm.md), package.module:factory, or path/to/file.py:factory "
             "(docs/tasks.md; check one with `seedswarm task check`)")
TASK_OPTION_HELP = ("an option for the task, KEY=VALUE (repeatable); the value is read as JSON when it "
                    "parses (numbers, true/false, lists) and kept as a string otherwise, e.g. hidden=4000")
AGGREGATOR_HELP = ("how a round's contributions are combined, direction by direction; guarded_mean "
                   "resists a Byzantine minority (docs/byzantine.md)")
DIRECTIONS_HELP = "K: shared random directions per round; a trainer sends one byte per direction"
GROUPS_HELP = "direction groups G: trainer i measures group i mod G (G x K directions a round)"


def add_learning_options(p: argparse.ArgumentParser, d: Any) -> None:
    """The training options ``sim`` and ``cluster`` share, with defaults from their config ``d``
    (its ``estimator``, ``trainers``, ``directions``, ``groups``, ``aggregator``, ``lr``,
    ``lr_half_life``, ``local_lr`` and ``batch_size``)."""
    from seedswarm.sampling.aggregators import RULES

    p.add_argument("--estimator", default=d.estimator, choices=["fo", "zo"], help=ESTIMATOR_HELP)
    p.add_argument("--trainers", type=int, default=d.trainers, help="trainers per round (the committee)")
    p.add_argument("--directions", type=int, default=d.directions, help=DIRECTIONS_HELP)
    p.add_argument("--groups", type=int, default=d.groups, help=GROUPS_HELP)
    p.add_argument("--aggregator", default=d.aggregator, choices=RULES, help=AGGREGATOR_HELP)
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate of the step every node applies each round")
    p.add_argument("--lr-half-life", type=int, default=d.lr_half_life, metavar="ROUNDS",
                   help="the learning rate decays as lr / (1 + round / ROUNDS); 0 keeps it constant")
    p.add_argument("--local-lr", type=float, default=d.local_lr, help="fo only: a trainer's local SGD learning rate")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples in a trainer's batch")


def fail(cmd: str, msg: str) -> int:
    """One line on stderr, ``seedswarm CMD: MSG``, and exit code 2: how every command refuses."""
    print(f"seedswarm {cmd}: {msg}", file=sys.stderr)
    return 2


def show_default(value: Any) -> str | None:
    """How a default reads in help text, or None when there is nothing worth showing."""
    if value is None or value is argparse.SUPPRESS or isinstance(value, bool):
        return None
    if isinstance(value, float) and math.isinf(value):
        return "no limit"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) if value else "none"
    return str(value)


class HelpFormatter(argparse.HelpFormatter):
    """Shows defaults; wraps each line of a description or epilog on its own, and keeps indented
    lines (examples, tables) exactly as written."""

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        if action.type is int:
            return "N"
        if action.type is float:
            return "X"
        return super()._get_default_metavar_for_optional(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out = []
        for line in text.splitlines():
            if not line.strip() or line.startswith(" "):
                out.append(indent + line if line.strip() else "")
            else:
                out.append(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent))
        return "\n".join(out)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if not action.option_strings or "(default" in text or action.nargs == 0:
            return text
        shown = show_default(action.default)
        if shown is None:
            return text
        return f"{text} (default: {shown.replace('%', '%%')})"


def _epilog(examples: str | list[str] | None, more: str | None = None) -> str | None:
    parts = []
    if examples:
        lines = [examples] if isinstance(examples, str) else examples
        parts.append("example" + ("s" if len(lines) > 1 else "") + ":\n" + "\n".join(f"  {x}" for x in lines))
    if more:
        parts.append(more)
    return "\n\n".join(parts) or None


def parser(prog: str, description: str, examples: str | list[str] | None = None,
           more: str | None = None) -> argparse.ArgumentParser:
    """A top-level parser (``seedswarm bench NAME``): description, then the examples as epilog."""
    return argparse.ArgumentParser(prog=prog, description=description, epilog=_epilog(examples, more),
                                   formatter_class=HelpFormatter)


def subcommand(sub: Any, name: str, help: str, description: str, examples: str | list[str] | None = None,
               more: str | None = None) -> argparse.ArgumentParser:
    """A ``seedswarm NAME`` subcommand with a one-line ``help`` (in ``seedswarm --help``), a
    description, and examples as its epilog."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=description,
                                                epilog=_epilog(examples, more), formatter_class=HelpFormatter)
    return p
