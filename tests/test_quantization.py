"""Quantization: torchao int8 copies close to float, the accuracy matrices, QAT, bad inputs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from mneme.app import ContinualClassifier
from mneme.app.compress.quantize import prepare_qat, quantize_model, state_dict_bytes
from mneme.callbacks import Quantization
from mneme.datamodules import ConfigError, ContinualDataModule
from torch import nn

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")
warnings.filterwarnings("ignore", ".*overridden `transfer_batch_to_device`.*")

# int8 with per-channel weight scales and per-token (dynamic) or per-layer (static)
# activation scales rounds each operand to 1/254 of its range: on these 3-layer MLPs the
# logits move by well under 5% of their spread, and the predicted class almost never changes.
RELATIVE_TOLERANCE = 0.05
AGREEMENT = 0.97


def model() -> ContinualClassifier:
    """Built in its own ``setup``, after the callbacks' (as under the CLI)."""
    seed_everything(0)
    return ContinualClassifier(
        encoder="mneme_mlp",
        encoder_args={"hidden": [32]},
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    )


def fit(callback: Quantization, tmp_path=None, logger=False):
    net = model()
    data = ContinualDataModule(
        benchmark="mneme.datamodules.SplitDigits",
        benchmark_args={"n_experiences": 2},
        batch_size=64,
    )
    trainer = Trainer(
        accelerator="cpu",
        logger=logger,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        **data.trainer_settings(),
    )
    trainer.fit(net, data)
    return trainer, net, data


@pytest.mark.parametrize("mode", ["ptq_dynamic", "ptq_weight_only", "ptq_static"])
def test_quantized_outputs_close_to_float(mode):
    seed_everything(0)
    net = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    x = torch.randn(512, 64)
    with torch.no_grad():
        ref = net(x)
        q = quantize_model(net, mode, calibration=[x[:256]]).eval()
        out = q(x)
    assert type(q[0].weight).__name__ == "Int8Tensor"
    assert isinstance(net[0].weight, nn.Parameter)  # a copy: the float model is untouched
    spread = ref.max() - ref.min()
    assert float((out - ref).abs().max()) < RELATIVE_TOLERANCE * float(spread)
    assert float((out.argmax(1) == ref.argmax(1)).float().mean()) >= AGREEMENT
    assert state_dict_bytes(q) < state_dict_bytes(net) / 2  # int8 weights: about 1/4


@pytest.mark.parametrize("mode", ["ptq_dynamic", "ptq_static"])
def test_ptq_accuracy_matrix_next_to_float(tmp_path, mode):
    callback = Quantization(mode=mode, calibration_batches=2)
    trainer, net, _ = fit(callback, tmp_path, CSVLogger(tmp_path / "csv"))
    logged = next((tmp_path / "csv").rglob("metrics.csv")).read_text().splitlines()[0]
    assert {"quantized/acc_exp0", "quantized/average_accuracy", "float/average_accuracy"} <= set(
        logged.split(",")
    )
    summary = callback.summary()
    assert callback.experiences == [0, 1]
    f, q = summary["float"]["rows"], summary["quantized"]["rows"]
    assert len(f) == len(q) == 2 and all(len(r) == 2 for r in f + q)
    for fr, qr in zip(f, q, strict=True):
        for a, b in zip(fr, qr, strict=True):
            assert abs(a - b) <= 0.05
    assert "forgetting" in summary["quantized"]
    assert all(isinstance(p, nn.Parameter) for p in net.parameters())  # float model kept
    written = json.loads((Path(trainer.log_dir) / "quantized_metrics.json").read_text())
    assert written["quantized"]["rows"] == q and written["mode"] == mode
    state = callback.state_dict()
    other = Quantization(mode=mode)
    other.load_state_dict(state)
    assert other.quantized_rows == q
    with pytest.raises(ConfigError, match="Quantization.mode"):
        Quantization(mode="qat").load_state_dict(state)


