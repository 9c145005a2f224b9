"""What turns inputs into token streams: tokenizers, positional and type embeddings, latent tokens,
token dropping and restoring. Each module takes and returns ``[B, N, D]`` tokens (tokenizers take the
raw input), so a compiled model is a readable chain of calls.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class _PatchNorms(nn.Module):
    """A patch projection with optional LayerNorms around it: ``norm`` is none, before (on the patch
    values), after (on the tokens) or both. The projection stays a convolution kernel (the same weights
    with or without norms); with a norm before it, the patches are cut out, normalised and multiplied
    by the flattened kernel, whose value order (channel, then each patch axis) they share."""

    def _norms(self, values: int, width: int, norm: str, eps: float) -> None:
        self.norm_before = nn.LayerNorm(values, eps=eps) if norm in ("before", "both") else None
        self.norm_after = nn.LayerNorm(width, eps=eps) if norm in ("after", "both") else None

    def _project(self, x: torch.Tensor, patches) -> torch.Tensor:
        """``x`` [B, C, *spatial] -> tokens [B, N, D]; ``patches(x)`` cuts it into [B, N, C * window]."""
        if self.norm_before is None:
            # contiguous tokens: eager's LayerNorm and Linear copy a transposed input anyway, and
            # inductor's CPU code for a transposed fp32 input added to bf16 (the autocast residual)
            # then normalised computes garbage (NaN in compiled bf16 MBT, whose streams enter their
            # layers straight from the tokenizer; docs/performance.md)
            tokens = self.proj(x).flatten(2).transpose(1, 2).contiguous()
        else:
            weight = self.proj.weight.flatten(1)
            tokens = F.linear(self.norm_before(patches(x)), weight, self.proj.bias)
        return tokens if self.norm_after is None else self.norm_after(tokens)


def cut_patches(x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """Non-overlapping windows of ``x`` [B, C, *spatial] as rows [B, N, C * prod(sizes)]: windows in
    row-major grid order, values in (channel, window axes) order, as a strided convolution reads them."""
    batch, channels, *spatial = x.shape
    grid = [n // s for n, s in zip(spatial, sizes)]
    view = [batch, channels]
    for g, s in zip(grid, sizes):
        view += [g, s]
    k = len(sizes)
    order = [0, *(2 + 2 * i for i in range(k)), 1, *(3 + 2 * i for i in range(k))]
    rows = 1
    for g in grid:
        rows *= g
    return x.reshape(view).permute(order).reshape(batch, rows, -1)


class PatchEmbed2d(_PatchNorms):
    """Non-overlapping h x w patches of an image [B, C, H, W] or spectrogram [B, T, F], projected to D.
    A spectrogram is one channel; with ``channels`` > 1 it is repeated to that many channels first
    (MBT's reference feeds spectrograms as 3-channel images to reuse RGB ViT patch weights).
    ``norm``: LayerNorms around the projection (see `_PatchNorms`)."""

    def __init__(self, channels: int, h: int, w: int, width: int, norm: str = "none", eps: float = 1e-5):
        super().__init__()
        self.channels, self.size = channels, (h, w)
        self.proj = nn.Conv2d(channels, width, kernel_size=(h, w), stride=(h, w))
        self._norms(channels * h * w, width, norm, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1).expand(-1, self.channels, -1, -1)
        return self._project(x, lambda v: cut_patches(v, self.size))


class TubeletEmbed(_PatchNorms):
    """Non-overlapping t x h x w tubelets of a video [B, C, T, H, W], projected to D. ``norm``:
    LayerNorms around the projection (see `_PatchNorms`)."""

    def __init__(self, channels: int, t: int, h: int, w: int, width: int, norm: str = "none", eps: float = 1e-5):
        super().__init__()
        self.size = (t, h, w)
        self.proj = nn.Conv3d(channels, width, kernel_size=(t, h, w), stride=(t, h, w))
        self._norms(channels * t * h * w, width, norm, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._project(x, lambda v: cut_patches(v, self.size))


class WaveEmbed(_PatchNorms):
    """Non-overlapping windows of k raw samples [B, S], projected to D (a strided Conv1d). ``norm``:
    LayerNorms around the projection (see `_PatchNorms`)."""

    def __init__(self, k: int, width: int, norm: str = "none", eps: float = 1e-5):
        super().__init__()
        self.size = (k,)
        self.proj = nn.Conv1d(1, width, kernel_size=k, stride=k)
        self._norms(k, width, norm, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._project(x.unsqueeze(1), lambda v: cut_patches(v, self.size))


class TextEmbed(nn.Module):
    """Token ids [B, L] -> embeddings; with ``dim``, embed at ``dim`` then project to D (VATT)."""

    def __init__(self, vocab: int, width: int, dim: int = 0, frozen: bool = False):
        super().__init__()
        self.table = nn.Embedding(vocab, dim or width)
        self.table.weight.requires_grad_(not frozen)
        self.proj = nn.Linear(dim, width) if dim else nn.Identity()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.table(ids))


class LearnedPosition(nn.Module):
    """A learned embedding per position, added (``size`` rows, of which the first N are used);
    with ``norm``, the sum of tokens and positions is LayerNorm-ed (BERT-style embeddings, as VATT)."""

    def __init__(self, size: int, width: int, norm: bool = False, eps: float = 1e-6):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, size, width))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.norm = nn.LayerNorm(width, eps=eps) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.pos[:, : x.shape[1]])


class FactorizedPosition(nn.Module):
    """One learned table per grid axis (e.g. time 8, height 14, width 14), summed over the grid and added;
    with ``norm``, the sum of tokens and positions is LayerNorm-ed (BERT-style embeddings, as VATT).

    Normalising the sum rather than the table matters for raw inputs: a LayerNorm-ed table has unit
    scale, and would drown quiet tokens such as those of a raw waveform (measured: the small VATT
    does not learn its audio at all with the table normalised, and does with the sum normalised)."""

    def __init__(self, grid: tuple[int, ...], width: int, norm: bool = False, eps: float = 1e-6):
        super().__init__()
        self.grid = tuple(grid)
        self.axes = nn.ParameterList([nn.Parameter(torch.zeros(n, width)) for n in grid])
        for p in self.axes:
            nn.init.trunc_normal_(p, std=0.02)
        self.norm = nn.LayerNorm(width, eps=eps) if norm else nn.Identity()

    def table(self) -> torch.Tensor:
        total = None
        for axis, p in enumerate(self.axes):
            shape = [1] * len(self.grid) + [p.shape[-1]]
            shape[axis] = p.shape[0]
            term = p.view(shape)
            total = term if total is None else total + term
        return total.reshape(-1, total.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.table().unsqueeze(0))


def sincos_2d(grid_h: int, grid_w: int, width: int, first: str = "columns") -> torch.Tensor:
    """Fixed 2-D sine-cosine positions [H*W, D] for a row-major grid of H rows and W columns.

    Half the channels encode the column, half the row, each as sin then cos of the position at
    geometrically spaced frequencies 1 / 10000^(i / (D/4)). With ``first="columns"`` the column comes
    first, the layout of MAE's ``get_2d_sincos_pos_embed`` (and so of CAV-MAE); ``first="rows"`` puts
    the row first. The table is computed in float64 and rounded to float32, as MAE's is."""
    quarter = width // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1).double() * omega.reshape(1, -1)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    halves = [encode(cols), encode(rows)] if first == "columns" else [encode(rows), encode(cols)]
    return torch.cat(halves, dim=1).float()


class SinCos2dPosition(nn.Module):
    """Fixed 2-D sin-cos positions, kept as a frozen parameter (so checkpoints and counts include it)."""

    def __init__(self, grid: tuple[int, int], width: int, first: str = "columns"):
        super().__init__()
        self.pos = nn.Parameter(sincos_2d(grid[0], grid[1], width, first).unsqueeze(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pos


class TypeEmbedding(nn.Module):
    """One learned vector added to every token of a stream (its modality type)."""

    def __init__(self, width: int):
        super().__init__()
        # not `self.type`: that name is nn.Module's dtype-casting method
        self.embedding = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.trunc_normal_(self.embedding, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.embedding



class LatentTokens(nn.Module):
    """Learned tokens: a stream of their own (``forward(batch)``) or prepended to one (``forward(x)``)."""

    def __init__(self, count: int, width: int):
        super().__init__()
        self.tokens = nn.Parameter(torch.zeros(1, count, width))
        nn.init.trunc_normal_(self.tokens, std=0.02)

    def forward(self, like: torch.Tensor) -> torch.Tensor:
        """Tokens for the batch of ``like`` (any tensor whose first dim is the batch)."""
        return self.tokens.expand(like.shape[0], -1, -1)

    def prepend(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.forward(x), x], dim=1)


def keep_random(x: torch.Tensor, keep: int, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None):
    """Keep ``keep`` random tokens per sample, in random order (MAE). Returns the kept tokens, the
    mask [B, N] (1 = dropped) and ``ids_restore`` [B, N] that puts tokens back in place.

    The tokens with the ``keep`` smallest values of ``noise`` [B, N] are kept, smallest first; without
    ``noise`` it is drawn uniform in [0, 1) (from ``generator`` if given). Given noise makes the mask
    reproducible, e.g. the one a reference implementation drew. Keeping every token (a rate of 0)
    returns ``x`` itself with an all-zero mask and the identity ``ids_restore``, noise or not."""
    b, n, d = x.shape
    if noise is None:
        noise = torch.rand(b, n, device=x.device, generator=generator)
    elif tuple(noise.shape) != (b, n):
        raise ValueError(f"mask noise must have shape [batch, tokens] = [{b}, {n}], got {list(noise.shape)}")
    if keep >= n:  # a rate of 0: every token, in place (no shuffle), and nothing masked
        ids = torch.arange(n, device=x.device).expand(b, n)
        return x, torch.zeros(b, n, device=x.device, dtype=x.dtype), ids
    ids_shuffle = torch.argsort(noise.to(x.device), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    mask = torch.ones(b, n, device=x.device, dtype=x.dtype)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return kept, mask, ids_restore


class DropToken(nn.Module):
    """In training, keep a random ``1 - rate`` fraction of tokens (VATT's DropToken); identity in eval.
    ``noise`` [B, N] chooses the kept tokens instead of random draws (see `keep_random`)."""

    def __init__(self, rate: float, tokens: int):
        super().__init__()
        self.rate = rate
        self.keep = int(tokens * (1 - rate))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training:
            return x
        return keep_random(x, self.keep, noise=noise)[0]


class DropModality(nn.Module):
    """Modality dropout: in training, each example loses the whole stream with probability ``rate``;
    its tokens are all replaced by one learned 'missing' token. Identity in evaluation."""

    def __init__(self, rate: float, width: int):
        super().__init__()
        self.rate = rate
        self.missing = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        dropped = torch.rand(x.shape[0], 1, 1, device=x.device) < self.rate
        return torch.where(dropped, self.missing.to(x.dtype).expand_as(x), x)


class RandomMask(nn.Module):
    """MAE masking: keep a random ``1 - rate`` fraction of tokens, in training and evaluation alike
    (a masked autoencoder always reconstructs); returns (kept, mask, ids_restore). ``noise`` [B, N]
    chooses the kept tokens instead of random draws (see `keep_random` and `given_noise`)."""

    def __init__(self, rate: float, tokens: int):
        super().__init__()
        self.rate = rate
        self.keep = int(tokens * (1 - rate))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        return keep_random(x, self.keep, noise=noise)


@contextmanager
def given_noise(model: nn.Module, noise: dict[str, torch.Tensor]):
    """Within the block, the random masking (``mask:``) or token dropping (``drop:``) of each named
    stream of a compiled model keeps the tokens chosen by the given noise [B, N] (the smallest
    values are kept, as MAE's ``argsort(noise)``) instead of drawing them::

        with given_noise(model, {"audio": noise_a, "video": noise_v}):
            out = model(**batch)

    The noise reaches each stream's module (``model.token_drops`` names them) through a forward
    pre-hook that is removed on leaving the block."""
    modules = {stream: getattr(model, attr) for stream, attr in model.token_drops.items()}
    unknown = sorted(set(noise) - set(modules))
    if unknown:
        have = f"this model has {', '.join(sorted(modules))}" if modules else "this model masks or drops no tokens"
        raise ValueError(f"no masked or token-dropping stream named {', '.join(unknown)}; {have}")
    handles = []
    try:
        for stream, values in noise.items():
            def hook(_module, args, kwargs, values=values):
                return args, {**kwargs, "noise": values}
            handles.append(modules[stream].register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


class Restore(nn.Module):
    """Undo `RandomMask`: append a learned mask token for every dropped position, then unshuffle."""

    def __init__(self, width: int):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, kept: torch.Tensor, mask: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        b, n = ids_restore.shape
        fill = self.mask_token.expand(b, n - kept.shape[1], -1).to(kept.dtype)
        full = torch.cat([kept, fill], dim=1)
        return torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, kept.shape[-1]))


def init_linear(module: nn.Module) -> None:
    """ViT-style initialisation: truncated normal linear weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            w = m.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
