"""Evaluation metrics on tiny hand-made cases."""
import math

import pytest
import torch

from avdsl.runtime.metrics import accuracy, mean_average_precision, retrieval


def test_perfect_retrieval():
    x = torch.eye(4) * 3.0
    got = retrieval(x, x)
    assert got == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0, "median_rank": 1.0, "chance_r1": 0.25}


def test_retrieval_with_known_ranks():
    # every query is the same unit vector; key i sits at angle 0.1 * rank_i[i] - 0.1 from it, so
    # the correct key of query i is ranked exactly rank_i[i] by cosine similarity
    ranks = [3, 1, 12, 7, 5, 2, 9, 11, 4, 6, 10, 8]
    n = len(ranks)
    angles = torch.tensor([0.1 * (r - 1) for r in ranks])
    key = torch.stack([angles.cos(), angles.sin()], dim=1) * 2.0
    query = torch.tensor([[1.0, 0.0]]).repeat(n, 1)
    got = retrieval(query, key)
    assert got["R@1"] == pytest.approx(1 / 12)
    assert got["R@5"] == pytest.approx(5 / 12)
    assert got["R@10"] == pytest.approx(10 / 12)
    assert got["median_rank"] == pytest.approx(6.5)  # ranks 1..12: middle two are 6 and 7
    assert got["chance_r1"] == pytest.approx(1 / 12)


def test_retrieval_of_shuffled_keys_finds_only_fixed_points():
    torch.manual_seed(0)
    query = torch.randn(6, 64)
    perm = torch.tensor([0, 2, 1, 3, 5, 4])  # fixed points: 0 and 3
    got = retrieval(query, query[perm])
    assert got["R@1"] == pytest.approx(2 / 6)


def test_ties_count_against_the_query():
    same = torch.ones(5, 3)
    got = retrieval(same, same)
    assert got["R@1"] == 0.0
    assert got["median_rank"] == 5.0


def test_retrieval_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"query and key must both be \[N, D\]"):
        retrieval(torch.zeros(3, 4), torch.zeros(4, 4))


def test_accuracy():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [5.0, 0.0, 0.0], [0.0, 2.0, 1.0]])
    target = torch.tensor([0, 2, 1, 1])
    assert accuracy(logits, target) == pytest.approx(3 / 4)


def test_average_precision_of_a_hand_example():
    scores = torch.tensor([[0.9], [0.8], [0.1]])
    labels = torch.tensor([[1], [0], [1]])
    # positives at positions 1 and 3: precisions 1/1 and 2/3
    assert mean_average_precision(scores, labels) == pytest.approx((1 / 1 + 2 / 3) / 2)


def test_map_averages_classes_and_skips_those_without_positives():
    scores = torch.tensor([[0.9, 0.3, 0.2], [0.8, 0.1, 0.5], [0.1, 0.7, 0.9]])
    labels = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 0, 0]])
    # class 0: (1 + 2/3) / 2; class 1: no positive, left out;
    # class 2: order 0.9 (neg), 0.5 (pos), 0.2 (pos) -> (1/2 + 2/3) / 2
    expected = ((1 + 2 / 3) / 2 + (1 / 2 + 2 / 3) / 2) / 2
    assert mean_average_precision(scores, labels) == pytest.approx(expected)


def test_map_without_any_positive_is_nan():
    assert math.isnan(mean_average_precision(torch.rand(4, 2), torch.zeros(4, 2)))


def test_map_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"scores and targets must both be \[N, C\]"):
        mean_average_precision(torch.rand(4, 2), torch.zeros(4, 3))
