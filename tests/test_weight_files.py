"""Backbone weight files read through timm's checkpoint helpers: safetensors files, the
usual containers and DDP prefixes, and a file that holds code refused in one line."""

import pytest
import torch
from mneme.app.nn.encoders import create_encoder
from mneme.app.nn.weight_files import read_state_dict
from mneme.datamodules import ConfigError


def _source() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_encoder("mneme_mlp", (1, 8, 8), hidden=[16])


def test_a_safetensors_file_loads_as_the_torch_file_does(tmp_path):
    from safetensors.torch import save_file

    source = _source()
    save_file(source.state_dict(), tmp_path / "mlp.safetensors")
    loaded = create_encoder(
        "mneme_mlp", (1, 8, 8), weights=str(tmp_path / "mlp.safetensors"), hidden=[16]
    )
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(x), source(x))


def test_containers_and_ddp_prefixes_are_unwrapped(tmp_path):
    state = _source().state_dict()
    wrapped = {"model_state_dict": {f"module.{k}": v for k, v in state.items()}}
    torch.save({"state_dict": wrapped}, tmp_path / "wrapped.pth")
    read = read_state_dict(tmp_path / "wrapped.pth", "model.encoder_weights")
    assert list(read) == list(state) and all(torch.equal(read[k], state[k]) for k in state)


class _Code:
    def __reduce__(self):
        return (print, ("ran",))


def test_a_file_that_holds_code_is_refused_in_one_line(tmp_path):
    torch.save({"weight": _Code()}, tmp_path / "code.pth")
    with pytest.raises(ConfigError, match=r"^model.encoder_weights: '.*code.pth' is not a tensor"):
        read_state_dict(tmp_path / "code.pth", "model.encoder_weights")
