"""`mneme predict`: one JSON line per sample in the checkpoint's run, what the module's
logits say, for the stream or a folder/CSV of images (``data.predict_inputs``)."""

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mneme.app import ContinualClassifier
from mneme.callbacks.reporting.predictions import merge_shards
from mneme.datamodules import ContinualDataModule

from tests.conftest import QUICK_CONFIGS, ROOT, mneme_in_process
from tests.test_cli import QUICKSTART, mneme

assert {"quickstart", "align_digits"} <= set(QUICK_CONFIGS)  # the checkpoints predicted with


@pytest.fixture
def trained(quick_run, tmp_path) -> tuple[Path, Path]:
    """A copy of the session's quickstart run (its folder stays as the run left it)."""
    run = quick_run("quickstart")
    shutil.copytree(run["log_dir"].parent.parent, tmp_path / "logs")
    return tmp_path, Path("logs") / "quickstart" / run["log_dir"].name


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def module_of(ckpt: Path) -> ContinualClassifier:
    """The checkpoint's classifier, built from its hyperparameters and weights."""
    saved = torch.load(ckpt, weights_only=True)
    names = inspect.signature(ContinualClassifier).parameters
    hparams = {k: v for k, v in saved["hyper_parameters"].items() if k in names}
    model = ContinualClassifier(**hparams)
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def test_predict_writes_every_test_sample_with_the_modules_argmax(trained):
    cwd, run = trained
    ckpt = run / "checkpoints" / "last.ckpt"
    out = mneme("predict", "--config", str(QUICKSTART), "--ckpt_path", str(ckpt), cwd=cwd).stdout
    path = run / "eval" / "predict-0" / "predictions.jsonl"
    rows = rows_of(cwd / path)
    datamodule = ContinualDataModule(benchmark="mneme.datamodules.SplitDigits",
                                     benchmark_args={"n_experiences": 5, "seed": 0})  # fmt: skip
    tests = [e.tensors for e in datamodule.test_experiences]
    assert len(rows) == sum(len(t["label"]) for t in tests)
    assert f"mneme: wrote {len(rows)} predictions to {path}" in out.splitlines()
    model = module_of(cwd / ckpt)
    with torch.no_grad():
        expected = [model(t["image"], t["task"]).argmax(1).tolist() for t in tests]
    fields = {"experience", "sample", "predicted", "label", "top_classes", "top_probabilities"}
    for row in rows:
        assert set(row) == fields  # one head: no task
        experience, sample = row["experience"], row["sample"]
        assert row["predicted"] == expected[experience][sample]
        assert row["label"] == tests[experience]["label"][sample].item()
        assert len(row["top_classes"]) == 5 and row["top_classes"][0] == row["predicted"]
        probabilities = row["top_probabilities"]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1
    seen = {(row["experience"], row["sample"]) for row in rows}
    assert len(seen) == len(rows)  # every sample once


def test_the_aligner_predicts_embeddings_and_its_zero_shot_classes(quick_run, tmp_path):
    run = quick_run("align_digits")
    shutil.copytree(run["log_dir"].parent.parent, tmp_path / "logs")
    folder = Path("logs") / "align_digits" / run["log_dir"].name
    config = str(ROOT / "configs" / "align_digits.yaml")
    ckpt = str(folder / "checkpoints" / "last.ckpt")
    mneme("predict", "--config", config, "--ckpt_path", ckpt, cwd=tmp_path)
    rows = rows_of(tmp_path / folder / "eval" / "predict-0" / "predictions.jsonl")
    for row in rows:
        for modality in ("image", "text"):
            embedding = torch.tensor(row[f"embedding_{modality}"])
            assert embedding.shape == (64,)  # model.embed_dim
            assert embedding.norm().item() == pytest.approx(1.0, abs=1e-4)
    # the zero-shot classes are the ones its accuracy matrix counts: its last row, again
    last_row = run["metrics"]["accuracy_matrix"][-1]
    for j, expected in enumerate(last_row):
        hits = [row["predicted"] == row["label"] for row in rows if row["experience"] == j]
        assert np.mean(hits) == pytest.approx(expected, abs=1e-6)


