"""One registry of the heads a config names: linear, the prototype heads and the MoE head,
each with its declared spec keys; a model takes the roles it can use."""

import inspect

import pytest
import torch
from mneme.app.nn.heads.moe import MoEHead
from mneme.app.nn.heads.prototypes import RanPACHead
from mneme.app.nn.heads.registry import HEADS, create_head
from mneme.datamodules import ConfigError

# The leading arguments the builder passes itself (not config keys).
BUILT = {"in_dim", "out_dim", "num_classes", "feature_dim", "field", "self"}


def test_each_head_declares_exactly_the_keys_its_class_takes():
    for name, kind in HEADS.items():
        if kind.cls is None:
            assert kind.spec_keys == () and name == "linear"
            continue
        taken = set(inspect.signature(kind.cls.__init__).parameters) - BUILT
        assert set(kind.spec_keys) == taken, name


def test_names_build_the_head_and_its_prototype_head():
    torch.manual_seed(0)
    head, prototype = create_head(None, 8, 6)
    assert type(head) is torch.nn.Linear and prototype is None
    head, prototype = create_head({"name": "ranpac", "projection_dim": 4, "ridges": [1.0]}, 8, 6)
    assert type(head) is torch.nn.Linear and isinstance(prototype, RanPACHead)
    assert prototype.projection.shape == (8, 4)
    head, prototype = create_head({"name": "moe", "num_experts": 2, "top_k": 1}, 8, 6)
    assert isinstance(head, MoEHead) and head.out_dim == 6 and prototype is None


@pytest.mark.parametrize(
    ("spec", "roles", "message"),
    [
        ({"name": "moe", "num_expert": 2}, None, r"^model.head: moe takes num_experts, top_k"),
        ({"name": "simplecil", "metric": "cosine"}, None, r"the simplecil head takes no argum"),
        ({"name": "ncm"}, ("linear", "routed"), r"^model.head.name: unknown head 'ncm'; one "),
        ({"name": "mo"}, None, r"unknown head 'mo' \(did you mean moe\?\)"),
    ],
)
def test_a_bad_head_spec_is_one_line(spec, roles, message):
    with pytest.raises(ConfigError, match=message) as error:
        create_head(spec, 8, 6, roles=roles)
    assert "\n" not in str(error.value)
