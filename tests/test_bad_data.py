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
    """A user's factory that is not registered: runs only when the config trusts it."""
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
    with pytest.raises(ConfigError, match="data.benchmark: .*data.trusted_benchmarks") as err:
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
    # listed in data.trusted_benchmarks, the same factory resolves
    factory = resolve_benchmark("evil_bench.factory", {"a": 1}, trusted=["evil_bench.factory"])
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


def test_a_trusted_factory_builds_a_stream():
    path = "tests.test_bad_data.trusted_digits"
    with pytest.raises(ConfigError, match="data.trusted_benchmarks"):
        ContinualDataModule(path, {"n_experiences": 5})
    dm = ContinualDataModule(path, {"n_experiences": 5}, trusted_benchmarks=[path])
    assert dm.num_experiences == 5 and dm.num_classes == 10
    with pytest.raises(ConfigError, match="data.trusted_benchmarks: .*not callable"):
        resolve_benchmark("math.pi", {}, trusted=["math.pi"])


def test_the_default_stream_still_resolves():
    assert ContinualDataModule(**digits_stream(5)).factory is SplitDigits


# -- the headline cases through the real CLI ------------------------------------------------

EARLIER_RUN = "logs/quickstart/version_0"
TRUSTED_MODULE = """
from mneme.app.core.errors import ConfigError


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
        ["data.benchmark", "os.system", "data.trusted_benchmarks"],
    ),
    "benchmark_trusted_explicitly": (
        quickstart(
            "--data.benchmark",
            "my_streams.factory",
            "--data.trusted_benchmarks",
            "[my_streams.factory]",
            "--data.benchmark_args",
            "{n_experiences: 2}",
        ),
        ["the trusted factory ran with ['n_experiences']"],
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
