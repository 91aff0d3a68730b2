"""Data for minikd: the ToyCity street-scene generator, joint transforms and the quick/full switch.

ToyCity is a procedural, GTA5 -> Cityscapes in miniature: a pinhole camera looks down a street of
buildings, sidewalks, cars, people, poles, signs and traffic lights. Every image comes with a
semantic mask (classes named as in Cityscapes), metric depth along the optical axis and, on
request, a mask of unknown objects for out-of-distribution detection. Two domains ("source",
game-like; "target", real-like) give a domain shift. Nothing is downloaded: a sample is rendered
from a per-item random seed (about 4-7 ms at 64x128 and 10-18 ms at 128x256 on one core
of a 2-core CPU; cache=True serves repeated reads in 0.03-0.1 ms).

How it is rendered (a tiny ray caster, all numpy):
  1. a *scene description* is drawn at random: camera, street layout, and a display list of
     primitives (axis-aligned boxes and ellipsoids in metres, each with a class, a colour, a
     material and an optional cut-out shape);
  2. the ground plane is intersected with every pixel's ray; every primitive is intersected with
     the rays inside its projected bounding box, all primitives at once, and a z-buffer keeps the
     nearest hit per pixel;
  3. surfaces are shaded and textured, the sky fills what nothing hit, and a camera model adds
     haze, colour grading, exposure, blur and sensor noise.

Taught in notebooks/00_toycity_and_data.ipynb; used by every notebook.

References:
    Landgraf et al., "DUDES: Deep Uncertainty Distillation using Ensembles for Semantic
    Segmentation", 2023 (augmentations: random scale 0.5-2, crop, flip).
    Landgraf et al., "EMUFormer", 2024 (same augmentations for segmentation and depth).
    Cordts et al., "The Cityscapes Dataset", CVPR 2016 (class names, colours, trainIds).
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_ID_TO_TRAINID",
    "CITYSCAPES_MAX_LABEL_ID",
    "CITYSCAPES_PALETTE",
    "GTA5",
    "GTA5_MAX_LABEL_ID",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NYUV2_CLASSES",
    "NYUV2_PALETTE",
    "UNET_KD_CLASSES",
    "UNET_KD_FROM_TRAINID",
    "UNET_KD_PALETTE",
    "Cityscapes",
    "ColorJitter",
    "Compose",
    "NYUv2",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomScale",
    "Relabel",
    "Resize",
    "ToyCity",
    "Transformed",
    "Unlabelled",
    "VoidAsUnknown",
    "class_legend",
    "colorize",
    "disparity_to_depth",
    "dudes_sets",
    "eval_transforms",
    "get_mode",
    "labelids_to_trainids",
    "train_transforms",
    "unet_kd_class_map",
    "unet_kd_sets",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255


def get_mode() -> str:
    """Return the run mode, "quick" (default) or "full", read from the MINIKD_MODE variable.

    Quick mode: tiny networks and small ToyCity images on a CPU (about 3 minutes a notebook).
    Full mode: the papers' settings and the real data sets.

    Returns:
        "quick" or "full".

    Raises:
        ValueError: if MINIKD_MODE holds anything else.
    """
    mode = os.environ.get("MINIKD_MODE", "quick").strip().lower()
    if mode not in ("quick", "full"):
        raise ValueError(
            f"MINIKD_MODE={os.environ.get('MINIKD_MODE')!r}; expected 'quick' or 'full'. "
            "Unset it for quick mode or run e.g. `MINIKD_MODE=full jupyter lab`."
        )
    return mode


# ---------------------------------------------------------------------------------------------
# Classes. Ids 0..15 equal the Cityscapes trainIds; bicycle is 16 here and 18 in Cityscapes.
# ---------------------------------------------------------------------------------------------
(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN, VEGETATION, TERRAIN,
 SKY, PERSON, RIDER, CAR, TRUCK, BUS, BICYCLE) = range(17)

NEAR = 1.0        # metres: nothing closer than this is drawn (valid depth starts here)
MAX_DEPTH = 100.0  # metres: depth beyond this is marked invalid (0)


# ---------------------------------------------------------------------------------------------
# Domain styles: the same geometry rules, a different camera and a different look.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Style:
    """Everything that differs between the game-like source and the real-like target domain."""

    cam_height: tuple[float, float]   # metres
    pitch_deg: tuple[float, float]    # mean, std (positive = looking down)
    roll_sd_deg: float
    focal: tuple[float, float]        # focal length as a fraction of the image width
    road: tuple
    sidewalk: tuple
    building: tuple
    glass: tuple
    vegetation: tuple
    terrain: tuple
    car_extra: tuple                  # car colours besides the building colours
    clothes: tuple
    sky_zenith: tuple
    sky_horizon: tuple
    texture: float                    # strength of surface texture
    ambient: tuple[float, float]      # ambient light share (1 = overcast, no shading)
    saturation: tuple[float, float]
    haze_visibility: tuple[float, float]  # metres: contrast falls to 1/e at this distance
    blur_px: tuple[float, float]      # gaussian sigma in pixels at width 128
    noise_sd: tuple[float, float]
    tint_sd: float
    hood_p: float


_SOURCE = _Style(
    cam_height=(1.2, 1.5), pitch_deg=(1.5, 0.7), roll_sd_deg=0.6, focal=(0.85, 0.95),
    road=((0.30, 0.30, 0.33), (0.25, 0.25, 0.27), (0.36, 0.35, 0.37)),
    sidewalk=((0.62, 0.60, 0.58), (0.70, 0.45, 0.40), (0.33, 0.33, 0.35), (0.55, 0.55, 0.62)),
    building=((0.85, 0.45, 0.30), (0.95, 0.80, 0.45), (0.90, 0.88, 0.80), (0.45, 0.55, 0.75),
              (0.70, 0.30, 0.25), (0.55, 0.55, 0.58), (0.95, 0.95, 0.95), (0.60, 0.75, 0.55)),
    glass=((0.15, 0.25, 0.45), (0.10, 0.12, 0.18), (0.35, 0.50, 0.70)),
    vegetation=((0.20, 0.60, 0.15), (0.15, 0.45, 0.10), (0.35, 0.65, 0.20)),
    terrain=((0.45, 0.65, 0.20), (0.55, 0.50, 0.30), (0.40, 0.55, 0.25)),
    car_extra=((0.80, 0.10, 0.10), (0.10, 0.20, 0.70), (0.08, 0.08, 0.08), (0.90, 0.90, 0.92),
               (0.60, 0.60, 0.65), (0.20, 0.50, 0.30), (0.30, 0.35, 0.33)),
    clothes=((0.10, 0.10, 0.10), (0.20, 0.25, 0.50), (0.80, 0.10, 0.10), (0.90, 0.90, 0.85),
             (0.50, 0.50, 0.50), (0.20, 0.50, 0.20), (0.90, 0.70, 0.10), (0.45, 0.30, 0.20),
             (0.30, 0.30, 0.70), (0.90, 0.50, 0.50)),
    sky_zenith=(0.20, 0.45, 0.95), sky_horizon=(0.65, 0.82, 1.00),
    texture=0.08, ambient=(0.40, 0.55), saturation=(1.15, 1.40), haze_visibility=(250.0, 500.0),
    blur_px=(0.0, 0.0), noise_sd=(0.0, 0.008), tint_sd=0.0, hood_p=0.25,
)

_TARGET = _Style(
    cam_height=(1.5, 1.8), pitch_deg=(0.5, 1.0), roll_sd_deg=1.2, focal=(0.95, 1.05),
    road=((0.36, 0.35, 0.34), (0.31, 0.31, 0.31), (0.42, 0.41, 0.40)),
    sidewalk=((0.52, 0.50, 0.48), (0.47, 0.41, 0.38), (0.40, 0.39, 0.38)),
    building=((0.55, 0.50, 0.45), (0.45, 0.35, 0.30), (0.65, 0.63, 0.60), (0.40, 0.42, 0.45),
              (0.60, 0.55, 0.45), (0.50, 0.47, 0.42)),
    glass=((0.20, 0.22, 0.25), (0.30, 0.32, 0.35)),
    vegetation=((0.22, 0.38, 0.14), (0.28, 0.36, 0.18), (0.18, 0.30, 0.12)),
    terrain=((0.40, 0.45, 0.25), (0.38, 0.40, 0.24)),
    car_extra=((0.50, 0.10, 0.10), (0.15, 0.20, 0.35), (0.10, 0.10, 0.10), (0.75, 0.75, 0.75),
               (0.45, 0.45, 0.47)),
    clothes=((0.12, 0.12, 0.12), (0.25, 0.28, 0.40), (0.50, 0.20, 0.18), (0.70, 0.70, 0.66),
             (0.40, 0.40, 0.40), (0.30, 0.35, 0.25), (0.55, 0.45, 0.30)),
    sky_zenith=(0.40, 0.55, 0.85), sky_horizon=(0.72, 0.80, 0.90),
    texture=0.18, ambient=(0.60, 0.80), saturation=(0.85, 1.05), haze_visibility=(120.0, 300.0),
    blur_px=(0.2, 0.5), noise_sd=(0.008, 0.02), tint_sd=0.05, hood_p=0.5,
)
_STYLES = {"source": _SOURCE, "target": _TARGET}

# Colours shared by both domains (poles, fences, trunks, skin) and the unknown-object colours,
# which nothing else ever uses (neon magenta / violet / cyan).
_POLE_RGB = ((0.45, 0.45, 0.48), (0.15, 0.30, 0.20), (0.12, 0.12, 0.12), (0.60, 0.60, 0.62))
_FENCE_RGB = ((0.20, 0.45, 0.25), (0.50, 0.50, 0.55), (0.55, 0.38, 0.20), (0.15, 0.15, 0.15))
_TRUNK_RGB = ((0.35, 0.25, 0.15), (0.30, 0.30, 0.30))
_SKIN_RGB = ((0.95, 0.75, 0.60), (0.80, 0.60, 0.45), (0.55, 0.38, 0.25), (0.35, 0.22, 0.15))
_UNKNOWN_RGB = ((1.00, 0.00, 1.00), (0.60, 0.00, 1.00), (1.00, 0.10, 0.60), (0.00, 1.00, 1.00))


# ---------------------------------------------------------------------------------------------
# Random helpers and a fixed texture tile.
# ---------------------------------------------------------------------------------------------
_SPLITS = ("train", "val", "test")
_DOMAINS = ("source", "target")
_STREAM_SCENE, _STREAM_UNKNOWN = 0, 1
_TAG = 0x70C17  # keeps ToyCity's random streams apart from any other use of the same seed


def _item_rng(seed: int, split: str, domain: str, index: int, stream: int) -> np.random.Generator:
    """Random generator of one item, from a hash (numpy SeedSequence) of what identifies it.

    Python's hash() is salted per process; SeedSequence is the same on every run and machine.
    The image size is not part of the key, so the same scene can be rendered at any size.
    """
    key = [_TAG, seed, _SPLITS.index(split), _DOMAINS.index(domain), index, stream]
    return np.random.default_rng(np.random.SeedSequence(key))


def _pick(rng: np.random.Generator, options: Sequence) -> np.ndarray:
    """One entry of options, as a float array."""
    return np.asarray(options[int(rng.integers(len(options)))], dtype=np.float32)


def _vary(rng: np.random.Generator, rgb: Sequence[float], amount: float = 0.12) -> np.ndarray:
    """Per-object colour variation: scale each channel by 1 +- amount."""
    return np.asarray(rgb) * rng.uniform(1 - amount, 1 + amount, 3)


def _make_noise_tile(size: int = 64, seed: int = 12345) -> np.ndarray:
    """A periodic smooth noise texture (zero mean, unit std), built once with box blurs."""
    rng = np.random.default_rng(seed)
    tile = np.zeros((size, size))
    for radius, weight in ((8, 1.0), (3, 0.6), (1, 0.4), (0, 0.25)):
        octave = rng.standard_normal((size, size))
        for axis in (0, 1):
            octave = sum(np.roll(octave, s, axis) for s in range(-radius, radius + 1))
        tile += weight * octave / octave.std()
    return ((tile - tile.mean()) / tile.std()).astype(np.float32)


_NOISE = _make_noise_tile()
_NOISE_FLAT = _NOISE.ravel()
_NOISE_BITS = 6  # the tile is 2**6 = 64 texels square, so "% 64" is "& 63" (also for negatives)


def _noise(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Look up the noise tile at texel coordinates (u, v) (any real numbers; wraps around)."""
    mask = (1 << _NOISE_BITS) - 1
    iv = np.floor(v).astype(np.int64)
    iv &= mask
    iv <<= _NOISE_BITS
    iu = np.floor(u).astype(np.int64)
    iu &= mask
    iv |= iu
    return _NOISE_FLAT.take(iv)


