"""Tests for the weighted ensemble teacher of the U-Net KD paper (minikd.ensembles): fusion with
static, per-class and per-pixel weights, the nested-loop weight search, and fused teacher caches."""

from __future__ import annotations

import itertools

import pytest
import torch

from minikd.ensembles import (
    TeacherCache,
    class_weights_from_iou,
    confidence_weights,
    ensemble_weight_confusions,
    fuse_teacher_caches,
    search_ensemble_weights,
    weight_grid,
    weighted_fusion,
)
from minikd.metrics import SegmentationMeter

torch.set_num_threads(1)
M, B, C, H, W = 3, 2, 4, 8, 12


def _member_probs(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(M, B, C, H, W, generator=g)).softmax(2)


def _labels(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (B, H, W), generator=g)
    labels[0, 0, :3] = 255
    return labels


def _miou(probs: torch.Tensor, labels: torch.Tensor) -> float:
    meter = SegmentationMeter(C)
    meter.update(probs.argmax(1), labels)
    return meter.compute()["miou"]


# --------------------------------------------------------------------------- weighted_fusion
def test_static_fusion_is_the_normalised_weighted_sum():
    p = _member_probs()
    fused = weighted_fusion(p, [1.0, 2.0, 1.0])
    expected = (p[0] + 2 * p[1] + p[2]) / 4
    torch.testing.assert_close(fused, expected)
    torch.testing.assert_close(fused.sum(1), torch.ones(B, H, W))
    torch.testing.assert_close(weighted_fusion(list(p), [2.0, 4.0, 2.0]), expected)  # list, scale
    torch.testing.assert_close(weighted_fusion(p, [0.0, 1.0, 0.0]), p[1])


def test_per_class_and_per_pixel_fusion():
    p = _member_probs()
    wc = torch.rand(M, C) + 0.1
    fused = weighted_fusion(p, wc)
    raw = (wc[:, None, :, None, None] * p).sum(0)
    torch.testing.assert_close(fused, raw / raw.sum(1, keepdim=True))
    same = weighted_fusion(p, torch.tensor([1.0, 2.0, 3.0])[:, None].expand(M, C))
    torch.testing.assert_close(same, weighted_fusion(p, [1.0, 2.0, 3.0]))  # constant per class
    wp = torch.rand(M, B, H, W) + 0.1
    fused = weighted_fusion(p, wp)
    torch.testing.assert_close(fused, (wp[:, :, None] / wp.sum(0)[None, :, None] * p).sum(0))
    torch.testing.assert_close(fused.sum(1), torch.ones(B, H, W))


@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.0, 0.0, 0.0], [1.0, -1.0, 1.0],
                                     torch.ones(M, C + 1)])
def test_fusion_rejects_bad_weights(weights):
    with pytest.raises(ValueError, match="weights"):
        weighted_fusion(_member_probs(), weights)


def test_fusion_rejects_bad_member_shape():
    with pytest.raises(ValueError, match=r"\[M, B, C, H, W\]"):
        weighted_fusion(torch.rand(B, C, H, W), [1.0])


# --------------------------------------------------------------------------- grid search
def test_weight_grid_is_the_papers_nested_loops():
    grid = weight_grid(3, range(5))
    loops = [(a, b, c) for a in range(5) for b in range(5) for c in range(5) if a + b + c]
    assert grid.shape == (124, 3)
    assert grid.tolist() == [list(map(float, t)) for t in loops]
    with pytest.raises(ValueError, match="non-negative"):
        weight_grid(3, [-1, 1])


def test_confusions_match_the_segmentation_meter():
    p, labels = _member_probs(), _labels()
    grid = weight_grid(3, range(3))
    conf = ensemble_weight_confusions(p, labels, grid, C, chunk=5)
    assert conf.shape == (len(grid), C, C)
    for k in (0, 7, len(grid) - 1):
        meter = SegmentationMeter(C)
        meter.update(weighted_fusion(p, grid[k]).argmax(1), labels)
        assert torch.equal(conf[k], meter.compute()["confusion"])


