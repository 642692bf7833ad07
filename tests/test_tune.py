"""``mneme tune``: a search killed mid-way resumes to exactly N finished trials; the pruner
stops a trial at an experience boundary; the trials reach TensorBoard's HParams tab; bad
input ends in one line naming the field."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mneme.app.cli.tune_command import main, tune
from mneme.app.core.errors import ConfigError
from mneme.app.tune.search import (
    ObjectiveKeyError,
    load_search,
    metric_value,
    parse_objective,
    parse_space,
)
from optuna.trial import TrialState
from sqlalchemy.exc import OperationalError

from tests.conftest import ROOT

# Two class-incremental experiences of the sklearn digits, one epoch each, a 16-unit MLP
# with EWC: a trial takes about a second of CPU.
CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {save_dir: logs, name: tiny}
  callbacks:
    - class_path: mneme.callbacks.EWC
      init_args: {ewc_lambda: 10.0}
model:
  class_path: mneme.app.ContinualClassifier
  init_args:
    encoder: mneme_mlp
    encoder_args: {hidden: [16]}
data:
  benchmark: mneme.datamodules.SplitDigits
  benchmark_args: {n_experiences: 2, seed: 0}
  epochs_per_experience: 1
  batch_size: 128
metrics: {print_table: false}
"""
SPACE = """
space:
  trainer.callbacks.EWC.ewc_lambda: {type: float, low: 1.0, high: 1000.0, log: true}
  model.optimizer.lr: {type: float, low: 0.001, high: 0.1, log: true}
sampler: {type: tpe, seed: 0}
"""


@pytest.fixture
def files(tmp_path):
    config, search = tmp_path / "tiny.yaml", tmp_path / "search.yaml"
    config.write_text(CONFIG)
    search.write_text(SPACE)
    return tmp_path, config, search


def _hparams(run: Path) -> tuple[set[str], set[str]]:
    """The hparam names and metric tags of a run's HParams session."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(run))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    data = {k: plugin_data_pb2.HParamsPluginData.FromString(v) for k, v in content.items()}
    start = data["_hparams_/session_start_info"].session_start_info
    metrics = {m.name.tag for m in data["_hparams_/experiment"].experiment.metric_infos}
    return set(start.hparams), metrics


def _trial_states(study_dir: Path) -> dict[int, TrialState]:
    """The study's trials by number (none while the search has not created it yet)."""
    import optuna
    from mneme.app.tune.study import STUDY_FILE, STUDY_NAME

    if not (study_dir / STUDY_FILE).is_file():
        return {}
    try:
        study = optuna.load_study(
            study_name=STUDY_NAME, storage=f"sqlite:///{study_dir / STUDY_FILE}"
        )
        return {t.number: t.state for t in study.get_trials(deepcopy=False)}
    except (KeyError, OperationalError):  # not created yet, or the writer holds the lock
        return {}


def test_a_killed_search_resumes_to_exactly_the_asked_trials(files):
    root, config, search = files
    study_dir = root / "study"
    args = ["tune", "--config", str(config), "--search", str(search), "--trials", "3"]
    code = "import sys; from mneme.app.cli.main import main; main(sys.argv[1:])"
    log = root / "tune.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", code, *args, "--study_dir", str(study_dir)],
            cwd=root,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        # The kill point is Mneme's own record, the study: trial 0 complete and the next
        # one running (no cleanup), whatever the libraries print meanwhile.
        killed = None
        while killed is None and process.poll() is None:
            states = _trial_states(study_dir)
            running = [n for n, state in states.items() if state == TrialState.RUNNING]
            if states.get(0) == TrialState.COMPLETE and running:
                os.kill(process.pid, signal.SIGKILL)
                killed = running[0]
            else:
                time.sleep(0.05)
        process.wait()
    assert process.returncode == -signal.SIGKILL, log.read_text()[-3000:]

    study = tune(["--config", str(config)], str(search), 3, str(study_dir))
    states = {t.number: t.state for t in study.trials}
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3 and states[0] == TrialState.COMPLETE
    # the killed trial: still RUNNING, or failed by the heartbeat and retried
    assert states[killed] in (TrialState.RUNNING, TrialState.FAIL)
    values = [tuple(t.params.values()) for t in finished]
    assert len(set(values)) == 3  # the resumed process proposed new values
    for trial in finished:  # each a normal run folder
        run = Path(trial.user_attrs["run_dir"])
        metrics = json.loads((run / "continual_metrics.json").read_text())
        assert metrics["complete"] and trial.value == metrics["average_accuracy"]
        assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
        assert (
            "ewc_lambda: " + str(trial.params["trainer.callbacks.EWC.ewc_lambda"])
            in (run / "config.yaml").read_text()
        )
        names, tags = _hparams(study_dir / "hparams" / run.name)
        assert {"trainer.callbacks.EWC.ewc_lambda", "model.optimizer.lr"} <= names
        assert "tune/objective" in tags
    best = json.loads((study_dir / "best.json").read_text())
    assert best["best"][0]["number"] == study.best_trial.number
    # once more with the same arguments: nothing left to run
    again = tune(["--config", str(config)], str(search), 3, str(study_dir))
    assert len(again.trials) == len(study.trials)


