"""Few-shot episodes: the sampler, class splits, seeds, DDP sharding, modalities, bad input."""

import numpy as np
import pytest
import torch
from mneme.datamodules import ConfigError, EpisodicDataModule, check_class_splits, sample_episode
from mneme.datamodules.fewshot.episodes import EpisodeSampler, rank_episodes

from tests.conftest import SHARED_DATA

SPOKEN = SHARED_DATA / "spoken_digits.npz"
DIGITS = {"benchmark": "mneme.datamodules.SplitDigits"}
SPLITS = {"meta_train_classes": [0, 1, 2, 3, 4], "meta_test_classes": [5, 6, 7, 8, 9]}


def digits(**args) -> EpisodicDataModule:
    dm = EpisodicDataModule(**{**DIGITS, **SPLITS, **args})
    dm.setup("fit")
    return dm


SMALL = {
    "meta_train_classes": [0, 1, 2, 3],
    "meta_val_classes": [4],
    "n_way": 3,
    "k_shot": 2,
    "q_queries": 3,
    "eval_settings": [[1, 1], [5, 5]],
    "train_episodes": 10,
    "eval_episodes": 6,
    "tasks_per_batch": 4,
}


@pytest.fixture(scope="module")
def dm() -> EpisodicDataModule:
    return digits(**SMALL)


def one_line(err: pytest.ExceptionInfo, *words: str) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message
    return message


def equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(equal(a[k], b[k]) if isinstance(a[k], dict) else torch.equal(a[k], b[k]) for k in a)


# -- the sampler, without a stream ---------------------------------------------------------
def test_sample_episode_is_class_major_disjoint_and_from_the_split():
    labels = torch.arange(10).repeat_interleave(7)[torch.randperm(70)]
    split = [1, 3, 4, 6, 8]
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        support, query, classes = sample_episode(labels, split, 3, 2, 4, g)
        assert support.shape == (6,) and query.shape == (12,) and classes.shape == (3,)
        assert set(classes.tolist()) <= set(split) and len(set(classes.tolist())) == 3
        assert not set(support.tolist()) & set(query.tolist())
        assert len(set(support.tolist() + query.tolist())) == 18  # no sample twice
        assert torch.equal(labels[support], classes.repeat_interleave(2))  # N blocks of K
        assert torch.equal(labels[query], classes.repeat_interleave(4))
    again = sample_episode(labels, split, 3, 2, 4, torch.Generator().manual_seed(19))
    assert all(torch.equal(a, b) for a, b in zip(again, (support, query, classes), strict=True))


def test_sampler_precomputes_members_once_and_names_a_short_class():
    sampler = EpisodeSampler(torch.tensor([0, 0, 0, 1, 1, 2]), [0, 1])
    assert sampler.counts() == {0: 3, 1: 2}
    with pytest.raises(ConfigError) as err:
        for seed in range(10):
            sampler.sample(2, 1, 2, torch.Generator().manual_seed(seed))
    one_line(err, "class 1 has 2 samples", "k_shot")


def test_class_splits_that_share_a_class_are_refused():
    with pytest.raises(ConfigError) as err:
        check_class_splits({"data.meta_train_classes": [0, 1, 2], "data.meta_test_classes": [2, 3]})
    one_line(err, "data.meta_train_classes and data.meta_test_classes", "[2]")
    with pytest.raises(ConfigError) as err:
        check_class_splits({"data.meta_test_classes": [3, 3]})
    one_line(err, "data.meta_test_classes", "[3]")
    with pytest.raises(ConfigError) as err:
        check_class_splits({"data.meta_test_classes": [3, 12]}, stream_classes=range(10))
    one_line(err, "data.meta_test_classes", "[12]", "0..9")
    check_class_splits({"a": [0, 1], "b": None, "c": [2]}, stream_classes=range(3))


@pytest.mark.parametrize("pad", ["fresh", "repeat"])
@pytest.mark.parametrize("episodes", [12, 13])
def test_two_ranks_serve_the_one_rank_episodes(pad, episodes):
    one, _ = rank_episodes(episodes, 0, 1, pad)
    ranks = [rank_episodes(episodes, r, 2, pad) for r in (0, 1)]
    assert len(ranks[0][0]) == len(ranks[1][0])  # the same number of batches
    real = sorted(i for ids, flags in ranks for i, p in zip(ids, flags, strict=True) if not p)
    assert real == one == list(range(episodes))
    padded = [i for ids, flags in ranks for i, p in zip(ids, flags, strict=True) if p]
    assert padded == ([] if episodes == 12 else [13 if pad == "fresh" else 0])