# ---------------------------------------------------------------------------------------------
# Camera and canvas (per-pixel buffers).
# ---------------------------------------------------------------------------------------------
@dataclass
class _Camera:
    """Pinhole camera standing at (x, height, 0), looking along +z (world: x right, y up)."""

    x: float
    height: float
    pitch: float  # radians, positive = looking down
    roll: float   # radians
    focal: float  # pixels
    cx: float
    cy: float

    def rotation(self) -> np.ndarray:
        """World-from-camera rotation; camera axes: x right, y down, z forward (optical axis)."""
        cp, sp, cr, sr = np.cos(self.pitch), np.sin(self.pitch), np.cos(self.roll), np.sin(self.roll)
        pitch = np.array([[1, 0, 0], [0, cp, sp], [0, -sp, cp]])
        flip_y = np.diag([1.0, -1.0, 1.0])
        roll = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
        return pitch @ flip_y @ roll


def _rotate(vectors: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """vectors @ rot.T written out elementwise (no BLAS, so bit-identical on every machine)."""
    return sum(vectors[..., j:j + 1] * rot[:, j] for j in range(3))


def _sample_camera(rng: np.random.Generator, style: _Style, size: tuple[int, int],
                   lane_x: float) -> _Camera:
    """Camera height, pitch and roll jitter, focal length and principal point of one image."""
    height, width = size
    return _Camera(
        x=lane_x + rng.uniform(-0.3, 0.3),
        height=rng.uniform(*style.cam_height),
        pitch=np.deg2rad(rng.normal(*style.pitch_deg)),
        roll=np.deg2rad(rng.normal(0.0, style.roll_sd_deg)),
        focal=width * rng.uniform(*style.focal),
        cx=width / 2 + rng.uniform(-0.02, 0.02) * width,
        cy=height / 2 + rng.uniform(-0.02, 0.02) * height,
    )


_MARGIN_PX = 0.25  # safety margin of projected bounding boxes (rounding is ~1e-4 px)
_CORNERS = np.array([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], dtype=bool)
_EDGES = np.array([(i, j) for i in range(8) for j in range(i + 1, 8)
                   if (i ^ j).bit_count() == 1])  # the 12 edges of a box, as corner pairs


class _Canvas:
    """Per-pixel rays and buffers of one image: z-buffer (depth), labels, colours, unknown mask.

    Each pixel's ray is scaled so that its component along the optical axis is 1: a hit at ray
    parameter t then lies at depth t (distance along the optical axis), as depth maps define it.
    """

    def __init__(self, cam: _Camera, height: int, width: int, rng: np.random.Generator,
                 style: _Style):
        self.cam, self.h, self.w = cam, height, width
        self.origin = np.array([cam.x, cam.height, 0.0], dtype=np.float32)
        self.rot = cam.rotation().astype(np.float32)
        u = (np.arange(width, dtype=np.float32) + 0.5 - cam.cx) / cam.focal
        v = (np.arange(height, dtype=np.float32) + 0.5 - cam.cy) / cam.focal
        # World direction of every pixel's camera ray (u, v, 1), one flat array per axis: the
        # rotation written out as (u * R[a, 0] + v * R[a, 1]) + R[a, 2], the products taken on
        # the row and column vectors before broadcasting.
        self.ray_axis, self.inv_axis = [], []
        for a in range(3):
            ray = np.add((v * self.rot[a, 1])[:, None], (u * self.rot[a, 0])[None, :])
            ray += self.rot[a, 2]
            ray = ray.ravel()
            safe = np.where(np.abs(ray) < 1e-6, np.float32(1e-6), ray)
            self.ray_axis.append(ray)
            self.inv_axis.append(np.divide(np.float32(1.0), safe))
        self.zbuf = np.full(height * width, np.inf, np.float32)
        self.label = np.full(height * width, SKY, np.uint8)
        self.color = np.zeros((height * width, 3), np.float32)
        self.unknown = np.zeros(height * width, bool)
        # Lighting: a sun direction and the ambient share of the light.
        elev, azim = np.deg2rad(rng.uniform(25, 65)), rng.uniform(0, 2 * np.pi)
        self.sun = np.array([np.cos(elev) * np.sin(azim), np.sin(elev), np.cos(elev) * np.cos(azim)],
                            dtype=np.float32)
        self.ambient = rng.uniform(*style.ambient)

    def rays_at(self, pix: np.ndarray) -> np.ndarray:
        """Ray directions [len(pix), 3] of the given flat pixel indices."""
        return np.stack([axis[pix] for axis in self.ray_axis], 1)

    def shade(self, cos_sun: np.ndarray) -> np.ndarray:
        """Lambertian shading factor of surfaces whose normal makes cosine cos_sun with the sun."""
        return self.ambient + (1.0 - self.ambient) * 1.4 * np.clip(cos_sun, 0.0, None)

    def project_boxes(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Pixel bounding boxes [K, 4] = (v0, v1, u0, u1) of boxes [lo, hi]; empty if unseen."""
        corners = np.where(_CORNERS[None], hi[:, None], lo[:, None]) - self.origin  # [K, 8, 3]
        cam = _rotate(corners, self.rot.T)
        # Clip against the near plane: keep corners in front of it and add the points where
        # the box's 12 edges cross it, so a box reaching behind the camera stays bounded.
        a, b = cam[:, _EDGES[:, 0]], cam[:, _EDGES[:, 1]]
        with np.errstate(divide="ignore", invalid="ignore"):
            s = (NEAR - a[..., 2]) / (b[..., 2] - a[..., 2])
        frac = np.clip(s, 0, 1)  # = clip(nan_to_num(s), 0, 1): +-inf clip to 1 / 0, NaN -> 0
        frac[np.isnan(frac)] = 0
        crossing = a + frac[..., None] * (b - a)
        pts = np.concatenate([cam, crossing], 1)
        ok = np.concatenate([cam[..., 2] >= NEAR, (s >= 0) & (s <= 1)], 1)
        z = np.maximum(pts[..., 2], NEAR)
        u = self.cam.focal * pts[..., 0] / z + self.cam.cx
        v = self.cam.focal * pts[..., 1] / z + self.cam.cy
        # Pixel j's ray passes through u = j + 0.5: keep the pixels whose centre lies inside
        # the projected extent, widened by _MARGIN_PX for rounding (pixels [v0, v1) x [u0, u1)).
        reg = np.stack([np.ceil(np.where(ok, v, np.inf).min(1) - (0.5 + _MARGIN_PX)),
                        np.floor(np.where(ok, v, -np.inf).max(1) + (0.5 + _MARGIN_PX)),
                        np.ceil(np.where(ok, u, np.inf).min(1) - (0.5 + _MARGIN_PX)),
                        np.floor(np.where(ok, u, -np.inf).max(1) + (0.5 + _MARGIN_PX))], 1)
        reg = np.clip(reg, 0, [self.h, self.h, self.w, self.w]).astype(np.int64)
        reg[~ok.any(1)] = 0
        return reg


# ---------------------------------------------------------------------------------------------
# The display list: primitives with class, colour, material and cut-out.
# ---------------------------------------------------------------------------------------------
# Materials (how a surface is coloured) and cut-outs (which parts of a box exist).
PLAIN, FACADE, FOLIAGE, PAVING, CHECKER, SIGN, LAMP = range(7)
_N_MATERIALS = 7
CUT_NONE, CUT_BARS, CUT_WHEELS, CUT_DISC, CUT_TRIANGLE, CUT_DIAMOND, CUT_LEGS = range(7)


class _Scene:
    """A display list of boxes and ellipsoids to be rendered together.

    Every primitive has: geometry (box corners lo/hi or ellipsoid centre/radii, metres), a class
    label (255 for unknown objects), a base colour rgb and a second colour rgb2, a material with
    parameters (params[0] texture strength, params[1] texels per metre, params[2:] material
    specific) and a cut-out shape with its parameters.
    """

    def __init__(self) -> None:
        self.rows: list[tuple] = []

    def box(self, lo, hi, label, rgb, material=PLAIN, params=(0.1, 3.0), rgb2=(0, 0, 0),
            cutout=CUT_NONE, cut=(), unknown=False) -> None:
        """Add an axis-aligned box with corners lo and hi (metres)."""
        self._add(False, lo, hi, label, rgb, material, params, rgb2, cutout, cut, unknown)

    def ellipsoid(self, center, radii, label, rgb, material=PLAIN, params=(0.1, 3.0),
                  rgb2=(0, 0, 0), unknown=False) -> None:
        """Add an axis-aligned ellipsoid (tree crown, head, ball)."""
        lo = [c - r for c, r in zip(center, radii)]
        hi = [c + r for c, r in zip(center, radii)]
        self._add(True, lo, hi, label, rgb, material, params, rgb2, CUT_NONE, (), unknown)

    def _add(self, ellipsoid, lo, hi, label, rgb, material, params, rgb2, cutout, cut, unknown):
        params, cut = (list(params) + [0.0] * 6)[:6], (list(cut) + [0.0] * 4)[:4]
        self.rows.append((*lo, *hi, label, *rgb, *rgb2, material, *params, cutout, *cut, unknown,
                          ellipsoid))

    def arrays(self) -> dict[str, np.ndarray] | None:
        """Struct-of-arrays view of all primitives (None if there are none)."""
        if not self.rows:
            return None
        a = np.asarray(self.rows, dtype=np.float64)
        return {"lo": a[:, 0:3].astype(np.float32), "hi": a[:, 3:6].astype(np.float32),
                "label": a[:, 6].astype(np.uint8), "rgb": a[:, 7:10].astype(np.float32),
                "rgb2": a[:, 10:13].astype(np.float32), "material": a[:, 13].astype(np.int64),
                "params": a[:, 14:20].astype(np.float32), "cutout": a[:, 20].astype(np.int64),
                "cut": a[:, 21:25].astype(np.float32), "unknown": a[:, 25].astype(bool),
                "ellipsoid": a[:, 26].astype(bool)}


# ---------------------------------------------------------------------------------------------
# Rendering: ground, primitives (batched ray casting + z-buffer), sky, camera effects.
# ---------------------------------------------------------------------------------------------
def _frac(x: np.ndarray) -> np.ndarray:
    """x % 1 (Python's modulo, in [0, 1)) as x - floor(x): bit-identical for every float (both
    round the same exact value once, or are exact) and far faster than numpy's remainder."""
    return x - np.floor(x)


def _mod(x: np.ndarray, b: np.float32) -> np.ndarray:
    """x % b for a float32 array x and a float32 scalar b > 0, bit-identical to numpy's
    remainder but much faster: in float64 the quotient's floor is exact (for |x / b| < 2**20
    the true quotient is at least 2**-24 away from any other integer, far more than the
    float64 rounding error), q * b and x - q * b are exact, so one rounding to float32 remains,
    as in numpy."""
    if not (x.dtype == np.float32 and 0 < b and np.all(np.abs(x) < b * 2.0 ** 20)):
        return x % b
    x64, b64 = x.astype(np.float64), np.float64(b)
    return (x64 - np.floor(x64 / b64) * b64).astype(np.float32)


def _set_rows(a: np.ndarray, idx: np.ndarray, values: np.ndarray) -> None:
    """a[idx] = values (cast to a's dtype) for a C-contiguous 2-D array and integer indices.

    Written through a view with one opaque item per row: the same result as the fancy
    assignment, several times faster for narrow rows such as RGB. (For reading rows, likewise,
    a.take(idx, axis=0) is used instead of a[idx].)
    """
    row = np.dtype((np.void, a.dtype.itemsize * a.shape[1]))
    values = np.ascontiguousarray(values, dtype=a.dtype).reshape(-1, a.shape[1])
    a.view(row).reshape(-1)[idx] = values.view(row).reshape(-1)


def _candidate_pixels(regions: np.ndarray, width: int) -> tuple[np.ndarray, ...]:
    """All (primitive id, flat pixel index) pairs inside each primitive's pixel bounding box,
    and the number of pairs of each primitive.

    Built from row segments (one per primitive and image row), without integer division: the
    pixels of a segment are consecutive, so pix = position in the output + a per-segment offset.
    Order: primitive by primitive, each box row by row.
    """
    heights = regions[:, 1] - regions[:, 0]
    widths = regions[:, 3] - regions[:, 2]
    ok = (heights > 0) & (widths > 0)
    heights, widths = np.where(ok, heights, 0), np.where(ok, widths, 0)
    counts = heights * widths
    k = np.repeat(np.arange(len(regions)), counts)
    seg = np.repeat(np.arange(len(regions)), heights)  # the primitive of each row segment
    first_row = np.cumsum(heights) - heights
    rows = regions[seg, 0] + np.arange(len(seg)) - first_row[seg]
    lengths = widths[seg]
    offset = rows * width + regions[seg, 2] - (np.cumsum(lengths) - lengths)
    return k, np.arange(len(k)) + np.repeat(offset, lengths), counts


def _hit_boxes(cv: _Canvas, p: dict, ids: np.ndarray, regions: np.ndarray) -> tuple:
    """Ray/box intersections (slab method) of every primitive with the rays in its bounding box.

    Per axis, a ray enters the slab lo <= x <= hi at min(t1, t2) and leaves it at max(t1, t2);
    it hits the box if it enters all three slabs before it leaves any. Loops over the 3 axes
    keep every array one-dimensional (fast in numpy).

    Args:
        ids: the primitives (all boxes); regions: their pixel bounding boxes (project_boxes).

    Returns:
        (primitive id, flat pixel, depth t, face axis 0/1/2) of every hit in front of the z-buffer.
    """
    k, pix, counts = _candidate_pixels(regions, cv.w)
    lo, hi = (p["lo"][ids] - cv.origin).T, (p["hi"][ids] - cv.origin).T
    face = np.zeros(len(k), np.int8)
    for axis in range(3):
        inv = cv.inv_axis[axis].take(pix)
        t1 = np.repeat(lo[axis], counts)  # = lo[axis][k], k being sorted
        t1 *= inv
        t2 = np.repeat(hi[axis], counts)
        t2 *= inv
        enter, leave = np.minimum(t1, t2), np.maximum(t1, t2)
        if axis == 0:  # the ray enters the first slab last so far: t_near = enter, face 0
            t_near, t_far = enter, leave
            continue
        face[enter > t_near] = axis
        np.maximum(t_near, enter, out=t_near)
        np.minimum(t_far, leave, out=t_far)
    hit = t_near <= t_far
    hit &= t_near > NEAR
    hit &= t_near < cv.zbuf.take(pix)
    hit = np.flatnonzero(hit)
    return ids[k[hit]], pix[hit], t_near[hit], face[hit]


def _hit_ellipsoids(cv: _Canvas, p: dict, ids: np.ndarray, regions: np.ndarray) -> tuple:
    """Ray/ellipsoid intersections (a quadratic in t); face axis is reported as 3 (curved)."""
    lo, hi = p["lo"][ids], p["hi"][ids]
    k, pix, _ = _candidate_pixels(regions, cv.w)
    center, radii = ((lo + hi) / 2).T, ((hi - lo) / 2).T
    a = b = c = np.float32(0)
    for axis in range(3):
        d = cv.ray_axis[axis][pix] / radii[axis][k]
        o = ((cv.origin[axis] - center[axis]) / radii[axis])[k]
        a, b, c = a + d * d, b + d * o, c + o * o
    disc = b * b - a * (c - 1)
    t = (-b - np.sqrt(np.maximum(disc, 0))) / a
    hit = (disc > 0) & (t > NEAR) & (t < cv.zbuf[pix])
    return ids[k[hit]], pix[hit], t[hit], np.full(hit.sum(), 3)


def _cut(code: int, local: np.ndarray, face: np.ndarray, size: np.ndarray,
         cut: np.ndarray) -> np.ndarray:
    """Which hits of a cut-out primitive exist. local: hit point minus the box's lo corner."""
    x, y, z = local[:, 0], local[:, 1], local[:, 2]
    w, h, d = size[:, 0], size[:, 1], size[:, 2]
    if code == CUT_BARS:  # fence: vertical bars of spacing cut[0], fill cut[1], and two rails
        along = x + z
        return (_frac(along / cut[:, 0]) < cut[:, 1]) | (y > h - 0.08) | (y < 0.12)
    if code == CUT_WHEELS:  # bicycle seen from the side (y-z plane): two rings and a frame
        r = 0.34
        ring = lambda zc: np.abs(np.hypot(z - zc, y - r) - r + 0.04) < 0.05
        frame = (np.abs(y - r - (z - r) * 0.3) < 0.05) & (z > r) & (z < d - r)
        tube = (np.abs(y - 0.68) < 0.05) & (z > 0.45) & (z < d - 0.35)
        from_behind = (face == 2) & (y < 2 * r)
        return ring(r) | ring(d - r) | frame | tube | from_behind
    xn, yn = 2 * x / w - 1, 2 * y / h - 1  # -1..1 across the face
    if code == CUT_DISC:
        return xn ** 2 + yn ** 2 < 1
    if code == CUT_TRIANGLE:  # apex up
        return np.abs(xn) < (1 - yn) / 2
    if code == CUT_DIAMOND:
        return np.abs(xn) + np.abs(yn) < 1
    if code == CUT_LEGS:  # a gap between two legs below the hips
        return (np.abs(xn) > 0.18) | (yn > 0.85)
    raise ValueError(f"unknown cut-out code {code}")


def _apply_cutouts(cv: _Canvas, p: dict, k, pix, t, face) -> np.ndarray:
    """Boolean mask of the hits that survive their primitive's cut-out shape."""
    keep = np.ones(len(k), bool)
    codes = p["cutout"][k]
    for code in np.unique(codes[codes != CUT_NONE]):
        m = np.nonzero(codes == code)[0]
        km = k[m]
        lo, hi = p["lo"].take(km, axis=0), p["hi"].take(km, axis=0)
        points = cv.origin + t[m, None] * cv.rays_at(pix[m])
        keep[m] = _cut(int(code), points - lo, face[m], hi - lo, p["cut"].take(km, axis=0))
    return keep


def _surface_colour(cv: _Canvas, p: dict, k, pix, t, face, bounds) -> np.ndarray:
    """Colour of visible surface points: base colour, texture, material pattern and shading.

    The points are grouped by material: those of material m are bounds[m]:bounds[m + 1].
    """
    ray = [cv.ray_axis[a].take(pix) for a in range(3)]
    x, y, z = (cv.origin[a] + t * ray[a] for a in range(3))
    curved = np.flatnonzero(face == 3)
    u = np.where(face == 0, z, x)  # texture coordinates on the face
    u[curved] = x[curved] + z[curved]
    v = np.where(face == 1, z, y)
    scale = p["params"][:, 1].take(k)
    tex = _noise(u * scale + 7 * k, v * scale + 13 * k)
    rgb = p["rgb"].take(k, axis=0) * (1 + p["params"][:, 0].take(k) * tex)[:, None]
    _materials(rgb, p, k, bounds, face, u, v, x, y, tex)
    # Lambertian shading: a flat face's normal points against the ray along the face's axis.
    cos_sun = np.zeros(len(k), np.float32)
    for a in range(3):
        m = face == a
        cos_sun[m] = -np.sign(ray[a][m]) * cv.sun[a]
    if len(curved):  # ellipsoid normal: gradient of sum(((P - c) / r)^2)
        m = curved
        lo, hi = p["lo"].take(k[m], axis=0), p["hi"].take(k[m], axis=0)
        c, r = (lo + hi) / 2, (hi - lo) / 2
        n = [(q[m] - c[:, a]) / r[:, a] ** 2 for a, q in enumerate((x, y, z))]
        norm = np.sqrt(n[0] ** 2 + n[1] ** 2 + n[2] ** 2)
        cos_sun[m] = (n[0] * cv.sun[0] + n[1] * cv.sun[1] + n[2] * cv.sun[2]) / norm
    rgb *= cv.shade(cos_sun)[:, None]
    return rgb


def _materials(rgb, p: dict, k, bounds, face, u, v, x, y, tex) -> None:
    """Material patterns: windows on facades, leaves, paving joints, checkers, sign faces, lamps.

    Modifies rgb in place. All arguments are per visible pixel, grouped by material (see
    _surface_colour); each pattern is computed on its own pixels only.
    """
    for material, pattern in _PATTERNS.items():
        a, b = int(bounds[material]), int(bounds[material + 1])
        if b > a:
            i, ki = slice(a, b), k[a:b]
            rgb2, prm, lo, hi = (p[name].take(ki, axis=0)
                                 for name in ("rgb2", "params", "lo", "hi"))
            rgb[i] = pattern(rgb[i], rgb2, prm, face[i], u[i], v[i], x[i], y[i], lo, hi, tex[i])


def _facade_windows(rgb, rgb2, prm, face, u, v, x, y, lo, hi, tex):
    """Windows on a grid of bays (prm 2 wide) and floors (prm 3 high), none on the ground
    floor or the roof; window size fractions prm 4, prm 5; glass colour rgb2."""
    across = _frac((u - np.where(face == 0, lo[:, 2], lo[:, 0])) / prm[:, 2])
    up = _frac(y / prm[:, 3])
    win = (np.abs(across - 0.5) < prm[:, 4] / 2) & (up > 0.3) & (up < 0.3 + prm[:, 5])
    win &= (face != 1) & (y > 2.5) & (y < hi[:, 1] - 1.0)
    return np.where(win[:, None], rgb2 * (1 + 0.15 * tex[:, None]), rgb)


def _foliage(rgb, rgb2, prm, face, u, v, x, y, lo, hi, tex):
    """Clumps of light and dark leaves, darker low in the crown."""
    height = np.clip((y - lo[:, 1]) / (hi[:, 1] - lo[:, 1] + 1e-6), 0, 1)
    return rgb * (0.75 + 0.35 * height + 0.25 * np.tanh(2 * tex))[:, None]


def _paving(rgb, rgb2, prm, face, u, v, x, y, lo, hi, tex):
    """Darker joints between paving slabs."""
    joint = (_frac(u * 1.5) < 0.12) | (_frac(v * 1.5) < 0.12)
    return rgb * np.where(joint, 0.8, 1.0)[:, None]


def _checker(rgb, rgb2, prm, face, u, v, x, y, lo, hi, tex):
    """Unknown objects: a checkerboard of rgb and rgb2."""
    cell = (np.floor(u * 3) + np.floor(v * 3)) % 2 == 0
    return np.where(cell[:, None], rgb, rgb2)


def _sign_face(rgb, rgb2, prm, face, u, v, x, y, lo, hi, tex):
    """A sign's face: rim in rgb, inner field in rgb2 (front only; the edges stay rim)."""
    cx, cy = (lo[:, 0] + hi[:, 0]) / 2, (lo[:, 1] + hi[:, 1]) / 2
    r = np.maximum(np.abs(x - cx) / (hi[:, 0] - cx), np.abs(y - cy) / (hi[:, 1] - cy))
    return np.where(((r < 0.6) & (face == 2))[:, None], rgb2, rgb)


def _lamps(rgb, rgb2, prm, face, u, v, x, y, lo, hi, tex):
    """Traffic light: three round lamps stacked vertically; lamp prm 2 is lit in rgb2."""
    cx, height = (lo[:, 0] + hi[:, 0]) / 2, hi[:, 1] - lo[:, 1]
    slot = np.floor(3 * (hi[:, 1] - y) / height)
    off = (slot * height / 3 + height / 6 - (hi[:, 1] - y)) ** 2 + (x - cx) ** 2
    lamp = (off < (height / 8) ** 2) & (face == 2)
    lit = lamp & (slot == prm[:, 2])
    return np.where(lit[:, None], rgb2 * 1.6, np.where(lamp[:, None], 0.15, rgb))


_PATTERNS = {FACADE: _facade_windows, FOLIAGE: _foliage, PAVING: _paving, CHECKER: _checker,
             SIGN: _sign_face, LAMP: _lamps}


def _render_primitives(cv: _Canvas, scene: _Scene) -> None:
    """Ray-cast every primitive of the scene and keep the nearest hit per pixel (z-buffer)."""
    p = scene.arrays()
    if p is None:
        return
    regions = cv.project_boxes(p["lo"], p["hi"])
    boxes, ellipsoids = np.flatnonzero(~p["ellipsoid"]), np.flatnonzero(p["ellipsoid"])
    hits = [_hit_boxes(cv, p, boxes, regions[boxes]),
            _hit_ellipsoids(cv, p, ellipsoids, regions[ellipsoids])]
    k, pix, t, face = (np.concatenate(parts) for parts in zip(*hits))
    keep = _apply_cutouts(cv, p, k, pix, t, face)
    k, pix, t, face = k[keep], pix[keep], t[keep], face[keep]
    # z-buffer: the nearest hit of every pixel wins (ties: the primitive added first).
    nearest = cv.zbuf.copy()
    np.minimum.at(nearest, pix, t)
    candidates = np.nonzero(t == nearest[pix])[0]
    first = np.full(len(nearest), len(t))
    np.minimum.at(first, pix[candidates], candidates)
    win = first[first < len(t)]
    # Group the visible points by material (stable), so each pattern works on one slice.
    material = p["material"].astype(np.int8)[k[win]]
    order = np.argsort(material, kind="stable")
    bounds = np.searchsorted(material[order], np.arange(_N_MATERIALS + 1))
    win = win[order]
    k, pix, t, face = k[win], pix[win], t[win], face[win]
    cv.zbuf[pix] = t
    cv.label[pix] = p["label"][k]
    cv.unknown[pix] = p["unknown"][k]
    _set_rows(cv.color, pix, _surface_colour(cv, p, k, pix, t, face, bounds))


# ---------------------------------------------------------------------------------------------
# The street: layout and the scene elements, one small function each.
# ---------------------------------------------------------------------------------------------
@dataclass
class _Street:
    """Layout of the street (metres). The road is centred on x = 0 and runs along +z."""

    half: float                        # half the road width
    lanes: np.ndarray                  # lane centres (x)
    lane_w: float
    curb: float                        # curb height
    walk: tuple[float, float]          # sidewalk width (left, right)
    grass: tuple[float, float]         # terrain strip width beyond the sidewalk (left, right)
    z_end: float                       # the street ends at a facade here
    cross: tuple[float, float] | None  # z-range of a cross street (intersection), if any

    def outer(self, side: int) -> float:
        """|x| of the sidewalk's outer edge on side -1 (left) or +1 (right)."""
        return self.half + self.walk[side > 0]

    def blocked(self, z0: float, z1: float) -> bool:
        """Whether [z0, z1] overlaps the cross street."""
        return self.cross is not None and z1 > self.cross[0] and z0 < self.cross[1]


def _sample_street(rng: np.random.Generator) -> _Street:
    """Road width and lanes, sidewalks, terrain strips, street end and maybe an intersection."""
    n_lanes = int(rng.choice([2, 3, 4], p=[0.5, 0.3, 0.2]))
    lane_w = rng.uniform(3.0, 3.6)
    half = n_lanes * lane_w / 2
    grass = tuple(float(rng.uniform(1.5, 6)) if rng.random() < 0.65 else 0.0 for _ in range(2))
    cross = None
    if rng.random() < 0.45:
        z0 = rng.uniform(20, 45)
        cross = (z0, z0 + rng.uniform(10, 16))
    return _Street(half=half, lanes=-half + lane_w * (np.arange(n_lanes) + 0.5), lane_w=lane_w,
                   curb=rng.uniform(0.1, 0.18), walk=tuple(rng.uniform(1.5, 4.5, 2)),
                   grass=grass, z_end=rng.uniform(55, 95), cross=cross)


def _x_span(side: int, a: float, b: float) -> tuple[float, float]:
    """x-range between distances a < b from the street's centre line on one side."""
    return (a, b) if side > 0 else (-b, -a)


def _z_segments(st: _Street, z0: float, z1: float) -> list[tuple[float, float]]:
    """[z0, z1] with the cross street cut out."""
    if st.cross is None:
        return [(z0, z1)]
    return [(a, b) for a, b in ((z0, st.cross[0]), (st.cross[1], z1)) if b > a]


def _add_sidewalks(scene: _Scene, st: _Street, style: _Style, rng) -> None:
    """Raised sidewalks (their curbs are the box's side faces), interrupted by the cross street."""
    for side in (-1, 1):
        rgb = _vary(rng, _pick(rng, style.sidewalk), 0.06)
        x0, x1 = _x_span(side, st.half, st.outer(side))
        for z0, z1 in _z_segments(st, 0.0, st.z_end):
            scene.box((x0, 0, z0), (x1, st.curb, z1), SIDEWALK, rgb, PAVING,
                      (style.texture, 4.0))


def _facade(rng, style: _Style) -> dict:
    """Material arguments of one building facade: colour, glass colour, window grid."""
    params = (style.texture * 0.6, 2.0, rng.uniform(2.2, 4.0), rng.uniform(2.9, 3.6),
              rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.55))
    return {"rgb": _vary(rng, _pick(rng, style.building)), "material": FACADE, "params": params,
            "rgb2": _vary(rng, _pick(rng, style.glass), 0.2)}


def _add_buildings(scene: _Scene, st: _Street, style: _Style, rng) -> None:
    """Rows of buildings at varying set-backs and heights, a facade closing the street, and
    (through an intersection) buildings far down the cross street."""
    for side in (-1, 1):
        z = -8.0
        while z < st.z_end:
            length = rng.uniform(8, 30)
            if st.blocked(z, z + length):  # shorten the building to end at the cross street
                length = st.cross[0] - z
                if length < 4:
                    z = st.cross[1]
                    continue
            if rng.random() < 0.2:  # a gap between buildings
                z += rng.uniform(2, 8)
                continue
            front = st.outer(side) + st.grass[side > 0] + (rng.uniform(0, 3) * (rng.random() < 0.5))
            x0, x1 = _x_span(side, front, front + rng.uniform(10, 20))
            scene.box((x0, 0, z), (x1, rng.uniform(6, 28), z + length), BUILDING, **_facade(rng, style))
            z += length
    scene.box((-80, 0, st.z_end), (80, rng.uniform(8, 30), st.z_end + 10), BUILDING,
              **_facade(rng, style))
    if st.cross is not None:
        for side in (-1, 1):
            x0, x1 = _x_span(side, rng.uniform(45, 60), 75)
            scene.box((x0, 0, st.cross[0] - 10), (x1, rng.uniform(8, 25), st.cross[1] + 10),
                      BUILDING, **_facade(rng, style))


def _add_walls_and_fences(scene: _Scene, st: _Street, style: _Style, rng) -> None:
    """Walls (solid, coloured like buildings or sidewalks) and see-through fences along the
    outer edge of the sidewalks."""
    for side in (-1, 1):
        for _ in range(rng.poisson(1.0)):
            z0 = rng.uniform(3, 50)
            z1 = z0 + rng.uniform(5, 25)
            if st.blocked(z0, z1):
                continue
            edge = st.outer(side)
            if rng.random() < 0.6:
                x0, x1 = _x_span(side, edge, edge + 0.25)
                rgb = _vary(rng, _pick(rng, style.building + style.sidewalk))
                scene.box((x0, st.curb, z0), (x1, rng.uniform(0.6, 2.2), z1), WALL, rgb, PLAIN,
                          (style.texture * 1.5, 3.0))
            else:
                x0, x1 = _x_span(side, edge, edge + 0.06)
                scene.box((x0, st.curb, z0), (x1, rng.uniform(0.9, 2.0), z1), FENCE,
                          _vary(rng, _pick(rng, _FENCE_RGB)), PLAIN, (0.05, 3.0),
                          cutout=CUT_BARS, cut=(rng.uniform(0.15, 0.4), rng.uniform(0.2, 0.5)))


def _add_vegetation(scene: _Scene, st: _Street, style: _Style, rng) -> None:
    """Trees (trunk and crown, both vegetation as in Cityscapes) and hedges on terrain strips."""
    for side in (-1, 1):
        if rng.random() < 0.3:
            continue
        on_grass = st.grass[side > 0] > 0
        z = rng.uniform(2, 12)
        while z < min(st.z_end, 75):
            if not st.blocked(z - 3, z + 3):
                dist = st.outer(side) + (st.grass[side > 0] / 2 if on_grass else -0.6)
                x = side * dist
                base = 0.0 if on_grass else st.curb
                trunk_h, r = rng.uniform(2.0, 3.5), rng.uniform(1.2, 2.6)
                scene.box((x - 0.13, base, z - 0.13), (x + 0.13, base + trunk_h + r, z + 0.13),
                          VEGETATION, _vary(rng, _pick(rng, _TRUNK_RGB)), PLAIN, (0.1, 4.0))
                green = _vary(rng, _pick(rng, style.vegetation), 0.15)
                scene.ellipsoid((x, base + trunk_h + r * 0.8, z), (r, r * rng.uniform(0.9, 1.4), r),
                                VEGETATION, green, FOLIAGE, (style.texture * 3, 4.0))
            z += rng.uniform(7, 16)
        if on_grass and rng.random() < 0.4:
            z0 = rng.uniform(3, 40)
            x0, x1 = _x_span(side, st.outer(side) + 0.3, st.outer(side) + st.grass[side > 0])
            scene.box((x0, 0, z0), (x1, rng.uniform(0.5, 1.5), z0 + rng.uniform(3, 15)), VEGETATION,
                      _vary(rng, _pick(rng, style.vegetation), 0.15), FOLIAGE,
                      (style.texture * 3, 4.0))


def _thin(half_width: float, z: float, cam: _Camera) -> float:
    """Half-width of a thin object, widened so that it covers at least ~1 pixel at distance z."""
    return max(half_width, 0.55 * max(z, NEAR) / cam.focal)


def _add_sign(scene: _Scene, x: float, y: float, z: float, rng, cam: _Camera) -> None:
    """A traffic sign plate facing the camera: circle, triangle, diamond or rectangle."""
    shapes = ((CUT_DISC, (0.8, 0.1, 0.1), (0.95, 0.95, 0.95)),
              (CUT_TRIANGLE, (0.8, 0.1, 0.1), (0.95, 0.95, 0.9)),
              (CUT_DIAMOND, (0.95, 0.95, 0.95), (0.95, 0.75, 0.1)),
              (CUT_NONE, (0.1, 0.25, 0.7), (0.9, 0.9, 0.9)))
    cut, rim, inner = shapes[int(rng.integers(len(shapes)))]
    half = _thin(rng.uniform(0.25, 0.45), z, cam)
    scene.box((x - half, y - half, z - 0.05), (x + half, y + half, z - 0.01), TRAFFIC_SIGN,
              _vary(rng, rim, 0.1), SIGN, (0.05, 4.0), _vary(rng, inner, 0.05), cutout=cut)


def _add_traffic_light(scene: _Scene, x: float, y: float, z: float, rng, cam: _Camera) -> None:
    """A traffic light housing (bottom at height y) with one of its three lamps lit."""
    half = _thin(0.15, z, cam)
    lit = int(rng.integers(3))
    colour = ((1.0, 0.15, 0.1), (1.0, 0.75, 0.1), (0.2, 1.0, 0.4))[lit]
    housing = _pick(rng, ((0.10, 0.10, 0.10), (0.20, 0.22, 0.20), (0.55, 0.50, 0.15)))
    scene.box((x - half, y, z - 0.3), (x + half, y + 0.9, z), TRAFFIC_LIGHT, housing, LAMP,
              (0.05, 4.0, lit), colour)


def _add_pole(scene: _Scene, x: float, z: float, base: float, height: float, rng,
              cam: _Camera) -> None:
    """A thin pole (a few pixels wide at 64x128), metal coloured."""
    half = _thin(rng.uniform(0.05, 0.1), z, cam)
    scene.box((x - half, base, z - half), (x + half, base + height, z + half), POLE,
              _vary(rng, _pick(rng, _POLE_RGB)), PLAIN, (0.05, 4.0))


def _add_arm(scene: _Scene, x: float, y: float, z: float, reach: float, rng) -> None:
    """A horizontal arm (labelled pole) from (x, y, z) reaching `reach` metres along x."""
    scene.box((min(x, x + reach), y - 0.12, z - 0.06), (max(x, x + reach), y, z + 0.06), POLE,
              _vary(rng, _pick(rng, _POLE_RGB)), PLAIN, (0.05, 4.0))


def _add_poles(scene: _Scene, st: _Street, rng, cam: _Camera) -> None:
    """Street lamps, sign posts and traffic lights along the curbs; traffic lights (some on
    arms over the road) at an intersection."""
    for side in (-1, 1):
        z = rng.uniform(3, 14)
        while z < min(st.z_end, 65):
            if not st.blocked(z - 1, z + 1):
                x = side * (st.half + 0.5)
                kind = rng.random()
                height = rng.uniform(2.5, 3.2) if kind < 0.35 else rng.uniform(4, 8)
                _add_pole(scene, x, z, st.curb, height, rng, cam)
                if kind < 0.35:
                    _add_sign(scene, x, st.curb + height - 0.3, z, rng, cam)
                elif kind < 0.5:
                    _add_traffic_light(scene, x + side * 0.3, st.curb + 2.5, z, rng, cam)
                elif kind < 0.8:  # street lamp: arm and head over the road
                    _add_arm(scene, x, st.curb + height, z, -side * 1.5, rng)
            z += rng.uniform(10, 25)
    if st.cross is not None:
        z = st.cross[0] - rng.uniform(0.5, 2.0)
        for side in (-1, 1):
            x = side * (st.half + 0.5)
            _add_pole(scene, x, z, st.curb, 3.2, rng, cam)
            _add_traffic_light(scene, x, st.curb + 2.3, z - 0.2, rng, cam)
            if rng.random() < 0.5:  # an arm reaching over the road with a light hanging from it
                reach = rng.uniform(2.5, 5.0)
                _add_arm(scene, x, 5.65, z, -side * reach, rng)
                _add_pole(scene, x, z, st.curb, 5.6, rng, cam)
                _add_traffic_light(scene, x - side * reach * 0.8, 4.6, z - 0.1, rng, cam)


def _add_car(scene: _Scene, x: float, z0: float, rgb, style: _Style, rng) -> float:
    """A car from behind or in front: undercarriage and wheels, body, glass cabin, roof and
    lights. Returns its length."""
    length, width, height = rng.uniform(3.6, 5.0), rng.uniform(1.6, 1.95), rng.uniform(1.35, 1.7)
    w2, body_top = width / 2, rng.uniform(0.8, 1.05)
    tex = (style.texture * 0.5, 3.0)
    scene.box((x - w2 + 0.1, 0, z0 + 0.2), (x + w2 - 0.1, 0.4, z0 + length - 0.2), CAR,
              (0.05, 0.05, 0.05), PLAIN, tex)
    scene.box((x - w2, 0.3, z0), (x + w2, body_top, z0 + length), CAR, rgb, PLAIN, tex)
    c0, c1 = z0 + length * rng.uniform(0.15, 0.35), z0 + length * rng.uniform(0.65, 0.85)
    scene.box((x - w2 + 0.1, body_top, c0), (x + w2 - 0.1, height - 0.05, c1), CAR,
              _vary(rng, _pick(rng, style.glass), 0.2), PLAIN, tex)
    scene.box((x - w2 + 0.08, height - 0.05, c0 - 0.05), (x + w2 - 0.08, height, c1 + 0.05), CAR,
              rgb, PLAIN, tex)
    light = (0.9, 0.1, 0.05) if rng.random() < 0.7 else (0.95, 0.9, 0.7)
    for sx in (-1, 1):
        lx = x + sx * (w2 - 0.2)
        scene.box((lx - 0.15, body_top - 0.2, z0 - 0.02), (lx + 0.15, body_top - 0.08, z0 + 0.1),
                  CAR, light, PLAIN, (0.0, 1.0))
    return length


def _add_large_vehicle(scene: _Scene, x: float, z0: float, style: _Style, rng) -> float:
    """A truck (cab and cargo box) or a bus (long box with a band of windows)."""
    is_bus = rng.random() < 0.5
    width, tex = rng.uniform(2.3, 2.55), (style.texture * 0.5, 2.0)
    w2 = width / 2
    rgb = _vary(rng, _pick(rng, style.building + style.car_extra))
    if is_bus:
        length, height = rng.uniform(10, 12.5), rng.uniform(2.9, 3.3)
        scene.box((x - w2, 0.3, z0), (x + w2, height, z0 + length), BUS, rgb, PLAIN, tex)
        scene.box((x - w2 - 0.02, 1.3, z0 - 0.02), (x + w2 + 0.02, height - 0.4, z0 + length),
                  BUS, _vary(rng, _pick(rng, style.glass), 0.2), PLAIN, tex)
        scene.box((x - w2 + 0.1, 0, z0 + 0.5), (x + w2 - 0.1, 0.35, z0 + length - 0.5), BUS,
                  (0.05, 0.05, 0.05), PLAIN, tex)
        return length
    cargo, cab, height = rng.uniform(5, 8), rng.uniform(1.8, 2.4), rng.uniform(3.0, 3.8)
    scene.box((x - w2, 0.6, z0), (x + w2, height, z0 + cargo), TRUCK, rgb, PLAIN, tex)
    scene.box((x - w2 + 0.05, 0.4, z0 + cargo + 0.1), (x + w2 - 0.05, 2.7, z0 + cargo + cab),
              TRUCK, _vary(rng, _pick(rng, style.building + style.car_extra)), PLAIN, tex)
    scene.box((x - w2 + 0.1, 0, z0 + 0.3), (x + w2 - 0.1, 0.6, z0 + cargo + cab - 0.3), TRUCK,
              (0.05, 0.05, 0.05), PLAIN, tex)
    return cargo + cab


def _add_vehicles(scene: _Scene, st: _Street, style: _Style, rng, cam: _Camera) -> None:
    """Cars in the lanes at 5-80 m (occluding each other), parked cars along the curbs, and in
    about one image in ten a truck or a bus."""
    car_colours = style.building + style.car_extra
    big_lane, big_z = -1, (0.0, 0.0)
    if rng.random() < 0.1:
        big_lane = int(rng.integers(len(st.lanes)))
        z0 = rng.uniform(8, 40)
        big_z = (z0, z0 + _add_large_vehicle(scene, st.lanes[big_lane], z0, style, rng))
    for lane, x in enumerate(st.lanes):
        z = rng.uniform(5, 25) + (3 if abs(x - cam.x) < st.lane_w / 2 else 0)
        while z < 80:
            free = lane != big_lane or z + 5 < big_z[0] or z > big_z[1] + 1
            if rng.random() < 0.7 and free:
                rgb = _vary(rng, _pick(rng, car_colours))
                z += _add_car(scene, x + rng.uniform(-0.3, 0.3), z, rgb, style, rng)
            z += rng.uniform(4, 25)
    for side in (-1, 1):
        if rng.random() < 0.45:
            z = rng.uniform(4, 15)
            for _ in range(int(rng.integers(1, 6))):
                if st.blocked(z, z + 5):
                    break
                rgb = _vary(rng, _pick(rng, car_colours))
                z += _add_car(scene, side * (st.half - 1.1), z, rgb, style, rng)
                z += rng.uniform(0.5, 3)


def _add_person(scene: _Scene, x: float, z: float, base: float, style: _Style, rng,
                label: int = PERSON) -> None:
    """A pedestrian: legs (with a gap), torso and head, in random clothes."""
    h = rng.uniform(1.5, 1.95)
    trousers, top = _pick(rng, style.clothes[:5]), _pick(rng, style.clothes)
    scene.box((x - 0.18, base, z - 0.1), (x + 0.18, base + 0.47 * h, z + 0.1), label,
              _vary(rng, trousers), PLAIN, (0.1, 6.0), cutout=CUT_LEGS)
    scene.box((x - 0.23, base + 0.47 * h, z - 0.13), (x + 0.23, base + 0.83 * h, z + 0.13), label,
              _vary(rng, top), PLAIN, (0.1, 6.0))
    head = _pick(rng, _SKIN_RGB) if rng.random() < 0.6 else _pick(rng, style.clothes[:2])
    scene.ellipsoid((x, base + 0.91 * h, z), (0.1, 0.12, 0.1), label, head, PLAIN, (0.05, 6.0))


def _add_people(scene: _Scene, st: _Street, style: _Style, rng) -> None:
    """Pedestrians on the sidewalks and on the crosswalk before an intersection."""
    for _ in range(rng.poisson(4.5)):
        side = 1 if rng.random() < 0.5 else -1
        z = rng.uniform(3, 45)
        if st.blocked(z - 0.5, z + 0.5):
            continue
        x = side * (st.half + rng.uniform(0.4, max(0.5, st.walk[side > 0] - 0.3)))
        _add_person(scene, x, z, st.curb, style, rng)
    if st.cross is not None:
        for _ in range(rng.poisson(2.0)):
            _add_person(scene, rng.uniform(-st.half, st.half), st.cross[0] - rng.uniform(1, 4),
                        0.0, style, rng)


def _add_riders(scene: _Scene, st: _Street, style: _Style, rng) -> None:
    """Cyclists near the curbs: a bicycle (wheels, frame, handlebar) and its rider."""
    if rng.random() > 0.5:
        return
    for _ in range(int(rng.integers(1, 3))):
        side = 1 if rng.random() < 0.7 else -1
        x, z0 = side * (st.half - rng.uniform(0.6, 1.2)), rng.uniform(6, 40)
        bike = _vary(rng, _pick(rng, _FENCE_RGB + ((0.8, 0.1, 0.1),)))
        scene.box((x - 0.03, 0, z0), (x + 0.03, 0.72, z0 + 1.75), BICYCLE, bike, PLAIN,
                  (0.05, 4.0), cutout=CUT_WHEELS)
        scene.box((x - 0.28, 0.95, z0 + 1.45), (x + 0.28, 1.0, z0 + 1.5), BICYCLE, bike)
        scene.box((x - 0.15, 0.45, z0 + 0.55), (x + 0.15, 0.95, z0 + 0.85), RIDER,
                  _vary(rng, _pick(rng, style.clothes[:5])), PLAIN, (0.1, 6.0), cutout=CUT_LEGS)
        scene.box((x - 0.21, 0.95, z0 + 0.6), (x + 0.21, 1.45, z0 + 1.0), RIDER,
                  _vary(rng, _pick(rng, style.clothes)), PLAIN, (0.1, 6.0))
        scene.ellipsoid((x, 1.58, z0 + 0.95), (0.1, 0.12, 0.1), RIDER,
                        _pick(rng, style.clothes + _SKIN_RGB))


def _add_unknown_objects(scene: _Scene, st: _Street, rng) -> None:
    """Objects of kinds never drawn otherwise (neon balls, checkered crates, striped pyramids)
    standing on the road or a sidewalk; labelled 255 and flagged as unknown."""
    for _ in range(int(rng.integers(1, 4))):
        on_road = rng.random() < 0.6
        side = 1 if rng.random() < 0.5 else -1
        x = (rng.uniform(-st.half + 0.5, st.half - 0.5) if on_road
             else side * (st.half + rng.uniform(0.3, st.walk[side > 0])))
        base, z = (0.0 if on_road else st.curb), rng.uniform(6, 35)
        rgb, rgb2 = _pick(rng, _UNKNOWN_RGB), _pick(rng, _UNKNOWN_RGB[::-1] + ((1, 1, 1),))
        size = rng.uniform(0.4, 1.4)
        kind = int(rng.integers(3))
        if kind == 0:
            scene.ellipsoid((x, base + size / 2, z), (size / 2,) * 3, 255, rgb, CHECKER,
                            (0.05, 2.0), rgb2, unknown=True)
        else:
            scene.box((x - size / 2, base, z - size / 2), (x + size / 2, base + size * 1.2,
                      z + size / 2), 255, rgb, CHECKER, (0.05, 2.0), rgb2,
                      cutout=CUT_TRIANGLE if kind == 2 else CUT_NONE, unknown=True)


def _draw_ground(cv: _Canvas, st: _Street, style: _Style, rng) -> None:
    """Intersect every ray with the ground plane y = 0: road (markings count as road) between
    the curbs and across an intersection, terrain elsewhere."""
    dy = cv.ray_axis[1]
    t = np.where(dy < -1e-6, -cv.origin[1] / np.minimum(dy, -1e-6), np.inf)
    pix = np.nonzero((t > NEAR) & np.isfinite(t))[0]
    t = t[pix]
    x = cv.origin[0] + t * cv.ray_axis[0][pix]
    z = t * cv.ray_axis[2][pix]
    road = np.abs(x) <= st.half
    if st.cross is not None:
        road |= (z > st.cross[0]) & (z < st.cross[1])
    road_rgb = _vary(rng, _pick(rng, style.road), 0.05)
    grass_rgb = _vary(rng, _pick(rng, style.terrain), 0.1)
    tex = _noise(x * 6, z * 6) * 0.5 + _noise(x * 0.7 + 31, z * 0.7) * 0.5
    rgb = np.where(road[:, None], road_rgb, grass_rgb) * (1 + style.texture * tex)[:, None]
    if style.texture > 0.15:  # real-like asphalt: repaired patches
        patch = road & (_noise(x * 0.5 + 5, z * 0.5 + 9) > 1.0)
        rgb[patch] *= 0.8
    paint = _road_markings(x, z, st, rng) & road
    rgb[paint] = np.array([0.85, 0.85, 0.8]) * (1 + 0.1 * tex[paint, None])
    cv.zbuf[pix] = t
    cv.label[pix] = np.where(road, ROAD, TERRAIN)
    _set_rows(cv.color, pix, rgb * cv.shade(cv.sun[1]))


def _road_markings(x: np.ndarray, z: np.ndarray, st: _Street, rng) -> np.ndarray:
    """Dashed lane lines, solid edge lines and a zebra crossing before an intersection."""
    dash = rng.uniform(2, 4)
    between = np.abs((x + st.half) / st.lane_w - np.round((x + st.half) / st.lane_w)) * st.lane_w
    lanes = (between < 0.07) & (np.abs(x) < st.half - 0.5) & (_mod(z, np.float32(3 * dash)) < dash)
    edges = np.abs(np.abs(x) - (st.half - 0.3)) < 0.08
    paint = lanes | edges
    if st.cross is not None:
        zebra = (z > st.cross[0] - 5) & (z < st.cross[0] - 1) & (_frac(x) < 0.5)
        paint |= zebra
        paint &= ~((z > st.cross[0]) & (z < st.cross[1]))
    return paint


def _draw_sky(cv: _Canvas, style: _Style, rng) -> None:
    """Fill pixels that hit nothing with sky: a vertical gradient and clouds."""
    pix = np.nonzero(~np.isfinite(cv.zbuf))[0]
    d = cv.rays_at(pix)
    elev = np.clip(d[:, 1] / np.linalg.norm(d, axis=1) * 3, 0, 1)[:, None]
    zenith = _vary(rng, style.sky_zenith, 0.05)
    horizon = _vary(rng, style.sky_horizon, 0.03)
    rgb = horizon * (1 - elev) + zenith * elev
    dy = np.maximum(d[:, 1], 0.02)
    cloud = _noise(d[:, 0] / dy * 8 + rng.uniform(0, 64), d[:, 2] / dy * 8)
    cover = np.clip(cloud - rng.uniform(0.3, 1.5), 0, 1)[:, None]
    _set_rows(cv.color, pix, rgb * (1 - cover) + 0.95 * cover)


def _draw_hood(cv: _Canvas, style: _Style, rng) -> None:
    """In some images, the ego vehicle's hood at the bottom: void (255), no depth."""
    if rng.random() >= style.hood_p:
        return
    rise = rng.uniform(0.06, 0.14) * cv.h
    u = (np.arange(cv.w) + 0.5 - cv.w / 2) / (cv.w / 2)
    top = cv.h - rise * (1 - 0.45 * u ** 2)
    v = np.arange(cv.h)[:, None] + 0.5
    hood = (v >= top[None, :]).ravel()
    paint = _pick(rng, ((0.08, 0.08, 0.1), (0.5, 0.5, 0.52), (0.35, 0.05, 0.05), (0.8, 0.8, 0.8)))
    gloss = np.clip(1.3 - (v - top[None, :]) / max(rise, 1), 0.6, 1.3).ravel()[hood]
    cv.color[hood] = paint * gloss[:, None]
    cv.label[hood] = IGNORE_INDEX
    cv.zbuf[hood] = np.inf
    cv.unknown[hood] = False


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable gaussian blur of an [H, W, 3] image (edges replicated)."""
    if sigma < 0.1:
        return img
    r = int(np.ceil(2.5 * sigma))
    k = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).astype(np.float32)
    for axis in (0, 1):
        n = img.shape[axis]
        p = np.moveaxis(img, axis, 0)
        p = np.concatenate([p[:1]] * r + [p] + [p[-1:]] * r)  # edge padding
        p = np.moveaxis(p, 0, axis)
        taps = [p[i:i + n] if axis == 0 else p[:, i:i + n] for i in range(2 * r + 1)]
        img = taps[0] * k[0]  # sum of k[i] * tap i, added in order i = 0, 1, ...
        tmp = np.empty_like(img)
        for i in range(1, 2 * r + 1):
            img += np.multiply(taps[i], k[i], out=tmp)
    return img


def _camera_effects(cv: _Canvas, style: _Style, rng) -> np.ndarray:
    """Haze with distance, colour grading, exposure, blur and sensor noise -> [H, W, 3] in [0,1]."""
    img = cv.color.reshape(cv.h, cv.w, 3)
    depth = np.where(np.isfinite(cv.zbuf), cv.zbuf, np.float32(0)).reshape(cv.h, cv.w, 1)
    haze = np.exp(-depth / rng.uniform(*style.haze_visibility))
    img = img * haze  # img * haze + horizon * (1 - haze), in place from here on
    img += np.asarray(style.sky_horizon, np.float32) * (1 - haze)
    grey = (img[..., :1] + img[..., 1:2] + img[..., 2:]) / 3
    img -= grey  # grey + saturation * (img - grey)
    img *= rng.uniform(*style.saturation)
    img += grey
    tint = (1 + rng.normal(0, style.tint_sd, 3)) * rng.uniform(0.75, 1.25)  # colour and exposure
    img *= tint.astype(np.float32)
    np.clip(img, 0, 1, out=img)
    np.power(img, rng.uniform(0.85, 1.15), out=img)
    img = _gaussian_blur(img, rng.uniform(*style.blur_px) * cv.w / 128)
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    noise *= rng.uniform(*style.noise_sd)
    img += noise
    return np.clip(img, 0, 1, out=img)


def _render_item(index: int, size: tuple[int, int], split: str, domain: str, seed: int,
                 ood: bool) -> dict[str, np.ndarray]:
    """Render ToyCity item `index` as numpy arrays (image [H,W,3], mask, depth, unknown)."""
    rng = _item_rng(seed, split, domain, index, _STREAM_SCENE)
    style = _STYLES[domain]
    street = _sample_street(rng)
    lane = street.lanes[int(rng.integers((len(street.lanes) + 1) // 2, len(street.lanes)))]
    cam = _sample_camera(rng, style, size, lane)
    cv = _Canvas(cam, size[0], size[1], rng, style)
    scene = _Scene()
    _draw_ground(cv, street, style, rng)
    _add_sidewalks(scene, street, style, rng)
    _add_buildings(scene, street, style, rng)
    _add_walls_and_fences(scene, street, style, rng)
    _add_vegetation(scene, street, style, rng)
    _add_poles(scene, street, rng, cam)
    _add_vehicles(scene, street, style, rng, cam)
    _add_people(scene, street, style, rng)
    _add_riders(scene, street, style, rng)
    if ood:
        _add_unknown_objects(scene, street, _item_rng(seed, split, domain, index, _STREAM_UNKNOWN))
    _render_primitives(cv, scene)
    _draw_sky(cv, style, rng)
    _draw_hood(cv, style, rng)
    image = _camera_effects(cv, style, rng)
    valid = np.isfinite(cv.zbuf) & (cv.zbuf <= MAX_DEPTH)
    depth = np.where(valid, cv.zbuf, 0.0).astype(np.float32)
    shape = size
    return {"image": image, "mask": cv.label.reshape(shape), "depth": depth.reshape(shape),
            "unknown": cv.unknown.reshape(shape)}


# ---------------------------------------------------------------------------------------------
# The data set.
# ---------------------------------------------------------------------------------------------
class ToyCity(Dataset):
    """Procedural street scenes with semantic labels, metric depth, two domains and unknown objects.

    Item i is a dict: "image" float32 [3,H,W] in [0,1]; "mask" int64 [H,W] with ids
    0..NUM_CLASSES-1 and 255 for void (ego hood, unknown objects); "depth" float32 [H,W] in
    metres along the optical axis (0 = invalid: sky, hood, beyond 100 m; unknown objects keep
    their depth); "index" (int); and with ood=True "ood_mask" bool [H,W] marking unknown objects.
    Thin objects (poles, signs, lights) are widened to at least about one pixel, so they do not
    break up at a distance.

    Speed: rendering is vectorised numpy on one core, about 4-5 ms per 64x128 image and 10-11 ms
    per 128x256 image (benchmarks/toycity_speed.py). A training step of M128, the U-Net KD paper's
    smallest U-Net, costs about 6x (64x128) and 15x (128x256) that per sample; a step of the
    122k-parameter UNet(4, 64) only about 2x and 4x. Rendered inside the training loop
    (DataLoader num_workers=0), fresh items make an M128 iteration at 64x128 about 1.2x slower
    (UNet(4, 64): 1.56x); with num_workers=1 the rendering overlaps the step (1.01-1.03x,
    benchmarks/toycity_loader_overlap.py). For training over several epochs pass cache=True:
    every item is rendered once, on first read, and later reads copy it from memory (0.03-0.1
    ms, several hundred times faster than the step; about 140 kB per 64x128 item).

    Item i is a pure function of (i, split, domain, seed, ood, size): identical on every run and
    machine. The scene itself does not depend on the size, so the same scene can be rendered
    small or large; with ood=True the scene is the one of ood=False plus the unknown objects.

    Args:
        n: number of items (>= 1).
        size: (H, W) of the images, each >= 16 (e.g. (64, 128) quick, (256, 512) full).
        split: "train", "val" or "test" — different splits never share a scene.
        domain: "source" (game-like: saturated, clean, sharp, camera 1.2-1.5 m) or "target"
            (real-like: other palette and textures, haze, blur, noise, camera 1.5-1.8 m).
        seed: non-negative integer selecting a different but equally distributed data set.
        ood: add unknown objects (labelled 255 and flagged in "ood_mask").
        cache: keep generated samples in memory (before the transform); the way to make data
            loading negligible next to a training step when items are read more than once.
        transform: callable applied to every sample dict, e.g. `train_transforms((64, 128))`.

    References:
        Cordts et al., "The Cityscapes Dataset", CVPR 2016: class names, colours, trainIds.
        Taught in notebooks/00_toycity_and_data.ipynb.
    """

    CLASSES: ClassVar[tuple[str, ...]] = (
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
        "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "bicycle")
    PALETTE: ClassVar[list[tuple[int, int, int]]] = [
        (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
        (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
        (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
        (119, 11, 32)]
    # toy id -> Cityscapes trainId (0..15 are equal; bicycle 16 -> 18; 255 stays 255)
    TO_CITYSCAPES: ClassVar[dict[int, int]] = {**{i: i for i in range(16)}, 16: 18}
    NUM_CLASSES = 17
    IGNORE_INDEX = IGNORE_INDEX

    def __init__(self, n: int, size: tuple[int, int] = (64, 128), split: str = "train",
                 domain: str = "source", seed: int = 0, ood: bool = False, cache: bool = False,
                 transform: Callable[[dict], dict] | None = None):
        self.n = _check_n(n)
        self.size = _check_size(size)
        self.split = _check_choice("split", split, _SPLITS)
        self.domain = _check_choice("domain", domain, _DOMAINS)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed={seed!r}; expected a non-negative integer such as 0.")
        self.seed, self.ood = int(seed), bool(ood)
        if transform is not None and not callable(transform):
            raise ValueError(f"transform={transform!r} is not callable; pass e.g. "
                             "train_transforms((64, 128)) or None.")
        self.transform = transform
        self._cache: dict[int, dict] | None = {} if cache else None

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return (f"ToyCity(n={self.n}, size={self.size}, split={self.split!r}, "
                f"domain={self.domain!r}, seed={self.seed}, ood={self.ood})")

    def __getitem__(self, index: int) -> dict:
        i = operator.index(index)
        if not -self.n <= i < self.n:
            raise IndexError(f"index {index} is out of range for ToyCity with n={self.n} items "
                             f"(valid: 0..{self.n - 1}).")
        i %= self.n
        if self._cache is not None and i in self._cache:
            sample = _from_cache(self._cache[i])
        else:
            sample = self._generate(i)
            if self._cache is not None:
                self._cache[i] = _to_cache(sample)
        return self.transform(sample) if self.transform is not None else sample

    def _generate(self, i: int) -> dict:
        """Render item i and convert it to tensors."""
        a = _render_item(i, self.size, self.split, self.domain, self.seed, self.ood)
        sample = {"image": torch.from_numpy(np.ascontiguousarray(a["image"].transpose(2, 0, 1))),
                  "mask": torch.from_numpy(a["mask"].astype(np.int64)),
                  "depth": torch.from_numpy(a["depth"]), "index": i}
        if self.ood:
            sample["ood_mask"] = torch.from_numpy(a["unknown"])
        return sample


def _to_cache(sample: dict) -> dict:
    """A compact private copy of a sample for ToyCity's cache (mask as uint8: ids < 256)."""
    return {k: (v.to(torch.uint8) if k == "mask" else v.clone()) if torch.is_tensor(v) else v
            for k, v in sample.items()}


def _from_cache(entry: dict) -> dict:
    """A fresh sample from a cache entry (the caller may modify it in place)."""
    return {k: (v.long() if k == "mask" else v.clone()) if torch.is_tensor(v) else v
            for k, v in entry.items()}


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n={n!r}; expected the number of items, an integer >= 1 (e.g. 200).")
    return int(n)


def _check_size(size) -> tuple[int, int]:
    ok = (isinstance(size, (tuple, list)) and len(size) == 2
          and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size))
    if not ok or min(size) < 16:
        raise ValueError(f"size={size!r}; expected (height, width), two integers >= 16, "
                         "e.g. (64, 128) for quick mode or (256, 512).")
    return int(size[0]), int(size[1])


