"""Real media: a data set over video files with sound, listed in a manifest, decoded with PyAV.

Manifest (``.csv`` with a header, or ``.jsonl`` with one object a line), one row per clip:

* ``path``: the video file, relative to the manifest's folder (or to ``root`` when given);
* ``label``: an int, or for multilabel a list of ints or a ``;``-separated string (``"3;17"``);
* ``caption``: free text (used by text inputs);
* ``split``: ``train`` / ``val`` / ``test``; rows without one count as ``train``.

Decoding, per declared input:

* video / image: T frames at the middle of T equal slices of the clip (one, at the middle, for an
  image), cropped to the declared aspect ratio and resized to H x W (a random 50-100 % crop and a
  random left-right flip when ``train``, the centre crop otherwise), normalised like the synthetic
  frames (:mod:`avdsl.runtime.data.frames`);
* fbank / waveform: the first audio stream, mixed to mono, resampled to the input's sample rate
  (16 kHz when not declared), cut or zero-padded from the start to the declared length (for fbank,
  the samples that give exactly T frames), then :func:`avdsl.runtime.audio.fbank`, plus
  :func:`avdsl.runtime.audio.spec_augment` when ``train``;
* text: the caption through ``ByteTokenizer``; label / multilabel: from ``label``.

Bad files. A missing, corrupt or unreadable file (or one lacking a stream the inputs need) never
raises: ``__getitem__`` returns None, warns once for that file, and marks the row bad in a
boolean tensor kept in shared memory. DataLoader workers (forked or spawned) write into that same
memory, so ``dataset.skipped``, the number of distinct rows found bad so far, is right in the main
process whatever the number of workers, and a bad row read again in a later epoch is not counted
twice. Pair the data set with :func:`avdsl.runtime.data.loader.collate_skip_none`, which drops the
Nones from a batch.
"""
from __future__ import annotations

import csv
import json
import os
import stat
import warnings
from pathlib import Path

import av
import numpy as np
import torch
from torch.utils.data import Dataset

from avdsl.runtime import audio
from avdsl.runtime.contracts import InputSpec
from avdsl.runtime.data.frames import crop_resize, normalise_frames
from avdsl.runtime.data.synthetic import (
    DEFAULT_SAMPLE_RATE,
    ClipFactors,
    audio_samples,
    check_input,
    multi_hot,
    render_frames,
    render_waveform,
    sample_factors,
)


class MediaError(ValueError):
    """A file that decodes but cannot give what the inputs need (no stream, no frames)."""


# What a bad file raises while it is opened or decoded (PyAV's errors also subclass OSError or
# ValueError); anything else is a bug and is left to surface.
BAD_FILE_ERRORS = (av.error.FFmpegError, OSError, ValueError, EOFError)


class ManifestError(ValueError):
    """A manifest that cannot be used (not a regular file, too big, a malformed row); ``line`` is
    the 1-based line of the problem (0 when it concerns the whole file)."""

    def __init__(self, message: str, line: int = 0):
        super().__init__(message)
        self.line = line


