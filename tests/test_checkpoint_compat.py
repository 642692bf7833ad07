"""A checkpoint written by mneme 0.1.0 (top-level `app` package, callback states under class
names, no state versions) resumes with today's code, through the real CLI.

`tests/data/mneme-0.1.0-ewc-lwf-replay.ckpt` was written by commit fe411c5 with
`mneme fit --config configs/quickstart.yaml --data.benchmark_args.n_experiences 5
--data.epochs_per_experience 1 --trainer.max_epochs 2 --model.init_args.encoder_args.hidden
[8] --trainer.callbacks+=callbacks.EWC --trainer.callbacks+=callbacks.LwF`: two of five
experiences trained, with Replay, EWC, LwF and ContinualMetrics state.
"""

import json

import torch

from tests.conftest import ROOT
from tests.test_cli import QUICKSTART, mneme, only_version

OLD = ROOT / "tests" / "data" / "mneme-0.1.0-ewc-lwf-replay.ckpt"


def test_a_0_1_0_checkpoint_resumes_with_its_strategy_state(tmp_path):
    old = torch.load(OLD, weights_only=True)
    mneme(
        "fit", "--config", str(QUICKSTART),
        "--data.benchmark_args.n_experiences", "5", "--data.epochs_per_experience", "1",
        "--model.init_args.encoder_args.hidden", "[8]",
        "--trainer.callbacks+=mneme.callbacks.EWC", "--trainer.callbacks+=mneme.callbacks.LwF",
        "--ckpt_path", str(OLD),
        cwd=tmp_path,
    )  # fmt: skip
    log_dir = only_version(tmp_path / "logs")
    metrics = json.loads((log_dir / "continual_metrics.json").read_text())
    # the two rows of the old run come from its ContinualMetrics state, three are new
    assert metrics["accuracy_matrix"][:2] == old["callbacks"]["ContinualMetrics"]["rows"]
    assert len(metrics["accuracy_matrix"]) == 5
    states = torch.load(log_dir / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    (ewc,) = [v for k, v in states.items() if k.startswith("EWC")]
    (replay,) = [v for k, v in states.items() if k.startswith("Replay")]
    # experiences 0 and 1 were consolidated by 0.1.0; a lost state would lack them
    assert ewc["experiences"] == [0, 1, 2, 3, 4] and ewc["version"] == 1
    assert torch.equal(ewc["fishers"][0], old["callbacks"]["EWC"]["fishers"][0])
    assert replay["experiences"] == [0, 1, 2, 3, 4]
