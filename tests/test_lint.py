"""Lint: every rule fires at the line it should on a spec that breaks it, and not on one that does not."""
from __future__ import annotations

import json

import pytest

from avdsl.cli import main
from avdsl.lint import BY_CODE, RULES, lint_one

BASE = """avdsl: 1
name: t
inputs:
  fbank[B, 32, 16]: fbank
  frames[B, 3, 2, 16, 16]: video
  label[B]: label(4)
streams:
  audio:
    input: fbank
    tokenizer: patch2d(8, 8)
  video:
    input: frames
    tokenizer: tubelet(2, 8, 8)
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
  audio_out: mean(backbone.audio)
  video_out: mean(backbone.video)
  fusion_out: mean(backbone.fusion)
  za: linear(audio_out, 8)
  zv: linear(video_out, 8)
  zf: linear(fusion_out, 8)
losses:
  contrastive: nce(za, zv) + nce(za, zf)
"""


def lint_text(tmp_path, text):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return lint_one(str(path))


def edit(old, new, text=BASE):
    assert old in text, old
    return text.replace(old, new)


CASES = {
    "S101": (edit("  zf: linear(fusion_out, 8)", "  fusion: linear(fusion_out, 8)").replace("nce(za, zf)", "nce(za, fusion)"), 32),
    "S102": (edit("  label[B]: label(4)", "  label[B]: label(4)\n  caption[B, 8]: text"), 7),
    "R201": (edit("streams: [audio, video, fusion]", "streams: [audio, video, fusion, extra]")
             .replace("    latent: 2\n", "    latent: 2\n  extra:\n    latent: 1\n"), 20),  # two lines added above
    "R202": (edit("  zf: linear(fusion_out, 8)\n", "").replace("  fusion_out: mean(backbone.fusion)\n", "")
             .replace(" + nce(za, zf)", ""), 14),
    "R203": (edit("      - audio <- audio\n", "      - audio <- audio, video @ 0..1\n      - audio <- audio\n"), 23),
    "R204": (edit("      - audio <- audio\n", "      - audio <- audio, fusion\n"), 27),
    "R205": (edit("      - fusion <- audio, video, fusion", "      - fusion <- fusion"), 15),
    "H301": (edit("heads: 2", "heads: 3"), 21),
    "H302": (edit("patch2d(8, 8)", "patch2d(8, 5)"), 10),
    "H303": (edit("width: 16", "width: 24"), 21),
    "L401": (edit("nce(za, zv) + nce(za, zf)", "nce(za, zv) - 0.5 * nce(za, zf)"), 34),
    "L402": (edit("nce(za, zv) + nce(za, zf)", "nce(za, za) + nce(za, zf)"), 34),
    "L403": (BASE.split("losses:")[0], 1),
}


def test_every_rule_has_a_case_and_a_unique_code():
    assert sorted(CASES) == sorted(r.code for r in RULES)
    assert len(BY_CODE) == len(RULES)
    assert all(r.summary and len(r.explanation) > 60 for r in RULES)


def test_clean_spec_has_no_findings(tmp_path):
    result = lint_text(tmp_path, BASE)
    assert result.error is None and result.findings == []


@pytest.mark.parametrize("code", sorted(CASES))
def test_rule_fires_at_the_expected_line(tmp_path, code):
    text, line = CASES[code]
    result = lint_text(tmp_path, text)
    assert result.error is None, result.error
    hits = [d for d in result.findings if d.code == code]
    assert hits, [(d.code, d.message) for d in result.findings]
    assert hits[0].loc.line == line, (hits[0].loc, hits[0].message)
    assert hits[0].hint
    assert hits[0].severity == BY_CODE[code].severity


def test_unimodal_leak_names_the_layer_and_key_stream(tmp_path):
    result = lint_text(tmp_path, CASES["R204"][0])
    (leak,) = [d for d in result.findings if d.code == "R204"]
    # video reaches fusion in layer 0, and audio reads fusion from layer 1 on
    assert "output 'audio_out'" in leak.message and "'frames'" in leak.message
    assert "layer 1 of backbone: audio <- fusion" in leak.message


def test_noqa_silences_one_code_only(tmp_path):
    text = CASES["R204"][0].replace("audio_out: mean(backbone.audio)", "audio_out: mean(backbone.audio)  # noqa: R204")
    assert [d.code for d in lint_text(tmp_path, text).findings] == []
    text = CASES["R204"][0].replace("audio_out: mean(backbone.audio)", "audio_out: mean(backbone.audio)  # noqa: R202")
    assert [d.code for d in lint_text(tmp_path, text).findings] == ["R204"]


def test_zero_weight_is_reported_but_positive_is_not(tmp_path):
    result = lint_text(tmp_path, edit("nce(za, zv) + nce(za, zf)", "nce(za, zv) + 0 * nce(za, zf)"))
    assert [d.message for d in result.findings] == ["loss 'contrastive' weighs its nce() term by 0"]
    assert lint_text(tmp_path, edit("nce(za, zv) + nce(za, zf)", "nce(za, zv) + 0.5 * nce(za, zf)")).findings == []


def test_cli_exit_codes_and_output(tmp_path, capsys):
    clean, leaky, broken = tmp_path / "clean.yaml", tmp_path / "leaky.yaml", tmp_path / "broken.yaml"
    clean.write_text(BASE)
    leaky.write_text(CASES["R204"][0])
    broken.write_text(edit("width: 16", "widht: 16"))
    assert main(["lint", str(clean)]) == 0
    capsys.readouterr()
    assert main(["lint", str(leaky)]) == 1
    text = capsys.readouterr().out
    assert f"{leaky}:27:14: R204 output 'audio_out'" in text and "hint:" in text
    assert main(["lint", str(broken)]) == 2
    assert "unknown key 'widht'" in capsys.readouterr().err
    assert main(["lint", str(leaky), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data[0]["findings"][0]["code"] == "R204" and data[0]["findings"][0]["rule"] == "unimodal-leak"
    assert main(["lint", "--explain", "r203"]) == 0
    assert "shadowed-rule" in capsys.readouterr().out
    assert main(["lint", "--explain", "X999"]) == 2


def test_directory_with_shipped_specs_is_clean():
    from pathlib import Path

    from avdsl.lint import spec_targets

    specs = Path(__file__).resolve().parent.parent / "specs"
    results = [lint_one(t) for t in spec_targets([str(specs)])]
    assert len(results) >= 5
    assert [(r.target, r.error) for r in results if r.error] == []
    assert [(r.target, d.code, d.message) for r in results for d in r.findings] == []
