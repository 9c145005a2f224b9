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
    sequence; a pooled [B, D] tensor is one token). One query returns [B, D]; several return
    [B, queries, D]. ``each``: query i attends to the i-th tensor only. ``norm``: the queries are
    LayerNorm-ed before their projection (a pre-norm cross-attention; keys and values are not);
    ``residual``: the (un-normalised) queries are added to the result; ``bias``: biases in the
    projections and in that LayerNorm."""

    def __init__(self, width: int, queries: int, heads: int, each: bool = False, norm: bool = False,
                 residual: bool = False, bias: bool = True, eps: float = 1e-5):
        super().__init__()
        self.each, self.residual = each, residual
        self.queries = nn.Parameter(torch.randn(queries, width) * 0.02)
        self.norm = nn.LayerNorm(width, eps=eps, bias=bias) if norm else nn.Identity()
        self.attention = nn.MultiheadAttention(width, heads, bias=bias, batch_first=True)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        parts = [x.unsqueeze(1) if x.dim() == 2 else x for x in xs]
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        mask = None
        if self.each:  # True where query i may not attend: every token outside the i-th tensor
            owner = torch.cat([torch.full((p.shape[1],), i, device=x.device) for i, p in enumerate(parts)])
            mask = owner.unsqueeze(0) != torch.arange(len(parts), device=x.device).unsqueeze(1)
        q = self.queries.to(x.dtype).expand(x.shape[0], -1, -1)
        y = self.attention(self.norm(q), x, x, attn_mask=mask, need_weights=False)[0]
        if self.residual:
            y = y + q
        return y[:, 0] if y.shape[1] == 1 else y


def pick(x: torch.Tensor, index: int) -> torch.Tensor:
    """Token ``index`` of [B, N, D] tokens, as [B, D]."""
    return x[:, index]


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
