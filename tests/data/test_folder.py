"""Tests of cribo.data.folder: listing, mode conversions, EXIF orientation, unreadable files."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cribo.data import IMAGE_EXTENSIONS, ImageFolder, list_images, load_rgb, to_rgb

EXIF_ORIENTATION = 0x0112  # EXIF tag number of "Orientation"


def write(path: Path, image: Image.Image, **save_options: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save_options)
    return path


def rgb_pixels(path: Path) -> np.ndarray:
    image = load_rgb(path)
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int64)


def test_list_images_is_recursive_sorted_and_case_insensitive(tmp_path: Path) -> None:
    tiny = Image.new("RGB", (2, 2))
    names = ["b/deep/x.JPG", "a.png", "b/y.jpeg", "c.WebP", "b/z.BMP", "b/deep/w.Jpg"]
    for name in names:
        write(tmp_path / name, tiny)
    (tmp_path / "notes.txt").write_text("not an image")
    write(tmp_path / ".hidden.jpg", tiny)
    write(tmp_path / ".cache" / "v.png", tiny)
    write(tmp_path / "b" / "._x.jpg", tiny)
    expected = ["a.png", "b/deep/w.Jpg", "b/deep/x.JPG", "b/y.jpeg", "b/z.BMP", "c.WebP"]
    assert list_images(tmp_path) == [tmp_path / name for name in expected]
    assert list_images(str(tmp_path)) == list_images(tmp_path)
    assert set(IMAGE_EXTENSIONS) == {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


@pytest.mark.parametrize("kind", ["empty", "missing", "file", "no_images"])
def test_folders_without_images_are_errors_naming_path_and_extensions(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "root"
    if kind == "empty":
        root.mkdir()
    elif kind == "file":
        root.write_text("x")
    elif kind == "no_images":
        (root / "sub").mkdir(parents=True)
        (root / "sub" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"root.*\.jpg, \.jpeg, \.png, \.webp, \.bmp") as error:
        list_images(root)
    assert str(root) in str(error.value)
    with pytest.raises(ValueError, match="root"):
        ImageFolder(root)


def test_symlink_cycles_are_walked_once(tmp_path: Path) -> None:
    write(tmp_path / "a" / "x.png", Image.new("RGB", (2, 2)))
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a", target_is_directory=True)
    assert list_images(tmp_path) == [tmp_path / "a" / "x.png"]


def test_grayscale_palette_and_rgb(tmp_path: Path) -> None:
    grey = write(tmp_path / "l.png", Image.new("L", (3, 2), 77))
    np.testing.assert_array_equal(rgb_pixels(grey), np.full((2, 3, 3), 77))
    palette = Image.new("P", (3, 2), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    np.testing.assert_array_equal(rgb_pixels(write(tmp_path / "p.png", palette)), np.tile([10, 200, 30], (2, 3, 1)))
    rgb = write(tmp_path / "rgb.bmp", Image.new("RGB", (3, 2), (1, 2, 3)))
    np.testing.assert_array_equal(rgb_pixels(rgb), np.tile([1, 2, 3], (2, 3, 1)))
    bilevel = Image.new("1", (2, 2), 1)
    np.testing.assert_array_equal(np.asarray(to_rgb(bilevel)), np.full((2, 2, 3), 255))


def test_alpha_is_composited_on_black(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red -> black
    rgba.putpixel((1, 0), (10, 20, 30, 255))  # opaque -> unchanged
    np.testing.assert_array_equal(rgb_pixels(write(tmp_path / "rgba.png", rgba)), [[[0, 0, 0], [10, 20, 30]]])
    grey_alpha = Image.new("LA", (1, 1), (200, 128))  # half transparent: 200 * 128 / 255 = 100.4
    assert np.abs(rgb_pixels(write(tmp_path / "la.png", grey_alpha)) - 100).max() <= 1


def test_palette_transparency_is_composited_on_black(tmp_path: Path) -> None:
    palette = Image.new("P", (2, 1), 1)
    palette.putpalette([0, 0, 0, 250, 5, 5, 10, 20, 30] + [0] * 759)
    palette.putpixel((1, 0), 2)
    path = write(tmp_path / "p_trns.png", palette, transparency=1)
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(rgb_pixels(path), [[[0, 0, 0], [10, 20, 30]]])


def test_sixteen_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    path = write(tmp_path / "g16.png", Image.fromarray(values))
    assert Image.open(path).mode == "I;16"
    np.testing.assert_array_equal(rgb_pixels(path)[..., 0], [[0, 1, 128, 255]])
    as_int32 = write(tmp_path / "g32.tif", Image.fromarray(values.astype(np.int32)))
    assert Image.open(as_int32).mode == "I"
    np.testing.assert_array_equal(rgb_pixels(as_int32)[..., 0], [[0, 1, 128, 255]])
    wide = Image.fromarray(np.array([[-5, 2**30, 2**31 - 1]], dtype=np.int32))  # beyond 16 bits: 32-bit scale
    np.testing.assert_array_equal(np.asarray(to_rgb(wide))[..., 0], [[0, 128, 255]])


@pytest.mark.parametrize(("suffix", "tolerance"), [(".tif", 0), (".jpg", 3)])
def test_cmyk_to_rgb(tmp_path: Path, suffix: str, tolerance: int) -> None:
    path = write(tmp_path / f"cmyk{suffix}", Image.new("CMYK", (8, 8), (50, 100, 150, 60)), quality=95)
    assert Image.open(path).mode == "CMYK"
    expected = [round((255 - ink) * (255 - 60) / 255) for ink in (50, 100, 150)]  # [157, 119, 80]
    assert np.abs(rgb_pixels(path) - expected).max() <= tolerance


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored 32 wide x 16 high, left half red, right half blue. Orientation 6 = rotate 90 degrees clockwise to
    # display: the result is 16 wide x 32 high with red on top.
    stored = np.zeros((16, 32, 3), dtype=np.uint8)
    stored[:, :16, 0] = 255
    stored[:, 16:, 2] = 255
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    path = write(tmp_path / "rotated.jpg", Image.fromarray(stored), exif=exif.tobytes(), quality=95)
    upright = rgb_pixels(path)
    assert upright.shape == (32, 16, 3)
    assert np.abs(upright[2:14] - [255, 0, 0]).max() < 40
    assert np.abs(upright[18:30] - [0, 0, 255]).max() < 40


def test_unreadable_files_are_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, format="JPEG")
    (tmp_path / "a_truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (tmp_path / "b_not_an_image.jpg").write_text("plain text with an image extension")
    write(tmp_path / "c_good.png", noise)
    dataset = ImageFolder(tmp_path)
    assert len(dataset) == 3 and dataset.paths == list_images(tmp_path)
    with caplog.at_level(logging.WARNING, logger="cribo.data.folder"):
        items = [dataset[index] for index in range(len(dataset))]
    assert items[0] is None and items[1] is None
    assert isinstance(items[2], Image.Image) and items[2].mode == "RGB" and items[2].size == (64, 64)
    assert dataset.num_skipped == 2
    warnings = " ".join(record.getMessage() for record in caplog.records)
    assert "a_truncated.jpg" in warnings and "b_not_an_image.jpg" in warnings
    with pytest.raises(OSError, match="truncated"):
        load_rgb(tmp_path / "a_truncated.jpg")


def test_image_folder_items_and_paths(tmp_path: Path) -> None:
    for index, name in enumerate(["z/1.png", "a/2.JPEG", "m.bmp"]):
        write(tmp_path / name, Image.new("L", (4 + index, 3), 10 * index))
    dataset = ImageFolder(tmp_path)
    assert [path.relative_to(tmp_path).as_posix() for path in dataset.paths] == ["a/2.JPEG", "m.bmp", "z/1.png"]
    assert dataset.path(2) == tmp_path / "z" / "1.png"
    sizes = [image.size for image in (dataset[index] for index in range(len(dataset))) if image is not None]
    assert sizes == [(5, 3), (6, 3), (4, 3)]
    with pytest.raises(IndexError):
        dataset[3]
