"""The YAML blocks of the paper pages (docs/papers/*.md) are specs that build.

Each ```yaml block is one of:

* a complete spec: it is analysed (schema, grammar, graph, shapes, counts; no weights). When its
  `name:` is a shipped spec's, it must be that model: the same parameter counts (frozen apart),
  FLOPs, outputs and losses, with the shapes of the outputs;
* an excerpt, marked by a first line `# excerpt` (e.g. `# excerpt of specs/mbt.yaml: the routing`):
  it must be valid YAML as the spec loader reads it, and is not built.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from avdsl.api import analyse, analyse_text
from avdsl.diagnostics import SpecError
from avdsl.loader import builtin_names, parse_yaml

PAPERS = Path(__file__).resolve().parent.parent / "docs" / "papers"
EXCERPT = re.compile(r"#\s*excerpt\b")


def yaml_blocks() -> list[tuple[str, int, str]]:
    """(page, line of the block's first line, text) of every ```yaml block of the paper pages."""
    out = []
    for page in sorted(PAPERS.glob("*.md")):
        text = page.read_text()
        for m in re.finditer(r"^```yaml\n(.*?)^```", text, re.S | re.M):
            out.append((page.name, text.count("\n", 0, m.start(1)) + 1, m.group(1)))
    return out


BLOCKS = yaml_blocks()


def test_the_pages_have_blocks_to_check():
    assert {page for page, _, _ in BLOCKS} >= {"cav-mae.md", "mammut.md"}


@pytest.mark.parametrize("page, line, text", BLOCKS, ids=[f"{p}:{n}" for p, n, _ in BLOCKS])
def test_yaml_block_is_a_spec(page, line, text):
    check_block(page, line, text)


def test_an_excerpt_need_only_be_yaml_and_a_spec_must_build():
    check_block("x.md", 1, "# excerpt of specs/mbt.yaml\nencoders:\n  mbt:\n    routing: [use unimodal]\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        check_block("x.md", 1, "# excerpt\nmbt: {width: 768, routing: [a <- a], depth: 12: 3}\n")
    with pytest.raises(SpecError):
        check_block("x.md", 1, "encoders:\n  mbt:\n    routing: [use unimodal]\n")


def check_block(page: str, line: int, text: str) -> None:
    # the block's lines keep their numbers in the page, so an error points into the page
    source = "\n" * (line - 1) + text
    where = f"docs/papers/{page}"
    if EXCERPT.match(text.lstrip()):
        parse_yaml(source, where)
        return
    block = analyse_text(source, where)
    name = block.spec.name
    if name not in builtin_names():
        return
    shipped = analyse(name)
    assert block.cost.total_params == shipped.cost.total_params, f"{where}:{line}: the block is not the model of specs/{name}.yaml"
    assert block.cost.total_frozen == shipped.cost.total_frozen
    assert block.cost.total_flops == shipped.cost.total_flops
    assert {o: block.graph.tensors[t].shape for o, t in block.graph.outputs.items()} == \
           {o: shipped.graph.tensors[t].shape for o, t in shipped.graph.outputs.items()}
    assert set(block.graph.losses) == set(shipped.graph.losses)
