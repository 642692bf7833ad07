"""Where a second torch thread starts to pay: training-step time by model size, one thread
against two, under OpenMP's passive wait policy (what ``mneme`` sets) and its default
(spinning), on an idle machine and with other processes spinning on cores.

The wait policy is read once, when torch loads, so each policy runs in a process of its
own; in it, each model trains with one thread and with two, interleaved, best of 2.

    python -m benchmarks.thread_crossover --busy 0,1

``cpu_threads: auto`` takes its parameter threshold (``AUTO_PARALLEL_PARAMETERS``) from
this table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.cpu_threads import SPIN


def mlp(sizes: list[int]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(sizes[:-1], sizes[1:], strict=False):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def timm_model(name: str) -> nn.Module:
    import timm

    return timm.create_model(name, num_classes=10, in_chans=1)


# name: (model factory, input batch shape, steps to time)
MODELS = {
    "MLP 64-256-256-10, b32 (quickstart)": (lambda: mlp([64, 256, 256, 10]), (32, 1, 8, 8), 200),
    "MLP 784-400-400-10, b64 (MNIST)": (lambda: mlp([784, 400, 400, 10]), (64, 1, 28, 28), 200),
    "MLP 784-1024-1024-10, b64": (lambda: mlp([784, 1024, 1024, 10]), (64, 1, 28, 28), 60),
    "MLP 784-2048-2048-10, b64": (lambda: mlp([784, 2048, 2048, 10]), (64, 1, 28, 28), 20),
    "timm resnet10t, 32x32, b64": (lambda: timm_model("resnet10t"), (64, 1, 32, 32), 10),
    "timm resnet18, 32x32, b64": (lambda: timm_model("resnet18"), (64, 1, 32, 32), 10),
}  # fmt: skip


def step_ms(model: nn.Module, shape: tuple[int, ...], steps: int) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(shape), torch.randint(0, 10, (shape[0],))
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps * 1e3


def child() -> None:
    """In a process whose OpenMP runtime read the policy: one row per model, as JSON."""
    torch.manual_seed(0)
    for name, (make, shape, steps) in MODELS.items():
        model = make()
        times: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(2):
            for threads in (1, 2):
                torch.set_num_threads(threads)
                step_ms(model, shape, 3)  # warm-up at this thread count
                times[threads].append(step_ms(model, shape, steps))
        parameters = sum(p.numel() for p in model.parameters())
        row = {"model": name, "parameters": parameters, **{t: min(v) for t, v in times.items()}}
        print(json.dumps(row), flush=True)


def run_policy(policy: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "MKL_"))}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    command = [sys.executable, "-m", "benchmarks.thread_crossover", "--child"]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", default="0,1", help="comma-separated numbers of busy cores")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.child:
        child()
        return
    print(f"nproc={os.cpu_count()}; load before: {os.getloadavg()[0]:.2f}; best of 2\n")
    print("| busy cores | model | parameters | 1 thread (ms/step) | 2 threads, passive | "
          "/ 1 thread | 2 threads, spinning | / 1 thread |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for busy in [int(b) for b in opts.busy.split(",")]:
        spinners = [
            subprocess.Popen([sys.executable, "-c", SPIN.format(s=3600)]) for _ in range(busy)
        ]
        try:
            passive, spinning = run_policy("PASSIVE"), run_policy("")
        finally:
            for spinner in spinners:
                spinner.kill()
        for p, s in zip(passive, spinning, strict=True):
            one = min(p["1"], s["1"])  # one thread waits for nobody: the same setting
            print(f"| {busy} | {p['model']} | {p['parameters'] / 1e6:.2f}M | {one:.2f} | "
                  f"{p['2']:.2f} | {p['2'] / one:.2f}x | {s['2']:.2f} | {s['2'] / one:.2f}x |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