def _manifest_text(manifest: Path) -> str:
    from avdsl.limits import MAX_MANIFEST_BYTES
    from avdsl.loader import read_bounded

    try:
        raw = read_bounded(manifest, MAX_MANIFEST_BYTES, "manifest file")
    except OSError as err:
        raise ManifestError(f"cannot read the manifest: {err.strerror or err}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ManifestError("the manifest is not UTF-8 text", raw[: err.start].count(b"\n") + 1) from None


def manifest_rows(manifest: str | Path) -> list[tuple[int, dict]]:
    """(line, row) for each row of a ``.csv`` (with header) or ``.jsonl`` manifest. Only a regular file
    of at most MAX_MANIFEST_BYTES is read; a row that is not an object, or has no ``path`` string,
    raises ManifestError at its line."""
    from avdsl.limits import MAX_MANIFEST_ROWS

    manifest = Path(manifest)
    if manifest.suffix not in (".jsonl", ".csv"):
        raise ManifestError(f"manifest must end in .csv or .jsonl, got {manifest.name!r}")
    text = _manifest_text(manifest)
    rows: list[tuple[int, dict]] = []
    if manifest.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise ManifestError(f"line {number} is not JSON ({err})", number) from None
            rows.append((number, row))
    else:
        reader = csv.DictReader(text.splitlines())
        try:
            for row in reader:
                rows.append((reader.line_num, row))
        except csv.Error as err:
            raise ManifestError(f"malformed CSV: {err}", reader.line_num) from None
    for number, row in rows:
        if not isinstance(row, dict):
            raise ManifestError(f"row {number} is {type(row).__name__}, not an object with a `path`", number)
        if not isinstance(row.get("path"), str) or not row["path"].strip():
            raise ManifestError(f"row {number} has no `path` (the media file, relative to the manifest)", number)
        if len(rows) > MAX_MANIFEST_ROWS:
            raise ManifestError(f"more than {MAX_MANIFEST_ROWS} rows", number)
    return rows


def read_manifest(manifest: str | Path) -> list[dict]:
    """Rows of a ``.csv`` (with header) or ``.jsonl`` manifest, as dicts (see `manifest_rows`)."""
    return [row for _, row in manifest_rows(manifest)]


def parse_labels(value) -> list[int]:
    """``3``, ``"3"``, ``[3, 17]`` or ``"3;17"`` -> ``[3]`` / ``[3, 17]``; empty -> ``[]``."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(part) for part in str(value).split(";") if part.strip()]


def _check_labels(row: dict, number: int, inputs: list[InputSpec]) -> None:
    """A row's labels must be whole numbers within the classes of every label input."""
    for spec in inputs:
        if spec.kind not in ("label", "multilabel"):
            continue
        try:
            labels = parse_labels(row.get("label"))
        except (TypeError, ValueError):
            raise ManifestError(f"row {number}: label {str(row.get('label'))[:40]!r} is not a class number "
                                "(or a list of them)", number) from None
        classes = spec.classes or (spec.shape[0] if spec.kind == "multilabel" else None)
        bad = [v for v in labels if v < 0 or (classes is not None and v >= classes)]
        if bad:
            raise ManifestError(f"row {number}: label {bad[0]} is outside the {classes} classes of "
                                f"'{spec.name}' (0..{(classes or 1) - 1})", number)
        if spec.kind == "label" and not labels:
            raise ManifestError(f"row {number} has no `label` for '{spec.name}'", number)


def decode_frames(path: Path, count: int) -> torch.Tensor:
    """``count`` frames spread evenly over the clip -> float ``[count, 3, H, W]`` in [0, 1].

    Frames are decoded in order and the first frame at or after each target time (the middle of
    each of ``count`` equal slices, less half a frame) is kept; decoding stops at the last target.
    A stream that ends early repeats its last frame.
    """
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise MediaError("no video stream")
        stream = container.streams.video[0]
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            raise MediaError("unknown duration")
        rate = float(stream.average_rate or 25)
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        targets = [start + (k + 0.5) * duration / count - 0.5 / rate for k in range(count)]
        picked: list[np.ndarray] = []
        for index, frame in enumerate(container.decode(stream)):
            time = frame.time if frame.time is not None else index / rate
            while len(picked) < count and time >= targets[len(picked)]:
                picked.append(frame.to_ndarray(format="rgb24"))
            if len(picked) == count:
                break
    if not picked:
        raise MediaError("no video frames")
    picked += [picked[-1]] * (count - len(picked))
    frames = torch.from_numpy(np.stack(picked)).permute(0, 3, 1, 2)
    return frames.to(torch.float32) / 255.0


def decode_audio(path: Path, sample_rate: int, num_samples: int) -> torch.Tensor:
    """The first ``num_samples`` of the first audio stream, mono, at ``sample_rate`` -> ``[num_samples]``.

    Shorter audio is zero-padded at the end.
    """
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise MediaError("no audio stream")
        stream = container.streams.audio[0]
        native = stream.rate or sample_rate
        needed = int(num_samples * native / sample_rate) + native // 10  # a little spare for resampling
        mono = av.AudioResampler(format="fltp", layout="mono", rate=native)
        chunks, have = [], 0
        for frame in container.decode(stream):
            for out in mono.resample(frame):
                chunks.append(out.to_ndarray()[0])
                have += chunks[-1].shape[0]
            if have >= needed:
                break
        else:
            chunks += [out.to_ndarray()[0] for out in mono.resample(None)]
    wave = torch.from_numpy(np.concatenate(chunks)) if chunks else torch.zeros(0)
    wave = audio.resample(wave.to(torch.float32), native, sample_rate)[:num_samples]
    return torch.nn.functional.pad(wave, (0, num_samples - wave.shape[0])).clamp(-1.0, 1.0)


class MediaDataset(Dataset):
    """Clips of one split of a manifest; item i is ``{input name: tensor}``, or None for a bad file."""

    def __init__(
        self,
        manifest: str | Path,
        inputs: list[InputSpec],
        split: str = "train",
        train: bool = True,
        root: str | Path | None = None,
    ):
        for spec in inputs:
            check_input(spec)
        self.inputs = list(inputs)
        self.split = split
        self.train = train
        self.root = Path(root) if root is not None else Path(manifest).parent
        found = [(n, row) for n, row in manifest_rows(manifest) if (row.get("split") or "train") == split]
        if not found:
            raise ManifestError(f"the manifest has no rows of split '{split}'" +
                                (" (rows without `split` count as train)" if split != "train" else ""))
        for number, row in found:
            _check_labels(row, number, self.inputs)
        self.rows = [row for _, row in found]
        self._bad = torch.zeros(len(self.rows), dtype=torch.bool).share_memory_()
        self.tokenizer = None
        if any(s.kind == "text" for s in self.inputs):
            from avdsl.runtime.text import ByteTokenizer

            self.tokenizer = ByteTokenizer()

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def skipped(self) -> int:
        """Distinct rows found bad so far, in this process and in every DataLoader worker."""
        return int(self._bad.sum())

    def path(self, i: int) -> Path:
        return self.root / self.rows[i]["path"]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor] | None:
        path = self.path(i)
        try:
            return self._load(self.rows[i], path)
        except BAD_FILE_ERRORS as err:
            if not bool(self._bad[i]):
                self._bad[i] = True
                warnings.warn(f"skipping unreadable media file {path}: {type(err).__name__}: {err}",
                              RuntimeWarning, stacklevel=2)
            return None

    def _load(self, row: dict, path: Path) -> dict[str, torch.Tensor]:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block or never end
            raise MediaError("not a regular file")
        item = {}
        for spec in self.inputs:
            if spec.kind in ("video", "image"):
                count = spec.shape[1] if spec.kind == "video" else 1
                frames = crop_resize(decode_frames(path, count), spec.shape[-2], spec.shape[-1], self.train)
                video = normalise_frames(frames)
                item[spec.name] = video if spec.kind == "video" else video[:, 0]
            elif spec.kind in ("fbank", "waveform"):
                rate = spec.sample_rate or DEFAULT_SAMPLE_RATE
                wave = decode_audio(path, rate, audio_samples(spec))
                if spec.kind == "waveform":
                    item[spec.name] = wave
                else:
                    feats = audio.fbank(wave, rate, num_mel_bins=spec.shape[1], frames=spec.shape[0])
                    item[spec.name] = audio.spec_augment(feats) if self.train else feats
            elif spec.kind == "text":
                item[spec.name] = self.tokenizer.encode(str(row.get("caption") or ""), spec.shape[0])
            elif spec.kind == "label":
                labels = parse_labels(row.get("label"))
                if not labels:
                    raise MediaError("row has no label")
                item[spec.name] = torch.tensor(labels[0], dtype=torch.long)
            else:  # multilabel
                target = torch.zeros(spec.shape[0], dtype=torch.float32)
                target[parse_labels(row.get("label"))] = 1.0
                item[spec.name] = target
        return item


