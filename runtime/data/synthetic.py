"""An embedded synthetic audio-visual data set with real cross-modal structure.

Each clip is drawn from a handful of hidden factors, and every factor shows in the picture AND in
the sound, so contrastive, masked and classification objectives all have something to learn, and
retrieval can beat chance far beyond the class level.

Factors of one clip (see :class:`ClipFactors`):

=============  =====================================  ===========================================
factor         video                                  audio
=============  =====================================  ===========================================
class c        shape type (disk, square, ring, wide   pitch band (K log-spaced bands over
               bar, tall bar, diamond, cross, frame;  150 Hz - 4 kHz, one per class) and timbre
               cycling when K > 8)                    (1, 2 or 3 harmonics, cycling with c)
hue            colour of the shape (hue in [0, 0.8)   pitch within the class's band (low hue ->
               of the colour wheel: red to purple)    low end of the band)
size           radius of the shape                    loudness (-30 dB to -6 dB peak)
speed          distance travelled over the clip       beat rate (1 to 4 pulses per second)
direction      direction of motion                    pitch glide: moving right rises, moving
                                                      left falls (up to 0.3 octave over the clip)
phase          where along its path the shape starts  when the first beat falls in a beat period
noise          pixel noise of the background          level of the background hiss
=============  =====================================  ===========================================

The background is the same for every clip, a grey ramp from dark (top) to light (bottom), so that
normalised frames have roughly zero mean and unit std, as real frames do.

A clip lasts ``duration`` seconds: the length of the longest declared audio input (fbank frames at a
10 ms shift, or waveform samples), or 4 s when there is none. Video frames are sampled at the
middle of T equal slices of the clip; an image input is the frame at the clip's middle. Text is a
caption naming the factors in words ("a small red disk moves left quickly to a fast high falling
beat"); label is c; multilabel marks c and a second class derived from the colour name.

Items are deterministic functions of (seed, split, index): each item seeds its own
``torch.Generator``. Torch's CPU generator (a Mersenne Twister) keeps only the low 32 bits of a seed,
so the item seed is built within 32 bits: ``(split number << 30 | index) + seed * 0x9E3779B1`` modulo
2**32. For one ``seed`` this is one-to-one, so the train, val and test splits never share an item
seed; a different ``seed`` shifts the whole set by a golden-ratio stride.
Video is rendered with torch ops directly at the declared size, and fbank inputs go through
:func:`avdsl.runtime.audio.fbank`, the same feature path as decoded media.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch.utils.data import Dataset

from avdsl.runtime import audio
from avdsl.runtime.contracts import INPUT_KINDS, InputSpec
from avdsl.runtime.data.frames import normalise_frames

SPLITS = ("train", "val", "test")
SHAPES = ("disk", "square", "ring", "hbar", "vbar", "diamond", "cross", "frame")
SHAPE_WORDS = {"hbar": "wide bar", "vbar": "tall bar"}
COLOURS = ((0.0, "red"), (0.08, "orange"), (0.16, "yellow"), (0.33, "green"), (0.5, "cyan"),
           (0.66, "blue"), (0.78, "purple"))
DEFAULT_CLASSES = 8
DEFAULT_SAMPLE_RATE = 16000
DEFAULT_DURATION = 4.0  # seconds, when no audio input fixes it
HUE_RANGE = 0.8  # hues stay below purple so that hue -> pitch has no wrap-around
LOW_HZ, HIGH_HZ = 150.0, 4000.0
BACKGROUND = (0.1, 0.8)  # grey level of the background's top and bottom rows


@dataclass(frozen=True)
class ClipFactors:
    """The hidden factors of one clip; all continuous ones lie in [0, 1) except the noted ranges."""

    cls: int
    classes: int
    hue: float  # [0, HUE_RANGE)
    size: float
    speed: float
    direction: float  # radians, [0, 2 pi); 0 = right, pi/2 = down (image rows grow downwards)
    phase: float
    noise: float

    @property
    def shape(self) -> str:
        return SHAPES[self.cls % len(SHAPES)]

    @property
    def harmonics(self) -> int:
        return 1 + self.cls % 3

    @property
    def pitch_band(self) -> tuple[float, float]:
        """The class's band of fundamental frequencies in Hz (log-spaced bands, one per class)."""
        octaves = math.log2(HIGH_HZ / LOW_HZ) / self.classes
        lo = LOW_HZ * 2 ** (self.cls * octaves)
        return lo, lo * 2**octaves

    @property
    def pitch_hz(self) -> float:
        """Fundamental at the middle of the clip: the hue's place within the class's band."""
        lo, hi = self.pitch_band
        return lo * (hi / lo) ** (self.hue / HUE_RANGE)

    @property
    def glide_octaves(self) -> float:
        """Pitch change over the whole clip; follows the horizontal part of the motion."""
        return 0.3 * math.cos(self.direction)

    @property
    def amplitude(self) -> float:
        """Peak amplitude of the tone: -30 dB for the smallest shape to -6 dB for the largest."""
        return 10 ** ((-30.0 + 24.0 * self.size) / 20.0)

    @property
    def beat_rate(self) -> float:
        """Beats per second."""
        return 1.0 + 3.0 * self.speed

    @property
    def radius(self) -> float:
        """Shape radius in units of half the frame's shorter side."""
        return 0.15 + 0.2 * self.size

    @property
    def travel(self) -> float:
        """Distance the shape covers over the clip, in units of half the frame's shorter side."""
        return 0.3 + 1.2 * self.speed

    @property
    def colour(self) -> str:
        return min(COLOURS, key=lambda hc: abs(hc[0] - self.hue))[1]

    @property
    def colour_index(self) -> int:
        return [name for _, name in COLOURS].index(self.colour)

    def caption(self) -> str:
        """The clip in words, e.g. 'a small red disk moves left quickly to a fast high falling beat'."""
        size = ("small", "medium", "large")[min(2, int(self.size * 3))]
        dx, dy = math.cos(self.direction), math.sin(self.direction)
        if abs(dx) >= abs(dy):
            way = "right" if dx > 0 else "left"
        else:
            way = "down" if dy > 0 else "up"
        pace, tempo = ("slowly", "slow") if self.speed < 0.5 else ("quickly", "fast")
        place = math.log2(self.pitch_hz / LOW_HZ) / math.log2(HIGH_HZ / LOW_HZ)
        pitch = ("low", "middle", "high")[min(2, int(place * 3))]
        glide = "rising " if dx > 0.5 else "falling " if dx < -0.5 else ""
        shape = SHAPE_WORDS.get(self.shape, self.shape)
        return f"a {size} {self.colour} {shape} moves {way} {pace} to a {tempo} {pitch} {glide}beat"

    def describe(self) -> dict:
        """Every factor and every derived quantity, as plain numbers and strings."""
        out = asdict(self)
        for name in ("shape", "harmonics", "pitch_band", "pitch_hz", "glide_octaves", "amplitude",
                     "beat_rate", "radius", "travel", "colour"):
            out[name] = getattr(self, name)
        out["caption"] = self.caption()
        return out


