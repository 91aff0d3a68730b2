"""Build tiny fake Cityscapes, GTA5 and NYUv2 downloads from ToyCity scenes, and prepare them.

The archives have the official names and layouts and the real data sets' resolutions, so the
unchanged ``prepare_*.py`` scripts and ``minikd.data`` loaders read them exactly as they read the
real downloads. Nothing here is real data: the scenes are ToyCity's, relabelled to each data set's
label ids. Two uses:

* a learner without Cityscapes tries full mode's plumbing on a laptop;
* CI runs every notebook with ``MINIKD_MODE=full MINIKD_SMOKE=1`` on the prepared folders
  (``make smoke``).

Writes under --out:
    archives/cityscapes/{leftImg8bit,gtFine,disparity,camera}_trainvaltest.zip   1024x2048
    archives/gta5/01_images.zip, 01_labels.zip                                   1052x1914
    archives/nyuv2/nyuv2_labeled.npz                                             480x640
and, unless --no-prepare, the folders the loaders read (resized to --size, as a user would):
    cityscapes/   gta5/   nyuv2/

Example (then point the notebooks at the folders it prints):
    python data_scripts/make_fake_archives.py --out data/fake
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
from _common import parse_size, positive_int
from PIL import Image

HERE = Path(__file__).resolve().parent
CITYSCAPES_HW, GTA5_HW, NYUV2_HW = (1024, 2048), (1052, 1914), (480, 640)
CITIES = {"train": ["aachen", "bochum"], "val": ["frankfurt"]}
# A camera of the real rig (Cityscapes camera JSON): baseline in metres, focal length in pixels.
CAMERA = {"extrinsic": {"baseline": 0.209313, "pitch": 0.038, "roll": 0.0, "x": 1.7, "y": 0.1,
                        "yaw": -0.0195, "z": 1.18},
          "intrinsic": {"fx": 2262.52, "fy": 2265.30, "u0": 1096.98, "v0": 513.137}}


def _toycity_scenes(n: int, size: tuple[int, int], seed: int):
    """n ToyCity scenes at ``size`` as numpy (image uint8 [H,W,3], Cityscapes trainIds, depth m)."""
    from minikd.data import ToyCity

    scenes = ToyCity(n, size=size, split="train", domain="target", seed=seed)
    to_train = np.full(256, 255, np.int64)
    to_train[list(ToyCity.TO_CITYSCAPES)] = list(ToyCity.TO_CITYSCAPES.values())
    for i in range(n):
        item = scenes[i]
        image = (item["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        yield image, to_train[item["mask"].numpy()], item["depth"].numpy()


def _trainid_to_labelid() -> np.ndarray:
    """The inverse of the official labelId -> trainId table (void -> labelId 0, unlabelled)."""
    from minikd.data import CITYSCAPES_ID_TO_TRAINID

    lut = np.zeros(256, np.uint8)
    for label_id, train_id in CITYSCAPES_ID_TO_TRAINID.items():
        if train_id != 255:
            lut[train_id] = label_id
    return lut


def _png(array: np.ndarray, palette: bool = False) -> bytes:
    img = Image.fromarray(array, mode="P" if palette else None)
    if palette:  # GTA5 labels are palette PNGs whose indices are the labelIds
        img.putpalette([v for i in range(256) for v in (i, (37 * i) % 256, 255 - i)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _disparity_png(depth: np.ndarray) -> np.ndarray:
    """Depth in metres -> Cityscapes disparity PNG p = 256 d + 1 (0 = invalid / out of range)."""
    with np.errstate(divide="ignore"):
        d = CAMERA["extrinsic"]["baseline"] * CAMERA["intrinsic"]["fx"] / depth
    p = np.where(depth > 0, 256.0 * d + 1.0, 0.0)
    return np.where(p <= 65535, p, 0).round().astype(np.uint16)


def cityscapes(folder: Path, per_city: int) -> Path:
    """The four official zips with ``per_city`` images in each of the cities of CITIES."""
    folder.mkdir(parents=True, exist_ok=True)
    lut = _trainid_to_labelid()
    names = {"images": "leftImg8bit", "labels": "gtFine", "disparity": "disparity", "camera": "camera"}
    zips = {k: zipfile.ZipFile(folder / f"{v}_trainvaltest.zip", "w") for k, v in names.items()}
    seed = 100
    for split, cities in CITIES.items():
        for city in cities:
            seed += 1
            for k, (image, train_ids, depth) in enumerate(_toycity_scenes(per_city, CITYSCAPES_HW, seed)):
                stem = f"{city}_{k:06d}_000019"
                zips["images"].writestr(f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png", _png(image))
                zips["labels"].writestr(f"gtFine/{split}/{city}/{stem}_gtFine_labelIds.png",
                                        _png(lut[train_ids]))
                zips["disparity"].writestr(f"disparity/{split}/{city}/{stem}_disparity.png",
                                           _png(_disparity_png(depth)))
                zips["camera"].writestr(f"camera/{split}/{city}/{stem}_camera.json", json.dumps(CAMERA))
    for z in zips.values():
        z.close()
    return folder


def gta5(folder: Path, n: int) -> Path:
    """Part 01 of the GTA5 download: ``01_images.zip`` and ``01_labels.zip`` with n images."""
    folder.mkdir(parents=True, exist_ok=True)
    lut = _trainid_to_labelid()
    with zipfile.ZipFile(folder / "01_images.zip", "w") as images, \
            zipfile.ZipFile(folder / "01_labels.zip", "w") as labels:
        for k, (image, train_ids, _) in enumerate(_toycity_scenes(n, GTA5_HW, 200)):
            images.writestr(f"images/{k + 1:05d}.png", _png(image))
            labels.writestr(f"labels/{k + 1:05d}.png", _png(lut[train_ids], palette=True))
    return folder


def nyuv2(folder: Path, n: int) -> Path:
    """The .npz that prepare_nyuv2.py reads (docs: data_scripts/README.md), n images, half test."""
    folder.mkdir(parents=True, exist_ok=True)
    scenes = list(_toycity_scenes(n, NYUV2_HW, 300))
    # ToyCity's 17 classes stand in for NYUv2 labels 1..17 (file label 0 = unlabelled).
    labels = np.stack([np.where(t == 255, 0, 1 + np.minimum(t, 39)) for _, t, _ in scenes])
    path = folder / "nyuv2_labeled.npz"
    np.savez(path, images=np.stack([s[0] for s in scenes]),
             depths=np.stack([np.minimum(s[2], 10.0) for s in scenes]).astype(np.float32),
             labels40=labels.astype(np.uint8), train_idx=np.arange(0, n - n // 2),
             test_idx=np.arange(n - n // 2, n))
    return path


def prepare(script: str, args: list[str]) -> None:
    """Run one of the prepare scripts as a user would (its own process, its own checks)."""
    import subprocess

    cmd = [sys.executable, str(HERE / script), *args, "--overwrite"]
    subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for archives/ and the data")
    parser.add_argument("--per-city", type=positive_int, default=2,
                        help="Cityscapes images per city (2 train cities, 1 val city; default 2)")
    parser.add_argument("--n", type=positive_int, default=4, help="GTA5 and NYUv2 images (default 4)")
    parser.add_argument("--size", type=parse_size, default=(256, 512), metavar="HxW",
                        help="size the Cityscapes and GTA5 folders are prepared at (default "
                             "256x512; NYUv2 at half of its 480x640)")
    parser.add_argument("--no-prepare", action="store_true", help="only write the archives")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    cs, g5 = cityscapes(out / "archives/cityscapes", args.per_city), gta5(out / "archives/gta5", args.n)
    npz = nyuv2(out / "archives/nyuv2", args.n)
    print(f"wrote fake archives under {out / 'archives'}")
    if args.no_prepare:
        return 0
    size = f"{args.size[0]}x{args.size[1]}"
    prepare("prepare_cityscapes.py", ["--archives", str(cs), "--out", str(out / "cityscapes"),
                                      "--with-depth", "--size", size])
    prepare("prepare_gta5.py", ["--archives", str(g5), "--out", str(out / "gta5"), "--size", size])
    prepare("prepare_nyuv2.py", ["--npz", str(npz), "--out", str(out / "nyuv2"), "--size", f"{NYUV2_HW[0] // 2}x{NYUV2_HW[1] // 2}"])
    print("prepared; point the notebooks at them with\n"
          f"  export MINIKD_CITYSCAPES={out / 'cityscapes'} MINIKD_GTA5={out / 'gta5'} "
          f"MINIKD_NYUV2={out / 'nyuv2'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))  # minikd from the repository when not installed
    sys.exit(main())
