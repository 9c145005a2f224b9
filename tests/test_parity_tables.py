"""The weight mappings of the parity scripts (benchmarks/parity.py, parity_mbt.py, parity_zorro.py), which
are the formats of `avdsl import` (runtime/formats/*.yaml): at the paper sizes every tensor of the avdsl model is set exactly
once, or listed as a fixed table each side builds itself, and the layout changes are right. Runs without
the reference code: the reference's names are the ones the format gives, its tensors the avdsl model's
own (on the meta device)."""
from __future__ import annotations

import re

import pytest
import torch

from avdsl.api import analyse, analyse_text
from avdsl.compiler import compile_graph
from avdsl.runtime import porting
from benchmarks import parity, parity_mbt


def _reference_state(model, fmt: porting.Format) -> dict:
    """The state a reference with exactly the format's names would have (the avdsl model's tensors; one
    per source name, so that a row with several sources still finds each)."""
    ours = model.state_dict()
    state = {}
    for row in porting.expand(fmt.tensors, list(ours)) + list(fmt.fixed):
        for source in row.sources:
            state[source] = ours[row.to]
    return state


@pytest.mark.parametrize("spec, name", [
    (parity.PAPER_SPEC, "cav-mae"),
    (parity.ft_spec(1024, 224, 768, 12), "cav-mae-ft"),
])
def test_format_sets_every_tensor_once(spec, name):
    model = compile_graph(analyse_text(spec, "<parity>").graph, device="meta")
    fmt = porting.load_format(name)
    ported = porting.port(fmt, _reference_state(model, fmt), model.state_dict())
    assert set(ported.state) == set(model.state_dict())


def test_an_unknown_reference_tensor_is_listed():
    model = compile_graph(analyse("cav-mae").graph, device="meta")
    state = _reference_state(model, porting.load_format("cav-mae"))
    state["blocks_a.0.extra.weight"] = torch.empty(3, device="meta")
    with pytest.raises(SystemExit, match="left over \\(1\\):\n  blocks_a.0.extra.weight"):
        parity.port("cav-mae", model, state)


def test_swap_order_reads_a_frequency_major_grid_time_major():
    # reference order: token f * T + t (2 frequency rows x 3 time columns); avdsl: t * F + f
    assert parity.swap_order(2, 3).tolist() == [0, 3, 1, 4, 2, 5]


def test_mbt_format_names_every_tensor_of_mbt_cls_once():
    model = compile_graph(analyse_text(parity_mbt.spec_text(parity_mbt.PAPER), "<parity>").graph, device="meta")
    ours = list(model.state_dict())
    named = [row.to for row in porting.expand(porting.load_format("mbt").tensors, ours)]
    assert sorted(named) == sorted(ours)  # each once, none missing


def _steps(how: str):
    return next(r.steps for r in porting.load_format("mbt").tensors if r.how == how)


def test_flax_layouts_become_torch_layouts():
    torch.manual_seed(0)
    q, k, v = (torch.randn(8, 2, 4) for _ in range(3))  # [D, heads, head_dim]
    x = torch.randn(3, 8)
    fused = porting.apply_steps(_steps("heads_in"), (q, k, v))
    assert torch.allclose(x @ fused.T, torch.cat([torch.einsum("nd,dhk->nhk", x, w).reshape(3, 8) for w in (q, k, v)], dim=1), atol=1e-5)
    out = torch.randn(2, 4, 8)  # [heads, head_dim, D]
    heads = torch.randn(3, 2, 4)
    assert torch.allclose(heads.reshape(3, 8) @ porting.apply_steps(_steps("heads_out"), (out,)).T,
                          torch.einsum("nhk,hkd->nd", heads, out), atol=1e-5)


def test_zorro_format_names_every_tensor_of_zorro_port_once_but_the_projectors():
    model = compile_graph(analyse("zorro-port").graph, device="meta")
    ours = list(model.state_dict())
    fmt = porting.load_format("zorro-port")
    named = [row.to for row in porting.expand(fmt.tensors, ours)]
    own = [n for n in ours if any(re.fullmatch(p, n) for p in fmt.own)]
    assert own == [f"out_z{m}.{w}" for m in "avf" for w in ("weight", "bias")]  # the paper's, not the port's
    assert sorted(named + own) == sorted(ours)  # each once, none missing
