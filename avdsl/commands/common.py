"""What every command shares: exit codes, the two consoles, the one error type for bad arguments,
option choices, and completion of spec names. Commands import from here, never from `avdsl.cli`.

Exit codes (the same for every command):
  0    success (for `lint`: no findings)
  1    the command ran and found problems (lint findings, a failed or non-finite training run)
  2    the spec or a command-line argument could not be used: the message says where and why
       (for `import`: a checkpoint that cannot be read, or does not fit the spec as its format maps
       it; the message lists what is missing, left over and of the wrong shape)
  130  interrupted (Ctrl-C)
"""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from typer.exceptions import TyperException

from ..diagnostics import SpecError, printable, render
from ..loader import builtin_names

EXIT_OK, EXIT_FINDINGS, EXIT_BAD_SPEC, EXIT_INTERRUPTED = 0, 1, 2, 130

out = Console()
err = Console(stderr=True)


class CommandError(Exception):
    """A command cannot go on for a reason that is not a place in a spec (a bad option, a failed run).

    The command line prints it like a spec error (``error: message``, then ``hint: ...``) and exits
    with ``exit_code``.
    """

    def __init__(self, message: str, hint: str = "", exit_code: int = EXIT_BAD_SPEC) -> None:
        super().__init__(message)
        self.message, self.hint, self.exit_code = message, hint, exit_code

    def to_json(self) -> dict:
        return {"message": self.message, "hint": self.hint, "exit_code": self.exit_code}


def report(error: SpecError | CommandError | TyperException, as_json: bool = False) -> None:
    """Print one error: to stderr as text (headline, source line with caret, hint), or as JSON to stdout."""
    if isinstance(error, SpecError):
        payload = error.diagnostic.to_json()
        text = render(error.diagnostic, error.sources)
    elif isinstance(error, CommandError):
        payload = error.to_json()
        text = error.message + (f"\nhint: {error.hint}" if error.hint else "")
    else:
        payload = {"message": error.format_message(), "hint": "see `--help`"}
        text = f"{error.format_message()}\nhint: see `avdsl --help` or `avdsl COMMAND --help`"
    if as_json:
        print(json.dumps({"error": payload}, indent=2))
        return
    headline, _, rest = text.partition("\n")
    err.print(f"[bold red]error[/]: {escape(printable(headline))}", highlight=False, markup=True, soft_wrap=True)  # user text is no markup
    if rest:
        err.print(rest, highlight=False, markup=False, soft_wrap=True)


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"  # autocast
    bf16w = "bf16w"  # bf16 weights and activations, fp32 master weights (runtime/train/master.py)


def complete_spec(incomplete: str) -> list[str]:
    """Shell completion for a SPEC argument: built-in spec names, then .yaml files and folders."""
    names = [n for n in builtin_names() if n.startswith(incomplete)]
    folder, _, stem = incomplete.rpartition("/")
    base = Path(folder or ".")
    try:
        entries = sorted(base.iterdir())[:200] if base.is_dir() else []
    except OSError:
        entries = []
    for entry in entries:
        shown = f"{folder}/{entry.name}" if folder else entry.name
        if entry.name.startswith(stem) and not entry.name.startswith(".") and (entry.is_dir() or entry.suffix in (".yaml", ".yml")):
            names.append(shown + ("/" if entry.is_dir() else ""))
    return names


SPEC_HELP = "A spec file, a built-in spec name such as `zorro` or `tiny/zorro`, or `-` to read the spec from standard input."
