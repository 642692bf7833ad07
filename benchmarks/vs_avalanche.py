"""Mneme against Avalanche 0.6's own strategies and a plain PyTorch loop.

Same streams (the very same Avalanche scenario objects), same model (MLP 784-400-400-10,
same initial weights per seed), same optimizer (SGD lr 0.01, momentum 0.9), batch 64,
``--epochs`` per experience; the accuracy matrix is measured on the whole test stream after
each experience. Three runners per (stream, strategy, seed):

- ``avalanche``: ``avalanche.training.Naive`` / ``EWC(ewc_lambda=100, mode="separate")`` /
  ``Replay(mem_size=500)`` / ``LwF(alpha=1, temperature=2)``; training time = the
  ``train()`` calls, evaluation (``eval()``) timed apart.
- ``mneme``: ``lightning.pytorch.Trainer`` + ``ContinualDataModule`` + ``ContinualClassifier``
  + ``ContinualMetrics`` + the strategy callback, in process; training time = the train
  epochs (experience-start/-end work of the strategy included, validation excluded).
- ``plain``: :func:`benchmarks.plain.run_plain`.

Quick smoke run::

    python -m benchmarks.vs_avalanche --seeds 0 --epochs 1 --strategies naive --streams split

Full run (3 seeds, 5 epochs, every strategy, stream and runner)::

    python -m benchmarks.vs_avalanche
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import re
import shlex
import sys
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.plain import (
    DEFAULT_DATA,
    REPO,
    STRATEGIES,
    STREAMS,
    copy_weights,
    mean_std,
    mlp,
    run_plain,
    shared_scenario,
)

RUNNERS = ("avalanche", "mneme", "plain")
N_EXPERIENCES = 5
BATCH_SIZE, EVAL_BATCH_SIZE = 64, 512
LR, MOMENTUM = 0.01, 0.9
EWC_LAMBDA = 100.0  # Avalanche's convention: penalty λ Σ F (θ-θ*)²
MEM_SIZE = 500
LWF_ALPHA, LWF_TEMPERATURE = 1.0, 2.0
MD_START, MD_END = "<!-- vs_avalanche:start -->", "<!-- vs_avalanche:end -->"


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -- Avalanche ------------------------------------------------------------------------------
def run_avalanche(scenario, strategy: str, seed: int, epochs: int, threads: int) -> dict[str, Any]:
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import EWC, LwF, Naive, Replay
    from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin

    class EpochClock(SupervisedPlugin):
        """Time of the training epochs (the steps), and the number of steps."""

        def __init__(self) -> None:
            super().__init__()
            self.steps_time, self.steps, self._t0 = 0.0, 0, 0.0

        def before_training_epoch(self, strategy, **kwargs):
            self._t0 = time.perf_counter()

        def after_training_iteration(self, strategy, **kwargs):
            self.steps += 1

        def after_training_epoch(self, strategy, **kwargs):
            self.steps_time += time.perf_counter() - self._t0

    torch.set_num_threads(threads)
    start = time.perf_counter()
    _seed_all(seed)
    model = mlp(seed)
    clock = EpochClock()
    common = dict(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM),
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=BATCH_SIZE,
        train_epochs=epochs,
        eval_mb_size=EVAL_BATCH_SIZE,
        device="cpu",
        plugins=[clock],
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]),
    )
    if strategy == "naive":
        cl = Naive(**common)
    elif strategy == "ewc":
        cl = EWC(ewc_lambda=EWC_LAMBDA, mode="separate", **common)
    elif strategy == "replay":
        cl = Replay(mem_size=MEM_SIZE, **common)
    else:
        cl = LwF(alpha=LWF_ALPHA, temperature=LWF_TEMPERATURE, **common)

    rows, train_time, eval_time = [], 0.0, 0.0
    n_test = len(scenario.test_stream)
    for experience in scenario.train_stream:
        t0 = time.perf_counter()
        cl.train(experience, num_workers=0)
        train_time += time.perf_counter() - t0
        t0 = time.perf_counter()
        results = cl.eval(scenario.test_stream, num_workers=0)
        eval_time += time.perf_counter() - t0
        row = [float("nan")] * n_test
        for key, value in results.items():
            match = re.match(r"Top1_Acc_Exp/eval_phase/test_stream/Task\d+/Exp(\d+)$", key)
            if match:
                row[int(match.group(1))] = float(value)
        rows.append(row)
    return {
        "accuracy_matrix": rows,
        "train_time_s": train_time,
        "steps_time_s": clock.steps_time,
        "steps": clock.steps,
        "eval_time_s": eval_time,
        "whole_time_s": time.perf_counter() - start,
    }


# -- Mneme ----------------------------------------------------------------------------------
def _mneme_clock():
    """Two callbacks sharing one clock: put ``first`` first and ``last`` last in the list.

    ``steps_time``: from the first ``on_train_epoch_start`` hook after the strategies' own
    to the start of validation (or the epoch end); ``boundary_time``: the callbacks'
    ``on_train_epoch_start`` and ``on_train_epoch_end`` work (teacher copy, Fisher, buffer
    update); ``val_time``: validation, excluded from training time.
    """
    from lightning.pytorch import Callback

    clock = {"steps": 0.0, "boundary": 0.0, "val": 0.0, "t0": None, "t1": None, "tv": None}
    now = time.perf_counter

    class First(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            clock["t0"] = now()

        def on_validation_start(self, trainer, pl_module):
            if clock["t0"] is not None:  # inside a training epoch
                clock["steps"] += now() - clock["t0"]
                clock["t0"] = None
            clock["tv"] = now()

        def on_validation_end(self, trainer, pl_module):
            if clock["tv"] is not None:
                clock["val"] += now() - clock["tv"]
                clock["tv"] = None
                clock["t1"] = now()

        def on_train_epoch_end(self, trainer, pl_module):
            if clock["t0"] is not None:
                clock["steps"] += now() - clock["t0"]
                clock["t0"] = None
                clock["t1"] = now()

    class Last(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            # The strategies' experience-start work ran since First's hook.
            t = now()
            clock["boundary"] += t - clock["t0"]
            clock["t0"] = t

        def on_train_epoch_end(self, trainer, pl_module):
            clock["boundary"] += now() - clock["t1"]

    return clock, First(), Last()


def mneme_strategy_callbacks(strategy: str, seed: int) -> list:
    """Mneme's callbacks with the settings of the Avalanche strategies."""
    if strategy == "naive":
        return []
    if strategy == "ewc":
        from mneme.callbacks.strategies.ewc import EWC

        # Mneme's penalty is λ/2 Σ F (θ-θ*)²: twice Avalanche's λ for the same penalty.
        return [EWC(ewc_lambda=2 * EWC_LAMBDA, mode="separate", seed=seed)]
    if strategy == "replay":
        from mneme.callbacks.strategies.replay import Replay

        return [
            Replay(
                buffer_size=MEM_SIZE,
                policy="reservoir",
                replay_batch_size=BATCH_SIZE,
                seed=seed,
            )
        ]
    from mneme.callbacks.strategies.lwf import LwF

    return [LwF(alpha=LWF_ALPHA, temperature=LWF_TEMPERATURE)]