def test_the_pruner_stops_a_trial_at_an_experience_boundary(files):
    root, config, search = files
    # a threshold above any accuracy prunes at the first report: the end of experience 0
    search.write_text(SPACE + "pruner: {type: threshold, lower: 1.01}\n")
    study = tune(["--config", str(config)], str(search), 1, str(root / "study"))
    (trial,) = study.trials
    assert trial.state == TrialState.PRUNED
    assert list(trial.intermediate_values) == [0]  # reported once, at experience 0
    run = Path(trial.user_attrs["run_dir"])
    metrics = json.loads((run / "continual_metrics.json").read_text())
    assert metrics["experiences_done"] == 1 and not metrics["complete"]
    assert trial.intermediate_values[0] == pytest.approx(metrics["average_accuracy"])
    assert (run / "checkpoints" / "experience=0.ckpt").is_file()  # the boundary checkpoint
    names, tags = _hparams(root / "study" / "hparams" / run.name)
    assert "state" in names and "tune/pruned_at_experience" in tags

    # the same folder for another config is refused (the config's hash is in the study)
    with pytest.raises(ConfigError, match=r"^--study_dir .*another --config"):
        tune(
            ["--config", str(config), "--data.batch_size", "64"],
            str(search),
            1,
            str(root / "study"),
        )
    # an objective key the trial's metrics lack ends the search, listing the keys they have
    search.write_text(SPACE + "objective: {key: cost.no_such_field, direction: minimize}\n")
    with pytest.raises(ObjectiveKeyError, match=r"no number 'cost.no_such_field'.*cost\.train"):
        tune(["--config", str(config)], str(search), 1, str(root / "other"))


def test_a_strategy_choice_against_cost_as_two_objectives(files):
    root, config, search = files
    search.write_text(
        "space:\n"
        "  trainer.callbacks[0]:\n"
        "    type: categorical\n"
        "    choices:\n"
        "      ewc: {class_path: mneme.callbacks.EWC, init_args: {ewc_lambda: 10.0}}\n"
        "      replay: {class_path: mneme.callbacks.Replay, init_args: {buffer_size: 50}}\n"
        "objective: [average_accuracy, {key: cost.sum.train_seconds, direction: minimize}]\n"
        "sampler: {type: random, seed: 0}\n"
    )
    study = tune(["--config", str(config)], str(search), 2, str(root / "study"))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    for trial in study.trials:
        run = Path(trial.user_attrs["run_dir"])
        metrics = json.loads((run / "continual_metrics.json").read_text())
        seconds = sum(row["train_seconds"] for row in metrics["cost"])
        assert trial.values == [metrics["average_accuracy"], pytest.approx(seconds)]
        chosen = {"ewc": "mneme.callbacks.EWC", "replay": "mneme.callbacks.Replay"}
        assert chosen[trial.params["trainer.callbacks[0]"]] in (run / "config.yaml").read_text()


