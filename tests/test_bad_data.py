"""Bad data and hostile configs (issue 10): what ``data.benchmark`` may run, and data files
that must be refused in one line rather than read, misread or exhausted.

Most cases call the loaders directly (fast); the headline cases run the real CLI
(``mneme.app.cli.main.main``, in this process as the catalog does) with the catalog's rules:
non-zero exit, one final line ``mneme: error: ...`` naming the field and the fix, no
traceback, an earlier run's files untouched.
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from mneme.app.core.errors import ConfigError
from mneme.datamodules import ContinualDataModule, SplitDigits
from mneme.datamodules.streams.csv_captions import image_paths, load_images, read_manifest
from mneme.datamodules.streams.registry import registered_streams, resolve_benchmark, stream

from tests.conftest import digits_stream
from tests.test_bad_inputs import (
    ALIGN_CSV,
    QUICKSTART,
    case_folder,
    file_benchmark,
    run_mneme_in_process,
    snapshot,
)

# -- what data.benchmark may name -----------------------------------------------------------


@stream
def RegisteredDigits(n_experiences: int = 5):  # noqa: N802 - a user's stream, registered
    return SplitDigits(n_experiences)


def trusted_digits(n_experiences: int = 5):
    """A user's factory that is not registered: runs only when the environment trusts it."""
    return SplitDigits(n_experiences)


@pytest.mark.parametrize(
    "class_path, arguments",
    [
        ("os.system", {"command": "touch x"}),
        ("subprocess.run", {"args": ["touch", "x"]}),
        ("builtins.exec", {}),
        ("shutil.rmtree", {"path": "."}),
        ("tests.test_bad_data.trusted_digits", {}),  # a user's factory, not trusted
    ],
)
def test_a_callable_that_is_not_a_benchmark_is_refused(class_path, arguments):
    with pytest.raises(ConfigError, match="data.benchmark: .*MNEME_TRUSTED_BENCHMARKS") as err:
        resolve_benchmark(class_path, arguments)
    assert class_path in str(err.value) and "\n" not in str(err.value)


def test_a_module_outside_the_benchmark_trees_is_not_even_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "evil_bench.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef factory(**kwargs):\n    return kwargs\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="not imported"):
        resolve_benchmark("evil_bench.factory", {})
    assert not marker.exists() and "evil_bench" not in sys.modules
    # trusted from outside the config (the environment), the same factory resolves
    monkeypatch.setenv("MNEME_TRUSTED_BENCHMARKS", "other.factory, evil_bench.factory")
    factory = resolve_benchmark("evil_bench.factory", {"a": 1})
    assert marker.exists() and factory(a=1) == {"a": 1}
    monkeypatch.delitem(sys.modules, "evil_bench")


@pytest.mark.parametrize(
    "class_path, why",
    [
        # torchvision's download helper, re-exported by an Avalanche module
        ("avalanche.benchmarks.datasets.downloadable_dataset.download_url", "not a benchmark"),
        ("avalanche.benchmarks.classic.CLEARMetric", "not a benchmark"),  # a class, no scenario
        ("avalanche.benchmarks.utils.concat_datasets", "not a benchmark"),  # a dataset helper
        ("avalanche.benchmarks.classic.cmnist._get_mnist_dataset", "private"),
        ("mneme.datamodules.streams.digits.load_mnist_npz", "not a registered stream"),
        ("mneme.datamodules.continual.materialize", "not a registered stream"),
        ("SplitDigits", "not an import path"),
        ("os.system; touch x", "not an import path"),
        ("", "not an import path"),
    ],
)
def test_inside_the_trees_only_benchmarks_are_accepted(class_path, why):
    with pytest.raises(ConfigError, match=f"data.benchmark: .*{why}"):
        resolve_benchmark(class_path, {})


@pytest.mark.parametrize(
    "class_path, arguments",
    [
        ("avalanche.benchmarks.classic.SplitMNIST", {"n_experiences": 5}),
        ("avalanche.benchmarks.classic.PermutedMNIST", {"n_experiences": 5}),
        ("avalanche.benchmarks.SplitMNIST", {"n_experiences": 5}),  # a re-export
        (
            "avalanche.benchmarks.scenarios.deprecated.generators.nc_benchmark",
            {"train_dataset": [], "test_dataset": [], "n_experiences": 1, "task_labels": False},
        ),
        ("avalanche.benchmarks.scenarios.generic_scenario.CLScenario", {"streams": []}),
        ("mneme.datamodules.SplitDigits", {"n_experiences": 5}),
        ("mneme.datamodules.streams.digits.SplitDigits", {}),
        ("mneme.datamodules.SplitMNISTFile", {"path": "x.npz"}),
        ("mneme.datamodules.PermutedMNISTFile", {"path": "x.npz"}),
        ("mneme.datamodules.SplitCaptionedDigits", {}),
        ("mneme.datamodules.SpokenDigits", {"path": "x.npz"}),
        ("mneme.datamodules.CSVCaptions", {"train_csv": "x.tsv"}),
        ("tests.test_bad_data.RegisteredDigits", {}),
    ],
)
def test_benchmarks_resolve(class_path, arguments):
    assert callable(resolve_benchmark(class_path, arguments))


def test_every_mneme_stream_is_registered():
    streams = {path.rpartition(".")[2] for path in registered_streams()}
    expected = {"SplitDigits", "SplitMNISTFile", "PermutedMNISTFile", "SplitCaptionedDigits"}
    assert expected | {"SpokenDigits", "CSVCaptions"} <= streams


