"""The language core end to end on Zorro: locations, routing masks, unimodal isolation, counts, CLI."""
from __future__ import annotations

import json

import pytest
import torch

from avdsl import routing
from avdsl.api import analyse
from avdsl.compiler import compile_graph
from avdsl.ir import EncoderNode
from avdsl.diagnostics import SpecError
from avdsl.loader import load_file, load_text
from avdsl.runtime import losses as L
from avdsl.runtime.trial import random_batch

TINY_BASE = """
avdsl: 1
name: tiny
inputs:
  fbank[B, 32, 16]: fbank
  frames[B, 3, 2, 16, 16]: video
streams:
  audio:
    input: fbank
    tokenizer: patch2d(8, 8)
    position: learned()
  video:
    input: frames
    tokenizer: tubelet(2, 8, 8)
    position: learned()
  fusion:
    latent: 2
encoders:
  backbone:
    streams: [audio, video, fusion]
    width: 16
    depth: 2
    heads: 2
    routing:
      - audio <- audio
      - video <- video
      - fusion <- audio, video, fusion
outputs:
  za: linear(mean(backbone.audio), 8)
  zv: linear(mean(backbone.video), 8)
losses:
  contrastive: nce(za, zv, tau=0.1)
"""


# --- loading: positions, extends, overrides ------------------------------------------------------------

def test_loader_keeps_positions_through_extends_and_set():
    doc = load_file("tiny/zorro", ["encoders.backbone.heads=8"])
    assert doc.data["encoders"]["backbone"]["depth"] == 2  # from the tiny spec
    assert doc.data["encoders"]["backbone"]["mlp_ratio"] == 4  # inherited from zorro
    assert doc.data["encoders"]["backbone"]["heads"] == 8  # from --set
    assert doc.loc("encoders", "backbone", "mlp_ratio").file.endswith("specs/zorro.yaml")
    assert doc.loc("encoders", "backbone", "heads").file == "<--set>"
    # the tiny spec's inputs replace the paper's inputs of the same name
    assert sorted(doc.data["inputs"]) == ["fbank[B, 128, 64]", "frames[B, 3, 4, 32, 32]", "label[B]"]


def test_set_reads_exponent_numbers_and_null_removes_a_key():
    doc = load_file("tiny/cav-mae", ["encoders.joint.norm_eps=2e-5", "streams.video.type_embedding=null",
                                      "encoders.decoder.routing.0=null"])
    assert doc.data["encoders"]["joint"]["norm_eps"] == 2e-5  # YAML 1.1 alone would read the string "2e-5"
    assert "type_embedding" not in doc.data["streams"]["video"]
    assert doc.data["encoders"]["decoder"]["routing"] == []
    assert "mask" not in load_file("tiny/cav-mae", ["streams.audio.mask=~"]).data["streams"]["audio"]  # YAML's other null
    assert load_file("tiny/cav-mae", ["doc='1e-5'"]).data["doc"] == "1e-5"  # quoted stays text
    assert load_text("avdsl: 1\nname: x\nvars: {a: 1e-5, b: '1e3', c: 1.5E+3}\n").data["vars"] == {"a": 1e-5, "b": "1e3", "c": 1500.0}
    with pytest.raises(SpecError, match="nothing to remove") as err:
        load_file("tiny/cav-mae", ["streams.video.type_embeding=null"])
    assert "type_embedding" in err.value.diagnostic.hint


# --- one clear message with file:line:column and exit code 2 ------------------------------------------

def _error(run_cli, path):
    code, out, err = run_cli("build", path)
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    headline = err.splitlines()[0]
    assert err.count("error:") == 1
    return headline, err


def test_typo_in_key_points_at_the_key(run_cli, write_spec):
    path = write_spec(TINY_BASE.replace("    depth: 2", "    dpth: 2"))
    headline, err = _error(run_cli, path)
    assert f"{path}:21:5: unknown key 'dpth'" in headline
    assert "did you mean 'depth'" in err


def test_unknown_stream_in_routing_points_at_the_name(run_cli, write_spec):
    path = write_spec(TINY_BASE.replace("fusion <- audio, video, fusion", "fusion <- audio, vidoe, fusion"))
    headline, err = _error(run_cli, path)
    # the rule starts at column 9; 'vidoe' is 17 characters into it
    assert f"{path}:26:26: routing names stream 'vidoe'" in headline
    assert "did you mean 'video'?" in err


