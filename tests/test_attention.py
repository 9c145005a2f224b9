"""Planned attention (one SDPA per group of query streams) against the dense masked reference.

The reference runs, per weight set, one attention over all tokens with the boolean mask that
`avdsl.routing.token_mask` derives from the routing plan, then the residual and feed-forward; a stream
updated under several weight sets takes the mean. Planned and dense must agree within 1e-5 (fp32).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from avdsl import codegen
from avdsl.api import analyse
from avdsl.compiler import compile_graph
from avdsl.ir import EncoderNode
from avdsl.routing import Attend, LayerPlan, token_mask
from avdsl.runtime.encoder import Attend, StreamTransformer, dense_attention_reference

WIDTH, HEADS = 16, 2
COUNTS = {"audio": 5, "video": 7, "fusion": 3, "bottleneck": 2, "text": 6, "image": 4, "cls": 1}


def rule(query, keys, weights="shared", causal=False):
    return Attend(query, tuple(keys.split(",")), weights, causal)


ZORRO = [rule("audio", "audio"), rule("video", "video"), rule("fusion", "audio,video,fusion")]
UNIMODAL = [rule("audio", "audio", "audio"), rule("video", "video", "video")]
BOTTLENECK = [rule("audio", "audio,bottleneck", "audio"), rule("video", "video,bottleneck", "video"),
              rule("bottleneck", "audio,bottleneck", "audio"), rule("bottleneck", "video,bottleneck", "video")]
VANILLA = [rule("audio", "audio,video", "audio"), rule("video", "audio,video", "video")]
SHARED_VANILLA = [rule("audio", "audio,video"), rule("video", "audio,video")]
CAUSAL = [rule("text", "text", causal=True)]
PREFIX_CAUSAL = [rule("image", "image"), rule("text", "image,text", causal=True)]
KEY_ONLY = [rule("text", "image,text", causal=True)]  # image is read but not updated: no Q for it
QUERY_ONLY = [rule("audio", "audio"), rule("cls", "audio")]  # cls is never a key: no K, V for it

CASES = {  # name -> layers (each a list of rules)
    "zorro": [ZORRO, ZORRO],
    "mbt-bottleneck": [UNIMODAL, BOTTLENECK],
    "mbt-vanilla": [UNIMODAL, VANILLA],
    "mbt-early": [BOTTLENECK, BOTTLENECK],
    "mbt-late": [UNIMODAL, UNIMODAL],
    "shared-vanilla": [SHARED_VANILLA],
    "causal": [CAUSAL, CAUSAL],
    "prefix-causal": [PREFIX_CAUSAL, PREFIX_CAUSAL],
    "key-only": [KEY_ONLY],
    "query-only": [QUERY_ONLY],
}


def build(layers) -> StreamTransformer:
    plans = {"": [[(a.query, a.keys, a.weights, a.causal, a.cross) for a in layer] for layer in layers]}
    sets = {a.weights for layer in layers for a in layer}
    torch.manual_seed(0)
    st = StreamTransformer(plans, {w: (WIDTH, len(layers), HEADS, 2 * WIDTH) for w in sorted(sets)})
    for p in st.parameters():  # LayerNorm starts at identity; randomise so norms are exercised too
        torch.nn.init.normal_(p, std=0.2)
    return st.eval()


def streams_for(layers, batch=2, seed=1) -> dict:
    names = dict.fromkeys(s for layer in layers for a in layer for s in (a.query,) + a.keys)
    g = torch.Generator().manual_seed(seed)
    return {s: torch.randn(batch, COUNTS[s], WIDTH, generator=g) for s in names}


def reference_layer(st, li: int, layer: list, x: dict) -> dict:
    """One layer the dense way: per weight set, masked attention over every token, then the MLP."""
    order = tuple(x)
    updates: dict[str, list] = {}
    for ws in dict.fromkeys(a.weights for a in layer):
        plan = LayerPlan(tuple(a for a in layer if a.weights == ws))
        mask = torch.tensor(token_mask(plan, COUNTS, order))
        blk = st.blocks[ws][li]
        attn = dense_attention_reference(blk, "all", x, order, mask)
        for q in plan.updated():
            h = x[q] + attn[q]
            updates.setdefault(q, []).append(h + blk.mlp(blk.norm2["all"](h)))
    new = dict(x)
    new.update({q: sum(ys) / len(ys) for q, ys in updates.items()})
    return new


def reference_forward(st, layers, x: dict) -> dict:
    updated = {}
    for li, layer in enumerate(layers):
        x = reference_layer(st, li, layer, x)
        updated.update({a.query: st.final[a.weights]["all"] for a in layer})
    return {s: norm(x[s]) for s, norm in updated.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_planned_equals_dense_masked_reference(case):
    layers = CASES[case]
    st = build(layers)
    x = streams_for(layers)
    with torch.no_grad():
        planned = st(**x)
        dense = reference_forward(st, layers, x)
    assert set(planned) == set(dense)
    for s in dense:
        torch.testing.assert_close(planned[s], dense[s], atol=1e-5, rtol=1e-5, msg=f"{case}: stream {s}")


@pytest.mark.parametrize("case", ["zorro", "prefix-causal", "key-only", "query-only"])
def test_planned_self_attention_equals_reference_per_layer(case):
    """The attention sub-layer alone (before the residual), as the benchmark times it."""
    layer = CASES[case][0]
    st = build([layer])
    x = streams_for([layer])
    blk = st.blocks["shared"][0]
    mask = torch.tensor(token_mask(LayerPlan(tuple(layer)), COUNTS, tuple(x)))
    with torch.no_grad():
        planned = st.self_attention(blk, "all", [Attend(a.query, a.keys, a.weights, a.causal, a.cross) for a in layer], x)
        dense = dense_attention_reference(blk, "all", x, tuple(x), mask)
    for s in planned:
        torch.testing.assert_close(planned[s], dense[s], atol=1e-5, rtol=1e-5)


def test_causal_mask_hides_future_tokens():
    """Changing the last text token changes no earlier text output under causal routing."""
    layers = CASES["prefix-causal"]
    st = build(layers)
    x = streams_for(layers)
    y = dict(x, text=x["text"].clone())
    y["text"][:, -1] += 1.0
    with torch.no_grad():
        a, b = st(**x), st(**y)
    assert torch.equal(a["text"][:, :-1], b["text"][:, :-1])
    assert not torch.equal(a["text"][:, -1], b["text"][:, -1])


def test_zorro_audio_is_bitwise_independent_of_video():
    layers = [ZORRO] * 3
    st = build(layers)
    x = streams_for(layers)
    y = dict(x, video=x["video"] + torch.randn_like(x["video"]))
    with torch.no_grad():
        a, b = st(**x), st(**y)
    assert torch.equal(a["audio"], b["audio"])  # bit for bit: no leak through shared matmuls
    assert not torch.allclose(a["fusion"], b["fusion"])  # while fusion does see the video


@pytest.mark.parametrize("name", ["tiny/zorro", "tiny/mbt"])
def test_cost_pass_matches_counted_encoder_flops(name):
    """`Cost.flops` of each encoder = the projection and feed-forward FLOPs PyTorch counts for one
    sample + the attention FLOPs of the allowed pairs (`Cost.attention_flops`; PyTorch's counter does
    not see the CPU SDPA kernel, so that part is checked by hand below)."""
    analysis = analyse(name)
    model = compile_graph(analysis.graph).eval()
    for node in analysis.graph.nodes():
        if not isinstance(node, EncoderNode):
            continue
        st = getattr(model, codegen.attr_names(analysis.graph)[node.id])
        x = {s: torch.randn(1, analysis.graph.tensors[t].shape[1], analysis.graph.tensors[t].shape[2])
             for s, t in zip(node.streams + node.memory, node.inputs)}
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            st(**x)
        attention = sum(f for k, f in analysis.cost.attention_flops.items() if k.startswith(node.decl.name + "/"))
        assert counter.get_total_flops() + attention == analysis.cost.flops[node.id], node.id


def test_attention_flops_count_only_allowed_pairs():
    """tiny/zorro: 2 layers of width 64; audio 32 x 32, video 32 x 32, fusion 4 x (32 + 32 + 4) pairs,
    4 FLOPs per pair and channel (QK^T and AV)."""
    cost = analyse("tiny/zorro").cost
    assert sum(cost.attention_flops.values()) == 2 * 4 * 64 * (32 * 32 + 32 * 32 + 4 * 68)
