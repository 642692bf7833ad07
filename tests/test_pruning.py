"""Pruning callback: sparsity reached, masks kept through training and a resume, plain end."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from mneme.app import ContinualClassifier
from mneme.callbacks import ContinualMetrics, Pruning
from mneme.callbacks.compression.pruning_masks import cubic_sparsity
from mneme.datamodules import ConfigError, ContinualDataModule
from torch import nn
from torch.nn.utils import prune

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")


def model(hidden=(32,)) -> ContinualClassifier:
    seed_everything(0)
    return ContinualClassifier(  # built now: the sklearn digits' shape and classes
        encoder="mneme_mlp",
        encoder_args={"hidden": list(hidden)},
        num_classes=10,
        input_shape=(1, 8, 8),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    )


def lazy_model() -> ContinualClassifier:
    """Built in its own ``setup``, after the callbacks' (as under the CLI)."""
    seed_everything(0)
    return ContinualClassifier(
        encoder="mneme_mlp",
        encoder_args={"hidden": [32]},
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    )


def fit(*callbacks, ckpt_dir: Path | None = None, ckpt_path=None, net=None, logger=False):
    net = net or lazy_model()
    data = ContinualDataModule(
        benchmark="mneme.datamodules.SplitDigits",
        benchmark_args={"n_experiences": 5},
        batch_size=64,
    )
    extra = []
    if ckpt_dir is not None:
        extra.append(
            ModelCheckpoint(
                dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True
            )
        )
    trainer = Trainer(
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=ckpt_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ContinualMetrics(print_table=False), *callbacks, *extra],
        **data.trainer_settings(),
    )
    trainer.fit(net, data, ckpt_path=ckpt_path)
    return trainer, net


def linears(net) -> dict[str, nn.Linear]:
    out = {n: m for n, m in net.named_modules() if isinstance(m, nn.Linear) and "head" not in n}
    assert out
    return out


def test_cubic_schedule():
    assert cubic_sparsity(0.8, 0, 4) == 0.0
    assert cubic_sparsity(0.8, 4, 4) == pytest.approx(0.8)
    assert cubic_sparsity(0.8, 2, 4) == pytest.approx(0.8 * (1 - 0.5**3))
    p = Pruning(amount=0.9, schedule="cubic", start_experience=1)
    assert [p.target(k, 5) for k in range(5)] == [
        None,
        pytest.approx(0.9 * (1 - (2 / 3) ** 3)),
        pytest.approx(0.9 * (1 - (1 / 3) ** 3)),
        pytest.approx(0.9),
        None,
    ]
    assert [Pruning(amount=0.5).target(k, 3) for k in range(3)] == [0.5, None, None]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scope": "global"},
        {"scope": "layer"},
        {"method": "structured", "dim": 0},
    ],
)
def test_masks_reach_the_sparsity(kwargs):
    net = model(hidden=(24, 16))
    p = Pruning(amount=0.5, **kwargs)
    p.prune_to(net, 0.3)
    p.prune_to(net, 0.5)  # a second step prunes among the survivors only
    layers = linears(net)
    total = sum(m.weight.numel() for m in layers.values())
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    if kwargs.get("scope") == "global":
        assert zeros == round(0.5 * total)  # over all layers together
    for name, m in layers.items():
        if kwargs.get("method") == "structured":  # whole output rows, per layer
            rows = m.weight.eq(0).all(1)
            assert int(rows.sum()) == round(0.5 * m.weight.shape[0]), name
        elif kwargs.get("scope") == "layer":
            assert int((m.weight == 0).sum()) == round(0.5 * m.weight.numel()), name
        assert torch.equal(m.weight_orig == 0, m.weight_mask == 0)  # zeroed under the mask
    assert set(p.masks) == set(layers)
    assert p.report(net)["prune/sparsity"] == pytest.approx(0.5, abs=0.02)


