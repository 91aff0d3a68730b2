"""Notebook 02's library parts: the family's shrunk names (``M128/4``), the paper's six classes
(``data.unet_kd_class_map``, ``Relabel``, ``unet_kd_sets``) and a teacher merged to them
(``models.MergedClasses``), checked against a plain loop."""

import pytest
import torch

from minikd import data, models

TOY_MAP = data.unet_kd_class_map(data.ToyCity.TO_CITYSCAPES, data.ToyCity.NUM_CLASSES)


def test_class_map_follows_table_1():
    names = dict(zip(data.ToyCity.CLASSES, TOY_MAP))
    assert names["road"] == 1 and names["sidewalk"] == 2 and names["car"] == 3
    assert names["traffic sign"] == 4 and names["person"] == 5
    assert names["truck"] == names["rider"] == names["sky"] == 0  # background, as in Table I
    assert data.unet_kd_class_map()[:3] == [1, 2, 0]  # Cityscapes trainIds directly


def test_merged_classes_sums_probabilities_like_a_loop():
    torch.manual_seed(0)
    model = models.unet_family("M128/4", 17).eval()
    merged = models.MergedClasses(model, TOY_MAP)
    x = torch.rand(2, 3, 32, 64)
    with torch.no_grad():
        p = model(x).softmax(1)
        q = merged(x).softmax(1)
    assert q.shape == (2, 6, 32, 64) and merged.num_classes == 6
    for k in range(6):  # the oracle: sum the member classes' probabilities one by one
        expected = sum(p[:, c] for c in range(17) if TOY_MAP[c] == k)
        torch.testing.assert_close(q[:, k], expected, atol=1e-6, rtol=1e-5)


def test_merged_classes_is_stable_for_large_logits():
    merged = models.MergedClasses(lambda_module(lambda x: x * 1e4), [0, 0, 1])
    out = merged(torch.tensor([[[[1.0]], [[2.0]], [[-3.0]]]]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.softmax(1).flatten(), torch.tensor([1.0, 0.0]))


def lambda_module(fn):
    class Fn(torch.nn.Module):
        def forward(self, x):
            return fn(x)
    return Fn()


def test_merged_classes_rejects_bad_maps():
    with pytest.raises(ValueError, match="missing: \\[1\\]"):
        models.MergedClasses(lambda_module(lambda x: x), [0, 2, 2])
    merged = models.MergedClasses(lambda_module(lambda x: x), [0, 1])
    with pytest.raises(ValueError, match="gave 3 classes; class_map has 2"):
        merged(torch.zeros(1, 3, 4, 4))


def test_relabel_maps_void_to_background():
    sample = {"mask": torch.tensor([[0, 1, 13, 255]])}
    out = data.Relabel(TOY_MAP)(sample)
    assert out["mask"].tolist() == [[1, 2, 3, 0]]


def test_unet_kd_sets_quick_are_relabelled_and_held_out():
    sets = data.unet_kd_sets("quick", (32, 64), n_train=3, n_search=2, n_test=2,
                             train_transform=data.RandomHorizontalFlip(1.0))
    assert {k: len(v) for k, v in sets.items()} == {"train": 3, "train_aug": 3, "search": 2,
                                                   "test": 2}
    for s in sets.values():
        assert int(s[0]["mask"].max()) <= 5
    torch.testing.assert_close(sets["train_aug"][0]["image"], sets["train"][0]["image"].flip(-1))
    assert not torch.equal(sets["test"][0]["image"], sets["search"][0]["image"])
    with pytest.raises(ValueError, match="needs n_train and n_test"):
        data.unet_kd_sets("quick", (32, 64))
    with pytest.raises(ValueError, match="mode"):
        data.unet_kd_sets("fast", (32, 64), n_train=1, n_test=1)


@pytest.mark.parametrize("name, depth, bridge", [("M128/4", 3, 32), ("M1024/4", 6, 256),
                                                 ("M256", 4, 256), ("M512/2", 5, 256)])
def test_shrunk_family_names(name, depth, bridge):
    net = models.unet_family(name, 6)
    assert (net.output_stride, net.bridge[0].out_channels) == (2**depth, bridge)


def test_shrunk_family_names_reject_nonsense():
    with pytest.raises(ValueError, match="'/d'"):
        models.unet_family("M128/x", 6)
    with pytest.raises(ValueError, match="not a multiple"):
        models.unet_family("M128/32", 6)
    with pytest.raises(ValueError, match="unknown U-Net name"):
        models.unet_family("tiny", 6)
