"""Two random views of an image, with the original-image position of every patch centre.

Each view is a random resized crop (optionally flipped) of the source image, followed by the authors'
asymmetric colour pipeline (BYOL/DINO style). Where a view's patches come from is computed analytically from
the crop box and the flip (:func:`patch_centres`), instead of resampling a per-pixel coordinate image as the
authors do: the result agrees with their per-patch averaged maps to about 1e-3 pixel.

Speed (the authors' pipeline is PIL throughout): the crop is resampled by torch's vectorised uint8 kernel
with PIL's antialiased bicubic filter (within 2 levels of PIL), then each view is converted to float once and
every colour step is a handful of whole-image tensor operations, with no intermediate rounding to 8 bits:
brightness, contrast and saturation blend as torchvision's tensor path does, the hue is rotated exactly in
HSV space without an HSV image (:func:`shift_hue`), the blur applies PIL's own three-box kernel as one
separable filter (:func:`gaussian_blur`), and a grayscale view stays one channel until the normalisation.
The colour steps match torchvision's float ops to float precision and the authors' 8-bit PIL ops within the
rounding those make (each bound is measured in the tests): a few levels, up to 16 for the hue of saturated
colours (PIL's 8-bit HSV); the whole colour pipeline is 1.3 levels from theirs on average. No step keeps a
per-process table.

The crop sampler (:func:`random_crop_box`) and the colour changes (:func:`apply_colour_jitter`) also serve the
evaluation transforms (``cribo.data.segmentation``), which draw from a ``torch.Generator`` through
:class:`TorchRandom` and work on [0, 1] values (``max_value=1``).

Axis letters: V views (2), N patches per view (row-major, patch row outer), S output side in pixels,
P patch side in pixels. Positions are ``(x, y)`` in original-image pixels, where a pixel's coordinate is its
index (column ``x``, row ``y``), not its centre.
"""

from __future__ import annotations

import math
import operator
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
from PIL import Image
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

# ITU-R 601-2 luma weights of (R, G, B): PIL's "L" conversion and torchvision's rgb_to_grayscale.
GREY_WEIGHTS = (0.299, 0.587, 0.114)
MAX_LEVEL = 255.0  # colour steps work on float values in [0, 255]
# PIL's GaussianBlur(radius) is 3 passes of an "extended box" (Gwosdek et al., SSVM 2011) of variance radius^2 / 3.
BLUR_PASSES = 3
# Kernel weight dropped from the tails of the blur kernel (then renormalised): moves a value by <= 255 x 1e-3.
BLUR_TAIL = 1e-3
# Hue position (in sixths of a turn, the HSV sectors) where each of R, G, B peaks.
HUE_SECTORS_PER_TURN = 6
CHANNEL_HUES = (0, 2, 4)

NUM_VIEWS = 2

JitterStep = Literal["brightness", "contrast", "saturation", "hue"]
JITTER_STEPS: tuple[JitterStep, ...] = ("brightness", "contrast", "saturation", "hue")  # torchvision's order


class RandomSource(Protocol):
    """The draws the samplers of this module make: ``random.Random`` has them, :class:`TorchRandom` adapts a
    ``torch.Generator`` (the evaluation transforms' source) to them."""

    def random(self) -> float:
        """A float in [0, 1)."""
        ...

    def uniform(self, a: float, b: float) -> float:
        """A float between ``a`` and ``b``."""
        ...

    def randint(self, a: int, b: int) -> int:
        """An integer in ``a..b``, both ends included."""
        ...


