"""Each loss against numbers worked out by hand with math.exp/log on tiny inputs."""
import math

import pytest
import torch
import torch.nn.functional as F

from avdsl import ops
from avdsl.compiler import resolve
from avdsl.runtime import losses
from avdsl.runtime.losses import (
    bce,
    ce,
    focal_contrastive,
    masked_mse,
    mil_nce,
    nce,
    next_token,
    patchify,
    unpatchify,
)


def nll(positives, negatives):
    """-log(sum exp positives / (sum exp positives + sum exp negatives))."""
    pos = sum(math.exp(s) for s in positives)
    neg = sum(math.exp(s) for s in negatives)
    return -math.log(pos / (pos + neg))


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


# a and b, with rows scaled so that the losses must normalise them. After normalising:
#   a = [[1, 0], [0, 1]],  b = [[1, 0], [0.6, 0.8]],  cosine matrix S = [[1, 0.6], [0, 0.8]]
A = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
B = torch.tensor([[2.0, 0.0], [3.0, 4.0]])
S = [[1.0, 0.6], [0.0, 0.8]]


def test_nce_one_direction_and_both():
    a_to_b = (nll([1.0], [0.6]) + nll([0.8], [0.0])) / 2  # rows of S
    b_to_a = (nll([1.0], [0.0]) + nll([0.8], [0.6])) / 2  # columns of S
    assert nce(A, B, tau=1.0, both=False).item() == pytest.approx(a_to_b, rel=1e-5)
    assert nce(A, B, tau=1.0).item() == pytest.approx((a_to_b + b_to_a) / 2, rel=1e-5)
    assert a_to_b != pytest.approx(b_to_a)


def test_nce_temperature_scales_the_logits():
    tau = 0.5
    expected = (nll([1.0 / tau], [0.6 / tau]) + nll([0.8 / tau], [0.0])) / 2
    assert nce(A, B, tau=tau, both=False).item() == pytest.approx(expected, rel=1e-5)
    # a learnable temperature given as a tensor works the same way
    assert nce(A, B, tau=torch.tensor(tau), both=False).item() == pytest.approx(expected, rel=1e-5)


def test_mil_nce_with_two_captions_per_clip():
    video = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[[1.0, 0.0], [0.5, 0.0]], [[0.0, 2.0], [1.0, 1.0]]])  # [N=2, K=2, D=2]
    # dot products v_i . t_jk (no normalisation by default):
    #   clip 0: own captions 1, 0.5; others 0, 1      clip 1: own captions 2, 1; others 0, 0
    expected = (nll([1.0, 0.5], [0.0, 1.0]) + nll([2.0, 1.0], [0.0, 0.0])) / 2
    assert mil_nce(video, text, tau=1.0).item() == pytest.approx(expected, rel=1e-5)
    tau = 0.5
    expected_tau = (nll([2.0, 1.0], [0.0, 2.0]) + nll([4.0, 2.0], [0.0, 0.0])) / 2
    assert mil_nce(video, text, tau=tau).item() == pytest.approx(expected_tau, rel=1e-5)
    # both=True adds the pairs (v_j, t_ik), j != i: for clip 0 v1.t00 = 0, v1.t01 = 0,
    # for clip 1 v0.t10 = 0, v0.t11 = 1
    expected_both = (nll([1.0, 0.5], [0.0, 1.0, 0.0, 0.0]) + nll([2.0, 1.0], [0.0, 0.0, 0.0, 1.0])) / 2
    assert mil_nce(video, text, tau=1.0, both=True).item() == pytest.approx(expected_both, rel=1e-5)


def test_mil_nce_with_one_caption_is_one_directional_nce():
    got = mil_nce(A, B, tau=0.3, normalize=True)
    assert got.item() == pytest.approx(nce(A, B, tau=0.3, both=False).item(), rel=1e-5)
    # the [N, D] and [N, 1, D] forms agree
    assert mil_nce(A, B.unsqueeze(1), tau=0.3).item() == pytest.approx(mil_nce(A, B, tau=0.3).item())