def test_a_trial_whose_loss_turns_nan_fails_and_is_recorded(files):
    root, config, search = files
    # a lambda past float32's range: EWC's penalty (a float32 tensor) is inf or nan
    space = "{trainer.callbacks.EWC.ewc_lambda: {type: float, low: 1.0e+39, high: 1.0e+40}}"
    search.write_text(f"space: {space}\n")
    with pytest.raises(ConfigError, match=r"^--trials: 1 trials failed before 1 finished"):
        tune(["--config", str(config)], str(search), 1, str(root / "study"))
    import optuna

    (trial,) = optuna.load_study(
        study_name="mneme", storage=f"sqlite:///{root}/study/study.db"
    ).trials
    assert trial.state == TrialState.FAIL and "ewc" in trial.user_attrs["error"]


def test_objectives_from_a_metrics_payload():
    payload = {
        "average_accuracy": 0.8,
        "forgetting": 0.1,
        "fwt": None,
        "cost": [
            {"trainable_params": 100, "train_seconds": 1.5},
            {"trainable_params": 100, "train_seconds": 2.5},
        ],
    }
    weighted = parse_objective({"weights": {"average_accuracy": 1.0, "forgetting": -0.5}})
    assert weighted.directions == ["maximize"]
    assert weighted.evaluate(payload, "x") == [pytest.approx(0.75)]
    assert parse_objective("forgetting").directions == ["minimize"]
    multi = parse_objective(["average_accuracy", {"key": "cost.sum.train_seconds"}])
    assert multi.directions == ["maximize", "minimize"]
    assert multi.evaluate(payload, "x") == [0.8, 4.0]
    assert metric_value(payload, "cost.trainable_params", "x") == 100
    assert metric_value(payload, "fwt", "x") is None


@pytest.mark.parametrize(
    "search, trials, error",
    [
        ("space: {trainer.callbacks.EWC.ewc_lamda: {type: float, low: 1, high: 9}}", 3,
         r"^space.trainer.callbacks.EWC.ewc_lamda: the config has no such key; did you mean "
         r"'trainer.callbacks.EWC(.init_args)?.ewc_lambda'"),
        ("space: {model.optimizer.lr: {type: gaussian, mu: 0.01}}", 3,
         r"^space.model.optimizer.lr.type: unknown distribution type 'gaussian'; use one of "
         r"float, int, categorical"),
        ("space: {model.optimizer.lr: {type: float, low: 0.1, high: 0.01}}", 3,
         r"^space.model.optimizer.lr: .*low"),
        ("space: {model.optimizer.lr: {type: float, low: 0.001, high: 0.1}}\n"
         "objective: average_acuracy", 3,
         r"^objective: continual_metrics.json has no key 'average_acuracy'; did you mean "
         r"'average_accuracy'\?; its keys: average_accuracy, forgetting"),
        ("space: {model.optimizer.lr: {type: float, low: 0.001, high: 0.1}}", 0,
         r"^--trials: got 0; pass how many finished trials to reach"),
        ("space: {model.optimizer.lr: {type: float, low: 0.001, high: 0.1}}\n"
         "pruner: {type: median, n_warmup: 2}", 3, r"^pruner: .*n_warmup"),
        ("space: {model.optimizer.lr: {type: float, low: 0.001, high: 0.1}}\n"
         "objective: [average_accuracy, forgetting]\npruner: median", 3,
         r"^pruner: Optuna prunes single-objective studies only"),
    ],
    ids=["unknown_key", "unknown_distribution", "low_above_high", "objective_key", "trials",
         "pruner_argument", "pruner_multi_objective"],
)  # fmt: skip
def test_bad_input_is_one_line_naming_the_field(files, search, trials, error):
    root, config, search_file = files
    search_file.write_text(search)
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(config), "--search", str(search_file), "--trials", str(trials),
              "--study_dir", str(root / "study")])  # fmt: skip
    message = str(exit_.value.code)
    assert message.startswith("mneme: error: ") and "\n" not in message
    assert __import__("re").search(error, message.removeprefix("mneme: error: ")), message
    assert not (root / "study" / "trials").exists()  # refused before any trial ran


