"""An independent statement of one training step of the authors' release
(https://github.com/hito2448/URD at commit 95dd027), written from its equations in plain torch:

* expert features of I_n and I_a without gradient;
* teacher in train mode: L_T = sum over the three scales of mean(1 - cos(T(I_n), E(I_n))) +
  mean|1 - cos(T(I_a), E(I_n)) - M| + (1 - cos of the flattened T(I_a), E(I_a)), M cascaded
  full -> 1/4 -> 1/8 -> 1/16 (bilinear, align_corners, >= 0.5); one Adam step;
* teacher in eval mode, its features of I_n and I_a recomputed without gradient;
* student run once on T(I_n) and once on T(I_a); L_S = sum over scales of the flattened cosine
  distances S(I_n)~T(I_n), S(I_a)~T(I_n), S(I_n)~E(I_n), S(I_a)~E(I_n); one Adam step.

Cosines are taken in fp32, as urd does. ``python -m tests.release_step`` writes the stored
reference (tests/data/release_step_reference.json) that tests/test_paper_profile.py checks the
profile's step against; it is computed once and committed, so neither side can drift unnoticed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

REFERENCE = Path(__file__).resolve().parent / "data" / "release_step_reference.json"


def fixed_setup():
    """A small Expert-Teacher-Student network as the paper profile builds it (resnet18 instead of
    wide_resnet50_2, 64 px, random weights, float64), a fixed batch of 2 and its synthetic mask."""
    from urd.model import URD

    torch.manual_seed(1234)
    model = URD("resnet18", "none", expert=True, gii="skip", image_size=64, blur_sigma=1.0, teacher_batchnorm="train",
                blur_border="reflect").double()
    g = torch.Generator().manual_seed(99)
    normal = torch.rand(2, 3, 64, 64, generator=g, dtype=torch.float64)
    mask = (torch.rand(2, 1, 8, 8, generator=g) > 0.6).double()
    mask = F.interpolate(mask, size=(64, 64), mode="nearest")
    texture = torch.rand(2, 3, 64, 64, generator=g, dtype=torch.float64)
    anomalous = normal + 0.7 * mask * (texture - normal)
    return model, normal, anomalous, mask


def _cos_map(a, b):
    return 1 - F.cosine_similarity(a.float(), b.float(), dim=1)


def _cos_flat(a, b):
    return (1 - F.cosine_similarity(a.float().flatten(1), b.float().flatten(1), dim=1)).mean()


def release_step(model, normal, anomalous, mask, lr_teacher=1e-4, lr_student=5e-3) -> dict:
    """One step of the release on ``model`` (changed in place): losses and every gradient."""
    teacher, expert, student = model.teacher, model.expert, model.student
    opt_t = torch.optim.Adam(teacher.parameters(), lr=lr_teacher, betas=(0.5, 0.999))
    opt_s = torch.optim.Adam(student.parameters(), lr=lr_student, betas=(0.5, 0.999))
    expert.eval()
    with torch.no_grad():
        e_n, e_a = expert(normal), expert(anomalous)
    teacher.train()
    student.train()
    t_n, t_a = teacher(normal), teacher(anomalous)
    loss_t = 0
    m = mask
    for tn, ta, en, ea in zip(t_n, t_a, e_n, e_a):
        m = (F.interpolate(m, size=tn.shape[-2:], mode="bilinear", align_corners=True) >= 0.5).to(m.dtype)
        loss_t = loss_t + _cos_map(tn, en).mean() + (_cos_map(ta, en) - m[:, 0].float()).abs().mean() + _cos_flat(ta, ea)
    opt_t.zero_grad()
    loss_t.backward()
    teacher_grads = {k: p.grad.detach().clone() for k, p in teacher.named_parameters()}
    opt_t.step()
    teacher.eval()
    with torch.no_grad():
        t_n, t_a = [f.detach() for f in teacher(normal)], [f.detach() for f in teacher(anomalous)]
    s_n, s_a = student(t_n), student(t_a)
    loss_s = 0
    for sn, sa, tn, en in zip(s_n, s_a, t_n, e_n):
        loss_s = loss_s + _cos_flat(sn, tn) + _cos_flat(sa, tn) + _cos_flat(sn, en) + _cos_flat(sa, en)
    opt_s.zero_grad()
    loss_s.backward()
    student_grads = {k: p.grad.detach().clone() for k, p in student.named_parameters()}
    opt_s.step()
    return {"teacher_loss": loss_t.item(), "student_loss": loss_s.item(),
            "grads": {**{f"teacher.{k}": v for k, v in teacher_grads.items()}, **{f"student.{k}": v for k, v in student_grads.items()}}}


def fingerprint(result: dict) -> dict:
    """What is stored: the losses, and per gradient tensor its sum and its L2 norm (float64)."""
    return {"teacher_loss": result["teacher_loss"], "student_loss": result["student_loss"],
            "grads": {k: [float(g.double().sum()), float(g.double().norm())] for k, g in result["grads"].items()}}


if __name__ == "__main__":
    model, normal, anomalous, mask = fixed_setup()
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE.write_text(json.dumps(fingerprint(release_step(model, normal, anomalous, mask)), indent=1) + "\n")
    print(f"wrote {REFERENCE}")
