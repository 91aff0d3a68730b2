"""Shared helpers of the data_scripts: safe archive reading, atomic output folders, resizing.

The prepare_*.py scripts never extract an archive wholesale. They open it with ``open_archive``,
which refuses the whole archive before anything is written if any member is unsafe (an absolute
path, a ``..`` component, a name that would resolve outside the output folder, a symlink or
hardlink, a device file), then read the members they need one by one and write processed files
into a temporary sibling of the output folder, which is renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import stat
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

MARKER = "minikd_prepared.json"  # written last: its presence means the folder is complete


class PrepareError(Exception):
    """A problem with the user's input that the message explains; the CLI prints it."""


class UnsafeArchiveError(PrepareError):
    """An archive member would escape the output folder or is a link."""


class MissingMembersError(PrepareError):
    """An archive lacks members the data set needs."""


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """argparse type for ``--size HxW`` (e.g. ``512x1024``: height 512, width 1024)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise argparse.ArgumentTypeError(
            f"--size {text!r}: expected HEIGHTxWIDTH with positive integers, e.g. 512x1024")
    return int(match[1]), int(match[2])


def positive_int(text: str) -> int:
    """argparse type for a count >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1")
    return int(text)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """--out, --size, --limit, --overwrite: the options every prepare script shares."""
    parser.add_argument("--out", type=Path, required=True,
                        help="prepared folder to create (the loader's root)")
    parser.add_argument("--size", type=parse_size, default=None, metavar="HxW",
                        help="resize to HEIGHTxWIDTH (images bilinear, labels/depth nearest); "
                             "default: keep the original size")
    parser.add_argument("--limit", type=positive_int, default=None, metavar="N",
                        help="prepare only the first N samples of each split (a laptop subset)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it exists (the old folder stays until the new "
                             "one is complete)")


def run_cli(main: Callable[[list[str] | None], int]) -> None:
    """Run ``main`` and turn a PrepareError into a one-line message and exit status 2."""
    try:
        sys.exit(main(None))
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def find_archive(folder: Path, name: str, url: str) -> Path:
    """``folder/name`` or a PrepareError saying where to download it."""
    path = Path(folder) / name
    if not path.is_file():
        raise PrepareError(
            f"{name} not found in {str(folder)!r}. Download it by hand from {url} "
            f"(registration needed) and put it there, or pass the folder that holds it.")
    return path


# ---------------------------------------------------------------------------------------------
# Safe archive reading
# ---------------------------------------------------------------------------------------------


def check_member_name(name: str, archive: Path | str) -> None:
    """Reject absolute names, ``..`` components and names resolving outside a target folder.

    Args:
        name: the member name as stored in the archive.
        archive: the archive (named in the error).

    Raises:
        UnsafeArchiveError: the member would land outside the folder it is extracted to.
    """
    parts = re.split(r"[/\\]", name)
    absolute = name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) is not None
    if absolute or ".." in parts:
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} would be written outside the target folder "
            f"(absolute path or '..'); refusing to use this archive. Re-download it from the "
            f"official site.")
    target = Path("/__target__")
    if not (target / name).resolve().is_relative_to(target):
        raise UnsafeArchiveError(f"{archive}: member {name!r} resolves outside the target folder.")


