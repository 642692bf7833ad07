"""Batch augmentation on split MNIST-10k with replay: MixUp, CutMix (timm's ``Mixup``) and
input noise against none, with replayed rows augmented or not (``apply_to``); clean accuracy,
forgetting, robust accuracy under PGD-10 (L-inf, eps 0.1) and training time.

Each run: ``lightning.pytorch.Trainer`` + ``ContinualDataModule`` (``SplitMNISTFile``, 5
experiences) + ``ContinualClassifier`` (MLP 784-400-400-10, SGD lr 0.01 momentum 0.9, batch
64) + ``ContinualMetrics`` + ``Replay`` (class-balanced, 500, placed before the augmentation
so its rows are in the batch) + the augmentation + ``RobustAccuracy`` (PGD-10 eps 0.1 on the
whole test stream); training time = the train epochs (ExperienceCost). Figures are of the
last row of each matrix (after the last experience, averaged over the five test experiences).

Quick run (a few minutes on one thread)::

    OMP_NUM_THREADS=1 python -m benchmarks.augmentation
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from collections.abc import Callable
from typing import Any

from lightning.pytorch import Trainer
from mneme.callbacks import (
    ContinualMetrics,
    ExperienceCost,
    InputNoise,
    MixUp,
    Replay,
    RobustAccuracy,
)

from benchmarks.plain import DEFAULT_DATA, split_mnist_mlp

# name -> the augmentation callbacks (None: no augmentation). Noise is in the stream's units
# (MNIST standardized: std 1 is one pixel standard deviation, about 0.31 in [0, 1] pixels).
VARIANTS: dict[str, Callable[[], list[Any]]] = {
    "none": lambda: [],
    "MixUp 0.2, all rows": lambda: [MixUp(mixup_alpha=0.2)],
    "MixUp 0.2, current rows": lambda: [MixUp(mixup_alpha=0.2, apply_to="current")],
    "MixUp 0.2 + smoothing 0.1": lambda: [MixUp(mixup_alpha=0.2, label_smoothing=0.1)],
    "CutMix 1.0": lambda: [MixUp(mixup_alpha=0.0, cutmix_alpha=1.0)],
    "Gaussian noise std 0.3": lambda: [InputNoise(kind="gaussian", std=0.3)],
    "dropout noise p 0.2": lambda: [InputNoise(kind="dropout", p=0.2)],
}


def run(name: str, epochs: int, data: str, seed: int) -> dict:
    model, datamodule = split_mnist_mlp(data, epochs, seed)
    metrics, cost = ContinualMetrics(print_table=False), ExperienceCost()
    robust = RobustAccuracy(eps=0.1, steps=10)
    augment = VARIANTS[name]()
    # apply_to: current needs Replay to mark the stream's rows
    current = any(getattr(a, "apply_to", "all") == "current" for a in augment)
    replay = Replay(buffer_size=500, policy="class_balanced", mark_current_rows=current)
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[metrics, cost, replay, *augment, robust],
        **datamodule.trainer_settings(),
    )
    trainer.fit(model, datamodule)
    clean, adv = metrics.summary(), robust.summary()
    return {
        "augmentation": name,
        "average_accuracy": clean["average_accuracy"],
        "forgetting": clean["forgetting"],
        "robust_0.1": adv["average_accuracy"],
        "train_s": sum(row["train_seconds"] for row in cost.rows),
    }


def table(results: list[dict]) -> str:
    lines = [
        "| augmentation (after Replay) | accuracy | forgetting | PGD-10 acc eps 0.1 | train s |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['augmentation']} | {r['average_accuracy']:.3f} | {r['forgetting']:.3f} | "
            f"{r['robust_0.1']:.3f} | {r['train_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2, help="epochs per experience")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the mnist10k.npz file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here too")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    results = [run(name, args.epochs, args.data, args.seed) for name in args.variants]
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
