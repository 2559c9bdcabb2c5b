"""How much of each defect the backbone's features can see, with no student at all.

    python -m bench.studies.feature_knn [--seed 1] [--categories tiles widget] [--image-size 96] [--raw-features] [--name cpu] [--data photos]

The backbone and its weights come from the params file (random init for ``weights: none``).

A diagnostic for the demo quality bar, on a development demo (another seed; never the embedded
default's test split). It builds the backbone exactly as training does (for ``weights: none``:
random weights from ``params.seed``, BatchNorm statistics from up to 64 train images), takes its
three feature maps for every train and test image, and scores each test location by the distance of
its L2-normalised feature to the nearest train feature at the same scale (a PatchCore-style memory
bank over all train locations). That is a strong upper reference for "is the defect different in
feature space": if a defect type stays near chance here, no decoder trained to reconstruct these
features (RD, URD) can be expected to find it either.

Maps are upsampled to the input size like the URD anomaly map (bilinear, align_corners), blurred
with the demo sigma (scaled with the input size), summed over scales after dividing each by its
median on the val normals; the
image score is the map's maximum. Writes bench/results/feature_knn_<name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.studies import dev_demo

from urd.config import deep_merge, load_params, parse_params
from urd.data.manifest import ingest_category
from urd.data.torch_data import EvalDataset, eval_loader, image_tensor, to_unit
from urd.evaluate import compute_metrics
from urd.model.anomaly_map import GaussianBlur
from urd.model.backbone import build_encoder, estimate_batchnorm_statistics

@torch.no_grad()
def features(encoder, images: torch.Tensor, unit_length: bool = True) -> list[torch.Tensor]:
    """Normalised images N x 3 x S x S -> per scale N x h x w x C (L2-normalised over C by default)."""
    out: list[list[torch.Tensor]] = [[], [], []]
    for batch in images.split(16):
        for i, f in enumerate(encoder(batch)):
            out[i].append((F.normalize(f, dim=1) if unit_length else f).permute(0, 2, 3, 1))
    return [torch.cat(o) for o in out]


@torch.no_grad()
def nearest_distance(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Euclidean distance of each query row to its nearest bank row."""
    return torch.cat([torch.cdist(q, bank).min(1).values for q in queries.split(chunk)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dev_demo.add_arguments(parser)
    parser.add_argument("--image-size", type=int, default=None, help="input size (default: params); blur sigma scales with it")
    parser.add_argument("--raw-features", action="store_true", help="Euclidean distance of the features as they are, not L2-normalised (which the cosine of RD/URD implies)")
    args = dev_demo.parse_args(parser)
    base = load_params(args.params).model_dump()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        size = args.image_size or base["dataset"]["image_size"]
        sigma = base["model"]["blur_sigma"] * size / base["dataset"]["image_size"]
        data = dev_demo.generate_data(args.data, Path(tmp) / "dev", args.seed) | {"image_size": size}
        overrides = {"dataset": data, "model": {"blur_sigma": sigma}}
        params = parse_params(deep_merge(base, overrides), source=args.params)
        for category in args.categories or params.dataset.categories:
            start = time.perf_counter()
            manifest = ingest_category(params, category, progress=False)
            train_paths = manifest.loc[manifest["split"] == "train", "path"].tolist()
            train_images = to_unit(torch.stack([image_tensor(path, size) for path in train_paths]))
            torch.manual_seed(params.seed)  # the same random weights training starts from
            encoder = build_encoder(params.model.backbone, params.model.weights).eval()
            if params.model.weights == "none":
                estimate_batchnorm_statistics(encoder, train_images[:64].split(params.train.batch_size))

            val = manifest[manifest["split"] == "val"].reset_index(drop=True)
            val_images = torch.cat([b["image"] for b in eval_loader(EvalDataset(val, size), 16)])
            test = manifest[manifest["split"] == "test"].reset_index(drop=True)
            items = list(eval_loader(EvalDataset(test, size), 16))
            test_images = torch.cat([b["image"] for b in items])
            masks = torch.cat([b["mask"] for b in items])[:, 0].numpy() > 0.5
            labels, types = test["label"].to_numpy().astype(bool), test["defect_type"].to_numpy()

            unit = not args.raw_features
            bank, query, held_out = (features(encoder, x, unit) for x in (train_images, test_images, val_images))
            blur = GaussianBlur(params.model.blur_sigma)
            scale_maps = []
            for b, q, v in zip(bank, query, held_out):
                n, h, w, c = q.shape
                d = nearest_distance(q.reshape(-1, c), b.reshape(-1, c)).reshape(n, 1, h, w)
                # a train location's own nearest distance is 0 (it is in the bank): each scale is
                # divided by the median distance of the held-out val normals instead.
                d = d / nearest_distance(v.reshape(-1, c), b.reshape(-1, c)).median()
                scale_maps.append(F.interpolate(d, size=(size, size), mode="bilinear", align_corners=True))
            variants = {f"scale {i + 1} only": m for i, m in enumerate(scale_maps)} | {"sum of scales": sum(scale_maps)}
            for name, amap in variants.items():
                maps = blur(amap)[:, 0].numpy()
                metrics = compute_metrics(labels, maps.reshape(len(maps), -1).max(1), maps, masks, types)
                row = {"category": category, "map": name} | dev_demo.summarize(metrics) | {"seconds": time.perf_counter() - start}
                rows.append(row)
                print(json.dumps(row))

    weights = "Random-init" if base["model"]["weights"] == "none" else f"{base['model']['weights']}"
    data = "photo textures" if args.data == "photos" else "development demo"
    title = (f"{weights} {base['model']['backbone']} features at {size} px{' (raw, not unit length)' if args.raw_features else ''}, "
             f"nearest train patch ({data} seed {args.seed})")
    record = {"params": args.params, "data": args.data, "weights": base["model"]["weights"], "dev_seed": args.seed, "image_size": size, "unit_length_features": not args.raw_features}
    dev_demo.write_results(rows, ("category", "map"), title, f"feature_knn_{args.name}", record)

if __name__ == "__main__":
    main()
