"""A folder of images for pretraining: recursive listing, robust RGB loading, unreadable files skipped.

Every image comes out as an 8-bit RGB PIL image, upright (EXIF orientation applied), whatever its stored
mode: grayscale, palette, transparent (composited on black), 16-bit (scaled, not clipped) or CMYK.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from cribo.files import check_regular_file

logger = logging.getLogger(__name__)

# File name endings recognised as images (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

# Stored modes with an alpha channel or a transparency key: composited on black before dropping alpha.
_ALPHA_MODES = ("RGBA", "LA", "PA")
_SIXTEEN_BIT_MAX = 65535  # largest value of a 16-bit sample (I;16 modes)
_INT32_MAX = 2**31 - 1  # largest value of PIL's signed 32-bit "I" mode

# Errors PIL raises for unreadable, truncated, corrupt or oversized files (DecompressionBombError is not an OSError).
_LOAD_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def list_images(root: str | os.PathLike[str]) -> list[Path]:
    """All image files under ``root``, recursively, sorted by path components.

    Files count as images when their extension is one of ``IMAGE_EXTENSIONS`` in any case. Hidden files and
    folders (name starting with ".", such as macOS "._x.jpg" resource forks) are skipped. Symbolic links to
    folders are followed once (link cycles are not walked twice).

    Args:
        root: the folder.

    Returns:
        The image paths, each ``root / relative path``.

    Raises:
        ValueError: ``root`` is missing, not a folder, or holds no image.
    """
    return [Path(root, relative) for relative in _relative_image_paths(Path(root))]


def _relative_image_paths(root: Path) -> list[str]:
    accepted = ", ".join(IMAGE_EXTENSIONS)
    if not root.is_dir():
        raise ValueError(f"root {str(root)!r} is not an existing folder; expected a folder of {accepted} images")
    found: list[str] = []
    visited: set[tuple[int, int]] = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        status = os.stat(folder)
        if (status.st_dev, status.st_ino) in visited:
            subfolders.clear()
            continue
        visited.add((status.st_dev, status.st_ino))
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        relative_folder = os.path.relpath(folder, root)
        for name in files:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.normpath(os.path.join(relative_folder, name)))
    if not found:
        raise ValueError(f"root {str(root)!r} holds no image; accepted extensions (any case): {accepted}")
    return sorted(found, key=lambda relative: relative.split(os.sep))


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Read an image file as an upright 8-bit RGB image (see :func:`to_rgb` for the mode conversions).

    Args:
        path: the file.

    Returns:
        The decoded RGB image, rotated/mirrored as its EXIF orientation tag says.

    Raises:
        OSError: the file is missing, not a regular file (a FIFO, socket or device would block or never end), not
            an image or truncated (PIL's errors; see ``ImageFolder``).
    """
    check_regular_file(path)
    with Image.open(path) as image:
        image.load()  # decode now, inside the `with`; truncated files raise here
        upright = ImageOps.exif_transpose(image)
    return to_rgb(upright)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    * RGBA / LA / PA, and palette, grayscale or RGB images with a transparency key: composited on black
      (fully transparent pixels become black, whatever colour they store; half-transparent ones darker).
    * 16-bit grayscale (``I;16*``): scaled by 255 / 65535, not clipped. 32-bit ``I``: scaled the same way when
      all values fit in 16 bits (PIL opens 16-bit PNG/TIFF data as ``I`` in some versions), otherwise by
      255 / (2^31 - 1) with negative values at 0.
    * CMYK: ``R = (255 - C)(255 - K) / 255`` and likewise G (M) and B (Y), the usual device conversion.
    * Everything else (L, 1, P, YCbCr, ...): PIL's own conversion.

    Args:
        image: any PIL image.

    Returns:
        An RGB image (the input itself when it is already RGB without transparency).
    """
    mode = image.mode
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        return _high_bit_depth_to_rgb(image)
    if mode == "CMYK":
        cmyk = np.asarray(image, dtype=np.float32)
        rgb = (255.0 - cmyk[..., :3]) * (255.0 - cmyk[..., 3:]) / 255.0
        return Image.fromarray(np.rint(rgb).astype(np.uint8), mode="RGB")
    return image if mode == "RGB" else image.convert("RGB")


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16") or (values.size and values.min() >= 0 and values.max() <= _SIXTEEN_BIT_MAX):
        full_scale = _SIXTEEN_BIT_MAX
    else:
        full_scale = _INT32_MAX
    grey = np.rint(np.clip(values, 0, None) * (255.0 / full_scale)).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


class ImageFolder(Dataset["Image.Image | None"]):
    """The images of a folder tree, for pretraining (no labels).

    Item ``i`` is the RGB image of ``paths[i]``, or None when the file cannot be read (unreadable, truncated,
    not an image, too large): a warning names the file and ``num_skipped`` counts it. The count is per process;
    with DataLoader workers, count the Nones in the training loop instead.

    The relative paths are kept in one NumPy byte array rather than a list of ``Path`` objects, so DataLoader
    workers that index it do not copy it page by page (Python reference counts would touch every object).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        """List the images under ``root`` (see :func:`list_images`); raises ValueError when there are none."""
        self.root = Path(root)
        self._relative_paths = np.array([os.fsencode(relative) for relative in _relative_image_paths(self.root)])
        self.num_skipped = 0

    def __len__(self) -> int:
        return len(self._relative_paths)

    @property
    def paths(self) -> list[Path]:
        """All image paths, in item order (built on each access)."""
        return [self.path(index) for index in range(len(self))]

    def path(self, index: int) -> Path:
        """Path of item ``index``."""
        return self.root / os.fsdecode(self._relative_paths[index])

    def __getitem__(self, index: int) -> Image.Image | None:
        path = self.path(index)
        try:
            return load_rgb(path)
        except _LOAD_ERRORS as error:
            self.num_skipped += 1
            logger.warning("skipping unreadable image %s: %s", path, error)
            return None
