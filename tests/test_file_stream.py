"""File streams (ImageFolder trees, CSV manifests): layout, splits, workers, Replay,
reproducibility and bad inputs, on a tiny JPEG folder written here with PIL."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from mneme.app import ContinualClassifier
from mneme.callbacks import Replay
from mneme.datamodules import ConfigError, ContinualDataModule
from mneme.datamodules.data.file_experiences import FileExperience, ImageCodec
from mneme.datamodules.streams.file_splits import class_order

from tests.conftest import quiet_trainer

CLASSES, PER_CLASS, SIDE = ("ant", "bee", "cat", "dog"), 6, 16
CROP = [{"name": "RandomCrop", "size": SIDE, "padding": 3}]


def write_folder(root: Path, classes=CLASSES, per_class: int = PER_CLASS) -> Path:
    """``root/<class>/<i>.jpg``: 16x16 RGB images, each class its own colour plus noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((SIDE, SIDE, 3), 40 + 60 * c, dtype=np.uint8)
            pixels += rng.integers(0, 30, size=pixels.shape, dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("images") / "train")


def datamodule(root: Path, num_workers: int = 0, **args) -> ContinualDataModule:
    benchmark_args = {"root": str(root), "n_experiences": 2, "image_size": SIDE, **args}
    return ContinualDataModule(
        benchmark="mneme.datamodules.ImageFolderStream",
        benchmark_args=benchmark_args,
        materialize=False,
        num_workers=num_workers,
        batch_size=4,
        eval_batch_size=8,
        seed=0,
    )


def test_image_folder_layout_and_class_incremental_split(folder, monkeypatch):
    decoded = []
    decode = ImageCodec.decode
    monkeypatch.setattr(
        ImageCodec, "decode", lambda self, path: decoded.append(path) or decode(self, path)
    )
    data = datamodule(folder, test_size=0.34, seed=3)
    train, test = data.train_experiences, data.test_experiences
    assert data.num_classes == 4 and [len(e.labels()) for e in train] == [8, 8]
    assert not decoded  # the stream, its splits and labels: no image read
    assert all(isinstance(e, FileExperience) for e in train + test)
    assert data.class_names == list(CLASSES) and data.num_classes == 4
    order = class_order(range(4), 3)
    assert [e.classes for e in train] == [sorted(order[:2]), sorted(order[2:])]
    assert [e.classes for e in test] == [e.classes for e in train]
    assert class_order(range(4), -1) == [0, 1, 2, 3]
    # 2 of each class's 6 images held out, disjoint from training
    assert sum(len(e) for e in test) == 8 and sum(len(e) for e in train) == 16
    train_files = {p for e in train for p in e.dataset.paths}
    assert not train_files & {p for e in test for p in e.dataset.paths}
    for e in train:  # each label is its folder's class; metadata reads no image
        assert all(
            Path(p).parent.name == CLASSES[y]
            for p, y in zip(e.dataset.paths, e.labels(), strict=True)
        )
    assert data.field_shape("image") == (3, SIDE, SIDE) and len(decoded) == 1
    batch = train[0].read(torch.tensor([0, 1]))
    assert batch["image"].dtype == torch.float32 and 0.0 <= batch["image"].min()
    assert batch["image"].max() <= 1.0 and batch["task"].tolist() == [0, 0]


def test_csv_manifest_by_split_column_and_by_experience_column(tmp_path, folder):
    manifest = tmp_path / "images.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split", "domain"])
        for c, name in enumerate(CLASSES):
            for i in range(PER_CLASS):
                split = "test" if i < 2 else "train"
                writer.writerow([f"{folder.name}/{name}/{i}.jpg", c, split, "ab"[i % 2]])
    args = {"train_csv": str(manifest), "root": str(folder.parent), "split_key": "split"}
    data = ContinualDataModule(
        benchmark="mneme.datamodules.CSVImageStream",
        benchmark_args={**args, "n_experiences": 4, "image_size": SIDE, "seed": -1},
        materialize=False,
    )
    assert [e.classes for e in data.train_experiences] == [[0], [1], [2], [3]]
    assert [len(e) for e in data.train_experiences] == [4] * 4
    assert all(Path(p).stem in "01" for e in data.test_experiences for p in e.dataset.paths)
    by_domain = ContinualDataModule(
        benchmark="mneme.datamodules.CSVImageStream",
        benchmark_args={**args, "n_experiences": 2, "experience_key": "domain"},
        materialize=False,
    )
    # domain-incremental: every class in each experience, files by their domain column
    assert [e.classes for e in by_domain.train_experiences] == [[0, 1, 2, 3]] * 2
    assert {int(Path(p).stem) % 2 for p in by_domain.train_experiences[1].dataset.paths} == {1}


def batches_of(data: ContinualDataModule, epoch: int) -> list[dict]:
    experience = data.train_experiences[0]
    return list(data._loader(experience, 4, shuffle=True, epoch=epoch))


