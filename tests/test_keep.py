"""Intermediate tensors by name (`avdsl.compiler.keep`): graph tensors and every encoder output after
each layer, numerically the tensors the model computes, and nothing kept outside the block."""
import pytest
import torch

from avdsl.api import analyse
from avdsl.compiler import compile_graph, keep
from avdsl.runtime import embeddings as E
from avdsl.runtime.encoder import Attend
from avdsl.runtime.trial import random_batch


@pytest.fixture(scope="module")
def cavmae():
    torch.manual_seed(0)
    model = compile_graph(analyse("tiny/cav-mae").graph).eval()
    batch = random_batch(model.inputs, 2, torch.Generator().manual_seed(0))
    noise = {"audio": torch.rand(2, 32), "video": torch.rand(2, 16)}
    return model, batch, noise


def test_layer_outputs_are_the_layers_results(cavmae):
    model, batch, noise = cavmae
    names = ["audio/kept", "unimodal.audio@0", "unimodal.audio@1", "unimodal.audio", "joint.av.a@0", "joint.av.a"]
    with torch.no_grad(), E.given_noise(model, noise), keep(model, names) as kept:
        model(**batch)
    assert sorted(kept) == sorted(names)
    # layer 0 by hand: the audio weight set's first block on the masked audio tokens
    block = model.unimodal.blocks["audio"][0]
    by_hand = block(block.norms("all"), (Attend("audio", ("audio",), "audio"),), {"audio": kept["audio/kept"]})["audio"]
    assert torch.equal(kept["unimodal.audio@0"], by_hand)
    # the last layer's output is the encoder's output before its final norm (unimodal has none)
    assert torch.equal(kept["unimodal.audio@1"], kept["unimodal.audio"])
    joint_final = model.joint.final[model.joint.final_of[("av", "a")]]["av"]
    assert torch.equal(joint_final(kept["joint.av.a@0"]), kept["joint.av.a"])


def test_keeping_changes_no_result_and_ends_with_the_block(cavmae):
    model, batch, noise = cavmae
    with torch.no_grad(), E.given_noise(model, noise):
        plain = model(**batch)
        with keep(model, ["out.audio_pred", "decoder.decoder_video@1", "audio.mask"]) as kept:
            kept_run = model(**batch)
        after = model(**batch)
    assert set(kept_run) == set(plain) == {"loss", "losses", "outputs"}
    assert torch.equal(kept_run["loss"], plain["loss"]) and torch.equal(after["loss"], plain["loss"])
    assert torch.equal(kept["out.audio_pred"], plain["outputs"]["audio_pred"])
    assert kept["audio.mask"].shape == (2, 32) and kept["decoder.decoder_video@1"].shape == (2, 16, 32)
    shown = dict(kept)
    with torch.no_grad():
        model(**batch)
    assert kept.keys() == shown.keys() and all(kept[k] is shown[k] for k in kept)  # nothing stored outside
    assert model.decoder.kept is None and model._keep is None


def test_kept_tensors_carry_gradients(cavmae):
    model, batch, _ = cavmae
    with keep(model, ["unimodal.video@0"]) as kept:
        out = model(**batch)
    out["loss"].backward()
    assert kept["unimodal.video@0"].requires_grad
    model.zero_grad()


def test_an_unknown_name_is_refused_with_the_nearest_names(cavmae):
    model, _, _ = cavmae
    with pytest.raises(ValueError, match=r"no tensor named unimodal\.audio@2 .*did you mean unimodal\.audio@1"):
        with keep(model, ["unimodal.audio@2"]):
            pass
    with pytest.raises(ValueError, match="no tensor named loss.reconstruction"):
        with keep(model, ["loss.reconstruction"]):  # losses are in the result's `losses`
            pass
    assert model._keep is None


def test_names_of_encoders_without_passes_and_of_every_pass():
    analysis = analyse("tiny/mammut")
    names = set(compile_graph(analysis.graph, "meta")._layer_names)
    depth = analysis.spec.encoders["decoder"].sizes.depth
    assert {f"decoder.contrastive.text@{i}" for i in range(depth)} <= names
    assert {f"decoder.generative.text@{i}" for i in range(depth)} <= names
    assert "vision.image@0" in names and not any(n.startswith("decoder.text@") for n in names)
