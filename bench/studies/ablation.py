"""Table 5 of the paper on the demo: Expert on/off x GII off/on, at the demo settings, over seeds.

    python -m bench.studies.ablation [--iterations N] [--categories tiles widget] [--seeds 0 1] [--name lite0]

Expert off = plain RD (frozen teacher, no synthetic anomalies); expert on = RD-E. GII off =
plain RD decoder (`none`), on = Algorithm 1 (`gii`); `--with-skip` adds the "+SC" row of Table 7.
The row "RD + GII + synthetic anomalies" is expert off with the student still trained on synthetic
anomalies (`model.denoising`), the demo default. Everything else (backbone, weights,
teacher_batchnorm, size, iterations) comes from params.yaml. Trains each variant per category and
seed, evaluates on the embedded demo's test split (a report: no setting is chosen from it) and
writes bench/results/ablation_<name>.json and .md with the mean and standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.machine import RESULTS, machine

from urd.config import load_params
from urd.data.manifest import ingest_category
from urd.evaluate import evaluate_model
from urd.train import train_category

METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_aupro")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--categories", nargs="*", default=None)
    parser.add_argument("--with-skip", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="training seeds (default: params.seed)")
    parser.add_argument("--name", default="cpu")
    args = parser.parse_args()
    base = load_params(args.params)
    if args.iterations:
        base = base.model_copy(update={"train": base.train.model_copy(update={"iterations": args.iterations, "checkpoint_every": args.iterations})})
    categories = args.categories or base.dataset.categories
    # (name, expert, denoising, gii)
    variants = [("RD", False, False, "none"), ("RD + GII", False, False, "gii"), ("RD + GII + synthetic anomalies", False, True, "gii"),
                ("RD-E", True, True, "none"), ("RD-E + GII (URD)", True, True, "gii")]
    if args.with_skip:
        variants.insert(4, ("RD-E + SC", True, True, "skip"))
    seeds = args.seeds or [base.seed]
    rows: list[dict] = []
    manifests = {category: ingest_category(base, category, progress=False) for category in categories}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:  # seed by seed, so that an interrupted study still has whole seeds
            for category in categories:
                for name, expert, denoising, gii in variants:
                    model = base.model.model_copy(update={"expert": expert, "denoising": denoising, "gii": gii})
                    params = base.model_copy(update={"model": model, "seed": seed})
                    out = Path(tmp) / category / str(seed) / name.replace(" ", "_")
                    torch.manual_seed(seed)
                    summary = train_category(params, category, manifests[category], out, progress=True)
                    metrics = evaluate_model(out, manifests[category], out / "report", progress=False)["overall"]
                    rows.append({"category": category, "variant": name, "seed": seed, "expert": expert, "denoising": denoising, "gii": gii,
                                 "train_seconds": summary["seconds"], **{k: metrics.get(k, float("nan")) for k in METRICS}})
                    print(json.dumps(rows[-1]))
                    write_results(rows, base, categories, variants, args.name)


def write_results(rows: list[dict], base, categories: list[str], variants: list[tuple], name: str) -> None:
    """The table so far (seeds with every run done), written after each run."""
    seeds = sorted({r["seed"] for r in rows})
    complete = [s for s in seeds if sum(r["seed"] == s for r in rows) == len(categories) * len(variants)]
    summary_rows = []
    for category in [*categories, "mean"]:
        for variant, *_ in variants:
            sel = [r for r in rows if r["variant"] == variant and r["seed"] in complete and (category == "mean" or r["category"] == category)]
            if not sel:
                continue
            if category == "mean":  # per seed, the mean over categories; then mean and sd over seeds
                sel = [{k: float(np.mean([r[k] for r in sel if r["seed"] == s])) for k in METRICS} for s in complete]
            summary_rows.append({"category": category, "variant": variant}
                                | {k: float(np.mean([r[k] for r in sel])) for k in METRICS}
                                | {f"{k}_sd": float(np.std([r[k] for r in sel], ddof=1)) if len(sel) > 1 else 0.0 for k in METRICS})
    title = (f"Ablation on the demo ({base.train.iterations} iterations, {base.model.backbone} weights={base.model.weights}, "
             f"teacher_batchnorm={base.model.teacher_batchnorm}, {base.dataset.image_size}px, seeds {complete}; mean ± sd over seeds)")
    lines = [title, "", "| category | variant | I-AUROC | I-AP | P-AUROC | P-AP | AUPRO@0.3 |", "|---|---|---|---|---|---|---|"]
    for r in summary_rows:
        values = [f"{100 * r[k]:.1f} ± {100 * r[k + '_sd']:.1f}" if len(complete) > 1 else f"{100 * r[k]:.1f}" for k in METRICS]
        lines.append(f"| {r['category']} | {r['variant']} | " + " | ".join(values) + " |")
    print("\n".join(lines))
    out = RESULTS
    record = {"machine": machine(), "params": base.model_dump(), "complete_seeds": complete, "rows": rows, "summary": summary_rows}
    (out / f"ablation_{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / f"ablation_{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
