"""Offline benchmark streams, built with Avalanche's own generators.

Each factory returns an Avalanche scenario (``train_stream``/``test_stream``), exactly like
``avalanche.benchmarks.classic.SplitMNIST`` does, so the datamodule serves them and the
classic benchmarks through one path. Tensors are prepared up front (no per-sample
transforms), so these streams need no download and no file beyond the one named.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from mneme.app.core.errors import ConfigError
from mneme.datamodules.data.labels import check_labels
from mneme.datamodules.streams.declared import DeclaredStream
from mneme.datamodules.streams.registry import stream
from torch.utils.data import Dataset

# The normalization Avalanche's MNIST benchmarks apply (ToTensor + Normalize).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
MNIST_TRAIN_ROWS = 8000  # convention for mnist10k.npz: first 8,000 rows train, the rest test


class LabeledTensors(Dataset):
    """A tensor dataset with the ``targets`` attribute Avalanche's generators read."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs = inputs
        self.targets = targets.long().tolist()

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int):
        return self.inputs[index], self.targets[index]


def split_benchmark(
    train: LabeledTensors,
    test: LabeledTensors,
    n_experiences: int,
    return_task_id: bool,
    seed: int | None,
    fixed_class_order: Sequence[int] | None,
    class_ids_from_zero_in_each_exp: bool,
):
    from avalanche.benchmarks.scenarios.deprecated.generators import nc_benchmark

    missing = sorted(set(train.targets) - set(test.targets))
    if missing:
        raise ConfigError(
            f"data.benchmark_args: classes {missing} have training samples but no test "
            "samples; a class-incremental split needs both for every class"
        )
    return nc_benchmark(
        train_dataset=train,
        test_dataset=test,
        n_experiences=n_experiences,
        task_labels=return_task_id,
        seed=seed,
        fixed_class_order=fixed_class_order,
        class_ids_from_zero_in_each_exp=class_ids_from_zero_in_each_exp,
    )


def load_digits_tensors(test_size: float = 0.25, seed: int = 0):
    """scikit-learn's 1,797 real 8x8 digits as ``(train, test)`` datasets, stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=test_size, random_state=seed, stratify=digits.target
    )
    return (
        LabeledTensors(images[idx_train], labels[idx_train]),
        LabeledTensors(images[idx_test], labels[idx_test]),
    )


@stream
def SplitDigits(  # noqa: N802 - named like Avalanche's benchmark factories
    n_experiences: int = 5,
    *,
    return_task_id: bool = False,
    seed: int | None = 0,
    fixed_class_order: Sequence[int] | None = None,
    class_ids_from_zero_in_each_exp: bool = False,
    test_size: float = 0.25,
):
    """Class- (or task-) incremental split of scikit-learn's 8x8 digits: the embedded default.

    Example (YAML)::

        data:
          benchmark: mneme.datamodules.SplitDigits
          benchmark_args: {n_experiences: 5, seed: 0}
    """
    train, test = load_digits_tensors(test_size=test_size, seed=0)
    scenario = split_benchmark(
        train,
        test,
        n_experiences,
        return_task_id,
        seed,
        fixed_class_order,
        class_ids_from_zero_in_each_exp,
    )
    return DeclaredStream(scenario)  # [image, label, task], as Avalanche's


# The most an .npz array may declare (header shape x item size) before it is read: numpy
# allocates the declared size up front, and a compressed member inflates (a zip bomb).
MAX_ARRAY_BYTES = 4 * 2**30


def read_npz(
    path: str | Path, names: Sequence[str], hint: str, optional: Sequence[str] = ()
) -> dict[str, np.ndarray]:
    """The arrays ``names`` (and those of ``optional`` it has) of the ``.npz`` at ``path``,
    read safely: never unpickled (an object array would run code), each array's declared
    size checked before it is read, and a file that is missing, not an ``.npz``, or corrupt
    refused naming ``data.benchmark_args.path`` (``hint`` says what the file should be)."""
    field = "data.benchmark_args.path"
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{field}: no file at '{path}'; point it at {hint}")
    try:
        # mmap_mode: a plain .npy comes back mapped, not read, so that it can be refused
        # without allocating what its header declares.
        arrays = np.load(path, mmap_mode="r", allow_pickle=False)
        if not isinstance(arrays, np.lib.npyio.NpzFile):
            raise ConfigError(
                f"{field}: '{path}' is a single array, not an .npz; point it at {hint}"
            )
        with arrays:
            missing = set(names) - set(arrays.files)
            if missing:
                raise ConfigError(
                    f"{field}: '{path}' lacks arrays {sorted(missing)}; it has "
                    f"{sorted(arrays.files)}; point it at {hint}"
                )
            names = [*names, *(name for name in optional if name in arrays.files)]
            for name in names:
                member_name = f"{name}.npy" if f"{name}.npy" in arrays.zip.namelist() else name
                with arrays.zip.open(member_name) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0  # 2.0 and 3.0 alike
                    )
                    shape, _, dtype = read_header(member)
                size = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
                if dtype.hasobject or size > MAX_ARRAY_BYTES:
                    what = "Python objects (pickles)" if dtype.hasobject else f"{size:,} bytes"
                    raise ConfigError(
                        f"{field}: '{path}' array '{name}' {shape} holds {what}; Mneme reads "
                        f"numeric arrays of at most {MAX_ARRAY_BYTES:,} bytes"
                    )
            return {name: arrays[name] for name in names}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(
            f"{field}: '{path}' is not a readable .npz ({err}); point it at {hint}"
        ) from None


def images_in_unit_range(images: np.ndarray, path: Path) -> np.ndarray:
    """``images`` as float32 in ``[0, 1]``, by their dtype: uint8 is divided by 255, floats
    already in ``[0, 1]`` are kept. Anything else is refused, not guessed: a wider integer
    type does not say its scale (a uint16 image may span 0..65535 or hold 8-bit values, a
    dark 16-bit scan looks like the latter), nor does a float outside ``[0, 1]``; dividing
    it by 255 anyway trains on a wrong scale without a word (accuracy 0.096, not 0.833)."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    finite = np.issubdtype(images.dtype, np.floating) and bool(np.isfinite(images).all())
    low, high = (images.min().item(), images.max().item()) if images.size else (0, 0)
    if finite and 0.0 <= low and high <= 1.0:
        return images.astype(np.float32)
    raise ConfigError(
        f"data.benchmark_args.path: '{path}' holds {images.dtype} images in [{low}, {high}]; "
        "Mneme reads uint8 (0..255) or floats in [0, 1]: save images.astype(np.uint8) for "
        "8-bit values, or floats scaled to [0, 1]"
    )


