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
from benchmarks import parity, parity_mammut, parity_mbt


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


def _open_clip_mammut_state(size: dict, has_mlp: bool) -> dict:
    """The names and shapes of open_clip's MaMMUT state dict at one size (meta tensors)."""
    w, t, e, v = size["vision_width"], size["width"], size["embed"], parity_mammut.VOCAB
    grid = (size["image"] // size["patch"]) ** 2

    def z(*shape):
        return torch.empty(shape, device="meta")

    def block(prefix: str, width: int, mlp: bool = True, kv_norm: bool = False) -> dict:
        out = {f"{prefix}.ln_1.weight": z(width), f"{prefix}.ln_1.bias": z(width),
               f"{prefix}.attn.in_proj_weight": z(3 * width, width), f"{prefix}.attn.in_proj_bias": z(3 * width),
               f"{prefix}.attn.out_proj.weight": z(width, width), f"{prefix}.attn.out_proj.bias": z(width)}
        if kv_norm:
            out.update({f"{prefix}.ln_1_kv.weight": z(width), f"{prefix}.ln_1_kv.bias": z(width)})
        if mlp:
            out.update({f"{prefix}.ln_2.weight": z(width), f"{prefix}.ln_2.bias": z(width),
                        f"{prefix}.mlp.c_fc.weight": z(4 * width, width), f"{prefix}.mlp.c_fc.bias": z(4 * width),
                        f"{prefix}.mlp.c_proj.weight": z(width, 4 * width), f"{prefix}.mlp.c_proj.bias": z(width)})
        return out

    state = {"visual.conv1.weight": z(w, 3, size["patch"], size["patch"]), "visual.class_embedding": z(w),
             "visual.positional_embedding": z(grid + 1, w), "visual.ln_pre.weight": z(w), "visual.ln_pre.bias": z(w),
             "visual.ln_post.weight": z(w), "visual.ln_post.bias": z(w), "visual.proj": z(w, e),
             "map_viz2txt_kv": z(w, t), "logit_scale": z(), "text.token_embedding.weight": z(v, t),
             "text.positional_embedding": z(size["context"], t), "text.ln_final.weight": z(t), "text.ln_final.bias": z(t),
             "text.text_projection": z(t, v)}
    for i in range(size["vision_layers"]):
        state.update(block(f"visual.transformer.resblocks.{i}", w))
    for i in range(size["layers"]):
        state.update(block(f"text.resblocks.{i}", t, mlp=has_mlp or i % 2 == 1))
        if i % 2 == 0:
            state.update(block(f"text.cross_attn.{i // 2}", t, kv_norm=True))
    return state


@pytest.mark.parametrize("size", ["small", "paper"])
@pytest.mark.parametrize("config, has_mlp", [("B-32", False), ("L-14", True)])
def test_mammut_table_sets_every_tensor_once(size, config, has_mlp):
    sizes, chosen = parity_mammut.SIZES[size], parity_mammut.CONFIGS[config]
    model = compile_graph(analyse_text(parity_mammut.spec_text(sizes, chosen), "<parity>").graph, device="meta")
    state = _open_clip_mammut_state(sizes, has_mlp)
    ported = porting.port(porting.load_format(chosen["format"]), state, model.state_dict())
    assert set(ported.state) == set(model.state_dict())
    assert ported.unused == [] and ported.own == [] and ported.zeros == ["image_tokenize.proj.bias"]
    assert "decoder.blocks.shared.2.norm_memory.all.weight" in ported.state  # cross block 1 -> decoder layer 2


@pytest.mark.parametrize("name", ["mammut-openclip", "mammut-openclip-l14"])
def test_mammut_packed_projection_is_split_into_queries_and_keys_values(name):
    packed = torch.arange(12.0).view(6, 2)  # rows q0 q1 k0 k1 v0 v1 of a width-2 in-projection
    steps = {r.how: r.steps for r in porting.load_format(name).tensors}
    assert porting.apply_steps(steps["q_rows"], (packed,)).tolist() == [[0, 1], [2, 3]]
    assert porting.apply_steps(steps["kv_rows"], (packed,))[:, 0].tolist() == [4, 6, 8, 10]


def test_mammut_spec_at_paper_size_is_the_shipped_variant():
    assert parity_mammut.spec_text(parity_mammut.SIZES["paper"], parity_mammut.CONFIGS["B-32"]).endswith("extends: mammut-openclip\n")
