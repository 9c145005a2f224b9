"""The generated reference docs match the schema, operators and lint rules they are generated from."""
from __future__ import annotations

from pathlib import Path

import pytest

from avdsl.docgen import lint_rules, spec_reference
from avdsl.lint import RULES
from avdsl.schema import schema

DOCS = Path(__file__).resolve().parent.parent / "docs"
HOW = "regenerate with `python scripts/gen_docs.py` and commit the result"


@pytest.mark.parametrize("name, make", [("spec-reference.md", spec_reference), ("lint-rules.md", lint_rules)])
def test_committed_docs_are_up_to_date(name, make):
    assert (DOCS / name).read_text() == make(), f"docs/{name} is out of date: {HOW}"


def test_reference_covers_every_key_and_rule():
    ref, rules = spec_reference(), lint_rules()
    root = schema()
    for key in root["properties"]:
        assert f"| `{key}` |" in ref
    for name in ("stream", "encoder", "train"):
        for key in root["$defs"][name]["properties"]:
            assert f"| `{key}` |" in ref
    for r in RULES:
        assert f"## {r.code} {r.name}" in rules and r.explanation in rules
