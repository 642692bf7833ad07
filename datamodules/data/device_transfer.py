"""Moving a stream's batches to the device: the datamodule's hook, key by key."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class FlatBatchTransfer:
    """A ``LightningDataModule`` mixin whose ``transfer_batch_to_device`` moves a flat dict
    of tensors (every Mneme stream's and episode loader's batch) key by key: Lightning's
    default walks any nested collection (``apply_to_collection``), about 0.2 ms a step on a
    CPU, a tenth of a small MLP's whole step. Anything else takes Lightning's path.

    The hook lives on the datamodule, where the batch's layout is known: Lightning warns on
    every run when a LightningModule overrides it and a datamodule is passed (the module's
    would be used without the datamodule having a say)."""

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int):
        if isinstance(batch, dict) and all(isinstance(v, Tensor) for v in batch.values()):
            non_blocking = device.type not in ("cpu", "mps")  # Lightning's rule
            return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)
