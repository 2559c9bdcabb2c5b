"""urd: industrial visual anomaly detection with URD (Reverse Distillation with Expert + GII)."""

__version__ = "0.1.0"
