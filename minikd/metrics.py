"""Metrics for segmentation, calibration, uncertainty and depth, plus cost counters.

What each paper reports, in one place:

=====================================  ===================================================
metric                                 used by
=====================================  ===================================================
``SegmentationMeter`` (mIoU, IoU, acc)  every notebook (streaming confusion matrix)
``ece``                                EMUFormer §4 (top-label, 15 equal-width bins)
``uncertainty_accuracy``               EMUFormer §4 after Mukhoti & Gal: p(accurate|certain),
                                       p(uncertain|inaccurate), PAvPU
``auroc`` / ``average_precision`` /    error and unknown-object detection from an uncertainty
``fpr_at_95_tpr``                      score (higher score = more likely positive)
``class_wise_uncertainty``             DUDES Table 2 (mUnc per predicted class)
``removal_curve(_area)``               DUDES Fig. 4 (mIoU after dropping uncertain pixels)
``depth_metrics``,                     EMUFormer §4: RMSE, AbsRel, δ1/δ2/δ3 and Eq. 13
``depth_uncertainty_accuracy``
``sparsification_curve`` / ``ause``    depth uncertainty ranking (Ilg et al. 2018, Poggi 2020)
``entropy`` / ``mutual_information``   total and epistemic uncertainty of an ensemble
``count_parameters`` / ``count_flops``  DUDES Table 3, EMUFormer Table 1
/ ``time_inference``
=====================================  ===================================================

Shapes follow the repo convention: probabilities [B, C, H, W]; labels, predictions, scores and
uncertainty [B, H, W] (a single image [H, W] / [C, H, W] is accepted too); ignore label 255.
Every metric pools *pixels* over the whole batch (not a mean of per-image values), except the
uncertainty threshold of ``uncertainty_accuracy``, which is chosen per image as EMUFormer does.
Scalar results are Python floats; per-class results are float64 tensors on the CPU.

Bad input fails early with a message that says what was received, never with a NaN or a deep
torch error. The checks are shared (``check_labels``, ``check_probabilities``; losses.py and
ensembles.py use them too): labels and predictions may have any integer dtype (uint8 PNGs
included) but must lie in 0..C-1 (labels may also be ``ignore_index``); probabilities must be
finite, >= 0 and sum to 1 over the class dim (within 1e-2 for float16, 1e-3 for float32), so
logits are refused; a ``valid`` mask should be bool (True = use the pixel) and is converted with
``.bool()`` if it is an integer or floating mask holding only 0 and 1.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "SegmentationMeter",
    "auroc",
    "ause",
    "average_precision",
    "check_labels",
    "check_probabilities",
    "class_wise_uncertainty",
    "count_flops",
    "count_parameters",
    "depth_metrics",
    "depth_uncertainty_accuracy",
    "detection_metrics",
    "ece",
    "entropy",
    "fpr_at_95_tpr",
    "mutual_information",
    "removal_curve",
    "removal_curve_area",
    "sparsification_curve",
    "time_inference",
    "uncertainty_accuracy",
]

Threshold = str | float


# --------------------------------------------------------------------------------------------
# input checks shared by every metric (and by losses.py, ensembles.py)
# --------------------------------------------------------------------------------------------
def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{n} {s}" for n, s in shapes.items())
        hint = ""
        if any(len(s) == 4 for s in shapes.values()):
            hint = " Did you pass logits [B, C, H, W] where a map was expected? Use .argmax(1)."
        raise ValueError(f"shape mismatch: {listed}; expected all equal ([B, H, W] or [H, W]).{hint}")


def _check_integer(t: object, name: str) -> None:
    """TypeError unless ``t`` is a tensor of an integer dtype (class indices)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices; got "
                        f"{type(t).__name__}. Convert with torch.as_tensor(...).long().")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        hint = (" If these are class scores [B, C, H, W], take .argmax(1) first."
                if t.is_floating_point() else "")
        raise TypeError(f"{name} must be an integer tensor of class indices; got dtype "
                        f"{t.dtype}. Convert it with {name}.long().{hint}")


