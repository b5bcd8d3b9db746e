"""The LongBench result tables eval_longbench.py writes: results.csv (one row per run), results.md (the paper's
Tables 2-4, then every run by dataset) and the LongBench-E tables (results_e.md / .csv).

A run here is a dict: describe_run's fields (model, method, density, budget, decode, run) plus "scores",
{"longbench": {dataset: (score, samples)}, "longbench_e": {dataset: ({bucket: score}, samples)}}. Scores are
LongBench's (data/longbench_metrics.py); a task group is the mean of its datasets present, Average the mean over
the datasets present, English and Chinese alike (as the paper's Table 2).
"""

from __future__ import annotations

import csv
from pathlib import Path

from data.longbench import ALL_DATASETS, GROUPS, LONGBENCH_E_DATASETS
from data.longbench_metrics import LENGTH_BUCKETS


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 2) if values else None


def summarize(scores: dict[str, float], datasets: list[str]) -> dict[str, float | None]:
    """Group scores (mean of the group's datasets present) and the Average over all datasets present.

    Average is the mean over datasets, as in the paper's Table 2 (each of its Avg values is the mean of its
    16 dataset scores, not of the six group scores).
    """
    present = [d for d in datasets if d in scores]
    row = {group: _mean([scores[d] for d in members if d in present]) for group, members in GROUPS.items()}
    row["Average"] = _mean([scores[d] for d in present])
    return row


GROUP_COLUMNS = list(GROUPS) + ["Average"]
TABLE_DENSITY = 0.125  # the paper's Tables 2 and 4
# Table 4 (ablations at 12.5%): the method of each row, as the paper names it. Without both robust chunk vectors and
# dynamic chunks, DHSA is block-sparse attention.
ABLATIONS = {"dhsa": "DHSA", "dhsa_no_robust_repr": "DHSA w/o robust chunk repr.",
             "dhsa_fixed_chunks": "DHSA w/o dynamic chunking",
             "block_sparse": "Block Sparse (DHSA w/o robust chunk repr. & dynamic chunking)"}


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def _density_text(run: dict) -> str:
    if run["method"] == "dense":
        return "–"
    reached = f" (reached {run['density_reached']:.3f})" if run.get("density_reached") is not None else ""
    if run.get("budget"):
        return f"{run['budget']} keys{reached}"
    return (f"{run['density']:g}" if run.get("density") is not None else "–") + reached


def _coverage(scored: dict, datasets: list[str]) -> str:
    parts = [f"{d}:{scored[d][1]}" for d in datasets if d in scored]
    return f"{len(parts)}/{len(datasets)} ({', '.join(parts)})"


def method_order(method: str) -> tuple:
    """dense first, then DHSA and its ablations, then the other methods by name."""
    return method != "dense", not method.startswith("dhsa"), method != "dhsa", method


def result_rows(runs: list[dict]) -> list[dict]:
    """One row per run (model, method, density or budget, decode): the task groups and Average (mean over the
    datasets present, English and Chinese alike), which datasets it covers, and for every LongBench dataset its
    score and number of scored samples (empty where the run has none)."""
    rows = []
    for run in sorted(runs, key=lambda r: (r["model"], r["decode"], method_order(r["method"]),
                                           r.get("density") or 0, r.get("budget") or 0, r["run"])):
        scored = run["scores"]["longbench"]
        if not scored:
            continue
        row = {"model": run["model"], "method": run["method"], "density": run.get("density"),
               "budget": run.get("budget"), "decode": run["decode"], "run": run["run"],
               "density_reached": run.get("density_reached")}
        row.update(summarize({d: s for d, (s, _) in scored.items()}, ALL_DATASETS))
        row["datasets"] = _coverage(scored, ALL_DATASETS)
        row.update({d: scored[d][0] if d in scored else None for d in ALL_DATASETS})
        row.update({f"n_{d}": scored[d][1] if d in scored else None for d in ALL_DATASETS})
        rows.append(row)
    return rows


def _same_samples(row: dict, other: dict) -> bool:
    return all(row[f"n_{d}"] == other[f"n_{d}"] for d in ALL_DATASETS)


def dense_row(rows: list[dict], row: dict) -> dict | None:
    """The dense run of the same model (dense runs serve every decode protocol)."""
    return next((r for r in rows if r["model"] == row["model"] and r["method"] == "dense"), None)


def _relative(rows: list[dict], row: dict) -> str:
    """Average as a percentage of dense's, when both are scored on the same samples (else –: compare partial runs
    with --common-samples)."""
    dense = dense_row(rows, row)
    if dense is None or not dense["Average"] or not _same_samples(row, dense):
        return "–"
    return f"{100 * row['Average'] / dense['Average']:.1f}%"


def _labels(rows: list[dict]) -> dict[int, str]:
    """Method cell of each row: the method, plus the run folder when two runs share model, method, density and
    decode (other settings)."""
    keys = [(r["model"], r["method"], r["density"], r["budget"], r["decode"]) for r in rows]
    return {id(r): r["method"] + (f" ({Path(r['run']).name})" if keys.count(k) > 1 else "")
            for r, k in zip(rows, keys)}


def _group_table(rows: list[dict], all_rows: list[dict], first: list[str], cells) -> str:
    """A table of `rows`: the `first` columns (cells(row) gives them), the task groups any row has, Average, % of
    dense and the datasets covered."""
    groups = [g for g in GROUPS if any(r[g] is not None for r in rows)]
    lines = [cells(r) + [_fmt(r[g]) for g in groups] + [_fmt(r["Average"]), _relative(all_rows, r), r["datasets"]]
             for r in rows]
    return _md_table(first + groups + ["Average", "% of dense", "Datasets"], lines)


