"""Tests of the real-data loaders (Cityscapes, NYUv2, GTA5) on tiny hand-made prepared folders."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minikd.data import (
    GTA5,
    NYUV2_PALETTE,
    Cityscapes,
    NYUv2,
    disparity_to_depth,
    labelids_to_trainids,
)

H, W = 4, 6
STEM = "aachen_000000_000019"


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _rgb(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def make_cityscapes(root: Path, labels: np.ndarray, with_depth: bool = True) -> np.ndarray:
    """A prepared Cityscapes folder with one train image; returns the image array."""
    image = _rgb()
    _png(root / f"leftImg8bit/train/aachen/{STEM}_leftImg8bit.png", image)
    _png(root / f"gtFine/train/aachen/{STEM}_gtFine_labelIds.png", labels.astype(np.uint8))
    if with_depth:
        disp = np.zeros((H, W), np.uint16)
        disp[:, 1:] = 1 + 256 * 8  # d = 8 px
        disp[:, 3:] = 1 + 256 * 2 + 128  # d = 2.5 px
        _png(root / f"disparity/train/aachen/{STEM}_disparity.png", disp)
        camera = {"extrinsic": {"baseline": 0.2, "x": 1.7, "y": 0.1, "z": 1.2},
                  "intrinsic": {"fx": 2000.0, "fy": 2000.0, "u0": 3.0, "v0": 2.0}}
        path = root / f"camera/train/aachen/{STEM}_camera.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(camera))
    return image


def make_nyuv2(root: Path, labels: np.ndarray) -> None:
    for sub, arr in (("image", _rgb()), ("label40", labels.astype(np.uint8)),
                     ("depth", np.full((H, W), 1234, np.uint16))):
        _png(root / "train" / sub / "0000.png", arr)


def make_gta5(root: Path, labels: np.ndarray) -> None:
    _png(root / "images/00001.png", _rgb())
    _png(root / "labels/00001.png", labels.astype(np.uint8))


# --- label mapping and depth formula ----------------------------------------------------------

OFFICIAL = {  # cityscapesScripts labels.py: labelId -> trainId (255 = ignored)
    0: 255, 1: 255, 2: 255, 3: 255, 4: 255, 5: 255, 6: 255, 7: 0, 8: 1, 9: 255, 10: 255,
    11: 2, 12: 3, 13: 4, 14: 255, 15: 255, 16: 255, 17: 5, 18: 255, 19: 6, 20: 7, 21: 8,
    22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 29: 255, 30: 255, 31: 16, 32: 17,
    33: 18,
}


def test_labelids_to_trainids_matches_official_table():
    ids = np.array(list(OFFICIAL), dtype=np.uint8).reshape(2, 17)
    got = labelids_to_trainids(ids, 33, "x.png", "prepare")
    assert got.dtype == np.int64
    assert got.ravel().tolist() == list(OFFICIAL.values())


def test_disparity_to_depth_by_hand():
    p = np.array([[0, 1, 257, 2049, 1 + 256 * 2 + 128]], dtype=np.uint16)
    depth = disparity_to_depth(p, baseline=0.2, fx=2000.0)
    # d = (p - 1) / 256 -> [invalid, 0 (invalid), 1, 8, 2.5]; depth = 0.2 * 2000 / d
    np.testing.assert_allclose(depth, [[0, 0, 400.0, 50.0, 160.0]], rtol=1e-6)
    assert depth.dtype == np.float32


# --- item format ------------------------------------------------------------------------------


def test_cityscapes_item_format_and_values(tmp_path):
    labels = np.full((H, W), 7, np.uint8)
    labels[0] = [0, 7, 8, 26, 33, 9]
    image = make_cityscapes(tmp_path, labels)
    ds = Cityscapes(tmp_path, "train", with_depth=True)
    item = ds[0]
    assert len(ds) == 1 and item["index"] == 0
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, H, W)
    torch.testing.assert_close(item["image"], torch.from_numpy(image).permute(2, 0, 1) / 255.0)
    assert item["mask"].dtype == torch.int64
    assert item["mask"][0].tolist() == [255, 0, 1, 13, 18, 255]
    assert item["depth"].dtype == torch.float32
    assert item["depth"][0].tolist() == pytest.approx([0, 50, 50, 160, 160, 160])
    assert "depth" not in Cityscapes(tmp_path, "train")[0]
    assert len(Cityscapes.CLASSES) == 19 == Cityscapes.NUM_CLASSES == len(Cityscapes.PALETTE)


def test_nyuv2_and_gta5_items(tmp_path):
    nyu_labels = np.zeros((H, W), np.uint8)
    nyu_labels[0, :3] = [255, 39, 5]
    make_nyuv2(tmp_path / "nyu", nyu_labels)
    item = NYUv2(tmp_path / "nyu", "train")[0]
    assert item["mask"][0, :3].tolist() == [255, 39, 5]
    assert torch.allclose(item["depth"], torch.full((H, W), 1.234))
    assert len(NYUv2.CLASSES) == 40 == len(set(NYUV2_PALETTE))
    make_gta5(tmp_path / "gta", np.full((H, W), 26))
    item = GTA5(tmp_path / "gta")[0]
    assert item["mask"].unique().tolist() == [13] and "depth" not in item


def test_transform_and_default_collate(tmp_path):
    make_cityscapes(tmp_path, np.full((H, W), 7))

    def flip(item):
        return {**item, "image": item["image"].flip(-1), "flipped": True}

    ds = Cityscapes(tmp_path, "train", with_depth=True, transform=flip)
    assert ds[0]["flipped"]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=1)))
    assert batch["image"].shape == (1, 3, H, W) and batch["depth"].shape == (1, H, W)


# --- errors that teach ------------------------------------------------------------------------


@pytest.mark.parametrize("make, script, expected", [
    (lambda r: Cityscapes(r, "train"), "prepare_cityscapes.py", "leftImg8bit/train"),
    (lambda r: NYUv2(r, "test"), "prepare_nyuv2.py", "test/image"),
    (lambda r: GTA5(r), "prepare_gta5.py", "images/"),
])
def test_missing_root_message(tmp_path, make, script, expected):
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        make(root)
    message = str(err.value)
    assert str(root) in message and expected in message
    assert f"data_scripts/{script}" in message and f"--out {root}" in message


def test_root_one_level_too_high_and_archives_folder(tmp_path):
    make_cityscapes(tmp_path / "cityscapes", np.full((H, W), 7))
    with pytest.raises(FileNotFoundError, match="Did you mean root="):
        Cityscapes(tmp_path, "train")
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "gtFine_trainvaltest.zip").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="downloaded archives"):
        Cityscapes(tmp_path / "dl", "val")


def test_missing_labels_or_depth_named(tmp_path):
    make_cityscapes(tmp_path, np.full((H, W), 7), with_depth=False)
    with pytest.raises(FileNotFoundError, match=r"disparity/train/aachen/.*--with-depth"):
        Cityscapes(tmp_path, "train", with_depth=True)
    (tmp_path / f"gtFine/train/aachen/{STEM}_gtFine_labelIds.png").unlink()
    with pytest.raises(FileNotFoundError, match="_gtFine_labelIds.png"):
        Cityscapes(tmp_path, "train")
    with pytest.raises(ValueError, match="split='training'"):
        Cityscapes(tmp_path, "training")


def test_trainids_passed_as_labelids_rejected(tmp_path):
    train_ids = np.full((H, W), 13, np.uint8)  # car as a trainId
    train_ids[0, 0] = 255
    make_cityscapes(tmp_path, train_ids, with_depth=False)
    with pytest.raises(ValueError) as err:
        Cityscapes(tmp_path, "train")[0]
    message = str(err.value)
    assert "labels contain 255" in message and "expected Cityscapes labelIds 0..33" in message
    assert "trainIds" in message and "data_scripts/prepare_cityscapes.py" in message


def test_bad_labels_named_gta5_and_nyuv2(tmp_path):
    labels = np.full((H, W), 7, np.uint8)
    labels[0, :2] = [40, 77]
    make_gta5(tmp_path / "gta", labels)
    with pytest.raises(ValueError, match=r"labels contain 40, 77; expected Cityscapes labelIds "
                                         r"0\.\.34.*prepare_gta5\.py"):
        GTA5(tmp_path / "gta")[0]
    raw = np.full((H, W), 40, np.uint8)  # raw NYU labels 1..40, not shifted
    make_nyuv2(tmp_path / "nyu", raw)
    with pytest.raises(ValueError) as err:
        NYUv2(tmp_path / "nyu", "train")[0]
    message = str(err.value)
    assert "labels contain 40; expected 0..39 or 255" in message
    assert "data_scripts/prepare_nyuv2.py" in message


def test_size_mismatch_rejected(tmp_path):
    make_gta5(tmp_path, np.full((H, W), 7))
    _png(tmp_path / "labels/00001.png", np.full((H + 1, W), 7, np.uint8))
    with pytest.raises(ValueError, match=r"mask is \(5, 6\) but the image is \(4, 6\)"):
        GTA5(tmp_path)[0]
