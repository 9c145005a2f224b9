"""Training losses, as pure functions of tensors that return a scalar.

Generated model code calls these by the names the operator catalogue (`avdsl.ops`) gives. Every loss:

* returns the mean over the batch, so values are comparable across batch sizes;
* computes in float32 (float64 when an input is float64), with autocast switched off inside, so
  that a bf16 forward pass does not lose precision in logits, exponentials and logs;
* has no ``.item()`` and no Python branch on tensor values, so it traces under
  ``torch.compile(fullgraph=True)``.

``patchify`` (and its inverse ``unpatchify``) turn images, spectrograms and video into the patch
rows that ``masked_mse`` compares. `LearnedTemperature` is the one module: a contrastive loss whose
temperature is a parameter (``learn_tau=true``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _no_autocast(x: Tensor) -> torch.autocast:
    """A context that turns autocast off on ``x``'s device, so the loss runs in float32."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _wide(*xs: Tensor) -> list[Tensor]:
    """The tensors in float64 if any is float64, else in float32 (half precision is widened)."""
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32
    return [x.to(dtype) for x in xs]


def weighted(weights: Tensor, *terms: Tensor) -> Tensor:
    """``weights[0] * terms[0] + weights[1] * terms[1] + ...``, each weight in its term's dtype: how the
    generated code sums a named loss. The weights are the model's ``loss_weights`` buffer (float64, so a
    float64 model computes with the spec's exact numbers), which vectorized ensemble members hold apart."""
    total = weights[0].to(terms[0].dtype) * terms[0]
    for w, t in zip(weights[1:], terms[1:]):
        total = total + w.to(t.dtype) * t
    return total


def nce(a: Tensor, b: Tensor, tau: float | Tensor = 0.07, both: bool = True) -> Tensor:
    """Softmax InfoNCE between row-aligned embeddings: row i of ``a`` should pick row i of ``b``.

    From van den Oord et al. 2018 (CPC), in the symmetric form of CLIP (Radford et al. 2021)::

        s_ij   = <a_i / |a_i|, b_j / |b_j|> / tau
        L_ab   = -1/N sum_i log( exp(s_ii) / sum_j exp(s_ij) )     (a -> b)
        L_ba   = -1/N sum_i log( exp(s_ii) / sum_j exp(s_ji) )     (b -> a)
        loss   = (L_ab + L_ba) / 2  if both  else  L_ab

    a, b: [N, D]. ``tau`` may be a float or a (learnable) scalar tensor.
    """
    with _no_autocast(a):
        a, b = _wide(a, b)
        a = F.normalize(a, dim=-1)
        b = F.normalize(b, dim=-1)
        logits = a @ b.T / tau
        target = torch.arange(logits.shape[0], device=logits.device)
        loss = F.cross_entropy(logits, target)
        if both:
            loss = 0.5 * (loss + F.cross_entropy(logits.T, target))
        return loss


def mil_nce(
    video: Tensor,
    text: Tensor,
    tau: float | Tensor = 0.07,
    normalize: bool = False,
    both: bool = False,
) -> Tensor:
    """MIL-NCE: InfoNCE where each clip has K candidate positive captions (Miech et al. 2020).

    As used by VATT (Akbari et al. 2021) for video-text. With s_ijk = <v_i, t_jk> / tau::

        pos_i  = logsumexp_k s_iik
        all_i  = logsumexp_{j,k} s_ijk        (positives plus every pair (v_i, t_jk), j != i)
        loss   = mean_i (all_i - pos_i)
               = -mean_i log( sum_k exp s_iik / (sum_k exp s_iik + sum_{j!=i,k} exp s_ijk) )

    video: [N, D]; text: [N, K, D], or [N, D] for K = 1 (then this is one-directional NCE).

    Normalisation: by default the embeddings are used as they are (``normalize=False``), as in the
    MMV/VATT common space, where the projection heads are trained with this loss directly and no
    L2-normalisation is applied. ``normalize=True`` L2-normalises both sides first (cosine scores,
    as in ``nce``).

    ``both=True`` also adds the other direction's negatives to each denominator, the pairs
    (v_j, t_ik) with j != i, as the original MIL-NCE code does; the default keeps only the
    video -> text negatives listed above.
    """
    with _no_autocast(video):
        video, text = _wide(video, text)
        if text.dim() == 2:
            text = text.unsqueeze(1)
        if normalize:
            video = F.normalize(video, dim=-1)
            text = F.normalize(text, dim=-1)
        n = video.shape[0]
        scores = torch.einsum("id,jkd->ijk", video, text) / tau  # [N, N, K]
        positives = scores.diagonal(dim1=0, dim2=1).T  # [N, K]: s_iik
        denominator = scores.reshape(n, -1)  # row i: every (v_i, t_jk)
        if both:
            # column i without its positives: every (v_j, t_ik), j != i
            eye = torch.eye(n, dtype=torch.bool, device=scores.device).unsqueeze(-1)
            column = scores.transpose(0, 1).masked_fill(eye, float("-inf"))
            denominator = torch.cat([denominator, column.reshape(n, -1)], dim=1)
        return (denominator.logsumexp(dim=1) - positives.logsumexp(dim=1)).mean()


