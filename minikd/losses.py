"""Distillation losses for segmentation and depth, each written as its paper writes it.

Pixel-wise Hinton KD and its reduction conventions (notebook 01), channel-wise distillation,
the SKD pair-wise and IFVD feature losses and SKD's adversarial holistic loss (WGAN-GP
discriminator; fair baselines, notebook 06), the DUDES uncertainty loss (RMSLE) and the
EMUFormer multi-task loss (CE + GNLL + KL + RMSLE).

Shapes follow the repo convention: logits/probabilities [B, C, H, W]; labels, uncertainty,
depth and masks [B, H, W]; ignore label 255. Every loss is computed in float32 (inputs under
autocast are upcast), treats the teacher as a constant (teacher tensors are detached) and
rejects mismatched shapes with a ValueError naming both shapes.

Where a loss takes an ``ignore_mask`` (bool [B, H, W], True = ignore) the mean runs over the
valid pixels only; if *every* pixel is ignored the loss is 0 (still attached to the graph, so a
crop made only of void pixels trains nothing instead of producing NaN).

Crop padding: ``data.RandomCrop`` pads every floating map with 0, cached teacher targets too
(zero logits would be a *uniform* target), and marks the padding in the batch's validity map
``batch["valid"]`` (bool [B, H, W], False = padding). Every distillation loss object below
(``DistillationLoss``, ``DUDESLoss``, ``EMUFormerLoss``, ``ClassWiseUncertaintyLoss``) leaves
those pixels out of each of its teacher-target terms; a batch without "valid" (no crop) is
treated as before. The labels are padded with 255 and ground-truth depth with 0, so the
cross-entropy and the depth NLL skip the padding on their own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minikd.metrics import check_labels, check_probabilities

__all__ = [
    "DEPTH_LOSSES",
    "KD_CONVENTIONS",
    "ClassWiseUncertaintyLoss",
    "DUDESLoss",
    "DepthGNLLLoss",
    "DistillationLoss",
    "EMUFormerLoss",
    "HolisticLoss",
    "SKDDiscriminator",
    "SegDepthLoss",
    "StructuredKDLoss",
    "alpha_mix",
    "ce_plus_kd",
    "cross_entropy",
    "cwd_loss",
    "depth_gnll_loss",
    "depth_regression_loss",
    "dudes_loss",
    "emuformer_loss",
    "ensemble_kl_loss",
    "ifvd_loss",
    "kd_convention_factor",
    "kd_loss",
    "kd_loss_reduction",
    "rmsle_loss",
    "skd_pairwise_loss",
    "wgan_gp_penalty",
]

# --------------------------------------------------------------------------- validation helpers


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} has shape {_shape(a)} but {name_b} has shape {_shape(b)}; they must be "
            "equal. Resize one of them (e.g. F.interpolate the logits to the label size) first."
        )


def _check_ndim(x: Tensor, ndim: int, name: str, layout: str) -> None:
    if x.ndim != ndim:
        raise ValueError(f"{name} has shape {_shape(x)}; expected {ndim} dims {layout}.")


def _check_temperature(temperature: float) -> None:
    if not float(temperature) > 0:  # also rejects NaN
        raise ValueError(
            f"temperature={temperature!r}; expected a number > 0 (1.0 = no softening, "
            "Niemann et al. use 1-16)."
        )


def _check_mask(mask: Tensor | None, like: Tensor, name: str) -> None:
    """``like`` is a [B, H, W] tensor (or [B, C, H, W], whose C is dropped)."""
    if mask is None:
        return
    expected = (like.shape[0], *like.shape[-2:])
    if mask.dtype != torch.bool or _shape(mask) != expected:
        raise ValueError(
            f"{name} has shape {_shape(mask)} and dtype {mask.dtype}; expected a bool tensor of "
            f"shape {expected} (True = ignore/invalid as documented). Build one with e.g. "
            "`labels == 255`."
        )


def _masked_mean(values: Tensor, ignore_mask: Tensor | None) -> Tensor:
    """Mean of ``values`` [B, H, W] over pixels where ``ignore_mask`` is False; 0 if none."""
    if ignore_mask is None:
        return values.mean()
    keep = ~ignore_mask
    total = torch.where(keep, values, torch.zeros_like(values)).sum()
    return total / keep.sum().clamp_min(1)


def _safe_sqrt(x: Tensor) -> Tensor:
    """sqrt with value 0 and gradient 0 at x == 0 (plain sqrt has an infinite gradient there)."""
    return torch.where(x > 0, x.clamp_min(torch.finfo(x.dtype).tiny).sqrt(), torch.zeros_like(x))


def _pixel_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(softmax(t/τ) ‖ softmax(s/τ)) per pixel, [B, H, W], without the τ² factor."""
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_pt = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    return F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(dim=1)


def _check_logit_pair(student: Tensor, teacher: Tensor, s_name: str, t_name: str) -> None:
    _check_ndim(student, 4, s_name, "[B, C, H, W]")
    _check_same_shape(student, teacher, s_name, t_name)


# --------------------------------------------------------------------------- pixel-wise KD

KD_CONVENTIONS: dict[str, str] = {
    "minikd": "τ²·Σ KL / (B·H·W): mean over pixels (Niemann Eq. 3, our kd_loss). Weight 1.",
    "cirkd": "τ²·Σ KL / (B·H·W): logits reshaped to [B·H·W, C], KLDiv 'batchmean'. Weight 1.",
    "skd": "Σ / (H·W), summed over the batch (SKD criterion.py, T=1). Weight ×B.",
    "ifvd": "KLDivLoss() default 'mean' over all B·C·H·W elements (IFVD, T=1). Weight ×1/C.",
    "torchdistill": "KDLoss 'batchmean' on [B, C, H, W]: Σ / B, sums over H·W. Weight ×H·W.",
    "cwd": "Σ / (B·C)·τ² (the CWD normaliser applied to pixel KL). Weight ×H·W/C.",
}


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    ignore_mask: Tensor | None = None,
) -> Tensor:
    """Pixel-wise Hinton KD: τ²·KL(softmax(t/τ) ‖ softmax(s/τ)), averaged over valid pixels.

    Niemann et al. write Eq. 3 as a cross-entropy, −τ² Σ_c σ_c(z_t/τ) log σ_c(z_s/τ). It differs
    from the KL used here by τ²·H(σ(z_t/τ)), the teacher's entropy, which does not depend on the
    student: the gradients are identical, but the KL is 0 when student == teacher, so the number
    you log means "how far from the teacher". The τ² keeps the gradient's size roughly
    independent of τ: the gradient wrt z_s is τ·(p_s − p_t), which for large τ tends to
    ((z_s − z̄_s) − (z_t − z̄_t))/C (z̄ = mean over classes); without τ² it would fade as 1/τ².

    The literature reduces the per-pixel KL in at least five ways; with λ fixed, each changes the
    *effective* KD weight by a factor relative to this function (``kd_loss_reduction`` computes
    each):

    ============  ==================================  =====================
    convention    reduction of Σ_{b,h,w} KL            effective weight
    ============  ==================================  =====================
    minikd/ours   τ²·Σ / (B·H·W)                       1
    CIRKD         τ²·Σ / (B·H·W) (pixel batchmean)     1
    SKD           Σ / (H·W), summed over the batch     ×B (grows with batch)
    IFVD          mean over all B·C·H·W elements       ×1/C
    torchdistill  τ²·Σ / B ('batchmean' on 4-D)        ×H·W (grows with crop)
    CWD           τ²·Σ / (B·C)                         ×H·W/C
    ============  ==================================  =====================

    So "λ = 10" in SKD and "λ = 10" in torchdistill differ by a factor H·W/B — for a 512×1024
    crop and batch 8, about 65 000.

    Args:
        student_logits: [B, C, H, W] student logits.
        teacher_logits: [B, C, H, W] teacher logits (detached inside).
        temperature: τ > 0; both distributions are softened by it.
        ignore_mask: optional bool [B, H, W], True = ignore that pixel. All ignored -> 0.

    Returns:
        Scalar tensor.

    References:
        Niemann et al., "Towards Comparable Knowledge Distillation in Semantic Image
        Segmentation", 2023, Eq. 3 (and Eq. 1 for the mixing, see ``ce_plus_kd``).
        Hinton et al., "Distilling the Knowledge in a Neural Network", 2015.
        Taught in notebooks/01_vanilla_kd_temperature.ipynb.
    """
    _check_logit_pair(student_logits, teacher_logits, "student_logits", "teacher_logits")
    _check_temperature(temperature)
    _check_mask(ignore_mask, student_logits, "ignore_mask")
    kl = _pixel_kl(student_logits, teacher_logits, temperature)
    return temperature**2 * _masked_mean(kl, ignore_mask)


