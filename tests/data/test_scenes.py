"""Tests for cribo.data.scenes: determinism, splits, labels consistent with pixels, class-free colour (both class
cues), class-free outline and texture (shape cue), class patterns on smooth backgrounds (texture cue)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cribo.data.scenes import OUTLINES, PALETTE, PATTERNS, PLAIN_BACKGROUND, SHAPES, TEXTURES, SyntheticScenes


def _scene_bytes(dataset: SyntheticScenes, index: int) -> tuple[bytes, bytes]:
    image, mask = dataset[index]
    return image.tobytes(), mask.tobytes()


def test_same_seed_and_index_give_identical_bytes() -> None:
    first, second = SyntheticScenes("train", 8, seed=3), SyntheticScenes("train", 8, seed=3)
    for index in (0, 5, 7):
        assert _scene_bytes(first, index) == _scene_bytes(second, index)
        assert _scene_bytes(first, index) == _scene_bytes(first, index)  # lazily regenerated, same bytes
    assert _scene_bytes(first, -1) == _scene_bytes(first, 7)


def test_splits_and_seeds_give_different_scenes() -> None:
    train, val, other_seed = SyntheticScenes("train", 6), SyntheticScenes("val", 6), SyntheticScenes("train", 6, seed=1)
    train_images = {_scene_bytes(train, i)[0] for i in range(6)}
    assert len(train_images) == 6
    assert train_images.isdisjoint(_scene_bytes(val, i)[0] for i in range(6))
    assert train_images.isdisjoint(_scene_bytes(other_seed, i)[0] for i in range(6))
    assert not np.array_equal(train[0][1], val[0][1])


@pytest.mark.parametrize("image_size", [64, 96, 224])
def test_item_types_and_shapes(image_size: int) -> None:
    dataset = SyntheticScenes("val", 2, image_size=image_size)
    image, mask = dataset[1]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (image_size, image_size)
    assert isinstance(mask, np.ndarray) and mask.dtype == np.uint8 and mask.shape == (image_size, image_size)
    assert mask.max() < dataset.num_classes
    assert len(dataset) == 2


def test_class_metadata() -> None:
    dataset = SyntheticScenes("train", 1)
    assert dataset.class_cue == "shape"
    assert dataset.num_classes == 7 == len(dataset.class_names)
    assert dataset.class_names[0] == "background"
    assert dataset.class_names[1:] == tuple(SHAPES)[:6]
    fewer = SyntheticScenes("train", 1, num_object_classes=3)
    assert fewer.class_names == ("background", "disc", "square", "triangle")
    patterns = SyntheticScenes("train", 1, class_cue="texture")
    assert patterns.class_names[1:] == tuple(PATTERNS)[:6]
    two = SyntheticScenes("train", 1, class_cue="texture", num_object_classes=2)
    assert two.class_names[1:] == ("stripes", "checker")
    assert SyntheticScenes("train", 1, class_cue="silhouette").class_names == dataset.class_names


@pytest.mark.parametrize(("class_cue", "min_objects"), [("texture", 3.5), ("shape", 2.5)])
def test_every_class_appears_and_images_hold_several_objects(class_cue: str, min_objects: float) -> None:
    dataset = SyntheticScenes("train", 30, image_size=64, class_cue=class_cue)  # type: ignore[arg-type]
    seen: set[int] = set()
    objects_per_image = []
    for index in range(len(dataset)):
        scene = dataset.scene(index)
        seen.update(np.unique(scene.mask).tolist())
        objects_per_image.append(len(np.unique(scene.instances)) - 1)
    assert seen == set(range(dataset.num_classes))
    assert np.mean(objects_per_image) >= min_objects


def test_mask_matches_pixels_in_flat_colour_rendering() -> None:
    textured = SyntheticScenes("val", 6, seed=5, class_cue="shape")
    flat = SyntheticScenes("val", 6, seed=5, class_cue="shape", textures=("flat",), pixel_noise=0.0)
    for index in range(len(flat)):
        scene, reference = flat.scene(index), textured.scene(index)
        # Geometry and appearance use separate streams: the outlines do not depend on the texture family.
        np.testing.assert_array_equal(scene.mask, reference.mask)
        np.testing.assert_array_equal(scene.instances, reference.instances)
        classes = np.array([0, *(obj.class_index for obj in scene.objects)])
        np.testing.assert_array_equal(scene.mask, classes[scene.instances])
        region_colours = []
        for instance_id in np.unique(scene.instances):
            colours = np.unique(scene.image[scene.instances == instance_id], axis=0)
            assert len(colours) == 1, f"instance {instance_id} of scene {index} is not one flat colour"
            region_colours.append(tuple(colours[0]))
        assert len(set(region_colours)) == len(region_colours)  # every region distinguishable by colour


def test_shape_cue_colour_and_texture_do_not_determine_the_class() -> None:
    dataset = SyntheticScenes("train", 60, image_size=64, class_cue="shape")
    colours: dict[int, list[np.ndarray]] = {c: [] for c in range(1, dataset.num_classes)}
    textures: dict[int, set[str]] = {c: set() for c in range(1, dataset.num_classes)}
    for index in range(len(dataset)):
        scene = dataset.scene(index)
        for instance_id, obj in enumerate(scene.objects, start=1):
            pixels = scene.image[scene.instances == instance_id]
            if len(pixels):
                colours[obj.class_index].append(pixels.mean(axis=0))
                textures[obj.class_index].add(obj.texture)
    class_means = []
    for class_index, values in colours.items():
        per_instance = np.stack(values)
        assert len(per_instance) >= 15
        # A class that fixed its colour would show a small spread here (uniform colours have std ~ 50).
        assert per_instance.std(axis=0).min() > 30.0, dataset.class_names[class_index]
        assert len(textures[class_index]) >= 4, textures[class_index]
        class_means.append(per_instance.mean(axis=0))
    assert np.ptp(np.stack(class_means), axis=0).max() < 45.0  # no class is redder/greener than the others


def test_write_to_disk_round_trips(tmp_path: Path) -> None:
    dataset = SyntheticScenes("val", 3, image_size=64, seed=2)
    root = dataset.write_to_disk(tmp_path / "scenes")
    assert root == tmp_path / "scenes"
    assert sorted(p.name for p in (root / "images").iterdir()) == [f"val_{i:06d}.png" for i in range(3)]
    assert sorted(p.name for p in (root / "masks").iterdir()) == [f"val_{i:06d}.png" for i in range(3)]
    assert (root / "class_names.txt").read_text().split() == list(dataset.class_names)
    for index in range(3):
        image, mask = dataset[index]
        with Image.open(root / "images" / f"{dataset.stem(index)}.png") as stored_image:
            assert stored_image.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(stored_image), np.asarray(image))
        with Image.open(root / "masks" / f"{dataset.stem(index)}.png") as stored_mask:
            assert stored_mask.mode == "L"
            np.testing.assert_array_equal(np.asarray(stored_mask), mask)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"split": "test", "num_images": 1}, "split"),
        ({"split": "train", "num_images": -1}, "num_images"),
        ({"split": "train", "num_images": 1, "image_size": 8}, "image_size"),
        ({"split": "train", "num_images": 1, "seed": -2}, "seed"),
        ({"split": "train", "num_images": 1, "num_object_classes": 0}, "num_object_classes"),
        ({"split": "train", "num_images": 1, "num_object_classes": len(SHAPES) + 1}, "num_object_classes"),
        (
            {"split": "train", "num_images": 1, "class_cue": "texture", "num_object_classes": len(PATTERNS) + 1},
            "num_object_classes",
        ),
        ({"split": "train", "num_images": 1, "class_cue": "colour"}, "class_cue"),
        ({"split": "train", "num_images": 1, "class_cue": "texture", "palette_size": -1}, "palette_size"),
        ({"split": "train", "num_images": 1, "class_cue": "texture", "palette_size": 99}, "palette_size"),
        ({"split": "train", "num_images": 1, "objects_per_image": (3, 2)}, "objects_per_image"),
        ({"split": "train", "num_images": 1, "object_size": (0.3, 0.1)}, "object_size"),
        ({"split": "train", "num_images": 1, "textures": ("plaid",)}, "textures"),
        ({"split": "train", "num_images": 1, "textures": ()}, "textures"),
        ({"split": "train", "num_images": 1, "max_occlusion": 1.5}, "max_occlusion"),
        ({"split": "train", "num_images": 1, "pixel_noise": -1.0}, "pixel_noise"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        SyntheticScenes(**kwargs)


def test_index_out_of_range_raises_index_error() -> None:
    dataset = SyntheticScenes("train", 2)
    with pytest.raises(IndexError):
        dataset[2]
    with pytest.raises(IndexError):
        dataset[-3]
    assert len(list(dataset)) == 2  # the sequence protocol stops at the end
    assert len(SyntheticScenes("train", 0)) == 0


def test_repr_and_texture_family() -> None:
    text = repr(SyntheticScenes("val", 10, image_size=64, seed=4))
    for fragment in ("SyntheticScenes(", "split='val'", "num_images=10", "image_size=64", "seed=4", "star", "shape"):
        assert fragment in text
    assert set(TEXTURES) >= {"flat", "stripes", "checkerboard", "dots", "noise", "gradient"}


@pytest.mark.parametrize("class_cue", ["texture", "shape"])
def test_generation_is_fast(class_cue: str) -> None:
    dataset = SyntheticScenes("train", 20, image_size=96, class_cue=class_cue)  # type: ignore[arg-type]
    start = time.perf_counter()
    for index in range(len(dataset)):
        dataset[index]
    # Target is < 5 ms per 96 px image; the bound leaves a wide margin for slow CI machines.
    assert (time.perf_counter() - start) / len(dataset) < 0.05


# ------------------------------------------------------------------------------------------------ texture cue


def _instance_pixels(scene_image: np.ndarray, instances: np.ndarray, instance_id: int) -> np.ndarray:
    return scene_image[instances == instance_id].reshape(-1, 3)


def test_texture_cue_objects_show_their_pattern_in_two_colours_on_a_smooth_background() -> None:
    dataset = SyntheticScenes("val", 12, image_size=96, seed=1, class_cue="texture", pixel_noise=0.0)
    for index in range(len(dataset)):
        scene = dataset.scene(index)
        classes = np.array([0, *(obj.class_index for obj in scene.objects)])
        np.testing.assert_array_equal(scene.mask, classes[scene.instances])
        for instance_id, obj in enumerate(scene.objects, start=1):
            assert obj.texture == dataset.class_names[obj.class_index]
            assert obj.outline in OUTLINES
            pixels = _instance_pixels(scene.image, scene.instances, instance_id)
            if len(pixels) >= 30:  # a pattern of two colours, both visible
                colours, counts = np.unique(pixels, axis=0, return_counts=True)
                assert len(colours) == 2 and counts.min() >= 3, (index, instance_id, len(colours))
        # The background changes slowly: neighbouring background pixels differ by a few levels at most.
        image = scene.image.astype(np.int64)
        both = (scene.instances[:, 1:] == 0) & (scene.instances[:, :-1] == 0)
        step = np.abs(image[:, 1:] - image[:, :-1]).max(axis=-1)[both]
        assert np.percentile(step, 99) <= 12


def test_texture_cue_colour_does_not_determine_the_class() -> None:
    dataset = SyntheticScenes("train", 60, image_size=64, class_cue="texture")
    colours: dict[int, list[np.ndarray]] = {c: [] for c in range(1, dataset.num_classes)}
    outlines: dict[int, set[str]] = {c: set() for c in range(1, dataset.num_classes)}
    for index in range(len(dataset)):
        scene = dataset.scene(index)
        for instance_id, obj in enumerate(scene.objects, start=1):
            pixels = _instance_pixels(scene.image, scene.instances, instance_id)
            if len(pixels):
                colours[obj.class_index].append(pixels.mean(axis=0))
                outlines[obj.class_index].add(obj.outline)
    class_means = []
    for class_index, values in colours.items():
        per_instance = np.stack(values)
        assert len(per_instance) >= 20
        assert per_instance.std(axis=0).min() > 25.0, dataset.class_names[class_index]
        assert outlines[class_index] == set(OUTLINES), dataset.class_names[class_index]
        class_means.append(per_instance.mean(axis=0))
    assert np.ptp(np.stack(class_means), axis=0).max() < 40.0  # no class is redder/greener than the others


def test_shape_cue_keeps_the_pre_issue_13_layout() -> None:
    shapes = SyntheticScenes("train", 1, class_cue="shape")
    assert (shapes.objects_per_image, shapes.object_size, shapes.max_occlusion) == ((3, 5), (0.12, 0.26), 0.4)
    scene = shapes.scene(0)
    assert all(obj.outline == shapes.class_names[obj.class_index] for obj in scene.objects)


def test_texture_cue_palette_and_jitter() -> None:
    fixed = SyntheticScenes("val", 6, seed=2, class_cue="texture", palette_size=2, pixel_noise=0.0)
    jittered = SyntheticScenes(
        "val", 6, seed=2, class_cue="texture", palette_size=2, colour_jitter=1.0, pixel_noise=0.0
    )
    palette = {tuple(float(c) for c in colour) for colour in PALETTE[:2]}
    shifted = 0
    for index in range(len(fixed)):
        scene, other = fixed.scene(index), jittered.scene(index)
        np.testing.assert_array_equal(scene.mask, other.mask)  # appearance options leave the geometry alone
        for instance_id in range(1, len(scene.objects) + 1):
            pixels = _instance_pixels(scene.image, scene.instances, instance_id)
            if len(pixels) >= 30:
                assert {tuple(float(c) for c in colour) for colour in np.unique(pixels, axis=0)} == palette
            moved = _instance_pixels(other.image, other.instances, instance_id)
            shifted += int(len(moved) > 0 and not np.array_equal(moved, pixels))
    assert shifted > 0
    one = SyntheticScenes("val", 2, class_cue="silhouette", palette_size=1, colour_jitter=0.0, pixel_noise=0.0)
    scene = one.scene(0)
    assert {tuple(c) for c in scene.image[scene.instances > 0].reshape(-1, 3)} == {PALETTE[0]}


def test_silhouette_cue_fills_each_outline_with_one_colour() -> None:
    dataset = SyntheticScenes("val", 8, seed=3, class_cue="silhouette", pixel_noise=0.0)
    for index in range(len(dataset)):
        scene = dataset.scene(index)
        for instance_id, obj in enumerate(scene.objects, start=1):
            assert obj.outline == dataset.class_names[obj.class_index] and obj.texture == "flat"
            pixels = _instance_pixels(scene.image, scene.instances, instance_id)
            assert len(np.unique(pixels, axis=0)) <= 1


def test_plain_background_is_one_grey() -> None:
    dataset = SyntheticScenes("val", 3, class_cue="texture", plain_background=True, pixel_noise=0.0)
    for index in range(len(dataset)):
        scene = dataset.scene(index)
        assert scene.background_texture == "plain"
        assert {tuple(c) for c in scene.image[scene.instances == 0].reshape(-1, 3)} == {PLAIN_BACKGROUND}
