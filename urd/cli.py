"""`urd ...` user commands."""

from __future__ import annotations

import json
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

    from .checkpoint import build_model
    from .model import WeightsError

    try:
        cfg = load_params(params)
        cfg = cfg.for_category(category or cfg.dataset.categories[0])
        torch.manual_seed(cfg.seed)
        model = build_model(cfg).eval()
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


def _load(params: Path, category: str | None):
    try:
        cfg = load_params(params)
        category = category or cfg.dataset.categories[0]
        return cfg, category, cfg.for_category(category)
    except ConfigError as exc:
        _fail(str(exc))


def _checked_manifest(cfg, category: str, out: Path):
    """The category's manifest, read from its files now, after the data gate (Great Expectations;
    its report goes to ``out``/validation): a run never trains on a stale list or on bad data."""
    from .data.manifest import ingest_category
    from .data.validation import validate

    manifest = ingest_category(cfg, category)
    validate(manifest, cfg.for_category(category).dataset, category, out / "validation")
    return manifest


def _train_one(cfg, category: str, out: Path, resume: bool, retrain: bool) -> None:
    """Ingest + gate + the lifecycle rule (urd.train.plan_training) + training, for `train` and `run`."""
    import shutil

    from .data.images import ImageReadError
    from .data.layouts import DatasetLayoutError
    from .data.manifest import write_manifest
    from .data.validation import DataValidationError
    from .files import MODEL_WEIGHTS
    from .model import WeightsError
    from .train import plan_training, train_category

    try:
        manifest = _checked_manifest(cfg, category, out)
        plan = plan_training(cfg, category, manifest, out)
        if plan.action == "resume" and not resume:
            _fail(f"{out} holds an interrupted training run ({plan.reason}). Use --resume to continue it, or --out to train elsewhere.")
        if plan.action != "resume" and not retrain and (out / MODEL_WEIGHTS).exists():
            if plan.action == "up_to_date":
                write_manifest(manifest, out / "manifest.csv")  # the test split may have changed
                console.print(f"{plan.reason}: training skipped (--retrain trains it again, e.g. after a code change)", highlight=False)
                return
            if not resume:
                _fail(f"{out} holds a trained model ({plan.reason.split(': ', 1)[-1]}). Use `urd run` to retrain it, or --out to train elsewhere.")
        console.print(plan.reason if plan.action != "up_to_date" else f"retraining {category} (--retrain)", highlight=False)
        if plan.action != "resume":
            shutil.rmtree(out / "checkpoints", ignore_errors=True)  # a working folder of a run that cannot be continued
        write_manifest(manifest, out / "manifest.csv")
        summary = train_category(cfg, category, manifest, out, resume=plan.action == "resume")
    except typer.Exit:  # click's Exit is a RuntimeError: let _fail's own exit through
        raise
    except (DatasetLayoutError, ImageReadError, DataValidationError, WeightsError, FileExistsError, ValueError, RuntimeError) as exc:
        _fail(str(exc))
    console.print(f"trained {category}: {summary['iterations_done']} iterations in {summary['seconds']:.0f} s -> {out}")


@app.command()
def train(
    category: str = typer.Option(None, help="category to train (default: the first in params.yaml)"),
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    out: Path = typer.Option(None, help="model folder (default: models/<category>)"),
    resume: bool = typer.Option(False, help="continue the interrupted run in the model folder (with the same params and images)"),
) -> None:
    """Train one category's model: manifest -> data gate -> E-T-S training -> model folder (weights, metadata, history)."""
    cfg, category, _ = _load(params, category)
    _train_one(cfg, category, out or Path("models") / category, resume=resume, retrain=False)


