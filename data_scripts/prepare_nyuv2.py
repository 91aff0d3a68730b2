"""Prepare NYU Depth v2 (labelled set, 40 classes) for minikd from an .npz export.

The official nyu_depth_v2_labeled.mat is MATLAB v7.3, i.e. HDF5, which needs h5py; minikd does
not depend on it. Convert the .mat once, anywhere h5py and scipy are installed (e.g. Colab), to an
.npz with these arrays (the snippet is in data_scripts/README.md):

    images     uint8   [N, H, W, 3]   RGB (N = 1449, H x W = 480 x 640)
    depths     float   [N, H, W]      metres (0 or NaN = invalid)
    labels40   integer [N, H, W]      0 = unlabeled, 1..40 = the 40 classes of Gupta et al.
    train_idx  integer [795]          0-based indices of the official train split (splits.mat)
    test_idx   integer [654]          0-based indices of the official test split

Writes --out:
    <split>/image/<idx>.png     RGB uint8
    <split>/label40/<idx>.png   uint8, classes 0..39 (file label - 1), 255 = unlabeled (file 0)
    <split>/depth/<idx>.png     uint16 millimetres, 0 = invalid
    minikd_prepared.json
(<idx> is the 4-digit index in the 1449-image labelled set.) With --size, images are resized
bilinearly, labels and depth nearest (depth values are distances and are not rescaled).

Example:
    python data_scripts/prepare_nyuv2.py --npz ~/Downloads/nyuv2_labeled.npz --out data/nyuv2
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

import numpy as np
from _common import (
    PrepareError,
    add_common_args,
    atomic_output_dir,
    resize_nearest,
    resize_rgb,
    run_cli,
    save_png,
    write_marker,
)
from PIL import Image
from tqdm import tqdm

KEYS = ("images", "depths", "labels40", "train_idx", "test_idx")
README = "data_scripts/README.md (section NYUv2)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--npz", type=Path, required=True,
                        help="the .npz exported from nyu_depth_v2_labeled.mat (see README)")
    add_common_args(parser)
    return parser.parse_args(argv)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Load and validate the .npz export (keys, shapes, label range)."""
    if path.suffix == ".mat":
        raise PrepareError(
            f"{path} is the MATLAB file; it is HDF5 and needs h5py, which minikd does not "
            f"install. Convert it to .npz once with the snippet in {README}.")
    if not path.is_file():
        raise PrepareError(f"{path} not found; create it with the snippet in {README}.")
    try:
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        what = ("it holds pickled data, which is never loaded" if "pickle" in str(err)
                else f"{type(err).__name__}: {err}")
        raise PrepareError(f"{path} is not a readable .npz file ({what}); export it again with "
                           f"np.savez as the snippet in {README} does.") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise PrepareError(f"{path} holds a single array, not an .npz archive with arrays "
                           f"{list(KEYS)}; export it with np.savez as the snippet in {README} "
                           "does.")
    with npz:
        missing = [k for k in KEYS if k not in npz.files]
        if missing:
            raise PrepareError(f"{path} lacks arrays {missing} (has {npz.files}); expected "
                               f"{list(KEYS)} as written by the snippet in {README}.")
        data = {}
        for k in KEYS:
            try:
                data[k] = npz[k]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
                # e.g. "Object arrays cannot be loaded when allow_pickle=False": never unpickled
                raise PrepareError(
                    f"{path}: array {k!r} cannot be read as plain numbers "
                    f"({type(err).__name__}): it holds pickled Python objects or is damaged. "
                    "Convert it to a numeric array (e.g. np.asarray(x, dtype=np.uint8)) before "
                    f"np.savez, as the snippet in {README} does; pickled data is never loaded."
                ) from None
    if data["labels40"].ndim != 3:
        raise PrepareError(f"{path}: labels40 has shape {data['labels40'].shape}; expected "
                           f"[N, H, W] as written by the snippet in {README}.")
    n, h, w = data["labels40"].shape
    if data["images"].shape != (n, h, w, 3) or data["depths"].shape != (n, h, w):
        raise PrepareError(
            f"{path}: images {data['images'].shape}, depths {data['depths'].shape}, labels40 "
            f"{data['labels40'].shape}; expected [N,H,W,3], [N,H,W], [N,H,W]. Arrays read "
            f"with h5py come as [N,3,W,H]: transpose them as the snippet in {README} does.")
    top = int(data["labels40"].max(initial=0))
    if top > 40 or int(data["labels40"].min(initial=0)) < 0:
        raise PrepareError(
            f"{path}: labels40 holds values up to {top}; expected 0 (unlabeled) and 1..40. "
            f"These look like the 894-class 'labels'; map them with classMapping40.mat "
            f"as the snippet in {README} does.")
    return data


def to_label40(labels: np.ndarray) -> np.ndarray:
    """File labels (0 = unlabeled, 1..40) -> minikd labels (255, 0..39)."""
    labels = labels.astype(np.int64)
    return np.where(labels == 0, 255, labels - 1).astype(np.uint8)


def to_depth_mm(depth_m: np.ndarray) -> np.ndarray:
    """Metres -> uint16 millimetres; NaN, inf, negative and > 65.535 m become 0 (invalid)."""
    depth = np.nan_to_num(depth_m.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    mm = np.round(depth * 1000.0)
    return np.where((mm > 0) & (mm <= 65535), mm, 0).astype(np.uint16)


def prepare_sample(data: dict[str, np.ndarray], idx: int, split: str, out: Path,
                   size: tuple[int, int] | None) -> None:
    name = f"{idx:04d}.png"
    image = Image.fromarray(np.ascontiguousarray(data["images"][idx], dtype=np.uint8))
    save_png(out / split / "image" / name, resize_rgb(image, size))
    save_png(out / split / "label40" / name,
             resize_nearest(to_label40(data["labels40"][idx]), size))
    save_png(out / split / "depth" / name, resize_nearest(to_depth_mm(data["depths"][idx]), size))


def main(argv: list[str] | None = None) -> int:
    """Prepare NYUv2; returns 0 (raises PrepareError on bad input)."""
    args = parse_args(argv)
    data = load_npz(args.npz)
    n = len(data["images"])
    splits = {s: [int(i) for i in data[f"{s}_idx"]][: args.limit] for s in ("train", "test")}
    bad = [i for ids in splits.values() for i in ids if not 0 <= i < n]
    if bad:
        raise PrepareError(f"{args.npz}: split indices {bad[:5]} outside 0..{n - 1}; "
                           f"train_idx/test_idx must be 0-based (splits.mat is 1-based).")
    todo = [(s, i) for s, ids in splits.items() for i in ids]
    with atomic_output_dir(args.out, args.overwrite) as tmp:
        for split, idx in tqdm(todo, desc="nyuv2", unit="img"):
            prepare_sample(data, idx, split, tmp, args.size)
        write_marker(tmp, {
            "dataset": "nyuv2", "format_version": 1,
            "splits": {s: len(ids) for s, ids in splits.items()},
            "size": list(args.size) if args.size else None,
            "labels": "40 classes as 0..39, 255 = unlabeled (file label 0)",
            "depth": "uint16 millimetres, 0 = invalid",
            "created_by": "data_scripts/prepare_nyuv2.py",
        })
    print(f"NYUv2 ready in {args.out}: " + ", ".join(f"{s} {len(i)}" for s, i in splits.items()))
    return 0


if __name__ == "__main__":
    run_cli(main)
