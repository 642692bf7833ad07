"""Mneme LightningModules: encoders, continual classifier, the CLI.

Exports resolve lazily (PEP 562) so that ``mneme --help`` does not import Lightning.
"""

from mneme.app.core.lazy_exports import lazy_exports

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

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
