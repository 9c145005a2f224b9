"""Regenerate the reference docs: `python scripts/gen_docs.py` (from the repository root)."""
from pathlib import Path

from avdsl.docgen import lint_rules, spec_reference

DOCS = Path(__file__).resolve().parent.parent / "docs"

if __name__ == "__main__":
    for name, text in (("spec-reference.md", spec_reference()), ("lint-rules.md", lint_rules())):
        (DOCS / name).write_text(text)
        print(f"wrote docs/{name}")
