"""Paired streams: captioned digits, spoken digits, CSV manifests."""

import numpy as np
import open_clip
import pytest
import torch
from mneme.datamodules import ContinualDataModule
from mneme.datamodules.streams.captions import EVAL_TEMPLATES, NUMBER_WORDS, TRAIN_TEMPLATES

from tests.conftest import SHARED_DATA

SPOKEN = SHARED_DATA / "spoken_digits.npz"
needs_spoken = pytest.mark.skipif(
    not SPOKEN.is_file(), reason="../shared/data/spoken_digits.npz absent"
)


def decode(tokens: torch.Tensor) -> str:
    text = open_clip.tokenizer._tokenizer.decode([t for t in tokens.tolist() if t not in (0,)])
    return text.replace("<start_of_text>", "").replace("<end_of_text>", "").strip()


def test_captioned_digits_pair_each_image_with_a_caption_of_its_class():
    dm = ContinualDataModule(
        "mneme.datamodules.SplitCaptionedDigits",
        {"n_experiences": 5},
    )
    assert dm.num_experiences == 5 and dm.num_classes == 10
    train, test = dm.train_experiences[0].tensors, dm.test_experiences[0].tensors
    assert train["image"].shape[1:] == (1, 8, 8) and train["text"].shape[1:] == (16,)
    train_texts = {t.format(w) for t in TRAIN_TEMPLATES for w in NUMBER_WORDS}
    eval_texts = {t.format(w) for t in EVAL_TEMPLATES for w in NUMBER_WORDS}
    for i in range(0, len(train["label"]), 37):
        caption = decode(train["text"][i])
        assert caption in train_texts and NUMBER_WORDS[train["label"][i]] in caption.split()
    assert all(decode(t) in eval_texts for t in test["text"][:20])  # held-out templates
    assert dm.class_names == list(NUMBER_WORDS)
    assert dm.prompt_templates == list(EVAL_TEMPLATES)


@needs_spoken
@pytest.mark.parametrize("split", ["class", "accent"])
def test_spoken_digits_three_modalities(split):
    dm = ContinualDataModule(
        "mneme.datamodules.SpokenDigits",
        {"path": str(SPOKEN), "split": split},
    )
    exp = dm.train_experiences[0].tensors
    assert exp["audio"].dtype == torch.int16 and exp["audio"].shape[1:] == (8000,)
    assert exp["image"].shape[1:] == (1, 8, 8) and exp["text"].shape[1:] == (16,)
    if split == "class":
        assert dm.num_experiences == 5 and len(dm.train_experiences[0].classes) == 2
    else:
        assert dm.num_experiences == 6 and len(dm.scenario.accents) == 6
        assert all(e.classes == list(range(10)) for e in dm.train_experiences + dm.test_experiences)
    total = sum(len(e.tensors["label"]) for e in dm.train_experiences + dm.test_experiences)
    assert total == 2160
    # the paired image shows the same digit as the clip's label: check against sklearn's digits
    from sklearn.datasets import load_digits

    digits = load_digits()
    flat = torch.tensor(digits.images, dtype=torch.float32).div(16).flatten(1)
    for i in range(0, len(exp["label"]), 50):
        match = (flat == exp["image"][i].flatten()).all(1).nonzero().squeeze(1)
        assert int(digits.target[match[0]]) == int(exp["label"][i])


