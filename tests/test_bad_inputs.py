"""A catalog of bad inputs, each through the real CLI (``mneme.app.cli.main.main``).

Every case must: exit non-zero; end with one short line ``mneme: error: ...`` that names
the offending field or file; print no traceback; and leave an earlier run's logs and
checkpoints byte-for-byte untouched. The cases run one after another in this process, each
in a folder of its own (a subprocess per case spent most of its time importing); the cases
that need a clean process (signals, DDP, environment variables) are in test_bad_runs.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, mneme_in_fork, mneme_in_process
from tests.trust_cases import TRUST_CASES, TRUST_LEFT_ABSENT, make_trust_files

QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
EARLIER_RUN = "logs/quickstart/version_0"
CKPT = f"{EARLIER_RUN}/checkpoints/last.ckpt"


def write_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> str:
    np.savez(path, images=images, labels=labels)
    return str(path)


def mnist_like(rows: int = 8100, shape=(28, 28), test_classes=None) -> tuple:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (rows, *shape), dtype=np.uint8)
    labels = np.arange(rows) % 10
    if test_classes is not None:
        labels[8000:] = test_classes
    return images, labels.astype(np.uint8)


def file_benchmark(path: str, factory: str = "SplitMNISTFile") -> list[str]:
    return [
        "--data.benchmark", f"mneme.datamodules.{factory}",
        "--data.benchmark_args", f"{{path: {path}, n_experiences: 5}}",
    ]  # fmt: skip


class Unpicklable:
    """Stands for arbitrary code inside a pickle."""


def make_files(d: Path) -> dict[str, str]:
    files = {}
    files["no_arrays"] = str(d / "no_arrays.npz")
    np.savez(files["no_arrays"], x=np.zeros((10, 28, 28)), y=np.zeros(10))
    files["flat_images"] = write_npz(d / "flat.npz", *mnist_like(shape=(784,)))
    images, labels = mnist_like()
    files["negative_labels"] = write_npz(d / "neg.npz", images, labels.astype(np.int16) - 1)
    files["few_rows"] = write_npz(d / "few.npz", *mnist_like(rows=100))
    files["empty_test"] = write_npz(d / "empty_test.npz", *mnist_like(test_classes=0))
    files["color_28"] = write_npz(d / "mnist28.npz", *mnist_like())
    ckpt = (d / CKPT).read_bytes()
    (d / "truncated.ckpt").write_bytes(ckpt[: len(ckpt) // 2])
    (d / "random.ckpt").write_bytes(os.urandom(4096))
    torch.save(torch.zeros(3), d / "tensor.ckpt")
    torch.save({"state_dict": {}, "payload": Unpicklable()}, d / "pickled.ckpt")
    aligner = torch.load(d / CKPT, weights_only=True)  # as an aligner's checkpoint names itself
    aligner["hyper_parameters"]["_class_path"] = "mneme.app.ContrastiveAligner"
    torch.save(aligner, d / "aligner.ckpt")
    (d / "not_a_dir").write_text("a file where a folder should be")
    from PIL import Image

    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 60 * i, dtype=np.uint8)).save(d / f"img{i}.png")
    rows = [f"img{i}.png\ta digit {i}" for i in range(4)]
    header = "filepath\ttitle\n"
    (d / "missing_images.tsv").write_text(header + "\n".join(rows + ["gone.png\ta lost one"]))
    (d / "empty_caption.tsv").write_text(header + "\n".join(rows + ["img0.png\t "]))
    (d / "latin1.tsv").write_bytes(
        (header + "\n".join(rows + ["img1.png\tcaf\xe9"])).encode("latin-1")
    )
    (d / "no_title.tsv").write_text("filepath\tcaption\n" + "\n".join(rows))
    np.savez(
        d / "audio_16k.npz", audio=np.zeros((20, 16000), np.int16), labels=np.arange(20) % 10,
        voice=np.zeros(20, np.int16), voice_names=np.array(["en_m1_170_50"]), sample_rate=16000,
    )  # fmt: skip
    (d / "bad.yaml").write_text("data:\n  batch_size: [1\n")
    (d / "empty.yaml").write_text("# nothing here\n")
    (d / "list.yaml").write_text("- trainer\n- model\n")
    (d / "scalar.yaml").write_text("quickstart\n")
    (d / "typo.yaml").write_text("data:\n  epochs_per_experiance: 2\n")
    make_trust_files(d)  # issue 25: class paths, trust, YAML, names, NaN weights, resumes
    return files


ALIGN_CSV = str(ROOT / "configs" / "align_csv.yaml")
ALIGN_AUDIO = str(ROOT / "configs" / "align_spoken_digits.yaml")


def csv_case(manifest: str) -> list[str]:
    return ["fit", "--config", ALIGN_CSV, "--data.benchmark_args.train_csv", manifest]


def fit(*args: str) -> list[str]:
    return ["fit", "--config", QUICKSTART, *args]


CASES: dict[str, tuple[list[str], list[str]]] = {
    "csv_missing_image_files": (csv_case("missing_images.tsv"), ["missing_images.tsv", "gone.png"]),  # noqa: E501
    "csv_empty_caption": (csv_case("empty_caption.tsv"), ["caption", "line 6"]),
    "csv_bad_encoding": (csv_case("latin1.tsv"), ["latin1.tsv", "UTF-8"]),
    "csv_missing_column": (csv_case("no_title.tsv"), ["caption_key", "title"]),
    "audio_wrong_sample_rate": (
        ["fit", "--config", ALIGN_AUDIO, "--data.benchmark_args.path", "audio_16k.npz"],
        ["16000 Hz", "8000"],
    ),  # noqa: E501
    # id: (arguments after `mneme`, substrings the error line must contain)
    "unknown_option": (["fit", "--config", QUICKSTART, "--modle.encoder", "x"], ["modle.encoder"]),
    "misspelled_data_key": (
        ["fit", "--config", QUICKSTART, "--data.epochs_per_experiance", "2"],
        ["epochs_per_experience"],
    ),  # noqa: E501
    "misspelled_key_in_yaml": (
        ["fit", "--config", QUICKSTART, "--config", "typo.yaml"],
        ["epochs_per_experiance"],
    ),  # noqa: E501
    "misspelled_model_arg": (
        ["fit", "--config", QUICKSTART, "--model.init_args.encodr", "x"],
        ["encodr", "encoder"],
    ),  # noqa: E501
    "unknown_model_class": (
        ["fit", "--config", QUICKSTART, "--model.class_path", "mneme.app.ContinualClasifier"],
        ["mneme.app.ContinualClassifier"],
    ),  # noqa: E501
    "unknown_timm_model": (
        ["fit", "--config", QUICKSTART, "--model.init_args.encoder", "resnet1000"],
        ["model.encoder", "resnet1000"],
    ),  # noqa: E501
    "unknown_optimizer": (
        ["fit", "--config", QUICKSTART, "--model.init_args.optimizer", "torch.optim.SGDD"],
        ["torch.optim.SGD"],
    ),  # noqa: E501
    "negative_learning_rate": (
        ["fit", "--config", QUICKSTART, "--model.init_args.optimizer.init_args.lr", "-1"],
        ["model.optimizer", "learning rate"],
    ),  # noqa: E501
    "unknown_benchmark": (
        [
            "fit",
            "--config",
            QUICKSTART,
            "--data.benchmark",
            "avalanche.benchmarks.classic.SplitMNISTT",
        ],
        ["data.benchmark", "SplitMNISTT"],
    ),  # noqa: E501
    "misspelled_benchmark_arg": (
        ["fit", "--config", QUICKSTART, "--data.benchmark_args.n_exp", "5"],
        ["data.benchmark_args", "n_exp"],
    ),  # noqa: E501
    "zero_epochs_per_experience": (
        ["fit", "--config", QUICKSTART, "--data.epochs_per_experience", "0"],
        ["data.epochs_per_experience"],
    ),  # noqa: E501
    "negative_batch_size": (
        ["fit", "--config", QUICKSTART, "--data.batch_size", "-4"],
        ["data.batch_size"],
    ),  # noqa: E501
    "zero_eval_batch_size": (
        ["fit", "--config", QUICKSTART, "--data.eval_batch_size", "0"],
        ["data.eval_batch_size"],
    ),  # noqa: E501
    "batch_size_not_a_number": (
        ["fit", "--config", QUICKSTART, "--data.batch_size", "many"],
        ["data.batch_size"],
    ),  # noqa: E501
    "zero_experiences": (
        ["fit", "--config", QUICKSTART, "--data.benchmark_args.n_experiences", "0"],
        ["data.benchmark_args"],
    ),  # noqa: E501
    "more_experiences_than_classes": (
        ["fit", "--config", QUICKSTART, "--data.benchmark_args.n_experiences", "20"],
        ["data.benchmark_args", "n_experiences"],
    ),  # noqa: E501
    "sample_keys_without_label": (
        ["fit", "--config", QUICKSTART, "--data.sample_keys", "[image, y, task]"],
        ["data.sample_keys"],
    ),  # noqa: E501
    "missing_config_file": (["fit", "--config", "nonexistent.yaml"], ["nonexistent.yaml"]),
    "malformed_yaml": (["fit", "--config", QUICKSTART, "--config", "bad.yaml"], ["YAML"]),
    "unknown_subcommand": (["train", "--config", QUICKSTART], ["train"]),
    "missing_npz": (
        ["fit", "--config", QUICKSTART, *file_benchmark("missing.npz")],
        ["path", "missing.npz"],
    ),  # noqa: E501
    "npz_without_arrays": (
        ["fit", "--config", QUICKSTART, *file_benchmark("no_arrays.npz")],
        ["no_arrays.npz", "images"],
    ),  # noqa: E501
    "images_of_wrong_shape": (
        ["fit", "--config", QUICKSTART, *file_benchmark("flat.npz")],
        ["flat.npz", "shape"],
    ),  # noqa: E501
    "labels_out_of_range": (
        ["fit", "--config", QUICKSTART, *file_benchmark("neg.npz")],
        ["labels"],
    ),  # noqa: E501
    "too_few_rows": (["fit", "--config", QUICKSTART, *file_benchmark("few.npz")], ["few.npz"]),
    "empty_test_experiences": (
        ["fit", "--config", QUICKSTART, *file_benchmark("empty_test.npz")],
        ["data.benchmark"],
    ),  # noqa: E501
    "channels_do_not_match": (
        [
            "fit",
            "--config",
            QUICKSTART,
            "--model.init_args.input_shape",
            "[3, 8, 8]",
            "--model.init_args.num_classes",
            "10",
        ],
        ["model.input_shape"],
    ),  # noqa: E501
    "too_few_classes_in_model": (
        [
            "fit",
            "--config",
            QUICKSTART,
            "--model.init_args.input_shape",
            "[1, 8, 8]",
            "--model.init_args.num_classes",
            "5",
        ],
        ["model.num_classes"],
    ),  # noqa: E501
    "missing_checkpoint": (
        ["fit", "--config", QUICKSTART, "--ckpt_path", "nope.ckpt"],
        ["ckpt_path", "nope.ckpt"],
    ),  # noqa: E501
    "truncated_checkpoint": (
        ["test", "--config", QUICKSTART, "--ckpt_path", "truncated.ckpt"],
        ["ckpt_path", "truncated.ckpt"],
    ),  # noqa: E501
    "corrupted_checkpoint": (
        ["fit", "--config", QUICKSTART, "--ckpt_path", "random.ckpt"],
        ["ckpt_path", "random.ckpt"],
    ),  # noqa: E501
    "not_a_checkpoint": (
        ["test", "--config", QUICKSTART, "--ckpt_path", "tensor.ckpt"],
        ["ckpt_path", "tensor.ckpt"],
    ),  # noqa: E501
    "checkpoint_with_pickled_code": (
        ["test", "--config", QUICKSTART, "--ckpt_path", "pickled.ckpt"],
        ["ckpt_path", "pickled.ckpt"],
    ),  # noqa: E501
    "checkpoint_of_another_model_class": (
        ["test", "--config", QUICKSTART, "--ckpt_path", "aligner.ckpt"],
        ["ckpt_path", "ContrastiveAligner", "model.class_path"],
    ),
    "checkpoint_of_another_stream": (
        ["test", "--config", QUICKSTART, *file_benchmark("mnist28.npz"), "--ckpt_path", CKPT],
        ["ckpt_path", "data.benchmark"],
    ),  # noqa: E501
    "unwritable_log_dir": (
        ["fit", "--config", QUICKSTART, "--trainer.logger.init_args.save_dir", "not_a_dir/logs"],
        ["not_a_dir"],
    ),  # noqa: E501
    "loss_turns_nan": (
        ["fit", "--config", QUICKSTART, "--model.init_args.optimizer.init_args.lr", "1e6"],
        ["nan", "step", "experience"],
    ),  # noqa: E501
    "negative_replay_buffer": (
        [
            "fit",
            "--config",
            QUICKSTART,
            "--trainer.callbacks+=mneme.callbacks.Replay",
            "--trainer.callbacks.init_args.buffer_size",
            "0",
        ],
        ["buffer_size"],
    ),  # noqa: E501
    "nonpositive_lwf_temperature": (
        [
            "fit",
            "--config",
            QUICKSTART,
            "--trainer.callbacks+=mneme.callbacks.LwF",
            "--trainer.callbacks.init_args.temperature",
            "0",
        ],
        ["temperature"],
    ),  # noqa: E501
    "negative_ewc_lambda": (
        [
            "fit",
            "--config",
            QUICKSTART,
            "--trainer.callbacks+=mneme.callbacks.EWC",
            "--trainer.callbacks.init_args.ewc_lambda",
            "-1",
        ],
        ["ewc_lambda"],
    ),  # noqa: E501
    # -- trainer settings that break the experience schedule (6 epochs per experience) --
    "max_steps_inside_the_stream": (fit("--trainer.max_steps", "10"), ["trainer.max_steps"]),
    "max_epochs_inside_an_experience": (fit("--trainer.max_epochs", "3"), ["trainer.max_epochs"]),
    "max_epochs_past_the_stream": (fit("--trainer.max_epochs", "31"), ["trainer.max_epochs"]),
    "min_epochs_past_the_stream": (fit("--trainer.min_epochs", "40"), ["trainer.min_epochs"]),
    "min_steps": (fit("--trainer.min_steps", "10"), ["trainer.min_steps"]),
    "max_time": (fit("--trainer.max_time", "00:00:01:00"), ["trainer.max_time"]),
    "no_train_batches": (
        fit("--trainer.limit_train_batches", "0"),
        ["trainer.limit_train_batches"],
    ),  # noqa: E501
    "no_val_batches": (fit("--trainer.limit_val_batches", "0"), ["trainer.limit_val_batches"]),
    "validation_mid_epoch": (
        fit("--trainer.val_check_interval", "0.5"),
        ["trainer.val_check_interval"],
    ),  # noqa: E501
    "zero_gradient_accumulation": (
        fit("--trainer.accumulate_grad_batches", "0"),
        ["trainer.accumulate_grad_batches"],
    ),  # fmt: skip
    "overfit_batches": (fit("--trainer.overfit_batches", "2"), ["trainer.overfit_batches"]),
    "fast_dev_run": (fit("--trainer.fast_dev_run", "true"), ["trainer.fast_dev_run"]),
    # -- evaluating and resuming without the right checkpoint --
    "test_without_checkpoint": (["test", "--config", QUICKSTART], ["ckpt_path", "last.ckpt"]),
    "validate_without_checkpoint": (["validate", "--config", QUICKSTART], ["ckpt_path"]),
    "best_checkpoint_is_not_kept": (fit("--ckpt_path", "best"), ["ckpt_path", "best"]),
    "last_checkpoint_of_no_run": (
        fit("--ckpt_path", "last", "--trainer.logger.init_args.name", "other"),
        ["ckpt_path", "last"],
    ),  # fmt: skip
    # -- writing into an earlier run's folder --
    "checkpoint_dirpath_of_earlier_run": (
        fit("--checkpoint.dirpath", f"{EARLIER_RUN}/checkpoints"),
        ["checkpoint.dirpath"],
    ),  # fmt: skip
    "log_version_of_earlier_run": (
        fit("--trainer.logger.init_args.version", "0"),
        ["trainer.logger.init_args.version"],
    ),  # fmt: skip
    # -- devices, config files, weights, downloads --
    "zero_devices": (fit("--trainer.devices", "0"), ["trainer.devices"]),
    "empty_config_file": (["fit", "--config", "empty.yaml"], ["empty.yaml", "empty"]),
    "config_file_is_a_list": (["fit", "--config", "list.yaml"], ["list.yaml", "mapping"]),
    "config_file_is_a_scalar": (["fit", "--config", "scalar.yaml"], ["scalar.yaml", "mapping"]),
    "missing_encoder_weights": (
        fit("--model.init_args.encoder_weights", "gone.pt"),
        ["model.encoder_weights", "gone.pt"],
    ),  # fmt: skip
    "benchmark_needs_a_download": (
        fit(
            "--data.benchmark",
            "avalanche.benchmarks.classic.SplitFMNIST",
            "--data.benchmark_args",
            "{n_experiences: 5, dataset_root: fmnist}",
        ),
        ["data.benchmark_args.dataset_root"],
    ),  # fmt: skip
}
if not torch.cuda.is_available():  # on a machine without a GPU
    CASES["gpu_accelerator_without_gpu"] = (
        fit("--trainer.accelerator", "gpu"), ["trainer.accelerator", "cpu"],
    )  # fmt: skip
CASES.update(TRUST_CASES)
# What a case must leave absent in its folder (a failed download's empty folders).
LEFT_ABSENT = {"benchmark_needs_a_download": ["fmnist"], **TRUST_LEFT_ABSENT}


def run_mneme_in_process(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``mneme <args>`` in this process, in ``cwd`` (conftest's ``mneme_in_process``: what a
    subprocess would report, and the process's global state restored after it). For cases
    that fail before training or train briefly; signals need conftest's ``mneme_in_fork``,
    DDP and environment variables read at import a subprocess."""
    return mneme_in_process(args, cwd)


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def case_folder(base: Path, name: str) -> Path:
    """A folder per case, so that concurrent runs never race for the same log version: the
    earlier run's logs are copied, the input files linked."""
    folder = base.parent / f"case_{name}"
    folder.mkdir()
    for item in base.iterdir():
        if item.name == "logs":
            shutil.copytree(item, folder / "logs")
        else:
            (folder / item.name).symlink_to(item)
    return folder


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_inputs")
    args = ["fit", "--config", QUICKSTART, "--data.epochs_per_experience", "1"]
    earlier = run_mneme_in_process(args, base)
    assert earlier.returncode == 0, earlier.stderr[-2000:]
    make_files(base)
    before = snapshot(base / EARLIER_RUN)
    os.environ.pop("MNEME_DEBUG", None)
    results = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MNEME_DEBUG", raising=False)
        patch.syspath_prepend(str(base))  # where the modules no case may import lie
        for name in CASES:
            folder = case_folder(base, name)
            result = run_mneme_in_process(CASES[name][0], folder)
            left = [item for item in LEFT_ABSENT.get(name, []) if (folder / item).exists()]
            results[name] = result, snapshot(folder / EARLIER_RUN), left
    return results, before


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_with_one_clear_line(catalog, case):
    results, _ = catalog
    result, _, left = results[case]
    assert not left, f"left behind: {left}"
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mneme: error: "), result.stderr[-3000:]
    assert len(last) < 500
    for expected in CASES[case][1]:
        assert expected in last, last


