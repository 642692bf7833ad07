"""Few-shot evaluation of trained checkpoints: a ContinualClassifier trained on digits 0-4
evaluated on 5-way episodes of digits 5-9 (prototypes and fine-tuning), a ContrastiveAligner's
zero-shot path, and checkpoints of other classes refused in one line."""

import json

import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer

from tests.conftest import digits_stream

META_TEST = [5, 6, 7, 8, 9]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


class Loader:
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def episodes(images, labels, classes, n_way, k_shot, q, tasks, seed):
    """A meta-batch of the episodic datamodule's format drawn from real samples."""
    g = torch.Generator().manual_seed(seed)
    support, query, chosen = [], [], []
    for _ in range(tasks):
        picked = torch.tensor(classes)[torch.randperm(len(classes), generator=g)[:n_way]]
        s, qy = [], []
        for c in picked.tolist():
            members = (labels == c).nonzero().squeeze(1)
            order = members[torch.randperm(len(members), generator=g)[: k_shot + q]]
            s.append(order[:k_shot])
            qy.append(order[k_shot:])
        support.append(torch.cat(s))
        query.append(torch.cat(qy))
        chosen.append(picked)
    support, query = torch.stack(support), torch.stack(query)
    return {
        "support": {"image": images[support]},
        "support_label": torch.arange(n_way).repeat_interleave(k_shot).expand(tasks, -1).clone(),
        "query": {"image": images[query]},
        "query_label": torch.arange(n_way).repeat_interleave(q).expand(tasks, -1).clone(),
        "classes": torch.stack(chosen),
    }


class DigitEpisodes(LightningDataModule):
    """A stand-in for EpisodicDataModule: test episodes of digits 5-9, one loader per
    setting."""

    input_key = "image"
    n_way, k_shot = 5, 1
    class_names = NUMBER_WORDS
    meta_test_classes = META_TEST

    def __init__(self, images, labels, settings=((5, 1), (5, 5)), batches=2, tasks=4):
        super().__init__()
        self.eval_settings = [list(s) for s in settings]
        self.loaders = [
            Loader([episodes(images, labels, META_TEST, n, k, 5, tasks, seed=10 * k + i)
                    for i in range(batches)])
            for n, k in settings
        ]  # fmt: skip
        self.shape = tuple(images.shape[1:])

    def field_shape(self, key):
        return self.shape

    def test_dataloader(self):
        return self.loaders


def quiet(tmp_path, **args):
    return Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        **args,
    )


@pytest.fixture(scope="module")
def digits():
    """A tiny ContinualClassifier trained on digits 0-4 (the first of two experiences), its
    checkpoint, and the test samples of digits 5-9 it never saw."""
    from mneme.app.models.classifier import ContinualClassifier
    from mneme.datamodules import ContinualDataModule

    folder = __import__("tempfile").mkdtemp()
    torch.manual_seed(0)
    data = ContinualDataModule(
        **digits_stream(2, fixed_class_order=list(range(10))), epochs_per_experience=3
    )
    model = ContinualClassifier(encoder="mneme_mlp", encoder_args={"hidden": [64]})
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=folder,
        **data.trainer_settings(max_epochs=3),  # experience 0 only: digits 0-4
    )
    trainer.fit(model, data)
    path = f"{folder}/classifier.ckpt"
    trainer.save_checkpoint(path)
    test = data.test_experiences[1].tensors
    assert sorted(test["label"].unique().tolist()) == META_TEST
    return path, test["image"], test["label"]