def test_focal_with_gamma_zero_is_sigmoid_bce_over_the_matrix_divided_by_n():
    positives = [-math.log(sigmoid(S[0][0])), -math.log(sigmoid(S[1][1]))]
    negatives = [-math.log(1 - sigmoid(S[0][1])), -math.log(1 - sigmoid(S[1][0]))]
    expected = (sum(positives) + sum(negatives)) / 2
    got = focal_contrastive(A, B, tau=1.0, gamma=0.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_focal_weights_easy_pairs_down_and_balances_with_alpha():
    bias = -1.0
    terms = []
    for i in range(2):
        for j in range(2):
            p = sigmoid(S[i][j] + bias)
            if i == j:
                terms.append((0.25, (1 - p) ** 2 * -math.log(p)))
            else:
                terms.append((0.75, p**2 * -math.log(1 - p)))
    got = focal_contrastive(A, B, tau=1.0, gamma=2.0, bias=torch.tensor(bias))
    assert got.item() == pytest.approx(sum(t for _, t in terms) / 2, rel=1e-5)
    got = focal_contrastive(A, B, tau=1.0, gamma=2.0, alpha=0.25, bias=bias)
    assert got.item() == pytest.approx(sum(w * t for w, t in terms) / 2, rel=1e-5)


def test_masked_mse_scores_only_masked_patches():
    target = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 6.0, 6.0]]])  # [N=1, P=2, K=4]
    pred = torch.tensor([[[1.0, 2.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0]]])
    mask = torch.tensor([[1.0, 0.0]])  # patch 0 masked, patch 1 kept
    # only patch 0 counts: (4 - 2)^2 / 4
    assert masked_mse(pred, target, mask, norm_pix=False).item() == pytest.approx(1.0)
    other = pred.clone()
    other[0, 1] = torch.tensor([9.0, -9.0, 3.0, 7.0])
    assert masked_mse(other, target, mask, norm_pix=False).item() == pytest.approx(1.0)
    # masking both patches averages over them: patch 1 error = (25 + 25 + 36 + 36) / 4
    both = torch.tensor([[1.0, 1.0]])
    assert masked_mse(pred, target, both, norm_pix=False).item() == pytest.approx((1.0 + 30.5) / 2)
    assert masked_mse(pred, target, both, norm_pix=False, reduction="sum").item() == pytest.approx(1.0 + 30.5)
    # nothing masked: zero, not NaN
    assert masked_mse(pred, target, torch.zeros(1, 2), norm_pix=False).item() == 0.0


def test_masked_mse_normalises_each_target_patch():
    target = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    mask = torch.ones(1, 1)
    # mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3; predicting 0 gives
    # mean of (x - 2.5)^2 / (5/3 + eps) = (5 / 4) / (5/3 + eps)
    expected = 1.25 / (5 / 3 + 1e-6)
    assert masked_mse(torch.zeros(1, 1, 4), target, mask).item() == pytest.approx(expected, rel=1e-6)
    normalised = [(x - 2.5) / math.sqrt(5 / 3 + 1e-6) for x in (1.0, 2.0, 3.0, 4.0)]
    exact = torch.tensor([[normalised]])
    assert masked_mse(exact, target, mask).item() == pytest.approx(0.0, abs=1e-10)


def test_ce_with_and_without_label_smoothing():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    target = torch.tensor([0, 2])
    z0 = math.log(math.exp(2) + 2)
    z1 = math.log(2 + math.exp(1))
    nll0, nll1 = z0 - 2.0, z1 - 0.0
    assert ce(logits, target).item() == pytest.approx((nll0 + nll1) / 2, rel=1e-6)
    # smoothing eps: (1 - eps) * nll + eps * mean over classes of -log p_c
    eps = 0.1
    uniform0 = (3 * z0 - 2.0) / 3
    uniform1 = (3 * z1 - 1.0) / 3
    expected = ((1 - eps) * nll0 + eps * uniform0 + (1 - eps) * nll1 + eps * uniform1) / 2
    assert ce(logits, target, label_smoothing=eps).item() == pytest.approx(expected, rel=1e-6)


def test_ce_and_bce_sum_reductions_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    label = torch.tensor([0, 2])
    by_hand = (math.log(2 + math.exp(2)) - 2) + math.log(2 + math.exp(1))  # -log softmax of each target
    assert ce(logits, label, reduction="sum").item() == pytest.approx(by_hand, rel=1e-6)
    assert ce(logits, label).item() == pytest.approx(by_hand / 2, rel=1e-6)
    target = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    per = [math.log1p(math.exp(-x)) if t else math.log1p(math.exp(x)) for row, trow in zip(logits.tolist(), target.tolist())
           for x, t in zip(row, trow)]  # -log sigmoid(x) for positives, -log(1 - sigmoid(x)) for negatives
    assert bce(logits, target, reduction="sum").item() == pytest.approx(sum(per), rel=1e-6)
    assert bce(logits, target, reduction="sum_classes").item() == pytest.approx(sum(per) / 2, rel=1e-6)
    assert bce(logits, target).item() == pytest.approx(sum(per) / 6, rel=1e-6)


