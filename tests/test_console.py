"""What a user's console shows, through the console script in processes of their own (the
warnings of Lightning and torch are printed once per process, so an in-process or forked
run can miss them): no third-party notice on the quickstart's fit, a resume, `mneme test`
and `mneme fewshot test` (each matched by its exact text), Mneme's tables instead of
Lightning's, and progress lines when there is no progress bar (output to a file)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

QUICKSTART = ROOT / "configs" / "quickstart.yaml"
# The notices the console repeated on every command (issue 24), by their exact text.
NOISE = (
    "You have overridden `transfer_batch_to_device` in `LightningModule` but have passed in "
    "a `LightningDataModule`",
    "The dirpath has changed from",
    "is an Enum subclass and is now natively supported",
    "try installing [litmodels]",
    "try installing [litlogger]",
)
# Lightning's own result table (`Trainer.test`/`validate` with verbose=True).
LIGHTNING_TABLE = ("Test metric", "Validate metric", "DataLoader 0")
FEWSHOT_CONFIG = """\
trainer:
  accelerator: cpu
  devices: 1
model:
  class_path: mneme.app.FewShotEvaluator
  init_args: {{checkpoint: {checkpoint}, methods: [prototypes], finetune_steps: 5}}
data:
  benchmark: mneme.datamodules.SplitDigits
  benchmark_args: {{n_experiences: 2, fixed_class_order: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}}
  meta_train_classes: [0, 1, 2, 3, 4]
  meta_test_classes: [5, 6, 7, 8, 9]
  n_way: 5
  k_shot: 1
  q_queries: 5
  eval_settings: [[5, 1]]
  eval_episodes: 250
  tasks_per_batch: 1
"""


def console(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``mneme <args>`` through the console script, warnings shown (no PYTHONWARNINGS), its
    output to pipes (no terminal: no progress bar)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "MNEME_DEBUG")}
    env["OMP_NUM_THREADS"] = "1"
    script = Path(sys.executable).parent / "mneme"
    result = subprocess.run(
        [str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    cwd = tmp_path_factory.mktemp("console")
    short = ["--config", str(QUICKSTART), "--data.epochs_per_experience", "1"]
    out = {"fit": console("fit", *short, cwd=cwd)}
    (run,) = (cwd / "logs" / "quickstart").iterdir()
    checkpoints = run / "checkpoints"
    resume = str(checkpoints / "experience=2.ckpt")
    out["resume"] = console("fit", *short, "--ckpt_path", resume, cwd=cwd)
    last = str(checkpoints / "last.ckpt")
    out["test"] = console("test", *short, "--ckpt_path", last, cwd=cwd)
    config = cwd / "fewshot.yaml"
    config.write_text(FEWSHOT_CONFIG.format(checkpoint=last))
    out["fewshot test"] = console("fewshot", "test", "--config", str(config), cwd=cwd)
    return out


@pytest.mark.parametrize("command", ["fit", "resume", "test", "fewshot test"])
def test_no_third_party_notice_on_the_console(runs, command):
    console_text = runs[command].stdout + runs[command].stderr
    assert not [text for text in NOISE if text in console_text], console_text[-3000:]


@pytest.mark.parametrize("command", ["test", "fewshot test"])
def test_evaluations_print_mneme_tables_not_lightnings(runs, command):
    stdout = runs[command].stdout
    assert not [text for text in LIGHTNING_TABLE if text in stdout], stdout
    title = "Few-shot test accuracy" if command == "fewshot test" else "Test accuracy"
    assert title in stdout


def test_a_fit_without_progress_bar_prints_a_line_per_experience(runs):
    lines = [line for line in runs["fit"].stderr.splitlines() if line.startswith("Experience ")]
    assert [line.split(" done")[0] for line in lines] == [f"Experience {k}/5" for k in range(1, 6)]
    assert all("elapsed, ETA" in line and "accuracy row:" in line for line in lines)
    # the row printed is the matrix's row
    last = lines[-1].split("accuracy row: ")[1]
    assert f"        4 |   {'   '.join(last.split())}" in runs["fit"].stdout
    # the resumed run goes on from experience 3
    resumed = [line for line in runs["resume"].stderr.splitlines() if line.startswith("Exper")]
    assert [line.split(" done")[0] for line in resumed] == ["Experience 4/5", "Experience 5/5"]


def test_a_long_evaluation_prints_its_progress(runs):
    lines = [line for line in runs["fewshot test"].stderr.splitlines() if line.startswith("Test:")]
    assert [line.split(" ·")[0] for line in lines] == [
        "Test: 200/250 episodes",
        "Test: 250/250 episodes",
    ]
