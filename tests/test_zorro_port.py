"""What the Zorro port needs from the language, as general features: tokenizers with LayerNorms around
the projection, attention pooling with per-tensor queries, normalised queries and a residual, `pick`;
the `zorro-port` spec's parameter count. (The port's weights come in by the import format `zorro-port`,
tested with the port's names and shapes in test_import.py.)"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from avdsl.api import analyse, analyse_text
from avdsl.compiler import compile_graph
from avdsl.diagnostics import SpecError
from avdsl.runtime.trial import random_batch

SMALL = """avdsl: 1
name: z
inputs:
  fbank[B, 32, 16]: fbank
  frames[B, 3, 2, 16, 16]: video
streams:
  audio: {input: fbank, tokenizer: "patch2d(8, 8, norm=NORM)"}
  video: {input: frames, tokenizer: "tubelet(2, 8, 8, norm=NORM)"}
  fusion: {latent: 2}
encoders:
  backbone:
    streams: [audio, video, fusion]
    width: 16
    depth: 1
    heads: 2
    routing: [audio <- audio, video <- video, "fusion <- audio, video, fusion"]
outputs:
  pooled: POOL
"""
POOL = "attnpool(backbone.audio, backbone.video, backbone.fusion, queries=3, heads=2, each=true, norm=true, residual=true)"


def small(norm: str = "both", pool: str = POOL):
    return analyse_text(SMALL.replace("NORM", norm).replace("POOL", pool), "z.yaml")


@pytest.mark.parametrize("norm, extra", [("none", 0), ("before", 2 * 64), ("after", 2 * 16), ("both", 2 * 64 + 2 * 16)])
def test_tokenizer_norms_count_and_build(norm, extra):
    a = small(norm)
    assert a.cost.params["audio/tokenize"] == 64 * 16 + 16 + extra  # 8 x 8 patch values, width 16
    model = compile_graph(a.graph)
    assert sum(p.numel() for p in model.audio_tokenize.parameters()) == 64 * 16 + 16 + extra
    assert sum(p.numel() for p in model.parameters()) == a.cost.total_params


def test_tokenizer_norms_compute_layernorm_projection_layernorm():
    model = compile_graph(small("both").graph).double()
    tok = model.video_tokenize
    with torch.no_grad():
        for p in tok.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(2, 3, 2, 16, 16, dtype=torch.float64)
    # patch rows by hand: (channel, t, h, w) values of each tubelet, tubelets in (t, h, w) order
    rows = x.reshape(2, 3, 1, 2, 2, 8, 2, 8).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(2, 4, 3 * 2 * 8 * 8)
    h = F.layer_norm(rows, (384,), tok.norm_before.weight, tok.norm_before.bias, 1e-5)
    h = F.linear(h, tok.proj.weight.flatten(1), tok.proj.bias)
    want = F.layer_norm(h, (16,), tok.norm_after.weight, tok.norm_after.bias, 1e-5)
    assert torch.allclose(tok(x), want, rtol=0, atol=1e-12)
    # without norms the same kernel is the plain strided convolution
    plain = compile_graph(small("none").graph).double()
    plain.video_tokenize.proj.load_state_dict(tok.proj.state_dict())
    assert torch.allclose(plain.video_tokenize(x), F.linear(rows, tok.proj.weight.flatten(1), tok.proj.bias), atol=1e-12)


def test_an_unknown_tokenizer_norm_is_refused_with_its_place():
    with pytest.raises(SpecError) as e:
        small("after_all")
    d = e.value.diagnostic
    assert "'after_all' is not a choice for 'norm' of patch2d()" in d.message and "after" in d.hint
    assert d.loc.line == 7


def test_each_query_attends_to_its_own_tensor_only():
    a = small()
    assert a.graph.tensors["out.pooled"].shape == ("B", 3, 16)
    d = 16
    assert a.cost.params["out.pooled"] == 3 * d + 2 * d + 4 * d * d + 4 * d  # queries, query norm, projections
    torch.manual_seed(0)
    model = compile_graph(a.graph).eval().double()
    batch = {k: v.double() for k, v in random_batch(model.inputs, 2).items()}
    pool = model.out_pooled
    with torch.no_grad():
        tokens = model.backbone(audio=torch.randn(2, 8, d, dtype=torch.float64), video=torch.randn(2, 4, d, dtype=torch.float64),
                                fusion=torch.randn(2, 2, d, dtype=torch.float64))
        y = pool(tokens["audio"], tokens["video"], tokens["fusion"])
        changed = pool(tokens["audio"], tokens["video"] + 1, tokens["fusion"])
        # query 0 by hand: its LayerNorm-ed query attends to the audio tokens alone, plus the query
        q = pool.queries[:1]
        alone = pool.attention(pool.norm(q).expand(2, -1, -1), tokens["audio"], tokens["audio"], need_weights=False)[0]
        assert model(**batch)["outputs"]["pooled"].shape == (2, 3, d)
    assert torch.equal(y[:, 0], changed[:, 0]) and torch.equal(y[:, 2], changed[:, 2])
    assert not torch.allclose(y[:, 1], changed[:, 1])
    assert torch.allclose(y[:, 0], alone[:, 0] + q, atol=1e-12)


def test_a_pooled_vector_is_one_token_and_bias_false_has_no_biases():
    a = small(pool="attnpool(mean(backbone.audio), heads=2, bias=false, norm=true)")
    assert a.graph.tensors["out.pooled"].shape == ("B", 16)
    assert a.cost.params["out.pooled"] == 16 + 16 + 4 * 16 * 16  # bias-free LayerNorm: its weight only
    model = compile_graph(a.graph).double()
    assert not [n for n, _ in model.out_pooled.named_parameters() if "bias" in n]
    x = torch.randn(2, 16, dtype=torch.float64)
    w_v = model.out_pooled.attention.in_proj_weight[32:]
    want = F.linear(F.linear(x, w_v), model.out_pooled.attention.out_proj.weight)  # one key: weight 1
    assert torch.allclose(model.out_pooled(x), want, atol=1e-12)


def test_attnpool_each_needs_one_query_per_tensor():
    with pytest.raises(SpecError) as e:
        small(pool="attnpool(backbone.audio, backbone.video, heads=2, each=true)")
    d = e.value.diagnostic
    assert d.message == "attnpool(each=true) has one query per tensor: 2 tensors but queries=1"
    assert d.hint == "write queries=2" and d.loc.line == 18


def test_pick_takes_one_token_and_refuses_an_index_past_the_end():
    a = small(pool=POOL + "\n  second: pick(pooled, 1)")
    assert a.graph.tensors["out.second"].shape == ("B", 16)
    model = compile_graph(a.graph).eval()
    out = model(**random_batch(model.inputs, 2))["outputs"]
    assert torch.equal(out["second"], out["pooled"][:, 1])
    with pytest.raises(SpecError) as e:
        small(pool=POOL + "\n  second: pick(pooled, 3)")
    assert e.value.diagnostic.message == "pick(): index 3 is past the last of the 3 tokens of 'pooled' [B, 3, 16]"
    assert e.value.diagnostic.loc.line == 19


def test_zorro_port_has_the_ports_parameter_count_plus_the_projectors():
    a = analyse("zorro-port")
    projectors = 3 * (768 * 512 + 512)
    assert a.cost.total_params == 88_712_960 + projectors  # the port at d 768 / L 12 / 12 heads of 64
    assert a.cost.params["out.pooled"] == 3 * 768 + 768 + 4 * 768 * 768
    assert analyse("zorro").cost.total_params == 88_419_840  # the paper spec: eps changes no count


def test_tokenizer_norm_is_given_by_name_only():
    with pytest.raises(SpecError) as e:
        analyse_text(SMALL.replace("patch2d(8, 8, norm=NORM)", "patch2d(8, 8, 0, both)").replace("NORM", "none"), "z.yaml")
    d = e.value.diagnostic
    assert d.message == "patch2d() takes 3 arguments, got 4" and d.hint == "usage: patch2d(h, w, channels=0, norm=none, eps=1e-05)"
    assert (d.loc.line, d.loc.column) == (7, 54)  # under the extra argument


INTENDED = ["outputs.pooled=attnpool(backbone.audio, backbone.video, backbone.fusion, queries=3, heads=4, each=true, "
            "norm=true, residual=true)", "outputs.audio_out=pick(pooled, 0)", "outputs.video_out=pick(pooled, 1)",
            "outputs.fusion_out=pick(pooled, 2)"]


def test_flow_follows_each_query_to_its_own_tensor():
    from avdsl.api import verify_flow
    from avdsl.lint.flow import analyse_flow

    a = analyse("tiny/zorro", INTENDED)
    flow = analyse_flow(a.graph)
    assert flow.sources_of("out.audio_out", "input") == {"fbank"}
    assert flow.sources_of("out.video_out", "input") == {"frames"}
    assert flow.sources_of("out.fusion_out", "input") == {"fbank", "frames"}
    assert flow.sources_of("out.pooled", "input") == {"fbank", "frames"}
    result = verify_flow(a)  # and the built model agrees, output by output
    assert result.checked >= 6 and result.mismatches == []
    # the port's form: both modality queries read the mean of everything, so neither output is unimodal
    port = analyse_flow(analyse("tiny/zorro", [INTENDED[0].replace("backbone.audio, backbone.video", "global_out, global_out")]
                                + INTENDED[1:]).graph)
    assert port.sources_of("out.audio_out", "input") == {"fbank", "frames"}


def test_waveform_windows_take_the_same_norms():
    text = SMALL.replace('fbank[B, 32, 16]: fbank', 'wave[B, 256]: waveform').replace(
        'audio: {input: fbank, tokenizer: "patch2d(8, 8, norm=NORM)"}', 'audio: {input: wave, tokenizer: "wave1d(32, norm=NORM)"}')
    a = analyse_text(text.replace("NORM", "both").replace("POOL", "mean(backbone.audio)"), "w.yaml")
    assert a.cost.params["audio/tokenize"] == 32 * 16 + 16 + 2 * 32 + 2 * 16
    model = compile_graph(a.graph)
    assert sum(p.numel() for p in model.parameters()) == a.cost.total_params
    assert model.audio_tokenize(torch.randn(2, 256)).shape == (2, 8, 16)
