"""Messages a new user met while writing new topologies: each says what is wrong where it is wrong."""
from __future__ import annotations

import pytest

from avdsl.api import analyse, analyse_text
from avdsl.diagnostics import SpecError, render

SPEC = """avdsl: 1
name: t
inputs:
  fbank[B, 32, 16]: fbank
  label[B]: label(4)
streams:
  audio:
    input: fbank
    tokenizer: patch2d(8, 8)
encoders:
  backbone:
    streams: [audio]
    width: 16
    depth: 2
    heads: 2
    routing:
      - audio <- audio
outputs:
  logits: linear(mean(backbone.audio), 4)
losses:
  classification: ce(logits, label)
"""


def error(text: str, overrides=()) -> SpecError:
    with pytest.raises(SpecError) as e:
        analyse_text(text, "spec.yaml", list(overrides))
    return e.value


def test_the_clean_spec_builds():
    assert analyse_text(SPEC, "spec.yaml").cost.total_params > 0


def test_build_errors_carry_the_lint_code():
    e = error(SPEC.replace("heads: 2", "heads: 3"))
    assert e.diagnostic.headline().startswith("spec.yaml:15:12: H301 width 16 is not divisible by 3 heads")


def test_layer_range_with_a_dash_asks_for_two_dots():
    e = error(SPEC.replace("- audio <- audio", "- audio <- audio @ 0-2"))
    d = e.diagnostic
    assert (d.loc.line, d.loc.column) == (17, 27)
    assert d.message == "a layer range is written with `..`, got `@ 0-2`"
    assert d.hint.startswith("write `@ 0..2`")


def test_dedented_key_is_reported_on_its_own_line():
    text = SPEC.replace("    heads: 2\n    routing:", "  heads: 2\n    routing:")
    d = error(text).diagnostic
    assert d.loc.line == 15 and d.message.startswith("`heads:` is indented less than the line after it")


def test_dedented_routing_is_said_to_be_read_as_an_encoder_name():
    text = SPEC.replace("    routing:\n      - audio <- audio", "  routing:\n    - audio <- audio")
    d = error(text).diagnostic
    assert d.loc.line == 16
    assert d.message == "`routing:` is indented like an encoder name, so it is read as encoder 'routing' of `encoders:`"
    assert "like the keys of 'backbone'" in d.hint


def test_droptoken_rate_one_is_refused_and_the_hint_says_how_to_remove_it():
    d = error(SPEC.replace("tokenizer: patch2d(8, 8)", "tokenizer: patch2d(8, 8)\n    drop: droptoken(1.0)")).diagnostic
    assert "at least 0 and less than 1, got 1.0" in d.message
    assert "`droptoken(0)` keeps all of them" in d.hint and "`--set streams.audio.drop=null`" in d.hint


def test_unknown_key_sharing_a_word_gets_a_did_you_mean():
    d = error(SPEC.replace("tokenizer: patch2d(8, 8)", "tokenizer: patch2d(8, 8)\n    drop_modality: 0.5")).diagnostic
    assert d.message == "unknown key 'drop_modality' in streams.audio" and "'drop'" in d.hint


def test_set_errors_show_the_override_with_a_caret():
    e = error(SPEC, ["encoders.backbone.depth=3", "encoders.backbon.width=8"])
    shown = render(e.diagnostic, e.sources)
    assert shown.splitlines()[1:3] == ["   2 | encoders.backbon.width=8", " " * 16 + "^"]
    e = error(SPEC, ["encoders.backbone.routing.0=audio <- audio @ 0-2"])
    assert str(e.diagnostic.loc) == "<--set>:1:47"
    assert "   1 | encoders.backbone.routing.0=audio <- audio @ 0-2" in render(e.diagnostic, e.sources)


def test_set_value_locations_count_per_override():
    a = analyse("tiny/zorro", ["encoders.backbone.depth=3", "encoders.backbone.heads=2"])
    assert str(a.doc.loc("encoders", "backbone", "heads")) == "<--set>:2:25"


def test_swapped_ce_arguments():
    d = error(SPEC.replace("ce(logits, label)", "ce(label, logits)")).diagnostic
    assert d.message == "ce() takes the logits first and the target second; 'label' is the label input"
    assert d.hint == "write `ce(logits, label)`"


@pytest.mark.parametrize("loss, message", [
    ("nce(za, backbone.audio)", "nce() compares one embedding per example [B, D], but 'backbone.audio' is unpooled tokens [B, 8, 16]"),
    ("nce(za, zb)", "nce() compares embeddings of different widths: 'za' is [B, 8], 'zb' is [B, 16]"),
    ("nce(za, mean(backbone.audio))", "nce() compares embeddings of different widths: 'za' is [B, 8], 'mean(backbone.audio)' is [B, 16]"),
])
def test_contrastive_width_messages_name_the_arguments_as_written(loss, message):
    text = SPEC.replace("  logits: linear(mean(backbone.audio), 4)\n",
                        "  logits: linear(mean(backbone.audio), 4)\n  za: linear(mean(backbone.audio), 8)\n"
                        "  zb: mean(backbone.audio)\n")
    d = error(text.replace("ce(logits, label)", loss)).diagnostic
    assert d.message == message
