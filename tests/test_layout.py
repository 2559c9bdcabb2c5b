"""dvc.yaml against the code: the same paths as pipeline/layout.py, and code deps that are complete
and precise (a stage reruns when code it runs changes, and only then)."""

import ast
from pathlib import Path

import yaml

from pipeline.layout import GLOBAL_STAGES, STAGE_PARAMS, paths

REPO = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]

# What each stage runs (the bodies in pipeline/stages.py call these).
STAGE_MODULES = {
    "demo_data": ["urd.data.demo"],
    "textures": ["urd.data.prepare"],
    "ingest": ["urd.data.manifest"],
    "validate": ["urd.data.validation"],
    "prepare": ["urd.data.prepare"],
    "train": ["urd.train"],
    "calibrate": ["urd.calibrate", "urd.data.field"],
    "evaluate": ["urd.evaluate"],
    "package": ["urd.export", "urd.challenge", "urd.data.field", "urd.drift", "pipeline.model_card", "pipeline.registry", "pipeline.mlflow_model"],
}
# Code that cannot change what a stage computes: package markers, the params schema (its values reach
# every stage through data/params/<category>/<stage>.json), atomic file writes, progress display.
NO_EFFECT = {"urd/__init__.py", "urd/data/__init__.py", "urd/model/__init__.py", "pipeline/__init__.py",
             "urd/config.py", "urd/files.py", "urd/progress.py"}
# Of these, what they import is not followed (the schema's validators read urd/data/foreground.py).
LEAVES = {"urd/config.py", "urd/files.py", "urd/progress.py"}
# Read only on a path the default params never take (train.selection: val_score scores the val split).
NOT_TRACKED = {"train": {"urd/scoring.py"}}


def _file(module: str) -> Path | None:
    base = REPO / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """Every urd / pipeline module ``path`` imports, at the top or inside a function."""
    package = ".".join(path.relative_to(REPO).parent.parts)  # what a relative import is relative to
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in ("urd", "pipeline") and _file(m) is not None}


def _closure(modules: list[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        path = _file(todo.pop())
        rel = path.relative_to(REPO).as_posix()
        if rel in seen:
            continue
        seen.add(rel)
        if rel not in LEAVES:
            todo += sorted(_imports(path))
    return seen


def _code_deps(stage: str) -> list[str]:
    spec = DVC[stage].get("do", DVC[stage])
    return [d for d in spec.get("deps", []) if d.startswith(("urd/", "pipeline/"))]


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def test_every_stage_lists_exactly_the_code_it_runs():
    for stage, modules in STAGE_MODULES.items():
        runs = _closure(modules) - NO_EFFECT - NOT_TRACKED.get(stage, set())
        deps = _code_deps(stage)
        missing = sorted(f for f in runs if not _covered(f, deps))
        assert not missing, f"dvc.yaml stage {stage} runs {missing} but does not depend on it"
        unused = [d for d in deps if not any(_covered(f, [d]) for f in runs)]
        assert not unused, f"dvc.yaml stage {stage} depends on {unused}, which it does not run"


def test_a_docstring_in_scoring_or_the_cli_retrains_nothing():
    for stage in ("train", "prepare", "ingest", "validate"):
        deps = _code_deps(stage)
        assert not any(_covered(f, deps) for f in ("urd/scoring.py", "urd/cli.py", "pipeline/cli.py")), stage
    assert _covered("urd/scoring.py", _code_deps("calibrate")) and _covered("urd/scoring.py", _code_deps("evaluate"))


def test_dvc_yaml_writes_where_the_layout_says():
    layout = {p.as_posix() for p in paths("cat").values()}
    written = set()
    for name, stage in DVC.items():
        spec = stage.get("do", stage)
        for key in ("outs", "metrics", "plots"):
            for out in spec.get(key, []):
                path = next(iter(out)) if isinstance(out, dict) else out
                written.add(path.replace("${item}", "cat"))
    assert written - layout == {"data/raw/demo"}
    assert all(p in written or any(w.startswith(p + "/") for w in written) for p in layout)
    assert set(GLOBAL_STAGES) == {name for name, stage in DVC.items() if "foreach" not in stage}
    # every per-category stage reads its params from the file the stage_params stage writes
    for stage in STAGE_PARAMS:
        assert f"data/params/${{item}}/{stage}.json" in DVC[stage]["do"]["deps"], stage