class TorchRandom:
    """A ``torch.Generator`` seen through ``random.Random``'s methods, one ``torch`` draw per call.

    ``uniform(a, b)`` is ``a + (b - a) u`` with ``u = torch.rand((), generator)``, the formula ``random.Random``
    uses; ``randint(a, b)`` is ``torch.randint(a, b + 1)``.
    """

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def random(self) -> float:
        """A float in [0, 1) from one ``torch.rand`` draw."""
        return float(torch.rand((), generator=self.generator))

    def uniform(self, a: float, b: float) -> float:
        """A float between ``a`` and ``b`` from one ``torch.rand`` draw."""
        return a + (b - a) * self.random()

    def randint(self, a: int, b: int) -> int:
        """An integer in ``a..b`` (both included) from one ``torch.randint`` draw."""
        return int(torch.randint(a, b + 1, (), generator=self.generator))


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
    return torch.from_numpy(_patch_centre_array((box,), output_size, patch_size)[0])


def _patch_centre_array(boxes: Sequence[CropBox], output_size: int, patch_size: int) -> np.ndarray:
    """(V, N, 2) float32 :func:`patch_centres` of several boxes (float64 arithmetic; numpy, a few us per box)."""
    _check_sizes(output_size, patch_size)
    grid = output_size // patch_size
    offsets = np.arange(grid) * patch_size + patch_size / 2  # (G,) patch centres in view pixels
    centres = np.empty((len(boxes), grid, grid, 2), dtype=np.float32)  # (V, patch row, patch column, xy)
    for index, box in enumerate(boxes):
        columns = output_size - offsets if box.flipped else offsets
        centres[index, :, :, 0] = box.left + columns * (box.width / output_size) - 0.5
        centres[index, :, :, 1] = (box.top + offsets * (box.height / output_size) - 0.5)[:, None]
    return centres.reshape(len(boxes), grid * grid, 2)


