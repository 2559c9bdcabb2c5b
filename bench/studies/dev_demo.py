"""What the development-demo studies share: their arguments, metric rows and result tables.

A development demo is the demo generator with another seed (new images and defects from the same
distribution); settings are studied on its test split so that the embedded default's (seed 0)
stays for reporting only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.machine import RESULTS, machine

METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")
RESULTS = RESULTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--categories", nargs="*", default=None)
    parser.add_argument("--seed", type=int, default=1, help="demo seed of the development data (not 0, the embedded default)")
    parser.add_argument("--name", default="cpu")
    parser.add_argument("--data", choices=("demo", "photos"), default="demo",
                        help="demo = the demo generator with --seed; photos = crops of real photographs with made defects (bench/studies/photo_textures.py)")


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    if args.seed == 0:
        parser.error("seed 0 is the embedded default whose test split is for reporting; pick another seed")
    return args


def generate_data(kind: str, folder: Path, seed: int, train: int | None = None) -> dict:
    """Write the development data (``demo`` with another seed, or ``photos``) under ``folder`` and
    return the ``dataset`` params that point at it."""
    from bench.studies.photo_textures import SOURCES, generate_photo_textures

    from urd.data.demo import DemoSpec, generate_demo

    if kind == "photos":
        root = generate_photo_textures(folder, seed=seed, **({"train": train} if train else {}))
        return {"name": "mvtec", "root": str(root), "categories": list(SOURCES)}
    return {"root": str(generate_demo(folder, DemoSpec(seed=seed, **({"train": train} if train else {}))))}


def summarize(metrics: dict) -> dict:
    """The overall METRICS and each defect type's image / pixel AUROC of a compute_metrics result."""
    row = {k: metrics["overall"].get(k, float("nan")) for k in METRICS}
    for defect, entry in metrics["per_defect_type"].items():
        row[f"{defect}/image_auroc"] = entry["image_auroc"]
        row[f"{defect}/pixel_auroc"] = entry.get("pixel_auroc", float("nan"))
    return row


def write_results(rows: list[dict], keys: tuple[str, ...], title: str, stem: str, record: dict) -> None:
    """Print ``rows`` as a table (``keys`` first, then METRICS and per-defect I/P) and write
    bench/results/<stem>.md with the same table and <stem>.json with ``record``, the machine and the rows."""
    defects = sorted({k.split("/")[0] for r in rows for k in r if k.endswith("/image_auroc")})
    columns = ["I-AUROC", "P-AUROC", "AUPRO"] + [f"{d} I/P" for d in defects]
    table = Table(title=title)
    for col in (*keys, *columns):
        table.add_column(col, justify="right")
    lines = ["| " + " | ".join((*keys, *columns)) + " |", "|---" * (len(keys) + len(columns)) + "|"]
    for r in rows:
        cells = [str(r[k]) for k in keys] + [f"{100 * r[k]:.1f}" for k in METRICS]
        cells += [f"{100 * r[f'{d}/image_auroc']:.0f}/{100 * r[f'{d}/pixel_auroc']:.0f}" if f"{d}/image_auroc" in r else "" for d in defects]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    Console(width=160).print(table)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"machine": machine()} | record | {"rows": rows}, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / f'{stem}.json'}")