def load_mnist_npz(path: str | Path):
    """``(train, test)`` datasets from an ``.npz`` with ``images`` (N, 28, 28) and ``labels``.

    The first 8,000 rows train, the rest test (the convention of ``mnist10k.npz``).
    """
    path = Path(path)
    hint = "an .npz with 'images' and 'labels' arrays (e.g. ../shared/data/mnist10k.npz)"
    arrays = read_npz(path, ("images", "labels"), hint)
    images, labels = arrays["images"], arrays["labels"]
    if images.ndim != 3 or len(images) != len(labels) or len(images) <= MNIST_TRAIN_ROWS:
        raise ConfigError(
            f"data.benchmark_args.path: '{path}' has images of shape {images.shape} and "
            f"{len(labels)} labels; expected (N, H, W) images, one label each, N > "
            f"{MNIST_TRAIN_ROWS}"
        )
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ConfigError(
            f"data.benchmark_args.path: '{path}' labels must be integer class indices >= 0, "
            f"got dtype {labels.dtype} with minimum {labels.min()}"
        )
    check_labels(int(labels.max()), f"data.benchmark_args.path: '{path}'")
    x = torch.from_numpy(images_in_unit_range(images, path)).unsqueeze(1)
    x = (x - MNIST_MEAN) / MNIST_STD
    y = torch.from_numpy(labels.astype(np.int64))
    n = MNIST_TRAIN_ROWS
    return LabeledTensors(x[:n], y[:n]), LabeledTensors(x[n:], y[n:])


@stream
def SplitMNISTFile(  # noqa: N802
    path: str,
    n_experiences: int = 5,
    *,
    return_task_id: bool = False,
    seed: int | None = 0,
    fixed_class_order: Sequence[int] | None = None,
    class_ids_from_zero_in_each_exp: bool = False,
):
    """Class- (or task-) incremental split MNIST read from a local ``.npz`` file."""
    train, test = load_mnist_npz(path)
    scenario = split_benchmark(
        train,
        test,
        n_experiences,
        return_task_id,
        seed,
        fixed_class_order,
        class_ids_from_zero_in_each_exp,
    )
    # [image, label, task], as Avalanche's
    return DeclaredStream(scenario, input_normalization=(MNIST_MEAN, MNIST_STD))


@stream
def PermutedMNISTFile(  # noqa: N802
    path: str,
    n_experiences: int = 5,
    *,
    return_task_id: bool = False,
    seed: int | None = 0,
):
    """Domain-incremental permuted MNIST from a local ``.npz``: one fixed pixel permutation
    per experience, all ten classes in each (as ``avalanche.benchmarks.classic.PermutedMNIST``).
    """
    from avalanche.benchmarks.scenarios.deprecated.generators import nc_benchmark

    train, test = load_mnist_npz(path)
    rng = np.random.RandomState(seed)
    trains, tests = [], []
    for _ in range(n_experiences):
        perm = torch.from_numpy(rng.permutation(train.inputs[0].numel()))
        for source, out in ((train, trains), (test, tests)):
            flat = source.inputs.flatten(1)[:, perm].view_as(source.inputs)
            out.append(LabeledTensors(flat, torch.tensor(source.targets)))
    scenario = nc_benchmark(
        trains,
        tests,
        n_experiences=n_experiences,
        task_labels=return_task_id,
        shuffle=False,
        class_ids_from_zero_in_each_exp=True,
        one_dataset_per_exp=True,
    )
    # [image, label, task], as Avalanche's
    return DeclaredStream(scenario, input_normalization=(MNIST_MEAN, MNIST_STD))
