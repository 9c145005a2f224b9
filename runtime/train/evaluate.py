"""Held-out evaluation of a contract-following model, as its EvalPlan asks.

The model runs in eval mode under ``no_grad`` on the first ``batches * batch_size`` items of the
data set (always the same items, so numbers are comparable across a run), outputs are concatenated
across batches, and then:

* every RetrievalPair gives recall@1/5/10 and median rank in both directions, named like
  ``"audio->video R@1"`` (a trailing ``_embedding`` is dropped from output names),
* every Classifier gives ``"<logits> accuracy"``, or ``"<logits> mAP"`` when multilabel,
* ``"reconstruction"`` / ``"captioning"`` are the mean of the loss terms the plan lists for them,
* every loss term is reported as ``"loss/<name>"`` and the total as ``"loss"`` (item-weighted means).

The global RNG states are left as they were, so evaluating in the middle of training does not change
what the training run draws afterwards.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import Dataset, default_collate

from .. import devices

_SUFFIXES = ("_embedding", "_emb")


def short_name(output: str) -> str:
    """``audio_embedding`` -> ``audio``, used to name retrieval directions."""
    for suffix in _SUFFIXES:
        if output.endswith(suffix) and len(output) > len(suffix):
            return output[: -len(suffix)]
    return output


def _device_of(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _fork_rng(device: torch.device):
    """Run a block without disturbing the RNG streams of the training run."""
    devices = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def _batches(dataset: Dataset, batches: int, batch_size: int, collate_fn: Callable):
    """Consecutive batches over the first items of the data set, skipping items that are None."""
    total = min(len(dataset), batches * batch_size)
    for start in range(0, total, batch_size):
        items = [dataset[i] for i in range(start, min(total, start + batch_size))]
        items = [item for item in items if item is not None]
        if items:
            yield collate_fn(items)


def collect(
    model: torch.nn.Module,
    dataset: Dataset,
    batches: int,
    batch_size: int,
    collate_fn: Callable | None = None,
    precision: str = "fp32",
) -> tuple[dict, dict, dict]:
    """Run the model over the evaluation items.

    Returns ``(outputs, inputs, losses)``: outputs and inputs concatenated along the batch dim (on
    CPU, float outputs in float32), losses as item-weighted means (plain floats, total under "loss").
    """
    collate_fn = collate_fn or default_collate
    device = _device_of(model)
    was_training = model.training
    outputs: dict[str, list] = {}
    inputs: dict[str, list] = {}
    loss_sums: dict[str, float] = {}
    count = 0
    autocast = devices.autocast(device, precision)
    model.eval()
    try:
        with _fork_rng(device), torch.no_grad():
            for batch in _batches(dataset, batches, batch_size, collate_fn):
                batch = devices.to_device(batch, device)
                with autocast:
                    result = model(**batch)
                size = next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
                count += size
                terms = {"loss": result["loss"], **{f"loss/{k}": v for k, v in result["losses"].items()}}
                for name, value in terms.items():
                    if value is None:  # a spec without losses (e.g. an imported inference model)
                        continue
                    loss_sums[name] = loss_sums.get(name, 0.0) + float(value.float()) * size
                for name, value in result["outputs"].items():
                    value = value.detach().cpu()
                    outputs.setdefault(name, []).append(value.float() if value.is_floating_point() else value)
                for name, value in batch.items():
                    if torch.is_tensor(value):
                        inputs.setdefault(name, []).append(value.detach().cpu())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluation found no items: the data set is empty or every item failed to load")
    return (
        {k: torch.cat(v) for k, v in outputs.items()},
        {k: torch.cat(v) for k, v in inputs.items()},
        {k: v / count for k, v in loss_sums.items()},
    )


def evaluate(
    model: torch.nn.Module,
    dataset: Dataset,
    batches: int,
    batch_size: int,
    collate_fn: Callable | None = None,
    precision: str = "fp32",
) -> dict[str, float]:
    """Metrics of ``model`` on ``dataset`` per its ``eval_plan`` (see the module docstring)."""
    from .. import metrics  # imported here so that training modules load without it

    outputs, inputs, losses = collect(model, dataset, batches, batch_size, collate_fn, precision)
    plan = model.eval_plan
    results: dict[str, float] = dict(losses)
    for pair in plan.retrieval:
        query, key = short_name(pair.query), short_name(pair.key)
        for (a, b), (qa, kb) in (
            ((query, key), (outputs[pair.query], outputs[pair.key])),
            ((key, query), (outputs[pair.key], outputs[pair.query])),
        ):
            for metric, value in metrics.retrieval(qa, kb).items():
                results[f"{a}->{b} {metric}"] = value
    for classifier in plan.classifiers:
        logits, target = outputs[classifier.logits], inputs[classifier.target]
        if classifier.multilabel:
            results[f"{classifier.logits} mAP"] = metrics.mean_average_precision(logits, target)
        else:
            results[f"{classifier.logits} accuracy"] = metrics.accuracy(logits, target)
    for label, names in (("reconstruction", plan.reconstruction), ("captioning", plan.captioning)):
        if names:
            results[label] = sum(losses[f"loss/{name}"] for name in names) / len(names)
    return results
