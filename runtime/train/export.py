"""Export a trained model for inference without the avdsl runtime.

The model is wrapped so that its forward takes the inputs positionally (in the order of
``model.inputs``, keeping those present in the example batch) and returns the tensors of its
``outputs`` dict as a tuple (in sorted name order). The names are saved next to the program:

* "torch-export": ``torch.export.export`` of the wrapper, saved with ``torch.export.save`` to a
  ``.pt2`` file whose extra file ``avdsl.json`` lists input and output names; the batch dim is
  exported as dynamic when the model allows it.
* "onnx": ``torch.onnx.export`` with named inputs and outputs; needs the ``onnx`` extra.
* "safetensors": the weights alone in one safetensors file, keyed by parameter name (what a
  checkpoint's model.safetensors holds; this way a sharded checkpoint of an ``fsdp`` run becomes one).
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from torch import nn

FORMATS = ("torch-export", "onnx", "safetensors")
NAMES_FILE = "avdsl.json"


class ExportError(RuntimeError):
    """The model could not be exported in the requested format."""


class PositionalModel(nn.Module):
    """``forward(*inputs) -> tuple(outputs)`` around a contract-following model."""

    def __init__(self, model: nn.Module, input_names: list[str], output_names: list[str]):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.output_names = list(output_names)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(**dict(zip(self.input_names, inputs)))["outputs"]
        return tuple(outputs[name] for name in self.output_names)


def _names(model: nn.Module, example_batch: dict) -> tuple[list[str], list[str]]:
    declared = [spec.name for spec in getattr(model, "inputs", [])]
    input_names = [n for n in declared if n in example_batch] or sorted(example_batch)
    with torch.no_grad():
        outputs = model(**{n: example_batch[n] for n in input_names})["outputs"]
    return input_names, sorted(outputs)


def export(
    model: nn.Module, example_batch: dict, path: str | os.PathLike, format: str = "torch-export"
) -> Path:
    """Write ``model`` (in eval mode) to ``path`` in ``format`` and return the path.

    ``example_batch`` is a batch of inputs (leading batch dim, ideally 2 or more so the batch dim can
    stay dynamic); its tensors fix dtypes and the other dims.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {FORMATS}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "safetensors":  # no program: nothing to trace
        from safetensors.torch import save_model

        save_model(model, str(path))
        return path
    was_training = model.training
    model.eval()
    try:
        input_names, output_names = _names(model, example_batch)
        wrapper = PositionalModel(model, input_names, output_names).eval()
        args = tuple(example_batch[n] for n in input_names)
        if format == "torch-export":
            _export_program(wrapper, args, path)
        else:
            _export_onnx(wrapper, args, path)
    finally:
        model.train(was_training)
    return path


def _program(wrapper: PositionalModel, args: tuple) -> torch.export.ExportedProgram:
    """``torch.export`` of the wrapper, with a dynamic batch dim when the model allows one."""
    batch = torch.export.Dim("batch", min=1)
    # forward(*inputs) has one (variadic) parameter, hence the outer 1-tuple
    dynamic = (tuple({0: batch} if a.dim() > 0 else None for a in args),)
    try:
        return torch.export.export(wrapper, args, dynamic_shapes=dynamic)
    except Exception:  # the model fixes its batch size somewhere: export it static
        return torch.export.export(wrapper, args)


def _export_program(wrapper: PositionalModel, args: tuple, path: Path) -> None:
    names = {"inputs": wrapper.input_names, "outputs": wrapper.output_names}
    torch.export.save(_program(wrapper, args), str(path), extra_files={NAMES_FILE: json.dumps(names)})


def _export_onnx(wrapper: PositionalModel, args: tuple, path: Path) -> None:
    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None:
        raise ExportError(
            "ONNX export needs the onnx and onnxscript packages, which are not installed: pip install avdsl[onnx]"
        )
    # the exporter of current torch (dynamo=True) translates the same exported program as torch-export
    torch.onnx.export(_program(wrapper, args), f=str(path), input_names=wrapper.input_names,
                      output_names=wrapper.output_names, dynamo=True, external_data=False)


def load_exported(path: str | os.PathLike) -> tuple[nn.Module, list[str], list[str]]:
    """Load a "torch-export" file: ``(module, input_names, output_names)``.

    Call ``module(*tensors)`` with the inputs in ``input_names`` order; it returns a tuple in
    ``output_names`` order.
    """
    extra = {NAMES_FILE: ""}
    program = torch.export.load(str(path), extra_files=extra)
    names = json.loads(extra[NAMES_FILE])
    return program.module(), names["inputs"], names["outputs"]
