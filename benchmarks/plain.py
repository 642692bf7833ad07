"""What every runner of ``benchmarks.vs_avalanche`` shares, and the plain PyTorch runner.

- :func:`shared_scenario`: the Avalanche scenario of a stream, built once per process and
  handed to every runner (Avalanche's strategies get it directly; Mneme's datamodule names
  this function as its benchmark factory, so it receives the very same object).
- :func:`mlp`: the model of the comparison, 784-400-400-10 (Avalanche's ``SimpleMLP``
  without dropout), seeded so that every runner starts from the same weights.
- :func:`run_plain`: the strategies as a bare training loop over in-memory tensors sliced
  by index, with the semantics of Mneme's callbacks and nothing else: the practical speed
  limit on this machine.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mnist10k.npz"
STREAMS = ("split", "permuted")
STRATEGIES = ("naive", "ewc", "replay", "lwf")

_SCENARIOS: dict[tuple, Any] = {}


def shared_scenario(stream: str, path: str, n_experiences: int = 5, seed: int = 0):
    """The Avalanche scenario of ``stream`` (``split``: ``mneme.datamodules.SplitMNISTFile``,
    ``permuted``: ``mneme.datamodules.PermutedMNISTFile``), memoized per arguments."""
    key = (stream, str(path), n_experiences, seed)
    if key not in _SCENARIOS:
        from mneme.datamodules import PermutedMNISTFile, SplitMNISTFile

        factories = {"split": SplitMNISTFile, "permuted": PermutedMNISTFile}
        if stream not in factories:
            raise ValueError(f"stream: one of {STREAMS}, got '{stream}'")
        _SCENARIOS[key] = factories[stream](path, n_experiences=n_experiences, seed=seed)
    return _SCENARIOS[key]


def mlp(seed: int) -> nn.Sequential:
    """Flatten, Linear 784->400, ReLU, Linear 400->400, ReLU, Linear 400->10; PyTorch's
    default init drawn from ``torch.manual_seed(seed)``."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 400),
        nn.ReLU(),
        nn.Linear(400, 400),
        nn.ReLU(),
        nn.Linear(400, 10),
    )
    torch.random.set_rng_state(state)
    return model


def split_mnist_mlp(path: str, epochs: int, seed: int = 0) -> tuple[Any, Any]:
    """The Mneme side of the vs-Avalanche protocol for the callback benchmarks (augmentation,
    robustness, compress): seeded ``ContinualClassifier`` (MLP 784-400-400-10, SGD lr 0.01
    momentum 0.9) and split MNIST-10k in 5 experiences, batch 64."""
    from lightning.pytorch import seed_everything
    from mneme.app import ContinualClassifier
    from mneme.datamodules import ContinualDataModule

    seed_everything(seed)
    model = ContinualClassifier(
        encoder="mneme_mlp",
        encoder_args={"hidden": [400, 400]},
        optimizer=lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
    )
    datamodule = ContinualDataModule(
        benchmark="mneme.datamodules.SplitMNISTFile",
        benchmark_args={"path": str(path), "n_experiences": 5, "seed": 0},
        epochs_per_experience=epochs,
        batch_size=64,
    )
    return model, datamodule


def copy_weights(source: nn.Module, target: nn.Module) -> None:
    """Copy ``source``'s parameters into ``target``'s, in registration order (shapes checked)."""
    src, dst = list(source.parameters()), list(target.parameters())
    shapes = [p.shape for p in src], [p.shape for p in dst]
    if shapes[0] != shapes[1]:
        raise ValueError(f"parameter shapes differ: {shapes[0]} vs {shapes[1]}")
    with torch.no_grad():
        for s, d in zip(src, dst, strict=True):
            d.copy_(s)


def materialize_stream(scenario) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]:
    """Every train and test experience as ``{x, y}`` tensors (one pass over each dataset)."""
    from torch.utils.data import DataLoader

    def read(stream):
        out = []
        for exp in stream:
            xs, ys = [], []
            for sample in DataLoader(exp.dataset, batch_size=1024, num_workers=0):
                xs.append(sample[0])
                ys.append(torch.as_tensor(sample[1]))
            out.append({"x": torch.cat(xs).contiguous(), "y": torch.cat(ys).long()})
        return out

    return read(scenario.train_stream), read(scenario.test_stream)


@torch.no_grad()
def evaluate(model: nn.Module, test: list[dict[str, Tensor]], batch_size: int = 512) -> list[float]:
    """Accuracy on each test experience."""
    model.eval()
    row = []
    for exp in test:
        correct = 0
        for i in range(0, len(exp["y"]), batch_size):
            logits = model(exp["x"][i : i + batch_size])
            correct += int((logits.argmax(1) == exp["y"][i : i + batch_size]).sum())
        row.append(correct / len(exp["y"]))
    model.train()
    return row


