"""Semantic-segmentation datasets for evaluation, and the paired image/mask transforms the protocols use.

Every dataset yields ``(PIL RGB image, uint8 mask (H, W))`` with labels ``0..num_classes-1`` and
``IGNORE_INDEX`` (255) for pixels that count nowhere, and exposes ``num_classes``, ``class_names``,
``ignore_index``, ``background_index`` (the class that ignored pixels fall back to in the NN protocol's memory
bank, ``None`` when the label space has no background) and ``fingerprint`` (a string that identifies the exact
set of items, used as a feature-cache key).

Layouts:

- Pascal VOC 2012 (``VOCSegmentation``): ``JPEGImages/*.jpg``, ``SegmentationClass/*.png`` (palette PNGs, 255 on
  object borders), ``ImageSets/Segmentation/{train,val}.txt``; with SBD, ``SegmentationClassAug/*.png`` and
  ``ImageSets/Segmentation/trainaug.txt`` give the 10 582-image ``trainaug`` split (PROTOCOLS.md).
- ADE20K (``ADE20KSegmentation``): ``ADEChallengeData2016/{images,annotations}/{training,validation}``; label 0
  ("other") becomes 255 and labels 1..150 become 0..149 (150 classes, PROTOCOLS.md).
- Generic (``FolderSegmentation``): ``images/`` + ``masks/`` with the same file stems, either directly under the
  root or per split (``root/<split>/images`` or ``root/images/<split>``); optional ``classes.txt``.
- The built-in synthetic scenes (``ScenesSegmentation``, wrapping ``cribo.data.scenes.SyntheticScenes``).

Transforms work on tensors: images (3, H, W) float in [0, 1], masks (H, W) int64.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps
from torch import Tensor
from torchvision.transforms import InterpolationMode

from cribo.augment import JITTER_STEPS, JitterStep, TorchRandom, apply_colour_jitter, random_crop_box
from cribo.data.folder import IMAGE_EXTENSIONS, to_rgb
from cribo.files import check_regular_file

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255  # label that no metric or loss counts (VOC borders; ADE20K "other" after remapping)
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")
SEGMENTATION_FLIP_PROBABILITY = 0.5  # mmseg's RandomFlip(prob=0.5) in the segmentation training pipeline
EXIF_ORIENTATION = 0x0112  # the EXIF tag of the orientation: 1 upright, 2-8 mirrored and/or turned (EXIF 2.3 §4.6.4)
EXIF_ROTATIONS = frozenset(range(2, 9))
EXIF_TRANSPOSING = frozenset({5, 6, 7, 8})  # the orientations that swap width and height

# Pascal VOC 2012: 20 object classes + background (the devkit's order).
VOC_CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

# ADE20K SceneParsing (ADEChallengeData2016): the 150 classes of labels 1..150, in label order.
ADE20K_CLASS_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

DatasetName = Literal["scenes", "voc", "ade20k", "folder"]
DATASET_NAMES: tuple[str, ...] = ("scenes", "voc", "ade20k", "folder")


@runtime_checkable
class SegmentationSet(Protocol):
    """What the evaluation code needs from a dataset (the built-in scenes satisfy it too)."""

    @property
    def num_classes(self) -> int: ...

    @property
    def class_names(self) -> Sequence[str]: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray]: ...


def voc_palette() -> np.ndarray:
    """The Pascal VOC colour map: (256, 3) uint8, entry i is the colour of label i (bit-interleaved index)."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for label in range(256):
        value, red, green, blue = label, 0, 0, 0
        for shift in range(7, -1, -1):
            red |= (value & 1) << shift
            green |= ((value >> 1) & 1) << shift
            blue |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[label] = (red, green, blue)
    return palette


def _labels_from_rgb(rgb: np.ndarray, path: Path) -> np.ndarray:
    """Map a VOC colour-coded (H, W, 3) mask to label indices; a colour outside the VOC map is an error."""
    palette = voc_palette().astype(np.int64)
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    lookup = {int((r << 16) | (g << 8) | b): label for label, (r, g, b) in enumerate(palette.tolist())}
    unique, inverse = np.unique(codes, return_inverse=True)
    unknown = [int(code) for code in unique if int(code) not in lookup]
    if unknown:
        raise ValueError(f"{path}: colour #{unknown[0]:06x} is not in the Pascal VOC colour map")
    return np.array([lookup[int(code)] for code in unique], dtype=np.uint8)[inverse].reshape(codes.shape)


