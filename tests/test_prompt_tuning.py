"""Visual prompt tuning on timm ViTs: what trains, what the forward computes, what is refused."""

import copy
import math

import pytest
import timm
import torch
from mneme.app.core.errors import ConfigError
from mneme.app.finetuning.prompt_tuning import add_visual_prompts
from mneme.app.nn.encoders import create_encoder
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

DIM, DEPTH, PATCH, SIZE = 32, 3, 8, 16  # 4 patches of 8x8


def small_vit(**kwargs) -> VisionTransformer:
    args = dict(
        img_size=SIZE, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=2, num_classes=0
    )
    return VisionTransformer(**{**args, **kwargs})


def unrolled(base: VisionTransformer, tokens: torch.Tensor, deep: bool, x: torch.Tensor):
    """VPT written out on an un-hooked ViT: embed, insert prompts after the prefix, (deep)
    replace them before each later block, drop them after the last, then norm and head."""
    p, n = base.num_prefix_tokens, tokens.shape[1]
    h = base.norm_pre(base.patch_drop(base._pos_embed(base.patch_embed(x))))
    h = torch.cat([h[:, :p], tokens[0].expand(len(x), -1, -1), h[:, p:]], dim=1)
    for i, block in enumerate(base.blocks):
        if deep and i > 0:
            h = torch.cat([h[:, :p], tokens[i].expand(len(x), -1, -1), h[:, p + n :]], dim=1)
        h = block(h)
    h = torch.cat([h[:, :p], h[:, p + n :]], dim=1)
    return base.forward_head(base.norm(h))


@pytest.mark.parametrize("deep", [False, True])
def test_trainable_prompt_parameters(deep):
    vit = small_vit()
    prompts = add_visual_prompts(vit, num_tokens=5, deep=deep)
    assert sum(p.numel() for p in prompts.parameters()) == (DEPTH if deep else 1) * 5 * DIM
    # the prompts are named under the ViT, so its state_dict and optimizers see them
    assert "visual_prompts.tokens" in dict(vit.named_parameters())


def test_init_is_vpts_uniform_and_the_seed_decides_it():
    torch.manual_seed(3)
    a = add_visual_prompts(small_vit(), num_tokens=50, deep=True).tokens.detach()
    torch.manual_seed(3)
    b = add_visual_prompts(small_vit(), num_tokens=50, deep=True).tokens.detach()
    assert torch.equal(a, b)
    bound = math.sqrt(6 / (3 * PATCH * PATCH + DIM))
    assert a.abs().max() <= bound
    assert a.abs().max() > 0.9 * bound  # uniform over the whole interval, not a narrower one


@pytest.mark.parametrize(
    ("deep", "vit_args"),
    [
        (False, {}),
        (True, {}),
        (True, {"reg_tokens": 2, "global_pool": "avg"}),  # 3 prefix tokens, mean over patches
        (False, {"class_token": False, "global_pool": "avg"}),  # no prefix at all
    ],
)
def test_forward_equals_hand_unrolled_vpt(deep, vit_args):
    torch.manual_seed(0)
    base = small_vit(**vit_args).eval()
    vit = copy.deepcopy(base)
    prompts = add_visual_prompts(vit, num_tokens=3, deep=deep)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = unrolled(base, prompts.tokens, deep, x)
        out = vit(x)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
        # forward_features too: the prompt slice is gone before the final norm
        features = vit.forward_features(x)
        assert features.shape == base.forward_features(x).shape
        torch.testing.assert_close(vit.forward_head(features), expected, atol=1e-6, rtol=0)
        # the prompts matter
        assert out.shape == base(x).shape
        assert not torch.allclose(out, base(x), atol=1e-4)


