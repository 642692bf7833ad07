"""``mneme export``: the ONNX and torch.export artifacts compute the PyTorch logits; the
sidecar; bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from mneme.app.cli.export_command import export, load_model, parse_args
from mneme.app.compress.export import export_program, logits_module
from mneme.app.compress.quantize import remove_pruning
from mneme.app.core.errors import ConfigError

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft absent")

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
    from mneme.app.cli.main import main

    root = tmp_path_factory.mktemp("export")
    config = root / "config.yaml"
    config.write_text(CONFIG.format(logs=root / "logs"))
    main(["fit", "--config", str(config), "--metrics.print_table", "false"])
    (ckpt,) = (root / "logs").glob("export/version_0/checkpoints/last.ckpt")
    return config, Path(ckpt).resolve()


def _seeded() -> torch.Generator:
    """Every random input of these tests from a fixed seed."""
    return torch.Generator().manual_seed(0)


def _reference(config: Path, ckpt: Path, x: torch.Tensor) -> torch.Tensor:
    model, _ = load_model(["--config", str(config)], ckpt)
    with torch.no_grad():
        return model(x)


def test_onnx_matches_pytorch(trained, tmp_path):
    import onnxruntime

    config, ckpt = trained
    out, side = export(["--config", str(config)], str(ckpt), "onnx", str(tmp_path / "m.onnx"))
    x = torch.randn(5, 1, 8, 8, generator=_seeded())
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
    x = torch.randn(3, 1, 8, 8, generator=_seeded())
    program = torch.export.load(str(out))
    assert torch.allclose(program.module()(x), _reference(config, ckpt, x), atol=1e-5)


def test_an_earlier_export_is_never_overwritten(trained, tmp_path):
    config, ckpt = trained
    out, side = export(["--config", str(config)], str(ckpt), "onnx", str(tmp_path / "k.onnx"))
    before = out.read_bytes(), side.read_text()
    assert torch.is_grad_enabled()  # the export's no_grad ends with it
    with pytest.raises(ConfigError, match=r"^--output: .*k\.onnx' exists"):
        export(["--config", str(config)], str(ckpt), "onnx", str(out))
    assert (out.read_bytes(), side.read_text()) == before


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
        export_program(
            module, torch.randn(2, 3, generator=_seeded()), "torch.export", tmp_path / "b.pt2"
        )


# -- quantized exports ------------------------------------------------------------------------
# int8 weights per output channel and activations per token (torchao) or per tensor
# (onnxruntime) move these small models' outputs by well under 5% of their spread.
RELATIVE_TOLERANCE = 0.05


def _close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    return float((out - ref).abs().max()) < RELATIVE_TOLERANCE * float(ref.max() - ref.min())


def test_quantized_torch_export_runs_torchao_int8(trained, tmp_path):
    from mneme.app.compress.quantize import quantize_model

    config, ckpt = trained
    out, side = export(["--config", str(config)], str(ckpt), "torch.export",
                       str(tmp_path / "q.pt2"), quantize="ptq_dynamic")  # fmt: skip
    program = torch.export.load(str(out))
    weights = [v for k, v in program.state_dict.items() if k.endswith("weight")]
    assert weights and all(type(w).__name__ == "Int8Tensor" for w in weights)
    x = torch.randn(6, 1, 8, 8, generator=_seeded())
    model, _ = load_model(["--config", str(config)], ckpt)
    with torch.no_grad():
        expected = quantize_model(model, "ptq_dynamic")(x)  # the in-process int8 model
        got = program.module()(x)
    assert torch.allclose(got, expected, atol=1e-5)
    assert _close(got, _reference(config, ckpt, x)) and not torch.equal(got, expected * 0)
    meta = json.loads(side.read_text())["quantization"]
    assert meta["mode"] == "ptq_dynamic" and meta["backend"].startswith("torchao")


def test_quantized_onnx_is_onnxruntime_int8(trained, tmp_path):
    import onnx
    import onnxruntime

    config, ckpt = trained
    out, side = export(["--config", str(config)], str(ckpt), "onnx", str(tmp_path / "q.onnx"),
                       quantize="ptq_dynamic")  # fmt: skip
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops
    x = torch.randn(64, 1, 8, 8, generator=_seeded())
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"x": x.numpy()})
    assert _close(torch.from_numpy(logits), _reference(config, ckpt, x))
    assert json.loads(side.read_text())["quantization"]["backend"].startswith("onnxruntime")


@pytest.mark.parametrize("mode", ["ptq_static", "ptq_weight_only", "qat8"])
def test_onnx_refuses_what_it_cannot_hold(mode):
    match = "--quantize: unknown mode" if mode == "qat8" else f"--quantize {mode}: ONNX cannot"
    with pytest.raises(ConfigError, match=match):
        export(["--config", "x.yaml"], "a.ckpt", "onnx", quantize=mode)


# -- an aligner: one tower at a time ----------------------------------------------------------
ALIGNER_CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  callbacks:
    - class_path: mneme.callbacks.Quantization
      init_args: {mode: ptq_dynamic, encoders: [image]}
model:
  class_path: mneme.app.ContrastiveAligner
  init_args:
    embed_dim: 16
    encoders:
      image: {model: mneme_mlp, args: {hidden: [32]}}
      text: {model: mneme-tiny-clip}
data:
  benchmark: mneme.datamodules.SplitCaptionedDigits
  benchmark_args: {n_experiences: 1, context_length: 16}
"""


