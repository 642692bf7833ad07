"""ProgressiveUnfreezing: timm's block groups unfrozen from the top on an epoch or experience
schedule, each joining the optimizer; a resumed run unfreezes exactly as an uninterrupted one."""

import warnings
from types import SimpleNamespace

import pytest
import timm
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from mneme.app import ContinualClassifier
from mneme.callbacks import ProgressiveUnfreezing
from mneme.callbacks.training.unfreeze import block_groups
from mneme.datamodules import ConfigError, ContinualDataModule
from timm.models import group_parameters
from torch import nn

from tests.conftest import digits_stream, quiet_trainer

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")
pytestmark = pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint")

# A resnet10t of 8 channels: 5 coarse groups (stem, layer1..layer4), BatchNorm in each.
ENCODER = {"encoder": "resnet10t", "encoder_args": {"channels": [8, 8, 8, 8], "stem_width": 8}}
LR, WD = 0.01, 0.05


def adamw(params):
    return torch.optim.AdamW(params, lr=LR, weight_decay=WD)


def stream(epochs: int = 2) -> ContinualDataModule:
    return ContinualDataModule(**digits_stream(2), epochs_per_experience=epochs, batch_size=256)


def model(**args) -> ContinualClassifier:
    return ContinualClassifier(**ENCODER, optimizer=adamw, **args)


def timm_groups(coarse: bool = True) -> list[list[str]]:
    """The encoder's parameter names in timm's groups, top first, as the module names them."""
    encoder = timm.create_model(ENCODER["encoder"], num_classes=0, **ENCODER["encoder_args"])
    layers = group_parameters(encoder, encoder.group_matcher(coarse=coarse))
    return [[f"encoder.{n}" for n in layers[k]] for k in sorted(layers, reverse=True)]


class Probe(Callback):
    """At each epoch's first batch (after every epoch-start hook): what trains, the
    optimizer's groups, and whether each BatchNorm is in train mode."""

    def __init__(self) -> None:
        self.rows: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.rows[trainer.current_epoch] = snapshot(trainer, pl_module)


def snapshot(trainer, pl_module) -> dict:
    name = {p: n for n, p in pl_module.named_parameters()}
    norms = {n: m for n, m in pl_module.named_modules() if isinstance(m, nn.BatchNorm2d)}
    return {
        "trainable": sorted(n for n, p in pl_module.named_parameters() if p.requires_grad),
        "groups": [
            (sorted(name[p] for p in g["params"]), g["lr"], g["weight_decay"])
            for g in trainer.optimizers[0].param_groups
        ],
        "norms_train": {n: m.training for n, m in norms.items()},
        "norms_trainable": {n: m.weight.requires_grad for n, m in norms.items()},
    }


def fit(module, datamodule, callbacks, ckpt_path=None, **trainer_args):
    trainer = quiet_trainer(datamodule, callbacks=callbacks, **trainer_args)
    trainer.fit(module, datamodule, ckpt_path=ckpt_path)
    return trainer


def test_unfreezes_the_top_group_each_epoch_into_its_own_param_groups():
    seed_everything(0)
    module, probe = model(), Probe()
    unfreeze = ProgressiveUnfreezing(every="epoch", lr_scale=0.5, layer_decay=0.5)
    assert module.encoder is None  # built in the module's setup: frozen at fit start
    fit(module, stream(), [unfreeze, probe])
    groups, params = timm_groups(), dict(module.named_parameters())
    head = ["head.bias", "head.weight"]
    for epoch, row in probe.rows.items():
        unfrozen = groups[:epoch]  # epoch e: the top e groups
        assert row["trainable"] == sorted(head + [n for g in unfrozen for n in g])
        assert row["groups"][0] == (head, LR, WD)  # the module's own group: the head only
        expected = []
        for k, names in enumerate(unfrozen):
            lr = LR * 0.5 * 0.5**k
            decayed = sorted(n for n in names if params[n].ndim > 1)  # 1-D: no weight decay
            expected += [(decayed, lr, WD), (sorted(set(names) - set(decayed)), lr, 0.0)]
        assert row["groups"][1:] == expected
        # the module's rule: a BatchNorm trains its statistics exactly when its scale trains
        assert row["norms_train"] == row["norms_trainable"]
    assert len(probe.rows) == 4


def test_frozen_groups_and_their_statistics_stay_as_built():
    seed_everything(0)
    module = model(num_classes=10, num_tasks=1, input_shape=(1, 8, 8))  # built: frozen at setup
    state = {k: v.clone() for k, v in module.state_dict().items()}
    fit(module, stream(epochs=1), [ProgressiveUnfreezing(every="epoch", max_groups=1)])
    changed = set()
    for key, value in module.state_dict().items():
        if not torch.equal(value, state[key]):
            changed.add(key)
    # trained at epoch 1: layer4 (the top group), its batch-norm statistics and the head
    assert {k for k in changed if not k.startswith("encoder.layer4.")} <= {"head.weight",
        "head.bias", "class_mask"}  # fmt: skip
    assert {"encoder.layer4.0.conv1.weight", "encoder.layer4.0.bn1.running_mean"} <= changed