def test_bce_is_a_mean_over_all_elements():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 3.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    terms = [
        -math.log(sigmoid(0.0)),
        -math.log(1 - sigmoid(2.0)),
        -math.log(1 - sigmoid(-1.0)),
        -math.log(sigmoid(3.0)),
    ]
    assert bce(logits, target).item() == pytest.approx(sum(terms) / 4, rel=1e-6)


def test_bce_sum_classes_sums_over_classes_and_averages_over_the_batch():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 3.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    rows = [-math.log(sigmoid(0.0)) - math.log(1 - sigmoid(2.0)), -math.log(1 - sigmoid(-1.0)) - math.log(sigmoid(3.0))]
    assert bce(logits, target, reduction="sum_classes").item() == pytest.approx(sum(rows) / 2, rel=1e-6)


def test_losses_keep_float64():
    a, b = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    for value in (nce(a, b), bce(a, (b > 0).double()), masked_mse(a.view(2, 2, 8), b.view(2, 2, 8), torch.ones(2, 2))):
        assert value.dtype == torch.float64
    exact = F.binary_cross_entropy_with_logits(a, (b > 0).double())
    assert bce(a, (b > 0).double()).item() == exact.item()  # not rounded through float32


def test_next_token_shifts_and_ignores_padding():
    tokens = torch.tensor([[1, 2, 4, 0], [1, 3, 0, 0]])  # pad = 0
    logits = torch.zeros(2, 4, 5)
    logits[0, 0] = torch.tensor([0.0, 0.0, 2.0, 0.0, 0.0])  # predicts 2 (right)
    logits[0, 1] = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])  # predicts 4 (right)
    logits[1, 0] = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])  # should predict 3
    z2 = math.log(4 + math.exp(2))
    z1 = math.log(4 + math.exp(1))
    expected = ((z2 - 2) + (z1 - 1) + (z1 - 0)) / 3  # three real targets: 2, 4 and 3
    assert next_token(logits, tokens).item() == pytest.approx(expected, rel=1e-6)
    assert next_token(logits, tokens, reduction="sum").item() == pytest.approx(3 * expected, rel=1e-6)
    # predictions at positions whose target is padding (and the last position) do not count
    noisy = logits.clone()
    noisy[0, 2:] = torch.randn(2, 5)
    noisy[1, 1:] = torch.randn(3, 5)
    assert next_token(noisy, tokens).item() == pytest.approx(expected, rel=1e-6)


def test_next_token_with_only_padding_is_zero():
    assert next_token(torch.randn(1, 3, 5), torch.tensor([[1, 0, 0]])).item() == 0.0


def test_patchify_small_image_by_hand():
    x = torch.arange(8.0).reshape(1, 1, 2, 4)  # rows [0 1 2 3], [4 5 6 7]
    assert patchify(x, 2).tolist() == [[[0, 1, 4, 5], [2, 3, 6, 7]]]
    # two channels: channel varies fastest inside a patch
    x2 = torch.stack([x[0, 0], 10 * x[0, 0]]).unsqueeze(0)  # [1, 2, 2, 4]
    assert patchify(x2, 2)[0, 0].tolist() == [0, 0, 1, 10, 4, 40, 5, 50]


def test_patchify_matches_a_pixel_picking_conv2d():
    c, ph, pw = 2, 2, 3
    x = torch.randn(2, c, 4, 6)
    conv = torch.nn.Conv2d(c, ph * pw * c, kernel_size=(ph, pw), stride=(ph, pw), bias=False)
    weight = torch.zeros_like(conv.weight)
    for i in range(ph):
        for j in range(pw):
            for k in range(c):
                weight[(i * pw + j) * c + k, k, i, j] = 1.0
    conv.weight.data = weight
    expected = conv(x).flatten(2).transpose(1, 2)
    assert torch.equal(patchify(x, (ph, pw)), expected)


def test_patchify_matches_a_pixel_picking_conv3d():
    c, pt, ph, pw = 3, 2, 2, 2
    x = torch.randn(1, c, 4, 4, 6)
    d = pt * ph * pw * c
    conv = torch.nn.Conv3d(c, d, kernel_size=(pt, ph, pw), stride=(pt, ph, pw), bias=False)
    weight = torch.zeros_like(conv.weight)
    for s in range(pt):
        for i in range(ph):
            for j in range(pw):
                for k in range(c):
                    weight[((s * ph + i) * pw + j) * c + k, k, s, i, j] = 1.0
    conv.weight.data = weight
    expected = conv(x).flatten(2).transpose(1, 2)
    assert torch.equal(patchify(x, (pt, ph, pw)), expected)
    # an int patch means the same size along every axis
    assert torch.equal(patchify(x[..., :4], 2), patchify(x[..., :4], (2, 2, 2)))


