"""Issue 25, the config / checkpoint / CLI half: what a checkpoint or a config may make the
CLI delete, import or run, and resumes that must apply or refuse a change.

The one-line errors of these kinds are cases of the bad-input catalog
(``tests/trust_cases.py``, run by ``tests/test_bad_inputs.py``); here, what a catalog case
cannot show: runs that succeed (a resume, a trusted class), and the mechanisms directly.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from mneme.app import ContinualClassifier
from mneme.app.cli.raw_config import check_raw_config, load_yaml
from mneme.app.cli.run_folders import check_run_names
from mneme.app.core.errors import ConfigError
from mneme.app.nn.attacks import check_attack
from mneme.callbacks import ExperienceCheckpoint, FiniteLossGuard, NonFiniteLossError
from mneme.datamodules import ContinualDataModule

from tests.conftest import ROOT, digits_stream, mneme_in_process
from tests.test_bad_inputs import CASES

QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
RUN = Path("logs/quickstart/version_0")


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def quickstart(cwd: Path, *args: str):
    """A quickstart run of one epoch per experience, in this process; must succeed."""
    result = mneme_in_process(
        ["fit", "--config", QUICKSTART, "--data.epochs_per_experience", "1", *args], cwd
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# -- a checkpoint never decides which files are deleted ----------------------------------------


def test_a_crafted_checkpoint_cannot_delete_a_file_it_names(tmp_path):
    quickstart(tmp_path, "--trainer.max_epochs", "2")
    precious = tmp_path / "precious.txt"
    precious.write_text("not a checkpoint")
    earlier = hashes(tmp_path / RUN)
    checkpoint = torch.load(tmp_path / RUN / "checkpoints/last.ckpt", weights_only=True)
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("ExperienceCheckpoint")]
    names = [str(precious), str(tmp_path / RUN / "checkpoints/experience=0.ckpt")]
    checkpoint["callbacks"][key]["experience_paths"] = names
    torch.save(checkpoint, tmp_path / "crafted.ckpt")  # weights only: loads with weights_only

    quickstart(tmp_path, "--ckpt_path", "crafted.ckpt", "--checkpoint.keep_experiences", "1")
    assert precious.read_text() == "not a checkpoint"
    assert hashes(tmp_path / RUN) == earlier
    # the new run kept one experience checkpoint of its own
    new = tmp_path / "logs/quickstart/version_1/checkpoints"
    assert sorted(p.name for p in new.glob("experience=*.ckpt")) == ["experience=4.ckpt"]


def test_resuming_an_earlier_run_with_keep_1_keeps_its_files(tmp_path):
    quickstart(tmp_path, "--trainer.max_epochs", "3")
    folder = tmp_path / RUN / "checkpoints"
    earlier = {p.name: hashes(folder)[p.name] for p in folder.glob("experience=*.ckpt")}
    assert sorted(earlier) == [f"experience={k}.ckpt" for k in range(3)]

    last = str(RUN / "checkpoints/last.ckpt")
    quickstart(tmp_path, "--ckpt_path", last, "--checkpoint.keep_experiences", "1")
    after = hashes(tmp_path)
    for name, digest in earlier.items():  # every file the earlier process wrote, as it was
        matches = [path for path, d in after.items() if path.endswith(name)]
        assert digest in [after[m] for m in matches], name


def test_only_files_of_its_own_folder_are_removed(tmp_path):
    own, other = tmp_path / "own", tmp_path / "other"
    own.mkdir(), other.mkdir()
    checkpoint = ExperienceCheckpoint(dirpath=str(own))
    outside, inside = other / "x.ckpt", own / "experience=0.ckpt"
    outside.write_text("x"), inside.write_text("y")
    link = own / "link.ckpt"
    link.symlink_to(outside)
    for path in (outside, own / ".." / "other" / "x.ckpt", link):
        checkpoint._remove_own(path)
    assert outside.exists() and link.is_symlink()
    checkpoint._remove_own(inside)
    assert not inside.exists()
    # a restored list is kept as a record, never as this run's files
    checkpoint.load_state_dict({**checkpoint.state_dict(), "experience_paths": [str(outside), 3]})
    assert checkpoint.experience_paths == [] and checkpoint.earlier_experience_paths == [
        str(outside)
    ]


# -- naming is not importing; trust comes from outside the config ------------------------------

MARKED = "open('imported', 'w').close()\nfrom lightning.pytorch import Callback\n\n\nclass Foo(Callback):\n    pass\n"  # noqa: E501


class OwnCallback(Callback):
    """A user's callback, imported (this module) before the CLI runs: trusted."""


