"""Segmentation datasets in the VOC, ADE20K, generic and scenes layouts, written tiny by the tests; transforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from cribo.augment import TorchRandom, random_crop_box
from cribo.data.segmentation import (
    ADE20K_CLASS_NAMES,
    VOC_CLASS_NAMES,
    ADE20KSegmentation,
    DatasetSpec,
    FolderSegmentation,
    ScenesSegmentation,
    VOCSegmentation,
    build_segmentation_dataset,
    colour_jitter,
    item_generator,
    random_resized_crop_pair,
    random_scale_crop_flip_pair,
    resize_pair,
    to_tensors,
    voc_palette,
)


def save_palette_png(mask: np.ndarray, path: Path) -> None:
    image = Image.fromarray(mask.astype(np.uint8), mode="L")
    image.putpalette(voc_palette().reshape(-1).tolist())
    assert image.mode == "P"
    image.save(path)


def voc_mask(seed: int, height: int = 20, width: int = 24) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), dtype=np.uint8)
    top, left = rng.integers(2, 8, 2)
    mask[top : top + 8, left : left + 10] = rng.integers(1, 21)
    mask[top - 1, left : left + 10] = 255  # a VOC-style border line
    return mask


def write_voc(root: Path, stems: dict[str, list[str]], aug: bool = False) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    all_stems = sorted({stem for names in stems.values() for stem in names})
    for index, stem in enumerate(all_stems):
        mask = voc_mask(index)
        Image.fromarray(voc_palette()[mask]).save(voc / "JPEGImages" / f"{stem}.jpg")
        save_palette_png(mask, voc / "SegmentationClass" / f"{stem}.png")
    for split, names in stems.items():
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    if aug:
        (voc / "SegmentationClassAug").mkdir()
        for index, stem in enumerate(all_stems):
            Image.fromarray(voc_mask(index), mode="L").save(voc / "SegmentationClassAug" / f"{stem}.png")
        (voc / "ImageSets" / "Segmentation" / "trainaug.txt").write_text("\n".join(all_stems) + "\n")
    return voc


def test_voc_palette_masks_and_borders(tmp_path: Path) -> None:
    write_voc(tmp_path, {"train": ["a", "b"], "val": ["c"]})
    dataset = VOCSegmentation(tmp_path, "train")
    assert len(dataset) == 2 and dataset.num_classes == 21 and dataset.class_names == VOC_CLASS_NAMES
    image, mask = dataset[0]
    assert image.mode == "RGB" and mask.dtype == np.uint8 and mask.shape == (20, 24)
    assert np.array_equal(mask, voc_mask(0))
    assert 255 in mask and dataset.ignore_index == 255 and dataset.background_index == 0
    assert VOCSegmentation.default_train_split(tmp_path) == "train"
    assert len(VOCSegmentation(tmp_path / "VOCdevkit" / "VOC2012", "val")) == 1


def test_voc_trainaug_when_sbd_is_present(tmp_path: Path) -> None:
    write_voc(tmp_path, {"train": ["a"], "val": ["b"]}, aug=True)
    assert VOCSegmentation.default_train_split(tmp_path) == "trainaug"
    dataset = build_segmentation_dataset(DatasetSpec("voc", tmp_path, "trainaug"))
    assert len(dataset) == 2
    assert np.array_equal(dataset[1][1], voc_mask(1))
    assert "SegmentationClassAug" in str(dataset.masks[0])  # type: ignore[attr-defined]


def test_voc_rgb_masks_map_through_the_palette(tmp_path: Path) -> None:
    voc = write_voc(tmp_path, {"val": ["a"]})
    mask = voc_mask(0)
    Image.fromarray(voc_palette()[mask]).save(voc / "SegmentationClass" / "a.png")
    assert np.array_equal(VOCSegmentation(tmp_path, "val")[0][1], mask)


def test_voc_errors_name_the_file(tmp_path: Path) -> None:
    voc = write_voc(tmp_path, {"train": ["a", "b"], "val": ["c"]})
    with pytest.raises(ValueError, match=r"valid splits: \['train', 'val'\]"):
        VOCSegmentation(tmp_path, "test")
    (voc / "SegmentationClass" / "b.png").unlink()
    with pytest.raises(ValueError, match=r"missing masks: .*b\.png"):
        VOCSegmentation(tmp_path, "train")
    save_palette_png(np.zeros((5, 5), np.uint8), voc / "SegmentationClass" / "c.png")
    with pytest.raises(ValueError, match=r"c\.png: mask is 5x5 but its image is 24x20"):
        VOCSegmentation(tmp_path, "val")[0]
    bad = voc_mask(2)
    bad[0, 0] = 30
    save_palette_png(bad, voc / "SegmentationClass" / "c.png")
    with pytest.raises(ValueError, match=r"c.png: label\(s\) \[30\] out of range"):
        VOCSegmentation(tmp_path, "val")[0]
    with pytest.raises(ValueError, match="no Pascal VOC layout"):
        VOCSegmentation(tmp_path / "nowhere", "val")


def write_exif_pair(voc: Path, stem: str, orientation: int, mask_size: tuple[int, int]) -> np.ndarray:
    """A JPEG stored 32 wide x 20 high (left half red, right half blue) with an EXIF orientation tag, and a mask of
    ``mask_size`` (width, height); returns the mask."""
    stored = np.zeros((20, 32, 3), dtype=np.uint8)
    stored[:, :16, 0] = 255
    stored[:, 16:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(voc / "JPEGImages" / f"{stem}.jpg", exif=exif.tobytes(), quality=95)
    mask = np.zeros(mask_size[::-1], dtype=np.uint8)
    mask[: mask_size[1] // 2] = 15
    save_palette_png(mask, voc / "SegmentationClass" / f"{stem}.png")
    return mask


def test_voc_exif_orientation_applied_when_the_mask_is_upright(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Orientation 6 (turn 90 degrees clockwise to display): the displayed image is 20 wide x 32 high, red on top,
    # as its mask; before, evaluation stopped with "mask is 20x32 but its image is 32x20".
    voc = write_voc(tmp_path, {"val": ["a", "b", "c"]})
    mask = write_exif_pair(voc, "b", 6, (20, 32))
    write_exif_pair(voc, "c", 6, (20, 32))
    with caplog.at_level("WARNING"):
        dataset = VOCSegmentation(tmp_path, "val")
    warnings = [record.getMessage() for record in caplog.records if "EXIF orientation" in record.getMessage()]
    assert len(warnings) == 1 and "of 2 image(s)" in warnings[0]
    image, labels = dataset[1]
    assert image.size == (20, 32) and np.array_equal(labels, mask)
    pixels = np.asarray(image, dtype=np.int64)
    assert np.abs(pixels[2:14] - [255, 0, 0]).max() < 40 and np.abs(pixels[18:30] - [0, 0, 255]).max() < 40
    assert dataset[0][0].size == (24, 20)  # an image without the tag is untouched


def test_voc_exif_orientation_left_out_when_the_mask_fits_the_stored_pixels(tmp_path: Path) -> None:
    voc = write_voc(tmp_path, {"val": ["a"]})
    write_exif_pair(voc, "a", 6, (32, 20))
    dataset = VOCSegmentation(tmp_path, "val")
    assert dataset[0][0].size == (32, 20) and not dataset.upright


def test_voc_exif_neither_orientation_fits_is_an_error(tmp_path: Path) -> None:
    voc = write_voc(tmp_path, {"val": ["a"]})
    write_exif_pair(voc, "a", 8, (24, 24))
    with pytest.raises(ValueError, match=r"a\.png: mask is 24x24 but its image a\.jpg is 32x20 \(20x32 upright"):
        VOCSegmentation(tmp_path, "val")


def write_ade(root: Path, split: str, count: int) -> Path:
    base = root / "ADEChallengeData2016"
    for kind in ("images", "annotations"):
        (base / kind / split).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        labels = np.zeros((12, 16), dtype=np.uint8)
        labels[:, 8:] = 150
        labels[:6, :4] = index + 1
        Image.fromarray(np.full((12, 16, 3), 100, np.uint8)).save(base / "images" / split / f"ADE_{index}.jpg")
        Image.fromarray(labels, mode="L").save(base / "annotations" / split / f"ADE_{index}.png")
    return base


def test_ade20k_ignores_label_zero_and_shifts(tmp_path: Path) -> None:
    write_ade(tmp_path, "validation", 2)
    dataset = ADE20KSegmentation(tmp_path, "val")
    assert dataset.num_classes == 150 == len(ADE20K_CLASS_NAMES) and dataset.background_index is None
    _, mask = dataset[1]
    assert mask[0, 0] == 1 and mask[0, 10] == 149 and mask[10, 0] == 255
    assert ADE20KSegmentation(tmp_path / "ADEChallengeData2016", "validation")[0][1][0, 0] == 0


def test_ade20k_errors(tmp_path: Path) -> None:
    base = write_ade(tmp_path, "training", 1)
    with pytest.raises(ValueError, match="valid: "):
        ADE20KSegmentation(tmp_path, "test")
    with pytest.raises(ValueError, match="no ADE20K layout"):
        ADE20KSegmentation(tmp_path, "validation")
    Image.fromarray(np.full((12, 16), 151, np.uint8), mode="L").save(base / "annotations" / "training" / "ADE_0.png")
    with pytest.raises(ValueError, match=r"ADE_0.png: label\(s\) \[151\] out of range"):
        ADE20KSegmentation(tmp_path, "training")[0]
    (base / "annotations" / "training" / "ADE_0.png").unlink()
    with pytest.raises(ValueError, match=r"missing masks: .*ADE_0\.png"):
        ADE20KSegmentation(tmp_path, "training")


def write_folder(root: Path, count: int, labels: int = 3) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for index in range(count):
        mask = np.full((10, 14), index % labels, np.uint8)
        mask[0] = 255
        Image.fromarray(np.zeros((10, 14, 3), np.uint8)).save(root / "images" / f"img{index}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"img{index}.png")


def test_folder_layouts_and_class_count(tmp_path: Path) -> None:
    write_folder(tmp_path / "flat", 3)
    flat = FolderSegmentation(tmp_path / "flat")
    assert len(flat) == 3 and flat.num_classes == 3  # inferred from the largest label
    assert flat[2][1][5, 5] == 2 and flat[2][1][0, 0] == 255
    write_folder(tmp_path / "split" / "train", 2)
    (tmp_path / "split" / "classes.txt").write_text("sky\nroad\ncar\nperson\n")
    split = FolderSegmentation(tmp_path / "split", "train")
    assert split.class_names == ("sky", "road", "car", "person")
    write_folder(tmp_path / "nested", 1)
    (tmp_path / "nested" / "images" / "val").mkdir()
    (tmp_path / "nested" / "masks" / "val").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "nested" / "images" / "val" / "x.jpg")
    Image.fromarray(np.ones((4, 4), np.uint8), mode="L").save(tmp_path / "nested" / "masks" / "val" / "x.png")
    nested = build_segmentation_dataset(DatasetSpec("folder", tmp_path / "nested", "val", num_classes=2))
    assert len(nested) == 1 and nested.num_classes == 2


def test_folder_errors(tmp_path: Path) -> None:
    write_folder(tmp_path, 2, labels=2)
    with pytest.raises(ValueError, match="no image folder found"):
        FolderSegmentation(tmp_path, "val")
    with pytest.raises(ValueError, match=r"classes\.txt|num_classes"):
        (tmp_path / "classes.txt").write_text("a\nb\n")
        FolderSegmentation(tmp_path, num_classes=3)
    (tmp_path / "classes.txt").unlink()
    Image.fromarray(np.zeros((10, 14, 3), np.uint8)).save(tmp_path / "masks" / "img1.png")
    with pytest.raises(ValueError, match=r"img1\.png: a mask must be a single-channel label image"):
        FolderSegmentation(tmp_path, num_classes=2)[1]
    (tmp_path / "masks" / "img1.png").unlink()
    with pytest.raises(ValueError, match=r"missing masks: .*img1\.png"):
        FolderSegmentation(tmp_path, num_classes=2)
    with pytest.raises(ValueError, match="data_root is required"):
        build_segmentation_dataset(DatasetSpec("voc"))
    with pytest.raises(ValueError, match="valid: scenes, voc, ade20k, folder"):
        build_segmentation_dataset(DatasetSpec("coco", tmp_path))  # type: ignore[arg-type]


def test_scenes_wrapper() -> None:
    dataset = ScenesSegmentation("val", num_images=2, image_size=32, seed=3)
    image, mask = dataset[0]
    assert image.size == (32, 32) and mask.shape == (32, 32) and mask.dtype == np.uint8
    assert int(mask.max()) < dataset.num_classes == len(dataset.class_names)
    assert dataset.fingerprint != ScenesSegmentation("val", num_images=2, image_size=32, seed=4).fingerprint
    with pytest.raises(ValueError, match="valid"):
        ScenesSegmentation("test", 2)  # type: ignore[arg-type]


def test_paired_transforms_keep_image_and_mask_aligned() -> None:
    mask = np.zeros((40, 60), np.uint8)
    mask[10:30, 20:50] = 3
    image = Image.fromarray(np.where(mask[..., None] == 3, 255, 0).astype(np.uint8).repeat(3, -1))
    pixels, labels = to_tensors(image, mask)
    assert pixels.shape == (3, 40, 60) and labels.dtype == torch.int64
    for transform in (
        lambda: resize_pair(pixels, labels, (24, 24)),
        lambda: random_resized_crop_pair(pixels, labels, 24, (0.5, 2.0), (0.75, 4 / 3), item_generator(0, 1, 2)),
        lambda: random_scale_crop_flip_pair(pixels, labels, 24, (0.5, 2.0), item_generator(5)),
    ):
        out_pixels, out_labels = transform()
        assert out_pixels.shape == (3, 24, 24) and out_labels.shape == (24, 24)
        assert set(out_labels.unique().tolist()) <= {0, 3, 255}
        inside = out_labels == 3
        if inside.any():  # object pixels are white, background black (away from the resampled edges)
            assert out_pixels[0][inside].mean() > 0.7
    first = random_resized_crop_pair(pixels, labels, 24, (0.5, 2.0), (0.75, 4 / 3), item_generator(0, 1, 2))
    again = random_resized_crop_pair(pixels, labels, 24, (0.5, 2.0), (0.75, 4 / 3), item_generator(0, 1, 2))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_random_resized_crop_pair_uses_the_shared_box_sampler() -> None:
    # Each pixel holds its row-major index: the (bilinear) crop's values lie between those of the box's corners.
    height, width = 40, 60
    image = torch.arange(height * width, dtype=torch.float32).view(1, height, width).expand(3, -1, -1)
    labels = torch.zeros(height, width, dtype=torch.int64)
    for key in range(10):
        box = random_crop_box(width, height, (0.1, 0.5), (0.75, 4 / 3), TorchRandom(item_generator(key)))
        crop, _ = random_resized_crop_pair(
            image / image.max(), labels, 8, (0.1, 0.5), (0.75, 4 / 3), item_generator(key)
        )
        top_left = box.top * width + box.left
        bottom_right = (box.top + box.height - 1) * width + box.left + box.width - 1
        assert (
            top_left - 1e-3 <= float(crop.min() * image.max()) <= float(crop.max() * image.max()) <= bottom_right + 1e-3
        )


def test_colour_jitter_matches_torchvision_float_ops_with_the_same_draws() -> None:
    # Each change with its probability, in a fixed order; the changes are cribo.augment's float ops, equal to
    # torchvision's float ops up to the red luma weight (0.299 against 0.2989) and float rounding.
    pixels = torch.rand(3, 30, 40, generator=torch.Generator().manual_seed(0))
    adjustments = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for key in range(20):
        generator, expected_generator = item_generator(key), item_generator(key)
        jittered = colour_jitter(pixels, 0.3, 0.5, generator)
        expected = pixels
        for adjust in adjustments:
            if float(torch.rand((), generator=expected_generator)) < 0.5:
                low, high = (-0.3, 0.3) if adjust is TF.adjust_hue else (0.7, 1.3)
                expected = adjust(expected, low + (high - low) * float(torch.rand((), generator=expected_generator)))
        torch.testing.assert_close(jittered, expected.clamp(0, 1), atol=2e-4, rtol=0)
        assert torch.equal(torch.rand(2, generator=generator), torch.rand(2, generator=expected_generator))