@app.command()
def calibrate(
    model: Path = typer.Option(..., help="trained model folder"),
    params: Path = typer.Option(Path("params.yaml"), help="params file (calibrate section)"),
    calibration_set: Path = typer.Option(None, help="optional labelled defects in the folder layout (<root>/<category>/test/<defect>, masks/<defect>) for F1-optimal thresholds"),
) -> None:
    """Set image and pixel thresholds on the val split (+ an optional labelled calibration set)."""
    from .calibrate import calibrate_model
    from .checkpoint import ModelFileError, read_meta
    from .data.manifest import build_manifest, read_manifest

    try:
        meta = read_meta(model)
        cfg, _, p = _load(params, meta["category"])
        manifest = read_manifest(model / "manifest.csv")
        calibration_rows = build_manifest("folder", calibration_set, meta["category"], 0.0) if calibration_set else None
        result = calibrate_model(model, manifest, p.calibrate, calibration_rows)
    except (ModelFileError, ValueError, OSError) as exc:
        _fail(str(exc))
    console.print(
        f"image threshold {result['image_threshold']:.4f}, review from {result['review_threshold']:.4f}, pixel threshold {result['pixel_threshold']:.4f} "
        f"({result['method']}, {result['val_images']} val images) -> {model / 'calibration.json'}"
    )


@app.command()
def evaluate(
    model: Path = typer.Option(..., help="trained model folder"),
    params: Path = typer.Option(Path("params.yaml"), help="params file (evaluate section)"),
    out: Path = typer.Option(None, help="report folder (default: reports/<category>)"),
) -> None:
    """Score the test split: metrics (overall, per defect type), ROC/PR/PRO curves, overlay gallery."""
    from .checkpoint import ModelFileError, read_meta
    from .data.manifest import read_manifest
    from .evaluate import evaluate_model

    try:
        meta = read_meta(model)
        cfg, category, p = _load(params, meta["category"])
        out = out or Path("reports") / category
        metrics = evaluate_model(model, read_manifest(model / "manifest.csv"), out, p.evaluate.pro_fpr_limit, p.evaluate.gallery_size)
    except (ModelFileError, ValueError, OSError) as exc:
        _fail(str(exc))
    table = Table(title=f"{category}: test split")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics["overall"].items():
        table.add_row(key, f"{value:.4f}")
    console.print(table)
    console.print(f"report: {out} (metrics.json, roc.png, pr.png, pro.png, gallery.png)")


