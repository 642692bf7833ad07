"""Robust accuracy under PGD-10 (L-inf, eps 0.1 and 0.3, MNIST pixels in [0, 1]) of
standard against adversarial (Madry-style PGD) training, clean accuracy beside it, and the
training-time cost, on split MNIST-10k (5 experiences, Replay of 500 in every run).

Each run: ``lightning.pytorch.Trainer`` + ``ContinualDataModule`` (``SplitMNISTFile``) +
``ContinualClassifier`` (MLP 784-400-400-10, SGD lr 0.01 momentum 0.9, batch 64) +
``ContinualMetrics`` + ``Replay`` (+ ``AdversarialTraining``), in process, with a
``RobustAccuracy`` per evaluation eps; training time = the train epochs (ExperienceCost),
evaluation excluded. Figures are of the last row of each matrix (after the last experience,
averaged over the five test experiences); robust forgetting from the robust matrix.

Quick run (about a minute and a half on one thread)::

    OMP_NUM_THREADS=1 python -m benchmarks.robustness
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from typing import Any

from lightning.pytorch import Trainer
from mneme.callbacks import (
    AdversarialTraining,
    ContinualMetrics,
    ExperienceCost,
    Replay,
    RobustAccuracy,
)

from benchmarks.plain import DEFAULT_DATA, split_mnist_mlp

EVAL_EPS = (0.1, 0.3)


def run(train_eps: float | None, train_steps: int, epochs: int, data: str, seed: int) -> dict:
    """One fit; ``train_eps`` None is standard training."""
    model, datamodule = split_mnist_mlp(data, epochs, seed)
    metrics = ContinualMetrics(print_table=False)
    cost = ExperienceCost()
    robust = [RobustAccuracy(eps=eps, steps=10) for eps in EVAL_EPS]
    strategies: list[Any] = [Replay(buffer_size=500, policy="class_balanced")]
    if train_eps is not None:
        strategies.append(AdversarialTraining(eps=train_eps, steps=train_steps))
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[metrics, cost, *strategies, *robust],
        **datamodule.trainer_settings(),
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule)
    wall = time.perf_counter() - start
    clean = metrics.summary()
    result = {
        "training": "standard" if train_eps is None else f"PGD-{train_steps} eps {train_eps}",
        "clean_average_accuracy": clean["average_accuracy"],
        "clean_forgetting": clean["forgetting"],
        "train_s": sum(row["train_seconds"] for row in cost.rows),
        "fit_wall_s": wall,
    }
    for eps, callback in zip(EVAL_EPS, robust, strict=True):
        summary = callback.summary()
        result[f"robust_{eps}"] = summary["average_accuracy"]
        result[f"robust_{eps}_forgetting"] = summary["forgetting"]
    return result


def table(results: list[dict]) -> str:
    header = (
        "| training | clean acc | clean forgetting | PGD-10 acc eps 0.1 (forgetting) "
        "| PGD-10 acc eps 0.3 (forgetting) | train s |"
    )
    lines = [header, "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['training']} | {r['clean_average_accuracy']:.3f} | "
            f"{r['clean_forgetting']:.3f} | "
            f"{r['robust_0.1']:.3f} ({r['robust_0.1_forgetting']:.3f}) | "
            f"{r['robust_0.3']:.3f} ({r['robust_0.3_forgetting']:.3f}) | {r['train_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2, help="epochs per experience")
    p.add_argument("--train-eps", type=float, nargs="+", default=[0.1, 0.3])
    p.add_argument("--train-steps", type=int, default=5, help="PGD steps of training")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the mnist10k.npz file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here too")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    results = [run(None, args.train_steps, args.epochs, args.data, args.seed)]
    for eps in args.train_eps:
        results.append(run(eps, args.train_steps, args.epochs, args.data, args.seed))
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
