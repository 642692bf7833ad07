"""Continual-learning strategies and dashboards as Lightning callbacks."""

from mneme.callbacks.adversarial import AdversarialTraining, RobustAccuracy
from mneme.callbacks.augmentation import InputNoise, MixUp, SpecAugment
from mneme.callbacks.checkpoint import ExperienceCheckpoint
from mneme.callbacks.continual_metrics import ContinualMetrics
from mneme.callbacks.cost import ExperienceCost
from mneme.callbacks.cpu_threads import AutoCpuThreads
from mneme.callbacks.der import DER
from mneme.callbacks.embedding_projector import EmbeddingProjector
from mneme.callbacks.ewc import EWC
from mneme.callbacks.experience import ExperienceCallback
from mneme.callbacks.feature_distillation import FeatureDistillation
from mneme.callbacks.fewshot_metrics import FewShotMetrics
from mneme.callbacks.finite_loss import FiniteLossGuard, NonFiniteLossError
from mneme.callbacks.lwf import LwF
from mneme.callbacks.mmd import MMDAdaptation
from mneme.callbacks.progress import StreamProgressBar
from mneme.callbacks.pruning import Pruning
from mneme.callbacks.quantization import Quantization
from mneme.callbacks.replay import Replay
from mneme.callbacks.teacher_distillation import TeacherDistillation
from mneme.callbacks.unfreeze import ProgressiveUnfreezing

__all__ = [
    "AdversarialTraining",
    "AutoCpuThreads",
    "InputNoise",
    "MixUp",
    "RobustAccuracy",
    "SpecAugment",
    "EmbeddingProjector",
    "FeatureDistillation",
    "FewShotMetrics",
    "EWC",
    "ContinualMetrics",
    "DER",
    "ExperienceCallback",
    "ExperienceCheckpoint",
    "ExperienceCost",
    "FiniteLossGuard",
    "NonFiniteLossError",
    "ProgressiveUnfreezing",
    "Pruning",
    "Quantization",
    "LwF",
    "MMDAdaptation",
    "Replay",
    "StreamProgressBar",
    "TeacherDistillation",
]
