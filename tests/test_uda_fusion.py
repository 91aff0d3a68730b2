"""Tests for the ensemble distillation for UDA of Chao et al. 2021 (minikd.fusion): output
unification, pixel-wise fusions (majority vote, mean certainty), the fusion policy, channel-wise
fusion, certainty-aware policy selection, and the pseudo-label dataset wrapper."""

from __future__ import annotations

import math

import pytest
import torch

from minikd import fusion
from minikd.data import RandomHorizontalFlip
from minikd.ensembles import TeacherCache
from minikd.fusion import (
    ClassCertainty,
    FusedLabels,
    FusionPolicy,
    PseudoLabels,
    certainty_fusion,
    channel_wise_fusion,
    class_certainty,
    majority_vote_fusion,
    oracle_policy,
    select_policy,
    unify,
)

torch.set_num_threads(1)
NAN = float("nan")


def _member_probs(m: int = 4, b: int = 2, c: int = 3, h: int = 5, w: int = 6,
                  seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(m, b, c, h, w, generator=g)).softmax(2)


def _argmax(values: list[float]) -> int:
    """First index of the maximum, as a plain loop finds it."""
    best = 0
    for k, v in enumerate(values):
        if v > values[best]:
            best = k
    return best


# --------------------------------------------------------------------------- per-pixel oracles
# Transcribed from the paper's equations and the docstrings' rules, one pixel at a time.
def _majority_oracle(p: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    m, b, c, h, w = p.shape
    labels = torch.empty(b, h, w, dtype=torch.long)
    cert = torch.empty(b, h, w)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                votes, sums = [0] * c, [0.0] * c
                for t in range(m):
                    probs = p[t, i, :, y, x].tolist()
                    k = _argmax(probs)  # unified output: one-hot at the argmax
                    votes[k] += 1
                    sums[k] += probs[k]
                most = max(votes)
                means = [sums[k] / votes[k] if votes[k] == most else -1.0 for k in range(c)]
                k = _argmax(means)
                labels[i, y, x] = k if means[k] >= threshold else 255
                cert[i, y, x] = means[k]
    return labels, cert


def _channel_oracle(p: torch.Tensor, teacher_of: list[int], window: int,
                    threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    _, b, c, h, w = p.shape
    r = window // 2
    claim = torch.zeros(b, c, h, w, dtype=torch.bool)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                for k in range(c):
                    claim[i, k, y, x] = _argmax(p[teacher_of[k], i, :, y, x].tolist()) == k
    labels = torch.full((b, h, w), 255, dtype=torch.long)
    cert = torch.full((b, h, w), NAN)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                claimed = [k for k in range(c) if claim[i, k, y, x]]
                counts = [sum(int(claim[i, k, yy, xx])
                              for yy in range(max(0, y - r), min(h, y + r + 1))
                              for xx in range(max(0, x - r), min(w, x + r + 1))) for k in range(c)]
                cands = claimed or [k for k in range(c) if counts[k] > 0]
                if not cands:
                    continue
                prob = [p[teacher_of[k], i, k, y, x].item() for k in range(c)]
                best = max(counts[k] for k in cands)
                tied = [k for k in cands if counts[k] == best]
                k = max(tied, key=lambda k: (prob[k], -k))
                cert[i, y, x] = prob[k]
                labels[i, y, x] = k if prob[k] >= threshold else 255
    return labels, cert


# --------------------------------------------------------------------------- unify
def test_unify_is_invariant_to_increasing_rescalings():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 4, 4, generator=g)
    expected = unify(logits)
    soft = logits.softmax(1)
    for scores in (soft, soft ** 3, (logits / 0.5).softmax(1), (logits / 3.0).softmax(1),
                   2.5 * logits - 7.0, logits.exp(), soft.log()):
        assert torch.equal(unify(scores), expected)
    assert torch.equal(expected, torch.nn.functional.one_hot(logits.argmax(1), 5)
                       .permute(0, 3, 1, 2).float())
    # per teacher, a different rescaling: the stacked unified outputs do not change
    members = torch.stack([soft, soft ** 3, 0.1 * logits + 2])
    assert torch.equal(unify(members, dim=2), expected.expand(3, -1, -1, -1, -1))


def test_unify_ties_dtype_and_bad_input():
    x = torch.tensor([[0.4, 0.4, 0.2], [0.1, 0.45, 0.45]], dtype=torch.float16)
    out = unify(x, dim=1)
    assert out.dtype == torch.float16
    assert out.tolist() == [[1, 0, 0], [0, 1, 0]]  # ties: lowest index, as argmax
    assert torch.equal(out.argmax(1), x.float().argmax(1))
    with pytest.raises(TypeError, match="floating-point"):
        unify(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="NaN"):
        unify(torch.tensor([[0.5, NAN]]))


# --------------------------------------------------------------------------- pixel-wise
@pytest.mark.parametrize("threshold", [0.0, 0.6])
def test_majority_vote_matches_the_per_pixel_loop(threshold):
    p = _member_probs()
    labels, cert = majority_vote_fusion(p, threshold=threshold)
    ref_labels, ref_cert = _majority_oracle(p, threshold)
    assert labels.dtype == torch.int64 and labels.shape == (2, 5, 6)
    assert torch.equal(labels, ref_labels)
    torch.testing.assert_close(cert, ref_cert)
    if threshold:
        assert bool((labels == 255).any()) and bool((labels != 255).any())


def test_majority_vote_ties_go_to_the_more_certain_voters():
    # 4 teachers, 1 pixel: two vote class 0 (p = 0.5), two vote class 2 (p = 0.8)
    p = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.2, 0.3], [0.1, 0.1, 0.8], [0.0, 0.2, 0.8]])
    p = p.view(4, 1, 3, 1, 1)
    labels, cert = majority_vote_fusion(p, threshold=0.0)
    assert labels.item() == 2 and cert.item() == pytest.approx(0.8)
    labels, cert = majority_vote_fusion(p[[0, 1, 2]], threshold=0.0)  # 2 votes beat 1
    assert labels.item() == 0 and cert.item() == pytest.approx(0.5)


