"""Export: the saved program computes what the eager model computes."""
from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch
from torch.utils.data import default_collate

from avdsl.runtime.train import ExportError, export, load_exported

export_module = importlib.import_module("avdsl.runtime.train.export")  # the module, not the function
from avdsl.runtime.train.toy import TinyAV, ToyAVDataset


def batch(items: range) -> dict:
    data = ToyAVDataset(32, seed=3)
    return default_collate([data[i] for i in items])


@pytest.fixture
def model() -> TinyAV:
    torch.manual_seed(0)
    return TinyAV().train()


def test_torch_export_matches_eager_outputs(model, tmp_path):
    example = batch(range(4))
    path = export(model, example, tmp_path / "tiny.pt2")
    assert model.training  # the caller's mode is restored
    program, input_names, output_names = load_exported(path)
    assert input_names == ["audio", "video", "label"]
    assert output_names == ["audio_embedding", "logits", "video_embedding"]

    model.eval()
    for sample in (example, batch(range(4, 11))):  # the export batch, and another batch size
        with torch.no_grad():
            eager = model(**sample)["outputs"]
        exported = program(*[sample[n] for n in input_names])
        for name, tensor in zip(output_names, exported):
            assert tensor.shape == eager[name].shape
            assert torch.allclose(tensor, eager[name], atol=1e-4, rtol=0), name


def test_inputs_missing_from_the_example_are_left_out(model, tmp_path):
    example = {k: v for k, v in batch(range(3)).items() if k != "label"}
    program, input_names, _ = load_exported(export(model, example, tmp_path / "nolabel.pt2"))
    assert input_names == ["audio", "video"]
    assert program(example["audio"], example["video"])[0].shape == (3, 16)


def test_onnx_without_the_package_says_how_to_install(model, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(export_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnx" else real(name, *a))
    with pytest.raises(ExportError, match=r"pip install avdsl\[onnx\]"):
        export(model, batch(range(2)), tmp_path / "tiny.onnx", format="onnx")


def test_unknown_format_is_refused(model, tmp_path):
    with pytest.raises(ExportError, match="torch-export"):
        export(model, batch(range(2)), tmp_path / "x", format="tflite")


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")
def test_onnx_matches_eager_outputs(model, tmp_path):
    import onnxruntime

    example = batch(range(4))
    path = export(model, example, tmp_path / "tiny.onnx", format="onnx")
    session = onnxruntime.InferenceSession(str(path))
    feeds = {i.name: example[i.name].numpy() for i in session.get_inputs()}
    results = session.run(None, feeds)
    model.eval()
    with torch.no_grad():
        eager = model(**example)["outputs"]
    for meta, value in zip(session.get_outputs(), results):
        assert torch.allclose(torch.from_numpy(value), eager[meta.name], atol=1e-4), meta.name
