"""StructuredKDLoss (notebook 06): each term equals the library's own function, switched by its
weight; padding carries no feature or adversarial target; the discriminator state round-trips."""
import pytest
import torch

from minikd import data, ensembles, losses, models


def _batch(b=2, c=5, h=8, w=16, cf=3, seed=0, valid=None):
    g = torch.Generator().manual_seed(seed)
    batch = {"image": torch.rand(b, 3, h, w, generator=g),
             "mask": torch.randint(0, c, (b, h, w), generator=g),
             "teacher_logits": 3 * torch.randn(b, c, h, w, generator=g),
             "teacher_features": torch.randn(b, cf + 2, h, w, generator=g)}
    if valid is not None:
        batch["valid"] = valid
    outputs = {"logits": torch.randn(b, c, h, w, generator=g, requires_grad=True),
               "features": torch.randn(b, cf, h, w, generator=g, requires_grad=True)}
    return outputs, batch


def test_without_extra_terms_it_is_pixelwise_kd():
    outputs, batch = _batch()
    total, terms = losses.StructuredKDLoss(2.0, lam_pi=0.5)(outputs, batch)
    ref, _ = losses.DistillationLoss(2.0, lam=0.5)(outputs["logits"], batch)
    assert torch.allclose(total, ref) and set(terms) == {"ce", "kd"}


def test_each_extra_term_is_the_library_function_times_its_weight():
    outputs, batch = _batch()
    pixel, _ = losses.DistillationLoss(1.0, lam=1.0)(outputs["logits"], batch)
    pa = losses.skd_pairwise_loss(outputs["features"], batch["teacher_features"])
    ifv = losses.ifvd_loss(outputs["features"], batch["teacher_features"], batch["mask"], 5)
    total, terms = losses.StructuredKDLoss(lam_pa=0.3, lam_ifv=7.0)(outputs, batch)
    assert torch.allclose(total, pixel + 0.3 * pa + 7.0 * ifv, atol=1e-6)
    assert torch.allclose(terms["pa"], pa) and torch.allclose(terms["ifv"], ifv)


def test_holistic_term_updates_its_discriminator_and_round_trips():
    torch.manual_seed(0)
    outputs, batch = _batch(h=16, w=32)
    loss = losses.StructuredKDLoss(lam_ho=0.1)
    assert loss.state_dict() == {}
    total, terms = loss(outputs, batch)
    total.backward()
    assert "ho" in terms and outputs["logits"].grad is not None
    state = loss.state_dict()
    fresh = losses.StructuredKDLoss(lam_ho=0.1)
    fresh.load_state_dict(state)
    for a, b in zip(fresh.holistic.discriminator.parameters(),
                    loss.holistic.discriminator.parameters()):
        assert torch.equal(a, b)


def test_padding_gives_no_feature_gradient():
    valid = torch.ones(2, 8, 16, dtype=torch.bool)
    valid[:, :, 12:] = False  # the right quarter is crop padding
    outputs, batch = _batch(valid=valid)
    total, _ = losses.StructuredKDLoss(lam_pa=1.0, lam_ifv=1.0)(outputs, batch)
    total.backward()
    grad = outputs["features"].grad
    assert grad[..., 12:].abs().max() == 0 and grad[..., :12].abs().max() > 0
    # features at 1/4 of the input (PSPNet's are at 1/8): the map is resized to them
    outputs, batch = _batch(valid=valid)
    small = {k: torch.nn.functional.avg_pool2d(v.detach(), 4).requires_grad_()
             for k, v in (("features", outputs["features"]),)}
    batch["teacher_features"] = torch.nn.functional.avg_pool2d(batch["teacher_features"], 4)
    total, _ = losses.StructuredKDLoss(lam_pa=1.0)({**outputs, **small}, batch)
    total.backward()
    assert small["features"].grad[..., 3:].abs().max() == 0


def test_feature_terms_need_a_features_output():
    outputs, batch = _batch()
    with pytest.raises(ValueError, match="WithFeatures"):
        losses.StructuredKDLoss(lam_pa=1.0)(outputs["logits"], batch)
    with pytest.raises(ValueError, match=">= 0"):
        losses.StructuredKDLoss(lam_ho=-1.0)


def test_teacher_cache_stores_features_of_a_withfeatures_teacher():
    torch.manual_seed(0)
    teacher = models.WithFeatures(models.unet_family("M128/4", num_classes=17)).eval()
    images = data.ToyCity(3, size=(32, 64), split="train", seed=5)
    cache = ensembles.TeacherCache(teacher, images, targets=("logits", "features"), batch_size=2,
                                   dtype=torch.float32)
    sample = ensembles.CachedTargets(images, cache)[1]
    with torch.no_grad():
        out = teacher(sample["image"][None])
    assert torch.allclose(sample["teacher_features"], out["features"][0], atol=1e-5)
    assert torch.allclose(sample["teacher_logits"], out["logits"][0], atol=1e-5)