def kd_loss_reduction(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    convention: str = "minikd",
) -> Tensor:
    """The same pixel-wise KD under each named reduction convention of the literature.

    All conventions compute τ²·Σ_{b,h,w} KL(p_t ‖ p_s) and divide by a different count (see the
    table in ``kd_loss`` and ``KD_CONVENTIONS``). τ² is applied in every convention so that only
    the *reduction* differs; SKD and IFVD ran at τ = 1, where that makes no difference. SKD's
    code uses the cross-entropy form (differs by the teacher's entropy, a constant; see
    ``kd_loss``) — here every convention uses the KL so the values are comparable.

    Args:
        student_logits: [B, C, H, W] student logits.
        teacher_logits: [B, C, H, W] teacher logits.
        temperature: τ > 0.
        convention: one of ``KD_CONVENTIONS``: "minikd", "cirkd", "skd", "ifvd",
            "torchdistill", "cwd".

    Returns:
        Scalar tensor. Ratios to "minikd": cirkd 1, skd B, ifvd 1/C, torchdistill H·W,
        cwd H·W/C.

    References:
        SKD (Liu et al., CVPR 2019) utils/criterion.py; IFVD (Wang et al., ECCV 2020);
        torchdistill KDLoss; CIRKD (Yang et al., CVPR 2022) losses/kd.py; CWD (Shu et al.,
        ICCV 2021). Taught in notebooks/01_vanilla_kd_temperature.ipynb.
    """
    if convention not in KD_CONVENTIONS:
        raise ValueError(
            f"convention={convention!r}; expected one of {sorted(KD_CONVENTIONS)}."
        )
    _check_logit_pair(student_logits, teacher_logits, "student_logits", "teacher_logits")
    _check_temperature(temperature)
    b, c, h, w = student_logits.shape
    divisor = {
        "minikd": b * h * w,
        "cirkd": b * h * w,
        "skd": h * w,
        "ifvd": b * c * h * w,
        "torchdistill": b,
        "cwd": b * c,
    }[convention]
    total = _pixel_kl(student_logits, teacher_logits, temperature).sum()
    return temperature**2 * total / divisor


def kd_convention_factor(convention: str, batch: int, classes: int, height: int,
                         width: int) -> float:
    """Effective KD weight of ``convention`` relative to ``kd_loss`` for a given input size.

    ``kd_loss_reduction(s, t, τ, convention) == kd_convention_factor(...) * kd_loss(s, t, τ)``
    for logits of shape [batch, classes, height, width]. Useful to plot how a published λ
    would have to change when batch, crop or class count change.

    Args:
        convention: one of ``KD_CONVENTIONS``.
        batch, classes, height, width: B, C, H, W of the logits.

    Returns:
        The multiplicative factor (1 for "minikd" and "cirkd").

    References:
        See ``kd_loss``. Taught in notebooks/01_vanilla_kd_temperature.ipynb.
    """
    if min(batch, classes, height, width) < 1:
        raise ValueError(f"got B={batch}, C={classes}, H={height}, W={width}; all must be >= 1.")
    factors = {
        "minikd": 1.0,
        "cirkd": 1.0,
        "skd": float(batch),
        "ifvd": 1.0 / classes,
        "torchdistill": float(height * width),
        "cwd": height * width / classes,
    }
    if convention not in factors:
        raise ValueError(f"convention={convention!r}; expected one of {sorted(KD_CONVENTIONS)}.")
    return factors[convention]


def ce_plus_kd(ce: Tensor, kd: Tensor, lam: float) -> Tensor:
    """L = L_CE + λ·L_KD (Niemann Eq. 1). λ = 0 is the plain student.

    Args:
        ce: scalar cross-entropy with the labels.
        kd: scalar distillation loss (e.g. ``kd_loss``).
        lam: λ ≥ 0, the KD weight (Niemann's tuned optimum: λ_PI = 0.1).

    Returns:
        Scalar tensor.

    References:
        Niemann et al. 2023, Eq. 1. Taught in notebooks/01_vanilla_kd_temperature.ipynb.
    """
    if not float(lam) >= 0:
        raise ValueError(f"lam={lam!r}; expected a KD weight >= 0.")
    return ce + lam * kd


def alpha_mix(ce: Tensor, kd: Tensor, alpha: float) -> Tensor:
    """L = α·L_CE + (1 − α)·L_KD (U-Net KD paper, §III-A), α in [0, 1].

    Compared with ``ce_plus_kd`` this is the same family up to an overall scale:
    α·CE + (1−α)·KD = α·(CE + λ·KD) with λ = (1−α)/α, so α also scales the learning rate of
    the CE term. The paper's default α = 0.1 (τ = 10) means λ = 9 with a 10× smaller step.

    Args:
        ce: scalar cross-entropy with the labels.
        kd: scalar distillation loss.
        alpha: weight of the CE term, in [0, 1].

    Returns:
        Scalar tensor.

    References:
        "U-Net knowledge distillation with ensemble teachers" (unet_kd_ensemble_teachers),
        §III-A, loss = α × student loss + (1 − α) × dist loss. Taught in
        notebooks/02_unet_ensemble_weighting.ipynb.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha={alpha!r}; expected a value in [0, 1] (the paper uses 0.1).")
    return alpha * ce + (1.0 - alpha) * kd


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = 255) -> Tensor:
    """Pixel-wise cross-entropy over labelled pixels; 0 (not NaN) when every pixel is ignored.

    Args:
        logits: [B, C, H, W].
        labels: [B, H, W] of any integer dtype (uint8 label maps are converted to int64 here),
            0..C-1 or ``ignore_index``.
        ignore_index: label value that is skipped.

    Returns:
        Scalar tensor.

    Raises:
        ValueError: mismatched shapes, or labels outside 0..C-1 that are not ``ignore_index``
            (``metrics.check_labels``).
        TypeError: floating or bool labels.

    References:
        Niemann Eq. 2; DUDES Eq. 1; EMUFormer Eq. 2. Taught in
        notebooks/01_vanilla_kd_temperature.ipynb.
    """
    _check_ndim(logits, 4, "logits", "[B, C, H, W]")
    if _shape(labels) != (logits.shape[0], *logits.shape[-2:]):
        raise ValueError(
            f"logits have shape {_shape(logits)} but labels have shape {_shape(labels)}; "
            "expected labels [B, H, W] with the logits' B, H, W."
        )
    check_labels(labels, logits.shape[1], ignore_index)
    labels = labels.long()  # torch's cross-entropy needs int64; uint8 PNG labels are fine here
    total = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp_min(1)


# --------------------------------------------------------------------------- channel-wise KD


def cwd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Channel-wise distillation: τ²·Σ_{b,c} KL(φ(T_bc/τ) ‖ φ(S_bc/τ)) / (B·C).

    φ is a softmax over the H·W positions of one channel, so each class map becomes a spatial
    distribution ("where is class c?") instead of each pixel a class distribution.

    Args:
        student_logits: [B, C, H, W] (or any [B, C, H, W] feature map).
        teacher_logits: [B, C, H, W], same shape.
        temperature: τ > 0 (mmrazor's Cityscapes config: 1; CIRKD: 4).

    Returns:
        Scalar tensor.

    References:
        Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021;
        TorchDistiller SemSeg-distill/utils/criterion.py. Taught in
        notebook 06 (fair baselines).
    """
    _check_logit_pair(student_logits, teacher_logits, "student_logits", "teacher_logits")
    _check_temperature(temperature)
    b, c = student_logits.shape[:2]
    log_ps = F.log_softmax(student_logits.float().flatten(2) / temperature, dim=2)
    log_pt = F.log_softmax(teacher_logits.detach().float().flatten(2) / temperature, dim=2)
    kl = F.kl_div(log_ps, log_pt, reduction="sum", log_target=True)
    return temperature**2 * kl / (b * c)


# --------------------------------------------------------------------------- uncertainty losses