def run_plain(
    scenario,
    strategy: str,
    seed: int,
    epochs: int,
    batch_size: int = 64,
    lr: float = 0.01,
    momentum: float = 0.9,
    ewc_lambda: float = 100.0,
    buffer_size: int = 500,
    replay_batch_size: int | None = None,
    lwf_alpha: float = 1.0,
    lwf_temperature: float = 2.0,
    threads: int = 2,
) -> dict[str, Any]:
    """Train ``strategy`` over the stream with a bare loop; returns the accuracy matrix and
    times. ``ewc_lambda`` is Avalanche's (penalty ``λ Σ F (θ-θ*)²``)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: one of {STRATEGIES}, got '{strategy}'")
    torch.set_num_threads(threads)
    start = time.perf_counter()
    train, test = materialize_stream(scenario)
    model = mlp(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    params = list(model.parameters())
    replay_n = replay_batch_size or batch_size
    gen = torch.Generator().manual_seed(seed)  # replay weights and draws

    ewc_coef: list[Tensor] | None = None  # A = Σ_e F_e, per parameter
    ewc_center: list[Tensor] | None = None  # m = Σ_e F_e θ*_e / A
    fishers: list[list[Tensor]] = []
    anchors: list[list[Tensor]] = []
    buffer: dict[str, Tensor] = {}
    buffer_w = torch.zeros(0)
    teacher: nn.Module | None = None
    seen: list[int] = []

    rows, steps_time, boundary_time, eval_time, steps = [], 0.0, 0.0, 0.0, 0
    for k, exp in enumerate(train):
        t0 = time.perf_counter()
        x_all, y_all = exp["x"], exp["y"]
        n = len(y_all)
        old_classes = None
        if strategy == "lwf" and k > 0:  # frozen copy at experience start
            teacher = copy.deepcopy(model).eval().requires_grad_(False)
            old_classes = torch.tensor(sorted(seen))
            all_old = len(seen) == 10
        boundary_time += time.perf_counter() - t0

        for epoch in range(epochs):
            t0 = time.perf_counter()
            # The order Mneme's TensorBatches serves: seeded by (seed, global epoch).
            g = torch.Generator().manual_seed(seed * 100_003 + k * epochs + epoch)
            order = torch.randperm(n, generator=g)
            for i in range(0, n, batch_size):
                index = order[i : i + batch_size]
                x, y = x_all.index_select(0, index), y_all.index_select(0, index)
                if strategy == "replay" and len(buffer_w):
                    if replay_n <= len(buffer_w):
                        r = torch.randperm(len(buffer_w), generator=gen)[:replay_n]
                    else:
                        r = torch.randint(len(buffer_w), (replay_n,), generator=gen)
                    x = torch.cat([x, buffer["x"].index_select(0, r)])
                    y = torch.cat([y, buffer["y"].index_select(0, r)])
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                if strategy == "ewc" and ewc_coef is not None:
                    penalty = sum(
                        (a * (p - m).pow(2)).sum()
                        for p, a, m in zip(params, ewc_coef, ewc_center, strict=True)
                    )
                    loss = loss + ewc_lambda * penalty
                if teacher is not None:
                    with torch.no_grad():
                        target = teacher(x)
                    student = logits
                    if not all_old:
                        target, student = target[:, old_classes], student[:, old_classes]
                    log_p = F.log_softmax(student / lwf_temperature, dim=1)
                    q = F.softmax(target / lwf_temperature, dim=1)
                    loss = loss + lwf_alpha * F.kl_div(log_p, q, reduction="batchmean")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
            steps_time += time.perf_counter() - t0

        t0 = time.perf_counter()
        seen = sorted(set(seen) | set(y_all.unique().tolist()))
        if strategy == "ewc":
            # Empirical Fisher as Mneme's EWC: eval mode, batches in order, squared
            # mean-batch gradient averaged over batches; θ* = current parameters.
            model.eval()
            total = [torch.zeros_like(p) for p in params]
            batches = 0
            for i in range(0, n, batch_size):
                out = model(x_all[i : i + batch_size])
                grads = torch.autograd.grad(F.cross_entropy(out, y_all[i : i + batch_size]), params)
                for t, g_ in zip(total, grads, strict=True):
                    t.addcmul_(g_, g_)
                batches += 1
            model.train()
            fishers.append([t / batches for t in total])
            anchors.append([p.detach().clone() for p in params])
            # Σ_e F_e (θ - θ*_e)² = A (θ - m)² + const: one quadratic however many experiences.
            ewc_coef = [sum(f[i] for f in fishers) for i in range(len(params))]
            ewc_center = [
                torch.where(
                    a > 0,
                    sum(f[i] * th[i] for f, th in zip(fishers, anchors, strict=True))
                    / a.clamp_min(1e-38),
                    anchors[-1][i],
                )
                for i, a in enumerate(ewc_coef)
            ]
        if strategy == "replay":  # reservoir: keep the highest uniform weights seen
            weights = torch.cat([torch.rand(n, generator=gen), buffer_w])
            cand_x = torch.cat([x_all, buffer["x"]]) if buffer else x_all
            cand_y = torch.cat([y_all, buffer["y"]]) if buffer else y_all
            keep = weights.argsort(descending=True)[:buffer_size]
            buffer = {"x": cand_x[keep], "y": cand_y[keep]}
            buffer_w = weights[keep]
        boundary_time += time.perf_counter() - t0

        t0 = time.perf_counter()
        rows.append(evaluate(model, test))
        eval_time += time.perf_counter() - t0
    whole = time.perf_counter() - start
    return {
        "accuracy_matrix": rows,
        "train_time_s": steps_time + boundary_time,
        "steps_time_s": steps_time,
        "steps": steps,
        "eval_time_s": eval_time,
        "whole_time_s": whole,
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
