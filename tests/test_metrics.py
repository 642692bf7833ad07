from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mneme.app.core.metrics import (
    ExperienceAccuracy,
    average_accuracy,
    average_incremental_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    mtil_average,
    mtil_last,
    mtil_transfer,
    mtil_transfer_per_experience,
    summarize,
)

# Worked 3x3 example (row k = after training experience k, column j = test experience j):
#        j=0  j=1  j=2
# k=0 [ 0.9, 0.1, 0.2 ]
# k=1 [ 0.7, 0.8, 0.3 ]
# k=2 [ 0.6, 0.5, 0.9 ]
# ACC = (0.6 + 0.5 + 0.9) / 3                          = 2/3
# F   = ((max(0.9, 0.7) - 0.6) + (0.8 - 0.5)) / 2      = (0.3 + 0.3) / 2 = 0.3
# BWT = ((0.6 - 0.9) + (0.5 - 0.8)) / 2                = -0.3
# FWT with baseline b = [0.1, 0.1, 0.2]:
#     = ((R[0][1] - b[1]) + (R[1][2] - b[2])) / 2 = ((0.1 - 0.1) + (0.3 - 0.2)) / 2 = 0.05
# ACC per row: [0.9, (0.7 + 0.8) / 2, 2/3] = [0.9, 0.75, 2/3]
# Average incremental accuracy = (0.9 + 0.75 + 2/3) / 3                = 0.7722...
# MTIL (ZSCL), B3 read as the zero-shot row:
#   Transfer: column 1 -> R[0][1] = 0.1; column 2 -> (R[0][2] + R[1][2]) / 2 = 0.25
#             = (0.1 + 0.25) / 2                                          = 0.175
#   Average  = (1.2 + 1.8 + 2.0) / 9 (every cell)                         = 5/9
#   Last     = (0.6 + 0.5 + 0.9) / 3                                      = 2/3
#   zero-shot Transfer (the untrained row on columns 1, 2) = (0.1 + 0.2) / 2 = 0.15
R3 = [[0.9, 0.1, 0.2], [0.7, 0.8, 0.3], [0.6, 0.5, 0.9]]
B3 = [0.1, 0.1, 0.2]


def test_worked_3x3_example():
    assert average_accuracy(R3) == pytest.approx(2 / 3)
    assert forgetting(R3) == pytest.approx(0.3)
    assert backward_transfer(R3) == pytest.approx(-0.3)
    assert forward_transfer(R3, B3) == pytest.approx(0.05)
    assert forward_transfer(R3, None) is None


def test_summarize_is_plain_json():
    s = summarize(R3, B3)
    assert set(s) == {
        "accuracy_matrix",
        "average_accuracy",
        "forgetting",
        "bwt",
        "fwt",
        "average_accuracy_per_experience",
        "average_incremental_accuracy",
        "baseline",
    }
    assert s["accuracy_matrix"] == R3
    assert s["average_accuracy"] == pytest.approx(2 / 3)
    assert s["forgetting"] == pytest.approx(0.3)
    assert s["bwt"] == pytest.approx(-0.3)
    assert s["fwt"] == pytest.approx(0.05)
    assert s["average_accuracy_per_experience"] == pytest.approx([0.9, 0.75, 2 / 3])
    assert s["average_incremental_accuracy"] == pytest.approx((0.9 + 0.75 + 2 / 3) / 3)
    assert s["baseline"] == B3
    assert json.loads(json.dumps(s)) == s
    assert summarize(R3)["fwt"] is None and summarize(R3)["baseline"] is None


def test_average_incremental_accuracy_by_hand():
    assert average_incremental_accuracy(R3) == pytest.approx((0.9 + 0.75 + 2 / 3) / 3)
    # a partial run: rows after experiences 0 and 1 only -> (0.8 + (0.6 + 0.9) / 2) / 2
    assert average_incremental_accuracy([[0.8, 0.2, 0.1], [0.6, 0.9, 0.3]]) == pytest.approx(0.775)
    assert average_incremental_accuracy([[0.7, 0.1]]) == pytest.approx(0.7)


