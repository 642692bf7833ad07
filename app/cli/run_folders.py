"""The run folder: where a run's logs go, the version a run claims before it starts, and the
clean-up of what a failed start left behind."""

from __future__ import annotations

from pathlib import Path

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


# Log folders this process claimed and has not written into yet (removed if it fails).
CLAIMED: list[Path] = []


def claim_log_version(trainer_config) -> None:
    """Create the run's log folder with ``os.mkdir``, which fails if it exists, so that two
    runs started together on one logs folder never share a version, and an earlier run's
    folder (``trainer.logger.init_args.version``) is refused. Rank 0 claims; the other
    ranks take its folder from Lightning (``trainer.log_dir`` is broadcast)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    args, root = logger_args(trainer_config), log_root(trainer_config)
    if args is None or getattr(rank_zero_only, "rank", 0) != 0:
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"trainer.logger.init_args.save_dir: cannot create '{root}' "
            f"({error.strerror or error}); choose a writable folder"
        ) from None
    if args["version"] is not None:
        folder = root / version_folder(args["version"])
        try:
            folder.mkdir()
        except FileExistsError:
            raise ConfigError(
                f"trainer.logger.init_args.version: '{folder}' holds an earlier run, which a "
                "new run never writes into; leave version unset for a new one (resume with "
                f"--ckpt_path {folder}/checkpoints/last.ckpt)"
            ) from None
        CLAIMED.append(folder)
        return
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
    for folder in CLAIMED:
        try:
            folder.rmdir()  # only if empty: never a folder that holds anything
        except OSError:
            pass
    CLAIMED.clear()
    for folder in NEW_DATA_FOLDERS:
        remove_empty_tree(folder)
    NEW_DATA_FOLDERS.clear()