def test_pruned_weights_stay_zero_and_fit_ends_plain(tmp_path):
    p = Pruning(amount=0.6, schedule="one_shot", start_experience=0)
    _, net = fit(p, logger=CSVLogger(tmp_path))
    logged = (next(tmp_path.rglob("metrics.csv"))).read_text().splitlines()[0].split(",")
    assert {"prune/sparsity", *(f"prune/{n}" for n in linears(net))} <= set(logged)
    layers = linears(net)
    # prune.remove at the end: plain parameters, no torch-prune keys, the zeros kept.
    keys = net.state_dict().keys()
    assert not [k for k in keys if k.endswith(("weight_orig", "weight_mask"))]
    assert not any(prune.is_pruned(m) for m in layers.values())
    for name, m in layers.items():
        assert isinstance(m.weight, nn.Parameter)
        # Four experiences trained after the step: the pruned weights are still exactly zero.
        assert bool((m.weight[~p.masks[name]] == 0).all()), name
    assert p.report(net)["prune/sparsity"] == pytest.approx(0.6, abs=0.01)


def test_kill_and_resume_gives_the_same_masks(tmp_path):
    def pruning():
        return Pruning(amount=0.8, schedule="cubic", scope="global")  # steps at exp 0..3

    full, _ = fit(pruning(), ckpt_dir=tmp_path / "a")
    reference = next(c for c in full.callbacks if isinstance(c, Pruning))
    (mid,) = (tmp_path / "a").glob("epoch=0-*.ckpt")  # after experience 0's step
    saved = torch.load(mid, weights_only=True)
    assert not [k for k in saved["state_dict"] if k.endswith(("weight_orig", "weight_mask"))]
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("Pruning"))
    assert state["steps_done"] == [0]
    assert state["sparsity"] == pytest.approx(0.8 * (1 - 0.75**3))

    resumed_trainer, net = fit(pruning(), ckpt_path=mid)
    resumed = next(c for c in resumed_trainer.callbacks if isinstance(c, Pruning))
    assert resumed.steps_done == reference.steps_done == [0, 1, 2, 3]
    assert set(resumed.masks) == set(reference.masks)
    for name, mask in reference.masks.items():
        assert torch.equal(resumed.masks[name], mask), name
    assert resumed.report(net) == pytest.approx(reference.report(full.lightning_module))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"amount": 1.0}, "Pruning.amount"),
        ({"amount": -0.1}, "Pruning.amount"),
        ({"schedule": "linear"}, "Pruning.schedule"),
        ({"method": "random"}, "Pruning.method"),
        ({"layer_types": ["LSTM"]}, "Pruning.layer_types"),
        ({"end_experience": 0, "start_experience": 1}, "Pruning.end_experience"),
    ],
)
def test_bad_arguments(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        Pruning(**kwargs)


def test_structured_on_a_layer_without_that_dim():
    with pytest.raises(ConfigError, match=r"Pruning\.dim: .*has a 2-D weight, no dim 2"):
        Pruning(method="structured", dim=2)._check(linears(model()))


class MaskSpy(Callback):
    """Copies the Pruning callback's masks and the pruned layers' weights at each experience
    end: before the Pruning step when listed before it, after the step when listed after."""

    def __init__(self, pruning: Pruning) -> None:
        self.pruning, self.masks, self.weights = pruning, [], []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.masks.append({n: m.clone() for n, m in self.pruning.masks.items()})
        self.weights.append({n: m.weight.detach().clone() for n, m in linears(pl_module).items()})


@pytest.mark.parametrize("regrow", [False, True])
def test_regrow_lifts_the_masks_each_experience(regrow):
    p = Pruning(amount=0.6, schedule="cubic", scope="global", end_experience=2, regrow=regrow)
    before, after = MaskSpy(p), MaskSpy(p)
    _, net = fit(before, p, after)
    regrown = 0
    for name, mask in after.masks[0].items():  # the masks of the step at experience 0
        trained = before.weights[1][name][~mask]  # those weights after experience 1 trained
        regrown += int((trained != 0).sum())
        # Without regrow a later step prunes among the survivors only: masks only shrink.
        assert bool((after.masks[1][name] <= mask).all()) or regrow, name
    # With regrow the pruned weights trained again (from zero) during experience 1.
    assert (regrown > 0) == regrow
    # Each step reaches its target either way; the last one (experience 2) is 0.6.
    assert p.sparsity == pytest.approx(0.6)
    for step, target in ((1, cubic_sparsity(0.6, 2, 3)), (2, 0.6)):
        zeros = sum(int((w == 0).sum()) for w in after.weights[step].values())
        total = sum(w.numel() for w in after.weights[step].values())
        assert zeros / total == pytest.approx(target, abs=0.01)


def attention_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True))