@pytest.fixture(scope="module")
def aligner(tmp_path_factory):
    """An aligner's checkpoint (random towers: what is checked is the export, not training),
    and a config whose Quantization callback makes the image tower int8 only."""
    from mneme.app.models.aligner import ContrastiveAligner

    root = tmp_path_factory.mktemp("aligner")
    torch.manual_seed(0)
    model = ContrastiveAligner(
        encoders={
            "image": {"model": "mneme_mlp", "args": {"hidden": [32]}},
            "text": {"model": "mneme-tiny-clip"},
        },  # fmt: skip
        embed_dim=16,
        input_shapes={"image": [1, 8, 8], "text": [16]},
        num_classes=10,
    )
    ckpt = root / "aligner.ckpt"
    import lightning

    hparams = {**dict(model.hparams), "_class_path": "mneme.app.ContrastiveAligner"}
    saved = {"state_dict": model.state_dict(), "hyper_parameters": hparams}
    torch.save({**saved, "pytorch-lightning_version": lightning.__version__}, ckpt)
    config = root / "config.yaml"
    config.write_text(ALIGNER_CONFIG)
    return config, ckpt, model.eval()


def test_aligner_towers_export_quantized_as_the_config_asks(aligner, tmp_path):
    config, ckpt, model = aligner
    args = ["--config", str(config)]
    out, side = export(args, str(ckpt), "torch.export", str(tmp_path / "image.pt2"),
                       tower="image")  # fmt: skip
    meta = json.loads(side.read_text())
    assert meta["tower"] == "image" and meta["shape"] == ["batch", 1, 8, 8]
    assert meta["output_name"] == "tower_embedding" and meta["embed_dim"] == 16
    assert meta["quantization"]["mode"] == "ptq_dynamic"  # from the config's callback
    program = torch.export.load(str(out))
    assert any(type(v).__name__ == "Int8Tensor" for v in program.state_dict.values())
    x = torch.rand(8, 1, 8, 8, generator=_seeded())
    with torch.no_grad():
        ref = model.encoders["image"](x)
        got = program.module()(x)
    assert torch.nn.functional.cosine_similarity(got, ref).min() > 0.99

    # The text tower is not in the callback's `encoders`: exported float, token ids in.
    out, side = export(args, str(ckpt), "torch.export", str(tmp_path / "text.pt2"),
                       tower="text")  # fmt: skip
    meta = json.loads(side.read_text())
    assert meta["quantization"] is None and meta["dtype"] == "int64"
    assert meta["tokenizer"]["name"] == "mneme-tiny-clip"
    assert meta["tokenizer"]["context_length"] == 16
    tokens = model.encoders["text"].backbone.tokenize(["a photo of a 3", "the digit seven"])
    with torch.no_grad():
        expected = model.encoders["text"](tokens)
    assert torch.allclose(torch.export.load(str(out)).module()(tokens), expected, atol=1e-5)