def test_mtil_figures_of_the_worked_example():
    assert mtil_transfer_per_experience(R3) == [None, pytest.approx(0.1), pytest.approx(0.25)]
    assert mtil_transfer(R3) == pytest.approx(0.175)
    assert mtil_average(R3) == pytest.approx(5 / 9)
    assert mtil_last(R3) == pytest.approx(2 / 3)
    s = summarize(R3, B3, zero_shot=True)
    assert s["mtil_transfer"] == pytest.approx(0.175)
    assert s["mtil_average"] == pytest.approx(5 / 9)
    assert s["mtil_last"] == pytest.approx(2 / 3)
    assert s["zero_shot_transfer"] == pytest.approx(0.15)
    # column means: (0.9 + 0.7 + 0.6) / 3, (0.1 + 0.8 + 0.5) / 3, (0.2 + 0.3 + 0.9) / 3
    assert s["mtil_average_per_experience"] == pytest.approx([2.2 / 3, 1.4 / 3, 1.4 / 3])
    assert json.loads(json.dumps(s)) == s
    assert "mtil_transfer" not in summarize(R3, B3)  # a model that is not zero-shot


def test_mtil_figures_match_zscl_evaluation_code():
    """ZSCL's own reduction (mtil/results.ipynb, Zheng et al. 2023) of a full T x T matrix:
    transfer = mean_i mean_{j<i} A[j, i] for i >= 1; avg = mean of column means; last =
    mean of the last row."""
    generator = torch.Generator().manual_seed(0)
    A = torch.rand(6, 6, generator=generator, dtype=torch.float64)
    transfer = torch.stack([A[:i, i].mean() for i in range(1, 6)]).mean().item()
    assert mtil_transfer(A.tolist()) == pytest.approx(transfer)
    assert mtil_average(A.tolist()) == pytest.approx(A.mean(dim=0).mean().item())
    assert mtil_last(A.tolist()) == pytest.approx(A[-1].mean().item())


def test_mtil_figures_of_a_partial_run_and_of_one_experience():
    # K = 2 of T = 3: column 2 has both rows before it is trained on
    # Transfer = (R[0][1] + (R[0][2] + R[1][2]) / 2) / 2 = (0.2 + 0.2) / 2 = 0.2
    # Average = (0.8 + 0.2 + 0.1 + 0.6 + 0.9 + 0.3) / 6 = 2.9 / 6; Last = 1.8 / 3 = 0.6
    R = [[0.8, 0.2, 0.1], [0.6, 0.9, 0.3]]
    s = summarize(R, [0.3, 0.3, 0.5], zero_shot=True)
    assert s["mtil_transfer"] == pytest.approx(0.2)
    assert s["mtil_average"] == pytest.approx(2.9 / 6)
    assert s["mtil_last"] == pytest.approx(0.6)
    assert s["zero_shot_transfer"] == pytest.approx(0.4)
    one = summarize([[0.7]], [0.2], zero_shot=True)
    assert one["mtil_transfer"] is None and one["zero_shot_transfer"] is None
    assert one["mtil_average"] == one["mtil_last"] == pytest.approx(0.7)
    assert summarize(R3, zero_shot=True)["zero_shot_transfer"] is None  # no baseline


def test_printed_tables():
    from mneme.callbacks.reporting.accuracy_tables import format_stage, format_summary

    text = format_summary(summarize(R3, B3))
    assert "zero-shot" not in text and "MTIL" not in text
    assert "average_accuracy=0.6667  forgetting=0.3000  bwt=-0.3000  fwt=0.0500" in text
    assert "average_incremental_accuracy=0.7722" in text
    lines = format_summary(summarize(R3, B3, zero_shot=True)).splitlines()
    assert lines[3] == "zero-shot |   0.100   0.100   0.200"  # the untrained row heads the matrix
    assert lines[4] == "        0 |   0.900   0.100   0.200"
    assert lines[-1] == (
        "MTIL (ZSCL): mtil_transfer=0.1750  mtil_average=0.5556  mtil_last=0.6667  "
        "zero_shot_transfer=0.1500"
    )
    # `mneme test`: the same table, the average rounded as fit's
    test = format_stage("test", [0.6, 0.5, 0.9], 2 / 3).splitlines()
    assert test[0] == "Test accuracy (column: test experience j)"
    assert test[3] == "     test |   0.600   0.500   0.900"
    assert test[-1] == "average_accuracy=0.6667"
    assert format_stage("validation", [math.nan], None).splitlines()[-1] == "average_accuracy=n/a"


