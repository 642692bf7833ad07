"""The check that a checkpoint's weights are finite, for every path that loads one (the
CLI's ``ckpt_path``, a teacher, the few-shot evaluator's model)."""

from __future__ import annotations

from typing import Any

from mneme.app.core.errors import ConfigError


def check_finite_weights(checkpoint: Any, path: str | None, field: str = "ckpt_path") -> None:
    """Refuse a checkpoint whose weights hold NaN or inf, naming the first such tensor:
    evaluating it would report nonsense as a result, training from it learns nothing."""
    import torch

    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    for name, tensor in state.items() if isinstance(state, dict) else ():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            continue
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ConfigError(
                f"{field}: '{path}' holds non-finite weights ({name}: {bad} of "
                f"{tensor.numel()} values NaN or inf), a diverged run's; use an earlier "
                "checkpoint of that run (experience=<k>.ckpt) or train again with a lower "
                "learning rate"
            )
