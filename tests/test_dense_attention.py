"""Whole models with dense-masked attention (`use_dense_attention`), the baseline of the step benchmark.

Every layer then runs one masked SDPA over the concatenated tokens of the streams its weight set
touches, with the mask `routing_mask` derives from the plan. Same weights, so the loss and every
gradient must equal the planned model's within 1e-5 (fp32); and the mask must do what the routing says.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from avdsl.api import analyse
from avdsl.compiler import compile_graph
from avdsl.routing import LayerPlan, token_mask
from avdsl.runtime.encoder import StreamTransformer, routing_mask, use_dense_attention
from avdsl.runtime.trial import random_batch

from test_attention import CASES, COUNTS


class CountAttention(TorchFunctionMode):
    """Records the mask shape (None when unmasked) of every SDPA call made under it."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            self.masks.append(None if mask is None else tuple(mask.shape))
        return func(*args, **kwargs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_routing_mask_is_the_plans_token_mask(case):
    for layer in CASES[case]:
        for ws in dict.fromkeys(a.weights for a in layer):
            mine = tuple(a for a in layer if a.weights == ws)
            order = tuple(dict.fromkeys(s for a in layer for s in (a.query,) + a.keys))
            expected = torch.tensor(token_mask(LayerPlan(mine), COUNTS, order))
            assert torch.equal(routing_mask(mine, COUNTS, order), expected), (case, ws)


def _loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same random draws (CAV-MAE's masking) on both sides
    loss = model(**batch)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("spec", ["tiny/zorro", "tiny/mbt", "tiny/mammut", "tiny/cav-mae"])
def test_dense_masked_model_equals_planned(spec):
    torch.manual_seed(0)
    model = compile_graph(analyse(spec).graph).train()
    batch = random_batch(model.inputs, 2)
    with CountAttention() as planned_calls:
        planned_loss, planned_grads = _loss_and_grads(model, batch)
    with CountAttention() as dense_calls:
        dense_loss, dense_grads = _loss_and_grads(use_dense_attention(model), batch)
    use_dense_attention(model, False)
    assert torch.isfinite(planned_loss)
    torch.testing.assert_close(dense_loss, planned_loss, atol=1e-5, rtol=1e-5)
    assert dense_grads.keys() == planned_grads.keys()
    for name, grad in planned_grads.items():
        torch.testing.assert_close(dense_grads[name], grad, atol=1e-5, rtol=1e-5, msg=f"{spec}: gradient of {name}")
    # the dense side really ran masked attention over square token blocks, the planned side did not
    assert dense_calls.masks and all(m is None or m[0] == m[1] for m in dense_calls.masks)
    assert sum(m is not None for m in dense_calls.masks) > sum(m is not None for m in planned_calls.masks)


def _zorro_encoder() -> StreamTransformer:
    torch.manual_seed(0)
    model = compile_graph(analyse("tiny/zorro").graph).eval()
    encoder = next(m for m in model.modules() if isinstance(m, StreamTransformer))
    for p in encoder.parameters():  # LayerNorm starts at identity; randomise so every weight matters
        torch.nn.init.normal_(p, std=0.2)
    return use_dense_attention(encoder)


def test_dense_attention_applies_the_routing_mask():
    """Zorro's audio reads only audio: under the mask, a different video leaves audio as it was (a
    dense path without the mask would mix video into audio), while fusion, which reads both, changes."""
    encoder = _zorro_encoder()
    g = torch.Generator().manual_seed(1)
    x = {s: torch.randn(2, n, 64, generator=g) for s, n in {"audio": 32, "video": 32, "fusion": 4}.items()}
    y = dict(x, video=x["video"] + torch.randn(x["video"].shape, generator=g))
    with torch.no_grad(), CountAttention() as calls:
        a, b = encoder(**x), encoder(**y)
    assert calls.masks == [(68, 68)] * 4  # 2 layers x 2 calls: one masked SDPA per layer
    torch.testing.assert_close(a["audio"], b["audio"], atol=1e-6, rtol=0)
    assert not torch.allclose(a["fusion"], b["fusion"], atol=1e-3)


def test_step_benchmark_pairs_planned_with_dense_rows():
    """`python -m benchmarks step --attention both`: dense beside planned in the eager modes only, and
    the ratios planned / dense of each pair."""
    from benchmarks import step

    configs = step.configurations("both")
    assert {(m, p) for m, p, a in configs if a == "dense"} == {("eager", "fp32"), ("eager", "bf16"), ("eager", "bf16w")}
    assert [c for c in configs if c[2] == "planned"] == [(m, p, "planned") for m, p in step.MODES]
    row = {"spec": "s", "batch": 2, "mode": "eager", "precision": "fp32"}
    rows = [dict(row, attention="planned", step_s=1.0, tflops=0.3, peak_memory_gb=2.0),
            dict(row, attention="dense", step_s=2.0, tflops=0.15, peak_memory_gb=4.0),
            dict(row, precision="bf16", attention="planned", step_s=1.0, tflops=0.3, peak_memory_gb=2.0)]
    (pair,) = step.planned_over_dense(rows)  # bf16 has no dense row: no pair
    assert (pair["step_s"]["ratio"], pair["tflops"]["ratio"], pair["peak_memory_gb"]["ratio"]) == (0.5, 2.0, 0.5)
