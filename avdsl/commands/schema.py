"""`avdsl schema`: print the JSON Schema of specs (for editors and the YAML language server)."""
from __future__ import annotations

from ..cli import app
from ..schema import schema_text


@app.command("schema")
def schema_command() -> None:
    """Print the JSON Schema (draft 2020-12) that specs are validated against.

    Use it in an editor with the YAML language server: save it (`avdsl schema > avdsl.schema.json`)
    and put `# yaml-language-server: $schema=avdsl.schema.json` on the first line of a spec.
    """
    print(schema_text())
