"""Unsupervised domain adaptation (UDA) methods that train the teachers of notebook 05.

Chao et al. (CVPRW 2021) distil an ensemble of UDA teachers, each trained by a *different*
method, so that the members differ in per-class strength and in the scale of their
confidences. This module holds small, readable versions of such methods, for labelled
source images (ToyCity "source", game-like) and unlabelled target images (ToyCity "target",
real-like). The target's labels are never read here: target data sets must come wrapped in
``data.Unlabelled`` (no labels) or ``fusion.PseudoLabels`` (labels a model made).

- ``strong_photometric`` — domain randomisation: source images under heavy colour, blur and
  noise changes, so appearance stops being a cue (Tobin et al., 2017; Yue et al., 2019).
- ``adabn`` — AdaBN (Li et al., 2016): re-estimate BatchNorm statistics on target images.
- ``UDALoss(method="entropy_min")`` — AdvEnt's direct entropy minimisation on target pixels
  (Vu et al., CVPR 2019, Eq. 3 "MinEnt"), without the discriminator.
- ``class_balanced_pseudo_labels`` + ``UDALoss(method="self_training")`` — CBST's class-balanced
  self-training (Zou et al., ECCV 2018): per-class confidence thresholds keep the same portion
  of every class's pixels, so frequent classes do not crowd out rare ones.
- ``class_mix`` + ``UDALoss(method="class_mix")`` — DACS (Tranheden et al., WACV 2021): paste
  half of the classes of a source image onto a target image, labelled by the source mask and
  by a mean teacher's pseudo-labels.

Taught in notebooks/05_uda_channel_fusion.ipynb; the zoo recipes ``toycity-uda/*`` use these.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from minikd.data import ColorJitter, Compose, JointTransform, Unlabelled
from minikd.losses import cross_entropy
from minikd.metrics import check_labels

__all__ = [
    "UDA_METHODS",
    "MeanTeacher",
    "RandomBlurNoise",
    "SourceTarget",
    "UDALoss",
    "adabn",
    "class_balanced_pseudo_labels",
    "class_mix",
    "entropy_map",
    "strong_photometric",
]

UDA_METHODS = ("entropy_min", "self_training", "class_mix")
_VOID = 255


# =========================================================================== data
class RandomBlurNoise(JointTransform):
    """Gaussian blur (sigma in [0, max_sigma] pixels) and Gaussian noise (sd in [0, max_noise])
    on the image only; labels untouched. Domain randomisation's non-colour part."""

    def __init__(self, max_sigma: float = 1.0, max_noise: float = 0.03,
                 generator: torch.Generator | None = None):
        super().__init__(generator)
        if max_sigma < 0 or max_noise < 0:
            raise ValueError(f"RandomBlurNoise(max_sigma={max_sigma}, max_noise={max_noise}); "
                             "expected both >= 0.")
        self.max_sigma, self.max_noise = max_sigma, max_noise

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        img = sample["image"]
        sigma = self.max_sigma * self._rand(generator)
        if sigma > 0.05:
            from torchvision.transforms.functional import gaussian_blur

            k = 2 * math.ceil(2 * sigma) + 1
            img = gaussian_blur(img, [k, k], [sigma, sigma])
        sd = self.max_noise * self._rand(generator)
        noise = torch.randn(img.shape, generator=generator or self.generator)
        return {**sample, "image": (img + sd * noise).clamp(0, 1)}


def strong_photometric() -> Compose:
    """Domain randomisation's appearance change: strong colour jitter (with hue), then blur
    and noise. Put it after the geometric steps of ``data.train_transforms``."""
    return Compose([ColorJitter(0.5, 0.5, 0.7, hue=0.06), RandomBlurNoise(1.0, 0.03)])