def test_certainty_fusion_is_the_argmax_of_the_mean_and_thresholds():
    p = _member_probs(seed=3)
    labels, cert = certainty_fusion(p, threshold=0.0)
    for i, y, x in [(0, 0, 0), (1, 4, 5), (0, 2, 3)]:
        mean = [p[:, i, k, y, x].mean().item() for k in range(3)]
        assert labels[i, y, x].item() == _argmax(mean)
        assert cert[i, y, x].item() == pytest.approx(max(mean), abs=1e-6)
    fused = certainty_fusion(p, threshold=0.5)
    assert isinstance(fused, FusedLabels)
    assert torch.equal(fused.labels, torch.where(cert < 0.5, 255, labels))
    assert torch.equal(certainty_fusion(p, threshold=1.0).labels == 255, cert < 1.0)


def test_fusions_accept_float16_and_sequences():
    p = _member_probs().half()
    for fuse in (majority_vote_fusion, certainty_fusion):
        ref = fuse(p.float(), threshold=0.5)
        out = fuse(list(p), threshold=0.5)
        assert torch.equal(out.labels, ref.labels)
        assert out.certainty.dtype == torch.float32
    policy = FusionPolicy([0, 1, 2], num_teachers=4)
    assert torch.equal(channel_wise_fusion(p, policy, threshold=0.5).labels,
                       channel_wise_fusion(p.float(), policy, threshold=0.5).labels)


def test_fusions_refuse_logits_and_bad_thresholds():
    logits = 2 * torch.randn(3, 1, 4, 3, 3)
    policy = FusionPolicy([0, 1, 2, 0], num_teachers=3)
    for call in (lambda: majority_vote_fusion(logits), lambda: certainty_fusion(logits),
                 lambda: channel_wise_fusion(logits, policy)):
        with pytest.raises(ValueError, match="Did you pass logits"):
            call()
    p = logits.softmax(2)
    with pytest.raises(ValueError, match="0.9 here"):
        majority_vote_fusion(p, threshold=90)
    with pytest.raises(ValueError, match=r"\[M, B, C, H, W\]"):
        certainty_fusion(p[0])


