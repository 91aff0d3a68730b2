"""Tests of data_scripts/: tiny fake archives in the official layouts, prepared, then loaded."""

import importlib
import io
import json
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minikd.data import GTA5, Cityscapes, NYUv2

SCRIPTS = Path(__file__).resolve().parents[1] / "data_scripts"


def _script(name: str):
    """Import a data_scripts module (they import their sibling _common)."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    return importlib.import_module(name)


common = _script("_common")
cityscapes = _script("prepare_cityscapes")
nyuv2 = _script("prepare_nyuv2")
gta5 = _script("prepare_gta5")

H, W = 8, 16  # fake "full resolution"; every array is constant on 2x2 blocks, so a 2x nearest
# downsampling (pixel-centre sampling) keeps exactly one value per block.


def png(arr: np.ndarray | Image.Image) -> bytes:
    buf = io.BytesIO()
    (arr if isinstance(arr, Image.Image) else Image.fromarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def blocks(small: np.ndarray) -> np.ndarray:
    """Upsample each value to a 2x2 block."""
    return np.kron(small, np.ones((2, 2), dtype=small.dtype))


def write_zip(path: Path, members: dict[str, bytes], symlinks: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("README", b"official readme")
        for name, data in members.items():
            zf.writestr(name, data)
        for name in symlinks:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


# --- Cityscapes -------------------------------------------------------------------------------

SAMPLES = [("train", "aachen", "aachen_000000_000019"), ("train", "bochum", "bochum_000000_000313"),
           ("val", "frankfurt", "frankfurt_000000_000294")]
LABEL_IDS = np.array([[0, 7, 8, 9, 11, 14, 17, 23],  # hand-picked: void, road, sidewalk, parking,
                      [24, 26, 27, 29, 31, 33, 1, 21],  # building, guard rail, pole, sky, ...
                      [7] * 8, [7] * 8], dtype=np.uint8)
TRAIN_IDS = [[255, 0, 1, 255, 2, 255, 5, 10], [11, 13, 14, 255, 16, 18, 255, 8]]
DISP_SMALL = np.zeros((4, 8), np.uint16)
DISP_SMALL[:, 2:] = 1 + 256 * 8  # d = 8 px at full resolution
DISP_SMALL[:, 5:] = 1 + 256 * 20  # d = 20 px
CAMERA = {"extrinsic": {"baseline": 0.2, "pitch": 0.04, "roll": 0.0, "x": 1.7, "y": 0.1,
                        "yaw": -0.02, "z": 1.2},
          "intrinsic": {"fx": 2000.0, "fy": 2000.0, "u0": 8.0, "v0": 4.0}}
DEPTH_ROW = [0, 0, 50, 50, 50, 20, 20, 20]  # 0.2 * 2000 / d, per 2x2 block


def image(seed: int) -> np.ndarray:
    return blocks(np.random.default_rng(seed).integers(0, 256, (4, 8, 3), dtype=np.uint8)
                  .transpose(2, 0, 1)).reshape(3, H, W).transpose(1, 2, 0)


def cityscapes_archives(folder: Path, drop: str = "", extra: dict | None = None,
                        symlinks: tuple[str, ...] = ()) -> Path:
    """The four official zips with SAMPLES; ``drop`` omits that member, ``extra`` adds some."""
    folder.mkdir(parents=True, exist_ok=True)
    zips: dict[str, dict[str, bytes]] = {k: {} for k in cityscapes.ARCHIVES}
    for k, (split, city, stem) in enumerate(SAMPLES):
        names = cityscapes.member_paths(split, city, stem)
        zips["images"][names["images"]] = png(image(k))
        zips["labels"][names["labels"]] = png(blocks(LABEL_IDS))
        zips["labels"][names["labels"].replace("labelIds", "color")] = png(image(9))
        zips["disparity"][names["disparity"]] = png(blocks(DISP_SMALL))
        zips["camera"][names["camera"]] = json.dumps(CAMERA).encode()
    for members in zips.values():
        members.pop(drop, None)
    zips["images"].update(extra or {})
    for key, members in zips.items():
        write_zip(folder / cityscapes.ARCHIVES[key], members,
                  symlinks if key == "images" else ())
    return folder


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial" in p.name or ".old" in p.name]


def test_cityscapes_prepare_and_load(tmp_path):
    archives = cityscapes_archives(tmp_path / "dl")
    out = tmp_path / "cityscapes"
    assert cityscapes.main(["--archives", str(archives), "--out", str(out), "--with-depth"]) == 0
    marker = json.loads((out / common.MARKER).read_text())
    assert marker["splits"] == {"train": 2, "val": 1} and marker["with_depth"]
    assert not list(out.rglob("*_color.png")) and leftovers(tmp_path) == []
    train = Cityscapes(out, "train", with_depth=True)
    assert len(train) == 2 and len(Cityscapes(out, "val")) == 1
    item = train[1]  # bochum, sorted after aachen
    torch.testing.assert_close(item["image"],
                               torch.from_numpy(image(1)).permute(2, 0, 1) / 255.0)
    assert item["mask"][::2, ::2][:2].tolist() == TRAIN_IDS
    assert item["depth"][0, ::2].tolist() == pytest.approx(DEPTH_ROW)


def test_cityscapes_resized_keeps_depth(tmp_path):
    archives = cityscapes_archives(tmp_path / "dl")
    out = tmp_path / "cs_small"
    cityscapes.main(["--archives", str(archives), "--out", str(out), "--with-depth",
                     "--size", f"{H // 2}x{W // 2}", "--splits", "val"])
    item = Cityscapes(out, "val", with_depth=True)[0]
    assert item["image"].shape == (3, H // 2, W // 2)
    assert item["mask"][:2].tolist() == TRAIN_IDS  # nearest: one value per 2x2 block
    # disparity halves with the width and fx halves too: depth unchanged
    stored = np.array(Image.open(next(out.rglob("*_disparity.png"))))
    assert stored[0].tolist() == [0, 0, 1 + 256 * 4, 1 + 256 * 4, 1 + 256 * 4] + [1 + 256 * 10] * 3
    camera = json.loads(next(out.rglob("*_camera.json")).read_text())
    assert camera["intrinsic"] == {"fx": 1000.0, "fy": 1000.0, "u0": 4.0, "v0": 2.0}
    assert item["depth"][0].tolist() == pytest.approx(DEPTH_ROW)


def test_cityscapes_cli_subprocess(tmp_path):
    archives = cityscapes_archives(tmp_path / "dl")
    cmd = [sys.executable, str(SCRIPTS / "prepare_cityscapes.py"), "--archives", str(archives),
           "--out", str(tmp_path / "cs"), "--limit", "1", "--size", "4x8"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert len(Cityscapes(tmp_path / "cs", "train")) == 1
    again = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "already exists; pass --overwrite" in again.stderr
    assert "Traceback" not in again.stderr


@pytest.mark.parametrize("evil", ["../evil.png", "leftImg8bit/train/../../../evil.png",
                                  "/tmp/minikd_evil.png", "..\\evil.png", "C:/evil.png"])
def test_path_traversal_member_refused(tmp_path, evil):
    archives = cityscapes_archives(tmp_path / "dl", extra={evil: png(image(0))})
    out = tmp_path / "target" / "cityscapes"
    with pytest.raises(common.UnsafeArchiveError, match="outside the target folder"):
        cityscapes.main(["--archives", str(archives), "--out", str(out)])
    assert not out.exists() and not (tmp_path / "target").exists()
    assert not list(tmp_path.rglob("*evil*")) and not Path("/tmp/minikd_evil.png").exists()


def test_symlink_member_refused(tmp_path):
    archives = cityscapes_archives(tmp_path / "dl", symlinks=("leftImg8bit/train/link.png",))
    with pytest.raises(common.UnsafeArchiveError, match="symbolic link"):
        cityscapes.main(["--archives", str(archives), "--out", str(tmp_path / "cs")])
    assert not (tmp_path / "cs").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_tar_links_refused(tmp_path, kind):
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo("images/00001.png")
        info.type, info.linkname = kind, "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(common.UnsafeArchiveError, match="link"):
        common.Archive(path)


def test_tar_regular_members_read(tmp_path):
    path = tmp_path / "a.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo("images/00001.png")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    archive = common.Archive(path)
    assert archive.names() == ["images/00001.png"] and archive.read("images/00001.png") == b"abc"
    archive.close()


def test_missing_member_reported(tmp_path):
    member = cityscapes.member_paths(*SAMPLES[1])["labels"]
    archives = cityscapes_archives(tmp_path / "dl", drop=member)
    with pytest.raises(common.MissingMembersError) as err:
        cityscapes.main(["--archives", str(archives), "--out", str(tmp_path / "cs")])
    assert member in str(err.value) and "gtFine_trainvaltest.zip" in str(err.value)
    assert not (tmp_path / "cs").exists()
    (archives / "disparity_trainvaltest.zip").unlink()
    with pytest.raises(common.PrepareError, match="disparity_trainvaltest.zip not found"):
        cityscapes.main(["--archives", str(archives), "--out", str(tmp_path / "cs"),
                         "--with-depth"])


def test_failure_midway_leaves_no_output(tmp_path):
    archives = cityscapes_archives(tmp_path / "dl")
    out = tmp_path / "cs"
    cityscapes.main(["--archives", str(archives), "--out", str(out), "--splits", "val"])
    bad = cityscapes.member_paths(*SAMPLES[1])["images"]
    cityscapes_archives(tmp_path / "dl", extra={bad: b"not a png"})
    with pytest.raises(Exception, match="cannot identify image"):
        cityscapes.main(["--archives", str(archives), "--out", str(out), "--overwrite"])
    # the old complete folder is untouched, no half-written sibling is left behind
    assert json.loads((out / common.MARKER).read_text())["splits"] == {"val": 1}
    assert leftovers(tmp_path) == []
    cityscapes_archives(tmp_path / "dl")
    cityscapes.main(["--archives", str(archives), "--out", str(out), "--overwrite"])
    assert json.loads((out / common.MARKER).read_text())["splits"] == {"train": 2, "val": 1}
    assert leftovers(tmp_path) == []


def test_parse_size():
    assert common.parse_size("512x1024") == (512, 1024)
    with pytest.raises(Exception, match="HEIGHTxWIDTH"):
        common.parse_size("512")


# --- NYUv2 ------------------------------------------------------------------------------------


def nyu_npz(path: Path, **override) -> Path:
    rng = np.random.default_rng(0)
    labels = np.zeros((4, H, W), np.uint8)
    labels[:, :2, :4] = [0, 1, 40, 7]
    depths = np.full((4, H, W), 1.234, np.float32)
    depths[:, 1, 0], depths[:, 1, 1] = np.nan, 70.0  # invalid, beyond uint16 millimetres
    arrays = {"images": rng.integers(0, 256, (4, H, W, 3), dtype=np.uint8), "depths": depths,
              "labels40": labels, "train_idx": np.array([0, 2]), "test_idx": np.array([3])}
    np.savez(path, **{**arrays, **override})
    return path


def test_nyuv2_prepare_and_load(tmp_path):
    npz = nyu_npz(tmp_path / "nyu.npz")
    nyuv2.main(["--npz", str(npz), "--out", str(tmp_path / "nyu")])
    train, test = NYUv2(tmp_path / "nyu", "train"), NYUv2(tmp_path / "nyu", "test")
    assert len(train) == 2 and len(test) == 1
    assert sorted(p.name for p in train.images) == ["0000.png", "0002.png"]
    item = test[0]
    assert item["mask"][0, :4].tolist() == [255, 0, 39, 6]  # 0 -> 255, 1..40 -> 0..39
    assert item["depth"][0, 0].item() == pytest.approx(1.234, abs=1e-6)
    assert item["depth"][1, :2].tolist() == [0.0, 0.0]
    with np.load(npz) as data:
        expected = torch.from_numpy(data["images"][3]).permute(2, 0, 1) / 255.0
    torch.testing.assert_close(item["image"], expected)


def test_nyuv2_resized_via_cli(tmp_path):
    npz = nyu_npz(tmp_path / "nyu.npz")
    cmd = [sys.executable, str(SCRIPTS / "prepare_nyuv2.py"), "--npz", str(npz),
           "--out", str(tmp_path / "nyu"), "--size", "4x8"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    item = NYUv2(tmp_path / "nyu", "train")[0]
    assert item["image"].shape == (3, 4, 8) and item["mask"].shape == (4, 8)
    assert item["mask"][0, :2].tolist() == [0, 6]  # columns 1 and 3 of [255, 0, 39, 6]
    assert item["depth"][2, 0].item() == pytest.approx(1.234, abs=1e-6)


def test_nyuv2_input_errors(tmp_path):
    mat = tmp_path / "nyu_depth_v2_labeled.mat"
    mat.write_bytes(b"MATLAB 7.3 MAT-file")
    with pytest.raises(common.PrepareError, match="HDF5 and needs h5py"):
        nyuv2.main(["--npz", str(mat), "--out", str(tmp_path / "nyu")])
    npz = nyu_npz(tmp_path / "raw.npz", labels40=np.full((4, H, W), 894, np.uint16))
    with pytest.raises(common.PrepareError, match="894-class"):
        nyuv2.main(["--npz", str(npz), "--out", str(tmp_path / "nyu")])
    npz = nyu_npz(tmp_path / "t.npz", images=np.zeros((4, 3, W, H), np.uint8))
    with pytest.raises(common.PrepareError, match=r"\[N,3,W,H\]"):
        nyuv2.main(["--npz", str(npz), "--out", str(tmp_path / "nyu")])
    assert not (tmp_path / "nyu").exists()


# --- GTA5 -------------------------------------------------------------------------------------


def palette_png(ids: np.ndarray) -> bytes:
    img = Image.fromarray(ids.astype(np.uint8), mode="P")
    img.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
    return png(img)


def gta5_archives(folder: Path, drop_label: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    parts = {"01": ["00001.png", "00002.png"], "02": ["02501.png"]}
    for part, names in parts.items():
        images = {f"images/{n}": png(image(k)) for k, n in enumerate(names)}
        labels = {f"labels/{n}": palette_png(blocks(LABEL_IDS)) for n in names}
        labels["labels/00002.png"] = palette_png(LABEL_IDS)  # half-size label: fitted
        labels = {k: v for k, v in labels.items() if k in {f"labels/{n}" for n in names}}
        labels.pop(drop_label, None)
        write_zip(folder / f"{part}_images.zip", images)
        write_zip(folder / f"{part}_labels.zip", labels)
    return folder


def test_gta5_prepare_and_load(tmp_path):
    archives = gta5_archives(tmp_path / "dl")
    gta5.main(["--archives", str(archives), "--out", str(tmp_path / "gta5")])
    ds = GTA5(tmp_path / "gta5")
    assert len(ds) == 3
    assert json.loads((tmp_path / "gta5" / common.MARKER).read_text())[
        "labels_fitted_to_image_size"] == 1
    for i in range(3):
        assert ds[i]["mask"].shape == (H, W)
        assert ds[i]["mask"][::2, ::2][:2].tolist() == TRAIN_IDS


def test_gta5_cli_resized_and_errors(tmp_path):
    archives = gta5_archives(tmp_path / "dl")
    cmd = [sys.executable, str(SCRIPTS / "prepare_gta5.py"), "--archives", str(archives),
           "--out", str(tmp_path / "gta5"), "--size", "4x8", "--limit", "2"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    ds = GTA5(tmp_path / "gta5")
    assert len(ds) == 2 and ds[1]["mask"][:2].tolist() == TRAIN_IDS
    archives = gta5_archives(tmp_path / "dl2", drop_label="labels/00002.png")
    with pytest.raises(common.MissingMembersError, match="labels/00002.png"):
        gta5.main(["--archives", str(archives), "--out", str(tmp_path / "g2")])
    (archives / "02_labels.zip").unlink()
    with pytest.raises(common.PrepareError, match="02_images.zip has no 02_labels.zip"):
        gta5.main(["--archives", str(archives), "--out", str(tmp_path / "g2")])
    assert not (tmp_path / "g2").exists()


# --- fake downloads (make_fake_archives.py) ----------------------------------------------------

fake = _script("make_fake_archives")


def test_fake_archives_prepare_into_what_the_loaders_read(tmp_path, monkeypatch):
    """Tiny resolutions stand in for the real ones; prepared at the same size, nothing is resampled,
    so labels and depth must come back exactly as ToyCity rendered them."""
    from minikd.data import ToyCity

    monkeypatch.setattr(fake, "CITYSCAPES_HW", (32, 64))
    monkeypatch.setattr(fake, "GTA5_HW", (32, 64))
    monkeypatch.setattr(fake, "NYUV2_HW", (32, 64))
    monkeypatch.syspath_prepend(str(SCRIPTS.parent))  # the prepare scripts' processes find minikd
    assert fake.main(["--out", str(tmp_path), "--per-city", "1", "--n", "2", "--size", "32x64"]) == 0
    assert sorted(p.name for p in (tmp_path / "archives/cityscapes").iterdir()) == [
        "camera_trainvaltest.zip", "disparity_trainvaltest.zip", "gtFine_trainvaltest.zip",
        "leftImg8bit_trainvaltest.zip"]
    train = Cityscapes(tmp_path / "cityscapes", "train", with_depth=True)
    assert len(train) == 2 and len(Cityscapes(tmp_path / "cityscapes", "val")) == 1
    scene = ToyCity(1, size=(32, 64), split="train", domain="target", seed=101)[0]
    lut = torch.full((256,), 255, dtype=torch.long)
    for toy, train_id in ToyCity.TO_CITYSCAPES.items():
        lut[toy] = train_id
    item = train[0]  # aachen, the first city: ToyCity seed 101
    assert torch.equal(item["mask"], lut[scene["mask"]])
    valid = item["depth"] > 0
    assert valid.float().mean() > 0.5
    assert torch.equal(valid, (scene["depth"] > 0) & (scene["depth"] >= 0.209313 * 2262.52 / 255.996))
    torch.testing.assert_close(item["depth"][valid], scene["depth"][valid], rtol=2e-3, atol=0)
    gta = GTA5(tmp_path / "gta5")
    assert len(gta) == 2 and set(gta[0]["mask"].unique().tolist()) <= set(range(19)) | {255}
    nyu = NYUv2(tmp_path / "nyuv2", "test")
    assert len(nyu) == 1 and nyu[0]["image"].shape == (3, 16, 32)  # half size, as 240x320
