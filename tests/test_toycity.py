"""ToyCity: item format, determinism, splits, unknown objects, classes, depth, domains, errors."""

import numpy as np
import pytest
import torch

from minikd.data import ToyCity, colorize, get_mode, train_transforms

SMALL = (32, 64)
C = ToyCity.NUM_CLASSES
ID = {name: i for i, name in enumerate(ToyCity.CLASSES)}


@pytest.fixture(scope="module")
def sample_64():
    """40 source training items at 64x128 (rendered once for several tests)."""
    ds = ToyCity(40, size=(64, 128))
    return [ds[i] for i in range(len(ds))]


def test_class_attributes_are_consistent():
    assert len(ToyCity.CLASSES) == len(ToyCity.PALETTE) == C >= 12
    assert set(ToyCity.TO_CITYSCAPES) == set(range(C))
    assert len(set(ToyCity.TO_CITYSCAPES.values())) == C
    assert all(0 <= v <= 18 for v in ToyCity.TO_CITYSCAPES.values())
    assert ToyCity.TO_CITYSCAPES[ID["bicycle"]] == 18
    assert colorize(torch.tensor([[0, 255]])).shape == (1, 2, 3)


def test_item_format():
    ds = ToyCity(3, size=SMALL, split="val", domain="target")
    s = ds[2]
    assert set(s) == {"image", "mask", "depth", "index"} and s["index"] == 2
    assert s["image"].dtype == torch.float32 and s["image"].shape == (3, *SMALL)
    assert s["mask"].dtype == torch.int64 and s["mask"].shape == SMALL
    assert s["depth"].dtype == torch.float32 and s["depth"].shape == SMALL
    assert 0 <= s["image"].min() and s["image"].max() <= 1
    labels = set(s["mask"].unique().tolist())
    assert labels <= set(range(C)) | {255}
    assert len(ds) == 3 and "ToyCity(n=3" in repr(ds)


def test_deterministic_across_constructions():
    for kwargs in ({}, {"domain": "target"}, {"ood": True, "split": "test"}):
        a, b = ToyCity(4, SMALL, seed=3, **kwargs)[3], ToyCity(4, SMALL, seed=3, **kwargs)[3]
        for key in a:
            if torch.is_tensor(a[key]):
                assert torch.equal(a[key], b[key]), (kwargs, key)
    assert not torch.equal(ToyCity(1, SMALL, seed=0)[0]["image"],
                           ToyCity(1, SMALL, seed=1)[0]["image"])


def test_negative_index_and_range_errors():
    ds = ToyCity(2, SMALL)
    assert torch.equal(ds[-1]["image"], ds[1]["image"]) and ds[-1]["index"] == 1
    for bad in (2, -3, 100):
        with pytest.raises(IndexError, match="out of range"):
            ds[bad]


def test_splits_never_share_a_scene():
    images = {split: [ToyCity(12, SMALL, split=split)[i]["image"] for i in range(12)]
              for split in ("train", "val", "test")}
    keys = {split: {hash(im.numpy().tobytes()) for im in ims} for split, ims in images.items()}
    assert all(len(k) == 12 for k in keys.values())
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"]
    assert not keys["val"] & keys["test"]


def test_unknown_objects_only_with_ood_and_void():
    plain = ToyCity(8, SMALL)
    assert "ood_mask" not in plain[0]
    ood = ToyCity(8, SMALL, ood=True)
    seen = 0
    for i in range(8):
        s, p = ood[i], plain[i]
        m = s["ood_mask"]
        assert m.dtype == torch.bool and m.shape == SMALL
        assert (s["mask"][m] == 255).all()
        assert torch.equal(s["mask"][~m], p["mask"][~m])  # same scene, objects added
        seen += int(m.sum())
    assert seen > 0


def test_many_classes_appear(sample_64):
    present = set()
    for s in sample_64:
        present |= set(s["mask"].unique().tolist())
    present.discard(255)
    assert len(present) >= 14, [ToyCity.CLASSES[c] for c in sorted(present)]
    for name in ("road", "sidewalk", "building", "vegetation", "sky", "car", "person", "pole",
                 "traffic sign", "traffic light"):
        assert ID[name] in present, name