# --------------------------------------------------------------------------- FusionPolicy
def test_fusion_policy_forms_and_table():
    a = FusionPolicy([0, 1, 0], num_teachers=2)
    assert a == FusionPolicy([(2, 0), (0, 0), (1, 1)], 2) == FusionPolicy({0: 0, 1: 1, 2: 0}, 2)
    assert a == FusionPolicy(torch.tensor([0, 1, 0]), 2)
    assert a.teachers == (0, 1, 0) and len(a) == 3 and a[1] == 1
    assert a.as_pairs() == [[0, 0], [1, 1], [2, 0]] and a.classes_of(0) == [0, 2]
    assert torch.equal(a.as_tensor(), torch.tensor([0, 1, 0]))
    named = FusionPolicy([0, 1, 0], class_names=["road", "car", "sky"],
                         teacher_names=["DACS", "CBST"])
    assert str(named) == named.table() == ("class | DACS CBST\n"
                                           "------+----------\n"
                                           "road  |  x    .\n"
                                           "car   |  .    x\n"
                                           "sky   |  x    .")
    assert "T0 T1 T2" in FusionPolicy([2, 1], 3).table()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"assignment": [(0, 0), (2, 1)], "num_teachers": 2, "num_classes": 3},
     r"class\(es\) \[1\] are unassigned"),
    ({"assignment": [(0, 0), (2, 1)], "num_teachers": 2, "class_names": ["a", "b", "c", "d"]},
     r"class\(es\) \[1, 3\] are unassigned"),
    ({"assignment": [(0, 0), (1, 1), (0, 1)], "num_teachers": 2},
     "class 0 is assigned twice"),
    ({"assignment": [0, 2], "num_teachers": 2}, "teacher 2, which does not exist"),
    ({"assignment": [0, -1], "num_teachers": 2}, "teacher -1, which does not exist"),
    ({"assignment": [(0, 0), (5, 0)], "num_teachers": 1, "num_classes": 2},
     "class 5 does not exist"),
    ({"assignment": [0, 1], "num_teachers": 2, "class_names": ["a"]},
     "class_names has 1 names; expected 2"),
    ({"assignment": [0, 1], "teacher_names": ["A", "B", "C"], "num_teachers": 2},
     "teacher_names has 3 names; expected 2"),
    ({"assignment": [0, 1]}, "num_teachers"),
    ({"assignment": [0, (1, 1)], "num_teachers": 2}, "not a \\(class, teacher\\) pair"),
])
def test_fusion_policy_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusionPolicy(**kwargs)


# --------------------------------------------------------------------------- channel-wise
# Teacher 0 owns classes 0 and 2, teacher 1 owns class 1. A_t = argmax map of teacher t.
A0 = [[0, 0, 2, 2],
      [0, 0, 2, 2],
      [1, 1, 2, 2],
      [1, 1, 1, 1]]
A1 = [[0, 1, 0, 0],
      [0, 0, 0, 0],
      [0, 2, 0, 0],
      [0, 0, 0, 1]]
POLICY = FusionPolicy([0, 1, 0], num_teachers=2)


def _hand_made() -> torch.Tensor:
    """[2, 1, 3, 4, 4]: 0.6 on the argmax, 0.2 elsewhere, with two pixels changed."""
    p = torch.stack([torch.nn.functional.one_hot(torch.tensor(a), 3).permute(2, 0, 1) * 0.4 + 0.2
                     for a in (A0, A1)]).unsqueeze(1)
    p[0, 0, :, 2, 1] = torch.tensor([0.25, 0.45, 0.30])  # unclaimed tie: class 2 more probable
    p[1, 0, :, 0, 1] = torch.tensor([0.1, 0.8, 0.1])  # the conflict's class 1 at p = 0.8
    return p