def focal_contrastive(
    a: Tensor,
    b: Tensor,
    tau: float | Tensor = 0.07,
    gamma: float = 2.0,
    alpha: float | None = None,
    bias: Tensor | float = 0.0,
) -> Tensor:
    """Sigmoid focal loss over the N x N similarity matrix (RO-ViT, Kim et al. 2023; MaMMUT).

    Each of the N^2 pairs is its own binary task: the N matched pairs (diagonal) are positives, the
    N^2 - N others negatives. With z_ij = <a_i/|a_i|, b_j/|b_j|> / tau + bias, p = sigmoid(z),
    y = identity, p_t = p if y else 1 - p (focal loss of Lin et al. 2017)::

        l_ij  = alpha_t * (1 - p_t)^gamma * BCE(z_ij, y_ij)
        loss  = sum_ij l_ij / N

    Normalisation: the sum over the whole matrix divided by N (as RO-ViT does), i.e. the loss per
    row, so values stay comparable across batch sizes. ``alpha`` (weight of positives;
    alpha_t = alpha for positives, 1 - alpha for negatives) is off by default. With ``gamma=0`` and
    no alpha this is plain sigmoid BCE over the matrix (the SigLIP loss up to normalisation).
    ``bias`` may be a learnable scalar tensor.
    """
    with _no_autocast(a):
        a, b = _wide(a, b)
        a = F.normalize(a, dim=-1)
        b = F.normalize(b, dim=-1)
        logits = a @ b.T / tau + bias
        target = torch.eye(logits.shape[0], dtype=logits.dtype, device=logits.device)
        bce_ij = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p = torch.sigmoid(logits)
        p_t = p * target + (1 - p) * (1 - target)
        loss = bce_ij * (1 - p_t) ** gamma
        if alpha is not None:
            loss = loss * (alpha * target + (1 - alpha) * (1 - target))
        return loss.sum() / logits.shape[0]


def masked_mse(
    pred: Tensor,
    target: Tensor,
    mask: Tensor,
    norm_pix: bool = True,
    eps: float = 1e-6,
    reduction: str = "mean",
) -> Tensor:
    """Masked-autoencoder reconstruction error on the masked patches only (He et al. 2022, MAE).

    pred, target: [N, P, K] (P patches of K values, e.g. from ``patchify``); mask: [N, P] with
    1 = masked (to reconstruct), 0 = kept (visible to the encoder, not scored)::

        target' = (target - mean_K) / sqrt(var_K + eps)      if norm_pix, per patch
        loss    = sum_{n,p} mask_np * mean_K (pred - target')^2 / sum_{n,p} mask_np

    The per-patch variance is the unbiased one (divisor K - 1), as in the MAE and CAV-MAE reference
    code (``Tensor.var`` default), with eps = 1e-6. An all-kept mask gives 0, not NaN.
    ``reduction="sum"``: the numerator alone (summed over masked patches, not divided by their count).
    """
    with _no_autocast(pred):
        pred, target = _wide(pred, target)
        mask = mask.to(pred.dtype)
        if norm_pix:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / torch.sqrt(var + eps)
        per_patch = ((pred - target) ** 2).mean(dim=-1)  # [N, P]
        summed = (per_patch * mask).sum()
        return summed if reduction == "sum" else summed / mask.sum().clamp_min(1.0)


def _patch_size(patch: int | tuple[int, ...], rank: int) -> tuple[int, ...]:
    sizes = (patch,) * rank if isinstance(patch, int) else tuple(patch)
    if len(sizes) != rank:
        raise ValueError(f"patch {patch!r} has {len(sizes)} sizes, input needs {rank}")
    return sizes