def test_heads_pruning_masks_whole_heads_and_survives_a_checkpoint():
    net = attention_net()
    p = Pruning(amount=0.5, method="heads", exclude=[])
    p._check(p.layers(net), p.attention_layers(net))
    p.prune_to(net, 0.25)
    p.prune_to(net, 0.5)  # among the surviving heads only
    (alive,) = p.head_masks.values()
    assert int(alive.sum()) == 2 and p.report(net)["prune/heads"] == 0.5
    attn = net[0].self_attn
    dead = ~alive
    assert bool((attn.in_proj_weight.view(3, 4, 8, 32)[:, dead] == 0).all())
    assert bool((attn.in_proj_bias.view(3, 4, 8)[:, dead] == 0).all())
    x = torch.randn(3, 5, 32)
    net(x).sum().backward()  # pruned heads get no gradient: they stay pruned while training
    assert bool((attn.in_proj_weight_orig.grad.view(3, 4, 8, 32)[:, dead] == 0).all())

    # A checkpoint holds the plain weights and the head masks; a fresh model resumes them.
    checkpoint = {"state_dict": net.state_dict()}
    p.on_save_checkpoint(None, None, checkpoint)
    assert "0.self_attn.in_proj_weight" in checkpoint["state_dict"]
    assert not [k for k in checkpoint["state_dict"] if k.endswith(("_orig", "_mask"))]
    fresh = attention_net()
    fresh.load_state_dict(checkpoint["state_dict"])
    resumed = Pruning(amount=0.5, method="heads", exclude=[])
    resumed.load_state_dict(p.state_dict())
    resumed.apply_masks(fresh)
    net.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(x), net(x), atol=1e-6)
    resumed.remove(fresh)
    assert not prune.is_pruned(fresh)
    assert int((fresh[0].self_attn.in_proj_weight == 0).all(1).sum()) == 3 * 2 * 8


def test_attention_out_proj_is_never_pruned_as_a_linear():
    p = Pruning(exclude=[])
    assert set(p.layers(attention_net())) == {"0.linear1", "0.linear2"}
    with pytest.raises(ConfigError, match="Pruning.method: 'heads' prunes nn.MultiheadAttention"):
        Pruning(method="heads")._check({}, {})


def test_the_config_types_accept_every_method():
    # LightningCLI checks a config against these Literal annotations, not against METHODS.
    import typing

    from mneme.callbacks.compression.pruning import METHODS, SCHEDULES, SCOPES

    hints = typing.get_type_hints(Pruning.__init__)
    for field, allowed in (("method", METHODS), ("schedule", SCHEDULES), ("scope", SCOPES)):
        assert typing.get_args(hints[field]) == allowed, field


@pytest.mark.slow
def test_sigkill_then_resume_keeps_the_masks(tmp_path):
    """A real SIGKILL inside experience 2 (after the steps of experiences 0 and 1, with the
    masks only in the last checkpoint's callback state), resumed from last.ckpt through the
    CLI: the same masks and the same accuracy matrix as the run never killed."""
    from tests.test_resume import fit as cli_fit
    from tests.test_resume import killed_and_resumed, matrix_of

    pruning = ["--trainer.callbacks+=mneme.callbacks.Pruning",
               "--trainer.callbacks.init_args.amount", "0.7",
               "--trainer.callbacks.init_args.schedule", "cubic"]  # fmt: skip
    reference = cli_fit(tmp_path, "prune_ref", *pruning)
    assert reference.returncode == 0, reference.stderr[-2000:]
    kill = ["--trainer.callbacks.init_args.epoch", "4", "--trainer.callbacks.init_args.batch", "2"]
    log_dir = killed_and_resumed(tmp_path, "prune", pruning, *kill)
    ref_dir = tmp_path / "logs" / "prune_ref" / "version_0"
    assert matrix_of(log_dir) == pytest.approx(matrix_of(ref_dir), abs=1e-6)

    def final_state(run: Path) -> dict:
        saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        return next(v for k, v in saved["callbacks"].items() if k.startswith("Pruning"))

    resumed, expected = final_state(log_dir), final_state(ref_dir)
    assert resumed["steps_done"] == expected["steps_done"] == [0, 1, 2, 3]
    assert resumed["masks"].keys() == expected["masks"].keys()
    for name, mask in expected["masks"].items():
        assert torch.equal(resumed["masks"][name], mask), name