def test_summarize_accepts_tensors_and_tuples():
    s = summarize(torch.tensor(R3).tolist(), tuple(B3))
    assert all(type(x) is float for row in s["accuracy_matrix"] for x in row)
    assert s["baseline"] == B3
    json.dumps(summarize([tuple(r) for r in R3]))


def test_single_experience():
    R = [[0.7, 0.1, 0.2]]
    assert average_accuracy(R) == pytest.approx(0.7)
    assert forgetting(R) is None
    assert backward_transfer(R) is None
    assert forward_transfer(R, [0.1, 0.1, 0.1]) is None
    s = summarize(R, [0.1, 0.1, 0.1])
    assert s["forgetting"] is None and s["bwt"] is None and s["fwt"] is None
    assert s["average_accuracy_per_experience"] == pytest.approx([0.7])
    json.dumps(s)


def test_partial_run_two_rows_of_three():
    # k = 1; column 2 is never trained on and only matters for the baseline length.
    # ACC = (0.6 + 0.9) / 2 = 0.75, F = 0.8 - 0.6 = 0.2, BWT = 0.6 - 0.8 = -0.2,
    # FWT = R[0][1] - b[1] = 0.2 - 0.1 = 0.1
    R = [[0.8, 0.2, 0.1], [0.6, 0.9, 0.3]]
    assert average_accuracy(R) == pytest.approx(0.75)
    assert forgetting(R) == pytest.approx(0.2)
    assert backward_transfer(R) == pytest.approx(-0.2)
    assert forward_transfer(R, [0.1, 0.1, 0.5]) == pytest.approx(0.1)
    assert summarize(R)["average_accuracy_per_experience"] == pytest.approx([0.8, 0.75])


def test_forgetting_max_at_intermediate_row():
    # Exp 0 peaks after training exp 1 (0.9 > diagonal 0.5), so forgetting uses 0.9, not 0.5:
    # F   = ((max(0.5, 0.9) - 0.4) + (0.6 - 0.3)) / 2 = (0.5 + 0.3) / 2 = 0.4
    # BWT = ((0.4 - 0.5) + (0.3 - 0.6)) / 2           = (-0.1 - 0.3) / 2 = -0.2
    R = [[0.5, 0.0, 0.0], [0.9, 0.6, 0.0], [0.4, 0.3, 0.8]]
    assert forgetting(R) == pytest.approx(0.4)
    assert backward_transfer(R) == pytest.approx(-0.2)
    assert average_accuracy(R) == pytest.approx(0.5)


def test_negative_forgetting_positive_bwt():
    # Training exp 1 improves exp 0 from 0.5 to 0.7: F = 0.5 - 0.7 = -0.2, BWT = +0.2.
    R = [[0.5, 0.1], [0.7, 0.8]]
    assert forgetting(R) == pytest.approx(-0.2)
    assert backward_transfer(R) == pytest.approx(0.2)
    # FWT = R[0][1] - b[1] = 0.1 - 0.5 = -0.4
    assert forward_transfer(R, [0.5, 0.5]) == pytest.approx(-0.4)


