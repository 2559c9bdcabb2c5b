"""Harvest: reviewed inspections into the training folder (confirmed good) and the field set
(confirmed defects), each exactly once, whole files only, a rerun after a crash finishing the job,
and the data versioned with DVC."""

from __future__ import annotations

import csv
import subprocess
import sys

import cv2
import numpy as np
import pytest

from urd.data.manifest import build_manifest
from urd.service import harvest as harvest_module
from urd.service.harvest import harvest
from urd.service.ledger import Harvest, HarvestedRecord, Ledger, NewInspection
from urd.service.store import ImageStore, sha256

from .layouts_fixtures import make_mvtec


def png(seed: int) -> bytes:
    image = np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    return cv2.imencode(".png", image)[1].tobytes()


def inspected(ledger: Ledger, store: ImageStore, category: str, seeds: list[int]) -> list[str]:
    threshold = ledger.add_threshold_version(category, "d" * 64, 0.5, 1.0, "calibration", "bundle")
    items = []
    for seed in seeds:
        data = png(seed)
        digest = store.put(data)
        items.append(NewInspection(category=category, line="L1", camera="c1", part_id=f"p{seed}", client_key=None, image_sha256=digest,
                                   image_width=48, image_height=40, model_name="urd-mvtec-bottle", model_version="3", model_alias="production",
                                   bundle_digest="d" * 64, threshold_version=threshold.id, score=0.1 * seed, normalized_score=0.5,
                                   decision="review", latency_ms=1.0))
    return [row.id for row in ledger.add_inspections(items)]