def test_aligner_needs_a_known_tower(aligner):
    from mneme.app.compress.export import target_of

    _, _, model = aligner
    with pytest.raises(ConfigError, match=r"--tower: a ContrastiveAligner exports one tower"):
        target_of(model, None)
    with pytest.raises(ConfigError, match=r"--tower: .*no tower 'audio'; use one of"):
        target_of(model, "audio")


# -- the model as Lightning loads it: load_from_checkpoint ------------------------------------
MOE_HEAD = "{name: moe, num_experts: 2, top_k: 1, hidden: 16, experts_per_experience: 2}"


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """A MoE classifier trained over two experiences (its head grew experts in the second):
    a model built from its hyperparameters alone has fewer experts than its checkpoint."""
    from mneme.app.cli.main import main

    root = tmp_path_factory.mktemp("moe")
    config = root / "config.yaml"
    text = CONFIG.format(logs=root / "logs").replace("n_experiences: 1", "n_experiences: 2")
    config.write_text(text.replace("encoder_args:", f"head: {MOE_HEAD}\n    encoder_args:"))
    main(["fit", "--config", str(config), "--metrics.print_table", "false"])
    (ckpt,) = (root / "logs").glob("export/version_0/checkpoints/last.ckpt")
    return config, Path(ckpt).resolve()


def test_a_moe_checkpoint_exports_every_expert(moe, tmp_path):
    config, ckpt = moe
    model, _ = load_model(["--config", str(config)], ckpt)
    assert len(model.head.experts) == 4  # restored by its on_load_checkpoint, before loading
    out, _ = export(["--config", str(config)], str(ckpt), "torch.export", str(tmp_path / "m.pt2"))
    x = torch.randn(5, 1, 8, 8, generator=_seeded())
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(torch.export.load(str(out)).module()(x), expected, atol=1e-5)


def test_a_checkpoint_without_the_encoder_tensors_is_refused(trained, tmp_path):
    config, ckpt = trained
    saved = torch.load(ckpt, weights_only=True)
    saved["state_dict"] = {k: v for k, v in saved["state_dict"].items() if "encoder" not in k}
    torch.save(saved, tmp_path / "partial.ckpt")
    with pytest.raises(ConfigError, match=r"^ckpt_path: .*partial.ckpt' does not hold the weig"):
        export(["--config", str(config)], str(tmp_path / "partial.ckpt"), "onnx",
               str(tmp_path / "p.onnx"))  # fmt: skip
    assert not (tmp_path / "p.onnx").exists()


@needs_peft
def test_a_backbone_file_changed_since_training_is_refused(tmp_path):
    """The checkpoint holds only the LoRA factors and the head; the frozen backbone comes
    from its weights file, whose SHA-256 the checkpoint records."""
    from mneme.app.cli.main import main
    from mneme.app.nn.encoders import create_encoder

    weights = tmp_path / "mlp.pth"
    torch.manual_seed(0)
    torch.save(create_encoder("mneme_mlp", (1, 8, 8), hidden=[16]).state_dict(), weights)
    config = tmp_path / "config.yaml"
    lora = "{method: lora, r: 2, target_modules: ['features.1']}"
    text = CONFIG.format(logs=tmp_path / "logs").replace(
        "encoder_args:", f"encoder_weights: {weights}\n    peft: {lora}\n    encoder_args:"
    )
    config.write_text(text)
    main(["fit", "--config", str(config), "--metrics.print_table", "false"])
    (ckpt,) = (tmp_path / "logs").glob("export/version_0/checkpoints/last.ckpt")
    assert torch.load(ckpt, weights_only=True)["mneme_backbone"]  # tensors left out
    out, _ = export(["--config", str(config)], str(ckpt), "onnx", str(tmp_path / "ok.onnx"))
    assert out.is_file()  # the file as trained: exports, LoRA merged

    state = torch.load(weights, weights_only=True)
    first = next(iter(state))
    state[first] = state[first] + 1
    torch.save(state, weights)  # the same architecture, other weights
    with pytest.raises(ConfigError, match="model.encoder_weights: the checkpoint holds only"):
        export(["--config", str(config)], str(ckpt), "onnx", str(tmp_path / "changed.onnx"))
    assert not (tmp_path / "changed.onnx").exists()


