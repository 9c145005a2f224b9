"""Language features for new topologies: empty layer ranges, cross-attention to the encoder's own
streams, and layers that only cross-attend (no self-attention weights that would never learn)."""
from __future__ import annotations

import pytest
import torch

from avdsl.api import analyse
from avdsl.compiler import compile_graph
from avdsl.diagnostics import SpecError
from avdsl.runtime.trial import random_batch

PERCEIVER_IO = """avdsl: 1
name: perceiver-io
vars: {fuse: 4}
inputs:
  fbank[B, 32, 16]: fbank
  frames[B, 3, 2, 16, 16]: video
  label[B]: label(4)
streams:
  audio: {input: fbank, tokenizer: "patch2d(8, 8)", position: learned()}
  video: {input: frames, tokenizer: "tubelet(2, 8, 8)", position: learned()}
  latents: {latent: 4}
  queries: {latent: 2}
encoders:
  perceiver:
    streams: [audio, video, latents, queries]
    width: 16
    depth: 4
    heads: 2
    routing:
      - latents <- audio, video, latents @ 0
      - latents <- latents @ 1..3
      - queries <- latents (cross) @ 3
outputs:
  logits: linear(mean(perceiver.queries), 4)
losses:
  classification: ce(logits, label)
"""


def spec(tmp_path, text):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return analyse(str(path))


def test_cross_only_layer_has_no_self_attention_weights_and_every_weight_learns(tmp_path):
    analysis = spec(tmp_path, PERCEIVER_IO)
    torch.manual_seed(0)
    model = compile_graph(analysis.graph)
    assert sum(p.numel() for p in model.parameters()) == analysis.cost.total_params
    block = model.perceiver.blocks["shared"][3]
    assert not hasattr(block, "qkv") and hasattr(block, "cross_q")  # layer 3 only cross-attends
    assert hasattr(model.perceiver.blocks["shared"][2], "qkv")
    out = model(**random_batch(model.inputs, 3))
    out["loss"].backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None]
    assert dead == []
    # the same layer with a self-attention rule as well keeps its self-attention block (16 x 16 x 4 + biases + norm)
    both = spec(tmp_path, PERCEIVER_IO.replace("@ 1..3", "@ 1..4"))
    assert both.cost.total_params - analysis.cost.total_params == 4 * 16 * 16 + 4 * 16 + 2 * 16


def test_cross_attention_reads_a_stream_of_the_same_encoder(tmp_path):
    analysis = spec(tmp_path, PERCEIVER_IO)
    model = compile_graph(analysis.graph).eval()
    batch = random_batch(model.inputs, 2)
    with torch.no_grad():
        base = model(**batch)["outputs"]["logits"]
        moved = model(**dict(batch, fbank=batch["fbank"] + 1.0))["outputs"]["logits"]
    assert not torch.allclose(base, moved)  # audio -> latents -> (cross) queries -> logits


def test_a_name_in_neither_streams_nor_memory_is_reported(tmp_path):
    with pytest.raises(SpecError) as e:
        spec(tmp_path, PERCEIVER_IO.replace("queries <- latents (cross)", "queries <- latent (cross)"))
    assert "stream or memory stream 'latent', which this encoder does not have" in e.value.diagnostic.message
    assert "did you mean 'latents'" in e.value.diagnostic.hint


@pytest.mark.parametrize("rng", ["@ 4..4", "@ fuse..4", "@ fuse..fuse", "@ 2..2", "@ 4.."])
def test_empty_layer_range_covers_no_layer(tmp_path, rng):
    text = PERCEIVER_IO.replace("      - latents <- latents @ 1..3\n",
                                f"      - latents <- latents @ 1..3\n      - latents <- audio, latents {rng}\n")
    plan = spec(tmp_path, text).graph.node("perceiver").plans[""]
    assert [len(layer.attends) for layer in plan.layers] == [1, 1, 1, 1]


def test_a_range_past_the_depth_is_still_refused(tmp_path):
    with pytest.raises(SpecError, match="does not fit an encoder of depth 4"):
        spec(tmp_path, PERCEIVER_IO.replace("@ 1..3", "@ 5..5"))


