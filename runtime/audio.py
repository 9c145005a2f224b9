"""Audio features: the one place in avdsl that uses torchaudio.

Every audio input reaches a model through these functions, whether it comes from the synthetic
data set or from a decoded media file, so both kinds of data share one feature path.

``fbank`` follows the recipe of CAV-MAE (and AST before it):

* the waveform's mean is subtracted, then ``torchaudio.compliance.kaldi.fbank`` computes a
  Kaldi-compatible log-mel filterbank with a Hanning window, 25 ms frames, a 10 ms shift,
  ``htk_compat=True``, ``use_energy=False`` and no dither, so a clip of S samples at rate r gives
  ``1 + (S - 0.025 r) // (0.010 r)`` frames;
* the frames are cropped or zero-padded to ``frames`` (CAV-MAE pads the raw log-mel with zeros too);
* values are normalised with the AudioSet statistics CAV-MAE uses, ``(x - (-5.081)) / (2 * 4.4849)``,
  which puts typical clips at roughly zero mean and half unit std.

``spec_augment`` masks one band of mel bins and one span of frames with the normalised mean (0).
"""
from __future__ import annotations

import torch
import torchaudio.functional as AF
import torchaudio.transforms as AT
from torchaudio.compliance import kaldi

FBANK_MEAN = -5.081  # AudioSet log-mel mean used by CAV-MAE
FBANK_STD = 4.4849  # AudioSet log-mel std used by CAV-MAE
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0

# SpecAugment mask widths CAV-MAE trains with, for its 1024-frame x 128-bin inputs.
REFERENCE_FRAMES = 1024
REFERENCE_BINS = 128


def samples_for_frames(frames: int, sample_rate: int) -> int:
    """The waveform length that gives exactly ``frames`` fbank frames (25 ms window, 10 ms shift)."""
    window = int(sample_rate * FRAME_LENGTH_MS / 1000)
    shift = int(sample_rate * FRAME_SHIFT_MS / 1000)
    return window + shift * (frames - 1)


def fbank(
    waveform: torch.Tensor,
    sample_rate: int,
    num_mel_bins: int = 128,
    frames: int | None = None,
) -> torch.Tensor:
    """Normalised Kaldi log-mel filterbank of a mono waveform ``[S]`` or ``[1, S]`` -> ``[T, F]``.

    With ``frames`` given the result has exactly that many frames (cropped, or zero-padded before
    normalisation as CAV-MAE does). A waveform shorter than one window is zero-padded to one window.
    """
    wave = waveform.reshape(1, -1).to(torch.float32)
    wave = wave - wave.mean()
    window = int(sample_rate * FRAME_LENGTH_MS / 1000)
    if wave.shape[1] < window:
        wave = torch.nn.functional.pad(wave, (0, window - wave.shape[1]))
    feats = kaldi.fbank(
        wave,
        htk_compat=True,
        sample_frequency=float(sample_rate),
        use_energy=False,
        window_type="hanning",
        num_mel_bins=num_mel_bins,
        dither=0.0,
        frame_length=FRAME_LENGTH_MS,
        frame_shift=FRAME_SHIFT_MS,
    )
    if frames is not None:
        if feats.shape[0] >= frames:
            feats = feats[:frames]
        else:
            feats = torch.nn.functional.pad(feats, (0, 0, 0, frames - feats.shape[0]))
    return (feats - FBANK_MEAN) / (2 * FBANK_STD)


def scaled_mask_widths(frames: int, bins: int, freq_mask: int, time_mask: int) -> tuple[int, int]:
    """Mask widths for an input smaller than CAV-MAE's 1024 x 128.

    Rule: each width shrinks in proportion to its axis, ``round(mask * min(1, size / reference))``
    with references 128 mel bins and 1024 frames, so a 256 x 64 input gets masks of at most 48 frames
    and 24 bins. Inputs at or above the reference size keep the given widths.
    """
    f = round(freq_mask * min(1.0, bins / REFERENCE_BINS))
    t = round(time_mask * min(1.0, frames / REFERENCE_FRAMES))
    return f, t


def spec_augment(
    features: torch.Tensor,
    freq_mask: int = 48,
    time_mask: int = 192,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SpecAugment for one normalised fbank ``[T, F]``: one frequency mask and one time mask.

    Widths are drawn uniformly in ``[0, width)`` by torchaudio's FrequencyMasking / TimeMasking after
    scaling with :func:`scaled_mask_widths`; masked cells are set to 0, the normalised mean. Those
    transforms draw from torch's global generator; with ``generator`` given, they run in a forked RNG
    state seeded from it, so the result is reproducible and the global state is left untouched.
    Call it only for training data.
    """
    frames, bins = features.shape
    f, t = scaled_mask_widths(frames, bins, freq_mask, time_mask)
    spec = features.t().unsqueeze(0)  # torchaudio masks expect [..., freq, time]

    def apply(x: torch.Tensor) -> torch.Tensor:
        if f > 0:
            x = AT.FrequencyMasking(f)(x)
        if t > 0:
            x = AT.TimeMasking(t)(x)
        return x

    if generator is None:
        spec = apply(spec)
    else:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            spec = apply(spec)
    return spec.squeeze(0).t().contiguous()


def resample(waveform: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """Resample along the last axis from ``orig`` Hz to ``new`` Hz (band-limited sinc interpolation)."""
    if orig == new:
        return waveform
    return AF.resample(waveform, orig, new)
