"""The validity map "valid" (issue 9): RandomCrop marks its padding, the transforms carry the map
without changing anything else, and every distillation loss object ignores the padded pixels of
its teacher targets (zero-padded teacher logits would otherwise be a uniform target)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from minikd import data
from minikd import losses as L
from minikd.data import (
    IGNORE_INDEX,
    ColorJitter,
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    ToyCity,
    Unlabelled,
    train_transforms,
)
from minikd.ensembles import CachedTargets, TeacherCache

H, W, C = 24, 40, 5


def make_sample(seed: int = 0) -> dict:
    """A sample with every kind of per-pixel key, cached teacher targets among them."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, 3, (H, W), generator=g) * 4
    mask[:3, :5] = 255
    return {
        "image": torch.rand(3, H, W, generator=g),
        "mask": mask,
        "depth": torch.rand(H, W, generator=g) * 50 + 1,
        "ood_mask": mask == 8,
        "teacher_logits": (torch.randn(C, H, W, generator=g) * 3).half(),
        "teacher_probs": torch.softmax(torch.randn(C, H, W, generator=g), 0).half(),
        "teacher_unc": torch.rand(H, W, generator=g),
        "teacher_depth_var": torch.rand(H, W, generator=g),
        "index": 3,
    }


class _OldRandomCrop(RandomCrop):
    """RandomCrop.__call__ exactly as it was before the validity map existed (issue 9)."""

    def __call__(self, sample, generator=None):
        rules = data._per_pixel_rules(sample)
        (h, w), (H_, W_) = self.size, sample["image"].shape[-2:]
        ph, pw = max(H_, h), max(W_, w)
        g = generator or self.generator
        top = int(torch.randint(0, ph - h + 1, (), generator=g))
        left = int(torch.randint(0, pw - w + 1, (), generator=g))
        out = dict(sample)
        for key, (_, pad) in rules.items():
            t = sample[key]
            if (ph, pw) != (H_, W_):
                padded = torch.full((*t.shape[:-2], ph, pw), pad, dtype=t.dtype)
                padded[..., :H_, :W_] = t
                t = padded
            out[key] = t[..., top:top + h, left:left + w].contiguous()
        return out


def _old_train_transforms(crop_size, scale=(0.5, 2.0), flip_p=0.5):
    return Compose([RandomScale(*scale), _OldRandomCrop(crop_size), RandomHorizontalFlip(flip_p),
                    ColorJitter(), Normalize()])


# ----------------------------------------------------------------------------- the transforms


