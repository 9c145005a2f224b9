"""The synthetic audio-visual data set and the loaders."""
import math

import pytest
import torch

from avdsl.runtime import audio
from avdsl.runtime.contracts import InputSpec
from avdsl.runtime.data.frames import denormalise_frames
from avdsl.runtime.data.loader import collate_skip_none, make_loader
from avdsl.runtime.data.synthetic import HUE_RANGE, SyntheticAV

RATE = 16000
ALL_KINDS = [
    InputSpec("video", "video", (3, 4, 32, 48)),
    InputSpec("image", "image", (3, 24, 24)),
    InputSpec("audio", "fbank", (100, 32)),
    InputSpec("wave", "waveform", (8000,), sample_rate=8000),
    InputSpec("text", "text", (96,)),
    InputSpec("label", "label", (), classes=6),
    InputSpec("tags", "multilabel", (10,), classes=10),
]


def hue_of(video: torch.Tensor) -> float:
    """Hue in [0, 1) of the saturated (shape) pixels of a normalised video."""
    frames = denormalise_frames(video)
    hi, lo = frames.max(1).values, frames.min(1).values
    rgb = frames.permute(1, 0, 2, 3)[:, (hi - lo) > 0.5].mean(1)
    r, g, b = rgb.tolist()
    top, bottom = max(r, g, b), min(r, g, b)
    if top == r:
        h = ((g - b) / (top - bottom)) % 6
    elif top == g:
        h = (b - r) / (top - bottom) + 2
    else:
        h = (r - g) / (top - bottom) + 4
    return h / 6


def shape_area(video: torch.Tensor) -> float:
    frames = denormalise_frames(video)
    return float(((frames.max(1).values - frames.min(1).values) > 0.5).float().mean())


def peak_hz(wave: torch.Tensor, rate: int) -> float:
    spectrum = torch.fft.rfft(wave * torch.hann_window(len(wave))).abs()
    return float(spectrum.argmax()) * rate / len(wave)


def corr(a, b) -> float:
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_items_have_declared_shapes_and_dtypes():
    item = SyntheticAV(ALL_KINDS, size=4)[1]
    assert set(item) == {s.name for s in ALL_KINDS}
    for spec in ALL_KINDS:
        assert tuple(item[spec.name].shape) == spec.shape, spec.name
    assert item["text"].dtype == item["label"].dtype == torch.long
    for name in ("video", "image", "audio", "wave", "tags"):
        assert item[name].dtype == torch.float32
    assert 0 <= int(item["label"]) < 6
    assert item["wave"].abs().max() <= 1.0


def test_same_seed_and_index_repeat_and_splits_differ():
    a, b = SyntheticAV(ALL_KINDS, 8, seed=5), SyntheticAV(ALL_KINDS, 8, seed=5)
    for i in (0, 7):
        x, y = a[i], b[i]
        assert all(torch.equal(x[k], y[k]) for k in x)
    others = [SyntheticAV(ALL_KINDS, 8, seed=5, split="val"), SyntheticAV(ALL_KINDS, 8, seed=6)]
    for other in others:
        assert not torch.equal(a[3]["video"], other[3]["video"])
    assert not torch.equal(a[3]["audio"], a[4]["audio"])
    seeds = [{SyntheticAV([], 1000, seed=5, split=sp).item_seed(i) for i in range(1000)}
             for sp in ("train", "val", "test")]
    assert all(len(s) == 1000 for s in seeds) and not (seeds[0] & seeds[1] or seeds[0] & seeds[2] or seeds[1] & seeds[2])
    assert all(0 <= s < 2**32 for s in seeds[2])  # torch's CPU generator keeps only 32 bits


def test_video_is_roughly_normalised_and_image_is_the_middle_frame():
    spec = [InputSpec("v", "video", (3, 3, 32, 32)), InputSpec("i", "image", (3, 32, 32))]
    ds = SyntheticAV(spec, 16)
    videos = torch.stack([ds[i]["v"] for i in range(16)])
    assert abs(float(videos.mean())) < 0.3
    assert 0.6 < float(videos.std()) < 1.4
    # with 3 frames the middle one is rendered at the clip's middle, as the image is (noise differs)
    item = ds[0]
    assert float((item["v"][:, 1] - item["i"]).abs().mean()) < 0.3


