"""A test-only callback that SIGKILLs its own process at a chosen point of a run.

Used by the fault tests through the real CLI:
``--trainer.callbacks+=tests.killer.KillAt --trainer.callbacks.init_args.epoch 3``.
Placed after the strategy callbacks, ``train_epoch_end`` kills after their experience-end
work (Fisher, buffer update) and before the end-of-epoch checkpoint is written.
"""

import os
import signal

from lightning.pytorch import Callback


class KillAt(Callback):
    def __init__(
        self, epoch: int, hook: str = "train_batch", batch: int = 0, dataloader: int = 0
    ) -> None:
        if hook not in {"train_batch", "train_epoch_end", "validation_batch"}:
            raise ValueError(f"hook: {hook}")
        self.epoch, self.hook, self.batch, self.dataloader = epoch, hook, batch, dataloader

    def _kill_if(self, trainer, hook: str, batch: int = 0) -> None:
        if (trainer.current_epoch, hook, batch) == (self.epoch, self.hook, self.batch):
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._kill_if(trainer, "train_batch", batch_idx)

    def on_train_epoch_end(self, trainer, pl_module):
        self._kill_if(trainer, "train_epoch_end")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking and dataloader_idx == self.dataloader:
            self._kill_if(trainer, "validation_batch", batch_idx)
