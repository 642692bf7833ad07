"""The bad-input catalog's cases of issue 25's config / checkpoint / CLI half: class paths
that must not be imported, trust a config cannot grant itself, YAML that says one thing
twice, names that would leave ``save_dir``, non-finite checkpoints, resumes that change the
optimizer, out-of-range attacks, and the regressions that were tracebacks; a few of them
per subcommand (fit, validate, test, predict, fewshot).

``tests/test_bad_inputs.py`` runs them with its rules (one line naming the field, no
traceback, the earlier run's files hashed before and after). ``make_trust_files`` writes
their inputs into the catalog's folder, which is on ``sys.path`` while the cases run: each
``would_import_<n>`` module leaves a file ``imported`` in the working folder if it is ever
imported (``LEFT_ABSENT``), so every class-path case proves nothing was imported.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import ROOT

QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
PROTONET = str(ROOT / "configs" / "fewshot_protonet.yaml")
FEWSHOT_EVAL = str(ROOT / "configs" / "fewshot_eval.yaml")
EARLIER_RUN = "logs/quickstart/version_0"
CKPT = f"{EARLIER_RUN}/checkpoints/last.ckpt"
MODULES = 16  # would_import_0 ... would_import_15
MARKER = "imported"
NOT_IMPORTED = ["is not imported", "MNEME_TRUSTED_CLASSES"]


def fit(*args: str) -> list[str]:
    # the earlier run trained one epoch per experience: a resume must say so too
    return ["fit", "--config", QUICKSTART, *args]


def resume(*args: str) -> list[str]:
    return fit("--data.epochs_per_experience", "1", "--ckpt_path", CKPT, *args)


def make_trust_files(d: Path) -> None:
    for n in range(MODULES):
        (d / f"would_import_{n}.py").write_text(
            f"open({MARKER!r}, 'w').close()  # the working folder: the case's own\n"
            "class Foo:\n    pass\n\n\ndef make(params):\n    return None\n"
        )
    (d / "callbacks_outside.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: would_import_7.Foo\n"
    )
    (d / "callback_list.yaml").write_text("- class_path: would_import_9.Foo\n")
    (d / "model_outside.yaml").write_text("model: would_import_10.Foo\n")
    (d / "trusts_itself.yaml").write_text(
        "data:\n  benchmark: os.system\n  benchmark_args: {command: 'touch x'}\n"
        "  trusted_benchmarks: [os.system]\n"
    )
    (d / "dup_key.yaml").write_text("data:\n  batch_size: 8\n  batch_size: 16\n")
    (d / "dup_section.yaml").write_text(
        "data: {batch_size: 8}\ntrainer: {}\ndata: {batch_size: 16}\n"
    )
    (d / "trainer_scalar.yaml").write_text("trainer: 5\n")
    (d / "checkpoint_list.yaml").write_text("checkpoint: [1, 2]\n")
    (d / "data_number.yaml").write_text("data: 3\n")
    checkpoint = torch.load(d / CKPT, weights_only=True, map_location="cpu")
    weights = checkpoint["state_dict"]
    nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
           for k, v in weights.items()}  # fmt: skip
    torch.save({**checkpoint, "state_dict": nan}, d / "nan.ckpt")
    last = [k for k, v in weights.items() if v.is_floating_point()][-1]
    one_inf = dict(weights)
    one_inf[last] = weights[last].clone().index_fill_(0, torch.tensor([0]), float("inf"))
    torch.save({**checkpoint, "state_dict": one_inf}, d / "one_inf.ckpt")


def _outside(field: str, n: int, *args: str) -> tuple[list[str], list[str]]:
    return list(args), [field, f"would_import_{n}", *NOT_IMPORTED]


# id: (arguments after `mneme`, substrings the error line must contain)
TRUST_CASES: dict[str, tuple[list[str], list[str]]] = {
    # -- naming is not importing: checked against the field before any import --------------
    "callback_outside_its_trees": _outside(
        "trainer.callbacks", 1, *fit("--trainer.callbacks+=would_import_1.Foo")
    ),
    "optimizer_class_path_outside_torch_optim": _outside(
        "model.optimizer", 2, *fit("--model.init_args.optimizer.class_path", "would_import_2.Foo")
    ),
    "optimizer_function_outside_torch_optim": _outside(
        "model.optimizer", 3, *fit("--model.init_args.optimizer", "would_import_3.make")
    ),
    "lr_scheduler_outside_torch": _outside(
        "model.lr_scheduler", 4,
        *fit("--model.init_args.lr_scheduler.class_path", "would_import_4.Foo"),
    ),
    "model_outside_mneme_app": _outside(
        "model", 5, *fit("--model.class_path", "would_import_5.Foo")
    ),
    "logger_outside_lightning_loggers": _outside(
        "trainer.logger", 6, *fit("--trainer.logger.class_path", "would_import_6.Foo")
    ),
    "callback_in_a_config_file": _outside(
        "trainer.callbacks", 7, *fit("--config", "callbacks_outside.yaml")
    ),
    "callbacks_as_a_yaml_list": _outside(
        "trainer.callbacks", 8, *fit("--trainer.callbacks", "[{class_path: would_import_8.Foo}]")
    ),
    "callbacks_from_a_file_of_their_own": _outside(
        "trainer.callbacks", 9, *fit("--trainer.callbacks", "callback_list.yaml")
    ),
    "model_as_a_string_in_a_config_file": _outside(
        "model", 10, *fit("--config", "model_outside.yaml")
    ),
    "fewshot_callback_outside_its_trees": _outside(
        "trainer.callbacks", 11,
        "fewshot", "fit", "--config", PROTONET, "--trainer.callbacks+=would_import_11.Foo",
    ),
    "validate_callback_outside_its_trees": _outside(
        "trainer.callbacks", 12,
        "validate", "--config", QUICKSTART, "--ckpt_path", CKPT,
        "--trainer.callbacks+=would_import_12.Foo",
    ),
    "predict_optimizer_outside_torch_optim": _outside(
        "model.optimizer", 13,
        "predict", "--config", QUICKSTART, "--ckpt_path", CKPT,
        "--model.init_args.optimizer.class_path", "would_import_13.Foo",
    ),
    "test_logger_outside_lightning_loggers": _outside(
        "trainer.logger", 14,
        "test", "--config", QUICKSTART, "--ckpt_path", CKPT,
        "--trainer.logger.class_path", "would_import_14.Foo",
    ),
    "fewshot_eval_model_outside_mneme_app": _outside(
        "model", 15, "fewshot", "test", "--config", FEWSHOT_EVAL,
        "--model.class_path", "would_import_15.Foo",
    ),
    # -- trust comes from outside the config ------------------------------------------------
    "config_file_trusts_its_own_benchmark": (
        fit("--config", "trusts_itself.yaml"),
        ["data.trusted_benchmarks", "no longer read from a config", "MNEME_TRUSTED_BENCHMARKS"],
    ),
    "test_trusts_its_own_benchmark": (
        ["test", "--config", QUICKSTART, "--ckpt_path", CKPT,
         "--data.trusted_benchmarks", "[os.system]"],
        ["data.trusted_benchmarks", "@stream"],
    ),
    # -- YAML that says a thing twice, sections that are not mappings ------------------------
    "duplicated_key_in_yaml": (fit("--config", "dup_key.yaml"), ["dup_key.yaml", "'batch_size'", "twice"]),  # noqa: E501
    "duplicated_section_in_yaml": (fit("--config", "dup_section.yaml"), ["dup_section.yaml", "'data'", "twice"]),  # noqa: E501
    "predict_duplicated_key_in_yaml": (
        ["predict", "--config", QUICKSTART, "--config", "dup_key.yaml", "--ckpt_path", CKPT],
        ["'batch_size'", "twice"],
    ),
    "fewshot_duplicated_section": (
        ["fewshot", "fit", "--config", PROTONET, "--config", "dup_section.yaml"],
        ["'data'", "twice"],
    ),
    "trainer_section_is_a_number": (fit("--config", "trainer_scalar.yaml"), ["trainer", "not a mapping"]),  # noqa: E501
    "checkpoint_section_is_a_list": (fit("--config", "checkpoint_list.yaml"), ["checkpoint", "not a mapping"]),  # noqa: E501
    "data_section_is_a_number": (fit("--config", "data_number.yaml"), ["data", "not a mapping"]),
    "fewshot_trainer_section_is_a_number": (
        ["fewshot", "test", "--config", FEWSHOT_EVAL, "--config", "trainer_scalar.yaml"],
        ["trainer", "not a mapping"],
    ),
    # -- names that would leave save_dir ------------------------------------------------------
    "run_name_leaves_save_dir": (
        fit("--trainer.logger.init_args.name", "../../escaped"),
        ["trainer.logger.init_args.name", "outside save_dir"],
    ),
    "run_version_leaves_save_dir": (
        fit("--trainer.logger.init_args.version", "../../escaped_version"),
        ["trainer.logger.init_args.version", "outside save_dir"],
    ),
    "run_sub_dir_leaves_save_dir": (
        fit("--trainer.logger.init_args.sub_dir", "../../../escaped_sub_dir"),
        ["trainer.logger.init_args.sub_dir", "outside save_dir"],
    ),
    "test_run_name_leaves_save_dir": (
        ["test", "--config", QUICKSTART, "--ckpt_path", CKPT,
         "--trainer.logger.init_args.version", "../../escaped_test"],
        ["trainer.logger.init_args.version", "outside save_dir"],
    ),
    # -- non-finite checkpoints ------------------------------------------------------------------
    "test_a_nan_checkpoint": (
        ["test", "--config", QUICKSTART, "--ckpt_path", "nan.ckpt"],
        ["ckpt_path", "nan.ckpt", "non-finite", "encoder."],
    ),
    "validate_name_leaves_save_dir": (
        ["validate", "--config", QUICKSTART, "--ckpt_path", CKPT,
         "--trainer.logger.init_args.name", "../../escaped_validate"],
        ["trainer.logger.init_args.name", "outside save_dir"],
    ),
    "validate_duplicated_section": (
        ["validate", "--config", QUICKSTART, "--config", "dup_section.yaml", "--ckpt_path", CKPT],
        ["'data'", "twice"],
    ),
    "predict_negative_seed": (
        ["predict", "--config", QUICKSTART, "--ckpt_path", CKPT, "--seed_everything", "-2"],
        ["seed_everything", "-2"],
    ),
    "predict_trainer_section_is_a_number": (
        ["predict", "--config", QUICKSTART, "--config", "trainer_scalar.yaml",
         "--ckpt_path", CKPT],
        ["trainer", "not a mapping"],
    ),
    "validate_a_nan_checkpoint": (
        ["validate", "--config", QUICKSTART, "--ckpt_path", "nan.ckpt"],
        ["ckpt_path", "non-finite"],
    ),
    "predict_a_nan_checkpoint": (
        ["predict", "--config", QUICKSTART, "--ckpt_path", "nan.ckpt"],
        ["ckpt_path", "non-finite"],
    ),
    "resume_a_nan_checkpoint": (fit("--ckpt_path", "nan.ckpt"), ["ckpt_path", "non-finite"]),
    "test_one_inf_in_the_head": (
        ["test", "--config", QUICKSTART, "--ckpt_path", "one_inf.ckpt"],
        ["ckpt_path", "one_inf.ckpt", "head.", "1 of"],
    ),
    # -- a teacher's checkpoint: its errors name the teacher's own field -----------------------
    "teacher_checkpoint_of_another_module": (
        fit("--trainer.callbacks+=mneme.callbacks.TeacherDistillation",
            "--trainer.callbacks.init_args.teacher_checkpoint", "aligner.ckpt"),
        ["TeacherDistillation.teacher_checkpoint", "aligner.ckpt"],
    ),
    "teacher_checkpoint_of_nan_weights": (
        fit("--trainer.callbacks+=mneme.callbacks.TeacherDistillation",
            "--trainer.callbacks.init_args.teacher_checkpoint", "nan.ckpt"),
        ["TeacherDistillation.teacher_checkpoint", "non-finite"],
    ),
    "teacher_checkpoint_truncated": (
        fit("--trainer.callbacks+=mneme.callbacks.TeacherDistillation",
            "--trainer.callbacks.init_args.teacher_checkpoint", "truncated.ckpt"),
        ["TeacherDistillation.teacher_checkpoint", "truncated.ckpt"],
    ),
    # -- a resume compares the optimizer too --------------------------------------------------
    "resume_with_another_learning_rate": (
        resume("--model.init_args.optimizer.init_args.lr", "0.5"),
        ["model.optimizer", "'lr': 0.5", "allow_resume_changes"],
    ),
    "resume_with_another_momentum": (
        resume("--model.init_args.optimizer.init_args.momentum", "0.5"),
        ["model.optimizer", "'momentum'"],
    ),
    "resume_with_another_optimizer_class": (
        resume("--model.init_args.optimizer", "torch.optim.Adam"),
        ["model.optimizer", "SGD", "Adam"],
    ),
    # -- attacks in range -------------------------------------------------------------------------
    "robust_accuracy_eps_beyond_the_pixel_range": (
        fit("--trainer.callbacks+=mneme.callbacks.RobustAccuracy",
            "--trainer.callbacks.init_args.eps", "2.0"),
        ["RobustAccuracy.eps", "below 1"],
    ),
    "adversarial_training_eps_of_the_whole_range": (
        fit("--trainer.callbacks+=mneme.callbacks.AdversarialTraining",
            "--trainer.callbacks.init_args.eps", "1.0"),
        ["AdversarialTraining.eps", "below 1"],
    ),
    # -- regressions that were tracebacks ----------------------------------------------------------
    "negative_seed": (fit("--seed_everything", "-1"), ["seed_everything", "-1"]),
    "seed_beyond_numpy": (fit("--seed_everything", str(2**32)), ["seed_everything"]),
    "fewshot_negative_seed": (
        ["fewshot", "fit", "--config", PROTONET, "--seed_everything", "-5"],
        ["seed_everything", "-5"],
    ),
    "negative_workers_of_a_streamed_dataset": (
        fit("--data.num_workers", "-1", "--data.materialize", "false"),
        ["data.num_workers", "-1"],
    ),
    "two_identical_replays": (
        fit("--trainer.callbacks+=mneme.callbacks.Replay",
            "--trainer.callbacks+=mneme.callbacks.Replay"),
        ["trainer.callbacks", "Replay", "same arguments"],
    ),
    "lora_target_regex_does_not_compile": (
        fit("--model.init_args.peft", "{method: lora, r: 2, target_modules: 'encoder.(net'}"),
        ["model.peft.target_modules", "not a regular expression"],
    ),
}  # fmt: skip

# What a case must leave absent (relative to its folder): a module it names is never
# imported, a name never writes outside save_dir.
TRUST_LEFT_ABSENT: dict[str, list[str]] = {
    **{
        name: [MARKER] for name, (_, expected) in TRUST_CASES.items() if NOT_IMPORTED[0] in expected
    },
    # save_dir/name/version[/sub_dir], save_dir = logs: where each would have gone
    "run_name_leaves_save_dir": ["../escaped"],
    "run_version_leaves_save_dir": ["escaped_version"],
    "run_sub_dir_leaves_save_dir": ["escaped_sub_dir"],
    "test_run_name_leaves_save_dir": ["escaped_test", "logs/escaped_test"],
    "validate_name_leaves_save_dir": ["../escaped_validate", "escaped_validate"],
}
