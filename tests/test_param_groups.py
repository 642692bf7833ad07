"""Layer-wise learning-rate decay: timm's groups with the head outside the timm model, their
lr_scale turned into each group's lr once the optimizer exists."""

import warnings

import pytest
import timm
import torch
from lightning.pytorch import seed_everything
from mneme.app import ContinualClassifier
from mneme.app.finetuning.param_groups import apply_lr_scale, layer_decay_param_groups
from mneme.datamodules import ConfigError, ContinualDataModule
from timm.optim import param_groups_layer_decay
from torch import nn

from tests.conftest import digits_stream, quiet_trainer

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")

TINY = {
    "resnet10t": {"channels": (8, 8, 8, 8), "stem_width": 8},
    "vit_tiny_patch16_224": {
        "img_size": 8, "patch_size": 4, "embed_dim": 16, "depth": 3, "num_heads": 2
    },
}  # fmt: skip


def split(name: str, num_classes: int = 10) -> tuple[nn.Module, nn.Module, list[dict]]:
    """A timm model as Mneme holds it, encoder (no classifier) and head, with timm's own
    groups for the same parameters while the classifier was inside the model."""
    model = timm.create_model(name, num_classes=num_classes, **TINY[name])
    nwd = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    theirs = param_groups_layer_decay(
        model, weight_decay=0.05, no_weight_decay_list=nwd, layer_decay=0.5
    )
    head = model.get_classifier()
    model.reset_classifier(0)  # the encoder keeps the very parameter tensors
    return model, head, theirs


def by_param(groups: list[dict], key: str, default=None) -> dict[int, float]:
    return {id(p): g.get(key, default) for g in groups for p in g["params"]}


@pytest.mark.parametrize("name", list(TINY))
def test_scales_and_weight_decay_are_timms_for_the_model_with_its_classifier(name):
    encoder, head, theirs = split(name)
    ours = layer_decay_param_groups(encoder, head, layer_decay=0.5, weight_decay=0.05)
    assert by_param(ours, "lr_scale") == by_param(theirs, "lr_scale")
    assert by_param(ours, "weight_decay") == by_param(theirs, "weight_decay")


def test_per_layer_rates_by_hand_resnet():
    encoder, head, _ = split("resnet10t")
    # timm's layers of the encoder: stem, layer1.0 .. layer4.0 (5); the head sits above them
    layers = timm.models.group_parameters(encoder, encoder.group_matcher(), reverse=True)
    assert max(layers.values()) + 1 == 5
    groups = layer_decay_param_groups(encoder, head, layer_decay=0.5, weight_decay=0.1, lr=1.0)
    lr = {n: by_param(groups, "lr")[id(p)] for n, p in encoder.named_parameters()}
    assert by_param(groups, "lr")[id(head.weight)] == 1.0
    assert lr["layer4.0.conv1.weight"] == 0.5  # the top block: one layer below the head
    assert lr["layer3.0.conv1.weight"] == 0.25
    assert lr["conv1.0.weight"] == lr["bn1.weight"] == 0.5**5  # the stem, 5 layers below
    decay = {n: by_param(groups, "weight_decay")[id(p)] for n, p in encoder.named_parameters()}
    assert decay["layer4.0.bn1.weight"] == decay["layer4.0.bn1.bias"] == 0.0
    assert decay["layer4.0.conv1.weight"] == 0.1
    assert by_param(groups, "weight_decay")[id(head.bias)] == 0.0
    assert all("lr_scale" not in g for g in groups)


def test_vit_position_embeddings_get_no_weight_decay_and_the_stem_rate():
    encoder, head, _ = split("vit_tiny_patch16_224")
    groups = layer_decay_param_groups(encoder, head, layer_decay=0.5, weight_decay=0.1)
    decay, scale = by_param(groups, "weight_decay", "default"), by_param(groups, "lr_scale")
    assert decay[id(encoder.pos_embed)] == decay[id(encoder.cls_token)] == 0.0
    # stem 0, blocks 1..3 (the final norm joins the last), head 4
    assert scale[id(encoder.pos_embed)] == scale[id(encoder.patch_embed.proj.weight)] == 0.5**4
    assert scale[id(encoder.blocks[2].attn.qkv.weight)] == scale[id(encoder.norm.weight)] == 0.5
    assert scale[id(head.weight)] == 1.0


