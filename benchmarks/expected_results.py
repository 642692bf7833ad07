"""The CI-sized configs run as their headers say, against each header's expected result.

Each config runs through the console script (``mneme fit --config configs/<name>.yaml``)
with ``OMP_NUM_THREADS=1``, one at a time, in a scratch folder beside a link to
``../shared`` (the configs name their data as ``../shared/data/...``); the teacher config
first runs ``split_mnist_replay`` and takes its final checkpoint as ``teacher.ckpt``, as its
header says. Printed per config: the header's figures, the run's, and the last row.

    python -m benchmarks.expected_results                    # every CI-sized config
    python -m benchmarks.expected_results split_mnist_replay # some of them

``tests/test_expected_results.py`` runs the same ones (the two quick configs in every run
of the suite, the others under ``-m slow``) with the tolerance :data:`TOLERANCE`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHARED = ROOT.parent / "shared"
# Configs that train offline in under a minute of CPU on one thread (the rest need a
# download, a GPU, or minutes: their headers give the command and the measured figures).
CI_SIZED = (
    "quickstart",
    "align_digits",
    "split_mnist_replay",
    "split_mnist_teacher",
    "split_mnist_derpp",
    "split_mnist_lwf",
    "split_mnist_adversarial",
    "permuted_mnist_ewc",
    "permuted_mnist_mmd",
    "prune_split_mnist",
    "qat_split_mnist",
    "tune_ewc_lambda",
    "avalanche_split_mnist_replay",
    "avalanche_permuted_mnist_ewc",
)
# Arguments a run adds to its config's, as its header says: Avalanche's MNIST configs read
# the 10,000 digits of ../shared/data/torchvision instead of downloading the full set.
EXTRA_ARGS = {
    name: ["--data.benchmark_args.dataset_root", "../shared/data/torchvision"]
    for name in ("avalanche_split_mnist_replay", "avalanche_permuted_mnist_ewc")
}
# What a run may differ from its header by: the same seed on one thread gives the same run
# on one machine and library set; another CPU's kernels (a different BLAS path, SIMD width)
# or a torch update move the figures by a few tenths of a percent per experience, which
# compounds over a stream of five. Wider than that is a change of behaviour.
TOLERANCE = {"average_accuracy": 0.03, "forgetting": 0.05}
EXPECTED = re.compile(
    r"^# Expected result: average_accuracy (?P<average_accuracy>\d\.\d+), "
    r"forgetting (?P<forgetting>-?\d\.\d+)",
    re.MULTILINE,
)
LAST_ROW = re.compile(r"Last row(?: of the accuracy matrix)?: ((?:\d\.\d+\s*)+)")


def header(config: Path) -> str:
    return config.read_text().split("\nseed_everything", 1)[0]


def expected_result(config: Path) -> dict[str, float]:
    """The figures of the header's ``# Expected result:`` line."""
    match = EXPECTED.search(header(config))
    if match is None:
        raise ValueError(f"{config.name}: no '# Expected result: average_accuracy ...' line")
    return {key: float(value) for key, value in match.groupdict().items()}


def expected_last_row(config: Path) -> list[float] | None:
    """The header's ``Last row: a b c ...`` (the final row of the accuracy matrix)."""
    match = LAST_ROW.search(" ".join(line.lstrip("# ") for line in header(config).splitlines()))
    return [float(v) for v in match.group(1).split()] if match else None


def needs_shared_data(name: str) -> bool:
    return "../shared/data" in (CONFIGS / f"{name}.yaml").read_text() or name in EXTRA_ARGS


