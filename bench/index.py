"""Write bench/results/INDEX.md: for every result file, the benchmark or study that wrote it, the
command, the commit and the host it ran on (from the ``machine`` record inside the JSON files).

    python -m bench.index            # after adding a result; tests/test_bench.py checks it is current
"""

from __future__ import annotations

import json
import pkgutil
from pathlib import Path

from bench.machine import RESULTS

BENCH = Path(__file__).resolve().parent
# Scripts retired once their question was answered; their results stay, with what we learned, in bench/README.md.
RETIRED = {"loader": "bench/loader.py (retired)", "synthesis": "bench/synthesis.py (retired)",
           "student_pass": "bench/train_speed.py --worker, in two trees"}


def scripts() -> dict[str, str]:
    """Result-file prefix -> the module that writes it (bench.<name> or bench.studies.<name>)."""
    found = {}
    for package, folder in (("bench", BENCH), ("bench.studies", BENCH / "studies")):
        for info in pkgutil.iter_modules([str(folder)]):
            if not info.ispkg and info.name not in ("machine", "timing", "index", "dev_demo", "photo_textures"):
                found[info.name] = f"{package}.{info.name}"
    return found


def describe(path: Path, modules: dict[str, str]) -> dict[str, str]:
    stem = path.stem
    prefix = max((p for p in [*modules, *RETIRED] if stem == p or stem.startswith(p + "_")), key=len, default="")
    source = modules.get(prefix) or RETIRED.get(prefix, "?")
    record_file = path if path.suffix == ".json" else path.with_suffix(".json")
    machine, command = {}, ""
    if record_file.is_file():
        try:
            record = json.loads(record_file.read_text())
        except json.JSONDecodeError:
            record = {}
        if isinstance(record, dict):
            machine = record.get("machine") or {}
            command = record.get("command", "")
    if not command and source.startswith("bench."):
        command = f"python -m {source}"
    host = ", ".join(str(x) for x in (machine.get("cpu"), machine.get("cpu_flags"), machine.get("cuda")) if x) or "not recorded"
    return {"file": path.name, "source": source, "command": command, "commit": machine.get("git_commit") or "not recorded", "host": host}


def build() -> str:
    modules = scripts()
    rows = [describe(p, modules) for p in sorted(RESULTS.iterdir()) if p.is_file() and p.name != "INDEX.md"]
    lines = ["# bench/results", "", "Written by `python -m bench.index`. Each result names the machine it ran on in its JSON "
             "(`machine`: CPU, flags, cores, versions, commit); a markdown file is the table of the JSON beside it.", "",
             "| file | written by | command | commit | host |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['file']} | {r['source']} | `{r['command']}` | {r['commit']} | {r['host']} |" if r["command"] else
                     f"| {r['file']} | {r['source']} | | {r['commit']} | {r['host']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    out = RESULTS / "INDEX.md"
    out.write_text(build())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
