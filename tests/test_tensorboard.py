"""What a `mneme fit` leaves on TensorBoard's dashboard, read back with TensorBoard's own
readers: the event accumulator, the hparams plugin's data and the HParams tab's backend."""

import json
import re
from pathlib import Path

import pytest

from tests.test_cli import QUICKSTART, mneme

REPLAY = "Replay(buffer_size=200, policy='class_balanced')"  # configs/quickstart.yaml
FINAL_TAGS = {
    "final/average_accuracy",
    "final/forgetting",
    "final/bwt",
    "final/fwt",
    "final/average_incremental_accuracy",
}


def versions(cwd: Path) -> list[Path]:
    runs = (cwd / "logs" / "quickstart").iterdir()
    return sorted(runs, key=lambda p: int(p.name.split("_")[1]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Replay (the quickstart) and naive fine-tuning, one epoch per experience, then a
    `mneme test` of the replay checkpoint, all under one log dir as a user compares them."""
    cwd = tmp_path_factory.mktemp("tensorboard")
    short = ["--config", str(QUICKSTART), "--data.epochs_per_experience", "1"]
    mneme("fit", *short, cwd=cwd)
    mneme("fit", *short, "--trainer.callbacks", "[]", cwd=cwd)
    replay, naive = versions(cwd)
    ckpt = str(replay / "checkpoints" / "last.ckpt")
    test_out = mneme("test", "--config", str(QUICKSTART), "--ckpt_path", ckpt, cwd=cwd).stdout
    assert versions(cwd) == [replay, naive]  # the test is no training run
    test = replay / "eval" / "test-0"
    return {"cwd": cwd, "replay": replay, "naive": naive, "test": test, "test_out": test_out}


def events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    guidance = {"scalars": 0, "images": 0, "tensors": 0}
    return EventAccumulator(str(run), size_guidance=guidance).Reload()


def hparams_plugin_data(run: Path) -> dict:
    """The run's hparams summaries (``_hparams_/experiment``, ``session_start_info``, ...)."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events(run).PluginTagToContent("hparams")
    return {tag: plugin_data_pb2.HParamsPluginData.FromString(c) for tag, c in content.items()}


def session_hparams(run: Path) -> dict:
    from google.protobuf.json_format import MessageToDict

    start = hparams_plugin_data(run)["_hparams_/session_start_info"].session_start_info
    return {name: MessageToDict(value) for name, value in start.hparams.items()}


def test_each_fit_logs_its_configuration_and_final_metrics(runs):
    replay, naive = session_hparams(runs["replay"]), session_hparams(runs["naive"])
    for hp in (replay, naive):
        assert hp["optimizer/class"] == "torch.optim.SGD"
        assert hp["optimizer/lr"] == pytest.approx(0.01)
        assert hp["optimizer/momentum"] == pytest.approx(0.9)
        assert hp["model/class"] == "mneme.app.ContinualClassifier"
        assert hp["model/encoder"] == "mneme_mlp"
        assert hp["data/benchmark"] == "mneme.datamodules.SplitDigits"
        assert hp["data/epochs_per_experience"] == 1
        # short columns that the HParams tab shows whole; the long forms nested
        assert hp["Seed"] == "0"  # text: the tab prints a number as 0.0000
        assert hp["Data"] == "SplitDigits"
        assert hp["Model"] == "mneme_mlp" and hp["Optimizer"] == "SGD(lr=0.01)"
        assert hp["described/Optimizer"] == "SGD(lr=0.01, momentum=0.9)"
        assert hp["described/Data"].startswith(
            "ContinualDataModule(benchmark='mneme.datamodules.SplitDigits'"
        )
        assert hp["described/Model"].startswith("ContinualClassifier(encoder='mneme_mlp'")
        assert not [name for name in hp if name.startswith("_") or "instantiator" in name]
    assert replay["Callbacks"] == "Replay" and naive["Callbacks"] == "none"
    assert replay["described/Callbacks"] == REPLAY and naive["described/Callbacks"] == "none"
    assert replay["callbacks/Replay/buffer_size"] == 200
    assert replay["callbacks/Replay/policy"] == "class_balanced"
    assert not [name for name in naive if name.startswith("callbacks/Replay")]
    # the strategy is the only difference of the two configurations
    differ = {n for n in replay.keys() & naive.keys() if replay[n] != naive[n]}
    assert differ == {"Callbacks", "described/Callbacks"}

    for run in (runs["replay"], runs["naive"]):
        data = hparams_plugin_data(run)
        declared = {m.name.tag for m in data["_hparams_/experiment"].experiment.metric_infos}
        assert declared == FINAL_TAGS
        accumulator = events(run)
        assert "hp_metric" not in accumulator.Tags()["scalars"]
        summary = json.loads((run / "continual_metrics.json").read_text())
        for tag in FINAL_TAGS:
            (point,) = accumulator.Scalars(tag)  # one point, at the last experience
            assert point.step == 4
            assert point.value == pytest.approx(summary[tag.removeprefix("final/")], abs=1e-6)
        hparams_yaml = (run / "hparams.yaml").read_text()
        assert "class: torch.optim.SGD" in hparams_yaml and "lr: 0.01" in hparams_yaml


def test_the_hparams_tab_tells_the_two_runs_apart_and_skips_the_test_run(runs):
    """The HParams tab's own backend (its session-group table) over the whole log dir."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import (
        api_pb2,
        get_experiment,
        hparams_plugin,
        list_session_groups,
    )

    logdir = str(runs["cwd"] / "logs")
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(logdir)
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, logdir)
    tb_context = base_plugin.TBContext(
        logdir=logdir, multiplexer=multiplexer, data_provider=provider
    )
    backend = hparams_plugin.HParamsPlugin(tb_context)._context
    statuses = [api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE,
                api_pb2.STATUS_RUNNING]  # fmt: skip  # what the tab asks for
    request = api_pb2.ListSessionGroupsRequest(
        start_index=0, slice_size=100, allowed_statuses=statuses
    )
    table = list_session_groups.Handler(context.RequestContext(), backend, "", request).run()
    experiment = get_experiment.Handler(
        context.RequestContext(), backend, "", api_pb2.GetExperimentRequest()
    ).run()
    # the tab shows its first five columns: the one-line overview of each run
    columns = [info.name for info in experiment.hparam_infos]
    assert columns[:5] == ["Callbacks", "Data", "Model", "Optimizer", "Seed"]

    groups = {group.name: group for group in table.session_groups}
    replay, naive = (f"quickstart/{runs[name].name}" for name in ("replay", "naive"))
    assert set(groups) == {replay, naive}  # `mneme test` is no trial
    assert groups[replay].hparams["Callbacks"].string_value == "Replay"
    assert groups[naive].hparams["Callbacks"].string_value == "none"
    for name in (replay, naive):
        assert groups[name].hparams["optimizer/class"].string_value == "torch.optim.SGD"
        assert groups[name].hparams["optimizer/lr"].number_value == pytest.approx(0.01)
        metrics = {m.name.tag: m.value for m in groups[name].metric_values}
        assert set(metrics) == FINAL_TAGS
        assert "hp_metric" not in metrics


def test_test_run_logs_no_hparams_and_prints_fits_table(runs):
    test = runs["test"]
    with pytest.raises(KeyError, match="hparams"):
        events(test).PluginTagToContent("hparams")
    assert "hp_metric" not in events(test).Tags()["scalars"]
    out = runs["test_out"]
    assert "Test accuracy (column: test experience j)" in out
    assert re.search(r"^     test \|(   \d\.\d{3}){5}$", out, re.MULTILINE), out
    assert re.search(r"^average_accuracy=\d\.\d{4}$", out, re.MULTILINE), out


def test_heatmap_per_experience_scalars_and_text_table(runs):
    accumulator = events(runs["replay"])
    images = accumulator.Images("continual/accuracy_matrix")
    assert [image.step for image in images] == [0, 1, 2, 3, 4]
    assert len({(image.width, image.height) for image in images}) == 1  # every row, always
    assert images[-1].width >= 700
    for tag in ("continual/acc_exp0", "continual/average_incremental_accuracy"):
        assert [e.step for e in accumulator.Scalars(tag)] == [0, 1, 2, 3, 4]
    # a test experience's series starts when it is trained: no zeros before (the heatmap's)
    assert [e.step for e in accumulator.Scalars("continual/acc_exp3")] == [3, 4]
    assert [e.step for e in accumulator.Scalars("continual/acc_exp4")] == [4]
    # the Custom Scalars tab: every experience's accuracy in one chart
    assert "custom_scalars__config__" in accumulator.Tags()["tensors"]
    (table,) = accumulator.Tensors("continual/table/text_summary")[-1:]
    text = table.tensor_proto.string_val[0].decode()
    assert "Accuracy matrix" in text and "average_incremental_accuracy=" in text