def test_qat_trains_and_converts():
    callback = Quantization(mode="qat")
    _, net, data = fit(callback)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m.weight).__name__ == "Int8Tensor" for m in linears)
    # Trained through the fake quantization: the int8 copy knows the last experience's
    # two digits (chance is 0.1 over the 10), as well as the fake-quantized float model.
    assert callback.quantized_rows[-1][-1] > 0.3
    assert abs(callback.quantized_rows[-1][-1] - callback.float_rows[-1][-1]) <= 0.05
    batch = next(data.test_experiences[0].batches(16))
    with torch.no_grad():
        assert net(batch["image"]).shape == (16, 10)


def test_prepare_qat_inserts_fake_quantization():
    net = nn.Sequential(nn.Linear(8, 4))
    prepare_qat(net)
    assert type(net[0]).__name__ == "FakeQuantizedLinear"
    net(torch.randn(3, 8)).sum().backward()
    assert net[0].weight.grad is not None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"mode": "int4"}, "Quantization.mode"),
        ({"calibration_batches": 0}, "Quantization.calibration_batches"),
        ({"batch_size": 0}, "Quantization.batch_size"),
    ],
)
def test_bad_arguments(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        Quantization(**kwargs)


def test_a_model_without_linear_layers_is_refused():
    with pytest.raises(ConfigError, match=r"Quantization.mode: .*nn.Linear only.*Conv2d"):
        quantize_model(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), "ptq_dynamic")
    with pytest.raises(ConfigError, match="Quantization.calibration_batches"):
        quantize_model(nn.Linear(2, 2), "ptq_static")


def test_a_pruned_model_quantizes_with_its_zeros():
    from torch.nn.utils import prune

    net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    prune.l1_unstructured(net[0], "weight", amount=0.5)
    q = quantize_model(net, "ptq_weight_only")
    assert prune.is_pruned(net) and not prune.is_pruned(q)  # the original keeps its masks
    assert int((q[0].weight.dequantize() == 0).sum()) >= 64


def test_quantization_of_a_model_being_pruned():
    from mneme.callbacks import Pruning

    quantization = Quantization(mode="ptq_dynamic")
    _, net, _ = fit_with(Pruning(amount=0.5), quantization)
    assert len(quantization.quantized_rows) == 2
    for fr, qr in zip(quantization.float_rows, quantization.quantized_rows, strict=True):
        assert max(abs(a - b) for a, b in zip(fr, qr, strict=True)) <= 0.05


def fit_with(*callbacks):
    net = model()
    data = ContinualDataModule(
        benchmark="mneme.datamodules.SplitDigits",
        benchmark_args={"n_experiences": 2},
        batch_size=64,
    )
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **data.trainer_settings(),
    )
    trainer.fit(net, data)
    return trainer, net, data


# -- attention and the aligner's towers -------------------------------------------------------
def test_attention_out_proj_stays_float_and_is_named():
    from mneme.app.compress.quantize import float_layers

    seed_everything(0)
    net = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True).eval()
    x = torch.randn(8, 5, 32)
    with torch.no_grad():
        ref = net(x)
        q = quantize_model(net, "ptq_dynamic")
        out = q(x)  # torchao's Int8Tensor in out_proj would fail here (aten.t)
    assert type(q.linear1.weight).__name__ == "Int8Tensor"
    assert isinstance(q.self_attn.out_proj.weight, nn.Parameter)
    assert float((out - ref).abs().max()) < RELATIVE_TOLERANCE * float(ref.max() - ref.min())
    assert float_layers(net) == {"MultiheadAttention.in_proj": 1, "MultiheadAttention.out_proj": 1}
    with pytest.raises(ConfigError, match=r"nn.Linear only \(not a MultiheadAttention's out_proj"):
        quantize_model(nn.MultiheadAttention(8, 2), "ptq_dynamic")


def test_tower_selection_is_checked():
    from mneme.app.compress.quantize import tower_exclude

    towers = nn.Module()
    towers.encoders = nn.ModuleDict({"image": nn.Linear(2, 2), "text": nn.Linear(2, 2)})
    assert tower_exclude(towers, ["image"], "Quantization.encoders") == ["encoders.text"]
    assert tower_exclude(towers, None, "Quantization.encoders") == []
    with pytest.raises(ConfigError, match=r"Quantization.encoders: \['audio'\] names no encoder"):
        tower_exclude(towers, ["audio"], "Quantization.encoders")
    with pytest.raises(ConfigError, match="Quantization.encoders: Sequential has no per-modality"):
        tower_exclude(nn.Sequential(nn.Linear(2, 2)), ["image"], "Quantization.encoders")


