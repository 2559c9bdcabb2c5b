"""Factory simulator for the drift monitor: false alarms over a long stable stretch, and how many
parts it takes to detect a camera that got 10% brighter.

    python -m bench.factory_sim [--parts 20000] [--bundles bundles] [--categories tiles widget]

Each category's line is a fresh draw of the demo generator (another seed than the training data:
new normal parts and new defects, ``--defect-rate`` of the parts). Every distinct image is scored
once by the served model (the service's own ``ServedModel``: same preprocessing, same ONNX graph)
and its brightness, contrast and sharpness measured; the stream then draws parts from that pool,
so 20,000 parts per category cost a few hundred inferences. The shifted line is the same pool with
every pixel times ``--gain``, scored and measured again.

The monitor runs the product's assessment (urd.drift.assess) on the compressed schedule of
``--rate`` parts per hour and a run every ``--every-minutes`` on the last ``--window-hours``, at
the false-alarm budget of ``MonitorParams.false_alarms_per_day`` split (Bonferroni) over the runs
of a day, the categories and the tests of a run, exactly as the ``monitor`` flow splits it.

Then the answer (``--harvest`` > 0): that many bright normal parts, as reviewers would confirm
them, go into a copy of the category's training folder with their ``harvests.csv`` rows, exactly as
the harvest writes them; ``urd run`` retrains and calibrates the category on it and ``urd export``
packages it (its drift reference is then that harvest: the line as reviewers confirmed it). The
bright line is replayed through the new model (normal parts the retrain never saw) with the
monitor on the new reference: error rates and alarms after the retrain.

What it does not do: HTTP, the ledger and Prefect are not in this loop (they are exercised by
tests/test_loop.py, tests/test_factory_loop.py and tests/test_service_live.py).

Writes bench/results/factory_sim.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from bench.machine import RESULTS, machine
from urd.calibrate import review_threshold
from urd.config import MonitorParams
from urd.data.demo import DemoSpec
from urd.drift import IMAGE_STATISTICS, assess, image_statistics, read_reference
from urd.service.models import load_served_model


def line_pool(category: str, seed: int, size: int, goods: int, per_defect: int, tmp: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """RGB images of a fresh demo draw (train and test good = normal parts, the rest defects), labels."""
    from urd.data.demo import DemoSpec, generate_demo

    root = generate_demo(tmp / f"line-{category}", DemoSpec(seed=seed, size=size, train=goods, test_good=4, test_per_defect=per_defect))
    images, labels = [], []
    for path in sorted((root / category).rglob("*.png")):
        if "ground_truth" in path.parts:
            continue
        images.append(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB))
        labels.append(int(path.parent.name != "good"))
    return images, np.array(labels)


def score_pool(model, images: list[np.ndarray], gain: float = 1.0, batch: int = 16) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    if gain != 1.0:
        images = [np.clip(i.astype(np.float32) * gain, 0, 255).astype(np.uint8) for i in images]
    scores = np.concatenate([model.score(np.stack([model.prepare(i) for i in images[k:k + batch]]))[1] for k in range(0, len(images), batch)])
    stats = [image_statistics(i) for i in images]
    return scores, {k: np.array([s[k] for s in stats]) for k in IMAGE_STATISTICS}


def stream(rng: np.random.Generator, labels: np.ndarray, parts: int, defect_rate: float) -> np.ndarray:
    """Pool indices of ``parts`` parts, each a defect with probability ``defect_rate``."""
    good, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    is_defect = rng.random(parts) < defect_rate
    return np.where(is_defect, rng.choice(bad, parts), rng.choice(good, parts))


def run_monitor(scores: np.ndarray, stats: dict[str, np.ndarray], reference: np.ndarray, reference_images: dict[str, np.ndarray],
                threshold: float, every: int, window: int, max_images: int, min_parts: int, alpha: float) -> list[tuple[int, bool, str]]:
    """(parts seen, drift, cause, tests that fired) of every monitor run over the stream."""
    runs = []
    for end in range(every, len(scores) + 1, every):
        start = max(0, end - window)
        if end - start < min_parts:
            continue
        last = slice(max(start, end - max_images), end)
        result = assess(reference, scores[start:end], threshold, reference_images, {k: v[last] for k, v in stats.items()}, alpha=alpha)
        runs.append((end, result.drift, result.cause, fired(result)))
    return runs


def fired(result) -> list[str]:
    """Which tests of an assessment rejected at its alpha per test."""
    e, a = result.evidence, result.alpha_per_test
    return ([k for k in ("scores", "flag_rate") if e[k]["p_value"] < a] + [f"images.{k}" for k, v in e["images"].items() if v["p_value"] < a])


def rates(scores: np.ndarray, labels: np.ndarray, calibration: dict) -> dict[str, float]:
    good, bad = scores[labels == 0], scores[labels == 1]
    return {"false_reject_rate": float((good >= calibration["image_threshold"]).mean()),
            "escape_rate": float((bad < review_threshold(calibration)).mean()) if len(bad) else float("nan"),
            "review_rate": float(((scores >= review_threshold(calibration)) & (scores < calibration["image_threshold"])).mean())}


def retrain_on_reviews(category: str, dataset_root: Path, images: list[np.ndarray], gain: float, tmp: Path) -> tuple[Path, float]:
    """A copy of the category's data with ``images`` (x ``gain``) harvested into train/good (named by
    sha256, listed in harvests.csv as the harvest writes them), retrained, calibrated and exported
    with the repository's params; returns the bundle and the seconds it took."""
    import csv
    import hashlib
    import shutil
    import subprocess

    import yaml

    from urd.data.field import LABEL_COLUMNS, PROVENANCE

    data = tmp / f"retrain-{category}" / "data"
    shutil.copytree(dataset_root / category, data / category)
    rows = []
    for k, image in enumerate(images):
        bright = np.clip(image.astype(np.float32) * gain, 0, 255).astype(np.uint8)
        png = cv2.imencode(".png", cv2.cvtColor(bright, cv2.COLOR_RGB2BGR))[1].tobytes()
        name = f"{hashlib.sha256(png).hexdigest()}.png"
        (data / category / "train" / "good" / name).write_bytes(png)
        rows.append({"file": name, "inspection_id": f"sim-{k}", "harvest_id": "sim", "verdict": "good", "reviewer": "sim",
                     "inspected_at": "2026-01-01T00:00:00+00:00", "camera": "cam1"})
    with (data / category / PROVENANCE).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, LABEL_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["dataset"] |= {"root": str(data), "categories": [category]}
    params_file = data.parent / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    models, started = data.parent / "models", time.perf_counter()
    for command in (["run", "--params", str(params_file), "--models", str(models), "--reports", str(data.parent / "reports")],
                    ["export", "--model", str(models / category), "--params", str(params_file)]):
        done = subprocess.run([sys.executable, "-m", "urd", *command], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"urd {command[0]} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return models / category / "bundle", time.perf_counter() - started


def simulate(category: str, bundle: Path, args, monitor: MonitorParams, categories: int, tmp: Path) -> dict:
    model = load_served_model(category, bundle, f"bundle:{bundle}", "local", None)
    calibration = model.calibration
    started = time.perf_counter()
    # the camera's resolution is the training images' (sharpness depends on it)
    images, labels = line_pool(category, args.seed + 1000, DemoSpec().size, args.pool, args.pool_defects, tmp)
    base_scores, base_stats = score_pool(model, images)
    shifted_scores, shifted_stats = score_pool(model, images, args.gain)
    pool_s = time.perf_counter() - started
    every = max(1, round(args.rate * monitor.every_minutes / 60))
    window = max(every, round(args.rate * monitor.window_hours))
    alpha = monitor.false_alarms_per_day / (24 * 60 / monitor.every_minutes) / categories
    reference = np.asarray(calibration["val_scores"], np.float64)
    reference_images = read_reference(bundle)
    threshold = review_threshold(calibration)
    rng = np.random.default_rng(args.seed)

    # 1. the stable line: every monitor run over args.parts parts
    idx = stream(rng, labels, args.parts, args.defect_rate)
    stable = run_monitor(base_scores[idx], {k: v[idx] for k, v in base_stats.items()}, reference, reference_images, threshold, every, window,
                         monitor.max_images, monitor.min_parts, alpha)
    # 2. a brighter camera from part `warmup` on, repeated over `args.repeats` streams: parts until the first alarm
    delays, causes, warmup_runs, warmup_alarms = [], [], 0, []
    for _ in range(args.repeats):
        shift = args.warmup + int(rng.integers(every))  # the change falls anywhere between two runs
        before, after = stream(rng, labels, shift, args.defect_rate), stream(rng, labels, args.after, args.defect_rate)
        scores = np.r_[base_scores[before], shifted_scores[after]]
        stats = {k: np.r_[base_stats[k][before], shifted_stats[k][after]] for k in IMAGE_STATISTICS}
        runs = run_monitor(scores, stats, reference, reference_images, threshold, every, window, monitor.max_images, monitor.min_parts, alpha)
        early = [r for r in runs if r[0] <= shift and r[1]]
        warmup_runs += sum(r[0] <= shift for r in runs)
        warmup_alarms += [r[3] for r in early]
        first = next((r for r in runs if r[0] > shift and r[1]), None)
        delays.append(None if early else (first[0] - shift if first else None))
        causes.append(first[2] if first else "not detected")
    detected = [d for d in delays if d is not None]
    after_retrain = None
    if args.harvest:
        # reviewers confirm the first `harvest` bright normal parts; the line afterwards shows the others
        good = np.flatnonzero(labels == 0)
        reviewed, unseen = good[:args.harvest], np.r_[good[args.harvest:], np.flatnonzero(labels == 1)]
        new_bundle, seconds = retrain_on_reviews(category, Path(args.dataset_root), [images[i] for i in reviewed], args.gain, tmp)
        new = load_served_model(category, new_bundle, f"bundle:{new_bundle}", "local", None)
        rest = [images[i] for i in unseen]
        new_scores, new_stats = score_pool(new, rest, args.gain)
        new_labels = labels[unseen]
        idx_after = stream(rng, new_labels, args.parts_after, args.defect_rate)
        runs = run_monitor(new_scores[idx_after], {k: v[idx_after] for k, v in new_stats.items()}, np.asarray(new.calibration["val_scores"]),
                           read_reference(new_bundle), review_threshold(new.calibration), every, window, monitor.max_images, monitor.min_parts, alpha)
        after_retrain = {"harvested_parts": int(args.harvest), "retrain_seconds": round(seconds, 1),
                         "reference": json.loads((new_bundle / "reference.json").read_text())["source"],
                         "rates": rates(new_scores[idx_after], new_labels[idx_after], new.calibration),
                         "parts": args.parts_after, "runs": len(runs), "alarms": int(sum(r[1] for r in runs)),
                         "alarm_tests": [r[3] for r in runs if r[1]],
                         "flagged_share_val_vs_line": [float((np.asarray(new.calibration["val_scores"]) >= review_threshold(new.calibration)).mean()),
                                                       float((new_scores[idx_after] >= review_threshold(new.calibration)).mean())]}
    return {
        "category": category, "pool_images": len(images), "pool_defects": int(labels.sum()), "pool_seconds": round(pool_s, 1),
        "run_every_parts": every, "window_parts": window, "alpha_per_run": alpha, "alpha_per_test": alpha / 5,
        "stable_parts": args.parts, "stable_runs": len(stable), "false_alarms": int(sum(r[1] for r in stable)),
        "false_alarm_tests": [r[3] for r in stable if r[1]],
        # the stretches before each shift are stable line too: their runs and alarms, counted apart
        "warmup_runs": warmup_runs, "warmup_false_alarms": len(warmup_alarms), "warmup_false_alarm_tests": warmup_alarms,
        "flagged_share_val_vs_line": [float((reference >= threshold).mean()), float((base_scores[idx] >= threshold).mean())],
        "shift_gain": args.gain, "shift_repeats": args.repeats, "detected": len(detected),
        "missed": sum(c == "not detected" for c in causes),
        "detection_delay_parts": {"median": float(np.median(detected)) if detected else None, "max": max(detected) if detected else None,
                                  "all": delays},
        "causes": sorted(set(causes)),
        "before_shift": rates(base_scores[idx], labels[idx], calibration),
        "during_shift": rates(shifted_scores[idx], labels[idx], calibration),
        "brightness_median_before_after": [float(np.median(base_stats["brightness"])), float(np.median(shifted_stats["brightness"]))],
        "after_retrain": after_retrain,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundles", type=Path, default=Path("bundles"), help="folder of the exported bundles, one per category (make demo)")
    parser.add_argument("--categories", nargs="+", default=["tiles", "widget"])
    parser.add_argument("--parts", type=int, default=20000, help="stable parts per category")
    parser.add_argument("--rate", type=float, default=600, help="parts per hour on the camera")
    parser.add_argument("--every-minutes", type=float, default=15, help="monitor cadence (compressed schedule)")
    parser.add_argument("--window-hours", type=float, default=2)
    parser.add_argument("--defect-rate", type=float, default=0.02)
    parser.add_argument("--gain", type=float, default=1.1, help="the camera's brightness change")
    parser.add_argument("--warmup", type=int, default=2000, help="stable parts before the shift")
    parser.add_argument("--after", type=int, default=3000, help="parts after the shift")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--pool", type=int, default=600, help="distinct normal parts drawn from the generator")
    parser.add_argument("--pool-defects", type=int, default=20, help="distinct parts per defect type")
    parser.add_argument("--harvest", type=int, default=50, help="bright normal parts reviewers confirm before the retrain (0: no retrain)")
    parser.add_argument("--parts-after", type=int, default=4000, help="parts replayed through the retrained model")
    parser.add_argument("--dataset-root", default="data/raw/demo", help="the training data of the bundles (make demo)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    monitor = MonitorParams(every_minutes=args.every_minutes, window_hours=args.window_hours)
    results = []
    with tempfile.TemporaryDirectory(prefix="urd-factory-") as tmp:
        for category in args.categories:
            results.append(simulate(category, args.bundles / category, args, monitor, len(args.categories), Path(tmp)))
            r = results[-1]
            print(f"{category}: {r['false_alarms']} false alarms in {r['stable_runs']} runs over {r['stable_parts']} stable parts; "
                  f"{args.gain:.0%} brightness detected in {r['detected']}/{args.repeats} after a median {r['detection_delay_parts']['median']} "
                  f"(max {r['detection_delay_parts']['max']}) parts", flush=True)
    record = {"machine": machine(), "command": "python -m bench.factory_sim " + " ".join(sys.argv[1:] if argv is None else argv),
              "monitor": monitor.model_dump(), "rate_parts_per_hour": args.rate, "defect_rate": args.defect_rate, "results": results}
    out = RESULTS / "factory_sim.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# Drift monitor on a simulated line ({record['machine'].get('cpu', '')})", "",
             f"{args.rate:g} parts/h per camera, defect rate {args.defect_rate:g}, monitor every {monitor.every_minutes:g} min on the last "
             f"{monitor.window_hours:g} h, false-alarm budget {monitor.false_alarms_per_day:g}/day (Bonferroni over runs, categories and tests).",
             "", "| category | stable parts | monitor runs | false alarms | + runs before the shifts | their false alarms (test) | flagged: val / line "
             "| brightness x" + f"{args.gain:g}" + " detected | parts to detect (median / max) | cause | false rejects before / during "
             "| escapes before / during |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        d = r["detection_delay_parts"]
        tests = sorted({t for f in r["false_alarm_tests"] + r["warmup_false_alarm_tests"] for t in f})
        lines.append(f"| {r['category']} | {r['stable_parts']} | {r['stable_runs']} | {r['false_alarms']} | {r['warmup_runs']} | "
                     f"{r['warmup_false_alarms']}{' (' + ', '.join(tests) + ')' if tests else ''} | "
                     f"{r['flagged_share_val_vs_line'][0]:.3f} / {r['flagged_share_val_vs_line'][1]:.3f} | "
                     f"{r['detected']}/{r['shift_repeats']} ({r['missed']} missed, {r['shift_repeats'] - r['detected'] - r['missed']} alarmed early) | "
                     f"{d['median']} / {d['max']} | {', '.join(r['causes'])} | {r['before_shift']['false_reject_rate']:.3f} / "
                     f"{r['during_shift']['false_reject_rate']:.3f} | {r['before_shift']['escape_rate']:.3f} / {r['during_shift']['escape_rate']:.3f} |")
    if any(r["after_retrain"] for r in results):
        lines += ["", f"After the retrain on {args.harvest} reviewed bright parts (the bright line replayed through the new model, parts it never saw):",
                  "", "| category | retrain + calibrate + export (s) | drift reference | parts | monitor runs | alarms | flagged: val / line "
                  "| false rejects | escapes |", "|---|---|---|---|---|---|---|---|---|"]
        for r in results:
            a = r["after_retrain"]
            if a:
                tests = sorted({t for f in a["alarm_tests"] for t in f})
                lines.append(f"| {r['category']} | {a['retrain_seconds']} | {a['reference']} | {a['parts']} | {a['runs']} | {a['alarms']}"
                             f"{' (' + ', '.join(tests) + ')' if tests else ''} | {a['flagged_share_val_vs_line'][0]:.3f} / "
                             f"{a['flagged_share_val_vs_line'][1]:.3f} | {a['rates']['false_reject_rate']:.3f} | {a['rates']['escape_rate']:.3f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
