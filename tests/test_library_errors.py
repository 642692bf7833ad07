"""Each third-party error ``mneme.app.core.library_errors`` recognises by its text, raised by
the pinned library itself: a release that rewords one fails here, not in a user's run."""

from __future__ import annotations

import inspect
from typing import Union

import pytest
import torch
from mneme.app.core import library_errors
from mneme.app.core.errors import ConfigError
from torch import nn


def test_peft_no_matching_target_module():
    peft = pytest.importorskip("peft")
    with pytest.raises(ValueError) as caught:
        peft.get_peft_model(nn.Sequential(nn.Linear(2, 2)), peft.LoraConfig(target_modules=["x"]))
    assert library_errors.peft_target_modules_missing(caught.value)
    assert not library_errors.peft_target_modules_missing(ValueError("rank must be positive"))


def test_jsonargparse_union_mismatch():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--x", type=Union[int, bool])  # noqa: UP007 - as Mneme's parser reads it
    with pytest.raises(Exception) as caught:
        parser.parse_args(["--x", "abc"])
    assert library_errors.jsonargparse_no_union_match(caught.value)
    assert not library_errors.jsonargparse_no_union_match(ValueError("x: expected an int"))


def test_torch_state_dict_mismatch_gives_its_first_detail():
    with pytest.raises(RuntimeError) as caught:
        nn.Linear(2, 2).load_state_dict(nn.Linear(3, 2).state_dict())
    detail = library_errors.torch_state_dict_mismatch(caught.value)
    assert detail is not None and "size mismatch for weight" in detail
    assert library_errors.torch_state_dict_mismatch(RuntimeError("CUDA out of memory")) is None


def test_lightning_save_config_refusal_names_the_file(tmp_path):
    from lightning.pytorch.cli import SaveConfigCallback

    # Lightning builds the message from the class name: the source holds the template.
    assert "expected {" in inspect.getsource(SaveConfigCallback)
    assert "to NOT exist" in inspect.getsource(SaveConfigCallback)
    error = RuntimeError(f"SaveConfigCallback expected {tmp_path}/config.yaml to NOT exist. ...")
    assert library_errors.lightning_config_file_exists(error) == f"{tmp_path}/config.yaml"
    assert library_errors.lightning_config_file_exists(ValueError("SaveConfigCallback")) is None


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without MPS")
def test_lightning_unavailable_accelerator():
    from lightning.pytorch import Trainer

    with pytest.raises(Exception) as caught:
        Trainer(accelerator="mps", logger=False)
    assert library_errors.lightning_accelerator_unavailable(str(caught.value))
    assert not library_errors.lightning_accelerator_unavailable("devices must be positive")


def test_torchvision_download_failure_text():
    from torchvision.datasets import mnist

    assert 'f"Error downloading {' in inspect.getsource(mnist)
    error = RuntimeError("Error downloading train-images.gz:\nTried url, got:\n<urlopen error>\n")
    assert library_errors.torchvision_download_failure(error) == (
        "Error downloading train-images.gz: <urlopen error>"
    )
    assert library_errors.torchvision_download_failure(RuntimeError("other")) is None


class _Refusing(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        raise ConfigError("data.path: 'x.png' is not an image; remove it")


def test_a_dataloader_worker_error_gives_back_its_message():
    loader = torch.utils.data.DataLoader(_Refusing(), num_workers=1)
    with pytest.raises(ConfigError) as caught:
        next(iter(loader))
    message = library_errors.dataloader_worker_message(caught.value, "ConfigError")
    assert message == "data.path: 'x.png' is not an image; remove it"