@torch.no_grad()
def check_labels(labels: Tensor, num_classes: int, ignore_index: int | None = 255,
                 name: str = "labels") -> None:
    """Raise unless ``labels`` holds class indices 0..num_classes-1 (or ``ignore_index``).

    Any integer dtype passes (uint8 label PNGs, int32, int64); the metrics use it as it is, while
    ``losses.cross_entropy`` converts it with ``.long()`` after this check (torch's loss needs
    int64). Costs one reduction over the tensor.

    Args:
        labels: class indices, any shape (e.g. [B, H, W]).
        num_classes: C.
        ignore_index: the void label that is also allowed (None: none allowed, e.g. for
            predictions).
        name: the argument's name, for the message.

    Raises:
        TypeError: ``labels`` is not an integer tensor (float, bool or not a tensor).
        ValueError: a value outside 0..C-1 that is not ``ignore_index``; the message lists the
            offending values.
    """
    _check_integer(labels, name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int; got {num_classes!r}.")
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        bad &= labels != ignore_index
    if bool(bad.any()):
        values = torch.unique(labels[bad])[:8].tolist()
        allowed = f"0..{num_classes - 1}" + (
            f" or {ignore_index} (ignore)" if ignore_index is not None else "")
        raise ValueError(
            f"{name} contain {values}; expected {allowed}. Did you pass Cityscapes labelIds "
            "instead of trainIds, or set num_classes too small?"
        )


def _default_atol(dtype: torch.dtype) -> float:
    """Tolerance on Σ_c p_c = 1: 1e-2 for float16/bfloat16 (e.g. a TeacherCache), else 1e-3."""
    return 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3


@torch.no_grad()
def check_probabilities(probs: Tensor, dim: int = 1, name: str = "probs",
                        atol: float | None = None, valid: Tensor | None = None) -> None:
    """Raise a ValueError unless ``probs`` are finite, non-negative and sum to 1 over ``dim``.

    Catches logits, log-probabilities and unnormalised scores passed where probabilities are
    expected (they would otherwise give NaN or a plausible but wrong number). Costs a min/max and
    one sum over the tensor (the sum is accumulated in float32).

    Args:
        probs: floating tensor, e.g. [B, C, H, W].
        dim: the class dimension (2 for stacked members [M, B, C, H, W]).
        name: the argument's name, for the message.
        atol: allowed |Σ_c p_c − 1|; default 1e-2 for float16/bfloat16 inputs (cached teacher
            probabilities, rounded to 2**-11 per value) and 1e-3 for float32/float64.
        valid: optional bool mask of the pixels to check, the shape of ``probs`` without ``dim``
            (e.g. ``~ignore_mask``); crop padding, whose cached probabilities are all 0, is left
            out this way.

    Raises:
        TypeError: ``probs`` is not a floating-point tensor.
        ValueError: with the range of values and of the sums that was received.
    """
    if not isinstance(probs, Tensor) or not probs.is_floating_point():
        got = f"dtype {probs.dtype}" if isinstance(probs, Tensor) else type(probs).__name__
        raise TypeError(f"{name} must be a floating-point tensor of probabilities; got {got}.")
    if probs.numel() == 0:
        return
    tol = _default_atol(probs.dtype) if atol is None else float(atol)
    sums = probs.sum(dim, dtype=torch.promote_types(probs.dtype, torch.float32))
    if valid is not None:
        sums = sums[valid.to(sums.device)]
    lo, hi = (float(v) for v in torch.aminmax(probs))
    s_lo, s_hi = (float(v) for v in torch.aminmax(sums)) if sums.numel() else (1.0, 1.0)
    finite = math.isfinite(lo) and math.isfinite(hi) and math.isfinite(s_lo + s_hi)
    if finite and lo >= 0 and abs(s_lo - 1) <= tol and abs(s_hi - 1) <= tol:
        return
    problem = ("contain NaN or inf" if not finite else "contain negative values" if lo < 0
               else f"do not sum to 1 over dim {dim}")
    raise ValueError(
        f"{name} {problem}: got values in [{lo:.4g}, {hi:.4g}] of shape {tuple(probs.shape)}, "
        f"sums over dim {dim} in [{s_lo:.4g}, {s_hi:.4g}]; expected finite probabilities >= 0 "
        f"that sum to 1 (within {tol:g}) over dim {dim}. Did you pass logits? Apply "
        f".softmax({dim}) first (and normalise any other scores)."
    )


def _valid_mask(valid: Tensor, like: Tensor, like_name: str, name: str = "valid") -> Tensor:
    """The validity mask as bool, the shape of ``like``; ValueError otherwise.

    A bool mask is used as it is; an integer or floating mask holding only 0 and 1 is converted
    with ``.bool()`` (e.g. ``(labels != 255).float()``); any other value is rejected rather than
    guessed (0.5 is neither in nor out).
    """
    if not isinstance(valid, Tensor):
        raise TypeError(f"{name} must be a bool tensor (True = use the pixel); got "
                        f"{type(valid).__name__}.")
    _check_same_shape(**{like_name: like, name: valid})
    if valid.dtype == torch.bool:
        return valid
    if bool(((valid != 0) & (valid != 1)).any()):
        values = torch.unique(valid[(valid != 0) & (valid != 1)])[:5].tolist()
        raise ValueError(f"{name} has dtype {valid.dtype} and holds {values}; expected a bool "
                         "mask (True = use the pixel), or 0/1 values. Build it with e.g. "
                         "`labels != 255`.")
    return valid.bool()


def _pixel_maps(*maps: Tensor) -> tuple[Tensor, ...]:
    """Bring [H, W] maps to [1, H, W]; leave [B, H, W] alone."""
    out = []
    for m in maps:
        if m.dim() == 2:
            m = m.unsqueeze(0)
        if m.dim() != 3:
            raise ValueError(
                f"expected a per-pixel map [B, H, W] or [H, W], got shape {tuple(m.shape)}."
            )
        out.append(m)
    return tuple(out)


def _confusion(pred: Tensor, labels: Tensor, num_classes: int,
               ignore_index: int | None = None) -> Tensor:
    """Confusion matrix [C, C] (rows = true class, columns = predicted) of the pixels whose
    label is not ``ignore_index``. Ignored pixels go to an extra bin that is dropped, which is
    several times faster than selecting the valid pixels first (two boolean compactions)."""
    c2 = num_classes**2
    idx = labels.reshape(-1).long() * num_classes + pred.reshape(-1).long()
    if ignore_index is not None:
        idx = idx.masked_fill_(labels.reshape(-1) == ignore_index, c2)
    return torch.bincount(idx, minlength=c2 + 1)[:c2].reshape(num_classes, num_classes)


def _iou(confusion: Tensor) -> Tensor:
    """Per-class IoU = TP / (TP + FP + FN); NaN where a class is in neither labels nor preds."""
    conf = confusion.double().cpu()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def _nanmean(x: Tensor) -> float:
    return float(x.nanmean()) if bool((~x.isnan()).any()) else float("nan")


# --------------------------------------------------------------------------------------------
# segmentation quality
# --------------------------------------------------------------------------------------------
class SegmentationMeter:
    """Streaming confusion matrix giving mIoU, per-class IoU and pixel accuracy.

    Feed it batch after batch with ``update`` and read the result with ``compute``; the result
    equals that of one big batch (the matrix is a sum of ``torch.bincount`` counts).

    **Absent classes.** IoU_c = TP / (TP + FP + FN). A class that appears neither in the labels
    nor in the predictions has 0/0: its IoU is NaN and it is *excluded* from the mean (mIoU is
    the ``nanmean`` over classes). A class that is predicted but never labelled has IoU 0 and
    counts. torchmetrics' ``MulticlassJaccardIndex`` instead scores such a class 0 by default
    (``zero_division=0``), which lowers its mean on small images.

    Args:
        num_classes: number of classes C; labels and predictions must be in 0..C-1.
        ignore_index: label of void pixels (not counted anywhere).

    References:
        Everingham et al., "The PASCAL VOC Challenge" (IJCV 2010) for the IoU; DUDES Table 1,
        EMUFormer §4 report mIoU. Taught in notebooks/01_vanilla_kd_temperature.ipynb onwards.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        """Forget every pixel seen so far."""
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: Tensor, labels: Tensor) -> None:
        """Add a batch.

        Args:
            pred: predicted classes [B, H, W] or [H, W] (integer), or class scores
                [B, C, H, W] (logits or probabilities; the argmax over dim 1 is taken).
            labels: true classes [B, H, W] or [H, W], 0..C-1 or ``ignore_index``.
        """
        scores = pred.is_floating_point() and pred.dim() == labels.dim() + 1
        if scores:
            dim = 1 if pred.dim() == 4 else 0
            if pred.shape[dim] != self.num_classes:
                raise ValueError(f"pred has {pred.shape[dim]} class scores per pixel (shape "
                                 f"{tuple(pred.shape)}) but the meter counts "
                                 f"{self.num_classes} classes; build it with "
                                 f"SegmentationMeter({pred.shape[dim]}) or pass the argmax.")
            pred = pred.max(dim).indices  # = argmax(dim), 3-4x faster on a CPU
        _check_same_shape(pred=pred, labels=labels)
        check_labels(labels, self.num_classes, self.ignore_index)
        if not scores:  # an argmax over num_classes scores is in range by construction
            check_labels(pred, self.num_classes, None, name="pred")
        counts = _confusion(pred, labels, self.num_classes, self.ignore_index)
        self.confusion += counts.cpu()

    def compute(self) -> dict[str, float | Tensor]:
        """Metrics of everything seen since the last ``reset``.

        Returns:
            ``{"miou": float, "iou": Tensor[C] (float64, NaN for absent classes),
            "pixel_acc": float, "confusion": Tensor[C, C] (int64, rows = true class)}``.
            With no pixel seen, every value is NaN.
        """
        iou = _iou(self.confusion)
        total = int(self.confusion.sum())
        acc = float(self.confusion.diag().sum()) / total if total else float("nan")
        return {"miou": _nanmean(iou), "iou": iou, "pixel_acc": acc,
                "confusion": self.confusion.clone()}


# --------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------
def _top_label(probs: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Confidence and correctness (float32, 1-D) of the top class over valid pixels.

    Accepts probs [B, C, H, W] / labels [B, H, W], one image [C, H, W] / [H, W], or [N, C] / [N].
    """
    if probs.dim() == 3 and labels.dim() == 2:  # one image [C, H, W] with [H, W]
        probs, labels = probs.unsqueeze(0), labels.unsqueeze(0)
    if probs.dim() != labels.dim() + 1 or probs.shape[2:] != labels.shape[1:] or \
            probs.shape[0] != labels.shape[0]:
        raise ValueError(
            f"probs {tuple(probs.shape)} and labels {tuple(labels.shape)} do not fit; expected "
            "probs [B, C, H, W] with labels [B, H, W] (or [C, H, W] with [H, W])."
        )
    check_probabilities(probs, dim=1, name="probs")
    check_labels(labels, probs.shape[1], ignore_index)
    conf, pred = probs.max(1)
    valid = labels != ignore_index
    return conf[valid].float(), (pred[valid] == labels[valid]).float()


@torch.no_grad()
def ece(probs: Tensor, labels: Tensor, n_bins: int = 15, ignore_index: int = 255) -> float:
    """Expected calibration error of the top label, pooled over all valid pixels.

    ECE = Σ_b (n_b / N) · |acc_b − conf_b| over ``n_bins`` equal-width confidence bins
    [k/M, (k+1)/M). Binning matches torchmetrics' ``MulticlassCalibrationError(norm="l1")``
    exactly: ``bucketize(conf, linspace(0, 1, M+1), right=True) - 1``, so bins are closed on the
    left and open on the right and a confidence of exactly 1.0 (a one-hot prediction) falls in
    its own extra bin rather than in the last one.

    Args:
        probs: class probabilities [B, C, H, W] (or [C, H, W]); not logits.
        labels: true classes [B, H, W] (or [H, W]), 0..C-1 or ``ignore_index``.
        n_bins: number of equal-width bins M (15 as in Guo et al. and torchmetrics).
        ignore_index: label of pixels left out.

    Returns:
        ECE in [0, 1] as a float; NaN if no pixel is valid.

    References:
        Guo et al., "On Calibration of Modern Neural Networks" (ICML 2017), Eq. 3; EMUFormer §4.
        Taught in notebook 04 (EMUFormer).
    """
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}.")
    conf, correct = _top_label(probs, labels, ignore_index)
    if conf.numel() == 0:
        return float("nan")
    edges = torch.linspace(0, 1, n_bins + 1, dtype=conf.dtype, device=conf.device)
    idx = torch.bucketize(conf, edges, right=True) - 1  # conf == 1.0 -> bin n_bins
    count = torch.bincount(idx, minlength=n_bins + 1).double()
    conf_sum = torch.bincount(idx, weights=conf.double(), minlength=n_bins + 1)
    acc_sum = torch.bincount(idx, weights=correct.double(), minlength=n_bins + 1)
    return float((acc_sum - conf_sum).abs().sum() / count.sum())