def read_label_mask(path: Path, allow_rgb_palette: bool = False) -> np.ndarray:
    """Read a label image: palette (P) or grey (L / I / I;16) PNG -> (H, W) uint8 labels.

    Args:
        path: mask file.
        allow_rgb_palette: accept RGB masks colour-coded with the VOC colour map.

    Returns:
        (H, W) uint8 label array (the palette index for palette PNGs).
    """
    try:
        check_regular_file(path)
        with Image.open(path) as mask:
            mode = mask.mode
            array = np.asarray(mask.convert("RGB") if mode in ("RGB", "RGBA") else mask)
    except OSError as error:
        raise ValueError(f"{path}: cannot read the mask ({error.strerror or error})") from error
    if mode in ("RGB", "RGBA"):
        if not allow_rgb_palette:
            raise ValueError(f"{path}: a mask must be a single-channel label image (mode P, L or I), got {mode}")
        return _labels_from_rgb(array, path)
    if mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
        raise ValueError(f"{path}: unsupported mask mode {mode}; valid: P, L, I, I;16")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"{path}: label values must lie in 0..255, found {array.min()}..{array.max()}")
    return array.astype(np.uint8)


def check_mask(mask: np.ndarray, image_size: tuple[int, int], num_classes: int, path: Path | str) -> None:
    """Raise ``ValueError`` naming ``path`` when the mask's size or labels do not fit.

    Args:
        mask: (H, W) uint8 labels.
        image_size: the image's (width, height), as PIL reports it.
        num_classes: valid labels are 0..num_classes-1 and ``IGNORE_INDEX``.
        path: the mask's file, for the message.
    """
    height, width = mask.shape
    if (width, height) != tuple(image_size):
        raise ValueError(f"{path}: mask is {width}x{height} but its image is {image_size[0]}x{image_size[1]}")
    bad = np.unique(mask[(mask >= num_classes) & (mask != IGNORE_INDEX)])
    if bad.size:
        raise ValueError(
            f"{path}: label(s) {bad.tolist()} out of range; valid labels are 0..{num_classes - 1} and "
            f"{IGNORE_INDEX} (ignored)"
        )


def load_image(path: Path, upright: bool = False) -> Image.Image:
    """Open an image as 8-bit RGB (``cribo.data.folder.to_rgb`` conversions), with a ValueError naming the file.

    Args:
        path: the image file.
        upright: apply its EXIF orientation (see :func:`mask_orientation`: only where the mask was drawn on the
            upright image).
    """
    try:
        check_regular_file(path)
        with Image.open(path) as image:
            image.load()
            return to_rgb(ImageOps.exif_transpose(image) if upright else image)
    except OSError as error:
        raise ValueError(f"{path}: cannot read the image ({error.strerror or error})") from error


def exif_orientation(path: Path) -> tuple[int, tuple[int, int]]:
    """The EXIF orientation tag of an image (1 = none) and its stored (width, height), from its header only."""
    try:
        check_regular_file(path)
        with Image.open(path) as image:
            return int(image.getexif().get(EXIF_ORIENTATION, 1)), image.size
    except OSError as error:
        raise ValueError(f"{path}: cannot read the image ({error.strerror or error})") from error


def mask_orientation(image_path: Path, mask_path: Path) -> bool:
    """Whether the mask of ``image_path`` was drawn on its EXIF-upright image (apply the orientation) or on its
    stored pixels (do not).

    Masks are usually drawn on the image as displayed, i.e. upright: the orientation is applied whenever the upright
    image fits the mask. An orientation that swaps width and height (90-degree turns) is left out when only the
    stored pixels fit the mask.

    Raises:
        ValueError: neither orientation of the image has the mask's size.
    """
    orientation, size = exif_orientation(image_path)
    if orientation not in EXIF_ROTATIONS:
        return False
    if orientation not in EXIF_TRANSPOSING:
        return True  # the size is the same both ways; the mask was drawn on the image as displayed
    try:
        with Image.open(mask_path) as mask:
            mask_size = mask.size
    except OSError as error:
        raise ValueError(f"{mask_path}: cannot read the mask ({error})") from error
    upright = (size[1], size[0])
    if mask_size == upright:
        return True
    if mask_size == size:
        return False
    raise ValueError(
        f"{mask_path}: mask is {mask_size[0]}x{mask_size[1]} but its image {image_path.name} is {size[0]}x{size[1]} "
        f"({upright[0]}x{upright[1]} upright, EXIF orientation {orientation}); the mask must have the image's size"
    )