def test_search_equals_three_nested_loops():
    p, labels = _member_probs(2), _labels(3)
    best, best_w = -1.0, None
    for w in itertools.product(range(5), repeat=3):
        if sum(w) == 0:
            continue
        miou = _miou(weighted_fusion(p, torch.tensor(w, dtype=torch.float32)), labels)
        if miou > best + 1e-12:
            best, best_w = miou, w
    result = search_ensemble_weights(p, labels, C)
    assert result["raw_weights"].tolist() == [float(v) for v in best_w]
    assert result["miou"] == pytest.approx(best, abs=1e-6)
    torch.testing.assert_close(result["weights"].sum(), torch.tensor(1.0))
    assert result["mious"].shape == (124,)
    # it can never be worse than a single member or the mean: both are in the grid
    for m in range(M):
        assert result["miou"] >= _miou(p[m], labels) - 1e-9
    assert result["miou"] >= _miou(p.mean(0), labels) - 1e-9


def test_search_from_summed_confusions_of_batches():
    p, labels = _member_probs(4), _labels(5)
    grid = weight_grid(3, range(3))
    summed = sum(ensemble_weight_confusions(p[:, i:i + 1], labels[i:i + 1], grid, C)
                 for i in range(B))
    whole = search_ensemble_weights(p, labels, C, grid=grid)
    streamed = search_ensemble_weights(None, None, C, grid=grid, confusions=summed)
    assert streamed["raw_weights"].tolist() == whole["raw_weights"].tolist()
    assert streamed["miou"] == pytest.approx(whole["miou"])


def test_confusions_reject_mismatched_inputs():
    p = _member_probs()
    with pytest.raises(ValueError, match="grid"):
        ensemble_weight_confusions(p, _labels(), torch.ones(4, 2), C)
    with pytest.raises(ValueError, match="labels"):
        ensemble_weight_confusions(p, _labels()[:, :4], weight_grid(3, range(2)), C)


# --------------------------------------------------------------------------- dynamic weights
def test_class_weights_from_iou():
    iou = torch.tensor([[0.8, 0.0, float("nan")], [0.2, 0.0, float("nan")]])
    w = class_weights_from_iou(iou, power=1.0, floor=0.0 + 1e-9)
    torch.testing.assert_close(w.sum(0), torch.ones(3))
    assert w[0, 0] == pytest.approx(0.8, abs=1e-6)
    torch.testing.assert_close(w[:, 1], torch.tensor([0.5, 0.5]))  # nobody good: equal
    torch.testing.assert_close(class_weights_from_iou(iou, power=0.0), torch.full((2, 3), 0.5))
    assert class_weights_from_iou(iou, power=8.0)[0, 0] > 0.99
    with pytest.raises(ValueError, match=r"\[M, C\]"):
        class_weights_from_iou(torch.rand(3))


def test_confidence_weights():
    p = _member_probs()
    w = confidence_weights(p)
    assert w.shape == (M, B, H, W)
    torch.testing.assert_close(w.sum(0), torch.ones(B, H, W))
    top = p.amax(2)
    torch.testing.assert_close(w, top / top.sum(0))
    static = torch.tensor([1.0, 2.0, 1.0])
    flat = confidence_weights(p, static, power=0.0)  # power 0: the static weights everywhere
    torch.testing.assert_close(flat, (static / 4)[:, None, None, None].expand(M, B, H, W))
    sharp = confidence_weights(p, power=50.0)
    most_confident = top.argmax(0)
    assert (sharp.argmax(0) == most_confident).all()
    with pytest.raises(ValueError, match="power"):
        confidence_weights(p, power=-1.0)
    with pytest.raises(ValueError, match="base_weights"):
        confidence_weights(p, [1.0, 1.0])


# --------------------------------------------------------------------------- fused caches
class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int = 5):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, H, W, generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "index": i}


