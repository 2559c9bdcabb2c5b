"""bench/ is a package that imports urd like any user: every module imports, none edits sys.path or
reaches for a private name of the library, and bench/results/INDEX.md lists every result file."""

import ast
import importlib
import pkgutil
from pathlib import Path

import bench
from bench import index

BENCH = Path(bench.__file__).resolve().parent


def _modules():
    for package, folder in (("bench", BENCH), ("bench.studies", BENCH / "studies")):
        for info in pkgutil.iter_modules([str(folder)]):
            if not info.ispkg:
                yield f"{package}.{info.name}", folder / f"{info.name}.py"


def test_every_bench_module_imports_without_path_tricks_or_private_names():
    names = []
    for name, path in _modules():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "insert" and ast.unparse(node.value) == "sys.path":
                raise AssertionError(f"{path} edits sys.path")
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("urd", "pipeline"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path} imports private {private} from {node.module}"
        importlib.import_module(name)
        names.append(name)
    assert "bench.quality_bar" in names and "bench.studies.dev_study" in names


def test_the_results_index_is_current():
    written = (BENCH / "results" / "INDEX.md").read_text()
    assert written == index.build(), "bench/results/INDEX.md is stale: run python -m bench.index"
    listed = {line.split(" | ")[0].lstrip("| ") for line in written.splitlines() if line.startswith("| ") and not line.startswith("| file")}
    assert listed == {p.name for p in (BENCH / "results").iterdir() if p.name != "INDEX.md"}
    assert "| ? |" not in written  # every file has the script that wrote it
