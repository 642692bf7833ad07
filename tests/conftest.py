import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", message="no QP solver found")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
MNIST_NPZ = SHARED_DATA / "mnist10k.npz"

needs_mnist = pytest.mark.skipif(
    not MNIST_NPZ.is_file(), reason="../shared/data/mnist10k.npz absent"
)


def digits_stream(n_experiences: int = 5, **benchmark_args) -> dict:
    """ContinualDataModule arguments for SplitDigits."""
    return {
        "benchmark": "datamodules.SplitDigits",
        "benchmark_args": {"n_experiences": n_experiences, **benchmark_args},
    }


@pytest.fixture(scope="session", autouse=True)
def _run_in_a_scratch_folder(tmp_path_factory):
    """Trainers without a logger write next to the working directory (Lightning's default
    root dir); keep that out of the checkout."""
    import os

    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(previous)
