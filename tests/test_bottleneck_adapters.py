"""Bottleneck adapters: target matching, identity at start, what trains, what is refused."""

import copy
from types import SimpleNamespace

import pytest
import timm
import torch
from mneme.app.core.errors import ConfigError
from mneme.app.finetuning.bottleneck_adapters import Bottleneck, add_bottleneck_adapters, matches
from mneme.app.nn.encoders import create_encoder
from timm.models.vision_transformer import VisionTransformer
from torch import nn


def small_vit() -> VisionTransformer:
    return VisionTransformer(
        img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3
    )


def small_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16))


def adapter_names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if ".bottleneck_adapter." in n}


def test_parameter_count_is_the_hand_count():
    model = small_mlp()
    assert add_bottleneck_adapters(model, ["0", "2"], reduction=4) == ["0", "2"]
    # width 32 -> 8 -> 32 and width 16 -> 4 -> 16, each down and up with bias
    hand = (32 * 8 + 8 + 8 * 32 + 32) + (16 * 4 + 4 + 4 * 16 + 16)
    assert sum(p.numel() for n, p in model.named_parameters() if n in adapter_names(model)) == hand
    fixed = small_mlp()
    add_bottleneck_adapters(fixed, r"2", hidden=3)
    assert (
        sum(p.numel() for p in fixed[2].bottleneck_adapter.parameters()) == 16 * 3 + 3 + 3 * 16 + 16
    )


def test_matching_follows_peft_target_modules():
    # a string is a regex over the whole name; a list names exact modules or suffixes
    assert matches(r"blocks\.\d+\.mlp", "blocks.0.mlp")
    assert not matches(r"blocks\.\d+\.mlp", "blocks.0.mlp.fc2")
    assert not matches("mlp", "blocks.0.mlp")
    assert matches(["mlp"], "blocks.0.mlp") and matches(["blocks.0.mlp"], "blocks.0.mlp")
    assert not matches(["lp"], "blocks.0.mlp")


def test_matching_agrees_with_peft_itself():
    tuners_utils = pytest.importorskip("peft.tuners.tuners_utils")
    names = [n for n, _ in small_vit().named_modules() if n]
    for target in [r"blocks\.\d+\.mlp", r".*fc\d", "blocks.1.attn.qkv", ["fc2", "norm"],
                   ["blocks.0.attn"], ["attn.proj", "head"]]:  # fmt: skip
        config = SimpleNamespace(target_modules=target, target_parameters=None)
        peft_says = [n for n in names if tuners_utils.check_target_module_exists(config, n)]
        assert [n for n in names if matches(target, n)] == peft_says, target