def test_a_trusted_factory_builds_a_stream(monkeypatch):
    path = "tests.test_bad_data.trusted_digits"
    with pytest.raises(ConfigError, match="MNEME_TRUSTED_BENCHMARKS"):
        ContinualDataModule(path, {"n_experiences": 5})
    monkeypatch.setenv("MNEME_TRUSTED_BENCHMARKS", f"{path},math.pi")
    dm = ContinualDataModule(path, {"n_experiences": 5})
    assert dm.num_experiences == 5 and dm.num_classes == 10
    with pytest.raises(ConfigError, match="data.benchmark: 'math.pi' .*not callable"):
        resolve_benchmark("math.pi", {})


def test_trust_is_not_a_datamodule_argument_a_config_could_set():
    """Trust comes from the environment, entry points or @stream, never from a config."""
    import inspect

    from mneme.datamodules import EpisodicDataModule

    for datamodule in (ContinualDataModule, EpisodicDataModule):
        assert "trusted_benchmarks" not in inspect.signature(datamodule).parameters


def test_an_entry_point_of_the_streams_group_is_trusted(monkeypatch):
    """An installed package's ``mneme.streams`` entry point is trusted (read, not loaded
    until a config names it)."""
    from importlib.metadata import EntryPoint

    from mneme.datamodules.streams import registry

    point = EntryPoint("digits", "tests.test_bad_data:trusted_digits", "mneme.streams")
    monkeypatch.setattr(
        "importlib.metadata.entry_points",
        lambda group=None: [point] if group == registry.ENTRY_POINT_GROUP else [],
    )
    assert registry.resolve_benchmark("tests.test_bad_data.trusted_digits", {}) is trusted_digits


def test_the_default_stream_still_resolves():
    assert ContinualDataModule(**digits_stream(5)).factory is SplitDigits


# -- the headline cases through the real CLI ------------------------------------------------

EARLIER_RUN = "logs/quickstart/version_0"
TRUSTED_MODULE = """
from mneme.app.core.errors import ConfigError

open("x", "w").close()  # importing it leaves a mark in the working folder


def factory(**kwargs):
    raise ConfigError(f"data.benchmark_args: the trusted factory ran with {sorted(kwargs)}")
"""


def quickstart(*args: str) -> list[str]:
    return ["fit", "--config", QUICKSTART, *args]


# id: (arguments after `mneme`, substrings the error line must contain)
CLI_CASES: dict[str, tuple[list[str], list[str]]] = {
    "benchmark_runs_a_shell_command": (
        quickstart(
            "--data.benchmark", "os.system", "--data.benchmark_args", "{command: 'touch x'}"
        ),
        ["data.benchmark", "os.system", "MNEME_TRUSTED_BENCHMARKS"],
    ),
    "benchmark_trusted_by_the_config_itself": (
        quickstart(
            "--data.benchmark",
            "my_streams.factory",
            "--data.trusted_benchmarks",
            "[my_streams.factory]",
            "--data.benchmark_args",
            "{n_experiences: 2}",
        ),
        ["data.trusted_benchmarks", "no longer read from a config", "@stream"],
    ),
    "csv_image_outside_root": (
        ["fit", "--config", ALIGN_CSV, "--data.benchmark_args.train_csv", "outside.tsv"],
        ["benchmark_args.train_csv", "outside.tsv' line 3", "etc/passwd", "allow_outside_root"],
    ),
    "png_decompression_bomb": (
        ["fit", "--config", ALIGN_CSV, "--data.benchmark_args.train_csv", "bomb.tsv"],
        ["data.benchmark_args.train_csv", "bomb.tsv' line 3", "bomb.png", "decompression"],
    ),
    "npz_uint16_images": (
        quickstart(*file_benchmark("u16.npz")),
        ["data.benchmark_args.path", "u16.npz", "uint16", "uint8"],
    ),
}  # fmt: skip


