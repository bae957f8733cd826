"""Pictures: PCA colours, cluster overlays (dropped objects greyed), cross-image neighbours, and every
``cribo viz`` command writing a PNG from a random tiny ViT at small sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cribo.augment import CropBox
from cribo.cli import build_parser, main
from cribo.hub import export_backbone
from cribo.models import create_backbone
from cribo.viz import (
    DROPPED_GREY,
    EDGE_COLOUR,
    ClusterPicture,
    cluster_colours,
    cluster_palette,
    cross_image_neighbours,
    figure_clusters,
    figure_curves,
    overlay_clusters,
    pca_colours,
    save_figure,
    spread_selection,
)

# 32-px images with 8-px patches: 4x4 patches per view. Most tests use a one-block ViT-Tiny exported to
# safetensors (fast to load); `random:vit_tiny` (12 blocks, random init) is drawn once.
SIZES = ["--image-size", "32", "--device", "cpu"]
RANDOM_VIT = ["--backbone", "random:vit_tiny", "--patch-size", "8"]
KIND_FLAGS = {
    "pca": ["--num-images", "2"],
    "clusters": ["--num-images", "2", "--n-tokens", "4"],
    "neighbours": ["--num-images", "4", "--n-tokens", "4", "--max-pairs", "4"],
    "segmentation": ["--num-images", "2", "--train-images", "4", "--k", "5"],
}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Flags for a one-block ViT-Tiny (8-px patches) saved as safetensors, and the small sizes."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        backbone = create_backbone("vit_tiny", patch_size=8, depth=1)
    path = export_backbone(backbone, tmp_path_factory.mktemp("backbone") / "tiny.safetensors")
    return ["--backbone", str(path), *SIZES]


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 100


# ------------------------------------------------------------------------------------------------------- curves


def test_training_curves_figure_and_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    history = [{"step": float(step), "d_loss": 6.0 - 0.1 * step, "r_cnt": 5.0} for step in range(5)]
    figure = figure_curves(history)
    assert [ax.get_title() for ax in figure.axes][:2] == ["global cross-view loss", "object cross-view loss"]
    assert len(figure.axes[0].lines[0].get_xdata()) == 5
    (tmp_path / "log.txt").write_text("".join(json.dumps(row) + "\n" for row in history))
    with pytest.raises(SystemExit) as exited:
        main(["viz", "curves", str(tmp_path)])
    assert exited.value.code == 0 and str(tmp_path / "curves.png") in capsys.readouterr().out
    assert_png(tmp_path / "curves.png")
    with pytest.raises(SystemExit) as exited:
        main(["viz", "curves", str(tmp_path / "missing")])
    assert exited.value.code == 2 and "log.txt not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------- PCA


def test_pca_colours_have_the_feature_grid_shape_and_lie_in_unit_range() -> None:
    features = torch.randn(2, 3, 4, 16, generator=torch.Generator().manual_seed(0))
    colours, explained = pca_colours(features)
    assert colours.shape == (2, 3, 4, 3) and colours.dtype == torch.float32
    assert float(colours.min()) >= 0.0 and float(colours.max()) <= 1.0
    assert explained.shape == (3,) and bool((explained[:-1] >= explained[1:]).all()) and float(explained.sum()) <= 1
    # Quantile scaling spreads each component over the whole range.
    assert torch.allclose(colours.flatten(0, 2).amin(0), torch.zeros(3)) and bool((colours.amax((0, 1, 2)) == 1).all())


def test_pca_first_component_separates_two_groups_of_patches() -> None:
    generator = torch.Generator().manual_seed(1)
    direction = torch.zeros(8)
    direction[3] = 10.0
    features = 0.1 * torch.randn(2, 2, 2, 8, generator=generator)
    features[0] += direction  # image 0 far along one axis, image 1 not
    colours, explained = pca_colours(features)
    red = colours[..., 0]
    assert float(explained[0]) > 0.9
    assert bool((red[0] - red[1].mean()).abs().min() > 0.5)  # the two images get opposite reds


def test_pca_colours_pad_missing_components_and_reject_bad_input() -> None:
    colours, explained = pca_colours(torch.randn(5, 2))
    assert colours.shape == (5, 3) and bool((colours[:, 2] == 0).all()) and float(explained[2]) == 0.0
    with pytest.raises(ValueError, match="at least two rows"):
        pca_colours(torch.randn(1, 4))


# ------------------------------------------------------------------------------------------------- clusters


def test_cluster_palette_is_distinct_and_never_the_dropped_grey() -> None:
    for num_clusters in (1, 8, 18, 32):
        palette = cluster_palette(num_clusters)
        assert palette.shape == (num_clusters, 3)
        assert len({tuple(np.round(colour, 6)) for colour in palette}) == num_clusters
        assert not any(np.allclose(colour, DROPPED_GREY, atol=0.05) for colour in palette)


def test_dropped_clusters_are_greyed_out() -> None:
    cluster_map = torch.tensor([[0, 1], [2, 1]])
    valid = torch.tensor([True, False, True])
    colours = cluster_colours(cluster_map, valid)
    assert colours.shape == (2, 2, 3)
    assert np.allclose(colours[0, 1], DROPPED_GREY) and np.allclose(colours[1, 1], DROPPED_GREY)
    assert not np.allclose(colours[0, 0], DROPPED_GREY) and not np.allclose(colours[1, 0], colours[0, 0])

    overlay = overlay_clusters(np.zeros((8, 8, 3)), cluster_map, valid)  # 4-px patches over a black view
    assert overlay.shape == (8, 8, 3)
    assert np.allclose(overlay[1, 6], 0.8 * np.asarray(DROPPED_GREY))  # inside the dropped cluster
    assert np.allclose(overlay[1, 1], 0.5 * cluster_palette(3)[0])  # inside a kept cluster
    assert np.allclose(overlay[1, 3], EDGE_COLOUR)  # boundary between clusters 0 and 1


def test_cluster_figure_counts_and_marks_dropped_objects(tmp_path: Path) -> None:
    box = CropBox(top=0, left=0, height=16, width=16, flipped=True)
    maps = torch.tensor([[[0, 0], [1, 1]], [[0, 0], [2, 2]]]).reshape(1, 2, 2, 2)  # cluster 1 only in view 1
    picture = ClusterPicture(
        originals=torch.rand(1, 3, 16, 16),
        views=torch.rand(1, 2, 3, 8, 8),
        cluster_maps=maps,
        valid=torch.tensor([[True, False, False]]),
        boxes=[(box, box)],
        names=["scene 0"],
    )
    figure = figure_clusters(picture, "test")
    texts = [ax.get_ylabel() for ax in figure.axes] + [t.get_text() for t in figure.legends[0].get_texts()]
    assert "1 objects, 2 dropped" in texts and any("dropped" in text and "empty" in text for text in texts)
    assert any(ax.get_title() == "view 1 (flipped)" for ax in figure.axes)
    assert_png(save_figure(figure, tmp_path / "clusters.png"))
    with pytest.raises(ValueError, match="png"):
        save_figure(figure, tmp_path / "clusters.jpg")


# ----------------------------------------------------------------------------------------------- neighbours


def test_cross_image_neighbours_finds_the_matching_object_and_checks_the_cycle() -> None:
    # Images 0 (queries) and 1, 2 (bank); K = 3 clusters, D = 4; objects identical in both views.
    objects = torch.zeros(3, 2, 3, 4)
    objects[0, :, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    objects[0, :, 2] = torch.tensor([0.9, 0.1, 0.0, 0.0])  # close to query 0: both retrieve the same object
    objects[1, :, 1] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    objects[2, :, 0] = torch.tensor([2.0, 0.0, 0.0, 0.0])  # same direction as query 0, another norm
    valid = torch.tensor([[True, False, True], [False, True, False], [True, False, False]])
    found = cross_image_neighbours(objects, valid, num_queries=1)
    assert found.query_image.tolist() == [0, 0] and found.query_cluster.tolist() == [0, 2]
    assert found.neighbour_image.tolist() == [2, 2] and found.neighbour_cluster.tolist() == [0, 0]
    assert found.consistent.tolist() == [True, False]  # the cycle goes back to query 0 only
    assert torch.allclose(found.similarity[0], torch.tensor(1.0))
    with pytest.raises(ValueError, match="num_queries"):
        cross_image_neighbours(objects, valid, num_queries=3)


def test_spread_selection_takes_round_robin_over_groups() -> None:
    assert spread_selection(torch.tensor([0, 0, 0, 1, 1, 2]), 4) == [0, 1, 3, 5]
    assert spread_selection(torch.tensor([0, 0]), 5) == [0, 1]


# ------------------------------------------------------------------------------------------------- commands


@pytest.mark.parametrize("kind", sorted(KIND_FLAGS))
def test_each_command_writes_a_png(
    kind: str, small: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / f"{kind}.png"
    with pytest.raises(SystemExit) as exited:
        main(["viz", kind, *small, *KIND_FLAGS[kind], "--output", str(output)])
    assert exited.value.code == 0
    assert_png(output)
    assert str(output) in capsys.readouterr().out


def test_random_vit_tiny_spec(tmp_path: Path) -> None:
    output = tmp_path / "random.png"
    args = build_parser().parse_args(
        ["viz", "clusters", *RANDOM_VIT, *SIZES, *KIND_FLAGS["clusters"], "--output", str(output)]
    )
    assert args.func(args) == output
    assert_png(output)


def test_commands_take_image_files(small: list[str], tmp_path: Path) -> None:
    files = []
    for index, size in enumerate([(40, 30), (30, 50), (32, 32)]):
        path = tmp_path / f"image{index}.png"
        Image.fromarray(np.random.default_rng(index).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)
        files.append(str(path))
    parser = build_parser()
    for kind in ("clusters", "segmentation"):
        output = tmp_path / f"files_{kind}.png"
        args = parser.parse_args(["viz", kind, *small, *KIND_FLAGS[kind], "--images", *files, "--output", str(output)])
        assert args.func(args) == output
        assert_png(output)
    args = parser.parse_args(["viz", "pca", *small, "--images", str(tmp_path / "missing.png")])
    with pytest.raises(ValueError, match="--images"):
        args.func(args)


@pytest.mark.parametrize("spec", ["no/such/checkpoint.pth", "random:not_a_vit"])
def test_bad_backbone_is_a_clear_value_error(spec: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["viz", "pca", "--backbone", spec, "--output", str(tmp_path / "x.png")]
    args = build_parser().parse_args(argv)
    with pytest.raises(ValueError, match="--backbone") as raised:
        args.func(args)
    assert "random:<arch>" in str(raised.value) or "vit_tiny" in str(raised.value)  # says what is valid
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and "--backbone" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_too_many_clusters_names_the_flag(small: list[str], tmp_path: Path) -> None:
    argv = ["viz", "clusters", *small, "--num-images", "1", "--n-tokens", "33", "--output", str(tmp_path / "c.png")]
    args = build_parser().parse_args(argv)
    with pytest.raises(ValueError, match="--n-tokens"):
        args.func(args)
