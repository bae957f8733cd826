"""How hard are the built-in scenes? Dense NN retrieval (and a linear probe) on the val split with raw-pixel patch
features, a random-init ViT and a label oracle, all through the evaluation suite's own code.

* raw pixels: each patch's ImageNet-normalised RGB values, flattened (3 p^2 numbers);
* random-init ViT: the tiny-cpu preset's backbone (4-block ViT-Tiny/8) as initialised by ``build_trainer`` for
  each seed (the "random init" arm of the ablation);
* label oracle: each patch's soft label histogram (the fraction of its pixels in each class) as its feature,
  i.e. retrieval with perfect patch-level semantics; what is left is the patch-resolution limit.

    python benchmarks/bench_scenes.py            # 300 train / 100 val scenes at 96 px
    python benchmarks/bench_scenes.py --quick    # seconds

Writes ``benchmarks/results/scenes.md`` (``--quick``: a temporary folder). Importing this module has no side
effects.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import common
import quality_common as qc

SCRIPT = "bench_scenes.py"
logger = logging.getLogger("bench_scenes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few small scenes (smoke test)")
    parser.add_argument("--device", default="cpu", help="where features are computed (cpu, cuda, ...)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="random-init seeds (default 0 1 2)")
    parser.add_argument("--preset", default="tiny-cpu", help="preset whose network is the random-init ViT")
    parser.add_argument("--train-images", type=int, default=None, help="bank / probe scenes (default 300)")
    parser.add_argument("--val-images", type=int, default=None, help="held-out scenes (default 100)")
    parser.add_argument("--image-size", type=int, default=None, help="scene side in px (default 96)")
    parser.add_argument("--linear-steps", type=int, default=None, help="linear-probe steps (default 500)")
    parser.add_argument("--no-linear", action="store_true", help="NN retrieval only")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2; --quick 1)")
    parser.add_argument("--results-dir", type=Path, default=None, help="where scenes.md goes")
    return parser


def eval_settings(args: argparse.Namespace) -> qc.EvalSettings:
    base = qc.SCALES["quick" if args.quick else "cpu"].evaluation
    size = args.image_size or base.image_size
    return qc.EvalSettings(
        train_images=args.train_images or base.train_images,
        val_images=args.val_images or base.val_images,
        image_size=size,
        input_size=size,
        linear_steps=args.linear_steps or base.linear_steps,
    )


def raw_pixel_features(patch_size: int) -> qc.FeatureFn:
    """Images (B, 3, H, W) in [0, 1] -> (B, H/p, W/p, 3 p^2) flattened ImageNet-normalised patch pixels."""
    import torch.nn.functional as F

    from cribo.eval.features import normalize_pixels

    def features(images: Any) -> Any:
        pixels = normalize_pixels(images, "imagenet")
        rows, cols = images.shape[-2] // patch_size, images.shape[-1] // patch_size
        patches = F.unfold(pixels, kernel_size=patch_size, stride=patch_size)  # (B, 3 p^2, h w)
        return patches.transpose(1, 2).reshape(images.shape[0], rows, cols, -1)

    return qc.no_grad_features(features)


def oracle_features(data: qc.EvalData, patch_size: int) -> qc.FeatureFn:
    """A feature function that returns each patch's soft label histogram (C + 1 bins) of the image it is given.

    The suite resizes every scene to the input size before calling the feature function; the oracle looks the
    resized image up by its exact pixel values (precomputed for both splits) and returns the histogram of the
    equally resized mask on the patch grid (``patch_label_histograms``, the same soft labels the bank stores).
    """
    import torch

    from cribo.eval.features import ResizeTransform
    from cribo.eval.nn_retrieval import patch_label_histograms

    size = data.settings.input_size
    grid = (size // patch_size, size // patch_size)
    transform = ResizeTransform(size)
    table: dict[bytes, Any] = {}
    for dataset in (data.train_set, data.val_set):
        for index in range(len(dataset)):
            pixels, labels = transform(index, *dataset[index])
            histogram = patch_label_histograms(labels[None], grid, dataset.num_classes, dataset.background_index)
            table[pixels.contiguous().numpy().tobytes()] = histogram[0]

    def features(images: Any) -> Any:
        rows = [table[image.detach().cpu().contiguous().numpy().tobytes()] for image in images]
        return torch.stack(rows).to(images.device)

    return features


def random_backbone(preset: str, seed: int, device: str) -> Any:
    """The backbone ``build_trainer`` initialises for ``seed`` under ``preset`` (same seeding order)."""
    import torch

    from cribo import config as config_lib
    from cribo.train import build_network

    config = config_lib.resolve(preset=preset, overrides={"seed": seed, "device": device})
    torch.manual_seed(config.run.seed)
    network = build_network(config, config.model.drop_path_rate, config.model.norm_last_layer)
    return network.backbone.to(device), config.model.patch_size


def scene_statistics(data: qc.EvalData) -> tuple[list[float], float]:
    """Pixel share of each class in the val split, and the mean number of objects per val scene."""
    import numpy as np

    counts = np.zeros(data.val_set.num_classes)
    objects = 0
    for index in range(len(data.val_set)):
        scene = data.val_set.scenes.scene(index)
        counts += np.bincount(scene.mask.ravel(), minlength=len(counts))
        objects += len(scene.objects)
    return list(counts / counts.sum()), objects / max(1, len(data.val_set))


def measure(
    args: argparse.Namespace, data: qc.EvalData, seeds: Sequence[int], patch: int
) -> dict[str, list[dict[str, Any]]]:
    """Scores per feature source: {"raw pixels": [one], "random-init ViT": [one per seed], "label oracle": [one]}."""
    linear = not args.no_linear
    results: dict[str, list[dict[str, Any]]] = {}
    raw = raw_pixel_features(patch)
    results["raw pixels"] = [{"nn": qc.nn_scores(raw, data), "linear": qc.linear_scores(raw, data) if linear else None}]
    logger.info("raw pixels: NN mIoU %.4f", results["raw pixels"][0]["nn"]["miou"])
    results["random-init ViT"] = []
    for seed in seeds:
        backbone, _ = random_backbone(args.preset, seed, args.device)
        results["random-init ViT"].append(qc.evaluate_backbone(backbone, data, linear))
        logger.info("random ViT seed %d: NN mIoU %.4f", seed, results["random-init ViT"][-1]["nn"]["miou"])
    results["label oracle"] = [{"nn": qc.nn_scores(oracle_features(data, patch), data), "linear": None}]
    logger.info("oracle: NN mIoU %.4f", results["label oracle"][0]["nn"]["miou"])
    return results


def tables(results: dict[str, list[dict[str, Any]]], names: Sequence[str]) -> tuple[str, str]:
    rows, class_rows = [], []
    for source, runs in results.items():
        nn = qc.summarize([r["nn"]["miou"] for r in runs])
        linear_values = [r["linear"]["miou"] for r in runs if r["linear"] is not None]
        pixel = qc.summarize([r["nn"]["pixel_accuracy"] for r in runs])
        rows.append(
            [
                source,
                len(runs),
                nn.text(),
                qc.summarize(linear_values).text() if linear_values else "–",
                qc.fmt(pixel.mean),
            ]
        )
        per_class = [
            qc.fmt(
                qc.summarize(
                    [r["nn"]["per_class_iou"][n] for r in runs if r["nn"]["per_class_iou"][n] is not None]
                ).mean
            )
            for n in names
        ]
        class_rows.append([source, *per_class])
    headers = ["features", "seeds", "NN mIoU mean ± std [95 % CI]", "linear mIoU", "NN pixel accuracy"]
    return common.markdown_table(headers, rows), common.markdown_table(["NN IoU per class", *names], class_rows)


def linear_note(results: dict[str, list[dict[str, Any]]]) -> str:
    """Name the sources whose linear probe labels every val pixel as background (if any)."""
    collapsed = [
        source
        for source, runs in results.items()
        if any(r["linear"] is not None and qc.predicts_background_only(r["linear"]) for r in runs)
    ]
    if not collapsed:
        return ""
    return (
        f" The linear probe of {' and '.join(collapsed)} labels every val pixel as background (its mIoU is the "
        "background IoU divided by the number of classes): a linear map of these features finds no shape class."
    )


def write_report(
    args: argparse.Namespace,
    argv: Sequence[str],
    data: qc.EvalData,
    results: dict[str, Any],
    info: dict[str, Any],
    patch: int,
) -> Path:
    names = data.class_names
    shares, objects = scene_statistics(data)
    main, per_class = tables(results, names)
    s = data.settings
    raw = results["raw pixels"][0]["nn"]["miou"]
    vit = qc.summarize([r["nn"]["miou"] for r in results["random-init ViT"]]).mean
    oracle = results["label oracle"][0]["nn"]["miou"]
    share_text = ", ".join(f"{n} {100 * v:.1f} %" for n, v in zip(names, shares))
    objects_raw = qc.object_class_miou(results["raw pixels"][0]["nn"])
    objects_vit = qc.summarize([qc.object_class_miou(r["nn"]) for r in results["random-init ViT"]]).mean
    objects_oracle = qc.object_class_miou(results["label oracle"][0]["nn"])
    body = [
        f"Data: the built-in scenes (`SyntheticScenes`, seed {s.scenes_seed}), {s.train_images} train scenes as the "
        f"bank, {s.val_images} val scenes scored, {s.image_size} px, patch grid {s.input_size // patch} x "
        f"{s.input_size // patch} (patch {patch}); {objects:.1f} objects per val scene; pixel shares: {share_text}. "
        f"Retrieval: the suite's `evaluate_nn` (deterministic bank, k = {s.k}, temperature {s.temperature}); "
        f"linear: the suite's `evaluate_linear` ({s.linear_steps} steps). Random-init ViT: preset `{args.preset}`.",
        main,
        per_class,
        f"What this shows: NN mIoU of raw pixels {raw:.3f}, of a random-init ViT {vit:.3f}, of the label oracle "
        f"{oracle:.3f}. Averaged over the object classes only (background left out) the three score "
        f"{objects_raw:.3f}, {objects_vit:.3f} and {objects_oracle:.3f}: without learning, retrieval finds the "
        "background and almost none of the shape classes (colour and texture are random per instance, so only "
        f"the shape tells the class). A pretrained backbone has room between about {max(raw, vit):.2f} and "
        f"{oracle:.2f}. What it does not show: the oracle bounds retrieval at this patch resolution (its "
        "features are the true labels of each patch), not what self-supervision can reach; the linear column "
        "is the suite's probe on frozen features (the oracle needs none); all numbers hold for these scenes only."
        + linear_note(results),
        qc.noise_note(info),
    ]
    folder = qc.results_folder(args.results_dir, args.quick)
    title = "Quality: difficulty of the built-in scenes" + (" (quick smoke run)" if args.quick else "")
    return common.write_section(folder, "scenes", title, common.command_line(SCRIPT, argv), info, body)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    qc.start(args)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    data = qc.EvalData.build(eval_settings(args), args.device)
    info = common.machine_info(args.threads, args.device)
    from cribo import config as config_lib

    patch = config_lib.resolve(preset=args.preset).model.patch_size
    results = measure(args, data, seeds, patch)
    path = write_report(args, argv, data, results, info, patch)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