def _check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r}; expected one of {', '.join(map(repr, choices))}.")
    return value


def class_legend(ax: Any, classes: Sequence[str] = ToyCity.CLASSES,
                 palette: Sequence[tuple[int, int, int]] = ToyCity.PALETTE,
                 present: Sequence[int] | None = None, **kw: Any) -> Any:
    """A class-colour legend beside a label map drawn with ``colorize`` (matplotlib ``Axes``).

    Args:
        ax: the axes of the label map; the legend goes to its right.
        classes, palette: names and RGB colours (default ToyCity's, i.e. Cityscapes').
        present: class ids to list (e.g. those in the shown map); default all.
        **kw: passed to ``ax.legend`` (e.g. ``fontsize``).

    Returns:
        The legend. Taught in notebooks/04_emuformer.ipynb.
    """
    from matplotlib.patches import Patch

    ids = range(len(classes)) if present is None else sorted(int(i) for i in present)
    handles = [Patch(color=np.asarray(palette[i]) / 255, label=classes[i]) for i in ids
               if 0 <= i < len(classes)]
    kw = {"loc": "center left", "bbox_to_anchor": (1.01, 0.5), "fontsize": 7, "frameon": False,
          **kw}
    return ax.legend(handles=handles, **kw)


def colorize(mask: torch.Tensor | np.ndarray,
             palette: Sequence[tuple[int, int, int]] = ToyCity.PALETTE) -> np.ndarray:
    """Label map [H,W] -> uint8 RGB image [H,W,3] in the Cityscapes colours (void: black).

    Taught in notebooks/00_toycity_and_data.ipynb.
    """
    m = mask.cpu().numpy() if torch.is_tensor(mask) else np.asarray(mask)
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = palette
    return lut[m.astype(np.int64).clip(0, 255)]


