"""The gallery: topologies in none of the five papers, each short, built, linted clean, drawn and
trained a few steps (its objective goes down on embedded data)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from avdsl.api import analyse
from avdsl.compiler import compile_graph
from avdsl.lint import lint_one
from avdsl.pictures import dataflow, draw_dataflow, mask_panels, masks_text
from avdsl.runtime.data import SyntheticAV
from avdsl.runtime.data.loader import collate_skip_none

GALLERY = sorted((Path(__file__).resolve().parent.parent / "specs" / "examples" / "gallery").glob("*.yaml"))


def spec_lines(text: str) -> int:
    """Lines of a spec without its comments, `doc:` block and `train:` settings."""
    count, in_block = 0, False
    for line in text.splitlines():
        if line.startswith(("doc:", "train:")):
            in_block = True
            continue
        if in_block and (line.startswith(" ") or not line.strip()):
            continue
        in_block = False
        count += not line.startswith("#") and bool(line.strip())
    return count


def test_the_gallery_has_the_topologies_the_docs_promise():
    names = {p.stem for p in GALLERY}
    assert {"late-fusion-widths", "perceiver-io", "one-way-flow", "av-captioning", "modality-dropout"} <= names
    assert len(names) >= 6


@pytest.mark.parametrize("path", GALLERY, ids=lambda p: p.stem)
def test_gallery_spec_is_short_clean_drawn_and_learns(path, tmp_path):
    assert spec_lines(path.read_text()) <= 40
    result = lint_one(str(path))
    assert result.error is None and result.findings == [], [d.message for d in result.findings]
    analysis = analyse(str(path))
    draw_dataflow(dataflow(analysis), str(tmp_path / "graph.png"))
    assert (tmp_path / "graph.png").stat().st_size > 1000 and masks_text(mask_panels(analysis))
    torch.manual_seed(0)
    model = compile_graph(analysis.graph)
    assert sum(p.numel() for p in model.parameters()) == analysis.cost.total_params
    data = SyntheticAV(model.inputs, 8, seed=1, split="train")
    batch = collate_skip_none([data[i] for i in range(8)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    losses = []
    for _ in range(6):
        torch.manual_seed(1)  # the same masking every step: only the weights change
        out = model(**batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(float(out["loss"].detach()))
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert losses[-1] < 0.9 * losses[0], losses
