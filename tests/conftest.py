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


def digits_benchmark(n_experiences: int = 5, **init_args) -> dict:
    return {
        "class_path": "datamodules.SplitDigits",
        "init_args": {"n_experiences": n_experiences, **init_args},
    }
