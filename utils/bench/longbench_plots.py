"""density.png of eval_longbench.py: the paper's Table 3 as a figure, the LongBench Average against token density,
one line per method, one panel per model and decode protocol (rows of utils/bench/longbench_tables.py result_rows)."""

from __future__ import annotations

from pathlib import Path

from data.longbench import ALL_DATASETS
from utils.bench.longbench_tables import dense_row, method_order


def plot_density(rows: list[dict], path: Path) -> Path | None:
    """Table 3 as a figure: LongBench Average against token density, one line per method (a single marker for a
    method run at one density), dense as a dashed line; one panel per model and decode protocol. None when no
    run has a density."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    sparse = [r for r in rows if r["method"] != "dense" and r["budget"] is None and r["density"] is not None
              and r["Average"] is not None]
    panels = sorted({(r["model"], r["decode"]) for r in sparse})
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.6), squeeze=False)
    for ax, (model, decode) in zip(axes[0], panels):
        mine = [r for r in sparse if (r["model"], r["decode"]) == (model, decode)]
        colors, markers = plt.get_cmap("tab20").colors, "osD^vP*Xh<>"  # a dozen methods stay apart
        for n, method in enumerate(sorted({r["method"] for r in mine}, key=method_order)):
            # FlexPrefill / XAttention record the density they reached: plotted there (their papers' x axis)
            points = sorted((r["density"] if r.get("density_reached") is None else r["density_reached"],
                             r["Average"]) for r in mine if r["method"] == method)
            style = dict(linewidth=2.5, zorder=3) if method == "dhsa" else dict(linewidth=1.2)
            ax.plot([100 * x for x, _ in points], [y for _, y in points], marker=markers[n % len(markers)],
                    color=colors[n % len(colors)], label=method, **style)
        dense = dense_row(rows, {"model": model})
        if dense is not None and dense["Average"] is not None:
            ax.axhline(dense["Average"], color="black", linestyle="--", linewidth=1, label="dense")
        densities = sorted({100 * r["density"] for r in mine})
        ax.set_xscale("log", base=2)
        ax.set_xticks(densities, [f"{d:g}%" for d in densities])
        ax.minorticks_off()
        ax.set_xlabel("token density N_b / L")
        ax.set_ylabel("LongBench average (x100)")
        ax.set_title(f"{model}, {decode} decode", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    covered = sorted({d for r in sparse for d in ALL_DATASETS if r[d] is not None}, key=ALL_DATASETS.index)
    figure.suptitle(f"LongBench score vs density ({', '.join(covered)})", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path
