"""The model card written into each bundle: sections, counts, caveats."""

import json

from typer.testing import CliRunner

from pipeline.model_card import CARD_JSON, CARD_MD, _caveats, build_card, write_model_card
from urd.data.manifest import build_manifest
from urd.files import METADATA_FILE


runner = CliRunner()


def test_model_card_sections_counts_and_warning(packaged):
    manifest = build_manifest("demo", packaged / "demo", "widget", 0.25)
    card_json, card_md = write_model_card(packaged / "bundle", manifest)
    assert card_json.name == CARD_JSON and card_md.name == CARD_MD
    card = json.loads(card_json.read_text())
    for section in ("model_details", "intended_use", "out_of_scope", "training_data", "evaluation_data", "metrics", "thresholds", "caveats", "how_to_use"):
        assert card[section], section
    assert card["model_details"]["name"] == "urd-demo-widget"
    assert card["training_data"]["train_images"] == int((manifest.split == "train").sum())
    assert card["training_data"]["val_images"] == int((manifest.split == "val").sum())
    assert card["training_data"]["dvc_data_md5"] == "123.dir"
    assert card["evaluation_data"]["good"] == 3 and card["evaluation_data"]["defect"] == 6
    assert card["evaluation_data"]["per_defect_type"] == {"contamination": 2, "missing_piece": 2, "scratch": 2}
    metrics = json.loads((packaged / "report" / "metrics.json").read_text())
    at = card["thresholds"]["test_at_image_threshold"]
    assert at == metrics["at_calibrated_threshold"] and card["thresholds"]["test_at_pixel_threshold"]["recall"] >= 0
    assert card["caveats"][0].startswith("WARNING") and "RANDOMLY INITIALISED" in card["caveats"][0]
    # dtd_root is configured (the default) but holds no DTD: the texture fallback is recorded and warned about
    assert card["training_data"]["anomaly_textures"] == "procedural"
    assert any("PROCEDURAL textures" in c and "'data/raw/dtd'" in c for c in card["caveats"])
    n_val = card["training_data"]["val_images"]
    assert any(f"steps of 1/{n_val} = " in c and "Hold out at least 100 normal images" in c for c in card["caveats"])  # target 0.01
    text = card_md.read_text()
    for heading in ("## Model details", "## Intended use", "## Out-of-scope uses", "## Training data", "## Evaluation data",
                    "## Metrics (test split)", "## Calibrated thresholds", "## Caveats", "## How to use"):
        assert heading in text, heading
    assert "> **WARNING" in text and f"recall {at['recall']:.4f}" in text
    assert card["thresholds"]["review_threshold"] <= card["thresholds"]["image_threshold"] and "- Review threshold " in text
    assert "urd serve --bundle widget=" in card["how_to_use"]["serve"] and "urd-demo-widget@production" in card["how_to_use"]["serve"]
    assert "`urd inspect " in text
    for defect in ("scratch", "missing_piece", "contamination"):
        assert f"| {defect} |" in text


def test_model_card_without_warning_for_pretrained_weights_and_dtd_textures(packaged):
    meta = json.loads((packaged / "bundle" / METADATA_FILE).read_text()) | {"weights_source": "imagenet", "dataset": "mvtec"}
    meta["training"] = meta["training"] | {"texture_source": "dtd:/data/dtd", "dtd_root": "/data/dtd"}
    card = build_card(meta, build_manifest("demo", packaged / "demo", "widget", 0.25))
    assert not any(c.startswith("WARNING") for c in card["caveats"]) and card["model_details"]["name"] == "urd-mvtec-widget"


def test_threshold_resolution_caveat_only_when_the_val_split_cannot_resolve_the_target():
    counts = {"test": {"good": 50, "defect": 50}, "val": 40}
    def caveats(target, method="val_quantile"):
        return [c for c in _caveats({}, counts, {"method": method, "target_fpr": target, "val_images": 40}) if "resolve rates" in c]
    assert len(caveats(0.01)) == 1 and "1/40 = 0.025" in caveats(0.01)[0]
    assert caveats(0.05) == [] and caveats(0.01, method="f1_calibration_set") == []


def test_model_card_names_the_variant_that_was_trained(packaged):
    meta = json.loads((packaged / "bundle" / METADATA_FILE).read_text())
    manifest = build_manifest("demo", packaged / "demo", "widget", 0.25)
    full = build_card(meta | {"architecture": meta["architecture"] | {"expert_in_training": True, "gii": "gii"}}, manifest)
    assert "Expert-Teacher-Student" in full["model_details"]["method"] and "Guided Information Injection" in full["model_details"]["method"]
    off = build_card(meta | {"architecture": meta["architecture"] | {"expert_in_training": False, "gii": "none"}}, manifest)
    assert "expert off" in off["model_details"]["method"] and "plain RD decoder" in off["model_details"]["method"]


def test_model_card_states_the_bounds_of_a_calibration_from_verdicts(packaged):
    from pipeline.model_card import render_markdown

    meta = json.loads((packaged / "bundle" / METADATA_FILE).read_text())
    manifest = build_manifest("demo", packaged / "demo", "widget", 0.25)
    field = {"status": "calibrated", "good_parts": 320, "defect_parts": 64, "confidence": 0.95, "false_rejects": 0, "false_reject_bound": 0.0093,
             "escapes": 1, "escape_bound": 0.0725, "reviews_per_shift": 41.6, "review_capacity": 40, "fits_capacity": False}
    text = render_markdown(build_card(meta | {"thresholds": meta["thresholds"] | {"method": "field_verdicts", "field": field}}, manifest))
    assert ("From verdicts: 320 good parts (val) and 64 confirmed defects (field set); at 95% confidence false rejects are at most 0.93% "
            "(0 seen) and escapes at most 7.25% (1 seen); about 42 reviews per shift (capacity 40, OVER capacity)") in text
    waiting = {"status": "waiting", "defect_parts": 12, "reason": "calibration from verdicts at 95% confidence needs 17 more confirmed defects"}
    text = render_markdown(build_card(meta | {"thresholds": meta["thresholds"] | {"field": waiting}}, manifest))
    assert "Field set of 12 confirmed defects not used yet: calibration from verdicts at 95% confidence needs 17 more" in text
    assert "From verdicts" not in render_markdown(build_card(meta, manifest))
