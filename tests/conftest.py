import os
import warnings
from pathlib import Path

# One intra-op thread in tests and in the CLI subprocesses they start (which inherit the
# variable): measured on the 2-core CI machine, a small MLP step took 2.4 ms with one torch
# thread and 172 ms with two. Tests check behaviour, not speed.
os.environ.setdefault("OMP_NUM_THREADS", "1")

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