def test_fuse_teacher_caches_runs_no_teacher_and_stores_log_probs():
    ds = _Images()
    teachers = [torch.nn.Conv2d(3, C, 1) for _ in range(M)]
    caches = [TeacherCache(t, ds, targets=("logits",)) for t in teachers]
    weights = torch.tensor([1.0, 3.0, 0.0])
    fused = fuse_teacher_caches(caches, lambda p: weighted_fusion(p, weights), batch_size=2)
    assert set(fused.targets) == {"logits"} and fused.targets["logits"].dtype == torch.float16
    assert torch.equal(fused.dataset_index, caches[0].dataset_index)
    with torch.no_grad():
        expected = weighted_fusion(torch.stack([t(ds.images).softmax(1) for t in teachers]),
                                   weights)
    torch.testing.assert_close(fused.targets["logits"].float().softmax(1), expected,
                               atol=2e-3, rtol=2e-3)
    assert fused[0]["teacher_logits"].shape == (C, H, W)


def test_fuse_teacher_caches_rejects_caches_of_other_images():
    a = TeacherCache(torch.nn.Conv2d(3, C, 1), _Images(5), targets=("logits",))
    b = TeacherCache(torch.nn.Conv2d(3, C, 1), _Images(4), targets=("logits",))
    with pytest.raises(ValueError, match="same data set"):
        fuse_teacher_caches([a, b], lambda p: p.mean(0))
    with pytest.raises(ValueError, match="empty"):
        fuse_teacher_caches([], lambda p: p.mean(0))


# --------------------------------------------------------------------------- edge cases
def test_per_pixel_weights_must_cover_every_pixel():
    p = _member_probs()
    wp = torch.rand(M, B, H, W) + 0.1
    wp[:, 1, 2, 3] = 0.0
    with pytest.raises(ValueError, match="sum to 0 at 1 pixels"):
        weighted_fusion(p, wp)
    with pytest.raises(ValueError, match="all zero"):
        weighted_fusion(p, torch.zeros(M, C))


def test_weight_grid_of_floats_and_one_member():
    grid = weight_grid(3, [0.0, 0.5, 1.0])
    assert grid.shape == (26, 3) and grid[0].tolist() == [0.0, 0.0, 0.5]
    assert weight_grid(1, range(3)).tolist() == [[1.0], [2.0]]
    with pytest.raises(ValueError, match="positive"):
        weight_grid(3, [0])
    with pytest.raises(ValueError, match="n_members"):
        weight_grid(0, range(3))


def test_search_hand_counted_example():
    # one 1x4 image, 2 classes; member 0 right on the left half, member 1 right on the right half
    labels = torch.tensor([[[0, 0, 1, 1]]])
    p0 = torch.tensor([[0.9, 0.9, 0.9, 0.9], [0.1, 0.1, 0.1, 0.1]])  # says 0 everywhere
    p1 = torch.tensor([[0.4, 0.4, 0.0, 0.0], [0.6, 0.6, 1.0, 1.0]])  # says 1 everywhere
    p = torch.stack([p0, p1])[:, None, :, None, :]  # [M=2, B=1, C=2, H=1, W=4]
    result = search_ensemble_weights(p, labels, 2, values=range(3))
    # weights (1, 1): column means (0.65, 0.35), (0.65, 0.35), (0.45, 0.55), (0.45, 0.55)
    # -> prediction 0 0 1 1, perfect; (0, 1), (1, 0), (2, 1), ... are worse; (1, 1) comes
    # first among the perfect ones in loop order (0, 1), (0, 2), (1, 0), (1, 1), ...
    assert result["raw_weights"].tolist() == [1.0, 1.0]
    assert result["miou"] == 1.0
    assert result["mious"][0] == pytest.approx(0.25)  # (0, 1): 0 0 1 1 vs 1 1 1 1 -> IoU 0, 1/2
    with pytest.raises(ValueError, match="grid"):
        search_ensemble_weights(None, None, 2, confusions=torch.zeros(3, 2, 2, dtype=torch.long))