@pytest.mark.parametrize(
    ("R", "baseline", "match"),
    [
        ([], None, "empty"),
        ([[]], None, "empty"),
        ([[0.1, 0.2], [0.3]], None, "ragged"),
        ([[0.1], [0.2]], None, "2 rows but only 1 columns"),
        ([[0.1, 0.2, 0.3]] * 4, None, "4 rows but only 3 columns"),
        (R3, [0.1, 0.2], "baseline has 2 entries, expected 3"),
    ],
)
def test_validation_errors(R, baseline, match):
    with pytest.raises(ValueError, match=match):
        summarize(R, baseline)
    with pytest.raises(ValueError, match=match):
        forward_transfer(R, baseline)
    if baseline is None:
        for fn in (average_accuracy, forgetting, backward_transfer):
            with pytest.raises(ValueError, match=match):
                fn(R)


def test_experience_accuracy_update_compute_reset():
    m = ExperienceAccuracy(num_experiences=3)
    m.update(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 0]), experience=0)  # 2/4
    m.update(torch.tensor([5, 5]), torch.tensor([5, 0]), experience=0)  # +1/2 -> 3/6
    m.update(torch.tensor([[1, 1], [1, 1]]), torch.tensor([[1, 1], [1, 0]]), experience=2)  # 3/4
    out = m.compute()
    assert out.shape == (3,)
    assert out[0].item() == pytest.approx(0.5)
    assert math.isnan(out[1].item())
    assert out[2].item() == pytest.approx(0.75)
    assert m.correct.tolist() == [3.0, 0.0, 3.0]
    assert m.total.tolist() == [6.0, 0.0, 4.0]
    m.reset()
    assert m.total.tolist() == [0.0, 0.0, 0.0]
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert torch.isnan(m.compute()).all()
    m.update(torch.tensor([7]), torch.tensor([7]), experience=1)
    assert m.compute()[1].item() == 1.0


def test_experience_accuracy_refuses_bad_arguments():
    m = ExperienceAccuracy(2)
    with pytest.raises(ValueError, match="out of range"):
        m.update(torch.tensor([1]), torch.tensor([1]), experience=2)
    with pytest.raises(ValueError, match="differ"):
        m.update(torch.tensor([1, 2]), torch.tensor([1]), experience=0)
    with pytest.raises(ValueError, match="num_experiences"):
        ExperienceAccuracy(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        m = ExperienceAccuracy(3)
        if rank == 0:
            m.update(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 1, 1, 1]), experience=0)  # 2/4
        else:
            m.update(torch.tensor([1]), torch.tensor([1]), experience=0)  # 1/1
            m.update(torch.tensor([0, 1]), torch.tensor([0, 0]), experience=1)  # 1/2
        out = m.compute()  # union: exp0 = 3/5, exp1 = 1/2, exp2 unseen -> NaN
        assert out[0].item() == pytest.approx(0.6), out
        assert out[1].item() == pytest.approx(0.5), out
        assert math.isnan(out[2].item()), out
        # states are unsynced again after compute(): each rank keeps its local counts
        assert m.total.tolist() == ([4.0, 0.0, 0.0] if rank == 0 else [1.0, 2.0, 0.0])
    finally:
        dist.destroy_process_group()


def test_experience_accuracy_ddp_gloo():
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    # forked, as the ddp_fork tests: a spawned child would import torch and this module again
    mp.start_processes(
        _ddp_worker, args=(2, _free_port()), nprocs=2, join=True, start_method="fork"
    )


def test_a_stream_of_one_experience_gives_a_one_row_matrix(tmp_path):
    from mneme.app import ContinualClassifier
    from mneme.callbacks import ContinualMetrics
    from mneme.datamodules import ContinualDataModule

    from tests.conftest import digits_stream, quiet_trainer

    datamodule = ContinualDataModule(**digits_stream(1))
    metrics = ContinualMetrics(print_table=False)
    trainer = quiet_trainer(datamodule, tmp_path, [metrics], enable_model_summary=True)
    trainer.fit(ContinualClassifier(encoder="mneme_mlp"), datamodule)
    assert len(metrics.rows) == 1 and len(metrics.rows[0]) == 1
    assert 0.2 < metrics.rows[0][0] <= 1.0  # ten classes, learnt in one epoch
