"""The quality bar of the embedded default, every number with a bootstrap interval.

    python -m bench.quality_bar --run-dir DIR [--resamples 1000] [--pixel-resamples 200]

DIR is a repository copy in which `dvc repro` (or `make demo`) ran, e.g. the folder
`python -m bench.pipeline_repro --keep DIR` leaves. Each category's packaged bundle scores its
test split (the reported split; nothing is chosen from it), and image AUROC, pixel AUROC and AUPRO
get 95% percentile-bootstrap intervals with *images* resampled (a defect image brings all its
pixels, as in the image-level interval of the reports). The pixel metrics are costly per resample,
so they get fewer resamples. Writes bench/results/quality_bar_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.machine import RESULTS, machine
from bench.int8_bundle import run_manifest

from urd.config import load_params
from urd.inference import Predictor
from urd.metrics import image_metrics, pixel_metrics

BAR = {"image_auroc": 0.95, "pixel_auroc": 0.97, "pixel_aupro": 0.90}


def interval(values: list[float]) -> tuple[float, float]:
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--pixel-resamples", type=int, default=200)
    args = parser.parse_args()
    params = load_params(args.run_dir / "params.yaml")
    rows = []
    for category in params.dataset.categories:
        manifest = run_manifest(args.run_dir, category)
        test = manifest[manifest["split"] == "test"].reset_index(drop=True)
        maps, scores, masks = Predictor(args.run_dir / "bundles" / category).score_rows(test)
        labels = test["label"].to_numpy().astype(bool)
        point = {"image_auroc": image_metrics(labels, scores)["image_auroc"], **pixel_metrics(maps, masks)}
        rng = np.random.default_rng(0)
        draws: dict[str, list[float]] = {k: [] for k in BAR}
        for i in tqdm(range(args.resamples), desc=f"bootstrap {category}", unit="draw"):
            idx = rng.integers(0, len(test), len(test))
            if labels[idx].all() or not labels[idx].any():
                continue
            draws["image_auroc"].append(image_metrics(labels[idx], scores[idx])["image_auroc"])
            if i < args.pixel_resamples:
                pixel = pixel_metrics(maps[idx], masks[idx])
                draws["pixel_auroc"].append(pixel["pixel_auroc"])
                draws["pixel_aupro"].append(pixel["pixel_aupro"])
        row = {"category": category, "test_images": len(test)}
        for key, bar in BAR.items():
            low, high = interval(draws[key])
            row |= {key: float(point[key]), f"{key}_low": low, f"{key}_high": high, f"{key}_bar": bar, f"{key}_passes": bool(point[key] >= bar)}
        rows.append(row)
        print(json.dumps(row))
    lines = ["| category | image AUROC (bar 0.95) | pixel AUROC (bar 0.97) | AUPRO@0.3 (bar 0.90) |", "|---|---|---|---|"]
    for r in rows:
        cells = [f"{100 * r[k]:.1f} [{100 * r[k + '_low']:.1f}, {100 * r[k + '_high']:.1f}]{'' if r[k + '_passes'] else ' (below)'}" for k in BAR]
        lines.append(f"| {r['category']} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    out = RESULTS
    record = {"machine": machine(), "run_dir_params": params.model_dump(), "resamples": args.resamples, "pixel_resamples": args.pixel_resamples, "rows": rows}
    (out / "quality_bar_cpu.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "quality_bar_cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
