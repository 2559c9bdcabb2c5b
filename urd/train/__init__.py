"""One category's training: the step (step.py), the resumable loop (loop.py) and the lifecycle rule
of a model folder (lifecycle.py)."""

from .lifecycle import TrainingPlan, data_fingerprint, plan_training, resume_problem
from .loop import train_category
from .step import FEATURE_CACHE_LIMIT_BYTES, FrozenFeatureCache, Optimizers, make_optimizers, phase, student_pass, train_step

__all__ = [
    "FEATURE_CACHE_LIMIT_BYTES",
    "FrozenFeatureCache",
    "Optimizers",
    "TrainingPlan",
    "data_fingerprint",
    "make_optimizers",
    "phase",
    "plan_training",
    "resume_problem",
    "student_pass",
    "train_category",
    "train_step",
]