def sample_factors(generator: torch.Generator, classes: int) -> ClipFactors:
    """Draw one clip's factors: a uniform class and uniform continuous factors."""
    cls = int(torch.randint(0, classes, (), generator=generator))
    u = torch.rand(6, generator=generator, dtype=torch.float64).tolist()
    return ClipFactors(cls=cls, classes=classes, hue=HUE_RANGE * u[0], size=u[1], speed=u[2],
                       direction=2 * math.pi * u[3], phase=u[4], noise=u[5])


def hue_to_rgb(hue: float) -> tuple[float, float, float]:
    """Fully saturated colour of a hue in [0, 1) (HSV with S = 1, V = 0.95)."""
    h6 = hue * 6.0
    r = min(1.0, max(0.0, abs(h6 - 3.0) - 1.0))
    g = min(1.0, max(0.0, 2.0 - abs(h6 - 2.0)))
    b = min(1.0, max(0.0, 2.0 - abs(h6 - 4.0)))
    return 0.95 * r, 0.95 * g, 0.95 * b


def _reflect(x: torch.Tensor, limit: float) -> torch.Tensor:
    """Fold positions into [-limit, limit] as if bouncing off walls."""
    if limit <= 0:
        return torch.zeros_like(x)
    y = torch.remainder(x + limit, 4 * limit)
    return torch.where(y > 2 * limit, 4 * limit - y, y) - limit


def _signed_distance(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: float) -> torch.Tensor:
    """Positive inside the shape, in the same units as dx, dy."""
    ax, ay = dx.abs(), dy.abs()
    if shape == "disk":
        return r - torch.sqrt(dx * dx + dy * dy)
    if shape == "square":
        return 0.85 * r - torch.maximum(ax, ay)
    if shape == "ring":
        return 0.3 * r - (torch.sqrt(dx * dx + dy * dy) - 0.7 * r).abs()
    if shape == "hbar":
        return torch.minimum(r - ax, 0.35 * r - ay)
    if shape == "vbar":
        return torch.minimum(0.35 * r - ax, r - ay)
    if shape == "diamond":
        return r - (ax + ay)
    if shape == "cross":
        return torch.maximum(torch.minimum(r - ax, 0.3 * r - ay), torch.minimum(0.3 * r - ax, r - ay))
    if shape == "frame":
        box = torch.maximum(ax, ay)
        return torch.minimum(0.85 * r - box, box - 0.55 * r)
    raise ValueError(f"unknown shape {shape!r}")


