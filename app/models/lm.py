"""ContinualLM: a causal language model (any Hugging Face ``AutoModelForCausalLM``) adapted
over a stream of text domains, with the strategies, metrics and checkpoints of the images."""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from mneme.app.core.errors import ConfigError
from mneme.app.core.metrics import ExperienceAccuracy, ExperiencePerplexity
from mneme.app.finetuning.adaptation import PEFT_METHODS, BackboneAdaptation
from mneme.app.models.base import Batch, ContinualModule
from mneme.app.nn import lm_build
from torch import Tensor, nn

IGNORE_INDEX = -100  # labels that carry no loss (prompt tokens, padding): HF's convention
TOKENIZER_KEY = "mneme_tokenizer"  # the tokenizer, as plain data, in every checkpoint
FROZEN_KEY = "mneme_frozen_adapters"  # adapter names that no longer train (O-LoRA's old ones)


def token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Summed next-token NLL (nats, float32), the number of scored tokens, and how many of
    them the argmax predicts. ``labels[t]`` is the token at position ``t`` (HF's convention:
    position ``t-1``'s logits predict it), ``-100`` where nothing is scored."""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    scored = targets != IGNORE_INDEX
    flat = logits.reshape(-1, logits.shape[-1])
    nll = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    correct = ((logits.argmax(-1) == targets) & scored).sum()
    return nll, scored.sum(), correct


class ContinualLM(ContinualModule):
    """A causal language model trained on a stream of text domains (one experience each).

    The model is a Hugging Face ``AutoModelForCausalLM``: ``model`` names a local folder (or a
    hub name, which downloads), or ``model_config`` builds one with random weights seeded by
    the run's seed (``{model_type: llama, hidden_size: 64, num_hidden_layers: 2, ...}``, the
    fields of a transformers config; the vocabulary is the tokenizer's). The tokenizer is
    ``tokenizer`` (a folder), else the model folder's, else the stream's (a tokenizer the
    stream trained on its text); it is stored in every checkpoint, so an exported model ships
    with it.

    Batches are dicts of ``input_ids``, ``labels`` (``-100`` where no loss: prompt tokens,
    padding), ``attention_mask``, ``label`` and ``task`` (the domain). The loss is the mean
    next-token NLL over the scored tokens. Validation on each test experience (domain) sums
    the NLL and the scored tokens: ``experience_perplexity`` gives the perplexity matrix
    (``ContinualMetrics``), and ``experience_accuracy`` holds the next-token top-1 accuracy,
    the ordinary accuracy matrix (on instruction rows, ``exact_match``: the exact-match
    accuracy of the greedy answers, one count per row). Training ``outputs`` hold ``logits``
    (B, T, V) and ``labels``, which the token-level strategies read (``TokenLwF``).

    ``peft`` is the classifier's key (:mod:`mneme.app.finetuning.adaptation`): ``{method:
    lora, r: 8, lora_alpha: 16, target_modules: [q_proj, v_proj]}``; without it every weight
    trains (full fine-tuning). ``gradient_checkpointing`` trades compute for activation
    memory; bf16/fp16 come from ``trainer.precision`` (``bf16-mixed``).

    ``predict_step`` generates with Hugging Face ``generate`` (``max_new_tokens``, greedy, or
    sampled with ``do_sample``, ``temperature``, ``top_k`` and ``generation_seed``): from the
    lines of ``prompts`` (a text file, one prompt a line; all of them on the first predict
    batch), else from the first ``prompt_tokens`` scored tokens of each test block (or an
    instruction's prompt); each row a dict ``{"domain", "prompt", "generated"}``.

    Args:
        model: a Hugging Face model folder or hub name.
        model_config: a transformers config (``model_type`` and fields) for random weights.
        tokenizer: a tokenizer folder (or hub name); default the model's, else the stream's.
        trust_remote_code: let transformers run a hub model's own code (off by default).
        gradient_checkpointing: recompute activations in the backward pass.
        peft: parameter-efficient fine-tuning (see above); ``None`` trains every weight.
        general_experiences: with ``peft``, the first experiences (the general stage, e.g. 1)
            train every base weight and no adapter: the base model is trained (or
            pretrained further) on general text before the adapters adapt it to the domains.
        exact_match: on instruction rows (prompt unscored, answer scored), the accuracy
            matrix holds the exact-match accuracy of greedy answers; elsewhere (and when
            false) the next-token top-1 accuracy.
        optimizer, reset_optimizer, compile: as :class:`ContinualModule`.
        vocab_size, num_tasks: set from the tokenizer and the stream when the model is built
            (kept in the checkpoint; ``peft: {adapters: per_task}`` makes one adapter per
            domain, and each row runs through its domain's, by its ``task`` label).
    """

    def __init__(
        self,
        model: str | None = None,
        model_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        peft: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        reset_optimizer: bool = False,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        generation_seed: int | None = None,
        prompts: str | None = None,
        prompt_tokens: int = 16,
        general_experiences: int = 0,
        exact_match: bool = True,
        vocab_size: int | None = None,
        num_tasks: int | None = None,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__(optimizer, reset_optimizer, compile)
        self.save_hyperparameters(ignore=["optimizer"], logger=False)
        if (model is None) == (model_config is None):
            raise ConfigError(
                "model.model: give either model (a Hugging Face folder or hub name) or "
                "model_config (a config built with random weights), not both or neither"
            )
        if max_new_tokens < 1:
            raise ConfigError(f"model.max_new_tokens: at least 1, got {max_new_tokens}")
        self.input_key = "input_ids"
        self.lm: nn.Module | None = None
        self.tokenizer = None
        self.adaptation: BackboneAdaptation | None = None
        self.experience_perplexity: ExperiencePerplexity | None = None
        # Adapter names whose weights stay frozen (O-LoRA's earlier domains).
        self.frozen_adapters: set[str] = set()
        method = dict(peft or {}).get("method")
        if general_experiences < 0 or general_experiences and method not in PEFT_METHODS:
            raise ConfigError(
                "model.general_experiences: a count >= 0 of experiences that train the base "
                f"weights before peft adapters do; it needs model.peft with a method of "
                f"{list(PEFT_METHODS)} (without peft every weight trains anyway)"
            )
        if tokenizer is not None or model is not None:
            self.tokenizer = lm_build.load_tokenizer(
                tokenizer or model, "model.tokenizer" if tokenizer else "model.model"
            )
        per_task = dict(peft or {}).get("adapters") == "per_task"
        if (model is not None or vocab_size is not None) and (num_tasks or not per_task):
            self._build(vocab_size, num_tasks or 1)

    # -- building -------------------------------------------------------------------------
    def _build(self, vocab_size: int | None, num_tasks: int = 1) -> None:
        hp = self.hparams
        if hp.model is not None:
            self.lm = lm_build.load_pretrained(hp.model, hp.trust_remote_code)
        else:
            self.lm = lm_build.build_from_config(hp.model_config, vocab_size, hp.trust_remote_code)
        rows = self.lm.get_input_embeddings().num_embeddings
        self.hparams.update(vocab_size=rows)
        if self.tokenizer is not None:
            self.check_tokenizer(self.tokenizer)
        if hp.gradient_checkpointing:
            if not self.lm.supports_gradient_checkpointing:
                raise ConfigError(
                    f"model.gradient_checkpointing: {type(self.lm).__name__} does not support "
                    "it; set it false"
                )
            self.lm.gradient_checkpointing_enable({"use_reentrant": False})
        self.lm.config.use_cache = False  # training: no key/value cache
        lm_build.check_lora_targets(self.lm, hp.peft)
        # ``adapters: per_task``: one adapter per domain, each row through its domain's
        self.adaptation = BackboneAdaptation(self.lm, hp.peft, None, num_tasks, None)
        self.hparams.update(num_tasks=num_tasks)

    def check_tokenizer(self, tokenizer) -> None:
        """A tokenizer whose ids exceed the embedding is refused naming both sizes."""
        rows = self.lm.get_input_embeddings().num_embeddings
        if len(tokenizer) > rows:
            raise ConfigError(
                f"model.tokenizer: the tokenizer has {len(tokenizer)} tokens (len(tokenizer)) "
                f"but the model's embedding holds {rows} (config.vocab_size); use the model's "
                "own tokenizer, or build the model from model_config with this one"
            )

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if self.tokenizer is None:
            self.tokenizer = stream_tokenizer(datamodule)
        if self.lm is None:
            self._build(len(self.tokenizer), datamodule.num_tasks)
        self.check_tokenizer(self.tokenizer)
        self._check_block_size(datamodule)
        experiences = len(datamodule.test_experiences)
        self.experience_accuracy = ExperienceAccuracy(experiences)
        self.experience_perplexity = ExperiencePerplexity(experiences)

    def _check_block_size(self, datamodule) -> None:
        positions = lm_build.context_length(self.lm)
        block = datamodule.train_experiences[0].field_shape(self.input_key)
        if positions is not None and block is not None and block[-1] > positions:
            raise ConfigError(
                f"data.benchmark_args.block_size: {block[-1]} tokens exceed the model's "
                f"{positions} positions (max_position_embeddings); set block_size <= {positions}"
            )

    def compiled_modules(self) -> list[nn.Module]:
        return [self.lm]

    # -- what trains ------------------------------------------------------------------------
    def is_adapter_parameter(self, name: str) -> bool:
        """Whether a parameter name of ``lm`` belongs to a peft adapter."""
        return any(part.startswith(("lora_", "hada_", "lokr_", "ia3_")) for part in name.split("."))

    def apply_stage(self, experience: int) -> None:
        """Which weights train in ``experience``: the base's in the general stage, else the
        adapters' (those in ``frozen_adapters`` stay frozen)."""
        staged = self.hparams.general_experiences or self.frozen_adapters
        if self.hparams.peft is None or not staged:
            return  # what trains is what the peft method made trainable
        general = experience < self.hparams.general_experiences
        for name, p in self.lm.named_parameters():
            if not self.is_adapter_parameter(name):
                p.requires_grad_(general)
            else:
                frozen = any(f".{adapter}." in f".{name}." for adapter in self.frozen_adapters)
                p.requires_grad_(not general and not frozen)

    def on_train_epoch_start(self) -> None:
        from mneme.app.core.schedule import current_experience

        self.apply_stage(current_experience(self.trainer))  # after the callbacks' hooks
        super().on_train_epoch_start()

    def optimizer_parameters(self):
        """The trainable parameters; with a general stage, every parameter (a frozen one has
        no gradient, and the optimizer skips it). Adapters added during the fit (O-LoRA's
        ``olora_<k>``) each get a group of their own, in order, so a resumed run's optimizer
        has the groups the checkpoint's had."""
        everything = self.hparams.general_experiences
        params = [
            (n, p)
            for n, p in self.named_parameters()
            if everything or p.requires_grad or self.is_adapter_parameter(n)
        ]
        added = sorted(
            {part for n, _ in params for part in n.split(".") if part.startswith("olora_")},
            key=lambda a: int(a.split("_")[1]),
        )
        groups = [{"params": [p for n, p in params if not any(
            f".{a}." in n for a in added)]}]  # fmt: skip
        for adapter in added:
            groups.append({"params": [p for n, p in params if f".{adapter}." in n]})
        return groups

    # -- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.tokenizer is not None:
            checkpoint[TOKENIZER_KEY] = lm_build.tokenizer_state(self.tokenizer)
        checkpoint[FROZEN_KEY] = sorted(self.frozen_adapters)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.frozen_adapters = set(checkpoint.get(FROZEN_KEY, []))
        if self.lm is not None:  # adapters added during the fit (O-LoRA), before weights load
            saved = {
                part for key in checkpoint.get("state_dict", {})
                for part in key.split(".") if part.startswith("olora_")
            }  # fmt: skip
            for name in sorted(saved - set(self.lora_adapter_names())):
                self.add_lora_adapter(name)
        if self.tokenizer is None and TOKENIZER_KEY in checkpoint:
            self.tokenizer = lm_build.tokenizer_from_state(checkpoint[TOKENIZER_KEY])
        saved = checkpoint.get("hyper_parameters", {}).get("vocab_size")
        if saved is not None and self.lm is not None and saved != self.hparams.vocab_size:
            raise ConfigError(
                f"model.vocab_size: the checkpoint's model has {saved} token embeddings, this "
                f"one {self.hparams.vocab_size}; use the tokenizer the checkpoint was trained with"
            )

    # -- LoRA adapters ----------------------------------------------------------------------
    def lora_layers(self) -> list[nn.Module]:
        from peft.tuners.lora import LoraLayer

        return [m for m in self.lm.modules() if isinstance(m, LoraLayer)]

    def lora_adapter_names(self) -> list[str]:
        layers = self.lora_layers()
        return list(layers[0].lora_A) if layers else []

    def add_lora_adapter(self, name: str) -> list[nn.Parameter]:
        """Inject a new LoRA adapter ``name`` like the ``peft`` spec's, active together with
        the others (their outputs add up); returns its parameters."""
        from peft import LoraConfig, inject_adapter_in_model

        spec = {k: v for k, v in dict(self.hparams.peft).items()
                if k not in ("method", "adapters", "merge_each_experience")}  # fmt: skip
        before = {id(p) for p in self.lm.parameters()}
        with warnings.catch_warnings():  # "multiple adapters in the model": what O-LoRA wants
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(LoraConfig(**spec), self.lm, adapter_name=name)
        names = self.lora_adapter_names()
        for layer in self.lora_layers():
            layer.set_adapter(names)  # every adapter active (peft activates one by default)
        self.restart_lora(name, len(names))
        self.apply_stage(self.hparams.general_experiences)  # past the general stage
        return [p for p in self.lm.parameters() if id(p) not in before]

    @torch.no_grad()
    def restart_lora(self, name: str, key: int) -> None:
        """Adapter ``name`` as LoRA starts it (``B = 0``; ``A`` as peft's default, Kaiming
        uniform), ``A`` drawn from a generator seeded by ``(run seed, key)``: peft draws from
        the global RNG, which a resumed process does not have in the same state, so an
        adapter started during a fit (O-LoRA's, a fold's restart) would differ after a
        resume."""
        import math

        from mneme.app.core.seeding import run_seed

        generator = torch.Generator().manual_seed(run_seed() * 1_000_003 + key)
        for layer in self.lora_layers():
            if name not in layer.lora_A:
                continue
            a = layer.lora_A[name].weight
            fresh = torch.empty(a.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
            a.copy_(fresh)
            layer.lora_B[name].weight.zero_()

    # -- forward --------------------------------------------------------------------------
    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, task: Tensor | None = None
    ) -> Tensor:
        """Next-token logits (B, T, V); with per-task adapters each row runs through its
        domain's."""

        def logits(rows: Tensor) -> Tensor:
            mask = None if attention_mask is None else attention_mask[rows]
            return self.lm(input_ids=input_ids[rows], attention_mask=mask, use_cache=False).logits

        rows = torch.arange(len(input_ids), device=input_ids.device)
        return self.adaptation.run(logits, rows, task)

    def batch_loss(self, batch: Batch) -> Tensor:
        """Mean next-token NLL of a batch: what EWC's Fisher differentiates."""
        logits = self(batch["input_ids"], batch.get("attention_mask"), batch.get("task"))
        nll, count, _ = token_nll(logits, batch["labels"])
        return nll / count.clamp_min(1)

    def training_terms(self, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        logits = self(batch["input_ids"], batch.get("attention_mask"), batch.get("task"))
        nll, count, _ = token_nll(logits, batch["labels"])
        self._log_throughput(batch["input_ids"].numel())
        return {"nll": nll / count.clamp_min(1)}, {"logits": logits, "labels": batch["labels"]}

    def _log_throughput(self, tokens: int) -> None:
        """``tokens_per_s`` in the progress bar on logging steps: the tokens of the training
        batches (replayed rows and padding included) per second since the last one. A
        count of elements, so no device sync."""
        now = time.perf_counter()
        since, counted = getattr(self, "_throughput", (now, 0))
        counted += tokens
        if self.is_logging_step() and now > since:
            self.log("tokens_per_s", counted / (now - since), prog_bar=True, batch_size=1)
            since, counted = now, 0
        self._throughput = (since, counted)

    def on_train_epoch_end(self) -> None:
        from mneme.app.core.schedule import is_experience_end

        if is_experience_end(self.trainer):  # before the end-of-epoch checkpoint is written
            self.adaptation.end_experience()

    # -- evaluation -----------------------------------------------------------------------
    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = self(batch["input_ids"], batch.get("attention_mask"), batch.get("task"))
        nll, count, correct = token_nll(logits, batch["labels"])
        self.experience_perplexity.update(nll, count, dataloader_idx)
        hits = None
        if self.hparams.exact_match:  # instruction rows: is the greedy answer the answer?
            from mneme.app.models.lm_generation import exact_matches

            hits = exact_matches(self, batch)
        if hits is None:  # top-1 next-token accuracy, as (correct, total)
            hits = torch.arange(int(count), device=logits.device) < correct
        self.experience_accuracy.update(hits, torch.ones_like(hits), dataloader_idx)

    test_step = validation_step

    def predict_step(self, batch: Batch, batch_idx: int = 0, dataloader_idx: int = 0) -> list:
        from mneme.app.models.lm_generation import generate_rows

        return generate_rows(self, batch, batch_idx, dataloader_idx)


def stream_tokenizer(datamodule) -> Any:
    """The tokenizer a text stream exposes (``datamodule.tokenizer``, or its declaration's),
    as a ``PreTrainedTokenizerFast`` (a folder is loaded)."""
    found = getattr(datamodule, "tokenizer", None)
    for holder in ("declaration", "_declared"):
        if found is None:
            found = getattr(getattr(datamodule, holder, None), "tokenizer", None)
    if found is None:
        raise ConfigError(
            "model.tokenizer: the stream has no tokenizer (not a text stream?); name a tokenizer "
            "folder with model.tokenizer, or a model folder with model.model"
        )
    if isinstance(found, str):
        return lm_build.load_tokenizer(found, "model.tokenizer")
    return found
