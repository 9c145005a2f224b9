"""Held-out evaluation metrics: tensors in, plain floats out.

These run once per evaluation on gathered outputs, not inside the training graph, so they favour
plain readable torch over speed. Everything is computed in float32 on the inputs' device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["retrieval", "accuracy", "mean_average_precision"]


def retrieval(query: Tensor, key: Tensor) -> dict[str, float]:
    """Recall at 1/5/10 and median rank of the matching key for each query, by cosine similarity.

    query, key: [N, D]; row i's correct key is key i. The rank of the correct key (1-based) is the
    number of keys scoring at least as high as it, so ties count against the query (a collapsed
    model that maps everything to one point gets rank N, not 1). Returns::

        {"R@1", "R@5", "R@10": fraction of queries whose correct key ranks <= k,
         "median_rank": median of the ranks (mean of the two middle ones when N is even),
         "chance_r1": 1 / N, the R@1 of a random ranking}
    """
    if query.shape != key.shape or query.dim() != 2:
        raise ValueError(f"query and key must both be [N, D], got {tuple(query.shape)} and {tuple(key.shape)}")
    sim = F.normalize(query.float(), dim=-1) @ F.normalize(key.float(), dim=-1).T  # [N, N]
    correct = sim.diagonal().unsqueeze(1)
    ranks = (sim >= correct).sum(dim=1).float()
    n = query.shape[0]
    return {
        "R@1": (ranks <= 1).float().mean().item(),
        "R@5": (ranks <= 5).float().mean().item(),
        "R@10": (ranks <= 10).float().mean().item(),
        "median_rank": ranks.quantile(0.5).item(),
        "chance_r1": 1.0 / n,
    }


def accuracy(logits: Tensor, target: Tensor) -> float:
    """Fraction of rows whose highest logit is the target class. logits [N, C], target long [N]."""
    return (logits.argmax(dim=-1) == target).float().mean().item()


def mean_average_precision(scores: Tensor, targets: Tensor) -> float:
    """Mean over classes of average precision, for multi-label outputs (e.g. AudioSet mAP).

    scores: [N, C] (logits or probabilities: only the order matters); targets: [N, C] of 0/1.
    For one class, sort the N examples by descending score and take the precision (positives so
    far / examples so far) at the position of every positive; AP is their mean, i.e. the area
    under the uninterpolated precision-recall curve (the convention of scikit-learn's
    ``average_precision_score``, except that tied scores are ordered by their input position
    rather than grouped). Classes with no positive among the N examples have no AP and are left
    out of the mean; if no class has a positive the result is NaN.
    """
    if scores.shape != targets.shape or scores.dim() != 2:
        raise ValueError(f"scores and targets must both be [N, C], got {tuple(scores.shape)} and {tuple(targets.shape)}")
    order = scores.float().argsort(dim=0, descending=True, stable=True)
    hits = targets.float().gather(0, order)  # [N, C], 1 where the k-th best example is positive
    seen = torch.arange(1, scores.shape[0] + 1, device=scores.device, dtype=torch.float32).unsqueeze(1)
    precision = hits.cumsum(dim=0) / seen
    positives = hits.sum(dim=0)
    has_positive = positives > 0
    if not has_positive.any():
        return float("nan")
    ap = (precision * hits).sum(dim=0)[has_positive] / positives[has_positive]
    return ap.mean().item()
