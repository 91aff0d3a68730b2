"""Pseudo-label fusion for domain adaptation: ensemble distillation after Chao et al. (2021).

Teachers adapted to a target domain by different UDA methods disagree in how confident they are,
not only in what they predict. Chao et al. therefore first **unify** every teacher's output to a
one-hot pseudo-label (its argmax), then **fuse** the unified outputs pixel-wise (majority vote,
or the mean certainty) or channel-wise (each class channel taken from the one teacher a
``FusionPolicy`` names), and pick that policy from the certainty of students distilled from each
teacher alone (``select_policy``). The fused labels train the final student through
``PseudoLabels`` and the usual joint transforms. Everything here works on softmax probabilities
computed once (e.g. from an ``ensembles.TeacherCache``; float16 is fine).

References:
    C.-H. Chao, B.-W. Cheng, C.-Y. Lee, "Rethinking Ensemble-Distillation for Semantic
    Segmentation Based Unsupervised Domain Adaptation", CVPRW 2021. Taught in
    notebooks/05_uda_channel_fusion.ipynb.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from minikd.ensembles import _member_stack
from minikd.metrics import check_labels, check_probabilities

__all__ = [
    "ClassCertainty",
    "FusedLabels",
    "FusionPolicy",
    "PseudoLabels",
    "certainty_fusion",
    "channel_wise_fusion",
    "class_certainty",
    "fuse_caches",
    "majority_vote_fusion",
    "oracle_policy",
    "pseudo_label_quality",
    "select_policy",
    "unify",
]

_VOID = 255  # the void label of fused pseudo-labels (minikd.data.IGNORE_INDEX)


class FusedLabels(NamedTuple):
    """Fused pseudo-labels and their certainty; unpack as ``labels, certainty = fusion(...)``.

    Attributes:
        labels: ``[B, H, W]`` int64, class indices 0..C-1, or 255 where ``certainty`` is below
            the fusion's threshold (and, for the channel-wise fusion, where no teacher claims a
            class anywhere near the pixel).
        certainty: ``[B, H, W]`` float32 in [0, 1], the certainty of the chosen class (what each
            fusion means by it is in its docstring); NaN where no class was chosen.
    """

    labels: Tensor
    certainty: Tensor


def unify(probs_or_logits: Tensor, dim: int = 1) -> Tensor:
    """Output unification: the one-hot pseudo-label at the argmax over ``dim``.

    ``y_c = 1`` if ``c = argmax_c' s_c'``, else 0. Only the order of the scores matters, so
    logits, softmax probabilities, temperature-scaled or sharpened probabilities, or any
    strictly increasing rescaling of one teacher's scores give the same output: the fusion that
    follows no longer sees how (over)confident each teacher is. Ties go to the lowest index
    (``Tensor.max(dim).indices``, the same as ``argmax`` and faster on the CPU).

    Args:
        probs_or_logits: floating scores, e.g. ``[B, C, H, W]`` (or ``[M, B, C, H, W]`` with
            ``dim=2``).
        dim: the class dimension.

    Returns:
        A tensor of the input's shape and floating dtype, 1 at the argmax and 0 elsewhere.

    Raises:
        TypeError: the input is not a floating-point tensor.
        ValueError: it contains NaN (whose argmax would be meaningless).

    References:
        Chao, Cheng & Lee, "Rethinking Ensemble-Distillation for Semantic Segmentation Based
        Unsupervised Domain Adaptation", CVPRW 2021, the output-unification equation. Taught in
        notebooks/05_uda_channel_fusion.ipynb.
    """
    if not isinstance(probs_or_logits, Tensor) or not probs_or_logits.is_floating_point():
        got = (f"dtype {probs_or_logits.dtype}" if isinstance(probs_or_logits, Tensor)
               else type(probs_or_logits).__name__)
        raise TypeError(f"unify expects floating-point scores (logits or probabilities); got "
                        f"{got}. For class indices use F.one_hot(labels, C).")
    if bool(probs_or_logits.isnan().any()):
        raise ValueError("unify got NaN scores; the argmax of NaN is undefined. Check the "
                         "teacher's output.")
    index = probs_or_logits.max(dim, keepdim=True).indices
    return torch.zeros_like(probs_or_logits).scatter_(dim, index, 1.0)


def _check_threshold(threshold: float) -> float:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold={threshold!r}; expected a certainty in [0, 1] (0 keeps every "
                         "pixel). The authors' 0-100 scale with threshold 90 is 0.9 here.")
    return float(threshold)


def _void_below(labels: Tensor, certainty: Tensor, threshold: float) -> FusedLabels:
    """Labels set to 255 where the certainty is below the threshold (or NaN)."""
    return FusedLabels(labels.masked_fill(~(certainty >= threshold), _VOID), certainty)


def majority_vote_fusion(member_probs: Tensor | Sequence[Tensor],
                         threshold: float = 0.9) -> FusedLabels:
    """Pixel-wise fusion by majority vote of the teachers' unified outputs.

    Each teacher votes for its argmax class (``unify``); the class with the most votes wins.
    **Ties** (two classes with the same number of votes) go to the class whose voters are more
    certain on average (higher mean of their softmax probability for it), then to the lower
    class index. (The authors' code takes the argmax of the vote counts, i.e. only the second
    rule.) **Certainty** = the mean, over the teachers that voted for the winning class, of their
    softmax probability of that class; pixels below ``threshold`` become 255.

    Unification makes the vote blind to the teachers' confidence scales; the threshold and the
    tie rule do use the probabilities, so they are not.

    Args:
        member_probs: ``[M, B, C, H, W]`` softmax probabilities of M teachers (or a sequence of
            M tensors ``[B, C, H, W]``); float16 from a ``TeacherCache`` is fine.
        threshold: minimum certainty in [0, 1] for a pixel to keep its label (0: keep all). The
            authors store certainty on a 0-100 scale with threshold 90, i.e. 0.9 here.

    Returns:
        ``FusedLabels(labels [B, H, W] int64 with 255 = void, certainty [B, H, W] float32)``.

    Raises:
        ValueError: ``member_probs`` are not probabilities over dim 2 (e.g. logits), or the
            threshold is outside [0, 1].

    References:
        Chao et al., CVPRW 2021, output unification + pixel-wise fusion (Fig. 2); authors' code
        ``label_fusion.py --fusion-mode majority``. Taught in
        notebooks/05_uda_channel_fusion.ipynb.
    """
    threshold = _check_threshold(threshold)
    p = _member_stack(member_probs).float()
    onehot = unify(p, dim=2)
    votes = onehot.sum(0)  # [B, C, H, W], exact integer counts
    voter_certainty = (onehot * p).sum(0)  # sum of the voters' probabilities of each class
    most = votes.amax(1, keepdim=True)
    labels = torch.where(votes == most, voter_certainty, -1.0).max(1).indices
    certainty = voter_certainty.gather(1, labels.unsqueeze(1)).squeeze(1) / most.squeeze(1)
    return _void_below(labels, certainty, threshold)


def certainty_fusion(member_probs: Tensor | Sequence[Tensor],
                     threshold: float = 0.9) -> FusedLabels:
    """Pixel-wise fusion by the teachers' mean certainty: argmax of the mean softmax.

    The baseline the paper argues against (no unification: a teacher that is confident
    everywhere dominates). Label = ``argmax_c mean_m p_mc`` (ties: lowest class index);
    certainty = that maximum mean probability; pixels below ``threshold`` become 255.

    Args:
        member_probs: ``[M, B, C, H, W]`` softmax probabilities (or a sequence of
            ``[B, C, H, W]``); float16 is fine.
        threshold: minimum certainty in [0, 1] (the authors' 90 on a 0-100 scale is 0.9).

    Returns:
        ``FusedLabels(labels [B, H, W] int64 with 255 = void, certainty [B, H, W] float32)``.

    Raises:
        ValueError: ``member_probs`` are not probabilities over dim 2, or a bad threshold.

    References:
        Chao et al., CVPRW 2021, the baseline of Fig. 1(b); authors' code ``label_fusion.py
        --fusion-mode certainty``. Taught in notebooks/05_uda_channel_fusion.ipynb.
    """
    threshold = _check_threshold(threshold)
    certainty, labels = _member_stack(member_probs).float().mean(0).max(1)
    return _void_below(labels, certainty, threshold)


class FusionPolicy:
    """A fusion policy π: which teacher provides each class channel of the fused labels.

    Validated at construction: every class 0..C-1 is assigned exactly once, to a teacher in
    0..M-1. ``str(policy)`` (or ``policy.table()``) prints the class x teacher view of the
    paper's Fig. 4.

    Args:
        assignment: either the teacher of each class, ``[t_0, ..., t_{C-1}]``; or the authors'
            ``extraction_list`` of ``(class, teacher)`` pairs in any order; or a mapping
            ``{class: teacher}``.
        num_teachers: M (default: ``len(teacher_names)``; one of the two is required).
        num_classes: C (default: ``len(class_names)``, else the length of a per-class list,
            else the largest class named + 1).
        class_names: optional C names, for the table.
        teacher_names: optional M names, for the table.

    Attributes:
        teachers: ``tuple`` of C teacher indices, ``teachers[c]`` = the teacher of class c.
        num_classes, num_teachers, class_names, teacher_names.

    Raises:
        ValueError: naming the class that is unassigned or assigned twice, the teacher index
            that does not exist, or the names whose count is wrong; an entry that is not a
            (class, teacher) pair of ints.
        TypeError: ``assignment`` is none of the three forms.

    Example:
        >>> print(FusionPolicy([0, 1, 0], teacher_names=["DACS", "CBST"],
        ...                    class_names=["road", "car", "sky"]))
        class | DACS CBST
        ------+----------
        road  |  x    .
        car   |  .    x
        sky   |  x    .

    References:
        Chao et al., CVPRW 2021, the fusion policy π (Fig. 4); authors' code
        ``label_fusion.py`` (``extraction_list``). Taught in
        notebooks/05_uda_channel_fusion.ipynb.
    """

    def __init__(self, assignment: Sequence[int] | Sequence[tuple[int, int]] | Mapping[int, int],
                 num_teachers: int | None = None, *, num_classes: int | None = None,
                 class_names: Sequence[str] | None = None,
                 teacher_names: Sequence[str] | None = None):
        pairs, per_class = self._pairs(assignment)
        if num_teachers is None:
            if teacher_names is None:
                raise ValueError("FusionPolicy needs num_teachers (M) or teacher_names, so that "
                                 "it can check the teacher indices.")
            num_teachers = len(teacher_names)
        if num_classes is None:
            num_classes = (len(pairs) if per_class else len(class_names)
                           if class_names is not None
                           else max((c for c, _ in pairs), default=-1) + 1)
        for name, value in (("num_teachers", num_teachers), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}; expected a positive int.")
        for what, names, n in (("class_names", class_names, num_classes),
                               ("teacher_names", teacher_names, num_teachers)):
            if names is not None and len(names) != n:
                raise ValueError(f"{what} has {len(names)} names; expected {n}.")
        teachers: list[int | None] = [None] * num_classes
        for c, t in pairs:
            if not 0 <= c < num_classes:
                raise ValueError(f"class {c} does not exist: the classes are 0..{num_classes - 1}.")
            if not 0 <= t < num_teachers:
                raise ValueError(f"class {c} is assigned to teacher {t}, which does not exist: "
                                 f"the teachers are 0..{num_teachers - 1}.")
            if teachers[c] is not None:
                raise ValueError(f"class {c} is assigned twice (to teachers {teachers[c]} and "
                                 f"{t}); give each class exactly one teacher.")
            teachers[c] = t
        missing = [c for c, t in enumerate(teachers) if t is None]
        if missing:
            raise ValueError(f"class(es) {missing} are unassigned; give each of the "
                             f"{num_classes} classes exactly one teacher.")
        self.teachers: tuple[int, ...] = tuple(int(t) for t in teachers)  # type: ignore[arg-type]
        self.num_classes, self.num_teachers = num_classes, num_teachers
        self.class_names = None if class_names is None else [str(n) for n in class_names]
        self.teacher_names = None if teacher_names is None else [str(n) for n in teacher_names]

    @staticmethod
    def _pairs(assignment: object) -> tuple[list[tuple[int, int]], bool]:
        """(class, teacher) pairs from any of the three accepted forms, and whether the form
        was the per-class list."""
        if isinstance(assignment, Tensor):
            assignment = assignment.tolist()
        per_class = False
        if isinstance(assignment, Mapping):
            items = list(assignment.items())
        elif isinstance(assignment, Sequence) and not isinstance(assignment, str):
            items = list(assignment)
            per_class = all(isinstance(t, int) and not isinstance(t, bool) for t in items)
            if per_class:
                items = list(enumerate(items))
        else:
            raise TypeError(f"assignment is a {type(assignment).__name__}; expected the teacher "
                            "of each class [t_0, ..., t_{C-1}], (class, teacher) pairs or a "
                            "{class: teacher} mapping.")
        pairs = []
        for item in items:
            if (not isinstance(item, Sequence) or len(item) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in item)):
                raise ValueError(f"assignment entry {item!r} is not a (class, teacher) pair of "
                                 "ints; do not mix the per-class list and the pair forms.")
            pairs.append((int(item[0]), int(item[1])))
        return pairs, per_class and bool(pairs)

    def __len__(self) -> int:
        return self.num_classes

    def __getitem__(self, c: int) -> int:
        return self.teachers[c]

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, FusionPolicy) and self.teachers == other.teachers
                and self.num_teachers == other.num_teachers)

    def __hash__(self) -> int:
        return hash((self.teachers, self.num_teachers))

    def __repr__(self) -> str:
        return f"FusionPolicy({list(self.teachers)}, num_teachers={self.num_teachers})"

    def __str__(self) -> str:
        return self.table()

    def as_tensor(self) -> Tensor:
        """``[C]`` int64, the teacher of each class."""
        return torch.tensor(self.teachers, dtype=torch.long)

    def as_pairs(self) -> list[list[int]]:
        """The authors' ``extraction_list``: ``[[class, teacher], ...]`` in class order."""
        return [[c, t] for c, t in enumerate(self.teachers)]

    def classes_of(self, teacher: int) -> list[int]:
        """The classes taken from ``teacher``."""
        return [c for c, t in enumerate(self.teachers) if t == teacher]

    def table(self) -> str:
        """Class x teacher table: one row per class, an ``x`` under its teacher."""
        rows = self.class_names or [str(c) for c in range(self.num_classes)]
        cols = self.teacher_names or [f"T{t}" for t in range(self.num_teachers)]
        first = max(len("class"), *(len(r) for r in rows))
        header = "class".ljust(first) + " | " + " ".join(cols)
        lines = [header, "-" * (first + 1) + "+" + "-" * (len(header) - first - 2)]
        for c, row in enumerate(rows):
            marks = [("x" if self.teachers[c] == t else ".").center(len(col))
                     for t, col in enumerate(cols)]
            lines.append(row.ljust(first) + " | " + " ".join(marks).rstrip())
        return "\n".join(lines)


def channel_wise_fusion(member_probs: Tensor | Sequence[Tensor], policy: FusionPolicy,
                        threshold: float = 0.9, window: int = 5) -> FusedLabels:
    """Channel-wise fusion: class channel c of the fused labels is teacher π(c)'s unified output.

    Teacher π(c) *claims* class c at the pixels where its argmax is c. Then, per pixel:

    * **exactly one claim**: that class;
    * **conflict** (two or more classes claimed): the claimed class with the most claims in the
      ``window x window`` neighbourhood (the authors' average-pooled one-hot cube; the pixel
      itself counts once for each claimed class);
    * **unclaimed** (no class claimed): the class with the most claims in the neighbourhood;
      if nothing is claimed anywhere in it, 255 (the authors take the argmax of an all-zero
      vector, i.e. class 0).

    Ties in the neighbourhood count go to the class whose teacher gives it the higher
    probability at the pixel, then to the lower class index. **Certainty** = the probability
    that the chosen class's teacher π(c) gives c at this pixel (the authors pool it over the
    window in conflict areas; minikd does not). Pixels below ``threshold`` become 255. At an
    unclaimed pixel π(c) prefers another class, so its certainty is at most 1/2 and any
    threshold above 0.5 voids it.

    Args:
        member_probs: ``[M, B, C, H, W]`` softmax probabilities (or a sequence of
            ``[B, C, H, W]``); float16 is fine.
        policy: a ``FusionPolicy`` with C classes and M teachers (``select_policy``,
            ``oracle_policy`` or written by hand).
        threshold: minimum certainty in [0, 1] (the authors' 90 on a 0-100 scale is 0.9).
        window: odd side of the neighbourhood (the authors: 5; 1 = the pixel alone, so
            conflicts go to the more probable class and unclaimed pixels to 255).

    Returns:
        ``FusedLabels(labels [B, H, W] int64 with 255 = void, certainty [B, H, W] float32,
        NaN where no class was chosen)``.

    Raises:
        ValueError: ``member_probs`` are not probabilities, the policy's C or M does not match
            them, a bad threshold or an even/non-positive window.
        TypeError: ``policy`` is not a ``FusionPolicy``.

    References:
        Chao et al., CVPRW 2021, channel-wise fusion (Fig. 2 and Fig. 4); authors' code
        ``label_fusion.py --fusion-mode PLF``. Taught in notebooks/05_uda_channel_fusion.ipynb.
    """
    threshold = _check_threshold(threshold)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"window={window!r}; expected an odd positive int (the authors: 5).")
    if not isinstance(policy, FusionPolicy):
        raise TypeError(f"policy is a {type(policy).__name__}; expected a FusionPolicy, e.g. "
                        "FusionPolicy([0, 1, 0], num_teachers=2).")
    p = _member_stack(member_probs).float()
    m, _, c, _, _ = p.shape
    if (policy.num_classes, policy.num_teachers) != (c, m):
        raise ValueError(f"the policy is for {policy.num_classes} classes and "
                         f"{policy.num_teachers} teachers but member_probs have {c} classes "
                         f"and {m} teachers.")
    teacher = policy.as_tensor().to(p.device)
    classes = torch.arange(c, device=p.device)
    top = p.max(2).indices  # [M, B, H, W]: each teacher's argmax (its unified output)
    claims = (top[teacher] == classes.view(c, 1, 1, 1)).transpose(0, 1)  # [B, C, H, W]
    chosen_p = p[teacher, :, classes].transpose(0, 1)  # [B, C, H, W]: p_{π(c), c}
    counts = torch.nn.functional.avg_pool2d(claims.float(), window, stride=1,
                                            padding=window // 2, divisor_override=1)
    unclaimed = ~claims.any(1, keepdim=True)
    candidate = torch.where(unclaimed, counts > 0, claims)
    score = torch.where(candidate, counts, -1.0)
    tied = candidate & (score == score.amax(1, keepdim=True))
    labels = torch.where(tied, chosen_p, -1.0).max(1).indices
    certainty = chosen_p.gather(1, labels.unsqueeze(1)).squeeze(1)
    none = ~candidate.any(1)
    certainty = certainty.masked_fill(none, float("nan"))
    return _void_below(labels, certainty, threshold)


class ClassCertainty:
    """Streaming per-class certainty of a student: the mean max-softmax over the pixels it
    predicts as each class, accumulated batch by batch (sums and counts in float64).

    ``update(probs)`` for each batch of target-domain training images, then ``compute()``.

    Args:
        num_classes: C.

    Attributes:
        sums: ``[C]`` float64, Σ max-softmax over the pixels predicted as c.
        counts: ``[C]`` int64, the number of those pixels.

    References:
        Chao et al., CVPRW 2021, certainty-aware policy selection (Fig. 5 and 6). Taught in
        notebooks/05_uda_channel_fusion.ipynb.
    """

    def __init__(self, num_classes: int):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes={num_classes!r}; expected a positive int.")
        self.num_classes = num_classes
        self.sums = torch.zeros(num_classes, dtype=torch.float64)
        self.counts = torch.zeros(num_classes, dtype=torch.long)

    @torch.no_grad()
    def update(self, probs: Tensor, valid: Tensor | None = None) -> ClassCertainty:
        """Add a batch: ``probs`` ``[B, C, H, W]`` softmax of the student; ``valid`` an optional
        bool ``[B, H, W]`` of the pixels to count (e.g. False on crop padding)."""
        if not isinstance(probs, Tensor) or probs.dim() != 4 or probs.shape[1] != self.num_classes:
            got = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
            raise ValueError(f"probs have shape {got}; expected [B, C={self.num_classes}, H, W] "
                             "softmax probabilities of the student.")
        check_probabilities(probs, dim=1, name="probs", valid=valid)
        certainty, pred = probs.float().max(1)
        if valid is not None:
            if tuple(valid.shape) != tuple(pred.shape):
                raise ValueError(f"valid has shape {tuple(valid.shape)}; expected [B, H, W] = "
                                 f"{list(pred.shape)}.")
            valid = valid.to(pred.device, torch.bool)
            certainty, pred = certainty[valid], pred[valid]
        pred = pred.flatten()
        self.sums += torch.bincount(pred, certainty.flatten().double(),
                                    minlength=self.num_classes).cpu()
        self.counts += torch.bincount(pred, minlength=self.num_classes).cpu()
        return self

    def compute(self) -> Tensor:
        """``[C]`` float64 mean certainty per predicted class; NaN for classes never predicted."""
        return torch.where(self.counts > 0, self.sums / self.counts.clamp_min(1),
                           torch.full_like(self.sums, float("nan")))

    def overall(self) -> float:
        """Mean max-softmax over all counted pixels (NaN if none)."""
        total = int(self.counts.sum())
        return float(self.sums.sum()) / total if total else float("nan")


def class_certainty(probs: Tensor, num_classes: int | None = None,
                    valid: Tensor | None = None) -> Tensor:
    """Per-class certainty of one batch: ``ClassCertainty(C).update(probs, valid).compute()``.

    Args:
        probs: ``[B, C, H, W]`` softmax probabilities of a student on target images.
        num_classes: C (default: ``probs.shape[1]``; if given it must match).
        valid: optional bool ``[B, H, W]`` of the pixels to count.

    Returns:
        ``[C]`` float64: for each class, the mean max-softmax over the pixels predicted as that
        class; NaN for classes the student never predicts.

    References:
        Chao et al., CVPRW 2021, certainty-aware policy selection. Taught in
        notebooks/05_uda_channel_fusion.ipynb.
    """
    if not isinstance(probs, Tensor) or probs.dim() != 4:
        got = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
        raise ValueError(f"probs have shape {got}; expected [B, C, H, W].")
    if num_classes is not None and num_classes != probs.shape[1]:
        raise ValueError(f"probs have {probs.shape[1]} classes but num_classes={num_classes}.")
    return ClassCertainty(probs.shape[1]).update(probs, valid).compute()


def _best_teacher_per_class(scores: Tensor, what: str, fallback: str) -> list[int]:
    """argmax over teachers of ``[M, C]`` scores (NaN: not selectable; ties: lowest index).
    A class with no finite score goes to the teacher with the highest NaN-mean score, with a
    warning."""
    scores = scores.double()
    finite = ~scores.isnan()
    best = torch.where(finite, scores, float("-inf")).max(0).indices
    orphans = (~finite.any(0)).nonzero().flatten().tolist()
    if orphans:
        means = scores.nanmean(1).nan_to_num(float("-inf"))
        if not bool(torch.isfinite(means).any()):
            raise ValueError(f"{what} are NaN for every teacher and class; nothing to select.")
        top = int(means.max(0).indices)
        warnings.warn(f"no teacher has a score ({what}) for class(es) {orphans}; they go to "
                      f"teacher {top}, {fallback}.", stacklevel=3)
        best[orphans] = top
    return best.tolist()


def _score_matrix(scores: Tensor | Sequence[Tensor | ClassCertainty], what: str) -> Tensor:
    if not isinstance(scores, Tensor):
        scores = torch.stack([s.compute() if isinstance(s, ClassCertainty)
                              else torch.as_tensor(s, dtype=torch.float64) for s in scores])
    if scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(f"{what} have shape {tuple(scores.shape)} and dtype {scores.dtype}; "
                         "expected floating [M, C], one row per teacher.")
    if bool(scores.isinf().any()):
        raise ValueError(f"{what} contain inf; expected finite values or NaN (not measured).")
    return scores


def select_policy(student_certainties: Tensor | Sequence[Tensor | ClassCertainty], *,
                  class_names: Sequence[str] | None = None,
                  teacher_names: Sequence[str] | None = None) -> FusionPolicy:
    """Certainty-aware policy selection: for each class, the teacher whose student is most
    certain about it.

    One student per teacher, each distilled from that teacher's unified outputs alone; their
    per-class certainty on the target training images (``ClassCertainty`` /
    ``class_certainty``) stands in for the teachers' unknown per-class target IoU (the paper's
    Fig. 6 shows the two are correlated). Rules: a NaN (the student never predicts the class)
    is not selectable; ties go to the lower teacher index; a class that no student predicts
    goes, with a warning, to the teacher whose student has the highest mean of its per-class
    certainties.

    Args:
        student_certainties: ``[M, C]`` (row m: the student of teacher m), or a sequence of M
            ``[C]`` tensors or ``ClassCertainty`` accumulators.
        class_names, teacher_names: optional names, for the policy's table.

    Returns:
        The selected ``FusionPolicy``.

    Raises:
        ValueError: not ``[M, C]``, inf values, or every value NaN.

    References:
        Chao et al., CVPRW 2021, certainty-aware policy selection (Fig. 5 and 6; the authors'
        repository hard-codes its result). Taught in notebooks/05_uda_channel_fusion.ipynb.
    """
    scores = _score_matrix(student_certainties, "student certainties")
    teachers = _best_teacher_per_class(scores, "student certainties",
                                       "whose student has the highest mean certainty")
    return FusionPolicy(teachers, scores.shape[0], class_names=class_names,
                        teacher_names=teacher_names)


def oracle_policy(per_class_iou: Tensor | Sequence[Tensor], *,
                  class_names: Sequence[str] | None = None,
                  teacher_names: Sequence[str] | None = None) -> FusionPolicy:
    """The oracle policy: for each class, the teacher with the highest target-domain IoU.

    Needs target labels, which UDA does not have: use it to diagnose how close
    ``select_policy`` comes. NaN (class absent) is not selectable; ties go to the lower teacher
    index; a class with no IoU for any teacher goes, with a warning, to the teacher with the
    highest mIoU (NaN-mean over its classes).

    Args:
        per_class_iou: ``[M, C]`` IoU of each teacher (rows), e.g.
            ``SegmentationMeter.compute()["iou"]`` stacked, or a sequence of M ``[C]``.
        class_names, teacher_names: optional names, for the policy's table.

    Returns:
        The oracle ``FusionPolicy``.

    References:
        Chao et al., CVPRW 2021, Fig. 6 (per-class IoU of each teacher vs the students'
        certainty). Taught in notebooks/05_uda_channel_fusion.ipynb.
    """
    scores = _score_matrix(per_class_iou, "per-class IoUs")
    teachers = _best_teacher_per_class(scores, "per-class IoUs", "the one with the highest mIoU")
    return FusionPolicy(teachers, scores.shape[0], class_names=class_names,
                        teacher_names=teacher_names)


class PseudoLabels(Dataset):
    """A dataset whose ``"mask"`` is replaced by fused pseudo-labels before the joint transform.

    ``dataset[i]`` (un-augmented) gets ``sample["mask"] = labels[i]`` (int64, 255 = void),
    THEN ``transform`` runs, so crops, rescaling and flips move the pseudo-labels with the image
    (as ``CachedTargets`` does for teacher targets; it may wrap a ``CachedTargets`` with
    ``transform=None`` or be wrapped by one). The student then trains with the ordinary
    cross-entropy, which ignores 255.

    Args:
        dataset: the un-augmented target-domain training set (``transform=None``), in the
            order the labels were fused in.
        labels: ``[N, H, W]`` integer pseudo-labels (uint8 or int64; 255 = void), or the
            ``FusedLabels`` of a fusion over the whole set.
        transform: the joint training transform, e.g. ``data.train_transforms(crop_size)``.
        num_classes: if given, the labels are checked to be 0..C-1 or 255.
        dataset_index: optional ``[N]`` ``"index"`` of each labelled sample (e.g. a
            ``TeacherCache``'s ``dataset_index``), checked against the samples'.

    Raises:
        ValueError: wrong shape, length, label values, index or image size (when read).
        TypeError: non-integer labels.

    References:
        Chao et al., CVPRW 2021 (the student trained on the fused pseudo-labels). Taught in
        notebooks/05_uda_channel_fusion.ipynb.
    """

    def __init__(self, dataset: Dataset, labels: Tensor | FusedLabels,
                 transform: Callable[[dict], dict] | None = None, *,
                 num_classes: int | None = None, dataset_index: Tensor | None = None):
        if isinstance(labels, FusedLabels):
            labels = labels.labels
        if not isinstance(labels, Tensor) or labels.dim() != 3:
            got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"labels have shape {got}; expected [N, H, W] pseudo-labels, one "
                             "map per image (a fusion's FusedLabels.labels).")
        check_labels(labels, num_classes if num_classes is not None else _VOID, _VOID)
        if len(labels) != len(dataset):
            raise ValueError(f"there are {len(labels)} label maps but the dataset has "
                             f"{len(dataset)} images; fuse the labels on this very dataset.")
        if dataset_index is not None and len(dataset_index) != len(labels):
            raise ValueError(f"dataset_index has {len(dataset_index)} entries; expected "
                             f"{len(labels)}.")
        self.dataset, self.labels, self.transform = dataset, labels.cpu(), transform
        self.dataset_index = dataset_index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        sample = dict(self.dataset[i])
        if (self.dataset_index is not None and "index" in sample
                and int(sample["index"]) != int(self.dataset_index[i])):
            raise ValueError(f"sample {i} has index {int(sample['index'])} but the labels were "
                             f"fused for index {int(self.dataset_index[i])}; they belong to "
                             "another dataset or order.")
        size = tuple(sample["image"].shape[-2:])
        if tuple(self.labels.shape[-2:]) != size:
            raise ValueError(f"the pseudo-labels are {tuple(self.labels.shape[-2:])} but image "
                             f"{i} is {size}; fuse them on the un-augmented dataset "
                             "(transform=None) and pass the augmentation here instead.")
        sample["mask"] = self.labels[i].long()
        return sample if self.transform is None else self.transform(sample)