def test_memory_read_without_cross_says_how_to_read_it(tmp_path):
    text = PERCEIVER_IO.replace("    streams: [audio, video, latents, queries]\n", "    streams: [audio, video, latents, queries]\n"
                                "    memory: {clip: perceiver0.video}\n")
    text = text.replace("encoders:\n", "encoders:\n  perceiver0:\n    streams: [video]\n    width: 16\n    depth: 1\n"
                        "    heads: 2\n    routing:\n      - video <- video\n")
    text = text.replace("streams:\n  audio:", "streams:\n  audio:").replace("latents <- latents @ 1..3", "latents <- latents, clip @ 1..3")
    with pytest.raises(SpecError) as e:
        spec(tmp_path, text)
    d = e.value.diagnostic
    assert d.message == "routing reads memory stream 'clip' with self-attention"
    assert d.hint == "memory is read by cross-attention: write `... <- clip (cross)`"


def test_causal_cross_is_refused(tmp_path):
    with pytest.raises(SpecError, match=r"both `\(causal\)` and `\(cross\)`"):
        spec(tmp_path, PERCEIVER_IO.replace("(cross)", "(causal, cross)"))


MODALITY_DROPOUT = """avdsl: 1
name: md
inputs:
  fbank[B, 32, 16]: fbank
  frames[B, 3, 2, 16, 16]: video
  label[B]: label(4)
streams:
  audio: {input: fbank, tokenizer: "patch2d(8, 8)", drop: dropmodality(0.5)}
  video: {input: frames, tokenizer: "tubelet(2, 8, 8)"}
encoders:
  backbone:
    streams: [audio, video]
    width: 16
    depth: 1
    heads: 2
    routing: ["audio, video <- audio, video"]
outputs:
  pooled: attnpool(backbone.audio, backbone.video, heads=2)
  logits: linear(pooled, 4)
losses:
  classification: ce(logits, label)
"""


def test_modality_dropout_replaces_whole_examples_in_training_only(tmp_path):
    analysis = spec(tmp_path, MODALITY_DROPOUT)
    assert analysis.graph.tensors["audio/kept"].shape == ("B", 8, 16)  # no token count change
    torch.manual_seed(0)
    model = compile_graph(analysis.graph)
    assert sum(p.numel() for p in model.parameters()) == analysis.cost.total_params
    drop = next(m for m in model.modules() if type(m).__name__ == "DropModality")
    x = torch.randn(64, 8, 16)
    drop.train()
    y = drop(x)
    gone = (y == drop.missing).all(dim=-1).all(dim=-1)  # every token of the example is the missing token
    kept = (y == x).all(dim=-1).all(dim=-1)
    assert (gone | kept).all() and 10 < int(gone.sum()) < 54
    drop.eval()
    assert torch.equal(drop(x), x)
    drop.train()
    drop(x).sum().backward()  # the missing token learns from the examples it stands in for
    assert drop.missing.grad.abs().sum() > 0


def test_attention_pooling_with_learned_queries(tmp_path):
    analysis = spec(tmp_path, MODALITY_DROPOUT)
    assert analysis.graph.tensors["out.pooled"].shape == ("B", 16)
    d = 16
    assert analysis.cost.params["out.pooled"] == d + 4 * d * d + 4 * d
    more = spec(tmp_path, MODALITY_DROPOUT.replace("attnpool(backbone.audio, backbone.video, heads=2)",
                                                   "attnpool(backbone.audio, backbone.video, queries=3, heads=2)")
                .replace("linear(pooled, 4)", "linear(mean(backbone.audio), 4)"))
    assert more.graph.tensors["out.pooled"].shape == ("B", 3, 16)
    model = compile_graph(analysis.graph).eval()
    with torch.no_grad():
        out = model(**random_batch(model.inputs, 2))["outputs"]
    assert out["pooled"].shape == (2, 16)
    with pytest.raises(SpecError, match="3 heads do not divide the width 16"):
        spec(tmp_path, MODALITY_DROPOUT.replace("heads=2)", "heads=3)"))