# -- the datamodule ------------------------------------------------------------------------
def test_meta_batches_have_the_documented_format(dm):
    assert dm.fields == ["image"] and dm.input_key == "image"
    assert dm.field_shape("image") == (1, 8, 8) and dm.num_classes == 10
    assert dm.eval_settings == [(1, 1), (5, 5)] and dm.meta_val_classes == [4]
    batch = next(iter(dm.train_dataloader()))
    assert batch["support"]["image"].shape == (4, 6, 1, 8, 8)
    assert batch["query"]["image"].shape == (4, 9, 1, 8, 8)
    assert torch.equal(batch["support_label"], torch.tensor([0, 0, 1, 1, 2, 2]).expand(4, 6))
    assert torch.equal(batch["query_label"][0], torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2]))
    assert batch["classes"].shape == (4, 3) and batch["support_label"].dtype == torch.long
    assert set(batch["classes"].flatten().tolist()) <= {0, 1, 2, 3}
    assert batch["episode"].tolist() == [0, 1, 2, 3] and not batch["padded"].any()
    # the served samples are those of the episode, of the class its local label names
    train = dm.meta_batches("train")
    support, query, classes = train.episode(1)
    assert torch.equal(classes, batch["classes"][1])
    assert torch.equal(dm.pool.read(support)["image"], batch["support"]["image"][1])
    assert torch.equal(dm.pool.read(query)["image"], batch["query"]["image"][1])
    assert torch.equal(dm.pool.labels[query], classes[batch["query_label"][1]])
    assert not set(support.tolist()) & set(query.tolist())
    loaders = dm.test_dataloader()
    assert len(loaders) == 2 and [len(x) for x in loaders] == [2, 2]
    test = next(iter(loaders[1]))
    assert test["support"]["image"].shape == (4, 25, 1, 8, 8)
    assert set(test["classes"].flatten().tolist()) == set(range(5, 10))
    (val,) = dm.val_dataloader()
    assert {c for b in val for c in b["classes"].flatten().tolist()} == {4}


def test_evaluation_episodes_are_fixed_by_eval_seed(dm):
    args = {"eval_settings": [[5, 1], [5, 5]], "eval_episodes": 4, "q_queries": 3}
    first, second = digits(**args), digits(**args, seed=7)  # the training seed plays no part
    for a, b in zip(first.test_dataloader(), second.test_dataloader(), strict=True):
        assert all(equal(x, y) for x, y in zip(a, b, strict=True))
    other = digits(**args, eval_seed=1).test_dataloader()[0]
    assert not equal(next(iter(other)), next(iter(first.test_dataloader()[0])))
    # nor on the order the split's classes are listed in
    listed = digits(**args, meta_test_classes=[9, 7, 5, 6, 8]).test_dataloader()[0]
    assert equal(next(iter(listed)), next(iter(first.test_dataloader()[0])))
    # a setting's episodes do not depend on which others are evaluated beside it
    alone = digits(**{**args, "eval_settings": [[5, 5]]}).test_dataloader()[0]
    assert equal(next(iter(alone)), next(iter(first.test_dataloader()[1])))