def write_digit_images(folder: Path, count: int) -> list[tuple[Path, int]]:
    """scikit-learn's digits (0..16) as 8-bit PNGs, one sub-folder per class."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    written = []
    for i in range(count):
        label = int(digits.target[i])
        path = folder / str(label) / f"digit{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 255 / 16).round().astype(np.uint8)).save(path)
        written.append((path, label))
    return written


def test_predict_from_a_folder_of_images(trained):
    from PIL import Image

    cwd, run = trained
    images = write_digit_images(cwd / "my_digits", 24)
    ckpt = run / "checkpoints" / "last.ckpt"
    args = ["--config", str(QUICKSTART), "--ckpt_path", str(ckpt),
            "--data.predict_inputs", "my_digits", "--predictions.top_k", "3"]  # fmt: skip
    out = mneme("predict", *args, cwd=cwd).stdout
    path = run / "eval" / "predict-0" / "predictions.jsonl"
    assert f"mneme: wrote {len(images)} predictions to {path}" in out.splitlines()
    rows = {row["path"]: row for row in rows_of(cwd / path)}
    assert len(rows) == len(images)
    model = module_of(cwd / ckpt)
    for image, label in images:
        row = rows[str(image.relative_to(cwd))]
        assert row["label"] == label  # the class sub-folder
        assert len(row["top_classes"]) == 3 and "experience" not in row
        # the image as the stream serves its own: one channel in [0, 1]
        x = torch.tensor(np.asarray(Image.open(image)), dtype=torch.float32)[None, None] / 255
        with torch.no_grad():
            assert row["predicted"] == model(x, torch.zeros(1, dtype=torch.long)).argmax().item()
    accuracy = np.mean([row["predicted"] == row["label"] for row in rows.values()])
    assert accuracy > 0.5  # the trained model reads the files as it read its stream


def test_predict_from_a_csv_and_bad_inputs_in_one_line(trained):
    cwd, run = trained
    images = write_digit_images(cwd / "files", 6)
    lines = ["path,label"] + [f"{p.relative_to(cwd / 'files')},{y}" for p, y in images]
    (cwd / "files" / "inputs.csv").write_text("\n".join(lines) + "\n")
    ckpt = str(run / "checkpoints" / "last.ckpt")
    base = ["predict", "--config", str(QUICKSTART), "--ckpt_path", ckpt]
    mneme(*base, "--data.predict_inputs", "files/inputs.csv", cwd=cwd)
    rows = rows_of(cwd / run / "eval" / "predict-0" / "predictions.jsonl")
    assert [row["label"] for row in rows] == [y for _, y in images]
    (cwd / "empty").mkdir()
    for inputs, expected in (("empty", "holds no image"), ("nowhere", "neither a folder")):
        result = mneme_in_process([*base, "--data.predict_inputs", inputs], cwd)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("mneme: error: data.predict_inputs:") and expected in last, last
    # the failed predictions left no folder behind; the one that ran kept its own
    assert sorted(p.name for p in (cwd / run / "eval").iterdir()) == ["predict-0"]


@pytest.mark.slow
def test_predict_under_ddp_writes_the_rows_of_one_process(trained):
    """Two gloo processes (the console script: DDP's launcher re-runs it per rank), each
    writing its strided shard, merged into the single-process file's rows and order."""
    cwd, run = trained
    args = ["predict", "--config", str(QUICKSTART), "--trainer.callbacks", "[]",
            "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]  # fmt: skip
    mneme(*args, cwd=cwd)
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    script = Path(sys.executable).parent / "mneme"
    result = subprocess.run([str(script), *args, *ddp], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    single, merged = (run / "eval" / f"predict-{n}" / "predictions.jsonl" for n in (0, 1))
    assert rows_of(cwd / merged) == rows_of(cwd / single)
    assert sorted(p.name for p in (cwd / merged).parent.glob("*.jsonl")) == ["predictions.jsonl"]
    assert result.stdout.count("predictions to") == 1  # printed once, by the first process


def test_shards_of_processes_merge_in_sample_order(tmp_path):
    path = tmp_path / "predictions.jsonl"
    for rank in range(2):  # process r of 2 served samples r, r + 2, ... of each experience
        rows = [{"experience": e, "sample": rank + 2 * i, "predicted": rank}
                for e in range(2) for i in range(3)]  # fmt: skip
        part = tmp_path / f"predictions.rank{rank}.jsonl"
        part.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert merge_shards(path, 2) == 12
    rows = rows_of(path)
    assert [(r["experience"], r["sample"]) for r in rows] == [
        (e, s) for e in range(2) for s in range(6)
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.jsonl"]
