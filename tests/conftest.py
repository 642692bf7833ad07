import contextlib
import os
import warnings
from pathlib import Path

# One intra-op thread in tests and in the CLI subprocesses they start (which inherit the
# variable): measured on the 2-core CI machine, a small MLP step took 2.4 ms with one torch
# thread and 172 ms with two. Tests check behaviour, not speed.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The tests' own callbacks (tests.killer.KillAt, ...) are classes a config may name, trusted
# as a user trusts theirs: from the environment, never from a config (app/cli/raw_config.py);
# inherited by the forked and DDP processes the tests start.
os.environ.setdefault("MNEME_TRUSTED_CLASSES", "tests.")

from mneme.app.cli.lazy_imports import defer_unused_imports  # noqa: E402

defer_unused_imports()  # as the `mneme` command does, before timm and Avalanche load

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

warnings.filterwarnings("ignore", message="no QP solver found")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
MNIST_NPZ = SHARED_DATA / "mnist10k.npz"

needs_mnist = pytest.mark.skipif(
    not MNIST_NPZ.is_file(), reason="../shared/data/mnist10k.npz absent"
)


def quiet_trainer(datamodule, tmp_path=None, callbacks=(), **trainer_args):
    """A CPU trainer with the stream's schedule, and no logger, bar, summary or checkpoints."""
    from lightning.pytorch import Trainer

    args = {
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": tmp_path,
        **trainer_args,
    }
    return Trainer(callbacks=list(callbacks), **args, **datamodule.trainer_settings())


def digits_stream(n_experiences: int = 5, **benchmark_args) -> dict:
    """ContinualDataModule arguments for SplitDigits."""
    return {
        "benchmark": "mneme.datamodules.SplitDigits",
        "benchmark_args": {"n_experiences": n_experiences, **benchmark_args},
    }


@pytest.fixture(autouse=True)
def _seed_the_global_generators():
    """Every test starts from the same state of torch's, numpy's and Python's global
    generators, so that a test's unseeded draws (``torch.randn(...)`` inputs, a module's
    initial weights) are the same whichever tests ran before it, in any order or xdist
    worker: a test that passes once passes every time (test_export's quantized ONNX check
    failed on a fresh clone from one unlucky global draw)."""
    import random

    import numpy as np

    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


@pytest.fixture(autouse=True)
def _restore_the_run_seed():
    """``seed_everything`` sets ``PL_GLOBAL_SEED``, which Mneme's seeds default to: a test
    that seeds a run in this process must not decide the next test's draws."""
    previous = os.environ.get("PL_GLOBAL_SEED")
    yield
    if previous is None:
        os.environ.pop("PL_GLOBAL_SEED", None)
    else:
        os.environ["PL_GLOBAL_SEED"] = previous


@pytest.fixture(scope="session", autouse=True)
def _run_in_a_scratch_folder(tmp_path_factory):
    """Trainers without a logger write next to the working directory (Lightning's default
    root dir); keep that out of the checkout."""
    import os

    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(previous)


# -- the `mneme` command in this process ------------------------------------------------------
# A subprocess per CLI run pays Python's imports of Lightning, Avalanche and timm again (about
# 12 CPU seconds on the 2-core CI machine, more than a short run trains); most CLI tests run
# `main(argv)` here instead. What needs a real process stays in one: signals, SIGKILL, DDP's
# launcher, environment variables read at import, the console script itself.


@contextlib.contextmanager
def isolated_global_state():
    """Restore what an in-process ``mneme`` run changes for the whole process: warnings
    filters (``quiet_known_noise``), environment variables (``PL_GLOBAL_SEED``,
    ``PL_SEED_WORKERS``, ``CUBLAS_WORKSPACE_CONFIG``), torch's deterministic mode
    (``--trainer.deterministic``) and thread counts, the global RNGs (``seed_everything``),
    the handlers and filters of existing loggers, ``sys.argv`` and the working directory.
    Loggers that libraries create when first imported stay: an import cannot be undone."""
    import logging
    import random
    import sys

    import numpy as np

    loggers = [logging.getLogger()] + [
        logger for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]  # fmt: skip
    logging_state = [(lg, lg.level, list(lg.handlers), list(lg.filters), lg.propagate)
                     for lg in loggers]  # fmt: skip
    environ, argv, cwd = dict(os.environ), list(sys.argv), os.getcwd()
    torch_state = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.get_float32_matmul_precision(),
        torch.get_num_threads(),
        torch.is_grad_enabled(),
        torch.get_default_dtype(),
    )
    rngs = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        with warnings.catch_warnings():  # restores warnings.filters and showwarning
            yield
    finally:
        os.chdir(cwd)
        sys.argv = argv
        os.environ.clear()
        os.environ.update(environ)
        deterministic, warn_only, benchmark, cudnn_deterministic, *rest = torch_state
        precision, threads, grad, dtype = rest
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        torch.backends.cudnn.deterministic = cudnn_deterministic
        torch.set_float32_matmul_precision(precision)
        torch.set_num_threads(threads)
        torch.set_grad_enabled(grad)
        torch.set_default_dtype(dtype)
        torch.random.set_rng_state(rngs[0])
        np.random.set_state(rngs[1])
        random.setstate(rngs[2])
        for logger, level, handlers, filters, propagate in logging_state:
            logger.setLevel(level)
            logger.handlers[:], logger.filters[:] = handlers, filters
            logger.propagate = propagate