# ---------------------------------------------------------------------------------------------
# Joint transforms (dict -> dict). Same random parameters for every per-pixel key.
# ---------------------------------------------------------------------------------------------
# How each known key is resized and padded; any other tensor whose last two dims match the
# image is a per-pixel map: floating -> bilinear, pad 0; integer/bool -> nearest, pad 0.
# "valid" (bool [H, W], True = the pixel came from the image) is the validity map that
# RandomCrop adds: it is padded with False, so padding is marked for every per-pixel key at
# once (cached teacher maps are padded with 0, which for logits would be a uniform target).
_KEY_RULES = {"image": ("bilinear", 0.0), "mask": ("nearest", IGNORE_INDEX),
              "depth": ("nearest", 0.0), "ood_mask": ("nearest", False),
              "valid": ("nearest", False)}


def _per_pixel_rules(sample: dict) -> dict[str, tuple[str, float]]:
    """(interpolation, pad value) of every per-pixel tensor of a sample; checks shapes."""
    if not isinstance(sample, dict):
        raise TypeError(f"expected a sample dict with an 'image' tensor, got "
                        f"{type(sample).__name__}.")
    image = sample.get("image")
    if not torch.is_tensor(image) or image.ndim != 3:
        got = tuple(image.shape) if torch.is_tensor(image) else type(image).__name__
        raise ValueError(f"sample['image'] is {got}; expected a float tensor [3, H, W]. "
                         "Apply the joint transforms to ToyCity-style sample dicts.")
    hw = image.shape[-2:]
    rules = {}
    for key, value in sample.items():
        if not torch.is_tensor(value):
            continue
        if key in _KEY_RULES:
            if value.ndim < 2 or value.shape[-2:] != hw:
                raise ValueError(f"sample[{key!r}] has shape {tuple(value.shape)} but the image "
                                 f"is {tuple(hw)}; per-pixel maps must match the image's H, W.")
            if key == "valid" and value.dtype != torch.bool:
                raise ValueError(f"sample['valid'] has dtype {value.dtype}; expected the bool "
                                 "validity map (True = pixel from the image) that RandomCrop "
                                 "adds. Drop the key or pass a bool tensor.")
            rules[key] = _KEY_RULES[key]
        elif value.ndim >= 2 and value.shape[-2:] == hw:
            rules[key] = ("bilinear", 0.0) if value.is_floating_point() else ("nearest", 0)
    return rules