def _missing_error(kind: str, missing: list[Path]) -> ValueError:
    shown = ", ".join(str(path) + ("" if not path.exists() else " (not a regular file)") for path in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return ValueError(f"missing {kind}: {shown}{more}")


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(str(part) for part in parts).encode()).hexdigest()[:16]


class _FileSegmentation:
    """Shared machinery of the on-disk datasets: parallel image / mask path lists, checked on access."""

    ignore_index = IGNORE_INDEX
    background_index: int | None = None
    allow_rgb_palette = False

    def __init__(self, images: list[Path], masks: list[Path], class_names: Sequence[str], name: str) -> None:
        missing = [path for path in images if not path.is_file()]
        if missing:
            raise _missing_error("images", missing)
        missing = [path for path in masks if not path.is_file()]
        if missing:
            raise _missing_error("masks", missing)
        if not images:
            raise ValueError(f"{name}: the split holds no images")
        self.images, self.masks = images, masks
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.fingerprint = _fingerprint(name, self.num_classes, *(f"{i}:{m}" for i, m in zip(images, masks)))
        self.upright = frozenset(index for index in range(len(images)) if mask_orientation(images[index], masks[index]))
        if self.upright:  # features of these images differ from the stored pixels': a cache key of their own
            self.fingerprint = _fingerprint(self.fingerprint, "upright", *sorted(self.upright))
            example = images[min(self.upright)].name
            logger.warning(
                "%s: applied the EXIF orientation of %d image(s) (e.g. %s) so that they match their masks",
                name,
                len(self.upright),
                example,
            )

    def __len__(self) -> int:
        return len(self.images)

    def _remap(self, labels: np.ndarray, path: Path) -> np.ndarray:
        return labels

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray]:
        image = load_image(self.images[index], upright=index in self.upright)
        mask = self._remap(read_label_mask(self.masks[index], self.allow_rgb_palette), self.masks[index])
        check_mask(mask, image.size, self.num_classes, self.masks[index])
        return image, mask


class VOCSegmentation(_FileSegmentation):
    """Pascal VOC 2012 segmentation (21 classes, 255 ignored), optionally with the SBD ``trainaug`` split.

    Args:
        root: the ``VOC2012`` folder (holding ``JPEGImages``), or a folder containing ``VOCdevkit/VOC2012``
            or ``VOC2012``.
        split: a list in ``ImageSets/Segmentation`` (``train``, ``val``, ``trainaug`` with SBD, ...). Masks of
            ``trainaug`` come from ``SegmentationClassAug``, the others from ``SegmentationClass``.
    """

    background_index = 0
    allow_rgb_palette = True

    def __init__(self, root: str | Path, split: str = "val") -> None:
        root = self.find_root(root)
        split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not split_file.is_file():
            raise ValueError(f"split={split!r}: {split_file} not found; valid splits: {self.splits(root)}")
        mask_dir = root / ("SegmentationClassAug" if split == "trainaug" else "SegmentationClass")
        if not mask_dir.is_dir():
            raise ValueError(f"split={split!r}: mask folder {mask_dir} not found")
        stems = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
        images = [root / "JPEGImages" / f"{stem}.jpg" for stem in stems]
        masks = [mask_dir / f"{stem}.png" for stem in stems]
        super().__init__(images, masks, VOC_CLASS_NAMES, f"voc:{root}:{split}")
        self.root, self.split = root, split

    @staticmethod
    def find_root(root: str | Path) -> Path:
        """The folder holding ``JPEGImages``: ``root`` itself, ``root/VOC2012`` or ``root/VOCdevkit/VOC2012``."""
        base = Path(root)
        for candidate in (base, base / "VOC2012", base / "VOCdevkit" / "VOC2012"):
            if (candidate / "JPEGImages").is_dir():
                return candidate
        raise ValueError(f"data_root={str(root)!r}: no Pascal VOC layout (JPEGImages/) found there")

    @staticmethod
    def splits(root: Path) -> list[str]:
        """The split lists present under ``ImageSets/Segmentation``."""
        return sorted(path.stem for path in (root / "ImageSets" / "Segmentation").glob("*.txt"))

    @classmethod
    def default_train_split(cls, root: str | Path) -> str:
        """``trainaug`` when SBD's list and masks are present (the protocol's 10 582 images), else ``train``."""
        found = cls.find_root(root)
        has_aug = (found / "SegmentationClassAug").is_dir()
        return "trainaug" if has_aug and "trainaug" in cls.splits(found) else "train"