def test_classifier_checkpoint_gives_per_episode_accuracies_for_both_methods(digits, tmp_path):
    from mneme.app import FewShotEvaluator
    from mneme.callbacks import FewShotMetrics

    path, images, labels = digits
    evaluator = FewShotEvaluator(checkpoint=path, finetune_steps=30, finetune_lr=0.05)
    assert evaluator.episode_methods == ["prototypes", "finetune"]
    data = DigitEpisodes(images, labels)
    reporter = FewShotMetrics()
    trainer = quiet(tmp_path, callbacks=[reporter])  # inference_mode on: finetune copes
    trainer.test(evaluator, data, verbose=False)
    accuracies = {
        (method, tuple(setting)): metric.compute()
        for i, metric in enumerate(evaluator.episode_accuracies)
        for method, setting in [(evaluator.episode_methods[i // 2], data.eval_settings[i % 2])]
    }
    assert {len(a) for a in accuracies.values()} == {8}  # 2 batches of 4 episodes each
    for accuracy in accuracies.values():
        assert ((accuracy >= 0) & (accuracy <= 1)).all()
    # features of digits 0-4 separate unseen digits far above chance (0.2) with 5 shots
    assert accuracies["prototypes", (5, 5)].mean() > 0.5
    assert accuracies["finetune", (5, 5)].mean() > 0.5
    report = json.loads((tmp_path / "fewshot_metrics.json").read_text())
    assert report["methods"] == ["prototypes", "finetune"]
    assert len(report["results"]) == 4 and report["ckpt_path"] == path
    # the loaded model itself never trains
    assert not any(p.requires_grad for p in evaluator.model.parameters())


def test_finetuning_the_encoder_too_leaves_the_loaded_model_unchanged(digits, tmp_path):
    from mneme.app import FewShotEvaluator

    path, images, labels = digits
    evaluator = FewShotEvaluator(
        checkpoint=path, methods=["finetune"], finetune_steps=3, finetune_encoder=True
    )
    before = {k: v.clone() for k, v in evaluator.model.state_dict().items()}
    data = DigitEpisodes(images, labels, settings=[(5, 1)], batches=1, tasks=2)
    quiet(tmp_path).test(evaluator, data, verbose=False)
    assert len(evaluator.episode_accuracies[0].compute()) == 2
    after = evaluator.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_head_finetuning_of_batched_episodes_equals_one_episode_at_a_time(digits):
    from mneme.app import FewShotEvaluator

    path, images, labels = digits
    evaluator = FewShotEvaluator(checkpoint=path, methods=["finetune"], finetune_steps=5)
    batch = episodes(images, labels, META_TEST, 5, 2, 3, tasks=3, seed=0)
    with torch.no_grad():
        from mneme.datamodules.fewshot.meta_batches import encode_episodes

        support, query = encode_episodes(evaluator.features, batch, "image")
    together = evaluator.finetune(batch, support, query)
    for t in range(3):
        one = {**batch, "support_label": batch["support_label"][t : t + 1]}
        alone = evaluator.finetune(one, support[t : t + 1], query[t : t + 1])
        torch.testing.assert_close(together[t], alone[0], atol=1e-5, rtol=1e-5)


def tiny_aligner_checkpoint(path):
    """An (untrained) tiny ContrastiveAligner saved as Lightning saves a module."""
    import lightning
    from mneme.app.models.aligner import ContrastiveAligner

    torch.manual_seed(0)
    aligner = ContrastiveAligner(
        encoders={"image": {"model": "mneme_mlp", "args": {"hidden": [16]}}, "text": {}},
        embed_dim=8,
        input_shapes={"image": (1, 8, 8), "text": (16,)},
        num_classes=5,
    )
    torch.save(
        {
            "state_dict": aligner.state_dict(),
            "hyper_parameters": dict(aligner.hparams),
            "pytorch-lightning_version": lightning.__version__,
        },
        path,
    )
    return aligner


def test_aligner_zero_shot_beside_prototypes_and_finetune_on_the_same_episodes(
    digits, tmp_path, capsys
):
    from mneme.app import FewShotEvaluator
    from mneme.app.nn.retrieval import class_embeddings
    from mneme.callbacks import FewShotMetrics

    _, images, labels = digits
    path = tmp_path / "aligner.ckpt"
    aligner = tiny_aligner_checkpoint(path)
    evaluator = FewShotEvaluator(checkpoint=str(path), finetune_steps=5)
    assert evaluator.episode_methods == ["zero_shot", "prototypes", "finetune"]
    data = DigitEpisodes(images, labels, batches=1, tasks=3)
    quiet(tmp_path, callbacks=[FewShotMetrics()]).test(evaluator, data, verbose=False)
    assert len(evaluator.episode_accuracies) == 6
    assert all(len(m.compute()) == 3 for m in evaluator.episode_accuracies)
    printed = capsys.readouterr().out
    assert "zero_shot" in printed and "prototypes" in printed and "finetune" in printed

    # zero-shot by hand: prompts of the episode's classes through the text tower
    batch = data.loaders[0].batches[0]
    tokens = aligner.encoders["text"].backbone.tokenize(NUMBER_WORDS).view(10, 1, -1)
    with torch.no_grad():
        weights = class_embeddings(aligner.encoders["text"], tokens)
        query = aligner.encoders["image"](batch["query"]["image"].flatten(0, 1)).view(3, 25, -1)
    logits = query @ weights[batch["classes"]].transpose(1, 2)
    expected = (logits.argmax(-1) == batch["query_label"]).float().mean(1)
    torch.testing.assert_close(evaluator.episode_accuracies[0].compute(), expected)


def test_zero_shot_needs_class_names_and_an_aligner(digits, tmp_path):
    from mneme.app import FewShotEvaluator
    from mneme.app.core.errors import ConfigError

    path, images, labels = digits
    with pytest.raises(ConfigError, match="model.methods: a ContinualClassifier is evaluated"):
        FewShotEvaluator(checkpoint=path, methods=["zero_shot"])
    aligner_path = tmp_path / "aligner.ckpt"
    tiny_aligner_checkpoint(aligner_path)
    data = DigitEpisodes(images, labels, settings=[(5, 1)], batches=1, tasks=1)
    data.class_names = None
    evaluator = FewShotEvaluator(checkpoint=str(aligner_path), methods=["zero_shot"])
    with pytest.raises(ConfigError, match="model.class_names"):
        quiet(tmp_path).test(evaluator, data, verbose=False)


def test_a_checkpoint_of_another_class_is_refused_in_one_line(digits, tmp_path):
    from mneme.app import FewShotEvaluator
    from mneme.app.core.errors import ConfigError
    from mneme.app.models.fewshot.protonet import PrototypicalNetwork

    path, *_ = digits
    # recorded by the CLI: the class path, read as text (nothing imported)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["_class_path"] = (
        "mneme.app.models.fewshot.protonet.PrototypicalNetwork"
    )
    foreign = tmp_path / "foreign.ckpt"
    torch.save(checkpoint, foreign)
    with pytest.raises(ConfigError) as error:
        FewShotEvaluator(checkpoint=str(foreign))
    message = str(error.value)
    assert (
        "\n" not in message
        and "holds a mneme.app.models.fewshot.protonet.PrototypicalNetwork" in message
    )
    # saved by a plain Trainer (no class path): hyperparameters that fit neither class
    net = PrototypicalNetwork(
        encoder_args={"hidden": [8]}, input_key="image", input_shape=[1, 8, 8]
    )
    torch.save({"state_dict": net.state_dict(), "hyper_parameters": dict(net.hparams)}, foreign)
    with pytest.raises(ConfigError, match="fit neither") as error:
        FewShotEvaluator(checkpoint=str(foreign))
    assert "\n" not in str(error.value)
    # not a checkpoint at all
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="model.checkpoint: cannot read"):
        FewShotEvaluator(checkpoint=str(tmp_path / "junk.ckpt"))
    with pytest.raises(ConfigError, match="model.checkpoint: no checkpoint file"):
        FewShotEvaluator(checkpoint=str(tmp_path / "missing.ckpt"))


def test_episodes_of_another_shape_are_refused_naming_the_checkpoint(digits, tmp_path):
    from mneme.app import FewShotEvaluator
    from mneme.app.core.errors import ConfigError

    path, images, labels = digits
    data = DigitEpisodes(images, labels, settings=[(5, 1)], batches=1, tasks=1)
    data.shape = (3, 8, 8)
    with pytest.raises(ConfigError, match="model.checkpoint: the model takes image samples"):
        quiet(tmp_path).test(FewShotEvaluator(checkpoint=path), data, verbose=False)


# -- with the episodic datamodule ---------------------------------------------------------------
def episodic_digits(**args):
    from mneme.datamodules import EpisodicDataModule

    settings = {
        "meta_train_classes": [0, 1, 2, 3, 4],
        "meta_test_classes": META_TEST,
        "n_way": 5,
        "k_shot": 1,
        "q_queries": 5,
        "eval_settings": [[5, 1], [5, 5]],
        "eval_episodes": 10,
        "tasks_per_batch": 4,
    }
    stream = {"n_experiences": 2, "fixed_class_order": list(range(10))}
    return EpisodicDataModule("mneme.datamodules.SplitDigits", stream, **{**settings, **args})


def test_evaluator_on_episodic_datamodule_episodes(digits, tmp_path):
    from mneme.app import FewShotEvaluator
    from mneme.callbacks import FewShotMetrics

    path, *_ = digits
    reporter = FewShotMetrics(print_table=False)
    evaluator = FewShotEvaluator(checkpoint=path, finetune_steps=10)
    quiet(tmp_path, callbacks=[reporter]).test(evaluator, episodic_digits(), verbose=False)
    rows = reporter.last["results"]
    assert [(r["method"], r["n_way"], r["k_shot"]) for r in rows] == [
        ("prototypes", 5, 1), ("prototypes", 5, 5), ("finetune", 5, 1), ("finetune", 5, 5),
    ]  # fmt: skip
    assert all(r["episodes"] == 10 for r in rows)  # 3 meta-batches, the padded 2 left out


def test_protonet_trains_and_tests_on_episodic_datamodule(tmp_path):
    from mneme.app import PrototypicalNetwork
    from mneme.callbacks import FewShotMetrics

    torch.manual_seed(0)
    # validation: the first eval setting on the meta-val classes
    data = episodic_digits(meta_train_classes=[0, 1, 2], meta_val_classes=[3, 4],
                           n_way=2, eval_settings=[[2, 1], [5, 5]], train_episodes=8)  # fmt: skip
    net = PrototypicalNetwork(encoder="mneme_mlp", encoder_args={"hidden": [32]})
    reporter = FewShotMetrics(print_table=False)
    trainer = quiet(tmp_path, callbacks=[reporter], max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(net, data)
    validation = json.loads((tmp_path / "fewshot_val_metrics.json").read_text())
    assert [(r["n_way"], r["k_shot"]) for r in validation["results"]] == [(2, 1)]
    assert "val_fewshot/2way_1shot_accuracy" in trainer.logged_metrics
    trainer.test(net, data, verbose=False)
    rows = reporter.last["results"]
    assert [(r["n_way"], r["k_shot"], r["episodes"]) for r in rows] == [(2, 1, 10), (5, 5, 10)]
    assert all(0 <= r["mean"] <= 1 for r in rows)


def test_the_evaluator_loads_its_model_inside_lightning_cli_instantiation(digits):
    # LightningCLI builds the model inside a context variable holding the model's own
    # hyperparameters; the nested load must not take them for the classifier's.
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context
    from mneme.app import ContinualClassifier, FewShotEvaluator

    path, _, _ = digits
    with _given_hyperparameters_context({"checkpoint": path}, "mneme.app.FewShotEvaluator"):
        evaluator = FewShotEvaluator(checkpoint=path)
    assert isinstance(evaluator.model, ContinualClassifier)
    assert evaluator.model.hparams.encoder == "mneme_mlp"
