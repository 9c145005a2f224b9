"""MaMMUT: exact parameter counts, the two decoder passes (what each may see), causality, the shared
decoder weights and the tiny variant's training step."""
from __future__ import annotations

import time

import pytest
import torch

from avdsl import routing
from avdsl.api import analyse
from avdsl.compiler import compile_graph
from avdsl.ir import EncoderNode
from avdsl.passes.cost import by_component
from avdsl.runtime.text import ByteTokenizer, encode_batch, load_tokenizer

PORT = ["vars.vocab=49408", "vars.context=77"]  # the public port's vocabulary and context

# One ViT-B layer: 2 LayerNorms, QKV + output projection, MLP 768 -> 3072 -> 768, all with biases.
LAYER = 2 * 1536 + (768 * 2304 + 2304) + (768 * 768 + 768) + (768 * 3072 + 3072) + (3072 * 768 + 768)
# One cross-attention sub-layer: LayerNorm on the queries, Q, KV (from 768-wide image tokens), output,
# and the LayerNorm of the image tokens (`memory_norm`).
CROSS = 1536 + (768 * 768 + 768) + (768 * 1536 + 1536) + (768 * 768 + 768) + 1536
MLP = 1536 + (768 * 3072 + 3072) + (3072 * 768 + 768)  # a LayerNorm and an MLP (`cross_mlp: own` adds one per cross layer)


def meta_count(analysis) -> int:
    model = compile_graph(analysis.graph, "meta")
    return sum(p.numel() for p in model.parameters())


def test_layer_sizes_by_hand():
    assert LAYER == 7_087_872
    assert CROSS == 2_365_440


@pytest.mark.parametrize("name, overrides, total", [("mammut", [], 186_675_457), ("mammut", PORT, 262_178_305),
                                                    ("mammut-openclip", [], 262_178_305),
                                                    ("mammut-openclip", ["encoders.decoder.cross_mlp=own"], 290_522_113)])
def test_counts_match_the_built_model(name, overrides, total):
    analysis = analyse(name, overrides)
    assert analysis.cost.total_params == total
    assert analysis.cost.total_frozen == 0
    assert meta_count(analysis) == total


def test_port_count_per_component():
    analysis = analyse("mammut-openclip")
    parts = by_component(analysis.graph, analysis.cost.params)
    assert parts == {
        "streams.image": (3 * 256 * 768 + 768) + 197 * 768 + 768,  # patches, positions (CLS too), CLS
        "encoders.vision": 1536 + 12 * LAYER,  # pre-norm and ViT-B/16, no final LayerNorm
        "outputs.image_embedding": 1536 + 768 * 768,  # LayerNorm after pooling, projection without bias
        "encoders.decoder.memory.image_tokens": 768 * 768,  # image tokens -> decoder, no bias
        "streams.text": 49408 * 768 + 77 * 768,  # token table and learned positions
        "encoders.decoder": 12 * LAYER + 6 * CROSS + 1536,  # 12 layers, 6 with cross-attention
        "outputs.logits": 768 * 49408,  # untied vocabulary head, no bias
        "losses.contrastive": 1,  # the learned temperature (open_clip's logit scale)
    }
    # open_clip's MaMMUT at this size: 262,177,537 with its ViT-B config's structure (has_mlp: false),
    # 290,521,345 with its default (has_mlp: true). The spec has a patch bias (768) open_clip has not;
    # `cross_mlp: own` adds a LayerNorm and an MLP to each of the 6 cross layers.
    assert analysis.cost.total_params - 768 == 262_177_537
    assert analysis.cost.total_params + 6 * MLP - 768 == 290_521_345
    vision = parts["streams.image"] + parts["encoders.vision"] + parts["outputs.image_embedding"]
    assert vision - 768 == 86_389_248  # open_clip's vision tower (its patch convolution has no bias)


def test_vocabulary_and_context_follow_the_vars():
    analysis = analyse("mammut")
    assert analysis.spec.vars["vocab"] == ByteTokenizer().vocab_size == 259
    assert analysis.spec.inputs["caption"].dims == ("B", 64)
    plugged = load_tokenizer("avdsl.runtime.text:ByteTokenizer")
    assert plugged.vocab_size == analysis.spec.vars["vocab"]
    port = analyse("mammut-openclip")
    assert port.spec.inputs["caption"].dims == ("B", 77)
    assert port.graph.tensors["out.logits"].shape == ("B", 77, 49408)


def _decoder_plans():
    node = next(n for n in analyse("mammut").graph.of_type(EncoderNode) if n.id == "decoder")
    return node.plans


def test_contrastive_pass_is_bidirectional_text_only():
    plan = _decoder_plans()["contrastive"]
    for layer in plan.layers:
        assert layer.sees() == {"text": {"text"}}
        assert not layer.cross_attends()
        assert not any(a.causal for a in layer.attends)
        assert routing.token_mask(layer, {"text": 3}, ("text",)) == [[True] * 3] * 3


def test_generative_pass_is_causal_with_cross_attention_every_other_layer():
    plan = _decoder_plans()["generative"]
    crossing = [i for i, layer in enumerate(plan.layers) if layer.cross_attends()]
    assert crossing == [0, 2, 4, 6, 8, 10]
    for layer in plan.layers:
        (self_attend,) = layer.self_attends()
        assert self_attend.keys == ("text",) and self_attend.causal
        for a in layer.cross_attends():
            assert a.keys == ("image_tokens",)
        assert routing.token_mask(layer, {"text": 3}, ("text",)) == [[True, False, False], [True, True, False], [True, True, True]]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    analysis = analyse("tiny/mammut")
    return analysis, compile_graph(analysis.graph).eval()


