"""``mneme export``: the ONNX and torch.export artifacts compute the PyTorch logits; the
sidecar; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mneme.app.export import export, export_program, logits_module, parse_args, remove_pruning
from mneme.datamodules.errors import ConfigError

CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  enable_progress_bar: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: {logs}, name: export}}
model:
  class_path: mneme.app.ContinualClassifier
  init_args:
    encoder: mneme_mlp
    encoder_args: {{hidden: [16]}}
data:
  benchmark: mneme.datamodules.SplitDigits
  benchmark_args: {{n_experiences: 1}}
  epochs_per_experience: 1
  batch_size: 64
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny MLP classifier trained one epoch on the sklearn digits, through `mneme fit`."""
    from mneme.app.cli import main

    root = tmp_path_factory.mktemp("export")
    config = root / "config.yaml"
    config.write_text(CONFIG.format(logs=root / "logs"))
    main(["fit", "--config", str(config), "--metrics.print_table", "false"])
    (ckpt,) = (root / "logs").glob("export/version_0/checkpoints/last.ckpt")
    return config, Path(ckpt).resolve()


def _reference(config: Path, ckpt: Path, x: torch.Tensor) -> torch.Tensor:
    from mneme.app.export import load_model

    model, _ = load_model(["--config", str(config)], ckpt)
    with torch.no_grad():
        return model(x)


def test_onnx_matches_pytorch(trained, tmp_path):
    import onnxruntime

    config, ckpt = trained
    out, side = export(["--config", str(config)], str(ckpt), "onnx", str(tmp_path / "m.onnx"))
    x = torch.randn(5, 1, 8, 8)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"x": x.numpy()})
    expected = _reference(config, ckpt, x)
    assert torch.allclose(torch.from_numpy(logits), expected, atol=1e-4)
    meta = json.loads(side.read_text())
    assert meta["format"] == "onnx" and meta["input_key"] == "image"
    assert meta["shape"] == ["batch", 1, 8, 8] and meta["dtype"] == "float32"
    assert meta["class_order"] == list(range(10)) and len(meta["classes"]) == 10
    assert len(meta["checkpoint_sha256"]) == 64
    assert meta["torch_version"] == torch.__version__ and meta["mneme_version"]
    assert set(meta) >= {"normalization"}


def test_torch_export_matches_pytorch(trained, tmp_path):
    config, ckpt = trained
    out, side = export(["--config", str(config)], str(ckpt), "torch.export", None)
    assert out == ckpt.with_suffix(".pt2") and side.name == "last.pt2.json"
    x = torch.randn(3, 1, 8, 8)
    program = torch.export.load(str(out))
    assert torch.allclose(program.module()(x), _reference(config, ckpt, x), atol=1e-5)


def test_pruning_is_made_permanent():
    from torch.nn.utils import prune

    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    assert remove_pruning(model) == 1
    assert not prune.is_pruned(model) and (model[0].weight == 0).sum() == 6


def test_unknown_format_and_missing_ckpt():
    with pytest.raises(ConfigError, match="--format: unknown format 'tflite'"):
        parse_args(["--config", "x.yaml", "--ckpt_path", "a.ckpt", "--format", "tflite"])
    with pytest.raises(ConfigError, match="--ckpt_path"):
        parse_args(["--config", "x.yaml", "--format", "onnx"])


def test_a_data_dependent_branch_names_the_module(tmp_path):
    class Branchy(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x - 1

    module = logits_module(torch.nn.Sequential(Branchy()))
    with pytest.raises(ConfigError, match=r"cannot trace 0 \(Branchy\).*torch.cond"):
        export_program(module, torch.randn(2, 3), "torch.export", tmp_path / "b.pt2")