def rmsle_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Root mean squared logarithmic error: sqrt(mean((log(1+p) − log(1+t))²)) over valid pixels.

    The mean runs over all valid pixels of the batch (as DUDES' ``RMSLELoss``: one square root
    per batch, not per image). The square root has value and gradient 0 when pred == target
    (plain ``sqrt`` would give an infinite gradient → NaN). Both inputs must be ≥ 0
    (uncertainties: DUDES std; EMUFormer variances).

    Args:
        pred: student uncertainty, [B, H, W] (or any shape).
        target: teacher uncertainty, same shape (detached inside).
        mask: optional bool tensor of the same shape, True = **valid** (use this pixel).
            All False -> 0.

    Returns:
        Scalar tensor.

    References:
        Landgraf et al., DUDES, 2023, Eq. 2 (target: std of the ensemble's softmax of the
        predicted class); Landgraf et al., EMUFormer, 2024, Eq. 9 (target: predictive
        *variance* σ², Eq. 10, vs the student's variance s²). Taught in
        notebooks/03_dudes.ipynb and notebook 04 (EMUFormer).
    """
    _check_same_shape(pred, target, "pred", "target")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != pred.shape):
        raise ValueError(
            f"mask has shape {_shape(mask)} and dtype {mask.dtype}; expected bool of shape "
            f"{_shape(pred)} with True = valid pixel."
        )
    if bool((pred.detach() < 0).any()) or bool((target < 0).any()):
        raise ValueError(
            "rmsle_loss got negative values; uncertainties (std or variance) must be >= 0. "
            "Did you pass log-variances or raw head outputs before the sigmoid/Softplus?"
        )
    diff2 = (torch.log1p(pred.float()) - torch.log1p(target.detach().float())) ** 2
    if mask is None:
        return _safe_sqrt(diff2.mean())
    total = torch.where(mask, diff2, torch.zeros_like(diff2)).sum()
    return _safe_sqrt(total / mask.sum().clamp_min(1))


def ensemble_kl_loss(
    student_logits: Tensor, teacher_probs: Tensor, ignore_mask: Tensor | None = None
) -> Tensor:
    """EMUFormer Eq. 8: Σ_c q_c log(q_c / p_c), averaged over valid pixels.

    The direction is KL(teacher ‖ student): q is the teacher ensemble's *mean softmax* (computed
    on the colour-jittered image), p the student's softmax. Pixels where q_c = 0 contribute 0
    (0·log 0 = 0), so fp16-cached teacher probabilities are safe. This equals ``kd_loss`` at
    τ = 1 with teacher logits log q.

    Args:
        student_logits: [B, C, H, W] student logits.
        teacher_probs: [B, C, H, W] teacher mean probabilities (each pixel sums to 1).
        ignore_mask: optional bool [B, H, W], True = ignore. All ignored -> 0.

    Returns:
        Scalar tensor.

    Raises:
        ValueError: mismatched shapes, or ``teacher_probs`` that are not probabilities on the
            pixels that count (e.g. teacher logits; ``metrics.check_probabilities``).

    References:
        Landgraf et al., EMUFormer, 2024, Eq. 8 (weighted by w2 = 10 in Eq. 11). Taught in
        notebook 04 (EMUFormer).
    """
    _check_logit_pair(student_logits, teacher_probs, "student_logits", "teacher_probs")
    _check_mask(ignore_mask, student_logits, "ignore_mask")
    check_probabilities(teacher_probs, dim=1, name="teacher_probs",
                        valid=None if ignore_mask is None else ~ignore_mask)
    log_ps = F.log_softmax(student_logits.float(), dim=1)
    q = teacher_probs.detach().float()
    kl = F.kl_div(log_ps, q, reduction="none").sum(dim=1)
    return _masked_mean(kl, ignore_mask)


def depth_gnll_loss(
    mean: Tensor,
    var: Tensor,
    target: Tensor,
    valid: Tensor | None = None,
    full: bool = False,
    eps: float = 1e-6,
) -> Tensor:
    """Gaussian NLL 0.5·(log s² + (y − μ)²/s²), averaged over valid depth pixels.

    A thin wrapper around ``torch.nn.functional.gaussian_nll_loss`` (which clamps the variance
    to ``eps`` for stability and adds 0.5·log 2π when ``full``); only the valid-pixel selection
    is ours.

    Args:
        mean: predicted depth μ, [B, H, W].
        var: predicted variance s² > 0, [B, H, W] (Softplus output, EMUFormer Eq. 5).
        target: ground-truth depth y in metres, [B, H, W].
        valid: bool [B, H, W], True = valid ground truth. ``None`` -> ``target > 0`` (the repo's
            convention: depth 0 = invalid). No valid pixel -> 0.
        full: add the constant 0.5·log(2π).
        eps: variance clamp passed to torch.

    Returns:
        Scalar tensor.

    References:
        EMUFormer Eq. 6 (Nix & Weigend 1994); weighted by w1 = 1 in Eq. 7 and Eq. 11. Taught in
        notebook 04 (EMUFormer).
    """
    _check_same_shape(mean, target, "mean", "target")
    _check_same_shape(var, target, "var", "target")
    valid = target > 0 if valid is None else valid
    if valid.dtype != torch.bool or valid.shape != target.shape:
        raise ValueError(
            f"valid has shape {_shape(valid)} and dtype {valid.dtype}; expected bool of shape "
            f"{_shape(target)} (True = valid depth)."
        )
    if not bool(valid.any()):
        return mean.sum() * 0.0
    return F.gaussian_nll_loss(
        mean[valid].float(), target[valid].float(), var[valid].float(),
        full=full, eps=eps, reduction="mean",
    )


DEPTH_LOSSES: tuple[str, ...] = ("gnll", "mse", "huber")


def _check_depth_loss(kind: str) -> None:
    if kind not in DEPTH_LOSSES:
        raise ValueError(f"depth_loss={kind!r}; expected one of {list(DEPTH_LOSSES)}: 'gnll' "
                         "(EMUFormer Eq. 6, trains the variance too) or 'mse'/'huber' (the "
                         "ablations of EMUFormer Tables 9-10, mean only).")


def depth_regression_loss(
    mean: Tensor,
    var: Tensor | None,
    target: Tensor,
    kind: str = "gnll",
    valid: Tensor | None = None,
    huber_delta: float = 1.0,
) -> Tensor:
    """The depth term of EMUFormer Eq. 7/11: GNLL (Eq. 6), or MSE / Huber (Tables 9-10).

    ``"gnll"`` is ``depth_gnll_loss`` (0.5·(log s² + (y − μ)²/s²), torch's
    ``F.gaussian_nll_loss`` with ``full=False``); ``"mse"`` is ``F.mse_loss(μ, y)`` and
    ``"huber"`` ``F.huber_loss(μ, y, delta=huber_delta)``, both on the mean only: the variance
    ``var`` gets no gradient from them (it may be None). Every mode averages over the valid
    depth pixels (target > 0 unless ``valid`` says otherwise); no valid pixel -> 0.

    Args:
        mean: predicted depth μ, [B, H, W].
        var: predicted variance s², [B, H, W] (required for "gnll", ignored otherwise).
        target: ground-truth depth y in metres, [B, H, W]; y <= 0 is invalid.
        kind: one of ``DEPTH_LOSSES``: "gnll", "mse", "huber".
        valid: bool [B, H, W], True = valid ground truth; ``None`` -> ``target > 0``.
        huber_delta: δ of the Huber loss (torch's default 1.0; the paper gives none).

    Returns:
        Scalar tensor.

    References:
        EMUFormer (Landgraf et al. 2024) Eq. 6, Eq. 7, Eq. 11 and §6.3, Tables 9-10 (MSE and
        Huber [25] ablations). Taught in notebook 04 (EMUFormer, planned).
    """
    _check_depth_loss(kind)
    if kind == "gnll":
        if var is None:
            raise ValueError("depth_loss='gnll' needs the predicted variance s² (the model's "
                             "'depth_var'); got None. Use kind='mse' for a mean-only model.")
        return depth_gnll_loss(mean, var, target, valid)
    _check_same_shape(mean, target, "mean", "target")
    valid = target > 0 if valid is None else valid
    if valid.dtype != torch.bool or valid.shape != target.shape:
        raise ValueError(f"valid has shape {_shape(valid)} and dtype {valid.dtype}; expected "
                         f"bool of shape {_shape(target)} (True = valid depth).")
    if not bool(valid.any()):
        return mean.sum() * 0.0
    mu, y = mean[valid].float(), target[valid].float()
    if kind == "mse":
        return F.mse_loss(mu, y)
    return F.huber_loss(mu, y, delta=huber_delta)


def dudes_loss(
    logits: Tensor,
    uncertainty: Tensor,
    labels: Tensor,
    teacher_uncertainty: Tensor,
    ignore_index: int = 255,
    unc_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DUDES: L = L_S + L_U = CE(logits, labels) + RMSLE(uncertainty, teacher_uncertainty).

    No hyperparameter and no soft-label KD: the segmentation branch only sees hard labels.

    Args:
        logits: student logits [B, C, H, W].
        uncertainty: student uncertainty in [0, 1], [B, H, W] (sigmoid head).
        labels: int64 [B, H, W].
        teacher_uncertainty: [B, H, W], std across members of the softmax prob of the
            ensemble's predicted class.
        ignore_index: label ignored by the CE.
        unc_mask: optional bool [B, H, W], True = valid for the RMSLE (``None``: every pixel,
            as the paper's Cityscapes code).

    Returns:
        (total, {"ce": ..., "rmsle": ...}).

    References:
        Landgraf et al., DUDES, 2023, Eq. 1-3. Taught in notebooks/03_dudes.ipynb.
    """
    ce = cross_entropy(logits, labels, ignore_index)
    rmsle = rmsle_loss(uncertainty, teacher_uncertainty, unc_mask)
    return ce + rmsle, {"ce": ce.detach(), "rmsle": rmsle.detach()}


def emuformer_loss(
    logits: Tensor,
    depth: Tensor,
    depth_var: Tensor,
    labels: Tensor,
    depth_target: Tensor,
    teacher_probs: Tensor,
    teacher_depth_var: Tensor,
    *,
    weights: tuple[float, float, float] = (1.0, 10.0, 1.0),
    ignore_index: int = 255,
    depth_valid: Tensor | None = None,
    kl_ignore_mask: Tensor | None = None,
    depth_loss: str = "gnll",
    huber_delta: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """EMUFormer: L = L_CE + w1·L_GNLL + w2·L_KL + w3·L_RMSLE (Eq. 11), w1 = w3 = 1, w2 = 10.

    CE on the labels; GNLL of the student's depth mean/variance on ground-truth depth (valid
    pixels); KL(teacher mean softmax ‖ student softmax) (Eq. 8); RMSLE between the student's
    variance s² and the teacher's predictive variance σ² (Eq. 9-10) over every pixel.
    ``depth_loss="mse"``/``"huber"`` replaces the GNLL by a mean-only loss (Tables 9-10; see
    ``EMUFormerLoss`` for what trains the variance then); w1 weights whichever depth term.

    Args:
        logits: [B, C, H, W] student logits.
        depth: [B, H, W] student depth mean μ.
        depth_var: [B, H, W] student depth variance s².
        labels: int64 [B, H, W].
        depth_target: [B, H, W] ground-truth depth in metres (0 = invalid).
        teacher_probs: [B, C, H, W] teacher mean softmax.
        teacher_depth_var: [B, H, W] teacher predictive variance σ² (Eq. 10).
        weights: (w1, w2, w3).
        ignore_index: label ignored by the CE.
        depth_valid: bool [B, H, W] True = valid depth; ``None`` -> ``depth_target > 0``.
        kl_ignore_mask: optional bool [B, H, W], True = leave out of the KL.
        depth_loss: "gnll" (Eq. 6), "mse" or "huber" (``depth_regression_loss``).
        huber_delta: δ of the Huber loss.

    Returns:
        (total, {"ce", depth_loss, "kl", "rmsle"}) — the terms unweighted and detached; the
        depth term is keyed by its kind ("gnll" by default).

    References:
        Landgraf et al., EMUFormer, 2024, Eq. 6, 8, 9, 11. Taught in
        notebook 04 (EMUFormer).
    """
    return _emuformer_terms(logits, depth, depth_var, labels, depth_target, teacher_probs,
                            teacher_depth_var, weights=weights, ignore_index=ignore_index,
                            depth_valid=depth_valid, kl_ignore_mask=kl_ignore_mask,
                            rmsle_mask=None, depth_loss=depth_loss, huber_delta=huber_delta)


def _emuformer_terms(
    logits: Tensor, depth: Tensor, depth_var: Tensor, labels: Tensor, depth_target: Tensor,
    teacher_probs: Tensor, teacher_depth_var: Tensor, *, weights: tuple[float, float, float],
    ignore_index: int, depth_valid: Tensor | None, kl_ignore_mask: Tensor | None,
    rmsle_mask: Tensor | None, depth_loss: str = "gnll", huber_delta: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``emuformer_loss`` with a mask for the RMSLE too (``rmsle_mask``: True = valid), which
    ``EMUFormerLoss`` uses to leave crop padding out of the variance term."""
    w1, w2, w3 = weights
    terms = {
        "ce": cross_entropy(logits, labels, ignore_index),
        depth_loss: depth_regression_loss(depth, depth_var, depth_target, depth_loss,
                                          depth_valid, huber_delta),
        "kl": ensemble_kl_loss(logits, teacher_probs, kl_ignore_mask),
        "rmsle": rmsle_loss(depth_var, teacher_depth_var, rmsle_mask),
    }
    total = terms["ce"] + w1 * terms[depth_loss] + w2 * terms["kl"] + w3 * terms["rmsle"]
    return total, {k: v.detach() for k, v in terms.items()}


# --------------------------------------------------------------------------- feature losses


def _check_feature_pair(fs: Tensor, ft: Tensor) -> None:
    _check_ndim(fs, 4, "fs", "[B, C_s, H, W]")
    _check_ndim(ft, 4, "ft", "[B, C_t, H, W]")
    if fs.shape[0] != ft.shape[0] or fs.shape[-2:] != ft.shape[-2:]:
        raise ValueError(
            f"fs has shape {_shape(fs)} but ft has shape {_shape(ft)}; batch and spatial size "
            "must match (channels may differ). Interpolate one feature map to the other's size."
        )


def _skd_similarity(feat: Tensor, detach_norm: bool) -> Tensor:
    """A = Fᵀ F of L2-normalised node features: [B, HW, HW]."""
    norm = feat.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-8
    feat = feat / (norm.detach() if detach_norm else norm)
    flat = feat.flatten(2)
    return torch.einsum("bcm,bcn->bmn", flat, flat)


def skd_pairwise_loss(
    fs: Tensor, ft: Tensor, pool_scale: float = 0.5, variant: str = "original"
) -> Tensor:
    """SKD pair-wise loss: Σ (A_T − A_S)² / (H'W')² / B over max-pooled node affinities.

    ``variant="original"`` (SKD code): max-pool with kernel = stride = (⌊pool_scale·H⌋,
    ⌊pool_scale·W⌋) (ceil_mode), so pool_scale 0.5 gives a 2×2 grid of nodes; features are
    L2-normalised along C with the norm *detached* (a constant for the gradient).
    ``variant="cirkd"`` (CIRKD's reimplementation, also used by later papers): a fixed 2×2
    kernel, so (H/2)·(W/2) nodes — a much finer graph — and a differentiable ``F.normalize``;
    ``pool_scale`` is ignored. Both reduce as the mean of (A_T − A_S)² over B·(H'W')² entries.
    Channel counts of student and teacher may differ (the affinities are H'W' × H'W').

    Args:
        fs: student features [B, C_s, H, W].
        ft: teacher features [B, C_t, H, W] (detached inside).
        pool_scale: node size as a fraction of the feature map (original variant).
        variant: "original" or "cirkd".

    Returns:
        Scalar tensor (SKD used λ_pa = 0.5).

    References:
        Liu et al., "Structured Knowledge Distillation for Semantic Segmentation", CVPR 2019,
        pair-wise loss (irfanICMLL/structure_knowledge_distillation utils/criterion.py);
        winycg/CIRKD losses/skd.py. Taught in notebook 06 (fair baselines).
    """
    _check_feature_pair(fs, ft)
    if variant == "original":
        if not 0 < pool_scale <= 1:
            raise ValueError(f"pool_scale={pool_scale!r}; expected 0 < pool_scale <= 1.")
        h, w = fs.shape[-2:]
        kernel = (max(1, int(h * pool_scale)), max(1, int(w * pool_scale)))
    elif variant == "cirkd":
        kernel = (2, 2)
    else:
        raise ValueError(f"variant={variant!r}; expected 'original' or 'cirkd'.")
    detach_norm = variant == "original"
    ps = F.max_pool2d(fs.float(), kernel, kernel, ceil_mode=True)
    pt = F.max_pool2d(ft.detach().float(), kernel, kernel, ceil_mode=True)
    a_s, a_t = _skd_similarity(ps, detach_norm), _skd_similarity(pt, detach_norm)
    return ((a_t - a_s) ** 2).mean()


def _ifv_map(feat: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """cos(f_p, c_{y_p}) per pixel, with per-image class prototypes c_k; [B, H, W]."""
    onehot = F.one_hot(labels.clamp_max(num_classes), num_classes + 1)[..., :num_classes]
    onehot = onehot.permute(0, 3, 1, 2).to(feat.dtype)  # [B, K, H, W]; ignore -> all zeros
    sums = torch.einsum("bkhw,bchw->bkc", onehot, feat)
    protos = sums / onehot.sum(dim=(2, 3)).clamp_min(1e-6).unsqueeze(-1)  # [B, K, C]
    own = torch.einsum("bkhw,bkc->bchw", onehot, protos)  # prototype of each pixel's class
    return F.cosine_similarity(feat, own, dim=1)


def ifvd_loss(
    fs: Tensor,
    ft: Tensor,
    labels: Tensor,
    num_classes: int,
    ignore_index: int = 255,
    count_ignored: bool = False,
) -> Tensor:
    """IFVD: MSE between student and teacher intra-class feature variation maps.

    Labels are nearest-resized to the feature size. Per image, each class k has a prototype
    c_k = mean of the features of its pixels; IFV(p) = cos(f_p, c_{y_p}); the loss is the mean
    of (IFV_S − IFV_T)² over the labelled pixels.

    Ignore handling: in the original code an ignore pixel becomes its own "prototype"
    (cos = 1 for student and teacher), so it adds 0 but still counts in the mean's
    denominator — the loss shrinks as the share of void pixels grows. We leave ignore pixels
    out of the mean (all ignored -> 0). ``count_ignored=True`` reproduces the original
    (loss × n_valid / n_total).

    Args:
        fs: student features [B, C_s, h, w].
        ft: teacher features [B, C_t, h, w] (detached inside; channels may differ).
        labels: int64 [B, H, W] (any resolution), 0..num_classes-1 or ``ignore_index``.
        num_classes: number of classes K.
        ignore_index: label to ignore.
        count_ignored: divide by every pixel, as the original code.

    Returns:
        Scalar tensor (IFVD used λ_ifv = 200).

    References:
        Wang et al., "Intra-class Feature Variation Distillation for Semantic Segmentation",
        ECCV 2020 (YukangWang/IFVD utils/criterion.py CriterionIFV). Taught in
        notebook 06 (fair baselines).
    """
    _check_feature_pair(fs, ft)
    _check_ndim(labels, 3, "labels", "[B, H, W]")
    if labels.shape[0] != fs.shape[0]:
        raise ValueError(f"fs has shape {_shape(fs)} but labels have shape {_shape(labels)}; "
                         "the batch sizes must match.")
    check_labels(labels, num_classes, ignore_index)
    small = F.interpolate(labels[:, None].float(), size=fs.shape[-2:], mode="nearest")
    small = small[:, 0].long()
    ignore = small == ignore_index
    small = torch.where(ignore, torch.full_like(small, num_classes), small)
    ifv_s = _ifv_map(fs.float(), small, num_classes)
    ifv_t = _ifv_map(ft.detach().float(), small, num_classes)
    sq = (ifv_s - ifv_t) ** 2
    return sq.mean() if count_ignored else _masked_mean(sq, ignore)


# --------------------------------------------------------------------------- holistic loss (SKD)


def _check_conditional_pair(seg: Tensor, image: Tensor, seg_name: str,
                            num_classes: int | None = None, in_channels: int | None = None
                            ) -> None:
    """A segmentation map [B, C, H, W] and its image [B, 3, H, W], both floating, same B, H, W."""
    _check_ndim(seg, 4, seg_name, "[B, C, H, W]")
    _check_ndim(image, 4, "image", "[B, 3, H, W]")
    for x, name in ((seg, seg_name), (image, "image")):
        if not x.is_floating_point():
            raise ValueError(f"{name} has dtype {x.dtype}; expected a floating tensor "
                             "(probabilities for the map, a normalised float image).")
    b, c, h, w = seg.shape
    if num_classes is not None and c != num_classes:
        raise ValueError(f"{seg_name} has shape {_shape(seg)}; expected ({b}, {num_classes}, H, "
                         f"W): the discriminator was built for num_classes={num_classes}.")
    expected = (b, in_channels or image.shape[1], h, w)
    if _shape(image) != expected:
        raise ValueError(
            f"image has shape {_shape(image)} but {seg_name} has shape {_shape(seg)}; expected "
            f"image {expected} (the map's B, H, W). Resize the logits to the image size "
            "(F.interpolate(logits, size=image.shape[-2:], mode='bilinear')) first."
        )


class SKDDiscriminator(nn.Module):
    """The embedding network D of SKD's holistic loss: a score D(Q|I) per (map, image) pair.

    A fully convolutional critic on the concatenation [Q, I] (C + 3 channels): ``depth`` 3×3
    convs of stride 2 (padding 1, so any size >= 1×1 works), widths ``width``·1, 2, 4, 8 (capped
    there), each followed by LeakyReLU(0.2), then a 3×3 conv to one channel, averaged over its
    map: one score per image. SKD's D has five convs with spectral norm, two self-attention
    blocks and a BatchNorm on its input; this one is plainer on purpose: no spectral norm, no
    attention, and no batch norm, which WGAN-GP forbids in the critic because it couples the
    samples of a batch and so breaks the per-sample gradient penalty. The gradient penalty is
    what keeps it ≈ 1-Lipschitz.

    Args:
        num_classes: C, the channels of the segmentation map.
        in_channels: channels of the image (3 for RGB).
        width: channels of the first conv (SKD: 64).
        depth: number of stride-2 convs; the score map is ⌈H/2^depth⌉ × ⌈W/2^depth⌉.

    Returns (forward(seg_probs [B, C, H, W], image [B, in_channels, H, W])):
        Scores [B] (float32). The map and the image must have the same H, W (a ValueError
        otherwise): resize the logits to the image, not the image to the logits.

    References:
        Liu et al., "Structured Knowledge Distillation for Semantic Segmentation", CVPR 2019,
        holistic distillation (irfanICMLL/structure_knowledge_distillation,
        networks/sagan_models.py); Gulrajani et al., "Improved Training of Wasserstein GANs",
        NeurIPS 2017, §4 (no batch norm in the critic). Taught in
        notebooks/06_fair_baselines.ipynb.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64,
                 depth: int = 4) -> None:
        super().__init__()
        for name, v in (("num_classes", num_classes), ("in_channels", in_channels),
                        ("width", width), ("depth", depth)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r}; expected a positive integer (SKD: width 64).")
        self.num_classes, self.in_channels = num_classes, in_channels
        layers: list[nn.Module] = []
        channels = num_classes + in_channels
        for i in range(depth):
            out = width * 2 ** min(i, 3)
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            channels = out
        layers.append(nn.Conv2d(channels, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, seg_probs: Tensor, image: Tensor) -> Tensor:
        _check_conditional_pair(seg_probs, image, "seg_probs", self.num_classes,
                                self.in_channels)
        x = torch.cat([seg_probs.float(), image.float()], dim=1)
        return self.net(x).mean(dim=(1, 2, 3))


def wgan_gp_penalty(discriminator: Callable[[Tensor, Tensor], Tensor], real: Tensor,
                    fake: Tensor, image: Tensor,
                    generator: torch.Generator | None = None) -> Tensor:
    """WGAN-GP gradient penalty: E[(‖∇_x̂ D(x̂|I)‖₂ − 1)²], x̂ = ε·real + (1 − ε)·fake.

    Exactly Gulrajani et al., Algorithm 1, line 6-7: one ε ~ U(0, 1) per sample, the gradient of
    that sample's score with respect to its whole map (the norm runs over all its C·H·W
    entries), (‖·‖₂ − 1)², averaged over the batch. Only the segmentation map is interpolated
    and differentiated: the image is the condition, the same for real and fake, so the penalty
    asks D to be 1-Lipschitz in the map for each fixed image. The gradient graph is kept
    (``create_graph=True``) so that the penalty trains D. ``real`` and ``fake`` are detached:
    the penalty is a term of D's loss, never of the student's.

    The per-sample gradients come from one backward of the summed scores, which is right as long
    as each score depends on its own sample only (true for ``SKDDiscriminator``; a batch norm
    in D would break it). SKD's code differentiates the *sum* of D's output map while its score
    is the map's mean, which scales the gradient by the map's size; here the gradient is that of
    the score itself, as in Gulrajani et al.

    Args:
        discriminator: ``D(seg_probs, image) -> scores [B]``, e.g. ``SKDDiscriminator``.
        real: teacher maps Q_t [B, C, H, W] (softmax probabilities).
        fake: student maps Q_s [B, C, H, W].
        image: the condition I [B, 3, H, W].
        generator: optional ``torch.Generator`` for ε (repeatable draws in tests).

    Returns:
        Scalar tensor (SKD weights it by λ_gp = 10 in D's loss).

    References:
        Gulrajani et al., "Improved Training of Wasserstein GANs", NeurIPS 2017, Eq. 3 and
        Algorithm 1; Liu et al., SKD, CVPR 2019, holistic loss. Taught in
        notebooks/06_fair_baselines.ipynb.
    """
    _check_logit_pair(fake, real, "fake", "real")
    _check_conditional_pair(fake, image, "fake")
    b = real.shape[0]
    eps = torch.rand(b, 1, 1, 1, generator=generator,
                     device=generator.device if generator is not None else real.device)
    eps = eps.to(real.device)
    with torch.enable_grad():
        x_hat = (eps * real.detach().float() + (1 - eps) * fake.detach().float())
        x_hat.requires_grad_(True)
        scores = discriminator(x_hat, image.detach())
        if _shape(scores) != (b,):
            raise ValueError(f"the discriminator returned shape {_shape(scores)}; expected "
                             f"({b},), one score per image (average its output map).")
        (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


class HolisticLoss:
    """SKD's holistic loss L_HO: the student as the generator of a conditional WGAN-GP.

    A discriminator D (``SKDDiscriminator``) scores (segmentation map, image) pairs; the
    teacher's maps Q_t = softmax(z_t) are "real", the student's Q_s = softmax(z_s) "fake". This
    object owns D and its Adam optimizer. Each call in a training step (grad enabled and
    ``student_logits.requires_grad``) first takes one step of D on the detached maps,

        L_D = E[D(Q_s|I)] − E[D(Q_t|I)] + λ_gp·E[(‖∇_x̂ D(x̂|I)‖₂ − 1)²]   (``wgan_gp_penalty``),

    then returns the student's term of ℓ_ho = E[D(Q_s|I)] − E[D(Q_t|I)] (SKD, holistic loss),

        L_HO = −E[D(Q_s|I)],

    computed through a frozen D: the student's backward reaches the logits but leaves D's
    ``.grad`` untouched. Outside a training step (``torch.no_grad()``, or logits without grad)
    D is not updated and the value is only reported. The caller applies the weight λ_ho
    (L = CE + λ_pi·L_PI + λ_pa·L_PA + λ_ho·L_HO; SKD: λ_ho = 0.1).

    Settings: lr 4e-4 (SKD's ``lr_d``), λ_gp = 10, one D step per student step, Adam with betas
    (0.9, 0.99). SKD's public code (networks/kd_model.py, utils/train_options.py) differs in
    ways a fair comparison should know: its D steps with SGD (momentum 0.9, weight decay 1e-4)
    at that lr, *after* the student's step and on the same (pre-step) maps; it scores the raw
    logits through a BatchNorm (no softmax, no image), while this class follows the paper's
    conditional form D(Q|I); and its λ_d = 0.1 weights both the student's term (so λ_ho = 0.1)
    and D's loss. Here D's loss is unweighted: under Adam a constant factor changes nothing but
    the relative size of Adam's ε. D follows the logits' device on the first call
    (its optimizer state with it); all of D's arithmetic runs in float32, autocast off.
    ``last_terms`` holds the last D step's ``d_loss``, ``gp`` and ``wasserstein``
    (E[D(Q_t|I)] − E[D(Q_s|I)], D's estimate of the distance; detached) for logging.
    ``state_dict()``/``load_state_dict()`` cover D and its optimizer, so ``training.fit``
    resumes the adversary with the student when the loss_fn exposes them. Under DDP every
    process trains its own D (they are not synchronised) and rank 0's is checkpointed.

    Args:
        num_classes: C of the logits.
        lr: D's Adam learning rate (SKD: 4e-4).
        betas: D's Adam betas (SKD's public code steps D with SGD instead, see above).
        gp_weight: λ_gp (WGAN-GP and SKD: 10).
        width: channels of D's first conv (SKD: 64).
        device: where to build D; default: moved to the logits' device on the first call.

    Returns (when called with student_logits [B, C, H, W], teacher_logits [B, C, H, W] and
    image [B, 3, H, W]):
        The scalar student term −E[D(Q_s|I)] (float32).

    References:
        Liu et al., "Structured Knowledge Distillation for Semantic Segmentation", CVPR 2019,
        holistic loss (irfanICMLL/structure_knowledge_distillation); Gulrajani et al.,
        "Improved Training of Wasserstein GANs", NeurIPS 2017, Algorithm 1; Niemann et al. 2023,
        §2 and Table 5b (the sweep of λ_ho). Taught in notebooks/06_fair_baselines.ipynb.
    """

    def __init__(self, num_classes: int, *, lr: float = 4e-4,
                 betas: tuple[float, float] = (0.9, 0.99), gp_weight: float = 10.0,
                 width: int = 64, device: str | torch.device | None = None) -> None:
        if not float(lr) > 0:
            raise ValueError(f"lr={lr!r}; expected the discriminator's learning rate > 0 "
                             "(SKD: 4e-4).")
        if not float(gp_weight) >= 0:
            raise ValueError(f"gp_weight={gp_weight!r}; expected λ_gp >= 0 (WGAN-GP: 10).")
        self.discriminator = SKDDiscriminator(num_classes, width=width)
        if device is not None:
            self.discriminator.to(device)
        self.optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=betas)
        self.num_classes, self.gp_weight = num_classes, gp_weight
        self.last_terms: dict[str, Tensor] = {}

    def _follow(self, device: torch.device) -> None:
        """Move D (and its Adam state, via a state-dict round trip) to ``device`` if elsewhere."""
        if next(self.discriminator.parameters()).device != device:
            state = self.optimizer.state_dict()
            self.discriminator.to(device)
            self.optimizer.load_state_dict(state)  # casts the moments to the params' device

    def step_discriminator(self, real: Tensor, fake: Tensor, image: Tensor) -> None:
        """One Adam step of D on L_D (real = teacher maps, fake = student maps, detached)."""
        d = self.discriminator
        real, fake, image = real.detach(), fake.detach(), image.detach()
        d_real, d_fake = d(real, image).mean(), d(fake, image).mean()
        gp = wgan_gp_penalty(d, real, fake, image)
        d_loss = d_fake - d_real + self.gp_weight * gp
        self.optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        self.optimizer.step()
        self.last_terms = {"d_loss": d_loss.detach(), "gp": gp.detach(),
                           "wasserstein": (d_real - d_fake).detach()}

    def _frozen_scores(self, probs: Tensor, image: Tensor) -> Tensor:
        """D(probs|image) with D's parameters as constants: gradient reaches ``probs`` only."""
        params = [p for p in self.discriminator.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            return self.discriminator(probs, image)
        finally:
            for p in params:
                p.requires_grad_(True)

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor, image: Tensor) -> Tensor:
        _check_logit_pair(student_logits, teacher_logits, "student_logits", "teacher_logits")
        _check_conditional_pair(student_logits, image, "student_logits", self.num_classes)
        self._follow(student_logits.device)
        q_s = F.softmax(student_logits.float(), dim=1)
        q_t = F.softmax(teacher_logits.detach().float(), dim=1)
        image = image.detach().float()
        with torch.autocast(student_logits.device.type, enabled=False):
            if torch.is_grad_enabled() and student_logits.requires_grad:
                self.step_discriminator(q_t, q_s, image)
            return -self._frozen_scores(q_s, image).mean()

    def state_dict(self) -> dict[str, dict]:
        """D's weights and its optimizer state (tensors and plain types: ``weights_only`` safe)."""
        return {"discriminator": self.discriminator.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Mapping]) -> None:
        """Restore what ``state_dict`` returned (onto D's current device)."""
        missing = [k for k in ("discriminator", "optimizer") if k not in state]
        if missing:
            raise ValueError(f"HolisticLoss state lacks {missing}; expected the dict of "
                           f"HolisticLoss.state_dict() with keys ['discriminator', 'optimizer'], "
                           f"got {sorted(state)}.")
        self.discriminator.load_state_dict(state["discriminator"])
        self.optimizer.load_state_dict(state["optimizer"])


# --------------------------------------------------------------------------- training.fit glue


def _logits_of(outputs: Tensor | Mapping[str, Tensor], who: str) -> Tensor:
    """The logits of a model output: a bare tensor, or ``outputs["logits"]``."""
    if isinstance(outputs, Tensor):
        return outputs
    return _outputs_with(outputs, ("logits",), who, "a segmentation model",
                         "Return logits [B, C, H, W] or a dict with 'logits'.")["logits"]


def _outputs_with(outputs: object, keys: tuple[str, ...], who: str, model: str,
                  hint: str) -> Mapping[str, Tensor]:
    """``outputs`` if it is a dict holding ``keys``; else a ValueError naming the model needed."""
    if isinstance(outputs, Mapping) and all(k in outputs for k in keys):
        return outputs
    got = (f"a dict with keys {sorted(outputs)}" if isinstance(outputs, Mapping) else
           f"a {type(outputs).__name__}" + (f" of shape {_shape(outputs)}"
                                            if isinstance(outputs, Tensor) else ""))
    raise ValueError(f"{who} needs the output dict of {model} with keys {list(keys)}, but the "
                     f"model returned {got}. {hint}")


def _invalid_pixels(batch: Mapping[str, Tensor], like: Tensor) -> Tensor | None:
    """``~batch["valid"]`` (True = crop padding: no teacher target there), or None without it.

    ``data.RandomCrop`` adds the validity map "valid" (bool [H, W] per sample, True = the pixel
    came from the image, False = padding); this is the one place where the loss objects read it.

    Args:
        batch: the collated batch.
        like: a [B, H, W] or [B, C, H, W] tensor (the teacher target) whose B, H, W the map has.

    Returns:
        bool [B, H, W], True = ignore, on ``like``'s device; None if the batch has no "valid".
    """
    if "valid" not in batch:
        return None
    valid, expected = batch["valid"], (like.shape[0], *like.shape[-2:])
    if not isinstance(valid, Tensor) or valid.dtype != torch.bool or _shape(valid) != expected:
        got = (f"shape {_shape(valid)} and dtype {valid.dtype}" if isinstance(valid, Tensor)
               else f"type {type(valid).__name__}")
        raise ValueError(
            f"batch['valid'] has {got}; expected the bool validity map of shape {expected} "
            "(True = pixel from the image, False = crop padding) that data.RandomCrop adds."
        )
    return ~valid.to(like.device)


_GROUND_TRUTH_KEYS = {
    "mask": "the labels [B, H, W], which every minikd.data dataset gives as 'mask'",
    "depth": "the ground-truth depth [B, H, W] in metres, which minikd.data's depth datasets "
             "(ToyCity, NYUv2, Cityscapes) give as 'depth'",
}


def _require(batch: Mapping[str, Tensor], key: str, who: str) -> Tensor:
    """``batch[key]``, or a ValueError that says where that key comes from."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"{who} needs the batch as a dict (e.g. {{'image', 'mask', ...}} from a "
                        f"minikd.data dataset); got {type(batch).__name__}.")
    if key not in batch:
        if key in _GROUND_TRUTH_KEYS:
            hint = f"It is {_GROUND_TRUTH_KEYS[key]}; use such a dataset or rename your key."
        else:
            hint = "Wrap the dataset with the teacher cache (minikd.ensembles.TeacherCache)."
        raise ValueError(f"{who} needs batch[{key!r}], but the batch has keys {sorted(batch)}. "
                         + hint)
    return batch[key]


class DistillationLoss:
    """``loss_fn(outputs, batch)`` for ``training.fit``: CE on labels + pixel-wise KD.

    The teacher target comes from the batch: ``batch["teacher_logits"]`` if present, else
    ``batch["teacher_probs"]`` (probabilities are turned into logits with log, which is exact:
    softmax(log q / τ) = q^(1/τ) / Σ q^(1/τ)). Crop padding carries no target (RandomCrop pads
    floating maps with 0: uniform zero logits, all-zero probabilities) and is left out of the
    KD on both paths: the pixels where ``batch["valid"]`` is False (the validity map that
    RandomCrop adds). Without "valid" in the batch, the teacher_logits path keeps every pixel and
    the teacher_probs path leaves out the pixels whose probabilities sum to < 0.5 (as before).
    Void-labelled pixels are left out of the KD too when ``mask_void``; the CE skips them (and the
    padding, labelled 255) always.

    Args:
        temperature: τ of ``kd_loss``.
        lam: KD weight λ for L = CE + λ·KD (Niemann Eq. 1), or
        alpha: CE weight α for L = α·CE + (1−α)·KD (U-Net KD paper). Give exactly one.
        ignore_index: label ignored by the CE.
        mask_void: also leave void-labelled pixels out of the KD (default: keep them, as SKD
            and CIRKD do — the teacher has an opinion there too).

    Returns (when called):
        (loss, {"ce": ..., "kd": ...}), terms detached.

    References:
        Niemann et al. 2023, Eq. 1-3; U-Net KD paper §III-A. Taught in
        notebooks/01_vanilla_kd_temperature.ipynb and notebooks/02_unet_ensemble_weighting.ipynb.
    """

    def __init__(self, temperature: float = 1.0, *, lam: float | None = None,
                 alpha: float | None = None, ignore_index: int = 255,
                 mask_void: bool = False) -> None:
        if (lam is None) == (alpha is None):
            raise ValueError(f"got lam={lam!r}, alpha={alpha!r}; give exactly one: lam=0.1 for "
                             "CE + λ·KD (Niemann) or alpha=0.1 for α·CE + (1−α)·KD (U-Net KD).")
        _check_temperature(temperature)
        self.temperature, self.lam, self.alpha = temperature, lam, alpha
        self.ignore_index, self.mask_void = ignore_index, mask_void

    def _teacher(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        if "teacher_logits" in batch:
            teacher = batch["teacher_logits"]
            return teacher, _invalid_pixels(batch, teacher)
        cached = _require(batch, "teacher_probs", "DistillationLoss")
        probs = cached.float()
        invalid = _invalid_pixels(batch, probs)
        if invalid is None:  # no validity map: padded probabilities are all 0
            invalid = probs.sum(dim=1) < 0.5
        check_probabilities(cached, dim=1, name="batch['teacher_probs']",
                            valid=~invalid.to(cached.device))
        return probs.clamp_min(1e-8).log(), invalid

    def __call__(self, outputs, batch) -> tuple[Tensor, dict[str, Tensor]]:
        logits = _logits_of(outputs, "DistillationLoss")
        labels = _require(batch, "mask", "DistillationLoss")
        teacher, ignore = self._teacher(batch)
        if self.mask_void:
            void = labels == self.ignore_index
            ignore = void if ignore is None else ignore | void
        ce = cross_entropy(logits, labels, self.ignore_index)
        kd = kd_loss(logits, teacher, self.temperature, ignore)
        if self.lam is not None:
            total = ce_plus_kd(ce, kd, self.lam)
        else:
            total = alpha_mix(ce, kd, self.alpha)
        return total, {"ce": ce.detach(), "kd": kd.detach()}


class StructuredKDLoss:
    """``loss_fn(outputs, batch)``: Niemann's composite L_CE + λ_PI·L_PI + λ_PA·L_PA +
    λ_HO·L_HO + λ_IFV·L_IFV, each extra term switched on by a weight > 0.

    L_CE and L_PI are ``DistillationLoss(temperature, lam=lam_pi)`` (Niemann Eq. 1-3); L_PA is
    ``skd_pairwise_loss`` and L_IFV ``ifvd_loss`` on the feature maps before the classifier
    (student ``outputs["features"]`` from ``models.WithFeatures``, teacher
    ``batch["teacher_features"]`` from a ``TeacherCache`` with target ``"features"``); L_HO is a
    ``HolisticLoss`` that this object owns (its discriminator and optimizer are saved in
    ``fit``'s checkpoints through ``state_dict``). Crop padding (``batch["valid"]`` False) carries
    no teacher target: there student and teacher logits and features are both set to 0 before
    L_PA and L_HO (no gradient, nothing to match; the map is nearest-resized to the features'
    size, e.g. 1/8 for PSPNet); L_IFV ignores padding through its void labels.

    Args:
        temperature: τ of L_PI.
        lam_pi: λ_PI (Niemann: 0.1 in their code's reduction; minikd's per-pixel mean: see
            notebook 01 §6).
        lam_pa: λ_PA (Niemann Table 5a sweeps 1e-3 … 1e1; SKD 0.5).
        lam_ho: λ_HO (Table 5b: 1e-4 … 1e-1; SKD 0.1).
        lam_ifv: λ_IFV (Table 5c: 1e-4 … 1e2; IFVD 200).
        num_classes: K for L_IFV (default: read from the logits).
        holistic: a ``HolisticLoss`` to use (default: one built at the first call with
            ``lam_ho`` > 0).
        ignore_index: void label.

    Returns (when called):
        (loss, {"ce", "kd", and "pa" / "ho" / "ifv" for the terms in use}), terms detached.

    References:
        Niemann et al. 2023, Eq. 1-3, §5.5, Tables 5-6; Liu et al. 2019 (SKD: pair-wise and
        holistic); Wang et al. 2020 (IFVD). Taught in notebooks/06_fair_baselines.ipynb.
    """

    def __init__(self, temperature: float = 1.0, *, lam_pi: float = 1.0, lam_pa: float = 0.0,
                 lam_ho: float = 0.0, lam_ifv: float = 0.0, num_classes: int | None = None,
                 holistic: HolisticLoss | None = None, ignore_index: int = 255) -> None:
        weights = {"lam_pi": lam_pi, "lam_pa": lam_pa, "lam_ho": lam_ho, "lam_ifv": lam_ifv}
        bad = {k: v for k, v in weights.items() if not (isinstance(v, (int, float)) and v >= 0)}
        if bad:
            raise ValueError(f"loss weights must be numbers >= 0; got {bad}. A weight of 0 "
                             "switches a term off.")
        self.pixel = DistillationLoss(temperature, lam=lam_pi, ignore_index=ignore_index)
        self.lam_pa, self.lam_ho, self.lam_ifv = lam_pa, lam_ho, lam_ifv
        self.num_classes, self.holistic, self.ignore_index = num_classes, holistic, ignore_index

    def _features(self, outputs: object, batch: Mapping[str, Tensor],
                  invalid: Tensor | None) -> tuple[Tensor, Tensor]:
        fs = _outputs_with(outputs, ("logits", "features"), "StructuredKDLoss (L_PA, L_IFV)",
                           "a model wrapped in models.WithFeatures",
                           "Wrap the student: models.WithFeatures(student).")["features"]
        ft = _require(batch, "teacher_features", "StructuredKDLoss (L_PA, L_IFV)").to(fs.dtype)
        if invalid is not None:
            if invalid.shape[-2:] != fs.shape[-2:]:
                invalid = F.interpolate(invalid[:, None].float(), size=fs.shape[-2:],
                                        mode="nearest")[:, 0] > 0.5
            fs, ft = fs.masked_fill(invalid[:, None], 0.0), ft.masked_fill(invalid[:, None], 0.0)
        return fs, ft

    def __call__(self, outputs, batch) -> tuple[Tensor, dict[str, Tensor]]:
        total, terms = self.pixel(outputs, batch)
        if not (self.lam_pa or self.lam_ho or self.lam_ifv):
            return total, terms
        logits = _logits_of(outputs, "StructuredKDLoss")
        invalid = _invalid_pixels(batch, logits)
        if self.lam_pa or self.lam_ifv:
            fs, ft = self._features(outputs, batch, invalid)
            if self.lam_pa:
                terms["pa"] = skd_pairwise_loss(fs, ft)
                total = total + self.lam_pa * terms["pa"]
            if self.lam_ifv:
                k = self.num_classes or logits.shape[1]
                terms["ifv"] = ifvd_loss(fs, ft, batch["mask"], k, self.ignore_index)
                total = total + self.lam_ifv * terms["ifv"]
        if self.lam_ho:
            if self.holistic is None:
                self.holistic = HolisticLoss(logits.shape[1])
            teacher = _require(batch, "teacher_logits", "StructuredKDLoss (L_HO)")
            student = logits
            if invalid is not None:
                student = logits.masked_fill(invalid[:, None], 0.0)
                teacher = teacher.masked_fill(invalid[:, None], 0.0)
            terms["ho"] = self.holistic(student, teacher, batch["image"])
            total = total + self.lam_ho * terms["ho"]
        return total, {k: v.detach() for k, v in terms.items()}

    def state_dict(self) -> dict[str, Any]:
        """The discriminator's state when L_HO is in use (``fit`` checkpoints it), else {}."""
        return {} if self.holistic is None else {"holistic": self.holistic.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        if "holistic" in state:
            if self.holistic is None:
                disc = state["holistic"]["discriminator"]
                self.holistic = HolisticLoss(int(disc[next(iter(disc))].shape[1]) - 3)
            self.holistic.load_state_dict(state["holistic"])


class DUDESLoss:
    """``loss_fn(outputs, batch)`` for the DUDES student (``dudes_loss``).

    Reads ``outputs["logits"]``, ``outputs["uncertainty"]``, ``batch["mask"]`` and
    ``batch[teacher_key]`` (default "teacher_unc", from the teacher cache). The RMSLE runs over
    every pixel, as the paper's code, except crop padding: pixels where ``batch["valid"]`` is
    False (RandomCrop's validity map; the padded target is 0, not the teacher's) are left out.

    References:
        DUDES Eq. 3. Taught in notebooks/03_dudes.ipynb.
    """

    def __init__(self, ignore_index: int = 255, teacher_key: str = "teacher_unc") -> None:
        self.ignore_index, self.teacher_key = ignore_index, teacher_key

    def __call__(self, outputs, batch) -> tuple[Tensor, dict[str, Tensor]]:
        outputs = _outputs_with(outputs, ("logits", "uncertainty"), "DUDESLoss",
                                "a models.DUDESStudent",
                                "Wrap the segmenter as models.DUDESStudent(segmenter), which adds "
                                "the uncertainty head; for plain logits use DistillationLoss.")
        target = _require(batch, self.teacher_key, "DUDESLoss")
        labels = _require(batch, "mask", "DUDESLoss")
        invalid = _invalid_pixels(batch, target)
        return dudes_loss(outputs["logits"], outputs["uncertainty"], labels,
                          target.float(), self.ignore_index,
                          unc_mask=None if invalid is None else ~invalid)


_DEPTH_MODEL_HINT = ("Train a models.DepthFormer or models.SegDepthFormer, whose output dict "
                     "holds the depth mean 'depth' and its variance 'depth_var'.")


class DepthGNLLLoss:
    """``loss_fn(outputs, batch)`` for a ``models.DepthFormer``: the GNLL of Eq. 6 alone.

    Reads ``outputs["depth"]``, ``outputs["depth_var"]`` and ``batch["depth"]``; pixels with
    ground-truth depth <= 0 (invalid, and the crop padding, padded with 0) are left out.

    Returns (when called):
        (loss, {"gnll": ...}), the term detached.

    References:
        EMUFormer (Landgraf et al. 2024) §3.2.2, Eq. 6. Taught in notebook 04 (EMUFormer,
        planned).
    """

    def __call__(self, outputs, batch) -> tuple[Tensor, dict[str, Tensor]]:
        outputs = _outputs_with(outputs, ("depth", "depth_var"), "DepthGNLLLoss",
                                "a models.DepthFormer", _DEPTH_MODEL_HINT)
        target = _require(batch, "depth", "DepthGNLLLoss")
        gnll = depth_gnll_loss(outputs["depth"], outputs["depth_var"], target)
        return gnll, {"gnll": gnll.detach()}


class SegDepthLoss:
    """``loss_fn(outputs, batch)`` for the SegDepthFormer baseline: L = L_CE + w1·L_GNLL (Eq. 7).

    Reads ``outputs["logits"|"depth"|"depth_var"]``, ``batch["mask"]`` and ``batch["depth"]``.
    The CE skips void labels (255, also the crop padding); the depth term skips pixels with
    ground-truth depth <= 0 (invalid, and the padding).

    ``depth_loss="mse"``/``"huber"`` (EMUFormer Tables 9-10) put a mean-only loss in place of
    the GNLL. Without distillation nothing else trains the variance: its head gets no gradient
    and ``depth_var`` stays at its initialisation, so it is no uncertainty. Use those modes with
    ``EMUFormerLoss`` (where the RMSLE to the teacher trains the variance), or for a baseline
    whose depth uncertainty you do not read.

    Args:
        w1: weight of the depth term; the paper sets 1 ("both loss values are of similar
            magnitude").
        depth_loss: "gnll" (Eq. 6, default), "mse" or "huber" (``depth_regression_loss``).
        ignore_index: label ignored by the CE.
        huber_delta: δ of the Huber loss (torch's default 1.0).

    Returns (when called):
        (loss, {"ce": ..., depth_loss: ...}), terms unweighted and detached.

    References:
        EMUFormer (Landgraf et al. 2024) §3.2.3, Eq. 7; §6.3, Tables 9-10. Taught in notebook 04
        (EMUFormer, planned).
    """

    def __init__(self, w1: float = 1.0, depth_loss: str = "gnll", ignore_index: int = 255,
                 huber_delta: float = 1.0) -> None:
        _check_depth_loss(depth_loss)
        if not float(w1) >= 0:
            raise ValueError(f"w1={w1!r}; expected a depth weight >= 0 (the paper uses 1).")
        self.w1, self.depth_loss = w1, depth_loss
        self.ignore_index, self.huber_delta = ignore_index, huber_delta

    def __call__(self, outputs, batch) -> tuple[Tensor, dict[str, Tensor]]:
        outputs = _outputs_with(outputs, ("logits", "depth", "depth_var"), "SegDepthLoss",
                                "a models.SegDepthFormer", _DEPTH_MODEL_HINT.replace(
                                    "models.DepthFormer or ", ""))
        labels = _require(batch, "mask", "SegDepthLoss")
        target = _require(batch, "depth", "SegDepthLoss")
        ce = cross_entropy(outputs["logits"], labels, self.ignore_index)
        depth = depth_regression_loss(outputs["depth"], outputs["depth_var"], target,
                                      self.depth_loss, None, self.huber_delta)
        return ce + self.w1 * depth, {"ce": ce.detach(), self.depth_loss: depth.detach()}


class EMUFormerLoss:
    """``loss_fn(outputs, batch)`` for the EMUFormer student (``emuformer_loss``).

    Reads ``outputs["logits"|"depth"|"depth_var"]`` and ``batch["mask"]``, ``batch["depth"]``,
    ``batch["teacher_probs"]``, ``batch[var_key]`` (default "teacher_depth_var"). Crop padding
    is left out of both teacher terms, the KL and the variance RMSLE: the pixels where
    ``batch["valid"]`` is False (RandomCrop's validity map). Without "valid", the KL leaves out
    the pixels whose cached teacher probabilities sum to < 0.5 and the RMSLE keeps every pixel
    (as before). The GNLL skips padding by itself (ground-truth depth is padded with 0).

    ``depth_loss="mse"`` or ``"huber"`` is the ablation of EMUFormer §6.3 (Tables 9-10): the
    GNLL is *replaced* by a loss on the depth mean only, weighted by w1. The variance head then
    gets no gradient from the ground truth; it is trained by the RMSLE to the teacher's
    predictive variance σ² (Eq. 9-10, weight w3) alone, i.e. it learns the teacher's
    uncertainty and nothing implicit. The paper finds GNLL better on every depth metric (it lets
    the distilled variance weight the depth errors), so "gnll" stays the default.

    Args:
        weights: (w1, w2, w3) of Eq. 11; the paper uses (1, 10, 1).
        ignore_index: label ignored by the CE.
        var_key: batch key of the teacher's predictive variance σ².
        depth_loss: "gnll" (Eq. 6, default), "mse" or "huber" (``depth_regression_loss``).
        huber_delta: δ of the Huber loss (torch's default 1.0; the paper gives none).
        teacher: optional ``ensembles.LiveTeacher``: the teacher targets are computed on each
            batch (on a jittered copy of its images) instead of read from a cache.

    Returns (when called):
        (loss, {"ce", depth_loss, "kl", "rmsle"}), terms unweighted and detached.

    References:
        EMUFormer Eq. 11, §6.3, Tables 9-10. Taught in notebook 04 (EMUFormer, planned).
    """

    def __init__(self, weights: tuple[float, float, float] = (1.0, 10.0, 1.0),
                 ignore_index: int = 255, var_key: str = "teacher_depth_var",
                 depth_loss: str = "gnll", huber_delta: float = 1.0,
                 teacher: Callable[[dict], dict] | None = None) -> None:
        _check_depth_loss(depth_loss)
        self.weights, self.ignore_index, self.var_key = weights, ignore_index, var_key
        self.depth_loss, self.huber_delta, self.teacher = depth_loss, huber_delta, teacher

    def __call__(self, outputs, batch) -> tuple[Tensor, dict[str, Tensor]]:
        if self.teacher is not None:
            batch = self.teacher(batch)
        outputs = _outputs_with(outputs, ("logits", "depth", "depth_var"), "EMUFormerLoss",
                                "a models.SegDepthFormer",
                                "Train a models.SegDepthFormer (segmentation plus depth with its "
                                "variance); for plain logits use DistillationLoss.")
        probs = _require(batch, "teacher_probs", "EMUFormerLoss")  # fp16 kept: its tolerance
        var_t = _require(batch, self.var_key, "EMUFormerLoss").float()
        labels = _require(batch, "mask", "EMUFormerLoss")
        depth = _require(batch, "depth", "EMUFormerLoss")
        invalid = _invalid_pixels(batch, probs)
        return _emuformer_terms(
            outputs["logits"], outputs["depth"], outputs["depth_var"], labels,
            depth, probs, var_t, weights=self.weights, ignore_index=self.ignore_index,
            depth_valid=None,
            kl_ignore_mask=probs.sum(dim=1) < 0.5 if invalid is None else invalid,
            rmsle_mask=None if invalid is None else ~invalid,
            depth_loss=self.depth_loss, huber_delta=self.huber_delta,
        )


class ClassWiseUncertaintyLoss:
    """``loss_fn(outputs, batch)`` for ``models.ClassWiseUncertaintyStudent``: CE + RMSLE over the
    whole class-wise std map (the Holder & Shafique target, in DUDES' loss form).

    L = CE(logits, labels) + RMSLE(class_uncertainty, teacher class-wise std), the RMSLE averaged
    over all B·C·H·W entries. Same form and no more hyperparameters than ``DUDESLoss``, so the
    two differ only in *what* is distilled (DUDES §5). As there, crop padding (pixels where
    ``batch["valid"]`` is False, RandomCrop's validity map) is left out of the RMSLE, in every
    channel.

    Args:
        ignore_index: label ignored by the CE.
        teacher_key: batch key of the teacher's class-wise std map ``[B, C, H, W]`` (a
            ``TeacherCache`` built from a teacher whose ``"uncertainty"`` is class-wise stores it
            under "teacher_unc").

    Returns (when called):
        (loss, {"ce": ..., "rmsle": ...}), terms detached.

    References:
        Holder & Shafique, ICCVW 2021; Landgraf et al., DUDES (2023) Eq. 1-3 and §5.
        Taught in notebooks/03_dudes.ipynb (ablation).
    """

    def __init__(self, ignore_index: int = 255, teacher_key: str = "teacher_unc") -> None:
        self.ignore_index, self.teacher_key = ignore_index, teacher_key

    def __call__(self, outputs, batch) -> tuple[Tensor, dict[str, Tensor]]:
        outputs = _outputs_with(outputs, ("logits", "class_uncertainty"),
                                "ClassWiseUncertaintyLoss", "a models.ClassWiseUncertaintyStudent",
                                "Wrap the segmenter as models.ClassWiseUncertaintyStudent("
                                "segmenter); a DUDESStudent's [B, H, W] map goes with DUDESLoss.")
        target = _require(batch, self.teacher_key, "ClassWiseUncertaintyLoss").float()
        labels = _require(batch, "mask", "ClassWiseUncertaintyLoss")
        logits = outputs["logits"]
        if target.shape != logits.shape:
            raise ValueError(
                f"batch[{self.teacher_key!r}] has shape {_shape(target)}; expected the teacher's "
                f"class-wise std map of the logits' shape {_shape(logits)}. A [B, H, W] target is "
                "the DUDES one: use DUDESLoss for it."
            )
        invalid = _invalid_pixels(batch, target)
        keep = None if invalid is None else (~invalid)[:, None].expand(target.shape)
        ce = cross_entropy(logits, labels, self.ignore_index)
        rmsle = rmsle_loss(outputs["class_uncertainty"], target, keep)
        return ce + rmsle, {"ce": ce.detach(), "rmsle": rmsle.detach()}
