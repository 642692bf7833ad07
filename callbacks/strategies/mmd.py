"""Domain adaptation toward the next, still unlabelled, experience with a multi-kernel MMD."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch import LightningModule, Trainer
from mneme.app.core.errors import ConfigError
from mneme.app.core.protocols import (
    Embedder,
    FeatureClassifier,
    StrategyHost,
    missing_members,
    require,
)
from mneme.app.core.schedule import current_experience
from mneme.app.core.seeding import keyed_generator, run_seed
from mneme.callbacks.base import ExperienceCallback
from mneme.callbacks.run_context import rank_and_world_size
from torch import Tensor


def mmd2(source: Tensor, target: Tensor, multipliers: Sequence[float] = (0.25, 0.5, 1, 2, 4)):
    """Unbiased squared MMD between two samples, with a sum of Gaussian kernels
    ``exp(-|a - b|² / (m · median))`` over the bandwidth ``multipliers`` ``m`` times the
    median pairwise squared distance of the pooled sample (detached: the bandwidth is not
    optimised). Unbiased (Gretton et al. 2012, eq. 3): the diagonals of the within-sample
    kernel matrices are left out, so it may be slightly negative for equal distributions.

    Written by hand: torch has no MMD, and torchmetrics' only MMD is KID's polynomial-kernel
    estimate on Inception features."""
    if len(source) < 2 or len(target) < 2:
        raise ConfigError(
            "MMDAdaptation: the unbiased MMD needs at least 2 samples on each side, got "
            f"{len(source)} and {len(target)}; raise data.batch_size / target_batch_size"
        )
    pooled = torch.cat([source, target]).flatten(1)
    d2 = torch.cdist(pooled, pooled).pow(2)
    n = len(pooled)
    off = ~torch.eye(n, dtype=torch.bool, device=pooled.device)
    median = d2.detach()[off].median().clamp_min(1e-12)
    kernel = sum(torch.exp(-d2 / (m * median)) for m in multipliers)
    s = len(source)
    kss, ktt, kst = kernel[:s, :s], kernel[s:, s:], kernel[:s, s:]
    t = n - s
    within_s = (kss.sum() - kss.diagonal().sum()) / (s * (s - 1))
    within_t = (ktt.sum() - ktt.diagonal().sum()) / (t * (t - 1))
    return within_s + within_t - 2 * kst.mean()


class MMDAdaptation(ExperienceCallback):
    """Align the features of the experience being trained with those of the next one, whose
    training inputs arrive unlabelled first (domain-incremental streams, e.g. permuted MNIST,
    or spoken digits by accent for an aligner).

    During experience ``k`` each training step draws ``target_batch_size`` inputs of
    training experience ``k + 1`` (this rank's shard, uniformly, from a generator seeded by
    ``(seed, rank, global_step)``; the labels are dropped unread by the loss), encodes them
    with the model (with gradient) and adds the loss term ``mmd``::

        lambda_ * MMD²(outputs["features"], features(target inputs))

    for a classifier (``ContinualClassifier``: its encoder's features); for an aligner
    (``ContrastiveAligner``) the embeddings of its ``input_key`` modality (the zero-shot
    one, e.g. ``audio``): ``outputs["embeddings"][key]`` against the target clips' embeddings.

    with :func:`mmd2` (multi-kernel, unbiased). The last experience has no next one: the term
    is zero there. Stateless (the draws derive from the seed and the step), so a resume
    draws what an uninterrupted run would.

    Args:
        lambda_: weight of the MMD term (``> 0``).
        target_batch_size: target inputs per step (``>= 2``); default the batch size.
        multipliers: the kernel bandwidths, as multiples of the median pairwise squared
            distance.
        seed: base seed of the target draws; default the run's.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: mneme.callbacks.MMDAdaptation
              init_args: {lambda_: 1.0, target_batch_size: 64}
    """

    def __init__(
        self,
        lambda_: float = 1.0,
        target_batch_size: int | None = None,
        multipliers: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
        seed: int | None = None,
    ) -> None:
        if not lambda_ > 0:
            raise ConfigError(f"MMDAdaptation.lambda_: must be positive, got {lambda_}")
        if target_batch_size is not None and target_batch_size < 2:
            raise ConfigError(
                "MMDAdaptation.target_batch_size: the unbiased MMD needs at least 2 target "
                f"samples, got {target_batch_size}"
            )
        if not multipliers or min(multipliers) <= 0:
            raise ConfigError(
                f"MMDAdaptation.multipliers: positive bandwidth multiples, got {multipliers}"
            )
        self.lambda_ = float(lambda_)
        self.target_batch_size = target_batch_size
        self.multipliers = [float(m) for m in multipliers]
        self.seed = seed
        self._term: str | None = None
        self._trainer: Trainer | None = None
        self._module: LightningModule | None = None

    def mmd_loss(self, batch: dict[str, Tensor], outputs: dict[str, Tensor]) -> Tensor:
        """The loss term: ``lambda_ * MMD²`` toward the next experience (zero at the last)."""
        trainer, module = self._trainer, self._module
        experiences = trainer.datamodule.train_experiences
        k = current_experience(trainer)
        if k + 1 >= len(experiences) or len(self._source(module, outputs)) < 2:
            # no next domain; or an experience's last batch of one sample, where the
            # unbiased estimate is undefined: that step adds nothing
            return self._source(module, outputs).new_zeros(())
        target = experiences[k + 1]
        rank, world_size = rank_and_world_size(trainer)
        shard = torch.arange(rank, len(target), world_size)
        n = min(self.target_batch_size or len(batch[module.input_key]), len(shard))
        generator = keyed_generator(run_seed(self.seed), rank, trainer.global_step)
        index = shard[torch.randperm(len(shard), generator=generator)[:n]]
        source = self._source(module, outputs)
        x = target.read(index)[module.input_key].to(source.device)
        return self.lambda_ * mmd2(source, self._encode(module, x), self.multipliers)

    @staticmethod
    def _source(module: LightningModule, outputs: dict) -> Tensor:
        if "features" in outputs:  # a classifier
            return outputs["features"]
        return outputs["embeddings"][module.input_key]  # an aligner: the input modality's

    @staticmethod
    def _encode(module: LightningModule, x: Tensor) -> Tensor:
        if hasattr(module, "features"):
            return module.features(x, None)
        return module.embed({module.input_key: x}, [module.input_key])[module.input_key]

    # -- hooks ------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer, self._module = trainer, pl_module
        require(pl_module, StrategyHost, "MMDAdaptation")
        self._term = pl_module.add_loss_term("mmd", self.mmd_loss)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if missing_members(pl_module, Embedder) or not hasattr(pl_module, "input_key"):
            require(pl_module, FeatureClassifier, "MMDAdaptation")  # names what is missing
        data = trainer.datamodule
        experiences = data.train_experiences
        if len(experiences) < 2:
            raise ConfigError(
                "MMDAdaptation: the stream has one experience, so no next domain to adapt "
                "to; use a stream of several (data.benchmark_args.n_experiences)"
            )
        classes = [sorted(exp.classes) for exp in experiences]
        if any(c != classes[0] for c in classes):
            raise ConfigError(
                "MMDAdaptation: needs a domain-incremental stream (the same classes in every "
                "experience, e.g. mneme.datamodules.PermutedMNISTFile); data.benchmark "
                "brings new classes per experience, where aligning features mixes classes"
            )
        if (self.target_batch_size or data.batch_size) < 2 or data.batch_size < 2:
            raise ConfigError(
                f"data.batch_size: MMDAdaptation's unbiased MMD needs at least 2 samples a "
                f"batch, got {data.batch_size}"
            )

    def report_lines(self, trainer: Trainer, pl_module: LightningModule) -> list[str]:
        """The next domain's accuracy: test experience k+1 right after training k, before
        any of its labels (the accuracy matrix's first upper diagonal), printed under the
        matrix (``ContinualMetrics``)."""
        from mneme.callbacks.reporting.continual_metrics import continual_metrics

        metrics = continual_metrics(trainer)
        rows = metrics.rows if metrics is not None else []
        ahead = [row[k + 1] for k, row in enumerate(rows) if k + 1 < len(row)]
        if not ahead:
            return []
        values = ", ".join(f"{a:.3f}" for a in ahead)
        mean = sum(ahead) / len(ahead)
        return [f"MMD next-domain accuracy (exp k+1 after training k): {values} (mean {mean:.3f})"]

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._term is not None:
            pl_module.remove_loss_term(self._term)
            self._term = None
        self._trainer = self._module = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(lambda_=self.lambda_)