def test_aligner_image_tower_int8_with_zero_shot_and_retrieval_next_to_float(tmp_path):
    from mneme.app.models.aligner import ContrastiveAligner

    seed_everything(0)
    net = ContrastiveAligner(
        encoders={"image": {"model": "mneme_mlp", "args": {"hidden": [32]}}, "text": {}},
        embed_dim=16,
        label_aware=True,
    )
    data = ContinualDataModule(
        benchmark="mneme.datamodules.SplitCaptionedDigits",
        benchmark_args={"n_experiences": 2},
        batch_size=256,
    )
    callback = Quantization(mode="ptq_dynamic", encoders=["image"])
    trainer = Trainer(
        accelerator="cpu",
        logger=CSVLogger(tmp_path / "csv"),
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        **data.trainer_settings(),
    )
    trainer.fit(net, data)
    # Only the image tower is made int8 in the copies; the text tower stays float.
    copy = callback.quantized_copy(trainer, net, 1)
    assert type(copy.encoders["image"].projection.weight).__name__ == "Int8Tensor"
    assert all(isinstance(p, nn.Parameter) for p in copy.encoders["text"].parameters())
    assert all(isinstance(p, nn.Parameter) for p in net.parameters())  # the model itself
    f, q = callback.float_rows, callback.quantized_rows
    assert len(f) == len(q) == 2 and all(len(r) == 2 for r in f + q)
    gaps = [abs(a - b) for fr, qr in zip(f, q, strict=True) for a, b in zip(fr, qr, strict=True)]
    assert max(gaps) <= 0.05
    assert len(callback.retrieval) == 2
    for row in callback.retrieval:
        assert set(row["float"]) == {"recall@1_image_to_text", "recall@1_text_to_image"}
        for name, value in row["float"].items():
            assert abs(row["quantized"][name] - value) <= 0.05
    summary = json.loads((Path(trainer.log_dir) / "quantized_metrics.json").read_text())
    assert summary["encoders"] == ["image"] and len(summary["retrieval"]) == 2
    logged = next((tmp_path / "csv").rglob("metrics.csv")).read_text().splitlines()[0]
    assert "quantized/recall@1_image_to_text" in logged.split(",")
    restored = Quantization(mode="ptq_dynamic", encoders=["image"])
    restored.load_state_dict(callback.state_dict())
    assert restored.retrieval == callback.retrieval


def test_qat_prepares_only_the_chosen_towers():
    from mneme.app.compress.quantize import convert_qat, tower_exclude
    from mneme.app.models.aligner import ContrastiveAligner

    seed_everything(0)
    net = ContrastiveAligner(
        encoders={"image": {"model": "mneme_mlp", "args": {"hidden": [16]}}, "text": {}},
        embed_dim=16,
        input_shapes={"image": [1, 8, 8], "text": [16]},
        num_classes=10,
    )
    exclude = tower_exclude(net, ["text"], "Quantization.encoders")
    prepare_qat(net, exclude)
    kinds = {n: type(m).__name__ for n, m in net.named_modules()}
    fake = {n for n, k in kinds.items() if k == "FakeQuantizedLinear"}
    assert fake and all(n.startswith("encoders.text.") for n in fake)
    assert not any(n.endswith("out_proj") for n in fake)  # attention's stays a Linear
    tokens = torch.randint(1, 400, (4, 16))
    net.encoders["text"](tokens).sum().backward()  # trains through the fake quantization
    assert net.encoders["text"].projection.weight.grad is not None
    convert_qat(net.eval(), exclude)
    assert type(net.encoders["text"].projection.weight).__name__ == "Int8Tensor"
    assert isinstance(net.encoders["image"].projection.weight, nn.Parameter)
    with torch.no_grad():
        assert net.encoders["text"](tokens).shape == (4, 16)


def test_qat_of_a_plain_model_gives_the_int8_kernels():
    # A QAT checkpoint reloads as plain Linears (what `mneme export --quantize qat` gets).
    q = quantize_model(nn.Sequential(nn.Linear(8, 4)), "qat")
    assert type(q[0].weight).__name__ == "Int8Tensor"
