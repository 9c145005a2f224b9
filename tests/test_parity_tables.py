"""The weight tables of the parity scripts (benchmarks/parity.py, parity_mbt.py): every tensor of the avdsl
model is set exactly once, or listed as a fixed table each side builds itself, and the layout changes
are right. Runs without the reference code: the reference's names are the ones the table gives, its
tensors the avdsl model's own (on the meta device)."""
from __future__ import annotations

import re

import pytest
import torch

from avdsl.api import analyse, analyse_text
from avdsl.compiler import compile_graph
from benchmarks import parity, parity_mbt


def _reference_state(model, table, tables) -> dict:
    """The state a reference with exactly the table's names would have (shapes from the avdsl model)."""
    ours = model.state_dict()
    state = {}
    for mine, theirs, _how in table:
        pattern = re.compile(re.escape(mine).replace(re.escape("{i}"), r"(\d+)") + "$")
        for key in ours:
            m = pattern.match(key)
            if m:
                state[theirs.replace("{i}", m.group(1)) if m.groups() else theirs] = ours[key]
    for mine, theirs, _how in tables:
        state[theirs] = ours[mine]
    return state


@pytest.mark.parametrize("spec, table, tables, unused", [
    (parity.PAPER_SPEC, parity.CAV_MAE_WEIGHTS, parity.CAV_MAE_TABLES, parity.CAV_MAE_UNUSED),
    (parity.ft_spec(1024, 224, 768, 12), parity.CAV_MAE_FT_WEIGHTS, parity.CAV_MAE_FT_TABLES, parity.CAV_MAE_FT_UNUSED),
])
def test_table_sets_every_tensor_once(spec, table, tables, unused):
    model = compile_graph(analyse_text(spec, "<parity>").graph, device="meta")
    layout = parity.layout_for(1024)
    state = _reference_state(model, table, tables)
    ported = parity.port(model, state, table, tables, unused, layout.transforms)
    assert set(ported.state) == set(model.state_dict())


def test_an_unknown_reference_tensor_is_listed():
    model = compile_graph(analyse("cav-mae").graph, device="meta")
    state = _reference_state(model, parity.CAV_MAE_WEIGHTS, parity.CAV_MAE_TABLES)
    state["blocks_a.0.extra.weight"] = torch.empty(3, device="meta")
    with pytest.raises(SystemExit, match="left over: blocks_a.0.extra.weight"):
        parity.port(model, state, parity.CAV_MAE_WEIGHTS, parity.CAV_MAE_TABLES, parity.CAV_MAE_UNUSED,
                    parity.layout_for(1024).transforms)


def test_swap_order_reads_a_frequency_major_grid_time_major():
    # reference order: token f * T + t (2 frequency rows x 3 time columns); avdsl: t * F + f
    assert parity.swap_order(2, 3).tolist() == [0, 3, 1, 4, 2, 5]


def test_mbt_table_names_every_tensor_of_mbt_cls_once():
    model = compile_graph(analyse_text(parity_mbt.spec_text(parity_mbt.PAPER), "<parity>").graph, device="meta")
    ours = list(model.state_dict())
    named = []
    for mine, _theirs, how in parity_mbt.MBT_WEIGHTS:
        assert how in parity_mbt.TRANSFORMS
        pattern = re.compile(re.escape(mine).replace(re.escape("{i}"), r"\d+") + "$")
        named += [k for k in ours if pattern.match(k)]
    assert sorted(named) == sorted(ours)  # each once, none missing


def test_flax_layouts_become_torch_layouts():
    t = parity_mbt.TRANSFORMS
    q, k, v = (torch.randn(8, 2, 4) for _ in range(3))  # [D, heads, head_dim]
    x = torch.randn(3, 8)
    fused = t["qkv_kernel"](q, k, v)
    assert torch.allclose(x @ fused.T, torch.cat([torch.einsum("nd,dhk->nhk", x, w).reshape(3, 8) for w in (q, k, v)], dim=1))
    out = torch.randn(2, 4, 8)  # [heads, head_dim, D]
    heads = torch.randn(3, 2, 4)
    assert torch.allclose(heads.reshape(3, 8) @ t["out_kernel"](out).T, torch.einsum("nhk,hkd->nd", heads, out))