def test_a_vit_is_unchanged_at_start_and_only_adapters_train():
    torch.manual_seed(0)
    vit = small_vit()
    base = copy.deepcopy(vit)
    adapted = add_bottleneck_adapters(
        vit, r"blocks\.\d+\.mlp", reduction=4, input_shape=(3, 16, 16)
    )
    assert adapted == ["blocks.0.mlp", "blocks.1.mlp"]  # timm Mlp: width from one probe pass
    assert vit.blocks[0].mlp.bottleneck_adapter.down.in_features == 32
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 3, (4,))
    torch.testing.assert_close(vit(x), base(x), atol=1e-7, rtol=0)

    vit.requires_grad_(False)
    for name, param in vit.named_parameters():
        param.requires_grad_(name in adapter_names(vit))
    before = {n: p.detach().clone() for n, p in vit.named_parameters()}
    optimizer = torch.optim.SGD([p for p in vit.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(vit(x), y).backward()
        optimizer.step()
    changed = {n for n, p in vit.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= adapter_names(vit)  # every base parameter bit-identical
    assert {n for n in adapter_names(vit) if n.endswith("up.weight")} <= changed
    # down moves too once up is no longer zero (its first gradient is zero through up = 0)
    assert {n for n in adapter_names(vit) if n.endswith("down.weight")} <= changed
    assert not torch.allclose(vit(x), base(x))


@pytest.mark.parametrize(
    ("make", "target", "input_shape", "count"),
    [
        # blocks of InvertedResidual / DepthwiseSeparableConv, (N, C, H, W) outputs by probe
        (
            lambda: timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0),
            r"blocks\.\d+\.\d+",
            (3, 32, 32),
            16,
        ),
        # Conv2d and BatchNorm2d by type, ReLU / MaxPool / AdaptiveAvgPool (N, C, 1, 1) /
        # Flatten (N, C) by probe
        (lambda: create_encoder("mneme_cnn", (1, 8, 8)), r"features\.\d+", (1, 8, 8), 10),
    ],
)
def test_a_cnn_is_unchanged_at_start(make, target, input_shape, count):
    torch.manual_seed(0)
    model = make().eval()
    base = copy.deepcopy(model)
    model.train()  # the probe must leave each module's flag as it found it
    assert len(add_bottleneck_adapters(model, target, input_shape=input_shape)) == count
    assert all(m.training for m in model.modules())
    x = torch.randn(2, *input_shape)
    model.eval()
    torch.testing.assert_close(model(x), base(x), atol=1e-7, rtol=0)


def test_houlsby_init_is_near_identity_but_not_exact():
    torch.manual_seed(0)
    model = small_mlp()
    base = copy.deepcopy(model)
    add_bottleneck_adapters(model, ["0", "2"], init="houlsby", activation="gelu")
    x = torch.randn(4, 8)
    difference = (model(x) - base(x)).abs().max()
    assert 0 < difference < 1e-3


def test_state_dict_round_trips_into_a_fresh_adapted_model():
    torch.manual_seed(0)
    cnn = create_encoder("mneme_cnn", (1, 8, 8))
    add_bottleneck_adapters(cnn, ["features.0", "features.4"], reduction=4)
    with torch.no_grad():
        for name, param in cnn.named_parameters():
            if ".bottleneck_adapter." in name:
                param.normal_()
    fresh = create_encoder("mneme_cnn", (1, 8, 8))
    add_bottleneck_adapters(fresh, ["features.0", "features.4"], reduction=4)
    fresh.load_state_dict(cnn.state_dict())
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(fresh.eval()(x), cnn.eval()(x), atol=0, rtol=0)
    # a deepcopy's hook adds the copy's own adapter
    twin = copy.deepcopy(cnn)
    with torch.no_grad():
        twin.features[0].bottleneck_adapter.up.bias.add_(1.0)
    assert not torch.allclose(twin(x), cnn(x))


def test_an_unknown_target_names_the_closest_modules_in_one_line():
    with pytest.raises(ConfigError) as error:
        add_bottleneck_adapters(small_vit(), r"blocks\.0\.mlp\.fc3")
    message = str(error.value)
    assert message.startswith("model.peft.target_modules: no module of VisionTransformer matches")
    assert "blocks.0.mlp.fc2" in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"closest names: .*\bfc[12]\b"):
        add_bottleneck_adapters(small_vit(), ["fc3"])


def test_refusals():
    vit = small_vit()
    add_bottleneck_adapters(vit, ["fc2"])
    with pytest.raises(ConfigError, match=r"^model\.peft\.target_modules: blocks\.0\.mlp\.fc2, "):
        add_bottleneck_adapters(vit, r".*\.fc2")
    # a later call never targets the adapters an earlier one added
    assert add_bottleneck_adapters(vit, r".*\.fc1") == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    with pytest.raises(ConfigError, match=r"^model\.peft\.target_modules: .*pass input_shape"):
        add_bottleneck_adapters(small_vit(), r"blocks\.\d+")
    with pytest.raises(ConfigError, match=r"^model\.peft\.target_modules: .*not a valid regular"):
        add_bottleneck_adapters(small_vit(), r"blocks.[")
    with pytest.raises(ConfigError, match=r"^model\.peft\.activation: unknown 'swish'"):
        add_bottleneck_adapters(small_vit(), ["fc2"], activation="swish")
    with pytest.raises(ConfigError, match=r"^model\.peft\.reduction"):
        add_bottleneck_adapters(small_vit(), ["fc2"], reduction=0)


def test_the_adapter_works_over_the_channel_axis():
    # a Linear over channels of (N, C, H, W) is a 1x1 convolution
    adapter = Bottleneck(6, 2, channel_dim=1)
    nn.init.normal_(adapter.up.weight)
    x = torch.randn(2, 6, 3, 3)
    conv_down = nn.functional.conv2d(x, adapter.down.weight[:, :, None, None], adapter.down.bias)
    expected = nn.functional.conv2d(
        adapter.act(conv_down), adapter.up.weight[:, :, None, None], adapter.up.bias
    )
    torch.testing.assert_close(adapter(x), expected)


def test_a_cnn_stage_is_adapted_without_running_the_adapter_as_one_more_layer():
    # nn.Sequential runs every child: the adapter of a stage lives on the model instead.
    torch.manual_seed(0)
    cnn = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    before = cnn(x)
    add_bottleneck_adapters(cnn, r"blocks\.\d+", input_shape=(3, 32, 32))
    assert "bottleneck_adapters.blocks-0.up.weight" in dict(cnn.named_parameters())
    torch.testing.assert_close(cnn.eval()(x), before, atol=1e-6, rtol=0)
    nested = nn.Sequential(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ConfigError, match="every module above it are nn.Sequential"):
        add_bottleneck_adapters(nested, ["0"])