def random_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: RandomSource
) -> CropBox:
    """Draw an integer, unflipped crop box as torchvision's RandomResizedCrop does (Inception-style crop).

    Up to ``CROP_ATTEMPTS`` boxes of area ``U(scale)`` times the image area and log-uniform aspect ratio are
    drawn; the first that fits is placed uniformly. Otherwise the largest centred box whose aspect ratio lies
    in ``ratio`` is used. A box that does not fit is rejected, so scales above 1 mostly fall back.

    Args:
        width: image width in pixels.
        height: image height in pixels.
        scale: range of the box area as a fraction of the image area.
        ratio: range of the box aspect ratio (width / height).
        rng: the random source (consumed): a ``random.Random``, or a :class:`TorchRandom`.

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
        # Both crops first, while the source is still in cache (crops draw nothing from rng).
        crops = [crop_view(source, box, self.output_size) for box in boxes]  # V x (3, S, S) uint8
        images = torch.empty(NUM_VIEWS, 3, self.output_size, self.output_size)
        for view_index, view in enumerate(crops):
            if self.colour:
                pixels = view.to(torch.float32, memory_format=torch.contiguous_format)
                view = colour_view(pixels, view_index, rng)  # (C, S, S), C = 1 for a grayscale view
            # (x / 255 - mean) / std, written into the batch; a grey view is broadcast to the 3 channels.
            torch.mul(view, self._multiplier, out=images[view_index]).add_(self._offset)
        positions = torch.from_numpy(_patch_centre_array(boxes, self.output_size, self.patch_size))
        masks = None if mask is None else self._crop_masks(mask, boxes, (height, width))
        return TwoViews(images=images, positions=positions, boxes=(boxes[0], boxes[1]), masks=masks)

    def _draw_box(self, width: int, height: int, rng: random.Random) -> CropBox:
        box = random_crop_box(width, height, self.scale, self.ratio, rng)
        return CropBox(box.top, box.left, box.height, box.width, flipped=rng.random() < FLIP_PROBABILITY)

    def _crop_masks(
        self, mask: np.ndarray | Image.Image, boxes: Sequence[CropBox], image_shape: tuple[int, int]
    ) -> Tensor:
        array = np.asarray(mask)
        if array.shape != image_shape:
            raise ValueError(f"mask must have the image's (height, width) {image_shape}, got {array.shape}")
        return torch.from_numpy(np.stack([crop_mask(array, box, self.output_size) for box in boxes]))


def colour_view(pixels: Tensor, view_index: int, rng: random.Random) -> Tensor:
    """The authors' colour pipeline for view ``view_index`` (0 or 1), on float values in [0, 255].

    Colour jitter (p=0.8), grayscale (p=0.2), Gaussian blur (p=1.0 / 0.1) and solarisation (p=0 / 0.2), with
    the authors' parameters; the random draws are made in this order from ``rng``.

    Args:
        pixels: (3, S, S) float RGB view, values in [0, 255] (not modified).
        view_index: 0 for the first view, 1 for the second (the two views have different probabilities).
        rng: the random source (consumed).

    Returns:
        (C, S, S) float view in [0, 255]: C = 3, or C = 1 when the view was turned grey (blur and solarisation
        act per channel, so a grey view is processed as one channel, 3x cheaper).
    """
    if rng.random() < JITTER_PROBABILITY:
        pixels = colour_jitter(pixels, rng)
    if rng.random() < GRAYSCALE_PROBABILITY:
        pixels = grayscale(pixels)
    if rng.random() < BLUR_PROBABILITY[view_index]:
        pixels = gaussian_blur(pixels, rng.uniform(*BLUR_RADIUS))
    if rng.random() < SOLARIZE_PROBABILITY[view_index]:
        pixels = solarize(pixels)
    return pixels


def colour_jitter(pixels: Tensor, rng: random.Random) -> Tensor:
    """torchvision's ColorJitter(0.4, 0.4, 0.2, 0.1) on a (3, S, S) float RGB view in [0, 255].

    The four factors are drawn first (brightness, contrast, saturation in ``[1 - s, 1 + s]``, hue shift in
    ``[-0.1, 0.1]`` of a turn), then the four changes are applied in a random order.
    """
    factors = (
        rng.uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS),
        rng.uniform(1 - CONTRAST, 1 + CONTRAST),
        rng.uniform(1 - SATURATION, 1 + SATURATION),
        rng.uniform(-HUE, HUE),
    )
    order = list(range(len(JITTER_STEPS)))
    rng.shuffle(order)
    return apply_colour_jitter(pixels, [(JITTER_STEPS[index], factors[index]) for index in order])


def apply_colour_jitter(
    pixels: Tensor, steps: Sequence[tuple[JitterStep, float]], max_value: float = MAX_LEVEL
) -> Tensor:
    """Apply drawn colour-jitter steps in the given order (the one jitter of pretraining and evaluation).

    Args:
        pixels: (3, S, S) float RGB image in [0, ``max_value``] (not modified).
        steps: ``(step, factor)`` pairs: a brightness, contrast or saturation factor (1 keeps the image) or a
            hue shift in turns.
        max_value: the white level (255 for the views' levels, 1 for [0, 1] images).

    Returns:
        (3, S, S) float image in [0, ``max_value``]; ``pixels`` itself when ``steps`` is empty.
    """
    for step, factor in steps:
        if step == "brightness":
            pixels = adjust_brightness(pixels, factor, max_value)
        elif step == "contrast":
            pixels = adjust_contrast(pixels, factor, max_value)
        elif step == "saturation":
            pixels = adjust_saturation(pixels, factor, max_value)
        elif step == "hue":
            pixels = shift_hue(pixels, factor)
        else:
            raise ValueError(f"colour-jitter step {step!r}; valid: {', '.join(JITTER_STEPS)}")
    return pixels


def adjust_brightness(pixels: Tensor, factor: float, max_value: float = MAX_LEVEL) -> Tensor:
    """Scale the values by ``factor`` and clip to [0, max_value] (torchvision's adjust_brightness).

    Args:
        pixels: (C, S, S) float image in [0, max_value].
        factor: brightness factor (1 keeps the image).
        max_value: the white level (255 for levels, 1 for [0, 1] images).

    Returns:
        (C, S, S) float image in [0, max_value].
    """
    return _clip_if_above_one(pixels.mul(factor), factor, max_value)


def adjust_contrast(pixels: Tensor, factor: float, max_value: float = MAX_LEVEL) -> Tensor:
    """Blend an RGB image with its mean luma: ``factor x + (1 - factor) mean(grey)``, clipped (torchvision).

    The mean luma is computed in float from the per-channel means (PIL's path first rounds the luma to 8 bits).

    Args:
        pixels: (3, S, S) float RGB image in [0, max_value].
        factor: contrast factor (1 keeps the image, 0 gives a uniform grey).
        max_value: the white level (255 for levels, 1 for [0, 1] images).

    Returns:
        (3, S, S) float image in [0, max_value].
    """
    channel_means = pixels.reshape(3, -1).mean(dim=1).tolist()
    grey_mean = pixels.new_full((), sum(weight * mean for weight, mean in zip(GREY_WEIGHTS, channel_means)))
    return _clip_if_above_one(torch.lerp(grey_mean, pixels, factor), factor, max_value)


def adjust_saturation(pixels: Tensor, factor: float, max_value: float = MAX_LEVEL) -> Tensor:
    """Blend an RGB image with its luma: ``factor x + (1 - factor) grey``, clipped (torchvision's PIL/tensor ops).

    Args:
        pixels: (3, S, S) float RGB image in [0, max_value].
        factor: saturation factor (1 keeps the image, 0 gives its grayscale version).
        max_value: the white level (255 for levels, 1 for [0, 1] images).

    Returns:
        (3, S, S) float image in [0, max_value].
    """
    return _clip_if_above_one(torch.lerp(grayscale(pixels), pixels, factor), factor, max_value)


def _clip_if_above_one(blended: Tensor, factor: float, max_value: float) -> Tensor:
    """Clip ``factor x + (1 - factor) y`` (``lerp(y, x, factor)``) or ``factor x`` to [0, max_value], with x, y
    in that range.

    With ``0 <= factor <= 1`` the blend stays in range, so only a factor above 1 needs the (in-place) clip.
    """
    return blended.clamp_(0.0, max_value) if factor > 1.0 else blended


def grayscale(pixels: Tensor) -> Tensor:
    """ITU-R 601-2 luma ``0.299 R + 0.587 G + 0.114 B`` of an RGB image, unrounded (PIL's "L" rounds it).

    Args:
        pixels: (3, S, S) float RGB image.

    Returns:
        (1, S, S) float luma.
    """
    red_weight, green_weight, blue_weight = GREY_WEIGHTS
    grey = pixels[0:1] * red_weight
    return grey.add_(pixels[1:2], alpha=green_weight).add_(pixels[2:3], alpha=blue_weight)


def shift_hue(pixels: Tensor, hue: float) -> Tensor:
    """Rotate the HSV hue of an RGB image by ``hue`` of a turn, exactly, without building an HSV image.

    A hue rotation keeps each pixel's value ``V = max`` and its minimum ``m`` (so its chroma ``C = V - m``
    and saturation). With the hue position ``h`` in sixths of a turn (HSV sectors; ``(G - B) / C`` when R is
    the largest channel, ``2 + (B - R) / C`` for G, ``4 + (R - G) / C`` for B, as in colorsys/torchvision),
    channel ``c`` peaking at ``h_c`` (0, 2, 4 for R, G, B) becomes ``m + C clip(2 - d, 0, 1)`` where ``d`` is
    the circular distance between ``h + 6 hue`` and ``h_c``. This is torchvision's RGB -> HSV -> RGB round
    trip on float images (equal to float precision: 3e-4 levels measured); torchvision's PIL path (the authors')
    also rounds H, S and V to 8 bits and truncates the shift to 1/255 of a turn, which moves values by 1.6
    levels on average and up to 16 on saturated random colours (measured, see the tests).

    Args:
        pixels: (3, S, S) float RGB image.
        hue: shift in turns, in [-0.5, 0.5].

    Returns:
        (3, S, S) float RGB image with the same value and saturation and the hue shifted.
    """
    red, green, blue = pixels
    value = pixels.amax(dim=0)  # (S, S) V
    low = pixels.amin(dim=0)  # (S, S) m
    chroma = value - low
    # Hue position times chroma, per largest channel (R first, then G, as torchvision): exact 0/1 selectors,
    # compared straight into a float tensor (several times faster than a bool tensor converted).
    is_red, is_green = torch.eq(pixels[:2], value, out=torch.empty_like(pixels[:2]))
    scaled = torch.lerp((red - green).add_(chroma, alpha=4.0), (blue - red).add_(chroma, alpha=2.0), is_green)
    scaled = torch.lerp(scaled, green - blue, is_red)  # (S, S) h C, with h in [-1, 5]
    # d C for each channel, with the peak's offset taken modulo 6 into [-5, 1) so that d lies in [-6, 6).
    shift = hue * HUE_SECTORS_PER_TURN
    offsets = [(shift - centre + 5) % HUE_SECTORS_PER_TURN - 5 for centre in CHANNEL_HUES]
    offsets_tensor = torch.tensor(offsets, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
    distance = torch.addcmul(scaled, chroma, offsets_tensor)  # (3, S, S) d C
    # |3 - |d|| = 3 - (circular distance to the peak) for d in [-6, 6], so each channel is
    # m + C clip(|3 - |d|| - 1, 0, 1) = clip(|3 C - |d C|| + m - C, m, V): no division by the chroma.
    channels = distance.abs_().sub_(chroma, alpha=3.0).abs_().add_(low - chroma)
    return channels.clamp_(min=low, max=value)


def blur_kernel(sigma: float) -> list[float]:
    """1-D weights of PIL's GaussianBlur(radius=sigma): three extended boxes convolved, tails trimmed.

    PIL blurs with ``BLUR_PASSES`` = 3 box passes per axis. Each box has radius ``l + a``: weight 1 on the
    ``2 l + 1`` central taps and ``a`` in [0, 1) on the two next ones, divided by ``2 l + 1 + 2 a``, with
    ``l`` the integer part of the exact box radius ``(sqrt(12 v + 1) - 1) / 2`` and ``a`` chosen so that the box
    variance ``(l (l + 1) (2 l + 1) / 3 + 2 a (l + 1)^2) / (2 l + 1 + 2 a)`` equals ``v = sigma^2 / 3``.
    The three boxes convolve into one kernel of variance ``sigma^2`` and radius ``3 (l + 1)``; outer taps
    holding at most ``BLUR_TAIL`` of the weight in all are dropped and the rest renormalised.

    Args:
        sigma: standard deviation in pixels (PIL's "radius"), > 0.

    Returns:
        The ``2 R + 1`` symmetric weights (summing to 1), centre tap at index ``R``.
    """
    variance = sigma * sigma / BLUR_PASSES
    inner = math.floor((math.sqrt(12.0 * variance + 1.0) - 1.0) / 2.0)
    edge = (2 * inner + 1) * (inner * (inner + 1) - 3 * variance) / (6 * (variance - (inner + 1) ** 2))
    length = 2 * inner + 1 + 2 * edge
    box = [edge / length, *([1.0 / length] * (2 * inner + 1)), edge / length]
    kernel = box
    for _ in range(BLUR_PASSES - 1):  # a few dozen products: plain Python beats numpy's per-call cost here
        convolved = [0.0] * (len(kernel) + len(box) - 1)
        for i, weight in enumerate(kernel):
            for j, box_weight in enumerate(box):
                convolved[i + j] += weight * box_weight
        kernel = convolved
    radius = len(kernel) // 2
    kept, tail = radius, 0.0
    while kept > 0 and tail + 2 * kernel[radius + kept] <= BLUR_TAIL:  # drop outer pairs while their sum is small
        tail += 2 * kernel[radius + kept]
        kept -= 1
    kernel = kernel[radius - kept : radius + kept + 1]
    total = sum(kernel)
    return [weight / total for weight in kernel]


def gaussian_blur(pixels: Tensor, sigma: float) -> Tensor:
    """PIL's GaussianBlur(radius=sigma) as one separable float filter with mirrored edges.

    The weights are :func:`blur_kernel`'s, so the filter is PIL's three-box approximation of a Gaussian (not a
    sampled Gaussian). PIL repeats the edge pixel before each of its box passes; mirroring the image about its
    edge (``x[-1 - i] = x[i]``) is the same for boxes of up to 3 taps (``sigma < sqrt(2)``) and within about a
    level for longer ones (the 6 border pixels only). PIL also rounds to 8 bits after each of its six passes,
    this filter never: on noisy images the result is within 3 levels of PIL's (4 at the border; see the tests).

    Args:
        pixels: (C, S, S) float image.
        sigma: blur standard deviation in pixels (PIL's "radius"), > 0.

    Returns:
        (C, S, S) float blurred image.
    """
    kernel = blur_kernel(sigma)
    radius = len(kernel) // 2
    rows = _symmetric_filter(_mirror_pad(pixels, radius, dim=-1), kernel, dim=-1)
    return _symmetric_filter(_mirror_pad(rows, radius, dim=-2), kernel, dim=-2)


def _mirror_pad(pixels: Tensor, radius: int, dim: int) -> Tensor:
    """Extend ``pixels`` by ``radius`` on both ends of ``dim``, mirrored about the edge: ``x[-1 - i] = x[i]``."""
    size = pixels.shape[dim]
    if radius <= size:  # the usual case: two flipped slices around the image
        head = pixels.narrow(dim, 0, radius).flip(dim)
        tail = pixels.narrow(dim, size - radius, radius).flip(dim)
        return torch.cat((head, pixels, tail), dim=dim)
    folded = np.arange(-radius, size + radius) % (2 * size)  # a kernel wider than the image: mirror repeatedly
    index = np.where(folded < size, folded, 2 * size - 1 - folded)
    return pixels.index_select(dim, torch.from_numpy(index).to(pixels.device))


def _symmetric_filter(padded: Tensor, kernel: Sequence[float], dim: int) -> Tensor:
    """Correlate ``padded`` with a symmetric odd ``kernel`` along ``dim``, keeping the valid part (R shorter
    at each end): a sum of shifted slices, cheaper on CPU than torch's depthwise convolution."""
    radius = len(kernel) // 2
    shape = list(padded.shape)
    shape[dim] -= 2 * radius
    # The 2 R + 1 shifted slices as one strided view (shift k = k steps along dim), split without copying.
    shifted = padded.as_strided([2 * radius + 1, *shape], [padded.stride(dim), *padded.stride()]).unbind(0)
    filtered = shifted[radius] * kernel[radius]
    for offset in range(1, radius + 1):
        filtered.add_(shifted[radius - offset], alpha=kernel[radius - offset])
        filtered.add_(shifted[radius + offset], alpha=kernel[radius + offset])
    return filtered


def solarize(pixels: Tensor) -> Tensor:
    """Invert the values at or above the threshold 128: PIL's solarize on the values rounded to 8 bits.

    On float values this is ``127.5 - |x - 127.5|``: ``x`` below 127.5 (which rounds below 128) is kept and
    ``255 - x`` is taken from 127.5 up; on integer levels it is exactly PIL's ``ImageOps.solarize(image, 128)``.

    Args:
        pixels: (C, S, S) float image in [0, 255].

    Returns:
        (C, S, S) float image in [0, 255].
    """
    middle = SOLARIZE_THRESHOLD - 0.5
    return torch.rsub(pixels.sub(middle).abs_(), middle)
