"""Score LongBench predictions exactly as LongBench's own eval.py does, and tabulate them like Table 2.

    python eval_longbench.py                          # every run under results_longbench/
    python eval_longbench.py --runs results_longbench/gemma-3-270m/dhsa_0.125

A run folder (written by run_longbench.py) holds `<dataset>.jsonl` (LongBench) and `<dataset>_e.jsonl`
(LongBench-E) files of predictions. Each dataset gets LongBench's metric, the best score over the sample's
reference answers, and the mean over samples x 100 rounded to 2 decimals; LongBench-E files are also split by
input length (0-4k, 4-8k, 8k+ words). Writes `result.json` into each run folder and, into the
output folder:
- `results.csv`: one row per run (model, method, density or budget, decode protocol) with the task groups, the
  Average (mean over the datasets present, English and Chinese in one table), and for every LongBench dataset a
  score column and an `n_<dataset>` column (samples scored);
- `results.md`: the paper's Tables 2-4 from those rows (Table 2: methods at 12.5% by task group; Table 3: the
  density sweep; Table 4: the ablations), then every run by dataset;
- `density.png`: Table 3 as a figure, the Average against density per method;
- `results_e.md` / `results_e.csv` for LongBench-E runs.

This script finds and scores the run folders; the metrics (THUDM/LongBench `metrics.py` v1, with its libraries
and its score-changing quirks) are in data/longbench_metrics.py, the tables in utils/bench/longbench_tables.py and the
figure in utils/bench/longbench_plots.py.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from data.longbench import ALL_DATASETS
from data.longbench_metrics import dataset_score, dataset_score_by_length
from utils.runs.cli import HelpFormatter
from utils.runs.records import LEGACY_VALUES
from utils.bench.longbench_plots import plot_density
from utils.bench.longbench_tables import build_tables, write_csv
from utils.runs import read_jsonl

# ------------------------------------------------------------------------------------------ run folders

def read_predictions(path: Path) -> list[dict]:
    """The predictions of one file (utils/runs/records.py read_jsonl: a last line cut off by an interrupted run is left out;
    rerun run_longbench.py to redo that sample)."""
    records = read_jsonl(path)
    for number, record in enumerate(records, 1):
        if "pred" not in record or "answers" not in record:
            raise ValueError(f"{path}: record {number} has no 'pred'/'answers'; is it a LongBench prediction file?")
    return records


def prediction_files(run_dir: Path) -> dict[str, dict[str, Path]]:
    """{"longbench": {dataset: path}, "longbench_e": {dataset: path}} for the jsonl files in a run folder."""
    found: dict[str, dict[str, Path]] = {"longbench": {}, "longbench_e": {}}
    for path in sorted(run_dir.glob("*.jsonl")):
        name = path.stem
        if name in ALL_DATASETS:
            found["longbench"][name] = path
        elif name.endswith("_e") and name[:-2] in ALL_DATASETS:
            found["longbench_e"][name[:-2]] = path
    return found


def find_runs(results_dir: Path) -> list[Path]:
    """Every folder under `results_dir` holding LongBench prediction files."""
    runs = {p.parent for p in results_dir.rglob("*.jsonl")}
    return sorted(r for r in runs if any(prediction_files(r).values()))


def describe_run(run_dir: Path) -> dict:
    """Model, method, density, budget and decode protocol of a run, from its run_config.json (else from the folder
    names). A run whose run_config.json predates the decode setting decoded sparsely (Algorithm 2, LEGACY_VALUES)."""
    config_path = run_dir / "run_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        attention = config.get("attention", {})
        method = attention.get("method", run_dir.name)
        dense = method == "dense"
        return {"model": config.get("model_name", run_dir.parent.name), "method": method,
                "density": None if dense else attention.get("density"),
                "budget": None if dense else attention.get("budget"),
                # runs older than the decode field did not record it (they may have decoded sparsely)
                "decode": "dense" if dense else attention.get("decode", LEGACY_VALUES["decode"]), "run": str(run_dir)}
    # folder names of utils/runs/records.py run_name: dense, dhsa_0.125, dhsa_budget2048, dhsa_0.125_decode-sparse (older
    # runs: dhsa_b2048)
    decode = re.search(r"_decode-([a-z]+)$", run_dir.name)
    decode = decode[1] if decode else "dense"
    found = re.fullmatch(r"(?P<method>.+?)_(?:(?P<density>[0-9.e-]+)|b(?:udget)?(?P<budget>[0-9]+))(?:_.*)?",
                         run_dir.name)
    if found is None or (found["density"] is not None and not _is_number(found["density"])):
        return {"model": run_dir.parent.name, "method": run_dir.name, "density": None, "budget": None,
                "decode": decode, "run": str(run_dir)}
    return {"model": run_dir.parent.name, "method": found["method"],
            "density": float(found["density"]) if found["density"] is not None else None,
            "budget": int(found["budget"]) if found["budget"] is not None else None, "decode": decode,
            "run": str(run_dir)}


def density_reached_of(run_dir: Path) -> float | None:
    """Mean density_reached of a run's predictions (FlexPrefill / XAttention record it); None when none has one."""
    values = [r["density_reached"] for files in prediction_files(run_dir).values() for path in files.values()
              for r in read_predictions(path) if r.get("density_reached") is not None]
    return round(sum(values) / len(values), 4) if values else None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def score_run(run_dir: Path, only_ids: dict[str, set] | None = None) -> dict:
    """{"longbench": {dataset: (score, samples)}, "longbench_e": {dataset: ({bucket: score}, samples)}}.

    only_ids: {dataset: sample ids} to score only those samples of a dataset (see --common-samples)."""
    files = prediction_files(run_dir)
    result = {"longbench": {}, "longbench_e": {}}
    for dataset, path in files["longbench"].items():
        records = read_predictions(path)
        if only_ids is not None and dataset in only_ids:
            records = [r for r in records if r["_id"] in only_ids[dataset]]
        if records:
            result["longbench"][dataset] = (dataset_score(dataset, records), len(records))
    for dataset, path in files["longbench_e"].items():
        records = read_predictions(path)
        if records:
            result["longbench_e"][dataset] = (dataset_score_by_length(dataset, records), len(records))
    return result