@pytest.mark.parametrize("case", sorted(CASES))
def test_earlier_run_is_untouched(catalog, case):
    results, before = catalog
    assert "checkpoints/last.ckpt" in before and "continual_metrics.json" in before
    assert results[case][1] == before


@pytest.mark.parametrize("value, shown", [("1", True), ("0", False)])
def test_debug_variable_shows_the_traceback(tmp_path, value, shown):
    """MNEME_DEBUG=1 (or true, yes) shows tracebacks; 0 (or false, no) does not. The
    quiet case runs the console script's entry in a process of its own (forked): what a
    user's shell shows (no traceback from the interpreter either); the traceback case in
    this process (main() reads the variable when it runs)."""
    args = ["fit", "--config", QUICKSTART, "--data.batch_size", "0"]
    run = mneme_in_process if shown else mneme_in_fork
    result = run(args, tmp_path, env={"MNEME_DEBUG": value})
    assert result.returncode != 0 and ("Traceback" in result.stderr) == shown, result.stderr
    assert shown or result.stderr.strip().splitlines()[-1].startswith("mneme: error: data.")


def process_state() -> dict:
    """What a run may change for the whole process, in a comparable form."""
    import logging
    import random
    import warnings

    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    return {
        "warnings": list(warnings.filters),
        "environ": dict(os.environ),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "threads": torch.get_num_threads(),
        "torch_rng": torch.random.get_rng_state(),
        "numpy_rng": np.random.get_state()[1].tolist(),
        "python_rng": random.getstate(),
        "rank_zero_filters": list(rank_zero.filters),
        "cwd": os.getcwd(),
        "argv": list(sys.argv),
    }


