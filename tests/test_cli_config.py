"""The logged run configuration reads a callback's arguments from LightningCLI's parsed
config (its SaveConfigCallback) when the run came from the CLI."""

from types import SimpleNamespace

from jsonargparse import Namespace
from lightning.pytorch.cli import SaveConfigCallback
from mneme.callbacks import EWC, Replay
from mneme.callbacks.reporting.cli_config import cli_callback_arguments


def _entry(class_path: str, **init_args) -> Namespace:
    return Namespace(class_path=class_path, init_args=Namespace(**init_args))


def test_arguments_come_from_the_parsed_config_in_order_by_class():
    config = Namespace(
        trainer=Namespace(
            callbacks=[
                _entry("mneme.callbacks.Replay", buffer_size=20, policy="reservoir"),
                _entry("mneme.callbacks.EWC", ewc_lambda=5.0),
                _entry("mneme.callbacks.Replay", buffer_size=30, policy="class_balanced"),
            ]
        )
    )
    saver = SaveConfigCallback(parser=None, config=config)
    first, ewc, second = Replay(buffer_size=20), EWC(ewc_lambda=5.0), Replay(buffer_size=30)
    trainer = SimpleNamespace(callbacks=[first, ewc, second, saver])
    lookup = cli_callback_arguments(trainer)
    assert lookup(first) == {"buffer_size": 20, "policy": "reservoir"}
    assert lookup(ewc) == {"ewc_lambda": 5.0}
    assert lookup(second) == {"buffer_size": 30, "policy": "class_balanced"}
    assert lookup(Replay()) is None  # the config lists no third Replay


def test_a_run_without_the_cli_has_no_parsed_config():
    assert cli_callback_arguments(SimpleNamespace(callbacks=[Replay()]))(Replay()) is None
