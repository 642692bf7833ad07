"""Continual fine-tuning of a language model on the offline text domains, every method in
one run: full fine-tuning, LoRA, LoRA + replay, LoRA + EWC, O-LoRA, LoRA + merging, LoRA +
LwF (issue 23, "Measured").

The model, stream and token budget are ``configs/lm_domains_lora.yaml``'s (a tiny Llama,
hidden 64, 2 layers; a byte-level BPE of 512 tokens trained on the stream; a general stage
of encyclopedia + Python docs, then news, forum, reviews; 8,000 training tokens per domain,
6 epochs, batch 8). The LoRA rows train every weight in the general stage
(``general_experiences: 1``) and only the adapters after it; full fine-tuning trains every
weight throughout. Each method runs in a process of its own (its peak RSS is its own).

Columns: final average held-out perplexity (last row, every domain), forgetting (the mean
rise of earlier domains' perplexity above their best), the general column's rise
(``P[K-1][0] / P[0][0] - 1``), the trainable parameters after the general stage, training
tokens of the stream per second of training step (validation excluded; replayed rows are
extra work, not counted), the process's peak RSS.

    OMP_NUM_THREADS=1 python -m benchmarks.lm_domains [--methods lora,lora_replay]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = ROOT.parent / "shared" / "data" / "text_domains"
MODEL = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
    "max_position_embeddings": 128,
}  # fmt: skip
LORA = {
    "method": "lora", "r": 8, "lora_alpha": 16,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}  # fmt: skip
STREAM = {"block_size": 64, "vocab_size": 512, "max_tokens": 8000, "max_test_tokens": 2000}
EPOCHS, BATCH, LR = 6, 8, 3e-3
METHODS = (
    "full_ft", "full_ft_replay", "lora", "lora_replay", "lora_ewc", "olora", "lora_merging",
    "lora_lwf",
)  # fmt: skip
# The replay buffer: 128 blocks (8,192 tokens, a domain's budget), an equal share per domain.
REPLAY = {"buffer_size": 128, "policy": "class_balanced", "replay_batch_size": 8}


def callbacks_for(method: str) -> list:
    from mneme.callbacks import EWC, LoRAMerging, OLoRA, Replay, TokenLwF

    return {
        "lora_replay": [Replay(**REPLAY)],
        "full_ft_replay": [Replay(**REPLAY)],
        "lora_ewc": [EWC(ewc_lambda=1000.0)],
        "olora": [OLoRA(orthogonal_lambda=0.5)],
        "lora_merging": [LoRAMerging(mode="fold")],
        "lora_lwf": [TokenLwF(alpha=1.0, temperature=2.0)],
    }.get(method, [])


def run_one(method: str, seed: int, workdir: Path) -> dict:
    """One method's run, in this process."""
    import torch
    from lightning.pytorch import Callback, Trainer, seed_everything
    from mneme.app.models.lm import ContinualLM
    from mneme.callbacks import ContinualMetrics
    from mneme.datamodules.continual import ContinualDataModule

    class StepClock(Callback):
        """Seconds inside training steps, and the stream's tokens they trained on."""

        def __init__(self) -> None:
            self.seconds, self.tokens, self._start = 0.0, 0, 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.tokens += int(batch["attention_mask"].sum())
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seconds += time.perf_counter() - self._start

    seed_everything(seed)
    datamodule = ContinualDataModule(
        "mneme.datamodules.TextDomains",
        {**STREAM, "data_root": str(DATA_ROOT), "seed": seed},
        epochs_per_experience=EPOCHS, batch_size=BATCH, eval_batch_size=64,
    )  # fmt: skip
    full = method.startswith("full_ft")
    module = ContinualLM(
        model_config=MODEL,
        peft=None if full else LORA,
        general_experiences=0 if full else 1,
        optimizer=lambda params: torch.optim.AdamW(params, lr=LR),
    )
    metrics, clock = ContinualMetrics(print_table=False), StepClock()
    trainer = Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=workdir,
        callbacks=[metrics, clock, *callbacks_for(method)], **datamodule.trainer_settings(),
    )  # fmt: skip
    trainer.fit(module, datamodule)
    summary = metrics.summary()
    P = summary["perplexity_matrix"]
    module.apply_stage(len(P) - 1)  # what trains after the general stage
    return {
        "method": method,
        "perplexity_matrix": P,
        "final_average_perplexity": sum(P[-1]) / len(P[-1]),
        "forgetting": summary["perplexity_forgetting"],
        "general_rise": summary["general_perplexity_rise"],
        "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "tokens_per_s": clock.tokens / clock.seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_in_child(method: str, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        out = Path(workdir) / "result.json"
        args = [sys.executable, "-m", "benchmarks.lm_domains", "--one", method, "--seed",
                str(seed), "--json", str(out)]  # fmt: skip
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{method}: {done.stderr[-3000:]}")
        return json.loads(out.read_text())


def table(rows: list[dict]) -> str:
    lines = [
        "| method | final avg perplexity | forgetting | general rise | trainable params "
        "| tokens/s | peak RSS (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['final_average_perplexity']:.1f} | {r['forgetting']:+.2f} | "
            f"{100 * r['general_rise']:+.1f}% | {r['trainable_params']:,} | "
            f"{r['tokens_per_s']:,.0f} | {r['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child: one method
    parser.add_argument("--json", help="write the rows (or a child's row) here")
    options = parser.parse_args()
    if options.one:
        with tempfile.TemporaryDirectory() as workdir:
            row = run_one(options.one, options.seed, Path(workdir))
        Path(options.json).write_text(json.dumps(row))
        return
    rows = []
    start = time.perf_counter()
    for method in options.methods.split(","):
        t0 = time.perf_counter()
        rows.append(run_in_child(method, options.seed))
        print(f"{method}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print(table(rows))
    print(f"\nwhole run: {time.perf_counter() - start:.0f} s", flush=True)
    for r in rows:
        print(
            f"{r['method']}: last row " + " ".join(f"{p:.1f}" for p in r["perplexity_matrix"][-1])
        )
    if options.json:
        Path(options.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
