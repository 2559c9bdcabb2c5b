import json

import numpy as np
import pytest
import torch

from urd.checkpoint import build_model, load_model, model_meta, save_model
from urd.config import parse_params
from urd.export import export_bundle
from urd.files import METADATA_FILE
from urd.inference import OnnxBundle


@pytest.fixture(scope="module", params=[("resnet18", 1, "reflect"), ("efficientnet_lite0", 2, "mirror")], ids=["resnet18-reflect", "lite0-width2"])
def bundle(tmp_path_factory, request):
    """resnet18 as RD builds it, with the release's blur border; lite0 with a student twice as wide
    (output heads, width read back from model.json)."""
    tmp = tmp_path_factory.mktemp("export")
    backbone, width, border = request.param
    weights = "imagenet" if backbone == "efficientnet_lite0" else "none"  # ResNet weights come from the hub: not here
    params = parse_params({"dataset": {"image_size": 64}, "model": {"backbone": backbone, "weights": weights, "student_width": width,
                                                                    "blur_border": border}})
    torch.manual_seed(0)
    model = build_model(params)
    for p in model.student.parameters():  # non-trivial student so maps are not constant
        p.data.add_(0.01 * torch.randn_like(p))
    save_model(model, model_meta(params, "widget"), tmp / "model")
    (tmp / "model" / "calibration.json").write_text(json.dumps({"image_threshold": 0.4, "pixel_threshold": 0.3}))
    export_bundle(tmp / "model", tmp / "bundle", lineage={"git_commit": "abc"})
    return tmp


def test_onnx_and_torchscript_match_eager(bundle):
    graph, _ = load_model(bundle / "model")
    x = torch.rand(3, 3, 64, 64)  # RGB in [0, 1]: the graph normalises
    with torch.no_grad():
        ref_map, ref_score = graph(x)
    maps, scores = OnnxBundle(bundle / "bundle")(x.numpy())
    np.testing.assert_allclose(maps, ref_map.numpy(), atol=1e-4)
    np.testing.assert_allclose(scores, ref_score.numpy(), atol=1e-4)
    scripted = torch.jit.load(str(bundle / "bundle" / "model.torchscript"))
    with torch.no_grad():
        ts_map, ts_score = scripted(x)
    torch.testing.assert_close(ts_map, ref_map, atol=1e-4, rtol=0)
    torch.testing.assert_close(ts_score, ref_score, atol=1e-4, rtol=0)


def test_metadata_holds_what_a_user_needs(bundle):
    meta = json.loads((bundle / "bundle" / METADATA_FILE).read_text())
    mean = [0.485, 0.456, 0.406] if meta["architecture"]["backbone"] == "resnet18" else [127 / 255] * 3
    assert meta["preprocessing"]["image_size"] == 64 and meta["preprocessing"]["mean"] == mean and meta["preprocessing"]["normalisation"] == "in the model"
    assert meta["thresholds"]["image_threshold"] == 0.4 and meta["lineage"]["git_commit"] == "abc"
    assert meta["architecture"]["backbone"] in ("resnet18", "efficientnet_lite0") and meta["weights_source"] == ("imagenet" if meta["architecture"]["backbone"] == "efficientnet_lite0" else "none")


def test_export_refuses_to_overwrite(bundle):
    with pytest.raises(FileExistsError, match="overwrite"):
        export_bundle(bundle / "model", bundle / "bundle")


def test_models_and_bundles_of_the_old_format_are_refused_with_the_fix(bundle, tmp_path):
    import shutil

    from urd.checkpoint import ModelFileError

    old = tmp_path / "old"
    shutil.copytree(bundle / "model", old / "model")
    shutil.copytree(bundle / "bundle", old / "bundle")
    for path, key in ((old / "model" / "model.json", "urd-model/1"), (old / "bundle" / METADATA_FILE, "urd-bundle/1")):
        meta = json.loads(path.read_text())
        path.write_text(json.dumps(meta | {"format": key}))
    with pytest.raises(ModelFileError, match="Retrain"):
        load_model(old / "model")
    with pytest.raises(ValueError, match="Re-export"):
        OnnxBundle(old / "bundle")


