"""TeacherDistillation: the KD loss by hand, a checkpoint teacher, the projection trains and
is checkpointed, a timm teacher, bad inputs."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from mneme.app import ContinualClassifier
from mneme.callbacks import TeacherDistillation
from mneme.callbacks.strategies.teacher_distillation import PROJECTION, hinton_kd
from mneme.datamodules import ConfigError, ContinualDataModule

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")


def test_hinton_kd_equals_hand_computation():
    g = torch.Generator().manual_seed(0)
    s, t, temp = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g), 3.0
    p_t = torch.softmax(t / temp, 1)
    p_s = torch.softmax(s / temp, 1)
    hand = temp**2 * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    torch.testing.assert_close(hinton_kd(s, t, temp), hand)
    assert hinton_kd(t, t, temp).abs().item() < 1e-6


def model(hidden: int) -> ContinualClassifier:
    return ContinualClassifier(
        encoder="mneme_mlp",
        encoder_args={"hidden": [hidden]},
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    )


def fit(student, callbacks, tmp_path, **data_args):
    seed_everything(0)
    data = ContinualDataModule(
        benchmark_args={"n_experiences": 2, **data_args}, epochs_per_experience=1, batch_size=64
    )
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **data.trainer_settings(),
    )
    trainer.fit(student, data)
    return trainer


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    trainer = fit(model(24), [], tmp)
    path = tmp / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


def test_checkpoint_teacher_logits_and_projection_train(teacher_ckpt, tmp_path):
    from lightning.pytorch import Callback

    class FirstProjection(Callback):  # the (lazy) projection before its first step
        weight = None

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if self.weight is None:
                self.weight = getattr(pl_module, PROJECTION).weight.detach().clone()

    kd = TeacherDistillation(teacher_checkpoint=teacher_ckpt, alpha=1.0, beta=0.5, temperature=2)
    student, first = model(8), FirstProjection()  # width 8, the teacher's 24: 8 -> 24
    seed_everything(0)
    trainer = fit(student, [kd, first], tmp_path)
    projection = getattr(student, PROJECTION)
    assert projection.weight.shape == (24, 8)
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert id(projection.weight) in optimized
    assert not torch.equal(projection.weight.detach(), first.weight)  # it trained
    assert student.last_loss_terms["teacher"] > 0
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    state = torch.load(tmp_path / "student.ckpt", weights_only=True)["state_dict"]
    torch.testing.assert_close(state[f"{PROJECTION}.weight"], projection.weight.detach())
    # the teacher stays frozen and out of the checkpoint
    assert not any(p.requires_grad for p in kd.teacher.parameters())
    assert not any(k.startswith("teacher") for k in state)


def test_projection_weights_move_during_training(teacher_ckpt, tmp_path):
    kd = TeacherDistillation(teacher_checkpoint=teacher_ckpt, alpha=0.0, beta=1.0)
    student = model(8)
    snapshots = []

    from lightning.pytorch import Callback

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots.append(getattr(pl_module, PROJECTION).weight.detach().clone())

    fit(student, [kd, Watch()], tmp_path)
    assert not torch.equal(snapshots[0], snapshots[-1])


def test_timm_teacher_features(tmp_path):
    kd = TeacherDistillation(
        teacher_encoder="mneme_mlp", teacher_encoder_args={"hidden": [12]}, alpha=0, beta=1.0
    )
    student = model(8)
    fit(student, [kd], tmp_path)
    assert getattr(student, PROJECTION).weight.shape == (12, 8)


def test_logit_kd_refuses_a_teacher_of_other_classes(teacher_ckpt):
    kd = TeacherDistillation(teacher_checkpoint=teacher_ckpt, alpha=1.0)
    kd.teacher = kd.build_teacher(None, "image")
    student = ContinualClassifier(
        encoder="mneme_mlp", encoder_args={"hidden": [8]}, num_classes=12, input_shape=(1, 8, 8)
    )
    with pytest.raises(ConfigError, match="TeacherDistillation.alpha: the teacher has 10 logits"):
        kd.on_fit_start(None, student)


@pytest.mark.parametrize(
    "args, field",
    [
        ({"teacher_checkpoint": "x.ckpt", "temperature": 0}, "temperature"),
        ({"teacher_checkpoint": "x.ckpt", "alpha": -1}, "alpha"),
        ({"teacher_checkpoint": "x.ckpt", "beta": -1}, "beta"),
        ({}, "teacher_checkpoint"),
        ({"teacher_checkpoint": "x.ckpt", "teacher_encoder": "mneme_mlp"}, "teacher_checkpoint"),
        ({"teacher_encoder": "mneme_mlp", "alpha": 1.0}, "no class head"),
        ({"teacher_checkpoint": "x.ckpt", "alpha": 0, "beta": 0}, "both 0"),
        ({"teacher_encoder": "mneme_mlp", "teacher_open_clip": "x", "alpha": 0}, "exactly one"),
        ({"teacher_open_clip": "mneme-tiny-clip", "alpha": 1.0}, "teacher_open_clip has"),
    ],
)
def test_bad_inputs(args, field):
    with pytest.raises(ConfigError, match=field):
        TeacherDistillation(**args)


def test_resume_restores_the_projection_and_composes_with_unfreezing(teacher_ckpt, tmp_path):
    from mneme.callbacks import ProgressiveUnfreezing

    first = model(8)
    kd = TeacherDistillation(teacher_checkpoint=teacher_ckpt, alpha=1.0, beta=0.5)
    trainer = fit(first, [kd], tmp_path)
    trainer.save_checkpoint(tmp_path / "s.ckpt")
    saved = getattr(first, PROJECTION).weight.detach().clone()
    # a fresh student whose projection is still lazy takes the checkpoint's weights
    second = model(8)
    kd2 = TeacherDistillation(teacher_checkpoint=teacher_ckpt, alpha=1.0, beta=0.5)
    seed_everything(0)
    data = ContinualDataModule(
        benchmark_args={"n_experiences": 2}, epochs_per_experience=1, batch_size=64
    )
    settings = data.trainer_settings()
    resumed = Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[kd2],
        **settings,
    )
    resumed.validate(second, data, ckpt_path=tmp_path / "s.ckpt", verbose=False)
    torch.testing.assert_close(getattr(second, PROJECTION).weight, saved)
    # with ProgressiveUnfreezing (head first, encoder groups later) it trains through
    third = ContinualClassifier(  # a tiny timm ResNet: ProgressiveUnfreezing needs its groups
        encoder="resnet10t",
        encoder_args={"channels": [8, 8, 8, 8], "stem_width": 8},
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    )
    unfreeze = ProgressiveUnfreezing(every="experience")
    seen = []

    from lightning.pytorch import Callback

    class Watch(Callback):  # the projection and the encoder stem at each step
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            stem = next(pl_module.encoder.parameters())
            projection = getattr(pl_module, PROJECTION).weight
            seen.append((stem.detach().clone(), projection.detach().clone(), stem.requires_grad))

    kd3 = TeacherDistillation(teacher_checkpoint=teacher_ckpt, beta=0.5)
    trainer = fit(third, [unfreeze, kd3, Watch()], tmp_path)
    assert third.last_loss_terms["teacher"] > 0
    # the projection is in the optimizer and trains from the first experience, while
    # ProgressiveUnfreezing keeps the encoder's stem frozen throughout (2 experiences)
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert id(getattr(third, PROJECTION).weight) in optimized
    assert not any(trainable for _, _, trainable in seen)
    assert all(torch.equal(seen[0][0], stem) for stem, _, _ in seen)
    half = len(seen) // 2
    assert not torch.equal(seen[0][1], seen[half - 1][1])  # moved during experience 0


def test_resume_from_the_boundary_equals_the_uninterrupted_run(teacher_ckpt, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(ckpt_path=None, ckpt_dir=None):
        seed_everything(0)
        student = model(8)
        data = ContinualDataModule(
            benchmark_args={"n_experiences": 2}, epochs_per_experience=1, batch_size=64
        )
        kd = TeacherDistillation(teacher_checkpoint=teacher_ckpt, alpha=1.0, beta=0.5)
        extra = [ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1)]
        Trainer(
            accelerator="cpu",
            logger=False,
            enable_checkpointing=ckpt_dir is not None,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            callbacks=[kd, *(extra if ckpt_dir is not None else [])],
            **data.trainer_settings(),
        ).fit(student, data, ckpt_path=ckpt_path)
        return student

    full = run(ckpt_dir=tmp_path / "ckpt")
    boundary = sorted((tmp_path / "ckpt").glob("epoch=0*.ckpt"))[0]
    resumed = run(ckpt_path=boundary)  # teacher rebuilt from its file, projection restored
    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(value, full.state_dict()[key])


def test_open_clip_teacher_features(tmp_path):
    kd = TeacherDistillation(teacher_open_clip="mneme-tiny-clip", alpha=0, beta=1.0)
    student = model(8)
    fit(student, [kd], tmp_path, n_experiences=2)
    assert getattr(student, PROJECTION).weight.shape == (64, 8)  # the tiny CLIP's width
    assert student.last_loss_terms["teacher"] > 0
    assert not kd.teacher.training and not any(p.requires_grad for p in kd.teacher.parameters())


def test_equal_widths_start_from_the_identity():
    kd = TeacherDistillation(teacher_encoder="mneme_mlp", alpha=0, beta=1.0)
    projection = torch.nn.LazyLinear(6)
    kd._identity_if_equal(projection, torch.randn(3, 6))
    torch.testing.assert_close(projection.weight, torch.eye(6))
    other = torch.nn.LazyLinear(4)
    kd._identity_if_equal(other, torch.randn(3, 6))
    assert other.weight.shape == (4, 6) and not torch.equal(other.weight[:, :4], torch.eye(4))


def test_a_teacher_that_cannot_take_the_stream_is_refused(teacher_ckpt):
    class Experience:
        def first_sample(self):
            return {"image": torch.rand(1, 1, 28, 28), "task": torch.zeros(1, dtype=torch.long)}

    class FakeTrainer:
        class datamodule:  # noqa: N801 - stands for the trainer's attribute
            train_experiences = [Experience()]
            input_normalization = None

    kd = TeacherDistillation(teacher_checkpoint=teacher_ckpt, alpha=1.0)
    with pytest.raises(ConfigError, match="TeacherDistillation.teacher_checkpoint: the teacher "):
        kd.setup(FakeTrainer(), model(8), "fit")