def render_frames(
    f: ClipFactors,
    times: torch.Tensor,
    duration: float,
    height: int,
    width: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Frames of the clip at ``times`` (seconds) -> float ``[T, 3, height, width]`` in [0, 1]."""
    scale = min(height, width) / 2.0  # pixels per unit
    xs = (torch.arange(width, dtype=torch.float32) + 0.5 - width / 2.0) / scale
    ys = (torch.arange(height, dtype=torch.float32) + 0.5 - height / 2.0) / scale
    r = f.radius
    ux, uy = math.cos(f.direction), math.sin(f.direction)
    progress = (times.to(torch.float32) / duration).view(-1, 1, 1)
    limit_x, limit_y = width / scale / 2.0 - r, height / scale / 2.0 - r
    start = (2.0 * f.phase - 1.0) * 0.5
    cx = _reflect(start * limit_x * ux + f.travel * ux * progress, limit_x)
    cy = _reflect(start * limit_y * uy + f.travel * uy * progress, limit_y)
    dx = xs.view(1, 1, -1) - cx
    dy = ys.view(1, -1, 1) - cy
    inside = (_signed_distance(f.shape, dx, dy, r) * scale + 0.5).clamp(0.0, 1.0)  # [T, H, W]
    colour = torch.tensor(hue_to_rgb(f.hue), dtype=torch.float32).view(1, 3, 1, 1)
    grain = torch.randn(len(times), 1, height, width, generator=generator) * (0.02 + 0.1 * f.noise)
    top, bottom = BACKGROUND
    shade = top + (bottom - top) * (torch.arange(height, dtype=torch.float32) + 0.5) / height
    background = shade.view(1, 1, -1, 1) + grain
    mask = inside.unsqueeze(1)
    return (background * (1 - mask) + colour * mask).clamp(0.0, 1.0)


def render_waveform(
    f: ClipFactors,
    num_samples: int,
    sample_rate: int,
    duration: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """The clip's sound, ``[num_samples]`` in [-1, 1]: a pulsing, gliding harmonic tone plus hiss."""
    t = torch.arange(num_samples, dtype=torch.float64) / sample_rate
    freq = f.pitch_hz * torch.pow(2.0, f.glide_octaves * (t / duration - 0.5))
    # Accumulate the phase in float64 (it reaches ~1e5 rad), then work in float32 for speed.
    phase = torch.remainder(2 * math.pi * torch.cumsum(freq, 0) / sample_rate, 2 * math.pi).float()
    tone = torch.zeros(num_samples)
    weight = 0.0
    for h in range(1, f.harmonics + 1):
        if h * f.pitch_hz * 2 ** (abs(f.glide_octaves) / 2) < sample_rate / 2:  # no aliasing
            tone += torch.sin(h * phase) / h
            weight += 1.0 / h
    tone /= max(weight, 1e-9)
    period = 1.0 / f.beat_rate
    since_beat = (torch.remainder(t - f.phase * period, period) / period).float()
    envelope = 0.3 + 0.7 * torch.exp(-since_beat / 0.25)
    hiss = torch.randn(num_samples, generator=generator) * (0.002 + 0.02 * f.noise)
    return (f.amplitude * envelope * tone + hiss).clamp(-1.0, 1.0)


def check_input(spec: InputSpec) -> None:
    """Raise ValueError when a declared input cannot be produced as the contract describes."""
    ranks = {"video": 4, "image": 3, "fbank": 2, "waveform": 1, "text": 1, "label": 0, "multilabel": 1}
    if spec.kind not in INPUT_KINDS:
        raise ValueError(f"input {spec.name!r}: unknown kind {spec.kind!r}, expected one of {INPUT_KINDS}")
    if len(spec.shape) != ranks[spec.kind]:
        raise ValueError(f"input {spec.name!r}: kind {spec.kind} needs {ranks[spec.kind]} dims, got shape {spec.shape}")
    if spec.kind in ("video", "image") and spec.shape[0] != 3:
        raise ValueError(f"input {spec.name!r}: {spec.kind} needs 3 channels first, got shape {spec.shape}")
    if spec.kind == "multilabel" and spec.classes not in (None, spec.shape[0]):
        raise ValueError(f"input {spec.name!r}: classes={spec.classes} but shape {spec.shape}")


def audio_samples(spec: InputSpec) -> int:
    """Waveform samples behind an audio input: fbank frames at a 10 ms shift, or the waveform length."""
    rate = spec.sample_rate or DEFAULT_SAMPLE_RATE
    if spec.kind == "fbank":
        return audio.samples_for_frames(spec.shape[0], rate)
    return spec.shape[0]


def clip_duration(inputs: list[InputSpec]) -> float:
    """Seconds of the longest declared audio input, or DEFAULT_DURATION without audio."""
    durations = [audio_samples(s) / (s.sample_rate or DEFAULT_SAMPLE_RATE)
                 for s in inputs if s.kind in ("fbank", "waveform")]
    return max(durations, default=DEFAULT_DURATION)


def class_count(inputs: list[InputSpec]) -> int:
    """K: the label input's classes, else the multilabel input's, else DEFAULT_CLASSES."""
    for kind in ("label", "multilabel"):
        for s in inputs:
            if s.kind == kind:
                return s.classes or (s.shape[0] if kind == "multilabel" else DEFAULT_CLASSES)
    return DEFAULT_CLASSES


def multi_hot(f: ClipFactors, classes: int) -> torch.Tensor:
    """Targets with the clip's class and a second class picked by its colour name."""
    target = torch.zeros(classes, dtype=torch.float32)
    target[f.cls % classes] = 1.0
    if classes > 1:
        target[(f.cls + 1 + f.colour_index % (classes - 1)) % classes] = 1.0
    return target


class SyntheticAV(Dataset):
    """``size`` synthetic clips; item i is ``{input name: tensor}`` per the declared inputs."""

    def __init__(self, inputs: list[InputSpec], size: int, seed: int = 0, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not 0 <= size <= 2**30:
            raise ValueError(f"size must lie in [0, 2**30], got {size}")
        for spec in inputs:
            check_input(spec)
        self.inputs = list(inputs)
        self.size = size
        self.seed = seed
        self.split = split
        self.classes = class_count(self.inputs)
        self.duration = clip_duration(self.inputs)
        self.tokenizer = None
        if any(s.kind == "text" for s in self.inputs):
            from avdsl.runtime.text import ByteTokenizer

            self.tokenizer = ByteTokenizer()

    def __len__(self) -> int:
        return self.size

    def item_seed(self, i: int) -> int:
        """The 32-bit generator seed of item i (see the module docstring)."""
        return ((SPLITS.index(self.split) << 30 | i) + self.seed * 0x9E3779B1) % 2**32

    def _start(self, i: int) -> tuple[torch.Generator, ClipFactors]:
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.size} items")
        generator = torch.Generator().manual_seed(self.item_seed(i))
        return generator, sample_factors(generator, self.classes)

    def factors(self, i: int) -> ClipFactors:
        return self._start(i)[1]

    def describe(self, i: int) -> dict:
        """The hidden factors of item i (and what they set), for tests and documentation."""
        return self.factors(i).describe()

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        generator, f = self._start(i)
        waves: dict[tuple[int, int], torch.Tensor] = {}  # one sound per (rate, length) for all inputs
        return {spec.name: self._render(spec, f, generator, waves) for spec in self.inputs}

    def _render(
        self, spec: InputSpec, f: ClipFactors, generator: torch.Generator, waves: dict
    ) -> torch.Tensor:
        if spec.kind == "video":
            _, frames, height, width = spec.shape
            times = (torch.arange(frames) + 0.5) * self.duration / frames
            return normalise_frames(render_frames(f, times, self.duration, height, width, generator))
        if spec.kind == "image":
            middle = torch.tensor([self.duration / 2])
            frame = render_frames(f, middle, self.duration, spec.shape[1], spec.shape[2], generator)
            return normalise_frames(frame)[:, 0]
        if spec.kind in ("fbank", "waveform"):
            rate = spec.sample_rate or DEFAULT_SAMPLE_RATE
            key = (rate, audio_samples(spec))
            if key not in waves:
                waves[key] = render_waveform(f, key[1], rate, self.duration, generator)
            wave = waves[key]
            if spec.kind == "waveform":
                return wave
            return audio.fbank(wave, rate, num_mel_bins=spec.shape[1], frames=spec.shape[0])
        if spec.kind == "text":
            return self.tokenizer.encode(f.caption(), spec.shape[0])
        if spec.kind == "label":
            return torch.tensor(f.cls % (spec.classes or self.classes), dtype=torch.long)
        return multi_hot(f, spec.shape[0])