def test_space_keys_accept_indices_class_names_and_implicit_init_args():
    from jsonargparse import Namespace
    from mneme.app.tune.config_keys import set_key

    ewc = Namespace(class_path="mneme.callbacks.EWC", init_args=Namespace(ewc_lambda=1.0))
    optimizer = Namespace(class_path="torch.optim.SGD", init_args=Namespace(lr=0.1))
    config = Namespace(  # as the CLI's parser gives it
        trainer=Namespace(callbacks=[ewc]),
        model=Namespace(class_path="x.Model", init_args=Namespace(optimizer=optimizer)),
    )
    spec = {"type": "float", "low": 0.1, "high": 1.0}
    for key in ("trainer.callbacks[0].init_args.ewc_lambda", "trainer.callbacks.EWC.ewc_lambda"):
        (param,) = parse_space({key: spec}, config)
        assert param.key == key
    (choice,) = parse_space(
        {"trainer.callbacks[0]": {"type": "categorical", "choices": {"ewc": {}, "replay": {}}}},
        config,
    )
    assert list(choice.labels) == ["ewc", "replay"]
    assert parse_space({"model.optimizer.lr": spec}, config)
    set_key(config, "model.optimizer.lr", 0.5)  # set on the parsed Namespace itself
    set_key(config, "trainer.callbacks.EWC.ewc_lambda", 7.0)
    assert config["model.init_args.optimizer.init_args.lr"] == 0.5
    assert config["trainer.callbacks"][0].init_args.ewc_lambda == 7.0


LR = "{model.optimizer.lr: {type: float, low: 0.001, high: 0.1}}"


def _corrupt(study: Path) -> None:
    study.mkdir()
    (study / "study.db").write_bytes(b"not a database, " * 512)


def _truncated(study: Path) -> None:
    import sqlite3

    study.mkdir()
    with sqlite3.connect(study / "study.db") as db:  # a real SQLite file, cut short
        db.execute("CREATE TABLE studies (id INTEGER, name TEXT)")
        db.executemany("INSERT INTO studies VALUES (?, ?)", [(i, "x" * 200) for i in range(99)])
    db.close()
    data = (study / "study.db").read_bytes()
    (study / "study.db").write_bytes(data[: len(data) // 2])


def _folder(study: Path) -> None:
    (study / "study.db").mkdir(parents=True)


def _file(study: Path) -> None:
    study.write_text("a file where the study folder goes")


@pytest.mark.parametrize(
    "prepare, space, error",
    [
        (_corrupt, LR, r"^--study_dir: '.*study.db' is not a readable Optuna study \(sqlite: "),
        (_truncated, LR, r"^--study_dir: '.*study.db' is not a readable Optuna study"),
        (_folder, LR, r"^--study_dir: '.*study.db' is not a file"),
        (_file, LR, r"^--study_dir: '.*study' is a file, not a folder"),
        (None, "{data.batch_size: {type: int, low: 16.5, high: 128}}",
         r"^space.data.batch_size.low: an int distribution takes whole numbers, got 16.5"),
        (None, "{data.batch_size: {type: int, low: 16, high: 128, step: 0.5}}",
         r"^space.data.batch_size.step: an int distribution takes whole numbers"),
        (None, "{data.trusted_benchmarks: {type: categorical, choices: [[os.system]]}}",
         r"^space.data.trusted_benchmarks: data.trusted_benchmarks cannot be searched"),
        (None, "{'trainer.callbacks[0]': {type: categorical, choices: "
               "{evil: {class_path: os.system}}}}",
         r"^space.trainer.callbacks\[0\]: trainer.callbacks.class_path: 'os.system' is not"),
    ],
    ids=["corrupt_db", "truncated_db", "db_is_a_folder", "study_dir_is_a_file",
         "int_fractional_bound", "int_fractional_step", "trusted_benchmarks", "class_path"],
)  # fmt: skip
def test_a_bad_study_or_space_is_one_line_and_keeps_the_earlier_files(files, prepare, space, error):
    root, config, search_file = files
    search_file.write_text(f"space: {space}\n")
    study = root / "study"
    if prepare is not None:
        prepare(study)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(config), "--search", str(search_file), "--trials", "1",
              "--study_dir", str(study)])  # fmt: skip
    message = str(exit_.value.code)
    assert message.startswith("mneme: error: ") and "\n" not in message
    assert __import__("re").search(error, message.removeprefix("mneme: error: ")), message
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_the_shipped_search_file_fits_the_shipped_config():
    search = load_search(str(ROOT / "configs" / "tune_ewc_lambda.search.yaml"))
    assert "trainer.callbacks.EWC.ewc_lambda" in search["space"]
    parse_objective(search.get("objective"))
