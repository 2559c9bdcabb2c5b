import torch

import urd.model.gii as gii_module
from urd.model.gii import GII, feature_similarity


def _inputs(requires_grad=False):
    torch.manual_seed(1)
    low = torch.randn(2, 8, 8, 8, requires_grad=requires_grad)
    high = torch.randn(2, 16, 4, 4, requires_grad=requires_grad)
    student = torch.randn(2, 16, 4, 4, requires_grad=requires_grad)
    return low, high, student


def _force_sim(monkeypatch, value):
    monkeypatch.setattr(gii_module, "feature_similarity", lambda t, s: torch.full_like(s[:, :1], value))


def test_sim_one_injects_the_fused_teacher_path(monkeypatch):
    module = GII(8, 16).eval()
    low, high, student = _inputs()
    _force_sim(monkeypatch, 1.0)
    with torch.no_grad():
        out = module(low, high, student)
        fused = module.fuse(module.project(module.down(low)) + high)
        expected = module.merge(torch.cat([module.attend(fused), student], dim=1))
        changed_teacher = module(torch.randn_like(low), high, student)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, changed_teacher)  # the teacher path is what gets injected


def test_sim_zero_injects_the_student_path_only(monkeypatch):
    module = GII(8, 16).eval()
    low, high, student = _inputs()
    _force_sim(monkeypatch, 0.0)
    with torch.no_grad():
        out = module(low, high, student)
        expected = module.merge(torch.cat([module.attend(student), student], dim=1))
        other_teacher = module(torch.randn_like(low), torch.randn_like(high), student)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, other_teacher)  # nothing of the teacher leaks in


def test_no_gradient_flows_through_sim(monkeypatch):
    module = GII(8, 16)
    low, high, student = _inputs(requires_grad=True)
    sim = feature_similarity(high, student)
    assert not sim.requires_grad
    grads = torch.autograd.grad(module(low, high, student).sum(), [high, student])
    # Same forward value with Sim replaced by a constant: gradients must not change.
    monkeypatch.setattr(gii_module, "feature_similarity", lambda t, s: sim.clone())
    grads_const = torch.autograd.grad(module(low, high, student).sum(), [high, student])
    for g, c in zip(grads, grads_const):
        torch.testing.assert_close(g, c)


def test_sim_is_per_pixel_cosine():
    a = torch.zeros(1, 2, 1, 2)
    b = torch.zeros(1, 2, 1, 2)
    a[0, :, 0, 0] = torch.tensor([1.0, 0.0])
    b[0, :, 0, 0] = torch.tensor([1.0, 0.0])  # same direction -> 1
    a[0, :, 0, 1] = torch.tensor([1.0, 0.0])
    b[0, :, 0, 1] = torch.tensor([0.0, 3.0])  # orthogonal -> 0
    torch.testing.assert_close(feature_similarity(a, b), torch.tensor([[[[1.0, 0.0]]]]))


def test_skip_mode_is_the_plain_fused_skip_connection():
    module = GII(8, 16, gated=False).eval()
    low, high, student = _inputs()
    with torch.no_grad():
        fused = module.fuse(module.project(module.down(low)) + high)
        torch.testing.assert_close(module(low, high, student), module.merge(torch.cat([fused, student], dim=1)))


def test_every_gii_conv_is_conv_bn_relu_like_the_release():
    import math

    from torch import nn

    from urd.model.gii import GII
    from urd.model.urd import Student

    module = GII(8, 16)
    for name in ("project", "fuse", "attend", "merge"):
        conv, bn, relu = getattr(module, name)
        assert isinstance(conv, nn.Conv2d) and conv.bias is None and isinstance(bn, nn.BatchNorm2d) and isinstance(relu, nn.ReLU), name
    assert module.project[0].kernel_size == (1, 1) and module.fuse[0].kernel_size == (3, 3)
    # the student's convs start from xavier_normal_ (release), not PyTorch's default
    torch.manual_seed(0)
    conv = Student("resnet18").decoder.gii1.merge[0]
    fan_in, fan_out = conv.in_channels * 9, conv.out_channels * 9
    assert abs(conv.weight.std().item() / math.sqrt(2 / (fan_in + fan_out)) - 1) < 0.05
