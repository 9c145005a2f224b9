"""`learn_tau=true` on the contrastive losses: a learned temperature (CLIP's logit scale) as the loss
call's one parameter; without it the loss stays a plain function call."""
from __future__ import annotations

import math

import pytest
import torch

from avdsl.api import analyse
from avdsl.compiler import compile_graph
from avdsl.passes.cost import by_component
from avdsl.runtime import losses as L
from avdsl.runtime.train.loop import param_groups

SPEC = """
avdsl: 1
inputs:
  a[B, 4, 8]: fbank
  v[B, 3, 16, 16]: image
streams:
  audio: {input: a, tokenizer: "patch2d(4, 8)", position: learned()}
  video: {input: v, tokenizer: "patch2d(8, 8)", position: learned()}
encoders:
  enc: {streams: [audio, video], width: 16, depth: 1, heads: 2, routing: [audio <- audio, video <- video]}
outputs:
  za: mean(enc.audio)
  zv: mean(enc.video)
losses:
  contrastive: LOSS
"""


def build(write_spec, loss: str):
    analysis = analyse(write_spec(SPEC.replace("LOSS", loss)))
    torch.manual_seed(0)
    return analysis, compile_graph(analysis.graph)


@pytest.mark.parametrize("loss, function", [("nce(za, zv, tau=0.05, learn_tau=true)", L.nce),
                                            ("focal_contrastive(za, zv, tau=0.05, gamma=1.5, learn_tau=true)", L.focal_contrastive)])
def test_the_temperature_is_one_parameter_starting_at_tau(write_spec, loss, function):
    analysis, model = build(write_spec, loss)
    plain, _ = build(write_spec, loss.replace(", learn_tau=true", ""))
    assert analysis.cost.total_params == plain.cost.total_params + 1 == sum(p.numel() for p in model.parameters())
    assert by_component(analysis.graph, analysis.cost.params)["losses.contrastive"] == 1
    module = model.loss_contrastive_1
    assert module.logit_scale.item() == pytest.approx(math.log(1 / 0.05))
    za, zv = torch.randn(6, 16), torch.randn(6, 16)
    extra = {"gamma": 1.5} if function is L.focal_contrastive else {}
    torch.testing.assert_close(module(za, zv), function(za, zv, tau=0.05, **extra))
    module(za, zv).backward()
    assert module.logit_scale.grad is not None and module.logit_scale.grad != 0
    assert "self.loss_contrastive_1(" in model.code


def test_the_scale_is_capped_at_100(write_spec):
    _, model = build(write_spec, "nce(za, zv, learn_tau=true)")
    module = model.loss_contrastive_1
    za, zv = torch.randn(6, 16), torch.randn(6, 16)
    with torch.no_grad():
        module.logit_scale.fill_(math.log(1000.0))
    torch.testing.assert_close(module(za, zv), L.nce(za, zv, tau=0.01))


def test_without_learn_tau_the_loss_is_a_function_call(write_spec):
    _, model = build(write_spec, "nce(za, zv, tau=0.05)")
    assert "L.nce(out_za, out_zv, tau=0.05, both=True)" in model.code
    assert not hasattr(model, "loss_contrastive_1")


def test_the_temperature_is_not_weight_decayed(write_spec):
    _, model = build(write_spec, "nce(za, zv, learn_tau=true)")
    decayed = {id(p) for group in param_groups(model, 0.05) if group["weight_decay"] for p in group["params"]}
    assert id(model.loss_contrastive_1.logit_scale) not in decayed
