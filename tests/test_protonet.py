"""Prototypical networks and the few-shot report: the loss against a hand computation, the
cosine variant, episodic training on synthetic episodes, mean and 95% CI against numpy."""

import json
import math

import numpy as np
import pytest
import torch

D = 4
SHAPE = (1, 2, 2)  # a 2x2 one-channel "image": D values


def meta_batch(t=2, n=3, k=2, q=2, d=D, spread=3.0, noise=0.3, seed=0):
    """Synthetic episodes in the episodic datamodule's format: ``T`` tasks of ``N`` classes,
    each class a Gaussian blob around its own centre (separable for a large ``spread``)."""
    g = torch.Generator().manual_seed(seed)
    centres = spread * torch.randn(t, n, d, generator=g)

    def draw(per_class):
        labels = torch.arange(n).repeat_interleave(per_class)
        x = centres[:, labels] + noise * torch.randn(t, n * per_class, d, generator=g)
        return x, labels.expand(t, -1).clone()

    support, support_label = draw(k)
    query, query_label = draw(q)
    return {
        "support": {"image": support.view(t, -1, *SHAPE)},
        "support_label": support_label,
        "query": {"image": query.view(t, -1, *SHAPE)},
        "query_label": query_label,
        "classes": torch.arange(n).expand(t, -1).clone(),
    }


def identity_net(metric="euclidean", temperature=0.1):
    from mneme.app.models.fewshot.protonet import PrototypicalNetwork

    net = PrototypicalNetwork(
        encoder="mneme_mlp",
        encoder_args={"hidden": [D]},
        metric=metric,
        temperature=temperature,
        input_key="image",
        input_shape=list(SHAPE),
    )
    net.encoder = torch.nn.Flatten()  # embeddings are the inputs: a hand computation
    return net


def hand_loss(batch, score):
    """Mean over tasks of the mean query cross-entropy, every step written out."""
    losses = []
    for t in range(len(batch["support_label"])):
        s, y = batch["support"]["image"][t].flatten(1), batch["support_label"][t]
        q, yq = batch["query"]["image"][t].flatten(1), batch["query_label"][t]
        n = int(y.max()) + 1
        prototypes = torch.stack([s[y == c].sum(0) / (y == c).sum() for c in range(n)])
        total = 0.0
        for i in range(len(q)):
            logits = torch.stack([score(q[i], prototypes[c]) for c in range(n)])
            total = total - (logits[yq[i]] - torch.logsumexp(logits, 0))
        losses.append(total / len(q))
    return sum(losses) / len(losses)


def hand_accuracy(batch, score):
    """The fraction of all queries whose best-scoring prototype is their class's."""
    right = total = 0
    for t in range(len(batch["support_label"])):
        s, y = batch["support"]["image"][t].flatten(1), batch["support_label"][t]
        q, yq = batch["query"]["image"][t].flatten(1), batch["query_label"][t]
        n = int(y.max()) + 1
        prototypes = [s[y == c].mean(0) for c in range(n)]
        for i in range(len(q)):
            scores = [float(score(q[i], prototypes[c])) for c in range(n)]
            right += int(scores.index(max(scores)) == int(yq[i]))
            total += 1
    return right / total


def test_protonet_loss_equals_a_hand_computation():
    batch = meta_batch()
    net = identity_net("euclidean")
    loss, accuracy = net.episode_loss(batch)

    def negative_squared_distance(x, p):
        return -sum((x[j] - p[j]) ** 2 for j in range(D))

    expected = hand_loss(batch, negative_squared_distance)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert accuracy.item() == pytest.approx(hand_accuracy(batch, negative_squared_distance))
    # overlapping classes, where some queries go to the wrong prototype
    noisy = meta_batch(seed=1, spread=1.0, noise=1.0)
    _, accuracy = net.episode_loss(noisy)
    expected = hand_accuracy(noisy, negative_squared_distance)
    assert 0 < expected < 1 and accuracy.item() == pytest.approx(expected)


