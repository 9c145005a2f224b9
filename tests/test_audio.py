"""Audio features: Kaldi fbank with the CAV-MAE recipe, SpecAugment, resampling."""
import math

import torch
from torchaudio.compliance import kaldi

from avdsl.runtime import audio

RATE = 16000


def sine(hz: float, seconds: float = 1.0, rate: int = RATE) -> torch.Tensor:
    t = torch.arange(int(seconds * rate)) / rate
    return 0.5 * torch.sin(2 * math.pi * hz * t)


def test_fbank_is_kaldi_fbank_with_cav_mae_settings_and_normalisation():
    wave = sine(440.0) + 0.01
    expected = kaldi.fbank(
        (wave - wave.mean()).unsqueeze(0), htk_compat=True, sample_frequency=RATE, use_energy=False,
        window_type="hanning", num_mel_bins=64, dither=0.0, frame_length=25.0, frame_shift=10.0,
    )
    got = audio.fbank(wave, RATE, num_mel_bins=64)
    assert got.shape == (98, 64)  # 1 + (16000 - 400) // 160
    torch.testing.assert_close(got, (expected + 5.081) / (2 * 4.4849))
    torch.testing.assert_close(audio.fbank(wave.unsqueeze(0), RATE, num_mel_bins=64), got)


def test_fbank_peak_mel_bin_moves_up_with_frequency():
    peaks = [int(audio.fbank(sine(hz), RATE, 64).mean(0).argmax()) for hz in (300.0, 1000.0, 3000.0)]
    assert peaks[0] < peaks[1] < peaks[2]


def test_fbank_frames_crop_and_pad():
    wave = sine(440.0)
    assert audio.fbank(wave, RATE, 32, frames=50).shape == (50, 32)
    padded = audio.fbank(wave, RATE, 32, frames=120)
    assert padded.shape == (120, 32)
    # padding happens on the raw log-mel (zeros), so padded rows hold the normalised zero
    torch.testing.assert_close(padded[98:], torch.full((22, 32), 5.081 / (2 * 4.4849)))
    assert audio.fbank(torch.zeros(100), RATE, 16).shape == (1, 16)  # shorter than one window


def test_samples_for_frames_gives_exact_frame_count():
    assert audio.samples_for_frames(1024, RATE) == 164080
    assert audio.fbank(torch.randn(audio.samples_for_frames(256, RATE)), RATE, 64).shape == (256, 64)


def test_mask_widths_scale_down_with_input_size_only():
    assert audio.scaled_mask_widths(1024, 128, 48, 192) == (48, 192)
    assert audio.scaled_mask_widths(256, 64, 48, 192) == (24, 48)
    assert audio.scaled_mask_widths(2048, 256, 48, 192) == (48, 192)


def test_spec_augment_masks_a_band_and_a_span_reproducibly():
    feats = torch.randn(256, 64) + 5.0  # no natural zeros
    state = torch.random.get_rng_state()
    masked = audio.spec_augment(feats, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    again = audio.spec_augment(feats, generator=torch.Generator().manual_seed(3))
    assert torch.equal(masked, again)
    zero = masked == 0
    full_bins = zero.all(0).sum().item()
    full_frames = zero.all(1).sum().item()
    assert full_bins <= 24 and full_frames <= 48  # scaled widths for 256 x 64
    # every zero lies in a fully masked bin or a fully masked frame; the rest is untouched
    assert torch.equal(zero, zero.all(0, keepdim=True) | zero.all(1, keepdim=True))
    assert torch.equal(masked[~zero], feats[~zero])
    masks = [audio.spec_augment(feats, generator=torch.Generator().manual_seed(s)) == 0 for s in range(20)]
    assert sum(m.any().item() for m in masks) >= 15


def test_resample_keeps_pitch_and_duration():
    out = audio.resample(sine(440.0), RATE, 8000)
    assert out.shape == (8000,)
    assert int(torch.fft.rfft(out).abs().argmax()) == 440  # 1 Hz bins for 1 s
    same = sine(440.0)
    assert audio.resample(same, RATE, RATE) is same
