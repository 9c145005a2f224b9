"""`avdsl schema`: print or write the JSON Schema of specs (for editors and the YAML language server)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..schema import schema_text
from .common import CommandError, out


def schema_command(
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the schema to FILE instead of printing it."),
) -> None:
    """Print the JSON Schema (draft 2020-12) that specs are validated against.

    The schema accepts a spec as written: one with `extends:` may give only the parts it changes. Use
    it in an editor with the YAML language server: `avdsl schema -o avdsl.schema.json`, then put
    `# yaml-language-server: $schema=avdsl.schema.json` on the first line of a spec.
    """
    if output is None:
        print(schema_text())
        return
    try:
        output.write_text(schema_text() + "\n", encoding="utf-8")
    except OSError as e:
        raise CommandError(f"cannot write '{output}': {e.strerror or e}", "pass a path in a folder you can write to") from None
    out.print(f"wrote {output}", highlight=False)
