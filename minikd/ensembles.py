"""Ensembles as teachers: deep ensembles (looped or vectorised), MC dropout, deep sub-ensembles,
and a teacher cache that runs the teacher once per training image instead of once per step.

Every ensemble here has the same ``predict(x)`` (no grad, eval mode) returning a dict:

=================  ==============  ===========================================================
key                shape           meaning
=================  ==============  ===========================================================
``probs``          [B, C, H, W]    mean softmax over members, p̄
``pred``           [B, H, W]       argmax_c p̄_c
``uncertainty``    [B, H, W]       DUDES: std over members of p_m[pred] (the teacher target)
``entropy``        [B, H, W]       predictive entropy H[p̄] (total uncertainty)
``mutual_info``    [B, H, W]       H[p̄] - mean_m H[p_m] (epistemic part, clamped at 0)
``member_probs``   [M, B, C, H, W] only with ``return_members=True``
``depth``          [B, H, W]       mean of the members' depths (depth members only)
``depth_var``      [B, H, W]       EMUFormer Eq. 10: mean of variances + variance of means
=================  ==============  ===========================================================

``predict(x, statistics=("uncertainty",))`` computes only the statistics named (from
``STATISTICS``); a teacher cache asks for its targets only. The members run one at a time and
each output is folded into running sums (``StreamingStatistics``: Welford means and sums of
squares, summed member entropies), so memory is one member's output plus a few ``[B, C, H, W]``
maps whatever M is; ``return_members=True`` stacks the members instead (same numbers).

Members return either bare logits ``[B, C, H, W]`` or a dict with any of ``"logits"``,
``"depth"``, ``"depth_var"`` (other keys, e.g. a DUDES student's ``"uncertainty"``, are stacked
and passed through ``forward_members`` but not summarised).

**Which standard deviation.** DUDES' text says "the standard deviation of the softmax
probabilities of the predicted class"; the authors' code (``cityscapes/train_student.py``) uses
``torch.std`` over the 10 members, i.e. the *unbiased* estimate (divide by M-1). minikd follows the
code (``correction=1``) so a student trained here learns the same target as the paper's; the
population std (``correction=0``) is ``sqrt((M-1)/M)`` times it (0.949 for M=10). A single sample
(M=1) has no spread: its uncertainty is 0. EMUFormer's Eq. 10 writes ``1/T``, so ``depth_var``
uses the population variance of the members' means, whatever ``correction`` says.

**Vectorised members.** ``torch.func`` can run M members of one architecture as one batched call
(``stack_module_state`` + ``functional_call`` + ``vmap`` over a parameter-free "meta" copy). It
pays on a GPU, where one large kernel beats M small ones; on a CPU a plain loop is as fast or
faster (benchmarks/RESULTS.md), so ``vectorize="auto"`` uses it on CUDA only. Both paths give
the same numbers (tests/test_ensembles.py). Caveats: members must share class, parameter names
and shapes, and train/eval mode; dropout runs with ``randomness="different"`` (each member its
own mask); in train mode BatchNorm running statistics update inside the stacked buffers
(``DeepEnsemble`` copies them back to the members; ``VectorizedEnsemble`` keeps them until
``unstack_to``).

References:
    Lakshminarayanan et al. 2017 (deep ensembles); Landgraf et al., DUDES (2023) §3.2;
    Landgraf et al., EMUFormer (2024) Eq. 10 and §4 (MC dropout, deep sub-ensembles);
    Gal & Ghahramani 2016 (MC dropout); Valdenegro-Toro 2023 (sub-ensembles); PyTorch tutorial
    "Model ensembling" (torch.func). Taught in notebooks/02_unet_ensemble_weighting.ipynb and
    notebooks/03_dudes.ipynb. Pseudo-label fusion for domain adaptation (Chao et al. 2021)
    is in ``minikd.fusion``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state
from torch.utils.data import DataLoader, Dataset

from minikd.metrics import check_labels, check_probabilities

__all__ = [
    "STATISTICS",
    "TARGET_KEYS",
    "CachedTargets",
    "DeepEnsemble",
    "DeepSubEnsemble",
    "LiveTeacher",
    "MCDropout",
    "StreamingStatistics",
    "TeacherCache",
    "VectorizedEnsemble",
    "class_weights_from_iou",
    "confidence_weights",
    "depth_predictive_variance",
    "dudes_uncertainty",
    "ensemble_statistics",
    "ensemble_weight_confusions",
    "fuse_teacher_caches",
    "search_ensemble_weights",
    "stack_members",
    "weight_grid",
    "weighted_fusion",
]

# Output of a teacher -> the key a CachedTargets sample carries it under.
TARGET_KEYS: dict[str, str] = {
    "probs": "teacher_probs",
    "logits": "teacher_logits",
    "uncertainty": "teacher_unc",
    "entropy": "teacher_entropy",
    "mutual_info": "teacher_mi",
    "depth": "teacher_depth",
    "depth_var": "teacher_depth_var",
    "features": "teacher_features",  # a WithFeatures teacher: SKD pair-wise, IFVD (notebook 06)
}


# --------------------------------------------------------------------------- statistics
def dudes_uncertainty(member_probs: Tensor, pred: Tensor, correction: int = 1) -> Tensor:
    """DUDES teacher uncertainty: std over members of the softmax probability of class ``pred``.

    Args:
        member_probs: softmax of every member, ``[M, B, C, H, W]``.
        pred: the ensemble's predicted class (argmax of the mean softmax), ``[B, H, W]``.
        correction: 1 = unbiased std (divide by M-1, as the DUDES code's ``torch.std``),
            0 = population std. With a single member the result is 0.

    Returns:
        ``[B, H, W]`` uncertainty, >= 0.

    Raises:
        ValueError: ``member_probs`` is not ``[M, B, C, H, W]`` probabilities (e.g. one model's
            ``[B, C, H, W]``, or logits), or ``pred`` is not ``[B, H, W]`` in 0..C-1.
        TypeError: ``pred`` is not an integer tensor.

    References:
        Landgraf et al., DUDES (2023) §3.2 (z_i of Eq. 2). Taught in notebooks/03_dudes.ipynb.
    """
    if not isinstance(member_probs, Tensor) or member_probs.dim() != 5:
        got = (tuple(member_probs.shape) if isinstance(member_probs, Tensor)
               else type(member_probs).__name__)
        raise ValueError(f"member_probs has shape {got}; expected [M, B, C, H, W], the members "
                         "stacked on dim 0 (predict(x, return_members=True)['member_probs']). "
                         "For one model's probabilities use probs.unsqueeze(0).")
    m, b, c, h, w = member_probs.shape
    if not isinstance(pred, Tensor) or tuple(pred.shape) != (b, h, w):
        got = tuple(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__
        raise ValueError(f"pred has shape {got}; expected [B, H, W] = {[b, h, w]} to match "
                         "member_probs, e.g. member_probs.mean(0).argmax(1).")
    check_labels(pred, c, None, name="pred")
    check_probabilities(member_probs, dim=2, name="member_probs")
    pred = pred.long()
    index = pred[None, :, None].expand(m, -1, 1, -1, -1)
    p_pred = member_probs.gather(2, index).squeeze(2)  # [M, B, H, W]
    if m - correction <= 0:
        return torch.zeros_like(p_pred[0])
    return p_pred.std(dim=0, correction=correction)


def depth_predictive_variance(depth: Tensor, depth_var: Tensor | None = None) -> Tensor:
    """EMUFormer Eq. 10: sigma^2 = mean_t s_t^2 + mean_t (mu_t - mu_bar)^2.

    Args:
        depth: the members' (or samples') depth means ``[M, B, H, W]``.
        depth_var: their predicted (aleatoric) variances ``[M, B, H, W]``, or None for members
            that predict no variance (then only the spread of the means counts).

    Returns:
        ``[B, H, W]`` predictive variance (population variance of the means, as Eq. 10's 1/T).

    Raises:
        ValueError: ``depth`` is not ``[M, B, H, W]`` or ``depth_var`` has another shape.

    References:
        Landgraf et al., EMUFormer (2024) Eq. 10; Lakshminarayanan et al. 2017 Eq. in §2.4.
    """
    if depth.dim() != 4 or (depth_var is not None and depth_var.shape != depth.shape):
        got = "" if depth_var is None else f" and depth_var {tuple(depth_var.shape)}"
        raise ValueError(f"got depth {tuple(depth.shape)}{got}; expected the members' depth "
                         "means [M, B, H, W] (members stacked on dim 0) and, if given, their "
                         "variances of the same shape.")
    spread = depth.var(dim=0, correction=0)
    return spread if depth_var is None else depth_var.mean(0) + spread


STATISTICS: tuple[str, ...] = ("probs", "pred", "uncertainty", "entropy", "mutual_info", "depth",
                               "depth_var")
_SEGMENTATION_STATISTICS = frozenset(STATISTICS[:5])
_DEPTH_STATISTICS = frozenset(STATISTICS[5:])


def _wanted(statistics: Sequence[str] | str | None) -> frozenset[str]:
    """The validated set of statistics asked for (None = all of ``STATISTICS``)."""
    if statistics is None:
        return frozenset(STATISTICS)
    names = (statistics,) if isinstance(statistics, str) else tuple(statistics)
    unknown = [s for s in names if s not in STATISTICS]
    if not names or unknown:
        raise ValueError(f"statistics={list(names)} contains unknown names {unknown}; choose "
                         f"from {list(STATISTICS)} (or None for all of them).")
    return frozenset(names)


class _Moments:
    """Running mean and sum of squared deviations of per-pixel maps, one sample at a time.

    Shifted sums (the first sample K as the shift): s1 = Σ(x - K), s2 = Σ(x - K)², so that
    mean = K + s1/n and Σ(x - mean)² = s2 - s1²/n. Members of an ensemble lie close together,
    so x - K is about the size of their spread and nothing cancels; the unshifted
    Σx² - (Σx)²/n loses a float32 std of 1e-6 next to Σx² of 10 entirely. The mean is computed
    the same way with or without ``squares`` (s2), so asking for more statistics never changes
    it (nor the argmax).
    """

    def __init__(self, squares: bool):
        self.squares, self.n = squares, 0
        self.shift: Tensor | None = None
        self.s1: Tensor | None = None
        self.s2: Tensor | None = None

    def update(self, x: Tensor, owned: bool = False) -> None:
        """Fold in ``x``; ``owned=True`` lets it be overwritten (saves a copy of the map)."""
        self.n += 1
        if self.shift is None:
            self.shift = x if owned else x.clone()
            self.s1 = torch.zeros_like(x)
            self.s2 = torch.zeros_like(x) if self.squares else None
            return
        d = x.sub_(self.shift) if owned else x - self.shift
        self.s1 += d
        if self.s2 is not None:
            self.s2.addcmul_(d, d)

    def mean(self) -> Tensor:
        return self.shift + self.s1 / self.n

    def squared_deviations(self) -> Tensor:
        """Σ_t (x_t - mean)², >= 0."""
        return (self.s2 - self.s1.square() / self.n).clamp_min(0)


class StreamingStatistics:
    """The ``predict`` statistics accumulated one member at a time (memory independent of M).

    ``update(member_output)`` folds one member's logits and/or depth into running per-pixel
    sums; ``compute()`` returns the dict of the module docstring. Peak memory is one member's
    output plus a few ``[B, C, H, W]`` maps, whatever the number of members M, where stacking
    the members holds M softmax maps (10 x 19 x 1024 x 2048 floats = 1.6 GB at Cityscapes
    resolution). Only what ``statistics`` asks for is computed: Σp always (``pred`` needs the
    mean), the sum of squares for ``"uncertainty"`` (shifted by the first member, so that
    members that agree closely keep their small std in float32), the sum of member entropies
    for ``"mutual_info"``; the std of the predicted class is selected after the last member.

    Args:
        statistics: names from ``STATISTICS`` to compute (None = all). Names the members cannot
            give (depth statistics of segmentation-only members and vice versa) are left out.
        correction: 1 = unbiased std for ``"uncertainty"`` (the DUDES code), 0 = population.
        what: "member", "sample" or "head", for error messages.

    References:
        DUDES §3.2 (std of the predicted class); EMUFormer Eq. 3 (entropy) and Eq. 10 (depth
        variance); Chan, Golub & LeVeque (1983) on shifted sums of squares.
    """

    def __init__(self, statistics: Sequence[str] | str | None = None, correction: int = 1,
                 what: str = "member"):
        self.wanted, self.correction, self.what = _wanted(statistics), correction, what
        self.n = 0
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._keys: list[str] = []
        self.probs = _Moments(squares="uncertainty" in self.wanted)  # softmax [B, C, H, W]
        self.entropy_sum: Tensor | None = None  # Σ_m H[p_m] [B, H, W]
        self.depth = _Moments(squares="depth_var" in self.wanted)  # means [B, H, W]
        self.depth_var_sum: Tensor | None = None  # Σ_m s_m² [B, H, W]

    def update(self, output: object) -> None:
        """Fold in one member's output (logits tensor, or dict with logits/depth/depth_var)."""
        out = _as_dict(output, self.n)
        shapes = {k: tuple(v.shape) for k, v in out.items()}
        if self._shapes is None:
            self._shapes, self._keys = shapes, sorted(out)
        else:
            _check_like(self._shapes, shapes, self.n, self.what)
        self.n += 1
        if "logits" in out and self.wanted & _SEGMENTATION_STATISTICS:
            logits = out["logits"].float()
            p = logits.softmax(1)
            inplace = not p.requires_grad  # under no_grad (predict) reuse the maps in place
            if "mutual_info" in self.wanted:  # Σ_m H[p_m], for the expected entropy
                # H = -Σ p log p with log p = log_softmax: two fused kernels, no log per class
                # (entr(p) costs 3x more); p = 0 has a finite log p here, so 0 log 0 = 0.
                logp = logits.log_softmax(1)
                h = (logp.mul_(p) if inplace else logp * p).sum(1).neg()
                self.entropy_sum = h if self.entropy_sum is None else self.entropy_sum + h
            self.probs.update(p, owned=inplace)
        if "depth" in out and self.wanted & _DEPTH_STATISTICS:
            self.depth.update(out["depth"].float())
            if out.get("depth_var") is not None and "depth_var" in self.wanted:
                var = out["depth_var"].float()
                self.depth_var_sum = var if self.depth_var_sum is None else \
                    self.depth_var_sum + var

    def compute(self) -> dict[str, Tensor]:
        """The statistics asked for (see the module docstring), from the members seen so far."""
        if self.n == 0:
            raise ValueError("no member output was given to StreamingStatistics.update.")
        out: dict[str, Tensor] = {}
        if self.probs.n:
            out.update(self._segmentation())
        if self.depth.n:
            out["depth"] = self.depth.mean()
            if "depth_var" in self.wanted:  # Eq. 10: population variance of the means (1/T)
                spread = self.depth.squared_deviations() / self.n
                out["depth_var"] = spread if self.depth_var_sum is None else \
                    self.depth_var_sum / self.n + spread
        out = {k: v for k, v in out.items() if k in self.wanted}
        if not out:
            raise ValueError(f"the {self.what}s returned keys {self._keys}, which give none of "
                             f"the statistics asked for, {sorted(self.wanted)}: segmentation "
                             "statistics need 'logits' (a bare tensor counts as logits), "
                             "'depth'/'depth_var' need 'depth'.")
        return out

    def _segmentation(self) -> dict[str, Tensor]:
        probs = self.probs.mean()
        pred = probs.max(1).indices  # = argmax(1), ties included, several times faster on a CPU
        out = {"probs": probs, "pred": pred}
        if "uncertainty" in self.wanted:
            if self.n - self.correction <= 0:
                out["uncertainty"] = torch.zeros_like(probs[:, 0])
            else:
                idx = pred[:, None]
                s1, s2 = (s.gather(1, idx)[:, 0] for s in (self.probs.s1, self.probs.s2))
                m2 = (s2 - s1.square() / self.n).clamp_min(0)
                out["uncertainty"] = (m2 / (self.n - self.correction)).sqrt()
        if self.wanted & {"entropy", "mutual_info"}:
            entropy = torch.special.entr(probs).sum(1)  # entr(p) = -p log p, 0 at p = 0
            out["entropy"] = entropy
            if self.entropy_sum is not None:
                out["mutual_info"] = (entropy - self.entropy_sum / self.n).clamp_min(0)
        return out


def ensemble_statistics(member_outputs: Mapping[str, Tensor], correction: int = 1,
                        return_members: bool = False,
                        statistics: Sequence[str] | str | None = None) -> dict[str, Tensor]:
    """Summarise stacked member outputs into the ``predict`` dict (see the module docstring).

    The stacked twin of ``StreamingStatistics`` (it feeds the members to it one by one, so both
    paths give the same numbers); for lessons that hold every member's output anyway.

    Args:
        member_outputs: ``{"logits": [M,B,C,H,W]}`` and/or ``{"depth"/"depth_var": [M,B,H,W]}``.
        correction: for the DUDES std, see ``dudes_uncertainty``.
        return_members: also return ``"member_probs"`` ``[M,B,C,H,W]``.
        statistics: names from ``STATISTICS`` to compute (None = all the members can give).

    Returns:
        Dict with probs, pred, uncertainty, entropy, mutual_info (segmentation members) and
        depth, depth_var (depth members), restricted to ``statistics``.

    References:
        DUDES §3.2; EMUFormer Eq. 3 (entropy) and Eq. 10; mutual information as in
        Depeweg et al. 2018 / Gal 2016 (total = aleatoric + epistemic).
    """
    members = {k: v for k, v in member_outputs.items() if k in ("logits", "depth", "depth_var")}
    if not members:
        raise ValueError(f"members returned keys {sorted(member_outputs)}; expected 'logits' "
                         "and/or 'depth' (a bare tensor counts as logits).")
    acc = StreamingStatistics(statistics, correction)
    for i in range(next(iter(members.values())).shape[0]):
        acc.update({k: v[i] for k, v in members.items()})
    out = acc.compute()
    if return_members:
        if "logits" not in members:
            raise ValueError("return_members=True needs members that return logits.")
        out["member_probs"] = members["logits"].float().softmax(dim=2)
    return out


# --------------------------------------------------------------------------- member checks
def _as_dict(out: object, index: int) -> dict[str, Tensor]:
    """A member's output as a dict (bare tensor -> logits)."""
    if isinstance(out, Tensor):
        return {"logits": out}
    if isinstance(out, Mapping):
        return dict(out)
    raise ValueError(f"member {index} returned {type(out).__name__}; expected a logits Tensor "
                     "[B, C, H, W] or a dict with 'logits' and/or 'depth'/'depth_var'.")


def _check_like(ref: Mapping[str, tuple[int, ...]], out: Mapping[str, tuple[int, ...]],
                index: int, what: str) -> None:
    """Raise a ValueError naming ``index`` if ``out`` has other keys or shapes than ``ref``
    (both map output keys to shapes)."""
    if sorted(ref) != sorted(out):
        raise ValueError(f"{what} {index} returned keys {sorted(out)} but {what} 0 returned "
                         f"{sorted(ref)}; every {what} must produce the same outputs.")
    for key, shape in out.items():
        if tuple(shape) != tuple(ref[key]):
            detail = (f" ({shape[1]} classes vs {ref[key][1]})"
                      if key == "logits" and len(shape) == 4 else "")
            raise ValueError(f"{what} {index} returned {key!r} of shape {tuple(shape)} but "
                             f"{what} 0 returned {tuple(ref[key])}{detail}; all {what}s "
                             "must agree on class count and output size.")


def _stack_outputs(outputs: Sequence[object], what: str = "member") -> dict[str, Tensor]:
    """Check that per-member outputs agree, then stack each key along a new dim 0."""
    dicts = [_as_dict(o, i) for i, o in enumerate(outputs)]
    shapes = [{k: tuple(v.shape) for k, v in d.items()} for d in dicts]
    for i, d in enumerate(shapes[1:], start=1):
        _check_like(shapes[0], d, i, what)
    return {k: torch.stack([d[k] for d in dicts]) for k in dicts[0]}


def _stacking_problem(members: Sequence[nn.Module]) -> str | None:
    """Why ``members`` cannot be vectorised (None when they can)."""
    ref = members[0]
    ref_p = {n: (p.shape, p.dtype, p.device) for n, p in ref.named_parameters()}
    ref_b = {n: (b.shape, b.dtype, b.device) for n, b in ref.named_buffers()}
    for i, m in enumerate(members[1:], start=1):
        if type(m) is not type(ref):
            return f"member {i} is a {type(m).__name__} but member 0 is a {type(ref).__name__}"
        for kind, mine, theirs in (("parameters", {n: (p.shape, p.dtype, p.device) for n, p in
                                                   m.named_parameters()}, ref_p),
                                   ("buffers", {n: (b.shape, b.dtype, b.device) for n, b in
                                                m.named_buffers()}, ref_b)):
            if mine != theirs:
                diff = sorted(set(mine.items()) ^ set(theirs.items()), key=str)[:2]
                return f"member {i} differs from member 0 in its {kind}: {diff}"
        if m.training != ref.training:
            return f"member {i} has training={m.training} but member 0 has {ref.training}"
    return None


def _num_classes(member: nn.Module) -> int | None:
    """A member's declared class count, if it declares one."""
    for obj in (member, getattr(member, "segmentation_head", None)):
        n = getattr(obj, "num_classes", None) if obj is not None else None
        if isinstance(n, int):
            return n
    return None


def _vmap_call(base: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor],
               x: Tensor, per_member: bool) -> dict[str, Tensor]:
    """Run the meta ``base`` once per stacked member state with ``torch.vmap``."""
    def call(p: dict[str, Tensor], b: dict[str, Tensor], xi: Tensor) -> dict[str, Tensor]:
        return _as_dict(functional_call(base, (p, b), (xi,)), 0)

    in_dims = (0, 0, 0 if per_member else None)
    return torch.vmap(call, in_dims=in_dims, randomness="different")(params, buffers, x)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode, then restore every submodule's own train/eval flag."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def _meta_copy(module: nn.Module) -> nn.Module:
    """A parameter-free copy of ``module`` (on the meta device) to hand to ``functional_call``."""
    return copy.deepcopy(module).to("meta")


