"""Tests for minikd.ensembles: statistics against direct transcriptions of the papers' formulas,
vmap == loop (eval and train), MC dropout, deep sub-ensembles, and the teacher cache under the
joint transforms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from minikd.ensembles import (
    CachedTargets,
    DeepEnsemble,
    DeepSubEnsemble,
    MCDropout,
    TeacherCache,
    VectorizedEnsemble,
    depth_predictive_variance,
    dudes_uncertainty,
    ensemble_statistics,
    stack_members,
)

torch.set_num_threads(1)
C, H, W = 5, 16, 24


# --------------------------------------------------------------------------- small local models
def conv_net(num_classes: int = C, p: float = 0.0, seed: int = 0) -> nn.Module:
    """A 2-layer conv net with BatchNorm and (optionally active) dropout."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Dropout2d(p), nn.Conv2d(8, num_classes, 3, padding=1))


class DepthNet(nn.Module):
    """Segmentation + depth mean/variance, like SegDepthFormer's output dict."""

    def __init__(self, seed: int = 0, p: float = 0.0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Dropout(p))
        self.seg = nn.Conv2d(8, C, 1)
        self.depth = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        f = self.body(x)
        d = self.depth(f)
        return {"logits": self.seg(f), "depth": d[:, 0].relu(),
                "depth_var": nn.functional.softplus(d[:, 1])}


def pointwise_net(seed: int = 0, linear: bool = False) -> nn.Module:
    """A per-pixel teacher (1x1 convs): its output at a pixel depends only on that pixel."""
    torch.manual_seed(seed)
    if linear:
        return nn.Conv2d(3, C, 1)
    return nn.Sequential(nn.Conv2d(3, 16, 1), nn.Tanh(), nn.Conv2d(16, C, 1))


def images(b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, H, W, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- statistics
def test_statistics_match_direct_transcriptions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 2, C, H, W, generator=g) * 3
    stats = ensemble_statistics({"logits": logits}, return_members=True)
    probs = logits.softmax(2)
    mean = probs.mean(0)
    torch.testing.assert_close(stats["probs"], mean)
    assert torch.equal(stats["pred"], mean.argmax(1))
    # DUDES code: sigma = torch.std(softmax, dim=0) (unbiased), then pick the predicted class
    sigma = torch.std(probs, dim=0)
    expected_unc = torch.zeros(2, H, W)
    for c in range(C):  # the authors' torch.where loop over classes
        expected_unc = torch.where(mean.argmax(1) == c, sigma[:, c], expected_unc)
    torch.testing.assert_close(stats["uncertainty"], expected_unc)
    entropy = -(mean * mean.log()).sum(1)
    expected_entropy = -(probs * probs.log()).sum(2).mean(0)
    torch.testing.assert_close(stats["entropy"], entropy)
    torch.testing.assert_close(stats["mutual_info"], entropy - expected_entropy)
    assert (stats["mutual_info"] >= 0).all() and (stats["mutual_info"] <= stats["entropy"]).all()
    assert stats["entropy"].max() <= math.log(C) + 1e-6
    torch.testing.assert_close(stats["member_probs"], probs)


def test_uncertainty_correction_and_single_member():
    member_probs = torch.tensor([0.9, 0.7, 0.8]).view(3, 1, 1, 1, 1).expand(3, 1, 1, 1, 1)
    member_probs = torch.cat([member_probs, 1 - member_probs], dim=2)  # [3,1,2,1,1]
    pred = torch.zeros(1, 1, 1, dtype=torch.long)
    assert dudes_uncertainty(member_probs, pred, 1).item() == pytest.approx(0.1)  # hand: std
    assert dudes_uncertainty(member_probs, pred, 0).item() == pytest.approx(0.1 * math.sqrt(2 / 3))
    assert dudes_uncertainty(member_probs[:1], pred).item() == 0.0  # one member: no spread


