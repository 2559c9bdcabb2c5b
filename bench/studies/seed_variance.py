"""How much a retrain moves the demo's numbers: the defaults trained with several seeds.

    python -m bench.studies.seed_variance [--seeds 0 1 2] [--categories tiles widget]

The data stays the embedded default (the demo generated with seed 0, its test split for reporting);
only the training seed changes (weight init, synthetic anomalies, batch order). Nothing is selected
here: every seed is reported, with the mean and standard deviation, so that one run's numbers can be
read against the spread of retrains. Writes bench/results/seed_variance_<name>.json and .md.
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
from urd.data.manifest import ingest_category
from urd.evaluate import evaluate_model
from urd.train import train_category

METRICS = {"I-AUROC": "image_auroc", "P-AUROC": "pixel_auroc", "AUPRO": "pixel_aupro"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--categories", nargs="*", default=None)
    parser.add_argument("--name", default="cpu")
    args = parser.parse_args()
    base = load_params(args.params)
    if base.dataset.name == "demo":
        generate_demo(base.dataset.root, DemoSpec(seed=base.seed))  # the embedded default, whatever the training seed
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for category in args.categories or base.dataset.categories:
            manifest = ingest_category(base, category, progress=False)
            for seed in args.seeds:
                params = base.model_copy(update={"seed": seed})
                out = Path(tmp) / category / str(seed)
                summary = train_category(params, category, manifest, out, progress=True)
                metrics = evaluate_model(out, manifest, out / "report", progress=False)
                overall = metrics["overall"]
                rows.append({"category": category, "seed": seed, "train_seconds": summary["seconds"],
                             **{k: overall[v] for k, v in METRICS.items()},
                             "ci": [overall["image_auroc_ci_low"], overall["image_auroc_ci_high"]],
                             "per_defect_type": {d: [e["image_auroc"], e.get("pixel_auroc", float("nan"))]
                                                 for d, e in metrics["per_defect_type"].items()}})
                print(json.dumps(rows[-1]), flush=True)

    summary_rows = []
    for category in sorted({r["category"] for r in rows}):
        sel = [r for r in rows if r["category"] == category]
        summary_rows.append({"category": category, **{k: (float(np.mean([r[k] for r in sel])), float(np.std([r[k] for r in sel], ddof=1)) if len(sel) > 1 else float("nan")) for k in METRICS}})

    table = Table(title=f"Retrains of the defaults on the embedded demo ({args.params}; seeds {args.seeds})")
    for col in ("category", "seed", *METRICS, "per defect type I/P"):
        table.add_column(col, justify="right")
    lines = ["| category | seed | " + " | ".join(METRICS) + " | per defect type, image / pixel AUROC |", "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{100 * r['I-AUROC']:.1f} [{100 * r['ci'][0]:.0f}-{100 * r['ci'][1]:.0f}]"] + [f"{100 * r[k]:.1f}" for k in list(METRICS)[1:]]
        defects = ", ".join(f"{d} {100 * i:.0f}/{100 * p:.0f}" for d, (i, p) in r["per_defect_type"].items())
        table.add_row(r["category"], str(r["seed"]), *cells, defects)
        lines.append(f"| {r['category']} | {r['seed']} | " + " | ".join(cells) + f" | {defects} |")
    for s in summary_rows:
        cells = [f"{100 * s[k][0]:.1f} ± {100 * s[k][1]:.1f}" for k in METRICS]
        table.add_row(s["category"], "mean ± sd", *cells, "")
        lines.append(f"| {s['category']} | mean ± sd | " + " | ".join(cells) + " | |")
    Console(width=160).print(table)
    out = RESULTS
    record = {"machine": machine(), "params": base.model_dump(), "seeds": args.seeds, "rows": rows, "summary": summary_rows}
    (out / f"seed_variance_{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / f"seed_variance_{args.name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / f'seed_variance_{args.name}.json'}")


if __name__ == "__main__":
    main()
