"""Generation for :class:`~mneme.app.models.lm.ContinualLM`'s ``predict_step``: Hugging Face
``generate`` on prompts from a file or from the test blocks, one row dict each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from mneme.app.core.errors import ConfigError
from mneme.app.core.seeding import run_seed
from mneme.app.nn.lm_build import context_length
from torch import Tensor

IGNORE_INDEX = -100


def read_prompts(path: str) -> list[str]:
    """The prompts of a text file, one a line (blank lines skipped)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"model.prompts: no file '{path}'; give a text file, one prompt a line")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"model.prompts: '{path}' is not UTF-8 (byte offset {err.start}); save it as UTF-8"
        ) from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"model.prompts: '{path}' holds no prompt; write one prompt a line")
    return prompts


def check_fits(module, ids: list[int], where: str) -> None:
    """A prompt that leaves no room for ``max_new_tokens`` in the context is refused."""
    positions = context_length(module.lm)
    new = module.hparams.max_new_tokens
    if positions is not None and len(ids) + new > positions:
        raise ConfigError(
            f"model.prompts: {where} has {len(ids)} tokens; with max_new_tokens {new} it "
            f"exceeds the model's context of {positions} tokens; shorten it or lower "
            "max_new_tokens"
        )


@torch.no_grad()
def generate(
    module, ids: list[int], index: int, max_new_tokens: int | None = None, greedy: bool = False
) -> list[int]:
    """The new token ids ``generate`` gives after ``ids`` (greedy, or sampled from a
    generator seeded by ``(generation_seed or the run's seed, index)``)."""
    hp = module.hparams
    tokenizer = module.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sample = hp.do_sample and not greedy
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens or hp.max_new_tokens, "do_sample": sample
    }  # fmt: skip
    if sample:
        options.update(temperature=hp.temperature, top_k=hp.top_k or 0)
    else:  # greedy: no sampling settings (transformers warns about unused ones)
        options.update(temperature=None, top_k=None, top_p=None)
    input_ids = torch.tensor([ids], device=module.device)
    was_training = module.lm.training
    module.lm.eval()
    try:
        with torch.random.fork_rng(devices=[module.device] if module.device.type == "cuda" else []):
            torch.manual_seed(run_seed(hp.generation_seed) * 1_000_003 + index)
            out = module.lm.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
                use_cache=True,
                **options,
            )
    finally:
        module.lm.train(was_training)
    return out[0, len(ids) :].tolist()


def generate_rows(module, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int) -> list:
    """``predict_step``'s rows: the prompt file's (all on the first batch of the first loader,
    none after), else one per test block (its first ``prompt_tokens`` scored tokens)."""
    tokenizer = module.tokenizer
    hp = module.hparams
    if hp.prompts is not None:
        if batch_idx or dataloader_idx:
            return []
        prompts = read_prompts(hp.prompts)
        encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        for n, ids in enumerate(encoded):
            check_fits(module, ids, f"line {n + 1} of {hp.prompts}")
        return [
            {"prompt": p, "generated": tokenizer.decode(generate(module, ids, n))}
            for n, (p, ids) in enumerate(zip(prompts, encoded, strict=True))
        ]
    rows = []
    for i, (ids, labels) in enumerate(zip(batch["input_ids"], batch["labels"], strict=True)):
        scored = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        if len(scored) < len(labels) and scored.numel() and scored[0] > 0:
            prompt = ids[: int(scored[0])]  # an instruction: its prompt (the unscored head)
        else:
            prompt = ids[: hp.prompt_tokens]
        prompt_ids = prompt.tolist()
        check_fits(module, prompt_ids, f"a prompt of test experience {dataloader_idx}")
        new = generate(module, prompt_ids, batch_idx * 100_000 + i)
        rows.append({
            "domain": int(batch["task"][i]) if "task" in batch else dataloader_idx,
            "prompt": tokenizer.decode(prompt_ids),
            "generated": tokenizer.decode(new),
        })  # fmt: skip
    return rows


def exact_matches(module, batch: dict[str, Tensor]) -> Tensor | None:
    """For a batch of instruction rows (an unscored prompt, then the scored answer and EOS):
    whether the greedy generation from each prompt, decoded and stripped, equals the answer
    (as many new tokens as the answer has); ``None`` for language-modelling rows."""
    tokenizer = module.tokenizer
    hits = []
    for i, (ids, labels) in enumerate(zip(batch["input_ids"], batch["labels"], strict=True)):
        scored = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        if not scored.numel() or scored[0] == 0:
            return None  # packed text: no prompt/answer split
        start, end = int(scored[0]), int(scored[-1]) + 1
        answer = tokenizer.decode(labels[start:end].tolist(), skip_special_tokens=True)
        new = generate(module, ids[:start].tolist(), i, max_new_tokens=end - start, greedy=True)
        hits.append(tokenizer.decode(new, skip_special_tokens=True).strip() == answer.strip())
    return torch.tensor(hits, dtype=torch.bool, device=batch["input_ids"].device)
