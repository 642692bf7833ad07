"""MMDAdaptation on permuted MNIST-10k: the next domain's accuracy with and without MMD.

While experience k trains, MMDAdaptation draws unlabelled training inputs of experience k+1
and pulls the two feature distributions together. "Target accuracy" is the accuracy on
test experience k+1 right after training experience k (before any label of k+1 is seen),
averaged over k; also the final average accuracy and forgetting. Same MLP 784-400-400-10,
SGD lr 0.01 momentum 0.9, batch 64 as :mod:`benchmarks.vs_avalanche`.

    OMP_NUM_THREADS=1 python -m benchmarks.mmd --epochs 1 --experiences 3 --lambdas 0,1,10
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from functools import partial

import numpy as np
import torch

from benchmarks.plain import DEFAULT_DATA


def run(path: str, lambda_: float, seed: int, epochs: int, n_experiences: int) -> dict:
    from lightning.pytorch import Trainer, seed_everything
    from mneme.app import ContinualClassifier
    from mneme.callbacks import ContinualMetrics, MMDAdaptation
    from mneme.datamodules import ContinualDataModule

    seed_everything(seed, verbose=False)
    data = ContinualDataModule(
        benchmark="mneme.datamodules.PermutedMNISTFile",
        benchmark_args={"path": path, "n_experiences": n_experiences, "seed": 0},
        epochs_per_experience=epochs,
        batch_size=64,
        seed=seed,
    )
    model = ContinualClassifier(
        encoder="mneme_mlp",
        encoder_args={"hidden": [400, 400]},
        optimizer=partial(torch.optim.SGD, lr=0.01, momentum=0.9),
    )
    metrics = ContinualMetrics(print_table=False)
    strategies = [MMDAdaptation(lambda_=lambda_, target_batch_size=64)] if lambda_ > 0 else []
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[metrics, *strategies],
        **data.trainer_settings(),
    )
    t0 = time.perf_counter()
    trainer.fit(model, data)
    wall = time.perf_counter() - t0
    m = np.asarray(metrics.rows)
    k = len(m) - 1
    return {
        "lambda": lambda_,
        "target_accuracy": round(float(np.mean([m[i, i + 1] for i in range(k)])), 4),
        "per_step_target": [round(float(m[i, i + 1]), 3) for i in range(k)],
        "average_accuracy": round(float(m[k].mean()), 4),
        "forgetting": round(float(np.mean([m[:k, j].max() - m[k, j] for j in range(k)])), 4),
        "fit_s": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default=str(DEFAULT_DATA))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--experiences", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lambdas", default="0,1,10")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows = []
    for lam in [float(x) for x in args.lambdas.split(",")]:
        row = run(args.path, lam, args.seed, args.epochs, args.experiences)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("| MMD lambda | next-domain acc | per k | avg acc | forgetting | fit s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['lambda']:g} | {r['target_accuracy']:.3f} | {r['per_step_target']} | "
            f"{r['average_accuracy']:.3f} | {r['forgetting']:.3f} | {r['fit_s']} |"
        )
    return rows


if __name__ == "__main__":
    main()
