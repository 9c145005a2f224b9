"""`avdsl bench`: time a training step of each spec (eager fp32, eager bf16, compiled bf16) with
achieved TFLOP/s against this machine's measured matmul peak; or the attention / compile benchmarks.

The benchmarks live in the repository's `benchmarks/` package (`python -m benchmarks ...`); this
command is its front door from the CLI and needs to run from a checkout.
"""
from __future__ import annotations

import importlib
import json
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from .common import CommandError


def _benchmarks(name: str):
    """Import ``benchmarks.<name>`` from the checkout this (editable) avdsl package lives in."""
    root = Path(__file__).resolve().parents[2]
    if (root / "benchmarks" / "__init__.py").is_file() and str(root) not in sys.path:
        sys.path.append(str(root))
    return importlib.import_module(f"benchmarks.{name}")


class What(str, Enum):
    step = "step"
    attention = "attention"
    compile = "compile"


def bench_command(
    specs: Optional[List[str]] = typer.Argument(None, help="Spec files or built-in names, e.g. `cav-mae tiny/zorro`."),
    what: What = typer.Option(What.step, "--what", help="step (default), attention (paper token counts), or compile (cold vs warm)."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Batch size (default: the spec's `dims.B`; attention: 1; compile: 2)."),
    reps: int = typer.Option(3, "--reps", help="Timed repetitions; the fastest is reported."),
    budget: float = typer.Option(60.0, "--budget", help="Skip a step configuration predicted to take longer than this (seconds)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Benchmark SPECs and print the numbers side by side.

    Examples:

      avdsl bench cav-mae --batch 4

      avdsl bench tiny/zorro tiny/mbt --json

      avdsl bench --what attention
    """
    if what != What.attention and not specs:
        raise CommandError("give at least one spec", "e.g. `avdsl bench tiny/zorro`")
    try:
        module = _benchmarks(what.value)
    except ModuleNotFoundError:
        raise CommandError("the `benchmarks` package was not found", "`avdsl bench` runs from a checkout of the repository") from None
    if what == What.step:
        result = module.run(specs, batch, reps, budget)
    elif what == What.attention:
        result = module.run(batch or 1, reps)
    else:
        result = module.run(specs, batch or 2, "fp32")
    print(json.dumps(result, indent=2) if as_json else module.render(result))
