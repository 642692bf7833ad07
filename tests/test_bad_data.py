"""Bad data and hostile configs (issue 10): what ``data.benchmark`` may run, and data files
that must be refused in one line rather than read, misread or exhausted.

Most cases call the loaders directly (fast); the headline cases run the real CLI in a
subprocess, a few at a time, with the catalog's rules: non-zero exit, one final line
``mneme: error: ...`` naming the field and the fix, no traceback, an earlier run's files
untouched.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mneme.datamodules import ContinualDataModule, SplitDigits
from mneme.datamodules.benchmarks import registered_streams, resolve_benchmark, stream
from mneme.datamodules.errors import ConfigError

from tests.conftest import digits_stream
from tests.test_bad_inputs import QUICKSTART, case_folder, run_mneme, snapshot

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
        ("mneme.datamodules.streams.load_mnist_npz", "not a registered stream"),
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
        ("mneme.datamodules.streams.SplitDigits", {}),
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
from mneme.datamodules.errors import ConfigError


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
    ),  # fmt: skip
}


def make_files(d: Path) -> None:
    """An earlier run's files (what no case may touch) and the cases' inputs."""
    (d / EARLIER_RUN / "checkpoints").mkdir(parents=True)
    (d / EARLIER_RUN / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run's weights")
    (d / EARLIER_RUN / "continual_metrics.json").write_text('{"matrix": [[1.0]]}')
    (d / "my_streams.py").write_text(TRUSTED_MODULE)


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_data")
    make_files(base)
    before = snapshot(base / EARLIER_RUN)
    folders = {name: case_folder(base, name) for name in CLI_CASES}

    def run_case(name: str):
        result = run_mneme(CLI_CASES[name][0], folders[name])
        return result, folders[name], snapshot(folders[name] / EARLIER_RUN)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(CLI_CASES, pool.map(run_case, CLI_CASES), strict=True))
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
