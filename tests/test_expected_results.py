"""The expected results documented in the quick configs' headers, checked by running them.

Each config in ``configs/`` states in its header a line ``# Expected result:
average_accuracy A, forgetting F, ...``; this file runs the quick ones through the real CLI
(in subprocesses, in scratch folders) and asserts the run's ``continual_metrics.json``
against the figures parsed from that line, so the documentation and the test cannot drift
apart. The runs are conftest's ``quick_config_runs`` (shared with test_cli and test_align:
each config runs once per session, the two together, one thread each on the 2-core CI).
The other CI-sized configs (``benchmarks.expected_results.CI_SIZED``: offline, under a
minute of CPU each) run one at a time under ``pytest -m slow``, or with
``python -m benchmarks.expected_results``.

The tolerance (``benchmarks.expected_results.TOLERANCE``: average accuracy +-0.03,
forgetting +-0.05) allows what another CPU's kernels or a library update move in a
seeded one-thread run; the same machine and libraries reproduce the header exactly.
"""

import re

import pytest

from benchmarks.expected_results import (
    CI_SIZED,
    TOLERANCE,
    expected_last_row,
    expected_result,
    needs_shared_data,
    run_config,
)
from tests.conftest import QUICK_CONFIGS, ROOT, SHARED_DATA

CONFIGS = ROOT / "configs"
QUICK = QUICK_CONFIGS
FEWSHOT_EXPECTED = re.compile(
    r"^# Expected result: \d+-way \d+-shot \d+\.\d+ ± \d+\.\d+", re.MULTILINE
)
# A row's entries to 3 decimals, within what the tolerance allows the average to move.
ROW_TOLERANCE = 0.05


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_config_documents_its_expected_result(config):
    header = config.read_text().split("\nseed_everything", 1)[0]
    if config.stem == "align_csv":  # a template for the user's own manifest: no figure
        assert "Template" in header and "Expected result" in header
        return
    if "(not run in CI)" in header:  # for users with internet and a GPU: the protocol's own
        assert "mneme fit --config" in header
        return
    if "mneme fewshot" in header:  # accuracy ± 95% CI per N-way K-shot setting
        assert FEWSHOT_EXPECTED.search(header), f"{config.name}: no few-shot expected result"
        assert "OMP_NUM_THREADS=1" in header
        return
    figures = expected_result(config)
    assert 0.0 <= figures["average_accuracy"] <= 1.0
    assert "OMP_NUM_THREADS=1" in header and "mneme fit --config" in header


@pytest.fixture
def quick_runs(quick_run) -> dict[str, dict]:
    """The runs' continual_metrics.json (conftest's ``quick_config_runs``: the console
    script in scratch folders, once per session)."""
    return {name: quick_run(name)["metrics"] for name in QUICK}


@pytest.mark.parametrize("name", QUICK)
def test_quick_config_reproduces_its_documented_result(quick_runs, name):
    assert_reproduces(name, quick_runs[name])


def test_align_digits_learns_each_experience_when_it_trains_on_it(quick_runs):
    # The diagonal of the accuracy matrix: zero-shot accuracy on experience k right after
    # training it (it read 0.011 for experience 2 before the config gave the new classes
    # enough steps to separate, and masked the prompts of classes not trained yet).
    matrix = quick_runs["align_digits"]["accuracy_matrix"]
    assert all(matrix[k][k] > 0.8 for k in range(len(matrix))), matrix


def assert_reproduces(name: str, measured: dict) -> None:
    config = CONFIGS / f"{name}.yaml"
    for key, value in expected_result(config).items():
        assert measured[key] == pytest.approx(value, abs=TOLERANCE[key]), (
            f"{name}: {key} {measured[key]:.4f}, the header of configs/{name}.yaml says "
            f"{value} (+-{TOLERANCE[key]}); re-measure and update the header if the change "
            "is intended (python -m benchmarks.expected_results " + name + ")"
        )
    row = expected_last_row(config)
    if row is not None:
        assert measured["accuracy_matrix"][-1] == pytest.approx(row, abs=ROW_TOLERANCE), name


def test_every_ci_sized_config_header_has_its_last_row():
    for name in CI_SIZED:
        row = expected_last_row(CONFIGS / f"{name}.yaml")
        assert row is not None and all(0 <= a <= 1 for a in row), name


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in CI_SIZED if n not in QUICK])
def test_ci_sized_config_reproduces_its_documented_result(name, tmp_path):
    """Each config through the console script, one thread, as its header says (the
    teacher config first makes its teacher with split_mnist_replay)."""
    if needs_shared_data(name) and not SHARED_DATA.is_dir():
        pytest.skip("../shared/data absent")
    run = run_config(name, tmp_path)
    assert run["metrics"] is not None, f"{name}: {run['stderr'][-3000:]}"
    assert_reproduces(name, run["metrics"])
