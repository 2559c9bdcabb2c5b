import pytest
import torch

from urd.model import URD

EXPECTED = {
    # backbone: (widths of F^1..F^3, bottleneck channels)
    "resnet18": ((64, 128, 256), 512),
    "resnet34": ((64, 128, 256), 512),
    "resnet50": ((256, 512, 1024), 2048),
    "wide_resnet50_2": ((256, 512, 1024), 2048),
    "efficientnet_lite0": ((24, 40, 112), 224),
}


@pytest.mark.parametrize("size", [128, 256])
@pytest.mark.parametrize("backbone", list(EXPECTED))
def test_feature_bottleneck_and_decoder_shapes(backbone, size):
    widths, bottleneck = EXPECTED[backbone]
    model = URD(backbone, image_size=size, gii="gii").eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        teacher = model.teacher(x)
        embedding = model.student.bottleneck(teacher)
        student = model.student(teacher)
        amap, score = model(x)
    grids = [size // 4, size // 8, size // 16]
    assert [tuple(f.shape) for f in teacher] == [(1, c, g, g) for c, g in zip(widths, grids)]
    assert tuple(embedding.shape) == (1, bottleneck, size // 32, size // 32)
    assert [tuple(f.shape) for f in student] == [tuple(f.shape) for f in teacher]
    assert tuple(amap.shape) == (1, 1, size, size) and tuple(score.shape) == (1,)


def test_wide_resnet50_2_at_256_matches_the_paper():
    model = URD("wide_resnet50_2", image_size=256).eval()
    with torch.no_grad():
        teacher = model.teacher(torch.randn(1, 3, 256, 256))
        embedding = model.student.bottleneck(teacher)
    assert [tuple(f.shape[1:]) for f in teacher] == [(256, 64, 64), (512, 32, 32), (1024, 16, 16)]
    assert tuple(embedding.shape[1:]) == (2048, 8, 8)


@pytest.mark.parametrize("gii", ["none", "skip", "gii"])
def test_gii_modes_build_the_right_modules(gii):
    model = URD("resnet18", image_size=64, gii=gii)
    decoder = model.student.decoder
    if gii == "none":
        assert decoder.gii1 is None and decoder.gii2 is None
    else:
        assert (decoder.gii1.attend is not None) == (gii == "gii")
        assert (decoder.gii2.attend is not None) == (gii == "gii")


def test_plain_rd_decoder_ignores_teacher_skip_features():
    model = URD("resnet18", image_size=64, gii="none").eval()
    with torch.no_grad():
        teacher = model.teacher(torch.randn(2, 3, 64, 64))
        embedding = model.student.bottleneck(teacher)
        a = model.student.decoder(embedding, teacher)
        b = model.student.decoder(embedding, [torch.randn_like(f) for f in teacher])
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_inference_graph_has_no_expert_and_equal_output():
    model = URD("resnet18", image_size=64).eval()
    graph = model.inference_graph()
    assert not any(k.startswith("expert") for k in graph.state_dict())
    assert any(k.startswith("expert") for k in model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(graph(x)[0], model(x)[0])


def test_expert_is_frozen_copy_and_stays_in_eval_mode():
    model = URD("resnet18", image_size=64)
    model.train()
    assert not model.expert.training and model.teacher.training
    assert all(not p.requires_grad for p in model.expert.parameters())
    for (k, e), t in zip(model.expert.state_dict().items(), model.teacher.state_dict().values()):
        assert torch.equal(e, t), k


def test_without_expert_the_teacher_is_frozen():
    model = URD("resnet18", image_size=64, expert=False)
    model.train()
    assert model.expert is None and not model.teacher.training
    assert list(model.teacher_parameters()) == []


def test_teacher_batchnorm_frozen_keeps_statistics_but_trains_the_teacher():
    torch.manual_seed(0)
    model = URD("resnet18", image_size=64, teacher_batchnorm="frozen")
    model.train()
    assert not model.teacher.training and not model.expert.training
    assert any(p.requires_grad for p in model.teacher_parameters())
    before = model.teacher.bn1.running_mean.clone()
    model.teacher.train(model.teacher_batchnorm == "train")  # what train_step does before the teacher step
    model.teacher(torch.randn(2, 3, 64, 64) + 3)
    assert torch.equal(model.teacher.bn1.running_mean, before)
    with pytest.raises(ValueError, match="teacher_batchnorm"):
        URD("resnet18", image_size=64, teacher_batchnorm="eval")


def test_signed_teacher_features_get_linear_output_heads():
    """Lite0's features are about half negative; a decoder stage ends in a ReLU, so without a linear
    head the student could never point the same way as the teacher."""
    torch.manual_seed(0)
    lite = URD("efficientnet_lite0", image_size=64).eval()
    assert lite.student.decoder.heads is not None
    with torch.no_grad():
        teacher = lite.teacher(torch.rand(2, 3, 64, 64))
        student = lite.student(teacher)
    assert all((f < 0).float().mean() > 0.2 for f in teacher)
    assert all((f < 0).any() for f in student)
    resnet = URD("resnet18", image_size=64).eval()
    assert resnet.student.decoder.heads is None  # RD's mirror, unchanged
    with torch.no_grad():
        assert all((f >= 0).all() for f in resnet.student(resnet.teacher(torch.rand(2, 3, 64, 64))))


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_wider_student_keeps_the_teacher_shapes(backbone):
    narrow = URD(backbone, image_size=64).eval()
    wide = URD(backbone, image_size=64, student_width=2).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        teacher = wide.teacher(x)
        embedding = wide.student.bottleneck(teacher)
        student = wide.student(teacher)
    assert [f.shape for f in student] == [f.shape for f in teacher]
    assert embedding.shape[1] == 2 * narrow.student.bottleneck(teacher).shape[1]
    assert wide.student.decoder.heads is not None
    assert wide.student.decoder.stage1[0].conv2.out_channels == 2 * teacher[0].shape[1]