def test_int8_graph_quantises_the_student_and_keeps_teacher_and_anomaly_map_in_fp32(bundle, tmp_path):
    import shutil

    import onnx

    from urd.export import quantize_bundle
    from urd.files import INT8_ONNX_FILE

    copy = tmp_path / "bundle"
    shutil.copytree(bundle / "bundle", copy)
    with pytest.raises(FileNotFoundError, match="quantize"):
        OnnxBundle(copy, precision="int8")
    with pytest.raises(ValueError, match="val"):
        quantize_bundle(copy, np.zeros((0, 3, 64, 64), np.float32))
    rng = np.random.default_rng(0)
    quantize_bundle(copy, rng.random((8, 3, 64, 64), dtype=np.float32))
    graph = onnx.load(str(copy / INT8_ONNX_FILE)).graph
    producer = {out: n.op_type for n in graph.node for out in n.output}
    convs = [n for n in graph.node if n.op_type in ("Conv", "ConvTranspose")]
    student = [n for n in convs if n.name.startswith("/student/")]
    fp32 = [n for n in convs if n.name.startswith(("/teacher/", "/anomaly_map/"))]
    assert student and fp32 and len(student) + len(fp32) == len(convs)
    # QDQ: a quantised conv reads its activation and its weight through DequantizeLinear
    assert all(producer.get(n.input[0]) == "DequantizeLinear" and producer.get(n.input[1]) == "DequantizeLinear" for n in student)
    assert all(producer.get(n.input[1]) != "DequantizeLinear" for n in fp32)  # teacher and anomaly map stay fp32
    x = rng.random((3, 3, 64, 64), dtype=np.float32)
    maps, scores = OnnxBundle(copy, precision="int8")(x)
    ref_maps, _ = OnnxBundle(copy)(x)
    assert maps.shape == ref_maps.shape and scores.shape == (3,) and np.isfinite(maps).all()
    assert not np.array_equal(maps, ref_maps)  # it is another graph, not the fp32 one


def test_the_challenge_set_records_every_format_away_from_the_thresholds_and_catches_a_changed_model(packaged):
    from urd.challenge import TOLERANCE, check_challenge_set
    from urd.checkpoint import load_model
    from urd.scoring import torch_scorer

    bundle = packaged / "bundle"
    challenge = json.loads((bundle / "challenge.json").read_text())
    metadata = json.loads((bundle / METADATA_FILE).read_text())
    assert set(challenge["formats"]) >= {"torch", "onnx"}
    kinds = [e["kind"] for e in challenge["images"]]
    assert "normal" in kinds and all((bundle / e["file"]).is_file() for e in challenge["images"])
    review, image = challenge["thresholds"]
    assert review <= image == pytest.approx(metadata["thresholds"]["image_threshold"])
    for e in challenge["images"]:
        for fmt, score in e["scores"].items():
            assert min(abs(score - review), abs(score - image)) > TOLERANCE["abs"]  # no decision on a knife edge
            assert e["decisions"][fmt] == ("reject" if score >= image else "review" if score >= review else "accept")

    onnx = OnnxBundle(bundle, metadata)
    result = check_challenge_set(bundle, onnx.score, "onnx")
    assert result.passed and result.images == len(challenge["images"]) and result.max_deviation < 1e-5, result.reason
    graph, _ = load_model(bundle)
    assert check_challenge_set(bundle, torch_scorer(graph, torch.device("cpu")), "torch").passed

    def drifted(images):  # a model whose scores moved by more than the tolerance
        maps, scores = onnx.score(images)
        return maps, scores * 1.01 + 0.01

    failed = check_challenge_set(bundle, drifted, "onnx")
    assert not failed.passed and "recorded" in failed.reason and failed.max_deviation > 0.01
    assert not check_challenge_set(bundle, onnx.score, "tensorrt").passed  # no recorded scores for that format
