"""Cross-attention layers: the memory LayerNorm, the order and presence of their sub-layers
(`cross_mlp`), the pre-norm and memory computed as a projection of an encoder output."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from avdsl.api import analyse
from avdsl.compiler import compile_graph
from avdsl.diagnostics import SpecError
from avdsl.passes.cost import by_component
from avdsl.runtime.encoder import Attend, StreamTransformer

SPEC = """
avdsl: 1
inputs:
  frame[B, 3, 16, 16]: image
  caption[B, 6]: text
streams:
  image: {input: frame, tokenizer: "patch2d(8, 8)", position: learned()}
  text: {input: caption, tokenizer: embed(50), position: learned()}
encoders:
  vision: {streams: [image], width: 24, depth: 1, heads: 2, routing: [image <- image]}
  decoder:
    streams: [text]
    memory:
      image_tokens: MEMORY
    width: 16
    depth: 2
    heads: 2
    OPTIONS
    passes:
      plain: {routing: [text <- text]}
      crossing: {routing: ["text <- text (causal)", "text <- image_tokens (cross) @ 0"]}
outputs:
  pooled: mean(decoder.crossing.text)
"""


def spec(write_spec, memory="vision.image", options="") -> str:
    return write_spec(SPEC.replace("MEMORY", memory).replace("OPTIONS", options or "bias: true"))


def build(path):
    analysis = analyse(path)
    torch.manual_seed(0)
    model = compile_graph(analysis.graph).eval()
    assert sum(p.numel() for p in model.parameters()) == analysis.cost.total_params
    return analysis, model


def stack(cross_mlp: str, memory_norm: bool) -> StreamTransformer:
    """One layer, two passes: `plain` self-attention only, `crossing` self- and cross-attention."""
    plans = {"plain": [(Attend("t", ("t",), "shared"),)],
             "crossing": [(Attend("t", ("t",), "shared"), Attend("t", ("m",), "shared", cross=True))]}
    torch.manual_seed(0)
    model = StreamTransformer(plans, {"shared": (8, 1, 2, 16)}, memory_widths={"m": 12}, final_norm=False,
                              memory_norm=memory_norm, cross_mlp=cross_mlp).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def by_hand(blk, nk: str, t: torch.Tensor, m: torch.Tensor, order: tuple[str, ...]) -> torch.Tensor:
    """The layer computed sub-layer by sub-layer in the given order, from the block's own weights."""
    for step in order:
        if step == "self":
            t = t + blk.self_attention(blk.norms(nk), [Attend("t", ("t",), "shared")], {"t": t})["t"]
        elif step == "cross":
            memory = blk.norm_memory[nk](m) if hasattr(blk, "norm_memory") else m
            q = blk.cross_q(blk.norm_cross[nk](t))
            k, v = blk.cross_kv(memory).chunk(2, dim=-1)
            heads = lambda x: x.view(x.shape[0], x.shape[1], blk.heads, -1).transpose(1, 2)  # noqa: E731
            y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2).flatten(2)
            t = t + blk.cross_proj(y)
        elif step == "mlp":
            t = t + blk.fc2(F.gelu(blk.fc1(blk.norm2[nk](t))))
        elif step == "cross_mlp":
            t = t + blk.cross_fc2(F.gelu(blk.cross_fc1(blk.norm_cross_mlp[nk](t))))
    return t


@pytest.mark.parametrize("cross_mlp, plain, crossing", [
    ("shared", ("self", "mlp"), ("self", "cross", "mlp")),
    ("with_cross", ("self",), ("self", "cross", "mlp")),
    ("own", ("self", "mlp"), ("self", "mlp", "cross", "cross_mlp")),
])
@pytest.mark.parametrize("memory_norm", [False, True])
@torch.no_grad()
def test_sub_layer_order_and_presence(cross_mlp, plain, crossing, memory_norm):
    model = stack(cross_mlp, memory_norm)
    g = torch.Generator().manual_seed(1)
    t, m = torch.randn(2, 5, 8, generator=g, dtype=torch.float64), torch.randn(2, 3, 12, generator=g, dtype=torch.float64)
    out = model(t=t, m=m)
    blk = model.blocks["shared"][0]
    assert hasattr(blk, "norm_memory") == memory_norm
    assert hasattr(blk, "cross_fc1") == (cross_mlp == "own")
    torch.testing.assert_close(out["plain.t"], by_hand(blk, "all", t, m, plain), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["crossing.t"], by_hand(blk, "all", t, m, crossing), rtol=1e-12, atol=1e-12)