class ADE20KSegmentation(_FileSegmentation):
    """ADE20K SceneParsing: 150 classes; the file label 0 ("other") is ignored and labels 1..150 become 0..149.

    Args:
        root: ``ADEChallengeData2016`` or its parent.
        split: ``training`` / ``validation`` (``train`` / ``val`` are accepted as aliases).
    """

    SPLIT_ALIASES: ClassVar[dict[str, str]] = {
        "train": "training",
        "val": "validation",
        "training": "training",
        "validation": "validation",
    }

    def __init__(self, root: str | Path, split: str = "validation") -> None:
        if split not in self.SPLIT_ALIASES:
            raise ValueError(f"split={split!r}; valid: {sorted(self.SPLIT_ALIASES)}")
        base = Path(root)
        base = base / "ADEChallengeData2016" if (base / "ADEChallengeData2016").is_dir() else base
        image_dir = base / "images" / self.SPLIT_ALIASES[split]
        if not image_dir.is_dir():
            raise ValueError(f"data_root={str(root)!r}: no ADE20K layout ({image_dir} not found)")
        images = sorted(path for path in image_dir.iterdir() if path.suffix.lower() in IMAGE_EXTENSIONS)
        masks = [base / "annotations" / self.SPLIT_ALIASES[split] / f"{path.stem}.png" for path in images]
        super().__init__(images, masks, ADE20K_CLASS_NAMES, f"ade20k:{base}:{split}")

    def _remap(self, labels: np.ndarray, path: Path) -> np.ndarray:
        bad = np.unique(labels[labels > len(ADE20K_CLASS_NAMES)])
        if bad.size:
            raise ValueError(f"{path}: label(s) {bad.tolist()} out of range; ADE20K files hold 0 (other) .. 150")
        return labels - np.uint8(1)  # 0 -> 255 (ignored) and 1..150 -> 0..149 in one uint8 wrap-around