def write_csv(tmp_path, n=12, label=True):
    from PIL import Image

    rows = ["filepath\ttitle" + ("\tlabel" if label else "")]
    rng = np.random.RandomState(0)
    for i in range(n):
        Image.fromarray(rng.randint(0, 255, (20, 24, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
        rows.append(
            f"{i}.png\ta photo of thing {i}"
            + (f"\t{['cat', 'dog', 'owl'][i % 3]}" if label else "")
        )
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    return tmp_path / "train.tsv"


def test_csv_manifest_with_labels_is_class_incremental(tmp_path):
    path = write_csv(tmp_path)
    args = {"train_csv": str(path), "label_key": "label", "n_experiences": 3,
            "image_size": 16, "test_size": 0.25, "context_length": 16}  # fmt: skip
    dm = ContinualDataModule("mneme.datamodules.CSVCaptions", args)
    assert dm.num_experiences == 3 and dm.class_names == ["cat", "dog", "owl"]
    exp = dm.train_experiences[0].tensors
    assert (
        exp["image"].shape[1:] == (3, 16, 16) and 0 <= exp["image"].min() <= exp["image"].max() <= 1
    )
    assert sum(len(e.tensors["label"]) for e in dm.train_experiences) == 9


def test_csv_manifest_without_labels_uses_caption_index(tmp_path):
    path = write_csv(tmp_path, label=False)
    args = {"train_csv": str(path), "n_experiences": 2, "image_size": 8}
    dm = ContinualDataModule("mneme.datamodules.CSVCaptions", args)
    labels = torch.cat([e.tensors["label"] for e in dm.train_experiences + dm.test_experiences])
    assert sorted(labels.tolist()) == list(range(12))  # each caption its own class
    assert dm.num_experiences == 2


def test_csv_missing_column_is_a_clear_error(tmp_path):
    path = write_csv(tmp_path)
    from mneme.datamodules import CSVCaptions

    with pytest.raises(ValueError, match="caption_key: no column 'caption'"):
        CSVCaptions(str(path), caption_key="caption")


def captions_name_their_labels(experiences) -> None:
    """Every caption of every experience names the number word of its (stream) label."""
    for exp in experiences:
        tokens, labels = exp.tensors["text"], exp.tensors["label"]
        unique, inverse = torch.unique(tokens, dim=0, return_inverse=True)
        words = [set(decode(row).split()) for row in unique]
        for i, label in zip(inverse.tolist(), labels.tolist(), strict=True):
            assert NUMBER_WORDS[label] in words[i], (decode(unique[i]), label)


@pytest.mark.parametrize(
    "order", [{"seed": 0}, {"seed": 3}, {"fixed_class_order": [9, 2, 7, 0, 4, 1, 8, 3, 6, 5]}]
)
def test_captions_and_prompts_follow_the_label_whatever_the_class_order(order):
    # Issue 8: a class order other than 0..9 must not shift captions or class names against
    # the labels (the stream keeps the original digit as the label; class_names index it).
    dm = ContinualDataModule(
        "mneme.datamodules.SplitCaptionedDigits",
        {"n_experiences": 5, **order},
    )
    fixed = order.get("fixed_class_order")
    for k, exp in enumerate(dm.train_experiences + dm.test_experiences):
        # labels are the digits themselves, not positions in the class order
        assert set(exp.tensors["label"].tolist()) == set(exp.classes)
        if fixed:
            assert sorted(exp.classes) == sorted(fixed[2 * (k % 5) : 2 * (k % 5) + 2])
    captions_name_their_labels(dm.train_experiences + dm.test_experiences)
    from mneme.app.models.aligner import ContrastiveAligner

    module = ContrastiveAligner(input_shapes={"image": (1, 8, 8), "text": (16,)}, num_classes=10)
    module.set_prompts(dm.class_names, dm.prompt_templates)
    for c in range(10):
        assert all(NUMBER_WORDS[c] in decode(t).split() for t in module.prompt_tokens[c])


def test_captioned_digit_images_show_their_label_under_a_shuffled_order():
    from sklearn.datasets import load_digits

    digits = load_digits()
    flat = torch.tensor(digits.images, dtype=torch.float32).div(16).flatten(1)
    dm = ContinualDataModule(
        "mneme.datamodules.SplitCaptionedDigits",
        {"n_experiences": 5, "seed": 0},
    )
    for exp in dm.train_experiences + dm.test_experiences:
        t = exp.tensors
        for i in range(0, len(t["label"]), 23):
            match = (flat == t["image"][i].flatten()).all(1).nonzero().squeeze(1)
            assert int(digits.target[match[0]]) == int(t["label"][i])


@needs_spoken
def test_spoken_digit_captions_name_their_labels_under_a_shuffled_order():
    dm = ContinualDataModule(
        "mneme.datamodules.SpokenDigits",
        {"path": str(SPOKEN), "split": "class", "seed": 0},
    )
    assert [e.classes for e in dm.train_experiences] != [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    captions_name_their_labels(dm.train_experiences + dm.test_experiences)