@pytest.fixture()
def line(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger.upgrade()
    store = ImageStore(tmp_path / "images", 90)
    make_mvtec(tmp_path / "data", "bottle", n_train=6)
    ids = inspected(ledger, store, "bottle", list(range(10, 20)))
    verdicts = ["good"] * 6 + ["defect"] * 3  # the 10th inspection is not reviewed
    for inspection_id, verdict in zip(ids, verdicts):
        ledger.add_verdict(inspection_id, verdict, "ann")
    ledger.add_verdict(ids[0], "defect", "bob")  # a second look: the latest verdict counts
    inspected(ledger, store, "cable", [30])  # another category's records stay put
    yield ledger, store, tmp_path, ids
    ledger.engine.dispose()


def run(ledger, store, tmp):
    return harvest(ledger, store, "mvtec", tmp / "data", "bottle", tmp / "field")


def test_confirmed_good_parts_become_training_data_and_defects_the_field_set(line):
    ledger, store, tmp, ids = line
    result = run(ledger, store, tmp)
    assert (result.good, result.defect, result.missing) == (5, 4, 0) and result.harvest_id
    good = tmp / "data" / "bottle" / "train" / "good"
    for seed in range(11, 16):  # ids[1:6]
        data = png(seed)
        assert (good / f"{sha256(data)}.png").read_bytes() == data
    defects = sorted((tmp / "field" / "mvtec" / "bottle" / "defect").iterdir())
    assert {p.name for p in defects} == {f"{sha256(png(s))}.png" for s in (10, 16, 17, 18)}
    with (tmp / "field" / "mvtec" / "bottle" / "labels.csv").open() as handle:
        labels = {row["inspection_id"]: row for row in csv.DictReader(handle)}
    assert set(labels) == {ids[0], *ids[6:9]} and labels[ids[0]]["reviewer"] == "bob" and labels[ids[0]]["model_version"] == "3"
    # the harvest is on record with every inspection it took
    [record] = ledger.harvests("bottle")
    assert (record.good, record.defect) == (5, 4) and record.first_record_at <= record.last_record_at
    with ledger.session() as session:
        taken = {r.inspection_id: r for r in session.query(HarvestedRecord)}
    assert set(taken) == set(ids[:9]) and all(r.harvest_id == record.id for r in taken.values())
    # nothing new: nothing to do; the stable val split holds some of the new normals out, and the test split is untouched
    assert run(ledger, store, tmp).harvest_id is None and len(ledger.harvests()) == 1
    manifest = build_manifest("mvtec", tmp / "data", "bottle", 0.5, progress=False)
    new = manifest[manifest["path"].str.contains("|".join(sha256(png(s)) for s in range(11, 16)))]
    assert len(new) == 5 and set(new["split"]) <= {"train", "val"} and len(manifest[manifest["split"] == "test"]) == 6


def test_a_harvest_killed_midway_leaves_whole_files_and_the_rerun_takes_each_record_once(line, monkeypatch):
    ledger, store, tmp, ids = line
    real = harvest_module._write_durably
    calls = []

    def dies_on_the_fourth(path, data):
        calls.append(path)
        if len(calls) == 4:
            path.parent.mkdir(parents=True, exist_ok=True)  # the 4th part may be the first of its folder
            path.with_name(f".{path.name}.tmp").write_bytes(data[:100])  # the half-written temporary file a kill leaves
            raise KeyboardInterrupt("killed")
        real(path, data)

    monkeypatch.setattr(harvest_module, "_write_durably", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        run(ledger, store, tmp)
    assert ledger.harvests() == []  # nothing recorded: every record is still to be harvested
    good, defect = tmp / "data" / "bottle" / "train" / "good", tmp / "field" / "mvtec" / "bottle" / "defect"
    written = [p for folder in (good, defect) if folder.is_dir() for p in folder.iterdir() if len(p.stem) == 64]
    assert len(written) == 3 and all(sha256(p.read_bytes()) == p.stem for p in written)  # whole files only

    monkeypatch.setattr(harvest_module, "_write_durably", real)
    result = run(ledger, store, tmp)
    assert (result.good, result.defect) == (5, 4) and len(result.written) == 9 - 3
    assert not list(good.glob(".*.tmp")) and not list(defect.glob(".*.tmp"))
    assert len([p for p in good.iterdir() if len(p.stem) == 64]) == 5 and len(list(defect.iterdir())) == 4
    with ledger.session() as session:
        assert session.query(HarvestedRecord).count() == 9 and session.query(Harvest).count() == 1


def test_a_pruned_image_is_taken_without_a_file_and_a_layout_without_a_training_folder_is_refused(line, tmp_path):
    ledger, store, tmp, ids = line
    store.path(ledger.inspection(ids[1]).image_sha256).unlink()
    assert run(ledger, store, tmp).missing == 1
    with pytest.raises(ValueError, match="folder layout"):
        harvest(ledger, store, "visa", tmp / "data", "bottle", tmp / "field")
    with pytest.raises(FileNotFoundError, match="train/good not found"):
        harvest(ledger, store, "mvtec", tmp / "nowhere", "bottle", tmp / "field")


def test_pipeline_harvest_versions_the_changed_data_with_dvc(tmp_path, monkeypatch):
    import yaml

    from pipeline.harvest import harvest_category
    from urd.config import parse_params

    def sh(*args):
        done = subprocess.run(list(args), cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    sh("git", "init", "-q")
    sh(sys.executable, "-m", "dvc", "init", "-q")
    make_mvtec(tmp_path / "data" / "raw" / "mvtec", "bottle", n_train=4)
    sh(sys.executable, "-m", "dvc", "add", "-q", "data/raw/mvtec")
    params = parse_params({"dataset": {"name": "mvtec", "root": "data/raw/mvtec", "categories": ["bottle"]}})
    ledger = Ledger(f"sqlite:///{tmp_path / params.serve.ledger.split('///')[1]}")
    ledger.upgrade()
    store = ImageStore(tmp_path / params.serve.image_store, 90)
    ids = inspected(ledger, store, "bottle", [1, 2, 3])
    for inspection_id, verdict in zip(ids, ["good", "good", "defect"]):
        ledger.add_verdict(inspection_id, verdict, "ann")
    ledger.engine.dispose()
    monkeypatch.chdir(tmp_path)
    out = harvest_category(params, "bottle", tmp_path, log=lambda line: None)
    assert (out["good"], out["defect"]) == (2, 1)
    assert out["versioned"] == ["dvc add data/raw/mvtec (commit data/raw/mvtec.dvc with git)",
                                "dvc add data/field/mvtec/bottle (commit data/field/mvtec/bottle.dvc with git)"]
    pointer = yaml.safe_load((tmp_path / "data" / "raw" / "mvtec.dvc").read_text())
    # 14 files of the layout, the two confirmed-good parts and harvests.csv (what came from the line)
    assert pointer["outs"][0]["nfiles"] == 14 + 2 + 1 and (tmp_path / "data" / "raw" / "mvtec" / "bottle" / "harvests.csv").is_file()
    assert "modified" not in sh(sys.executable, "-m", "dvc", "status")  # versioned: nothing left unrecorded


def test_a_model_can_say_which_reviewed_parts_it_learned_from(line):
    from urd.data.field import field_provenance

    ledger, store, tmp, ids = line
    result = run(ledger, store, tmp)
    manifest = build_manifest("mvtec", tmp / "data", "bottle", 0.5, progress=False)
    field = field_provenance(manifest, tmp / "data", "bottle", tmp / "field" / "mvtec" / "bottle")
    harvested = manifest[manifest["path"].str.contains("|".join(sha256(png(s)) for s in range(11, 16)))]
    assert field["field_train_images"] == int((harvested["split"] == "train").sum())
    assert field["field_val_images"] == int((harvested["split"] == "val").sum())
    assert field["field_train_images"] + field["field_val_images"] == 5 and field["field_defects"] == 4
    assert field["harvest_ids"] == [result.harvest_id] and field["ledger_from"] <= field["ledger_to"]
    # a model trained before the harvest learned from none of it
    before = manifest[~manifest["path"].isin(harvested["path"])]
    assert field_provenance(before, tmp / "data", "bottle")["field_train_images"] == 0


def test_the_field_set_reads_as_manifest_rows_checked_against_its_files(line):
    from urd.data.field import field_defect_rows

    ledger, store, tmp, ids = line
    field = tmp / "field" / "mvtec" / "bottle"
    assert field_defect_rows(tmp / "data", "bottle", field).empty  # nothing harvested yet
    run(ledger, store, tmp)
    rows = field_defect_rows(tmp / "data", "bottle", field)
    assert sorted(rows["sha256"]) == sorted(sha256(png(s)) for s in (10, 16, 17, 18))
    assert set(rows["split"]) == {"field"} and set(rows["label"]) == {1} and all(p.startswith(str(field)) for p in rows["path"])
    # the dataset folder lists them (so a harvest of defects alone changes this category's data)
    with (tmp / "data" / "bottle" / "harvests.csv").open() as handle:
        assert sorted(r["verdict"] for r in csv.DictReader(handle)) == ["defect"] * 4 + ["good"] * 5
    # an edited field image and a missing one are refused by name
    victim = field / "defect" / f"{sha256(png(16))}.png"
    victim.write_bytes(png(99))
    with pytest.raises(ValueError, match=victim.name):
        field_defect_rows(tmp / "data", "bottle", field)
    victim.unlink()
    with pytest.raises(FileNotFoundError, match="dvc pull"):
        field_defect_rows(tmp / "data", "bottle", field)


def test_a_dataset_that_is_a_stages_output_is_committed_to_that_stage(tmp_path, monkeypatch):
    import yaml

    from pipeline.harvest import version_harvest
    from urd.service.harvest import HarvestResult

    def dvc(*args):
        done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc("init", "-q")
    make_mvtec(tmp_path / "data" / "raw" / "demo", "widget", n_train=3)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"demo_data": {"cmd": "true", "outs": [{"data/raw/demo": {"persist": True}}]}}}))
    dvc("repro", "-q")
    (tmp_path / "data" / "raw" / "demo" / "widget" / "train" / "good" / ("f" * 64 + ".png")).write_bytes(png(5))
    assert "modified" in dvc("status")
    done = version_harvest(tmp_path, tmp_path / "data" / "raw" / "demo", HarvestResult("h", "widget", good=1,
                           folders=[tmp_path / "data" / "raw" / "demo" / "widget" / "train" / "good"]), log=lambda line: None)
    assert done == ["dvc commit demo_data (data/raw/demo)"]
    assert "modified" not in dvc("status")


