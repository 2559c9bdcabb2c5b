import copy

import torch

from urd.config import TrainParams
from urd.model import URD
from urd.train import make_optimizers, train_step


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
