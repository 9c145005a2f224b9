"""Diff: routing changes as stream-mask differences per layer, values old -> new, counts per component."""
from __future__ import annotations

import json

from avdsl.api import analyse
from avdsl.cli import main
from avdsl.diff import diff_analyses, is_empty, layer_runs, load_side

LEAK = "encoders.backbone.routing.0=audio <- audio, fusion"


def test_layer_runs_are_half_open():
    assert layer_runs({0, 1, 2, 8}) == "0..3, 8"
    assert layer_runs(set()) == ""
    assert layer_runs({4, 6}) == "4, 6"


def test_same_spec_has_no_differences():
    d = diff_analyses(analyse("zorro"), analyse("zorro"))
    assert is_empty(d)


def test_routing_change_shows_which_query_gained_which_key_in_which_layers():
    a, b = analyse("zorro"), analyse("zorro", [LEAK])
    d = diff_analyses(a, b)
    rows = {(r["query"], r["key"]): r for r in d["routing"]}
    assert rows[("audio", "fusion")]["gained"] == "0..12" and rows[("audio", "fusion")]["lost"] == ""
    assert set(rows) == {("audio", "fusion")}  # audio still reads audio in every layer
    # the added attention: 256 audio queries x 8 fusion keys, 4 FLOPs per pair and width unit, 12 layers,
    # (the fusion keys are projected already for the fusion queries: one shared weight set)
    extra = d["b"]["flops"] - d["a"]["flops"]
    assert extra == 12 * (4 * 256 * 8 * 768)
    assert d["params"] == {}


def test_depth_change_reports_value_and_counts():
    a, b = analyse("tiny/zorro"), analyse("tiny/zorro", ["encoders.backbone.depth=3"])
    d = diff_analyses(a, b)
    assert d["encoders"]["changed"]["backbone"]["depth"] == [2, 3]
    assert d["routing"] == []  # layers only one side has are explained by the depth change
    old, new, delta = d["params"]["encoders.backbone"]
    assert delta == new - old == b.cost.total_params - a.cost.total_params > 0


def test_added_output_and_loss():
    d = diff_analyses(analyse("zorro"), analyse("zorro-supervised"))
    assert d["outputs"]["added"] == ["logits"] and d["losses"]["added"] == ["classification"]
    assert d["params"]["outputs.logits"] == [0, 768 * 527 + 527, 768 * 527 + 527]


def test_git_revision_side_reads_the_committed_file():
    a = load_side("specs/zorro.yaml@HEAD")
    assert a.spec.name == "zorro"
    assert is_empty(diff_analyses(a, analyse("specs/zorro.yaml")))


def test_cli_json_and_text(capsys):
    assert main(["diff", "zorro", "zorro", "--set-b", LEAK, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["routing"][0]["query"] == "audio" and data["routing"][0]["key"] == "fusion"
    assert main(["diff", "zorro", "zorro", "--set-b", LEAK]) == 0
    text = capsys.readouterr().out
    assert "audio <- fusion" in text and "0..12" in text
    assert main(["diff", "zorro", "nosuchspec"]) == 2


def test_routing_flag_change_is_a_routing_difference():
    a = analyse("tiny/mammut")
    b = analyse("tiny/mammut", ["encoders.decoder.passes.generative.routing.0=text <- text"])
    rows = {(r["query"], r["key"], r["flags"]): r for r in diff_analyses(a, b)["routing"]}
    assert rows[("text", "text", "(causal)")]["lost"] == "0..4" and rows[("text", "text", "")]["gained"] == "0..4"
    assert set(rows) == {("text", "text", "(causal)"), ("text", "text", "")}


def test_via_and_cross_flags_show(capsys):
    d = diff_analyses(analyse("tiny/mammut"), analyse("tiny/mammut", [
        "encoders.decoder.passes.generative.routing.1=text <- image_tokens (cross) @ 1..:2"]))
    rows = {(r["query"], r["key"], r["flags"]): (r["gained"], r["lost"]) for r in d["routing"]}
    assert rows == {("text", "image_tokens", "(cross)"): ("1, 3", "0, 2")}
    assert main(["diff", "tiny/mbt", "tiny/mbt", "--set-b", "vars.fusion_layer=0"]) == 0
    assert "via " in capsys.readouterr().out  # the bottleneck's updates name the weights they use


def test_value_changes_of_an_encoder_are_listed():
    d = diff_analyses(analyse("tiny/zorro"), analyse("tiny/zorro", ["encoders.backbone.final_norm=false",
                                                                    "encoders.backbone.norm_eps=0.000001"]))
    assert d["encoders"]["changed"]["backbone"]["final_norm"] == [True, False]
    assert d["encoders"]["changed"]["backbone"]["norm_eps"] == [1e-5, 1e-6]


def test_changed_rule_beyond_the_other_depth_shows():
    a = analyse("tiny/zorro")
    routing = '["audio <- audio", "audio <- audio, video @ 2..", "video <- video", "fusion <- audio, video, fusion"]'
    b = analyse("tiny/zorro", ["encoders.backbone.depth=3", f"encoders.backbone.routing={routing}"])
    rows = {(r["query"], r["key"]): r for r in diff_analyses(a, b)["routing"]}
    assert set(rows) == {("audio", "video")} and rows[("audio", "video")]["gained"] == "2"  # a layer tiny/zorro lacks
    assert rows[("audio", "video")]["before"] == ""