def test_depth_variance_is_emuformer_eq10():
    g = torch.Generator().manual_seed(0)
    mu, s2 = torch.rand(5, 2, H, W, generator=g) * 10, torch.rand(5, 2, H, W, generator=g)
    t = mu.shape[0]
    mu_bar = mu.sum(0) / t
    eq10 = s2.sum(0) / t + ((mu - mu_bar) ** 2).sum(0) / t
    torch.testing.assert_close(depth_predictive_variance(mu, s2), eq10)
    stats = ensemble_statistics({"depth": mu, "depth_var": s2})
    torch.testing.assert_close(stats["depth"], mu_bar)
    torch.testing.assert_close(stats["depth_var"], eq10)
    assert "probs" not in stats


def test_mutual_information_matches_metrics_module_if_present():
    metrics = pytest.importorskip("minikd.metrics")
    if not hasattr(metrics, "mutual_information"):
        pytest.skip("metrics.mutual_information not written yet")
    logits = torch.randn(3, 2, C, H, W, generator=torch.Generator().manual_seed(0))
    stats = ensemble_statistics({"logits": logits})
    torch.testing.assert_close(stats["mutual_info"],
                               metrics.mutual_information(logits.softmax(2)).float(),
                               atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- DeepEnsemble
def test_predict_keys_shapes_and_modes_restored():
    members = [conv_net(seed=s).eval() for s in range(3)]
    members[1].train()
    members[1][1].eval()  # a frozen BatchNorm inside a training member stays frozen
    ens = DeepEnsemble(members, vectorize=False)
    out = ens.predict(images(), return_members=True)
    assert len(ens) == 3 and len(ens.members) == 3
    assert out["probs"].shape == (2, C, H, W) and out["member_probs"].shape == (3, 2, C, H, W)
    for k in ("pred", "uncertainty", "entropy", "mutual_info"):
        assert out[k].shape == (2, H, W)
    assert not out["probs"].requires_grad
    assert members[1].training and not members[0].training and not members[1][1].training
    torch.testing.assert_close(out["probs"].sum(1), torch.ones(2, H, W))


def test_depth_members():
    ens = DeepEnsemble([DepthNet(seed=s).eval() for s in range(3)], vectorize=False)
    out = ens.predict(images())
    assert out["depth"].shape == (2, H, W) and (out["depth_var"] > 0).all()
    stacked = ens.forward_members(images())
    torch.testing.assert_close(out["depth_var"], depth_predictive_variance(
        stacked["depth"], stacked["depth_var"]).detach())


def test_members_that_disagree_are_named():
    with pytest.raises(ValueError, match=r"member 2 .*\(4 classes vs 5\)"):
        DeepEnsemble([conv_net(), conv_net(seed=1), conv_net(4)], vectorize=False).predict(images())
    with pytest.raises(ValueError, match=r"member 1 returned keys"):
        DeepEnsemble([DepthNet(), conv_net()], vectorize=False).predict(images())
    with pytest.raises(ValueError, match=r"member 1 .*Sequential.*DepthNet|member 1 is a"):
        DeepEnsemble([DepthNet(), conv_net()], vectorize=True)
    with pytest.raises(ValueError, match="vectorize must be"):
        DeepEnsemble([conv_net()], vectorize="yes")


@pytest.mark.parametrize("make", [conv_net, DepthNet])
def test_vmap_equals_loop_eval(make):
    members = [make(seed=s).eval() for s in range(4)]
    x = images()
    loop = DeepEnsemble(members, vectorize=False).predict(x, return_members=True)
    vec = DeepEnsemble(members, vectorize=True).predict(x, return_members=True)
    assert loop.keys() == vec.keys()
    for k in loop:
        torch.testing.assert_close(vec[k].float(), loop[k].float(), atol=1e-5, rtol=0)


def test_vmap_equals_loop_train_step():
    """Train mode: same outputs, same gradients, same BatchNorm running stats as the loop."""
    x = images(4)
    loops, vecs = ([conv_net(seed=s).train() for s in range(3)] for _ in range(2))
    results = []
    for members, vectorize in ((loops, False), (vecs, True)):
        logits = DeepEnsemble(members, vectorize=vectorize).forward_members(x)["logits"]
        (logits.square().mean() + logits[:, :, 0].mean()).backward()
        results.append(logits.detach())
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=0)
    for a, b in zip(loops, vecs):
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pb.grad, pa.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b[1].running_mean, a[1].running_mean)
        torch.testing.assert_close(b[1].running_var, a[1].running_var)
        assert int(b[1].num_batches_tracked) == int(a[1].num_batches_tracked) == 1


