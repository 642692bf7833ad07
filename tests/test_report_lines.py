"""The results a config exists for, printed under the accuracy matrix: each callback's
``report_lines`` (pruned sparsity, the int8 matrix of QAT, the robust matrix, MMD's
next-domain accuracy), gathered by ContinualMetrics."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from mneme.callbacks import ContinualMetrics, MMDAdaptation, Pruning, Quantization, RobustAccuracy
from mneme.callbacks.reporting.accuracy_tables import format_matrix, results_lines

ROWS = [[0.9, 0.0, 0.0], [0.7, 0.95, 0.0], [0.6, 0.8, 0.97]]


def test_results_lines_gather_every_callback_that_reports_in_order():
    class Says:
        def __init__(self, text):
            self.text = text

        def report_lines(self, trainer, pl_module):
            return [self.text]

    trainer = SimpleNamespace(callbacks=[Says("a"), object(), Says("b")])
    assert results_lines(trainer, None) == ["a", "b"]


def test_format_matrix_labels_its_rows_and_gives_the_summary():
    lines = format_matrix("Title", ROWS[1:], [1, 2], {"average_accuracy": 0.79, "bwt": None})
    assert lines[0] == "Title"
    assert lines[3].strip().startswith("1 |") and lines[4].strip().startswith("2 |")
    assert lines[-1] == "average_accuracy=0.7900"
    assert format_matrix("Title", []) == []


def test_pruning_reports_the_sparsity_it_left():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight[:2] = 0  # half of layer 0
    pruning = Pruning(amount=0.5)
    assert pruning.report_lines(None, net) == []  # no step yet: nothing to say
    pruning.steps_done = [0]
    (line,) = pruning.report_lines(None, net)
    assert line == "Pruning (unstructured): sparsity 0.33 (per layer: 0 0.50, 2 0.00)"


def test_quantization_reports_the_int8_matrix():
    quantization = Quantization(mode="qat")
    quantization.experiences, quantization.quantized_rows = [0, 1, 2], ROWS
    lines = quantization.report_lines(None, None)
    assert lines[0].startswith("Int8 accuracy matrix (qat;")
    assert "0.970" in lines[-2] and lines[-1].startswith("average_accuracy=0.7900")


def test_robust_accuracy_reports_its_matrix():
    robust = RobustAccuracy(eps=0.1, steps=10)
    robust.rows = ROWS
    lines = robust.report_lines(None, None)
    assert lines[0].startswith("Robust accuracy matrix 'robust' (PGD-10, linf eps 0.1;")
    assert lines[-1].startswith("average_accuracy=0.7900  forgetting=")


def test_mmd_reports_the_next_domain_accuracy_from_the_matrix():
    metrics = ContinualMetrics()
    metrics.rows = ROWS
    trainer = SimpleNamespace(callbacks=[metrics])
    (line,) = MMDAdaptation(lambda_=1.0).report_lines(trainer, None)
    assert line.endswith(": 0.000, 0.000 (mean 0.000)")
    metrics.rows = [[0.9, 0.2, 0.1], [0.7, 0.95, 0.3], [0.6, 0.8, 0.97]]
    (line,) = MMDAdaptation(lambda_=1.0).report_lines(trainer, None)
    assert line.endswith(": 0.200, 0.300 (mean 0.250)")
