"""Pairs per second of one alignment training step: Lightning + ContrastiveAligner vs a plain
PyTorch loop, with the same open_clip model, ClipLoss, batch, optimizer and precision.

    python -m benchmarks.align_throughput --model mneme-tiny-clip --batch-size 64 --steps 20

On a GPU, eager and compiled (``model.compile`` for Mneme; the plain loop compiles its whole
forward and loss), ViT-B-32 at batch 512 in bf16, in one run::

    python -m benchmarks.align_throughput --model ViT-B-32 --batch-size 512 \
        --precision bf16-mixed --compile --no-write

``--smoke`` checks every runner on a CPU at a tiny size (mneme-tiny-clip, batch 8, two timed
steps, torch.compile with the ``aot_eager`` backend) and writes nothing. Beside pairs/s the
model FLOP utilisation is printed: FLOPs of one step counted by ``FlopCounterMode`` over
the GPU's dense bf16 peak (:mod:`benchmarks.mfu`). On CUDA both runners use fused AdamW.

All runners see the same synthetic pairs (random images at the model's image size, random
token ids) held in memory; the first ``--warmup`` steps are not timed. The result is written
as the section ``## Alignment throughput`` of ``benchmarks/RESULTS.md`` (other sections are
left as they are).
"""

from __future__ import annotations

import argparse
import math
import platform
import re
import time
from pathlib import Path

import torch

from benchmarks.mfu import format_mfu, mfu, peak_bf16_flops, step_flops

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Alignment throughput"


def pair_tensors(n: int, image_size: int, context_length: int) -> dict[str, torch.Tensor]:
    """Random images, token ids and labels, the same for every call with the same sizes."""
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.rand(n, 3, image_size, image_size, generator=g),
        "text": torch.randint(1, 49000, (n, context_length), generator=g),
        "label": torch.arange(n) % 10,
    }


def synthetic_pairs(n: int = 256, image_size: int = 16, context_length: int = 16):
    """One-experience Avalanche stream of :func:`pair_tensors` (the Lightning runner's data)."""
    from mneme.datamodules.streams.captions import PairedTensors
    from mneme.datamodules.streams.digits import split_benchmark

    t = pair_tensors(n, image_size, context_length)
    data = PairedTensors([t["image"], t["text"]], t["label"])
    return split_benchmark(data, data, 1, False, 0, None, False)