def test_every_trainable_parameter_once_frozen_ones_not_at_all():
    encoder, head, _ = split("resnet10t")
    for p in encoder.conv1.parameters():
        p.requires_grad_(False)
    groups = layer_decay_param_groups(encoder, head, layer_decay=0.7)
    listed = [id(p) for g in groups for p in g["params"]]
    trainable = [p for m in (encoder, head) for p in m.parameters() if p.requires_grad]
    assert len(listed) == len(set(listed)) == len(trainable)
    assert set(listed) == {id(p) for p in trainable}
    assert not {id(p) for p in encoder.conv1.parameters()} & set(listed)
    # weight_decay None: the decayed groups take the optimizer's own
    assert all(g.get("weight_decay", "optimizer") in (0.0, "optimizer") for g in groups)
    optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.3)
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.3}


def test_apply_lr_scale_sets_each_groups_lr_once():
    encoder, head, _ = split("resnet10t")
    groups = layer_decay_param_groups(encoder, head, layer_decay=0.5)
    scales = [g["lr_scale"] for g in groups]
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    for g in optimizer.param_groups:
        g["initial_lr"] = g["lr"]  # as an LR scheduler built earlier would have left it
    apply_lr_scale(optimizer)
    apply_lr_scale(optimizer)  # idempotent: the scale is spent
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs == [1e-3 * s for s in scales]
    assert [g["initial_lr"] for g in optimizer.param_groups] == lrs
    assert [g["applied_lr_scale"] for g in optimizer.param_groups] == scales
    assert all("lr_scale" not in g for g in optimizer.param_groups)
    plain = torch.optim.SGD(head.parameters(), lr=0.1)
    assert apply_lr_scale(plain).param_groups[0]["lr"] == 0.1  # no lr_scale: unchanged


def test_an_encoder_without_layers_is_refused_unless_no_decay():
    cnn = timm.create_model("mneme_cnn", num_classes=0, widths=(4,))
    with pytest.raises(ConfigError, match="model.encoder: layer_decay needs .*SmallCNN has none"):
        layer_decay_param_groups(cnn, nn.Linear(4, 2), layer_decay=0.5)
    groups = layer_decay_param_groups(cnn, nn.Linear(4, 2), layer_decay=1.0, weight_decay=0.1)
    assert {g["lr_scale"] for g in groups} == {1.0}
    assert {g["weight_decay"] for g in groups} == {0.0, 0.1}
    with pytest.raises(ConfigError, match="layer_decay: must lie in"):
        layer_decay_param_groups(cnn, None, layer_decay=0.0)


class LayerDecayClassifier(ContinualClassifier):
    """The wiring the module gets: groups with lr_scale, then the optimizer, then the lrs."""

    def configure_optimizers(self):
        groups = layer_decay_param_groups(self.encoder, self.head, layer_decay=0.5)
        return apply_lr_scale(self.optimizer_factory(groups))


def test_the_groups_train_in_a_lightning_run():
    seed_everything(0)
    datamodule = ContinualDataModule(**digits_stream(2), epochs_per_experience=1, batch_size=256)
    module = LayerDecayClassifier(
        encoder="resnet10t",
        encoder_args={"channels": [8, 8, 8, 8], "stem_width": 8},
        optimizer=lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.05),
    )
    quiet_trainer(datamodule).fit(module, datamodule)
    optimizer = module.trainer.optimizers[0]
    lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lr[id(module.head.weight)] == 0.01
    assert lr[id(module.encoder.layer4[0].conv1.weight)] == 0.01 * 0.5
    assert lr[id(module.encoder.conv1[0].weight)] == 0.01 * 0.5**5
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.05}
