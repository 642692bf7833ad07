"""Mneme LightningModules: encoders, continual classifier, the CLI.

Exports resolve lazily (PEP 562) so that ``mneme --help`` does not import Lightning.
"""

import importlib

_EXPORTS = {
    "ContinualClassifier": "mneme.app.models.classifier",
    "ContrastiveAligner": "mneme.app.models.aligner",
    "ContinualLM": "mneme.app.models.lm",
    "MetaLearner": "mneme.app.models.fewshot.maml",
    "FewShotEvaluator": "mneme.app.models.fewshot.evaluator",
    "FusionClassifier": "mneme.app.models.fusion",
    "MoEHead": "mneme.app.nn.heads.moe",
    "PrototypicalNetwork": "mneme.app.models.fewshot.protonet",
    # prototype heads, and the class statistics few-shot evaluation shares with them
    "ClassStatistics": "mneme.app.nn.heads.prototypes",
    "NCMHead": "mneme.app.nn.heads.prototypes",
    "RanPACHead": "mneme.app.nn.heads.prototypes",
    "SimpleCILHead": "mneme.app.nn.heads.prototypes",
    "class_means": "mneme.app.nn.heads.prototypes",
    "prototype_logits": "mneme.app.nn.heads.prototypes",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