def mneme_in_process(args: list[str], cwd: Path, env: dict | None = None):
    """``mneme <args>`` run in this process, in ``cwd``: what a subprocess would report (its
    status, stdout and stderr, the traceback of an escaping exception) as a
    ``subprocess.CompletedProcess``, without paying the imports again. ``env``: variables
    set for the run only. The process's global state is restored after it
    (:func:`isolated_global_state`)."""
    import io
    import subprocess
    import sys
    import traceback

    from mneme.app.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    status = 0
    with isolated_global_state():
        os.environ.pop("MNEME_DEBUG", None)
        os.environ.update(env or {})
        os.chdir(cwd)
        sys.argv = ["mneme"]  # LightningCLI warns when both argv and args are given
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(args)
            except SystemExit as exit_:  # as the interpreter reports an uncaught one
                if isinstance(exit_.code, str):
                    print(exit_.code, file=sys.stderr)
                status = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
            except BaseException:  # noqa: BLE001 - reported as a process would report it
                traceback.print_exc()
                status = 1
    return subprocess.CompletedProcess(args, status, out.getvalue(), err.getvalue())


def mneme_in_fork(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 600):
    """``mneme <args>`` in a process of its own, forked from this one: for runs that a signal
    ends (SIGKILL, SIGTERM, SIGINT), as the console script runs them (``console_main``, a
    fresh process's signal handlers, stdout and stderr of its own), without importing torch
    and Lightning again, which costs a new interpreter more than these runs train. ``env``
    is set in the child (``TMPDIR`` read again, as a new process reads it); what is read
    when torch loads (``OMP_*``) and DDP (the launcher re-runs the console script per rank)
    still need a real subprocess.
    Returns what ``subprocess.run`` would (a signal's status is minus its number)."""
    import logging
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    import traceback

    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()  # noqa: SIM115
    pid = os.fork()
    if pid == 0:  # the child: it ends here, never back in pytest
        try:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - not pytest's capture
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
                for handler in list(getattr(logger, "handlers", [])):
                    if type(handler).__module__.startswith("_pytest"):
                        logger.removeHandler(handler)
                    elif type(handler) is logging.StreamHandler:
                        handler.setStream(sys.stderr)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.chdir(cwd)
            os.environ.pop("MNEME_DEBUG", None)
            os.environ.update(env or {})
            tempfile.tempdir = None  # tempfile reads TMPDIR again at its next use
            sys.argv = ["mneme", *args]
            from mneme.app.cli.main import console_main

            console_main()  # ends the process
        except BaseException:  # noqa: BLE001 - reported as the interpreter would
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(1)
    deadline = time.monotonic() + timeout
    while (ended := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise subprocess.TimeoutExpired(args, timeout)
        time.sleep(0.05)
    texts = []
    for file in (out, err):
        file.seek(0)
        texts.append(file.read().decode(errors="replace"))
        file.close()
    return subprocess.CompletedProcess(args, os.waitstatus_to_exitcode(ended[1]), *texts)


QUICK_CONFIGS = ("quickstart", "align_digits")  # each runs in well under a minute on one thread


@pytest.fixture(scope="session")
def quick_config_runs(tmp_path_factory, worker_id) -> dict[str, dict]:
    """``mneme fit --config configs/<name>.yaml`` for the quick configs, as a user runs it:
    the console script, in a process of its own, in a scratch folder. Run once for the
    session (test_cli, test_expected_results and test_align read the same runs): under
    pytest-xdist the first worker to ask runs them, under a lock, in the folder the workers
    share, and the others read its record. Each: ``cwd``, ``log_dir``, ``stdout``,
    ``stderr``, ``returncode`` and ``metrics`` (its continual_metrics.json, or None if the
    run failed)."""
    import json

    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    root = root if worker_id == "master" else root.parent  # the workers' common folder
    record = root / "quick_config_runs.json"
    with FileLock(f"{record}.lock"):
        if not record.is_file():
            record.write_text(json.dumps(run_quick_configs(root / "quick_configs"), default=str))
        runs = json.loads(record.read_text())
    for run in runs.values():
        run["cwd"] = Path(run["cwd"])
        run["log_dir"] = run["log_dir"] and Path(run["log_dir"])
    return runs


def run_quick_configs(base: Path) -> dict[str, dict]:
    """The quick configs' runs in folders under ``base``, the two together (one thread
    each: the CI machine has 2 cores)."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("MNEME_DEBUG", None)
    script = Path(sys.executable).parent / "mneme"
    started = {}
    for name in QUICK_CONFIGS:
        cwd = base / name
        cwd.mkdir(parents=True)
        out, err = open(cwd / "stdout.txt", "w"), open(cwd / "stderr.txt", "w")  # noqa: SIM115
        args = [str(script), "fit", "--config", str(ROOT / "configs" / f"{name}.yaml")]
        process = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        started[name] = cwd, process, out, err
    runs = {}
    for name, (cwd, process, out, err) in started.items():
        process.wait(timeout=900)
        out.close(), err.close()
        logs = sorted((cwd / "logs" / name).glob("version_*"))
        log_dir = logs[0] if len(logs) == 1 else None
        metrics_file = log_dir / "continual_metrics.json" if log_dir else None
        runs[name] = {
            "cwd": cwd,
            "log_dir": log_dir,
            "returncode": process.returncode,
            "stdout": (cwd / "stdout.txt").read_text(),
            "stderr": (cwd / "stderr.txt").read_text(),
            "metrics": json.loads(metrics_file.read_text())
            if metrics_file and metrics_file.is_file() and process.returncode == 0
            else None,
        }
    return runs


@pytest.fixture
def quick_run(quick_config_runs):
    """One quick config's run (``quick_run("quickstart")``), asserted to have succeeded."""

    def run(name: str) -> dict:
        result = quick_config_runs[name]
        assert result["returncode"] == 0, f"{name}: {result['stderr'][-3000:]}"
        assert result["log_dir"] is not None and result["metrics"] is not None, name
        return result

    return run