# ------------------------------------------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--results-dir", default="results_longbench", help="folder searched for run folders")
    parser.add_argument("--runs", nargs="*", default=None, help="score only these run folders")
    parser.add_argument("--output-dir", default=None, help="where results.md/.csv go (default: --results-dir)")
    parser.add_argument("--common-samples", action="store_true",
                        help="score every run of a model only on the samples all its runs have finished, so that "
                             "methods are compared on equal samples (for partial runs); tables get a _common suffix")
    return parser.parse_args(argv)


def common_sample_ids(run_dirs: list[Path]) -> dict[Path, dict[str, set]]:
    """For each run: {dataset: ids finished by every run of the same model that has that dataset}."""
    by_model: dict[str, list[Path]] = {}
    for run_dir in run_dirs:
        by_model.setdefault(describe_run(run_dir)["model"], []).append(run_dir)
    common: dict[Path, dict[str, set]] = {}
    for model_runs in by_model.values():
        ids: dict[str, set] = {}
        for run_dir in model_runs:
            for dataset, path in prediction_files(run_dir)["longbench"].items():
                found = {r["_id"] for r in read_predictions(path)}
                ids[dataset] = found if dataset not in ids else ids[dataset] & found
        for run_dir in model_runs:
            common[run_dir] = ids
    return common


def main(argv=None) -> None:
    args = parse_args(argv)
    results_dir = Path(args.results_dir)
    if args.runs:
        run_dirs = [Path(r) for r in args.runs]
        missing = [str(r) for r in run_dirs if not r.is_dir()]
        if missing:
            sys.exit(f"error: no such run folder: {', '.join(missing)}")
    else:
        if not results_dir.is_dir():
            sys.exit(f"error: {results_dir} does not exist; run run_longbench.py first or pass --results-dir")
        run_dirs = find_runs(results_dir)
    if not run_dirs:
        sys.exit(f"error: no LongBench prediction files (<dataset>.jsonl) under {results_dir}; run run_longbench.py first")

    try:
        common = common_sample_ids(run_dirs) if args.common_samples else {}
    except ValueError as err:
        sys.exit(f"error: {err}")
    suffix = "_common" if args.common_samples else ""
    runs = []
    for run_dir in run_dirs:
        try:
            scores = score_run(run_dir, common.get(run_dir))
        except ValueError as err:
            sys.exit(f"error: {err}")
        run = describe_run(run_dir)
        run["scores"] = scores
        run["density_reached"] = density_reached_of(run_dir)
        runs.append(run)
        result = {d: s for d, (s, _) in scores["longbench"].items()}
        result.update({f"{d}_e": s for d, (s, _) in scores["longbench_e"].items()})
        (run_dir / f"result{suffix}.json").write_text(json.dumps(result, indent=4, ensure_ascii=False) + "\n")
        print(f"{run_dir}: " + ", ".join(f"{d} {s}" for d, s in result.items()))

    output_dir = Path(args.output_dir) if args.output_dir else results_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    md, rows, md_e, rows_e = build_tables(runs)
    if rows:
        (output_dir / f"results{suffix}.md").write_text(md, encoding="utf-8")
        write_csv(output_dir / f"results{suffix}.csv", rows)
        print(f"wrote {output_dir / f'results{suffix}.md'} and {output_dir / f'results{suffix}.csv'}")
        plot = plot_density(rows, output_dir / f"density{suffix}.png")
        if plot is not None:
            print(f"wrote {plot}")
    if rows_e:
        (output_dir / "results_e.md").write_text(md_e, encoding="utf-8")
        write_csv(output_dir / "results_e.csv", rows_e)
        print(f"wrote {output_dir / 'results_e.md'} and {output_dir / 'results_e.csv'}")


if __name__ == "__main__":
    main()