class Archive:
    """Read-only view of a zip or tar archive whose members were all checked to be safe.

    Args:
        path: a .zip, .tar, .tar.gz/.tgz or .tar.bz2/.tar.xz file.

    Raises:
        UnsafeArchiveError: a member is a link, a special file or escapes the target folder.
        PrepareError: the file is not a readable archive.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        if zipfile.is_zipfile(self.path):
            self._zip = zipfile.ZipFile(self.path)
        elif tarfile.is_tarfile(self.path):
            self._tar = tarfile.open(self.path)  # noqa: SIM115 (closed by .close())
        else:
            raise PrepareError(f"{self.path}: not a zip or tar archive (corrupt download?).")
        try:
            self.members = (self._check_zip(self._zip) if self._zip is not None
                            else self._check_tar(self._tar))
        except BaseException:
            self.close()
            raise

    def _check_zip(self, zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
        files = {}
        for info in zf.infolist():
            check_member_name(info.filename, self.path)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UnsafeArchiveError(
                    f"{self.path}: member {info.filename!r} is a symbolic link; the official "
                    f"archives contain none, so refusing to use this archive.")
            if not info.is_dir():
                files[info.filename] = info
        return files

    def _check_tar(self, tf: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
        files = {}
        for info in tf.getmembers():
            check_member_name(info.name, self.path)
            if info.issym() or info.islnk():
                kind = "symbolic" if info.issym() else "hard"
                raise UnsafeArchiveError(
                    f"{self.path}: member {info.name!r} is a {kind} link (to {info.linkname!r}); "
                    f"refusing to use this archive.")
            if not (info.isfile() or info.isdir()):
                raise UnsafeArchiveError(
                    f"{self.path}: member {info.name!r} is a device or special file; refusing.")
            if info.isfile():
                files[info.name] = info
        return files

    def names(self) -> list[str]:
        """Names of the regular-file members."""
        return list(self.members)

    def read(self, name: str) -> bytes:
        """Bytes of the file member ``name`` (a member that passed the safety checks)."""
        if name not in self.members:
            raise MissingMembersError(f"{self.path}: no member {name!r}.")
        if self._zip is not None:
            return self._zip.read(name)
        handle = self._tar.extractfile(self.members[name])
        return handle.read()

    def close(self) -> None:
        (self._zip or self._tar).close()


def require_members(archive: Archive, names: Iterable[str], why: str) -> None:
    """Raise MissingMembersError listing the members of ``names`` that ``archive`` lacks."""
    missing = sorted(set(names) - set(archive.members))
    if missing:
        shown = "\n    ".join(missing[:10])
        more = f"\n    ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise MissingMembersError(
            f"{archive.path.name} lacks {len(missing)} member(s) {why}:\n    {shown}{more}\n"
            f"Is it the complete official archive (re-download it if the download was cut)?")


# ---------------------------------------------------------------------------------------------
# Atomic output
# ---------------------------------------------------------------------------------------------


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``out``; rename it to ``out`` only on success.

    On any exception the temporary folder is deleted, so a folder named ``out`` is always
    complete. With ``overwrite`` an existing ``out`` is replaced only after the new one is done.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise PrepareError(f"{out} already exists; pass --overwrite to replace it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def write_marker(folder: Path, info: dict) -> None:
    """Write ``minikd_prepared.json`` (call it last, just before the folder is renamed)."""
    (Path(folder) / MARKER).write_text(json.dumps(info, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def open_image(data: bytes) -> Image.Image:
    """Decode image bytes (fully loaded, so the archive buffer can go)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def resize_rgb(img: Image.Image, size: tuple[int, int] | None) -> Image.Image:
    """RGB image resized bilinearly to ``size`` = (H, W); unchanged if ``size`` is None."""
    img = img.convert("RGB")
    if size is None or (img.height, img.width) == tuple(size):
        return img
    return img.resize((size[1], size[0]), Image.Resampling.BILINEAR)


def resize_nearest(arr: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D array to ``size`` = (H, W) (pixel-centre sampling).

    Used for labels, depth and disparity: values are copied, never blended.
    """
    if size is None or arr.shape[:2] == tuple(size):
        return arr
    h, w = arr.shape[:2]
    rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
    return arr[rows[:, None], cols[None, :]]


def save_png(path: Path, data: Image.Image | np.ndarray) -> None:
    """Save an image or a 2-D uint8/uint16 array as PNG, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = data if isinstance(data, Image.Image) else Image.fromarray(data)
    img.save(path, compress_level=3)
