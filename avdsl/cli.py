"""The `avdsl` command line (typer + rich).

Exit codes (the same for every command):
  0  success (for `lint`: no findings)
  1  the command ran and found problems (lint findings, a failed or non-finite training run)
  2  the spec (or a command-line argument) could not be used: the message says where and why
  130  interrupted (Ctrl-C)
"""
from __future__ import annotations

import logging
import os
import sys

import typer
from rich.console import Console
from rich.markup import escape

from .diagnostics import SpecError, render

EXIT_OK, EXIT_FINDINGS, EXIT_BAD_SPEC, EXIT_INTERRUPTED = 0, 1, 2, 130

app = typer.Typer(
    name="avdsl",
    help=(
        "Declarative audio-visual transformers: write a YAML spec of token streams, routing and losses; "
        "avdsl validates it, infers every shape, and compiles it to PyTorch.\n\n"
        "Examples:\n\n"
        "  avdsl build zorro                      # summary of a built-in spec\n\n"
        "  avdsl build specs/tiny/zorro.yaml --compile\n\n"
        "  avdsl build zorro --set encoders.backbone.depth=6 --json\n\n"
        "Exit codes: 0 ok, 1 findings or failed run, 2 bad spec or arguments, 130 interrupted."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

out = Console()
err = Console(stderr=True)


def report(error: SpecError, sources: dict | None = None) -> None:
    """Print one diagnostic (headline, source line with caret, hint) to stderr."""
    text = render(error.diagnostic, sources)
    headline, _, rest = text.partition("\n")
    err.print(f"[bold red]error[/]: {escape(headline)}", highlight=False, markup=True, soft_wrap=True)  # user text is no markup
    if rest:
        err.print(rest, highlight=False, markup=False, soft_wrap=True)


def _register() -> None:
    from .commands import build, schema  # noqa: F401  (each module adds its command to `app`)

    for name in ("train", "lint", "diff", "pictures", "bench"):
        try:
            __import__(f"avdsl.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"avdsl.commands.{name}":
                raise


def _click_exceptions():
    """The click exception classes typer raises: recent typer vendors click as ``typer._click``."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a command; turn user mistakes into diagnostics and exit codes."""
    _register()
    # keep inductor's compiled kernels with avdsl's compile cache (not in /tmp), so warm rebuilds stay warm
    cache_root = os.environ.get("AVDSL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "avdsl")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache_root, "inductor"))
    # torch.compile's C++ toolchain lookup logs a CUDA_HOME notice on CPU-only machines: not for users
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        code = app(args=argv, standalone_mode=False)  # click returns a `typer.Exit` code instead of raising it
        if isinstance(code, int) and code:
            return code
    except SpecError as e:
        report(e)
        return EXIT_BAD_SPEC
    except KeyboardInterrupt:
        err.print("interrupted")
        return EXIT_INTERRUPTED
    except typer.Exit as e:
        return e.exit_code
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    except Exception as e:  # click usage errors
        click = _click_exceptions()
        if isinstance(e, click.UsageError):
            e.show()
            return EXIT_BAD_SPEC
        if isinstance(e, click.Abort):
            return EXIT_INTERRUPTED
        if isinstance(e, click.ClickException):
            e.show()
            return e.exit_code
        raise
    return EXIT_OK


def run() -> None:
    sys.exit(main())
