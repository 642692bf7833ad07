"""Each private Lightning/torch internal of ``mneme.app.core.private_api`` still behaves as the
function behind it assumes, on the pinned versions: an upgrade that changes one fails here,
naming it, rather than somewhere inside a run."""

from __future__ import annotations

import copy
import inspect
import os

import pytest
import torch
from mneme.app.core import private_api
from torch import nn


def test_the_lightning_cli_methods_mneme_overrides_keep_their_signature():
    from lightning.pytorch.cli import LightningCLI

    for name, signature in private_api.LIGHTNING_CLI_OVERRIDES.items():
        method = getattr(LightningCLI, name, None)
        assert method is not None, f"LightningCLI.{name} is gone: see mneme.app.cli.lightning_cli"
        assert str(inspect.signature(method)) == signature, f"LightningCLI.{name} changed"


def test_a_module_built_outside_the_hyperparameter_context_keeps_its_own():
    from lightning.pytorch import LightningModule
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context

    class Module(LightningModule):
        def __init__(self, width: int = 3):
            super().__init__()
            self.save_hyperparameters()

    with _given_hyperparameters_context({"other": 1}, "mneme.app.FewShotEvaluator"):
        inside = Module(width=5)  # what the escape is for: the context's values win
        outside = private_api.outside_hyperparameter_context(Module, width=5)
    assert "other" in inside.hparams
    assert dict(outside.hparams) == {"width": 5}


def test_base_finetuning_says_when_it_was_restored_from_a_checkpoint():
    from lightning.pytorch.callbacks import BaseFinetuning

    callback = BaseFinetuning()
    assert private_api.finetuning_is_restarting(callback) is False
    callback.load_state_dict(callback.state_dict())
    assert private_api.finetuning_is_restarting(callback) is True


def test_ddp_skips_the_excluded_buffers(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    module = nn.Linear(2, 2)
    module.register_buffer("stats", torch.zeros(3))
    private_api.exclude_from_ddp_sync(module, ["stats"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        ddp = DistributedDataParallel(module)
        assert ddp.parameters_to_ignore == {"stats"}
        # the buffers DDP broadcasts from rank 0 at each forward
        assert all(buffer is not module.stats for buffer in ddp.modules_buffers)
    finally:
        dist.destroy_process_group()


def test_pruning_methods_lists_each_pruned_tensor():
    from torch.nn.utils import prune

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    prune.l1_unstructured(model[2], "weight", amount=0.5)
    prune.random_unstructured(model[2], "bias", amount=0.5)
    found = [(m, name, type(method)) for m, name, method in private_api.pruning_methods(model)]
    assert found == [
        (model[2], "weight", prune.L1Unstructured),
        (model[2], "bias", prune.RandomUnstructured),
    ]
    assert list(private_api.pruning_methods(nn.Linear(2, 2))) == []


def test_the_shell_copies_the_children_and_shares_everything_else():
    module = nn.Sequential(nn.Linear(2, 2))
    module.register_buffer("mask", torch.ones(2))
    module.note = object()  # e.g. a Lightning module's trainer: shared, never copied
    shell = private_api.shell_with_copied_children(module, copy.deepcopy)
    assert shell.note is module.note
    assert shell[0] is not module[0]
    assert torch.equal(shell[0].weight, module[0].weight)
    with torch.no_grad():
        shell[0].weight.zero_()
    del shell.mask
    assert module[0].weight.abs().sum() > 0 and hasattr(module, "mask")


@pytest.mark.parametrize("seed", [0, 1])
def test_the_multi_tensor_ops_equal_their_one_tensor_forms(seed):
    g = torch.Generator().manual_seed(seed)
    a, b, c = ([torch.randn(3, 2, generator=g), torch.randn(4, generator=g)] for _ in range(3))
    expected = [x + y * z for x, y, z in zip(a, b, c, strict=True)]
    assert all(
        torch.allclose(r, e)
        for r, e in zip(private_api.foreach_addcmul(a, b, c), expected, strict=True)
    )
    norms = private_api.foreach_norm(a)
    assert all(torch.allclose(n, x.norm()) for n, x in zip(norms, a, strict=True))
    inplace = [x.clone() for x in a]
    private_api.foreach_addcmul_(inplace, b, c, value=0.5)
    assert all(
        torch.allclose(r, x + 0.5 * y * z) for r, x, y, z in zip(inplace, a, b, c, strict=True)
    )
    scaled = [x.clone() for x in a]
    private_api.foreach_mul_(scaled, b)
    assert all(torch.allclose(r, x * y) for r, x, y in zip(scaled, a, b, strict=True))
    private_api.foreach_mul_(scaled, torch.tensor(2.0))
    assert all(torch.allclose(r, 2 * x * y) for r, x, y in zip(scaled, a, b, strict=True))


def test_exit_handlers_run_before_an_immediate_exit():
    import subprocess
    import sys

    code = (
        "import atexit, os, sys; atexit.register(print, 'handler ran');"
        "from mneme.app.core.private_api import run_exit_handlers; run_exit_handlers();"
        "sys.stdout.flush(); os._exit(3)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 3 and result.stdout == "handler ran\n", result.stderr