def test_valid_is_false_exactly_on_the_padding():
    s = make_sample()
    assert "valid" not in s
    t = Compose([RandomScale(0.5, 0.5), RandomCrop((H, W))])  # 12x20 image, padded to 24x40
    out = t(s, generator=torch.Generator().manual_seed(0))
    expected = torch.zeros(H, W, dtype=torch.bool)
    expected[:H // 2, :W // 2] = True  # padding is added at the bottom and the right
    assert out["valid"].dtype == torch.bool and torch.equal(out["valid"], expected)
    assert (out["mask"][~expected] == IGNORE_INDEX).all() and (out["depth"][~expected] == 0).all()
    assert (out["teacher_logits"][:, ~expected] == 0).all()  # the zeros "valid" warns about
    # no padding: all True; a crop inside the image leaves the other keys as plain slices
    inside = RandomCrop((8, 8))(s, generator=torch.Generator().manual_seed(1))
    assert inside["valid"].shape == (8, 8) and bool(inside["valid"].all())


def test_valid_survives_flip_scale_and_a_second_crop():
    s = make_sample()
    expected = torch.zeros(H, W, dtype=torch.bool)
    expected[:H // 2, :W // 2] = True
    flipped = Compose([RandomScale(0.5, 0.5), RandomCrop((H, W)), RandomHorizontalFlip(1.0)])(s)
    assert torch.equal(flipped["valid"], expected.flip(-1))
    assert (flipped["mask"][~flipped["valid"]] == IGNORE_INDEX).all()
    assert (flipped["teacher_probs"][:, ~flipped["valid"]] == 0).all()
    assert (flipped["teacher_probs"].float().sum(0)[flipped["valid"]] > 0.99).all()
    # crop 24x40 -> 30x50 (6 rows, 10 columns of padding), then scale x2: nearest, no blur
    scaled = Compose([RandomCrop((30, 50)), RandomScale(2.0, 2.0)])(s)
    want = torch.zeros(60, 100, dtype=torch.bool)
    want[:2 * H, :2 * W] = True
    assert scaled["valid"].dtype == torch.bool and torch.equal(scaled["valid"], want)
    # an incoming "valid" is cropped and padded like every other map, not replaced
    twice = RandomCrop((40, 60))(flipped, generator=torch.Generator().manual_seed(0))
    want = torch.zeros(40, 60, dtype=torch.bool)
    want[:H, :W] = expected.flip(-1)
    assert torch.equal(twice["valid"], want)


def test_bad_valid_in_a_sample_raises():
    s = make_sample()
    with pytest.raises(ValueError, match="valid"):
        RandomCrop(8)({**s, "valid": torch.ones(H, W)})  # float, not bool
    with pytest.raises(ValueError, match="valid"):
        RandomHorizontalFlip(1.0)({**s, "valid": torch.ones(H, W - 1, dtype=torch.bool)})


@pytest.mark.parametrize("crop", [(16, 32), (40, 64)])
def test_same_random_numbers_and_bit_identical_keys_as_before(crop):
    """The model zoo trains with these transforms: only "valid" may be new."""
    for seed in range(4):
        g_new, g_old = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        new = train_transforms(crop)(make_sample(seed), generator=g_new)
        old = _old_train_transforms(crop)(make_sample(seed), generator=g_old)
        assert set(new) == set(old) | {"valid"}
        for key, value in old.items():
            if torch.is_tensor(value):
                assert value.dtype == new[key].dtype and torch.equal(value, new[key]), key
            else:
                assert value == new[key], key
        assert torch.equal(g_new.get_state(), g_old.get_state())  # same numbers drawn
    # the global generator (no generator passed, as in a DataLoader) too
    torch.manual_seed(5)
    new = train_transforms(crop)(make_sample())
    after_new = torch.rand(())
    torch.manual_seed(5)
    old = _old_train_transforms(crop)(make_sample())
    assert torch.equal(after_new, torch.rand(()))
    assert all(torch.equal(v, new[k]) for k, v in old.items() if torch.is_tensor(v))


def test_toycity_batch_bit_identical_and_share_of_padding():
    ds = ToyCity(24, (64, 128), ood=True)
    torch.manual_seed(0)
    new = [train_transforms((64, 128))(ds[i]) for i in range(len(ds))]
    torch.manual_seed(0)
    old = [_old_train_transforms((64, 128))(ds[i]) for i in range(len(ds))]
    for a, b in zip(new, old, strict=True):
        assert all(torch.equal(v, a[k]) for k, v in b.items() if torch.is_tensor(v))
    batch = default_collate(new)
    valid = batch["valid"]
    assert valid.shape == (24, 64, 128) and valid.dtype == torch.bool
    share = float((~valid).float().mean())
    print(f"share of padded (invalid) pixels in a train_transforms((64, 128)) batch: {share:.1%}")
    assert 0.05 < share < 0.35  # the issue measured 16.9 % (E = 13.9 % for scale U(0.5, 2))
    pad = ~valid
    assert (batch["mask"][pad] == IGNORE_INDEX).all() and (batch["depth"][pad] == 0).all()


def test_cached_targets_through_train_transforms_carry_valid():
    ds = ToyCity(4, (32, 64))
    torch.manual_seed(0)
    teacher = torch.nn.Conv2d(3, ToyCity.NUM_CLASSES, 1)
    cache = TeacherCache(teacher, ds, targets=("logits", "probs"))
    torch.manual_seed(1)
    train = CachedTargets(ds, cache, train_transforms((40, 80), scale=(0.5, 0.8)))
    batch = default_collate([train[i] for i in range(len(train))])
    assert batch["valid"].shape == (4, 40, 80) and batch["valid"].dtype == torch.bool
    pad = ~batch["valid"]
    assert pad.any() and (batch["teacher_logits"].permute(0, 2, 3, 1)[pad] == 0).all()
    student = torch.randn(4, ToyCity.NUM_CLASSES, 40, 80, generator=torch.Generator().manual_seed(2))
    _, terms = L.DistillationLoss(2.0, lam=1.0)(student, batch)
    teacher = batch["teacher_logits"]
    assert terms["kd"].item() == pytest.approx(L.kd_loss(student, teacher, 2.0, pad).item(),
                                               rel=1e-6)
    assert CachedTargets(ds, cache)[0].keys() == {"image", "mask", "depth", "index",
                                                  "teacher_logits", "teacher_probs"}


# ----------------------------------------------------------------------------- the losses

B, K, h, w = 2, 4, 6, 8


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _valid():
    valid = torch.ones(B, h, w, dtype=torch.bool)
    valid[0, 4:, :] = False  # bottom padding
    valid[1, :, 5:] = False  # right padding
    return valid


def _batch(seed=0):
    """A collated batch as the training transforms give it: padding 0 in every teacher map."""
    g = _gen(seed)
    valid = _valid()
    pad = ~valid
    labels = torch.randint(0, K, (B, h, w), generator=g)
    labels[0, 0, :2] = IGNORE_INDEX  # some void inside the image
    logits_t = torch.randn(B, K, h, w, generator=g) * 3
    var_t = torch.rand(B, h, w, generator=g)
    unc_t = torch.rand(B, h, w, generator=g)
    class_unc_t = torch.rand(B, K, h, w, generator=g)
    depth = torch.rand(B, h, w, generator=g) * 20 + 1
    return {
        "mask": labels.masked_fill(pad, IGNORE_INDEX),
        "depth": depth.masked_fill(pad, 0.0),
        "teacher_logits": logits_t.masked_fill(pad[:, None], 0.0),
        "teacher_probs": logits_t.softmax(1).masked_fill(pad[:, None], 0.0),
        "teacher_depth_var": var_t.masked_fill(pad, 0.0),
        "teacher_unc": unc_t.masked_fill(pad, 0.0),
        "teacher_class_unc": class_unc_t.masked_fill(pad[:, None], 0.0),
        "valid": valid,
    }


def _outputs(seed=1):
    g = _gen(seed)
    logits = torch.randn(B, K, h, w, generator=g) * 2
    return {
        "logits": logits,
        "uncertainty": torch.rand(B, h, w, generator=g),
        "class_uncertainty": torch.rand(B, K, h, w, generator=g),
        "depth": torch.rand(B, h, w, generator=g) * 20 + 1,
        "depth_var": torch.rand(B, h, w, generator=g) + 0.1,
    }


def _scramble(batch, keys, seed=7):
    """The same batch with arbitrary values on the padded pixels of the teacher maps ``keys``."""
    g, pad, out = _gen(seed), ~batch["valid"], dict(batch)
    for key in keys:
        t = batch[key]
        m = pad[:, None].expand_as(t) if t.ndim == 4 else pad
        noise = torch.rand(t.shape, generator=g) * 10
        if key == "teacher_probs":  # sums to 1, so the old "sum < 0.5" rule would not catch it
            noise = torch.randn(t.shape, generator=g).mul(5).softmax(1)
        out[key] = torch.where(m, noise, t)
    return out


def _ce(logits, labels):
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("mask_void", [False, True])
def test_distillation_loss_logits_path_ignores_padding(mask_void):
    batch, out = _batch(), _outputs()
    s, pad = out["logits"], ~batch["valid"]
    fn = L.DistillationLoss(3.0, lam=0.5, mask_void=mask_void)
    loss, terms = fn(s, {k: batch[k] for k in ("mask", "teacher_logits", "valid")})
    ignore = pad | (batch["mask"] == IGNORE_INDEX) if mask_void else pad
    kd = L.kd_loss(s, batch["teacher_logits"], 3.0, ignore_mask=ignore)
    ce = _ce(s, batch["mask"])
    assert terms["kd"].item() == pytest.approx(kd.item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert loss.item() == pytest.approx((ce + 0.5 * kd).item(), rel=1e-6)
    if not mask_void:  # the old code kept the padding: KD towards a uniform target there
        old = L.kd_loss(s, batch["teacher_logits"], 3.0)
        assert terms["kd"].item() != pytest.approx(old.item(), rel=1e-3)
    scrambled = _scramble(batch, ["teacher_logits"])
    _, again = fn(s, {k: scrambled[k] for k in ("mask", "teacher_logits", "valid")})
    assert again["kd"].item() == pytest.approx(terms["kd"].item(), rel=1e-6)


def test_distillation_loss_probs_path_ignores_padding():
    batch, out = _batch(), _outputs()
    s, pad = out["logits"], ~batch["valid"]
    fn = L.DistillationLoss(2.0, alpha=0.3)
    keys = ("mask", "teacher_probs", "valid")
    loss, terms = fn(s, {k: batch[k] for k in keys})
    kd = L.kd_loss(s, batch["teacher_probs"].clamp_min(1e-8).log(), 2.0, ignore_mask=pad)
    assert terms["kd"].item() == pytest.approx(kd.item(), rel=1e-6)
    assert loss.item() == pytest.approx((0.3 * _ce(s, batch["mask"]) + 0.7 * kd).item(), rel=1e-6)
    scrambled = _scramble(batch, ["teacher_probs"])  # padded pixels now sum to 1
    _, again = fn(s, {k: scrambled[k] for k in keys})
    assert again["kd"].item() == pytest.approx(terms["kd"].item(), rel=1e-6)


def test_dudes_loss_ignores_padding():
    batch, out = _batch(), _outputs()
    keys = ("mask", "teacher_unc", "valid")
    loss, terms = L.DUDESLoss()(out, {k: batch[k] for k in keys})
    rmsle = L.rmsle_loss(out["uncertainty"], batch["teacher_unc"], batch["valid"])
    assert terms["rmsle"].item() == pytest.approx(rmsle.item(), rel=1e-6)
    assert loss.item() == pytest.approx((_ce(out["logits"], batch["mask"]) + rmsle).item(),
                                        rel=1e-6)
    assert terms["rmsle"].item() != pytest.approx(  # the old code: every pixel
        L.rmsle_loss(out["uncertainty"], batch["teacher_unc"]).item())
    scrambled = _scramble(batch, ["teacher_unc"])
    _, again = L.DUDESLoss()(out, {k: scrambled[k] for k in keys})
    assert again["rmsle"].item() == pytest.approx(terms["rmsle"].item(), rel=1e-6)


def test_class_wise_uncertainty_loss_ignores_padding():
    batch, out = _batch(), _outputs()
    fn = L.ClassWiseUncertaintyLoss(teacher_key="teacher_class_unc")
    keys = ("mask", "teacher_class_unc", "valid")
    loss, terms = fn(out, {k: batch[k] for k in keys})
    keep = batch["valid"][:, None].expand(B, K, h, w)
    rmsle = L.rmsle_loss(out["class_uncertainty"], batch["teacher_class_unc"], keep)
    assert terms["rmsle"].item() == pytest.approx(rmsle.item(), rel=1e-6)
    assert loss.item() == pytest.approx((_ce(out["logits"], batch["mask"]) + rmsle).item(),
                                        rel=1e-6)
    scrambled = _scramble(batch, ["teacher_class_unc"])
    _, again = fn(out, {k: scrambled[k] for k in keys})
    assert again["rmsle"].item() == pytest.approx(terms["rmsle"].item(), rel=1e-6)


def test_emuformer_loss_ignores_padding_in_kl_and_rmsle():
    batch, out = _batch(), _outputs()
    keys = ("mask", "depth", "teacher_probs", "teacher_depth_var", "valid")
    loss, terms = L.EMUFormerLoss()(out, {k: batch[k] for k in keys})
    valid = batch["valid"]
    kl = L.ensemble_kl_loss(out["logits"], batch["teacher_probs"], ~valid)
    rmsle = L.rmsle_loss(out["depth_var"], batch["teacher_depth_var"], valid)
    gnll = L.depth_gnll_loss(out["depth"], out["depth_var"], batch["depth"])
    ce = _ce(out["logits"], batch["mask"])
    for name, value in (("kl", kl), ("rmsle", rmsle), ("gnll", gnll), ("ce", ce)):
        assert terms[name].item() == pytest.approx(value.item(), rel=1e-6), name
    assert loss.item() == pytest.approx((ce + gnll + 10 * kl + rmsle).item(), rel=1e-6)
    scrambled = _scramble(batch, ["teacher_probs", "teacher_depth_var"])
    _, again = L.EMUFormerLoss()(out, {k: scrambled[k] for k in keys})
    for name in ("kl", "rmsle"):
        assert again[name].item() == pytest.approx(terms[name].item(), rel=1e-6), name


def test_without_valid_every_loss_behaves_as_before():
    batch, out = _batch(), _outputs()
    old = {k: v for k, v in batch.items() if k != "valid"}
    s = out["logits"]
    _, t = L.DistillationLoss(3.0, lam=1.0)(s, {k: old[k] for k in ("mask", "teacher_logits")})
    assert torch.equal(t["kd"], L.kd_loss(s, old["teacher_logits"], 3.0).detach())  # no mask
    _, t = L.DistillationLoss(3.0, lam=1.0)(s, {k: old[k] for k in ("mask", "teacher_probs")})
    zero = old["teacher_probs"].sum(1) < 0.5  # the padding, found by the old rule
    assert torch.equal(zero, ~batch["valid"])
    assert torch.equal(t["kd"], L.kd_loss(s, old["teacher_probs"].clamp_min(1e-8).log(), 3.0,
                                          zero).detach())
    _, t = L.DUDESLoss()(out, old)
    assert torch.equal(t["rmsle"], L.rmsle_loss(out["uncertainty"], old["teacher_unc"]))
    _, t = L.ClassWiseUncertaintyLoss(teacher_key="teacher_class_unc")(out, old)
    assert torch.equal(t["rmsle"], L.rmsle_loss(out["class_uncertainty"],
                                                old["teacher_class_unc"]).detach())
    total, t = L.EMUFormerLoss()(out, old)
    ref_total, ref = L.emuformer_loss(s, out["depth"], out["depth_var"], old["mask"],
                                      old["depth"], old["teacher_probs"],
                                      old["teacher_depth_var"], kl_ignore_mask=zero)
    assert torch.equal(total, ref_total) and all(torch.equal(t[k], ref[k]) for k in ref)


def test_a_bad_valid_in_the_batch_raises():
    batch, out = _batch(), _outputs()
    for bad in (batch["valid"].float(), batch["valid"][:, :-1]):
        with pytest.raises(ValueError, match="valid"):
            L.DistillationLoss(1.0, lam=1.0)(out["logits"], {**batch, "valid": bad})
        with pytest.raises(ValueError, match="valid"):
            L.DUDESLoss()(out, {**batch, "valid": bad})


# ----------------------------------------------------------------------------- Unlabelled


def test_unlabelled_removes_every_label():
    ds = ToyCity(3, (32, 64), ood=True)
    un = Unlabelled(ds)
    assert len(un) == 3 and "Unlabelled(ToyCity(n=3" in repr(un) and "Unlabelled" in data.__all__
    item, ref = un[1], ds[1]
    assert item.keys() == ref.keys()
    assert item["mask"].dtype == torch.int64 and (item["mask"] == IGNORE_INDEX).all()
    assert item["depth"].dtype == torch.float32 and (item["depth"] == 0).all()
    assert torch.equal(item["image"], ref["image"]) and item["index"] == 1
    assert torch.equal(item["ood_mask"], ref["ood_mask"])
    assert (ref["mask"] != IGNORE_INDEX).any()  # the wrapped set itself is untouched
    image_only = Unlabelled([{"image": torch.zeros(3, 4, 5)}])[0]
    assert image_only["mask"].shape == (4, 5) and (image_only["mask"] == IGNORE_INDEX).all()


def test_unlabelled_rejects_bad_arguments():
    for bad in (5, iter([{"image": torch.zeros(3, 2, 2)}]), None):
        with pytest.raises(ValueError, match="__len__"):
            Unlabelled(bad)
    with pytest.raises(TypeError, match="dict"):
        Unlabelled([torch.zeros(3, 2, 2)])[0]


def test_unlabelled_distillation_trains_on_teacher_targets_only():
    ds = ToyCity(4, (32, 64))
    torch.manual_seed(0)
    cache = TeacherCache(torch.nn.Conv2d(3, ToyCity.NUM_CLASSES, 1), ds, targets=("logits",))
    torch.manual_seed(1)
    train = CachedTargets(Unlabelled(ds), cache, train_transforms((40, 80), scale=(0.5, 0.8)))
    batch = default_collate([train[i] for i in range(len(train))])
    assert (batch["mask"] == IGNORE_INDEX).all() and (batch["depth"] == 0).all()
    student = torch.randn(4, ToyCity.NUM_CLASSES, 40, 80, generator=_gen(2), requires_grad=True)
    loss, terms = L.DistillationLoss(1.0, lam=1.0)(student, batch)
    assert terms["ce"].item() == 0.0 and terms["kd"].item() > 0
    loss.backward()
    grad_norm = student.grad.norm(dim=1)
    assert (grad_norm[~batch["valid"]] == 0).all() and (grad_norm[batch["valid"]] > 0).all()
