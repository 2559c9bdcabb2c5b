"""The data-quality gate: a Great Expectations suite + checkpoint over one category's manifest.

GE checks tables, not images, so the checks that need the files themselves (decoding, mask
geometry, content hashes across splits, sizes within the category) are first computed into
boolean manifest columns (``check_*``); the suite then expects every one of them to be true, plus
plain column checks (labels, splits, unique paths). The result is a JSON summary with one entry
per rule listing the offending files, and GE's HTML data docs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..config import DatasetParams

# rule -> (what it checks, how to fix it)
RULES: dict[str, tuple[str, str]] = {
    "check_readable": ("the file exists and decodes as an image", "replace or remove the corrupt/missing file"),
    "check_channels": ("the image has 1, 3 or 4 channels, like the rest of its category", "convert it to the category's colour mode"),
    "check_mask_present": ("every defect image has a mask and no good image has one", "add the missing mask (or set dataset.require_masks: false for image-level labels only)"),
    "check_mask_size": ("the mask has the size of its image", "re-export the mask at the image's resolution"),
    "check_mask_binary": ("the mask holds only background and one defect value", "binarise the mask (0 = good, 255 = defect)"),
    "check_no_leak": ("no file content is shared between train/val and test", "remove the duplicate from one of the splits"),
    "check_train_is_good": ("train and val hold only good images", "move defect images out of the training folder"),
    "check_size_consistent": ("the image has the same size as the rest of its category", "resize or remove the odd image"),
    "check_enough_train": ("the category has at least dataset.min_train_images training images", "add good images or lower dataset.min_train_images"),
}


class DataValidationError(RuntimeError):
    """The manifest failed the gate; the message lists the rules and files."""


@dataclass
class ValidationReport:
    category: str
    success: bool
    rows: int
    failures: list[dict] = field(default_factory=list)  # {rule, description, fix, count, files}
    ge_statistics: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"category": self.category, "success": self.success, "rows": self.rows, "failures": self.failures, "ge_statistics": self.ge_statistics}

    def message(self) -> str:
        lines = [f"Data validation failed for category {self.category!r}:"]
        for f in self.failures:
            shown = ", ".join(f["files"][:5]) + (f" (+{f['count'] - 5} more)" if f["count"] > 5 else "")
            lines.append(f"  - {f['count']} file(s) break '{f['rule']}' ({f['description']}): {shown}. Fix: {f['fix']}.")
        lines.append("Nothing downstream was run. The full list is in the validation summary and data docs.")
        return "\n".join(lines)


def add_check_columns(manifest: pd.DataFrame, dataset: DatasetParams) -> pd.DataFrame:
    """The manifest plus one boolean ``check_*`` column per file-level rule."""
    m = manifest.copy()
    has_mask = m["mask_path"].astype(str) != ""
    m["check_readable"] = m["readable"].astype(bool)
    mode_channels = m.loc[m["readable"].astype(bool), "channels"].mode()
    m["check_channels"] = m["channels"].isin([1, 3, 4]) & (
        m["channels"].eq(mode_channels.iloc[0]) if len(mode_channels) else True
    ) | ~m["check_readable"]
    needs_mask = (m["label"] == 1) & dataset.require_masks
    m["check_mask_present"] = (needs_mask & has_mask) | ((m["label"] == 1) & ~needs_mask) | ((m["label"] == 0) & ~has_mask)
    m["check_mask_size"] = ~has_mask | ((m["mask_width"] == m["width"]) & (m["mask_height"] == m["height"]))
    values = m["mask_values"].astype(str).str.split()
    nonzero_rule = dataset.name == "visa"  # VisA masks hold class indices; any non-zero value is a defect
    m["check_mask_binary"] = ~has_mask | values.map(lambda v: nonzero_rule or len(v) <= 2 and (len(v) < 2 or v[0] == "0"))
    train_like = m["split"].isin(["train", "val"])
    test_hashes = set(m.loc[~train_like & (m["sha256"] != ""), "sha256"])
    train_hashes = set(m.loc[train_like & (m["sha256"] != ""), "sha256"])
    m["check_no_leak"] = ~((train_like & m["sha256"].isin(test_hashes)) | (~train_like & m["sha256"].isin(train_hashes)))
    m["check_train_is_good"] = ~train_like | (m["label"] == 0)
    readable = m["check_readable"]
    sizes = m.loc[readable, ["width", "height"]].astype(str).agg("x".join, axis=1)
    common = sizes.mode().iloc[0] if len(sizes) else ""
    m["check_size_consistent"] = ~readable | (m[["width", "height"]].astype(str).agg("x".join, axis=1) == common)
    m["train_count"] = int((m["split"] == "train").sum())
    return m


def _build_suite(gx, gxe, dataset: DatasetParams):
    suite = gx.ExpectationSuite(name="urd_manifest")
    for rule in RULES:
        if rule == "check_enough_train":
            continue
        suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column=rule, value_set=[True], meta={"rule": rule}))
    suite.add_expectation(gxe.ExpectColumnMinToBeBetween(column="train_count", min_value=dataset.min_train_images, meta={"rule": "check_enough_train"}))
    suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="label", value_set=[0, 1], meta={"rule": "label_is_binary"}))
    suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "val", "test"], meta={"rule": "split_is_known"}))
    suite.add_expectation(gxe.ExpectColumnValuesToBeUnique(column="path", meta={"rule": "path_is_unique"}))
    suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column="path", meta={"rule": "path_is_set"}))
    return suite


def run_gate(manifest: pd.DataFrame, dataset: DatasetParams, category: str, docs_dir: str | Path | None = None) -> ValidationReport:
    """Run the GE checkpoint over ``manifest``; write data docs to ``docs_dir`` when given."""
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.checkpoint import UpdateDataDocsAction

    checked = add_check_columns(manifest, dataset)
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    actions = []
    if docs_dir is not None:
        context.add_data_docs_site(
            "urd",
            {
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(Path(docs_dir).resolve())},
            },
        )
        actions.append(UpdateDataDocsAction(name="data_docs", site_names=["urd"]))
    asset = context.data_sources.add_pandas(f"manifest_{category}").add_dataframe_asset("rows")
    batch = asset.add_batch_definition_whole_dataframe("all_rows")
    suite = context.suites.add(_build_suite(gx, gxe, dataset))
    definition = context.validation_definitions.add(gx.ValidationDefinition(data=batch, suite=suite, name=f"validate_{category}"))
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(name=f"urd_{category}", validation_definitions=[definition], actions=actions, result_format={"result_format": "COMPLETE"})
    )
    result = checkpoint.run(batch_parameters={"dataframe": checked})

    failures = []
    statistics = {}
    for run in result.run_results.values():
        statistics = dict(run.statistics)
        for expectation in run.results:
            if expectation.success:
                continue
            rule = expectation.expectation_config.meta.get("rule", expectation.expectation_config.type)
            description, fix = RULES.get(rule, (expectation.expectation_config.type, "fix the manifest column"))
            index = expectation.result.get("unexpected_index_list") or []
            if rule == "check_enough_train":
                files = [f"{category}: {int(checked['train_count'].iloc[0]) if len(checked) else 0} training images"]
            else:
                files = [str(checked.loc[i, "path"]) for i in index]
            failures.append({"rule": rule, "description": description, "fix": fix, "count": len(files), "files": files})
    return ValidationReport(category, bool(result.success), len(manifest), failures, statistics)


def validate(manifest: pd.DataFrame, dataset: DatasetParams, category: str, out_dir: str | Path) -> ValidationReport:
    """Gate + report: writes ``summary.json`` and ``data_docs/`` under ``out_dir``; raises on failure."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = run_gate(manifest, dataset, category, out_dir / "data_docs")
    (out_dir / "summary.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if not report.success:
        raise DataValidationError(report.message())
    return report
