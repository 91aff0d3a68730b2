"""Prepare GTA5 ("Playing for Data") for minikd from the official zips downloaded by hand.

Reads (from --archives, names as on https://download.visinf.tu-darmstadt.de/data/from_games/):
    01_images.zip ... 10_images.zip   images/<nnnnn>.png
    01_labels.zip ... 10_labels.zip   labels/<nnnnn>.png   (Cityscapes labelIds, palette PNG)

Any subset of the ten parts works, as long as each NN_images.zip comes with its NN_labels.zip.
Writes --out:
    images/<nnnnn>.png   RGB
    labels/<nnnnn>.png   single-channel Cityscapes labelIds (the loader maps them to trainIds)
    minikd_prepared.json

A few GTA5 label maps differ in size from their image; they are resized (nearest) to the image
size. With --size, images are resized bilinearly and labels nearest.

Example:
    python data_scripts/prepare_gta5.py --archives ~/Downloads/gta5 --out data/gta5 \
        --size 512x1024
"""

from __future__ import annotations

import argparse
import re
from contextlib import ExitStack, closing
from pathlib import Path

import numpy as np
from _common import (
    Archive,
    MissingMembersError,
    PrepareError,
    add_common_args,
    atomic_output_dir,
    open_image,
    require_members,
    resize_nearest,
    resize_rgb,
    run_cli,
    save_png,
    write_marker,
)
from tqdm import tqdm

URL = "https://download.visinf.tu-darmstadt.de/data/from_games/"
IMAGE_RE = re.compile(r"^images/(\d+\.png)$")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archives", type=Path, required=True,
                        help="folder holding NN_images.zip and NN_labels.zip")
    add_common_args(parser)
    return parser.parse_args(argv)


def find_parts(folder: Path) -> list[tuple[Path, Path]]:
    """Pairs (NN_images.zip, NN_labels.zip) found in ``folder``."""
    images = sorted(Path(folder).glob("[0-9][0-9]_images.zip"))
    if not images:
        raise PrepareError(
            f"no NN_images.zip (01_images.zip ... 10_images.zip) in {str(folder)!r}. "
            f"Download them by hand from {URL}.")
    pairs = []
    for image_zip in images:
        label_zip = image_zip.with_name(image_zip.name.replace("_images", "_labels"))
        if not label_zip.is_file():
            raise PrepareError(f"{image_zip.name} has no {label_zip.name} beside it in "
                               f"{str(folder)!r}; download that part's labels too.")
        pairs.append((image_zip, label_zip))
    return pairs


def plan(parts: list[tuple[Archive, Archive]], limit: int | None) -> list[tuple[int, str]]:
    """(part index, file name) of every sample; checks each image has its label."""
    todo = []
    for k, (images, labels) in enumerate(parts):
        names = sorted(m[1] for m in map(IMAGE_RE.match, images.names()) if m)
        if not names:
            raise MissingMembersError(f"{images.path.name} has no images/<nnnnn>.png members.")
        require_members(labels, [f"labels/{n}" for n in names],
                        f"for the images of {images.path.name}")
        todo += [(k, n) for n in names]
    return todo[:limit]


def prepare_sample(images: Archive, labels: Archive, name: str, out: Path,
                   size: tuple[int, int] | None) -> bool:
    """Write one image/label pair; returns True if the label had to be fitted to the image."""
    img = open_image(images.read(f"images/{name}")).convert("RGB")
    label = np.asarray(open_image(labels.read(f"labels/{name}")), dtype=np.uint8)
    if label.ndim != 2:
        raise PrepareError(f"{labels.path.name}: labels/{name} has shape {label.shape}; expected "
                           f"a single-channel (palette) PNG of Cityscapes labelIds.")
    mismatch = label.shape != (img.height, img.width)
    label = resize_nearest(label, (img.height, img.width))
    save_png(out / "images" / name, resize_rgb(img, size))
    save_png(out / "labels" / name, resize_nearest(label, size))
    return mismatch


def main(argv: list[str] | None = None) -> int:
    """Prepare GTA5; returns 0 (raises PrepareError on bad input)."""
    args = parse_args(argv)
    pairs = find_parts(args.archives)
    with ExitStack() as stack:
        parts = [(stack.enter_context(closing(Archive(i))),
                  stack.enter_context(closing(Archive(la))))
                 for i, la in pairs]
        todo = plan(parts, args.limit)
        with atomic_output_dir(args.out, args.overwrite) as tmp:
            fitted = sum(prepare_sample(*parts[k], name, tmp, args.size)
                         for k, name in tqdm(todo, desc="gta5", unit="img"))
            write_marker(tmp, {
                "dataset": "gta5", "format_version": 1, "count": len(todo),
                "size": list(args.size) if args.size else None,
                "labels": "Cityscapes labelIds; minikd maps them to the 19 trainIds on loading",
                "labels_fitted_to_image_size": int(fitted),
                "created_by": "data_scripts/prepare_gta5.py",
            })
    print(f"GTA5 ready in {args.out}: {len(todo)} images ({fitted} labels fitted to image size)")
    return 0


if __name__ == "__main__":
    run_cli(main)
