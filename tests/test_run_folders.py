"""Where a run goes: every command names its run folder at the start and the files it wrote
at the end; evaluations write under the run they evaluate (``<run>/eval/<command>-<n>``),
never as a new ``version_N``; a resume continues in the run it resumes."""

import hashlib
import json
import shutil
import signal
from pathlib import Path

import pytest
from mneme.app.cli.run_folders import CLAIMED, claim_log_version, release_claims

import tests.killer  # noqa: F401 - the killed run's callback, imported before its CLI runs
from tests.conftest import mneme_in_fork
from tests.test_cli import QUICKSTART, mneme


def snapshot(folder: Path, leave_out: str = "eval") -> dict[str, str]:
    """Each file's hash, by its path in ``folder`` (the ``leave_out`` sub-folder left out)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).parts[0] != leave_out
    }


def where(stdout: str) -> tuple[str, list[str], str]:
    """The run folder a command named at its start, and the files it said it wrote there
    (and where) at its end."""
    lines = stdout.splitlines()
    (start,) = [line for line in lines if line.startswith("mneme: run folder ")]
    (end,) = [line for line in lines if line.startswith("mneme: wrote ") and " in " in line]
    files, folder = end.removeprefix("mneme: wrote ").rsplit(" in ", 1)
    assert lines.index(start) < lines.index(end)
    return start.removeprefix("mneme: run folder "), files.split(", "), folder


def test_fit_names_its_run_folder_first_and_every_file_it_wrote_last(quick_run):
    run = quick_run("quickstart")
    folder = Path("logs") / "quickstart" / run["log_dir"].name
    start, written, end = where(run["stdout"])
    assert start == end == str(folder)
    assert written == sorted(snapshot(run["cwd"] / folder))  # a new run: all of them
    assert {"continual_metrics.json", "checkpoints/last.ckpt", "hparams.yaml"} <= set(written)


def test_evaluations_write_under_the_run_they_evaluate(quick_run, tmp_path):
    run = quick_run("quickstart")
    shutil.copytree(run["log_dir"].parent.parent, tmp_path / "logs")
    folder = Path("logs") / "quickstart" / run["log_dir"].name
    before = snapshot(tmp_path / folder)
    ckpt = ["--config", str(QUICKSTART), "--ckpt_path", str(folder / "checkpoints" / "last.ckpt")]
    outputs = {}
    for command, n in (("test", 0), ("validate", 0), ("test", 1), ("predict", 0)):
        outputs[command, n] = where(mneme(command, *ckpt, cwd=tmp_path).stdout)
    for (command, n), (start, written, end) in outputs.items():
        evaluation = folder / "eval" / f"{command}-{n}"
        assert start == end == str(evaluation)
        assert written == sorted(snapshot(tmp_path / evaluation))
    eval_folder = tmp_path / folder / "eval"
    assert (eval_folder / "test-1" / "test_metrics.json").is_file()
    assert (eval_folder / "predict-0" / "predictions.jsonl").is_file()
    assert sorted(p.name for p in eval_folder.iterdir()) == [
        "predict-0", "test-0", "test-1", "validate-0"
    ]  # fmt: skip
    assert [p.name for p in (tmp_path / "logs" / "quickstart").iterdir()] == [folder.name]
    assert snapshot(tmp_path / folder) == before  # the training run's own files untouched


def fit(cwd: Path, *extra: str, killed: bool = False):
    args = ["fit", "--config", str(QUICKSTART), "--trainer.callbacks", "[]",
            "--data.epochs_per_experience", "1", *extra]  # fmt: skip
    if killed:
        return mneme_in_fork(args, cwd)
    return mneme(*args, cwd=cwd)


def test_a_resumed_run_continues_in_its_own_folder(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    kill = ["--trainer.callbacks+=tests.killer.KillAt", "--trainer.callbacks.init_args.epoch", "3"]
    killed = fit(tmp_path, *kill, killed=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run = tmp_path / "logs" / "quickstart" / "version_0"
    partial = json.loads((run / "continual_metrics.json").read_text())
    assert partial["complete"] is False and len(partial["accuracy_matrix"]) == 3
    saved = snapshot(run / "checkpoints")
    last = Path("logs") / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    start, written, _ = where(fit(tmp_path, "--ckpt_path", str(last)).stdout)
    assert start == "logs/quickstart/version_0 (resumed)"
    assert {"continual_metrics.json", "checkpoints/last.ckpt"} <= set(written)
    assert [p.name for p in run.parent.iterdir()] == ["version_0"]  # one run, one folder
    finished = json.loads((run / "continual_metrics.json").read_text())  # replaced
    assert finished["complete"] is True and len(finished["accuracy_matrix"]) == 5
    assert len(list(run.glob("events.out.tfevents.*"))) == 2  # the resume's own event file
    steps = [e.step for e in EventAccumulator(str(run)).Reload().Scalars("continual/acc_exp0")]
    assert steps == [0, 1, 2, 3, 4]  # TensorBoard reads one run, the rows of both parts
    for name, digest in saved.items():  # the saves before the kill stay as they were
        if name != "last.ckpt":
            assert snapshot(run / "checkpoints")[name] == digest, name
    # a fit from an earlier save point branches: a new run, the first one left as it is
    whole = snapshot(run)
    branch = Path("logs") / "quickstart" / "version_0" / "checkpoints" / "experience=1.ckpt"
    start, _, _ = where(fit(tmp_path, "--ckpt_path", str(branch)).stdout)
    assert start == "logs/quickstart/version_1"
    assert snapshot(run) == whole


def logger_config(save_dir: Path) -> dict:
    return {"logger": {"init_args": {"save_dir": str(save_dir), "name": "runs", "version": None}}}


def test_an_evaluation_of_a_loose_checkpoint_goes_beside_the_runs_and_failures_leave_none(
    tmp_path,
):
    loose = tmp_path / "model.ckpt"  # not in any <run>/checkpoints folder
    loose.write_bytes(b"weights")
    config = logger_config(tmp_path / "logs")
    claimed = claim_log_version(config, "test", str(loose))
    assert claimed.path == tmp_path / "logs" / "runs" / "eval" / "test-0"
    args = config["logger"]["init_args"]
    assert Path(args["save_dir"]) / args["name"] / args["version"] == claimed.path
    run = tmp_path / "logs" / "runs" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    first = claim_log_version(logger_config(tmp_path / "logs"), "fewshot-test", str(loose))
    inside = claim_log_version(
        logger_config(tmp_path / "logs"), "predict", str(run / "checkpoints" / "last.ckpt")
    )
    assert first.path.name == "fewshot-test-0" and first.kind == "evaluation"
    assert inside.path == run / "eval" / "predict-0"
    release_claims()  # the commands failed before writing: nothing of them stays
    assert not CLAIMED and not (run / "eval").exists()
    assert not (tmp_path / "logs" / "runs" / "eval").exists()


@pytest.mark.parametrize("version", [None, 0])
def test_a_resume_of_a_run_is_that_run_whether_or_not_its_version_is_named(tmp_path, version):
    run = tmp_path / "logs" / "runs" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "experience=1.ckpt").write_bytes(b"weights")
    (run / "checkpoints" / "last.ckpt").hardlink_to(run / "checkpoints" / "experience=1.ckpt")
    config = logger_config(tmp_path / "logs")
    config["logger"]["init_args"]["version"] = version
    claimed = claim_log_version(config, "fit", str(run / "checkpoints" / "experience=1.ckpt"))
    assert claimed == (run, "resumed")  # the experience checkpoint last.ckpt links to
    release_claims()
    assert run.is_dir()  # a resumed run is never claimed, so never removed