def test_vectorized_ensemble_training_equals_separate_optimizers():
    """One SGD over stacked params, each member its own batch == M separate SGD steps."""
    members = [conv_net(seed=s).train() for s in range(3)]
    reference = [conv_net(seed=s).train() for s in range(3)]
    x = torch.randn(3, 2, 3, H, W, generator=torch.Generator().manual_seed(5))
    vec = stack_members(members)
    assert isinstance(vec, VectorizedEnsemble) and len(vec) == 3
    opt = torch.optim.SGD(vec.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(2):
        opt.zero_grad()
        vec(x, per_member=True)["logits"].square().mean(dim=(1, 2, 3, 4)).sum().backward()
        opt.step()
    for i, m in enumerate(reference):
        opt_i = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        for _ in range(2):
            opt_i.zero_grad()
            m(x[i]).square().mean().backward()
            opt_i.step()
    vec.unstack_to(members)
    for a, b in zip(reference, members):
        for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(pb, pa, atol=1e-5, rtol=1e-4, msg=n)
    with pytest.raises(ValueError, match="per_member=True needs"):
        vec(x[:2], per_member=True)


def test_unet_tiny_and_dudes_student_members():
    models = pytest.importorskip("minikd.models")
    x = torch.rand(2, 3, 32, 64)
    unets = [models.unet_family("M128/4", num_classes=C).eval() for _ in range(3)]
    loop = DeepEnsemble(unets, vectorize=False).predict(x)
    vec = DeepEnsemble(unets, vectorize=True).predict(x)
    for k in loop:
        torch.testing.assert_close(vec[k].float(), loop[k].float(), atol=1e-5, rtol=0)
    students = [models.DUDESStudent(models.unet_family("M128/4", num_classes=C)).eval()
                for _ in range(2)]
    stacked = DeepEnsemble(students, vectorize=True).forward_members(x)
    assert stacked["logits"].shape == (2, 2, C, 32, 64)
    assert stacked["uncertainty"].shape[:2] == (2, 2)  # passed through, not summarised


# --------------------------------------------------------------------------- MC dropout
def test_mc_dropout():
    model = DepthNet(p=0.5)
    model.train()
    model(images(4))  # give BatchNorm non-trivial running stats
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mc = MCDropout(model, n_samples=6)
    samples = mc.forward_members(images())
    assert samples["logits"].shape == (6, 2, C, H, W)
    assert not torch.allclose(samples["logits"][0], samples["logits"][1])  # masks differ
    out = mc.predict(images())
    assert out["depth_var"].shape == (2, H, W) and (out["uncertainty"] > 0).any()
    for k, v in model.state_dict().items():  # BN running stats (and counters) untouched
        assert torch.equal(v, before[k]), k
    assert not model.training and not model.body[1].training and not model.body[3].training
    batched = MCDropout(model, n_samples=3, batched=True).forward_members(images())
    assert batched["logits"].shape == (3, 2, C, H, W)
    assert not torch.allclose(batched["logits"][0], batched["logits"][1])


def test_mc_dropout_single_sample_without_dropout_equals_model():
    model = conv_net(p=0.0).eval()
    x = images()
    out = MCDropout(model, n_samples=1).predict(x)
    with torch.no_grad():
        torch.testing.assert_close(out["probs"], model(x).softmax(1))
    assert (out["uncertainty"] == 0).all() and torch.allclose(out["mutual_info"],
                                                              torch.zeros(2, H, W), atol=1e-6)
    with pytest.raises(ValueError, match="no nn.Dropout"):
        MCDropout(nn.Conv2d(3, C, 1), n_samples=2)


# --------------------------------------------------------------------------- deep sub-ensemble
def make_sub_ensemble(n_heads: int = 3) -> DeepSubEnsemble:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    return DeepSubEnsemble(trunk, lambda: nn.Conv2d(8, C, 1), n_heads)


def test_sub_ensemble_heads_take_turns():
    model = make_sub_ensemble(3).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for step in range(5):
        assert model.head_for_step(step) == step % 3
        opt.zero_grad()
        model(images()).square().mean().backward()
        chosen = step % 3
        for k, head in enumerate(model.heads):
            got = [p.grad is not None for p in head.parameters()]
            assert all(got) if k == chosen else not any(got), (step, k)
        assert all(p.grad is not None for p in model.trunk.parameters())  # trunk every batch
        opt.step()
    assert int(model.step) == 5 and "step" in model.state_dict()  # turn order resumes


def test_sub_ensemble_predict_and_eval_forward():
    model = make_sub_ensemble(4)
    x = images()
    out = model.predict(x)
    assert model.training  # restored
    assert out["probs"].shape == (2, C, H, W) and (out["mutual_info"] >= 0).all()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x)["logits"].argmax(1), out["pred"])
        torch.testing.assert_close(model(x, head=2), model.heads[2](model.trunk(x)))
    with pytest.raises(ValueError, match="same module twice"):
        head = nn.Conv2d(8, C, 1)
        DeepSubEnsemble(nn.Identity(), lambda: head, 2)