# --------------------------------------------------------------------------- deep ensemble
class DeepEnsemble(nn.Module):
    """A deep ensemble of M segmentation and/or depth models, averaged at prediction time.

    Args:
        members: the trained models (``nn.Module`` s). Each returns logits ``[B, C, H, W]`` or a
            dict with ``"logits"`` / ``"depth"`` / ``"depth_var"``. Their outputs must agree in
            keys and shapes (checked on every call; the ValueError names the differing member).
        vectorize: ``True``: always run members with ``torch.func.vmap`` (needs identical
            architectures, else ValueError here); ``False``: plain loop; ``"auto"``: vmap when
            the input is on CUDA and the members can be stacked, loop otherwise. The vectorised
            path stacks the members' weights on each call (``torch.stack``, differentiable), so
            it always sees the current weights and gradients reach the members.
        correction: 1 (default, as the DUDES code) or 0 for the std in ``"uncertainty"``.

    Attributes:
        members: ``nn.ModuleList`` of the members (``len(ensemble)`` = M).

    References:
        Lakshminarayanan et al. 2017; DUDES §3.1 "Teacher" (10 randomly initialised members).
        Taught in notebooks/02_unet_ensemble_weighting.ipynb and notebooks/03_dudes.ipynb.
    """

    def __init__(self, members: Sequence[nn.Module], vectorize: bool | Literal["auto"] = "auto",
                 correction: int = 1):
        super().__init__()
        members = list(members)
        if not members or not all(isinstance(m, nn.Module) for m in members):
            raise ValueError(f"DeepEnsemble needs a non-empty list of nn.Module members; got "
                             f"{[type(m).__name__ for m in members]}.")
        if vectorize not in (True, False, "auto"):
            raise ValueError(f"vectorize must be True, False or 'auto'; got {vectorize!r}.")
        classes = [_num_classes(m) for m in members]
        for i, n in enumerate(classes):
            if n is not None and classes[0] is not None and n != classes[0]:
                raise ValueError(f"member {i} has num_classes={n} but member 0 has "
                                 f"{classes[0]}; all members must predict the same classes.")
        if vectorize is True and (problem := _stacking_problem(members)):
            raise ValueError(f"vectorize=True needs members of one architecture: {problem}. "
                             "Use vectorize=False (plain loop) for mixed members.")
        self.members = nn.ModuleList(members)
        self.vectorize = vectorize
        self.correction = correction
        object.__setattr__(self, "_base", None)  # meta copy of member 0, built on first use

    def __len__(self) -> int:
        return len(self.members)

    def _use_vmap(self, x: Tensor) -> bool:
        if self.vectorize is False or len(self.members) == 1:
            return False
        if self.vectorize is True:
            return True
        return x.is_cuda and _stacking_problem(list(self.members)) is None

    def forward_members(self, x: Tensor) -> dict[str, Tensor]:
        """Every member's raw output, stacked: ``{"logits": [M,B,C,H,W], ...}``.

        Runs in the members' current mode and grad setting (so it can be trained through).

        Args:
            x: input batch ``[B, 3, H, W]``.

        Returns:
            Dict of stacked outputs (a bare-tensor member output appears as ``"logits"``).
        """
        if not self._use_vmap(x):
            return _stack_outputs([m(x) for m in self.members])
        if problem := _stacking_problem(list(self.members)):
            raise ValueError(f"cannot vectorise the members: {problem}.")
        if self._base is None:
            object.__setattr__(self, "_base", _meta_copy(self.members[0]))
        self._base.train(self.members[0].training)
        named = [dict(m.named_parameters()) for m in self.members]
        params = {n: torch.stack([d[n] for d in named]) for n in named[0]}
        named_b = [dict(m.named_buffers()) for m in self.members]
        buffers = {n: torch.stack([d[n] for d in named_b]) for n in named_b[0]}
        out = _vmap_call(self._base, params, buffers, x, per_member=False)
        if self.members[0].training:  # BatchNorm updated the stacked copies: write them back
            with torch.no_grad():
                for n, stacked in buffers.items():
                    for d, value in zip(named_b, stacked):
                        d[n].copy_(value)
        return out

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Same as ``forward_members`` (the stacked raw outputs)."""
        return self.forward_members(x)

    @torch.no_grad()
    def predict(self, x: Tensor, return_members: bool = False,
                statistics: Sequence[str] | str | None = None) -> dict[str, Tensor]:
        """Ensemble prediction and uncertainties in eval mode, without gradients.

        The members run one after the other and each output is folded into running sums
        (``StreamingStatistics``), so memory does not grow with M. ``return_members=True`` and
        the vectorised path (which produces every member's output at once) summarise the
        stacked outputs instead; the numbers are the same.

        Args:
            x: input batch ``[B, 3, H, W]`` (normalised as the members expect).
            return_members: also return ``"member_probs"`` ``[M, B, C, H, W]``.
            statistics: names from ``STATISTICS`` to compute, e.g. ``("uncertainty",)`` for a
                DUDES teacher target; None (default) = all the members can give.

        Returns:
            The dict described in the module docstring.
        """
        with _eval_mode(self.members):
            if return_members or self._use_vmap(x):
                return ensemble_statistics(self.forward_members(x), self.correction,
                                           return_members, statistics)
            acc = StreamingStatistics(statistics, self.correction)
            for member in self.members:
                acc.update(member(x))
            return acc.compute()


# --------------------------------------------------------------------------- vectorised training
class VectorizedEnsemble(nn.Module):
    """M members of one architecture held as stacked parameters, run with one ``vmap`` call.

    This is the training-side twin of ``DeepEnsemble(vectorize=True)``: the stacked tensors are
    this module's own ``nn.Parameter`` s (leaves), so one optimizer over
    ``vectorized.parameters()`` trains all members at once (per-member SGD/AdamW updates are
    element-wise, so they equal M separate optimizers with the same settings). Call
    ``unstack_to(members)`` to copy the trained weights and BatchNorm statistics back.

    Args:
        members: models of identical class, parameter names/shapes and mode.

    Attributes:
        n_members: M.

    Example:
        >>> vec = stack_members(members)                       # doctest: +SKIP
        >>> opt = torch.optim.SGD(vec.parameters(), lr=0.01)   # doctest: +SKIP
        >>> logits = vec(images_per_member, per_member=True)["logits"]  # [M,B,C,H,W]
        >>> vec.unstack_to(members)                            # doctest: +SKIP

    References:
        PyTorch tutorial "Model ensembling" (torch.func.stack_module_state + vmap).
        Used by training.train_ensemble; benchmarked in benchmarks/ensemble_vmap_vs_loop.py.
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        members = list(members)
        if not members:
            raise ValueError("VectorizedEnsemble needs at least one member; got none.")
        if problem := _stacking_problem(members):
            raise ValueError(f"cannot vectorise the members: {problem}. Members must be copies "
                             "of one architecture (same class, parameter names and shapes).")
        params, buffers = stack_module_state(members)
        self._param_names = list(params)
        self._buffer_names = list(buffers)
        self.stacked = nn.ParameterList(
            nn.Parameter(params[n].detach().clone(), requires_grad=params[n].requires_grad)
            for n in self._param_names)
        for i, n in enumerate(self._buffer_names):
            self.register_buffer(f"buffer_{i}", buffers[n].clone())
        self.n_members = len(members)
        object.__setattr__(self, "_base", _meta_copy(members[0]))
        self.train(members[0].training)

    def __len__(self) -> int:
        return self.n_members

    def train(self, mode: bool = True) -> VectorizedEnsemble:
        """Set train/eval mode for all members at once."""
        super().train(mode)
        self._base.train(mode)
        return self

    def stacked_state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The stacked (params, buffers) dicts keyed by the members' own names."""
        params = dict(zip(self._param_names, self.stacked))
        buffers = {n: getattr(self, f"buffer_{i}") for i, n in enumerate(self._buffer_names)}
        return params, buffers

    def forward(self, x: Tensor, per_member: bool = False) -> dict[str, Tensor]:
        """All members' outputs, ``{"logits": [M,B,C,H,W], ...}``.

        Args:
            x: ``[B,3,H,W]`` shared by all members, or ``[M,B,3,H,W]`` with ``per_member=True``
                (each member its own batch, as in deep-ensemble training).
            per_member: whether dim 0 of ``x`` indexes the members.
        """
        if per_member and x.shape[0] != self.n_members:
            raise ValueError(f"per_member=True needs x of shape [M={self.n_members}, B, ...]; "
                             f"got {tuple(x.shape)}.")
        params, buffers = self.stacked_state()
        return _vmap_call(self._base, params, buffers, x, per_member)

    @torch.no_grad()
    def unstack_to(self, members: Sequence[nn.Module]) -> None:
        """Copy the stacked weights and buffers (e.g. BN running stats) back into ``members``."""
        if len(members) != self.n_members:
            raise ValueError(f"expected {self.n_members} members to copy into; got {len(members)}.")
        params, buffers = self.stacked_state()
        for i, m in enumerate(members):
            for n, t in m.named_parameters():
                t.copy_(params[n][i])
            for n, t in m.named_buffers():
                t.copy_(buffers[n][i])


def stack_members(members: Sequence[nn.Module]) -> VectorizedEnsemble:
    """``VectorizedEnsemble(members)``: stack identical members for a one-call vmap training step.

    Args:
        members: models of one architecture.

    Returns:
        The ``VectorizedEnsemble`` (a copy; the members are not changed until ``unstack_to``).
    """
    return VectorizedEnsemble(members)


# --------------------------------------------------------------------------- MC dropout
def _dropout_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


class MCDropout(nn.Module):
    """Monte Carlo dropout: n stochastic forward passes with dropout on, everything else in eval.

    Only ``nn.Dropout*`` layers (``Dropout``, ``Dropout2d``, ``AlphaDropout``, ...) are switched to
    train mode; BatchNorm keeps its running statistics (untouched), and dropout written
    functionally in a parent's forward (``F.dropout(..., self.training)``, timm's fused attention)
    or stochastic depth (``DropPath``) stays off. minikd's SegFormer, DepthFormer and
    SegDepthFormer built with ``dropout=p`` carry the rate p in the decoder and in every dropout
    layer of the MiT encoder (``models.set_encoder_dropout``), so the samples differ "throughout
    the entire network", as EMUFormer §4 asks (tests/test_emuformer_lib.py checks the encoder).

    Args:
        model: a model with at least one dropout layer (SegFormer/SegDepthFormer with
            ``dropout>0``).
        n_samples: number of stochastic passes T (EMUFormer uses 10).
        batched: run the T passes as one forward over the input repeated T times (faster on a
            GPU, T times the activation memory); the masks are independent either way.
        correction: std correction for ``"uncertainty"`` (see ``dudes_uncertainty``).

    References:
        Gal & Ghahramani 2016; EMUFormer §4 "Monte Carlo Dropout" (rates 0.2/0.5, 10 samples).
    """

    def __init__(self, model: nn.Module, n_samples: int = 10, batched: bool = False,
                 correction: int = 1):
        super().__init__()
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive int; got {n_samples!r}.")
        if not _dropout_layers(model):
            raise ValueError(f"{type(model).__name__} has no nn.Dropout layer, so every MC "
                             "sample would be identical. Build it with a dropout rate > 0 "
                             "(e.g. SegDepthFormer(..., dropout=0.2)).")
        self.model = model
        self.n_samples = n_samples
        self.batched = batched
        self.correction = correction

    def __len__(self) -> int:
        return self.n_samples

    def forward_members(self, x: Tensor) -> dict[str, Tensor]:
        """T stochastic passes, stacked ``[T, B, ...]``; the model's modes are restored after."""
        with _eval_mode(self.model):
            for layer in _dropout_layers(self.model):
                layer.train()
            if self.batched:
                flat = _as_dict(self.model(x.repeat(self.n_samples, *[1] * (x.ndim - 1))), 0)
                return {k: v.unflatten(0, (self.n_samples, x.shape[0])) for k, v in flat.items()}
            return _stack_outputs([self.model(x) for _ in range(self.n_samples)], "sample")

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Same as ``forward_members``."""
        return self.forward_members(x)

    @torch.no_grad()
    def predict(self, x: Tensor, return_members: bool = False,
                statistics: Sequence[str] | str | None = None) -> dict[str, Tensor]:
        """Mean prediction and uncertainties over T dropout samples (``DeepEnsemble.predict``;
        streamed over the samples unless ``batched`` or ``return_members``)."""
        if return_members or self.batched:
            return ensemble_statistics(self.forward_members(x), self.correction,
                                       return_members, statistics)
        acc = StreamingStatistics(statistics, self.correction, "sample")
        with _eval_mode(self.model):
            for layer in _dropout_layers(self.model):
                layer.train()
            for _ in range(self.n_samples):
                acc.update(self.model(x))
        return acc.compute()


# --------------------------------------------------------------------------- deep sub-ensemble
class DeepSubEnsemble(nn.Module):
    """A shared trunk (encoder) with N heads; heads take turns in training, all vote at test time.

    Training (EMUFormer §4): each training batch updates the trunk and ONE head, chosen in turn
    (``head_for_step(step) = step % n_heads``), so every head sees 1/N of the batches and the
    trunk sees all of them. In train mode ``forward(x)`` without ``head=`` uses the next head in
    turn and advances ``step`` (a buffer, so the turn order is saved in checkpoints and resumes):
    exactly one forward per optimizer step, which ``training.fit`` does. The idle heads get
    ``grad=None`` and PyTorch optimizers skip them entirely (no weight decay, no momentum) as long
    as gradients are zeroed with ``set_to_none=True`` (the default).

    In eval mode ``forward(x)`` returns the ensemble in the members' own format — ``"logits"``
    = log of the mean softmax (its argmax is the ensemble's prediction), ``"depth"`` the mean,
    ``"depth_var"`` Eq. 10 — so evaluation code written for one model works unchanged.

    Args:
        trunk: the shared encoder; ``trunk(x)`` may return a tensor or a list of features.
        make_head: called ``n_heads`` times to build independently initialised heads; a head maps
            the trunk's output to logits or a dict with ``"logits"``/``"depth"``/``"depth_var"``
            at the input's resolution.
        n_heads: N (EMUFormer uses 10).
        correction: std correction for ``"uncertainty"`` (see ``dudes_uncertainty``).

    References:
        Valdenegro-Toro 2023 (deep sub-ensembles); EMUFormer §4 "Deep Sub-Ensemble".
    """

    def __init__(self, trunk: nn.Module, make_head: Callable[[], nn.Module], n_heads: int,
                 correction: int = 1):
        super().__init__()
        if not isinstance(n_heads, int) or n_heads < 1:
            raise ValueError(f"n_heads must be a positive int; got {n_heads!r}.")
        self.trunk = trunk
        self.heads = nn.ModuleList(make_head() for _ in range(n_heads))
        if len({id(h) for h in self.heads}) != n_heads:
            raise ValueError("make_head returned the same module twice; it must build a new head "
                             "on every call (e.g. lambda: nn.Conv2d(64, 6, 1)).")
        self.correction = correction
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return len(self.heads)

    def head_for_step(self, step: int) -> int:
        """The head trained at training step ``step``: heads take turns, ``step % n_heads``."""
        return int(step) % len(self.heads)

    def forward_members(self, x: Tensor) -> dict[str, Tensor]:
        """The trunk once, every head on its output, stacked ``[N, B, ...]``."""
        features = self.trunk(x)
        return _stack_outputs([h(features) for h in self.heads], "head")

    def forward(self, x: Tensor, head: int | None = None) -> Tensor | dict[str, Tensor]:
        """One head's output (``head=k``, or the next in turn in train mode) or the ensemble."""
        if head is None and self.training:
            head = self.head_for_step(int(self.step))
            self.step += 1
        if head is not None:
            return self.heads[head](self.trunk(x))
        stats = self._stream(x, ("probs", "depth", "depth_var"))
        out = {k: stats[k] for k in ("depth", "depth_var") if k in stats}
        if "probs" in stats:
            out["logits"] = stats["probs"].clamp_min(1e-12).log()
        return out

    def _stream(self, x: Tensor, statistics: Sequence[str] | str | None) -> dict[str, Tensor]:
        """The trunk once, then the heads folded one by one into ``StreamingStatistics``."""
        features = self.trunk(x)
        acc = StreamingStatistics(statistics, self.correction, "head")
        for head in self.heads:
            acc.update(head(features))
        return acc.compute()

    @torch.no_grad()
    def predict(self, x: Tensor, return_members: bool = False,
                statistics: Sequence[str] | str | None = None) -> dict[str, Tensor]:
        """Ensemble prediction and uncertainties over the N heads, in eval mode (streamed over
        the heads unless ``return_members``)."""
        with _eval_mode(self):
            if return_members:
                return ensemble_statistics(self.forward_members(x), self.correction,
                                           return_members, statistics)
            return self._stream(x, statistics)


# --------------------------------------------------------------------------- teacher cache
def _accepts(fn: Callable, keyword: str) -> bool:
    """Whether ``fn`` takes the keyword argument ``keyword`` (False if it cannot be told)."""
    try:
        return keyword in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _takes_statistics(predict: Callable) -> bool:
    """Whether a ``predict`` method accepts ``statistics=`` (minikd's ensembles do)."""
    return _accepts(predict, "statistics")


@torch.no_grad()
def _teacher_outputs(teacher: nn.Module, images: Tensor,
                     targets: Sequence[str] = ()) -> dict[str, Tensor]:
    """What a teacher gives for a batch: its ``predict`` outputs (only the statistics among
    ``targets`` when it accepts ``statistics=``), or a model's raw outputs plus ``probs``."""
    if hasattr(teacher, "predict"):
        wanted = [t for t in targets if t in STATISTICS]
        if wanted and len(wanted) == len(targets) and _takes_statistics(teacher.predict):
            return dict(teacher.predict(images, statistics=wanted))
        return dict(teacher.predict(images))
    with _eval_mode(teacher):
        out = _as_dict(teacher(images), 0)
    if "logits" in out:
        out["probs"] = out["logits"].float().softmax(1)
    return out


def _atomic_save(obj: object, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename (never half-written).

    The one atomic writer of minikd (``training._atomic_write``), which also removes the
    temporary files of ``path`` that an earlier, killed write left behind.
    """
    from minikd.training import _atomic_write  # training imports nothing from here: no cycle

    _atomic_write(path, lambda f: torch.save(obj, f))


# Targets that K > 1 teacher views can be averaged into exactly (see TeacherCache).
_VIEW_TARGETS = ("probs", "entropy", "depth", "depth_var")


def _view_generator(seed: int, index: int, view: int) -> torch.Generator:
    """The generator of teacher view ``view`` of image ``index``: a function of the three
    numbers only, so the views are the same for any batch size, worker count or order."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + index) * 1_000_003 + view) % 2**63)


def _view_of(transform: Callable[..., dict], sample: dict, generator: torch.Generator) -> dict:
    """``transform(sample, generator=...)`` (``data.JointTransform``s take one); any other
    callable runs with torch's global RNG seeded from ``generator`` (restored afterwards)."""
    if _accepts(transform, "generator"):
        return transform(sample, generator=generator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator.initial_seed())
        return transform(sample)


class _TeacherViews(Dataset):
    """``{"image": [K, 3, H, W], "index"}``: K teacher views of each sample, each the seeded
    ``transform`` (colour jitter) and then ``preprocess`` (e.g. Normalize)."""

    def __init__(self, dataset: Dataset, transform: Callable[..., dict], views: int, seed: int,
                 preprocess: Callable[[dict], dict] | None):
        self.dataset, self.transform, self.views = dataset, transform, views
        self.seed, self.preprocess = seed, preprocess

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Tensor | int]:
        sample = dict(self.dataset[i])
        index = int(sample.get("index", i))
        images = []
        for view in range(self.views):
            out = _view_of(self.transform, dict(sample), _view_generator(self.seed, index, view))
            if tuple(out["image"].shape) != tuple(sample["image"].shape):
                raise ValueError(f"teacher_transform changed the image from "
                                 f"{tuple(sample['image'].shape)} to {tuple(out['image'].shape)}"
                                 "; it must act on the colours only (e.g. data.ColorJitter()), "
                                 "the geometry is applied later by CachedTargets.")
            images.append((out if self.preprocess is None else self.preprocess(out))["image"])
        return {"image": torch.stack(images), "index": index}


def _view_request(targets: Sequence[str], views: int) -> tuple[str, ...]:
    """What to ask the teacher for on each view so that K views can be combined."""
    if views == 1:
        return tuple(targets)
    unsupported = [t for t in targets if t not in _VIEW_TARGETS]
    if unsupported:
        raise ValueError(f"teacher_views={views} averages only {list(_VIEW_TARGETS)} exactly; "
                         f"targets {unsupported} have no exact mean over views (a std, a mutual "
                         "information or logits of K views do not combine). Use teacher_views=1 "
                         "for them, or cache 'probs' and derive them from it.")
    need = set(targets) | ({"probs"} if "entropy" in targets else set()) | (
        {"depth"} if "depth_var" in targets else set())
    return tuple(t for t in STATISTICS if t in need)


def _combine_views(outputs: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """K views' teacher outputs as one teacher over all M·K (member, view) samples: the mean
    softmax and its entropy, the mean depth and Eq. 10 (the views' mean variance plus the
    population variance of their means, i.e. Eq. 10 over the M·K samples)."""
    if len(outputs) == 1:
        return outputs[0]
    out: dict[str, Tensor] = {}
    if "probs" in outputs[0]:
        probs = torch.stack([o["probs"].float() for o in outputs]).mean(0)
        out.update(probs=probs, entropy=torch.special.entr(probs).sum(1))
    if "depth" in outputs[0]:
        depth = torch.stack([o["depth"].float() for o in outputs])
        out["depth"] = depth.mean(0)
        if all("depth_var" in o for o in outputs):
            var = torch.stack([o["depth_var"].float() for o in outputs])
            out["depth_var"] = depth_predictive_variance(depth, var)
    return out


def _cache_settings(targets: Sequence[str] | str, teacher_transform: Callable | None,
                    teacher_views: int, seed: int) -> dict[str, object]:
    """What a TeacherCache records about how it was built (plain types: saved and compared)."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    return {"targets": targets, "teacher_views": int(teacher_views),
            "seed": int(seed) if teacher_transform is not None else None,
            "teacher_transform": None if teacher_transform is None else
            type(teacher_transform).__name__}


class TeacherCache:
    """The teacher's targets for every UN-augmented training image, computed once and stored
    (optionally averaged over colour-jittered views of it, EMUFormer Eq. 8).

    Distillation spends most of its time running the teacher (ten networks for DUDES) on every
    step. Most targets are per-pixel maps, so they can instead be computed once per training
    image, stored (float16 by default), and sent through the same crop/scale/flip as the image by
    ``CachedTargets``. Memory: ``N * C * H * W * 2`` bytes for ``"probs"`` (ToyCity 200 images,
    12 classes, 64x128: 39 MB; Cityscapes at 512x1024 with 19 classes: 59 GB, so cache only
    ``"uncertainty"`` there: 3.1 GB, or use ``load(path, mmap=True)``).

    What changes (say it when teaching): the teacher sees the whole image, not the crop; for
    flips and crops the cached target equals the teacher run on the augmented image exactly for
    a pointwise teacher, and up to the teacher's receptive field at the crop border for a conv
    teacher (tests/test_ensembles.py measures it); under rescaling the target is the bilinear
    resize of the teacher's map rather than the teacher's map of the resized image.
    ``uncertainty`` = DUDES std when the teacher is an ensemble.

    **Teacher-side colour jitter (EMUFormer Eq. 8-10).** EMUFormer's teacher sees a colour-
    jittered image x̃ while the student sees the un-jittered one (its augmentation is scale,
    crop and flip only: ``data.train_transforms(crop, color_jitter=False)``), so that the
    teacher's uncertainty on the training images looks more like its test-time uncertainty.
    With ``teacher_transform=data.ColorJitter()`` every image is jittered ``teacher_views`` = K
    times before ``preprocess`` and the targets are averaged over the K views as one teacher of
    M·K samples: ``"probs"`` is the mean over views of the ensemble's mean softmax (= the mean
    softmax over all member-view pairs), ``"entropy"`` its entropy (Eq. 3), ``"depth"`` the mean
    of the views' mean depths, and ``"depth_var"`` Eq. 10 over the M·K samples: the mean of the
    views' σ² plus the variance of their mean depths (law of total variance). Other targets
    (DUDES std, mutual information, logits) need ``teacher_views=1``. The paper jitters afresh
    at every step; a cache fixes K views per image, whose mean approximates the teacher's
    expected target under jitter. View k of the image with index i uses a generator seeded
    from (``seed``, i, k) only, so the cache is reproducible whatever the batch size or
    workers (a stochastic teacher such as ``MCDropout`` samples from torch's global RNG: call
    ``training.set_seed`` first).
    Where a crop reaches past the image, ``data.RandomCrop`` pads every cached target with 0
    (which is no target: zero logits are a uniform distribution) and marks those pixels False in
    the validity map ``"valid"`` that it adds to the sample; every distillation loss object in
    ``minikd.losses`` ignores them.

    Args:
        teacher: a ``DeepEnsemble``/``MCDropout``/``DeepSubEnsemble`` (anything with
            ``.predict``) or a plain model (logits -> ``"logits"``/``"probs"``; dict outputs pass
            through).
        dataset: the training set WITHOUT augmentation; items are dicts with ``"image"``
            ``[3,H,W]`` (all the same size) and optionally ``"index"``.
        targets: teacher outputs to store, from ``TARGET_KEYS``: ``"probs"``, ``"logits"``,
            ``"uncertainty"``, ``"entropy"``, ``"mutual_info"``, ``"depth"``, ``"depth_var"``.
        dtype: storage dtype (float16 halves memory; relative rounding <= 2**-11).
        device: where the teacher runs (it is moved there); stored targets live on the CPU.
        batch_size: images per teacher call.
        preprocess: applied to each sample before the teacher, e.g. ``data.eval_transforms()``
            (Normalize) when the teacher was trained on normalised images.
        num_workers: DataLoader workers for reading the dataset.
        teacher_transform: colour-only transform of the teacher's input, applied to the
            [0, 1] image before ``preprocess`` (e.g. ``data.ColorJitter()``); a
            ``data.JointTransform`` gets a seeded ``generator=``, any other callable runs with
            torch's RNG seeded. None (default): the teacher sees the plain image.
        teacher_views: K >= 1 jittered views averaged per image (needs ``teacher_transform``
            when K > 1).
        seed: seed of the views.

    Attributes:
        targets: ``{name: Tensor [N, ...]}`` on the CPU.
        dataset_index: ``[N]`` the samples' ``"index"`` (or position), checked by
            ``CachedTargets``.
        settings: how it was built (targets, teacher_views, seed and the jitter's class name;
            saved with it, so ``build_or_load`` refuses a file built otherwise); None for a
            file written before minikd recorded them.

    References:
        DUDES §3.2 (teacher uncertainty targets); EMUFormer Eq. 8-10 (mean softmax, depth
        variance targets; jittered teacher input x̃, §3.3). Taught in notebooks/03_dudes.ipynb
        and notebook 04 (EMUFormer, planned); timed in benchmarks/teacher_cache_training.py.
    """

    def __init__(self, teacher: nn.Module, dataset: Dataset, targets: Sequence[str] = ("probs",),
                 *, dtype: torch.dtype = torch.float16, device: str | torch.device | None = None,
                 batch_size: int = 8, preprocess: Callable[[dict], dict] | None = None,
                 num_workers: int = 0, teacher_transform: Callable[..., dict] | None = None,
                 teacher_views: int = 1, seed: int = 0):
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        unknown = [t for t in targets if t not in TARGET_KEYS]
        if not targets or unknown:
            raise ValueError(f"targets {list(targets)} contain unknown names {unknown}; choose "
                             f"from {list(TARGET_KEYS)}.")
        if isinstance(teacher_views, bool) or not isinstance(teacher_views, int) or \
                teacher_views < 1 or (teacher_views > 1 and teacher_transform is None):
            raise ValueError(f"teacher_views={teacher_views!r} with teacher_transform="
                             f"{teacher_transform!r}; expected an int >= 1, and a "
                             "teacher_transform (e.g. data.ColorJitter()) when it is > 1 (K "
                             "un-jittered views would all be the same).")
        request = _view_request(targets, teacher_views)
        device = torch.device(device or "cpu")
        teacher = teacher.to(device)
        data = _Preprocessed(dataset, preprocess) if teacher_transform is None else \
            _TeacherViews(dataset, teacher_transform, teacher_views, seed, preprocess)
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        n, start = len(dataset), 0
        self.targets: dict[str, Tensor] = {}
        self.dataset_index = torch.empty(n, dtype=torch.long)
        self.settings = _cache_settings(targets, teacher_transform, teacher_views, seed)
        for batch in loader:
            images = batch["image"].to(device)
            out = _teacher_outputs(teacher, images, targets) if teacher_transform is None else \
                _combine_views([_teacher_outputs(teacher, images[:, k], request)
                                for k in range(teacher_views)])
            stop = start + batch["image"].shape[0]
            for name in targets:
                if name not in out:
                    raise ValueError(f"the teacher gives {sorted(out)}, not {name!r}; pick "
                                     "targets from those (a plain model gives logits/probs).")
                value = out[name].detach().to("cpu", dtype)
                if name not in self.targets:
                    self.targets[name] = torch.empty((n, *value.shape[1:]), dtype=dtype)
                self.targets[name][start:stop] = value
            self.dataset_index[start:stop] = batch["index"]
            start = stop

    @classmethod
    def _from_state(cls, state: dict) -> TeacherCache:
        cache = cls.__new__(cls)
        cache.targets, cache.dataset_index = dict(state["targets"]), state["dataset_index"]
        cache.settings = state.get("settings")  # None: written before settings were recorded
        return cache

    @classmethod
    def build_or_load(cls, path: str | os.PathLike, teacher: nn.Module, dataset: Dataset,
                      **kwargs: object) -> TeacherCache:
        """Load the cache from ``path`` if present, else compute it and save it there; prints
        which path was taken. A file built with other teacher views, seed or jitter than
        ``kwargs`` ask for, or without one of the targets asked for, is not loaded silently:
        ValueError (delete it to rebuild)."""
        path = Path(path)
        if path.exists():
            cache = cls.load(path)
            asked = _cache_settings(kwargs.get("targets", ("probs",)),
                                    kwargs.get("teacher_transform"),
                                    kwargs.get("teacher_views", 1), kwargs.get("seed", 0))
            stored = cache.settings
            differ = [] if stored is None else sorted(  # a cache holding more targets is fine
                k for k in asked if (not set(asked[k]) <= set(stored.get(k) or ()) if
                                     k == "targets" else stored.get(k) != asked[k]))
            if differ:
                raise ValueError(f"the teacher cache {path} was built with "
                                 f"{ {k: stored.get(k) for k in differ} } but "
                                 f"{ {k: asked[k] for k in differ} } is asked for; delete the "
                                 "file to rebuild it, or pass another path.")
            print(f"teacher cache: loaded {path}")
            return cache
        cache = cls(teacher, dataset, **kwargs)
        cache.save(path)
        print(f"teacher cache: computed {len(cache)} images, saved to {path}")
        return cache

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, position: int) -> dict[str, Tensor]:
        """``{"teacher_probs": [C,H,W], "teacher_unc": [H,W], ...}`` for dataset position i."""
        return {TARGET_KEYS[k]: v[position] for k, v in self.targets.items()}

    @property
    def nbytes(self) -> int:
        """Memory held by the stored targets."""
        return sum(t.numel() * t.element_size() for t in self.targets.values())

    def save(self, path: str | os.PathLike) -> None:
        """Write the cache atomically (temporary file, then rename) with ``torch.save``."""
        state = {"format": "minikd.TeacherCache/1", "targets": self.targets,
                 "dataset_index": self.dataset_index, "settings": self.settings}
        _atomic_save(state, Path(path))

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = False) -> TeacherCache:
        """Read a cache written by ``save`` (``weights_only=True``; ``mmap`` keeps it on disk)."""
        from minikd.training import _load_error_reason

        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as err:  # noqa: BLE001 - truncated file, foreign pickle, ...
            raise ValueError(f"{path} is not a readable minikd teacher cache "
                             f"({_load_error_reason(err)}). Delete it and build it again with "
                             "TeacherCache(...).save(path).") from None
        if not isinstance(state, dict) or state.get("format") != "minikd.TeacherCache/1":
            raise ValueError(f"{path} is not a minikd teacher cache (no 'format' tag); delete it "
                             "and rebuild it.")
        return cls._from_state(state)


class _Preprocessed(Dataset):
    """``{"image", "index"}`` of each sample, after an optional preprocessing transform."""

    def __init__(self, dataset: Dataset, preprocess: Callable[[dict], dict] | None):
        self.dataset, self.preprocess = dataset, preprocess

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Tensor | int]:
        sample = dict(self.dataset[i])
        if self.preprocess is not None:
            sample = self.preprocess(sample)
        return {"image": sample["image"], "index": int(sample.get("index", i))}


class LiveTeacher:
    """Teacher targets computed on every training batch, on a freshly colour-jittered copy.

    The alternative to a ``TeacherCache`` where caching does not fit (full mode: a 10-member
    ensemble's softmax over 2975 Cityscapes images at 1024×2048 would take ~240 GB). For each
    batch, every image gets its own jitter (``transform``, e.g. ``data.ColorJitter()``; the
    student keeps the un-jittered image), ``preprocess`` runs, and the teacher's statistics are
    added under the ``TARGET_KEYS`` names ("teacher_probs", "teacher_depth_var", ...), as a
    ``CachedTargets`` sample carries them. This is the paper's procedure (a new x̃ at every
    step, EMUFormer §3.3); its cost is the teacher's forward pass at every step.

    Args:
        teacher: a ``DeepEnsemble`` (or anything with ``predict``) or a model.
        targets: the statistics to add (default: EMUFormer's "probs" and "depth_var").
        transform: jitter applied to each image (a sample-dict transform); None = no jitter.
        preprocess: applied after the jitter (e.g. ``data.Normalize()``), teacher input only.

    References:
        EMUFormer (Landgraf et al. 2024) §3.3, Eqs. 8-10. Taught in notebooks/04_emuformer.ipynb.
    """

    def __init__(self, teacher: nn.Module, targets: Sequence[str] = ("probs", "depth_var"),
                 transform: Callable[..., dict] | None = None,
                 preprocess: Callable[..., dict] | None = None):
        unknown = [t for t in targets if t not in TARGET_KEYS]
        if unknown:
            raise ValueError(f"LiveTeacher targets {unknown} are not teacher statistics; "
                             f"expected names from {list(TARGET_KEYS)}.")
        self.teacher, self.targets = teacher, tuple(targets)
        self.transform, self.preprocess = transform, preprocess

    def teacher_input(self, images: Tensor) -> Tensor:
        """The batch as the teacher sees it: each image jittered (then preprocessed)."""
        if self.transform is None and self.preprocess is None:
            return images
        out = []
        for img in images:
            sample = {"image": img}
            if self.transform is not None:
                sample = self.transform(sample)
            if self.preprocess is not None:
                sample = self.preprocess(sample)
            out.append(sample["image"])
        return torch.stack(out)

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        """``batch`` plus the teacher's targets on the jittered images."""
        request = tuple(dict.fromkeys(("probs",) + self.targets if "entropy" in self.targets
                                      else self.targets))
        out = _teacher_outputs(self.teacher, self.teacher_input(batch["image"]), request)
        return {**batch, **{TARGET_KEYS[t]: out[t] for t in self.targets}}


class CachedTargets(Dataset):
    """A dataset whose samples carry the cached teacher targets through the joint transform.

    ``dataset[i]`` (un-augmented) gets ``cache[i]`` (e.g. ``"teacher_probs"`` ``[C,H,W]``,
    ``"teacher_unc"`` ``[H,W]``) added, THEN ``transform`` runs, so crops, rescaling and flips
    apply identically to image, labels and targets (data.py treats any floating ``[..., H, W]``
    key as a bilinear per-pixel map; colour jitter and Normalize touch only the image). Crop
    padding is 0 in every target ("teacher_logits" 0 would be a uniform target), so
    ``data.RandomCrop`` also adds ``"valid"``, a bool ``[H, W]`` map that is False on the padded
    pixels, and every distillation loss (``losses.DistillationLoss``, ``DUDESLoss``,
    ``EMUFormerLoss``, ``ClassWiseUncertaintyLoss``) ignores those pixels. With
    ``data.train_transforms`` every sample carries "valid" (each pipeline contains the crop).

    Args:
        dataset: the same un-augmented dataset the cache was built on (``transform=None``).
        cache: the ``TeacherCache``.
        transform: the joint training transform, e.g. ``data.train_transforms(crop_size)``.

    References:
        Taught in notebooks/03_dudes.ipynb.
    """

    def __init__(self, dataset: Dataset, cache: TeacherCache,
                 transform: Callable[[dict], dict] | None = None):
        if len(dataset) != len(cache):
            raise ValueError(f"the cache holds {len(cache)} images but the dataset has "
                             f"{len(dataset)}; build the cache on this very dataset.")
        self.dataset, self.cache, self.transform = dataset, cache, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        sample = dict(self.dataset[i])
        if "index" in sample and int(sample["index"]) != int(self.cache.dataset_index[i]):
            raise ValueError(f"sample {i} has index {int(sample['index'])} but the cache stored "
                             f"index {int(self.cache.dataset_index[i])} there; the cache belongs "
                             "to another dataset or order. Rebuild it.")
        size = tuple(sample["image"].shape[-2:])
        for key, value in self.cache[i].items():
            if tuple(value.shape[-2:]) != size:
                raise ValueError(f"cached {key} is {tuple(value.shape[-2:])} but image {i} is "
                                 f"{size}; build the cache on the un-augmented dataset "
                                 "(transform=None) and pass the augmentation here instead.")
            sample[key] = value.clone()
        return sample if self.transform is None else self.transform(sample)


# --------------------------------------------------------------------------- weighted teachers
# The U-Net KD paper (§III-C) mixes three teachers' predictions with static weights found by
# three nested loops over [0, 5); its conclusion suggests computing the weights dynamically.
# Everything below works on softmax probabilities that were computed ONCE (e.g. from a
# TeacherCache), so a grid search or a new fusion never runs a teacher again.


def _member_stack(member_probs: Tensor | Sequence[Tensor], what: str = "member_probs",
                  check: bool = True) -> Tensor:
    """``[M, B, C, H, W]`` from a stacked tensor or a sequence of ``[B, C, H, W]`` tensors.

    With ``check`` the values must be probabilities over C (``metrics.check_probabilities``, so
    float16 from a ``TeacherCache`` passes and logits do not); a sequence whose members differ in
    shape is refused with every member's shape and class count.
    """
    if not isinstance(member_probs, Tensor):
        members = list(member_probs)
        if not members or not all(isinstance(t, Tensor) for t in members):
            raise ValueError(f"{what} must be a tensor [M, B, C, H, W] or a non-empty sequence of "
                             f"[B, C, H, W] tensors; got {[type(t).__name__ for t in members]}.")
        shapes = [tuple(t.shape) for t in members]
        if len(set(shapes)) > 1:
            listed = "; ".join(f"member {i}: {s}" + (f" ({s[1]} classes)" if len(s) == 4 else "")
                               for i, s in enumerate(shapes))
            raise ValueError(f"the members of {what} differ in shape ({listed}); every teacher "
                             "must give [B, C, H, W] probabilities for the same classes and "
                             "images. Check each teacher's num_classes and input.")
        member_probs = torch.stack(members)
    if member_probs.dim() != 5:
        raise ValueError(f"{what} has shape {tuple(member_probs.shape)}; expected "
                         "[M, B, C, H, W] (members stacked on dim 0). For one member, use "
                         "probs.unsqueeze(0).")
    if check:
        check_probabilities(member_probs, dim=2, name=what)
    return member_probs


def _check_nonnegative(weights: Tensor, name: str) -> None:
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError(f"{name} must be finite and non-negative; got {weights.tolist()}"
                         if weights.numel() <= 12 else
                         f"{name} must be finite and non-negative; got min "
                         f"{float(weights.min())}.")


def weighted_fusion(member_probs: Tensor | Sequence[Tensor], weights: Tensor | Sequence[float]
                    ) -> Tensor:
    """The weighted sum of the teachers' predictions, normalised to a distribution.

    Three kinds of weights, told apart by their shape:

    * **static** ``[M]`` — the paper's ``wSum = Σ_m w_m · pred_m``, with the weights divided by
      their sum (the paper requires ``w_VGG16 + w_ResNet50 + w_MobileNetV2 = 1``; scaling all
      weights changes nothing);
    * **per class** ``[M, C]`` — ``p_c ∝ Σ_m w_mc · p_mc``, renormalised over the classes at
      each pixel (with weights constant over c this is the static case);
    * **per pixel** ``[M, B, H, W]`` — ``p = Σ_m w_m(x) · p_m(x)`` with ``w(x)`` divided by
      ``Σ_m w_m(x)`` at each pixel (e.g. ``confidence_weights``).

    Args:
        member_probs: ``[M, B, C, H, W]`` softmax probabilities of M teachers (or a sequence of
            M tensors ``[B, C, H, W]``).
        weights: non-negative, not all zero (for per-pixel weights: not all zero at any pixel).

    Returns:
        ``[B, C, H, W]`` probabilities (they sum to 1 over C).

    Raises:
        ValueError: on a shape that fits none of the three kinds, negative or all-zero weights.

    References:
        U-Net KD paper (unet_kd_ensemble_teachers), §III-C, the ``wSum`` equation; per-class and
        per-pixel weights follow its conclusion ("calculating the weights of the ensemble
        teachers dynamically"). Taught in notebooks/02_unet_ensemble_weighting.ipynb.
    """
    p = _member_stack(member_probs)
    m, b, c, h, w = p.shape
    weights = torch.as_tensor(weights, dtype=p.dtype, device=p.device)
    kinds = {(m,): "static", (m, c): "per-class", (m, b, h, w): "per-pixel"}
    kind = kinds.get(tuple(weights.shape))
    if kind is None:
        raise ValueError(f"weights of shape {tuple(weights.shape)} do not fit {m} members, {c} "
                         f"classes, {b} images of {h}x{w}; expected [M]={[m]} (static), "
                         f"[M, C]={[m, c]} (per class) or [M, B, H, W]={[m, b, h, w]} (per "
                         "pixel).")
    _check_nonnegative(weights, "weights")
    if kind == "static":
        if float(weights.sum()) <= 0:
            raise ValueError(f"weights {weights.tolist()} are all zero; give at least one "
                             "member a positive weight.")
        return (weights.view(m, 1, 1, 1, 1) / weights.sum() * p).sum(0)
    if kind == "per-class":
        if float(weights.sum()) <= 0:
            raise ValueError("per-class weights are all zero; give at least one member a "
                             "positive weight.")
        raw = (weights.view(m, 1, c, 1, 1) * p).sum(0)
        return raw / raw.sum(1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    total = weights.sum(0)
    if bool((total <= 0).any()):
        raise ValueError(f"per-pixel weights sum to 0 at {int((total <= 0).sum())} pixels; every "
                         "pixel needs one member with a positive weight.")
    return ((weights / total).unsqueeze(2) * p).sum(0)


def weight_grid(n_members: int, values: Sequence[float] | Tensor = range(5)) -> Tensor:
    """Every combination of weights the paper's nested loops visit, in loop order.

    ``weight_grid(3, range(5))`` is ``for w1 in range(5): for w2 ...: for w3 ...`` — 5**3 = 125
    combinations, minus (0, 0, 0), which weighs nothing: 124 rows. Collinear rows, e.g. (1, 1, 1)
    and (2, 2, 2), are the same mixture once normalised.

    Args:
        n_members: M, the number of nested loops (teachers).
        values: the values each weight runs over (the paper: [0, 5) in steps of 1).

    Returns:
        ``[K, M]`` float32, K = len(values)**M minus the all-zero rows.

    References:
        U-Net KD paper (unet_kd_ensemble_teachers), §III-C: "three nested loops, which assign
        values ... from an interval of [0, 5)". Taught in
        notebooks/02_unet_ensemble_weighting.ipynb.
    """
    if isinstance(n_members, bool) or not isinstance(n_members, int) or n_members < 1:
        raise ValueError(f"n_members={n_members!r}; expected a positive int (one loop per "
                         "teacher).")
    vals = [float(v) for v in (values.tolist() if isinstance(values, Tensor) else values)]
    if not vals or any(not v >= 0 or v == float("inf") for v in vals):
        raise ValueError(f"values {vals} must be a non-empty list of finite, non-negative "
                         "weights, e.g. range(5).")
    rows = [row for row in itertools.product(vals, repeat=n_members) if sum(row) > 0]
    if not rows:
        raise ValueError(f"values {vals} give only all-zero weightings; include a positive value.")
    return torch.tensor(rows, dtype=torch.float32)


def _miou_of_confusions(confusions: Tensor) -> Tensor:
    """mIoU of each ``[..., C, C]`` confusion matrix, as ``metrics.SegmentationMeter`` gives it
    (IoU = TP / (TP + FP + FN), classes in neither labels nor predictions left out)."""
    conf = confusions.double()
    tp = conf.diagonal(dim1=-2, dim2=-1)
    union = conf.sum(-1) + conf.sum(-2) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    return iou.nanmean(-1)


def ensemble_weight_confusions(member_probs: Tensor | Sequence[Tensor], labels: Tensor,
                               grid: Tensor, num_classes: int, *, ignore_index: int = 255,
                               chunk: int | None = None) -> Tensor:
    """The confusion matrix of the fused prediction for every weighting of a grid, vectorised.

    Inside the paper's loops only the weighted sum changes, so the teachers' probabilities are
    computed once and each weighting costs one weighted sum, one argmax and one ``bincount``.
    ``chunk`` weightings are fused at once (one matrix product). Confusions of several batches
    of images add up, so a validation set that does not fit in memory can be streamed through
    this function and the sum passed to ``search_ensemble_weights(confusions=...)``.

    Args:
        member_probs: ``[M, B, C, H, W]`` teacher probabilities (or a sequence of ``[B,C,H,W]``).
        labels: ``[B, H, W]`` int, 0..C-1 or ``ignore_index``.
        grid: ``[K, M]`` non-negative weightings, e.g. ``weight_grid(3, range(5))``.
        num_classes: C.
        ignore_index: label left out of the counts.
        chunk: weightings fused at once (default: as many as fit in ~16 M floats, 64 MB).

    Returns:
        ``[K, C, C]`` int64 confusion matrices, rows = true class (as ``SegmentationMeter``).

    References:
        U-Net KD paper (unet_kd_ensemble_teachers), §III-C. Taught in
        notebooks/02_unet_ensemble_weighting.ipynb.
    """
    p = _member_stack(member_probs)
    m, b, c, h, w = p.shape
    grid = torch.as_tensor(grid, dtype=p.dtype, device=p.device)
    if grid.dim() != 2 or grid.shape[1] != m:
        raise ValueError(f"grid has shape {tuple(grid.shape)}; expected [K, M={m}], one weight "
                         "per member in each row (see weight_grid).")
    _check_nonnegative(grid, "grid")
    if bool((grid.sum(1) <= 0).any()):
        raise ValueError("grid has an all-zero row; leave it out (weight_grid does).")
    if c != num_classes:
        raise ValueError(f"member_probs have {c} classes but num_classes={num_classes}.")
    if tuple(labels.shape) != (b, h, w):
        raise ValueError(f"labels have shape {tuple(labels.shape)}; expected [B, H, W] = "
                         f"{[b, h, w]} to match member_probs.")
    check_labels(labels, c, ignore_index)
    labels = labels.to(p.device).long()
    valid = labels != ignore_index
    target = labels[valid]
    flat = p.permute(0, 1, 3, 4, 2)[:, valid].reshape(m, -1)  # [M, P*C], valid pixels only
    chunk = chunk or max(1, (1 << 24) // max(1, flat.shape[1]))
    normed = grid / grid.sum(1, keepdim=True)
    out = torch.empty(len(grid), c, c, dtype=torch.long)
    for start in range(0, len(grid), chunk):
        wk = normed[start:start + chunk]  # [k, M]
        pred = (wk @ flat).view(len(wk), -1, c).max(-1).indices  # [k, P]; = argmax, faster
        offset = torch.arange(len(wk), device=p.device)[:, None] * c * c
        counts = torch.bincount((offset + target * c + pred).flatten(), minlength=len(wk) * c * c)
        out[start:start + len(wk)] = counts.view(len(wk), c, c).cpu()
    return out


def search_ensemble_weights(member_probs: Tensor | Sequence[Tensor] | None,
                            labels: Tensor | None, num_classes: int, *,
                            grid: Tensor | None = None, values: Sequence[float] = range(5),
                            confusions: Tensor | None = None, ignore_index: int = 255,
                            chunk: int | None = None) -> dict[str, Tensor | float | int]:
    """The paper's weight search: the weighting whose fused prediction has the best mIoU.

    Equivalent to three nested loops over ``values`` (tests/test_ensembles_weighting.py checks
    it against them): for each weighting, fuse the teachers' validation probabilities
    (``weighted_fusion``), take the mIoU, keep the best. Ties (within 1e-12) go to the first
    weighting in loop order, as a loop with ``if miou > best`` would. Both a single teacher
    (1, 0, 0) and the plain mean (1, 1, 1) are in the default grid, so the result is never worse
    than either on the data it was searched on — which is also why it is optimistic there.

    Args:
        member_probs: ``[M, B, C, H, W]`` validation probabilities; None with ``confusions``.
        labels: ``[B, H, W]``; None with ``confusions``.
        num_classes: C.
        grid: ``[K, M]`` weightings (default ``weight_grid(M, values)``; required with
            ``confusions``).
        values: values of each loop when ``grid`` is None (the paper: range(5)).
        confusions: ``[K, C, C]`` from ``ensemble_weight_confusions``, summed over batches.
        ignore_index: void label.
        chunk: see ``ensemble_weight_confusions``.

    Returns:
        ``{"weights": [M] normalised to sum 1, "raw_weights": [M] the grid row, "miou": float,
        "mious": [K] float64, "grid": [K, M], "index": int}``.

    References:
        U-Net KD paper (unet_kd_ensemble_teachers), §III-C. Taught in
        notebooks/02_unet_ensemble_weighting.ipynb.
    """
    if confusions is None:
        if member_probs is None or labels is None:
            raise ValueError("give member_probs and labels, or confusions (with grid).")
        p = _member_stack(member_probs, check=False)  # ensemble_weight_confusions checks it
        grid = weight_grid(p.shape[0], values) if grid is None else torch.as_tensor(grid)
        confusions = ensemble_weight_confusions(p, labels, grid, num_classes,
                                                ignore_index=ignore_index, chunk=chunk)
    elif grid is None:
        raise ValueError("confusions were given without the grid they were computed on; pass "
                         "grid=... as well.")
    grid = torch.as_tensor(grid, dtype=torch.float32).cpu()
    if confusions.shape != (len(grid), num_classes, num_classes):
        raise ValueError(f"confusions have shape {tuple(confusions.shape)}; expected [K, C, C] = "
                         f"{[len(grid), num_classes, num_classes]} for this grid.")
    mious = _miou_of_confusions(confusions)
    best = float(mious.nan_to_num(float("-inf")).max())
    index = int((mious >= best - 1e-12).nonzero()[0])
    raw = grid[index]
    return {"weights": raw / raw.sum(), "raw_weights": raw, "miou": float(mious[index]),
            "mious": mious, "grid": grid, "index": index}


def class_weights_from_iou(iou: Tensor, power: float = 1.0, floor: float = 1e-3) -> Tensor:
    """Per-class teacher weights ``w_mc ∝ max(IoU_mc, floor)**power``, each class summing to 1.

    A teacher counts, for each class, in proportion to how well it segments that class on the
    validation set. ``power`` sharpens (large: the best teacher per class decides) or flattens
    (0: equal weights); ``floor`` keeps a class that no teacher gets right (IoU 0 or NaN, i.e.
    absent) at equal weights instead of 0/0.

    Args:
        iou: ``[M, C]`` per-class validation IoU of each teacher (NaN allowed: treated as 0).
        power: exponent γ >= 0.
        floor: smallest IoU used (> 0).

    Returns:
        ``[M, C]`` weights for ``weighted_fusion``; every column sums to 1.

    References:
        Not in the U-Net KD paper: one of the "dynamic" weightings its conclusion asks for
        (§IV-D, §V). Taught in notebooks/02_unet_ensemble_weighting.ipynb.
    """
    iou = torch.as_tensor(iou)
    if iou.dim() != 2:
        raise ValueError(f"iou has shape {tuple(iou.shape)}; expected [M, C] (one row of "
                         "per-class IoUs per teacher, e.g. SegmentationMeter.compute()['iou']).")
    if not power >= 0 or not floor > 0:
        raise ValueError(f"power={power}, floor={floor}; expected power >= 0 and floor > 0.")
    w = iou.double().nan_to_num(0.0).clamp_min(floor) ** power
    return (w / w.sum(0, keepdim=True)).to(torch.get_default_dtype())


def confidence_weights(member_probs: Tensor | Sequence[Tensor],
                       base_weights: Tensor | Sequence[float] | None = None,
                       power: float = 1.0) -> Tensor:
    """Per-pixel teacher weights ``w_m(x) ∝ base_m · (max_c p_mc(x))**power``.

    At each pixel every teacher's (static) weight is scaled by its confidence, the probability
    of its top class, so a teacher that is unsure where another is sure steps back there.
    ``power`` 0 gives the static weights everywhere; a large power lets the most confident
    teacher decide. Computed in log space (no underflow for large powers).

    Args:
        member_probs: ``[M, B, C, H, W]`` probabilities (or a sequence of ``[B, C, H, W]``).
        base_weights: ``[M]`` non-negative static weights (default: equal).
        power: exponent γ >= 0.

    Returns:
        ``[M, B, H, W]`` weights summing to 1 over the members, for ``weighted_fusion``.

    References:
        Not in the U-Net KD paper: one of the "dynamic" weightings its conclusion asks for
        (§IV-D, §V). Taught in notebooks/02_unet_ensemble_weighting.ipynb.
    """
    p = _member_stack(member_probs)
    m = p.shape[0]
    if not power >= 0:
        raise ValueError(f"power={power}; expected a number >= 0 (0: static weights).")
    base = torch.ones(m) if base_weights is None else torch.as_tensor(base_weights).float()
    if base.shape != (m,):
        raise ValueError(f"base_weights have shape {tuple(base.shape)}; expected [{m}], one per "
                         "member.")
    _check_nonnegative(base, "base_weights")
    if float(base.sum()) <= 0:
        raise ValueError("base_weights are all zero; give one member a positive weight.")
    top = p.float().amax(2).clamp_min(torch.finfo(torch.float32).tiny)
    logits = base.to(p.device).log().view(m, 1, 1, 1) + power * top.log()
    return logits.softmax(0).to(p.dtype)


def fuse_teacher_caches(caches: Sequence[TeacherCache], fuse: Callable[[Tensor], Tensor], *,
                        batch_size: int = 32, dtype: torch.dtype = torch.float16,
                        eps: float = 1e-12) -> TeacherCache:
    """One cache of the fused ensemble teacher, built from the members' caches (no teacher runs).

    For each batch, the members' cached ``"logits"`` (softmaxed) or ``"probs"`` are stacked to
    ``[M, b, C, H, W]`` and passed to ``fuse`` (e.g. ``lambda p: weighted_fusion(p, w)``); the
    result is stored as ``log(p)`` under ``"logits"``, so ``CachedTargets`` gives it as
    ``"teacher_logits"`` and ``losses.DistillationLoss`` softens it with τ exactly
    (softmax(log p / τ) ∝ p**(1/τ)). Storing log p rather than p keeps the small probabilities
    that a high τ magnifies (float16 would flush those below 6e-8 to 0).

    Args:
        caches: ``TeacherCache`` of each member, built on the same data set in the same order.
        fuse: ``[M, b, C, H, W]`` probabilities -> ``[b, C, H, W]`` probabilities.
        batch_size: images fused at once.
        dtype: storage dtype.
        eps: probabilities are clamped to at least this before the log.

    Returns:
        A ``TeacherCache`` with ``targets = {"logits": [N, C, H, W]}`` and the members'
        ``dataset_index``.

    References:
        U-Net KD paper (unet_kd_ensemble_teachers), §III-C and Fig. 2 (the weighted ensemble as
        the teacher of standard KD). Taught in notebooks/02_unet_ensemble_weighting.ipynb.
    """
    caches = list(caches)
    if not caches:
        raise ValueError("caches is empty; pass one TeacherCache per ensemble member.")
    ref = caches[0].dataset_index
    for k, cache in enumerate(caches):
        if not torch.equal(cache.dataset_index, ref):
            raise ValueError(f"cache {k} holds {len(cache)} images with other dataset indices "
                             f"than cache 0 ({len(caches[0])}); build every member's cache on the "
                             "same data set, in the same order.")
        if not {"logits", "probs"} & set(cache.targets):
            raise ValueError(f"cache {k} holds {sorted(cache.targets)}; build it with "
                             "targets=('logits',) or ('probs',).")

    def probs(cache: TeacherCache, sl: slice) -> Tensor:
        if "logits" in cache.targets:
            return cache.targets["logits"][sl].float().softmax(1)
        return cache.targets["probs"][sl].float()

    n = len(ref)
    out: Tensor | None = None
    for start in range(0, n, batch_size):
        sl = slice(start, min(start + batch_size, n))
        fused = fuse(torch.stack([probs(cache, sl) for cache in caches]))
        if not isinstance(fused, Tensor) or fused.dim() != 4 or fused.shape[0] != sl.stop - start:
            got = tuple(fused.shape) if isinstance(fused, Tensor) else type(fused).__name__
            raise ValueError(f"fuse returned {got} for {sl.stop - start} images; expected "
                             "[b, C, H, W] probabilities, e.g. lambda p: weighted_fusion(p, w).")
        check_probabilities(fused, dim=1, name="fuse(...)'s output")
        if out is None:
            out = torch.empty((n, *fused.shape[1:]), dtype=dtype)
        out[sl] = fused.clamp_min(eps).log().to(dtype)
    return TeacherCache._from_state({"targets": {"logits": out}, "dataset_index": ref.clone()})

