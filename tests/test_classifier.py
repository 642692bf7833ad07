"""ContinualClassifier: encoders by name, heads, class masking."""

import pytest
import torch
from mneme.app import ContinualClassifier
from mneme.app.nn.encoders import create_encoder
from mneme.datamodules import ContinualDataModule

from tests.conftest import digits_stream


def test_single_head_masks_unseen_classes():
    model = ContinualClassifier(num_classes=6, num_tasks=1, input_shape=(1, 8, 8))
    model.observe_experience([1, 4], [0])
    rows = model.predict_step({"image": torch.randn(32, 1, 8, 8), "task": torch.zeros(32)})
    assert {row["predicted"] for row in rows} <= {1, 4}
    assert all(set(row["top_classes"]) <= {1, 4} for row in rows)  # masked classes left out
    model.observe_experience([2], [0])
    logits = model(torch.randn(4, 1, 8, 8))
    assert torch.isfinite(logits[:, [1, 2, 4]]).all()
    assert (logits[:, [0, 3, 5]] == torch.finfo(logits.dtype).min).all()


def test_nothing_seen_means_no_mask():
    model = ContinualClassifier(num_classes=4, num_tasks=1, input_shape=(1, 8, 8))
    assert (model(torch.randn(3, 1, 8, 8)) > torch.finfo(torch.float32).min).all()


def test_multi_head_selects_each_samples_task_head():
    model = ContinualClassifier(num_classes=4, num_tasks=2, input_shape=(1, 8, 8))
    model.observe_experience([0, 1], [0])
    model.observe_experience([2, 3], [1])
    x = torch.randn(6, 1, 8, 8)
    task = torch.tensor([0, 1, 0, 1, 1, 0])
    preds = [row["predicted"] for row in model.predict_step({"image": x, "task": task})]
    for p, t in zip(preds, task.tolist(), strict=True):
        assert p in ({0, 1} if t == 0 else {2, 3})
    # head t's logits are rows t*C:(t+1)*C of the shared Linear
    features = model.encoder(x)
    full = model.head(features).view(6, 2, 4)
    assert torch.allclose(model.logits(features, task)[0, :2], full[0, 0, :2])
    assert torch.allclose(model.logits(features, task)[1, 2:], full[1, 1, 2:])


def test_single_head_forced_on_task_labelled_stream():
    model = ContinualClassifier(multi_head=False, num_classes=4, num_tasks=3, input_shape=(1, 8, 8))
    assert model.head.out_features == 4


@pytest.mark.parametrize("name", ["mneme_mlp", "mneme_cnn", "resnet10t"])
def test_encoders_by_name(name):
    encoder = create_encoder(name, (1, 28, 28))
    assert encoder(torch.randn(2, 1, 28, 28)).shape == (2, encoder.num_features)


def test_encoder_weights_load_from_a_local_file(tmp_path):
    source = create_encoder("mneme_mlp", (1, 8, 8), hidden=[16])
    path = tmp_path / "mlp.pth"
    torch.save(source.state_dict(), path)
    loaded = create_encoder("mneme_mlp", (1, 8, 8), weights=str(path), hidden=[16])
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(source(x), loaded(x))


def test_unknown_encoder_name_is_a_clear_error():
    with pytest.raises(ValueError, match="model.encoder: unknown model 'resnet1000'"):
        create_encoder("resnet1000", (3, 32, 32))


def test_the_model_takes_its_input_shape_from_the_field_it_reads(tmp_path):
    from lightning.pytorch import Trainer
    from mneme.datamodules import ConfigError

    datamodule = ContinualDataModule(**digits_stream(2))
    trainer = Trainer(logger=False, default_root_dir=tmp_path, **datamodule.trainer_settings())
    with pytest.raises(ConfigError, match="model.input_key: the stream has no field 'audio'"):
        trainer.fit(ContinualClassifier(input_key="audio"), datamodule)
    assert datamodule.field_shape("image") == (1, 8, 8)
