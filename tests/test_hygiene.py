"""Generated code cannot be confused by names: spec names that are keywords, builtins, globals of the
generated module or other generated names build, and each tensor reaches the code that should read it."""
import builtins
import keyword

import pytest
import torch

from avdsl import codegen
from avdsl.api import analyse
from avdsl.compiler import CompiledModel, compile_graph, keep
from avdsl.runtime.trial import random_batch

# inputs named like a keyword (`lambda`), a stream variable of the generated code (`audio_pos`: the
# positions of stream `audio`), the generated module's globals (`torch`, `H`, `L`), builtins it calls
# (`sum`) or not (`print`) and its own locals (`losses`, `outputs`); streams named like a keyword (`class`) and a method
# (`forward`); an encoder named like an nn.Module attribute (`training`)
SPEC = """
avdsl: 1
name: hygiene
dims: {B: 2}
inputs:
  lambda[B, 16, 16]: fbank
  audio_pos[B, 16, 16]: fbank
  print[B, 16, 16]: fbank
  torch[B, 16, 16]: fbank
  sum[B, 16, 16]: fbank
  outputs[B, 16, 16]: fbank
  L[B, 16, 16]: fbank
  H[B]: label(3)
  losses[B]: label(3)
streams:
  audio: {input: lambda, tokenizer: "patch2d(8, 8)", position: learned()}
  other: {input: audio_pos, tokenizer: "patch2d(8, 8)"}
  class: {input: print, tokenizer: "patch2d(8, 8)"}
  forward: {input: sum, tokenizer: "patch2d(8, 8)"}
  u: {input: outputs, tokenizer: "patch2d(8, 8)"}
  v: {input: torch, tokenizer: "patch2d(8, 8)"}
  w: {input: L, tokenizer: "patch2d(8, 8)"}
encoders:
  training:
    streams: [audio, other, class, forward, u, v, w]
    width: 16
    depth: 1
    heads: 2
    routing: ["audio <- audio", "other <- other", "class <- class", "forward <- forward", "u <- u", "v <- v", "w <- w"]
outputs:
  z_audio: mean(training.audio)
  z_other: mean(training.other)
  z_class: mean(training.class)
  z_forward: mean(training.forward)
  z_u: mean(training.u)
  z_v: mean(training.v)
  z_w: mean(training.w)
  logits: linear(z_audio, 3)
  logits2: linear(z_other, 3)
losses:
  cls: ce(logits, H) + ce(logits2, losses)
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("hygiene") / "hygiene.yaml"
    path.write_text(SPEC)
    torch.manual_seed(0)
    return compile_graph(analyse(str(path)).graph).eval()


def _identifiers(code: str) -> set[str]:
    import ast
    return {n.id for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Name)} | \
           {a.arg for n in ast.walk(ast.parse(code)) if isinstance(n, ast.FunctionDef) for a in n.args.args}


def test_names_that_are_keywords_builtins_and_globals_build_and_run(model):
    names = _identifiers(model.code)
    assert not {n for n in names if keyword.iskeyword(n)}
    # builtins and globals are only used as themselves
    assert "sum" in names and "self" in names and "H" in names and "L" in names
    assert model.arg_names["lambda"] != "lambda" and model.arg_names["sum"] != "sum"
    assert model.arg_names["H"] != "H" and model.arg_names["torch"] != "torch" and model.arg_names["print"] != "print"
    batch = random_batch(model.inputs, 2)
    out = model(**batch)
    assert torch.isfinite(out["loss"]) and set(out["losses"]) == {"cls"}
    assert set(out["outputs"]) == {"z_audio", "z_other", "z_class", "z_forward", "z_u", "z_v", "z_w", "logits", "logits2"}


@pytest.mark.parametrize("stream, own, other", [("z_other", "audio_pos", "lambda"), ("z_audio", "lambda", "audio_pos"),
                                                ("z_class", "print", "sum"), ("z_forward", "sum", "print"),
                                                ("z_v", "torch", "L"),
                                                ("z_u", "outputs", "L"), ("z_w", "L", "outputs")])
def test_each_stream_tokenizes_its_own_input(model, stream, own, other):
    """With no routing between streams, an output changes with its own input only (an input named
    `audio_pos` used to be overwritten by the positions of stream `audio`)."""
    torch.manual_seed(1)
    batch = random_batch(model.inputs, 2)
    with torch.no_grad():
        base = model(**batch)["outputs"][stream]
        changed_other = model(**{**batch, other: batch[other] + 1.0})["outputs"][stream]
        changed_own = model(**{**batch, own: batch[own] + 1.0})["outputs"][stream]
    assert torch.equal(base, changed_other)
    assert not torch.allclose(base, changed_own)


def test_second_stream_reads_the_right_tensor_numerically(model):
    """`z_other` is the mean of the encoder run on the tokens of input `audio_pos`, computed by hand."""
    torch.manual_seed(2)
    batch = random_batch(model.inputs, 2)
    with torch.no_grad():
        enc = model.training_1
        # the encoder's layer for stream `other` alone: it attends only to itself
        x = {"other": model.other_tokenize(batch["audio_pos"])}
        x = enc.layer("", 0, tuple(a for a in enc.plans[""][0] if a.query == "other"), x)
        expected = enc.final[enc.final_of[("", "other")]]["all"](x["other"]).mean(dim=1)
        got = model(**batch)["outputs"]["z_other"]
    torch.testing.assert_close(got, expected)


def test_module_attributes_never_replace_module_attributes(model):
    """An encoder named `training` gets another attribute name; `model.training` is still the flag."""
    assert model.training is False
    assert isinstance(model.training_1, torch.nn.Module)
    public = {n for n in dir(CompiledModel) if not n.startswith("_")} | {n for n in vars(model) if not n.startswith("_")}
    assert public <= codegen.MODULE_ATTRS


def test_namespace_avoids_reserved_and_given_names():
    ns = codegen.Namespace({"H"})
    assert ns("a", "lambda") == "lambda_1"
    assert ns("b", "H") == "H_1"
    assert ns("c", "x.y") == "x_y" and ns("d", "x/y") == "x_y_1"
    assert ns("c", "x.y") == "x_y"  # one key, one name
    assert ns("e", "3d") == "t_3d"
    assert all(not keyword.iskeyword(n) for n in ns.given.values())
    local = codegen.local_names()
    assert local("s", "sum") != "sum" and local("o", "outputs") != "outputs" and "print" in dir(builtins)


def test_an_input_named_self_is_refused_with_a_hint(tmp_path):
    from avdsl.diagnostics import SpecError
    path = tmp_path / "self.yaml"
    path.write_text(SPEC.replace("  print[B, 16, 16]: fbank", "  self[B, 16, 16]: fbank").replace("input: print,", "input: self,"))
    with pytest.raises(SpecError, match="cannot be called 'self'"):
        analyse(str(path))


def test_a_file_name_with_line_breaks_stays_inside_its_comment(tmp_path):
    import ast

    path = tmp_path / "x\nimport os; os.system('echo hi')\n#.yaml"
    path.write_text(SPEC)
    code = codegen.generate(analyse(str(path)).graph)
    tree = ast.parse(code)
    assert [type(n).__name__ for n in tree.body] == ["FunctionDef"]
    assert "\nimport os" not in code


def test_renamed_inputs_trace_as_one_graph(model):
    """Mapping input names to parameter names does not break graph capture."""
    batch = random_batch(model.inputs, 2)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        got, expected = compiled(**batch), model(**batch)
    torch.testing.assert_close(got["outputs"]["z_other"], expected["outputs"]["z_other"])
    torch.testing.assert_close(got["loss"], expected["loss"])


def test_keeping_every_tensor_and_layer_output_reads_the_right_variables(model):
    batch = random_batch(model.inputs, 2)
    names = list(model._tensor_names) + list(model._layer_names)
    assert "training.class@0" in names and "lambda" in names
    with torch.no_grad(), keep(model, names) as kept:
        out = model(**batch)
    assert kept.keys() == set(names)
    assert kept["lambda"] is batch["lambda"] and kept["sum"] is batch["sum"]  # renamed parameters
    assert torch.equal(kept["out.z_class"], out["outputs"]["z_class"])