def test_patchify_spectrogram_and_round_trip():
    spec = torch.randn(2, 8, 6)
    assert torch.equal(patchify(spec, 2), patchify(spec.unsqueeze(1), 2))
    for x, p in [(spec, 2), (torch.randn(2, 3, 4, 6), (2, 3)), (torch.randn(1, 3, 4, 4, 6), (2, 2, 3))]:
        assert torch.equal(unpatchify(patchify(x, p), p, tuple(x.shape)), x)


def test_patchify_rejects_sizes_that_do_not_divide():
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 3, 5, 4), 2)
    with pytest.raises(ValueError, match="has 2 sizes, input needs 3"):
        patchify(torch.zeros(1, 3, 4, 4, 4), (2, 2))


def _example_args():
    torch.manual_seed(0)
    n, d = 4, 8
    return {
        "nce": (torch.randn(n, d), torch.randn(n, d)),
        "mil_nce": (torch.randn(n, d), torch.randn(n, 2, d)),
        "focal_contrastive": (torch.randn(n, d), torch.randn(n, d)),
        "masked_mse": (torch.randn(n, 6, d), torch.randn(n, 6, d), (torch.rand(n, 6) > 0.5).float()),
        "ce": (torch.randn(n, 5), torch.randint(0, 5, (n,))),
        "bce": (torch.randn(n, 5), (torch.rand(n, 5) > 0.5).float()),
        "next_token": (torch.randn(n, 6, 11), torch.randint(0, 11, (n, 6))),
    }


# every loss operator of the catalogue, by name, as the generated code calls it
LOSSES = {op.name: resolve(op.function) for op in ops.of_category("loss")}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_run_in_float32_under_bf16_autocast(name):
    args = _example_args()[name]
    # float inputs as a bf16 forward pass would produce them (0/1 targets and masks are exact)
    low = tuple(a.bfloat16() if a.is_floating_point() else a for a in args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = LOSSES[name](*low)
    reference = LOSSES[name](*(a.float() if a.is_floating_point() else a for a in low))
    assert got.dtype == torch.float32
    assert got.dim() == 0
    assert torch.isfinite(got)
    # computed in float32 from the same inputs: equal up to float32 rounding
    assert got.item() == pytest.approx(reference.item(), rel=1e-5)


def test_every_loss_operator_names_a_documented_runtime_function():
    assert set(LOSSES) == {"nce", "mil_nce", "focal_contrastive", "masked_mse", "ce", "bce", "next_token"}
    assert LOSSES["nce"] is nce and LOSSES["bce"] is bce
    for name, fn in LOSSES.items():
        assert fn.__module__ == losses.__name__, name
        assert fn.__doc__ and fn.__doc__.strip().splitlines()[0], name


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_computes_in_float64_given_float64(name):
    """float64 in, float64 out, and float64 all the way through: finite-difference gradients agree
    with autograd only when nothing is rounded through float32 (gradcheck's eps is 1e-6)."""
    args = tuple(a.double().requires_grad_() if a.is_floating_point() and i < 2 else
                 a.double() if a.is_floating_point() else a for i, a in enumerate(_example_args()[name]))
    value = LOSSES[name](*args)
    assert value.dtype == torch.float64 and value.dim() == 0
    if name in ("bce",):  # its targets are 0/1 labels, not a function input
        args = (args[0], args[1].detach())
    assert torch.autograd.gradcheck(lambda *xs: LOSSES[name](*xs, *args[len(xs):]),
                                    tuple(a for a in args if a.requires_grad))


@pytest.mark.parametrize("fn, arg, value", [(nce, "tau", 0.07), (focal_contrastive, "tau", 0.07),
                                             (focal_contrastive, "bias", -2.0), (mil_nce, "tau", 0.07)])
def test_a_learned_float32_scalar_keeps_float64(fn, arg, value):
    a, b = (x.double() for x in _example_args()["nce"])
    learned = torch.nn.Parameter(torch.tensor(value))  # a learned scalar in float32, as the model holds it
    assert fn(a, b, **{arg: learned}).dtype == torch.float64
    assert fn(a, b, **{arg: learned}).item() == pytest.approx(fn(a, b, **{arg: value}).item(), rel=1e-6)
