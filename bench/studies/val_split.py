"""What holding out a val split costs: the defaults trained on all of train/good (as the authors'
release does) against 80% of it (dataset.val_fraction: 0.2, this project's protocol: the rest sets
the thresholds), on the embedded demo, over training seeds.

    python -m bench.studies.val_split [--fractions 0.0 0.2] [--seeds 0 1] [--categories tiles widget]

The test split is the same in every run (val images come from train/good only); it is reported,
never used to choose. Writes bench/results/val_split_<name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.machine import RESULTS, machine

from urd.config import load_params
from urd.data.demo import DemoSpec, generate_demo
from urd.data.manifest import build_manifest
from urd.evaluate import evaluate_model
from urd.train import train_category

METRICS = {"I-AUROC": "image_auroc", "P-AUROC": "pixel_auroc", "AUPRO": "pixel_aupro"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--fractions", nargs="*", type=float, default=[0.0, 0.2])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    parser.add_argument("--categories", nargs="*", default=None)
    parser.add_argument("--name", default="cpu")
    args = parser.parse_args()
    base = load_params(args.params)
    if base.dataset.name == "demo":
        generate_demo(base.dataset.root, DemoSpec(seed=base.seed))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for category in args.categories or base.dataset.categories:
            p = base.for_category(category)
            for fraction in args.fractions:
                manifest = build_manifest(p.dataset.name, p.dataset.root, category, fraction, progress=False)
                for seed in args.seeds:
                    out = Path(tmp) / category / f"{fraction}-{seed}"
                    summary = train_category(base.model_copy(update={"seed": seed}), category, manifest, out, progress=False)
                    overall = evaluate_model(out, manifest, out / "report", progress=False)["overall"]
                    rows.append({"category": category, "val_fraction": fraction, "seed": seed, "train_images": summary["train_images"],
                                 "train_seconds": summary["seconds"], **{k: overall[v] for k, v in METRICS.items()}})
                    print(json.dumps(rows[-1]), flush=True)

    table = Table(title=f"Training on all of train/good vs holding out a val split (demo, seeds {args.seeds})")
    for col in ("category", "val_fraction", "train images", *METRICS):
        table.add_column(col, justify="right")
    lines = ["| category | val_fraction | train images | " + " | ".join(f"{m} (mean ± sd over seeds)" for m in METRICS) + " |",
             "|---|---|---|---|---|---|"]
    summary_rows = []
    for category in dict.fromkeys(r["category"] for r in rows):
        for fraction in args.fractions:
            sel = [r for r in rows if r["category"] == category and r["val_fraction"] == fraction]
            stats = {k: (float(np.mean([r[k] for r in sel])), float(np.std([r[k] for r in sel], ddof=1)) if len(sel) > 1 else float("nan"))
                     for k in METRICS}
            summary_rows.append({"category": category, "val_fraction": fraction, "train_images": sel[0]["train_images"], **stats})
            cells = [f"{100 * stats[k][0]:.1f} ± {100 * stats[k][1]:.1f}" for k in METRICS]
            table.add_row(category, f"{fraction:.1f}", str(sel[0]["train_images"]), *cells)
            lines.append(f"| {category} | {fraction:.1f} | {sel[0]['train_images']} | " + " | ".join(cells) + " |")
    Console(width=140).print(table)
    record = {"machine": machine(), "params": base.model_dump(), "fractions": args.fractions, "seeds": args.seeds, "rows": rows,
              "summary": summary_rows}
    (RESULTS / f"val_split_{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / f"val_split_{args.name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / f'val_split_{args.name}.json'}")


if __name__ == "__main__":
    main()
