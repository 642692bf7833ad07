"""The run folder: where a run's logs go, the version a run claims before it starts, and the
clean-up of what a failed start left behind.

Where each command writes (so that TensorBoard shows one run per training run):

- ``fit``: a new ``<save_dir>/<name>/version_N``; a resume from a run's ``last.ckpt``
  continues in that run's folder (new event file, the run's own files updated);
- ``validate``/``test``/``predict`` (and ``fewshot validate``/``test``, ``export``): under
  the evaluated checkpoint's run, ``<run>/eval/<command>-<n>``, never a new ``version_N``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from mneme.app.core.errors import ConfigError


def logger_args(trainer_config) -> dict | None:
    """``init_args`` of a logger that writes ``<save_dir>/<name>/<version>`` (TensorBoard,
    CSV), or ``None``."""
    logger = trainer_config.get("logger")
    if isinstance(logger, list):
        logger = logger[0] if len(logger) == 1 else None
    if logger is None or isinstance(logger, bool) or not hasattr(logger, "get"):
        return None
    init_args = logger.get("init_args")
    if init_args is None or "save_dir" not in init_args or "version" not in init_args:
        return None
    return init_args


def log_root(trainer_config) -> Path | None:
    args = logger_args(trainer_config)
    return None if args is None else Path(args["save_dir"]) / (args.get("name") or "")


def version_folder(version: int | str) -> str:
    return version if isinstance(version, str) else f"version_{version}"


# Logger fields that name a folder below ``save_dir`` (a name, not a path).
NAMING_FIELDS = ("name", "version", "sub_dir")


def check_run_names(trainer_config) -> None:
    """Refuse a logger name, version or sub-folder (of every logger) that would leave
    ``save_dir`` (``../../escaped``, an absolute path): a run is written below it only."""
    loggers = trainer_config.get("logger") if hasattr(trainer_config, "get") else None
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init_args = logger.get("init_args") if hasattr(logger, "get") else None
        if init_args is not None:
            _check_names(init_args)


def _check_names(init_args) -> None:
    for field in NAMING_FIELDS:
        value = init_args.get(field) if hasattr(init_args, "get") else None
        if not isinstance(value, str) or not value:
            continue
        parts = Path(value).parts
        if Path(value).is_absolute() or ".." in parts or "\\" in value or "\0" in value:
            raise ConfigError(
                f"trainer.logger.init_args.{field}: '{value}' would write outside save_dir "
                "(an absolute path or '..'); give a plain name, and choose the folder with "
                "trainer.logger.init_args.save_dir"
            )


# Log folders this process claimed and has not written into yet (removed if it fails).
CLAIMED: list[Path] = []


class RunFolder(NamedTuple):
    """The folder a command writes in, and why: ``new`` (a training run), ``resumed`` (the
    run a fit continues) or ``evaluation`` (``<run>/eval/<command>-<n>``)."""

    path: Path
    kind: str


# Subcommands that evaluate a trained model (``fewshot-test`` is ``test``).
EVALUATIONS = ("validate", "test", "predict", "export")


def checkpoint_run(ckpt_path: str | os.PathLike | None) -> Path | None:
    """The run a checkpoint belongs to: ``<run>`` of ``<run>/checkpoints/<file>``, where
    every run keeps its checkpoints (``checkpoint.dirpath`` unset); else ``None``."""
    if not ckpt_path:
        return None
    path = Path(ckpt_path)
    if path.parent.name != "checkpoints" or not path.is_file():
        return None
    return path.parent.parent


def resumed_run(ckpt_path: str | os.PathLike | None) -> Path | None:
    """The run a fit from ``ckpt_path`` continues: the checkpoint's run when it is that
    run's ``last.ckpt`` (or the experience checkpoint ``last.ckpt`` links to); ``None``
    for an earlier save point, which starts a new run from there (a branch), so that the
    later checkpoints of the run stay as they are."""
    run = checkpoint_run(ckpt_path)
    try:
        same = run is not None and os.path.samefile(ckpt_path, run / "checkpoints" / "last.ckpt")
    except OSError:  # the run has no last.ckpt
        return None
    return run if same else None


def claim_evaluation_folder(run: Path, command: str) -> Path:
    """Create ``<run>/eval/<command>-<n>`` (``n`` the first free number, ``os.mkdir`` so two
    evaluations started together never share one) and return it: where an evaluation of
    ``run``'s checkpoint (``test``, ``validate``, ``predict``, ``fewshot-test``, ``export``)
    writes. Removed by :func:`release_claims` if the command fails before writing in it."""
    parent = run / "eval"
    created = False
    try:
        parent.mkdir()
        created = True
    except FileExistsError:
        pass
    except OSError as error:
        raise ConfigError(
            f"ckpt_path: cannot create '{parent}' for this {command}'s results "
            f"({error.strerror or error}); copy the run folder somewhere writable"
        ) from None
    taken = [p.name[len(command) + 1 :] for p in parent.glob(f"{command}-*")]
    number = max((int(t) for t in taken if t.isdigit()), default=-1) + 1
    while True:
        folder = parent / f"{command}-{number}"
        try:
            folder.mkdir()
            break
        except FileExistsError:  # another evaluation claimed it first: take the next
            number += 1
    CLAIMED.append(folder)
    if created:
        CLAIMED.append(parent)  # after its child: removed only if both stay empty
    return folder


def claim_log_version(
    trainer_config, command: str = "fit", ckpt_path: str | None = None
) -> RunFolder | None:
    """Decide and claim the folder this command writes in (see the module docstring), and
    point the logger at it; ``None`` without a folder logger, and on ranks other than 0
    (except a resume, which every rank decides alike: its folder exists, nothing is claimed).

    A new run's folder is created with ``os.mkdir``, which fails if it exists, so that two
    runs started together on one logs folder never share a version, and an earlier run's
    folder (``trainer.logger.init_args.version``) is refused. Rank 0 claims; the other
    ranks take its folder from Lightning (``trainer.log_dir`` is broadcast)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    check_run_names(trainer_config)  # a name never leads outside save_dir (every rank)
    args, root = logger_args(trainer_config), log_root(trainer_config)
    if args is None:
        return None
    first = getattr(rank_zero_only, "rank", 0) == 0
    if command.rsplit("-", 1)[-1] in EVALUATIONS and args["version"] is None:
        if not first:
            return None
        run = checkpoint_run(ckpt_path)
        if run is None:  # a checkpoint outside any run: beside the config's runs
            _make_root(root)
        folder = claim_evaluation_folder(run or root, command)
        point_logger(args, folder.parent.parent, "eval", folder.name)
        return RunFolder(folder, "evaluation")
    run = resumed_run(ckpt_path) if command.rsplit("-", 1)[-1] == "fit" else None
    explicit = args["version"]
    named = explicit is not None and (root / version_folder(explicit)).resolve()
    if run is not None and (explicit is None or named == run.resolve()):
        # the run it resumes: its own files only are written (never claimed: never removed)
        point_logger(args, run.parent.parent, run.parent.name, run.name)
        return RunFolder(run, "resumed")
    if not first:
        return None
    _make_root(root)
    if explicit is not None:
        folder = root / version_folder(explicit)
        try:
            folder.mkdir()
        except FileExistsError:
            raise ConfigError(
                f"trainer.logger.init_args.version: '{folder}' holds an earlier run, which a "
                "new run never writes into; leave version unset for a new one (resume with "
                f"--ckpt_path {folder}/checkpoints/last.ckpt)"
            ) from None
        CLAIMED.append(folder)
        return RunFolder(folder, "new")
    numbers = [int(p.name[8:]) for p in root.glob("version_*") if p.name[8:].isdigit()]
    version = max(numbers, default=-1) + 1
    while True:
        try:
            (root / f"version_{version}").mkdir()
            break
        except FileExistsError:  # another run claimed it first: take the next
            version += 1
    args["version"] = version
    CLAIMED.append(root / f"version_{version}")
    return RunFolder(root / f"version_{version}", "new")