class SourceTarget(Dataset):
    """Source item ``i`` joined with a random target item, for UDA training with ``fit``.

    Item ``i`` is ``source[i]`` (``"image"``, ``"mask"``, ...) plus ``"target_image"``,
    ``"target_mask"`` and ``"target_valid"`` from ``target[j]`` with ``j`` drawn by torch's
    global generator (so ``fit``'s seed replays it). The target set must carry no true labels:
    wrap it in ``data.Unlabelled`` (mask all 255) or ``fusion.PseudoLabels`` (a model's labels);
    anything else is refused, so target labels cannot leak into training by accident.

    References:
        Taught in notebooks/05_uda_channel_fusion.ipynb (how the UDA teachers were trained).
    """

    def __init__(self, source: Dataset, target: Dataset):
        from minikd.fusion import PseudoLabels

        if not isinstance(target, (Unlabelled, PseudoLabels)):
            raise TypeError(f"the target data set is a {type(target).__name__}; expected "
                            "data.Unlabelled(...) or fusion.PseudoLabels(...): UDA never trains "
                            "on target labels. Wrap it, e.g. SourceTarget(src, Unlabelled(tgt)).")
        if len(source) == 0 or len(target) == 0:
            raise ValueError(f"SourceTarget needs images on both sides; got {len(source)} source "
                             f"and {len(target)} target images.")
        self.source, self.target = source, target

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.source[i])
        t = self.target[int(torch.randint(len(self.target), ()))]
        item["target_image"] = t["image"]
        item["target_mask"] = t["mask"]
        item["target_valid"] = t.get("valid", torch.ones(t["image"].shape[-2:], dtype=torch.bool))
        return item