class FolderSegmentation(_FileSegmentation):
    """Generic ``images/`` + ``masks/`` pairs with the same file stems (masks: single-channel label PNGs).

    Args:
        root: the dataset folder.
        split: ``None`` for ``root/images`` + ``root/masks``; else ``root/<split>/{images,masks}`` or
            ``root/{images,masks}/<split>``.
        num_classes: size of the label space; default the names in ``classes.txt`` (in the root or the split
            folder, one per line), else 1 + the largest label found in the masks (all masks are read once).
        background_index: the class that ignored pixels fall back to in the NN memory bank (default none).
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        num_classes: int | None = None,
        background_index: int | None = None,
    ) -> None:
        self.largest_label: tuple[int, Path | None] | None = None  # (label, mask file) when the classes are inferred
        image_dir, mask_dir = self.find_folders(Path(root), split)
        images = sorted(path for path in image_dir.iterdir() if path.suffix.lower() in IMAGE_EXTENSIONS)
        masks = [self._mask_for(mask_dir, path) for path in images]
        names = self._class_names(Path(root), image_dir.parent, num_classes, masks)
        super().__init__(images, masks, names, f"folder:{image_dir}:{mask_dir}")
        if background_index is not None and not 0 <= background_index < self.num_classes:
            raise ValueError(f"background_index={background_index} must lie in 0..{self.num_classes - 1}")
        self.background_index = background_index

    @staticmethod
    def find_folders(root: Path, split: str | None) -> tuple[Path, Path]:
        """Locate the image and mask folders of ``split`` (see the class docstring)."""
        if split is None:
            candidates = [(root / "images", root / "masks")]
        else:
            candidates = [
                (root / split / "images", root / split / "masks"),
                (root / "images" / split, root / "masks" / split),
            ]
        for image_dir, mask_dir in candidates:
            if image_dir.is_dir():
                if not mask_dir.is_dir():
                    raise ValueError(f"{mask_dir}: mask folder not found next to {image_dir}")
                return image_dir, mask_dir
        tried = ", ".join(str(image_dir) for image_dir, _ in candidates)
        raise ValueError(f"data_root={str(root)!r}, split={split!r}: no image folder found (tried {tried})")

    @staticmethod
    def _mask_for(mask_dir: Path, image: Path) -> Path:
        for extension in MASK_EXTENSIONS:
            candidate = mask_dir / f"{image.stem}{extension}"
            if candidate.is_file():
                return candidate
        return mask_dir / f"{image.stem}.png"  # reported as missing by the base class

    def _class_names(self, root: Path, split_root: Path, num_classes: int | None, masks: list[Path]) -> list[str]:
        for folder in (split_root, root):
            names_file = folder / "classes.txt"
            if names_file.is_file():
                names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
                if num_classes is not None and num_classes != len(names):
                    raise ValueError(f"num_classes={num_classes} but {names_file} lists {len(names)} names")
                return names
        if num_classes is None:
            found = [
                (int(labels[labels != IGNORE_INDEX].max(initial=0)), path)
                for path, labels in zip(masks, map(read_label_mask, masks))
                if labels.size
            ]
            largest, where = max(found, key=lambda item: item[0], default=(0, None))
            num_classes = largest + 1
            self.largest_label = (largest, where)
            logger.info("folder dataset: %d classes inferred from the largest mask label (%s)", num_classes, where)
        if num_classes < 1 or num_classes > IGNORE_INDEX:
            raise ValueError(f"num_classes={num_classes} must lie in 1..{IGNORE_INDEX}")
        return [f"class_{label}" for label in range(num_classes)]


class ScenesSegmentation:
    """The built-in synthetic scenes (``cribo.data.scenes.SyntheticScenes``) with the dataset interface above.

    Args:
        split: ``train`` or ``val``.
        num_images: number of scenes.
        image_size: side of the square scenes in pixels.
        seed: generator seed.
    """

    ignore_index = IGNORE_INDEX
    background_index = 0

    def __init__(self, split: Literal["train", "val"], num_images: int, image_size: int = 96, seed: int = 0) -> None:
        from cribo.data.scenes import SyntheticScenes  # imported here: the scenes are optional for file datasets

        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}; valid: 'train', 'val'")
        self.scenes = SyntheticScenes(split, num_images=num_images, image_size=image_size, seed=seed)
        self.num_classes = int(self.scenes.num_classes)
        self.class_names = tuple(self.scenes.class_names)
        self.fingerprint = _fingerprint("scenes", split, num_images, image_size, seed)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray]:
        image, mask = self.scenes[index]
        return image.convert("RGB"), np.asarray(mask, dtype=np.uint8)


@dataclass(frozen=True)
class DatasetSpec:
    """Plain arguments that select a dataset and its split (what ``build_segmentation_dataset`` takes)."""

    name: DatasetName
    root: Path | None = None
    split: str | None = None
    num_classes: int | None = None  # folder layout only
    scenes_images: int = 64  # scenes only: number of images of the split
    scenes_image_size: int = 96
    scenes_seed: int = 0


def build_segmentation_dataset(spec: DatasetSpec) -> SegmentationSet:
    """Build one split of a segmentation dataset.

    ``split=None`` picks the protocol's split: VOC ``trainaug`` if present else ``train`` for training
    (``split="train"``), ``val`` for validation; ADE20K ``training`` / ``validation``; scenes ``train`` / ``val``.
    """
    if spec.name == "scenes":
        split = spec.split or "train"
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}; valid for scenes: 'train', 'val'")
        return ScenesSegmentation(split, spec.scenes_images, spec.scenes_image_size, spec.scenes_seed)  # type: ignore[arg-type]
    if spec.root is None:
        raise ValueError(f"data_root is required for dataset={spec.name!r}")
    if spec.name == "voc":
        split = spec.split or "val"
        return VOCSegmentation(spec.root, VOCSegmentation.default_train_split(spec.root) if split == "train" else split)
    if spec.name == "ade20k":
        return ADE20KSegmentation(spec.root, spec.split or "validation")
    if spec.name == "folder":
        return FolderSegmentation(spec.root, spec.split, spec.num_classes)
    raise ValueError(f"dataset={spec.name!r}; valid: {', '.join(DATASET_NAMES)}")


def dataset_fingerprint(dataset: SegmentationSet) -> str:
    """A string that identifies the dataset's items (its ``fingerprint`` or, failing that, type and length)."""
    return str(getattr(dataset, "fingerprint", f"{type(dataset).__name__}:{len(dataset)}:{dataset.num_classes}"))