def run_mneme(
    stream: str, path: str, strategy: str, seed: int, epochs: int, threads: int, profile=None
) -> dict[str, Any]:
    from lightning.pytorch import Trainer, seed_everything
    from mneme.app.models.classifier import ContinualClassifier
    from mneme.callbacks.reporting.continual_metrics import ContinualMetrics
    from mneme.datamodules import ContinualDataModule

    torch.set_num_threads(threads)
    start = time.perf_counter()
    seed_everything(seed, verbose=False)
    from mneme.datamodules.streams.registry import stream as register_stream

    from benchmarks.plain import shared_scenario

    register_stream(shared_scenario)  # this repository's own, trusted by the code running it
    datamodule = ContinualDataModule(
        benchmark="benchmarks.plain.shared_scenario",
        benchmark_args={"stream": stream, "path": path, "n_experiences": N_EXPERIENCES},
        epochs_per_experience=epochs,
        batch_size=BATCH_SIZE,
        eval_batch_size=EVAL_BATCH_SIZE,
        seed=seed,
    )
    model = ContinualClassifier(
        encoder="mneme_mlp",
        encoder_args={"hidden": [400, 400]},
        optimizer=partial(torch.optim.SGD, lr=LR, momentum=MOMENTUM),
        mask_unseen_classes=False,
        num_classes=10,
        num_tasks=1,
        input_shape=(1, 28, 28),
    )
    copy_weights(mlp(seed), model)
    clock, first, last = _mneme_clock()
    metrics = ContinualMetrics(print_table=False)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[first, metrics, *mneme_strategy_callbacks(strategy, seed), last],
        **datamodule.trainer_settings(),
    )
    if profile is not None:
        profile.enable()
    trainer.fit(model, datamodule=datamodule)
    if profile is not None:
        profile.disable()
    whole = time.perf_counter() - start
    return {
        "accuracy_matrix": metrics.rows,
        "train_time_s": clock["steps"] + clock["boundary"],
        "steps_time_s": clock["steps"],
        "steps": trainer.global_step,
        "eval_time_s": clock["val"],
        "whole_time_s": whole,
    }


