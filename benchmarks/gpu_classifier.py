"""Training throughput of a classifier step on one GPU: timm resnet18 on 32x32 inputs,
batch 256, naive / Replay / EWC; Mneme (Lightning + ContinualClassifier + the strategy
callback), eager and compiled, against a plain PyTorch loop (eager and compiled) and
Avalanche 0.6's own strategies (eager: it has no compile option), on the same device.

    python -m benchmarks.gpu_classifier                       # a GPU: bf16-mixed, batch 256
    python -m benchmarks.gpu_classifier --smoke               # CPU, tiny: every runner runs

The stream (two experiences of five classes of random 3x32x32 images, the very same
Avalanche scenario object for every runner) is made by :func:`synthetic_stream`. Each runner
trains experience 0 (Replay fills its buffer, EWC estimates its Fisher at its end), then
experience 1, whose steps after ``--warmup`` ones are timed (so compilation, and the
recompile for replay's doubled batch, are not). Same optimizer for all (SGD lr 0.01,
momentum 0.9, fused on CUDA), same precision: Avalanche 0.6 has no mixed precision option,
so a plugin enters ``torch.autocast`` around its forward. Replay appends 256 buffer samples
to each batch (512 rows a step); EWC's penalty covers every parameter.

Printed: steps/s, images/s (rows through the model per second) and the model FLOP
utilisation (FLOPs of one step from ``FlopCounterMode`` over the GPU's dense bf16 peak, see
:mod:`benchmarks.mfu`). ``--out`` writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.mfu import format_mfu, mfu, peak_bf16_flops, step_flops

STRATEGIES = ("naive", "replay", "ewc")
RUNNERS = ("mneme", "mneme_compiled", "plain", "plain_compiled", "avalanche")
LR, MOMENTUM, BUFFER, EWC_LAMBDA = 0.01, 0.9, 2000, 100.0  # EWC λ in Avalanche's convention
_STREAMS: dict[tuple, Any] = {}


def synthetic_stream(per_experience: int, image_size: int = 32, seed: int = 0):
    """Two class-incremental experiences of ``per_experience`` random RGB images (five
    classes each) and a small test stream; memoized, so every runner gets this object."""
    key = (per_experience, image_size, seed)
    if key not in _STREAMS:
        from mneme.datamodules.streams.digits import LabeledTensors, split_benchmark

        g = torch.Generator().manual_seed(seed)

        def tensors(n: int) -> LabeledTensors:
            """``n`` images of each experience's classes: 0-4 for the first, 5-9 for the
            second (so each experience has exactly ``n`` samples: full batches)."""
            images = torch.rand(2 * n, 3, image_size, image_size, generator=g)
            labels = torch.cat([torch.arange(n) % 5, 5 + torch.arange(n) % 5])
            return LabeledTensors(images, labels)

        train, test = tensors(per_experience), tensors(50)
        _STREAMS[key] = split_benchmark(train, test, 2, False, seed, list(range(10)), False)
    return _STREAMS[key]


def resnet18(num_classes: int = 10) -> nn.Module:
    import timm

    return timm.create_model("resnet18", pretrained=False, num_classes=num_classes)


def sgd(params, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, fused=device.type == "cuda")


class Clock:
    """Wall time of the timed steps of experience 1 (synchronised on CUDA)."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device = warmup, device
        self.start = self.end = None
        self.steps = 0  # experience-1 steps seen

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def before_step(self) -> None:
        if self.steps == self.warmup:
            self.start = self.now()

    def after_step(self) -> None:
        self.steps += 1
        if self.steps > self.warmup:
            self.end = self.now()

    def steps_per_second(self) -> float:
        return (self.steps - self.warmup) / (self.end - self.start)