def test_channel_wise_fusion_on_a_hand_made_map():
    # claims: class 0 (T0) at the top-left 2x2; class 2 (T0) at rows 0-2, cols 2-3; class 1 (T1)
    # at (0, 1) and (3, 3). Conflict: (0, 1) = {0, 1}. Unclaimed: (2, 0), (2, 1), (3, 0..2).
    labels, cert = channel_wise_fusion(_hand_made(), POLICY, threshold=0.0, window=3)
    assert labels[0].tolist() == [[0, 0, 2, 2],   # (0,1): 3x3 counts class 0: 4 > class 1: 1
                                  [0, 0, 2, 2],   # exactly one claim: kept
                                  [0, 2, 2, 2],   # (2,0): class 0: 2; (2,1): 0 and 2 both 2,
                                  [255, 2, 2, 1]]  # p 0.30 > 0.25 -> 2; (3,0): nothing near
    expected = [[0.6, 0.6, 0.6, 0.6], [0.6, 0.6, 0.6, 0.6], [0.2, 0.3, 0.6, 0.6],
                [NAN, 0.2, 0.2, 0.6]]
    torch.testing.assert_close(cert[0], torch.tensor(expected), equal_nan=True)
    # threshold 0.55 voids the unclaimed pixels (certainty <= 1/2), keeps the claimed ones
    void = channel_wise_fusion(_hand_made(), POLICY, threshold=0.55, window=3).labels[0]
    assert void.tolist() == [[0, 0, 2, 2], [0, 0, 2, 2], [255, 255, 2, 2], [255, 255, 255, 1]]


def test_channel_wise_fusion_window_sizes():
    p = _hand_made()
    # window 1: the conflict goes to the more probable claim (T1: 0.8 > T0: 0.6), unclaimed -> 255
    labels, cert = channel_wise_fusion(p, POLICY, threshold=0.0, window=1)
    assert labels[0].tolist() == [[0, 1, 2, 2], [0, 0, 2, 2], [255, 255, 2, 2],
                                  [255, 255, 255, 1]]
    assert cert[0, 0, 1].item() == pytest.approx(0.8) and math.isnan(cert[0, 3, 0].item())
    # window 5 (default): (3, 0) sees class 0 and class 2 twice each, equal p 0.2 -> class 0
    labels, _ = channel_wise_fusion(p, POLICY, threshold=0.0)
    assert labels[0, 3, 0].item() == 0 and labels[0, 0, 1].item() == 0


def test_channel_wise_fusion_exactly_one_claim_everywhere():
    p = _member_probs(m=3, c=4, seed=5)
    # one teacher owns every class: each pixel is claimed exactly once, by its argmax
    labels, cert = channel_wise_fusion(p, FusionPolicy([1, 1, 1, 1], 3), threshold=0.0)
    assert torch.equal(labels, p[1].argmax(1))
    torch.testing.assert_close(cert, p[1].amax(1))
    # identical teachers, any policy: the same
    same = p[:1].expand(3, -1, -1, -1, -1)
    labels, _ = channel_wise_fusion(same, FusionPolicy([2, 0, 1, 0], 3), threshold=0.0)
    assert torch.equal(labels, p[0].argmax(1))


@pytest.mark.parametrize(("window", "threshold"), [(3, 0.0), (5, 0.4), (1, 0.0)])
def test_channel_wise_fusion_matches_the_per_pixel_loop(window, threshold):
    p = _member_probs(m=3, b=2, c=4, h=6, w=7, seed=7)
    teacher_of = [2, 0, 0, 1]
    labels, cert = channel_wise_fusion(p, FusionPolicy(teacher_of, 3), threshold, window)
    ref_labels, ref_cert = _channel_oracle(p, teacher_of, window, threshold)
    assert torch.equal(labels, ref_labels)
    torch.testing.assert_close(cert, ref_cert, equal_nan=True)


def test_channel_wise_fusion_bad_arguments():
    p = _member_probs(m=2, c=3)
    with pytest.raises(ValueError, match="3 classes and 3 teachers but member_probs have 3 "
                                         "classes and 2"):
        channel_wise_fusion(p, FusionPolicy([0, 1, 2], 3))
    for window in (0, 2, 4.0):
        with pytest.raises(ValueError, match="odd positive int"):
            channel_wise_fusion(p, POLICY, window=window)
    with pytest.raises(TypeError, match="FusionPolicy"):
        channel_wise_fusion(p, [0, 1, 0])