def test_training_episodes_are_fresh_each_epoch_and_repeat_for_a_seed(dm):
    def epoch(module, e):
        return [b["classes"] for b in module.train_dataloader(epoch=e)]

    assert all(torch.equal(a, b) for a, b in zip(epoch(dm, 0), epoch(dm, 0), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(epoch(dm, 0), epoch(dm, 1), strict=True))
    train = dm.meta_batches("train")
    assert not torch.equal(train[(0, 0)]["support"]["image"], train[(1, 0)]["support"]["image"])
    seeded = digits(**SMALL, seed=5)
    assert not all(torch.equal(a, b) for a, b in zip(epoch(dm, 0), epoch(seeded, 0), strict=True))


def test_ddp_ranks_shard_episodes_not_samples(dm):
    for split, setting in (("test", 1), ("train", 0)):
        whole = dm.meta_batches(split, setting, rank=0, world_size=1)
        served = {}
        for rank in (0, 1):
            part = dm.meta_batches(split, setting, rank=rank, world_size=2)
            assert len(part) == len(dm.meta_batches(split, setting, rank=1 - rank, world_size=2))
            for b in range(len(part)):
                batch = part[(0, b)]
                for t, i in enumerate(batch["episode"].tolist()):
                    if not batch["padded"][t]:
                        served[i] = batch["query"]["image"][t]
        assert sorted(served) == whole.episodes
        for b in range(len(whole)):
            batch = whole[(0, b)]
            for t, i in enumerate(batch["episode"].tolist()):
                assert torch.equal(served[i], batch["query"]["image"][t])


def test_lazy_reading_serves_the_materialized_episodes(dm):
    lazy = digits(**SMALL, materialize=False)
    assert equal(next(iter(lazy.train_dataloader())), next(iter(dm.train_dataloader())))
    assert equal(next(iter(lazy.test_dataloader()[1])), next(iter(dm.test_dataloader()[1])))


def test_a_trainer_fits_and_tests_on_episodes(tmp_path):
    from lightning.pytorch import LightningModule, Trainer

    class Prototypes(LightningModule):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Linear(64, 16)
            self.seen: dict[int, list] = {}

        def logits(self, batch):
            support = self.embed(batch["support"]["image"].flatten(2))
            query = self.embed(batch["query"]["image"].flatten(2))
            n = batch["classes"].shape[1]
            onehot = torch.nn.functional.one_hot(batch["support_label"], n).float()
            protos = onehot.transpose(1, 2) @ support / onehot.sum(1).unsqueeze(-1)
            return -torch.cdist(query, protos)

        def training_step(self, batch, _):
            self.seen.setdefault(self.current_epoch, []).append(batch["classes"])
            logits = self.logits(batch)
            return torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), batch["query_label"].flatten()
            )

        def validation_step(self, batch, _):
            raise AssertionError("no meta_val_classes: no validation episodes")

        def test_step(self, batch, _, dataloader_idx=0):
            hit = self.logits(batch).argmax(-1) == batch["query_label"]
            self.log("acc", hit.float().mean(), add_dataloader_idx=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = EpisodicDataModule(
        **DIGITS,
        **SPLITS,
        k_shot=1,
        q_queries=2,
        train_episodes=8,
        eval_episodes=4,
        eval_settings=[[5, 1], [2, 1]],
    )
    model = Prototypes()
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        **dm.trainer_settings(),
    )
    trainer.fit(model, datamodule=dm)
    assert len(model.seen[0]) == len(model.seen[1]) == 2
    assert not torch.equal(torch.cat(model.seen[0]), torch.cat(model.seen[1]))  # fresh per epoch
    results = trainer.test(model, datamodule=dm, verbose=False)
    assert len(results) == 2 and all(0 <= r[next(iter(r))] <= 1 for r in results)


# -- every modality ------------------------------------------------------------------------
def test_captioned_digits_serve_image_and_caption_tokens():
    dm = EpisodicDataModule(
        "mneme.datamodules.SplitCaptionedDigits", **SPLITS, k_shot=2, q_queries=1, eval_episodes=2
    )
    assert dm.fields == ["image", "text"] and dm.input_key == "image"
    assert dm.class_names[5] == "five"
    batch = next(iter(dm.test_dataloader()[0]))
    assert batch["support"]["image"].shape == (2, 10, 1, 8, 8)
    assert batch["support"]["text"].shape == (2, 10, 16) and batch["query"]["text"].shape == (
        2,
        5,
        16,
    )
    assert batch["support"]["text"].dtype == torch.long
    support, query, classes = dm.meta_batches("test").episode(0)
    assert torch.equal(dm.pool.read(support)["text"], batch["support"]["text"][0])
    assert torch.equal(dm.pool.labels[support], classes[batch["support_label"][0]])


@pytest.mark.skipif(not SPOKEN.is_file(), reason="../shared/data/spoken_digits.npz absent")
def test_spoken_digits_serve_audio_image_and_text():
    dm = EpisodicDataModule(
        "mneme.datamodules.SpokenDigits",
        {"path": str(SPOKEN)},
        **SPLITS,
        q_queries=2,
        train_episodes=4,
    )
    assert dm.fields == ["audio", "image", "text"] and dm.input_key == "image"
    batch = next(iter(dm.train_dataloader()))
    assert batch["support"]["audio"].shape == (4, 5, 8000)
    assert batch["support"]["audio"].dtype == torch.int16
    assert batch["query"]["image"].shape == (4, 10, 1, 8, 8)
    assert batch["query"]["text"].shape == (4, 10, 16)
    assert set(batch["classes"].flatten().tolist()) <= set(SPLITS["meta_train_classes"])


