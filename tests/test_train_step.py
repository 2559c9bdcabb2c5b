import contextlib
import copy

import pytest
import torch

from urd.config import TrainParams
from urd.model import URD
from urd.train import FrozenFeatureCache, make_optimizers, student_pass, train_step


def _batch(size=64, batch=2):
    normal = torch.randn(batch, 3, size, size)
    mask = torch.zeros(batch, 1, size, size)
    mask[:, :, 16:40, 20:44] = 1
    anomalous = normal * (1 - mask) + torch.randn_like(normal) * mask
    return normal, anomalous, mask


def test_one_step_trains_teacher_and_student_and_leaves_expert_bit_identical():
    model = URD("resnet18", image_size=64)
    expert_before = copy.deepcopy(model.expert.state_dict())
    teacher_before = copy.deepcopy(model.teacher.state_dict())
    student_before = copy.deepcopy(model.student.state_dict())
    opt = make_optimizers(model, TrainParams())
    losses = train_step(model, opt, *_batch(), teacher_synthetic_term=True)
    assert set(losses) == {"teacher", "student"} and all(v > 0 for v in losses.values())
    for k, v in model.expert.state_dict().items():
        assert torch.equal(v, expert_before[k]), k
    assert any(not torch.equal(v, teacher_before[k]) for k, v in model.teacher.state_dict().items() if v.is_floating_point())
    assert any(not torch.equal(v, student_before[k]) for k, v in model.student.state_dict().items() if v.is_floating_point())


def test_optimizers_hold_disjoint_parameter_groups():
    model = URD("resnet18", image_size=64)
    opt = make_optimizers(model, TrainParams(lr_teacher=1e-4, lr_student=5e-3))
    teacher_ids = {id(p) for g in opt.teacher.param_groups for p in g["params"]}
    student_ids = {id(p) for g in opt.student.param_groups for p in g["params"]}
    assert teacher_ids == {id(p) for p in model.teacher.parameters()}
    assert student_ids == {id(p) for p in model.student.parameters()}
    assert not teacher_ids & student_ids
    expert_ids = {id(p) for p in model.expert.parameters()}
    assert not expert_ids & (teacher_ids | student_ids)
    assert opt.teacher.param_groups[0]["lr"] == 1e-4 and opt.student.param_groups[0]["lr"] == 5e-3
    assert opt.student.param_groups[0]["betas"] == (0.5, 0.999)


def test_without_expert_only_the_student_trains():
    model = URD("resnet18", image_size=64, expert=False)
    teacher_before = copy.deepcopy(model.teacher.state_dict())
    opt = make_optimizers(model, TrainParams())
    assert opt.teacher is None
    losses = train_step(model, opt, *_batch())
    assert set(losses) == {"student"}
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k  # frozen, BN statistics included