def test_an_output_under_a_file_is_one_line(trained, tmp_path, capsys):
    from mneme.app.cli.main import main

    config, ckpt = trained
    (tmp_path / "file.txt").write_text("a file, not a folder")
    args = ["export", "--config", str(config), "--ckpt_path", str(ckpt), "--format", "onnx"]
    with pytest.raises(SystemExit) as stop:
        main([*args, "--output", str(tmp_path / "file.txt" / "m.onnx")])
    message = str(stop.value.code)
    assert message.startswith("mneme: error: --output: ") and "which is a file" in message
    assert "\n" not in message and (tmp_path / "file.txt").read_text() == "a file, not a folder"


# -- a fusion model: exported whole, one input per modality -----------------------------------
FUSION_CONFIG = """
seed_everything: 0
trainer: {accelerator: cpu}
model:
  class_path: mneme.app.FusionClassifier
  init_args:
    embed_dim: 16
    num_heads: 2
    encoders:
      image: {model: mneme_mlp, args: {hidden: [16]}}
      depth: {type: timm, model: mneme_mlp, args: {hidden: [8]}}
data:
  benchmark: mneme.datamodules.SplitDigits
  benchmark_args: {n_experiences: 1}
"""


def test_a_fusion_model_exports_whole_with_one_input_per_modality(tmp_path):
    import lightning
    import onnxruntime
    from mneme.app.models.fusion import FusionClassifier

    torch.manual_seed(0)
    model = FusionClassifier(
        encoders={
            "image": {"model": "mneme_mlp", "args": {"hidden": [16]}},
            "depth": {"type": "timm", "model": "mneme_mlp", "args": {"hidden": [8]}},
        },
        embed_dim=16, num_heads=2, num_classes=10,
        input_shapes={"image": [1, 8, 8], "depth": [1, 4, 4]},
    ).eval()  # fmt: skip
    hparams = {**dict(model.hparams), "_class_path": "mneme.app.FusionClassifier"}
    saved = {"state_dict": model.state_dict(), "hyper_parameters": hparams}
    torch.save({**saved, "pytorch-lightning_version": lightning.__version__}, tmp_path / "f.ckpt")
    (tmp_path / "config.yaml").write_text(FUSION_CONFIG)
    args = ["--config", str(tmp_path / "config.yaml")]
    with pytest.raises(ConfigError, match=r"^--tower: a FusionClassifier is exported whole"):
        export(args, str(tmp_path / "f.ckpt"), "onnx", str(tmp_path / "t.onnx"), tower="image")
    out, side = export(args, str(tmp_path / "f.ckpt"), "onnx", str(tmp_path / "f.onnx"))
    meta = json.loads(side.read_text())
    assert meta["input_key"] == meta["input_name"] == ["image", "depth"]
    assert meta["shape"] == {"image": ["batch", 1, 8, 8], "depth": ["batch", 1, 4, 4]}
    generator = _seeded()
    batch = {"image": torch.rand(3, 1, 8, 8, generator=generator),
             "depth": torch.rand(3, 1, 4, 4, generator=generator)}  # fmt: skip
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {k: v.numpy() for k, v in batch.items()})
    with torch.no_grad():
        expected = model(batch)
    assert torch.allclose(torch.from_numpy(logits), expected, atol=1e-4)
