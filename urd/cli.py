"""`urd ...` user commands."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .config import ConfigError, load_params

app = typer.Typer(add_completion=False, no_args_is_help=True, help="URD industrial anomaly detection.")
console = Console()


@app.callback()
def _root() -> None:
    """URD industrial anomaly detection: one model per product category, trained on good parts only."""


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code=2)


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


@app.command()
def info(
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    category: str = typer.Option(None, help="category whose overrides apply (default: the first)"),
) -> None:
    """Build the model of params.yaml, run one image through it and print its shapes and sizes."""
    import torch

    from .model import URD, WeightsError

    try:
        cfg = load_params(params)
        cfg = cfg.for_category(category or cfg.dataset.categories[0])
        torch.manual_seed(cfg.seed)
        model = URD.from_params(cfg).eval()
    except (ConfigError, WeightsError, ValueError) as exc:
        _fail(str(exc))
    size = cfg.dataset.image_size
    with torch.no_grad():
        x = torch.randn(1, 3, size, size)
        teacher = model.teacher(x)
        embedding = model.student.bottleneck(teacher)
        student = model.student(teacher)
        amap, score = model(x)

    table = Table(title=f"URD {cfg.model.backbone} (weights: {cfg.model.weights}, gii: {cfg.model.gii}, expert: {cfg.model.expert})")
    table.add_column("part")
    table.add_column("parameters", justify="right")
    table.add_column("output shape")
    table.add_row("teacher T", f"{count_parameters(model.teacher):,}", ", ".join(str(tuple(f.shape[1:])) for f in teacher))
    table.add_row("expert E (training only)", f"{count_parameters(model.expert) if model.expert else 0:,}", "as teacher")
    table.add_row("bottleneck OCBE", f"{count_parameters(model.student.bottleneck):,}", str(tuple(embedding.shape[1:])))
    table.add_row("decoder S (+GII)", f"{count_parameters(model.student.decoder):,}", ", ".join(str(tuple(f.shape[1:])) for f in student))
    table.add_row("inference graph", f"{count_parameters(model.inference_graph()):,}", f"anomaly map {tuple(amap.shape)}, score {tuple(score.shape)}")
    console.print(table)
    if cfg.model.weights == "none":
        console.print("[yellow]note:[/] weights 'none' = randomly initialised backbone (demo/testing only).")


@app.command("demo-data")
def demo_data(
    root: Path = typer.Option(Path("data/raw/demo"), help="folder to write the demo dataset to (MVTec AD layout)"),
    seed: int = typer.Option(0, help="random seed: the same seed gives the same images"),
    overwrite: bool = typer.Option(False, help="replace whatever is at ROOT"),
) -> None:
    """Generate the embedded demo dataset (two categories, three defect types each, exact masks)."""
    from .data.demo import CATEGORIES, DemoSpec, generate_demo

    try:
        generate_demo(root, DemoSpec(seed=seed), overwrite=overwrite)
    except FileExistsError as exc:
        _fail(str(exc))
    listing = "; ".join(f"{category}: {', '.join(defects)}" for category, defects in CATEGORIES.items())
    console.print(f"demo dataset at {root} (defect types - {listing})")


def main() -> None:  # pragma: no cover - console entry for `python -m urd`
    app(sys.argv[1:])