def fuse_caches(caches: Sequence[object], fusion: Callable[..., FusedLabels], *,
                batch_size: int = 16, **kwargs: object) -> FusedLabels:
    """Fuse the cached softmax of M teachers over a whole data set, ``batch_size`` images at a
    time (the ``[M, B, C, H, W]`` stack of one batch is all that is held in float32).

    Args:
        caches: M ``ensembles.TeacherCache`` built with ``targets=("probs",)`` on the same
            un-augmented data set (their ``dataset_index`` must agree), or M ``[N, C, H, W]``
            tensors of probabilities.
        fusion: ``majority_vote_fusion``, ``certainty_fusion`` or ``channel_wise_fusion``.
        batch_size: images per fusion call.
        **kwargs: passed to ``fusion`` (``threshold``, ``policy``, ``window``).

    Returns:
        ``FusedLabels`` of all N images (labels int64 ``[N, H, W]``, certainty ``[N, H, W]``).

    Raises:
        ValueError: no caches, a cache without ``"probs"``, or caches of different images.

    References:
        Chao et al., CVPRW 2021 (the fused pseudo-labels are computed once, offline, as the
        authors' ``label_fusion.py`` does). Taught in notebooks/05_uda_channel_fusion.ipynb.
    """
    if not caches:
        raise ValueError("fuse_caches got no caches; pass one TeacherCache per teacher.")
    probs, index = [], None
    for m, cache in enumerate(caches):
        if isinstance(cache, Tensor):
            probs.append(cache)
            continue
        if "probs" not in getattr(cache, "targets", {}):
            raise ValueError(f"cache {m} holds {sorted(getattr(cache, 'targets', {}))}; build "
                             "it with TeacherCache(..., targets=('probs',)).")
        probs.append(cache.targets["probs"])
        if index is None:
            index = cache.dataset_index
        elif not torch.equal(index, cache.dataset_index):
            raise ValueError(f"cache {m} was built on other images (or another order) than "
                             "cache 0; build every teacher's cache on the same data set.")
    n = len(probs[0])
    if any(len(p) != n for p in probs):
        raise ValueError(f"the caches hold {[len(p) for p in probs]} images; expected the same "
                         "number for every teacher.")
    parts = [fusion([p[i:i + batch_size] for p in probs], **kwargs)
             for i in range(0, n, batch_size)]
    return FusedLabels(torch.cat([f.labels for f in parts]),
                       torch.cat([f.certainty for f in parts]))


