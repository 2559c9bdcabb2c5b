"""Settings studies on a *development* demo: the demo generator with another seed, never the test split.

    python -m bench.studies.dev_study --variant base '{}' --variant it900 '{"train": {"iterations": 900}}' \
        [--categories tiles widget] [--seed 1] [--train-images 120] [--sigmas 4 1.5 0] [--name NAME] [--data photos]

The embedded default's test split (seed 0) is for reporting only. To choose demo settings without
looking at it, this script generates the same demo with another seed (new images, new defects, same
distribution), trains each variant (params.yaml + the JSON overrides) per category on it and
evaluates on *its* test split. ``--data photos`` studies crops of real photographs with made defects
instead (bench/studies/photo_textures.py), because settings chosen on the demo generator alone did not
carry over to real textures. ``--sigmas`` re-scores each trained model with other blur sigmas of
the anomaly map (a post-processing setting, so no retraining). It also reports each feature scale's
own metrics (1 - cos at that scale alone, upsampled, no blur) to show which scale finds which defect.

Writes bench/results/dev_study_<name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.studies import dev_demo

from urd.checkpoint import load_model
from urd.config import deep_merge, load_params, parse_params
from urd.data.demo import DemoSpec
from urd.data.manifest import ingest_category
from urd.data.torch_data import EvalDataset, eval_loader
from urd.evaluate import compute_metrics
from urd.model.anomaly_map import GaussianBlur
from urd.train import train_category


@torch.no_grad()
def scale_distances(graph, rows, image_size: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-scale distance maps (each N x S x S, upsampled, unblurred) and ground-truth masks of ``rows``."""
    graph.eval()
    per_scale: list[list[np.ndarray]] = [[], [], []]
    masks = []
    for batch in eval_loader(EvalDataset(rows, image_size), 16):
        teacher = graph.teacher(batch["image"])
        for i, d in enumerate(graph.anomaly_map.scale_maps(teacher, graph.student(teacher))):
            per_scale[i].append(d[:, 0].numpy())
        masks.append(batch["mask"][:, 0].numpy() > 0.5)
    return [np.concatenate(d) for d in per_scale], np.concatenate(masks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "JSON"), required=True)
    dev_demo.add_arguments(parser)
    parser.add_argument("--train-images", type=int, default=DemoSpec.train, help="good train images per category in the development demo (the test split stays the same images)")
    parser.add_argument("--sigmas", nargs="*", type=float, default=[])
    args = dev_demo.parse_args(parser)
    base = load_params(args.params).model_dump()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = dev_demo.generate_data(args.data, Path(tmp) / "dev", args.seed, args.train_images)
        for name, overrides in args.variant:
            raw = deep_merge(deep_merge(base, json.loads(overrides)), {"dataset": data})
            params = parse_params(raw, source=f"variant {name}")
            for category in args.categories or params.dataset.categories:
                manifest = ingest_category(params, category, progress=False)
                out = Path(tmp) / name / category
                torch.manual_seed(params.seed)
                summary = train_category(params, category, manifest, out, progress=True)
                graph, _ = load_model(out)
                size = params.dataset.image_size
                test = manifest[manifest["split"] == "test"].reset_index(drop=True)
                labels, types = test["label"].to_numpy().astype(bool), test["defect_type"].to_numpy()
                per_scale, masks = scale_distances(graph, test, size)
                total = torch.from_numpy(sum(per_scale))[:, None]
                common = {"variant": name, "category": category, "train_seconds": summary["seconds"],
                          "last_losses": summary["history"][-1] if summary["history"] else {}}
                for sigma in [params.model.blur_sigma, *[s for s in args.sigmas if s != params.model.blur_sigma]]:
                    with torch.no_grad():
                        maps = GaussianBlur(sigma)(total)[:, 0].numpy()
                    metrics = compute_metrics(labels, maps.reshape(len(maps), -1).max(1), maps, masks, types)
                    rows.append(common | {"map": f"sigma {sigma:g}"} | dev_demo.summarize(metrics))
                    print(json.dumps(rows[-1]))
                for i, d in enumerate(per_scale):
                    metrics = compute_metrics(labels, d.reshape(len(d), -1).max(1), d, masks, types)
                    rows.append(common | {"map": f"scale {i + 1} only"} | dev_demo.summarize(metrics))

    what = "Photo textures" if args.data == "photos" else "Development demo"
    title = f"{what} (seed {args.seed}, {args.train_images} train images); params {args.params} + overrides"
    record = {"params": args.params, "data": args.data, "dev_seed": args.seed, "train_images": args.train_images, "variants": dict(args.variant)}
    dev_demo.write_results(rows, ("variant", "category", "map"), title, f"dev_study_{args.name}", record)


if __name__ == "__main__":
    main()