def _resize(t: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize the last two dims of any tensor; bilinear in float32, nearest keeps the values."""
    lead = t.shape[:-2]
    x = t.reshape(1, -1, *t.shape[-2:])
    if mode == "bilinear":
        y = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
    else:  # "nearest-exact" samples pixel centres, consistent with bilinear align_corners=False
        work = torch.float64 if t.dtype in (torch.int32, torch.int64) else torch.float32
        y = F.interpolate(x.to(work), size=size, mode="nearest-exact")
    return y.to(t.dtype).reshape(*lead, *size)


class JointTransform:
    """Base class: a callable sample -> sample; `generator` makes random parameters replayable."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def _rand(self, generator: torch.Generator | None) -> float:
        return float(torch.rand((), generator=generator or self.generator))

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        raise NotImplementedError


class Compose(JointTransform):
    """Apply joint transforms in order (the same generator is passed to each).

    Args:
        transforms: a list of callables sample -> sample.
    """

    def __init__(self, transforms: Sequence[Callable[[dict], dict]]):
        super().__init__()
        bad = [t for t in transforms if not callable(t)]
        if bad:
            raise ValueError(f"Compose got non-callable {bad!r}; pass transform objects.")
        self.transforms = list(transforms)

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        for t in self.transforms:
            sample = t(sample, generator=generator) if isinstance(t, JointTransform) else t(sample)
        return sample

    def __repr__(self) -> str:
        return "Compose([" + ", ".join(type(t).__name__ for t in self.transforms) + "])"


class RandomScale(JointTransform):
    """Resize every per-pixel key by one random factor in [min_scale, max_scale].

    Image and float maps bilinear, masks and other integer and bool maps (the validity map
    "valid" among them) nearest (no new labels).
    Depth values are NOT rescaled: resizing the image is a zoom (a longer focal length), not a
    move of the camera, so every pixel still sees a point at the same distance along the optical
    axis. (The other convention, depth / s, pretends the camera moved closer; it keeps the
    apparent size of objects consistent with their depth but invents a different scene. We keep
    metric depth true to the scene, as the EMUFormer augmentation does.)

    Args:
        min_scale, max_scale: range of the factor, 0 < min_scale <= max_scale (papers: 0.5, 2.0).
        generator: default torch.Generator for the factor (a call's generator overrides it).

    References:
        DUDES (Landgraf et al., 2023) and EMUFormer (Landgraf et al., 2024): scale 0.5-2.0.
        Taught in notebooks/00_toycity_and_data.ipynb.
    """

    def __init__(self, min_scale: float = 0.5, max_scale: float = 2.0,
                 generator: torch.Generator | None = None):
        super().__init__(generator)
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"RandomScale({min_scale}, {max_scale}); expected "
                             "0 < min_scale <= max_scale, e.g. RandomScale(0.5, 2.0).")
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        rules = _per_pixel_rules(sample)
        s = self.min_scale + (self.max_scale - self.min_scale) * self._rand(generator)
        h, w = sample["image"].shape[-2:]
        return _resize_sample(sample, rules, (max(1, round(h * s)), max(1, round(w * s))))