def test_fuse_teacher_caches_from_probs_and_keeps_small_probabilities():
    ds = _Images(3)
    caches = [TeacherCache(torch.nn.Conv2d(3, C, 1), ds, targets=("probs",)) for _ in range(2)]
    fused = fuse_teacher_caches(caches, lambda p: p.mean(0), batch_size=2)
    mean = (caches[0].targets["probs"].float() + caches[1].targets["probs"].float()) / 2
    torch.testing.assert_close(fused.targets["logits"].float().exp(), mean, atol=2e-3, rtol=2e-3)
    tiny = [TeacherCache(torch.nn.Conv2d(3, C, 1), ds, targets=("logits",))]
    tiny[0].targets["logits"] = torch.zeros(3, C, H, W, dtype=torch.float16)
    tiny[0].targets["logits"][:, 0] = 25.0  # other classes get e^-25 ~ 1e-11 < fp16's 6e-8
    fused = fuse_teacher_caches(tiny, lambda p: p[0])
    assert fused.targets["logits"][:, 1].float().mean() == pytest.approx(-25.0, abs=0.05)
    with pytest.raises(ValueError, match="targets"):
        unc = TeacherCache(torch.nn.Conv2d(3, C, 1), ds, targets=("logits",))
        unc.targets = {"uncertainty": torch.zeros(3, H, W)}
        fuse_teacher_caches([unc], lambda p: p[0])


def raw_gap(teacher: torch.nn.Module, ds: torch.utils.data.Dataset) -> torch.Tensor:
    """Largest gap between two logits of a teacher on the images of ``ds``."""
    with torch.no_grad():
        z = teacher(torch.stack([ds[i]["image"] for i in range(len(ds))]))
    return (z.amax(1) - z.amin(1)).max()


def test_fused_cache_of_one_teacher_is_standard_kd_at_high_tau():
    # Regression guard for notebook 02 (ensemble-KD students below their twins): the fused
    # cache stores log p under "logits", CachedTargets hands it out as "teacher_logits", and
    # DistillationLoss softens it once with τ. For one member and the identity fusion this must
    # be exactly standard KD from that teacher's logits: softmax(log p / τ) = softmax(z / τ).
    from minikd.ensembles import CachedTargets
    from minikd.losses import DistillationLoss

    class _Labelled(_Images):
        def __getitem__(self, i: int) -> dict:
            return {**super().__getitem__(i), "mask": torch.zeros(H, W, dtype=torch.long)}

    ds = _Labelled(4)
    torch.manual_seed(0)
    teacher = torch.nn.Conv2d(3, C, 1)
    with torch.no_grad():  # confident: logit gaps up to ~20, p down to ~1e-9 (< float16's 6e-8),
        teacher.weight.mul_(6.0)  # yet above the 1e-12 clamp (a gap of 27.6), so KD is exact
        teacher.bias.zero_()
    assert float(raw_gap(teacher, ds)) < 27.0
    raw = TeacherCache(teacher, ds, targets=("logits",))
    fused = fuse_teacher_caches([raw], lambda p: p[0])
    student = torch.randn(4, C, H, W, generator=torch.Generator().manual_seed(3))
    loss_fn = DistillationLoss(temperature=10.0, alpha=0.5)
    values = []
    for cache in (raw, fused):
        batch = torch.utils.data.default_collate([CachedTargets(ds, cache)[i] for i in range(4)])
        assert set(batch) == {"image", "index", "mask", "teacher_logits"}
        values.append(loss_fn(student, batch)[1]["kd"])
    # exact up to float16 storage of log p (rounding <= 2**-11 relative) and the 1e-12 clamp
    torch.testing.assert_close(values[1], values[0], rtol=2e-3, atol=2e-3)
    # and the soft targets themselves agree at τ = 10 (not, e.g., softened twice)
    q_raw = (raw.targets["logits"].float() / 10).softmax(1)
    q_fused = (fused.targets["logits"].float() / 10).softmax(1)
    torch.testing.assert_close(q_fused, q_raw, rtol=2e-3, atol=2e-3)
