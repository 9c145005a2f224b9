"""VATT as a spec: exact backbone counts per modality, the common-space head, DropToken in training
only, the one-line modality-agnostic switch, and a forward+backward of the tiny model."""
from __future__ import annotations

import pytest
import torch

from avdsl.api import analyse, build_model
from avdsl.compiler import compile_graph
from avdsl.ir import EncoderNode
from avdsl.runtime.trial import random_batch
from avdsl.summary import summarize

HEAD = ("outputs.video_va", "outputs.video_vat", "outputs.audio_va", "outputs.text_vat")


def _params(overrides=(), name="vatt"):
    p = summarize(analyse(name, list(overrides)))["parameters"]
    return p["by_component"], p["by_weight_set"], p


def test_video_and_audio_backbones_count_exactly():
    comp, sets, _ = _params()
    # tokenizer + factorised positions (+ LN) + aggregation token, then 12 ViT-B layers + final LN
    assert comp["streams.video"] == 2_360_064 + 27_648 + 1_536 + 768
    assert sets["encoders.backbone.video"] == 85_056_000
    assert comp["streams.video"] + sets["encoders.backbone.video"] == 87_446_016
    assert comp["streams.audio"] == 99_072 + 1200 * 768 + 1_536 + 768
    assert comp["streams.audio"] + sets["encoders.backbone.audio"] == 86_078_976


@pytest.mark.parametrize("size, total", [({"width": 1024, "heads": 16}, 154_343_424),
                                         ({"width": 1024, "heads": 16, "depth": 24}, 305_498_112)])
def test_medium_and_large_video_backbones(size, total):
    comp, sets, _ = _params([f"encoders.backbone.{k}={v}" for k, v in size.items()])
    assert comp["streams.video"] + sets["encoders.backbone.video"] == total


def test_analytic_and_built_totals_agree():
    for name in ("vatt", "vatt-agnostic"):
        a = analyse(name)
        model = compile_graph(a.graph, "meta")
        assert sum(p.numel() for p in model.parameters()) == a.cost.total_params
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        assert frozen == a.cost.total_frozen == 65536 * 300


def test_text_count_and_head_layout():
    comp, sets, p = _params()
    # text: 6 pre-norm layers with biases + final LN, Linear(300, 512), 16 positions, aggregation token
    text = sets["encoders.backbone.text"] + comp["streams.text"] - 65536 * 300
    assert text == 6 * 3_152_384 + 1_024 + 300 * 512 + 512 + 16 * 512 + 512 == 19_078_144
    # head: 768x512 (no bias) + BN + 512x512 (no bias) + BN; 512x256 (no bias) + BN; audio 768x512+b; text 512x256+b
    assert sum(comp[k] for k in HEAD) == 393_216 + 1_024 + 262_144 + 1_024 + 131_072 + 512 + 393_728 + 131_328
    # the reference head total needs 1024-wide text features: Linear(1024, 256) + bias
    comp1024, _, _ = _params(["encoders.backbone.sizes.text.width=1024"])
    assert sum(comp1024[k] for k in HEAD) == 1_445_120


def test_modalities_never_attend_to_each_other_in_either_mode():
    for mode, weights in (("specific", {"video": "video", "audio": "audio", "text": "text"}),
                          ("agnostic", {"video": "video", "audio": "video", "text": "video"})):
        node = analyse("vatt", [f"vars.backbone={mode}"]).graph.of_type(EncoderNode)[0]
        for i, layer in enumerate(node.plans[""].layers):
            expected = {"video": {"video"}, "audio": {"audio"}} | ({"text": {"text"}} if mode == "agnostic" or i < 6 else {})
            assert layer.sees() == expected
            assert {a.query: a.weights for a in layer.attends} == {q: weights[q] for q in expected}


def test_one_line_agnostic_switch():
    a = analyse("vatt", ["vars.backbone=agnostic"])
    node = a.graph.of_type(EncoderNode)[0]
    assert list(summarize(a)["encoders"]["backbone"]["weight_sets"]) == ["video"]
    assert a.graph.tensors["backbone.text"].shape[-1] == 768  # text runs at the shared width
    assert a.cost.total_params == analyse("vatt-agnostic").cost.total_params
    assert a.cost.params[node.id] == 85_056_000


def test_droptoken_only_in_training():
    a = analyse("vatt")
    assert a.graph.tensors["video/kept"].shape[1] == 784 and a.graph.tensors["video/kept"].train_only_shape[1] == 1568
    assert a.graph.tensors["audio/kept"].shape[1] == 600 and a.graph.tensors["audio/kept"].train_only_shape[1] == 1200
    torch.manual_seed(0)
    _, model = build_model("tiny/vatt")
    batch = random_batch(model.inputs, 4)
    tokens = model.video_position(model.video_tokenize(batch["frames"]))
    model.train()
    assert model.video_drop(tokens).shape[1] == 16 and model.audio_drop(tokens).shape[1] == 16
    first = model(**batch)["outputs"]["video_agg"]
    assert not torch.allclose(first, model(**batch)["outputs"]["video_agg"])  # a different random half each time
    model.eval()
    assert model.video_drop(tokens).shape[1] == 32
    with torch.no_grad():
        one, two = model(**batch), model(**batch)
    for key in one["outputs"]:
        assert torch.equal(one["outputs"][key], two["outputs"][key]), key


@pytest.mark.parametrize("overrides", [[], ["vars.backbone=agnostic"]])
def test_tiny_forward_backward(overrides):
    torch.manual_seed(0)
    _, model = build_model("tiny/vatt", overrides)
    model.train()
    out = model(**random_batch(model.inputs, 8))
    assert set(out["losses"]) == {"contrastive"} and torch.isfinite(out["loss"])
    assert out["outputs"]["video_va"].shape == (8, 32) and out["outputs"]["text_vat"].shape == (8, 16)
    out["loss"].backward()
    assert model.text_tokenize.table.weight.grad is None  # frozen word vectors
    assert model.text_tokenize.proj.weight.grad is not None
    assert model.backbone.blocks["video"][1].qkv.weight.grad is not None