# -- running and reporting ------------------------------------------------------------------
def _warm_up(threads: int, steps: int = 30) -> None:
    """A few training steps so that the first runner does not pay the kernels' warm-up."""
    torch.set_num_threads(threads)
    model = mlp(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    x, y = torch.randn(BATCH_SIZE, 1, 28, 28), torch.randint(10, (BATCH_SIZE,))
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def machine() -> dict[str, Any]:
    import avalanche
    import lightning

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "nproc": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "avalanche": avalanche.__version__,
    }


def summarize_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from mneme.app.core.metrics import summarize

    for run in runs:
        s = summarize(run["accuracy_matrix"])
        run["average_accuracy"], run["forgetting"] = s["average_accuracy"], s["forgetting"]
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["stream"], run["strategy"], run["runner"]), []).append(run)
    rows = []
    for (stream, strategy, runner), members in groups.items():
        row = {"stream": stream, "strategy": strategy, "runner": runner, "seeds": len(members)}
        for key in (
            "average_accuracy",
            "forgetting",
            "train_time_s",
            "steps_time_s",
            "whole_time_s",
        ):
            values = [m[key] for m in members if m[key] is not None]
            row[key], row[key + "_std"] = mean_std(values) if values else (None, None)
        step_ms = [1000 * m["steps_time_s"] / m["steps"] for m in members if m["steps"]]
        row["step_ms"], row["step_ms_std"] = mean_std(step_ms) if step_ms else (None, None)
        rows.append(row)
    by_key = {(r["stream"], r["strategy"], r["runner"]): r for r in rows}
    for row in rows:
        key = (row["stream"], row["strategy"])
        mneme, plain, ava = (by_key.get((*key, r)) for r in ("mneme", "plain", "avalanche"))
        row["mneme_over_plain"] = (
            mneme["train_time_s"] / plain["train_time_s"] if mneme and plain else None
        )
        row["avalanche_over_mneme"] = (
            ava["train_time_s"] / mneme["train_time_s"] if mneme and ava else None
        )
    return rows


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, checked on the summary (one line each)."""
    by_key = {(r["stream"], r["strategy"], r["runner"]): r for r in rows}
    lines = []
    for (stream, strategy, runner), row in sorted(by_key.items()):
        if runner != "mneme":
            continue
        ava, plain = (
            by_key.get((stream, strategy, "avalanche")),
            by_key.get((stream, strategy, "plain")),
        )
        tag = f"{stream}/{strategy}"
        if ava:
            gap = row["average_accuracy"] - ava["average_accuracy"]
            ok = gap >= -0.01
            lines.append(
                f"{'PASS' if ok else 'FAIL'} {tag}: accuracy Mneme - Avalanche = {gap:+.3f}"
                " (>= -0.010)"
            )
            need = 2.0 if strategy == "ewc" else 1.0
            ratio = row["avalanche_over_mneme"]
            ok = ratio > need if need == 1.0 else ratio >= need
            lines.append(
                f"{'PASS' if ok else 'FAIL'} {tag}: Avalanche/Mneme training time = "
                f"{ratio:.2f}x ({'>' if need == 1.0 else '>='} {need:.0f}x)"
            )
        if plain:
            ratio = row["mneme_over_plain"]
            lines.append(
                f"{'PASS' if ratio <= 1.15 else 'FAIL'} {tag}: Mneme/plain training "
                f"time = {ratio:.2f}x (<= 1.15x)"
            )
        if strategy == "ewc":
            naive = by_key.get((stream, "naive", "mneme"))
            if naive and naive["step_ms"]:
                ratio = row["step_ms"] / naive["step_ms"]
                lines.append(
                    f"{'PASS' if ratio <= 1.2 else 'FAIL'} {tag}: Mneme EWC/naive time "
                    f"per step = {ratio:.2f}x (<= 1.2x)"
                )
    return lines


def _pm(mean, std, fmt="{:.3f}") -> str:
    if mean is None:
        return "n/a"
    return f"{fmt.format(mean)} ± {fmt.format(std)}"


def markdown(result: dict[str, Any]) -> str:
    m, cfg, load = result["machine"], result["config"], result["load_average"]
    full = (
        cfg["seeds"] == [0, 1, 2]
        and cfg["epochs"] == 5
        and cfg["threads"] == 2
        and set(cfg["strategies"]) == set(STRATEGIES)
        and set(cfg["streams"]) == set(STREAMS)
        and set(cfg["runners"]) == set(RUNNERS)
    )
    lines = [
        MD_START,
        "## Mneme vs Avalanche vs plain PyTorch",
        "",
        f"Machine: {m['cpu']}, `nproc` = {m['nproc']}, torch.set_num_threads({cfg['threads']}); "
        f"Python {m['python']}, torch {m['torch']}, Lightning {m['lightning']}, "
        f"Avalanche {m['avalanche']}. Run finished {result['finished']}.",
        "",
        "```bash",
        result["command"],
        "```",
        "",
        *(
            []
            if full
            else [
                "**Smoke run, not the issue's settings** (those are 3 seeds, 5 epochs, 2 threads, "
                "every strategy, stream and runner: `python -m benchmarks.vs_avalanche`).",
                "",
            ]
        ),
        *(
            [
                f"Load average before/after the run: {load['start'][0]:.2f} / "
                f"{load['end'][0]:.2f} (other processes competed for the cores: times are "
                "inflated and noisy).",
                "",
            ]
            if max(load["start"][0], load["end"][0]) > 0.5
            else []
        ),
        f"MLP 784-400-400-10, SGD lr {LR} momentum {MOMENTUM}, batch {BATCH_SIZE}, "
        f"{cfg['epochs']} epoch(s) per experience, {N_EXPERIENCES} experiences, seeds "
        f"{cfg['seeds']}; EWC λ={EWC_LAMBDA:g} (Avalanche's convention; Mneme's callback gets "
        f"{2 * EWC_LAMBDA:g} for its λ/2), separate; replay 500 samples (reservoir in Mneme and "
        f"plain, Avalanche's experience-balanced default), 64 replayed per batch; "
        f"LwF α={LWF_ALPHA:g}, "
        f"T={LWF_TEMPERATURE:g}. Accuracy = final average accuracy over the test stream; "
        "forgetting as in the README. Training time: Avalanche's `train()` calls, Mneme's "
        "training epochs with the strategies' experience-start/-end work (validation "
        "excluded), the plain loop's epochs and experience-end work. ms/step: epoch time "
        "(without experience-end work) per optimizer step. Whole run: from building the "
        "model/datamodule (Mneme and plain materialize the shared scenario into tensors) to "
        "the last evaluation. Mean ± std over seeds.",
        "",
        "| stream | strategy | runner | avg accuracy | forgetting | train time (s) | ms/step "
        "| whole run (s) | Mneme/plain (train) | Avalanche/Mneme (train) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["summary"]:
        is_mneme = r["runner"] == "mneme"
        ratio1 = f"{r['mneme_over_plain']:.2f}x" if is_mneme and r["mneme_over_plain"] else ""
        ratio2 = (
            f"{r['avalanche_over_mneme']:.2f}x" if is_mneme and r["avalanche_over_mneme"] else ""
        )
        lines.append(
            f"| {r['stream']} | {r['strategy']} | {r['runner']} "
            f"| {_pm(r['average_accuracy'], r['average_accuracy_std'])} "
            f"| {_pm(r['forgetting'], r['forgetting_std'])} "
            f"| {_pm(r['train_time_s'], r['train_time_s_std'], '{:.1f}')} "
            f"| {_pm(r['step_ms'], r['step_ms_std'], '{:.2f}')} "
            f"| {_pm(r['whole_time_s'], r['whole_time_s_std'], '{:.1f}')} "
            f"| {ratio1} | {ratio2} |"
        )
    checks = targets(result["summary"])
    if checks:
        lines += ["", "Targets (issue):", ""] + [f"- {c}" for c in checks]
    lines.append(MD_END)
    return "\n".join(lines)


def write_markdown(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if MD_START in text and MD_END in text:
        head, rest = text.split(MD_START, 1)
        tail = rest.split(MD_END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def _csv(kind, choices=None):
    def parse(text: str):
        values = [kind(v) for v in text.split(",") if v.strip()]
        if choices is not None:
            bad = [v for v in values if v not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"{bad} not in {list(choices)}")
        return values

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.vs_avalanche", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--strategies",
        type=_csv(str, STRATEGIES),
        default=list(STRATEGIES),
        help="comma-separated: naive,ewc,replay,lwf",
    )
    p.add_argument(
        "--streams",
        type=_csv(str, STREAMS),
        default=list(STREAMS),
        help="comma-separated: split,permuted",
    )
    p.add_argument("--seeds", type=_csv(int), default=[0, 1, 2], help="comma-separated: 0,1,2")
    p.add_argument("--epochs", type=int, default=5, help="epochs per experience")
    p.add_argument(
        "--runners",
        type=_csv(str, RUNNERS),
        default=list(RUNNERS),
        help="comma-separated: avalanche,mneme,plain",
    )
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the mnist10k.npz file")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results_vs_avalanche.json"))
    p.add_argument(
        "--markdown",
        default=str(REPO / "benchmarks" / "RESULTS.md"),
        help="file whose vs_avalanche section is replaced ('' for none)",
    )
    p.add_argument(
        "--profile", default="", help="cProfile the Mneme runs' trainer.fit into this .prof file"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    _quiet()
    torch.set_num_threads(args.threads)
    # Import everything up front so that no runner pays the imports in its wall time.
    import avalanche.training  # noqa: F401
    import lightning.pytorch  # noqa: F401
    import mneme.app.models.classifier  # noqa: F401
    import mneme.callbacks.reporting.continual_metrics  # noqa: F401

    _quiet()  # after Lightning's import, which sets its loggers' levels

    command = "python -m benchmarks.vs_avalanche" + (
        " " + shlex.join(sys.argv[1:] if argv is None else argv)
        if (sys.argv[1:] if argv is None else argv)
        else ""
    )
    profile = None
    if args.profile:
        import cProfile

        profile = cProfile.Profile()

    load_start = os.getloadavg()
    if load_start[0] > 0.5:
        print(
            f"warning: load average {load_start[0]:.2f} before the run: other processes "
            "compete for the cores and the times are not comparable",
            flush=True,
        )
    _warm_up(args.threads)
    runs = []
    for stream in args.streams:
        scenario = shared_scenario(stream, args.data, N_EXPERIENCES)
        for strategy in args.strategies:
            for seed in args.seeds:
                # Rotate the runner order per seed so that no runner always goes first.
                shift = args.seeds.index(seed) % len(args.runners)
                for runner in args.runners[shift:] + args.runners[:shift]:
                    t0 = time.perf_counter()
                    if runner == "avalanche":
                        out = run_avalanche(scenario, strategy, seed, args.epochs, args.threads)
                    elif runner == "mneme":
                        out = run_mneme(
                            stream, args.data, strategy, seed, args.epochs, args.threads, profile
                        )
                    else:
                        out = run_plain(
                            scenario,
                            strategy,
                            seed,
                            args.epochs,
                            ewc_lambda=EWC_LAMBDA,
                            buffer_size=MEM_SIZE,
                            lwf_alpha=LWF_ALPHA,
                            lwf_temperature=LWF_TEMPERATURE,
                            threads=args.threads,
                        )
                    out.update(stream=stream, strategy=strategy, runner=runner, seed=seed)
                    runs.append(out)
                    from mneme.app.core.metrics import average_accuracy

                    print(
                        f"{stream:8s} {strategy:6s} seed={seed} {runner:9s} "
                        f"acc={average_accuracy(out['accuracy_matrix']):.3f} "
                        f"train={out['train_time_s']:.1f}s steps={out['steps']} "
                        f"({1000 * out['steps_time_s'] / max(out['steps'], 1):.2f} ms/step) "
                        f"whole={out['whole_time_s']:.1f}s [{time.perf_counter() - t0:.1f}s]",
                        flush=True,
                    )
    if profile is not None:
        profile.dump_stats(args.profile)
    result = {
        "machine": machine(),
        "command": command,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "config": {
            "streams": args.streams,
            "strategies": args.strategies,
            "seeds": args.seeds,
            "epochs": args.epochs,
            "runners": args.runners,
            "threads": args.threads,
            "data": args.data,
            "n_experiences": N_EXPERIENCES,
            "batch_size": BATCH_SIZE,
            "lr": LR,
            "momentum": MOMENTUM,
            "ewc_lambda_avalanche": EWC_LAMBDA,
            "mem_size": MEM_SIZE,
            "lwf": {"alpha": LWF_ALPHA, "temperature": LWF_TEMPERATURE},
        },
        "runs": runs,
    }
    result["summary"] = summarize_runs(runs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    section = markdown(result)
    if args.markdown:
        write_markdown(Path(args.markdown), section)
    print(section)
    return result


if __name__ == "__main__":
    main()