class CountingTeacher(torch.nn.Module):
    """The teacher, counting the images it is asked to encode."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher
        self.images = 0

    def forward(self, x):
        self.images += len(x)
        return self.teacher(x)


def _frozen_teacher():
    model = URD("resnet18", image_size=64, expert=False)
    model.train()  # a frozen teacher stays in eval mode
    return model, CountingTeacher(model.teacher).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_feature_cache_encodes_each_image_once_and_returns_the_encoders_features(dtype):
    model, teacher = _frozen_teacher()
    images = torch.randn(6, 3, 64, 64)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)  # noqa: E731
    with torch.no_grad(), autocast():
        expected = model.teacher(images)
    cache = FrozenFeatureCache(num_images=6)
    first = cache(teacher, images[[0, 1, 2]], torch.tensor([0, 1, 2]), autocast())
    # image 4 is new: the batch is encoded whole, as an uncached step would (same rounding)
    again = cache(teacher, images[[2, 4, 0]], torch.tensor([2, 4, 0]), autocast())
    assert teacher.images == 6 and cache.enabled
    for got, want in zip(first, expected):
        assert got.dtype == dtype and torch.equal(got, want[[0, 1, 2]])
    for got, want in zip(again, expected):
        assert torch.equal(got, want[[2, 4, 0]])
    last = cache(teacher, images[[4, 1]], torch.tensor([4, 1]), autocast())
    assert teacher.images == 6
    for got, want in zip(last, again):
        assert torch.equal(got[0], want[1])


def test_feature_cache_keeps_nothing_over_its_limit_and_refuses_a_trainable_teacher():
    model, teacher = _frozen_teacher()
    images = torch.randn(2, 3, 64, 64)
    cache = FrozenFeatureCache(num_images=100, limit_bytes=1000)
    for _ in range(2):
        out = cache(teacher, images, torch.tensor([0, 1]), contextlib.nullcontext())
    assert not cache.enabled and cache.features is None and teacher.images == 4
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(out, model.teacher(images)))
    trainable = URD("resnet18", image_size=64)
    trainable.train()
    with pytest.raises(ValueError, match="frozen encoder"):
        FrozenFeatureCache(2)(trainable.teacher, images, torch.tensor([0, 1]), contextlib.nullcontext())


@pytest.mark.parametrize("encoder, expert, wrong_error", [
    ("teacher", False, "frozen"),  # with the expert on, the teacher learns: its features change every step
    ("expert", True, "no expert"),
])
def test_known_frozen_features_give_the_same_step(encoder, expert, wrong_error):
    normal, anomalous, mask = _batch()
    runs = []
    for known in (False, True):
        torch.manual_seed(0)
        model = URD("resnet18", image_size=64, expert=expert)
        opt = make_optimizers(model, TrainParams())
        model.train()
        features = None
        if known:
            with torch.no_grad():
                features = getattr(model, encoder)(normal)
        losses = train_step(model, opt, normal, anomalous, mask, **{f"{encoder}_normal": features})
        runs.append((losses, model.state_dict()))
    assert runs[0][0] == runs[1][0] and set(runs[0][0]) == ({"teacher", "student"} if expert else {"student"})
    assert all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())
    model = URD("resnet18", image_size=64, expert=not expert)  # where such features cannot be right
    with pytest.raises(ValueError, match=wrong_error):
        train_step(model, make_optimizers(model, TrainParams()), normal, anomalous, mask, **{f"{encoder}_normal": [normal]})


def test_student_pass_splits_one_pass_over_both_batches_back_into_normal_and_synthetic():
    torch.manual_seed(0)
    model = URD("resnet18", image_size=64)
    normal, anomalous, _ = _batch(batch=3)
    with torch.no_grad():
        t_n, t_a = model.teacher(normal), model.teacher(anomalous)
        model.eval()  # running statistics: each image's output depends on itself only
        s_n, s_a = student_pass(model, t_n, t_a)
        for joint, alone in ((s_n, model.student(t_n)), (s_a, model.student(t_a))):
            assert [f.shape for f in joint] == [f.shape for f in alone]
            assert all(torch.allclose(j, a, atol=1e-5) for j, a in zip(joint, alone))
        assert not torch.allclose(s_n[0], s_a[0], atol=1e-3)  # the halves are not the same images
        only_normal, none = student_pass(model, t_n, None)
        assert none is None and all(torch.allclose(j, a, atol=1e-5) for j, a in zip(only_normal, s_n))
        # In train mode BatchNorm's batch statistics cover all 2B images, as for one batch of 2B.
        model.train()
        first_bn = next(m for m in model.student.modules() if isinstance(m, torch.nn.BatchNorm2d))
        first_bn.reset_running_stats()
        first_bn.momentum = 1.0  # running_mean = the last batch's mean
        student_pass(model, t_n, t_a)
        joint_mean = first_bn.running_mean.clone()
        first_bn.reset_running_stats()
        model.student([torch.cat(pair) for pair in zip(t_n, t_a)])
        assert torch.allclose(joint_mean, first_bn.running_mean)
        model.student(t_n)
        assert not torch.allclose(joint_mean, first_bn.running_mean)


@pytest.mark.parametrize("passes, calls", [("joint", [4]), ("separate", [2, 2])])
def test_student_passes_joint_or_separate_as_the_release(passes, calls):
    torch.manual_seed(0)
    model = URD("resnet18", image_size=64)
    seen = []
    model.student.register_forward_hook(lambda module, args, out: seen.append(args[0][0].shape[0]))
    train_step(model, make_optimizers(model, TrainParams()), *_batch(), student_passes=passes)
    assert seen == calls  # one pass over 2B images, or one per batch of B
    with pytest.raises(ValueError, match="student_passes"):
        train_step(model, make_optimizers(model, TrainParams()), *_batch(), student_passes="both")


def test_separate_passes_normalise_each_batch_on_its_own():
    torch.manual_seed(0)
    joint = URD("resnet18", image_size=64)
    separate = copy.deepcopy(joint)
    batch = _batch()
    a = train_step(joint, make_optimizers(joint, TrainParams()), *batch, student_passes="joint")
    b = train_step(separate, make_optimizers(separate, TrainParams()), *batch, student_passes="separate")
    assert a["teacher"] == b["teacher"]  # the teacher step is the same
    assert a["student"] != b["student"]  # BatchNorm statistics over both batches or over each
