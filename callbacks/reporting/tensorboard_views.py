"""The accuracy matrix in TensorBoard: the heatmap image, the printed table in the Text tab,
and the Custom Scalars layout of the ``continual/*`` series."""

from __future__ import annotations

import math

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only


@rank_zero_only
def add_text_table(logger: TensorBoardLogger, table: str, step: int) -> None:
    """The printed table in the Text tab (monospace: a Markdown code block): exact values,
    which no smoothing touches."""
    logger.experiment.add_text("continual/table", "    " + table.replace("\n", "\n    "), step)


# The Custom Scalars tab: every test experience's accuracy in one chart (a value no
# neighbour's outlier scaling can hide), and the summary figures in another.
LAYOUT = {
    "continual": {
        "accuracy on each test experience (after experience k)": [
            "Multiline",
            [r"continual/acc_exp\d+$"],
        ],
        "summary": [
            "Multiline",
            [f"continual/{key}$" for key in ("average_accuracy", "forgetting", "bwt", "fwt")],
        ],
    }
}


@rank_zero_only
def add_layout(logger: TensorBoardLogger) -> None:
    logger.experiment.add_custom_scalars(LAYOUT)


@rank_zero_only
def add_heatmap(
    logger: TensorBoardLogger, rows: list[list[float]], step: int, name: str = "accuracy"
) -> None:
    """The matrix as an image, every row of the stream (rows not trained yet blank), values in
    text that contrasts with each cell's color, legible at TensorBoard's default size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    columns = len(rows[0])
    grid = np.full((columns, columns), np.nan)
    grid[: len(rows)] = rows
    # TensorBoard shows an image at its card's width (about 350 px), whatever its size: text
    # is sized to the cells and the figure, so that it stays about 12 px high there.
    cell = min(1.0, 8.0 / columns)  # inches, at 100 dpi
    width = 1.2 + 1.2 * cell * columns
    fontsize, labelsize = 21.0 * cell, 2.4 * width
    fig, ax = plt.subplots(figsize=(width, 1.0 + cell * columns), dpi=100)
    cmap = plt.get_cmap("viridis")
    # Perplexity has no fixed range: its colors span the matrix's own values, reversed so
    # that bright is good for both metrics.
    low, high = (0.0, 1.0) if name == "accuracy" else (np.nanmin(grid), np.nanmax(grid))
    high = high if high > low else low + 1.0
    if name != "accuracy":
        cmap = cmap.reversed()
    image = ax.imshow(np.ma.masked_invalid(grid), vmin=low, vmax=high, cmap=cmap)
    ax.set_facecolor("#eeeeee")  # rows not trained yet
    for k, row in enumerate(rows):
        for j, a in enumerate(row):
            if math.isnan(a):
                continue
            red, green, blue, _ = cmap((a - low) / (high - low))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            label = f"{a:.2f}" if a < 1000 else f"{a:.0f}"
            ax.text(j, k, label, ha="center", va="center", fontsize=fontsize,
                    fontweight="bold", color="white" if dark else "black")  # fmt: skip
    ax.set_xticks(range(columns))
    ax.set_yticks(range(columns))
    ax.tick_params(labelsize=labelsize)
    ax.set_xlabel("test experience j", fontsize=labelsize)
    ax.set_ylabel("after experience k", fontsize=labelsize)
    ax.set_title(f"{name}, after experience {step}", fontsize=labelsize)
    ticks = [0, 0.5, 1] if name == "accuracy" else None
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03, ticks=ticks)
    bar.ax.tick_params(labelsize=labelsize)
    fig.tight_layout(pad=0.3)
    logger.experiment.add_figure(f"continual/{name}_matrix", fig, global_step=step)
    plt.close(fig)
