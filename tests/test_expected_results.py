"""The expected results documented in the quick configs' headers, checked by running them.

Each config in ``configs/`` states in its header a line ``# Expected result:
average_accuracy A, forgetting F, ...``; this file runs the quick ones through the real CLI
(in subprocesses, in scratch folders) and asserts the run's ``continual_metrics.json``
against the figures parsed from that line, so the documentation and the test cannot drift
apart. The runs are conftest's ``quick_config_runs`` (shared with test_cli and test_align:
each config runs once per session, the two together, one thread each on the 2-core CI).
"""

import re
from pathlib import Path

import pytest

from tests.conftest import QUICK_CONFIGS, ROOT

CONFIGS = ROOT / "configs"
QUICK = QUICK_CONFIGS
EXPECTED = re.compile(
    r"^# Expected result: average_accuracy (?P<average_accuracy>\d\.\d+), "
    r"forgetting (?P<forgetting>-?\d\.\d+)",
    re.MULTILINE,
)
FEWSHOT_EXPECTED = re.compile(
    r"^# Expected result: \d+-way \d+-shot \d+\.\d+ ± \d+\.\d+", re.MULTILINE
)
TOLERANCE = {"average_accuracy": 0.03, "forgetting": 0.05}


def expected_result(config: Path) -> dict[str, float]:
    """The figures of the header's ``# Expected result:`` line."""
    header = config.read_text().split("\nseed_everything", 1)[0]
    match = EXPECTED.search(header)
    assert match, f"{config.name}: no '# Expected result: average_accuracy ...' line in its header"
    return {key: float(value) for key, value in match.groupdict().items()}


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
    expected = expected_result(CONFIGS / f"{name}.yaml")
    measured = quick_runs[name]
    for key, value in expected.items():
        assert measured[key] == pytest.approx(value, abs=TOLERANCE[key]), (
            f"{name}: {key} {measured[key]:.4f}, the header of configs/{name}.yaml says "
            f"{value} (+-{TOLERANCE[key]}); re-measure and update the header if the change "
            "is intended"
        )


def test_align_digits_learns_each_experience_when_it_trains_on_it(quick_runs):
    # The diagonal of the accuracy matrix: zero-shot accuracy on experience k right after
    # training it (it read 0.011 for experience 2 before the config gave the new classes
    # enough steps to separate, and masked the prompts of classes not trained yet).
    matrix = quick_runs["align_digits"]["accuracy_matrix"]
    assert all(matrix[k][k] > 0.8 for k in range(len(matrix))), matrix
