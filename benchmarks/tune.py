"""A 20-trial ``mneme tune`` search for EWC's lambda on permuted MNIST-10k.

Runs the shipped search (``configs/tune_ewc_lambda.yaml``: 5 permutations of the 10,000
offline MNIST digits, 1 epoch each, MLP 784-256-256-10, SGD lr 0.01 momentum 0.9, batch 64;
``configs/tune_ewc_lambda.search.yaml``: ewc_lambda log-uniform in [1, 2000], TPE seeded,
median pruner from experience 1) in a fresh study folder, and one ``mneme fit`` of the
config's default lambda. Reports the best lambda and its average accuracy and forgetting
against the default's, the search's wall time, and how many trials the pruner stopped (and
at which experience). ``--append`` adds the table to ``benchmarks/RESULTS.md``.

    OMP_NUM_THREADS=1 python -m benchmarks.tune --trials 20 [--append]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tune_ewc_lambda.yaml"
SEARCH = ROOT / "configs" / "tune_ewc_lambda.search.yaml"
KEY = "trainer.callbacks.EWC.ewc_lambda"


def default_run(workdir: Path) -> dict:
    """The config as it is (its own lambda), through ``mneme fit``."""
    from mneme.app.cli.parser import build_cli
    from mneme.app.cli.run_folders import release_claims

    logs = workdir / "default"
    try:
        build_cli(
            ["fit", "--config", str(CONFIG), "--trainer.logger.init_args.save_dir", str(logs)]
        )
    finally:
        release_claims()
    (metrics,) = logs.glob("*/version_*/continual_metrics.json")
    return json.loads(metrics.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--append", action="store_true", help="append to benchmarks/RESULTS.md")
    args = parser.parse_args()

    import yaml
    from mneme.app.cli.tune_command import tune
    from optuna.trial import TrialState

    os.chdir(ROOT)  # the config reads ../shared/data relative to the checkout
    workdir = Path(tempfile.mkdtemp(prefix="bench_tune_"))
    default_lambda = yaml.safe_load(CONFIG.read_text())["trainer"]["callbacks"][0]["init_args"][
        "ewc_lambda"
    ]
    t0 = time.perf_counter()
    default = default_run(workdir)
    default_s = time.perf_counter() - t0
    t0, cpu0 = time.perf_counter(), time.process_time()
    study = tune(["--config", str(CONFIG)], str(SEARCH), args.trials, str(workdir / "study"))
    search_s, search_cpu = time.perf_counter() - t0, time.process_time() - cpu0

    states = [t.state for t in study.trials]
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    where = sorted(max(t.intermediate_values) for t in pruned)
    best = study.best_trial
    best_metrics = json.loads(
        (Path(best.user_attrs["run_dir"]) / "continual_metrics.json").read_text()
    )
    lambdas = sorted(
        (t.params[KEY], t.value) for t in study.trials if t.state == TrialState.COMPLETE
    )
    result = {
        "trials": args.trials,
        "complete": states.count(TrialState.COMPLETE),
        "pruned": len(pruned),
        "pruned_at_experience": where,
        "failed": states.count(TrialState.FAIL),
        "search_wall_s": round(search_s, 1),
        "search_cpu_s": round(search_cpu, 1),
        "default_fit_wall_s": round(default_s, 1),
        "best_lambda": best.params[KEY],
        "best": {k: best_metrics[k] for k in ("average_accuracy", "forgetting")},
        "default_lambda": default_lambda,
        "default": {k: default[k] for k in ("average_accuracy", "forgetting")},
        "complete_trials": [[round(x, 2), round(v, 4)] for x, v in lambdas],
        "machine": f"{platform.machine()} {os.cpu_count()} cores, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
    }
    print(json.dumps(result, indent=2))
    if args.append:
        append(result)
    shutil.rmtree(workdir, ignore_errors=True)


def append(r: dict) -> None:
    default, best = r["default"], r["best"]
    rows = "\n".join([
        f"| {r['default_lambda']:g} (the config's default) | "
        f"{default['average_accuracy']:.3f} | {default['forgetting']:.3f} |",
        f"| {r['best_lambda']:.1f} (best of the search) | "
        f"{best['average_accuracy']:.3f} | {best['forgetting']:.3f} |",
    ])  # fmt: skip
    trials = ", ".join(f"{x:g}: {v:.3f}" for x, v in r["complete_trials"])
    text = f"""
## Hyperparameter search: EWC's lambda with `mneme tune` (Optuna)

Machine: 2-core CPU, OMP_NUM_THREADS=1 (shared with other jobs while it ran, so wall times
are upper bounds). Permuted MNIST-10k, 5 permutations, 1 epoch each, MLP 784-256-256-10, SGD
lr 0.01 momentum 0.9, batch 64, seed 0 (`configs/tune_ewc_lambda.yaml`); the search
`configs/tune_ewc_lambda.search.yaml`: `ewc_lambda` log-uniform in [1, 2000], TPE (seed 0, 6
random start-up trials), median pruner on the running average accuracy at each experience
end from experience 1 on (4 start-up trials). One study, one process, {r["trials"]} finished
trials.

    OMP_NUM_THREADS=1 python -m benchmarks.tune --trials {r["trials"]} --append

| lambda | average accuracy | forgetting |
|---|---|---|
{rows}

Search: {r["search_wall_s"]:.0f} s wall ({r["search_cpu_s"]:.0f} s of CPU) for {r["trials"]}
finished trials ({r["complete"]} complete, {r["pruned"]} pruned by the median pruner, at
experiences {r["pruned_at_experience"]}; {r["failed"]} failed); one fit of the default took
{r["default_fit_wall_s"]:.0f} s. Complete trials (lambda, average accuracy): {trials}.
"""
    with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