# --------------------------------------------------------------------------------------------
# accuracy versus certainty (Mukhoti & Gal)
# --------------------------------------------------------------------------------------------
def _median(x: Tensor) -> Tensor:
    """The usual median: mean of the two middle values for an even count."""
    v = x.sort().values
    n = v.numel()
    return (v[(n - 1) // 2] + v[n // 2]) / 2


def _image_thresholds(uncertainty: Tensor, valid: Tensor, threshold: Threshold) -> Tensor:
    """One threshold per image [B] (float64): mean/median of its valid pixels, or a number."""
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        return torch.full((uncertainty.shape[0],), float(threshold), dtype=torch.float64)
    if threshold not in ("mean", "median"):
        raise ValueError(f"threshold must be 'mean', 'median' or a number, got {threshold!r}.")
    reduce = torch.mean if threshold == "mean" else _median
    out = []
    for u, v in zip(uncertainty, valid):
        out.append(float(reduce(u[v].double())) if bool(v.any()) else float("nan"))
    return torch.tensor(out, dtype=torch.float64)


def _accuracy_vs_certainty(
    accurate: Tensor, uncertainty: Tensor, valid: Tensor, threshold: Threshold
) -> dict[str, float | int | Tensor]:
    thr = _image_thresholds(uncertainty, valid, threshold)
    certain = uncertainty.double() < thr.to(uncertainty.device).view(-1, 1, 1)  # ties: uncertain
    acc, cer = accurate[valid], certain[valid]
    counts = {"n_ac": int((acc & cer).sum()), "n_au": int((acc & ~cer).sum()),
              "n_ic": int((~acc & cer).sum()), "n_iu": int((~acc & ~cer).sum())}
    return {**_certainty_ratios(counts), **counts, "threshold": thr}


def _certainty_ratios(c: dict[str, int]) -> dict[str, float]:
    """p(accurate|certain), p(uncertain|inaccurate) and PAvPU of the four counts (NaN for 0/0);
    also what ``training.evaluate`` computes from counts summed over batches."""
    def ratio(num: int, den: int) -> float:
        return num / den if den else float("nan")

    return {"p_accurate_certain": ratio(c["n_ac"], c["n_ac"] + c["n_ic"]),
            "p_uncertain_inaccurate": ratio(c["n_iu"], c["n_ic"] + c["n_iu"]),
            "pavpu": ratio(c["n_ac"] + c["n_iu"], c["n_ac"] + c["n_au"] + c["n_ic"] + c["n_iu"])}


@torch.no_grad()
def uncertainty_accuracy(
    uncertainty: Tensor,
    pred: Tensor,
    labels: Tensor,
    threshold: Threshold = "mean",
    ignore_index: int = 255,
) -> dict[str, float | int | Tensor]:
    """p(accurate|certain), p(uncertain|inaccurate) and PAvPU of pixel-wise uncertainty.

    A valid pixel is *accurate* if ``pred == label`` and *certain* if its uncertainty is
    **strictly below** the threshold of its image; a pixel whose uncertainty equals the threshold
    counts as uncertain (Mukhoti & Gal: "uncertain if u ≥ u_T"). With the counts n_ac
    (accurate & certain), n_au, n_ic, n_iu pooled over the batch:

    * p(accurate|certain) = n_ac / (n_ac + n_ic)
    * p(uncertain|inaccurate) = n_iu / (n_ic + n_iu)
    * PAvPU = (n_ac + n_iu) / (n_ac + n_au + n_ic + n_iu)

    A ratio whose denominator is 0 is NaN. Beware: google/uncertainty-baselines
    (``experimental/cityscapes/uncertainty_metrics.py``) builds its map as ``entropy >= th`` (1 =
    uncertain) and then counts ``accurate & map`` as "accurate and certain", i.e. swaps the two;
    tests/test_metrics.py pins the right orientation on a hand-counted example.

    Args:
        uncertainty: per-pixel uncertainty [B, H, W] or [H, W] (higher = less sure).
        pred: predicted classes, same shape.
        labels: true classes, same shape; ``ignore_index`` pixels are left out everywhere,
            including from the threshold.
        threshold: ``"mean"`` (default, EMUFormer §4: "the mean uncertainty of a given image") or
            ``"median"`` of each image's valid pixels, or one number for every image.
        ignore_index: label of void pixels.

    Returns:
        ``{"p_accurate_certain", "p_uncertain_inaccurate", "pavpu"}`` (floats), the counts
        ``"n_ac", "n_au", "n_ic", "n_iu"`` (ints) and ``"threshold"`` (float64 tensor [B], one per
        image; NaN for an image without valid pixels).

    References:
        Mukhoti & Gal, "Evaluating Bayesian Deep Learning Methods for Semantic Segmentation"
        (arXiv:1811.12709), §4 (pixel-wise, 1×1 patches here); EMUFormer §4.
        Taught in notebook 04 (EMUFormer).
    """
    uncertainty, pred, labels = _pixel_maps(uncertainty, pred, labels)
    _check_same_shape(uncertainty=uncertainty, pred=pred, labels=labels)
    _check_integer(pred, "pred")
    _check_integer(labels, "labels")
    valid = labels != ignore_index
    return _accuracy_vs_certainty(pred == labels, uncertainty, valid, threshold)


# --------------------------------------------------------------------------------------------
# detection of errors / unknown objects from a score (exact, tie-aware)
# --------------------------------------------------------------------------------------------
_SUBSAMPLE_SEED = 0


def _flat_scores(
    scores: Tensor, positives: Tensor, valid: Tensor | None, max_samples: int | None
) -> tuple[Tensor, Tensor]:
    _check_same_shape(scores=scores, positives=positives)
    s, p = scores.reshape(-1), positives.reshape(-1).bool()
    if valid is not None:
        keep = _valid_mask(valid, scores, "scores").reshape(-1)
        s, p = s[keep], p[keep]
    _check_no_nan(s, "scores")
    if max_samples is not None and s.numel() > max_samples:
        gen = torch.Generator().manual_seed(_SUBSAMPLE_SEED)
        idx = torch.randint(s.numel(), (max_samples,), generator=gen).to(s.device)
        s, p = s[idx], p[idx]
    return s.double(), p


def _check_no_nan(scores: Tensor, name: str) -> None:
    if bool(scores.isnan().any()):
        raise ValueError(f"{name} contain NaN; check the uncertainty map (0·log 0?).")


def _check_fractions(fractions: Sequence[float] | Tensor, name: str = "fractions") -> list[float]:
    """Removal fractions as floats, each in [0, 1]."""
    fr = torch.as_tensor(fractions, dtype=torch.float64).reshape(-1)
    if bool(((fr < 0) | (fr > 1)).any()):
        raise ValueError(f"{name} must lie in [0, 1], got {fr.tolist()}.")
    return fr.tolist()


def _binary_curve(scores: Tensor, positives: Tensor, order: Tensor | None = None,
                  stacklevel: int = 3) -> tuple[Tensor, Tensor] | None:
    """Cumulative true/false positives at each distinct threshold, from the highest score down.

    Tied scores enter together (one point per distinct value), which is what makes the
    metrics below exact under ties. Returns None (with a warning) if a class is missing.
    ``order`` (a descending sort of ``scores``, e.g. shared with the removal curve) saves the
    sort.
    """
    n_pos = int(positives.sum())
    if n_pos == 0 or n_pos == positives.numel():
        warnings.warn(
            f"{n_pos} positives among {positives.numel()} samples: the metric needs both "
            "positives and negatives; returning NaN.", stacklevel=stacklevel
        )
        return None
    if order is None:
        s, order = torch.sort(scores, descending=True)
    else:
        s = scores[order]
    pos = positives[order].double()
    last_of_run = torch.ones_like(s, dtype=torch.bool)
    last_of_run[:-1] = s[1:] != s[:-1]
    tps = pos.cumsum(0)[last_of_run]
    fps = (torch.arange(1, s.numel() + 1, device=s.device, dtype=torch.float64)[last_of_run]
           - tps)
    return tps, fps


def auroc(
    scores: Tensor,
    positives: Tensor,
    valid: Tensor | None = None,
    max_samples: int | None = None,
) -> float:
    """Area under the ROC curve (exact, ties count one half), higher score = positive.

    Args:
        scores: any shape, e.g. uncertainty [B, H, W].
        positives: bool, same shape, e.g. ``pred != labels`` (misclassification) or an OOD mask.
        valid: optional bool mask, same shape; pixels where it is False are left out (e.g.
            ``labels != 255``). Alternatively index ``scores[valid]`` yourself.
        max_samples: if set and there are more samples, use this many drawn uniformly *with
            replacement* by a fixed-seed generator (deterministic; error ~ 1/sqrt(max_samples)).

    Returns:
        AUROC in [0, 1]; NaN (with a warning) if there are no positives or no negatives.

    References:
        Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution
        Examples" (ICLR 2017). Taught in notebooks/03_dudes.ipynb and notebook 04 (EMUFormer).
    """
    curve = _binary_curve(*_flat_scores(scores, positives, valid, max_samples))
    return float("nan") if curve is None else _auroc_of(*curve)


def _auroc_of(tps: Tensor, fps: Tensor) -> float:
    tpr = torch.cat([tps.new_zeros(1), tps / tps[-1]])
    fpr = torch.cat([fps.new_zeros(1), fps / fps[-1]])
    return float(torch.trapezoid(tpr, fpr))


def average_precision(
    scores: Tensor,
    positives: Tensor,
    valid: Tensor | None = None,
    max_samples: int | None = None,
) -> float:
    """Average precision AP = Σ_k (R_k − R_{k−1}) · P_k, a step-wise sum (not the trapezoid).

    Positives are the samples with ``positives == True`` (errors, or unknown-object pixels)
    and higher scores are more likely positive; one point per distinct score (exact under
    ties, as sklearn and torchmetrics' ``BinaryAveragePrecision``). Arguments as ``auroc``.

    Returns:
        AP in [0, 1]; NaN (with a warning) if there are no positives or no negatives.

    References:
        Davis & Goadrich (ICML 2006) on PR curves. Taught in notebooks/03_dudes.ipynb and
        notebook 04 (EMUFormer).
    """
    curve = _binary_curve(*_flat_scores(scores, positives, valid, max_samples))
    return float("nan") if curve is None else _average_precision_of(*curve)


def _average_precision_of(tps: Tensor, fps: Tensor) -> float:
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    d_recall = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((d_recall * precision).sum())


def fpr_at_95_tpr(
    scores: Tensor,
    positives: Tensor,
    valid: Tensor | None = None,
    max_samples: int | None = None,
) -> float:
    """False-positive rate at the highest threshold whose true-positive rate reaches 95 %.

    A sample counts as detected if ``score >= t``; the threshold t runs over the distinct
    scores from the top, so tied samples are detected together. Arguments as ``auroc``.

    Returns:
        FPR in [0, 1] (lower is better); NaN (with a warning) without positives or negatives.

    References:
        Liang et al., "ODIN" (ICLR 2018), the FPR at 95 % TPR. Taught in notebook 04 (EMUFormer).
    """
    curve = _binary_curve(*_flat_scores(scores, positives, valid, max_samples))
    return float("nan") if curve is None else _fpr_at_95_tpr_of(*curve)


def _fpr_at_95_tpr_of(tps: Tensor, fps: Tensor) -> float:
    first = int(torch.nonzero(tps / tps[-1] >= 0.95 - 1e-12)[0])
    return float(fps[first] / fps[-1])


def detection_metrics(
    scores: Tensor,
    positives: Tensor,
    valid: Tensor | None = None,
    max_samples: int | None = None,
) -> dict[str, float]:
    """AUROC, AP and FPR@95 from one sort of the scores (the three functions above sort once
    each). Arguments as ``auroc``.

    Returns:
        ``{"auroc", "ap", "fpr95"}``, each equal to its function's result; all NaN (with one
        warning) without positives or without negatives.

    References:
        As ``auroc``, ``average_precision`` and ``fpr_at_95_tpr``. Used by
        ``training.evaluate`` for error and unknown-object detection.
    """
    return _detection_of(_binary_curve(*_flat_scores(scores, positives, valid, max_samples)))


def _detection_of(curve: tuple[Tensor, Tensor] | None) -> dict[str, float]:
    if curve is None:
        return dict.fromkeys(("auroc", "ap", "fpr95"), float("nan"))
    return {"auroc": _auroc_of(*curve), "ap": _average_precision_of(*curve),
            "fpr95": _fpr_at_95_tpr_of(*curve)}


# --------------------------------------------------------------------------------------------
# DUDES: class-wise uncertainty and the removal curve
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def class_wise_uncertainty(
    uncertainty: Tensor, pred: Tensor, num_classes: int, valid: Tensor | None = None
) -> Tensor:
    """Mean uncertainty of the pixels *predicted* as each class (DUDES Table 2, "mUnc").

    Args:
        uncertainty: [B, H, W] or [H, W].
        pred: predicted classes, same shape, 0..C-1.
        num_classes: C.
        valid: optional bool mask (e.g. ``labels != 255``); by default every pixel counts, as
            in the DUDES code (``ClassUncertainty``).

    Returns:
        float64 tensor [C]; NaN for a class that is never predicted. Its ``nanmean`` is the
        DUDES "mUnc".

    References:
        Landgraf et al., DUDES (2023), Table 2 and Table 4. Taught in notebooks/03_dudes.ipynb.
    """
    _check_same_shape(uncertainty=uncertainty, pred=pred)
    check_labels(pred, num_classes, None, name="pred")
    u, p = uncertainty.reshape(-1).double(), pred.reshape(-1).long()
    if valid is not None:
        keep = _valid_mask(valid, uncertainty, "uncertainty").reshape(-1)
        u, p = u[keep], p[keep]
    total = torch.bincount(p, weights=u, minlength=num_classes).cpu()
    count = torch.bincount(p, minlength=num_classes).cpu().double()
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


@torch.no_grad()
def removal_curve(
    uncertainty: Tensor,
    pred: Tensor,
    labels: Tensor,
    num_classes: int,
    fractions: Sequence[float] | Tensor,
    ignore_index: int = 255,
) -> Tensor:
    """mIoU after ignoring the most uncertain fraction of pixels (DUDES Fig. 4).

    The valid pixels of the *whole batch* are sorted by uncertainty, most uncertain first, and
    for each fraction f the first ``round(f · N)`` are dropped before the mIoU is recomputed
    (same rules as ``SegmentationMeter``: classes left with no pixel drop out of the mean).
    Meaningful uncertainty gives a rising curve. Tied uncertainties are broken by a stable
    sort, i.e. in flattened (batch, row, column) order. Removing every pixel (f = 1) gives NaN.

    Args:
        uncertainty: [B, H, W] or [H, W].
        pred: predicted classes, same shape.
        labels: true classes, same shape; ``ignore_index`` pixels never count.
        num_classes: C.
        fractions: fractions in [0, 1], e.g. ``[0, 0.1, ..., 0.9]``.
        ignore_index: label of void pixels.

    Returns:
        float64 tensor [len(fractions)] of mIoU values.

    References:
        Landgraf et al., DUDES (2023), §5, Fig. 4. Taught in notebooks/03_dudes.ipynb.
    """
    uncertainty, pred, labels = _pixel_maps(uncertainty, pred, labels)
    _check_same_shape(uncertainty=uncertainty, pred=pred, labels=labels)
    check_labels(labels, num_classes, ignore_index)
    check_labels(pred, num_classes, None, name="pred")
    fr = _check_fractions(fractions)
    valid = labels != ignore_index
    order = torch.sort(uncertainty[valid], descending=True, stable=True).indices
    return _removal_of(pred[valid][order], labels[valid][order], num_classes, fr)


def _removal_of(pred: Tensor, labels: Tensor, num_classes: int,
                fractions: Sequence[float]) -> Tensor:
    """``removal_curve`` of valid pixels already sorted by uncertainty, most uncertain first."""
    n = pred.numel()
    mious = [_nanmean(_iou(_confusion(pred[round(f * n):], labels[round(f * n):], num_classes)))
             for f in fractions]
    return torch.tensor(mious, dtype=torch.float64)


def removal_curve_area(fractions: Sequence[float] | Tensor, mious: Sequence[float] | Tensor) -> float:
    """Normalised area under a removal curve: trapezoid rule divided by the fraction span.

    The result is the curve's *average* mIoU over [min f, max f], so curves sampled over
    different spans stay comparable and the value lies in [0, 1] (1 = perfect everywhere).

    Args:
        fractions: increasing fractions, as given to ``removal_curve`` (at least two).
        mious: the curve, same length; must not contain NaN (drop f = 1).

    Returns:
        The normalised area as a float.

    References:
        DUDES Fig. 4 (the curve; the area is minikd's one-number summary).
        Taught in notebooks/03_dudes.ipynb.
    """
    f = torch.as_tensor(fractions, dtype=torch.float64).reshape(-1)
    m = torch.as_tensor(mious, dtype=torch.float64).reshape(-1)
    if f.numel() != m.numel() or f.numel() < 2:
        raise ValueError(
            f"need at least two fractions and as many mIoU values, got {f.numel()} and {m.numel()}."
        )
    if bool((torch.diff(f) <= 0).any()):
        raise ValueError(f"fractions must be strictly increasing, got {f.tolist()}.")
    if bool(m.isnan().any()):
        raise ValueError(
            f"mious contain NaN at fractions {f[m.isnan()].tolist()} (no pixel left?); "
            "use fractions < 1."
        )
    return float(torch.trapezoid(m, f) / (f[-1] - f[0]))


# --------------------------------------------------------------------------------------------
# depth (EMUFormer)
# --------------------------------------------------------------------------------------------
def _depth_inputs(pred: Tensor, target: Tensor, valid: Tensor | None) -> tuple[Tensor, ...]:
    _check_same_shape(pred=pred, target=target)
    valid = target > 0 if valid is None else _valid_mask(valid, target, "target")
    if bool((target[valid] <= 0).any()):
        raise ValueError("target depth must be > 0 on valid pixels; mark 0 = invalid in `valid`.")
    return pred.double(), target.double(), valid


def _ratio(p: Tensor, t: Tensor) -> Tensor:
    """max(p/t, t/p), the quantity of EMUFormer Eq. 13 (inf where p <= 0)."""
    ratio = torch.maximum(p / t, t / p)
    return torch.where(p > 0, ratio, torch.full_like(ratio, float("inf")))


@torch.no_grad()
def depth_metrics(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> dict[str, float]:
    """RMSE, absolute relative error and δ-accuracies over the valid pixels of a batch.

    rmse = sqrt(mean (p − t)²), abs_rel = mean |p − t| / t, δ_k = fraction of pixels with
    max(p/t, t/p) < 1.25^k (k = 1, 2, 3). Pixels are pooled over the batch (not averaged per
    image first); a non-positive prediction counts as inaccurate for every δ.

    Args:
        pred: predicted depth [B, H, W] (metres).
        target: true depth, same shape.
        valid: bool mask, same shape; default ``target > 0``.

    Returns:
        ``{"rmse", "abs_rel", "delta1", "delta2", "delta3"}`` as floats (NaN if nothing valid).

    References:
        Eigen et al. (NeurIPS 2014) for the set; EMUFormer §4 and Eq. 13 (δ1 threshold 1.25).
        Taught in notebook 04 (EMUFormer).
    """
    pred, target, valid = _depth_inputs(pred, target, valid)
    p, t = pred[valid], target[valid]
    if p.numel() == 0:
        return dict.fromkeys(("rmse", "abs_rel", "delta1", "delta2", "delta3"), float("nan"))
    ratio = _ratio(p, t)
    out = {"rmse": float(((p - t) ** 2).mean().sqrt()), "abs_rel": float(((p - t).abs() / t).mean())}
    for k in (1, 2, 3):
        out[f"delta{k}"] = float((ratio < 1.25**k).double().mean())
    return out


@torch.no_grad()
def depth_uncertainty_accuracy(
    pred_depth: Tensor,
    target: Tensor,
    uncertainty: Tensor,
    valid: Tensor | None = None,
    threshold: Threshold = "mean",
) -> dict[str, float | int | Tensor]:
    """p(accurate|certain), p(uncertain|inaccurate), PAvPU for depth (EMUFormer Eq. 13).

    A valid pixel is *accurate* if max(p/t, t/p) < 1.25 (δ1) and *certain* if its uncertainty
    (e.g. the predictive variance) is strictly below its image's threshold; see
    ``uncertainty_accuracy`` for the counts, the tie rule and the return value.

    Args:
        pred_depth: [B, H, W] or [H, W].
        target: true depth, same shape.
        uncertainty: same shape.
        valid: bool mask, same shape; default ``target > 0``.
        threshold: ``"mean"`` (EMUFormer), ``"median"`` or a number.

    Returns:
        As ``uncertainty_accuracy``.

    References:
        Landgraf et al., EMUFormer (2024), §4, Eq. 13. Taught in notebook 04 (EMUFormer).
    """
    if valid is None:
        valid = target > 0
    pred_depth, target, uncertainty, valid = _pixel_maps(pred_depth, target, uncertainty, valid)
    _check_same_shape(pred_depth=pred_depth, target=target, uncertainty=uncertainty)
    pred_depth, target, valid = _depth_inputs(pred_depth, target, valid)
    accurate = torch.zeros_like(valid)
    accurate[valid] = _ratio(pred_depth[valid], target[valid]) < 1.25
    return _accuracy_vs_certainty(accurate, uncertainty, valid, threshold)


_SPARSIFICATION_ERRORS = ("rmse", "abs_rel")


def _fractions(fractions: Sequence[float] | Tensor | None) -> list[float]:
    """Validated removal fractions in [0, 1), strictly increasing (default 0, 0.05, ..., 0.95)."""
    fr = [i / 20 for i in range(20)] if fractions is None else \
        torch.as_tensor(fractions, dtype=torch.float64).reshape(-1).tolist()
    increasing = all(a < b for a, b in itertools.pairwise(fr))
    if len(fr) < 2 or any(not 0 <= f < 1 for f in fr) or not increasing:
        raise ValueError(f"fractions={fr}; expected at least two strictly increasing fractions "
                         "in [0, 1) (1 would remove every pixel), e.g. [0, 0.1, ..., 0.9].")
    return fr


def _pixel_errors(p: Tensor, t: Tensor, error: str) -> Tensor:
    """Per-pixel error whose mean gives the metric: squared error (RMSE) or |p − t|/t."""
    if error not in _SPARSIFICATION_ERRORS:
        raise ValueError(f"error={error!r}; expected one of {list(_SPARSIFICATION_ERRORS)}.")
    return (p - t) ** 2 if error == "rmse" else (p - t).abs() / t


def _sparsified(err: Tensor, key: Tensor, fractions: Sequence[float], error: str) -> Tensor:
    """One image: the metric of the pixels left after removing the floor(f·n) largest ``key``."""
    e = err[torch.sort(key, descending=True, stable=True).indices]
    suffix = e.flip(0).cumsum(0).flip(0)  # suffix[k] = Σ e[k:], the pixels kept
    n = e.numel()
    removed = torch.tensor([math.floor(f * n) for f in fractions])
    mean = suffix[removed] / (n - removed).double()
    return mean.sqrt() if error == "rmse" else mean


@torch.no_grad()
def sparsification_curve(
    pred_depth: Tensor,
    target: Tensor,
    uncertainty: Tensor | None,
    fractions: Sequence[float] | Tensor | None = None,
    valid: Tensor | None = None,
    error: str = "rmse",
) -> Tensor:
    """Depth error of the pixels kept after removing the most uncertain ones, per fraction.

    Per image, the valid pixels are sorted by uncertainty, most uncertain first (ties broken by a
    stable sort, in row-major order), and for each fraction f the first floor(f·n) are removed;
    the error (RMSE or AbsRel) of the remaining pixels is computed, and the curve is the mean of
    these per-image errors over the images that have valid pixels. ``uncertainty=None`` gives
    the *oracle* curve, which removes the pixels with the largest true error first (the best any
    uncertainty can do). The errors are not normalised by the value at f = 0.

    Args:
        pred_depth: predicted depth [B, H, W] or [H, W].
        target: true depth, same shape.
        uncertainty: same shape (e.g. the predictive variance), or None for the oracle.
        fractions: strictly increasing fractions in [0, 1); default 0, 0.05, ..., 0.95.
        valid: bool mask, same shape; default ``target > 0``.
        error: "rmse" or "abs_rel".

    Returns:
        float64 tensor [len(fractions)] (NaN if no image has a valid pixel).

    References:
        Ilg et al., "Uncertainty Estimates and Multi-Hypotheses Networks for Optical Flow"
        (ECCV 2018), sparsification plots; Poggi et al., "On the Uncertainty of Self-Supervised
        Monocular Depth Estimation" (CVPR 2020), AUSE per image. A depth-uncertainty check to
        go with EMUFormer §4. Taught in notebook 04 (EMUFormer, planned).
    """
    fr = _fractions(fractions)
    if valid is None:
        valid = target > 0
    maps = (pred_depth, target, valid) if uncertainty is None else \
        (pred_depth, target, valid, uncertainty)
    pred_depth, target, valid, *rest = _pixel_maps(*maps)
    if rest:
        _check_same_shape(pred_depth=pred_depth, target=target, uncertainty=rest[0])
    pred_depth, target, valid = _depth_inputs(pred_depth, target, valid)
    curves = []
    for i in range(pred_depth.shape[0]):
        keep = valid[i]
        if not bool(keep.any()):
            continue
        err = _pixel_errors(pred_depth[i][keep], target[i][keep], error)
        key = err if not rest else rest[0][i][keep].double()
        if bool(key.isnan().any()):
            raise ValueError("the uncertainty map contains NaN on valid depth pixels.")
        curves.append(_sparsified(err, key, fr, error))
    if not curves:
        return torch.full((len(fr),), float("nan"), dtype=torch.float64)
    return torch.stack(curves).mean(0)


@torch.no_grad()
def ause(
    pred_depth: Tensor,
    target: Tensor,
    uncertainty: Tensor,
    fractions: Sequence[float] | Tensor | None = None,
    valid: Tensor | None = None,
    error: str = "rmse",
) -> float:
    """Area Under the Sparsification Error: area between the uncertainty and oracle curves.

    AUSE = ∫ (curve(f) − oracle(f)) df / (f_max − f_min), by the trapezoid rule over
    ``fractions`` (``sparsification_curve`` with and without the uncertainty), i.e. the mean gap
    over the fraction range, in the units of the error (metres for RMSE). 0 = the uncertainty
    ranks the pixels as well as their true errors do; lower is better.

    Args:
        pred_depth, target, uncertainty, fractions, valid, error: as ``sparsification_curve``.

    Returns:
        AUSE as a float (NaN if no valid pixel).

    References:
        Ilg et al. (ECCV 2018); Poggi et al. (CVPR 2020). Taught in notebook 04 (EMUFormer,
        planned).
    """
    fr = _fractions(fractions)
    gap = (sparsification_curve(pred_depth, target, uncertainty, fr, valid, error)
           - sparsification_curve(pred_depth, target, None, fr, valid, error))
    f = torch.tensor(fr, dtype=torch.float64)
    return float(torch.trapezoid(gap, f) / (f[-1] - f[0]))


# --------------------------------------------------------------------------------------------
# entropy and mutual information
# --------------------------------------------------------------------------------------------
def entropy(probs: Tensor, dim: int = 1) -> Tensor:
    """Shannon entropy H[p] = −Σ_c p_c log p_c in nats (0 · log 0 = 0).

    Args:
        probs: probabilities, e.g. [B, C, H, W].
        dim: the class dimension.

    Returns:
        The entropy with ``dim`` reduced, e.g. [B, H, W]; at most log C.

    Raises:
        ValueError: ``probs`` are not probabilities over ``dim`` (e.g. logits; see
            ``check_probabilities``).

    References:
        EMUFormer Eq. 3 (predictive entropy). Taught in notebooks/03_dudes.ipynb and notebook 04.
    """
    check_probabilities(probs, dim=dim, name="probs")
    return _entropy(probs, dim)


def _entropy(probs: Tensor, dim: int) -> Tensor:
    """``entropy`` without the input check."""
    return -torch.special.xlogy(probs, probs).sum(dim)


def mutual_information(member_probs: Tensor, dim: int = 1) -> Tensor:
    """Mutual information I = H[mean_m p_m] − mean_m H[p_m], clamped at 0 (epistemic part).

    Total uncertainty H[p̄] splits into the expected member entropy (aleatoric) and I, the
    disagreement between members (a Jensen–Shannon divergence): identical members give 0.

    Args:
        member_probs: [M, B, C, H, W], members along dim 0.
        dim: the class dimension of *one member's* tensor (1 for [B, C, H, W]).

    Returns:
        [B, H, W] (the member and class dims reduced), ≥ 0.

    References:
        Depeweg et al. (ICML 2018); Gal's thesis §3.3. Taught in notebooks/03_dudes.ipynb.
    """
    if member_probs.dim() < 2:
        raise ValueError(f"member_probs must be [M, B, C, ...], got {tuple(member_probs.shape)}.")
    member_dim = dim + 1 if dim >= 0 else dim
    check_probabilities(member_probs, dim=member_dim, name="member_probs")
    total = _entropy(member_probs.mean(0), dim=dim)
    aleatoric = _entropy(member_probs, dim=member_dim).mean(0)
    return (total - aleatoric).clamp_min(0)


# --------------------------------------------------------------------------------------------
# cost: parameters, FLOPs, time
# --------------------------------------------------------------------------------------------
def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters, as in DUDES Table 3 and EMUFormer Table 1.

    Same as ``minikd.models.count_parameters`` (kept here so metrics need not import models).

    Args:
        model: the model.
        trainable_only: count only parameters with ``requires_grad``.

    Returns:
        The count.

    References:
        DUDES Table 3. Taught in notebooks/03_dudes.ipynb.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_flops(model: Callable[..., object], x: Tensor | tuple[Tensor, ...]) -> int:
    """FLOPs of one forward pass, counted by ``torch.utils.flop_counter.FlopCounterMode``.

    One multiply-add counts as 2 FLOPs (so a Conv2d costs 2·C_in·C_out·k²·H_out·W_out; its
    bias, activations and normalisations are not counted, only matmul/conv-like operators).

    Args:
        model: a module or any callable.
        x: its input, or a tuple of inputs.

    Returns:
        Total FLOPs as an int.

    References:
        EMUFormer Table 1 (GFLOPs). Taught in notebook 04 (EMUFormer).
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(*x) if isinstance(x, tuple) else model(x)
    return int(counter.get_total_flops())


def time_inference(
    model_or_fn: Callable[..., object],
    x: Tensor | tuple[Tensor, ...],
    warmup: int = 3,
    repeats: int = 10,
) -> tuple[float, float]:
    """Wall-clock time of one forward pass: mean ± std over ``repeats`` after ``warmup`` runs.

    Runs under ``torch.inference_mode``; a module is switched to eval mode for the
    measurement and restored afterwards. On a GPU (input on CUDA) every run is bracketed by
    ``torch.cuda.synchronize`` so the asynchronous kernels are included.

    Args:
        model_or_fn: a module or any callable taking ``x``.
        x: its input (or a tuple of inputs), already on the target device.
        warmup: untimed runs first (cuDNN autotuning, allocator, lazy init).
        repeats: timed runs (DUDES Table 3 uses 25).

    Returns:
        ``(mean_ms, std_ms)``; std is the sample standard deviation (0 for one repeat).

    References:
        DUDES Table 3 (inference time, mean ± std of 25 runs). Timed in benchmarks/ and taught
        in notebooks/03_dudes.ipynb.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}.")
    args = x if isinstance(x, tuple) else (x,)
    cuda = any(isinstance(a, Tensor) and a.is_cuda for a in args)
    was_training = isinstance(model_or_fn, nn.Module) and model_or_fn.training
    if was_training:
        model_or_fn.eval()
    times = []
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model_or_fn(*args)
                if cuda:
                    torch.cuda.synchronize()
                if i >= warmup:
                    times.append((time.perf_counter() - start) * 1e3)
    finally:
        if was_training:
            model_or_fn.train()
    return statistics.mean(times), statistics.stdev(times) if len(times) > 1 else 0.0
