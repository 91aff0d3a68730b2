"""data.dudes_sets (notebook 03's data), data.Transformed and data.VoidAsUnknown."""
import pytest
import torch

from minikd import data


def test_quick_sets_are_the_members_training_images_and_a_held_out_seed():
    aug = data.train_transforms((24, 48), scale=(0.75, 1.5), color_jitter=False, normalize=False)
    train, train_aug, val, ood = data.dudes_sets("quick", (24, 48), 6, 4, 3, seed=7,
                                                 train_transform=aug)
    assert (len(train), len(train_aug), len(val), len(ood)) == (6, 6, 4, 3)
    # train: split "train", seed 0 -- the scenes the zoo's DUDES members were trained on
    zoo_train = data.ToyCity(6, (24, 48), split="train", seed=0)
    for i in range(6):
        torch.testing.assert_close(train[i]["image"], zoo_train[i]["image"])
    # val / ood: the held-out seed, not the zoo's validation seed 0
    assert not torch.equal(val[0]["image"], data.ToyCity(1, (24, 48), split="val", seed=0)[0]["image"])
    torch.testing.assert_close(val[0]["image"], data.ToyCity(1, (24, 48), split="val", seed=7)[0]["image"])
    assert "ood_mask" in ood[0] and bool(ood[0]["ood_mask"].any())
    # train_aug: the same image through the joint transform (labels stay labels, valid added)
    torch.manual_seed(0)
    sample = train_aug[2]
    assert sample["image"].shape == (3, 24, 48) and sample["valid"].dtype == torch.bool
    assert set(sample["mask"].unique().tolist()) <= set(range(17)) | {255}


def test_quick_sets_need_the_sizes_and_a_known_mode():
    with pytest.raises(ValueError, match="n_train, n_val and n_ood"):
        data.dudes_sets("quick", (24, 48), 6)
    with pytest.raises(ValueError, match="mode"):
        data.dudes_sets("fast", (24, 48), 6, 4, 3)


def test_transformed_applies_the_transform_on_top_and_checks_it():
    base = data.ToyCity(2, (16, 32))
    flip = data.RandomHorizontalFlip(p=1.0)
    wrapped = data.Transformed(base, flip)
    assert len(wrapped) == 2
    torch.testing.assert_close(wrapped[1]["image"], base[1]["image"].flip(-1))
    with pytest.raises(TypeError, match="callable"):
        data.Transformed(base, "flip")


def test_void_as_unknown_marks_exactly_the_void_pixels():
    mask = torch.tensor([[0, 255], [3, 255]])
    out = data.VoidAsUnknown()({"image": torch.zeros(3, 2, 2), "mask": mask})
    assert out["ood_mask"].tolist() == [[False, True], [False, True]]
