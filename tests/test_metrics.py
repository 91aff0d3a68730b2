"""Tests for minikd.metrics: torchmetrics as the oracle where one exists, hand counts elsewhere."""

import math

import pytest
import torch
from torch import nn
from torchmetrics.classification import (
    BinaryAUROC,
    BinaryAveragePrecision,
    MulticlassCalibrationError,
    MulticlassJaccardIndex,
)

from minikd import metrics

C = 5


def _random_seg(seed: int, b: int = 2, h: int = 16, w: int = 24, absent: int | None = 4):
    """Random labels/preds with some 255 pixels; class `absent` in neither."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (b, h, w), generator=g)
    pred = torch.randint(0, C, (b, h, w), generator=g)
    if absent is not None:
        labels[labels == absent] = 0
        pred[pred == absent] = 1
    labels[torch.rand(b, h, w, generator=g) < 0.15] = 255
    return pred, labels


# ------------------------------------------------------------------ segmentation
def test_meter_matches_torchmetrics_with_ignore_and_absent_class():
    pred, labels = _random_seg(0)
    meter = metrics.SegmentationMeter(C)
    meter.update(pred, labels)
    out = meter.compute()
    oracle = MulticlassJaccardIndex(C, average="none", ignore_index=255)(pred, labels).double()
    present = torch.tensor([c != 4 for c in range(C)])
    torch.testing.assert_close(out["iou"][present], oracle[present])
    assert math.isnan(out["iou"][4])  # absent from labels and predictions
    assert out["miou"] == pytest.approx(float(oracle[present].mean()))  # excluded from the mean
    valid = labels != 255
    assert out["pixel_acc"] == pytest.approx(float((pred[valid] == labels[valid]).double().mean()))
    assert int(out["confusion"].sum()) == int(valid.sum())


def test_meter_predicted_but_unlabelled_class_counts_as_zero():
    meter = metrics.SegmentationMeter(3)
    meter.update(torch.tensor([[0, 2]]), torch.tensor([[0, 0]]))  # class 2 predicted, never true
    out = meter.compute()
    assert out["iou"][0] == pytest.approx(0.5) and out["iou"][2] == 0 and math.isnan(out["iou"][1])
    assert out["miou"] == pytest.approx(0.25)


def test_meter_streaming_equals_one_batch_and_reset():
    pred, labels = _random_seg(1, b=6)
    whole, parts = metrics.SegmentationMeter(C), metrics.SegmentationMeter(C)
    whole.update(pred, labels)
    for i in range(0, 6, 2):
        parts.update(pred[i:i + 2], labels[i:i + 2])
    parts.update(pred[0], torch.full_like(labels[0], 255))  # a fully void [H, W] image adds nothing
    a, b = whole.compute(), parts.compute()
    assert torch.equal(a["confusion"], b["confusion"]) and a["miou"] == b["miou"]
    parts.reset()
    assert math.isnan(parts.compute()["miou"])


def test_meter_accepts_logits_and_rejects_bad_input():
    pred, labels = _random_seg(2)
    logits = torch.nn.functional.one_hot(pred, C).permute(0, 3, 1, 2).float()
    m1, m2 = metrics.SegmentationMeter(C), metrics.SegmentationMeter(C)
    m1.update(pred, labels)
    m2.update(logits, labels)
    assert torch.equal(m1.compute()["confusion"], m2.compute()["confusion"])
    labels[0, 0, 0], labels[0, 0, 1] = 37, -1
    with pytest.raises(ValueError, match=r"\[-1, 37\]"):
        m1.update(pred, labels)
    with pytest.raises(ValueError, match="shape"):
        m1.update(pred[:, :4], labels)


# ------------------------------------------------------------------ calibration
def test_ece_matches_torchmetrics_random():
    g = torch.Generator().manual_seed(3)
    probs = (3 * torch.randn(2, C, 8, 12, generator=g)).softmax(1)
    labels = torch.randint(0, C, (2, 8, 12), generator=g)
    labels[:, :2] = 255
    oracle = MulticlassCalibrationError(C, n_bins=15, norm="l1", ignore_index=255)(probs, labels)
    assert metrics.ece(probs, labels) == pytest.approx(float(oracle), abs=1e-6)
    assert metrics.ece(probs[0], labels[0]) == pytest.approx(
        float(MulticlassCalibrationError(C, norm="l1", ignore_index=255)(probs[:1], labels[:1])),
        abs=1e-6)


def test_ece_confidence_exactly_one_has_own_bin():
    # 4 one-hot pixels (conf 1.0, 3 right, 1 wrong) + 4 pixels of conf 0.96 (last bin, all right).
    probs = torch.zeros(1, 2, 2, 4)
    probs[0, 0, 0, :] = 1.0
    probs[0, 1, 0, :] = 0.0
    probs[0, 0, 1, :] = 0.96
    probs[0, 1, 1, :] = 0.04
    labels = torch.tensor([[[0, 0, 0, 1], [0, 0, 0, 0]]])
    # own bin: |0.75 - 1| * 4/8 + |1 - 0.96| * 4/8 = 0.145; merged bin would give |0.875-0.98| = 0.105
    assert metrics.ece(probs, labels) == pytest.approx(0.145, abs=1e-6)
    oracle = MulticlassCalibrationError(2, n_bins=15, norm="l1", ignore_index=255)(probs, labels)
    assert metrics.ece(probs, labels) == pytest.approx(float(oracle), abs=1e-6)


def test_ece_rejects_logits():
    with pytest.raises(ValueError, match="softmax"):
        metrics.ece(torch.randn(1, 3, 4, 4) * 5, torch.zeros(1, 4, 4, dtype=torch.long))


# ------------------------------------------------------------------ accuracy vs certainty
# Hand-counted 2x4 image (pixel index p = row * 4 + column):
#   pred        = [[0, 1, 1, 2], [2, 0, 0, 1]]
#   labels      = [[0, 1, 2, 2], [0, 0, 1, 255]]
#   accurate    =   A  A  I  A    I  A  I  (ignored)
#   uncertainty = [[.1, .2, .9, .4], [.3, .6, .8, 2.0]]     (the ignored pixel's 2.0 must not count)
# mean of the 7 valid values = 3.3 / 7 = 0.4714 -> certain: p0 A, p1 A, p3 A, p4 I
#   n_ac = 3 (p0 p1 p3), n_ic = 1 (p4), n_au = 1 (p5), n_iu = 2 (p2 p6)
#   p(acc|cert) = 3/4, p(unc|inacc) = 2/3, PAvPU = 5/7
# median of .1 .2 .3 .4 .6 .8 .9 = 0.4 -> certain (strictly below): p0 A, p1 A, p4 I; p3 (= 0.4) is
#   uncertain by the tie rule: n_ac = 2, n_ic = 1, n_au = 2 (p3 p5), n_iu = 2
#   p(acc|cert) = 2/3, p(unc|inacc) = 2/3, PAvPU = 4/7
# threshold 0.7 -> certain: p0 A, p1 A, p3 A, p4 I, p5 A: n_ac = 4, n_ic = 1, n_au = 0, n_iu = 2
#   p(acc|cert) = 4/5, p(unc|inacc) = 2/3, PAvPU = 6/7
# (with the ignored pixel's 2.0 in the mean, 0.6625, p5 would turn certain: n_ac = 4.)
PRED = torch.tensor([[0, 1, 1, 2], [2, 0, 0, 1]])
LABELS = torch.tensor([[0, 1, 2, 2], [0, 0, 1, 255]])
UNC = torch.tensor([[0.1, 0.2, 0.9, 0.4], [0.3, 0.6, 0.8, 2.0]])


@pytest.mark.parametrize(
    ("threshold", "counts", "ratios"),
    [
        ("mean", (3, 1, 1, 2), (3 / 4, 2 / 3, 5 / 7)),
        ("median", (2, 2, 1, 2), (2 / 3, 2 / 3, 4 / 7)),
        (0.7, (4, 0, 1, 2), (4 / 5, 2 / 3, 6 / 7)),
    ],
)
def test_uncertainty_accuracy_hand_counted(threshold, counts, ratios):
    out = metrics.uncertainty_accuracy(UNC, PRED, LABELS, threshold=threshold)
    assert (out["n_ac"], out["n_au"], out["n_ic"], out["n_iu"]) == counts
    got = (out["p_accurate_certain"], out["p_uncertain_inaccurate"], out["pavpu"])
    assert got == pytest.approx(ratios)
    # [B, H, W] gives the same as [H, W]
    batched = metrics.uncertainty_accuracy(UNC[None], PRED[None], LABELS[None], threshold)
    assert batched["pavpu"] == out["pavpu"]


def test_uncertainty_accuracy_not_swapped():
    """uncertainty-baselines counts accurate & (u >= th) as n_ac; that would give 1/3 here."""
    acc = PRED == LABELS
    swapped_certain = UNC >= 3.3 / 7
    valid = LABELS != 255
    swapped_n_ac = int((acc & swapped_certain & valid).sum())
    swapped = swapped_n_ac / int((swapped_certain & valid).sum())
    assert swapped == pytest.approx(1 / 3)
    assert metrics.uncertainty_accuracy(UNC, PRED, LABELS)["p_accurate_certain"] == 0.75
    # uncertainty = error indicator is perfect: p(acc|cert) = p(unc|inacc) = PAvPU = 1
    perfect = metrics.uncertainty_accuracy((PRED != LABELS).float(), PRED, LABELS)
    assert perfect["p_accurate_certain"] == perfect["p_uncertain_inaccurate"] == perfect["pavpu"] == 1


def test_uncertainty_accuracy_threshold_is_per_image():
    # image 0 has u 0.1/0.2, image 1 has 0.8/0.9: per-image means 0.15 and 0.85 -> one certain
    # pixel each (p0 in both); one global mean (0.5) would call all of image 0 certain.
    unc = torch.tensor([[[0.1, 0.2]], [[0.8, 0.9]]])
    pred = torch.tensor([[[0, 0]], [[0, 0]]])
    labels = torch.tensor([[[0, 1]], [[0, 1]]])
    out = metrics.uncertainty_accuracy(unc, pred, labels)
    assert (out["n_ac"], out["n_au"], out["n_ic"], out["n_iu"]) == (2, 0, 0, 2)
    torch.testing.assert_close(out["threshold"], torch.tensor([0.15, 0.85], dtype=torch.float64))
    with pytest.raises(ValueError, match="threshold"):
        metrics.uncertainty_accuracy(unc, pred, labels, threshold="max")


# ------------------------------------------------------------------ detection
def _scores(seed: int, n: int = 3000, ties: bool = False):
    g = torch.Generator().manual_seed(seed)
    positives = torch.rand(n, generator=g) < 0.3
    scores = torch.rand(n, generator=g) * 0.7 + 0.3 * positives
    if ties:
        scores = (scores * 10).round() / 10
    return scores, positives


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_and_ap_match_torchmetrics(ties):
    scores, positives = _scores(4, ties=ties)
    target = positives.long()
    assert metrics.auroc(scores, positives) == pytest.approx(
        float(BinaryAUROC()(scores, target)), abs=1e-6)
    assert metrics.average_precision(scores, positives) == pytest.approx(
        float(BinaryAveragePrecision()(scores, target)), abs=1e-6)


def test_detection_valid_mask_and_subsampling():
    scores, positives = _scores(5)
    valid = torch.arange(scores.numel()) % 3 != 0
    assert metrics.auroc(scores, positives, valid=valid) == metrics.auroc(
        scores[valid], positives[valid])
    full = metrics.auroc(scores, positives)
    sub = metrics.auroc(scores, positives, max_samples=1000)
    assert sub == metrics.auroc(scores, positives, max_samples=1000)  # deterministic
    assert abs(sub - full) < 0.05
    with pytest.warns(UserWarning, match="positives"):
        assert math.isnan(metrics.auroc(scores, torch.zeros_like(positives)))


def test_auroc_ap_small_hand_example():
    # scores 0.9(+) 0.5(+) 0.5(-) 0.1(-): pairs (+,-): 0.9>0.5, 0.9>0.1, 0.5=0.5 (1/2), 0.5>0.1
    scores = torch.tensor([0.9, 0.5, 0.5, 0.1])
    positives = torch.tensor([True, True, False, False])
    assert metrics.auroc(scores, positives) == pytest.approx(3.5 / 4)
    # thresholds 0.9: R=1/2 P=1; 0.5: R=1 P=2/3 -> AP = 1/2 * 1 + 1/2 * 2/3
    assert metrics.average_precision(scores, positives) == pytest.approx(0.5 + 1 / 3)


def test_fpr_at_95_tpr_hand_computed():
    # 20 positives: 19 scored 10..28 and one scored 0 -> TPR reaches 19/20 = 0.95 at t = 10.
    # 10 negatives: 10 (a tie with the 19th positive), 15, 25, 30 are >= 10 -> FPR = 4/10.
    pos = torch.cat([torch.arange(10, 29).float(), torch.tensor([0.0])])
    neg = torch.tensor([10.0, 15, 25, 30, -1, -2, -3, -4, -5, -6])
    scores = torch.cat([pos, neg])
    positives = torch.cat([torch.ones(20, dtype=torch.bool), torch.zeros(10, dtype=torch.bool)])
    assert metrics.fpr_at_95_tpr(scores, positives) == pytest.approx(0.4)
    # a perfect score has FPR 0
    assert metrics.fpr_at_95_tpr(positives.float(), positives) == 0.0


# ------------------------------------------------------------------ DUDES
def test_class_wise_uncertainty_by_hand():
    pred = torch.tensor([[0, 0, 1], [1, 1, 0]])
    unc = torch.tensor([[0.1, 0.3, 0.5], [0.7, 0.9, 0.2]])
    out = metrics.class_wise_uncertainty(unc, pred, 3)
    # class 0: (0.1 + 0.3 + 0.2) / 3; class 1: (0.5 + 0.7 + 0.9) / 3; class 2 never predicted
    torch.testing.assert_close(out[:2], torch.tensor([0.2, 0.7], dtype=torch.float64))
    assert math.isnan(out[2])
    valid = torch.tensor([[True, False, True], [True, True, True]])
    assert float(metrics.class_wise_uncertainty(unc, pred, 3, valid=valid)[0]) == pytest.approx(0.15)


def test_removal_curve_by_hand():
    # valid pixels p0..p3 (p4 is void with the highest uncertainty, never counted):
    #   labels 0 0 1 1, pred 0 1 1 0, unc .1 .9 .2 .8 -> removal order p1, p3, p2, p0
    # f=0: IoU0 = 1/3, IoU1 = 1/3 -> 1/3; f=.25 (drop p1): 1/2, 1/2 -> 1/2;
    # f=.5 (drop p1, p3): all right -> 1; f=.75 (only p0 left): class 1 drops out -> 1.
    labels = torch.tensor([[0, 0, 1, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 0, 0]])
    unc = torch.tensor([[0.1, 0.9, 0.2, 0.8, 5.0]])
    fractions = [0.0, 0.25, 0.5, 0.75]
    curve = metrics.removal_curve(unc, pred, labels, 2, fractions)
    torch.testing.assert_close(curve, torch.tensor([1 / 3, 0.5, 1, 1], dtype=torch.float64))
    # trapezoid: 0.25 * ((1/3 + 1/2)/2 + (1/2 + 1)/2 + 1) = 0.541667, / span 0.75 = 0.722222
    assert metrics.removal_curve_area(fractions, curve) == pytest.approx(0.25 * (5 / 12 + 0.75 + 1)
                                                                         / 0.75)
    assert math.isnan(float(metrics.removal_curve(unc, pred, labels, 2, [1.0])[0]))
    with pytest.raises(ValueError, match="NaN"):
        metrics.removal_curve_area([0.5, 1.0], [0.9, float("nan")])


def test_removal_curve_rises_for_error_indicator():
    pred, labels = _random_seg(6, b=2, h=16, w=16, absent=None)
    pred = torch.where(torch.rand(pred.shape, generator=torch.Generator().manual_seed(0)) < 0.7,
                       labels.clamp(max=C - 1), pred)  # ~70 % right
    unc = (pred != labels).float()
    fractions = torch.linspace(0, 0.9, 10)
    curve = metrics.removal_curve(unc, pred, labels, C, fractions)
    assert bool((torch.diff(curve) >= -1e-12).all()) and curve[-1] == 1.0
    rand_curve = metrics.removal_curve(torch.rand(pred.shape), pred, labels, C, fractions)
    assert metrics.removal_curve_area(fractions, curve) > metrics.removal_curve_area(
        fractions, rand_curve)


# ------------------------------------------------------------------ depth
def test_depth_metrics_by_hand():
    # valid pixels: (p, t) = (1, 1), (1.5, 1), (3.8, 2); the 4th has t = 0 (invalid)
    # ratios 1, 1.5, 1.9 -> delta1 = 1/3 (< 1.25), delta2 = 2/3 (< 1.5625), delta3 = 1 (< 1.953)
    pred = torch.tensor([[1.0, 1.5, 3.8, 3.0]])
    target = torch.tensor([[1.0, 1.0, 2.0, 0.0]])
    out = metrics.depth_metrics(pred, target)
    assert out["rmse"] == pytest.approx(math.sqrt((0 + 0.25 + 1.8**2) / 3))
    assert out["abs_rel"] == pytest.approx((0 + 0.5 + 0.9) / 3)
    assert (out["delta1"], out["delta2"], out["delta3"]) == pytest.approx((1 / 3, 2 / 3, 1.0))
    assert metrics.depth_metrics(pred, target, valid=target > 0) == out


def test_depth_uncertainty_accuracy_by_hand():
    # accurate (max ratio < 1.25): only p0. Uncertainty .4 .1 .7 (9 is invalid) -> mean 0.4:
    # certain: p1 (I); uncertain: p0 (= mean, tie -> uncertain, A), p2 (I)
    # n_ac = 0, n_au = 1, n_ic = 1, n_iu = 1 -> p(acc|cert) 0, p(unc|inacc) 1/2, PAvPU 1/3
    pred = torch.tensor([[1.0, 1.5, 3.8, 3.0]])
    target = torch.tensor([[1.0, 1.0, 2.0, 0.0]])
    unc = torch.tensor([[0.4, 0.1, 0.7, 9.0]])
    out = metrics.depth_uncertainty_accuracy(pred, target, unc)
    assert (out["n_ac"], out["n_au"], out["n_ic"], out["n_iu"]) == (0, 1, 1, 1)
    got = (out["p_accurate_certain"], out["p_uncertain_inaccurate"], out["pavpu"])
    assert got == pytest.approx((0.0, 0.5, 1 / 3))


# ------------------------------------------------------------------ entropy / MI
def test_entropy_and_mutual_information():
    uniform = torch.full((1, 4, 2, 2), 0.25)
    torch.testing.assert_close(metrics.entropy(uniform), torch.full((1, 2, 2), math.log(4)))
    onehot = torch.nn.functional.one_hot(torch.zeros(1, 2, 2, dtype=torch.long), 4)
    assert float(metrics.entropy(onehot.permute(0, 3, 1, 2).float()).abs().max()) == 0
    p = torch.rand(1, 3, 2, 2).softmax(1)
    same = torch.stack([p, p, p])
    assert float(metrics.mutual_information(same).abs().max()) < 1e-6
    a = torch.tensor([0.9, 0.1]).view(1, 2, 1, 1)
    b = torch.tensor([0.1, 0.9]).view(1, 2, 1, 1)
    mi = metrics.mutual_information(torch.stack([a, b]))
    expected = math.log(2) - (-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)))
    assert mi.shape == (1, 1, 1) and float(mi) == pytest.approx(expected) and float(mi) > 0


# ------------------------------------------------------------------ cost
def test_count_parameters_and_flops_of_conv():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert metrics.count_parameters(conv) == 3 * 8 * 9 + 8
    conv.bias.requires_grad_(False)
    assert metrics.count_parameters(conv) == 3 * 8 * 9
    assert metrics.count_parameters(conv, trainable_only=False) == 3 * 8 * 9 + 8
    h, w = 16, 20
    assert metrics.count_flops(conv, torch.randn(1, 3, h, w)) == 2 * 3 * 8 * 3**2 * h * w


def test_time_inference_positive_and_restores_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout())
    mean_ms, std_ms = metrics.time_inference(model, torch.randn(1, 3, 16, 16), warmup=1, repeats=3)
    assert mean_ms > 0 and std_ms >= 0 and model.training
    mean_ms, std_ms = metrics.time_inference(lambda x: x * 2, torch.randn(4), warmup=0, repeats=1)
    assert mean_ms > 0 and std_ms == 0


def test_ece_flat_samples():
    g = torch.Generator().manual_seed(7)
    probs = torch.randn(50, C, generator=g).softmax(1)
    labels = torch.randint(0, C, (50,), generator=g)
    oracle = MulticlassCalibrationError(C, n_bins=15, norm="l1")(probs, labels)
    assert metrics.ece(probs, labels) == pytest.approx(float(oracle), abs=1e-6)
