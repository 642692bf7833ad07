"""Cross-attention vs late fusion on spoken digit + MNIST image pairs (SpokenMNIST).

Class-incremental: 5 experiences of 2 digits, each training clip paired with
``--images-per-clip`` MNIST images of its digit (test: one). Both modes use the same
encoders (log-mel + ``mneme_cnn`` [16, 32] for audio, ``mneme_cnn`` [16, 32] for images),
embed_dim 64, a linear head, AdamW lr 2e-3, batch 32 and class-balanced Replay of 200;
``cross_attention`` is one block, 4 heads, every modality querying the other. Reported:
the final row's average accuracy, forgetting, BWT, average incremental accuracy, the last
row, the fit's wall time and the parameter count, per seed and as the mean over seeds.

    OMP_NUM_THREADS=1 python -m benchmarks.fusion --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def run(mode: str, seed: int, epochs: int, images_per_clip: int, buffer: int) -> dict:
    from lightning.pytorch import Trainer, seed_everything
    from mneme.app import FusionClassifier
    from mneme.callbacks import ContinualMetrics, Replay
    from mneme.datamodules import ContinualDataModule

    seed_everything(seed, verbose=False)
    data = ContinualDataModule(
        benchmark="mneme.datamodules.SpokenMNIST",
        benchmark_args={
            "audio_path": str(DATA / "spoken_digits.npz"),
            "image_path": str(DATA / "mnist10k.npz"),
            "n_experiences": 5,
            "images_per_clip": images_per_clip,
        },
        epochs_per_experience=epochs,
        batch_size=32,
    )
    model = FusionClassifier(
        fusion=mode, embed_dim=64, num_heads=4, optimizer=partial(torch.optim.AdamW, lr=2e-3)
    )
    metrics = ContinualMetrics(print_table=False)
    strategies = [Replay(buffer_size=buffer, policy="class_balanced")] if buffer else []
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
        "mode": mode,
        "seed": seed,
        "average_accuracy": round(float(m[k].mean()), 4),
        "forgetting": round(float(np.mean([m[:k, j].max() - m[k, j] for j in range(k)])), 4),
        "bwt": round(float(np.mean([m[k, j] - m[j, j] for j in range(k)])), 4),
        "average_incremental_accuracy": round(
            float(np.mean([m[i, : i + 1].mean() for i in range(k + 1)])), 4
        ),
        "last_row": [round(float(a), 3) for a in m[k]],
        "fit_s": round(wall, 1),
        "params": sum(p.numel() for p in model.parameters()),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="late,cross_attention")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images-per-clip", type=int, default=3)
    parser.add_argument("--buffer", type=int, default=200)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows = []
    for mode in args.modes.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            row = run(mode, seed, args.epochs, args.images_per_clip, args.buffer)
            print(json.dumps(row), flush=True)
            rows.append(row)
    head = "| fusion | seed | avg acc | forgetting | bwt | avg incr. acc | last row | fit s |"
    print(head + " params |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['seed']} | {r['average_accuracy']:.3f} | {r['forgetting']:.3f} "
            f"| {r['bwt']:.3f} | {r['average_incremental_accuracy']:.3f} | {r['last_row']} | "
            f"{r['fit_s']} | {r['params']:,} |"
        )
    for mode in args.modes.split(","):
        mine = [r for r in rows if r["mode"] == mode]
        mean = {k: np.mean([r[k] for r in mine]) for k in ("average_accuracy", "forgetting")}
        print(
            f"mean {mode}: avg acc {mean['average_accuracy']:.3f}, forgetting "
            f"{mean['forgetting']:.3f} over {len(mine)} seed(s)"
        )
    return rows


if __name__ == "__main__":
    main()
