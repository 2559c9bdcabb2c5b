"""The model along one training run, on a *development* demo: do more iterations or a val-only
checkpoint choice reach better test metrics?

    python -m bench.studies.dev_trajectory [--categories tiles] [--iterations 600] [--every 50] [--seed 1]

Trains params.yaml's settings (with ``--iterations``) per category on the demo generated with
another seed than the embedded default (never its test split), and at every ``--every`` iterations
scores that demo's test split and two signals that a val-only model selection could use:

* ``val_mean``: the mean image score of the val normals (``train.selection: val_score`` keeps the
  checkpoint where it is lowest);
* ``syn_*``: image AUROC, pixel AUROC and AUPRO of the model on synthetic anomalies pasted onto
  the val normals (the training synthesis with a fixed seed of its own), against those normals.

It prints the table and the Spearman rank correlation of each val signal with each test metric over
the checkpoints, and writes bench/results/dev_trajectory_<name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr

from bench.studies import dev_demo
from bench.machine import RESULTS, machine

from urd.config import deep_merge, load_params, parse_params
from urd.data.demo import DemoSpec, generate_demo
from urd.data.foreground import method_for
from urd.data.manifest import ingest_category
from urd.data.prepare import compute_foreground
from urd.data.synthesis import AnomalySynthesizer
from urd.data.textures import texture_cache
from urd.data.torch_data import image_tensor, to_unit
from urd.evaluate import compute_metrics
from urd.metrics import image_metrics, pixel_metrics
from urd.scoring import score_images
from urd.train import train_category

TEST = {"I": "image_auroc", "P": "pixel_auroc", "PRO": "pixel_aupro"}
SIGNALS = ("val_mean", "syn_I", "syn_P", "syn_PRO")
SYNTHESIS_SEED = 12345  # not the training synthesis seed (params.seed)


def synthetic_val(params, category: str, val_paths: list[str]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Val normals and synthetic anomalies on them: (normal, anomalous) normalised N x 3 x S x S, masks N x S x S."""
    size = params.dataset.image_size
    foreground = compute_foreground(val_paths, size, method_for(category, params.synthesis.foreground, params.dataset.name), progress=False)
    textures, _ = texture_cache(size, params.synthesis.dtd_root or None, seed=params.seed, progress=False)
    synth = AnomalySynthesizer(params.synthesis, torch.from_numpy(textures).permute(0, 3, 1, 2).contiguous(), seed=SYNTHESIS_SEED)
    images = torch.stack([image_tensor(p, size) for p in val_paths]).float() / 255
    anomalous, masks = synth(images, torch.from_numpy(foreground)[:, None])
    return to_unit(images), to_unit(anomalous), masks[:, 0].numpy() > 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dev_demo.add_arguments(parser)
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--every", type=int, default=50)
    args = dev_demo.parse_args(parser)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_demo(Path(tmp) / "dev", DemoSpec(seed=args.seed))
        raw = deep_merge(load_params(args.params).model_dump(), {
            "dataset": {"root": str(root)},
            "train": {"iterations": args.iterations, "checkpoint_every": args.every, "selection": "last"},
        })
        params = parse_params(raw, source="dev trajectory")
        for category in args.categories or params.dataset.categories:
            p = params.for_category(category)
            size = p.dataset.image_size
            manifest = ingest_category(p, category, progress=False)
            test = manifest[manifest["split"] == "test"].reset_index(drop=True)
            val = manifest[manifest["split"] == "val"].reset_index(drop=True)
            labels, types = test["label"].to_numpy().astype(bool), test["defect_type"].to_numpy()
            val_normal, val_anomalous, val_masks = synthetic_val(p, category, val["path"].tolist())
            syn_labels = np.r_[np.zeros(len(val)), np.ones(len(val))].astype(bool)
            syn_masks = np.concatenate([np.zeros_like(val_masks), val_masks])

            @torch.no_grad()
            def look(iteration: int, model) -> None:
                graph = model.inference_graph()
                maps, scores, masks = score_images(graph, test, size, torch.device("cpu"), 16)
                metrics = compute_metrics(labels, scores, maps, masks, types)
                _, val_scores, _ = score_images(graph, val, size, torch.device("cpu"), 16)
                (map_n, score_n), (map_a, score_a) = graph(val_normal), graph(val_anomalous)
                syn = pixel_metrics(torch.cat([map_n, map_a])[:, 0].numpy(), syn_masks, p.evaluate.pro_fpr_limit)
                row = {"category": category, "iteration": iteration,
                       **{k: metrics["overall"][v] for k, v in TEST.items()},
                       **{f"{d}/{k}": e.get(v, float("nan")) for d, e in metrics["per_defect_type"].items() for k, v in TEST.items() if k != "PRO"},
                       "val_mean": float(val_scores.mean()),
                       "syn_I": image_metrics(syn_labels, torch.cat([score_n, score_a]).numpy())["image_auroc"],
                       "syn_P": syn["pixel_auroc"], "syn_PRO": syn["pixel_aupro"]}
                rows.append(row)
                print(json.dumps(row), flush=True)

            torch.manual_seed(p.seed)
            train_category(p, category, manifest, Path(tmp) / category, progress=True, on_checkpoint=look)

    correlations = []
    for category in sorted({r["category"] for r in rows}):
        sel = [r for r in rows if r["category"] == category]
        for signal in SIGNALS:
            entry = {"category": category, "signal": signal}
            for k in TEST:
                entry[k] = float(spearmanr([r[signal] for r in sel], [r[k] for r in sel])[0])
            correlations.append(entry)

    defects = sorted({k.split("/")[0] for r in rows for k in r if k.endswith("/I")})
    columns = [*TEST, *SIGNALS, *[f"{d} I/P" for d in defects]]
    table = Table(title=f"Along one run on the development demo (seed {args.seed}); params {args.params}")
    for col in ("category", "iteration", *columns):
        table.add_column(col, justify="right")
    lines = ["| category | iteration | " + " | ".join(columns) + " |", "|---" * (2 + len(columns)) + "|"]
    for r in rows:
        cells = [f"{100 * r[k]:.1f}" for k in TEST] + [f"{r['val_mean']:.3f}"] + [f"{100 * r[k]:.1f}" for k in SIGNALS[1:]]
        cells += [f"{100 * r[f'{d}/I']:.0f}/{100 * r[f'{d}/P']:.0f}" if f"{d}/I" in r else "" for d in defects]
        table.add_row(r["category"], str(r["iteration"]), *cells)
        lines.append(f"| {r['category']} | {r['iteration']} | " + " | ".join(cells) + " |")
    Console(width=180).print(table)
    lines += ["", "Spearman rank correlation over the checkpoints (val-only signal vs test metric):", "",
              "| category | signal | I | P | PRO |", "|---|---|---|---|---|"]
    lines += [f"| {c['category']} | {c['signal']} | " + " | ".join(f"{c[k]:+.2f}" for k in TEST) + " |" for c in correlations]
    print("\n".join(lines[-len(correlations) - 2:]))
    out = RESULTS
    record = {"machine": machine(), "params": args.params, "dev_seed": args.seed, "iterations": args.iterations,
              "every": args.every, "rows": rows, "correlations": correlations}
    (out / f"dev_trajectory_{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / f"dev_trajectory_{args.name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / f'dev_trajectory_{args.name}.json'}")


if __name__ == "__main__":
    main()