def test_only_the_prompts_train_when_the_vit_is_frozen():
    torch.manual_seed(0)
    vit = small_vit(num_classes=4)
    prompts = add_visual_prompts(vit, num_tokens=4, deep=True)
    vit.requires_grad_(False)
    prompts.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in vit.named_parameters()}
    trainable = [p for p in vit.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    x, y = torch.randn(8, 3, SIZE, SIZE), torch.randint(0, 4, (8,))
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(vit(x), y).backward()
        optimizer.step()
    for name, param in vit.named_parameters():
        if name == "visual_prompts.tokens":
            assert not torch.equal(param, before[name])
            assert (param != before[name]).any(dim=-1).all()  # every layer's every token moved
        else:
            assert torch.equal(param, before[name]), name


def test_state_dict_round_trips_into_a_fresh_prompted_vit():
    torch.manual_seed(0)
    vit = small_vit()
    add_visual_prompts(vit, num_tokens=2, deep=True)
    torch.manual_seed(1)
    fresh = small_vit()
    add_visual_prompts(fresh, num_tokens=2, deep=True)
    x = torch.randn(2, 3, SIZE, SIZE)
    assert not torch.allclose(fresh.eval()(x), vit.eval()(x))
    fresh.load_state_dict(vit.state_dict())
    torch.testing.assert_close(fresh(x), vit(x), atol=0, rtol=0)


def test_deepcopy_and_functional_call_use_their_own_tokens():
    torch.manual_seed(0)
    vit = small_vit().eval()
    add_visual_prompts(vit, num_tokens=2, deep=True)
    x = torch.randn(2, 3, SIZE, SIZE)
    out = vit(x)
    # a deepcopy (a teacher snapshot) hooks its own prompts, not the original's
    twin = copy.deepcopy(vit)
    with torch.no_grad():
        twin.visual_prompts.tokens.add_(1.0)
    assert not torch.allclose(twin(x), out)
    torch.testing.assert_close(vit(x), out, atol=0, rtol=0)
    # functional_call swaps the tokens the hooks read
    params = {**dict(vit.named_parameters()), "visual_prompts.tokens": twin.visual_prompts.tokens}
    torch.testing.assert_close(torch.func.functional_call(vit, params, (x,)), twin(x))


def test_eva_without_rope_works_and_with_rope_is_refused():
    eva = Eva(img_size=SIZE, patch_size=PATCH, embed_dim=DIM, depth=2, num_heads=2,
              num_classes=0, use_rot_pos_emb=False)  # fmt: skip
    base = copy.deepcopy(eva).eval()
    add_visual_prompts(eva, num_tokens=2, deep=True)
    x = torch.randn(2, 3, SIZE, SIZE)
    assert eva.eval()(x).shape == base(x).shape
    roped = Eva(img_size=SIZE, patch_size=PATCH, embed_dim=DIM, depth=2, num_heads=2,
                num_classes=0, use_rot_pos_emb=True)  # fmt: skip
    with pytest.raises(ConfigError, match=r"^model\.peft\.method: .*rotary") as error:
        add_visual_prompts(roped, num_tokens=2)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: timm.create_model("resnet18", pretrained=False, num_classes=0), "resnet18"),
        (lambda: create_encoder("mneme_cnn", (1, 8, 8)), "SmallCNN"),
    ],
)
def test_a_cnn_is_refused_in_one_line(make, name):
    with pytest.raises(ConfigError) as error:
        add_visual_prompts(make(), num_tokens=4)
    message = str(error.value)
    assert message == (
        "model.peft.method: prompt tuning needs a ViT backbone (timm VisionTransformer); "
        f"{name} is a CNN: use lora, adapter or bitfit"
    )


def test_other_refusals_are_one_line():
    with pytest.raises(ConfigError, match=r"^model\.peft\.method: .*MLPEncoder is not a ViT"):
        add_visual_prompts(create_encoder("mneme_mlp", (1, 8, 8)), num_tokens=4)
    with pytest.raises(ConfigError, match=r"^model\.peft\.num_tokens: .* got 0$"):
        add_visual_prompts(small_vit(), num_tokens=0)
    vit = small_vit()
    add_visual_prompts(vit, num_tokens=1)
    hooks = sum(len(b._forward_pre_hooks) + len(b._forward_hooks) for b in vit.blocks)
    with pytest.raises(ConfigError, match=r"^model\.peft\.method: .*already has visual prompts"):
        add_visual_prompts(vit, num_tokens=1, deep=True)
    assert hooks == sum(len(b._forward_pre_hooks) + len(b._forward_hooks) for b in vit.blocks)
    with pytest.raises(ValueError, match="attn_mask"):
        vit(torch.randn(1, 3, SIZE, SIZE), attn_mask=torch.ones(1, 6, 6, dtype=torch.bool))


def test_prompt_dropout_follows_the_vits_mode_and_compiles_without_graph_breaks():
    torch.manual_seed(0)
    vit = small_vit().eval()
    add_visual_prompts(vit, num_tokens=2, deep=True, dropout=0.5)
    assert not vit.visual_prompts.training  # added to a model in eval mode: eval too
    x = torch.randn(2, 3, SIZE, SIZE)
    out = vit(x)
    torch.testing.assert_close(vit(x), out, atol=0, rtol=0)
    # the hooks trace into one graph (dynamo only: the eager backend keeps this fast)
    compiled = torch.compile(vit, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), out, atol=1e-6, rtol=0)
    vit.train()
    assert not torch.allclose(vit(x), vit(x))  # per-sample prompt dropout now draws