def pick_video_codec() -> str:
    """H.264 (libx264) when PyAV's FFmpeg can encode it, else MPEG-4 part 2."""
    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except (av.error.FFmpegError, ValueError):
            continue
    raise RuntimeError("PyAV's FFmpeg has neither a libx264 nor an mpeg4 encoder")


def write_test_clip(
    path: str | Path,
    seconds: float = 1.0,
    fps: int = 8,
    size: int | tuple[int, int] = 32,
    sample_rate: int = 16000,
    seed: int = 0,
    classes: int = 8,
    codec: str | None = None,
) -> ClipFactors:
    """Write a small real video file of one synthetic clip; return its factors.

    The picture and the sound come from the same factors as :class:`SyntheticAV` items (a moving
    coloured shape and a matching pulsing tone), so a model can learn from these files too. Video is
    H.264 (or MPEG-4 part 2) in yuv420p, sound is mono AAC; size is ``H`` or ``(H, W)``, both even.
    """
    height, width = (size, size) if isinstance(size, int) else size
    generator = torch.Generator().manual_seed(seed)
    f = sample_factors(generator, classes)
    count = max(1, round(seconds * fps))
    frames = render_frames(f, torch.arange(count) / fps, seconds, height, width, generator)
    pixels = (frames.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    wave = render_waveform(f, round(seconds * sample_rate), sample_rate, seconds, generator).numpy()

    with av.open(str(path), mode="w") as container:
        video = container.add_stream(codec or pick_video_codec(), rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        if video.codec_context.name == "libx264":
            video.options = {"crf": "12", "preset": "veryfast"}
        else:
            video.bit_rate = 2_000_000
        sound = container.add_stream("aac", rate=sample_rate, layout="mono")
        for image in pixels:
            container.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(video.encode(None))
        step = sound.codec_context.frame_size or 1024
        for start in range(0, len(wave), step):
            chunk = np.zeros((1, step), dtype=np.float32)
            piece = wave[start : start + step]
            chunk[0, : len(piece)] = piece
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = sample_rate, start
            container.mux(sound.encode(frame))
        container.mux(sound.encode(None))
    return f


def make_manifest(
    folder: str | Path,
    n: int,
    seconds: float = 1.0,
    fps: int = 8,
    size: int | tuple[int, int] = 32,
    sample_rate: int = 16000,
    seed: int = 0,
    classes: int = 8,
    split: str = "train",
    multilabel: bool = False,
) -> Path:
    """Write ``n`` clips ``clip_000.mp4``... and ``manifest.jsonl`` into ``folder``; return the manifest.

    Clip k uses seed ``seed + k``. ``label`` is the class, or with ``multilabel`` the list of the class
    and the colour-derived second class (as :func:`avdsl.runtime.data.synthetic.multi_hot` marks).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.jsonl"
    with manifest.open("w") as fh:
        for k in range(n):
            name = f"clip_{k:03d}.mp4"
            f = write_test_clip(folder / name, seconds, fps, size, sample_rate, seed + k, classes)
            label = multi_hot(f, classes).nonzero()[:, 0].tolist() if multilabel else f.cls
            row = {"path": name, "label": label, "caption": f.caption(), "split": split}
            fh.write(json.dumps(row) + "\n")
    return manifest

