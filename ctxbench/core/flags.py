"""Command-line flags as data, and the one-line usage error.

A `Flag` is declared once, by whoever owns it: the engine declares the flags every command
takes (ctxbench.engine.options.SHARED_FLAGS), each measurement kind the flags it adds
(ctxbench.core.kinds.Kind.flags), and ctxbench.measurements.flags the few that several kinds
share. ctxbench.cli turns them into click options; a command takes the shared flags and those of
its kinds. Nothing here imports click, so a kind's declaration stays light.

Every mistake in a user's input is a `UsageError`: one line that says what was wrong and what to
do. The CLI prints it and exits with status 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn


class UsageError(Exception):
    """A mistake in the user's input: printed as one line, exit status 2."""


def fail(message: str) -> NoReturn:
    """Raise the one-line UsageError `message`."""
    raise UsageError(message)


@dataclass(frozen=True)
class Flag:
    """One command-line flag: `name` is its field in the parsed options (`impl_names`), `flag` what
    users type (`--impls`). `default` None means "not given": the command or kind that reads it
    decides (a default that depends on the device, say). `type` is int, float or str; `choices`,
    `is_flag` (a switch) and `multiple` (repeatable) are click's notions of the same names."""

    name: str
    flag: str
    default: Any = None
    type: type = str
    help: str = ""
    choices: tuple[str, ...] | None = None
    is_flag: bool = False
    multiple: bool = False
    show_default: bool = False
    metavar: str | None = None