# -- Mneme ------------------------------------------------------------------------------------
def run_mneme(args, strategy: str, device: torch.device, compiled: bool) -> float:
    from lightning.pytorch import Callback, Trainer, seed_everything
    from mneme.app.models.classifier import ContinualClassifier
    from mneme.callbacks import EWC, Replay
    from mneme.datamodules import ContinualDataModule

    seed_everything(0, verbose=False)
    clock = Clock(args.warmup, device)

    class Timing(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.current_epoch == 1:
                clock.before_step()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.current_epoch == 1:
                clock.after_step()

    from mneme.datamodules.streams.registry import stream

    from benchmarks.gpu_classifier import synthetic_stream  # as imported, not __main__'s

    stream(synthetic_stream)  # this repository's own stream, trusted by the code that runs it
    data = ContinualDataModule(
        benchmark="benchmarks.gpu_classifier.synthetic_stream",
        benchmark_args={"per_experience": args.per_experience, "image_size": args.image_size},
        batch_size=args.batch_size,
        data_on_device=device.type == "cuda",
        seed=0,
    )
    callbacks: list = [Timing()]
    if strategy == "replay":
        callbacks.append(Replay(buffer_size=BUFFER, seed=0))
    elif strategy == "ewc":  # Mneme's penalty is λ/2 Σ F (θ-θ*)²: twice Avalanche's λ
        callbacks.append(EWC(ewc_lambda=2 * EWC_LAMBDA, fisher_samples=args.fisher_samples))
    model = ContinualClassifier(
        encoder="resnet18",
        optimizer=partial(torch.optim.SGD, lr=LR, momentum=MOMENTUM),  # fused on CUDA by Mneme
        compile=compile_kwargs(args) if compiled else False,
    )
    trainer = Trainer(
        accelerator=device.type,
        devices=1,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **data.trainer_settings(),
    )
    trainer.fit(model, data)
    return clock.steps_per_second()


# -- plain PyTorch ----------------------------------------------------------------------------
def experience_tensors(scenario, k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    dataset = scenario.train_stream[k].dataset
    loader = torch.utils.data.DataLoader(dataset, batch_size=4096)
    xs, ys = zip(*[(b[0], torch.as_tensor(b[1])) for b in loader], strict=True)
    return torch.cat(xs).to(device), torch.cat(ys).long().to(device)


def run_plain(args, strategy: str, device: torch.device, compiled: bool) -> tuple[float, int]:
    """The strategy as a bare loop over on-device tensors; returns steps/s and the FLOPs
    of one experience-1 step."""
    torch.manual_seed(0)
    scenario = synthetic_stream(args.per_experience, args.image_size)
    model = resnet18().to(device).train()
    params = list(model.parameters())
    optimizer = sgd(params, device)
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float16
    autocast = args.precision.endswith("-mixed")
    state: dict[str, Any] = {}  # buffer, or EWC's coefficients

    def loss_fn(x: Tensor, y: Tensor) -> Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            loss = F.cross_entropy(model(x), y)
        if "coef" in state:  # EWC, Avalanche's λ Σ F (θ-θ*)², one foreach pass
            diff = torch._foreach_sub(params, state["anchor"])
            loss = loss + EWC_LAMBDA * sum(
                t.sum() for t in torch._foreach_mul(torch._foreach_mul(diff, diff), state["coef"])
            )
        return loss

    step_loss = torch.compile(loss_fn, **compile_kwargs(args)) if compiled else loss_fn
    clock = Clock(args.warmup, device)
    g = torch.Generator(device="cpu").manual_seed(0)
    flops = 0
    for k in range(2):
        x_all, y_all = experience_tensors(scenario, k, device)
        order = torch.randperm(len(y_all), generator=g).to(device)
        for i in range(0, len(y_all) - args.batch_size + 1, args.batch_size):
            index = order[i : i + args.batch_size]
            x, y = x_all[index], y_all[index]
            if "buffer_x" in state:
                r = torch.randint(len(state["buffer_y"]), (args.batch_size,), generator=g)
                r = r.to(device)
                x = torch.cat([x, state["buffer_x"][r]])
                y = torch.cat([y, state["buffer_y"][r]])
            if k == 1 and not flops:
                flops = step_flops(lambda x=x, y=y: loss_fn(x, y))  # eager, once
            if k == 1:
                clock.before_step()
            optimizer.zero_grad(set_to_none=True)
            step_loss(x, y).backward()
            optimizer.step()
            if k == 1:
                clock.after_step()
        if k == 0 and strategy == "replay":
            keep = torch.randperm(len(y_all), generator=g)[:BUFFER].to(device)
            state.update(buffer_x=x_all[keep], buffer_y=y_all[keep])
        if k == 0 and strategy == "ewc":
            state.update(
                coef=fisher(model, params, x_all, y_all, args),
                anchor=[p.detach().clone() for p in params],
            )
    return clock.steps_per_second(), flops


def fisher(model, params, x_all, y_all, args) -> list[Tensor]:
    """Empirical diagonal Fisher as Avalanche's EWC: eval mode, squared mean-batch gradient,
    averaged over the batches of ``fisher_samples`` samples."""
    model.eval()
    total = [torch.zeros_like(p) for p in params]
    n = min(args.fisher_samples, len(y_all))
    batches = 0
    for i in range(0, n, args.batch_size):
        loss = F.cross_entropy(
            model(x_all[i : i + args.batch_size]), y_all[i : i + args.batch_size]
        )
        for t, grad in zip(total, torch.autograd.grad(loss, params), strict=True):
            t.addcmul_(grad, grad)
        batches += 1
    model.train()
    return [t / batches for t in total]


def compile_kwargs(args) -> dict[str, Any]:
    return {"mode": args.compile_mode, "backend": args.compile_backend}


# -- Avalanche --------------------------------------------------------------------------------
def run_avalanche(args, strategy: str, device: torch.device) -> float:
    from avalanche.training import EWC, Naive, Replay
    from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin

    clock = Clock(args.warmup, device)
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float16
    autocast = args.precision.endswith("-mixed")

    class TimingAndAutocast(SupervisedPlugin):
        """Times experience 1's iterations; autocast around the forward (Avalanche 0.6 has no
        mixed precision option; the loss is computed on the autocast logits)."""

        def __init__(self) -> None:
            super().__init__()
            self.context = None

        def before_training_iteration(self, strategy, **kwargs):
            if strategy.clock.train_exp_counter == 1:
                clock.before_step()

        def after_training_iteration(self, strategy, **kwargs):
            if strategy.clock.train_exp_counter == 1:
                clock.after_step()

        def before_forward(self, strategy, **kwargs):
            self.context = torch.autocast(device.type, dtype=dtype, enabled=autocast)
            self.context.__enter__()

        def after_forward(self, strategy, **kwargs):
            self.context.__exit__(None, None, None)

    torch.manual_seed(0)
    model = resnet18().to(device)  # first: a fused optimizer needs the parameters there
    common = dict(
        model=model,
        optimizer=sgd(model.parameters(), device),
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=args.batch_size,
        train_epochs=1,
        eval_mb_size=args.batch_size,
        device=device,
        plugins=[TimingAndAutocast()],
        evaluator=EvaluationPlugin(loggers=[]),
    )
    if strategy == "naive":
        cl = Naive(**common)
    elif strategy == "replay":
        cl = Replay(mem_size=BUFFER, **common)
    else:
        cl = EWC(ewc_lambda=EWC_LAMBDA, mode="separate", **common)
    scenario = synthetic_stream(args.per_experience, args.image_size)
    for experience in scenario.train_stream:
        cl.train(experience, num_workers=args.avalanche_workers)
    return clock.steps_per_second()


# -- running ----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_classifier", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=50, help="timed steps of experience 1")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps of experience 1")
    p.add_argument("--precision", default="bf16-mixed", help="Lightning precision string")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--runners", default=",".join(RUNNERS))
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: its own)")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--fisher-samples", type=int, default=2048)
    p.add_argument("--avalanche-workers", type=int, default=4, help="its DataLoader workers")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the peak table")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="CPU, batch 8 on 16x16, 2+1 steps, aot_eager backend, fp32: checks every runner",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.batch_size, args.image_size = "cpu", 8, 16
        args.steps, args.warmup, args.precision = 2, 1, "32-true"
        args.compile_backend, args.fisher_samples, args.avalanche_workers = "aot_eager", 16, 0
    # experience 1 needs warmup + steps full batches
    args.per_experience = args.batch_size * (args.warmup + args.steps)
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    import warnings

    warnings.filterwarnings("ignore")
    args = parse_args(argv)
    device = torch.device(args.device)
    peak = peak_bf16_flops(device, args.peak_tflops)
    rows = []
    for strategy in args.strategies.split(","):
        flops = None
        results = {}
        for runner in args.runners.split(","):
            if runner.startswith("plain"):
                results[runner], flops = run_plain(
                    args, strategy, device, runner.endswith("_compiled")
                )
            elif runner.startswith("mneme"):
                results[runner] = run_mneme(args, strategy, device, runner.endswith("_compiled"))
            elif runner == "avalanche":
                results[runner] = run_avalanche(args, strategy, device)
            else:
                raise SystemExit(f"--runners: one of {RUNNERS}, got '{runner}'")
        model_rows = args.batch_size * (2 if strategy == "replay" else 1)
        for runner, steps in results.items():
            rows.append(
                {
                    "strategy": strategy,
                    "runner": runner,
                    "steps_per_s": steps,
                    "images_per_s": steps * model_rows,
                    "flops_per_step": flops,
                    "mfu": mfu(flops or 0, steps, peak),
                }
            )
    hardware = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    )
    print(
        f"resnet18 {args.image_size}x{args.image_size}, batch {args.batch_size}, "
        f"{args.precision}, {hardware}, torch {torch.__version__}"
    )
    print("| strategy | runner | steps/s | images/s | GFLOP/step | MFU (bf16 peak) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        gflop = f"{r['flops_per_step'] / 1e9:.1f}" if r["flops_per_step"] else "n/a"
        print(
            f"| {r['strategy']} | {r['runner']} | {r['steps_per_s']:.2f} | "
            f"{r['images_per_s']:.0f} | {gflop} | {format_mfu(r['mfu'])} |"
        )
    if args.out:
        meta = {"device": hardware, "torch": torch.__version__, "args": vars(args)}
        with open(args.out, "w") as f:
            json.dump({"machine": meta, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