def test_an_in_process_run_leaves_the_process_as_it_found_it(tmp_path):
    """``main()`` seeds the global RNGs, sets PL_GLOBAL_SEED, torch's deterministic mode and
    warnings filters, and adds a logging filter: ``mneme_in_process`` must undo all of it,
    or one catalog case would change the tests after it."""
    from mneme.app.cli.main import main

    from tests.conftest import isolated_global_state

    args = ["fit", "--config", QUICKSTART, "--trainer.logger", "false",
            "--trainer.callbacks", "[]", "--trainer.deterministic", "true",
            "--data.epochs_per_experience", "1", "--trainer.max_epochs", "1"]  # fmt: skip
    torch.rand(1)  # some RNG state of this process's own
    before = process_state()
    with isolated_global_state():
        os.chdir(tmp_path)
        with contextlib.redirect_stdout(io.StringIO()):
            main(args)
        during = process_state()
    changed = [key for key in before if not equal(before[key], during[key])]
    # what the restoration is for: main() does change these
    assert {"environ", "deterministic", "torch_rng", "rank_zero_filters", "cwd"} <= set(changed)
    assert [key for key in before if not equal(before[key], process_state()[key])] == []
    # and the helper the catalog uses restores them too (a folder of its own: no logger,
    # so the checkpoints go to the working directory)
    (tmp_path / "again").mkdir()
    result = mneme_in_process(args, tmp_path / "again")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [key for key in before if not equal(before[key], process_state()[key])] == []


def equal(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
