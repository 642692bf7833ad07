"""Training throughput on a stream of JPEG files: Mneme's Trainer vs a plain DataLoader loop.

Writes 20,000 JPEG files (the 10,000 real MNIST digits of ``../shared/data/mnist10k.npz``,
32x32, twice: as is and shifted by one pixel; 16,000 train, 4,000 test) as an ImageFolder
tree, then trains one epoch over the 16,000 training files, the same way in both runners:

- ``mneme``: a Lightning ``Trainer`` on ``ContinualDataModule`` +
  ``mneme.datamodules.ImageFolderStream`` (one experience of the ten classes), a
  ``ContinualClassifier``; what ``mneme fit`` runs (the validation after the epoch is not
  timed);
- ``plain``: ``torchvision.datasets.ImageFolder`` with the same decoder
  (``torchvision.io.decode_image``) and transforms, a ``DataLoader`` with the same workers,
  batch size and prefetching, the same encoder and head, SGD, cross-entropy.

Both decode and augment (``RandomCrop(32, padding=2)``) in ``--workers`` workers. Images/s
is training images over the wall time of the epoch, worker start included. The runners
alternate (mneme, plain, mneme, plain, ...) so that a change in the machine's load hits both;
the table gives each run and the ratio of the medians.

    OMP_NUM_THREADS=1 python -m benchmarks.file_stream --workers 2 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mnist10k.npz"
MEAN, STD, SIDE, BATCH, LR = 0.1307, 0.3081, 32, 64, 0.05


def make_folder(npz: Path, out: Path) -> int:
    """The 20,000-file folder (written once; reused when it is complete)."""
    from mneme.datamodules.streams.files import write_image_folder

    if out.is_dir() and sum(1 for _ in out.rglob("*.jpg")) == 20_000:
        return 20_000
    return write_image_folder(npz, out, copies=2, size=SIDE)


def run_mneme(root: Path, workers: int, seed: int) -> tuple[int, float]:
    from lightning.pytorch import Callback, Trainer, seed_everything
    from mneme.app import ContinualClassifier
    from mneme.datamodules import ContinualDataModule

    seed_everything(seed)
    data = ContinualDataModule(
        benchmark="mneme.datamodules.ImageFolderStream",
        benchmark_args={
            "root": str(root / "train"),
            "test_root": str(root / "test"),
            "n_experiences": 1,
            "channels": 1,
            "image_size": SIDE,
            "train_transform": [{"name": "RandomCrop", "size": SIDE, "padding": 2}],
            "normalize": [MEAN, STD],
        },
        materialize=False,
        num_workers=workers,
        batch_size=BATCH,
    )

    class EpochClock(Callback):
        """From the epoch's start to its last training batch's end (the validation that
        Lightning runs before ``on_train_epoch_end`` is left out)."""

        def on_train_epoch_start(self, trainer, module) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.seconds = time.perf_counter() - self.start

    clock = EpochClock()
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[clock],
        **data.trainer_settings(),
    )
    model = ContinualClassifier(
        encoder="mneme_cnn",
        optimizer=lambda params: torch.optim.SGD(params, lr=LR, momentum=0.9),
    )
    trainer.fit(model, data)
    return len(data.train_experiences[0]), clock.seconds


def run_plain(root: Path, workers: int, seed: int) -> tuple[int, float]:
    from mneme.app.nn.encoders import create_encoder
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms import v2

    torch.manual_seed(seed)
    transform = v2.Compose(
        [
            v2.RandomCrop(SIDE, padding=2),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([MEAN], [STD]),
        ]
    )
    dataset = ImageFolder(
        str(root / "train"),
        loader=lambda path: decode_image(path, mode=ImageReadMode.GRAY),
        transform=transform,
    )
    loader = DataLoader(
        dataset,
        batch_size=BATCH,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers else None,
    )
    encoder = create_encoder("mneme_cnn", (1, SIDE, SIDE))
    model = torch.nn.Sequential(encoder, torch.nn.Linear(encoder.num_features, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    start = time.perf_counter()
    for image, label in loader:
        loss = torch.nn.functional.cross_entropy(model(image), label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return len(dataset), time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/mneme_file_stream_20k"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    start = time.perf_counter()
    files = make_folder(args.data, args.folder)
    print(f"{files} JPEG files in {args.folder} ({time.perf_counter() - start:.1f} s)")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    rates: dict[str, list[float]] = {"mneme": [], "plain": []}
    for repeat in range(args.repeats):
        for name, runner in (("mneme", run_mneme), ("plain", run_plain)):
            images, seconds = runner(args.folder, args.workers, seed=repeat)
            rates[name].append(images / seconds)
            print(
                f"{name} run {repeat}: {images} images in {seconds:.1f} s = "
                f"{images / seconds:.0f} images/s",
                flush=True,
            )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    medians = {name: statistics.median(r) for name, r in rates.items()}
    ratio = medians["mneme"] / medians["plain"]
    print("| workers | Mneme images/s | plain images/s | ratio |\n| --- | --- | --- | --- |")
    print(f"| {args.workers} | {medians['mneme']:.0f} | {medians['plain']:.0f} | {ratio:.2f} |")
    return {"rates": rates, "medians": medians, "ratio": ratio}


if __name__ == "__main__":
    main()