# =========================================================================== AdaBN
@torch.no_grad()
def adabn(model: nn.Module, target_images: Iterable[Tensor | dict], *,
          device: str | torch.device = "cpu") -> nn.Module:
    """AdaBN: replace every BatchNorm's running statistics by those of the target images.

    The statistics are reset and re-estimated as an exact cumulative average
    (``momentum=None``) over the batches, in train mode under ``no_grad``; weights are unchanged.
    Returns the model (modified in place) in eval mode.

    Raises:
        ValueError: the model has no BatchNorm layer (AdaBN would change nothing).

    References:
        Li, Wang, Shi, Liu, Hou, "Revisiting Batch Normalization For Practical Domain
        Adaptation" (2016). Taught in notebooks/05_uda_channel_fusion.ipynb.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer; AdaBN needs one.")
    saved = [bn.momentum for bn in bns]
    model.to(device).train()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    seen = 0
    for batch in target_images:
        x = batch["image"] if isinstance(batch, dict) else batch
        model(x.to(device))
        seen += len(x)
    for bn, m in zip(bns, saved):
        bn.momentum = m
    if seen == 0:
        raise ValueError("adabn got no target images; pass a loader of target batches.")
    return model.eval()


# =========================================================================== entropy
def entropy_map(logits: Tensor) -> Tensor:
    """AdvEnt's normalised entropy per pixel, ``-Σ_c p_c log p_c / log C`` in [0, 1]: [B, H, W].

    References:
        Vu et al., "ADVENT", CVPR 2019, Eq. 2 (the weighted self-information summed over c).
    """
    logp = F.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(1) / math.log(logits.shape[1])


# =========================================================================== CBST
@torch.no_grad()
def class_balanced_pseudo_labels(confidence: Tensor, prediction: Tensor, portion: float = 0.5,
                                 valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """CBST's class-balanced pseudo-labels from a model's predictions over target images.

    For each class c, k_c is the confidence of the pixel at the top ``portion`` of the pixels
    predicted as c (sorted by confidence): a pixel keeps its argmax c when its confidence is at
    least k_c, else it becomes 255. Every class keeps the same share of its pixels, so rare
    classes are not drowned by frequent ones (a single global threshold keeps mostly road).

    Args:
        confidence, prediction: ``[N, H, W]`` max-softmax and argmax of the model, i.e.
            ``probs.max(1)`` (passed apart so a whole set needs no ``[N, C, H, W]`` tensor).
        portion: the share of each class's pixels kept, in (0, 1] (CBST grows it 0.2 -> 0.5).
        valid: optional ``[N, H, W]`` bool; False pixels are void and ignored for k_c.

    Returns:
        (labels ``[N, H, W]`` uint8 with 255 = void, thresholds k ``[C]`` for the classes
        0..max(prediction); NaN for a class nobody predicts).

    References:
        Zou, Yu, Kumar, Wang, "Unsupervised Domain Adaptation for Semantic Segmentation via
        Class-Balanced Self-Training", ECCV 2018, §3.3 and Algorithm 1. Taught in
        notebooks/05_uda_channel_fusion.ipynb.
    """
    if not 0 < portion <= 1:
        raise ValueError(f"portion={portion}; expected a share of pixels in (0, 1].")
    if confidence.shape != prediction.shape:
        raise ValueError(f"confidence {tuple(confidence.shape)} and prediction "
                         f"{tuple(prediction.shape)} differ; pass probs.max(1) of one model.")
    conf, pred = confidence.float(), prediction.long()
    if valid is not None:
        pred = torch.where(valid.bool(), pred, torch.full_like(pred, -1))
    k = torch.full((int(pred.max()) + 1 if pred.numel() else 0,), float("nan"))
    for c in range(len(k)):
        values = conf[pred == c]
        if len(values):
            k[c] = values.sort(descending=True).values[max(0, math.ceil(portion * len(values)) - 1)]
    keep = (pred >= 0) & (conf >= k.nan_to_num(2.0)[pred.clamp(min=0)])
    labels = torch.where(keep, pred, torch.full_like(pred, _VOID)).to(torch.uint8)
    return labels, k


# =========================================================================== DACS
def class_mix(source_image: Tensor, source_mask: Tensor, target_image: Tensor,
              target_labels: Tensor, generator: torch.Generator | None = None
              ) -> tuple[Tensor, Tensor, Tensor]:
    """DACS' ClassMix: paste half of each source image's classes onto its target image.

    For each pair, half of the classes present in the source mask (rounded up, chosen at
    random) form the mix mask M; mixed image = M·source + (1 − M)·target, mixed label =
    source mask where M, the target's (pseudo-)labels elsewhere.

    Args:
        source_image, target_image: ``[B, 3, H, W]``.
        source_mask, target_labels: ``[B, H, W]`` labels (255 = void).
        generator: draws the classes.

    Returns:
        (mixed images, mixed labels, M as ``[B, H, W]`` bool).

    References:
        Tranheden, Olsson, Pinto, Svensson, "DACS: Domain Adaptation via Cross-domain Mixed
        Sampling", WACV 2021, §3.2 (after Olsson et al.'s ClassMix). Taught in notebook 05.
    """
    masks = []
    for m in source_mask:
        classes = m.unique()
        classes = classes[classes != _VOID]
        pick = classes[torch.randperm(len(classes), generator=generator)[: (len(classes) + 1) // 2]]
        masks.append(torch.isin(m, pick))
    mix = torch.stack(masks)
    image = torch.where(mix[:, None], source_image, target_image)
    labels = torch.where(mix, source_mask, target_labels.to(source_mask.dtype))
    return image, labels, mix


class MeanTeacher:
    """An exponential moving average of a model's weights (DACS' pseudo-labeller, α = 0.99).

    ``update()`` after each optimizer step: θ' ← α θ' + (1 − α) θ (buffers are copied).
    """

    def __init__(self, model: nn.Module, alpha: float = 0.99):
        if not 0 <= alpha < 1:
            raise ValueError(f"alpha={alpha}; expected an EMA factor in [0, 1).")
        self.model, self.alpha = model, alpha
        self.ema = copy.deepcopy(model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self) -> None:
        for e, p in zip(self.ema.parameters(), self.model.parameters()):
            e.mul_(self.alpha).add_(p.detach(), alpha=1 - self.alpha)
        for e, b in zip(self.ema.buffers(), self.model.buffers()):
            e.copy_(b)

    @torch.no_grad()
    def pseudo_labels(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(argmax labels [B, H, W], max-softmax confidence [B, H, W]) of the EMA model."""
        conf, labels = self.ema(x).float().softmax(1).max(1)
        return labels, conf


