"""Tokens/s of Mneme's LoRA training step against a plain PyTorch + peft loop, same model,
batch, precision and data, in one run (issue 23, "Measured").

The model: a Llama-style causal LM built from a config with random weights (``--hidden``,
``--layers``; vocabulary ``--vocab``), LoRA r=8 on every attention and MLP projection,
AdamW lr 1e-3, fp32 (``--precision bf16-mixed`` on a GPU). The data: ``--steps`` batches
of ``--batch`` random token blocks of ``--block`` tokens (one domain, one experience).

- plain: ``peft.get_peft_model`` on the same model (same seed), then ``for batch: loss =
  model(input_ids, labels=...).loss; loss.backward(); opt.step(); opt.zero_grad()``;
- Mneme: ``ContinualLM`` with ``peft: {method: lora, ...}`` through ``Trainer.fit`` on a
  ``ContinualDataModule`` serving the same blocks (its training step: the strategies'
  hooks, the token NLL, Lightning's optimizer loop); its validation is outside the timing.

Both are timed from the end of the ``--warmup``-th step to the end of the last one; the
figure is trained tokens per second, median of ``--repeats`` runs each.

    OMP_NUM_THREADS=1 python -m benchmarks.lm_speed
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch
from mneme.datamodules.data.experiences import TensorExperience
from mneme.datamodules.streams.declared import DeclaredStream
from mneme.datamodules.streams.registry import stream

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": TARGETS}
LR = 1e-3


def blocks(n: int, block: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(vocab, (n, block), generator=torch.Generator().manual_seed(seed))
    zeros = torch.zeros(n, dtype=torch.long)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids),
            "label": zeros, "task": zeros.clone()}  # fmt: skip


@stream
def RandomTokenBlocks(n: int = 256, block: int = 128, vocab: int = 1024):  # noqa: N802
    """One experience of random token blocks (a speed probe's data)."""
    experience = TensorExperience(blocks(n, block, vocab))
    scenario = SimpleNamespace(train_stream=[experience], test_stream=[experience])
    return DeclaredStream(
        scenario, fields=("input_ids", "label", "labels", "attention_mask", "task")
    )


def model_config(options) -> dict:
    return {
        "model_type": "llama", "hidden_size": options.hidden,
        "intermediate_size": 4 * options.hidden, "num_hidden_layers": options.layers,
        "num_attention_heads": max(1, options.hidden // 32), "max_position_embeddings": 512,
    }  # fmt: skip


def tokenizer_folder(vocab: int, folder: str) -> str:
    """A word-level tokenizer of exactly ``vocab`` tokens (the model's embedding rows)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab - 1)} | {"<|endoftext|>": vocab - 1}
    core = Tokenizer(models.WordLevel(words, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    return folder


def plain_loop(options) -> float:
    from mneme.app.nn.lm_build import build_from_config
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = build_from_config(model_config(options), options.vocab, False)
    spec = {k: v for k, v in LORA.items() if k != "method"}
    model = get_peft_model(model, LoraConfig(**spec)).to(options.device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    data = blocks(options.batch * options.steps, options.block, options.vocab)
    autocast = torch.autocast(options.device, torch.bfloat16, enabled="bf16" in options.precision)
    start = None
    for step in range(options.steps):
        rows = slice(step * options.batch, (step + 1) * options.batch)
        ids = data["input_ids"][rows].to(options.device)
        with autocast:
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step + 1 == options.warmup:
            _sync(options.device)
            start = time.perf_counter()
    _sync(options.device)
    return (
        (options.steps - options.warmup)
        * options.batch
        * options.block
        / (time.perf_counter() - start)
    )


def mneme_loop(options, tokenizer: str) -> float:
    from lightning.pytorch import Callback, Trainer, seed_everything
    from mneme.app.models.lm import ContinualLM
    from mneme.datamodules.continual import ContinualDataModule

    class Clock(Callback):
        def __init__(self) -> None:
            self.steps, self.start, self.end = 0, None, None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.steps += 1
            if self.steps == options.warmup:
                _sync(options.device)
                self.start = time.perf_counter()
            if self.steps == options.steps:
                _sync(options.device)
                self.end = time.perf_counter()

    seed_everything(0)
    n = options.batch * options.steps
    datamodule = ContinualDataModule(
        "benchmarks.lm_speed.RandomTokenBlocks",
        {"n": n, "block": options.block, "vocab": options.vocab},
        batch_size=options.batch,
    )
    module = ContinualLM(
        model_config=model_config(options), tokenizer=tokenizer, peft=LORA,
        optimizer=lambda params: torch.optim.AdamW(params, lr=LR),
    )  # fmt: skip
    clock = Clock()
    trainer = Trainer(
        accelerator="gpu" if options.device == "cuda" else "cpu", devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        precision=options.precision, callbacks=[clock], **datamodule.trainer_settings(),
    )  # fmt: skip
    trainer.fit(module, datamodule)
    return (
        (options.steps - options.warmup) * options.batch * options.block / (clock.end - clock.start)
    )


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    options = parser.parse_args()
    tokenizer = tokenizer_folder(options.vocab, tempfile.mkdtemp(prefix="lm_speed_tok_"))
    plain, mneme = [], []
    for _ in range(options.repeats):  # interleaved: a load change hits both alike
        plain.append(plain_loop(options))
        mneme.append(mneme_loop(options, tokenizer))
    p, m = statistics.median(plain), statistics.median(mneme)
    print(
        f"device {options.device}, threads {torch.get_num_threads()}, hidden {options.hidden}, "
        f"layers {options.layers}, batch {options.batch}x{options.block} tokens, "
        f"{options.precision}"
    )
    print(f"plain PyTorch + peft: {p:,.0f} tokens/s  (runs: {[round(x) for x in plain]})")
    print(f"Mneme ContinualLM:    {m:,.0f} tokens/s  (runs: {[round(x) for x in mneme]})")
    print(f"Mneme / plain: {m / p:.3f}x")


if __name__ == "__main__":  # run as the package's module: its stream registered by that name
    from benchmarks.lm_speed import main as package_main

    package_main()
