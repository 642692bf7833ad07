"""Continual-learning strategies and dashboards as Lightning callbacks."""

from callbacks.continual_metrics import ContinualMetrics
from callbacks.embedding_projector import EmbeddingProjector
from callbacks.ewc import EWC
from callbacks.experience import ExperienceCallback
from callbacks.feature_distillation import FeatureDistillation
from callbacks.finite_loss import FiniteLossGuard, NonFiniteLossError
from callbacks.lwf import LwF
from callbacks.replay import Replay

__all__ = [
    "EmbeddingProjector",
    "FeatureDistillation",
    "EWC",
    "ContinualMetrics",
    "ExperienceCallback",
    "FiniteLossGuard",
    "NonFiniteLossError",
    "LwF",
    "Replay",
]