# --------------------------------------------------------------------------- teacher cache
class ImageSet(torch.utils.data.Dataset):
    """Smooth random images (bilinear upsampling of a coarse grid) with masks and depth."""

    def __init__(self, n: int = 5, size: tuple[int, int] = (32, 64), transform=None):
        g = torch.Generator().manual_seed(0)
        coarse = torch.rand(n, 3, size[0] // 8, size[1] // 8, generator=g)
        self.images = nn.functional.interpolate(coarse, size, mode="bilinear",
                                                align_corners=False)
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = self.images[i]
        sample = {"image": img.clone(), "mask": (img[0] * C).long().clamp(max=C - 1),
                  "depth": img[1] * 50 + 1, "index": i}
        return sample if self.transform is None else self.transform(sample)


def test_cache_holds_teacher_outputs_and_roundtrips(tmp_path):
    data = ImageSet()
    ens = DeepEnsemble([pointwise_net(s) for s in range(3)], vectorize=False)
    cache = TeacherCache(ens, data, targets=("probs", "uncertainty"), batch_size=2)
    assert cache.targets["probs"].dtype == torch.float16 and len(cache) == 5
    ref = ens.predict(data.images)
    torch.testing.assert_close(cache.targets["probs"].float(), ref["probs"], atol=1e-3, rtol=0)
    torch.testing.assert_close(cache.targets["uncertainty"].float(), ref["uncertainty"],
                               atol=1e-3, rtol=0)
    assert cache.nbytes == 5 * (C + 1) * 32 * 64 * 2
    path = tmp_path / "cache.pt"
    cache.save(path)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    loaded = TeacherCache.load(path)
    assert torch.equal(loaded.targets["probs"], cache.targets["probs"])
    assert torch.equal(TeacherCache.build_or_load(path, ens, data).targets["uncertainty"],
                       cache.targets["uncertainty"])
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable minikd teacher cache"):
        TeacherCache.load(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="unknown names"):
        TeacherCache(ens, data, targets=("softmax",))
    with pytest.raises(ValueError, match=r"none of the statistics asked for, \['depth'\]"):
        TeacherCache(ens, data, targets=("depth",))  # only 'depth' asked: predict says why
    with pytest.raises(ValueError, match="not 'depth'"):
        TeacherCache(ens, data, targets=("probs", "depth"))
    with pytest.raises(ValueError, match="cache holds 5 images"):
        CachedTargets(ImageSet(n=4), cache)
    sample = CachedTargets(data, cache)[3]
    assert sample["teacher_probs"].shape == (C, 32, 64) and sample["teacher_unc"].shape == (32, 64)


def _data_transforms():
    data = pytest.importorskip("minikd.data")
    needed = ("Compose", "RandomCrop", "RandomHorizontalFlip", "RandomScale")
    if not all(hasattr(data, n) for n in needed):
        pytest.skip("minikd.data transforms not written yet")
    return data


def _seeded(make_transform, seed):
    """A transform whose random parameters come from a generator seeded ``seed``."""
    return lambda sample: make_transform(torch.Generator().manual_seed(seed))(sample)


def _augmented_truth(teacher, aug_image):
    with torch.no_grad():
        return teacher.predict(aug_image[None])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cached_targets_follow_flips_and_crops_exactly(seed):
    """Pointwise teacher: cached-then-augmented == teacher(augmented image), up to fp16."""
    data = _data_transforms()

    def make(g):
        return data.Compose([data.RandomHorizontalFlip(p=0.5, generator=g),
                             data.RandomCrop((16, 32), generator=g)])

    base = ImageSet()
    ens = DeepEnsemble([pointwise_net(s) for s in range(3)], vectorize=False)
    cache = TeacherCache(ens, base, targets=("probs", "uncertainty"))
    for i in range(len(base)):
        cached = CachedTargets(base, cache, _seeded(make, seed + 10 * i))[i]
        truth = _augmented_truth(ens, cached["image"])
        assert cached["image"].shape == (3, 16, 32)
        torch.testing.assert_close(cached["teacher_probs"].float(), truth["probs"][0],
                                   atol=2e-3, rtol=0)  # fp16 rounding of values in [0, 1]
        torch.testing.assert_close(cached["teacher_unc"].float(), truth["uncertainty"][0],
                                   atol=2e-3, rtol=0)


def test_cached_targets_under_rescaling():
    """Rescaling: exact for a linear pointwise teacher's logits (bilinear resize commutes with
    a 1x1 conv); for probabilities of a nonlinear teacher it is an approximation whose error
    we bound (measured on these smooth images: mean abs error 4e-5, max 1.3e-4; bounds 1e-3 and
    1e-2 leave 10x margin. On sharp real edges the error is larger: see RESULTS.md)."""
    data = _data_transforms()

    def make(g):
        return data.Compose([data.RandomScale(0.5, 2.0, generator=g),
                             data.RandomCrop((16, 32), generator=g)])

    base = ImageSet()
    linear = pointwise_net(0, linear=True).eval()
    cache = TeacherCache(linear, base, targets=("logits",), dtype=torch.float32)
    nonlinear = DeepEnsemble([pointwise_net(s) for s in range(3)], vectorize=False)
    cache_p = TeacherCache(nonlinear, base, targets=("probs",))
    for i in range(len(base)):
        out = CachedTargets(base, cache, _seeded(make, i))[i]
        with torch.no_grad():
            torch.testing.assert_close(out["teacher_logits"], linear(out["image"][None])[0],
                                       atol=1e-5, rtol=1e-5)
        out = CachedTargets(base, cache_p, _seeded(make, i))[i]
        diff = (out["teacher_probs"].float() - nonlinear.predict(out["image"][None])["probs"][0])
        assert diff.abs().mean() < 1e-3 and diff.abs().max() < 1e-2


def test_conv_teacher_differs_only_at_crop_borders():
    """A conv teacher sees context beyond a crop's border when run on the full image, so the
    cached target differs from the teacher run on the crop — but only within its receptive
    field of the border (here 2 px for two 3x3 convs); inside, it is exact up to fp16.
    Measured (random-init 2-layer net, smooth images): max |diff| of the probabilities in that
    2-px band 0.013-0.016 (zero padding vs real context); interior 6e-5 (fp16 rounding)."""
    data = _data_transforms()
    base = ImageSet()
    teacher = DeepEnsemble([conv_net(seed=s).eval() for s in range(3)], vectorize=False)
    cache = TeacherCache(teacher, base, targets=("probs",))

    def make(g):
        return data.RandomCrop((16, 32), generator=g)

    worst_border = 0.0
    for i in range(len(base)):
        out = CachedTargets(base, cache, _seeded(make, i))[i]
        diff = (out["teacher_probs"].float() - teacher.predict(out["image"][None])["probs"][0])
        diff = diff.abs().amax(0)
        assert diff[2:-2, 2:-2].max() < 2e-3
        worst_border = max(worst_border, diff.max().item())
    assert worst_border > 5e-3  # the border effect is real: worth teaching