class StepTimer:
    """Wall time from the start of step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device = warmup, device
        self.start = self.end = 0.0

    def tick(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()


def run_lightning(args, device: torch.device, compiled: bool = False) -> float:
    from lightning.pytorch import Callback, Trainer
    from mneme.app.models.aligner import ContrastiveAligner
    from mneme.datamodules import ContinualDataModule

    timer = StepTimer(args.warmup, device)

    class Timing(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == args.warmup:
                timer.start = timer.tick()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            timer.end = timer.tick()

    n = args.batch_size * (args.warmup + args.steps)
    image_size, context, embed_dim = model_shape(args.model)
    from mneme.datamodules.streams.registry import stream

    from benchmarks.align_throughput import synthetic_pairs  # as imported, not __main__'s

    stream(synthetic_pairs)  # this repository's own stream, trusted by the code that runs it
    data = ContinualDataModule(
        "benchmarks.align_throughput.synthetic_pairs",
        {"n": n, "image_size": image_size, "context_length": context},
        sample_keys=["image", "label", "text", "task"],
        batch_size=args.batch_size,
        data_on_device=True,
    )
    spec = {"model": args.model, "projection": "none"}
    module = ContrastiveAligner(
        encoders={"image": {**spec, "type": "open_clip_visual", "normalize": False}, "text": spec},
        embed_dim=embed_dim,
        class_names=[f"class {i}" for i in range(10)],  # the synthetic pairs' labels
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4),  # fused on CUDA by Mneme
        compile=compile_kwargs(args) if compiled else False,
    )
    trainer = Trainer(
        accelerator=device.type,
        devices=1,
        precision=args.precision,
        **data.trainer_settings(max_epochs=1),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Timing()],
    )
    trainer.fit(module, data)
    return args.batch_size * args.steps / (timer.end - timer.start)


def model_shape(name: str) -> tuple[int, int, int]:
    import mneme.app.nn.modalities  # noqa: F401 - registers mneme-tiny-clip
    import open_clip

    cfg = open_clip.get_model_config(name)
    size = cfg["vision_cfg"]["image_size"]
    return size, cfg["text_cfg"].get("context_length", 77), cfg["embed_dim"]


def compile_kwargs(args) -> dict:
    return {"mode": args.compile_mode, "backend": args.compile_backend}


def run_plain(args, device: torch.device, compiled: bool = False) -> tuple[float, int]:
    """Pairs/s of a bare loop, and the FLOPs of one of its steps (counted eagerly, once)."""
    import open_clip
    from open_clip.loss import ClipLoss

    model = open_clip.create_model(args.model, pretrained=None, force_custom_text=True).to(device)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-4,
        fused=device.type == "cuda",
    )
    loss_fn = ClipLoss()
    image_size, context, _ = model_shape(args.model)
    data = pair_tensors(args.batch_size * (args.warmup + args.steps), image_size, context)
    images, texts = data["image"].to(device), data["text"].to(device)
    autocast = args.precision.startswith("bf16") or args.precision.startswith("16")
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float16
    timer = StepTimer(args.warmup, device)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).to(device)

    def step_loss(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            a = model.encode_image(image, normalize=True)
            b = model.encode_text(text, normalize=True)
            return loss_fn(a, b, model.logit_scale.exp())

    first = order[: args.batch_size]
    flops = step_flops(lambda: step_loss(images[first], texts[first]))
    run_step = torch.compile(step_loss, **compile_kwargs(args)) if compiled else step_loss
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            timer.start = timer.tick()
        index = order[step * args.batch_size : (step + 1) * args.batch_size]
        loss = run_step(images[index], texts[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
    timer.end = timer.tick()
    return args.batch_size * args.steps / (timer.end - timer.start), flops


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace (or append) the ``## Alignment throughput`` section, keeping the rest."""
    old = path.read_text() if path.is_file() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(old):
        new = pattern.sub(lambda _: text.rstrip("\n") + "\n\n", old, count=1)
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mneme-tiny-clip", help="open_clip model config")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", default="32-true", help="Lightning precision string")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=1, help="alternate runs, keep best")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    parser.add_argument("--compile", action="store_true", help="also time compiled runners")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the table")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny, every runner; no write")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.batch_size, args.steps, args.warmup = "mneme-tiny-clip", 8, 2, 1
        args.device, args.precision, args.repeats, args.no_write = "cpu", "32-true", 1, True
        args.compile, args.compile_backend = True, "aot_eager"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    runners = ["lightning", "plain"] + (["lightning_compiled", "plain_compiled"] * args.compile)
    results: dict[str, list[float]] = {r: [] for r in runners}
    flops = 0
    for _ in range(args.repeats):  # alternate, so load changes hit both alike
        for runner in runners:
            compiled = runner.endswith("_compiled")
            if runner.startswith("lightning"):
                results[runner].append(run_lightning(args, device, compiled))
            else:
                pairs, flops = run_plain(args, device, compiled)
                results[runner].append(pairs)
    best = {k: max(v) for k, v in results.items()}
    peak = peak_bf16_flops(device, args.peak_tflops)
    steps_per_s = {k: v / args.batch_size for k, v in best.items()}
    utilisation = {k: format_mfu(mfu(flops, v, peak)) for k, v in steps_per_s.items()}
    overhead = 100 * (1 - best["lightning"] / best["plain"])
    hardware = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    )
    shown = [a for a in (argv or []) if a != "--no-write"]
    command = "python -m benchmarks.align_throughput " + " ".join(shown)
    names = {
        "lightning": "Lightning + ContrastiveAligner",
        "plain": "plain PyTorch loop",
        "lightning_compiled": "Lightning + ContrastiveAligner, `model.compile`",
        "plain_compiled": "plain PyTorch loop, forward + loss compiled",
    }
    table = "".join(
        f"| {names[r]} | {args.model} | {args.batch_size} | {args.precision} "
        f"| {best[r]:.0f} | {utilisation[r]} |\n"
        for r in runners
    )
    compiled_note = ""
    if args.compile:
        compiled_overhead = 100 * (1 - best["lightning_compiled"] / best["plain_compiled"])
        compiled_note = (
            f" Compiled ({args.compile_backend}, mode {args.compile_mode or 'default'}): "
            f"{compiled_overhead:.1f}%, Mneme compiling its towers, the plain loop its whole "
            "forward and loss."
        )
    text = (
        f"{SECTION}\n\n"
        "Pairs per second of one image-text training step (forward, ClipLoss, backward,\n"
        "AdamW, logit-scale clamp) on the same open_clip model, batch and precision; best of\n"
        f"{args.repeats} alternating run(s) of {args.steps} timed steps after {args.warmup} "
        "warm-up steps. MFU: FLOPs of one step (FlopCounterMode) times steps/s over the\n"
        "GPU's dense bf16 peak (benchmarks/mfu.py).\n\n"
        f"`{command.strip()}` on {hardware}, torch {torch.__version__} "
        f"({flops / 1e9:.1f} GFLOP a step):\n\n"
        "| runner | model | batch | precision | pairs/s | MFU |\n"
        "| --- | --- | --- | --- | --- | --- |\n"
        f"{table}\n"
        f"Lightning's overhead: {overhead:.1f}% eager (the module also applies batch transforms "
        f"and loss terms, logs per step, and keeps eval metrics).{compiled_note}\n"
    )
    print(text)
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
