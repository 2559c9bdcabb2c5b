"""``python -m pipeline harvest --category c``: the category's reviewed inspections from the ledger
(``serve.ledger``, images from ``serve.image_store``) into its data (urd.service.harvest), then the
changed folders versioned with DVC so `dvc status` and the retrain flow see that this category, and
only it, changed:

* a dataset root that is a stage's output (the generated demo) -> ``dvc commit`` of that output;
* a dataset root with a ``<root>.dvc`` pointer (real data, ``dvc add``) -> ``dvc add`` again;
* the field set folder -> ``dvc add`` (its own pointer per category).

The harvest is recorded in the ledger before the versioning: a failed DVC call is reported and the
next harvest (or a plain `dvc add` / `dvc commit`) versions the files then.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import yaml

from urd.config import Params
from urd.data.field import field_set_folder
from urd.service.harvest import HarvestResult, harvest
from urd.service.ledger import Ledger, ledger_url
from urd.service.store import ImageStore

from .workspace import dvc


def _stage_output(root: Path, target: Path) -> str | None:
    """The dvc.yaml stage whose output ``target`` is (None if none)."""
    file = root / "dvc.yaml"
    if not file.is_file():
        return None
    stages = yaml.safe_load(file.read_text()).get("stages", {})
    for name, stage in stages.items():
        for out in stage.get("outs", []):
            path = next(iter(out)) if isinstance(out, dict) else out
            if Path(path) == target:
                return name
    return None


def version_harvest(root: Path, dataset_root: Path, result: HarvestResult, log: Callable[[str], None] = print) -> list[str]:
    """Make DVC record the folders a harvest changed; returns what was done, one line each."""
    done = []
    if not (root / ".dvc").is_dir():
        return [f"{root} is not a DVC repository: the harvested files are not versioned"]
    relative = dataset_root.resolve().relative_to(root.resolve()) if dataset_root.resolve().is_relative_to(root.resolve()) else None
    if relative is None:
        done.append(f"the dataset root {dataset_root} is outside the checkout: version it where it lives")
    elif (stage := _stage_output(root, relative)) is not None:
        dvc(root, "commit", "--force", stage, log=log)
        done.append(f"dvc commit {stage} ({relative})")
    elif (root / f"{relative}.dvc").is_file():
        dvc(root, "add", str(relative), log=log)
        done.append(f"dvc add {relative} (commit {relative}.dvc with git)")
    else:
        done.append(f"{relative} is not tracked by DVC: `dvc add {relative}` to version it")
    for folder in result.folders[1:]:  # the field set
        field = folder.resolve().relative_to(root.resolve())
        dvc(root, "add", str(field), log=log)
        done.append(f"dvc add {field} (commit {field}.dvc with git)")
    return done


def harvest_category(params: Params, category: str, root: str | Path = ".", log: Callable[[str], None] = print) -> dict[str, Any]:
    root = Path(root)
    p = params.for_category(category)
    ledger = Ledger(ledger_url(p.serve.ledger, root))
    try:
        ledger.upgrade()
        store = ImageStore(root / p.serve.image_store, p.serve.retention_days)
        dataset_root = root / p.dataset.root
        result = harvest(ledger, store, p.dataset.name, dataset_root, category, root / p.harvest.field_root)
    finally:
        ledger.engine.dispose()
    if result.harvest_id is None:
        log(f"{category}: no reviewed inspections to harvest")
        return result.as_dict() | {"versioned": []}
    log(f"{category}: harvest {result.harvest_id}: {result.good} confirmed-good parts -> training data, {result.defect} confirmed defects -> "
        f"field set {field_set_folder(root / p.harvest.field_root, p.dataset.name, category)}"
        + (f", {result.missing} no longer stored" if result.missing else ""))
    versioned = version_harvest(root, dataset_root, result, log)
    for line in versioned:
        log(f"  {line}")
    return result.as_dict() | {"versioned": versioned}


def run(params: Params, category: str) -> None:
    print(json.dumps(harvest_category(params, category), indent=2))