@app.command()
def predict(
    inputs: list[Path] = typer.Argument(..., help="image files and/or folders"),
    model: Path = typer.Option(..., help="trained model folder, or an exported bundle (run with ONNX Runtime)"),
    out: Path = typer.Option(Path("predictions"), help="output folder"),
    overwrite: bool = typer.Option(False, help="write into an existing output folder"),
    batch_size: int = typer.Option(8, help="images per forward pass"),
    precision: str = typer.Option(
        "auto", help="model folder: auto (bf16 where the CPU/GPU computes it natively, else fp32), fp32 or bf16; "
        "bundle: auto/fp32 or int8 (its quantised graph)",
    ),
) -> None:
    """Score images: predictions.csv/.json (score, normalised score, decision), overlays and defect masks."""
    from .checkpoint import ModelFileError
    from .inference import Predictor, expand_inputs

    if out.exists() and any(out.iterdir()) and not overwrite:
        _fail(f"{out} is not empty; pass --overwrite to write into it or choose another --out.")
    try:
        predictor = Predictor(model, precision=precision)
    except (ModelFileError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    paths = expand_inputs(inputs)
    if not paths:
        _fail(f"no images found in {', '.join(map(str, inputs))}")
    results = predictor.predict(paths, batch_size, progress=True)
    predictor.write_outputs(results, out)
    failed = [r for r in results if r.error]
    counts = {d: sum(1 for r in results if r.decision == d) for d in ("reject", "review")}
    console.print(f"{len(results) - len(failed)} images scored ({predictor.precision}), {counts['reject']} rejected, {counts['review']} for review "
                  f"-> {out / 'predictions.csv'}")
    if predictor.calibration is None:
        console.print("[yellow]note:[/] the model is not calibrated (`urd calibrate`): no decisions or masks, raw scores only.")
    for r in failed:
        console.print(f"[red]could not score[/] {r.error}", highlight=False)
    if failed:
        raise typer.Exit(code=1)


@app.command()
def export(
    model: Path = typer.Option(..., help="trained (and calibrated) model folder"),
    out: Path = typer.Option(None, help="bundle folder (default: <model>/bundle)"),
    params: Path = typer.Option(Path("params.yaml"), help="params file (package section)"),
    overwrite: bool = typer.Option(False, help="replace an existing bundle"),
) -> None:
    """Package the model as a bundle: ONNX + TorchScript graphs, weights, metadata.json and, for a
    calibrated model, its challenge set (golden samples a service checks before serving it)."""
    from .challenge import write_challenge_set
    from .checkpoint import ModelFileError, read_meta
    from .data.manifest import read_manifest
    from .drift import write_reference
    from .export import export_bundle
    from .files import CALIBRATION_FILE

    try:
        meta = read_meta(model)
        _, _, p = _load(params, meta["category"])
        out = out or model / "bundle"
        export_bundle(model, out, p.package.formats, p.package.onnx_opset, overwrite=overwrite)
        if (model / CALIBRATION_FILE).is_file() and (model / "manifest.csv").is_file():
            manifest = read_manifest(model / "manifest.csv")
            write_challenge_set(out, manifest, seed=p.seed)
            write_reference(out, manifest, dataset_root=p.dataset.root, category=meta["category"])
    except (ModelFileError, FileExistsError, ValueError) as exc:
        _fail(str(exc))
    console.print(f"bundle written to {out}")


@app.command()
def run(
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    category: list[str] = typer.Option(None, help="categories (default: all in params.yaml)"),
    models: Path = typer.Option(Path("models"), help="parent folder of the model folders"),
    reports: Path = typer.Option(Path("reports"), help="parent folder of the reports"),
    retrain: bool = typer.Option(False, help="train every category again even where its model is up to date (e.g. after a code change)"),
) -> None:
    """The whole job for one machine without DVC/MLflow, with the pipeline's rules: every category's
    images are listed afresh and pass the data gate; a category is trained when it has no model or its
    images or params changed (an interrupted run is resumed), then calibrated and evaluated. Each
    decision is printed with its reason; a summary table at the end."""
    from .evaluate import HEADLINE, headline

    try:
        cfg = load_params(params)
        names = category or cfg.dataset.categories
        for name in names:
            cfg.for_category(name)
    except ConfigError as exc:
        _fail(str(exc))
    results = {}
    for name in names:
        _train_one(cfg, name, models / name, resume=True, retrain=retrain)
        calibrate(model=models / name, params=params, calibration_set=None)
        evaluate(model=models / name, params=params, out=reports / name)
        results[name] = json.loads((reports / name / "metrics.json").read_text())
    table = Table(title="test split (thresholds calibrated on val)")
    for col in ("category", *HEADLINE, "test FPR / recall at threshold"):
        table.add_column(col, justify="right")
    for name, m in results.items():
        c = m.get("at_calibrated_threshold", {})
        table.add_row(name, *headline(m["overall"]), f"{c.get('false_positive_rate', float('nan')):.2f} / {c.get('recall', float('nan')):.2f}")
    console.print(table)
    console.print(f"models: {models}/<category>, reports (metrics.json, curves, gallery.png): {reports}/<category>")


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


def _bundle_args(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        category, sep, folder = item.partition("=")
        if not sep or not category or not folder:
            raise ValueError(f"--bundle {item!r}: write it as CATEGORY=FOLDER (e.g. --bundle widget=bundles/widget)")
        out[category] = Path(folder)
    return out


@app.command()
def serve(
    params: Path = typer.Option(Path("params.yaml"), help="params file (dataset.categories, serve section)"),
    category: list[str] = typer.Option(None, help="categories to serve (default: all in params.yaml)"),
    bundle: list[str] = typer.Option(None, help="CATEGORY=FOLDER: serve this bundle folder instead of the registry (registry-free install)"),
    alias: str = typer.Option(None, help="registry alias to serve (default serve.alias: production; candidate for trials)"),
    host: str = typer.Option(None, help="interface (default serve.host: 127.0.0.1)"),
    port: int = typer.Option(None, help="port (default serve.port)"),
    ledger: str = typer.Option(None, help="ledger URL (default serve.ledger: SQLite in WAL mode); postgresql+psycopg://... for replicas"),
    precision: str = typer.Option("fp32", help="fp32, or int8 for bundles packaged with package.quantize: int8"),
) -> None:
    """The inspection service: every category's model on HTTP, every decision in the ledger, a review page."""
    import logging

    import uvicorn

    from .runtime import ThreadBudget
    from .service.app import ServiceConfig, create_app
    from .service.models import BundleSource, RegistrySource
    from .service.security import TokenError

    try:
        cfg = load_params(params)
        overrides = {k: v for k, v in {"alias": alias, "host": host, "port": port, "ledger": ledger}.items() if v is not None}
        s = cfg.serve.model_copy(update=overrides)
        categories = category or cfg.dataset.categories
        bundles = _bundle_args(bundle or [])
        if bundles:
            missing = sorted(set(categories) - set(bundles))
            if category is None:
                categories = list(bundles)
            elif missing:
                raise ValueError(f"no --bundle for {missing}; give one per served category or serve from the registry")
            source = BundleSource(bundles)
        else:
            source = RegistrySource(cfg.dataset.name, s.alias, Path(s.image_store).parent / ".serve-cache")
        if precision not in ("fp32", "int8"):
            raise ValueError(f"--precision {precision!r}: use fp32 or int8")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        app_ = create_app(ServiceConfig(categories, source, s, precision))
    except (ConfigError, ValueError, TokenError, OSError) as exc:
        _fail(str(exc))
    # ORT sessions take their thread count when they are created: the host's budget (train.threads or
    # URD_THREADS, else this job's share of the cores), set once here
    with ThreadBudget(cfg.train.threads) as budget:
        console.print(f"serving {', '.join(categories)} on http://{s.host}:{s.port} with {budget.current} threads "
                      f"(ledger {s.ledger}, review page /review)")
        uvicorn.run(app_, host=s.host, port=s.port, log_level="info", limit_concurrency=s.queue_size * len(categories) + 32,
                    timeout_graceful_shutdown=10)


@app.command()
def inspect(
    inputs: list[Path] = typer.Argument(..., help="image files or folders"),
    server: str = typer.Option(..., help="service URL, e.g. http://127.0.0.1:8600"),
    category: str = typer.Option(..., help="category of the parts"),
    token: str = typer.Option(None, help="line token (default: $URD_TOKEN)"),
    line: str = typer.Option(None, help="production line"),
    camera: str = typer.Option(None, help="camera"),
    out: Path = typer.Option(Path("inspections.csv"), help="results table"),
) -> None:
    """Send images to a running service; write its decisions as a CSV (path, id, decision, score, ...)."""
    from .inference import expand_inputs
    from .service.client import InspectClient, inspect_files, token_from_env

    try:
        client = InspectClient(server, category, token_from_env(token), line, camera)
    except ValueError as exc:
        _fail(str(exc))
    paths = expand_inputs(inputs)
    if not paths:
        _fail(f"no images in {[str(i) for i in inputs]}")
    try:
        frame = inspect_files(client, paths, out)
    finally:
        client.close()
    counts = frame["decision"].value_counts().to_dict()
    failed = frame[frame["error"].fillna("") != ""]
    console.print(f"{len(frame) - len(failed)} inspected ({', '.join(f'{k}: {v}' for k, v in counts.items() if k)}) -> {out}")
    for _, r in failed.iterrows():
        console.print(f"[red]not inspected[/] {r['path']}: {r['error']}", highlight=False)
    if len(failed):
        raise typer.Exit(code=1)


@app.command()
def watch(
    folder: Path = typer.Argument(..., help="the camera's drop folder"),
    server: str = typer.Option(..., help="service URL"),
    category: str = typer.Option(..., help="category of the parts"),
    token: str = typer.Option(None, help="line token (default: $URD_TOKEN)"),
    line: str = typer.Option(None, help="production line"),
    camera: str = typer.Option(None, help="camera"),
    interval: float = typer.Option(1.0, help="seconds between looks at the folder"),
) -> None:
    """Inspect every new image dropped in FOLDER once; move it to done/ or failed/ with the answer beside it."""
    from .service.client import InspectClient, token_from_env, watch as watch_folder

    try:
        client = InspectClient(server, category, token_from_env(token), line, camera)
        console.print(f"watching {folder} for {category} -> {server} (Ctrl-C stops; a restart carries on where it left off)")
        watch_folder(client, folder, interval, log=console.print)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        pass


def main() -> None:  # pragma: no cover - console entry for `python -m urd`
    app(sys.argv[1:])
