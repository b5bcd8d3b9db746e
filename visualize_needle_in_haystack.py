"""Heatmaps of Needle-in-a-Haystack results, drawn like the paper's Figures 1a and 13.

Each run file (results_needle/<model>/<run>.jsonl, written by run_needle_in_haystack.py) becomes a heatmap
of needle depth (rows) x context length (columns), coloured red (score 0, wrong) -> yellow -> green (score 100,
correct) as in the original test and the authors' plots, with the average score in the title.

    python visualize_needle_in_haystack.py results_needle               # a PNG per run + comparisons per model
    python visualize_needle_in_haystack.py a.jsonl b.jsonl --side-by-side cmp.png

For a folder, every run gets <run>.png next to its JSONL, and every model folder with several runs gets
compare_<density>.png: the runs of one density side by side (dense attention in each). Runs with --rope-scaling
(results_needle/<model>_yarn4/) name it in their titles; lengths are labelled 1K .. 128K.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; works without a display

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap  # noqa: E402

from utils.runs.cli import user_errors  # noqa: E402
from utils.runs import read_jsonl  # noqa: E402

# The red -> yellow -> green scale of Kamradt's test, which the authors' plots use too.
CMAP = LinearSegmentedColormap.from_list("needle", ["#F0496E", "#EBB839", "#0CD79F"])


def load_run(path: str | Path) -> pd.DataFrame:
    """The records of one JSONL run file (utils/runs/records.py read_jsonl: a last line cut off by an interrupted run is
    left out)."""
    path = Path(path)
    rows = read_jsonl(path)
    if not rows:
        raise ValueError(f"{path} holds no results")
    return pd.DataFrame(rows)


def score_grid(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean score per (depth, length): rows are depths (0% at the top), columns lengths."""
    grid = frame.pivot_table(index="depth", columns="length", values="score", aggfunc="mean")
    return grid.sort_index().sort_index(axis=1)


def _length_label(n: int) -> str:
    return f"{n / 1024:g}K" if n % 1024 == 0 else str(n)


def run_label(frame: pd.DataFrame) -> str:
    """'dense' or 'dhsa, density 0.0625' (+ the minimum budget when one was set)."""
    first = frame.iloc[0]
    if first["method"] == "dense":
        return "dense"
    label = f"{first['method']}, density {first['density']:g}"
    config = first.get("config")
    min_budget = config.get("min_budget") if isinstance(config, dict) else None
    decode = config.get("decode") if isinstance(config, dict) else None
    return label + (f", min {min_budget} keys" if min_budget else "") + (f", {decode} decode" if decode else "")


def draw_heatmap(ax, frame: pd.DataFrame, title: str, colorbar: bool = True) -> float:
    """Draw one run on `ax`; returns its average score."""
    grid = score_grid(frame)
    average = frame["score"].mean()
    sns.heatmap(grid, ax=ax, vmin=0, vmax=100, cmap=CMAP, cbar=colorbar, linewidths=0.5, linecolor="grey",
                cbar_kws={"label": "score (ROUGE-1)"} if colorbar else None)
    ax.set_xticklabels([_length_label(int(n)) for n in grid.columns], rotation=45)
    ax.set_yticklabels([f"{d:g}" for d in grid.index], rotation=0)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (%)")
    ax.set_title(f"{title}\naverage score {average:.1f}")
    return average


def _model(frame: pd.DataFrame) -> str:
    """The model's name, with its context extension when the run had one: 'qwen2.5-coder-1.5b-instruct, yarn:4'."""
    name = str(frame["model"].iloc[0]) if "model" in frame else ""
    scaling = frame["rope_scaling"].iloc[0] if "rope_scaling" in frame else None
    return f"{name}, {scaling}" if isinstance(scaling, str) and scaling else name


def plot_run(path: str | Path, out: str | Path | None = None) -> Path:
    """Heatmap PNG of one run; default: next to the JSONL with the same name."""
    path = Path(path)
    frame = load_run(path)
    out = Path(out) if out else path.with_suffix(".png")
    grid_shape = score_grid(frame).shape
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * grid_shape[1] + 3), max(3.5, 0.35 * grid_shape[0] + 2)))
    draw_heatmap(ax, frame, f"{_model(frame)} {run_label(frame)}".strip())
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return out


def plot_side_by_side(paths: list[str | Path], out: str | Path, title: str | None = None) -> Path:
    """Several runs in one row (one shared colour bar), e.g. dense vs DHSA vs a baseline."""
    frames = [load_run(p) for p in paths]
    if not frames:
        raise ValueError("give at least one run to draw")
    rows, cols = score_grid(frames[0]).shape
    width = max(4.0, 0.7 * cols + 2.5)
    fig, axes = plt.subplots(1, len(frames), figsize=(width * len(frames) + 1.5, max(3.5, 0.35 * rows + 2.2)),
                             sharey=True, squeeze=False)
    for i, (ax, frame) in enumerate(zip(axes[0], frames)):
        draw_heatmap(ax, frame, run_label(frame), colorbar=i == len(frames) - 1)
        if i:
            ax.set_ylabel("")
    fig.suptitle(title or f"Needle in a haystack: {_model(frames[0])}")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return out


def comparison_groups(paths: list[Path]) -> dict[tuple[Path, str], list[Path]]:
    """Runs of each folder grouped by density; dense runs join every group. Groups of one are dropped."""
    by_folder: dict[Path, list[Path]] = defaultdict(list)
    for p in paths:
        by_folder[p.parent].append(p)
    groups = {}
    for folder, runs in by_folder.items():
        firsts = {p: load_run(p).iloc[0] for p in runs}
        dense = [p for p in runs if firsts[p]["method"] == "dense"]
        by_density: dict[str, list[Path]] = defaultdict(list)
        for p in runs:
            if firsts[p]["method"] != "dense":
                by_density[f"{firsts[p]['density']:g}"].append(p)
        for density, sparse in by_density.items():
            members = dense + sorted(sparse, key=lambda p: (not p.stem.startswith("dhsa"), p.stem))
            if len(members) > 1:
                groups[folder, density] = members
    return groups


def find_runs(targets: list[str]) -> list[Path]:
    runs = []
    for target in targets:
        path = Path(target)
        if path.is_dir():
            runs += sorted(path.rglob("*.jsonl"))
        elif path.is_file():
            runs.append(path)
        else:
            raise FileNotFoundError(f"{path} not found; give result .jsonl files or a folder such as results_needle")
    return runs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", default=["results_needle"], help="run .jsonl files or folders")
    parser.add_argument("--side-by-side", metavar="PNG", default=None,
                        help="draw only the given runs, side by side, into this file")
    parser.add_argument("--title", default=None, help="title of the side-by-side figure")
    args = parser.parse_args(argv)
    with user_errors():
        runs = find_runs(args.paths)
        if not runs:
            raise FileNotFoundError(f"no .jsonl results under {' '.join(args.paths)}; "
                                    "run run_needle_in_haystack.py first")
        if args.side_by_side:
            print(plot_side_by_side(runs, args.side_by_side, args.title))
            return
        for run in runs:
            print(plot_run(run))
        for (folder, density), members in comparison_groups(runs).items():
            print(plot_side_by_side(members, folder / f"compare_{density}.png",
                                    f"Needle in a haystack: {folder.name}, density {density}"))


if __name__ == "__main__":
    main()