def test_grammar_error_maps_to_yaml_line_and_column(run_cli, write_spec):
    path = write_spec(TINY_BASE.replace("nce(za, zv, tau=0.1)", "nce(za, zv, tau=)"))
    headline, err = _error(run_cli, path)
    assert f"{path}:31:32: unexpected ')'" in headline
    assert "hint:" in err


def test_shape_mismatch_is_reported_where_it_is_caused(run_cli, write_spec):
    path = write_spec(TINY_BASE.replace("tokenizer: patch2d(8, 8)", "tokenizer: patch2d(8, 5)"))
    headline, err = _error(run_cli, path)
    assert f"{path}:9:16: H302 patch2d size 5 does not divide the input's mel bins 16" in headline
    path = write_spec(TINY_BASE.replace("zv: linear(mean(backbone.video), 8)", "zv: linear(mean(backbone.video), 4)"), "b.yaml")
    headline, err = _error(run_cli, path)
    assert "b.yaml:31:16: nce() compares embeddings of different widths: 'za' is [B, 8], 'zv' is [B, 4]" in headline


# --- routing: the mask is the paper's -----------------------------------------------------------------

def test_zorro_mask_equals_the_papers_routing():
    a = analyse("zorro")
    node = a.graph.of_type(EncoderNode)[0]
    plan = node.plans[""]
    assert len(plan.layers) == 12
    for layer in plan.layers:
        assert layer.sees() == {"audio": {"audio"}, "video": {"video"}, "fusion": {"audio", "video", "fusion"}}
    counts = {"audio": 3, "video": 2, "fusion": 2}
    mask = routing.token_mask(plan.layers[0], counts, ("audio", "video", "fusion"))
    a_, v_, f_ = [True] * 3, [True] * 2, [True] * 2
    no3, no2 = [False] * 3, [False] * 2
    expected = [a_ + no2 + no2] * 3 + [no3 + v_ + no2] * 2 + [a_ + v_ + f_] * 2
    assert mask == expected


# --- unimodal outputs really are unimodal ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_zorro():
    torch.manual_seed(0)
    analysis = analyse("tiny/zorro")
    model = compile_graph(analysis.graph).eval()
    return analysis, model


def test_perturbing_video_leaves_audio_bit_for_bit_unchanged(tiny_zorro):
    _, model = tiny_zorro
    batch = random_batch(model.inputs, 4)
    with torch.no_grad():
        base = model(**batch)["outputs"]
        moved = dict(batch, frames=batch["frames"] + torch.randn_like(batch["frames"]))
        other = model(**moved)["outputs"]
        moved_audio = dict(batch, fbank=batch["fbank"] * 2.0)
        other_audio = model(**moved_audio)["outputs"]
    assert torch.equal(base["audio_out"], other["audio_out"])
    assert not torch.allclose(base["video_out"], other["video_out"])
    assert not torch.allclose(base["fusion_out"], other["fusion_out"])
    assert torch.equal(base["video_out"], other_audio["video_out"])
    assert not torch.allclose(base["fusion_out"], other_audio["fusion_out"])


def test_forward_backward_and_loss_matches_hand_computation(tiny_zorro):
    _, model = tiny_zorro
    model.train()
    batch = random_batch(model.inputs, 6)
    out = model(**batch)
    za, zv, zf = (out["outputs"][k] for k in ("za", "zv", "zf"))

    def nce_by_hand(a, b, tau):
        a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
        s = (a @ b.T / tau).double()
        ab = -(s.diagonal() - s.logsumexp(dim=1)).mean()
        ba = -(s.diagonal() - s.logsumexp(dim=0)).mean()
        return (ab + ba) / 2

    expected = nce_by_hand(za, zv, 0.08) + nce_by_hand(za, zf, 0.08) + nce_by_hand(zv, zf, 0.08)
    assert torch.allclose(out["losses"]["contrastive"].double(), expected, atol=1e-5)
    assert torch.equal(out["loss"], out["losses"]["contrastive"])
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.backbone.blocks["shared"][0].qkv.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model.eval()