def test_a_csv_manifest_serves_episodes_from_its_train_and_test_rows(tmp_path):
    from PIL import Image

    rng = np.random.RandomState(0)
    manifests = {"train": ["filepath\ttitle\tlabel"], "test": ["filepath\ttitle\tlabel"]}
    for i in range(16):
        image = rng.randint(0, 255, (12, 12, 3), dtype=np.uint8)
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        part = "test" if i >= 12 else "train"  # 3 train rows and 1 test row per class
        manifests[part].append(f"{i}.png\ta photo of thing {i}\t{'abcd'[i % 4]}")
    for part, rows in manifests.items():
        (tmp_path / f"{part}.tsv").write_text("\n".join(rows) + "\n")
    args = {
        "train_csv": str(tmp_path / "train.tsv"),
        "test_csv": str(tmp_path / "test.tsv"),
        "label_key": "label",
        "n_experiences": 2,
        "image_size": 8,
        "context_length": 8,
    }
    dm = EpisodicDataModule(
        "mneme.datamodules.CSVCaptions",
        args,
        meta_train_classes=[0, 1],
        meta_test_classes=[2, 3],
        n_way=2,
        k_shot=1,
        q_queries=3,
        eval_episodes=2,
        num_workers=1,
    )
    dm.setup("test")  # k_shot + q_queries = 4: a class's train and test rows together
    assert dm.fields == ["image", "text"] and dm.class_names == ["a", "b", "c", "d"]
    batch = next(iter(dm.test_dataloader()[0]))  # drawn in a worker process
    assert batch["support"]["image"].shape == (2, 2, 3, 8, 8)
    assert batch["query"]["text"].shape == (2, 6, 8)
    assert set(batch["classes"].flatten().tolist()) == {2, 3}


# -- bad input: one line each, naming the field and the fix ----------------------------------
@pytest.mark.parametrize(
    ("args", "words"),
    [
        (
            {"meta_test_classes": [4, 5, 6]},
            ["data.meta_train_classes and data.meta_test_classes", "[4]"],
        ),
        ({"meta_val_classes": [9]}, ["data.meta_val_classes and data.meta_test_classes", "[9]"]),
        ({"k_shot": 0}, ["data.k_shot", "at least 1"]),
        ({"q_queries": -1}, ["data.q_queries"]),
        ({"n_way": 0}, ["data.n_way"]),
        ({"meta_train_classes": None}, ["data.meta_train_classes", "required"]),
        ({"eval_settings": [[5]]}, ["data.eval_settings[0]", "[n_way, k_shot]"]),
        ({"eval_settings": [[5, 0]]}, ["data.eval_settings[0]", "at least 1"]),
    ],
)
def test_bad_settings_are_refused_when_built(args, words):
    with pytest.raises(ConfigError) as err:
        EpisodicDataModule(**{**DIGITS, **SPLITS, **args})
    one_line(err, *words)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (
            {"k_shot": 150, "q_queries": 100},
            ["data.k_shot", "class 0 ", "fewer than k_shot + q_queries", "drop class 0"],
        ),
        (
            {"eval_settings": [[5, 1], [5, 170]]},
            ["data.eval_settings[1]", "of data.meta_test_classes", "lower k_shot"],
        ),
        (
            {"meta_test_classes": [7, 8, 9]},
            ["data.n_way", "5-way", "data.meta_test_classes has 3", "lower n_way"],
        ),
        (
            {"eval_settings": [[4, 1]], "meta_test_classes": [7, 8, 9]},
            ["data.eval_settings[0]", "4-way"],
        ),
        (
            {"meta_test_classes": [5, 6, 7, 8, 9, 10]},
            ["data.meta_test_classes", "[10]", "not in the stream"],
        ),
        (
            {"meta_val_classes": [5], "meta_test_classes": [6, 7, 8, 9], "n_way": 4},
            ["data.meta_val_classes", "1"],
        ),
    ],
)
def test_splits_the_stream_cannot_fill_are_refused_at_setup(args, words):
    dm = EpisodicDataModule(**{**DIGITS, **SPLITS, **args})
    with pytest.raises(ConfigError) as err:
        dm.setup("fit")
    one_line(err, *words)
