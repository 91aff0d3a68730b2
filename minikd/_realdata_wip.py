"""Real data sets: Cityscapes, NYUv2 and GTA5 read from folders prepared by data_scripts/.

Work-in-progress home of the real-data section of ``minikd/data.py`` (the lead pastes it there).
Every loader returns the same item format as the embedded toy data set, so code written for the
toy data runs unchanged on real data:

* ``"image"``  float32 [3,H,W] in [0,1] (before Normalize),
* ``"mask"``   int64 [H,W], class ids 0..C-1 and 255 for void,
* ``"depth"``  float32 [H,W] in metres, 0 = invalid (Cityscapes with ``with_depth=True``, NYUv2),
* ``"index"``  int, the data set index.

None of these data sets can be downloaded automatically (registration, licences). Download the
official archives by hand and run the matching ``data_scripts/prepare_*.py`` script; see
``data_scripts/README.md`` for the prepared folder layouts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# ---------------------------------------------------------------------------------------------
# Class definitions
# ---------------------------------------------------------------------------------------------

#: The 19 Cityscapes evaluation classes, in trainId order (cityscapesScripts helpers/labels.py).
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
#: Official Cityscapes colours of the 19 trainIds.
CITYSCAPES_PALETTE: list[tuple[int, int, int]] = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
]
#: Official Cityscapes labelId -> trainId for the 19 evaluated classes; every other labelId
#: (unlabeled, ego vehicle, parking, rail track, guard rail, bridge, tunnel, polegroup, caravan,
#: trailer, ...) becomes 255.
CITYSCAPES_ID_TO_TRAINID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
    25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
_TRAINID_LUT = np.full(256, 255, dtype=np.int64)
_TRAINID_LUT[list(CITYSCAPES_ID_TO_TRAINID)] = list(CITYSCAPES_ID_TO_TRAINID.values())

#: Largest labelId in a Cityscapes ``*_gtFine_labelIds.png`` (license plate, -1, is never drawn).
CITYSCAPES_MAX_LABEL_ID = 33
#: GTA5 label maps use the Cityscapes labelIds and, in a few images, 34 (no Cityscapes class).
GTA5_MAX_LABEL_ID = 34

#: The 40 NYUv2 classes of Gupta et al. (CVPR 2013), in label order 0..39 (file labels 1..40).
NYUV2_CLASSES: tuple[str, ...] = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
    "floor mat", "clothes", "ceiling", "books", "refrigerator", "television", "paper", "towel",
    "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
    "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop",
)


def _bit_palette(n: int) -> list[tuple[int, int, int]]:
    """PASCAL VOC bit-interleaving colour map (NYUv2 has no official palette); skips black."""
    colours = []
    for i in range(1, n + 1):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours.append((r, g, b))
    return colours


#: Colours for the 40 NYUv2 classes (PASCAL VOC colour map of ids 1..40).
NYUV2_PALETTE: list[tuple[int, int, int]] = _bit_palette(40)

_PREPARE_COMMAND = {
    "Cityscapes": "python data_scripts/prepare_cityscapes.py --archives <folder with the 4 zips> "
                  "--out {root} [--with-depth] [--size 512x1024]",
    "NYUv2": "python data_scripts/prepare_nyuv2.py --npz <nyuv2_labeled.npz> --out {root} "
             "[--size 240x320]",
    "GTA5": "python data_scripts/prepare_gta5.py --archives <folder with NN_images.zip, "
            "NN_labels.zip> --out {root} [--size 512x1024]",
}

# ---------------------------------------------------------------------------------------------
# Small helpers shared by the loaders
# ---------------------------------------------------------------------------------------------


def _not_prepared_error(dataset: str, root: Path, what: str) -> FileNotFoundError:
    """Build the FileNotFoundError every loader raises for a missing or wrong root."""
    hint = ""
    if root.is_dir():
        nested = root / dataset.lower()
        if nested.is_dir():
            hint = f" Did you mean root={str(nested)!r}?"
        elif any(root.glob("*.zip")) or any(root.glob("*.npz")):
            hint = " This folder holds downloaded archives, not a prepared data set."
    command = _PREPARE_COMMAND[dataset].format(root=root)
    return FileNotFoundError(
        f"{dataset}: {what} not found under root {str(root)!r}.{hint} Expected a folder "
        f"prepared by data_scripts (layouts in data_scripts/README.md). Prepare it with:\n"
        f"    {command}"
    )


def _check_split_name(dataset: str, split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise ValueError(f"{dataset}: split={split!r}; expected one of {allowed}.")


def _load_rgb_png(path: Path) -> torch.Tensor:
    """PNG/JPEG -> float32 [3,H,W] in [0,1]."""
    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def _load_png_array(path: Path) -> np.ndarray:
    """A single-channel PNG as a numpy array (uint8, or uint16/int32 for 16-bit PNGs)."""
    with Image.open(path) as img:
        arr = np.array(img)
    if arr.ndim != 2:
        raise ValueError(
            f"{path}: expected a single-channel label/depth PNG, got an array of shape "
            f"{arr.shape}. Colour-coded label images (e.g. *_gtFine_color.png) are not "
            f"labels; prepare the data set with data_scripts/."
        )
    return arr


def _list_bad_values(arr: np.ndarray, bad: np.ndarray) -> str:
    values = np.unique(arr[bad])
    shown = ", ".join(str(int(v)) for v in values[:10])
    return shown + (f", ... ({len(values)} distinct)" if len(values) > 10 else "")


def _check_label_range(mask: np.ndarray, num_classes: int, path: Path | str, hint: str) -> None:
    """Raise a ValueError if ``mask`` holds values other than 0..num_classes-1 and 255.

    Args:
        mask: integer label map [H,W].
        num_classes: C, the number of classes.
        path: the file the mask came from (named in the message).
        hint: what the user probably did and how to fix it.
    """
    bad = (mask >= num_classes) & (mask != 255) | (mask < 0)
    if bad.any():
        raise ValueError(
            f"{path}: labels contain {_list_bad_values(mask, bad)}; expected 0..{num_classes - 1} "
            f"or 255 (ignore). {hint}"
        )


def labelids_to_trainids(label_ids: np.ndarray, max_id: int, path: Path | str,
                         script: str) -> np.ndarray:
    """Map Cityscapes labelIds to the 19 trainIds (everything else -> 255).

    Args:
        label_ids: integer array of Cityscapes labelIds (0..max_id).
        max_id: largest labelId allowed (33 for Cityscapes, 34 for GTA5).
        path: the file the labels came from (named in error messages).
        script: the data_scripts command that prepares this data set.

    Returns:
        int64 array of the same shape with values 0..18 or 255.

    References:
        Cordts et al., "The Cityscapes Dataset", CVPR 2016; cityscapesScripts labels.py.
    """
    bad = (label_ids > max_id) | (label_ids < 0)
    if bad.any():
        looks_train = bool(np.isin(label_ids, list(range(19)) + [255]).all())
        guess = ("These look like trainIds (0..18, 255) saved where labelIds belong. "
                 if looks_train else "")
        raise ValueError(
            f"{path}: labels contain {_list_bad_values(label_ids, bad)}; expected Cityscapes "
            f"labelIds 0..{max_id} (the loader maps them to trainIds 0..18 / 255 itself). "
            f"{guess}Did you pass trainIds instead of labelIds? Run {script}."
        )
    return _TRAINID_LUT[label_ids.astype(np.int64)]


def disparity_to_depth(disparity_png: np.ndarray, baseline: float, fx: float) -> np.ndarray:
    """Cityscapes 16-bit disparity PNG values -> depth in metres (0 = invalid).

    The PNG stores p = 256 * d + 1 for a disparity of d pixels and p = 0 where the stereo
    matcher found nothing. So d = (p - 1) / 256 for p > 0 and depth = baseline * fx / d.
    p == 1 (d = 0, a point at infinity) is treated as invalid too.

    Args:
        disparity_png: uint16 (or int) array [H,W] as stored in ``*_disparity.png``.
        baseline: stereo baseline in metres (camera JSON ``extrinsic.baseline``).
        fx: focal length in pixels (camera JSON ``intrinsic.fx``).

    Returns:
        float32 depth [H,W] in metres, 0 where invalid.

    References:
        Cityscapes README ("disparity"), cityscapesScripts.
        Taught in notebooks/00_toycity_and_data.ipynb.
    """
    p = disparity_png.astype(np.float64)
    d = (p - 1.0) / 256.0
    valid = d > 0
    depth = np.zeros_like(p)
    depth[valid] = baseline * fx / d[valid]
    return depth.astype(np.float32)


def _check_same_hw(item: dict, path: Path, script: str) -> None:
    """Raise a ValueError if a per-pixel map does not match the image size."""
    size = tuple(item["image"].shape[1:])
    for key in ("mask", "depth"):
        if key in item and tuple(item[key].shape) != size:
            raise ValueError(
                f"{path}: {key} is {tuple(item[key].shape)} but the image is {size} (H, W). "
                f"Resize labels/depth together with the images: run {script}."
            )


def _apply_transform(item: dict, transform: Callable[[dict], dict] | None) -> dict:
    return transform(item) if transform is not None else item


# ---------------------------------------------------------------------------------------------
# Cityscapes
# ---------------------------------------------------------------------------------------------


class Cityscapes(torch.utils.data.Dataset):
    """Cityscapes fine annotations (19 trainIds) with optional depth from stereo disparity.

    Reads a folder prepared by ``data_scripts/prepare_cityscapes.py`` (or an official
    extraction of the same zips, which has the same layout)::

        root/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
        root/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
        root/disparity/<split>/<city>/<city>_<seq>_<frame>_disparity.png   (with_depth)
        root/camera/<split>/<city>/<city>_<seq>_<frame>_camera.json        (with_depth)

    Labels are stored as Cityscapes labelIds and mapped to the 19 trainIds on loading
    (everything else -> 255). Depth = baseline * fx / ((p - 1) / 256) from the disparity PNG.

    Args:
        root: prepared folder.
        split: "train", "val" or "test" (official test labels are all void).
        with_depth: also return "depth" [H,W] in metres (0 = invalid).
        transform: optional callable dict -> dict (a joint transform).

    References:
        Cordts et al., "The Cityscapes Dataset for Semantic Urban Scene Understanding", CVPR 2016.
        Taught in notebooks/00_toycity_and_data.ipynb.
    """

    CLASSES = CITYSCAPES_CLASSES
    PALETTE = CITYSCAPES_PALETTE
    NUM_CLASSES = len(CITYSCAPES_CLASSES)
    ID_TO_TRAINID = CITYSCAPES_ID_TO_TRAINID
    SCRIPT = "data_scripts/prepare_cityscapes.py"

    def __init__(self, root: str | Path, split: str = "train", with_depth: bool = False,
                 transform: Callable[[dict], dict] | None = None) -> None:
        _check_split_name("Cityscapes", split, ("train", "val", "test"))
        self.root, self.split = Path(root), split
        self.with_depth, self.transform = with_depth, transform
        image_dir = self.root / "leftImg8bit" / split
        if not image_dir.is_dir():
            raise _not_prepared_error("Cityscapes", self.root,
                                      f"leftImg8bit/{split}/<city>/ (images)")
        self.images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
        if not self.images:
            raise _not_prepared_error("Cityscapes", self.root,
                           f"*_leftImg8bit.png files in leftImg8bit/{split}/<city>/")
        self._check_first_sample()

    def _paths(self, i: int) -> dict[str, Path]:
        image = self.images[i]
        stem, city = image.name[: -len("_leftImg8bit.png")], image.parent.name
        sub = Path(self.split) / city
        return {
            "label": self.root / "gtFine" / sub / f"{stem}_gtFine_labelIds.png",
            "disparity": self.root / "disparity" / sub / f"{stem}_disparity.png",
            "camera": self.root / "camera" / sub / f"{stem}_camera.json",
        }

    def _check_first_sample(self) -> None:
        paths = self._paths(0)
        wanted = ["label"] + (["disparity", "camera"] if self.with_depth else [])
        for key in wanted:
            if not paths[key].is_file():
                extra = " (prepare with --with-depth)" if key != "label" else ""
                rel = paths[key].relative_to(self.root)
                raise _not_prepared_error("Cityscapes", self.root, f"{rel}{extra}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        paths = self._paths(i)
        raw = _load_png_array(paths["label"])
        item = {
            "image": _load_rgb_png(self.images[i]),
            "mask": torch.from_numpy(labelids_to_trainids(
                raw, CITYSCAPES_MAX_LABEL_ID, paths["label"], self.SCRIPT)),
            "index": i,
        }
        if self.with_depth:
            camera = json.loads(paths["camera"].read_text())
            depth = disparity_to_depth(_load_png_array(paths["disparity"]),
                                       camera["extrinsic"]["baseline"],
                                       camera["intrinsic"]["fx"])
            item["depth"] = torch.from_numpy(depth)
        _check_same_hw(item, paths["label"], self.SCRIPT)
        return _apply_transform(item, self.transform)


# ---------------------------------------------------------------------------------------------
# NYUv2
# ---------------------------------------------------------------------------------------------


class NYUv2(torch.utils.data.Dataset):
    """NYU Depth v2 labelled set: 40-class labels and metric depth (795 train / 654 test).

    Reads a folder prepared by ``data_scripts/prepare_nyuv2.py``::

        root/<split>/image/<idx>.png    RGB uint8
        root/<split>/label40/<idx>.png  uint8: classes 0..39 (file 1..40 shifted), 255 = unlabeled
        root/<split>/depth/<idx>.png    uint16 millimetres, 0 = invalid

    Args:
        root: prepared folder.
        split: "train" or "test".
        transform: optional callable dict -> dict (a joint transform).

    References:
        Silberman et al., "Indoor Segmentation and Support Inference from RGBD Images", ECCV 2012;
        Gupta et al., CVPR 2013 (the 40 classes). Taught in notebooks/00_toycity_and_data.ipynb.
    """

    CLASSES = NYUV2_CLASSES
    PALETTE = NYUV2_PALETTE
    NUM_CLASSES = len(NYUV2_CLASSES)
    SCRIPT = "data_scripts/prepare_nyuv2.py"

    def __init__(self, root: str | Path, split: str = "train",
                 transform: Callable[[dict], dict] | None = None) -> None:
        _check_split_name("NYUv2", split, ("train", "test"))
        self.root, self.split, self.transform = Path(root), split, transform
        image_dir = self.root / split / "image"
        if not image_dir.is_dir():
            raise _not_prepared_error(
                "NYUv2", self.root, f"{split}/image/ (with {split}/label40/, {split}/depth/)")
        self.images = sorted(image_dir.glob("*.png"))
        if not self.images:
            raise _not_prepared_error("NYUv2", self.root, f"*.png files in {split}/image/")
        for sub in ("label40", "depth"):
            if not (self.root / split / sub / self.images[0].name).is_file():
                raise _not_prepared_error("NYUv2", self.root,
                                          f"{split}/{sub}/{self.images[0].name}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        name = self.images[i].name
        label_path = self.root / self.split / "label40" / name
        mask = _load_png_array(label_path).astype(np.int64)
        _check_label_range(mask, self.NUM_CLASSES, label_path,
                   "Raw NYUv2 labels use 0 = unlabeled and 1..40; did you copy them without "
                   f"the shift? Run {self.SCRIPT}.")
        depth_mm = _load_png_array(self.root / self.split / "depth" / name)
        item = {
            "image": _load_rgb_png(self.images[i]),
            "mask": torch.from_numpy(mask),
            "depth": torch.from_numpy(depth_mm.astype(np.float32) / 1000.0),
            "index": i,
        }
        _check_same_hw(item, label_path, self.SCRIPT)
        return _apply_transform(item, self.transform)


# ---------------------------------------------------------------------------------------------
# GTA5
# ---------------------------------------------------------------------------------------------


class GTA5(torch.utils.data.Dataset):
    """GTA5 ("Playing for Data") synthetic street scenes, labels mapped to Cityscapes trainIds.

    Reads a folder prepared by ``data_scripts/prepare_gta5.py``::

        root/images/<nnnnn>.png   RGB
        root/labels/<nnnnn>.png   Cityscapes labelIds (mapped to the 19 trainIds on loading)

    The whole set is the training source of GTA5 -> Cityscapes domain adaptation; there is no
    split argument.

    Args:
        root: prepared folder.
        transform: optional callable dict -> dict (a joint transform).

    References:
        Richter et al., "Playing for Data: Ground Truth from Computer Games", ECCV 2016.
        Taught in notebooks/00_toycity_and_data.ipynb.
    """

    CLASSES = CITYSCAPES_CLASSES
    PALETTE = CITYSCAPES_PALETTE
    NUM_CLASSES = len(CITYSCAPES_CLASSES)
    ID_TO_TRAINID = CITYSCAPES_ID_TO_TRAINID
    SCRIPT = "data_scripts/prepare_gta5.py"

    def __init__(self, root: str | Path,
                 transform: Callable[[dict], dict] | None = None) -> None:
        self.root, self.transform = Path(root), transform
        if not (self.root / "images").is_dir():
            raise _not_prepared_error("GTA5", self.root, "images/ (with labels/)")
        self.images = sorted((self.root / "images").glob("*.png"))
        if not self.images:
            raise _not_prepared_error("GTA5", self.root, "*.png files in images/")
        if not (self.root / "labels" / self.images[0].name).is_file():
            raise _not_prepared_error("GTA5", self.root, f"labels/{self.images[0].name}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        label_path = self.root / "labels" / self.images[i].name
        raw = _load_png_array(label_path)
        item = {
            "image": _load_rgb_png(self.images[i]),
            "mask": torch.from_numpy(
                labelids_to_trainids(raw, GTA5_MAX_LABEL_ID, label_path, self.SCRIPT)),
            "index": i,
        }
        _check_same_hw(item, label_path, self.SCRIPT)
        return _apply_transform(item, self.transform)