def _resize_sample(sample: dict, rules: dict[str, tuple[str, float]], size: tuple[int, int]
                   ) -> dict:
    """Every per-pixel key of ``sample`` resized to ``size`` by its rule (bilinear/nearest)."""
    return {**sample, **{k: _resize(sample[k], size, mode) for k, (mode, _) in rules.items()}}


class Resize(JointTransform):
    """Resize every per-pixel key to a fixed (h, w): image and float maps bilinear, masks and
    bool maps nearest, as ``RandomScale`` (depth values kept). For evaluation at a set size.

    Args:
        size: (h, w) of the output.
    """

    def __init__(self, size: int | tuple[int, int]):
        super().__init__()
        size = (size, size) if isinstance(size, int) else tuple(size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"Resize({size!r}); expected a positive (h, w).")
        self.size = (int(size[0]), int(size[1]))

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        return _resize_sample(sample, _per_pixel_rules(sample), self.size)


class RandomCrop(JointTransform):
    """Cut a random (h, w) window from every per-pixel key, padding first if the image is smaller.

    Padding (bottom and right): image 0, mask 255 (ignored by the loss), depth 0 (invalid),
    ood_mask False, other maps 0 — including cached teacher targets ("teacher_logits",
    "teacher_probs", "teacher_unc", ...), where 0 is no target at all (zero logits are a
    *uniform* distribution). So the crop also returns the validity map "valid", a bool [h, w]
    tensor that is True where the pixel came from the image and False on padding; it is made
    all True first when the sample has none, and later RandomScale (nearest) and
    RandomHorizontalFlip move it with the other keys. Every distillation loss in
    ``minikd.losses`` leaves the pixels with ``batch["valid"] == False`` out of its teacher
    terms. The crop draws the same random offsets and returns the same values for every other
    key as it did before "valid" existed.

    Args:
        size: (h, w) of the crop, or one int for a square crop.
        generator: default torch.Generator for the offsets.

    References:
        DUDES (Landgraf et al., 2023) and EMUFormer (Landgraf et al., 2024): random crops.
        Taught in notebooks/00_toycity_and_data.ipynb.
    """

    def __init__(self, size: int | tuple[int, int], generator: torch.Generator | None = None):
        super().__init__(generator)
        size = (size, size) if isinstance(size, int) else tuple(size)
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise ValueError(f"RandomCrop size={size!r}; expected (h, w) positive integers, "
                             "e.g. RandomCrop((64, 128)).")
        self.size = size

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        _per_pixel_rules(sample)  # checks the sample before "valid" is added
        if "valid" not in sample:
            valid = torch.ones(sample["image"].shape[-2:], dtype=torch.bool)
            sample = {**sample, "valid": valid}
        rules = _per_pixel_rules(sample)
        (h, w), (H, W) = self.size, sample["image"].shape[-2:]
        ph, pw = max(H, h), max(W, w)
        g = generator or self.generator
        top = int(torch.randint(0, ph - h + 1, (), generator=g))
        left = int(torch.randint(0, pw - w + 1, (), generator=g))
        out = dict(sample)
        for key, (_, pad) in rules.items():
            t = sample[key]
            if (ph, pw) != (H, W):
                padded = torch.full((*t.shape[:-2], ph, pw), pad, dtype=t.dtype)
                padded[..., :H, :W] = t
                t = padded
            out[key] = t[..., top:top + h, left:left + w].contiguous()
        return out


