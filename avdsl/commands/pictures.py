"""`avdsl graph` and `avdsl masks`: pictures of a spec's dataflow and of its routing masks."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from ..api import analyse
from .common import SPEC_HELP, CommandError, complete_spec, out
from ..pictures import dataflow, draw_dataflow, draw_masks, mask_panels, masks_text, to_dot, to_mermaid

GRAPH_FORMATS = (".svg", ".png", ".dot", ".mmd")


def graph_command(
    spec: str = typer.Argument(..., help=SPEC_HELP, autocompletion=complete_spec),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write to FILE: .svg or .png (drawn), .dot or .mmd (text)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a value (repeatable)."),
) -> None:
    """Draw the dataflow graph: inputs -> streams -> encoders -> outputs -> losses.

    Without -o, print Mermaid text.

    Examples:

      avdsl graph zorro -o zorro-graph.png

      avdsl graph zorro -o zorro.dot
    """
    analysis = analyse(spec, set_ or [])
    flow = dataflow(analysis)
    if output is None:
        print(to_mermaid(flow), end="")
        return
    suffix = output.suffix.lower()
    if suffix not in GRAPH_FORMATS:
        raise CommandError(f"cannot write '{output}': unknown picture format", f"use one of {', '.join(GRAPH_FORMATS)}")
    _check_output(output)
    try:
        if suffix == ".dot":
            output.write_text(to_dot(flow, analysis.spec.name))
        elif suffix == ".mmd":
            output.write_text(to_mermaid(flow))
        else:
            draw_dataflow(flow, str(output), f"{analysis.spec.name}: dataflow")
    except OSError as e:
        raise CommandError(f"cannot write -o {str(output)!r}: {e.strerror or e}", "pass a writable file path") from None
    out.print(f"wrote {escape(str(output))}", highlight=False)


def _check_output(output: Path) -> None:
    """``-o FILE`` must lie in an existing folder and not be a folder itself."""
    if not output.parent.is_dir():
        raise CommandError(f"cannot write -o {str(output)!r}: the folder '{output.parent}' does not exist",
                           "create the folder first, or write into an existing one")
    if output.is_dir():
        raise CommandError(f"cannot write -o {str(output)!r}: it is a folder", "name a file, e.g. `-o graph.png`")


def masks_command(
    spec: str = typer.Argument(..., help=SPEC_HELP, autocompletion=complete_spec),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Also draw the masks to FILE (.png or .svg)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a value (repeatable)."),
) -> None:
    """Show who attends to whom: one stream x stream grid per encoder, pass and run of identical layers.

    Prints a compact grid; with -o also draws heatmaps whose blocks are sized by token counts.

    Examples:

      avdsl masks zorro

      avdsl masks mbt -o mbt-masks.png --set vars.fusion_layer=4
    """
    analysis = analyse(spec, set_ or [])
    panels = mask_panels(analysis)
    print(masks_text(panels), end="")
    if output is not None:
        if output.suffix.lower() not in (".png", ".svg"):
            raise CommandError(f"cannot write '{output}': unknown picture format", "use .png or .svg")
        _check_output(output)
        try:
            draw_masks(panels, str(output), f"{analysis.spec.name}: routing masks")
        except OSError as e:
            raise CommandError(f"cannot write -o {str(output)!r}: {e.strerror or e}", "pass a writable file path") from None
        out.print(f"wrote {escape(str(output))}", highlight=False)
