"""Continual-learning strategies and dashboards as Lightning callbacks.

``strategies/`` change what the model learns across experiences (Replay, EWC, LwF, DER,
distillation, MMD); ``training/`` change how a batch is trained (augmentation, adversarial
examples, unfreezing); ``compression/`` prune and quantize; ``reporting/`` measure and show
(the accuracy matrix, cost, projector, progress); ``runtime/`` keep a run safe (checkpoints,
non-finite loss, CPU threads). ``base`` holds :class:`ExperienceCallback`.

Exports resolve lazily (PEP 562): importing one callback module loads that one only.
"""

from mneme.app.core.lazy_exports import lazy_exports

_EXPORTS = {
    "AdversarialTraining": "mneme.callbacks.training.adversarial",
    "AutoCpuThreads": "mneme.callbacks.runtime.cpu_threads",
    "ChangesTraining": "mneme.callbacks.base",
    "ContinualMetrics": "mneme.callbacks.reporting.continual_metrics",
    "DER": "mneme.callbacks.strategies.der",
    "EWC": "mneme.callbacks.strategies.ewc",
    "EmbeddingProjector": "mneme.callbacks.reporting.embedding_projector",
    "ExperienceCallback": "mneme.callbacks.base",
    "ExperienceCheckpoint": "mneme.callbacks.runtime.checkpoint",
    "ExperienceCost": "mneme.callbacks.reporting.cost",
    "FeatureDistillation": "mneme.callbacks.strategies.feature_distillation",
    "FewShotMetrics": "mneme.callbacks.reporting.fewshot_metrics",
    "FiniteLossGuard": "mneme.callbacks.runtime.finite_loss",
    "InputNoise": "mneme.callbacks.training.augmentation",
    "LoRAMerging": "mneme.callbacks.strategies.lora_merging",
    "LwF": "mneme.callbacks.strategies.lwf",
    "MMDAdaptation": "mneme.callbacks.strategies.mmd",
    "MixUp": "mneme.callbacks.training.augmentation",
    "NonFiniteLossError": "mneme.callbacks.runtime.finite_loss",
    "OLoRA": "mneme.callbacks.strategies.olora",
    "PredictionWriter": "mneme.callbacks.reporting.predictions",
    "ProgressiveUnfreezing": "mneme.callbacks.training.unfreeze",
    "Pruning": "mneme.callbacks.compression.pruning",
    "Quantization": "mneme.callbacks.compression.quantization",
    "Replay": "mneme.callbacks.strategies.replay",
    "RobustAccuracy": "mneme.callbacks.training.adversarial",
    "SpecAugment": "mneme.callbacks.training.spec_augment",
    "StreamProgressBar": "mneme.callbacks.reporting.progress",
    "TeacherDistillation": "mneme.callbacks.strategies.teacher_distillation",
    "TokenLwF": "mneme.callbacks.strategies.token_lwf",
}
__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