def test_hue_follows_pitch_and_size_follows_loudness():
    """One class (all disks, one pitch band over the whole range) isolates the continuous factors."""
    spec = [InputSpec("v", "video", (3, 2, 48, 48)), InputSpec("w", "waveform", (RATE,), sample_rate=RATE),
            InputSpec("y", "label", (), classes=1)]
    ds = SyntheticAV(spec, 40, seed=1)
    hues, pitches, areas, levels = [], [], [], []
    for i in range(40):
        item = ds[i]
        hues.append(hue_of(item["v"]))
        pitches.append(math.log2(peak_hz(item["w"], RATE)))
        areas.append(math.log(shape_area(item["v"])))
        levels.append(math.log(float(item["w"].pow(2).mean().sqrt())))
    assert corr(hues, pitches) > 0.95
    assert corr(areas, levels) > 0.9
    # estimates match the hidden factors too
    truth = [ds.describe(i)["hue"] for i in range(40)]
    assert max(abs(h - t) for h, t in zip(hues, truth)) < 0.03
    assert max(truth) < HUE_RANGE


def test_class_sets_shape_and_pitch_band():
    spec = [InputSpec("w", "waveform", (RATE,), sample_rate=RATE), InputSpec("y", "label", (), classes=8)]
    ds = SyntheticAV(spec, 32, seed=2)
    hits = 0
    for i in range(32):
        item, info = ds[i], ds.describe(i)
        assert int(item["y"]) == info["cls"]
        assert info["shape"] == ("disk", "square", "ring", "hbar", "vbar", "diamond", "cross", "frame")[info["cls"]]
        lo, hi = info["pitch_band"]
        f = peak_hz(item["w"], RATE)
        hits += lo * 0.9 < f < hi * 1.1
    assert hits >= 30  # a glide may carry the peak a little past the band's edge


def test_clips_of_one_class_differ_in_every_continuous_factor():
    ds = SyntheticAV([InputSpec("y", "label", (), classes=2)], 200)
    infos = [ds.describe(i) for i in range(200) if ds.describe(i)["cls"] == 0]
    for factor in ("hue", "size", "speed", "direction", "phase", "noise"):
        values = [info[factor] for info in infos]
        assert max(values) - min(values) > 0.5, factor


def test_text_multilabel_and_fbank_come_from_the_same_clip():
    from avdsl.runtime.text import ByteTokenizer

    samples = audio.samples_for_frames(100, RATE)
    spec = [InputSpec("t", "text", (128,)), InputSpec("m", "multilabel", (10,)),
            InputSpec("a", "fbank", (100, 32)), InputSpec("w", "waveform", (samples,))]
    ds = SyntheticAV(spec, 4, seed=3)
    item, info = ds[2], ds.describe(2)
    assert ByteTokenizer().decode(item["t"]) == info["caption"]
    assert info["colour"] in info["caption"] and "moves" in info["caption"]
    assert item["m"].sum() == 2 and item["m"][info["cls"]] == 1
    torch.testing.assert_close(item["a"], audio.fbank(item["w"], RATE, 32, frames=100))


def test_bad_declarations_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="3 channels"):
        SyntheticAV([InputSpec("v", "video", (1, 4, 8, 8))], 2)
    with pytest.raises(ValueError, match="needs 2 dims"):
        SyntheticAV([InputSpec("a", "fbank", (100,))], 2)
    with pytest.raises(ValueError, match="unknown kind"):
        SyntheticAV([InputSpec("x", "depth", (4,))], 2)
    with pytest.raises(ValueError, match="split"):
        SyntheticAV([], 2, split="dev")
    with pytest.raises(IndexError):
        SyntheticAV([], 2)[2]


def test_loader_batches_and_seeded_order():
    spec = [InputSpec("a", "fbank", (20, 16)), InputSpec("y", "label", (), classes=8)]
    ds = SyntheticAV(spec, 10)
    batches = list(make_loader(ds, 4, shuffle=True, seed=1, drop_last=True))
    assert len(batches) == 2 and batches[0]["a"].shape == (4, 20, 16)
    again = [b["y"] for b in make_loader(ds, 4, shuffle=True, seed=1, drop_last=True)]
    assert all(torch.equal(b["y"], y) for b, y in zip(batches, again))
    plain = torch.stack([ds[i]["y"] for i in range(10)])
    assert not torch.equal(torch.cat([b["y"] for b in make_loader(ds, 10, shuffle=True, seed=1)]), plain)


def test_collate_skip_none_drops_bad_items():
    x = {"a": torch.ones(2)}
    batch = collate_skip_none([x, None, x])
    assert batch["a"].shape == (2, 2)
    assert collate_skip_none([None, None]) is None