class RandomHorizontalFlip(JointTransform):
    """Mirror every per-pixel key left-right with probability p (depth values unchanged).

    The validity map "valid" (see ``RandomCrop``) is mirrored with the rest.

    Args:
        p: flip probability in [0, 1] (papers: 0.5).
        generator: default torch.Generator for the coin.
    """

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None):
        super().__init__(generator)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip(p={p}); expected a probability in [0, 1].")
        self.p = float(p)

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        rules = _per_pixel_rules(sample)
        if self._rand(generator) >= self.p:
            return dict(sample)
        return {**sample, **{k: sample[k].flip(-1) for k in rules}}


class ColorJitter(JointTransform):
    """Random brightness, contrast, saturation (and hue) of the image only; labels untouched.

    Args:
        brightness, contrast, saturation: factor drawn from [1 - x, 1 + x] (x >= 0).
        hue: shift drawn from [-hue, hue], hue in [0, 0.5].
        generator: default torch.Generator for the factors.
    """

    def __init__(self, brightness: float = 0.3, contrast: float = 0.3, saturation: float = 0.3,
                 hue: float = 0.0, generator: torch.Generator | None = None):
        super().__init__(generator)
        if min(brightness, contrast, saturation) < 0 or not 0 <= hue <= 0.5:
            raise ValueError(f"ColorJitter({brightness}, {contrast}, {saturation}, {hue}); "
                             "expected brightness, contrast, saturation >= 0 and hue in [0, 0.5].")
        self.brightness, self.contrast, self.saturation, self.hue = (
            brightness, contrast, saturation, hue)

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        _per_pixel_rules(sample)
        img = sample["image"]
        if not img.is_floating_point():
            raise ValueError(f"ColorJitter needs a float image in [0, 1], got {img.dtype}.")
        f = [1 + x * (2 * self._rand(generator) - 1)
             for x in (self.brightness, self.contrast, self.saturation)]
        hue = self.hue * (2 * self._rand(generator) - 1)
        grey = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]
        img = img * f[0]
        img = grey.mean() * f[0] + f[1] * (img - grey.mean() * f[0])
        grey = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]
        img = (grey + f[2] * (img - grey)).clamp(0, 1)
        if self.hue > 0:
            from torchvision.transforms.functional import adjust_hue
            img = adjust_hue(img, hue)
        return {**sample, "image": img}


