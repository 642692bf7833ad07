"""``cpu_threads: auto`` once the model is built: its size decides torch's thread count."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from mneme.app.core.threads import apply_cpu_threads, parameter_count


class AutoCpuThreads(Callback):
    """Sets torch's CPU threads from the model's parameter count when the run starts
    (:func:`mneme.app.core.threads.apply_cpu_threads`): after the module's ``setup`` and
    ``configure_model``, which build encoders whose size depends on the stream. Until then
    (building the model and the stream) the run has one thread. The CLI adds it for
    ``cpu_threads: auto``, the default; it holds no state.

    Example::

        Trainer(callbacks=[AutoCpuThreads()])
    """

    @staticmethod
    def _apply(trainer: Trainer, pl_module: LightningModule) -> None:
        # the ranks on this machine share its cores (trainer.num_devices: processes per node)
        apply_cpu_threads("auto", parameter_count(pl_module), trainer.num_devices)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn != "fit":  # `mneme validate`; inside fit, on_fit_start decided
            self._apply(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply(trainer, pl_module)
