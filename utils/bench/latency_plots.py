"""Speed-up plots of the latency CSVs (run_latency_test.py --mode plot): one figure per CSV, speed-up of each
method against the dense baseline vs sequence length (log2 axis), one panel per density. Against SDPA flash where
the CSV has it; decode CSVs against "sdpa" (speedup_vs_dense), over the KV cache length."""

from __future__ import annotations

from pathlib import Path


def plot(out_dir: Path) -> list[Path]:
    """One figure per CSV: speedup of each sparse method vs length, one panel per density."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    made = []
    for path in sorted(out_dir.glob("*.csv")):
        df = pd.read_csv(path)
        decode = path.stem.startswith("decode")
        order = ("speedup_vs_dense", "speedup_vs_flash") if decode else ("speedup_vs_flash", "speedup_vs_dense")
        col = next((c for c in order if c in df and df[c].notna().any()), None)
        if col is None:
            continue
        df = df[df[col].notna() & df["part"].isin(["total", "prefill"])]
        if df.empty:
            continue
        densities = sorted(df["density"].unique())
        fig, axes = plt.subplots(1, len(densities), figsize=(4.5 * len(densities), 3.6), squeeze=False)
        for ax, density in zip(axes[0], densities):
            sub = df[df["density"] == density]
            shapes = "shape" in sub and sub["shape"].nunique() > 1  # one line per method and layer shape
            for key, grp in sub.groupby(["method", "shape"] if shapes else ["method"]):
                grp = grp.groupby("length")[col].median()
                ax.plot(grp.index, grp.values, marker="o", label=", ".join(map(str, key)))
            ax.set_xscale("log", base=2)
            ax.set_xlabel("KV cache length (one decode step)" if decode else "sequence length")
            ax.set_ylabel(col.replace("_", " "))
            ax.set_title(f"density {density:g}")
            ax.axhline(1.0, color="grey", lw=0.5)
            ax.legend(fontsize=7)
        fig.suptitle(path.stem)
        fig.tight_layout()
        target = path.with_suffix(".png")
        fig.savefig(target, dpi=120)
        plt.close(fig)
        made.append(target)
    return made


__all__ = ["plot"]
