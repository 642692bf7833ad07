"""Streams of image files that need not fit in memory: an ImageFolder tree or a CSV manifest.

Nothing but paths and labels is held: each image is decoded (``torchvision.io`` or PIL) and
augmented (torchvision v2 transforms or ``timm.data.create_transform``, named in YAML) when
a batch asks for it, in the DataLoader's workers. The datamodule serves the experiences as
it serves any other stream (``train_dataloader`` the current one, one eval loader per test
experience, dict batches ``{image, label, task}``); a file stream's experiences build their
own loaders (:meth:`FileExperience.loader`), with workers (``data.num_workers``), pinned
memory on CUDA, ``data.prefetch_factor``, and workers that persist through each training
experience's epochs. A file stream is never materialized (``data.materialize`` does not
apply; ``data.data_on_device`` is refused). Strategies read through the experience
(Replay's buffer holds the decoded, un-augmented tensors of the samples it keeps; see
:mod:`mneme.datamodules.data.experiences`).

Randomness: the training order is the datamodule's (seeded by ``(run seed, epoch)``), and a
sample's augmentation is seeded by ``(run seed, epoch, index)`` wherever it is decoded, so a
run draws the same augmented batches with 0 or N workers, persistent or not, and resumed.

Layouts, one module each: :mod:`mneme.datamodules.streams.image_folder`
(``ImageFolderStream``, ``root/<class>/<image>``) and
:mod:`mneme.datamodules.streams.csv_images` (``CSVImageStream``, a ``path,label[,split]``
manifest); both split into experiences with :mod:`mneme.datamodules.streams.file_splits`.
This module holds the tool that writes an ImageFolder tree from an ``.npz`` of digits.

Make an ImageFolder tree of real MNIST digits (used by ``configs/file_stream.yaml``)::

    python -m mneme.datamodules.streams.files ../shared/data/mnist10k.npz /tmp/mnist_folder
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_image_folder(
    npz: str | Path, out: str | Path, copies: int = 1, size: int = 32, quality: int = 90
) -> int:
    """Write the digits of an ``.npz`` (``images`` (N, H, W) uint8, ``labels``; e.g.
    ``../shared/data/mnist10k.npz``) as JPEG files ``out/{train,test}/<label>/<i>.jpg``
    (first 80% train), padded to ``size``; ``copies > 1`` adds copies shifted by one pixel
    per copy (more files, not more digits). Returns the number of files."""
    from mneme.datamodules.streams.digits import read_npz
    from PIL import Image

    arrays = read_npz(npz, ("images", "labels"), "an .npz with 'images' and 'labels'")
    images, labels = np.asarray(arrays["images"]), np.asarray(arrays["labels"])
    n_train = int(0.8 * len(images))
    written = 0
    for copy in range(copies):
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            canvas = np.zeros((size, size), dtype=np.uint8)
            h, w = min(image.shape[0], size), min(image.shape[1], size)
            top, left = (size - h) // 2, (size - w) // 2
            canvas[top : top + h, left : left + w] = image[:h, :w]
            canvas = np.roll(canvas, copy, axis=1)
            folder = Path(out) / ("train" if i < n_train else "test") / str(int(label))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(canvas, "L").save(folder / f"{copy}_{i}.jpg", quality=quality)
            written += 1
    return written


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=write_image_folder.__doc__)
    parser.add_argument("npz")
    parser.add_argument("out")
    parser.add_argument("--copies", type=int, default=1)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    print(write_image_folder(args.npz, args.out, args.copies, args.size), "files in", args.out)