class Normalize(JointTransform):
    """(image - mean) / std per channel; other keys untouched. Apply last.

    Args:
        mean, std: per-channel statistics (default: ImageNet, for pretrained encoders).
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"Normalize(mean={mean}, std={std}); expected three means and three "
                             "positive stds, e.g. IMAGENET_MEAN, IMAGENET_STD.")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        _per_pixel_rules(sample)
        return {**sample, "image": (sample["image"] - self.mean) / self.std}


def train_transforms(crop_size: int | tuple[int, int], scale: tuple[float, float] = (0.5, 2.0),
                     flip_p: float = 0.5, color_jitter: bool = True,
                     normalize: bool = True) -> Compose:
    """The papers' training augmentation: random scale, random crop, flip, jitter, normalise.

    Args:
        crop_size: (h, w) of the crops (e.g. (64, 128) quick; DUDES: 768x768).
        scale: random scale range (papers: 0.5-2.0).
        flip_p: horizontal flip probability.
        color_jitter: add ColorJitter (image only). Default True (the other notebooks rely
            on it). EMUFormer jitters the *teacher's* input instead and gives the student scale,
            crop and flip only (§3.3 and §4, Eq. 8): pass ``color_jitter=False`` for its student
            and put the jitter on the teacher with
            ``ensembles.TeacherCache(..., teacher_transform=ColorJitter(), teacher_views=K)``.
        normalize: add Normalize with ImageNet statistics (DUDES' code feeds [0, 1] images:
            pass False to follow it).

    References:
        DUDES (Landgraf et al., 2023), EMUFormer (Landgraf et al., 2024) §4 "Data
        Augmentations". Taught in notebooks/00_toycity_and_data.ipynb and notebook 04
        (EMUFormer, planned).
    """
    steps: list = [RandomScale(*scale), RandomCrop(crop_size), RandomHorizontalFlip(flip_p)]
    if color_jitter:
        steps.append(ColorJitter())
    if normalize:
        steps.append(Normalize())
    return Compose(steps)


def eval_transforms(normalize: bool = True) -> Compose:
    """Evaluation: no geometric change, only normalisation (or nothing with normalize=False)."""
    return Compose([Normalize()] if normalize else [])


class Unlabelled(Dataset):
    """The items of a data set with every label removed: distillation on unlabelled images.

    Item i is ``dataset[i]`` with "mask" set to IGNORE_INDEX (255) at every pixel (an int64
    [H, W] mask is added to items that have none) and, if present, "depth" set to 0 (invalid)
    at every pixel; every other key (image, index, cached teacher targets, the validity map
    "valid", "ood_mask", ...) is passed on unchanged. The cross-entropy
    ignores label 255 and the depth losses ignore depth 0, so the teacher's targets are the only
    training signal: ``losses.DistillationLoss`` keeps void-labelled pixels in its KD term by
    default (``mask_void=False``) and leaves out only crop padding (``"valid"`` False). The
    wrapper may sit inside or outside ``ensembles.CachedTargets``, and before or after the
    data set's own transform (a mask of 255 stays 255 under crops, scales and flips).

    Args:
        dataset: any map-style data set (with ``__len__`` and ``__getitem__``) whose items are
            dicts in the minikd format, e.g. ``ToyCity(200, transform=train_transforms(size))``.

    Raises:
        ValueError: if ``dataset`` has no ``__len__``/``__getitem__``.
        TypeError: (when an item is read) if the item is not a dict.

    Example:
        >>> student_data = Unlabelled(ToyCity(200, domain="target"))
        >>> bool((student_data[0]["mask"] == IGNORE_INDEX).all())
        True

    References:
        Hinton et al., "Distilling the Knowledge in a Neural Network", 2015 (soft targets
        need no labels). Taught in notebooks/01_vanilla_kd_temperature.ipynb.
    """

    def __init__(self, dataset: Dataset) -> None:
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise ValueError(f"Unlabelled(dataset) got {type(dataset).__name__}, which has no "
                             "__len__/__getitem__; pass a map-style data set such as "
                             "ToyCity(200) (not an iterable data set or a DataLoader).")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return f"Unlabelled({self.dataset!r})"

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        if not isinstance(item, dict):
            raise TypeError(f"Unlabelled: item {index} is a {type(item).__name__}; expected a "
                             "sample dict with 'image' and 'mask' (minikd data format).")
        item = dict(item)
        if "mask" in item:
            item["mask"] = torch.full_like(item["mask"], IGNORE_INDEX)
        elif torch.is_tensor(item.get("image")):  # image-only items get an all-void mask
            item["mask"] = torch.full(item["image"].shape[-2:], IGNORE_INDEX, dtype=torch.long)
        if "depth" in item:
            item["depth"] = torch.zeros_like(item["depth"])
        return item


# =============================================================================================
# Real data sets: Cityscapes, NYUv2 and GTA5 read from folders prepared by data_scripts/
# =============================================================================================

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


class _CityscapesLabels(torch.utils.data.Dataset):
    """Label attributes of the data sets labelled in Cityscapes trainIds (Cityscapes, GTA5)."""

    CLASSES = CITYSCAPES_CLASSES
    PALETTE = CITYSCAPES_PALETTE
    NUM_CLASSES = len(CITYSCAPES_CLASSES)
    ID_TO_TRAINID = CITYSCAPES_ID_TO_TRAINID


class Cityscapes(_CityscapesLabels):
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


class GTA5(_CityscapesLabels):
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


# ---------------------------------------------------------------------------------------------
# The U-Net KD paper's six classes (notebook 02)
# ---------------------------------------------------------------------------------------------
#: The paper's Table I classes; in brackets the Cityscapes class its labelId names (8: sidewalk,
#: 26: car, 20: traffic sign; the paper calls them road markings, vehicle and posts/pylons).
UNET_KD_CLASSES: tuple[str, ...] = ("background", "road", "road markings (sidewalk)",
                                    "vehicle (car)", "posts/pylons (traffic sign)", "person")
#: The paper's Table I colours, in UNET_KD_CLASSES order.
UNET_KD_PALETTE: list[tuple[int, int, int]] = [(81, 0, 81), (128, 64, 128), (244, 35, 232),
                                               (0, 0, 142), (220, 220, 0), (220, 20, 60)]
#: Cityscapes trainId -> the paper's class; every other trainId and void (255) is background (0).
UNET_KD_FROM_TRAINID: dict[int, int] = {0: 1, 1: 2, 13: 3, 7: 4, 11: 5}


def unet_kd_class_map(to_trainid: dict[int, int] | None = None, num_classes: int = 19
                      ) -> list[int]:
    """For each class id of a data set, its class among the U-Net KD paper's six.

    Args:
        to_trainid: the data set's class id -> Cityscapes trainId (``ToyCity.TO_CITYSCAPES``);
            ``None``: the ids are trainIds (Cityscapes, GTA5).
        num_classes: the data set's number of classes (ToyCity 17, Cityscapes 19).

    Returns:
        ``num_classes`` ids in 0..5 (``models.MergedClasses`` merges a 17-class teacher with it).
    """
    to_trainid = to_trainid if to_trainid is not None else {i: i for i in range(num_classes)}
    return [UNET_KD_FROM_TRAINID.get(to_trainid.get(c, IGNORE_INDEX), 0)
            for c in range(num_classes)]


class Relabel(JointTransform):
    """Map the mask's class ids through a table (ids it does not list, void included, -> 0).

    Args:
        class_map: ``class_map[c]`` is the new id of class ``c`` (e.g. ``unet_kd_class_map()``).
        other: the id of every value not in the table (default 0: the paper's background).
    """

    def __init__(self, class_map: Sequence[int], other: int = 0):
        super().__init__()
        self.lut = torch.full((256,), int(other), dtype=torch.long)
        self.lut[: len(class_map)] = torch.as_tensor(list(class_map), dtype=torch.long)

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        return {**sample, "mask": self.lut[sample["mask"].long()]}


def unet_kd_sets(mode: str, size: tuple[int, int], *, n_train: int | None = None,
                 n_search: int = 64, n_test: int | None = None,
                 train_transform: Callable[[dict], dict] | None = None,
                 root: str | os.PathLike | None = None) -> dict[str, Dataset]:
    """Notebook 02's data, relabelled to the paper's six classes, for a mode.

    quick: ToyCity at ``size``: ``train`` = split "train", seed 0 (the zoo teachers' own training
    scenes), ``search`` = split "val", seed 0 (the zoo's validation scenes: the ensemble weights
    are searched and the teachers scored here), ``test`` = split "test", seed 2, held out: every
    reported student figure is measured here, and no choice of the lesson looked at it.
    full: Cityscapes from ``root`` (default ``$MINIKD_CITYSCAPES`` or ``../data/cityscapes``)
    resized to ``size``: ``train`` = fine train, ``search`` = the first ``n_search`` val images,
    ``test`` = the other val images (the paper searches and reports on all of val).

    Args:
        mode: "quick" or "full".
        size: (h, w) of every image.
        n_train, n_test: images (quick: required; full: ``None`` = all).
        n_search: images of the weight search.
        train_transform: joint augmentation of ``train_aug`` (e.g. crop and flip).
        root: the prepared Cityscapes folder (full mode).

    Returns:
        ``{"train", "train_aug", "search", "test"}``; ``train_aug`` is ``train`` with
        ``train_transform`` (same images, same order).

    References:
        U-Net KD paper (unet_kd_ensemble_teachers), Table I. Taught in
        notebooks/02_unet_ensemble_weighting.ipynb.
    """
    _check_choice("mode", mode, ("quick", "full"))
    size = _check_size(size)
    if mode == "quick":
        if n_train is None or n_test is None:
            raise ValueError("unet_kd_sets('quick', ...) needs n_train and n_test (ToyCity has "
                             "no fixed length); e.g. n_train=192, n_test=64.")
        relabel = Relabel(unet_kd_class_map(ToyCity.TO_CITYSCAPES, ToyCity.NUM_CLASSES))

        def toy(n: int, split: str, seed: int) -> Dataset:
            return ToyCity(n, size=size, split=split, seed=seed, cache=True, transform=relabel)

        train = toy(n_train, "train", 0)  # rendered once; train_aug is a view of it
        return {"train": train,
                "train_aug": Transformed(train, train_transform) if train_transform else train,
                "search": toy(n_search, "val", 0), "test": toy(n_test, "test", 2)}
    root = Path(root or os.environ.get("MINIKD_CITYSCAPES") or "../data/cityscapes")
    base = Compose([Relabel(unet_kd_class_map()), Resize(size)])
    aug = Compose([base, train_transform]) if train_transform else base
    val = Cityscapes(root, "val", transform=base)
    if len(val) < 2:
        raise ValueError(f"{root} has {len(val)} val image(s); the weight search and the report "
                         "need at least one each.")
    n_search = min(n_search, len(val) - 1)
    n_test = len(val) - n_search if n_test is None else min(n_test, len(val) - n_search)
    train, train_aug = Cityscapes(root, "train", transform=base), Cityscapes(root, "train",
                                                                             transform=aug)
    if n_train is not None:
        keep = range(min(n_train, len(train)))
        train, train_aug = torch.utils.data.Subset(train, keep), torch.utils.data.Subset(train_aug, keep)
    return {"train": train, "train_aug": train_aug,
            "search": torch.utils.data.Subset(val, range(n_search)),
            "test": torch.utils.data.Subset(val, range(n_search, n_search + n_test))}


class Transformed(Dataset):
    """``dataset`` with a joint transform applied to every item, on top of what it returns.

    Wraps a (cached) data set instead of building a second one with the transform, so ToyCity
    scenes are rendered once for the plain and the augmented view of the same images.

    Args:
        dataset: any map-style data set of sample dicts.
        transform: a callable sample -> sample (e.g. ``train_transforms(...)``).
    """

    def __init__(self, dataset: Dataset, transform: Callable[[dict], dict]) -> None:
        if not callable(transform):
            raise TypeError(f"Transformed needs a callable transform; got {transform!r}.")
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.transform(self.dataset[index])


class VoidAsUnknown(JointTransform):
    """Adds ``ood_mask = (mask == 255)``: data sets without unknown-object masks (Cityscapes)
    read their void pixels as unknown objects, as DUDES's Fig. 3 (notebook 03, full mode)."""

    def __call__(self, sample: dict, generator: torch.Generator | None = None) -> dict:
        return {**sample, "ood_mask": sample["mask"] == IGNORE_INDEX}


def dudes_sets(mode: str, size: tuple[int, int], n_train: int | None = None,
               n_val: int | None = None, n_ood: int | None = None, seed: int = 7,
               train_transform: Callable[[dict], dict] | None = None,
               eval_transform: Callable[[dict], dict] | None = None,
               root: str | os.PathLike | None = None) -> tuple[Dataset, Dataset, Dataset, Dataset]:
    """Notebook 03's data for a mode: (train, train_aug, val, ood).

    quick: ToyCity at ``size``. ``train`` = the first ``n_train`` scenes of split "train",
    seed 0 (the images the zoo's DUDES members ``toycity-dudes/M128-*`` were trained on: the
    student learns the teacher's uncertainty where the teacher was trained, as in the paper);
    ``train_aug`` = the same images through ``train_transform`` (rendered once); ``val`` = split
    "val" and ``ood`` = split "test" with unknown objects (``ood=True``), both from ``seed``, which
    no zoo model and no choice of the lesson saw (the zoo validates on "val" seed 0).
    full: Cityscapes from ``root`` (default ``$MINIKD_CITYSCAPES`` or ``../data/cityscapes``):
    fine train, and val twice: as validation and with its void pixels as unknown objects
    (``VoidAsUnknown``, the paper's Fig. 3).

    Args:
        mode: "quick" or "full".
        size: (h, w) of the ToyCity images (quick; Cityscapes keeps its own size).
        n_train, n_val, n_ood: images (quick: required; full: ``None`` = all).
        seed: the held-out ToyCity seed of ``val`` and ``ood`` (quick).
        train_transform: joint augmentation of ``train_aug``; eval_transform: of val and ood.
        root: the prepared Cityscapes folder (full mode).

    References:
        Landgraf et al., DUDES (2023) §4. Taught in notebooks/03_dudes.ipynb.
    """
    _check_choice("mode", mode, ("quick", "full"))
    plain = eval_transform or Compose([])
    if mode == "quick":
        if None in (n_train, n_val, n_ood):
            raise ValueError("dudes_sets('quick', ...) needs n_train, n_val and n_ood (ToyCity has "
                             "no fixed length); e.g. n_train=320, n_val=64, n_ood=32.")
        size = _check_size(size)
        train = ToyCity(n_train, size=size, split="train", seed=0, cache=True)
        val = ToyCity(n_val, size=size, split="val", seed=seed, cache=True, transform=plain)
        ood = ToyCity(n_ood, size=size, split="test", seed=seed, ood=True, cache=True,
                      transform=plain)
    else:
        root = Path(root or os.environ.get("MINIKD_CITYSCAPES") or "../data/cityscapes")
        train, val = Cityscapes(root, "train"), Cityscapes(root, "val", transform=plain)
        ood = Cityscapes(root, "val", transform=Compose([plain, VoidAsUnknown()]))
        subsets = [(train, n_train), (val, n_val), (ood, n_ood)]
        train, val, ood = [d if n is None else torch.utils.data.Subset(d, range(min(n, len(d))))
                           for d, n in subsets]
    train_aug = Transformed(train, train_transform) if train_transform else train
    return train, train_aug, val, ood
