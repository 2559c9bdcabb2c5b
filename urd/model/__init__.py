"""The URD network: backbone, OCBE bottleneck, decoder with GII, losses, anomaly map."""

from .anomaly_map import AnomalyMap, GaussianBlur, image_score
from .backbone import BACKBONES, Encoder, WeightsError, build_encoder, imagenet_cache_file
from .bottleneck import OCBE
from .decoder import Decoder
from .gii import GII
from .losses import cosine_distance_map, flat_cosine_distance, student_loss, teacher_loss
from .urd import URD, InferenceGraph, Student

__all__ = [
    "BACKBONES",
    "GII",
    "OCBE",
    "URD",
    "AnomalyMap",
    "Decoder",
    "Encoder",
    "GaussianBlur",
    "InferenceGraph",
    "Student",
    "WeightsError",
    "build_encoder",
    "cosine_distance_map",
    "flat_cosine_distance",
    "image_score",
    "imagenet_cache_file",
    "student_loss",
    "teacher_loss",
]