def test_experience_schedule_with_several_groups_a_step():
    seed_everything(0)
    probe = Probe()
    fit(model(), stream(), [ProgressiveUnfreezing(every="experience", groups_per_step=2), probe])
    groups, head = timm_groups(), ["head.bias", "head.weight"]
    for epoch, row in probe.rows.items():
        unfrozen = groups[: 2 * (epoch // 2)]  # 2 epochs an experience
        assert row["trainable"] == sorted(head + [n for g in unfrozen for n in g])
    assert [len(probe.rows[e]["groups"]) for e in range(4)] == [1, 1, 5, 5]


@pytest.mark.parametrize("weights", [False, True], ids=["random", "weights_file"])
def test_a_resumed_run_has_unfrozen_exactly_what_an_uninterrupted_one_has(tmp_path, weights):
    args = {}
    if weights:  # a pretrained backbone: checkpoints leave its frozen groups out
        backbone = timm.create_model(ENCODER["encoder"], **ENCODER["encoder_args"])
        torch.save(backbone.state_dict(), tmp_path / "backbone.pth")
        args = {"encoder_weights": str(tmp_path / "backbone.pth"), "encoder_input_size": [8, 8]}

    def run(ckpt_path=None, checkpoints=()):
        seed_everything(0)
        module, probe = model(**args), Probe()
        unfreeze = ProgressiveUnfreezing(every="epoch", lr_scale=0.1)
        trainer = fit(
            module,
            stream(),
            [unfreeze, probe, *checkpoints],
            ckpt_path=ckpt_path,
            enable_checkpointing=bool(checkpoints),
            deterministic=True,
        )
        return trainer, module, probe

    every_epoch = ModelCheckpoint(
        dirpath=tmp_path / "runs", filename="{epoch}", save_top_k=-1, save_on_train_epoch_end=True
    )
    trainer, module, probe = run(checkpoints=[every_epoch])
    final = snapshot(trainer, module)
    trained = {k: v.clone() for k, v in module.state_dict().items()}
    for epoch in (0, 1, 2):  # resume from the end of each epoch but the last
        trainer2, module2, probe2 = run(ckpt_path=tmp_path / "runs" / f"epoch={epoch}.ckpt")
        assert sorted(probe2.rows) == list(range(epoch + 1, 4))
        for e, row in probe2.rows.items():
            assert row == probe.rows[e], (epoch, e)
        assert snapshot(trainer2, module2) == final
        for key, value in module2.state_dict().items():
            torch.testing.assert_close(value, trained[key], msg=key)
        state = trainer2.optimizers[0].state_dict()
        assert len(state["param_groups"]) == len(final["groups"]) == 7  # head + 3 x 2
    if weights:
        saved = torch.load(tmp_path / "runs" / "epoch=1.ckpt", weights_only=True)["mneme_backbone"]
        saved = saved["encoder"]  # per backbone, by module name
        assert "encoder.conv1.0.weight" in saved["omitted"]  # still frozen, refilled on load
        assert not any(k.startswith("encoder.layer4.") for k in saved["omitted"])


def test_state_is_versioned_and_a_resume_with_another_backbone_is_refused():
    unfreeze = ProgressiveUnfreezing()
    state = unfreeze.state_dict()
    assert state["version"] == 1 and state["internal_optimizer_metadata"] == {}
    other = ProgressiveUnfreezing()
    other.load_state_dict({**state, "groups": 3, "unfrozen": 1})
    module = model(num_classes=10, num_tasks=1, input_shape=(1, 8, 8))
    other.freeze_before_training(module)
    trainer = SimpleNamespace(optimizers=[], strategy=None)
    with pytest.raises(ConfigError, match="checkpoint's backbone had 3 block groups.*this one 5"):
        other.on_fit_start(trainer, module)


def test_block_groups_are_timms_top_first():
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        num_classes=0,
        img_size=8,
        patch_size=4,
        embed_dim=16,
        depth=2,
        num_heads=2,
    )
    groups = [[n for n, _ in g] for g in block_groups(vit)]
    assert len(groups) == 3
    assert groups[0][0].startswith("blocks.1.") and groups[0][-1] == "norm.bias"
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight"} <= set(groups[-1])
    # fine groups: efficientnet_lite0's 16 blocks between stem and top
    efficientnet = timm.create_model("efficientnet_lite0", num_classes=0)
    assert len(block_groups(efficientnet, coarse=True)) == 8
    assert len(block_groups(efficientnet, coarse=False)) == 17
    # only what was trainable: what something else froze stays frozen
    vit.cls_token.requires_grad_(False)
    assert "cls_token" not in {n for g in block_groups(vit) for n, _ in g}


def test_what_it_needs_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="needs a FineTunable module.*lacks head"):
        ProgressiveUnfreezing().freeze_before_training(SimpleNamespace(encoder=nn.Linear(2, 2)))
    cnn = ContinualClassifier(encoder="mneme_cnn", num_classes=4, input_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match="model.encoder: .*group_matcher.*SmallCNN has none"):
        ProgressiveUnfreezing().freeze_before_training(cnn)
    ddp = SimpleNamespace(world_size=2, datamodule=None)
    with pytest.raises(ConfigError, match="one process.*DDP"):
        ProgressiveUnfreezing().setup(ddp, cnn, "fit")
    with pytest.raises(ConfigError, match="every: 'experience' needs"):
        no_stream = SimpleNamespace(world_size=1, datamodule=None)
        ProgressiveUnfreezing(every="experience").setup(no_stream, cnn, "fit")
    for args, field in [
        ({"every": "step"}, "every"),
        ({"every_n": 0}, "every_n"),
        ({"groups_per_step": 0}, "groups_per_step"),
        ({"max_groups": -1}, "max_groups"),
        ({"lr_scale": 0.0}, "lr_scale"),
        ({"layer_decay": 1.5}, "layer_decay"),
    ]:
        with pytest.raises(ConfigError, match=f"ProgressiveUnfreezing.{field}:"):
            ProgressiveUnfreezing(**args)


def test_an_optimizer_over_the_frozen_backbone_is_refused():
    class AllParameters(ContinualClassifier):
        def optimizer_parameters(self):
            return self.parameters()

    module = AllParameters(**ENCODER, optimizer=adamw, num_classes=10, input_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match="passed the frozen backbone; it must pass only"):
        fit(module, stream(), [ProgressiveUnfreezing()])