# ---------------------------------------------------------------------------------------------------------------
# Paired transforms on tensors: image (3, H, W) float in [0, 1], mask (H, W) int64.


def to_tensors(image: Image.Image, mask: np.ndarray) -> tuple[Tensor, Tensor]:
    """PIL image + uint8 mask -> image (3, H, W) float32 in [0, 1], mask (H, W) int64."""
    pixels = TF.pil_to_tensor(image.convert("RGB")).float().div_(255.0)
    return pixels, torch.from_numpy(np.ascontiguousarray(mask)).long()


def resize_pair(image: Tensor, mask: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Resize to ``size`` = (height, width) without keeping the aspect ratio: bilinear image, nearest mask."""
    resized = TF.resize(image, list(size), InterpolationMode.BILINEAR, antialias=True)
    labels = TF.resize(mask[None], list(size), InterpolationMode.NEAREST)[0]
    return resized.clamp_(0.0, 1.0), labels


def random_resized_crop_pair(
    image: Tensor,
    mask: Tensor,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """The same random resized crop of image (bilinear) and mask (nearest) to ``size`` x ``size``.

    The box is ``cribo.augment.random_crop_box``'s (torchvision's RandomResizedCrop draws), from ``generator``.
    """
    box = random_crop_box(image.shape[-1], image.shape[-2], scale, ratio, TorchRandom(generator))
    top, left, crop_h, crop_w = (int(value) for value in (box.top, box.left, box.height, box.width))
    cropped = TF.resized_crop(image, top, left, crop_h, crop_w, [size, size], InterpolationMode.BILINEAR)
    labels = TF.resized_crop(mask[None], top, left, crop_h, crop_w, [size, size], InterpolationMode.NEAREST)[0]
    return cropped.clamp_(0.0, 1.0), labels


def colour_jitter(image: Tensor, strength: float, probability: float, generator: torch.Generator) -> Tensor:
    """Brightness, contrast, saturation (factor in 1 ± strength) and hue (± strength), each with ``probability``.

    Each change is drawn on its own, in that fixed order (a uniform draw against ``probability``, then its
    factor), and applied with ``cribo.augment.apply_colour_jitter``.

    Args:
        image: (3, H, W) float RGB image in [0, 1] (not modified).
        strength: half-width of the factor ranges and of the hue shift (turns).
        probability: chance of each change.
        generator: the random source (consumed).

    Returns:
        (3, H, W) float image in [0, 1].
    """
    rng = TorchRandom(generator)
    steps: list[tuple[JitterStep, float]] = []
    for step in JITTER_STEPS:
        if rng.random() < probability:
            low, high = (-strength, strength) if step == "hue" else (1.0 - strength, 1.0 + strength)
            steps.append((step, rng.uniform(low, high)))
    return apply_colour_jitter(image, steps, max_value=1.0).clamp(0.0, 1.0)


def random_scale_crop_flip_pair(
    image: Tensor, mask: Tensor, size: int, ratio_range: tuple[float, float], generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Segmentation training augmentation: rescale so the short side is ``size`` x U(ratio_range), random
    ``size`` crop (padding with 0 / ignore when smaller), horizontal flip with p = 0.5 (mmseg-style, PROTOCOLS.md).
    """
    rng = TorchRandom(generator)
    height, width = image.shape[-2:]
    factor = size * rng.uniform(*ratio_range) / min(height, width)
    new_h, new_w = max(1, round(height * factor)), max(1, round(width * factor))
    image, mask = resize_pair(image, mask, (new_h, new_w))
    pad_h, pad_w = max(0, size - new_h), max(0, size - new_w)
    if pad_h or pad_w:
        image = torch.nn.functional.pad(image, (0, pad_w, 0, pad_h), value=0.0)
        mask = torch.nn.functional.pad(mask, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
    top = rng.randint(0, image.shape[-2] - size)
    left = rng.randint(0, image.shape[-1] - size)
    image, mask = image[:, top : top + size, left : left + size], mask[top : top + size, left : left + size]
    if rng.random() < SEGMENTATION_FLIP_PROBABILITY:
        image, mask = image.flip(-1), mask.flip(-1)
    return image.contiguous(), mask.contiguous()


def item_generator(*keys: int) -> torch.Generator:
    """A generator seeded from integers (e.g. seed, pass, image index): the same keys give the same draws."""
    state = np.random.SeedSequence([abs(int(key)) for key in keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
