"""Joint transforms: one set of random parameters for every per-pixel key, the right
interpolation and padding per key, replayable with a generator, errors for bad input."""

import pytest
import torch

from minikd.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ColorJitter,
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    eval_transforms,
    train_transforms,
)

H, W, C = 24, 40, 5


def make_sample(seed: int = 0) -> dict:
    """A sample whose maps encode the pixel position, so that alignment can be checked."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(H * W, dtype=torch.float32).reshape(H, W)
    mask = torch.randint(0, 3, (H, W), generator=g) * 4  # labels {0, 4, 8}
    mask[:3, :5] = 255
    return {
        "image": torch.stack([pos / (H * W), torch.rand(H, W, generator=g), pos * 0 + 0.5]),
        "mask": mask,
        "depth": mask.float() + 1.0,  # nearest like the mask: depth == mask + 1 everywhere
        "ood_mask": mask == 8,
        "teacher_probs": torch.softmax(torch.randn(C, H, W, generator=g), 0).half(),
        "teacher_unc": pos / (H * W),  # bilinear like image[0]
        "teacher_pred": mask.clone(),  # an extra integer map: nearest
        "index": 7,
        "stats": torch.arange(5.0),  # not per-pixel: passes through
    }


def check_aligned(s: dict) -> None:
    hw = s["image"].shape[-2:]
    for key in ("mask", "depth", "ood_mask", "teacher_pred", "teacher_unc"):
        assert s[key].shape[-2:] == hw, key
    assert s["teacher_probs"].shape == (C, *hw) and s["teacher_probs"].dtype == torch.float16
    valid = s["mask"] != 255
    assert torch.equal(s["depth"][valid], s["mask"][valid].float() + 1)
    assert torch.equal(s["ood_mask"], s["mask"] == 8)
    assert torch.equal(s["teacher_pred"][valid], s["mask"][valid])
    torch.testing.assert_close(s["teacher_unc"], s["image"][0])
    assert s["index"] == 7 and torch.equal(s["stats"], torch.arange(5.0))


@pytest.mark.parametrize("seed", range(4))
def test_random_scale_keeps_labels_and_depth_values(seed):
    s = make_sample()
    out = RandomScale(0.5, 2.0)(s, generator=torch.Generator().manual_seed(seed))
    assert out["image"].shape[-2:] != (H, W)
    assert set(out["mask"].unique().tolist()) <= {0, 4, 8, 255}  # nearest: no new labels
    assert set(out["depth"].unique().tolist()) <= {1.0, 5.0, 9.0, 256.0}  # not rescaled
    check_aligned(out)
    probs = out["teacher_probs"].float().sum(0)
    torch.testing.assert_close(probs, torch.ones_like(probs), atol=1e-2, rtol=0)


def test_random_crop_pads_with_ignore_and_zero():
    s = make_sample()
    out = RandomCrop((H + 10, W + 6))(s, generator=torch.Generator().manual_seed(0))
    assert out["image"].shape == (3, H + 10, W + 6)
    assert (out["mask"][H:] == 255).all() and (out["mask"][:, W:] == 255).all()
    assert (out["depth"][H:] == 0).all() and (out["ood_mask"][H:] == 0).all()
    assert (out["image"][:, H:] == 0).all() and (out["teacher_probs"][:, H:] == 0).all()
    assert torch.equal(out["mask"][:H, :W], s["mask"])  # pad bottom/right, then crop
    # the validity map marks the padding (issue 9): True on the image, False on padding
    assert out["valid"].dtype == torch.bool and out["valid"][:H, :W].all()
    assert not out["valid"][H:].any() and not out["valid"][:, W:].any()
    assert "valid" not in s  # the input sample is not modified
    small = RandomCrop(8)(s, generator=torch.Generator().manual_seed(1))
    assert small["mask"].shape == (8, 8)
    check_aligned(small)


def test_flip_twice_is_identity_and_depth_unchanged():
    s = make_sample()
    flip = RandomHorizontalFlip(p=1.0)
    once = flip(s)
    assert torch.equal(once["mask"], s["mask"].flip(-1))
    twice = flip(once)
    for key in ("image", "mask", "depth", "ood_mask", "teacher_probs", "teacher_unc"):
        assert torch.equal(twice[key], s[key]), key
    assert torch.equal(RandomHorizontalFlip(p=0.0)(s)["image"], s["image"])


def test_full_pipeline_same_params_for_every_key_and_replayable():
    t = Compose([RandomScale(0.5, 2.0), RandomCrop((16, 24)), RandomHorizontalFlip()])
    for seed in range(5):
        a = t(make_sample(), generator=torch.Generator().manual_seed(seed))
        b = t(make_sample(), generator=torch.Generator().manual_seed(seed))
        check_aligned(a)
        for key in a:
            if torch.is_tensor(a[key]):
                assert torch.equal(a[key], b[key]), key
    g = torch.Generator().manual_seed(0)  # generator given to the constructor
    c = RandomScale(generator=g)(make_sample())
    d = RandomScale()(make_sample(), generator=torch.Generator().manual_seed(0))
    assert c["image"].shape == d["image"].shape


def test_color_jitter_and_normalize_touch_only_the_image():
    s = make_sample()
    out = ColorJitter(0.4, 0.4, 0.4, 0.1)(s, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(out["image"], s["image"])
    assert 0 <= out["image"].min() and out["image"].max() <= 1
    for key in ("mask", "depth", "teacher_probs"):
        assert out[key] is s[key]
    n = Normalize()(s)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(n["image"], (s["image"] - mean) / std)
    assert n["mask"] is s["mask"]


def test_presets():
    out = train_transforms((16, 32))(make_sample(), generator=torch.Generator().manual_seed(2))
    assert out["image"].shape == (3, 16, 32) and out["mask"].dtype == torch.int64
    assert out["valid"].shape == (16, 32)  # every training sample carries the validity map
    assert out["image"].min() < 0  # normalised
    ev = eval_transforms()(make_sample())
    assert ev["image"].shape == (3, H, W)
    assert torch.equal(eval_transforms(normalize=False)(make_sample())["image"],
                       make_sample()["image"])


@pytest.mark.parametrize("make", [
    lambda: RandomScale(0, 2), lambda: RandomScale(2.0, 1.0), lambda: RandomCrop((0, 4)),
    lambda: RandomCrop((4, 4, 4)), lambda: RandomHorizontalFlip(1.5), lambda: ColorJitter(-0.1),
    lambda: ColorJitter(hue=0.7), lambda: Normalize(std=(0.0, 1.0, 1.0)),
    lambda: Normalize(mean=(0.5,)), lambda: Compose([3]),
])
def test_bad_parameters_raise(make):
    with pytest.raises(ValueError):
        make()


def test_bad_samples_raise():
    s = make_sample()
    with pytest.raises(ValueError, match="mask"):
        RandomHorizontalFlip(1.0)({**s, "mask": s["mask"][:-1]})
    with pytest.raises(ValueError, match="image"):
        RandomScale()({"mask": s["mask"]})
    with pytest.raises(ValueError, match="image"):
        RandomCrop(8)({**s, "image": s["image"][0]})
    with pytest.raises(TypeError):
        Normalize()([s["image"]])
