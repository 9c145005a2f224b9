"""MBT as a spec: exact parameter counts, stream masks per fusion layer, the bottleneck mean, the
shared CLS classifier, one-line variants, and a forward+backward of the tiny model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from avdsl.api import analyse, build_model
from avdsl.compiler import compile_graph
from avdsl.ir import EncoderNode
from avdsl.routing import token_mask
from avdsl.runtime.trial import random_batch

UNI = {"audio": {"audio"}, "video": {"video"}}
BOTTLENECK = {"audio": {"audio", "bottleneck"}, "video": {"video", "bottleneck"}, "bottleneck": {"audio", "video", "bottleneck"}}
VANILLA = {"audio": {"audio", "video"}, "video": {"audio", "video"}}


def _plan(analysis):
    return analysis.graph.of_type(EncoderNode)[0].plans[""]


def _meta_params(analysis) -> int:
    return sum(p.numel() for p in compile_graph(analysis.graph, "meta").parameters())


@pytest.mark.parametrize("name, total", [("mbt", 175_005_455), ("mbt-cls", 175_009_295)])
def test_paper_counts_are_exact_analytically_and_built(name, total):
    a = analyse(name)
    assert a.cost.total_params == total
    assert _meta_params(a) == total


def test_count_parts_match_the_reference_layout():
    from avdsl.summary import summarize

    p = summarize(analyse("mbt"))["parameters"]
    assert p["by_weight_set"] == {"encoders.mbt.audio": 12 * 7_087_872, "encoders.mbt.video": 12 * 7_087_872,
                                  "encoders.mbt.final_norm": 1536}
    # 3-channel spectrogram patches (16*16*3*768 + 768) and 400 position rows
    assert p["by_component"]["streams.audio"] == 16 * 16 * 3 * 768 + 768 + 400 * 768
    assert p["by_component"]["streams.video"] == 2 * 16 * 16 * 3 * 768 + 768 + 3136 * 768
    assert p["by_component"]["streams.bottleneck"] == 4 * 768
    assert p["by_component"]["outputs.logits"] == 768 * 527 + 527


@pytest.mark.parametrize("lf", [0, 4, 8, 12])
def test_bottleneck_masks_per_fusion_layer(lf):
    plan = _plan(analyse("mbt", [f"vars.fusion_layer={lf}"]))
    assert len(plan.layers) == 12
    for i, layer in enumerate(plan.layers):
        assert layer.sees() == (UNI if i < lf else BOTTLENECK), f"layer {i}"
        if i >= lf:  # the bottleneck is updated once by each modality's own block
            assert sorted(a.weights for a in layer.attends if a.query == "bottleneck") == ["audio", "video"]
        # audio and video tokens never see each other directly
        mask = token_mask(layer, {"audio": 3, "video": 2, "bottleneck": 1}, ("audio", "video", "bottleneck"))
        assert not any(mask[q][k] for q in range(3) for k in range(3, 5))
        assert not any(mask[q][k] for q in range(3, 5) for k in range(3))


def test_late_fusion_has_no_fusion_layer_and_no_bottleneck_output():
    a = analyse("mbt", ["vars.fusion_layer=12"])
    assert all(layer.sees() == UNI for layer in _plan(a).layers)
    assert "mbt.bottleneck" not in a.graph.tensors


@pytest.mark.parametrize("lf", [0, 8])
def test_vanilla_cross_attention_masks(lf):
    a = analyse("mbt", ["vars.fusion=vanilla", f"vars.fusion_layer={lf}"])
    for i, layer in enumerate(_plan(a).layers):
        assert layer.sees() == (UNI if i < lf else VANILLA)
        assert {a_.query: a_.weights for a_ in layer.attends} == {"audio": "audio", "video": "video"}


def test_bottleneck_halves_early_fusion_attention_work():
    bottleneck = analyse("mbt", ["vars.fusion_layer=0"]).cost.flops["mbt"]
    vanilla = analyse("mbt", ["vars.fusion_layer=0", "vars.fusion=vanilla"]).cost.flops["mbt"]
    late = analyse("mbt", ["vars.fusion_layer=12"]).cost.flops["mbt"]
    assert late < bottleneck < 1.01 * late < vanilla


def _block(blk, x: torch.Tensor) -> torch.Tensor:
    """One pre-norm ViT block by hand: x + attn(LN(x)), then + mlp(LN(.))."""
    b, n, d = x.shape
    q, k, v = blk.qkv(blk.norm1["all"](x)).chunk(3, dim=-1)
    heads = lambda t: t.view(b, n, blk.heads, d // blk.heads).transpose(1, 2)  # noqa: E731
    att = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / (d // blk.heads) ** 0.5, dim=-1) @ heads(v)
    x = x + blk.proj(att.transpose(1, 2).reshape(b, n, d))
    return x + blk.fc2(F.gelu(blk.fc1(blk.norm2["all"](x)), approximate="tanh"))  # flax's nn.gelu, as the reference


def test_next_bottleneck_is_the_mean_of_both_modality_blocks():
    torch.manual_seed(0)
    _, model = build_model("tiny/mbt")
    model.eval()
    enc = model.mbt
    x = {"audio": torch.randn(2, 8, 64), "video": torch.randn(2, 32, 64), "bottleneck": torch.randn(2, 4, 64)}
    li = 1  # tiny fusion layer
    out = enc.layer("", li, enc.plans[""][li], x)
    with torch.no_grad():
        ya = _block(enc.blocks["audio"][li], torch.cat([x["audio"], x["bottleneck"]], dim=1))
        yv = _block(enc.blocks["video"][li], torch.cat([x["video"], x["bottleneck"]], dim=1))
    torch.testing.assert_close(out["audio"], ya[:, :8], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["video"], yv[:, :32], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["bottleneck"], (ya[:, 8:] + yv[:, 32:]) / 2, atol=1e-5, rtol=1e-5)
    # below the fusion layer each modality runs alone and the bottleneck is untouched
    below = enc.layer("", 0, enc.plans[""][0], x)
    assert torch.equal(below["bottleneck"], x["bottleneck"])
    with torch.no_grad():
        torch.testing.assert_close(below["audio"], _block(enc.blocks["audio"][0], x["audio"]), atol=1e-5, rtol=1e-5)


CLS = ["streams.audio.cls=1", "streams.audio.cls_position=true", "streams.video.cls=1", "streams.video.cls_position=true",
       "outputs.logits_audio=linear(first(mbt.audio), 8)", "outputs.logits_video=linear(first(mbt.video), 8, shared=logits_audio)",
       "outputs.logits=avg(logits_audio, logits_video)",
       "losses.classification=0.5 * bce(logits_audio, labels) + 0.5 * bce(logits_video, labels)"]


def test_cls_head_shares_one_classifier_and_cls_tokens_get_positions():
    torch.manual_seed(0)
    analysis, model = build_model("tiny/mbt", CLS)
    assert analysis.graph.tensors["audio/pos"].shape[1] == 9  # 8 patches + CLS, all with a position row
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("out_")]
    assert linears == ["out_logits_audio"]
    model.train()
    batch = random_batch(model.inputs, 4)
    out = model(**batch)
    o = out["outputs"]
    w, b = model.out_logits_audio.weight, model.out_logits_audio.bias
    enc = model.mbt(audio=model.audio_position(model.audio_cls.prepend(model.audio_tokenize(batch["spec"]))),
                    video=model.video_position(model.video_cls.prepend(model.video_tokenize(batch["frames"]))),
                    bottleneck=model.bottleneck_latent(batch["spec"]))
    torch.testing.assert_close(o["logits_video"], F.linear(enc["video"][:, 0], w, b))
    torch.testing.assert_close(o["logits"], (o["logits_audio"] + o["logits_video"]) / 2)
    expected = 0.5 * F.binary_cross_entropy_with_logits(o["logits_audio"], batch["labels"]) + \
        0.5 * F.binary_cross_entropy_with_logits(o["logits_video"], batch["labels"])
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_shared_must_name_a_linear_of_the_same_size():
    from avdsl.diagnostics import SpecError

    with pytest.raises(SpecError, match="shared=pooled"):
        analyse("tiny/mbt", ["outputs.other=linear(pooled, 8, shared=pooled)"])
    with pytest.raises(SpecError, match="maps 64 -> 4"):
        analyse("tiny/mbt", ["outputs.other=linear(pooled, 4, shared=logits)"])


@pytest.mark.parametrize("overrides", [[], ["vars.fusion=vanilla"], ["vars.fusion_layer=0"], ["vars.fusion_layer=2"], CLS])
def test_tiny_forward_backward(overrides):
    torch.manual_seed(0)
    _, model = build_model("tiny/mbt", overrides)
    model.train()
    out = model(**random_batch(model.inputs, 8))
    assert out["outputs"]["logits"].shape == (8, 8) and torch.isfinite(out["loss"])
    out["loss"].backward()
    fused = overrides not in (["vars.fusion=vanilla"], ["vars.fusion_layer=2"])  # else the bottleneck is unused
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (fused or not name.startswith("bottleneck")), name
