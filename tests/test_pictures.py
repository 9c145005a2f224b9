"""Pictures: the condensed dataflow graph, its text forms, drawn files, and routing mask panels."""
from __future__ import annotations

from avdsl.api import analyse
from avdsl.cli import main
from avdsl.pictures import dataflow, draw_dataflow, draw_masks, mask_panels, masks_text, to_dot, to_mermaid


def test_dataflow_condenses_streams_and_outputs():
    flow = dataflow(analyse("tiny/zorro"))
    kinds = sorted(b.kind for b in flow.boxes.values())
    assert kinds.count("stream") == 3 and kinds.count("encoder") == 1 and kinds.count("loss") == 1
    assert kinds.count("output") == 7 and kinds.count("input") == 3
    assert ("input:fbank", "stream:audio") in flow.edges
    assert ("stream:fusion", "encoder:backbone") in flow.edges
    assert ("output:za", "loss:contrastive") in flow.edges
    assert "32 tokens" in flow.boxes["stream:audio"].label


def test_dot_and_mermaid_name_every_edge():
    flow = dataflow(analyse("tiny/zorro"))
    dot, mmd = to_dot(flow, "zorro"), to_mermaid(flow)
    assert dot.startswith('digraph "zorro"') and "input_fbank -> stream_audio;" in dot
    assert mmd.startswith("flowchart LR") and "encoder_backbone --> output_audio_out" in mmd
    assert dot.count("->") == mmd.count("-->") == len(flow.edges)


def test_mask_text_for_zorro():
    text = masks_text(mask_panels(analyse("zorro")))
    assert "backbone, layers 0..12" in text
    assert "   audio <- ■   ·   ·     (256 tokens)" in text
    assert "  fusion <- ■   ■   ■     (8 tokens)" in text


def test_mask_panels_follow_layer_ranges():
    panels = mask_panels(analyse("examples/mbt-two-groups"))
    assert [p.title for p in panels] == ["mbt, layers 0..2", "mbt, layer 2", "mbt, layer 3", "mbt, layer 4", "mbt, layer 5"]
    assert panels[0].cells[("coarse", "coarse")] == "self"  # passes through before fusion
    assert panels[1].cells[("audio", "coarse")] == "full" and ("audio", "fine") not in panels[1].cells


def test_drawn_files_are_real_images(tmp_path):
    a = analyse("tiny/zorro")
    png, svg, masks = tmp_path / "g.png", tmp_path / "g.svg", tmp_path / "m.png"
    draw_dataflow(dataflow(a), str(png), "t")
    draw_dataflow(dataflow(a), str(svg), "t")
    draw_masks(mask_panels(a), str(masks), "t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert masks.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and masks.stat().st_size > 10_000
    assert b"<svg" in svg.read_bytes()[:2000]


def test_cli_graph_and_masks(tmp_path, capsys):
    assert main(["graph", "tiny/zorro", "-o", str(tmp_path / "g.dot")]) == 0
    assert "digraph" in (tmp_path / "g.dot").read_text()
    assert main(["graph", "tiny/zorro", "-o", str(tmp_path / "g.txt")]) == 2
    assert main(["masks", "tiny/zorro", "-o", str(tmp_path / "m.png")]) == 0
    assert "fusion <- ■   ■   ■" in capsys.readouterr().out
    assert (tmp_path / "m.png").stat().st_size > 10_000


def test_targets_sit_next_to_their_reader_and_skipping_edges_are_routed_below():
    from avdsl.pictures import layers_by_depth

    flow = dataflow(analyse("tiny/mammut"))
    depth = layers_by_depth(flow)
    assert depth["input:caption"] == 0  # it also feeds the text stream
    flow = dataflow(analyse("mbt-cls"))
    depth = layers_by_depth(flow)
    assert depth["input:labels"] == depth["loss:classification"] - 1


def test_passes_projections_and_shared_weights_are_shown():
    flow = dataflow(analyse("cav-mae"))
    assert "passes: audio, video, av" in flow.boxes["encoder:joint"].label
    assert "linear 768 -> 512" in flow.boxes["stream:decoder_audio"].label
    assert ("stream:decoder_audio", "stream:decoder_video", "shares projection") in flow.shares
    assert "-.->|shares projection|" in to_mermaid(flow) and "style=dashed" in to_dot(flow)
    shares = dataflow(analyse("mbt-cls")).shares
    assert ("output:logits_audio", "output:logits_video", "shares weights") in shares