def test_a_relative_sqlite_ledger_is_the_checkouts_not_the_working_directorys(tmp_path):
    from urd.service.ledger import ledger_url

    assert ledger_url("sqlite:///ledger.db", tmp_path) == f"sqlite:///{tmp_path.resolve() / 'ledger.db'}"
    assert ledger_url(f"sqlite:///{tmp_path}/x.db", "/elsewhere") == f"sqlite:///{tmp_path}/x.db"
    assert ledger_url("postgresql+psycopg://urd@db/urd", tmp_path) == "postgresql+psycopg://urd@db/urd"


def test_a_harvest_process_killed_with_sigkill_midway_is_finished_by_the_rerun_exactly_once(tmp_path):
    """A real ``kill -9`` of a harvesting process (its disk slowed to 30 ms per image so the kill lands
    midway), then the rerun: whole files only, no temporary file left, each record taken once."""
    import os
    import signal
    import textwrap
    import time

    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger.upgrade()
    store = ImageStore(tmp_path / "images", 90)
    make_mvtec(tmp_path / "data", "bottle", n_train=2)
    ids = inspected(ledger, store, "bottle", list(range(100, 300)))
    for k, inspection_id in enumerate(ids):
        ledger.add_verdict(inspection_id, "good" if k % 4 else "defect", "ann")
    ledger.engine.dispose()
    script = textwrap.dedent(f"""
        import time
        from urd.service import harvest as h
        from urd.service.ledger import Ledger
        from urd.service.store import ImageStore
        real = h._write_durably
        def slow(path, data):
            time.sleep(0.03)
            real(path, data)
        h._write_durably = slow
        h.harvest(Ledger("sqlite:///{tmp_path / 'ledger.db'}"), ImageStore("{tmp_path / 'images'}", 90), "mvtec", "{tmp_path / 'data'}", "bottle",
                  "{tmp_path / 'field'}")
    """)
    process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    good = tmp_path / "data" / "bottle" / "train" / "good"
    deadline = time.monotonic() + 120
    while len([p for p in good.iterdir() if len(p.stem) == 64]) < 20:
        assert process.poll() is None and time.monotonic() < deadline, "the harvest ended before it could be killed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    assert ledger.harvests() == [] and len(list(good.glob("*.png"))) < 2 + 150  # killed midway, nothing recorded

    result = harvest(ledger, store, "mvtec", tmp_path / "data", "bottle", tmp_path / "field")
    assert (result.good, result.defect) == (150, 50)
    defect = tmp_path / "field" / "mvtec" / "bottle" / "defect"
    files = [p for folder in (good, defect) for p in folder.iterdir() if len(p.stem) == 64]
    assert len(files) == 200 and all(sha256(p.read_bytes()) == p.stem for p in files)  # whole files, each once
    assert not list(good.glob(".*.tmp")) and not list(defect.glob(".*.tmp"))
    with ledger.session() as session:
        taken = [r.inspection_id for r in session.query(HarvestedRecord)]
    assert sorted(taken) == sorted(ids) and len(ledger.harvests()) == 1
    assert harvest(ledger, store, "mvtec", tmp_path / "data", "bottle", tmp_path / "field").harvest_id is None  # nothing left to take
    ledger.engine.dispose()


def test_the_repositorys_gitignore_lets_a_field_sets_dvc_pointer_be_committed_but_not_its_images():
    """DVC refuses to `dvc add` a folder whose .dvc file git ignores; the harvest adds the field set."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]

    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=repo).returncode == 0

    assert not ignored("data/field/demo/widget.dvc") and not ignored("data/field/demo/.gitignore")
    assert ignored("data/field/demo/widget/defect/0123.png") and ignored("data/raw/demo/widget/train/good/000.png")