@pytest.mark.parametrize("trusted", [False, True])
def test_a_class_outside_its_trees_is_imported_only_when_trusted(tmp_path, monkeypatch, trusted):
    (tmp_path / "marked_module.py").write_text(MARKED)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "marked_module", raising=False)
    env = {"MNEME_TRUSTED_CLASSES": "other.Thing, marked_module.Foo"} if trusted else {}
    args = ["fit", "--config", QUICKSTART, "--trainer.callbacks+=marked_module.Foo",
            "--print_config"]  # fmt: skip
    result = mneme_in_process(args, tmp_path, env=env)
    assert (tmp_path / "imported").exists() == trusted  # the marker proves the import
    if trusted:
        assert result.returncode == 0 and "marked_module.Foo" in result.stdout
    else:
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode != 0 and "trainer.callbacks" in last, result.stderr[-2000:]
    monkeypatch.delitem(__import__("sys").modules, "marked_module", raising=False)


def test_a_class_the_users_code_imported_is_trusted(tmp_path):
    args = ["fit", "--config", QUICKSTART, "--print_config",
            "--trainer.callbacks+=tests.test_trust.OwnCallback"]  # fmt: skip
    result = mneme_in_process(args, tmp_path)
    assert result.returncode == 0 and "tests.test_trust.OwnCallback" in result.stdout


@pytest.mark.parametrize(
    "args, field",
    [
        (["--trainer.callbacks", "[{class_path: mneme.callbacks.EWC, init_args: "
          "{optimizer: {class_path: evil.Opt}}}]"], "trainer.callbacks.optimizer"),
        (["--model.init_args.optimizer", "{class_path: mneme.app.X}"], "model.optimizer"),
        (["--model.init_args.lr_scheduler", "torch.optim.SGD"], "model.lr_scheduler"),
        (["--trainer.logger", "{class_path: mneme.callbacks.Replay}"], "trainer.logger"),
        (["--trainer.callbacks+=torch.optim.SGD"], "trainer.callbacks"),
        (["--trainer.strategy.class_path", "evil.Strategy"], "trainer.strategy"),
        (["--data.trusted_benchmarks=[evil.f]"], "data.trusted_benchmarks"),
    ],
)  # fmt: skip
def test_each_field_takes_classes_of_its_own_kind(args, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as raised:
        check_raw_config(["fit", *args])
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "args",
    [
        ["--model", "mneme.app.ContinualClassifier"],
        ["--model.init_args.optimizer", "torch.optim.AdamW"],
        ["--model.init_args.lr_scheduler.class_path", "torch.optim.lr_scheduler.StepLR"],
        ["--trainer.callbacks+=lightning.pytorch.callbacks.EarlyStopping"],
        ["--trainer.logger", "{class_path: lightning.pytorch.loggers.CSVLogger}"],
        ["--trainer.logger", "false", "--trainer", "null", "--data.benchmark", "os.system"],
        ["--model", "ContinualClassifier"],  # a bare name: resolved among imported classes
    ],
)
def test_classes_of_the_fields_kind_pass(args):
    check_raw_config(["fit", *args])  # data.benchmark is judged by the stream registry


def test_yaml_keys_given_twice_are_named_with_their_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  max_epochs: 2\nmodel: {}\ntrainer: {}\n")
    with pytest.raises(ConfigError, match=r"key 'trainer' is given twice \(lines 1 and 4\)"):
        load_yaml(path, "--config c.yaml")
    path.write_text("base: &b {lr: 1}\nopt:\n  <<: *b\n  lr: 2\n")  # a merge key overrides
    assert load_yaml(path, "x") == {"base": {"lr": 1}, "opt": {"lr": 2}}


# -- names stay inside save_dir ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/tmp/x", "..", "a\\..\\x"])
def test_a_run_name_that_leaves_save_dir_is_refused(name):
    config = {"logger": {"init_args": {"save_dir": "logs", "name": name, "version": None}}}
    with pytest.raises(ConfigError, match="trainer.logger.init_args.name"):
        check_run_names(config)


@pytest.mark.parametrize("name", ["run", "team/run", "run..2", ""])
def test_names_inside_save_dir_pass(name):
    check_run_names({"logger": [{"init_args": {"name": name, "version": "v1"}}]})


# -- a resume applies an accepted optimizer change -------------------------------------------


