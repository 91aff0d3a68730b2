"""Prepare Cityscapes for minikd from the official zips downloaded by hand.

Reads (from --archives, names as on https://www.cityscapes-dataset.com/downloads/):
    leftImg8bit_trainvaltest.zip   images        leftImg8bit/<split>/<city>/*_leftImg8bit.png
    gtFine_trainvaltest.zip        fine labels   gtFine/<split>/<city>/*_gtFine_labelIds.png
    disparity_trainvaltest.zip     (--with-depth) disparity/<split>/<city>/*_disparity.png
    camera_trainvaltest.zip        (--with-depth) camera/<split>/<city>/*_camera.json

Writes --out in the same layout (only labelIds of gtFine are kept), optionally resized, plus
minikd_prepared.json; ``minikd.data.Cityscapes(out, split, with_depth=...)`` reads it.

Resizing: images bilinear, labelIds and disparity nearest. A disparity is measured in pixels, so
it scales with the image width: d' = d * new_W / old_W; the script stores p' = 256 * d' + 1 and
rescales the camera intrinsics (fx, u0 by new_W / old_W; fy, v0 by new_H / old_H) so that
depth = baseline * fx' / d' = baseline * fx / d is unchanged.

Example:
    python data_scripts/prepare_cityscapes.py --archives ~/Downloads --out data/cityscapes \
        --with-depth --size 512x1024
"""

from __future__ import annotations

import argparse
import json
import re
from contextlib import ExitStack, closing
from pathlib import Path

import numpy as np
from _common import (
    Archive,
    MissingMembersError,
    add_common_args,
    atomic_output_dir,
    find_archive,
    open_image,
    require_members,
    resize_nearest,
    resize_rgb,
    run_cli,
    save_png,
    write_marker,
)
from tqdm import tqdm

URL = "https://www.cityscapes-dataset.com/downloads/"
ARCHIVES = {
    "images": "leftImg8bit_trainvaltest.zip",
    "labels": "gtFine_trainvaltest.zip",
    "disparity": "disparity_trainvaltest.zip",
    "camera": "camera_trainvaltest.zip",
}
IMAGE_RE = re.compile(r"^leftImg8bit/(train|val|test)/([^/]+)/([^/]+)_leftImg8bit\.png$")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archives", type=Path, required=True,
                        help="folder holding the official Cityscapes zips")
    parser.add_argument("--splits", nargs="+", default=["train", "val"],
                        choices=["train", "val", "test"], help="default: train val")
    parser.add_argument("--with-depth", action="store_true",
                        help="also prepare disparity + camera (needs those two zips)")
    add_common_args(parser)
    return parser.parse_args(argv)


def member_paths(split: str, city: str, stem: str) -> dict[str, str]:
    """Official member names of one sample (also its relative path in the prepared folder)."""
    return {
        "images": f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png",
        "labels": f"gtFine/{split}/{city}/{stem}_gtFine_labelIds.png",
        "disparity": f"disparity/{split}/{city}/{stem}_disparity.png",
        "camera": f"camera/{split}/{city}/{stem}_camera.json",
    }


def plan(archives: dict[str, Archive], splits: list[str], limit: int | None) -> list[dict]:
    """List the samples to prepare and check that every archive has their members."""
    samples: dict[str, list[dict]] = {split: [] for split in splits}
    for name in sorted(archives["images"].names()):
        match = IMAGE_RE.match(name)
        if match and match[1] in samples:
            samples[match[1]].append(member_paths(*match.groups()))
    for split, items in samples.items():
        if not items:
            raise MissingMembersError(
                f"{archives['images'].path.name} has no images under leftImg8bit/{split}/; "
                f"is it {ARCHIVES['images']}?")
    todo = [s for items in samples.values() for s in items[:limit]]
    for key, archive in archives.items():
        if key != "images":
            require_members(archive, [s[key] for s in todo], f"for the {key} of these images")
    return todo


def scale_disparity(p: np.ndarray, factor: float) -> np.ndarray:
    """Rescale a disparity PNG (p = 256 d + 1, 0 = invalid) for a width change by ``factor``."""
    d = (p.astype(np.float64) - 1.0) / 256.0
    scaled = np.clip(np.round(d * factor * 256.0) + 1.0, 1, 65535)
    return np.where(p > 0, scaled, 0).astype(np.uint16)


def scale_camera(camera: dict, sx: float, sy: float) -> dict:
    """Camera JSON with intrinsics rescaled for an image resized by (sx, sy)."""
    camera = json.loads(json.dumps(camera))
    intr = camera["intrinsic"]
    intr["fx"], intr["u0"] = intr["fx"] * sx, intr["u0"] * sx
    intr["fy"], intr["v0"] = intr["fy"] * sy, intr["v0"] * sy
    return camera


def prepare_sample(archives: dict[str, Archive], sample: dict, out: Path,
                   size: tuple[int, int] | None) -> None:
    img = open_image(archives["images"].read(sample["images"]))
    save_png(out / sample["images"], resize_rgb(img, size))
    labels = np.asarray(open_image(archives["labels"].read(sample["labels"])), dtype=np.uint8)
    save_png(out / sample["labels"], resize_nearest(labels, size))
    if "disparity" not in archives:
        return
    disp = np.asarray(open_image(archives["disparity"].read(sample["disparity"])))
    camera = json.loads(archives["camera"].read(sample["camera"]))
    if size is not None:
        sx, sy = size[1] / disp.shape[1], size[0] / disp.shape[0]
        disp = scale_disparity(resize_nearest(disp, size), sx)
        camera = scale_camera(camera, sx, sy)
    save_png(out / sample["disparity"], disp.astype(np.uint16))
    (out / sample["camera"]).parent.mkdir(parents=True, exist_ok=True)
    (out / sample["camera"]).write_text(json.dumps(camera, indent=4))


def main(argv: list[str] | None = None) -> int:
    """Prepare Cityscapes; returns 0 (raises PrepareError on bad input)."""
    args = parse_args(argv)
    keys = ["images", "labels"] + (["disparity", "camera"] if args.with_depth else [])
    paths = {k: find_archive(args.archives, ARCHIVES[k], URL) for k in keys}
    with ExitStack() as stack:
        archives = {k: stack.enter_context(closing(Archive(p))) for k, p in paths.items()}
        todo = plan(archives, args.splits, args.limit)
        counts = {s: sum(m["images"].split("/")[1] == s for m in todo) for s in args.splits}
        with atomic_output_dir(args.out, args.overwrite) as tmp:
            for sample in tqdm(todo, desc="cityscapes", unit="img"):
                prepare_sample(archives, sample, tmp, args.size)
            write_marker(tmp, {
                "dataset": "cityscapes", "format_version": 1, "splits": counts,
                "size": list(args.size) if args.size else None, "with_depth": args.with_depth,
                "labels": "Cityscapes labelIds; minikd maps them to the 19 trainIds on loading",
                "disparity": "p = 256 d + 1 in pixels of the stored size; intrinsics rescaled",
                "created_by": "data_scripts/prepare_cityscapes.py",
            })
    print(f"Cityscapes ready in {args.out}: {counts}")
    return 0


if __name__ == "__main__":
    run_cli(main)
