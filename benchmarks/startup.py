"""What the quickstart costs a user in wall time, against Lightning's own import, in one run.

Each case is a fresh process, as a user starts it, from a scratch folder; cases run
interleaved (each once, then again) so that a drift in the machine's load hits all alike:

- ``import lightning.pytorch``: ``python -c "import lightning.pytorch"``, the floor under any
  Lightning app's start (torch, torchmetrics, torchvision and their imports);
- ``mneme fit``: ``mneme fit --config configs/quickstart.yaml`` through the console script,
  with the seconds to its first log line (``Seed set to 0``, printed once the config is
  parsed and before the model is built);
- ``main(), ordinary exit``: the same run through ``mneme.app.cli.main.main`` in
  ``python -c``, which ends through the interpreter's teardown like any Python program
  (what ``mneme`` did before it ended its process itself).

CPU seconds (user + sys) come from ``resource.getrusage(RUSAGE_CHILDREN)``. Medians.

    python -m benchmarks.startup --repeats 3
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
MNEME = str(Path(sys.executable).parent / "mneme")
CASES = {
    "import lightning.pytorch": [sys.executable, "-c", "import lightning.pytorch"],
    "mneme fit": [MNEME, "fit", "--config", QUICKSTART],
    "main(), ordinary exit": [
        sys.executable,
        "-c",
        "import sys; from mneme.app.cli.main import main; main(sys.argv[1:])",
        "fit",
        "--config",
        QUICKSTART,
    ],  # fmt: skip
}
FIRST_LINE = "Seed set to"


def run_case(command: list[str]) -> dict[str, float]:
    """Wall and CPU seconds of one fresh process, and when its first log line came."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    first = float("nan")
    with tempfile.TemporaryDirectory() as cwd:
        start = time.perf_counter()
        process = subprocess.Popen(
            command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        output = []
        for line in process.stdout:
            if FIRST_LINE in line and first != first:
                first = time.perf_counter() - start
            output.append(line)
        process.wait()
        wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if process.returncode != 0:
        raise RuntimeError(f"{command[:3]}: exit {process.returncode}: {output[-3:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "first_line": first}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args(argv)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in CASES}
    for _ in range(opts.repeats):
        for name, command in CASES.items():
            runs[name].append(run_case(command))
    median = {
        name: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
        for name, rs in runs.items()
    }
    floor = median["import lightning.pytorch"]["wall"]
    print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}")  # fmt: skip
    print("| case | wall (s) | / Lightning's import | first log line (s) | CPU (s) | walls |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, m in median.items():
        first = "" if m["first_line"] != m["first_line"] else f"{m['first_line']:.2f}"
        walls = " ".join(f"{r['wall']:.2f}" for r in runs[name])
        print(f"| {name} | {m['wall']:.2f} | {m['wall'] / floor:.2f}x | {first} "
              f"| {m['cpu']:.2f} | {walls} |")  # fmt: skip


if __name__ == "__main__":
    main()
