"""Tests of cribo.augment: analytic patch centres against resampled coordinate maps, views, determinism."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import resized_crop

from cribo.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropBox,
    TwoViewAugmentation,
    adjust_hue,
    crop_mask,
    crop_view,
    patch_centres,
    random_crop_box,
)


def patch_means(maps: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(..., 2, S, S) per-pixel position maps -> (..., 2, N) patch means, the authors' way.

    Each patch's pixels are flattened row-major and averaged with ``.mean(-1)`` (reference README, pitfall 6).
    """
    *lead, channels, size, _ = maps.shape
    grid = size // patch_size
    patches = maps.reshape(*lead, channels, grid, patch_size, grid, patch_size).transpose(-3, -2)
    return patches.reshape(*lead, channels, grid * grid, patch_size * patch_size).mean(-1)


def coordinate_map(width: int, height: int) -> torch.Tensor:
    """(2, H, W) float32 map whose channel 0 is the column index (x) and channel 1 the row index (y)."""
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij"
    )
    return torch.stack((xs, ys))


def interior(values: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, ...) row-major patch values -> those of patches not touching the view's border."""
    return values.reshape(grid, grid, *values.shape[1:])[1:-1, 1:-1]


def fit_box(position_map: torch.Tensor) -> CropBox:
    """Recover a crop box from one view's resampled (2, S, S) position map, using interior pixels only.

    Away from the crop border a pixel ``u`` holds ``left + (u + 0.5) w/S - 0.5`` (``S - u - 0.5`` when
    flipped); torchvision draws integer boxes, so the fitted values are rounded.
    """
    size = position_map.shape[-1]
    near, far, middle = size // 4, size - 1 - size // 4, size // 2
    x, y = position_map.double()
    x_step = (x[middle, far] - x[middle, near]).item() / (far - near)
    flipped = x_step < 0
    width = abs(x_step) * size
    left = x[middle, near].item() - ((size - near - 0.5) if flipped else (near + 0.5)) * width / size + 0.5
    height = (y[far, middle] - y[near, middle]).item() / (far - near) * size
    top = y[near, middle].item() - (near + 0.5) * height / size + 0.5
    fitted = (top, left, height, width)
    assert all(abs(value - round(value)) < 0.05 for value in fitted), f"box {fitted} is not integer"
    top, left, height, width = (float(round(value)) for value in fitted)
    return CropBox(top, left, height, width, flipped=flipped)