def test_an_accepted_optimizer_change_is_applied_to_the_restored_optimizer(tmp_path):
    quickstart(tmp_path, "--trainer.max_epochs", "2")
    last = str(RUN / "checkpoints/last.ckpt")
    quickstart(tmp_path, "--ckpt_path", last, "--trainer.max_epochs", "3",
               "--model.init_args.optimizer.init_args.lr", "0.5",
               "--data.allow_resume_changes", "[optimizer]")  # fmt: skip
    newest = max(tmp_path.glob("logs/*/*/checkpoints/last.ckpt"), key=os.path.getmtime)
    saved = torch.load(newest, weights_only=True)
    assert saved["epoch"] == 2
    assert [g["lr"] for g in saved["optimizer_states"][0]["param_groups"]] == [0.5]
    assert saved["mneme_run"]["optimizer"]["lr"] == 0.5


# -- a checkpoint named as good holds weights that gave a finite loss ----------------------------


class Blow(Callback):
    """At the end of ``epoch`` (before the guard and the checkpoint), makes every weight
    finite but huge: the next forward pass overflows."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(1e30)


def test_diverged_yet_finite_weights_are_not_named_as_the_last_good_checkpoint(tmp_path):
    datamodule = ContinualDataModule(**digits_stream(5), epochs_per_experience=1)
    checkpoint = ExperienceCheckpoint(dirpath=str(tmp_path))
    trainer = Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Blow(epoch=1), FiniteLossGuard(), checkpoint], **datamodule.trainer_settings(),
    )  # fmt: skip
    with pytest.raises(NonFiniteLossError) as raised:
        trainer.fit(ContinualClassifier(encoder_args={"hidden": [16]}), datamodule)
    message = str(raised.value)
    assert f"{tmp_path / 'last.ckpt'} holds the weights that gave this loss" in message
    good = tmp_path / "experience=0.ckpt"
    assert f"Last good checkpoint: {good}." in message
    state = torch.load(good, weights_only=True)["state_dict"]
    weights = [w for w in state.values() if w.is_floating_point()]
    assert all(torch.isfinite(w).all() and w.abs().max() < 1e6 for w in weights)


# -- attacks, disks, subcommands -----------------------------------------------------------------


@pytest.mark.parametrize("eps, norm, ok", [(0.99, "linf", True), (1.0, "linf", False),
                                           (float("nan"), "linf", False), (2.0, "l2", True),
                                           (float("inf"), "l2", False)])  # fmt: skip
def test_attack_budgets_stay_in_the_pixel_range(eps, norm, ok):
    if ok:
        check_attack("RobustAccuracy", eps, 1, None, norm)
        return
    with pytest.raises(ConfigError, match="RobustAccuracy.eps"):
        check_attack("RobustAccuracy", eps, 1, None, norm)


def test_a_full_log_folder_below_tmp_is_not_called_a_full_tmpdir(tmp_path, monkeypatch):
    from mneme.callbacks.runtime.checkpoint import _write_error

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    target = tmp_path / "logs" / "run" / "checkpoints" / "last.ckpt"
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target) + ".tmp")
    assert _write_error(full, target).startswith("checkpoint.dirpath:")
    staged = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "tmpab12"))
    assert _write_error(staged, target).startswith("TMPDIR:")


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict", "fewshot"])
def test_every_subcommand_has_bad_inputs_in_the_catalog(subcommand):
    """Each subcommand's one-line errors are pinned by catalog cases (run, with the earlier
    run's files hashed around each, by tests/test_bad_inputs.py)."""
    cases = [name for name, (args, _) in CASES.items() if args[0] == subcommand]
    assert len(cases) >= 4, cases


def test_jsonargparse_itself_imports_nothing_outside_the_trusted_while_mneme_parses(
    tmp_path, monkeypatch
):
    """The second guard, for class paths the text reading does not see: jsonargparse's
    own import-path policy, set while the CLI parses and restored after."""
    from jsonargparse import ArgumentParser
    from jsonargparse import _common as jsonargparse_settings
    from mneme.app.cli.raw_config import import_policy

    (tmp_path / "marked_elsewhere.py").write_text(MARKED)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callback", type=Callback)
    before = dict(jsonargparse_settings.parsing_settings)
    with import_policy():
        with pytest.raises(Exception, match="marked_elsewhere"):
            parser.parse_args(["--callback", "marked_elsewhere.Foo"])
        assert not (tmp_path / "imported").exists()
        parsed = parser.parse_args(["--callback", "lightning.pytorch.callbacks.Timer"])
        assert parsed.callback.class_path == "lightning.pytorch.callbacks.Timer"
    assert jsonargparse_settings.parsing_settings == before
