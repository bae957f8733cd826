"""Two random views of an image, with the original-image position of every patch centre.

Each view is a random resized crop (optionally flipped) of the source image, followed by the authors'
asymmetric colour pipeline (BYOL/DINO style). Where a view's patches come from is computed analytically from
the crop box and the flip (:func:`patch_centres`), instead of resampling a per-pixel coordinate image as the
authors do: the result agrees with their per-patch averaged maps to about 1e-3 pixel.

Speed (the authors' pipeline is PIL throughout): the crop is resampled by torch's vectorised uint8 kernel
with PIL's antialiased bicubic filter (within 2 levels of PIL), the flip is applied last (every colour step
commutes with it), the hue change converts back from HSV with a weight table instead of PIL's slow
conversion (identical output), and a grayscale view is blurred as one channel.

Axis letters: V views (2), N patches per view (row-major, patch row outer), S output side in pixels,
P patch side in pixels. Positions are ``(x, y)`` in original-image pixels, where a pixel's coordinate is its
index (column ``x``, row ``y``), not its centre.
"""

from __future__ import annotations

import math
import operator
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch import Tensor

# ImageNet channel statistics, used by the authors' (DINO's) normalisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Random resized crop of the global views: authors' `global_crops_scale` default and torchvision's default aspect
# ratio range (which the authors keep); torchvision's RandomResizedCrop tries 10 boxes before its fallback.
GLOBAL_CROP_SCALE = (0.25, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10
FLIP_PROBABILITY = 0.5  # authors' RandomHorizontalFlip(p=0.5)

# Colour pipeline of the authors' DataAugmentation (taken from DINO): ColorJitter(0.4, 0.4, 0.2, 0.1) applied
# with p=0.8, RandomGrayscale(p=0.2), PIL Gaussian blur with radius U[0.1, 2.0] (p=1.0 view 1, p=0.1 view 2),
# PIL solarisation at threshold 128 (never on view 1, p=0.2 on view 2).
JITTER_PROBABILITY = 0.8
BRIGHTNESS = 0.4
CONTRAST = 0.4
SATURATION = 0.2
HUE = 0.1
GRAYSCALE_PROBABILITY = 0.2
BLUR_RADIUS = (0.1, 2.0)
BLUR_PROBABILITY = (1.0, 0.1)  # (view 1, view 2)
SOLARIZE_PROBABILITY = (0.0, 0.2)  # (view 1, view 2)
SOLARIZE_THRESHOLD = 128

NUM_VIEWS = 2

# Which of v, p, q, t each of (R, G, B) takes in each hue sector of the HSV -> RGB conversion (colorsys, PIL).
HSV_SECTORS = ("vtp", "qvp", "pvt", "pqv", "tpv", "vpq")


@dataclass(frozen=True)
class CropBox:
    """Where a view comes from: a box of the original image (pixels) and whether the view is mirrored.

    ``top``/``left`` are the row/column of the box's first pixel; ``height``/``width`` its size in pixels.
    """

    top: float
    left: float
    height: float
    width: float
    flipped: bool = False


@dataclass
class TwoViews:
    """The two augmented views of one image.

    Attributes:
        images: (V=2, 3, S, S) float32, normalised with the pipeline's mean/std.
        positions: (V=2, N, 2) float32 original-image (x, y) of each patch centre, patches row-major.
        boxes: the crop box of each view.
        masks: (V=2, S, S) segmentation masks cropped and flipped with the views (nearest), same dtype as the
            given mask; None when no mask was given.
    """

    images: Tensor
    positions: Tensor
    boxes: tuple[CropBox, CropBox]
    masks: Tensor | None = None


def patch_centres(box: CropBox, output_size: int, patch_size: int) -> Tensor:
    """Original-image position of every patch centre of a view cut from ``box``.

    With crop left ``l``, width ``w``, output side ``S`` and patch side ``P``, the centre of patch column ``p``
    lies at ``x = l + (P p + P/2) w/S - 0.5`` (``x = l + (S - P p - P/2) w/S - 0.5`` when flipped); ``y``
    likewise with the top, height and patch row. The ``-0.5`` makes a pixel's coordinate its index. This is
    the mean position of the patch's pixels in the authors' resampled coordinate map (away from crop borders).

    Args:
        box: crop box in original-image pixels, and flip.
        output_size: side S of the (square) view.
        patch_size: side P of a patch; must divide S.

    Returns:
        (N, 2) float32 ``(x, y)`` per patch, ``N = (S/P)^2``, row-major (patch row outer).
    """
    _check_sizes(output_size, patch_size)
    grid = output_size // patch_size
    offsets = torch.arange(grid, dtype=torch.float64) * patch_size + patch_size / 2  # patch centre in view pixels
    column_offsets = output_size - offsets if box.flipped else offsets
    x = box.left + column_offsets * (box.width / output_size) - 0.5
    y = box.top + offsets * (box.height / output_size) - 0.5
    grid_y, grid_x = torch.meshgrid(y, x, indexing="ij")
    return torch.stack((grid_x, grid_y), dim=-1).reshape(grid * grid, 2).to(torch.float32)


def random_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> CropBox:
    """Draw an integer, unflipped crop box as torchvision's RandomResizedCrop does (Inception-style crop).

    Up to ``CROP_ATTEMPTS`` boxes of area ``U(scale)`` times the image area and log-uniform aspect ratio are
    drawn; the first that fits is placed uniformly. Otherwise the largest centred box whose aspect ratio lies
    in ``ratio`` is used.

    Args:
        width: image width in pixels.
        height: image height in pixels.
        scale: range of the box area as a fraction of the image area.
        ratio: range of the box aspect ratio (width / height).
        rng: the random source (consumed).

    Returns:
        The box, with ``flipped=False``.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(CROP_ATTEMPTS):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        box_width = round(math.sqrt(target_area * aspect))
        box_height = round(math.sqrt(target_area / aspect))
        if 0 < box_width <= width and 0 < box_height <= height:
            top = rng.randint(0, height - box_height)
            left = rng.randint(0, width - box_width)
            return CropBox(top, left, box_height, box_width)
    image_ratio = width / height
    if image_ratio < ratio[0]:
        box_width, box_height = width, round(width / ratio[0])
    elif image_ratio > ratio[1]:
        box_width, box_height = round(height * ratio[1]), height
    else:
        box_width, box_height = width, height
    return CropBox((height - box_height) // 2, (width - box_width) // 2, box_height, box_width)


def crop_view(pixels: Tensor, box: CropBox, output_size: int) -> Tensor:
    """Cut an integer ``box`` out of an image, resize it to S x S (bicubic, antialiased) and flip it if asked.

    The resampling filter is PIL's antialiased bicubic (torch's ``antialias=True`` bicubic uses PIL's
    coefficient a = -0.5); on uint8 channels-last input torch runs its vectorised kernel, several times faster
    than PIL. Results differ from PIL's ``resize`` by at most a couple of levels (intermediate rounding).

    Args:
        pixels: (3, H, W) image, uint8 or float; channels-last strides (a permuted (H, W, 3) array) are fastest.
        box: crop box with integer coordinates inside the image.
        output_size: side S of the view.

    Returns:
        (3, S, S) view, same dtype as ``pixels``.
    """
    top, left, height, width = (int(value) for value in (box.top, box.left, box.height, box.width))
    if (top, left, height, width) != (box.top, box.left, box.height, box.width):
        raise ValueError(f"box must have integer coordinates, got {box}")
    image_height, image_width = pixels.shape[-2:]
    if top < 0 or left < 0 or height <= 0 or width <= 0 or top + height > image_height or left + width > image_width:
        raise ValueError(f"box {box} must lie inside the {image_width}x{image_height} image")
    # Slice in (H, W, 3) order so the batch axis gets a stride that keeps channels-last input channels-last.
    region = pixels.permute(1, 2, 0)[top : top + height, left : left + width].unsqueeze(0).permute(0, 3, 1, 2)
    view = torch.nn.functional.interpolate(region, size=(output_size, output_size), mode="bicubic", antialias=True)[0]
    return view.flip(-1) if box.flipped else view


def crop_mask(mask: np.ndarray, box: CropBox, output_size: int) -> np.ndarray:
    """Cut ``box`` out of a (H, W) label mask with nearest-neighbour sampling to (S, S), flipped if asked.

    Output pixel ``u`` takes the source pixel ``floor(left + (u + 0.5) width / S)``, as PIL's NEAREST does.
    """
    centres = np.arange(output_size, dtype=np.float64) + 0.5
    rows = np.floor(box.top + centres * (box.height / output_size)).astype(np.int64)
    columns = np.floor(box.left + centres * (box.width / output_size)).astype(np.int64)
    rows = rows.clip(0, mask.shape[0] - 1)
    columns = columns.clip(0, mask.shape[1] - 1)
    if box.flipped:
        columns = columns[::-1]
    return mask[np.ix_(rows, columns)]


def _check_sizes(output_size: int, patch_size: int) -> None:
    if output_size <= 0 or patch_size <= 0 or output_size % patch_size:
        raise ValueError(
            f"output_size ({output_size}) must be a positive multiple of patch_size ({patch_size}), "
            "for example output_size=224 with patch_size=16"
        )


def _check_range(name: str, value: tuple[float, float], upper: float) -> None:
    if not 0 < value[0] <= value[1] <= upper:
        raise ValueError(f"{name} must be a (low, high) pair with 0 < low <= high <= {upper}, got {value}")


class TwoViewAugmentation:
    """The authors' two global views: random resized crop, flip and asymmetric colour changes.

    Every random draw comes from a ``random.Random`` seeded with the call's ``seed``, so a view pair is a pure
    function of (image, seed): data order and augmentation can be replayed exactly after a resume. Both crop
    boxes are drawn before any colour parameter, so ``colour=False`` gives the same boxes for the same seed.
    """

    def __init__(
        self,
        output_size: int = 224,
        scale: tuple[float, float] = GLOBAL_CROP_SCALE,
        patch_size: int = 16,
        ratio: tuple[float, float] = CROP_RATIO,
        colour: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        """Set the view size and the crop ranges.

        Args:
            output_size: side S of each view (224 in the paper).
            scale: range of a crop's area as a fraction of the image area.
            patch_size: side P of a patch (positions are per patch); must divide S.
            ratio: range of a crop's aspect ratio (width / height).
            colour: apply the colour pipeline (jitter, grayscale, blur, solarisation); False keeps geometry only.
            mean: per-channel mean of the normalisation (on [0, 1] values).
            std: per-channel standard deviation of the normalisation.
        """
        _check_sizes(output_size, patch_size)
        _check_range("scale", scale, 1.0)
        _check_range("ratio", ratio, math.inf)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std must hold 3 values with std > 0, got mean={mean}, std={std}")
        self.output_size = output_size
        self.patch_size = patch_size
        self.scale = scale
        self.ratio = ratio
        self.colour = colour
        # (x / 255 - mean) / std as one multiply-add on uint8 values.
        self._multiplier = torch.tensor([1.0 / (255.0 * s) for s in std]).view(3, 1, 1)
        self._offset = torch.tensor([-m / s for m, s in zip(mean, std)]).view(3, 1, 1)

    def __call__(self, image: Image.Image, seed: int, mask: np.ndarray | Image.Image | None = None) -> TwoViews:
        """Make the two views of ``image``.

        Args:
            image: source image (converted to RGB if it is not).
            seed: seed of every random draw of this call.
            mask: optional (H, W) label mask of the image, cropped and flipped with the views (nearest).

        Returns:
            The views, their patch-centre positions, boxes and (if given) masks.
        """
        if not isinstance(image, Image.Image):
            raise ValueError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
        rng = random.Random(operator.index(seed))  # numpy/torch integers too; floats are rejected
        width, height = image.size
        if width < 1 or height < 1:
            raise ValueError(f"image must have at least one pixel, got size {image.size}")
        boxes = tuple(self._draw_box(width, height, rng) for _ in range(NUM_VIEWS))
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        source = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)  # (3, H, W) uint8, channels-last strides
        pixels = np.empty((NUM_VIEWS, self.output_size, self.output_size, 3), dtype=np.uint8)
        for view_index, box in enumerate(boxes):
            view = crop_view(source, replace(box, flipped=False), self.output_size).permute(1, 2, 0).numpy()
            if self.colour:
                view = np.asarray(colour_view(Image.fromarray(view), view_index, rng))
            # Every colour step is per pixel or mirror-symmetric, so flipping last gives the same view.
            pixels[view_index] = view[:, ::-1] if box.flipped else view
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        images.mul_(self._multiplier).add_(self._offset)
        positions = torch.stack([patch_centres(box, self.output_size, self.patch_size) for box in boxes])
        masks = None if mask is None else self._crop_masks(mask, boxes, (height, width))
        return TwoViews(images=images, positions=positions, boxes=(boxes[0], boxes[1]), masks=masks)

    def _draw_box(self, width: int, height: int, rng: random.Random) -> CropBox:
        box = random_crop_box(width, height, self.scale, self.ratio, rng)
        return replace(box, flipped=rng.random() < FLIP_PROBABILITY)

    def _crop_masks(
        self, mask: np.ndarray | Image.Image, boxes: Sequence[CropBox], image_shape: tuple[int, int]
    ) -> Tensor:
        array = np.asarray(mask)
        if array.shape != image_shape:
            raise ValueError(f"mask must have the image's (height, width) {image_shape}, got {array.shape}")
        return torch.from_numpy(np.stack([crop_mask(array, box, self.output_size) for box in boxes]))


def colour_view(view: Image.Image, view_index: int, rng: random.Random) -> Image.Image:
    """The authors' colour pipeline for view ``view_index`` (0 or 1) of an RGB image.

    Colour jitter (p=0.8), grayscale (p=0.2), Gaussian blur (p=1.0 / 0.1) and solarisation (p=0 / 0.2).
    """
    if rng.random() < JITTER_PROBABILITY:
        view = colour_jitter(view, rng)
    if rng.random() < GRAYSCALE_PROBABILITY:
        view = view.convert("L")  # blur and solarise act per channel: a single grey channel is 3x cheaper
    if rng.random() < BLUR_PROBABILITY[view_index]:
        view = view.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*BLUR_RADIUS)))
    if rng.random() < SOLARIZE_PROBABILITY[view_index]:
        view = ImageOps.solarize(view, threshold=SOLARIZE_THRESHOLD)
    return view.convert("RGB") if view.mode != "RGB" else view


def colour_jitter(view: Image.Image, rng: random.Random) -> Image.Image:
    """torchvision's ColorJitter(0.4, 0.4, 0.2, 0.1) semantics on an RGB image, with look-up tables.

    The four factors are drawn first (brightness, contrast, saturation in ``[1 - s, 1 + s]``, hue shift in
    ``[-0.1, 0.1]`` of a turn), then the four changes are applied in a random order.
    """
    brightness = rng.uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS)
    contrast = rng.uniform(1 - CONTRAST, 1 + CONTRAST)
    saturation = rng.uniform(1 - SATURATION, 1 + SATURATION)
    hue = rng.uniform(-HUE, HUE)
    order = [0, 1, 2, 3]
    rng.shuffle(order)
    for step in order:
        if step == 0:
            view = view.point(_affine_table(brightness, 0.0))
        elif step == 1:
            grey_mean = _grey_mean(view)
            view = view.point(_affine_table(contrast, (1 - contrast) * grey_mean))
        elif step == 2:
            view = Image.blend(view.convert("L").convert("RGB"), view, saturation)
        else:
            view = adjust_hue(view, hue)
    return view


def _affine_table(gain: float, bias: float) -> list[int]:
    """PIL ``point`` table of ``clip(round(gain * v + bias), 0, 255)`` for the 3 x 256 levels of an RGB image."""
    levels = np.clip(np.rint(np.arange(256) * gain + bias), 0, 255).astype(np.int64)
    return np.tile(levels, 3).tolist()


def _grey_mean(view: Image.Image) -> float:
    """Mean of the image's luma (ITU-R 601-2, as PIL's "L" conversion), the pivot of the contrast change."""
    histogram = np.asarray(view.convert("L").histogram(), dtype=np.float64)
    return float(histogram @ np.arange(256) / max(1.0, histogram.sum()))


def adjust_hue(view: Image.Image, hue: float) -> Image.Image:
    """Rotate the hue of an RGB image by ``hue`` of a turn: the 8-bit HSV hue shifted modulo 256.

    Same result as torchvision's PIL path (convert to HSV, add to the hue band, convert back), but the way
    back reproduces PIL's HSV -> RGB conversion (colorsys sectors) with a per-hue weight table, several times
    faster than PIL's own: each channel is ``v - round(v s / 255 w)``, where ``w`` in [0, 1] depends on the
    shifted hue's sector and the channel.

    Args:
        view: RGB image.
        hue: shift in turns, in [-0.5, 0.5].

    Returns:
        The RGB image with shifted hue.
    """
    shift = round(hue * 255) % 256
    if shift == 0:
        return view
    hsv = np.asarray(view.convert("HSV"))
    shifted_hue = hsv[..., 0] + np.uint8(shift)  # uint8 arithmetic wraps modulo 256
    weights = np.take(_HUE_WEIGHTS, shifted_hue, axis=0)  # (S, S, 3)
    value = hsv[..., 2].astype(np.float32)
    chroma = value * hsv[..., 1].astype(np.float32) * (1.0 / 255.0)
    rgb = value[..., None] - np.rint(chroma[..., None] * weights)
    return Image.fromarray(rgb.astype(np.uint8))


def _hue_weights() -> np.ndarray:
    """(256, 3) float32 weight ``w`` of each RGB channel for each 8-bit hue level.

    With ``x = 6 h / 255``, sector ``i = floor(x)`` and ``f = x - i``, PIL (like colorsys) sets the channels to
    ``v``, ``p = v (1 - s)``, ``q = v (1 - s f)`` or ``t = v (1 - s (1 - f))``, i.e. weights 0, 1, f and 1 - f.
    """
    position = np.arange(256) * 6.0 / 255.0
    sector = np.floor(position).astype(np.int64) % 6  # h = 255 gives sector 6, which PIL treats as sector 0
    fraction = position - np.floor(position)
    choices = {"v": np.zeros(256), "p": np.ones(256), "q": fraction, "t": 1.0 - fraction}
    columns = []
    for channel in range(3):
        per_sector = np.stack([choices[HSV_SECTORS[index][channel]] for index in range(6)])  # (6, 256)
        columns.append(per_sector[sector, np.arange(256)])
    return np.stack(columns, axis=-1).astype(np.float32)


_HUE_WEIGHTS = _hue_weights()
