"""Real media files: writing test clips, decoding them, and skipping bad files without crashing."""
import json
import math
import warnings

import pytest
import torch

from avdsl.runtime.contracts import InputSpec
from avdsl.runtime.data.loader import make_loader
from avdsl.runtime.data.media import (
    MediaDataset,
    decode_audio,
    decode_frames,
    make_manifest,
    parse_labels,
    read_manifest,
    write_test_clip,
)

INPUTS = [
    InputSpec("video", "video", (3, 4, 32, 32)),
    InputSpec("audio", "fbank", (64, 32)),
    InputSpec("text", "text", (96,)),
    InputSpec("label", "label", (), classes=8),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 good 1 s 32x32 clips, one corrupt file and one missing file in a jsonl manifest."""
    root = tmp_path_factory.mktemp("media")
    manifest = make_manifest(root, 3, seconds=1.0, fps=8, size=32, seed=10)
    (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    with manifest.open("a") as fh:
        fh.write(json.dumps({"path": "corrupt.mp4", "label": 1, "caption": "bad", "split": "train"}) + "\n")
        fh.write(json.dumps({"path": "gone.mp4", "label": 2, "caption": "missing", "split": "train"}) + "\n")
    return root


def run_epoch(loader) -> list[dict]:
    return [batch for batch in loader if batch is not None]


def test_manifest_rows_and_label_forms(folder):
    rows = read_manifest(folder / "manifest.jsonl")
    assert [r["path"] for r in rows] == ["clip_000.mp4", "clip_001.mp4", "clip_002.mp4", "corrupt.mp4", "gone.mp4"]
    assert parse_labels(3) == [3] and parse_labels("3;17") == [3, 17] and parse_labels([4, 5]) == [4, 5]
    assert parse_labels("") == [] and parse_labels(None) == []


def test_written_clip_decodes_to_its_factors(tmp_path):
    f = write_test_clip(tmp_path / "c.mp4", seconds=1.0, fps=8, size=(32, 48), seed=4)
    frames = decode_frames(tmp_path / "c.mp4", 8)
    assert frames.shape == (8, 3, 32, 48)
    shape = (frames.max(1).values - frames.min(1).values) > 0.5
    r, g, b = frames.permute(1, 0, 2, 3)[:, shape].mean(1).tolist()
    hue = math.atan2(math.sqrt(3) * (g - b), 2 * r - g - b) / (2 * math.pi) % 1.0
    assert abs(hue - f.hue) < 0.05  # the shape's colour survives H.264 / yuv420p
    wave = decode_audio(tmp_path / "c.mp4", 16000, 16000)
    assert wave.shape == (16000,)
    spectrum = torch.fft.rfft(wave * torch.hann_window(16000)).abs()
    assert abs(float(spectrum.argmax()) / f.pitch_hz - 1) < 0.15  # 1 Hz bins; glide spreads the peak


def test_eval_items_have_declared_shapes(folder):
    ds = MediaDataset(folder / "manifest.jsonl", INPUTS, train=False)
    item = ds[0]
    assert {k: tuple(v.shape) for k, v in item.items()} == {"video": (3, 4, 32, 32), "audio": (64, 32),
                                                            "text": (96,), "label": ()}
    row = read_manifest(folder / "manifest.jsonl")[0]
    assert int(item["label"]) == row["label"]
    assert abs(float(item["video"].mean())) < 1.0
    assert torch.equal(ds[0]["audio"], item["audio"])  # no augmentation in eval


def test_train_mode_augments_and_eval_does_not(folder):
    manifest = folder / "manifest.jsonl"
    plain = MediaDataset(manifest, INPUTS, train=False)[1]
    train = MediaDataset(manifest, INPUTS, train=True)
    torch.manual_seed(0)
    draws = [train[1] for _ in range(4)]
    for draw in draws:
        changed = draw["audio"] != plain["audio"]
        assert (draw["audio"][changed] == 0).all()  # SpecAugment only sets cells to the mean
    assert any((draw["audio"] != plain["audio"]).any() for draw in draws)
    assert all(not torch.equal(draw["video"], plain["video"]) for draw in draws)  # random crop


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_are_skipped_and_counted(folder, workers):
    ds = MediaDataset(folder / "manifest.jsonl", INPUTS, train=False)
    assert len(ds) == 5
    loader = make_loader(ds, batch_size=2, shuffle=False, workers=workers)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = run_epoch(loader)
    assert sum(len(b["label"]) for b in batches) == 3
    assert ds.skipped == 2
    if workers == 0:
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 2 and any("corrupt.mp4" in m for m in messages)
    batches = run_epoch(loader)  # a second epoch counts the same bad rows once
    assert sum(len(b["label"]) for b in batches) == 3
    assert ds.skipped == 2


def test_csv_manifest_split_filter_and_multilabel(tmp_path):
    make_manifest(tmp_path, 2, seed=3, multilabel=True)
    rows = read_manifest(tmp_path / "manifest.jsonl")
    with (tmp_path / "m.csv").open("w") as fh:
        fh.write("path,label,caption,split\n")
        fh.write(f"{rows[0]['path']},{';'.join(map(str, rows[0]['label']))},x,train\n")
        fh.write(f"{rows[1]['path']},{';'.join(map(str, rows[1]['label']))},y,val\n")
    spec = [InputSpec("tags", "multilabel", (8,)), InputSpec("w", "waveform", (4000,), sample_rate=8000)]
    ds = MediaDataset(tmp_path / "m.csv", spec, split="val", train=False)
    assert len(ds) == 1
    item = ds[0]
    assert item["tags"].nonzero()[:, 0].tolist() == rows[1]["label"] and item["tags"].sum() == 2
    assert item["w"].shape == (4000,) and item["w"].abs().max() > 0.001
    with pytest.raises(ValueError, match=".csv or .jsonl"):
        MediaDataset(tmp_path / "m.txt", spec)