# --------------------------------------------------------------------------- policy selection
def test_class_certainty_streams_and_leaves_unpredicted_classes_nan():
    # 1 image, 2x2 pixels, 3 classes; predictions 0, 0, 2, 2 with max-softmax .9 .7 .6 .5
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.7, 0.2, 0.1], [0.2, 0.2, 0.6], [0.3, 0.2, 0.5]])
    probs = probs.T.reshape(1, 3, 2, 2)
    cc = class_certainty(probs)
    assert cc.dtype == torch.float64
    torch.testing.assert_close(cc, torch.tensor([0.8, NAN, 0.55], dtype=torch.float64),
                               equal_nan=True)
    acc = ClassCertainty(3).update(probs[..., :1]).update(probs[..., 1:])  # two batches
    torch.testing.assert_close(acc.compute(), cc, equal_nan=True)
    assert acc.overall() == pytest.approx(0.675)
    valid = torch.tensor([[[True, False], [True, True]]])
    torch.testing.assert_close(class_certainty(probs, 3, valid=valid),
                               torch.tensor([0.9, NAN, 0.55], dtype=torch.float64),
                               equal_nan=True)
    with pytest.raises(ValueError, match="Did you pass logits"):
        class_certainty(probs.log())
    with pytest.raises(ValueError, match="num_classes=4"):
        class_certainty(probs, 4)


def test_select_policy_on_hand_made_certainties():
    scores = torch.tensor([[0.9, NAN, 0.5, NAN],
                           [0.8, 0.7, 0.6, NAN],
                           [0.9, 0.6, NAN, NAN]])
    # class 0: tie 0.9 -> lower index 0; class 1: 1; class 2: 1; class 3 never predicted ->
    # highest NaN-mean certainty: T0 0.7, T1 0.7, T2 0.75 -> 2
    with pytest.warns(UserWarning, match=r"class\(es\) \[3\]; they go to teacher 2"):
        policy = select_policy(scores, teacher_names=["A", "B", "C"])
    assert policy.teachers == (0, 1, 1, 2) and policy.teacher_names == ["A", "B", "C"]
    assert select_policy(scores[:, :3]).teachers == (0, 1, 1)  # no warning needed there
    with pytest.raises(ValueError, match="NaN for every teacher"):
        select_policy(torch.full((2, 3), NAN))
    with pytest.raises(ValueError, match=r"\[M, C\]"):
        select_policy(torch.rand(3))


def test_select_policy_from_accumulators():
    probs_a = torch.tensor([[0.9, 0.1], [0.6, 0.4]]).T.reshape(1, 2, 1, 2)  # predicts 0, 0
    probs_b = torch.tensor([[0.7, 0.3], [0.2, 0.8]]).T.reshape(1, 2, 1, 2)  # predicts 0, 1
    students = [ClassCertainty(2).update(probs_a), ClassCertainty(2).update(probs_b)]
    assert select_policy(students).teachers == (0, 1)  # 0.75 > 0.7; class 1 only B predicts


def test_oracle_policy():
    iou = torch.tensor([[0.5, 0.1, 0.2, NAN], [0.4, 0.3, 0.7, NAN]])
    with pytest.warns(UserWarning, match="highest mIoU"):
        policy = oracle_policy(iou)
    assert policy.teachers == (0, 1, 1, 1)  # class 3: mIoU 0.27 < 0.47 -> teacher 1
    g = torch.Generator().manual_seed(0)
    iou = torch.rand(3, 6, generator=g)
    assert oracle_policy(list(iou)) == FusionPolicy(iou.argmax(0).tolist(), 3)


# --------------------------------------------------------------------------- PseudoLabels
class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int = 3, h: int = 4, w: int = 5):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, h, w, generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "mask": torch.zeros(self.images.shape[-2:],
                                                             dtype=torch.long), "index": i}


def test_pseudo_labels_go_through_the_joint_transform():
    ds = _Images()
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (3, 4, 5), generator=g, dtype=torch.uint8)
    labels[0, 0, :2] = 255
    flipped = PseudoLabels(ds, labels, RandomHorizontalFlip(1.0), num_classes=3)
    plain = PseudoLabels(ds, labels)
    assert len(flipped) == 3
    for i in range(3):
        s = flipped[i]
        assert s["mask"].dtype == torch.int64
        assert torch.equal(s["mask"], labels[i].flip(-1).long())
        assert torch.equal(s["image"], ds.images[i].flip(-1))
        assert torch.equal(plain[i]["mask"], labels[i].long())