def point_logger(args, save_dir: Path, name: str, version: str) -> None:
    """Set a folder logger's arguments so that it writes ``<save_dir>/<name>/<version>``."""
    args["save_dir"], args["name"], args["version"] = str(save_dir), name, version


def _make_root(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"trainer.logger.init_args.save_dir: cannot create '{root}' "
            f"({error.strerror or error}); choose a writable folder"
        ) from None


def files_in(folder: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of the files under ``folder``."""
    found = {}
    for path in folder.rglob("*") if folder.is_dir() else []:
        try:
            stat = path.stat()
        except OSError:  # removed meanwhile (a temporary file)
            continue
        if path.is_file():
            found[path.relative_to(folder).as_posix()] = (stat.st_size, stat.st_mtime_ns)
    return found


def written_since(folder: Path, before: dict[str, tuple[int, int]]) -> list[str]:
    """The files under ``folder`` that are new or changed since ``before`` (:func:`files_in`)."""
    after = files_in(folder)
    return sorted(name for name, stat in after.items() if before.get(name) != stat)


# A dataset folder the run would create (a benchmark's ``dataset_root`` that does not exist
# yet): removed, with the empty folders a failed download made in it, when the run fails.
NEW_DATA_FOLDERS: list[Path] = []


def note_new_folder(benchmark_args) -> None:
    root = benchmark_args.get("dataset_root") if hasattr(benchmark_args, "get") else None
    if isinstance(root, str) and root and not Path(root).exists():
        NEW_DATA_FOLDERS.append(Path(root))


def remove_empty_tree(folder: Path) -> None:
    """Remove ``folder`` if it and every folder below it hold no file."""
    if not folder.is_dir() or any(p.is_file() for p in folder.rglob("*")):
        return
    for sub in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        sub.rmdir()
    folder.rmdir()


def release_claims() -> None:
    """Remove the log folders this process claimed and left empty (a run that failed)."""
    for folder in sorted(CLAIMED, key=lambda f: len(f.parts), reverse=True):  # inner first
        try:
            folder.rmdir()  # only if empty: never a folder that holds anything
        except OSError:
            pass
    CLAIMED.clear()
    for folder in NEW_DATA_FOLDERS:
        remove_empty_tree(folder)
    NEW_DATA_FOLDERS.clear()