def patchify(x: Tensor, patch: int | tuple[int, ...]) -> Tensor:
    """Cut an image, spectrogram or video into non-overlapping patches, one row per patch.

    * image [N, C, H, W], patch p or (ph, pw)  -> [N, (H/ph)(W/pw), ph*pw*C]
    * spectrogram [N, H, W]: treated as [N, 1, H, W]
    * video [N, C, T, H, W], patch p or (pt, ph, pw) -> [N, (T/pt)(H/ph)(W/pw), pt*ph*pw*C]

    Patch order is the order in which a stride-``patch`` Conv2d/Conv3d tokenizer enumerates its
    outputs after ``flatten(2)``: row-major over the patch grid (time, then grid rows, then grid
    columns). Within a patch, values are ordered (pt,) ph, pw, C: pixel row, then pixel column,
    then channel last (channel varies fastest), the layout of MAE's reconstruction targets.
    """
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() == 4:
        n, c, h, w = x.shape
        ph, pw = _patch_size(patch, 2)
        if h % ph or w % pw:
            raise ValueError(f"size {h}x{w} is not divisible by patch {ph}x{pw}")
        x = x.reshape(n, c, h // ph, ph, w // pw, pw)
        x = x.permute(0, 2, 4, 3, 5, 1)  # n, gh, gw, ph, pw, c
        return x.reshape(n, (h // ph) * (w // pw), ph * pw * c)
    if x.dim() == 5:
        n, c, t, h, w = x.shape
        pt, ph, pw = _patch_size(patch, 3)
        if t % pt or h % ph or w % pw:
            raise ValueError(f"size {t}x{h}x{w} is not divisible by patch {pt}x{ph}x{pw}")
        x = x.reshape(n, c, t // pt, pt, h // ph, ph, w // pw, pw)
        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # n, gt, gh, gw, pt, ph, pw, c
        return x.reshape(n, (t // pt) * (h // ph) * (w // pw), pt * ph * pw * c)
    raise ValueError(f"patchify expects a 3-, 4- or 5-dim tensor, got shape {tuple(x.shape)}")


def unpatchify(rows: Tensor, patch: int | tuple[int, ...], shape: tuple[int, ...]) -> Tensor:
    """Inverse of ``patchify``: patch rows [N, P, K] back to ``shape`` (the original, batch included).

    Used to show reconstructions next to their inputs.
    """
    if len(shape) == 3:
        return unpatchify(rows, patch, (shape[0], 1, shape[1], shape[2])).squeeze(1)
    if len(shape) == 4:
        n, c, h, w = shape
        ph, pw = _patch_size(patch, 2)
        x = rows.reshape(n, h // ph, w // pw, ph, pw, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(n, c, h, w)
    if len(shape) == 5:
        n, c, t, h, w = shape
        pt, ph, pw = _patch_size(patch, 3)
        x = rows.reshape(n, t // pt, h // ph, w // pw, pt, ph, pw, c)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(n, c, t, h, w)
    raise ValueError(f"unpatchify expects a 3-, 4- or 5-dim shape, got {tuple(shape)}")


def ce(logits: Tensor, target: Tensor, label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
    """Softmax cross-entropy: logits [N, C], target long [N] of class indices; the mean over N, or
    with ``reduction="sum"`` the sum."""
    with _no_autocast(logits):
        return F.cross_entropy(*_wide(logits), target, label_smoothing=label_smoothing, reduction=reduction)


def bce(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Sigmoid cross-entropy for multi-label targets: logits, target 0/1 float [N, C].

    One binary task per class. ``reduction="mean"``: the mean over all N * C elements (PyTorch's
    default); ``reduction="sum_classes"``: the sum over classes, then the mean over the batch, C times
    larger: the multi-label loss of scenic, MBT's reference code (sigmoid cross-entropy summed over
    classes, divided by the number of examples); ``reduction="sum"``: the sum over all elements."""
    with _no_autocast(logits):
        logits, target = _wide(logits, target)
        per_element = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        if reduction == "sum_classes":
            return per_element.sum(dim=-1).mean()
        return per_element.sum() if reduction == "sum" else per_element.mean()


def next_token(logits: Tensor, tokens: Tensor, pad: int = 0, reduction: str = "mean") -> Tensor:
    """Captioning loss: position t predicts token t + 1; padding targets are ignored.

    logits [N, L, V] from the decoder run on tokens [N, L] (teacher forcing). The predictions at
    positions 0..L-2 are scored against tokens 1..L-1 with softmax cross-entropy, averaged over
    target tokens that are not ``pad`` (all batches' real tokens weigh equally). No real target
    tokens gives 0, not NaN. ``reduction="sum"``: the sum over those tokens instead.
    """
    with _no_autocast(logits):
        pred = _wide(logits[:, :-1])[0].reshape(-1, logits.shape[-1])
        target = tokens[:, 1:].reshape(-1)
        summed = F.cross_entropy(pred, target, ignore_index=pad, reduction="sum")
        if reduction == "sum":
            return summed
        return summed / (target != pad).sum().clamp_min(1)



class LearnedTemperature(nn.Module):
    """A contrastive loss (``nce`` or ``focal_contrastive``) with a learned temperature, as CLIP's
    logit scale: the parameter is log(1 / tau), starting at the spec's ``tau``; the scale 1 / tau is
    capped at 100 (CLIP clamps the parameter after each step; here the forward clamps it).
    ``fixed``: the loss's other arguments, as (name, value) pairs."""

    MAX_SCALE = 100.0

    def __init__(self, loss: str, tau: float, fixed: tuple = ()):
        super().__init__()
        self.loss = {f.__name__: f for f in (nce, focal_contrastive)}[loss]
        self.fixed = dict(fixed)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / tau)))

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        scale = self.logit_scale.clamp(max=math.log(self.MAX_SCALE)).exp()
        return self.loss(a, b, tau=1 / scale, **self.fixed)
