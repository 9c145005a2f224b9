"""A tiny model and data set that follow the model contract, for tests and smoke runs.

``TinyAV`` has two linear encoders (audio filterbank, image) trained with a symmetric InfoNCE loss
plus a small classifier on the audio embedding. ``ToyAVDataset`` draws a hidden vector per item and
renders it into both modalities with fixed random projections, so audio and image of the same item
share information and the contrastive loss has something to learn. Both are deterministic given
their seeds, which the training tests rely on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..contracts import Classifier, EvalPlan, InputSpec, RetrievalPair

AUDIO_SHAPE = (4, 8)
VIDEO_SHAPE = (3, 4, 4)
LATENT = 8


class TinyAV(nn.Module):
    """Audio and image encoders with a contrastive loss ("nce") and a classifier loss ("cls")."""

    no_weight_decay = ("pos_token",)  # parameters by role, for `param_groups`

    def __init__(self, dim: int = 16, classes: int = 4, dropout: float = 0.1, temperature: float = 0.1):
        super().__init__()
        self.inputs = [
            InputSpec("audio", "fbank", AUDIO_SHAPE),
            InputSpec("video", "image", VIDEO_SHAPE),
            InputSpec("label", "label", (), classes=classes),
        ]
        self.eval_plan = EvalPlan(
            retrieval=(RetrievalPair("audio_embedding", "video_embedding"),),
            classifiers=(Classifier("logits", "label"),),
        )
        self.temperature = temperature
        self.audio_encoder = nn.Sequential(
            nn.Flatten(), nn.Linear(AUDIO_SHAPE[0] * AUDIO_SHAPE[1], dim), nn.LayerNorm(dim)
        )
        self.video_encoder = nn.Sequential(
            nn.Flatten(), nn.Linear(VIDEO_SHAPE[0] * VIDEO_SHAPE[1] * VIDEO_SHAPE[2], dim), nn.LayerNorm(dim)
        )
        self.pos_token = nn.Parameter(torch.zeros(1, dim))  # a learned position: exercises the no-decay rule
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, classes)

    def forward(self, audio: torch.Tensor, video: torch.Tensor, label: torch.Tensor | None = None) -> dict:
        audio_features = self.dropout(self.audio_encoder(audio) + self.pos_token)
        video_features = self.dropout(self.video_encoder(video) + self.pos_token)
        audio_embedding = F.normalize(audio_features, dim=-1)
        video_embedding = F.normalize(video_features, dim=-1)
        similarity = audio_embedding @ video_embedding.T / self.temperature
        targets = torch.arange(similarity.shape[0], device=similarity.device)
        losses = {
            "nce": 0.5 * (F.cross_entropy(similarity, targets) + F.cross_entropy(similarity.T, targets))
        }
        logits = self.classifier(audio_features)
        if label is not None:
            losses["cls"] = F.cross_entropy(logits.float(), label)
        return {
            "loss": sum(losses.values()),
            "losses": losses,
            "outputs": {
                "audio_embedding": audio_embedding,
                "video_embedding": video_embedding,
                "logits": logits,
            },
        }


class ToyAVDataset(Dataset):
    """``size`` items of {"audio", "video", "label"}; item i depends only on (seed, i).

    ``missing`` lists indices that come back as None, as a data pipeline does for unreadable files.
    """

    def __init__(self, size: int, seed: int = 0, classes: int = 4, noise: float = 0.1, missing=()):
        self.size = size
        self.seed = seed
        self.classes = classes
        self.noise = noise
        self.missing = frozenset(missing)
        projections = torch.Generator().manual_seed(12345)  # same modalities for every split
        self.audio_map = torch.randn(AUDIO_SHAPE[0] * AUDIO_SHAPE[1], LATENT, generator=projections)
        self.video_map = torch.randn(
            VIDEO_SHAPE[0] * VIDEO_SHAPE[1] * VIDEO_SHAPE[2], LATENT, generator=projections
        )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict | None:
        if index in self.missing:
            return None
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        latent = torch.randn(LATENT, generator=generator)
        audio = self.audio_map @ latent + self.noise * torch.randn(self.audio_map.shape[0], generator=generator)
        video = self.video_map @ latent + self.noise * torch.randn(self.video_map.shape[0], generator=generator)
        return {
            "audio": audio.view(AUDIO_SHAPE),
            "video": video.view(VIDEO_SHAPE),
            "label": latent[: self.classes].argmax(),
        }
