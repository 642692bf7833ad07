"""How the CPU thread setting changes a whole ``mneme fit``, on an idle and on a busy machine.

Each case runs ``mneme fit --config configs/<config>.yaml`` in a fresh process (imports
included, as a user sees it) under one thread setting, with ``--busy N`` other processes
spinning on a core each (the situation of a shared machine, a second job, or a test run
beside the training). Settings:

- ``mneme``: no environment variable; what Mneme picks (``cpu_threads: auto``: OpenMP's
  passive wait policy, set before torch loads, then one thread for a model under 2M
  parameters and one per usable core above);
- ``torch``: Mneme's choice switched off (``--cpu_threads 0`` and an empty
  ``OMP_WAIT_POLICY``, which Mneme leaves alone): torch's default, one thread per core, with
  OpenMP's default wait (idle threads spin before they sleep);
- ``1``: ``--cpu_threads 1`` with OpenMP's default wait.

Cases run interleaved (every setting once, then again) so that a drift in the machine's
load hits every setting alike; the table gives the median wall time and training seconds
(the run's cost report) and their ratios to the best setting of the same config and load.

    python -m benchmarks.cpu_threads --configs quickstart,split_mnist_replay --busy 0,1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {
    "mneme": ({}, []),
    "torch": ({"OMP_WAIT_POLICY": ""}, ["--cpu_threads", "0"]),
    "1": ({"OMP_WAIT_POLICY": ""}, ["--cpu_threads", "1"]),
}
# A busy core: spins until its time is up or the benchmark that started it is gone (a
# benchmark killed before its cleanup must not leave a core spinning behind it).
SPIN = (
    "import os, time\nparent, end = os.getppid(), time.time() + {s}\n"
    "while time.time() < end and os.getppid() == parent: pass\n"
)


def train_seconds(stdout: str) -> float:
    """The training seconds of a run: the sum of its cost table's ``train s`` column."""
    lines = stdout.split("Cost per experience", 1)[1].splitlines()
    # rows: "exp | trainable total train_s peak_MB ckpt_MB", after the header and a rule
    rows = [line.split("|")[1].split() for line in lines if line.strip()[:1].isdigit()]
    return sum(float(row[2]) for row in rows)


def run_fit(config: str, env_extra: dict, args: list[str]) -> tuple[float, float]:
    """Wall seconds of one ``mneme fit`` in a fresh process (imports included), and the
    seconds it trained (its cost report: the thread setting acts on these)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "GOMP_"))}
    env.update(env_extra)
    config_path = REPO / "configs" / f"{config}.yaml"
    command = [sys.executable, "-m", "mneme.app.cli.main", "fit", "--config", str(config_path)]
    command += ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", *args]
    start = time.perf_counter()
    # from the repository root (configs name ../shared/data relative to it); each run writes
    # its config.yaml into a folder of its own
    with tempfile.TemporaryDirectory() as run_dir:
        command += ["--trainer.default_root_dir", run_dir]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{config} {args}: {result.stderr.strip().splitlines()[-1:]}")
    return wall, train_seconds(result.stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="quickstart,split_mnist_replay")
    parser.add_argument("--busy", default="0,1", help="comma-separated numbers of busy cores")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    opts = parser.parse_args(argv)
    settings = opts.settings.split(",")
    rows = []
    for busy in [int(b) for b in opts.busy.split(",")]:
        spinners = [
            subprocess.Popen([sys.executable, "-c", SPIN.format(s=3600)]) for _ in range(busy)
        ]
        try:
            for config in opts.configs.split(","):
                times: dict[str, list[tuple[float, float]]] = {s: [] for s in settings}
                for _ in range(opts.repeats):
                    for name in settings:
                        env_extra, args = SETTINGS[name]
                        times[name].append(run_fit(config, env_extra, args))
                wall = {s: statistics.median(w for w, _ in t) for s, t in times.items()}
                train = {s: statistics.median(tr for _, tr in t) for s, t in times.items()}
                best_wall, best_train = min(wall.values()), min(train.values())
                for name in settings:
                    rows.append((config, busy, name, wall[name], wall[name] / best_wall,
                                 train[name], train[name] / best_train))  # fmt: skip
                    print(f"{config} busy={busy} {name}: {wall[name]:.2f} s, trained "
                          f"{train[name]:.2f} s", flush=True)  # fmt: skip
        finally:
            for spinner in spinners:
                spinner.kill()
    print(
        f"\nnproc={os.cpu_count()} affinity={len(os.sched_getaffinity(0))}; load before: "
        f"{os.getloadavg()[0]:.2f}; median of {opts.repeats}\n"
    )
    print("| config | busy cores | threads | wall (s) | / best | trained (s) | / best |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for config, busy, name, wall, ratio, train, train_ratio in rows:
        print(f"| {config} | {busy} | {name} | {wall:.2f} | {ratio:.2f}x | {train:.2f} "
              f"| {train_ratio:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