def _batch(b: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(b, 3, 32, 32, generator=g)
    texts = [f"a photo of thing {i} on a table" for i in range(b)]
    return pixels, encode_batch(ByteTokenizer(), texts, 16)


def test_tiny_counts_match(tiny):
    analysis, model = tiny
    assert sum(p.numel() for p in model.parameters()) == analysis.cost.total_params == meta_count(analysis)


def test_cross_attention_weights_only_in_crossing_layers(tiny):
    _, model = tiny
    blocks = model.decoder.blocks["shared"]
    assert [hasattr(b, "cross_q") for b in blocks] == [True, False, True, False]


@torch.no_grad()
def test_contrastive_text_cannot_see_the_image(tiny):
    _, model = tiny
    pixels, caption = _batch()
    out = model(pixels=pixels, caption=caption)["outputs"]
    other = model(pixels=pixels + torch.randn_like(pixels), caption=caption)["outputs"]
    assert torch.equal(out["text_embedding"], other["text_embedding"])  # bit for bit
    assert not torch.allclose(out["logits"], other["logits"])  # the generative pass reads the image
    assert not torch.allclose(out["image_embedding"], other["image_embedding"])


@torch.no_grad()
def test_generative_pass_is_causal_and_contrastive_is_not(tiny):
    _, model = tiny
    pixels, caption = _batch()
    t = 9
    changed = caption.clone()
    changed[:, t] = (changed[:, t] + 7) % 256 + 3
    vision = model.vision(image=model.image_cls.prepend(model.image_position(model.image_tokenize(pixels))))["image"]

    def decode(ids):
        return model.decoder(text=model.text_position(model.text_tokenize(ids)), image_tokens=vision)

    before, after = decode(caption), decode(changed)
    gen_b, gen_a = before["generative.text"], after["generative.text"]
    assert torch.equal(gen_b[:, :t], gen_a[:, :t])  # earlier positions never see token t
    assert not torch.allclose(gen_b[:, t:], gen_a[:, t:])
    con_b, con_a = before["contrastive.text"], after["contrastive.text"]
    assert not torch.allclose(con_b[:, :t], con_a[:, :t])  # bidirectional: everyone sees token t


def test_gradients_of_both_passes_add_up(tiny):
    analysis, _ = tiny
    torch.manual_seed(0)
    model = compile_graph(analysis.graph)
    pixels, caption = _batch()

    def grads(name: str | None):
        model.zero_grad()
        out = model(pixels=pixels, caption=caption)
        (out["loss"] if name is None else out["losses"][name]).backward()
        return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}

    total, contrastive, captioning = grads(None), grads("contrastive"), grads("captioning")
    qkv = "decoder.blocks.shared.1.qkv.weight"  # a self-attention weight both passes use
    assert contrastive[qkv].abs().sum() > 0 and captioning[qkv].abs().sum() > 0
    cross = "decoder.blocks.shared.0.cross_q.weight"  # only the generative pass uses it
    assert contrastive[cross].abs().sum() == 0 and captioning[cross].abs().sum() > 0
    for name in total:
        torch.testing.assert_close(total[name], contrastive[name] + captioning[name], rtol=1e-4, atol=1e-6)


def test_tiny_trains_one_step_quickly(tiny):
    analysis, _ = tiny
    # forward + backward of a batch of 8 is about 3x the forward FLOPs: well under a second on a CPU
    assert 3 * 8 * analysis.cost.total_flops < 1e9
    model = compile_graph(analysis.graph)
    pixels, caption = _batch()
    model(pixels=pixels, caption=caption)["loss"].backward()  # warm-up
    model.zero_grad()
    start = time.perf_counter()
    out = model(pixels=pixels, caption=caption)
    out["loss"].backward()
    elapsed = time.perf_counter() - start
    assert set(out["losses"]) == {"contrastive", "captioning"}
    assert torch.isfinite(out["loss"])
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert elapsed < 5.0, f"a tiny step took {elapsed:.2f} s"  # loose: the test machine may be busy


def test_memory_name_may_not_shadow_a_stream(write_spec):
    from avdsl.diagnostics import SpecError
    from avdsl.loader import load_file

    text = load_file("tiny/mammut").resolved_text().replace("image_tokens", "text")
    with pytest.raises(SpecError, match="memory name 'text' is also a stream"):
        analyse(write_spec(text))


def test_each_cross_layer_normalises_the_image_tokens_with_its_own_norm(tiny):
    _, model = tiny
    blocks = model.decoder.blocks["shared"]
    norms = [b.norm_memory["all"] if hasattr(b, "norm_memory") else None for b in blocks]
    assert [n is not None for n in norms] == [True, False, True, False]
    assert norms[0] is not norms[2] and norms[0].normalized_shape == (64,)
    assert not hasattr(model.vision.blocks["shared"][0], "norm_memory")  # the ViT has no cross-attention


@torch.no_grad()
def test_cross_layers_run_their_mlp_only_in_the_generative_pass(tiny):
    analysis, _ = tiny
    torch.manual_seed(0)
    model = compile_graph(analysis.graph).eval()
    pixels, caption = _batch()
    before = model(pixels=pixels, caption=caption)["outputs"]
    model.decoder.blocks["shared"][0].fc1.weight.mul_(2)  # layer 0 cross-attends: `cross_mlp: with_cross`
    after = model(pixels=pixels, caption=caption)["outputs"]
    assert torch.equal(before["text_embedding"], after["text_embedding"])  # the contrastive pass skips that MLP
    assert not torch.allclose(before["logits"], after["logits"])
    model.decoder.blocks["shared"][1].fc1.weight.mul_(2)  # layer 1 has no cross-attention: both passes run it
    assert not torch.allclose(after["text_embedding"], model(pixels=pixels, caption=caption)["outputs"]["text_embedding"])