def natural_image(width: int = 120, height: int = 90, seed: int = 0) -> Image.Image:
    """A smooth random colour image (noise upsampled), closer to a photo than white noise."""
    noise = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    smooth = torch.nn.functional.interpolate(noise, size=(height, width), mode="bicubic", align_corners=False)
    return Image.fromarray((smooth[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


@pytest.mark.parametrize(
    ("box", "output_size", "patch_size"),
    [
        (CropBox(3, 5, 40, 50), 32, 8),  # downsampling, not flipped
        (CropBox(0, 0, 48, 60, flipped=True), 32, 8),  # the whole image, flipped
        (CropBox(10, 7, 20, 17, flipped=True), 48, 16),  # upsampling, non-square
        (CropBox(20, 30, 28, 30), 64, 16),
    ],
)
def test_patch_centres_match_resampled_coordinate_map(box: CropBox, output_size: int, patch_size: int) -> None:
    maps = coordinate_map(width=60, height=48)
    box_ints = [int(value) for value in (box.top, box.left, box.height, box.width)]
    view = resized_crop(maps, *box_ints, [output_size, output_size], InterpolationMode.BICUBIC, antialias=True)
    if box.flipped:
        view = view.flip(-1)
    expected = patch_means(view, patch_size).T  # (N, 2)
    centres = patch_centres(box, output_size, patch_size)
    grid = output_size // patch_size
    assert centres.shape == (grid * grid, 2) and centres.dtype == torch.float32
    # Interior patches only see the linear part of the map; border patches see the resampler's edge handling.
    torch.testing.assert_close(interior(centres, grid), interior(expected, grid), atol=1e-2, rtol=0)
    torch.testing.assert_close(centres, expected, atol=0.5, rtol=0)


def test_patch_centres_hand_computed() -> None:
    # x = left + (P p + P/2) w/S - 0.5 with w/S = 2, y = top + (P q + P/2) h/S - 0.5 with h/S = 4.
    box = CropBox(top=10, left=20, height=64, width=32)
    expected = torch.tensor([[27.5, 25.5], [43.5, 25.5], [27.5, 57.5], [43.5, 57.5]])
    torch.testing.assert_close(patch_centres(box, 16, 8), expected)
    mirrored = torch.tensor([[43.5, 25.5], [27.5, 25.5], [43.5, 57.5], [27.5, 57.5]])
    torch.testing.assert_close(patch_centres(CropBox(10, 20, 64, 32, flipped=True), 16, 8), mirrored)


def test_patch_centres_flip_mirrors_patch_columns() -> None:
    box = CropBox(top=7, left=11, height=123, width=97)
    plain = patch_centres(box, 224, 16).reshape(14, 14, 2)
    flipped = patch_centres(CropBox(7, 11, 123, 97, flipped=True), 224, 16).reshape(14, 14, 2)
    torch.testing.assert_close(flipped, plain.flip(1))


@pytest.mark.parametrize(("output_size", "patch_size"), [(100, 16), (0, 16), (224, 0), (-32, 16)])
def test_patch_centres_rejects_sizes(output_size: int, patch_size: int) -> None:
    with pytest.raises(ValueError, match="patch_size"):
        patch_centres(CropBox(0, 0, 10, 10), output_size, patch_size)


def test_reference_positions_are_row_major_patch_means(reference: Path) -> None:
    # Documents the authors' convention: `positions` are the per-patch means of the resampled pixel maps.
    for case in torch.load(reference / "teacher_centroids.pt", weights_only=True)["cases"]:
        means = patch_means(case["crop_pos_pixels"], case["patch_size"])
        torch.testing.assert_close(means, case["positions"], atol=1e-5, rtol=1e-5)


def test_reference_positions_match_analytic_centres(reference: Path) -> None:
    for case in torch.load(reference / "teacher_centroids.pt", weights_only=True)["cases"]:
        maps, positions, patch_size = case["crop_pos_pixels"], case["positions"], case["patch_size"]
        num_views, batch, _, size, _ = maps.shape
        grid = size // patch_size
        for view in range(num_views):
            for image in range(batch):
                box = fit_box(maps[view, image])
                centres = patch_centres(box, size, patch_size)
                expected = positions[view, image].T
                torch.testing.assert_close(interior(centres, grid), interior(expected, grid), atol=1e-2, rtol=0)
                torch.testing.assert_close(centres, expected, atol=2e-2, rtol=0)  # borders included


def test_two_views_shapes_and_dtypes() -> None:
    views = TwoViewAugmentation()(natural_image(500, 375), seed=3)
    assert views.images.shape == (2, 3, 224, 224) and views.images.dtype == torch.float32
    assert views.images.is_contiguous()
    assert views.positions.shape == (2, 196, 2) and views.positions.dtype == torch.float32
    assert len(views.boxes) == 2 and all(isinstance(box, CropBox) for box in views.boxes)
    assert views.masks is None
    for box, positions in zip(views.boxes, views.positions):
        torch.testing.assert_close(positions, patch_centres(box, 224, 16))


def test_same_seed_same_views_and_global_rngs_untouched() -> None:
    augment = TwoViewAugmentation(output_size=64)
    image = natural_image()
    python_state, torch_state = random.getstate(), torch.get_rng_state()
    numpy_state = np.random.get_state(legacy=False)
    first, second = augment(image, seed=11), augment(image, seed=np.int64(11))
    assert random.getstate() == python_state and torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state(legacy=False)["state"]["key"], numpy_state["state"]["key"])
    assert torch.equal(first.images, second.images) and torch.equal(first.positions, second.positions)
    assert first.boxes == second.boxes


def test_different_seeds_differ() -> None:
    augment = TwoViewAugmentation(output_size=64)
    image = natural_image()
    outputs = [augment(image, seed) for seed in range(5)]
    assert len({views.boxes for views in outputs}) == 5
    assert not torch.equal(outputs[0].images, outputs[1].images)


def test_float_seed_rejected() -> None:
    with pytest.raises(TypeError):
        TwoViewAugmentation(output_size=32)(natural_image(), seed=1.5)  # type: ignore[arg-type]


def test_geometry_only_views_are_normalised_crops_with_the_same_boxes() -> None:
    image = natural_image()
    plain = TwoViewAugmentation(output_size=64, colour=False)(image, seed=5)
    coloured = TwoViewAugmentation(output_size=64)(image, seed=5)
    assert plain.boxes == coloured.boxes  # boxes are drawn before any colour parameter
    assert not torch.equal(plain.images, coloured.images)
    source = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for view, box in zip(plain.images, plain.boxes):
        expected = (crop_view(source, box, 64).float() / 255 - mean) / std
        torch.testing.assert_close(view, expected, atol=1e-5, rtol=1e-5)


def test_crop_view_flip_is_a_mirror_and_close_to_pil() -> None:
    image = natural_image()
    source = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    box = CropBox(5, 9, 70, 80)
    view = crop_view(source, box, 48)
    assert view.shape == (3, 48, 48) and view.dtype == torch.uint8
    assert torch.equal(crop_view(source, CropBox(5, 9, 70, 80, flipped=True), 48), view.flip(-1))
    pil_view = image.resize((48, 48), Image.Resampling.BICUBIC, box=(9, 5, 89, 75))
    difference = (torch.from_numpy(np.array(pil_view)).permute(2, 0, 1).int() - view.int()).abs()
    assert difference.max() <= 2


def test_crop_view_rejects_boxes_outside_or_fractional() -> None:
    source = torch.zeros(3, 20, 30, dtype=torch.uint8)
    with pytest.raises(ValueError, match="inside"):
        crop_view(source, CropBox(0, 10, 20, 21), 8)
    with pytest.raises(ValueError, match="integer"):
        crop_view(source, CropBox(0.5, 0, 10, 10), 8)


def test_random_boxes_follow_scale_and_ratio() -> None:
    rng = random.Random(0)
    width, height = 500, 375
    for _ in range(300):
        box = random_crop_box(width, height, (0.25, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= box.left <= width - box.width and 0 <= box.top <= height - box.height
        assert all(float(value).is_integer() for value in (box.top, box.left, box.height, box.width))
        assert 0.24 <= box.width * box.height / (width * height) <= 1.0
        assert 3 / 4 - 0.02 <= box.width / box.height <= 4 / 3 + 0.02


def test_random_box_fallback_on_extreme_aspect_ratio() -> None:
    # A 1000 x 10 strip fits no box of area >= 25 % with aspect <= 4/3: the centred fallback is used.
    box = random_crop_box(1000, 10, (0.25, 1.0), (3 / 4, 4 / 3), random.Random(0))
    assert (box.height, box.width) == (10, 13) and box.left == (1000 - 13) // 2


def test_both_flips_occur() -> None:
    augment = TwoViewAugmentation(output_size=32, colour=False)
    flips = {box.flipped for seed in range(20) for box in augment(natural_image(), seed).boxes}
    assert flips == {False, True}


def block_mask(height: int, width: int) -> np.ndarray:
    """(H, W) uint8 labels 0..3 in 4 vertical bands and 2 horizontal halves (big blocks)."""
    columns = np.arange(width) * 4 // width
    rows = np.arange(height) * 2 // height
    return ((columns[None, :] + rows[:, None]) % 4).astype(np.uint8)


@pytest.mark.parametrize("as_pil", [False, True])
def test_mask_follows_the_image(as_pil: bool) -> None:
    mask = block_mask(90, 120)
    grey_level = np.array([20, 90, 160, 230], dtype=np.uint8)
    image = Image.fromarray(np.repeat(grey_level[mask][..., None], 3, axis=-1))
    augment = TwoViewAugmentation(output_size=64, colour=False)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    flips = set()
    for seed in range(6):
        views = augment(image, seed, mask=Image.fromarray(mask) if as_pil else mask)
        assert views.masks is not None and views.masks.shape == (2, 64, 64) and views.masks.dtype == torch.uint8
        pixels = ((views.images * std + mean) * 255)[:, 0]  # (V, S, S) grey levels
        expected = torch.from_numpy(grey_level)[views.masks.long()].float()
        agreement = ((pixels - expected).abs() < 12).float().mean()
        assert agreement > 0.9, f"seed {seed}: only {agreement:.2f} of pixels agree with the mask"
        flips |= {box.flipped for box in views.boxes}
    assert flips == {False, True}


def test_crop_mask_nearest_and_flip() -> None:
    mask = np.arange(12, dtype=np.int32).reshape(3, 4)
    np.testing.assert_array_equal(crop_mask(mask, CropBox(0, 0, 3, 4), 6)[::2, ::2], mask[:, [0, 1, 3]][[0, 1, 2]])
    np.testing.assert_array_equal(crop_mask(mask, CropBox(1, 2, 2, 2), 2), mask[1:3, 2:4])
    np.testing.assert_array_equal(crop_mask(mask, CropBox(1, 2, 2, 2, flipped=True), 2), mask[1:3, 2:4][:, ::-1])


def test_mask_shape_must_match_image() -> None:
    with pytest.raises(ValueError, match="mask"):
        TwoViewAugmentation(output_size=32)(natural_image(120, 90), seed=0, mask=np.zeros((90, 121), np.uint8))


@pytest.mark.parametrize("hue", [-0.1, -0.04, 0.03, 0.1, 0.5])
def test_adjust_hue_equals_pil_hsv_round_trip(hue: float) -> None:
    # torchvision's PIL path: shift the 8-bit HSV hue band modulo 256 and convert back with PIL.
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    hue_band, saturation, value = image.convert("HSV").split()
    shift = round(hue * 255)
    hue_band = hue_band.point([(level + shift) % 256 for level in range(256)])
    expected = Image.merge("HSV", (hue_band, saturation, value)).convert("RGB")
    np.testing.assert_array_equal(np.asarray(adjust_hue(image, hue)), np.asarray(expected))


@pytest.mark.parametrize(
    "arguments",
    [
        {"scale": (0.0, 1.0)},
        {"scale": (0.5, 0.25)},
        {"scale": (0.25, 1.5)},
        {"ratio": (4 / 3, 3 / 4)},
        {"output_size": 100},
        {"std": (0.2, 0.2, 0.0)},
        {"mean": (0.5, 0.5)},
    ],
)
def test_constructor_rejects_bad_arguments(arguments: dict) -> None:
    with pytest.raises(ValueError):
        TwoViewAugmentation(**arguments)


def test_non_rgb_input_is_converted_and_non_images_rejected() -> None:
    views = TwoViewAugmentation(output_size=32)(natural_image().convert("L"), seed=0)
    assert views.images.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="PIL"):
        TwoViewAugmentation(output_size=32)(np.zeros((10, 10, 3), np.uint8), seed=0)  # type: ignore[arg-type]
