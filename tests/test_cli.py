"""The `mneme` command end to end, as a user runs it: the quickstart (the console script,
shared with test_expected_results through ``quick_config_runs``) and DDP in processes of
their own; `mneme test` and the print_config round trip in this process
(``mneme_in_process``), which reports what a process would."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, mneme_in_process

QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def mneme(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``mneme <args>`` in this process, asserted to succeed."""
    result = mneme_in_process(list(args), cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def only_version(save_dir: Path) -> Path:
    (version,) = (save_dir / "quickstart").iterdir()
    return version


@pytest.fixture
def quickstart_run(quick_run):
    run = quick_run("quickstart")
    return run["cwd"], run["log_dir"], run["stdout"]


def test_help_is_quick_and_imports_nothing_heavy():
    code = "import sys; from mneme.app.cli.main import main; main(['--help']); assert 'lightning' not in sys.modules and 'torch' not in sys.modules"  # noqa: E501
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "fit" in result.stdout and "test" in result.stdout


def test_fit_writes_the_accuracy_matrix_json(quickstart_run):
    _, log_dir, stdout = quickstart_run
    metrics = json.loads((log_dir / "continual_metrics.json").read_text())
    assert {"accuracy_matrix", "average_accuracy", "forgetting", "bwt", "fwt"} <= set(metrics)
    matrix = metrics["accuracy_matrix"]
    assert len(matrix) == 5 and all(len(row) == 5 for row in matrix)
    assert all(0.0 <= a <= 1.0 for row in matrix for a in row)
    assert all(matrix[k][k] > 0.8 for k in range(5))  # each experience is learned
    final = matrix[-1]
    assert metrics["average_accuracy"] == pytest.approx(sum(final) / 5)
    # the quickstart's replay keeps most of what naive fine-tuning forgets (~0.99)
    assert metrics["forgetting"] < 0.3 and metrics["average_accuracy"] > 0.6
    assert "Accuracy matrix" in stdout


def test_fit_logs_scalars_heatmap_and_hparams_to_tensorboard(quickstart_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, log_dir, _ = quickstart_run
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = events.Tags()["scalars"]
    expected = ["acc_exp0", "acc_exp4", "average_accuracy", "forgetting", "bwt", "fwt"]
    for tag in [f"continual/{name}" for name in expected] + ["train/loss"]:
        assert tag in scalars, tag
    assert [e.step for e in events.Scalars("continual/acc_exp0")] == [0, 1, 2, 3, 4]
    assert "continual/accuracy_matrix" in events.Tags()["images"]
    hparams = (log_dir / "hparams.yaml").read_text()
    assert "epochs_per_experience: 6" in hparams and "encoder: mneme_mlp" in hparams


def test_test_subcommand_evaluates_a_checkpoint_on_the_whole_stream(quickstart_run, tmp_path):
    _, log_dir, _ = quickstart_run
    cwd = tmp_path  # the shared run's folder stays as the run left it
    shutil.copytree(log_dir.parent.parent, cwd / "logs")
    log_dir = cwd / "logs" / "quickstart" / log_dir.name
    mneme(
        "test",
        "--config",
        str(QUICKSTART),
        "--ckpt_path",
        str(log_dir / "checkpoints" / "last.ckpt"),
        cwd=cwd,
    )  # noqa: E501
    test_dir = log_dir / "eval" / "test-0"  # under the run it evaluates, not a new version
    assert [p.name for p in (cwd / "logs" / "quickstart").iterdir()] == [log_dir.name]
    result = json.loads((test_dir / "test_metrics.json").read_text())
    final_row = json.loads((log_dir / "continual_metrics.json").read_text())["accuracy_matrix"][-1]
    assert result["accuracy"] == pytest.approx(final_row)
    assert result["average_accuracy"] == pytest.approx(sum(final_row) / len(final_row))


def test_print_config_round_trip_runs(tmp_path):
    printed = mneme("fit", "--config", str(QUICKSTART), "--print_config", cwd=tmp_path).stdout
    config = tmp_path / "printed.yaml"
    config.write_text(printed)
    assert "mneme.datamodules.SplitDigits" in printed and "mneme.app.ContinualClassifier" in printed
    mneme("fit", "--config", str(config), "--data.epochs_per_experience", "1", cwd=tmp_path)
    metrics = json.loads((only_version(tmp_path / "logs") / "continual_metrics.json").read_text())
    assert len(metrics["accuracy_matrix"]) == 5


def test_fit_under_ddp_with_two_cpu_processes(tmp_path):
    """The real launcher (it re-runs the `mneme` script per rank), gloo, 2 processes."""
    mneme_script = Path(sys.executable).parent / "mneme"
    args = ["fit", "--config", str(QUICKSTART), "--trainer.strategy", "ddp",
            "--trainer.devices", "2", "--trainer.accelerator", "cpu"]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [str(mneme_script), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((only_version(tmp_path / "logs") / "continual_metrics.json").read_text())
    matrix = metrics["accuracy_matrix"]
    # each rank takes half the steps of a single process: every experience is still learned
    assert len(matrix) == 5 and all(matrix[k][k] > 0.25 for k in range(5))
    assert metrics["average_accuracy"] > 0.5  # naive fine-tuning ends near 0.2
