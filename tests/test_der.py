"""DER / DER++: the loss against a hand computation, stored logits in state and resume,
bad inputs, an end-to-end fit."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from mneme.app import ContinualClassifier
from mneme.callbacks import DER, ContinualMetrics
from mneme.callbacks.strategies.der import LOGITS_KEY
from mneme.datamodules import ConfigError, ContinualDataModule

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")


def tiny_model(seed: int = 0) -> ContinualClassifier:
    torch.manual_seed(seed)
    model = ContinualClassifier(
        encoder="mneme_mlp", encoder_args={"hidden": [5]}, num_classes=3, input_shape=(1, 2, 2)
    )
    model.observe_experience([0, 1, 2], [0])
    return model


def tiny_data(n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(n, 1, 2, 2, generator=g),
        "label": torch.arange(n) % 3,
        "task": torch.zeros(n, dtype=torch.long),
    }


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_buffer_records_the_models_logits_on_kept_samples():
    model, data = tiny_model(), tiny_data(20)
    der = DER(buffer_size=8, seed=1)
    der.update(data, 0, module=model)
    assert len(der) == 8 and der.buffer[LOGITS_KEY].shape == (8, 3)
    model.eval()
    with torch.no_grad():
        expected = model.head(model.features(der.buffer["image"]))
    torch.testing.assert_close(der.buffer[LOGITS_KEY], expected)
    # a second experience keeps the old rows' logits as recorded (the model has changed)
    keys = der.buffer["image"].flatten(1).sum(1).tolist()
    old = dict(zip(keys, der.buffer[LOGITS_KEY], strict=True))
    der.update(tiny_data(20, seed=5), 1, module=tiny_model(seed=9))
    keys = der.buffer["image"].flatten(1).sum(1).tolist()
    for key, logits in zip(keys, der.buffer[LOGITS_KEY], strict=True):
        if key in old:
            torch.testing.assert_close(logits, old[key])


def test_der_loss_equals_hand_computation():
    model = tiny_model()
    der = DER(buffer_size=10, alpha=0.3, beta=0.7, replay_batch_size=4, seed=2)
    der.update(tiny_data(10), 0, module=tiny_model(seed=3))  # logits of another model
    der._module = model
    batch = tiny_data(6, seed=4)
    outputs = {"logits": model(batch["image"])}
    loss = der.der_loss(batch, outputs)
    i1, i2 = der.sample(4, 0, 0, 1), der.sample(4, 0, 0, 2)
    buf = der.buffer
    mse = ((model.head(model.features(buf["image"][i1])) - buf[LOGITS_KEY][i1]) ** 2).mean()
    logits2 = model.head(model.features(buf["image"][i2]))
    ce = -torch.log_softmax(logits2, 1)[torch.arange(4), buf["label"][i2]].mean()
    torch.testing.assert_close(loss, 0.3 * mse + 0.7 * ce)
    loss.backward()  # gradients reach the model
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
    # DER (beta 0): the MSE term only; an empty buffer adds nothing
    der.beta = 0.0
    torch.testing.assert_close(der.der_loss(batch, outputs), 0.3 * mse)
    assert DER(buffer_size=3).der_loss(batch, outputs).item() == 0.0


def test_stored_logits_survive_state_dict():
    der = DER(buffer_size=6, seed=0)
    der.update(tiny_data(12), 0, module=tiny_model())
    state = roundtrip(der.state_dict())
    other = DER(buffer_size=6, seed=0)
    other.load_state_dict(state)
    torch.testing.assert_close(other.buffer[LOGITS_KEY], der.buffer[LOGITS_KEY])
    assert other.experiences == [0] and state["alpha"] == der.alpha
    with pytest.raises(ConfigError, match="of size 6"):
        DER(buffer_size=7).load_state_dict(state)


@pytest.mark.parametrize(
    "args, field",
    [({"alpha": -0.1}, "DER.alpha"), ({"beta": -1}, "DER.beta"), ({"buffer_size": 0}, "buffer")],
)
def test_bad_inputs(args, field):
    with pytest.raises(ConfigError, match=field):
        DER(**args)


def test_needs_a_feature_classifier():
    from lightning.pytorch import LightningModule

    with pytest.raises(ConfigError, match="DER needs a FeatureClassifier"):
        DER().on_fit_start(None, LightningModule())


def fit(der: DER, ckpt_dir=None, ckpt_path=None, max_epochs=None):
    seed_everything(0)
    model = ContinualClassifier(
        encoder="mneme_mlp",
        encoder_args={"hidden": [32]},
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    )
    data = ContinualDataModule(
        benchmark_args={"n_experiences": 2}, epochs_per_experience=1, batch_size=32
    )
    extra = []
    if ckpt_dir is not None:
        extra.append(ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1))
    settings = data.trainer_settings()
    if max_epochs is not None:
        settings["max_epochs"] = max_epochs
    metrics = ContinualMetrics(print_table=False)
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=ckpt_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[metrics, der, *extra],
        **settings,
    )
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, metrics.summary()


def test_fit_and_resume_keep_the_logits(tmp_path):
    full = DER(buffer_size=60, alpha=0.5, beta=0.5)
    model, summary = fit(full, ckpt_dir=tmp_path)
    assert summary["average_accuracy"] > 0.4
    assert len(full) == 60 and full.experiences == [0, 1]
    # resume from the end of experience 0: the stored logits come back as written
    ckpt = sorted(tmp_path.glob("epoch=0*.ckpt"))[0]
    saved = torch.load(ckpt, weights_only=True)["callbacks"][full.state_key]
    resumed = DER(buffer_size=60, alpha=0.5, beta=0.5)
    resumed_model, _ = fit(resumed, ckpt_path=ckpt)
    assert resumed.experiences == [0, 1]
    before = saved["ranks"][0]["buffer"][LOGITS_KEY]
    assert torch.isfinite(before).all() and before.shape == (60, resumed_model.head.out_features)
    for key, value in resumed_model.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[key])