def tables_markdown(rows: list[dict]) -> str:
    """results.md: Tables 2-4 of the paper from the rows of results.csv, then every run by dataset."""
    label = _labels(rows)
    present = [d for d in ALL_DATASETS if any(r[d] is not None for r in rows)]
    groups_used = {g: [d for d in members if d in present] for g, members in GROUPS.items()}
    md = ["# LongBench results", "",
          "Scores x100 as LongBench's eval.py computes them. A task group is the mean of its datasets that have "
          "predictions, Average the mean over those datasets (as the paper's Table 2), English and Chinese alike. "
          "Groups here: " + "; ".join(f"{g} = {', '.join(ds)}" for g, ds in groups_used.items() if ds) + ". "
          "`Datasets` says which datasets (with their number of scored samples) each row covers; `% of dense` is "
          "the Average relative to the same model's dense run, given only when both cover the same samples "
          "(compare partial runs with `eval_longbench.py --common-samples`). `Decode`: dense = sparse prefill, "
          "dense decode steps; sparse = every step reads at most N_b keys (Algorithm 2; runs older than "
          "the setting decoded so). Written by eval_longbench.py from results.csv's rows.", ""]

    def at_density(row, density):
        return row["method"] != "dense" and row["budget"] is None and row["density"] == density

    dense = [r for r in rows if r["method"] == "dense"]
    table2 = [r for r in rows if r in dense or at_density(r, TABLE_DENSITY)]
    if table2:
        md += [f"## Table 2: methods at density {TABLE_DENSITY:.1%}", "",
               _group_table(table2, rows, ["Model", "Method", "Decode"],
                            lambda r: [r["model"], label[id(r)], r["decode"]]), ""]

    swept = {(r["model"], r["method"], r["decode"]) for r in rows if r["method"] != "dense" and r["budget"] is None
             and r["density"] is not None}
    swept = {key for key in swept if sum(1 for r in rows if (r["model"], r["method"], r["decode"]) == key
                                         and r["budget"] is None and r["density"] is not None) > 1}
    table3 = [r for r in rows if r in dense or (r["model"], r["method"], r["decode"]) in swept and r["budget"] is None]
    table3.sort(key=lambda r: (r["model"], r["method"] != "dense", r["density"] or 0, method_order(r["method"]),
                               r["decode"]))
    if len(table3) > len(dense):
        md += ["## Table 3: density sweep", "",
               "Every method run at more than one density (dense for reference); also plotted in density.png.", "",
               _group_table(table3, rows, ["Model", "Density", "Method", "Decode"],
                            lambda r: [r["model"], _density_text(r), label[id(r)], r["decode"]]), ""]

    table4 = [r for r in rows if r["method"] in ABLATIONS and at_density(r, TABLE_DENSITY)]
    table4.sort(key=lambda r: (r["model"], r["decode"], list(ABLATIONS).index(r["method"])))
    if table4:
        md += [f"## Table 4: ablations at density {TABLE_DENSITY:.1%}", "",
               _group_table(table4, rows, ["Model", "Variant", "Method", "Decode"],
                            lambda r: [r["model"], ABLATIONS[r["method"]], label[id(r)], r["decode"]]), ""]

    lines = [[r["model"], label[id(r)], _density_text(r), r["decode"]] + [_fmt(r[d]) for d in present]
             + [_fmt(r["Average"]), " ".join(str(r[f"n_{d}"] or 0) for d in present)] for r in rows]
    md += ["## Every run, by dataset", "",
           _md_table(["Model", "Method", "Density", "Decode"] + present + ["Average", "Samples"], lines), ""]
    return "\n".join(md)


def build_tables(runs: list[dict]) -> tuple[str, list[dict], str, list[dict]]:
    """Markdown and CSV rows for LongBench and LongBench-E from scored runs (each run: describe_run + scores)."""
    rows = result_rows(runs)
    md = tables_markdown(rows) if rows else ""
    md_e = ["# LongBench-E results", "",
            "Scores x100 per input-length bucket (LongBench's `length`, in words), as LongBench's eval.py --e. "
            "Groups and Average as in results.md.", ""]
    rows_e: list[dict] = []
    lines_e = []
    for run in runs:
        scored = run["scores"]["longbench_e"]
        if not scored:
            continue
        for bucket in LENGTH_BUCKETS:
            per_dataset = {d: s[bucket] for d, (s, _) in scored.items() if s[bucket] is not None}
            summary = summarize(per_dataset, LONGBENCH_E_DATASETS)
            lines_e.append([run["model"], run["method"], _density_text(run), run["decode"], bucket]
                           + [_fmt(summary[c]) for c in GROUP_COLUMNS] + [_coverage(scored, LONGBENCH_E_DATASETS)])
            row = {"model": run["model"], "method": run["method"], "density": run.get("density"),
                   "budget": run.get("budget"), "decode": run["decode"], "run": run["run"], "length": bucket}
            row.update(summary)
            row["datasets"] = _coverage(scored, LONGBENCH_E_DATASETS)
            row.update({d: per_dataset.get(d) for d in LONGBENCH_E_DATASETS})
            rows_e.append(row)
    if lines_e:
        md_e.append(_md_table(["Model", "Method", "Density", "Decode", "Length"] + GROUP_COLUMNS + ["Datasets"],
                              lines_e))
    return md, rows, "\n".join(md_e) + "\n", rows_e


def _md_table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return "\n".join(out)


def write_csv(path: Path, rows: list[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
