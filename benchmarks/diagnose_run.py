"""What did a short pretraining run teach its teacher? Diagnostics of one run directory (issue 13).

For the random initialisation of the run's seed and for the trained teacher (``checkpoint.pth``):

* the teacher's targets on one training batch: mean entropy of the centred, sharpened [CLS] and object
  distributions (``ln(out_dim)`` = uniform), the entropy of their batch mean (how many prototypes the batch
  uses, as ``exp`` of it) and the number of distinct most-likely prototypes;
* the backbone's object features on 64 val scenes: each ground-truth object's patch tokens are mean-pooled in
  two augmented views (the pretraining augmentation); *cross-view match* is the fraction of view-1 objects whose
  cosine nearest view-2 object (among all objects of all 64 scenes) is itself, *cross-image same class* the
  fraction whose nearest view-2 object of another scene has its class (chance: about 1 / classes).

    python benchmarks/diagnose_run.py runs/quality/ablation/<tag>/cribo-seed0
    python benchmarks/diagnose_run.py RUN --scenes class_cue=texture palette_size=4   # the scenes it trained on

Prints one JSON line per network. Importing this module has no side effects.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import quality_common as qc

VAL_SCENES = 64  # scenes of the val split whose objects are matched across views
VIEW_SEED = 1000  # augmentation seed of scene i: VIEW_SEED + i
TARGET_EPOCH = 3  # the training batch whose targets are inspected: the first of this epoch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="run directory holding config.yaml and checkpoint.pth")
    parser.add_argument("--scenes", nargs="+", default=[], metavar="NAME=VALUE", help="SyntheticScenes options")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser


def target_statistics(trainer: Any, temperatures: tuple[float, float]) -> dict[str, Any]:
    """Entropies of the teacher's [CLS] and object targets on the first batch of epoch ``TARGET_EPOCH``."""
    import torch
    import torch.nn.functional as F

    from cribo.step import split_tokens, teacher_objects

    modules = trainer.modules
    trainer.data.sampler.set_position(TARGET_EPOCH, 0)
    batch = next(iter(trainer.data.loader))
    values = trainer.values()
    images = batch.images.transpose(0, 1).flatten(0, 1)
    head, criterion = modules.teacher.head, modules.criterion
    with torch.no_grad():
        cls, patches = split_tokens(modules.teacher(images), batch.positions.shape[0])
        _, _, objects, _ = teacher_objects(
            patches, batch.positions, values.pos_alpha, trainer.settings, modules.cluster_generator
        )
        inputs = {
            "cls": (cls, head.last_layer, criterion.center.center, temperatures[0]),
            "objects": (objects.flatten(0, 1), head.last_layer_c, criterion.center_c.center, temperatures[1]),
        }
        stats: dict[str, Any] = {}
        for name, (features, layer, center, temperature) in inputs.items():
            probs = F.softmax((layer(head.bottleneck(features)) - center) / temperature, dim=-1)
            mean = probs.mean(0)
            stats[name] = {
                "rows": int(features.shape[0]),
                "entropy": round(float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()), 3),
                "entropy_of_batch_mean": round(float(-(mean * mean.clamp_min(1e-12).log()).sum()), 3),
                "uniform": round(math.log(probs.shape[-1]), 3),
                "distinct_argmax": int(probs.argmax(-1).unique().numel()),
            }
    return stats


def object_matching(backbone: Any, patch_size: int, view_size: int) -> dict[str, float]:
    """Cross-view instance matching and cross-image class agreement of mean-pooled ground-truth objects."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    import cribo.data.scenes as scenes_module
    from cribo.augment import TwoViewAugmentation
    from cribo.models import backbone_tokens

    scenes = scenes_module.SyntheticScenes("val", VAL_SCENES, image_size=96, seed=0)
    augmentation = TwoViewAugmentation(output_size=view_size, patch_size=patch_size)
    grid = view_size // patch_size
    rows: list[tuple[int, int, int, int, Any]] = []  # (scene, instance, class, view, pooled feature)
    for index in range(len(scenes)):
        scene = scenes.scene(index)
        views = augmentation(scenes[index][0], seed=VIEW_SEED + index, mask=scene.instances.astype(np.int32))
        with torch.no_grad():
            tokens = backbone_tokens(backbone.eval(), views.images)[:, 1:]  # (2, grid^2, D)
        for view in range(2):
            labels = torch.as_tensor(np.asarray(views.masks[view])).long()  # type: ignore[index]
            cells = labels.reshape(grid, patch_size, grid, patch_size).permute(0, 2, 1, 3).reshape(grid * grid, -1)
            majority = torch.mode(cells, dim=1).values
            for instance, obj in enumerate(scene.objects, start=1):
                selected = majority == instance
                if int(selected.sum()) >= 2:
                    rows.append((index, instance, obj.class_index, view, tokens[view][selected].mean(0)))
    first = [r for r in rows if r[3] == 0]
    second = [r for r in rows if r[3] == 1]
    queries = F.normalize(torch.stack([r[4] for r in first]), dim=-1)
    keys = F.normalize(torch.stack([r[4] for r in second]), dim=-1)
    similarity = queries @ keys.T
    key_of = {(r[0], r[1]): j for j, r in enumerate(second)}
    key_scene = torch.tensor([r[0] for r in second])
    key_class = torch.tensor([r[2] for r in second])
    same, found, same_class = 0, 0, 0
    for i, (scene_index, instance, class_index, _, _) in enumerate(first):
        if (scene_index, instance) in key_of:
            found += 1
            same += int(int(similarity[i].argmax()) == key_of[(scene_index, instance)])
        other = similarity[i].masked_fill(key_scene == scene_index, -2.0)
        same_class += int(int(key_class[int(other.argmax())]) == class_index)
    return {
        "objects": len(first),
        "cross_view_match": round(same / max(found, 1), 3),
        "cross_view_chance": round(1 / max(len(second), 1), 4),
        "cross_image_same_class": round(same_class / max(len(first), 1), 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    import yaml

    from cribo import checkpoint
    from cribo import config as config_lib
    from cribo.train import build_trainer

    torch.set_num_threads(args.threads)
    config = config_lib.from_dict(yaml.safe_load((args.run / "config.yaml").read_text()))
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, output_dir=str(args.run / "unused")))
    temperatures = (config.loss.teacher_temp, config.loss.teacher_temp_c)
    with qc.scene_options(qc.parse_scene_options(args.scenes)):
        trainer = build_trainer(config)
        for label in ("random init", "trained"):
            trained_step = 0
            if label == "trained":
                state = checkpoint.load(args.run / checkpoint.CHECKPOINT_NAME)
                checkpoint.load_trainer(trainer, state)
                trained_step = int(state["step"])
            trainer.epoch, trainer.step = TARGET_EPOCH, TARGET_EPOCH * trainer.iters_per_epoch
            line = {
                "network": label,
                "run": str(args.run),
                "step": trained_step,
                "targets": target_statistics(trainer, temperatures),
                "objects": object_matching(
                    trainer.modules.teacher.backbone, config.model.patch_size, config.data.image_size
                ),
            }
            print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