def test_labels_are_optional_for_inference(tiny_zorro):
    _, model = tiny_zorro
    batch = random_batch(model.inputs, 2)
    batch.pop("label")
    with torch.no_grad():
        out = model(**batch)
    assert "za" in out["outputs"]


# --- counts: analytic equals built -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["zorro", "zorro-supervised", "tiny/zorro"])
def test_parameter_count_is_analytic_and_matches_the_built_model(name):
    analysis = analyse(name)
    model = compile_graph(analysis.graph, "meta")
    assert sum(p.numel() for p in model.parameters()) == analysis.cost.total_params


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_gated_mlp_count_flops_and_output_by_hand(activation):
    """A gated MLP: fc1 makes 2 x mlp_dim (gate half, then value half), fc2 reads mlp_dim."""
    over = [f"encoders.backbone.activation={activation}", "encoders.backbone.mlp_dim=24"]
    plain, gated = analyse("tiny/zorro", over[1:]), analyse("tiny/zorro", over)
    d, m, depth = 64, 24, gated.spec.encoders["backbone"].sizes.depth
    assert gated.cost.params["backbone"] - plain.cost.params["backbone"] == depth * (d * m + m)  # W_gate and its bias
    tokens = sum(plain.graph.tensors[t].shape[1] for t in plain.graph.node("backbone").inputs)
    assert gated.cost.flops["backbone"] - plain.cost.flops["backbone"] == depth * tokens * 2 * d * m
    model = compile_graph(gated.graph, "meta")
    assert sum(p.numel() for p in model.parameters()) == gated.cost.total_params
    blk = next(iter(compile_graph(gated.graph).backbone.blocks.values()))[0]
    x = torch.randn(3, d)
    h = x @ blk.fc1.weight.T + blk.fc1.bias
    gate, value = h[:, :m], h[:, m:]
    act = gate * torch.sigmoid(gate) if activation == "swiglu" else 0.5 * gate * (1 + torch.erf(gate / 2 ** 0.5))
    want = (act * value) @ blk.fc2.weight.T + blk.fc2.bias
    assert torch.allclose(blk.mlp(x), want, atol=1e-6)


def test_zorro_paper_size_count_per_component():
    cost = analyse("zorro").cost
    # ViT-B: 12 x 7,087,872 + final LayerNorm 1,536
    assert cost.params["backbone"] == 85_056_000
    assert cost.params["audio/tokenize"] == 16 * 16 * 768 + 768
    assert cost.params["video/tokenize"] == 3 * 2 * 16 * 16 * 768 + 768
    assert cost.params["video/position"] == 784 * 768
    assert cost.params["fusion/latent"] == 8 * 768
    assert cost.total_params == 88_419_840


def test_build_json_reports_the_total(run_cli):
    code, out, _ = run_cli("build", "zorro", "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["parameters"]["total"] == 88_419_840
    assert [r["rules"] for r in summary["routing"]] == [["audio <- audio", "video <- video", "fusion <- audio, video, fusion"]]
    assert {s["stream"]: s["tokens"] for s in summary["streams"]} == {"audio": 256, "video": 784, "fusion": 8}


def test_emit_code_is_the_code_that_runs(run_cli, tiny_zorro):
    code, out, _ = run_cli("build", "tiny/zorro", "--emit", "code")
    assert code == 0
    assert out.strip() == tiny_zorro[1].code.strip()
    assert "self.backbone(audio=audio_pos, video=video_pos, fusion=fusion_latent)" in out


def test_eval_plan_reads_tasks_off_the_losses():
    from avdsl.compiler import eval_plan

    plan = eval_plan(analyse("zorro-supervised").graph)
    assert [(p.query, p.key) for p in plan.retrieval] == [("za", "zv"), ("za", "zf"), ("zv", "zf")]
    assert [(c.logits, c.target, c.multilabel) for c in plan.classifiers] == [("logits", "label", False)]
    # MBT trains per-modality heads and evaluates their average: the averaged logits are scored first
    plan = eval_plan(analyse("mbt-cls").graph)
    assert [c.logits for c in plan.classifiers] == ["logits", "logits_audio", "logits_video"]