def test_order_and_augmentation_are_reproducible_with_any_workers(folder):
    runs = [datamodule(folder, w, train_transform=CROP) for w in (0, 2, 0)]
    first, with_workers, again = (batches_of(d, epoch=1) for d in runs)
    for a, b, c in zip(first, with_workers, again, strict=True):
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["image"], b["image"])
        assert torch.equal(a["image"], c["image"])
    other_epoch = batches_of(runs[0], epoch=2)
    assert not all(
        torch.equal(a["image"], b["image"]) for a, b in zip(first, other_epoch, strict=True)
    )
    # the crop augments: the training view differs from the stored (evaluation) image
    plain = runs[0].train_experiences[0].read(torch.arange(len(runs[0].train_experiences[0])))
    assert not torch.equal(torch.cat([b["image"] for b in first]).sum(), plain["image"].sum())
    timm = datamodule(folder, train_transform={"timm": {"hflip": 0.5}})
    a, b = batches_of(timm, epoch=1), batches_of(timm, epoch=1)
    assert a[0]["image"].shape == (4, 3, SIDE, SIDE) and a[0]["image"].min() < 0  # normalized
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))
    with pytest.raises(ConfigError, match=r"data_on_device: .* set data_on_device: false"):
        ContinualDataModule(**{**runs[0].hparams, "data_on_device": True}).train_experiences  # noqa: B018


def test_workers_run_end_to_end_with_replay(folder, tmp_path):
    from lightning.pytorch import seed_everything

    seed_everything(0)
    data = datamodule(folder, num_workers=2, train_transform=CROP)
    data.epochs_per_experience = 2
    replay = Replay(buffer_size=6, policy="class_balanced")
    trainer = quiet_trainer(data, tmp_path, [replay])
    loaders = []
    original = data.train_dataloader

    def record():
        loaders.append(original())
        return loaders[-1]

    data.train_dataloader = record
    trainer.fit(ContinualClassifier(encoder="mneme_cnn"), data)
    train = [loaders[i] for i in (-4, -3, -2, -1)]  # the last call per epoch of each
    assert train[-1].num_workers == 2 and train[-1].persistent_workers
    assert train[-1].prefetch_factor == 2 and not train[-1].pin_memory  # CPU: not pinned
    assert train[-1] is train[-2]  # one loader (and worker pool) through an experience
    # Replay kept decoded, un-augmented images of the training files, of both experiences
    parts = [e.read(torch.arange(len(e))) for e in data.train_experiences]
    stored = {key: torch.cat([p[key] for p in parts]) for key in ("image", "label")}
    assert replay.buffer["image"].shape == (len(replay), 3, SIDE, SIDE) and len(replay) == 6
    assert set(replay.buffer["label"].tolist()) == {0, 1, 2, 3}
    for image, label in zip(replay.buffer["image"], replay.buffer["label"], strict=True):
        matches = (stored["image"] - image).abs().flatten(1).amax(1) == 0
        assert matches.any() and label in stored["label"][matches]


def test_bad_inputs_are_one_line_errors_naming_the_field_or_file(tmp_path, folder):
    with pytest.raises(ConfigError, match=r"^data\.benchmark_args\.root: no folder at"):
        datamodule(tmp_path / "absent").train_experiences  # noqa: B018
    empty = write_folder(tmp_path / "empty", classes=("a", "b"), per_class=2)
    (empty / "c").mkdir()
    with pytest.raises(ConfigError, match=r"root: .*no valid file for the classes c"):
        datamodule(empty).train_experiences  # noqa: B018
    with pytest.raises(ConfigError, match=r"train_transform\[0\]\.name: 'RandomCrp' .*RandomCrop"):
        datamodule(folder, train_transform=[{"name": "RandomCrp", "size": 8}]).scenario  # noqa: B018
    corrupt = write_folder(tmp_path / "corrupt", classes=("a", "b"), per_class=4)
    bad = corrupt / "b" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    data = datamodule(corrupt, num_workers=2, test_size=0.25, seed=-1)
    experience = next(e for e in data.train_experiences if str(bad) in e.dataset.paths)
    with pytest.raises(ConfigError) as error:
        list(data._loader(experience, 2, shuffle=True, epoch=0))  # decoded in a worker
    message = str(error.value)
    assert "\n" not in message and f"cannot read image '{bad}'" in message
    assert message.startswith("data.benchmark_args.root:")
    manifest = tmp_path / "no_label.csv"
    manifest.write_text("path,split\na/0.jpg,train\n")
    csv_stream = ContinualDataModule(
        benchmark="mneme.datamodules.CSVImageStream",
        benchmark_args={"train_csv": str(manifest)},
        materialize=False,
    )
    with pytest.raises(ConfigError, match=r"label_key: no column 'label' in .*no_label\.csv"):
        csv_stream.train_experiences  # noqa: B018


def test_a_resumed_run_trains_what_an_uninterrupted_one_did(folder, tmp_path):
    from lightning.pytorch import seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(name: str, ckpt_path: Path | None = None) -> ContinualClassifier:
        seed_everything(0)
        data = datamodule(folder, train_transform=CROP)
        data.epochs_per_experience = 2
        saves = ModelCheckpoint(
            tmp_path / name, "{epoch}", save_top_k=-1, save_on_train_epoch_end=True
        )
        callbacks = [Replay(buffer_size=6), saves]
        trainer = quiet_trainer(data, tmp_path, callbacks, enable_checkpointing=True)
        model = ContinualClassifier(encoder="mneme_cnn")
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return model

    whole = fit("whole")
    # from the end of experience 1's first epoch: its order and crops continue at epoch 3
    resumed = fit("resumed", tmp_path / "whole" / "epoch=2.ckpt")
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
