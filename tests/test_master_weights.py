"""precision bf16w: a bf16 copy computes, the fp32 model keeps the master weights the optimizer steps."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from avdsl.api import analyse
from avdsl.compiler import compile_graph
from avdsl.runtime.train.master import Bf16Copy
from avdsl.runtime.trial import random_batch


def test_copy_computes_in_bf16_and_the_fp32_masters_take_its_gradients_and_steps():
    torch.manual_seed(0)
    model = compile_graph(analyse("tiny/zorro").graph).train()
    half = Bf16Copy(model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.dtype for p in half.module.parameters()} == {torch.bfloat16}
    batch = random_batch(model.inputs, 8, torch.Generator().manual_seed(0))

    model(**batch)["loss"].backward()  # the fp32 gradients, for comparison
    exact = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    loss = half(**batch)["loss"]
    loss.backward()
    half.gradients_to_masters()
    for (name, master), (_, weight) in zip(model.named_parameters(), half.module.named_parameters()):
        assert master.grad.dtype == torch.float32 and weight.grad is None, name
    flat = torch.cat([p.grad.flatten() for p in model.parameters()])
    reference = torch.cat([g.flatten() for g in exact.values()])
    assert (flat - reference).norm() / reference.norm() < 0.05  # bf16 rounding, not another function

    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.step()
    half.masters_to_copy()
    for (master, weight), old in zip(half.pairs, before):
        assert master.dtype == torch.float32 and not torch.equal(master, old)  # the master took the step
        assert torch.equal(weight, master.to(torch.bfloat16))  # the copy holds its rounding


def test_train_bf16w_writes_fp32_checkpoints(run_cli, tmp_path):
    run = tmp_path / "run"
    code, out, err = run_cli("train", "tiny/zorro", "--precision", "bf16w", "--steps", "3", "--no-compile",
                             "--train-size", "32", "--val-size", "16", "--batch-size", "8", "--eval-every", "0",
                             "--run-dir", str(run), "--json")
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["final"]["loss"] > 0
    weights = load_file(str(run / "step-000003" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
