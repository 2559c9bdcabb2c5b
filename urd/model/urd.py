"""The Expert-Teacher-Student network of URD and its inference graph.

Training (Fig. 3a):  expert E (frozen)  ->  F_E
                     teacher T (trained) -> F_T -> student S = OCBE + decoder (+ GII) -> F_S
Inference (Fig. 5):  teacher -> student -> anomaly map -> image score; the expert is not part of it.
"""

from __future__ import annotations

import copy
from typing import Iterator

from torch import Tensor, nn

from .anomaly_map import AnomalyMap, image_score
from .backbone import Encoder, backbone_spec, build_encoder, estimate_batchnorm_statistics
from .bottleneck import OCBE
from .decoder import Decoder


class Student(nn.Module):
    """Bottleneck (OCBE) + mirrored decoder with GII: [F_T^1..3] -> [F_S^1..3], same shapes.

    ``width`` scales the embedding and the decoder stages; output heads map them back to the
    teacher's widths (also added for backbones whose features are signed, see urd/model/decoder.py).
    Every Conv2d starts from ``xavier_normal_`` weights, as in the authors' release (the paper is
    silent; PyTorch's default init gives weights with a smaller std)."""

    def __init__(self, backbone: str, gii: str = "gii", width: int = 1) -> None:
        super().__init__()
        spec = backbone_spec(backbone)
        self.bottleneck = OCBE(spec.widths, spec.block, spec.base_width, width)
        self.decoder = Decoder(spec.block, spec.widths, spec.decoder_blocks, gii=gii, base_width=spec.base_width,
                               width=width, heads=spec.signed_features)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_normal_(module.weight)

    def forward(self, teacher: list[Tensor]) -> list[Tensor]:
        return self.decoder(self.bottleneck(teacher), teacher)


class InferenceGraph(nn.Module):
    """What a deployed model runs: images B x 3 x S x S (normalised) -> (anomaly map B x 1 x S x S, score B)."""

    def __init__(self, teacher: Encoder, student: Student, anomaly_map: AnomalyMap) -> None:
        super().__init__()
        self.teacher = teacher
        self.student = student
        self.anomaly_map = anomaly_map

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        teacher = self.teacher(images)
        amap = self.anomaly_map(teacher, self.student(teacher))
        return amap, image_score(amap)


class URD(InferenceGraph):
    """Teacher, student and anomaly map, plus the frozen expert used in training only.

    With ``expert=True`` the expert is a frozen copy of the teacher's initial weights and the teacher
    is trained on its own optimizer; ``teacher_batchnorm="frozen"`` keeps the teacher's BatchNorm
    statistics at the backbone's own while it learns (the release lets them follow the batches, which
    mix synthetic anomalies). With ``expert=False`` the teacher stays frozen, as in RD.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        weights: str = "none",
        expert: bool = True,
        gii: str = "gii",
        image_size: int = 256,
        blur_sigma: float = 4.0,
        teacher_batchnorm: str = "train",
        student_width: int = 1,
        blur_border: str = "mirror",
    ) -> None:
        if image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 (got {image_size})")
        teacher = build_encoder(backbone, weights)
        super().__init__(teacher, Student(backbone, gii, student_width), AnomalyMap(image_size, blur_sigma, blur_border))
        self.backbone = backbone
        if teacher_batchnorm not in ("train", "frozen"):
            raise ValueError(f"teacher_batchnorm must be 'train' or 'frozen' (got {teacher_batchnorm!r})")
        self.teacher_batchnorm = teacher_batchnorm
        self.expert: Encoder | None = None
        if expert:
            self.expert = copy.deepcopy(teacher).requires_grad_(False).eval()
        else:
            self.teacher.requires_grad_(False)

    @property
    def teacher_trainable(self) -> bool:
        return self.expert is not None

    def train(self, mode: bool = True) -> URD:
        super().train(mode)
        if self.expert is not None:
            self.expert.eval()  # the expert's BN statistics never move
        if not self.teacher_trainable or self.teacher_batchnorm == "frozen":
            self.teacher.eval()
        return self

    def teacher_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the teacher optimizer (empty when the teacher is frozen)."""
        return (p for p in self.teacher.parameters() if p.requires_grad)

    def student_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the student optimizer: bottleneck + decoder + GII."""
        return self.student.parameters()

    def init_random_backbone_statistics(self, batches) -> None:
        """For ``weights: none``: estimate the teacher's BatchNorm statistics on training images
        (see :func:`estimate_batchnorm_statistics`) and make the expert a copy of the result, so the
        expert stays a frozen copy of the teacher's initial state."""
        estimate_batchnorm_statistics(self.teacher, batches)
        if self.expert is not None:
            self.expert = copy.deepcopy(self.teacher).requires_grad_(False).eval()

    def inference_graph(self) -> InferenceGraph:
        """The deployable graph: shares teacher/student/anomaly-map modules, holds no expert."""
        return InferenceGraph(self.teacher, self.student, self.anomaly_map).eval()
