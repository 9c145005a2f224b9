"""`avdsl import`: a reference implementation's checkpoint into an avdsl checkpoint.

The mapping of each format is data (``runtime/formats/NAME.yaml``, applied by
``avdsl.runtime.porting``); this command reads the spec and the file, applies the format, and writes a
run directory with one checkpoint (step 0) that `avdsl eval`, `avdsl export`, `avdsl train --init` and
`avdsl train --resume` accept.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from .. import limits
from ..api import analyse_doc
from ..diagnostics import did_you_mean
from ..loader import load_file
from ..runtime.porting import format_names
from .common import EXIT_BAD_SPEC, EXIT_FINDINGS, SPEC_HELP, CommandError, complete_spec, out


class ImportMismatch(CommandError):
    """The checkpoint does not fit the spec's model as the format maps it; the lists go into ``--json``."""

    def __init__(self, message: str, hint: str, details: dict) -> None:
        super().__init__(message, hint, EXIT_BAD_SPEC)
        self.details = details

    def to_json(self) -> dict:
        return {**super().to_json(), **self.details}


def _output_dir(output: str | None, spec_name: str, fmt: str) -> str:
    """The run directory to write: ``-o`` or ``runs/NAME-from-FORMAT``; it must not hold checkpoints yet."""
    from ..runtime.train.checkpoint import list_checkpoints
    from .train import _check_run_dir

    if output is None:
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in spec_name).strip(".") or "model"
        output = str(Path("runs") / f"{safe}-from-{fmt}")
    existing = list_checkpoints(output)
    if existing:
        raise CommandError(f"-o {output!r} already holds checkpoints (newest {existing[-1].name})",
                           "pass another -o DIR, or move that run away")
    _check_run_dir(output)
    return output


def import_command(
    spec: str = typer.Argument(..., help=SPEC_HELP, autocompletion=complete_spec),
    checkpoint: str = typer.Argument(..., help="The reference checkpoint file (.pth for a PyTorch format, .npz for a flax one)."),
    from_: str = typer.Option(..., "--from", help=f"Its format: {', '.join(format_names())} (see docs/import.md)."),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Run directory to write (default: runs/NAME-from-FORMAT); must hold no checkpoint yet."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a spec value (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print what was imported as JSON."),
) -> None:
    """Turn a reference checkpoint into an avdsl checkpoint of SPEC.

    Every tensor of the model comes from exactly one tensor (or set of tensors) of the checkpoint and
    every checkpoint tensor is used, or the command fails (exit 2) listing what is missing, what is left
    over and every shape that does not fit. `.pth` files are read with `torch.load(weights_only=True)`
    (tensors only, never code), `.npz` files without pickle.

    Examples:

      avdsl import cav-mae cav-mae-scale++.pth --from cav-mae -o runs/cav-mae-released

      avdsl eval runs/cav-mae-released

      avdsl train cav-mae --init runs/cav-mae-released --steps 100
    """
    names = format_names()
    if from_ not in names:
        raise CommandError(f"--from {from_!r} is not a known format", did_you_mean(from_, names, "a format"))
    analysis = analyse_doc(load_file(spec, set_ or []))
    output = _output_dir(output, analysis.spec.name, from_)

    from ..compiler import compile_graph
    from ..runtime import porting
    from ..runtime.train import CheckpointWriteError, save_checkpoint
    from .train import _fits

    fmt = porting.load_format(from_)
    try:
        state = porting.read_checkpoint(checkpoint, fmt, limits.MAX_IMPORT_BYTES, limits.MAX_IMPORT_TENSORS)
    except porting.CheckpointReadError as e:
        kind = ("a PyTorch state dict (.pth) of tensors" if fmt.file == "torch"
                else "an .npz of named number arrays (docs/import.md shows how to write one)")
        raise CommandError(str(e), f"format {from_} reads {kind}") from None
    _fits(analysis, 1)
    model = compile_graph(analysis.graph)
    try:
        ported = porting.port(fmt, state, model.state_dict())
    except porting.PortError as e:
        hint = (f"format {from_} maps onto {fmt.spec}; a spec with other depths or sizes than the checkpoint's "
                "shows up as missing, left-over or misfitting tensors")
        if e.fixed:
            hint += ("; a fixed table that differs means the spec computes another one (position layout, sizes): "
                     "the imported model would not compute the reference's function")
        raise ImportMismatch(
            f"{checkpoint} does not fit the model of {analysis.spec.name} as format {from_} maps it:\n{e}", hint,
            {"missing": e.missing, "left_over": e.left_over, "shapes": e.shapes, "fixed": e.fixed}) from None
    except porting.FormatError as e:
        raise CommandError(f"format {from_}: {e}", "the format's data file is wrong (see avdsl.runtime.porting)",
                           EXIT_FINDINGS) from None
    model.load_state_dict(ported.state)
    try:
        written = save_checkpoint(output, 0, model, None, None,
                                  {"import": {"format": from_, "source": str(checkpoint)}},
                                  model.spec_text, model.spec_hash)
    except CheckpointWriteError as e:
        raise CommandError(str(e), "free disk space or pass another -o", EXIT_FINDINGS) from None
    imported = len(ported.state) - len(ported.fixed) - len(ported.own) - len(ported.zeros)
    if as_json:
        print(json.dumps({"checkpoint": str(written), "format": from_, "spec": analysis.spec.name, "tensors": imported,
                          "fixed": ported.fixed, "unused": ported.unused, "own": ported.own, "zeros": ported.zeros},
                         indent=2))
        return
    out.print(f"imported {imported} tensors of {escape(checkpoint)} ({from_}) into {escape(analysis.spec.name)} "
              f"-> {escape(str(written))}", highlight=False)
    if ported.fixed:
        out.print(f"  {len(ported.fixed)} fixed tables equal the spec's own: {escape(', '.join(ported.fixed))}", highlight=False)
    if ported.unused:
        out.print(f"  {len(ported.unused)} tensors the reference never reads were not imported: "
                  f"{escape('; '.join(porting.summarise(ported.unused)))}", highlight=False)
    if ported.own:
        out.print(f"  {len(ported.own)} tensors the reference does not have keep their initial values: "
                  f"{escape('; '.join(porting.summarise(ported.own)))}", highlight=False)
    if ported.zeros:
        out.print(f"  {len(ported.zeros)} tensors the reference does not have are zero: "
                  f"{escape('; '.join(porting.summarise(ported.zeros)))}", highlight=False)
    out.print(f"  next: avdsl eval {escape(output)}  |  avdsl train SPEC --init {escape(output)}", highlight=False)