# =========================================================================== the loss
class UDALoss:
    """Source cross-entropy plus one target-domain term, as ``fit``'s ``loss_fn``.

    ``fit`` feeds ``model(batch["image"])`` (the source images) as ``outputs``; this object runs
    the same ``model`` on the batch's target images itself, so gradients reach it from both.
    Batches come from ``SourceTarget``.

    Methods (``weight`` = λ of the target term):
      - ``"entropy_min"``: L = CE(source) + λ · mean normalised entropy of target pixels
        (AdvEnt's MinEnt; padding left out).
      - ``"self_training"``: L = CE(source) + λ · CE(target, pseudo-labels) with the labels of
        ``class_balanced_pseudo_labels`` (CBST), carried in ``batch["target_mask"]``.
      - ``"class_mix"``: L = CE(source) + λ · CE(mix, mixed labels), where the pasted source
        pixels weigh 1 and the target pixels, labelled by a mean teacher, weigh q, the share of
        the teacher's target pixels with confidence above ``threshold`` (DACS: 0.968). The mean
        teacher is updated at the start of each step after the first; it is not checkpointed,
        so a resumed run restarts it from the resumed weights.

    References:
        Vu et al. (2019); Zou et al. (2018); Tranheden et al. (2021). Taught in notebook 05.
    """

    def __init__(self, model: nn.Module, method: str, weight: float = 1.0, *,
                 ema_alpha: float = 0.99, threshold: float = 0.968, num_classes: int = 17):
        if method not in UDA_METHODS:
            raise ValueError(f"UDA method {method!r} is not known; expected one of "
                             f"{list(UDA_METHODS)}.")
        if weight < 0:
            raise ValueError(f"weight={weight}; expected λ >= 0.")
        self.model, self.method, self.weight = model, method, float(weight)
        self.threshold, self.num_classes = threshold, num_classes
        self.teacher = MeanTeacher(model, ema_alpha) if method == "class_mix" else None
        self._steps = 0

    def __call__(self, outputs: Tensor, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        for key in ("mask", "target_image"):
            if key not in batch:
                raise KeyError(f"UDALoss needs batch[{key!r}]; build the loader on "
                               "adaptation.SourceTarget(source, Unlabelled(target)).")
        ce = cross_entropy(outputs, batch["mask"])
        x_t = batch["target_image"].to(outputs.device)
        if self.method == "entropy_min":
            valid = batch["target_valid"].to(outputs.device)
            ent = entropy_map(self.model(x_t))
            term = ent[valid].mean() if valid.any() else ent.sum() * 0
        elif self.method == "self_training":
            labels = batch["target_mask"].to(outputs.device)
            check_labels(labels, self.num_classes, name="target pseudo-labels")
            term = cross_entropy(self.model(x_t), labels)
        else:
            term = self._class_mix_term(batch, x_t, outputs.device)
        return ce + self.weight * term, {"ce": ce.detach(), self.method: term.detach()}

    def _class_mix_term(self, batch: dict[str, Any], x_t: Tensor, device: torch.device) -> Tensor:
        if self._steps > 0:
            self.teacher.update()  # the optimizer stepped since the last call
        self._steps += 1
        self.teacher.ema.to(device)
        labels, conf = self.teacher.pseudo_labels(x_t)
        valid = batch["target_valid"].to(device)
        labels = torch.where(valid, labels, torch.full_like(labels, _VOID))
        image, mixed, mix = class_mix(batch["image"].to(device), batch["mask"].to(device), x_t,
                                      labels)
        q = ((conf > self.threshold) & valid).float().sum() / valid.float().sum().clamp(min=1)
        per_pixel = F.cross_entropy(self.model(image), mixed, ignore_index=_VOID,
                                    reduction="none")
        weight = torch.where(mix, torch.ones_like(per_pixel), q.expand_as(per_pixel))
        keep = mixed != _VOID
        return (per_pixel * weight)[keep].sum() / keep.sum().clamp(min=1)
