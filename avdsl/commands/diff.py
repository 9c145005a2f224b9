"""`avdsl diff`: the semantic difference between two specs (streams, routing masks, parameters, FLOPs)."""
from __future__ import annotations

import json
from typing import List, Optional

import typer

from .common import complete_spec, out
from ..diff import diff_analyses, load_side, render


def diff_command(
    a: str = typer.Argument(..., help="The old spec: a file, a built-in name, `path@git-revision`, or `-` (standard input).",
                            autocompletion=complete_spec),
    b: str = typer.Argument(..., help="The new spec (same forms).", autocompletion=complete_spec),
    set_a: Optional[List[str]] = typer.Option(None, "--set-a", help="Override a value of the old spec (repeatable)."),
    set_b: Optional[List[str]] = typer.Option(None, "--set-b", help="Override a value of the new spec (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print the diff as JSON."),
) -> None:
    """Show what changes in the model from spec A to spec B: streams and encoders added, removed or
    changed (old -> new), routing as stream-mask differences per layer range, outputs and losses,
    and parameters and FLOPs per component.

    Examples:

      avdsl diff specs/mbt.yaml specs/zorro.yaml

      avdsl diff mbt mbt --set-a vars.fusion_layer=4 --set-b vars.fusion_layer=8

      avdsl diff specs/zorro.yaml@HEAD~3 specs/zorro.yaml --json
    """
    result = diff_analyses(load_side(a, set_a or []), load_side(b, set_b or []),
                           (_shown(a, set_a), _shown(b, set_b)))
    if as_json:
        print(json.dumps(result, indent=2))
        return
    out.print(render(result))


def _shown(ref: str, overrides) -> str:
    return ref + "".join(f" --set {o}" for o in overrides or [])