def pseudo_label_quality(labels: Tensor | FusedLabels, truth: Tensor, num_classes: int
                         ) -> dict[str, float | Tensor]:
    """How good a set of pseudo-labels is, against labels the method never saw.

    Void pseudo-labels (255) are left out of the IoU and counted in ``coverage``, the share of
    labelled ground-truth pixels that received a pseudo-label. Diagnosis only: in UDA the
    target labels exist for evaluation, never for training or for choosing anything.

    Args:
        labels: ``[N, H, W]`` pseudo-labels (255 = void) or a ``FusedLabels``.
        truth: ``[N, H, W]`` ground truth (255 = void).
        num_classes: C.

    Returns:
        ``{"miou", "iou" (Tensor [C]), "pixel_acc", "coverage"}``.

    References:
        Chao et al., CVPRW 2021 (Fig. 5: the quality of a teacher's pseudo-labels). Taught in
        notebooks/05_uda_channel_fusion.ipynb.
    """
    from minikd.metrics import SegmentationMeter

    if isinstance(labels, FusedLabels):
        labels = labels.labels
    if labels.shape != truth.shape:
        raise ValueError(f"pseudo-labels {tuple(labels.shape)} and truth {tuple(truth.shape)} "
                         "differ; compare them on the same un-augmented images.")
    labels, truth = labels.long(), truth.long()
    labelled = truth != _VOID
    kept = labelled & (labels != _VOID)
    meter = SegmentationMeter(num_classes)
    meter.update(torch.where(kept, labels, 0), torch.where(kept, truth, _VOID))
    out = meter.compute()
    out.pop("confusion")
    out["coverage"] = float(kept.sum()) / max(1, int(labelled.sum()))
    return out