def test_pseudo_labels_from_a_float16_cache_fusion():
    ds = _Images(n=2)
    p = _member_probs(m=2, b=2, c=3, h=4, w=5).half()
    caches = [TeacherCache._from_state({"targets": {"probs": p[t]},
                                        "dataset_index": torch.arange(2)}) for t in range(2)]
    fused = channel_wise_fusion(torch.stack([c.targets["probs"] for c in caches]),
                                FusionPolicy([0, 1, 0], 2), threshold=0.5)
    data = PseudoLabels(ds, fused, num_classes=3, dataset_index=caches[0].dataset_index)
    assert torch.equal(data[1]["mask"], fused.labels[1])


def test_pseudo_labels_bad_inputs():
    ds = _Images()
    labels = torch.zeros(3, 4, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="2 label maps but the dataset has 3"):
        PseudoLabels(ds, labels[:2])
    with pytest.raises(ValueError, match=r"expected \[N, H, W\]"):
        PseudoLabels(ds, labels[0])
    with pytest.raises(TypeError):
        PseudoLabels(ds, labels.float())
    bad = labels.clone()
    bad[1, 2, 2] = 7
    with pytest.raises(ValueError, match=r"contain \[7\]"):
        PseudoLabels(ds, bad, num_classes=3)
    with pytest.raises(ValueError, match="image 0 is"):
        PseudoLabels(ds, torch.zeros(3, 4, 6, dtype=torch.long))[0]
    with pytest.raises(ValueError, match="sample 1 has index 1"):
        PseudoLabels(ds, labels, dataset_index=torch.tensor([0, 2, 1]))[1]


# --------------------------------------------------------------------------- whole data sets
def test_fuse_caches_batch_by_batch_equals_one_fusion_of_everything():
    from minikd.data import ToyCity
    from minikd.models import unet_family

    torch.manual_seed(0)
    pool = ToyCity(5, (16, 32), domain="target")
    teachers = [unet_family("M128/4", 17).eval() for _ in range(3)]
    caches = [TeacherCache(t, pool, targets=("probs",), batch_size=2) for t in teachers]
    stacked = torch.stack([c.targets["probs"] for c in caches])
    policy = fusion.FusionPolicy([c % 3 for c in range(17)], 3)
    for fn, kw in ((fusion.majority_vote_fusion, {"threshold": 0.0}),
                   (fusion.certainty_fusion, {"threshold": 0.05}),
                   (fusion.channel_wise_fusion, {"policy": policy, "threshold": 0.0})):
        whole = fn(stacked, **kw)
        parts = fusion.fuse_caches(caches, fn, batch_size=2, **kw)
        assert torch.equal(parts.labels, whole.labels)
        torch.testing.assert_close(parts.certainty, whole.certainty, equal_nan=True)
    other = TeacherCache(teachers[0], ToyCity(5, (16, 32), domain="target", seed=3),
                         targets=("probs",))
    other.dataset_index = other.dataset_index.flip(0)
    with pytest.raises(ValueError, match="other images"):
        fusion.fuse_caches([caches[0], other], fusion.certainty_fusion)
    with pytest.raises(ValueError, match="no caches"):
        fusion.fuse_caches([], fusion.certainty_fusion)


def test_pseudo_label_quality_by_hand():
    truth = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 1]]])
    labels = torch.tensor([[[0, 1, 1, 255], [2, 2, 0, 255]]])
    q = fusion.pseudo_label_quality(labels, truth, 3)
    # kept pixels (labelled truth, labelled pseudo): (0,0) (0,1)->1 (1,1) (2,2) (2,2): 5 of 7
    assert q["coverage"] == pytest.approx(5 / 7)
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 1, FP 1 -> 1/2; class 2: 2/2
    assert q["iou"].tolist() == pytest.approx([0.5, 0.5, 1.0])
    assert q["miou"] == pytest.approx(2 / 3) and q["pixel_acc"] == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="differ"):
        fusion.pseudo_label_quality(labels[:, :1], truth, 3)
