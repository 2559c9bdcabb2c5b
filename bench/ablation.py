"""Table 5 of the paper on the demo: Expert on/off x GII off/on, at the demo settings.

    python bench/ablation.py [--iterations N] [--categories tiles widget] [--image-size S]

Expert off = plain RD (frozen teacher, no synthetic anomalies); expert on = RD-E. GII off =
plain RD decoder (`none`), on = Algorithm 1 (`gii`); `--with-skip` adds the "+SC" row of Table 7.
Trains each variant per category from params.yaml (with the overrides given), evaluates on the
test split and writes bench/results/ablation_cpu.json and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine  # noqa: E402

from urd.config import load_params  # noqa: E402
from urd.data.manifest import ingest_category  # noqa: E402
from urd.evaluate import evaluate_model  # noqa: E402
from urd.train import train_category  # noqa: E402

METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_aupro")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--categories", nargs="*", default=None)
    parser.add_argument("--with-skip", action="store_true")
    args = parser.parse_args()
    base = load_params(args.params)
    if args.iterations:
        base = base.model_copy(update={"train": base.train.model_copy(update={"iterations": args.iterations, "checkpoint_every": args.iterations})})
    categories = args.categories or base.dataset.categories
    variants = [("RD", False, "none"), ("RD + GII", False, "gii"), ("RD-E", True, "none"), ("RD-E + GII (URD)", True, "gii")]
    if args.with_skip:
        variants.insert(3, ("RD-E + SC", True, "skip"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for category in categories:
            manifest = ingest_category(base, category, progress=False)
            for name, expert, gii in variants:
                model = base.model.model_copy(update={"expert": expert, "denoising": expert, "gii": gii})
                params = base.model_copy(update={"model": model})
                out = Path(tmp) / category / gii / str(expert)
                torch.manual_seed(params.seed)
                summary = train_category(params, category, manifest, out, progress=True)
                metrics = evaluate_model(out, manifest, out / "report", progress=False)["overall"]
                rows.append({"category": category, "variant": name, "expert": expert, "gii": gii, "train_seconds": summary["seconds"],
                             **{k: metrics.get(k, float("nan")) for k in METRICS}})
                print(json.dumps(rows[-1]))
    for name, *_ in variants:
        sel = [r for r in rows if r["variant"] == name]
        rows.append({"category": "mean", "variant": name, **{k: float(np.mean([r[k] for r in sel])) for k in METRICS}})

    table = Table(title=f"Ablation on the demo ({base.train.iterations} iterations, {base.model.backbone} weights={base.model.weights}, {base.dataset.image_size}px)")
    for col in ("category", "variant", "I-AUROC", "I-AP", "P-AUROC", "P-AP", "AUPRO@0.3"):
        table.add_column(col, justify="right")
    lines = ["| category | variant | I-AUROC | I-AP | P-AUROC | P-AP | AUPRO@0.3 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        values = [f"{100 * r[k]:.1f}" for k in METRICS]
        table.add_row(r["category"], r["variant"], *values)
        lines.append(f"| {r['category']} | {r['variant']} | " + " | ".join(values) + " |")
    Console(width=130).print(table)
    out = Path(__file__).resolve().parent / "results"
    (out / "ablation_cpu.json").write_text(json.dumps({"machine": machine(), "params": base.model_dump(), "rows": rows}, indent=2) + "\n")
    (out / "ablation_cpu.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'ablation_cpu.json'}")


if __name__ == "__main__":
    main()