@torch.no_grad()
def test_memory_norm_normalises_the_memory():
    model = stack("shared", True)
    g = torch.Generator().manual_seed(2)
    t, m = torch.randn(2, 5, 8, generator=g, dtype=torch.float64), torch.randn(2, 3, 12, generator=g, dtype=torch.float64)
    shifted = 3.0 * m + torch.randn(2, 3, 1, generator=g, dtype=torch.float64)  # per-token scale and shift
    torch.testing.assert_close(model(t=t, m=m)["crossing.t"], model(t=t, m=shifted)["crossing.t"], rtol=1e-4, atol=1e-5)
    unnormed = stack("shared", False)
    assert not torch.allclose(unnormed(t=t, m=m)["crossing.t"], unnormed(t=t, m=shifted)["crossing.t"])


@pytest.mark.parametrize("options, extra", [
    ("", 0),
    ("memory_norm: true", 2 * 16),  # one LayerNorm of the 16-wide mapped memory, in the one cross layer
    ("cross_mlp: with_cross", 0),
    ("cross_mlp: own", 2 * 16 + (16 * 64 + 64) + (64 * 16 + 16)),  # a LayerNorm and an MLP in the cross layer
    ("pre_norm: true", 2 * 16),
])
def test_counts_of_each_option(write_spec, options, extra):
    base, _ = build(spec(write_spec, "linear(vision.image, 16, bias=false)"))
    analysis, model = build(spec(write_spec, "linear(vision.image, 16, bias=false)", options))
    assert analysis.cost.total_params == base.cost.total_params + extra
    assert by_component(analysis.graph, analysis.cost.params)["encoders.decoder.memory.image_tokens"] == 24 * 16
    if "memory_norm" in options:
        blocks = model.decoder.blocks["shared"]
        assert [hasattr(b, "norm_memory") for b in blocks] == [True, False]


def test_memory_reads_the_encoder_output_or_a_projection_of_it(write_spec):
    direct, model = build(spec(write_spec))
    assert model.decoder.blocks["shared"][0].cross_kv.in_features == 24  # reads the 24-wide ViT tokens
    mapped, model = build(spec(write_spec, "linear(tokens(vision.image, skip=1), 16, bias=false)"))
    assert model.decoder.blocks["shared"][0].cross_kv.in_features == 16
    assert mapped.graph.tensors["memory.decoder.image_tokens"].shape == ("B", 3, 16)  # 4 patches, the first skipped
    assert "# memory image_tokens of encoder decoder" in model.code


@torch.no_grad()
def test_pre_norm_makes_the_encoder_blind_to_token_scale(write_spec):
    _, model = build(spec(write_spec, options="pre_norm: true"))
    g = torch.Generator().manual_seed(3)
    x, m = torch.randn(2, 6, 16, generator=g), torch.randn(2, 4, 24, generator=g)
    shifted = 2.0 * x + torch.randn(2, 6, 1, generator=g)
    out, out2 = model.decoder(text=x, image_tokens=m), model.decoder(text=shifted, image_tokens=m)
    for key in ("plain.text", "crossing.text"):
        torch.testing.assert_close(out[key], out2[key], rtol=1e-4, atol=1e-5)
    assert len(model.decoder.pre) == 1 and not len(model.vision.pre)


@pytest.mark.parametrize("memory, options, message, where, hint", [
    ("mean(vision.image)", "", "memory 'image_tokens' of encoder 'decoder' is \\[B, 24\\], not tokens", "image_tokens:",
     "project one with `linear(...)`"),
    ("linear(vision.imag, 16)", "", "its input 'vision.imag' is never computed", "image_tokens:", "did you mean 'vision.image'"),
    ("vision.image", "cross_mlp: owned", "cross_mlp is 'owned', which is not allowed", "cross_mlp:", "did you mean 'own'"),
    ("vision.image", "memory_norm: 1", "memory_norm must be true or false", "memory_norm:", ""),
])
def test_bad_values_are_reported_where_they_are_written(write_spec, memory, options, message, where, hint):
    path = spec(write_spec, memory, options)
    with pytest.raises(SpecError, match=message) as info:
        analyse(path)
    lines = open(path).read().splitlines()
    assert where in lines[info.value.loc.line - 1]
    assert hint in info.value.diagnostic.hint


@pytest.mark.parametrize("option", ["memory_norm: true", "cross_mlp: own"])
def test_cross_options_need_a_cross_rule(write_spec, option):
    text = SPEC.replace("MEMORY", "vision.image").replace("OPTIONS", option).replace(
        '"text <- image_tokens (cross) @ 0"', '"text <- text"')
    path = write_spec(text)
    with pytest.raises(SpecError, match="no routing rule of encoder 'decoder' is `\\(cross\\)`") as info:
        analyse(path)
    assert option in open(path).read().splitlines()[info.value.loc.line - 1]
