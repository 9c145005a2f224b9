"""Video frame helpers shared by the synthetic and the media data sets.

Frames travel as float RGB in [0, 1], ``[T, 3, H, W]``, until :func:`normalise_frames` maps them to
roughly zero mean, unit std with the ImageNet channel statistics (the ones CAV-MAE's image encoder
was pre-trained with) and lays them out as the contract's ``[3, T, H, W]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FRAME_MEAN = (0.485, 0.456, 0.406)
FRAME_STD = (0.229, 0.224, 0.225)


def normalise_frames(frames: torch.Tensor) -> torch.Tensor:
    """``[T, 3, H, W]`` in [0, 1] -> normalised ``[3, T, H, W]``."""
    mean = torch.tensor(FRAME_MEAN, dtype=frames.dtype).view(1, 3, 1, 1)
    std = torch.tensor(FRAME_STD, dtype=frames.dtype).view(1, 3, 1, 1)
    return ((frames - mean) / std).permute(1, 0, 2, 3).contiguous()


def denormalise_frames(video: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalise_frames`: ``[3, T, H, W]`` -> ``[T, 3, H, W]`` in [0, 1]."""
    frames = video.permute(1, 0, 2, 3)
    mean = torch.tensor(FRAME_MEAN, dtype=frames.dtype).view(1, 3, 1, 1)
    std = torch.tensor(FRAME_STD, dtype=frames.dtype).view(1, 3, 1, 1)
    return frames * std + mean


def crop_box(
    in_h: int, in_w: int, out_h: int, out_w: int, train: bool
) -> tuple[int, int, int, int]:
    """A crop (top, left, height, width) of the input with the output's aspect ratio.

    Evaluation takes the largest centred crop. Training takes a crop covering a random 50-100 % of
    that largest crop's area at a random position, drawn from torch's global generator (seeded per
    DataLoader worker), so augmentations are reproducible for a seeded loader.
    """
    aspect = out_w / out_h
    h = min(in_h, round(in_w / aspect))
    w = min(in_w, round(h * aspect))
    if not train:
        return (in_h - h) // 2, (in_w - w) // 2, h, w
    scale = 0.5 + 0.5 * float(torch.rand(()))
    h = max(1, round(h * scale**0.5))
    w = max(1, round(w * scale**0.5))
    top = int(torch.randint(0, in_h - h + 1, ()))
    left = int(torch.randint(0, in_w - w + 1, ()))
    return top, left, h, w


def crop_resize(frames: torch.Tensor, out_h: int, out_w: int, train: bool) -> torch.Tensor:
    """Crop every frame of ``[T, 3, H0, W0]`` alike, resize to ``[T, 3, out_h, out_w]``.

    With ``train`` the crop is random (see :func:`crop_box`) and the clip is flipped left-right with
    probability 1/2; otherwise it is the centre crop.
    """
    top, left, h, w = crop_box(frames.shape[2], frames.shape[3], out_h, out_w, train)
    clip = frames[:, :, top : top + h, left : left + w]
    if (h, w) != (out_h, out_w):
        clip = F.interpolate(clip, size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False)
    if train and float(torch.rand(())) < 0.5:
        clip = clip.flip(-1)
    return clip.clamp(0.0, 1.0)