def run_config(name: str, root: Path) -> dict:
    """``mneme fit --config configs/<name>.yaml`` in ``root/<name>`` (``root/shared`` links
    to ``../shared``): ``returncode``, ``wall_s``, ``stdout``, ``stderr``, ``log_dir`` and
    ``metrics`` (its ``continual_metrics.json``)."""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "shared").exists():
        (root / "shared").symlink_to(SHARED, target_is_directory=True)
    cwd = root / name
    cwd.mkdir()
    if name == "split_mnist_teacher":  # its header: the replay run's final model
        replay = run_config("split_mnist_replay", root / "teacher_source")
        shutil.copy(replay["log_dir"] / "checkpoints" / "experience=4.ckpt", cwd / "teacher.ckpt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("MNEME_DEBUG", None)
    script = Path(sys.executable).parent / "mneme"
    args = [
        str(script),
        "fit",
        "--config",
        str(CONFIGS / f"{name}.yaml"),
        *EXTRA_ARGS.get(name, []),
    ]
    start = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - start
    logs = sorted((cwd / "logs").glob("*/version_*"))
    log_dir = logs[0] if len(logs) == 1 else None
    metrics = log_dir / "continual_metrics.json" if log_dir else None
    return {
        "returncode": done.returncode,
        "wall_s": wall,
        "stdout": done.stdout,
        "stderr": done.stderr,
        "log_dir": log_dir,
        "metrics": json.loads(metrics.read_text()) if metrics and metrics.is_file() else None,
    }


# The few-shot configs (minutes each: 600 test episodes per setting), run by this command
# and the slow test alone: accuracy % +- 95% CI per N-way K-shot setting.
FEWSHOT = ("fewshot_eval", "fewshot_protonet")
FEWSHOT_FIGURE = re.compile(r"(\d+)-way (\d+)-shot (\d+\.\d+) ± (\d+\.\d+)")
# fewshot_eval's checkpoint: a classifier trained on digits 0-4 (the header's first command).
SUPERVISED_0TO4 = [
    "--config", str(CONFIGS / "split_mnist_replay.yaml"), "--trainer.callbacks", "[]",
    "--model.init_args.encoder", "mneme_cnn",
    "--model.init_args.encoder_args", "{widths: [32, 64, 64]}",
    "--model.init_args.optimizer", "torch.optim.Adam",
    "--model.init_args.optimizer.lr", "0.001",
    "--data.benchmark_args", "{path: ../shared/data/mnist10k.npz, n_experiences: 2, "
    "fixed_class_order: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}",
    "--data.epochs_per_experience", "3", "--trainer.max_epochs", "3",
    "--trainer.logger.init_args.name", "supervised_0to4",
    "--trainer.logger.init_args.version", "0",
]  # fmt: skip


def expected_fewshot(config: Path) -> dict[tuple[int, int], tuple[float, float]]:
    """The header's first figure per (N-way, K-shot): (mean %, 95% CI %)."""
    text = " ".join(line.lstrip("# ") for line in header(config).splitlines())
    figures: dict[tuple[int, int], tuple[float, float]] = {}
    for n, k, mean, ci in FEWSHOT_FIGURE.findall(text.split("Expected result:", 1)[1][:300]):
        figures.setdefault((int(n), int(k)), (float(mean), float(ci)))
    return figures


def run_fewshot(name: str, root: Path) -> dict:
    """The few-shot config as its header says (fewshot_eval: the supervised checkpoint
    first); ``results``: (N, K) -> (mean %, CI %) of the first method, and the console."""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "shared").exists():
        (root / "shared").symlink_to(SHARED, target_is_directory=True)
    cwd = root / name
    cwd.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MNEME_DEBUG", None)
    script = str(Path(sys.executable).parent / "mneme")
    if name == "fewshot_eval":
        subprocess.run([script, "fit", *SUPERVISED_0TO4], cwd=cwd, env=env, check=True,
                       capture_output=True, text=True, timeout=1800)  # fmt: skip
    command = "test" if name == "fewshot_eval" else "fit"
    args = [script, "fewshot", command, "--config", str(CONFIGS / f"{name}.yaml")]
    start = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=3600)
    found = sorted(cwd.glob("logs/**/fewshot_metrics.json"))
    results = {}
    if found:
        rows = json.loads(found[-1].read_text())["results"]
        first = rows[0]["method"]
        for r in rows:
            if r["method"] == first:
                results[(r["n_way"], r["k_shot"])] = (100 * r["mean"], 100 * r["ci95"])
    return {"returncode": done.returncode, "wall_s": time.perf_counter() - start,
            "stdout": done.stdout, "stderr": done.stderr, "results": results}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", default=list(CI_SIZED))
    parser.add_argument("--root", help="scratch folder (default: a temporary one)")
    options = parser.parse_args()
    root = Path(options.root or tempfile.mkdtemp(prefix="mneme_expected_"))
    for name in options.names:
        config = CONFIGS / f"{name}.yaml"
        if needs_shared_data(name) and not (SHARED / "data").is_dir():
            print(f"{name}: skipped, {SHARED / 'data'} absent")
            continue
        if name in FEWSHOT:
            run = run_fewshot(name, root)
            want = expected_fewshot(config)
            got = ", ".join(
                f"{n}-way {k}-shot {m:.2f} ± {c:.2f} (header {want.get((n, k), ('?',))[0]})"
                for (n, k), (m, c) in run["results"].items()
            )
            print(f"{name}: {got or 'failed: ' + run['stderr'][-2000:]}; "
                  f"wall {run['wall_s']:.0f} s", flush=True)  # fmt: skip
            continue
        run = run_config(name, root)
        if run["metrics"] is None:
            print(f"{name}: failed (status {run['returncode']})\n{run['stderr'][-2000:]}")
            continue
        m, want = run["metrics"], expected_result(config)
        last = " ".join(f"{a:.3f}" for a in m["accuracy_matrix"][-1])
        within = all(abs(m[k] - v) <= TOLERANCE[k] for k, v in want.items())
        print(
            f"{name}: header {want['average_accuracy']:.3f} / {want['forgetting']:.3f}, run "
            f"{m['average_accuracy']:.3f} / {m['forgetting']:.3f} (bwt {m['bwt']:+.3f}), "
            f"last row {last}; wall {run['wall_s']:.0f} s; "
            f"{'within' if within else 'OUTSIDE'} the tolerance; {run['log_dir']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
