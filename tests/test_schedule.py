"""The experience schedule: one fit over the stream, right after a resume from any epoch."""

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from mneme.app import ContinualClassifier
from mneme.callbacks import ExperienceCallback
from mneme.datamodules import ConfigError, ContinualDataModule

from tests.conftest import digits_stream

EXPERIENCES, EPOCHS = 5, 2


class RecordTraining(ExperienceCallback):
    """Records which classes each epoch trained on, and the experience hooks as they fire."""

    def __init__(self):
        self.classes_per_epoch: dict[int, set[int]] = {}
        self.events: list[tuple[str, int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        seen = self.classes_per_epoch.setdefault(trainer.current_epoch, set())
        seen.update(batch["label"].tolist())

    def on_experience_start(self, trainer, pl_module, experience):
        self.events.append(("start", experience, trainer.current_epoch))

    def on_experience_end(self, trainer, pl_module, experience):
        self.events.append(("end", experience, trainer.current_epoch))


def make_run(tmp_path, *callbacks: Callback, **module_args):
    datamodule = ContinualDataModule(
        **digits_stream(EXPERIENCES), epochs_per_experience=EPOCHS, batch_size=64
    )
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
        **datamodule.trainer_settings(),
    )
    return trainer, ContinualClassifier(**module_args), datamodule


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("schedule")
    record = RecordTraining()
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path, filename="{epoch}", save_top_k=-1, save_on_train_epoch_end=True
    )
    trainer, module, datamodule = make_run(tmp_path, record, checkpoint)
    trainer.fit(module, datamodule)
    expected = {
        epoch: set(datamodule.train_experiences[epoch // EPOCHS].classes)
        for epoch in range(EXPERIENCES * EPOCHS)
    }
    return tmp_path, record, expected


def test_one_fit_trains_each_experience_for_its_epochs(full_run):
    _, record, expected = full_run
    assert record.classes_per_epoch == expected
    expected_events = []
    for k in range(EXPERIENCES):
        expected_events += [("start", k, k * EPOCHS), ("end", k, k * EPOCHS + EPOCHS - 1)]
    assert record.events == expected_events


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # resumed in a new folder
@pytest.mark.parametrize("resume_epoch", range(EXPERIENCES * EPOCHS - 1))
def test_resume_from_every_epoch_end_trains_the_right_experience(full_run, resume_epoch):
    tmp_path, _, expected = full_run
    record = RecordTraining()
    trainer, module, datamodule = make_run(tmp_path / f"resume{resume_epoch}", record)
    trainer.fit(module, datamodule, ckpt_path=tmp_path / f"epoch={resume_epoch}.ckpt")
    resumed = range(resume_epoch + 1, EXPERIENCES * EPOCHS)
    assert record.classes_per_epoch == {epoch: expected[epoch] for epoch in resumed}
    starts = [e for e in record.events if e[0] == "start"]
    assert starts == [("start", ep // EPOCHS, ep) for ep in resumed if ep % EPOCHS == 0]


@pytest.mark.parametrize("reset", [False, True])
def test_reset_optimizer_clears_momentum_at_experience_start(tmp_path, reset):
    class FirstBatchState(Callback):  # runs after the module's on_train_epoch_start
        def __init__(self):
            self.sizes = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.sizes.setdefault(trainer.current_epoch, len(trainer.optimizers[0].state))

    probe = FirstBatchState()
    optimizer = lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9)  # noqa: E731
    trainer, module, datamodule = make_run(
        tmp_path, probe, reset_optimizer=reset, optimizer=optimizer
    )
    trainer.fit(module, datamodule)
    assert probe.sizes[0] == 0 and probe.sizes[1] > 0 and probe.sizes[3] > 0
    experience_starts = [probe.sizes[2], probe.sizes[4]]
    assert experience_starts == [0, 0] if reset else all(experience_starts)


# -- the trainer settings the schedule needs ---------------------------------------------------
def test_trainer_settings_fill_what_the_user_left_unset():
    datamodule = ContinualDataModule(**digits_stream(EXPERIENCES), epochs_per_experience=EPOCHS)
    assert datamodule.trainer_settings() == {
        "max_epochs": EXPERIENCES * EPOCHS,
        "reload_dataloaders_every_n_epochs": 1,
        "check_val_every_n_epoch": EPOCHS,
        "num_sanity_val_steps": -1,  # the untrained baseline row
    }
    # a prefix of the stream, and validation at a divisor of the experience length, are kept
    kept = datamodule.trainer_settings(max_epochs=4, check_val_every_n_epoch=2)
    assert kept["max_epochs"] == 4 and kept["check_val_every_n_epoch"] == 2


@pytest.mark.parametrize(
    "setting",
    [
        {"max_epochs": EXPERIENCES * EPOCHS + 1},
        {"max_epochs": -1},
        {"reload_dataloaders_every_n_epochs": 2},
        {"check_val_every_n_epoch": 3},
        {"check_val_every_n_epoch": None},
        {"max_epochs": 3},  # inside experience 1
        {"max_steps": 10},
        {"min_epochs": EXPERIENCES * EPOCHS + 1},
        {"val_check_interval": 0.5},
        {"accumulate_grad_batches": 0},
        {"limit_train_batches": 0},
        {"limit_val_batches": 0},
        {"overfit_batches": 2},
        {"fast_dev_run": True},
        {"max_time": "00:00:01:00"},
    ],
)
def test_conflicting_trainer_settings_are_refused_naming_the_field(setting):
    datamodule = ContinualDataModule(**digits_stream(EXPERIENCES), epochs_per_experience=EPOCHS)
    with pytest.raises(ConfigError, match=f"trainer.{next(iter(setting))}"):
        datamodule.trainer_settings(**setting)


@pytest.mark.filterwarnings("ignore:`max_epochs` was not set")  # the point of the test
def test_a_trainer_built_without_the_settings_is_refused_before_training(tmp_path):
    datamodule = ContinualDataModule(**digits_stream(EXPERIENCES), epochs_per_experience=EPOCHS)
    trainer = Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    with pytest.raises(ConfigError, match=r"Trainer\(\*\*datamodule.trainer_settings\(\)"):
        trainer.fit(ContinualClassifier(), datamodule)
    assert trainer.global_step == 0


def test_the_baseline_row_is_lightnings_validation_pass_before_training(tmp_path):
    from mneme.app.core.metrics import ExperienceAccuracy
    from mneme.callbacks import ContinualMetrics

    class InitialWeights(Callback):  # the built, untrained model, before any validation
        def on_fit_start(self, trainer, pl_module):
            self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}

    datamodule = ContinualDataModule(**digits_stream(EXPERIENCES), epochs_per_experience=1)
    args = {"encoder_args": {"hidden": [16]}}
    metrics, initial = ContinualMetrics(print_table=False), InitialWeights()
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[initial, metrics],
        **datamodule.trainer_settings(),
    )
    trainer.fit(ContinualClassifier(**args), datamodule)
    # the same accuracy, computed by hand with the untrained weights
    untrained = ContinualClassifier(**args, num_classes=10, num_tasks=1, input_shape=(1, 8, 8))
    untrained.load_state_dict(initial.state)
    untrained.experience_accuracy = ExperienceAccuracy(EXPERIENCES)
    untrained.eval()
    with torch.no_grad():
        for j, loader in enumerate(datamodule.val_dataloader()):
            for i, batch in enumerate(loader):
                untrained.validation_step(batch, i, j)
    expected = untrained.experience_accuracy.compute().tolist()
    assert metrics.baseline == pytest.approx(expected)
    assert len(metrics.rows) == EXPERIENCES
