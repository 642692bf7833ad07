"""DER++ against Replay (Mneme) and Avalanche 0.6's ``DER``, on the vs-Avalanche protocol.

Same streams (the very same Avalanche scenario objects, :func:`benchmarks.plain.shared_scenario`),
same model (MLP 784-400-400-10, same initial weights per seed), SGD lr 0.01 momentum 0.9,
batch 64, ``--epochs`` per experience, accuracy matrix on the whole test stream after each
experience (see :mod:`benchmarks.vs_avalanche`, whose runners this reuses). Per stream and
buffer size: Mneme ``Replay(policy=reservoir)``, Mneme ``DER(alpha, beta)`` (logits recorded at
experience end) and Avalanche ``DER(mem_size, alpha, beta)`` (logits recorded when a sample is
seen, reservoir during training).

    OMP_NUM_THREADS=1 python -m benchmarks.der --epochs 1 --buffers 200,500 --streams split,permuted
"""

from __future__ import annotations

import argparse
import json
import re
import time
from unittest import mock

import numpy as np
import torch

from benchmarks import vs_avalanche as vs
from benchmarks.plain import DEFAULT_DATA, mlp, shared_scenario

ALPHA, BETA = 0.3, 0.5


def run_avalanche_der(scenario, buffer: int, seed: int, epochs: int) -> dict:
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import DER
    from avalanche.training.plugins import EvaluationPlugin

    vs._seed_all(seed)
    model = mlp(seed)
    cl = DER(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=vs.LR, momentum=vs.MOMENTUM),
        criterion=torch.nn.CrossEntropyLoss(),
        mem_size=buffer,
        batch_size_mem=vs.BATCH_SIZE,
        alpha=ALPHA,
        beta=BETA,
        train_mb_size=vs.BATCH_SIZE,
        train_epochs=epochs,
        eval_mb_size=vs.EVAL_BATCH_SIZE,
        device="cpu",
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]),
    )
    rows, train_time = [], 0.0
    for experience in scenario.train_stream:
        t0 = time.perf_counter()
        cl.train(experience, num_workers=0)
        train_time += time.perf_counter() - t0
        results = cl.eval(scenario.test_stream, num_workers=0)
        row = [float("nan")] * len(scenario.test_stream)
        for key, value in results.items():
            match = re.match(r"Top1_Acc_Exp/eval_phase/test_stream/Task\d+/Exp(\d+)$", key)
            if match:
                row[int(match.group(1))] = float(value)
        rows.append(row)
    return {"accuracy_matrix": rows, "train_time_s": train_time}


def run_mneme(stream: str, path: str, method: str, buffer: int, seed: int, epochs: int) -> dict:
    from mneme.callbacks import DER, Replay

    def callbacks(strategy: str, seed: int) -> list:
        if method == "replay":
            return [Replay(buffer, "reservoir", replay_batch_size=vs.BATCH_SIZE, seed=seed)]
        return [DER(buffer, ALPHA, BETA, replay_batch_size=vs.BATCH_SIZE, seed=seed)]

    with mock.patch.object(vs, "mneme_strategy_callbacks", callbacks):
        return vs.run_mneme(stream, path, method, seed, epochs, threads=1)


def summary(matrix: list[list[float]]) -> tuple[float, float]:
    """(average accuracy after the last experience, average forgetting)."""
    m = np.asarray(matrix)
    k = len(m) - 1
    forgetting = np.mean([m[:k, j].max() - m[k, j] for j in range(k)]) if k else 0.0
    return float(m[k].mean()), float(forgetting)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default=str(DEFAULT_DATA))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--buffers", default="200,500")
    parser.add_argument("--streams", default="split,permuted")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    vs._quiet()
    torch.set_num_threads(1)
    rows = []
    for stream in args.streams.split(","):
        scenario = shared_scenario(stream, args.path, vs.N_EXPERIENCES, 0)
        for buffer in [int(b) for b in args.buffers.split(",")]:
            for runner, method in (("mneme", "replay"), ("mneme", "der++"), ("avalanche", "der++")):
                if runner == "mneme":
                    out = run_mneme(stream, args.path, method, buffer, args.seed, args.epochs)
                else:
                    out = run_avalanche_der(scenario, buffer, args.seed, args.epochs)
                acc, forgetting = summary(out["accuracy_matrix"])
                row = {
                    "stream": stream,
                    "buffer": buffer,
                    "runner": runner,
                    "method": method,
                    "accuracy": round(acc, 4),
                    "forgetting": round(forgetting, 4),
                    "train_time_s": round(out["train_time_s"], 2),
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    print("| stream | buffer | runner | method | accuracy | forgetting | train s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['stream']} | {r['buffer']} | {r['runner']} | {r['method']} | "
            f"{r['accuracy']:.3f} | {r['forgetting']:.3f} | {r['train_time_s']:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
