"""The `avdsl` command line (typer + rich): the app, its commands, and the one error path.

Every command reports a problem by raising: `SpecError` for a place in a spec, `CommandError` for a
bad option or a failed run. `main` turns either, and typer's own usage errors, into one message
(``error: ...`` with ``hint: ...``; a JSON object on standard output with ``--json``) and an exit code.
The exit codes are documented in `avdsl.commands.common`.
"""
from __future__ import annotations

import logging
import os
import sys
from importlib import metadata

import typer
from typer.exceptions import TyperException

from . import commands
from .commands.common import (EXIT_BAD_SPEC, EXIT_FINDINGS, EXIT_INTERRUPTED, EXIT_OK, CommandError, err,  # noqa: F401
                              out, report)
from .diagnostics import SpecError

VERSIONED = ("avdsl", "torch", "torchaudio", "typer", "lark", "jsonschema", "networkx", "rich", "safetensors", "av",
             "numpy", "matplotlib", "pyyaml")


def versions() -> dict[str, str]:
    """Installed versions of avdsl and its direct dependencies (read from package metadata, no imports)."""
    found = {}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _print_version(value: bool) -> None:
    if value:
        v = versions()
        print(f"avdsl {v.pop('avdsl')} (" + ", ".join(f"{k} {x}" for k, x in v.items()) + ")")
        raise typer.Exit(EXIT_OK)


def make_app() -> typer.Typer:
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
        pretty_exceptions_enable=False,
        rich_markup_mode="markdown",
    )

    @app.callback()
    def _root(version: bool = typer.Option(False, "--version", help="Print the versions of avdsl and its dependencies.",
                                           callback=_print_version, is_eager=True)) -> None:
        pass

    for name, function in commands.ALL:
        app.command(name)(function)
    return app


def _wants_json(argv: list[str]) -> bool:
    return "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a command; turn every user mistake into one message and an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = _wants_json(argv)
    # keep inductor's compiled kernels with avdsl's compile cache (not in /tmp), so warm rebuilds stay warm
    cache_root = os.environ.get("AVDSL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "avdsl")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache_root, "inductor"))
    # torch.compile's C++ toolchain lookup logs a CUDA_HOME notice on CPU-only machines: not for users
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        code = make_app()(args=argv, prog_name="avdsl", standalone_mode=False)
        return code if isinstance(code, int) else EXIT_OK  # without standalone mode, `typer.Exit` is returned
    except (SpecError, CommandError) as e:
        report(e, as_json)
        return e.exit_code if isinstance(e, CommandError) else EXIT_BAD_SPEC
    except typer.Exit as e:
        return e.exit_code
    except (KeyboardInterrupt, typer.Abort):
        err.print("interrupted")
        return EXIT_INTERRUPTED
    except TyperException as e:  # usage errors: unknown option, missing argument, bad choice
        report(e, as_json)
        return getattr(e, "exit_code", EXIT_BAD_SPEC) or EXIT_BAD_SPEC


def run() -> None:
    sys.exit(main())
