"""TensorBoard's embedding projector for aligned modalities."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from mneme.app.core.errors import ConfigError
from mneme.app.core.protocols import Embedder, require
from mneme.app.core.seeding import run_seed
from mneme.callbacks.base import ExperienceCallback


class EmbeddingProjector(ExperienceCallback):
    """At fit end (and, with ``each_experience``, at every experience end) write the
    embeddings of a sample of the test stream to TensorBoard's Projector tab: one tensor per
    modality (``embeddings/<modality>``, labelled by class and test experience; images get
    thumbnails), and all modalities together (``embeddings/all``, labelled by class and
    modality) to see whether paired modalities share one space.

    Expects a module with ``embed(batch)`` (``ContrastiveAligner``) and a TensorBoardLogger.

    Args:
        samples_per_experience: test samples drawn from each test experience (seeded).
        each_experience: also write at each experience end (step = experience).
        seed: seed of the sample; default the run's (``seed_everything``).

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: mneme.callbacks.EmbeddingProjector
              init_args: {samples_per_experience: 100}
    """

    affects_training = False  # a dashboard: adding or dropping it keeps the run the same

    def __init__(
        self,
        samples_per_experience: int = 100,
        each_experience: bool = False,
        seed: int | None = None,
    ) -> None:
        if samples_per_experience < 1:
            raise ConfigError(
                f"EmbeddingProjector.samples_per_experience: at least 1, got "
                f"{samples_per_experience}"
            )
        self.samples_per_experience = samples_per_experience
        self.each_experience = each_experience
        self.seed = seed

    def sample(self, trainer: Trainer) -> dict[str, torch.Tensor]:
        """A seeded sample of every test experience, with an ``experience`` field."""
        generator = torch.Generator().manual_seed(run_seed(self.seed))
        parts = []
        for j, exp in enumerate(trainer.datamodule.test_experiences):
            index = torch.randperm(len(exp), generator=generator)[: self.samples_per_experience]
            part = exp.read(index.sort().values)  # only the sampled ones are read
            part["experience"] = torch.full((len(index),), j)
            parts.append(part)
        return {k: torch.cat([p[k].cpu() for p in parts]) for k in parts[0]}

    @torch.no_grad()
    def write(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers or not trainer.is_global_zero:
            return
        batch = self.sample(trainer)
        was_training = pl_module.training
        pl_module.eval()
        device_batch = {k: v.to(pl_module.device) for k, v in batch.items()}
        emb = {m: e.float().cpu() for m, e in pl_module.embed(device_batch).items()}
        pl_module.train(was_training)
        self._add(loggers[0], batch, emb, step)

    @rank_zero_only
    def _add(self, logger: TensorBoardLogger, batch, emb, step: int) -> None:
        writer = logger.experiment
        labels, experiences = batch["label"].tolist(), batch["experience"].tolist()
        for m, e in emb.items():
            images = batch[m] if m == "image" and batch[m].ndim == 4 else None
            if images is not None and images.shape[1] in (1, 3):
                lo, hi = images.amin(), images.amax()
                images = ((images - lo) / (hi - lo).clamp_min(1e-8)).float()
            else:
                images = None
            writer.add_embedding(
                e,
                metadata=[[str(y), str(x)] for y, x in zip(labels, experiences, strict=True)],
                metadata_header=["label", "experience"],
                label_img=images,
                global_step=step,
                tag=f"embeddings/{m}",
            )
        writer.add_embedding(
            torch.cat(list(emb.values())),
            metadata=[[str(y), m] for m in emb for y in labels],
            metadata_header=["label", "modality"],
            global_step=step,
            tag="embeddings/all",
        )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        require(pl_module, Embedder, "EmbeddingProjector")

    def on_experience_end(self, trainer: Trainer, pl_module: LightningModule, experience: int):
        if self.each_experience:
            self.write(trainer, pl_module, experience)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.each_experience:
            self.write(trainer, pl_module, trainer.datamodule.num_experiences - 1)