def _horizontal_runs(mask: torch.Tensor) -> list[int]:
    """Lengths of horizontal runs of True in a [H, W] bool mask."""
    runs = []
    for row in mask.numpy():
        padded = np.concatenate([[0], row.astype(np.int8), [0]])
        d = np.diff(padded)
        runs += list(np.nonzero(d == -1)[0] - np.nonzero(d == 1)[0])
    return runs


def test_thin_classes_are_present_and_thin(sample_64):
    masks = torch.stack([s["mask"] for s in sample_64])
    for name in ("pole", "traffic sign", "traffic light"):
        share = (masks == ID[name]).any(-1).any(-1).float().mean()
        assert share > 0.25, (name, share)
    pole_runs = _horizontal_runs(torch.cat(list(masks == ID["pole"])))
    assert np.median(pole_runs) <= 3  # a few pixels wide at 64x128
    thin = torch.isin(masks, torch.tensor([ID["pole"], ID["traffic sign"], ID["traffic light"]]))
    assert thin.float().mean() < 0.05  # Cityscapes: about 2.3 %


def test_trucks_and_buses_are_rare():
    ds = ToyCity(100, SMALL, seed=1)
    big = [bool(torch.isin(ds[i]["mask"], torch.tensor([ID["truck"], ID["bus"]])).any())
           for i in range(len(ds))]
    assert 0.03 <= np.mean(big) <= 0.25


def test_depth_valid_range_and_void(sample_64):
    hood_seen = False
    for s in sample_64:
        d, m = s["depth"], s["mask"]
        valid = d > 0
        assert (d[valid] >= 1.0).all() and (d[valid] <= 100.0).all()
        assert (d[m == ID["sky"]] == 0).all()
        assert valid[(m != ID["sky"]) & (m != 255)].float().mean() > 0.95
        if (m[-1] == 255).all():  # ego-vehicle hood: void and no depth
            hood_seen = True
            assert (d[-1] == 0).all()
    assert hood_seen
    # depth grows towards the horizon on the road (a ground plane seen from above)
    s = sample_64[0]
    road = (s["mask"] == ID["road"]) & (s["depth"] > 0)
    rows = [float(s["depth"][r][road[r]].mean()) for r in range(64) if road[r].sum() > 3]
    assert rows[0] > rows[-1]


def test_target_differs_from_source():
    def stats(domain):
        ims = torch.stack([ToyCity(16, SMALL, split="val", domain=domain)[i]["image"]
                           for i in range(16)])
        saturation = (ims.max(1).values - ims.min(1).values).mean()
        grain = (ims[..., 1:] - ims[..., :-1]).abs().median()
        return float(saturation), float(grain)

    (sat_s, grain_s), (sat_t, grain_t) = stats("source"), stats("target")
    assert sat_s > 1.3 * sat_t  # game-like colours are more saturated
    assert grain_t > grain_s  # sensor noise in the real-like domain


def test_scene_does_not_depend_on_size():
    small, large = ToyCity(1, (32, 64))[0], ToyCity(1, (64, 128))[0]
    down = large["mask"][1::2, 1::2]
    assert (down == small["mask"]).float().mean() > 0.8