def make_files(d: Path) -> None:
    """An earlier run's files (what no case may touch) and the cases' inputs."""
    (d / EARLIER_RUN / "checkpoints").mkdir(parents=True)
    (d / EARLIER_RUN / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run's weights")
    (d / EARLIER_RUN / "continual_metrics.json").write_text('{"matrix": [[1.0]]}')
    (d / "my_streams.py").write_text(TRUSTED_MODULE)
    for i in range(4):
        png(d / f"img{i}.png")
    manifest(d, ["img0.png", "../../../../../../../../etc/passwd", "img1.png"], "outside.tsv")
    png_declaring(d / "bomb.png", 100_000, 100_000)
    manifest(d, ["img0.png", "bomb.png", "img1.png", "img2.png"], "bomb.tsv")
    pixels = np.random.default_rng(0).integers(0, 256, (8100, 4, 4), dtype=np.uint8)
    mnist_file(d / "u16.npz", pixels.astype(np.uint16) * 257)


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_data")
    make_files(base)
    before = snapshot(base / EARLIER_RUN)
    results = {}
    with pytest.MonkeyPatch.context() as patch:
        # `python -c` puts the working directory on sys.path: the trusted `my_streams`
        patch.syspath_prepend(str(base))
        for name in CLI_CASES:
            folder = case_folder(base, name)
            result = run_mneme_in_process(CLI_CASES[name][0], folder)
            results[name] = result, folder, snapshot(folder / EARLIER_RUN)
        sys.modules.pop("my_streams", None)
    return results, before


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_bad_data_fails_with_one_clear_line(cli_results, case):
    results, before = cli_results
    result, folder, after = results[case]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mneme: error: ") and len(last) < 500, result.stderr[-3000:]
    for expected in CLI_CASES[case][1]:
        assert expected in last, last
    assert after == before  # the earlier run is untouched
    assert not (folder / "x").exists()  # nothing ran


# -- CSV manifests: paths stay inside root ----------------------------------------------------


def png(path: Path, array: np.ndarray | None = None) -> Path:
    from PIL import Image

    Image.fromarray(np.full((8, 8, 3), 90, np.uint8) if array is None else array).save(path)
    return path


def manifest(folder: Path, images: list[str], name: str = "train.tsv") -> Path:
    rows = [f"{image}\ta caption {i}" for i, image in enumerate(images)]
    (folder / name).write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    return folder / name


def paths_of(path: Path, root: Path | None = None, **kwargs) -> list[Path]:
    rows = read_manifest(path, "filepath", "title", None, "\t")
    return image_paths(rows, "filepath", root or path.parent, f"'{path.name}'", **kwargs)


@pytest.fixture
def dataset(tmp_path):
    """``root/`` with two images, and a file outside it."""
    root = tmp_path / "root"
    root.mkdir()
    for i in range(2):
        png(root / f"img{i}.png")
    png(tmp_path / "outside.png")
    return root


@pytest.mark.parametrize(
    "image, how",
    [
        ("../outside.png", "'..' leads out"),
        ("../../../../../../../../etc/passwd", "'..' leads out"),
        ("/etc/passwd", "an absolute path"),
        ("link.png", "a symlink leads out"),  # root/link.png -> ../outside.png
        ("linked_dir/outside.png", "a symlink leads out"),  # root/linked_dir -> ..
    ],
)
def test_an_image_outside_root_is_refused_naming_the_row(dataset, image, how):
    (dataset / "link.png").symlink_to(dataset.parent / "outside.png")
    (dataset / "linked_dir").symlink_to(dataset.parent, target_is_directory=True)
    path = manifest(dataset, ["img0.png", image, "img1.png"])
    with pytest.raises(ConfigError, match=f"'train.tsv' line 3: .*{how}") as err:
        paths_of(path)
    assert "allow_outside_root: true" in str(err.value)
    # opted out, the same manifest resolves (to the file the row names)
    assert paths_of(path, allow_outside_root=True)[1] == (dataset / image).resolve()


def test_paths_that_stay_inside_root_are_accepted(dataset, tmp_path):
    path = manifest(dataset, ["img0.png", "./sub/../img1.png", str(dataset / "img0.png")])
    assert paths_of(path) == [dataset / "img0.png", dataset / "img1.png", dataset / "img0.png"]
    link = tmp_path / "root_link"  # root itself reached through a symlink
    link.symlink_to(dataset, target_is_directory=True)
    assert paths_of(path, root=link)[1] == dataset / "img1.png"


@pytest.mark.parametrize("image", ["loop.png", "img\0.png"])  # a symlink loop, a NUL byte
def test_an_unresolvable_image_path_is_refused_naming_the_row(dataset, image):
    (dataset / "loop.png").symlink_to(dataset / "loop.png")
    path = manifest(dataset, ["img0.png", image])
    with pytest.raises(ConfigError, match="'train.tsv' line 3: image path .* cannot be resolved"):
        paths_of(path)


def test_csv_captions_takes_the_opt_out(dataset):
    from mneme.datamodules import CSVCaptions

    path = manifest(dataset, ["img0.png", "img1.png", "../outside.png", "img0.png"])
    args = {"train_csv": str(path), "image_size": 8, "context_length": 8}
    with pytest.raises(ConfigError, match="data.benchmark_args.train_csv: .* line 4"):
        CSVCaptions(**args)
    scenario = CSVCaptions(**args, allow_outside_root=True)
    assert sum(len(e.dataset) for e in scenario.train_stream) == 3


# -- CSV manifests: malformed rows and oversized fields ---------------------------------------


def write_rows(folder: Path, *rows: str) -> Path:
    (folder / "m.tsv").write_bytes(("filepath\ttitle\n" + "\n".join(rows) + "\n").encode())
    return folder / "m.tsv"


@pytest.mark.parametrize(
    "rows, expected",
    [
        (["img0.png\tok", "img1.png\t" + "x" * 100_000_000], "line 3: field larger than field"),
        (["img0.png\tok", "img1.png\t" + "x" * 5000], "line 3: field larger than field limit"),
        (["img0.png\tok", 'img1.png\t"an unclosed quote', "img0.png\tlost"], "line 4: unexpected"),
        (['img0.png\t"quoted" then not', "img1.png\tok"], "line 2: '\t' expected after '\"'"),
        (["img0.png\ta caption\twith a tab"], "line 2: 3 field\\(s\\), the header has 2"),
        (["img0.png\tok", "img1.png"], "line 3: 1 field\\(s\\), the header has 2"),
        (["img0.png\tok", " \ta caption"], "img_key: .* line 3 has no image path"),
    ],
    ids=["100mb_caption", "long_caption", "unclosed_quote", "stray_quote", "extra_field",
         "missing_field", "empty_path"],
)  # fmt: skip
def test_a_malformed_manifest_row_is_refused_naming_its_line(tmp_path, rows, expected):
    import csv

    limit = csv.field_size_limit()
    with pytest.raises(ConfigError, match=expected) as err:
        read_manifest(write_rows(tmp_path, *rows), "filepath", "title", None, "\t")
    assert "m.tsv" in str(err.value) and len(str(err.value)) < 500
    assert csv.field_size_limit() == limit  # the process-wide limit is restored


def test_the_caption_cap_is_configurable(tmp_path):
    path = write_rows(tmp_path, "img0.png\tshort", "img1.png\t" + "y" * 50)
    with pytest.raises(ConfigError, match="line 3: a caption of 50 .*max_caption_chars \\(10\\)"):
        read_manifest(path, "filepath", "title", None, "\t", max_caption_chars=10)
    path = write_rows(tmp_path, "img0.png\tshort", "img1.png\t" + "z" * 150_000)
    with pytest.raises(ConfigError, match="line 3: field larger than field limit"):
        read_manifest(path, "filepath", "title", None, "\t")
    rows = read_manifest(path, "filepath", "title", None, "\t", max_caption_chars=200_000)
    assert [len(r["title"]) for r in rows] == [5, 150_000] and [r.line for r in rows] == [2, 3]


# -- images: bombs, corrupt and truncated files, bit depth ------------------------------------


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A valid small PNG whose header declares ``width`` x ``height`` pixels (a
    decompression bomb as PIL sees it: the size is checked when the header is read)."""
    data = bytearray(png(path).read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def jpeg(path: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, "JPEG")
    return path


def truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def corrupted(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF  # inside the compressed pixels, past the header
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: png_declaring(p / "bomb.png", 100_000, 100_000), "is too large .*decompression"),
        (lambda p: png_declaring(p / "bomb.png", 10_000, 10_000), "is too large .*decompression"),
        (lambda p: truncated(png(p / "bad.png", np.arange(4096 * 3, dtype=np.uint8).reshape(64, 64, 3))), "cannot read"),  # noqa: E501
        (lambda p: truncated(jpeg(p / "bad.jpg")), "cannot read .*truncated"),
        (lambda p: corrupted(png(p / "bad.png")), "cannot read"),
        (lambda p: corrupted(jpeg(p / "bad.jpg")), "cannot read"),
        (lambda p: (p / "bad.png").write_bytes(os.urandom(256)) and p / "bad.png", "cannot read"),
        (lambda p: (p / "bad.png").write_bytes(b"") or p / "bad.png", "cannot read"),
    ],
    ids=["bomb", "bomb_warning_level", "truncated_png", "truncated_jpeg", "corrupted_png",
         "corrupted_jpeg", "random_bytes", "empty_file"],
)  # fmt: skip
def test_an_unreadable_image_is_refused_naming_its_file_and_row(tmp_path, make, expected):
    good, bad = png(tmp_path / "good.png"), make(tmp_path)
    source = "data.benchmark_args.train_csv: 'm.tsv' line 7"
    with pytest.raises(ConfigError, match=f"line 7: .*{expected}") as err:
        load_images([good, bad], 8, 3, ["line 2", source])
    message = str(err.value)
    assert message.startswith(source) and bad.name in message
    assert "\n" not in message and len(message) < 500


def test_sixteen_bit_images_are_scaled_by_their_depth(tmp_path):
    from PIL import Image

    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I;16")
    image = load_images([path], 8, 1)
    assert torch.allclose(image, torch.full_like(image, 128 / 255))  # not clipped to white


@pytest.mark.parametrize("mode", ["F", "I"])
def test_images_of_unknown_range_are_refused(tmp_path, mode):
    from PIL import Image

    path = tmp_path / "wide.tif"
    Image.fromarray(np.full((8, 8), 3, np.float32 if mode == "F" else np.int32)).save(path)
    with pytest.raises(ConfigError, match=f"'{path}' is {mode} mode"):
        load_images([path], 8, 1, ["data.benchmark_args.train_csv: 'm.tsv' line 2"])


# -- .npz files: scale by dtype, never unpickle, never allocate what a header declares --------


def mnist_file(path: Path, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    labels = np.arange(len(images)) % 10 if labels is None else labels
    np.savez(path, images=images, labels=labels.astype(np.uint8))
    return path


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (8100, 4, 4), dtype=np.uint8)


def test_float_images_in_unit_range_read_as_the_same_uint8_images(tmp_path, pixels):
    from mneme.datamodules.streams.digits import load_mnist_npz

    as_uint8 = load_mnist_npz(mnist_file(tmp_path / "u8.npz", pixels))[0].inputs
    for dtype in (np.float32, np.float64):
        unit = mnist_file(tmp_path / "f.npz", (pixels / 255.0).astype(dtype))
        assert torch.allclose(load_mnist_npz(unit)[0].inputs, as_uint8, atol=1e-5)


@pytest.mark.parametrize(
    "convert, expected",
    [
        (lambda x: x.astype(np.uint16) * 257, "uint16 images in \\[0, 65535\\]"),
        (lambda x: x.astype(np.int64), "int64 images in \\[0, 255\\]"),  # 8-bit values, wide
        (lambda x: x.astype(np.float32), "float32 images in \\[0.0, 255.0\\]"),
        (lambda x: np.where(x == 7, np.nan, x / 255.0), "float64 images in \\[nan"),
        (lambda x: x > 128, "bool images"),
    ],
    ids=["uint16", "int64", "float_0_255", "float_nan", "bool"],
)
def test_images_of_another_scale_are_refused_not_divided_by_255(
    tmp_path, pixels, convert, expected
):  # noqa: E501
    from mneme.datamodules.streams.digits import load_mnist_npz

    path = mnist_file(tmp_path / "odd.npz", convert(pixels))
    with pytest.raises(
        ConfigError, match=f"data.benchmark_args.path: '.*odd.npz' holds {expected}"
    ) as err:  # noqa: E501
        load_mnist_npz(path)
    assert "uint8" in str(err.value) and "[0, 1]" in str(err.value)


class Payload:
    """Unpickled, it would create ``MARKER``: stands for code inside a pickle."""

    def __reduce__(self):
        return (open, (os.environ["MNEME_TEST_MARKER"], "w"))


def npy_member(header_shape: tuple[int, ...], dtype: str = "|u1") -> bytes:
    import io

    buffer = io.BytesIO()
    header = {"descr": dtype, "fortran_order": False, "shape": header_shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + b"\0" * 64  # far less data than declared


def npz_of(path: Path, members: dict[str, bytes]) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(f"{name}.npy", data)
    return path


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: npz_of(p, {"images": npy_member((10**7, 28, 28)), "labels": npy_member((10**7,))}),  # noqa: E501
         "array 'images' \\(10000000, 28, 28\\) holds 7,840,000,000 bytes"),
        (lambda p: npz_of(p, {"images": npy_member((2**40,), "<f8"), "labels": npy_member((1,))}),
         "holds 8,796,093,022,208 bytes"),
        (lambda p: np.savez(p, images=np.array([Payload()] * 8200, dtype=object), labels=np.zeros(8200)) or p,  # noqa: E501
         "array 'images' \\(8200,\\) holds Python objects"),
        (lambda p: p.write_bytes(os.urandom(1024)) and p, "not a readable .npz"),
        (lambda p: p.write_bytes(b"") or p, "not a readable .npz"),
        (lambda p: truncated(mnist_file(p, np.zeros((8100, 4, 4), np.uint8))), "not a readable .npz"),  # noqa: E501
        (lambda p: np.save(p.with_suffix(".npy"), np.zeros(3)) or p.with_suffix(".npy").rename(p) or p,  # noqa: E501
         "is a single array, not an .npz"),
    ],
    ids=["huge_header", "huge_header_float", "pickled_objects", "random_bytes", "empty_file",
         "truncated", "plain_npy"],
)  # fmt: skip
def test_a_hostile_npz_is_refused_before_it_is_read(tmp_path, monkeypatch, make, expected):
    from mneme.datamodules.streams.digits import load_mnist_npz

    marker = tmp_path / "unpickled"
    monkeypatch.setenv("MNEME_TEST_MARKER", str(marker))
    path = make(tmp_path / "hostile.npz")
    with pytest.raises(ConfigError, match=f"data.benchmark_args.path: .*{expected}") as err:
        load_mnist_npz(path)
    assert "hostile.npz" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def spoken_file(path: Path, **override) -> Path:
    arrays = {
        "audio": np.zeros((20, 800), np.int16),
        "labels": np.arange(20) % 10,
        "voice": np.zeros(20, np.int16),
        "voice_names": np.array(["en_m1_170_50"]),
        **override,
    }
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "override, expected",
    [
        ({"audio": np.zeros((20, 800), np.uint8)}, "audio is uint8"),
        ({"audio": np.zeros((20, 800), np.int32)}, "audio is int32"),
        ({"audio": np.zeros(800, np.int16)}, "audio is int16 of shape \\(800,\\)"),
        ({"labels": np.arange(19) % 10}, "one integer label and voice per clip"),
        ({"labels": np.linspace(0, 9, 20)}, "one integer label and voice per clip"),
        ({"voice": np.full(20, 3)}, "voice indices in \\[0, 1\\)"),
        ({"labels": np.arange(20) - 1}, "labels must be >= 0"),
    ],
    ids=["uint8_pcm", "int32_pcm", "one_dimensional", "label_count", "float_labels",
         "voice_out_of_range", "negative_label"],
)  # fmt: skip
def test_a_spoken_digits_file_that_would_be_misread_is_refused(tmp_path, override, expected):
    from mneme.datamodules.streams.spoken_digits import load_spoken_digits

    path = spoken_file(tmp_path / "spoken.npz", **override)
    with pytest.raises(ConfigError, match=f"data.benchmark_args.path: '.*spoken.npz' .*{expected}"):
        load_spoken_digits(path)


def test_a_good_spoken_digits_file_reads(tmp_path):
    from mneme.datamodules.streams.spoken_digits import load_spoken_digits

    data = load_spoken_digits(spoken_file(tmp_path / "spoken.npz", sample_rate=np.array(8000)))
    assert data["audio"].shape == (20, 800) and list(data["accent"][:2]) == ["en", "en"]


# -- caption templates: one slot, nothing else str.format would read --------------------------


@pytest.mark.parametrize(
    "template", ["a photo of {x}", "{} of {0.__class__}", "a photo of {", "no slot", "{} and {}"]
)
def test_a_template_with_other_fields_is_refused(template):
    from mneme.datamodules import CSVCaptions, SplitCaptionedDigits

    with pytest.raises(ConfigError, match="data.benchmark_args.eval_templates: .*'{}' once"):
        SplitCaptionedDigits(eval_templates=["the digit {}", template])
    with pytest.raises(ConfigError, match="data.benchmark_args.prompt_templates"):
        CSVCaptions("x.tsv", prompt_templates=[template])


def test_a_template_with_a_literal_brace_is_accepted():
    from mneme.datamodules.streams.captions import check_templates

    check_templates(["{{a set}} of {}", "{}"])


# -- one image policy for every decoder path (issue 25) ---------------------------------------
# The file streams' codec (torchvision or PIL) and the CSV caption stream decode through
# mneme.datamodules.data.image_policy: the same size check, the same 8-bit result per mode.

SIDE = 6


def png16_rgb(path: Path, array: np.ndarray) -> Path:
    """A 16-bit RGB PNG (PIL cannot write one): IHDR depth 16, colour type 2."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    h, w, _ = array.shape
    rows = b"".join(b"\0" + array[r].astype(">u2").tobytes() for r in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )  # fmt: skip
    return path


def composited(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The policy's alpha rule: the colour times its opacity (on black)."""
    return colour * (alpha[..., None] / 255.0)


def mode_case(kind: str, folder: Path) -> tuple[Path, np.ndarray]:
    """An image of ``kind`` and the ``(H, W, 3)`` values in [0, 255] the policy gives it."""
    from PIL import Image

    rng = np.random.default_rng(sum(map(ord, kind)))
    colour = rng.integers(0, 256, (SIDE, SIDE, 3)).astype(np.uint8)
    alpha = rng.integers(0, 256, (SIDE, SIDE)).astype(np.uint8)
    alpha[0, 0] = 0  # one fully transparent pixel: black whatever its colour
    path = folder / f"{kind}.png"
    if kind == "gray16":
        deep = rng.integers(0, 65536, (SIDE, SIDE)).astype(np.uint16)
        Image.fromarray(deep).save(path)
        return path, np.repeat((deep * (255 / 65535))[..., None], 3, axis=2)
    if kind == "rgb16":
        deep = rng.integers(0, 65536, (SIDE, SIDE, 3)).astype(np.uint16)
        return png16_rgb(path, deep), deep * (255 / 65535)
    if kind == "rgba":
        Image.fromarray(np.dstack([colour, alpha]), "RGBA").save(path)
        return path, composited(colour.astype(float), alpha)
    if kind == "la":
        gray = colour[..., 0]
        Image.fromarray(np.dstack([gray, alpha]), "LA").save(path)
        return path, composited(np.repeat(gray[..., None], 3, axis=2).astype(float), alpha)
    if kind == "palette_transparent":
        palette = Image.fromarray(colour).quantize(8)
        palette.save(path, transparency=0)
        rgb = np.asarray(palette.convert("RGB"), dtype=float)
        return path, np.where((np.asarray(palette) == 0)[..., None], 0.0, rgb)
    if kind == "bilevel":
        bits = rng.integers(0, 2, (SIDE, SIDE)).astype(bool)
        Image.fromarray(bits).save(path)
        return path, np.repeat(bits[..., None] * 255.0, 3, axis=2)
    if kind == "cmyk":
        path = path.with_suffix(".jpg")
        Image.fromarray(colour).convert("CMYK").save(path, quality=95)
        return path, np.asarray(Image.open(path).convert("RGB"), dtype=float)
    Image.fromarray(colour).save(path)  # plain 8-bit RGB: the torchvision fast path
    return path, colour.astype(float)


def decoded_by_every_path(path: Path, channels: int = 3) -> dict[str, torch.Tensor]:
    """``(channels, H, W)`` in [0, 1] from each decoder path."""
    from mneme.datamodules.data.file_experiences import ImageCodec

    out = {
        decoder: ImageCodec(SIDE, channels, decoder).load(str(path), False, None)
        for decoder in ("torchvision", "pil")
    }
    out["csv_captions"] = load_images([path], SIDE, channels)[0]
    return out


MODES = ["gray16", "rgb16", "rgba", "la", "palette_transparent", "bilevel", "cmyk", "rgb8"]


@pytest.mark.parametrize("kind", MODES)
def test_every_decoder_reads_each_mode_by_the_stated_rule(tmp_path, kind):
    path, expected = mode_case(kind, tmp_path)
    images = decoded_by_every_path(path)
    target = torch.from_numpy(expected).permute(2, 0, 1).float() / 255
    for decoder, image in images.items():
        assert image.dtype == torch.float32 and image.shape == (3, SIDE, SIDE), decoder
        # 16-bit depths: PIL reads RGB;16 by its high byte, within one 8-bit level
        assert torch.allclose(image, target, atol=1.01 / 255), (decoder, image.max())
    levels = [(image * 255).round() for image in images.values()]
    assert all(torch.equal(levels[0], other) for other in levels[1:])  # one policy


def test_a_sixteen_bit_image_reads_as_gray_by_its_depth_on_every_decoder(tmp_path):
    path, expected = mode_case("gray16", tmp_path)
    for decoder, image in decoded_by_every_path(path, channels=1).items():
        target = torch.from_numpy(expected[..., 0]).float().round() / 255
        assert torch.allclose(image[0], target, atol=1e-6), decoder


@pytest.mark.parametrize(
    "width, height", [(100_000, 100_000), (15_000, 15_000), (10_000, 10_000)],
    ids=["over_twice_the_limit", "15000_square", "over_the_limit"],
)  # fmt: skip
def test_a_decompression_bomb_is_refused_before_decoding_on_every_decoder(tmp_path, width, height):
    from mneme.datamodules.data.file_experiences import ImageCodec

    bomb = png_declaring(tmp_path / "bomb.png", width, height)  # a few bytes of pixels
    readers = {
        "torchvision": lambda: ImageCodec(8, 3, "torchvision").load(str(bomb), False, None),
        "pil": lambda: ImageCodec(8, 3, "pil").load(str(bomb), False, None),
        "csv_captions": lambda: load_images([bomb], 8, 3),
    }
    for name, read in readers.items():
        with pytest.raises(ConfigError, match="bomb.png' is too large .*MAX_IMAGE_PIXELS") as err:
            read()
        assert "\n" not in str(err.value) and "shrink" in str(err.value), name


@pytest.mark.parametrize("mode", ["F", "I"])
@pytest.mark.parametrize("decoder", ["torchvision", "pil"])
def test_file_streams_refuse_images_of_unknown_range(tmp_path, mode, decoder):
    from mneme.datamodules.data.file_experiences import ImageCodec
    from PIL import Image

    path = tmp_path / "wide.tif"
    Image.fromarray(np.full((8, 8), 3, np.float32 if mode == "F" else np.int32)).save(path)
    with pytest.raises(ConfigError, match=f"'{path}' is {mode} mode .*8- or 16-bit"):
        ImageCodec(8, 1, decoder).load(str(path), False, None)


def image_manifest(folder: Path, rows: list[tuple[str, int]]) -> Path:
    lines = ["path,label", *(f"{p},{label}" for p, label in rows)]
    (folder / "images.csv").write_text("\n".join(lines) + "\n")
    return folder / "images.csv"


def test_a_bomb_in_an_image_manifest_is_refused_when_the_stream_reads_it(tmp_path):
    """The headline case: a 15000x15000 PNG listed in a CSVImageStream manifest."""
    from mneme.datamodules import CSVImageStream

    for i in range(3):
        png(tmp_path / f"img{i}.png")
    png_declaring(tmp_path / "bomb.png", 15_000, 15_000)
    rows = [("img0.png", 0), ("img1.png", 0), ("img2.png", 1), ("bomb.png", 1)]
    scenario = CSVImageStream(
        str(image_manifest(tmp_path, rows)), 1, test_size=0.5, image_size=8
    ).scenario
    with pytest.raises(ConfigError, match="train_csv: image '.*bomb.png' is too large"):
        for experience in scenario.train_stream + scenario.test_stream:
            list(experience.batches(4))


def image_tree(root: Path) -> Path:
    """``root/{a,b}/<i>.png`` and ``root/loose.png`` (inside root, in no class folder)."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            png(root / name / f"{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    png(root / "loose.png")
    return root


@pytest.mark.parametrize(
    "link, target, expected",
    [
        ("a/link.png", "../../outside.png", "is outside root .*a symlink leads out"),
        ("b/linked", "../../elsewhere", "is outside root .*a symlink leads out"),  # a folder
        ("a/loop", "..", "links to its own ancestor"),  # two loops: an exponential walk
        ("b/loop", "..", "links to its own ancestor"),
        ("b/3.png", "../a/0.png", "is reached both as"),  # one image in two classes
    ],
    ids=["file_link_out", "folder_link_out", "folder_loop_a", "folder_loop_b", "file_twice"],
)
def test_an_image_folder_never_follows_a_symlink_out_of_its_root(tmp_path, link, target, expected):
    from mneme.datamodules import ImageFolderStream

    root = image_tree(tmp_path / "root")
    png(tmp_path / "outside.png")
    (tmp_path / "elsewhere").mkdir()
    png(tmp_path / "elsewhere" / "secret.png")
    (root / link).symlink_to(target)
    if "loop" in link:  # a loop in each class folder
        (root / ("b/loop" if link.startswith("a") else "a/loop")).symlink_to("..")
    with pytest.raises(ConfigError, match=f"data.benchmark_args.root: .*{expected}") as err:
        ImageFolderStream(str(root), 1, image_size=8)
    assert "\n" not in str(err.value)
    if "outside" in expected:  # the opt-out reads it, as the CSV streams' does
        assert "allow_outside_root: true" in str(err.value)
        ImageFolderStream(str(root), 1, image_size=8, allow_outside_root=True)


def test_a_symlink_that_stays_inside_the_root_is_followed(tmp_path):
    from mneme.datamodules import ImageFolderStream

    root = image_tree(tmp_path / "root")
    (root / "b" / "link.png").symlink_to("../loose.png")
    scenario = ImageFolderStream(str(root), 1, image_size=8, test_size=0.25).scenario
    paths = [p for e in scenario.train_stream + scenario.test_stream for p in e.dataset.paths]
    assert str((root / "loose.png").resolve()) in paths and len(paths) == 7


def test_an_image_manifest_row_never_follows_a_symlink_out_of_its_root(tmp_path):
    from mneme.datamodules import CSVImageStream

    root = image_tree(tmp_path / "root")
    png(tmp_path / "outside.png")
    (root / "link.png").symlink_to("../outside.png")
    rows = [("a/0.png", 0), ("a/1.png", 0), ("b/0.png", 1), ("link.png", 1)]
    with pytest.raises(ConfigError, match="images.csv' line 5: image 'link.png' is outside"):
        CSVImageStream(str(image_manifest(root, rows)), 1, test_size=0.5, image_size=8)


# -- labels past data.max_classes: refused before anything is sized by class ------------------


def huge_label_npz(path: Path, label: int) -> Path:
    labels = np.arange(8100) % 10
    labels[[3, 8003]] = label  # in the train and the test rows
    pixels = np.random.default_rng(0).integers(0, 256, (8100, 4, 4), dtype=np.uint8)
    np.savez(path, images=pixels, labels=labels)  # int64 labels (mnist_file's are uint8)
    return path


@pytest.mark.parametrize("benchmark", ["SplitMNISTFile", "PermutedMNISTFile"])
def test_a_huge_label_in_an_npz_is_refused_before_avalanche_sizes_by_class(tmp_path, benchmark):
    path = huge_label_npz(tmp_path / "labels.npz", 10**9)
    data = ContinualDataModule(
        f"mneme.datamodules.{benchmark}", {"path": str(path), "n_experiences": 1}
    )
    match = "data.benchmark_args.path: '.*labels.npz': holds the label 1,000,000,000"
    with pytest.raises(ConfigError, match=match) as err:
        data.scenario  # noqa: B018 - a MemoryError inside nc_benchmark before the check
    assert "data.max_classes: 100,000" in str(err.value)


def test_a_huge_integer_label_in_an_image_manifest_is_refused(tmp_path):
    from mneme.datamodules import CSVImageStream

    root = image_tree(tmp_path / "root")
    rows = [("a/0.png", 0), ("a/1.png", 0), ("b/0.png", 10**9), ("b/1.png", 10**9)]
    with pytest.raises(ConfigError, match="label_key: column 'label' of .*the label 1,000,000,000"):
        CSVImageStream(str(image_manifest(root, rows)), 1, test_size=0.5, image_size=8)


def test_the_datamodule_limit_reaches_the_stream(tmp_path):
    path = huge_label_npz(tmp_path / "labels.npz", 50)
    args = {"path": str(path), "n_experiences": 1}
    data = ContinualDataModule("mneme.datamodules.SplitMNISTFile", args, max_classes=20)
    with pytest.raises(ConfigError, match="holds the label 50, .*data.max_classes: 20\\)"):
        data.scenario  # noqa: B018
    data = ContinualDataModule("mneme.datamodules.SplitMNISTFile", args, max_classes=51)
    assert data.num_classes == 51


@pytest.mark.parametrize("label", [10, 10**9])
def test_a_spoken_digit_label_past_nine_is_refused(tmp_path, label):
    from mneme.datamodules.streams.spoken_digits import load_spoken_digits

    labels = np.arange(20) % 10
    labels[4] = label
    path = spoken_file(tmp_path / "spoken.npz", labels=labels)
    with pytest.raises(ConfigError, match=f"spoken.npz' holds the label {label:,}; .*0..9"):
        load_spoken_digits(path)


# -- few-shot episodes over audio: the log-mel front end, as the aligner's audio tower --------


def tone_clips(path: Path, clips: int = 120, samples: int = 400) -> Path:
    """Spoken-digits-like clips: a tone per digit plus noise (seeded), two voices."""
    rng = np.random.default_rng(0)
    labels = np.arange(clips) % 10
    t = np.arange(samples) / 8000
    audio = 8000 * np.sin(2 * np.pi * (300 + 250 * labels[:, None]) * t)
    audio = (audio + rng.normal(0, 300, audio.shape)).astype(np.int16)
    voices = np.array(["en_m1_170_50", "fr_m1_170_50"])
    np.savez(path, audio=audio, labels=labels, voice=np.arange(clips) % 2, voice_names=voices)
    return path


@pytest.mark.parametrize("module", ["PrototypicalNetwork", "MetaLearner"])
def test_few_shot_modules_take_audio_through_the_log_mel_front_end(tmp_path, module):
    from lightning.pytorch import Trainer
    from mneme.app import MetaLearner, PrototypicalNetwork
    from mneme.app.nn.log_mel import LogMelAudio
    from mneme.datamodules import EpisodicDataModule

    args = {"path": str(tone_clips(tmp_path / "spoken.npz")), "n_experiences": 1}
    data = EpisodicDataModule(
        "mneme.datamodules.SpokenDigits",
        {**args, "context_length": 8},
        sample_keys=["audio", "label", "image", "text", "task"],
        meta_train_classes=[0, 1, 2, 3, 4],
        meta_test_classes=[5, 6, 7, 8, 9],
        n_way=2, k_shot=1, q_queries=2, train_episodes=4, eval_episodes=4, tasks_per_batch=2,
    )  # fmt: skip
    encoder = {"encoder": "mneme_cnn", "encoder_args": {"widths": [4]}, "input_key": "audio"}
    model = (
        PrototypicalNetwork(**encoder)
        if module == "PrototypicalNetwork"
        else MetaLearner(**encoder, inner_steps=1)
    )
    trainer = Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, data)
    trainer.test(model, data, verbose=False)
    assert isinstance(model.encoder, LogMelAudio)
    accuracies = model.episode_accuracies[0].compute()
    assert len(accuracies) == 4 and bool(((accuracies >= 0) & (accuracies <= 1)).all())


def test_an_image_setting_on_an_audio_field_is_refused_naming_it():
    from mneme.app import PrototypicalNetwork

    with pytest.raises(ConfigError, match="model.encoder_pretrained: 'audio' samples go through"):
        PrototypicalNetwork(
            encoder="mneme_cnn", encoder_pretrained=True, input_key="audio", input_shape=[400]
        )
