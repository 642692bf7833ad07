"""Pruning and int8 quantization on split MNIST-10k with replay: what they cost in accuracy
and what they save in size and CPU latency.

Every run is the ``configs/split_mnist_replay.yaml`` setup built in process (784-400-400-10
MLP, SGD 0.01 momentum 0.9, 5 experiences of 2 digits, 2 epochs each, class-balanced replay
of 500), plus:

- pruning: :class:`mneme.callbacks.Pruning` (global magnitude, cubic schedule over
  experiences 0-3, the last fine-tunes) at each sparsity of ``--sparsities``;
- quantization: on the unpruned run, :class:`mneme.callbacks.Quantization` copies in
  ``ptq_dynamic``, ``ptq_weight_only`` and ``ptq_static`` evaluated after every experience
  next to the float model; a separate ``qat`` run (fake quantization during training).

Each row: the final average accuracy and forgetting (of the accuracy matrix of that model),
the bytes of ``torch.save(model.state_dict())`` (the encoder and head), and the median CPU
latency of one forward pass of a batch of 256 (``--repeats`` timed runs after warm-up, one
thread).

    OMP_NUM_THREADS=1 python -m benchmarks.compress
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from mneme.app import ContinualClassifier
from mneme.app.compress.quantize import state_dict_bytes
from mneme.callbacks import ContinualMetrics, Pruning, Quantization, Replay

from benchmarks.plain import split_mnist_mlp

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mnist10k.npz"
PTQ_MODES = ("ptq_dynamic", "ptq_weight_only", "ptq_static")

warnings.filterwarnings("ignore")


def run(args: argparse.Namespace, extra: list) -> tuple[Trainer, ContinualClassifier, dict]:
    """One fit of the replay setup with the ``extra`` callbacks; the float summary."""
    model, data = split_mnist_mlp(args.data, args.epochs)
    metrics = ContinualMetrics(print_table=False)
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(args.work),
        callbacks=[metrics, Replay(buffer_size=500, policy="class_balanced"), *extra],
        **data.trainer_settings(),
    )
    trainer.fit(model, data)
    return trainer, model, metrics.summary()


@torch.no_grad()
def latency_ms(model: torch.nn.Module, repeats: int) -> float:
    """Median milliseconds of one forward pass of a batch of 256 MNIST-shaped images."""
    model.eval()
    x = torch.randn(256, 1, 28, 28)
    for _ in range(5):
        model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def size_of(model: ContinualClassifier) -> int:
    return state_dict_bytes(model.encoder) + state_dict_bytes(model.head)


def row(summary: dict[str, Any], model, repeats: int, **extra: Any) -> dict[str, Any]:
    return {
        "average_accuracy": round(summary["average_accuracy"], 4),
        "forgetting": round(summary["forgetting"], 4),
        "state_dict_bytes": size_of(model),
        "latency_ms": round(latency_ms(model, repeats), 3),
        **extra,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.8, 0.9])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--work", type=Path, default=REPO / "logs" / "compress")
    p.add_argument("--out", type=Path, default=REPO / "logs" / "compress_results.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows: dict[str, dict[str, Any]] = {}

    # float32 and the three PTQ copies of the same run.
    quantizers = [Quantization(mode=m, calibration_batches=8) for m in PTQ_MODES]
    trainer, model, summary = run(args, quantizers)
    rows["float32"] = row(summary, model, args.repeats, sparsity=0.0)
    last = trainer.datamodule.num_experiences - 1
    for q in quantizers:
        int8 = q.quantized_copy(trainer, model, last)
        rows[f"int8 {q.mode}"] = row(q.summary()["quantized"], int8, args.repeats, sparsity=0.0)

    qat = Quantization(mode="qat")
    _, model, summary = run(args, [qat])  # converted to int8 at fit end
    rows["int8 qat"] = row(qat.summary()["quantized"], model, args.repeats, sparsity=0.0)

    for s in args.sparsities:
        pruning = Pruning(amount=s, schedule="cubic", scope="global")
        _, model, summary = run(args, [pruning])
        sparsity = pruning.report(model)["prune/sparsity"]
        rows[f"pruned {s:.0%}"] = row(summary, model, args.repeats, sparsity=round(sparsity, 4))

    print(f"{'model':<22}{'sparsity':>9}{'avg acc':>9}{'forget':>8}{'bytes':>10}{'ms/256':>8}")
    for name, r in rows.items():
        print(
            f"{name:<22}{r['sparsity']:>9.2f}{r['average_accuracy']:>9.3f}"
            f"{r['forgetting']:>8.3f}{r['state_dict_bytes']:>10}{r['latency_ms']:>8.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