def test_cache_and_transform():
    ds = ToyCity(2, SMALL, cache=True)
    a = ds[1]
    a["image"].zero_()  # modifying a returned sample must not change the cache
    assert ds[1]["image"].max() > 0
    assert torch.equal(ds[1]["mask"], ToyCity(2, SMALL)[1]["mask"])
    t = ToyCity(2, SMALL, transform=train_transforms((16, 32)))[0]
    assert t["image"].shape == (3, 16, 32) and t["mask"].shape == (16, 32)
    batch = next(iter(torch.utils.data.DataLoader(ToyCity(4, SMALL), batch_size=4)))
    assert batch["image"].shape == (4, 3, *SMALL) and batch["index"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("kwargs, match", [
    ({"n": 0}, "n=0"), ({"n": 2.5}, "n=2.5"), ({"size": (8, 64)}, "size"),
    ({"size": 64}, "size"), ({"size": (32.0, 64)}, "size"), ({"split": "training"}, "split"),
    ({"domain": "real"}, "domain"), ({"seed": -1}, "seed"), ({"transform": 3}, "callable"),
])
def test_bad_arguments_raise(kwargs, match):
    args = {"n": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        ToyCity(**args)


def test_get_mode(monkeypatch):
    monkeypatch.delenv("MINIKD_MODE", raising=False)
    assert get_mode() == "quick"
    monkeypatch.setenv("MINIKD_MODE", "full")
    assert get_mode() == "full"
    monkeypatch.setenv("MINIKD_MODE", "fast")
    with pytest.raises(ValueError, match="'quick' or 'full'"):
        get_mode()


# ---------------------------------------------------------------------------------------------
# The vectorised renderer's building blocks against plain transcriptions (oracles).
# ---------------------------------------------------------------------------------------------
def test_candidate_pixels_match_a_plain_loop():
    from minikd.data import _candidate_pixels

    width = 7
    regions = np.array([[0, 2, 1, 4], [3, 3, 0, 5], [1, 4, 6, 7], [2, 2, 2, 2], [4, 5, 0, 7]])
    k, pix, counts = _candidate_pixels(regions, width)
    expect = [(i, r * width + c) for i, (v0, v1, u0, u1) in enumerate(regions)
              for r in range(v0, v1) for c in range(u0, u1)]
    assert list(zip(k.tolist(), pix.tolist())) == expect
    assert counts.tolist() == [6, 0, 3, 0, 7]


def test_noise_lookup_wraps_like_modulo():
    from minikd.data import _NOISE, _noise

    rng = np.random.default_rng(0)
    u, v = rng.uniform(-500, 500, 1000), rng.uniform(-500, 500, 1000).astype(np.float32)
    n = _NOISE.shape[0]
    expect = [_NOISE[int(np.floor(b)) % n, int(np.floor(a)) % n] for a, b in zip(u, v)]
    assert np.array_equal(_noise(u, v), np.array(expect, np.float32))


def test_gaussian_blur_matches_padded_sum():
    from minikd.data import _gaussian_blur

    img = np.random.default_rng(1).random((9, 13, 3), dtype=np.float32)
    sigma = 1.3
    r = int(np.ceil(2.5 * sigma))
    k = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).astype(np.float32)
    p = np.pad(img, ((r, r), (0, 0), (0, 0)), mode="edge")
    ref = sum(k[i] * p[i:i + 9] for i in range(2 * r + 1))
    p = np.pad(ref, ((0, 0), (r, r), (0, 0)), mode="edge")
    ref = sum(k[i] * p[:, i:i + 13] for i in range(2 * r + 1))
    assert np.array_equal(_gaussian_blur(img, sigma), ref)
    assert _gaussian_blur(img, 0.05) is img


def test_cached_items_equal_fresh_ones():
    cached, fresh = ToyCity(3, SMALL, ood=True, cache=True), ToyCity(3, SMALL, ood=True)
    for _ in range(2):  # first read renders, second read comes from the cache
        for i in range(3):
            a, b = cached[i], fresh[i]
            assert set(a) == set(b)
            for key in a:
                if torch.is_tensor(a[key]):
                    assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_class_frequencies_stay_pinned(sample_64):
    """Notebooks rely on ToyCity's statistics: the label shares of the 40 source items at
    64x128 (measured when the renderer was vectorised; it kept the pixels bit-identical)."""
    masks = torch.stack([s["mask"] for s in sample_64])
    labels = masks[masks != 255]
    share = torch.bincount(labels, minlength=C).double() / labels.numel()
    pinned = {"road": 0.188, "sidewalk": 0.0853, "building": 0.3755, "pole": 0.0258,
              "vegetation": 0.1515, "sky": 0.0406, "car": 0.0954, "person": 0.0094}
    for name, expect in pinned.items():
        assert abs(float(share[ID[name]]) - expect) < 0.002, (name, float(share[ID[name]]))
    assert abs(float((masks == 255).double().mean()) - 0.0219) < 0.002
