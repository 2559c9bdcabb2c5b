"""dvc.yaml rerun behaviour on a tiny config, in a temporary copy of the repository."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import yaml

from urd.config import Params

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "seed": 0,
    # a random resnet18 trains in a fraction of the pretrained default's time; these tests check orchestration, not quality
    "model": {"backbone": "resnet18", "weights": "none"},
    "dataset": {"name": "demo", "root": "data/raw/demo", "categories": ["tiles", "widget"], "image_size": 64, "val_fraction": 0.2, "min_train_images": 4},
    "train": {"iterations": 2, "batch_size": 2, "checkpoint_every": 2, "num_workers": 0},
    "synthesis": {"foreground": {"widget": "otsu"}},
    "evaluate": {"gallery_size": 1},
    "package": {"formats": ["onnx"]},
}


def _write_params(path: Path) -> None:
    # DVC reads the keys a stage names from params.yaml itself, so write every key out.
    path.write_text(yaml.safe_dump(Params.model_validate(TINY).model_dump(mode="json")))


def _dvc(cwd: Path, *args: str) -> str:
    # Stage commands call `python`: the one of this environment, as with an activated venv.
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.mark.slow
def test_dvc_reruns_exactly_what_changed(tmp_path):
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for f in files + ["dvc.yaml", "pipeline/stages.py", "pipeline/cli.py", "pipeline/layout.py", "pipeline/__main__.py"]:
        if (REPO / f).is_file():
            (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, tmp_path / f)
    shutil.copytree(REPO / ".dvc", tmp_path / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"), dirs_exist_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    _write_params(tmp_path / "params.yaml")

    first = _dvc(tmp_path, "repro")
    assert {"ingest@tiles", "ingest@widget", "train@tiles", "package@widget"} <= _ran(first)
    assert (tmp_path / "metrics" / "widget.json").is_file() and (tmp_path / "bundles" / "tiles" / "model.onnx").is_file()
    assert "## Caveats" in (tmp_path / "bundles" / "widget" / "model_card.md").read_text()
    assert "image_auroc" in _dvc(tmp_path, "metrics", "show")
    _dvc(tmp_path, "plots", "show")
    assert "gallery.png" in (tmp_path / "dvc_plots" / "index.html").read_text()
    # MLflow: one run per category shared by the stages, the bundle registered as @candidate
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", registry_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    first_run = json.loads((tmp_path / "models" / "widget" / "mlflow_run.json").read_text())["run_id"]
    run = client.get_run(first_run)
    assert {"test_image_auroc", "image_threshold", "train_student"} <= set(run.data.metrics), run.data.metrics.keys()
    assert run.data.tags["dvc_data_md5"].endswith(".dir") and run.data.tags["git_commit"]
    assert client.get_model_version_by_alias("urd-demo-widget", "candidate").run_id == first_run

    assert _ran(_dvc(tmp_path, "repro")) == set()  # nothing changed -> nothing runs

    # A docstring edit in the scoring loop or the CLI retrains nothing (scoring reruns what scores).
    for name in ("urd/scoring.py", "urd/cli.py", "pipeline/cli.py"):
        source = tmp_path / name
        source.write_text(source.read_text().replace('"""', '"""Edited. ', 1))
    ran = _ran(_dvc(tmp_path, "repro"))
    assert {"calibrate@tiles", "evaluate@widget"} <= ran and not any(s.startswith(("train@", "prepare@", "ingest@")) for s in ran), ran

    image = tmp_path / "data/raw/demo/widget/train/good/000.png"
    pixels = cv2.imread(str(image))
    pixels[:8, :8] = 0
    cv2.imwrite(str(image), pixels)
    ran = _ran(_dvc(tmp_path, "repro")) - {"demo_data"}
    assert "ingest@widget" in ran and not any(s.endswith("@tiles") for s in ran)

    TINY["train"]["iterations"] = 3
    _write_params(tmp_path / "params.yaml")
    ran = _ran(_dvc(tmp_path, "repro"))
    assert {"train@tiles", "train@widget", "evaluate@tiles", "evaluate@widget"} <= ran
    assert not ran & {"ingest@tiles", "ingest@widget", "validate@tiles", "prepare@widget", "demo_data", "textures"}
    rerun = json.loads((tmp_path / "models" / "widget" / "mlflow_run.json").read_text())["run_id"]
    assert rerun != first_run and client.get_model_version_by_alias("urd-demo-widget", "candidate").run_id == rerun