def test_cosine_protonet_divides_cosines_by_the_temperature():
    batch = meta_batch(seed=1, spread=1.0, noise=1.0)
    net = identity_net("cosine", temperature=0.5)
    loss, _ = net.episode_loss(batch)

    def scaled_cosine(x, p):
        return (x @ p) / (x.norm() * p.norm()) / 0.5

    assert loss.item() == pytest.approx(hand_loss(batch, scaled_cosine).item(), abs=1e-6)


def test_bad_metric_and_temperature_are_refused_naming_the_field():
    from mneme.app.core.errors import ConfigError
    from mneme.app.models.fewshot.protonet import PrototypicalNetwork

    with pytest.raises(ConfigError, match="model.metric"):
        PrototypicalNetwork(metric="manhattan")
    with pytest.raises(ConfigError, match="model.temperature"):
        PrototypicalNetwork(temperature=0)


class Loader:
    """Fixed batches as one loader (a plain list would be read as several loaders)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class Episodes:
    """A minimal stand-in for the episodic datamodule: fixed synthetic meta-batches."""

    input_key = "image"
    n_way, k_shot = 3, 2
    eval_settings = [[3, 1], [3, 2]]

    def __init__(self, train_batches=20, test_batches=3):
        self.train = Loader([meta_batch(t=4, k=2, seed=i) for i in range(train_batches)])
        self.test = [Loader([meta_batch(t=4, k=k, seed=100 + i) for i in range(test_batches)])
                     for _, k in self.eval_settings]  # fmt: skip

    def field_shape(self, key):
        return SHAPE

    def train_dataloader(self):
        return self.train

    def val_dataloader(self):
        return self.test

    def test_dataloader(self):
        return self.test


def fit_trainer(tmp_path, callbacks=(), **args):
    from lightning.pytorch import Trainer

    return Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
        **args,
    )


def test_episodic_training_lowers_the_loss_and_fills_episode_accuracies(tmp_path):
    from lightning.pytorch import LightningDataModule
    from mneme.app.models.fewshot.protonet import PrototypicalNetwork

    class Data(Episodes, LightningDataModule):
        def __init__(self):
            LightningDataModule.__init__(self)
            Episodes.__init__(self)

    torch.manual_seed(0)
    data = Data()
    net = PrototypicalNetwork(
        encoder="mneme_mlp",
        encoder_args={"hidden": [16]},
        optimizer=lambda p: torch.optim.Adam(p, lr=0.01),
        input_key="image",
        input_shape=list(SHAPE),
    )
    trainer = fit_trainer(tmp_path, max_epochs=3, num_sanity_val_steps=0)
    before = torch.stack([net.episode_loss(b)[0] for b in data.train]).mean().item()
    trainer.fit(net, data)
    after = torch.stack([net.episode_loss(b)[0] for b in data.train]).mean().item()
    assert after < 0.5 * before
    trainer.test(net, data, verbose=False)
    episodes = [m.compute() for m in net.episode_accuracies]
    assert [len(e) for e in episodes] == [12, 12]  # 3 batches of 4 episodes per setting
    assert all(((e >= 0) & (e <= 1)).all() for e in episodes)
    assert episodes[1].mean() > 0.8  # separable blobs: near-perfect after training

    # without a shape, the network is built from the datamodule's field_shape(input_key)
    unbuilt = PrototypicalNetwork(encoder="mneme_mlp", encoder_args={"hidden": [16]})
    fit_trainer(tmp_path).test(unbuilt, data, verbose=False)
    assert unbuilt.input_key == "image" and unbuilt.hparams.input_shape == list(SHAPE)


def test_padded_episodes_are_left_out():
    from mneme.datamodules.fewshot.meta_batches import episode_metrics, record_accuracies

    metric = episode_metrics(1)[0]
    correct = torch.tensor([[True, True], [True, False], [False, False]])
    record_accuracies(metric, correct, {"padded": torch.tensor([False, False, True])})
    assert metric.compute().tolist() == [1.0, 0.5]


# -- the report -------------------------------------------------------------------------------
def test_mean_and_ci95_equal_numpys():
    from mneme.callbacks.reporting.fewshot_metrics import mean_ci95

    rng = np.random.default_rng(0)
    accuracies = rng.integers(0, 16, size=600) / 15  # 600 episodes of 15 queries
    mean, ci95 = mean_ci95(torch.tensor(accuracies))
    assert mean == pytest.approx(np.mean(accuracies), abs=1e-12)
    assert ci95 == pytest.approx(1.96 * np.std(accuracies) / np.sqrt(600), abs=1e-12)
    assert mean_ci95([0.5]) == (0.5, 0.0)
    assert all(math.isnan(v) for v in mean_ci95([]))


def test_fewshot_metrics_logs_writes_json_and_prints_method_rows(tmp_path, capsys):
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.loggers import TensorBoardLogger
    from mneme.callbacks import FewShotMetrics
    from mneme.datamodules.fewshot.meta_batches import episode_metrics

    known = {  # (method, setting): accuracies
        ("prototypes", 0): [0.2, 0.4, 0.6, 0.8],
        ("prototypes", 1): [1.0, 0.9, 0.8],
        ("finetune", 0): [0.5, 0.5],
        ("finetune", 1): [0.25, 0.75, 1.0, 0.0, 0.5],
    }

    class Reporter(LightningModule):
        episode_methods = ["prototypes", "finetune"]
        episode_settings = [(5, 1), (5, 5)]

        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.episode_accuracies = episode_metrics(4)

        def test_step(self, batch, batch_idx, dataloader_idx=0):
            for m, method in enumerate(self.episode_methods):
                values = torch.tensor(known[method, dataloader_idx])
                self.episode_accuracies[m * 2 + dataloader_idx].update(values)

    class Data:  # two test loaders of one batch each
        @staticmethod
        def test_dataloader():
            return [Loader([torch.zeros(1)]), Loader([torch.zeros(1)])]

    from lightning.pytorch import LightningDataModule

    class DataModule(Data, LightningDataModule):
        pass

    logger = TensorBoardLogger(tmp_path, name="fs", version=0)
    reporter = FewShotMetrics()
    trainer = Trainer(
        accelerator="cpu",
        logger=logger,
        callbacks=[reporter],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.test(Reporter(), DataModule(), verbose=False)
    report = json.loads((tmp_path / "fs" / "version_0" / "fewshot_metrics.json").read_text())
    assert report["settings"] == [[5, 1], [5, 5]]
    assert report["methods"] == ["prototypes", "finetune"]
    assert "1.96" in report["confidence"]
    for row in report["results"]:
        setting = [(5, 1), (5, 5)].index((row["n_way"], row["k_shot"]))
        # the episodes' accuracies as the metric holds them (float32), then numpy's figures
        values = np.array(known[row["method"], setting], dtype=np.float32).astype(np.float64)
        assert row["episodes"] == len(values)
        assert row["mean"] == pytest.approx(values.mean(), abs=1e-9)
        assert row["ci95"] == pytest.approx(1.96 * values.std() / np.sqrt(len(values)), abs=1e-9)
    logged = trainer.logged_metrics
    assert logged["fewshot/prototypes_5way_1shot_accuracy"].item() == pytest.approx(0.5)
    assert "fewshot/finetune_5way_5shot_ci95" in logged
    printed = capsys.readouterr().out
    assert "Few-shot test accuracy (%)" in printed
    assert "prototypes" in printed and "50.00 ±" in printed and "5-way 5-shot" in printed

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "fs" / "version_0")).Reload()
    assert "fewshot/prototypes_5way_1shot_accuracy" in events.Tags()["scalars"]


def test_fewshot_metrics_refuses_a_module_without_episode_accuracies():
    from mneme.app.core.errors import ConfigError
    from mneme.app.models.classifier import ContinualClassifier
    from mneme.callbacks import FewShotMetrics

    with pytest.raises(ConfigError, match="FewShotMetrics needs a ReportsEpisodeAccuracies"):
        FewShotMetrics().setup(None, ContinualClassifier(), "test")


def test_one_method_modules_log_plain_setting_names():
    from mneme.callbacks.reporting.fewshot_metrics import format_fewshot

    rows = [{"method": None, "n_way": 5, "k_shot": 1, "episodes": 600, "mean": 0.5, "ci95": 0.01}]
    text = format_fewshot(rows)
    assert "50.00 ± 1.00" in text and "600" in text
