"""What a bare Lightning training step costs over a plain PyTorch loop, on the MLP of
``benchmarks.vs_avalanche`` (784-400-400-10, SGD with momentum, batch 64, in-memory batches).

Mneme trains through Lightning's loop, so Lightning's own per-step work (hook dispatch to the
module, the callbacks and the strategy, the optimizer closure, the batch transfer and the
progress tracking) is a floor under Mneme's ratio to the plain loop. This measures that floor:

- ``plain``: ``for x, y in batches: loss.backward(); opt.step(); opt.zero_grad()``;
- ``lightning``: the same model and batches as a minimal ``LightningModule`` (only
  ``training_step`` and ``configure_optimizers``) under ``Trainer(logger=False,
  enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)``;
- ``lightning+4cb``: the same with four do-nothing callbacks (Mneme's runs carry the metrics,
  the cost report, the loss guard and a strategy);
- ``lightning, manual optimization``: the bare module with ``automatic_optimization =
  False``, stepping its optimizer in ``training_step`` (no closure, fewer hooks).

Runs are interleaved (each runner once, then again), and the medians reported.

    OMP_NUM_THREADS=1 python -m benchmarks.lightning_overhead --steps 600 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from benchmarks.plain import mlp


def batches(n: int, batch_size: int = 64, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.rand(batch_size, 1, 28, 28, generator=gen),
            torch.randint(0, 10, (batch_size,), generator=gen),
        )
        for _ in range(n)
    ]


class Batches:
    """The batches as one iterable (a bare list would read as one loader per element)."""

    def __init__(self, data) -> None:
        self.data = data

    def __iter__(self):
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


def run_plain(data) -> float:
    model = mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    start = time.perf_counter()
    for x, y in data:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def run_lightning(data, n_callbacks: int = 0, manual: bool = False) -> float:
    from lightning.pytorch import Callback, LightningModule, Trainer

    class Bare(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(0)
            self.automatic_optimization = not manual

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            if manual:  # Lightning's manual optimization: no closure, fewer hooks
                optimizer = self.optimizers()
                optimizer.zero_grad()
                self.manual_backward(loss)
                optimizer.step()
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    clock: dict[str, float] = {}

    class Clock(Callback):  # the epoch's steps only: not the trainer's setup and teardown
        def on_train_epoch_start(self, trainer, pl_module):
            clock["start"] = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            clock["end"] = time.perf_counter()

    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[Clock(), *[Callback() for _ in range(n_callbacks)]],
    )
    trainer.fit(Bare(), train_dataloaders=Batches(data))
    return clock["end"] - clock["start"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=5)
    opts = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    data = batches(opts.steps)
    runners = {
        "plain": run_plain,
        "lightning": run_lightning,
        "lightning+4cb": lambda d: run_lightning(d, 4),
        "lightning, manual optimization": lambda d: run_lightning(d, manual=True),
    }
    for runner in runners.values():  # warm-up: imports, allocator, first-call costs
        runner(data[:50])
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(opts.repeats):
        for name, runner in runners.items():
            times[name].append(runner(data))
    plain = statistics.median(times["plain"]) / opts.steps * 1e3
    print(
        f"torch threads={torch.get_num_threads()} "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} "
        f"load={os.getloadavg()[0]:.2f}; {opts.steps} steps, median of {opts.repeats}\n"
    )
    print("| runner | ms/step | / plain | overhead ms/step |")
    print("| --- | --- | --- | --- |")
    for name in runners:
        ms = statistics.median(times[name]) / opts.steps * 1e3
        print(f"| {name} | {ms:.2f} | {ms / plain:.2f}x | {ms - plain:+.2f} |")


if __name__ == "__main__":
    main()
