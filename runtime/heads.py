"""Output operators: pooling functions and projection modules, named as in the spec's `outputs:`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mean(*xs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens; several token tensors are pooled together as one sequence."""
    x = torch.cat(xs, dim=1) if len(xs) > 1 else xs[0]
    return x.mean(dim=1)


def first(*xs: torch.Tensor) -> torch.Tensor:
    """The first token (CLS / aggregation token)."""
    return xs[0][:, 0]


def avg(*xs: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of tensors of one shape."""
    return torch.stack(xs, dim=0).mean(dim=0)


def tokens(x: torch.Tensor, skip: int = 0) -> torch.Tensor:
    return x[:, skip:] if skip else x


def relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x)


def l2norm(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


class BatchNorm(nn.Module):
    """BatchNorm over the last dim, for [B, D] or [B, N, D] inputs."""

    def __init__(self, width: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return self.bn(x)
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


class AttentionPool(nn.Module):
    """Attention pooling: learned query tokens attend to the tokens of one or more streams (as one
    sequence). One query returns [B, D]; several return [B, queries, D]."""

    def __init__(self, width: int, queries: int, heads: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(queries, width) * 0.02)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        x = torch.cat(xs, dim=1) if len(xs) > 1 else xs[0]
        q = self.queries.to(x.dtype).expand(x.shape[0], -1, -1)
        y = self.attention(q, x, x, need_weights=False)[0]
        return y[:, 0] if y.shape[1] == 1 else y


class MLP(nn.Module):
    """Linear layers with a norm and activation between them (and after the last, if ``final_norm``):
    e.g. ``[Linear - BN - ReLU - Linear - BN]`` for VATT/MMV's projection heads."""

    def __init__(self, width: int, sizes: list[int], norm: str = "bn", act: str = "relu", bias: bool = True,
                 final_norm: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        for i, size in enumerate(sizes):
            last = i == len(sizes) - 1
            layers.append(nn.Linear(width, size, bias=bias))
            if norm != "none" and (not last or final_norm):
                layers.append(BatchNorm(size) if norm == "bn" else nn.LayerNorm(size))
            if not last and act != "none":
                layers.append(nn.ReLU() if act == "relu" else nn.GELU())
            width = size
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
