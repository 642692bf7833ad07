"""Mneme LightningModules: encoders, continual classifier, the CLI.

Exports resolve lazily (PEP 562) so that ``mneme --help`` does not import Lightning.
"""

import importlib

_EXPORTS = {
    "ContinualClassifier": "mneme.app.classifier",
    "ContrastiveAligner": "mneme.app.aligner",
    "MetaLearner": "mneme.app.meta_learning",
    "FewShotEvaluator": "mneme.app.fewshot_eval",
    "FusionClassifier": "mneme.app.fusion",
    "MoEHead": "mneme.app.moe",
    "PrototypicalNetwork": "mneme.app.protonet",
    # prototype heads, and the class statistics few-shot evaluation shares with them
    "ClassStatistics": "mneme.app.prototypes",
    "NCMHead": "mneme.app.prototypes",
    "RanPACHead": "mneme.app.prototypes",
    "SimpleCILHead": "mneme.app.prototypes",
    "class_means": "mneme.app.prototypes",
    "prototype_logits": "mneme.app.prototypes",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
