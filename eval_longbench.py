"""Score LongBench predictions exactly as LongBench's own eval.py does, and tabulate them like Table 2.

    python eval_longbench.py                          # every run under results_longbench/
    python eval_longbench.py --runs results_longbench/gemma-3-270m/dhsa_0.125

A run folder (written by run_longbench.py) holds `<dataset>.jsonl` (LongBench) and `<dataset>_e.jsonl`
(LongBench-E) files of predictions. Each dataset gets LongBench's metric (below), the best score over the
sample's reference answers, and the mean over samples x 100 rounded to 2 decimals; LongBench-E files are
also split by input length (0-4k, 4-8k, 8k+ words). Writes `result.json` into each run folder and, into the
output folder:
- `results.csv`: one row per run (model, method, density or budget, decode protocol) with the task groups, the
  Average (mean over the datasets present, English and Chinese in one table), and for every LongBench dataset a
  score column and an `n_<dataset>` column (samples scored);
- `results.md`: the paper's Tables 2-4 from those rows (Table 2: methods at 12.5% by task group; Table 3: the
  density sweep; Table 4: the ablations), then every run by dataset;
- `density.png`: Table 3 as a figure, the Average against density per method;
- `results_e.md` / `results_e.csv` for LongBench-E runs.

The metrics reproduce THUDM/LongBench `metrics.py` (v1) with the libraries it uses: `rouge` (not
`rouge-score`) for ROUGE-L, `jieba` for Chinese words, and `fuzzywuzzy`'s `fuzz.ratio` for code, which in
LongBench's environment (no python-Levenshtein) is `difflib.SequenceMatcher`; quirks that change scores are
kept on purpose and marked.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import re
import string
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from data.longbench import ALL_DATASETS, GROUPS, LONGBENCH_E_DATASETS
from utils.cli import HelpFormatter
from utils.runs import read_jsonl

# ---------------------------------------------------------------------------------------------- metrics

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_EN_PUNCTUATION = set(string.punctuation)
_ZH_PUNCTUATION = _EN_PUNCTUATION | set(
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.")


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, drop ASCII punctuation, then the articles a/an/the, then
    collapse whitespace (punctuation goes first, so "the-end" loses its hyphen and keeps "theend")."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Lower case, drop ASCII and Chinese punctuation, drop all whitespace."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ZH_PUNCTUATION).split())


def token_f1(prediction: list[str], reference: list[str]) -> float:
    """F1 of the multiset overlap of two token lists (0 when nothing overlaps)."""
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0
    precision, recall = same / len(prediction), same / len(reference)
    return (2 * precision * recall) / (precision + recall)


def qa_f1_score(prediction: str, reference: str, **_) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def _jieba_words(text: str) -> list[str]:
    import jieba  # imported late: it builds its dictionary (about a second) on first use
    return list(jieba.cut(text, cut_all=False))


def qa_f1_zh_score(prediction: str, reference: str, **_) -> float:
    """F1 over jieba words, each normalised, empty ones dropped."""
    def words(text):
        return [w for w in map(normalize_zh_answer, _jieba_words(text)) if w]
    return token_f1(words(prediction), words(reference))


_ROUGE = None


def rouge_score(prediction: str, reference: str, **_) -> float:
    """ROUGE-L F of the `rouge` package (sentences split at '.', union LCS). LongBench scores 0 whenever the
    package raises (empty text, or recursion too deep on a very long sentence), for any of its metrics, so
    all three are computed as there."""
    global _ROUGE
    if _ROUGE is None:
        from rouge import Rouge
        _ROUGE = Rouge()
    try:
        return _ROUGE.get_scores([prediction], [reference], avg=True)["rouge-l"]["f"]
    except Exception:  # as LongBench: a bare except scores 0
        return 0.0


def rouge_zh_score(prediction: str, reference: str, **_) -> float:
    return rouge_score(" ".join(_jieba_words(prediction)), " ".join(_jieba_words(reference)))


def classification_score(prediction: str, reference: str, *, all_classes: list[str], **_) -> float:
    """1 / (number of class names found in the prediction) if the right class is among them, else 0.

    Class names that are substrings of the reference (but not the reference) are dropped first. LongBench
    drops them while iterating over the same list, so the name right after a dropped one is never checked;
    kept for identical scores. (LongBench's fallback to the most similar class is unreachable: its guard
    compares a list with 0, which is always unequal.)
    """
    found = [name for name in all_classes if name in prediction]
    i = 0
    while i < len(found):
        if found[i] in reference and found[i] != reference:
            found.remove(found[i])  # the list shifts left while i still advances: the next name is skipped
        i += 1
    return 1.0 / len(found) if reference in found else 0.0


def _share_equal(prediction: str, wanted: str) -> float:
    """Share of the numbers in the prediction that equal `wanted` (0 when it has none)."""
    numbers = re.findall(r"\d+", prediction)
    return float(0.0 if not numbers else sum(n == str(wanted) for n in numbers) / len(numbers))


def count_score(prediction: str, reference: str, **_) -> float:
    return _share_equal(prediction, reference)


def retrieval_score(prediction: str, reference: str, **_) -> float:
    """Reference "Paragraph 12": the share of numbers in the prediction that are 12."""
    return _share_equal(prediction, re.findall(r"Paragraph (\d+)", reference)[0])


def retrieval_zh_score(prediction: str, reference: str, **_) -> float:
    return _share_equal(prediction, re.findall(r"段落(\d+)", reference)[0])


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy 0.18 `fuzz.ratio` without python-Levenshtein (LongBench's requirements): 100 for equal
    strings, 0 if one is empty, else round(100 * difflib ratio)."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim_score(prediction: str, reference: str, **_) -> float:
    """Edit similarity of the first generated line that is code: lines with ` (markdown), # or // are
    skipped as comments or fences."""
    line = next((ln for ln in prediction.lstrip("\n").split("\n")
                 if "`" not in ln and "#" not in ln and "//" not in ln), "")
    return fuzz_ratio(line, reference) / 100


DATASET_METRIC = {
    "narrativeqa": qa_f1_score, "qasper": qa_f1_score, "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score, "hotpotqa": qa_f1_score, "2wikimqa": qa_f1_score, "musique": qa_f1_score,
    "dureader": rouge_zh_score, "gov_report": rouge_score, "qmsum": rouge_score, "multi_news": rouge_score,
    "vcsum": rouge_zh_score, "trec": classification_score, "triviaqa": qa_f1_score, "samsum": rouge_score,
    "lsht": classification_score, "passage_retrieval_en": retrieval_score, "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score, "lcc": code_sim_score, "repobench-p": code_sim_score,
}
# Few-shot answers: only the first line counts (models tend to continue with the next example).
FIRST_LINE_ONLY = {"trec", "triviaqa", "samsum", "lsht"}
LENGTH_BUCKETS = ("0-4k", "4-8k", "8k+")


def sample_score(dataset: str, prediction: str, answers: list[str], all_classes=None) -> float:
    """One sample's score in [0, 1]: the best over its reference answers."""
    if dataset not in DATASET_METRIC:
        raise ValueError(f"no LongBench metric for {dataset!r}; known: {', '.join(DATASET_METRIC)}")
    if dataset in FIRST_LINE_ONLY:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = DATASET_METRIC[dataset]
    score = 0.0
    for answer in answers:
        score = max(score, metric(prediction, answer, all_classes=all_classes))
    return score


def _scores(dataset: str, records: list[dict]) -> list[float]:
    # LongBench's eval.py uses the all_classes of the file's last record for every record (it is the same
    # for all records of a dataset).
    all_classes = records[-1].get("all_classes") if records else None
    return [sample_score(dataset, r["pred"], r["answers"], all_classes) for r in records]


def dataset_score(dataset: str, records: list[dict]) -> float:
    """LongBench score of one dataset: 100 x mean sample score, rounded to 2 decimals."""
    if not records:
        raise ValueError(f"no predictions for {dataset}")
    total = 0.0
    for score in _scores(dataset, records):  # summed in order, as LongBench does, for identical rounding
        total += score
    return round(100 * total / len(records), 2)


def length_bucket(length: int) -> str:
    return "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"


def dataset_score_by_length(dataset: str, records: list[dict]) -> dict[str, float | None]:
    """LongBench-E: the score per input-length bucket (LongBench's `length` field, in words); None where a
    bucket has no sample (LongBench writes NaN)."""
    per_bucket: dict[str, list[float]] = {b: [] for b in LENGTH_BUCKETS}
    for record, score in zip(records, _scores(dataset, records)):
        per_bucket[length_bucket(record["length"])].append(score)
    # numpy's round, as LongBench rounds a numpy float here (it can differ from Python's: 0.025 -> 0.02)
    return {b: (float(round(100 * np.mean(s), 2)) if s else None) for b, s in per_bucket.items()}


# ------------------------------------------------------------------------------------------ run folders

def read_predictions(path: Path) -> list[dict]:
    """The predictions of one file (utils/runs.py read_jsonl: a last line cut off by an interrupted run is left out;
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
    names). The decode protocol is "unrecorded" for runs whose run_config.json predates it."""
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
                "decode": "dense" if dense else attention.get("decode", "unrecorded"), "run": str(run_dir)}
    # folder names of utils/runs.py run_name: dense, dhsa_0.125, dhsa_budget2048, dhsa_0.125_decode-sparse (older
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


# ---------------------------------------------------------------------------------------------- tables

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
    if run.get("budget"):
        return f"{run['budget']} keys"
    return f"{run['density']:g}" if run.get("density") is not None else "–"


def _coverage(scored: dict, datasets: list[str]) -> str:
    parts = [f"{d}:{scored[d][1]}" for d in datasets if d in scored]
    return f"{len(parts)}/{len(datasets)} ({', '.join(parts)})"


def _method_order(method: str) -> tuple:
    """dense first, then DHSA and its ablations, then the other methods by name."""
    return method != "dense", not method.startswith("dhsa"), method != "dhsa", method


def result_rows(runs: list[dict]) -> list[dict]:
    """One row per run (model, method, density or budget, decode): the task groups and Average (mean over the
    datasets present, English and Chinese alike), which datasets it covers, and for every LongBench dataset its
    score and number of scored samples (empty where the run has none)."""
    rows = []
    for run in sorted(runs, key=lambda r: (r["model"], r["decode"], _method_order(r["method"]),
                                           r.get("density") or 0, r.get("budget") or 0, r["run"])):
        scored = run["scores"]["longbench"]
        if not scored:
            continue
        row = {"model": run["model"], "method": run["method"], "density": run.get("density"),
               "budget": run.get("budget"), "decode": run["decode"], "run": run["run"]}
        row.update(summarize({d: s for d, (s, _) in scored.items()}, ALL_DATASETS))
        row["datasets"] = _coverage(scored, ALL_DATASETS)
        row.update({d: scored[d][0] if d in scored else None for d in ALL_DATASETS})
        row.update({f"n_{d}": scored[d][1] if d in scored else None for d in ALL_DATASETS})
        rows.append(row)
    return rows


def _same_samples(row: dict, other: dict) -> bool:
    return all(row[f"n_{d}"] == other[f"n_{d}"] for d in ALL_DATASETS)


def _dense_row(rows: list[dict], row: dict) -> dict | None:
    """The dense run of the same model (dense runs serve every decode protocol)."""
    return next((r for r in rows if r["model"] == row["model"] and r["method"] == "dense"), None)


def _relative(rows: list[dict], row: dict) -> str:
    """Average as a percentage of dense's, when both are scored on the same samples (else –: compare partial runs
    with --common-samples)."""
    dense = _dense_row(rows, row)
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
          "dense decode steps; sparse = every step reads at most N_b keys (Algorithm 2); unrecorded = a run older "
          "than the setting. Written by eval_longbench.py from results.csv's rows.", ""]

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
    table3.sort(key=lambda r: (r["model"], r["method"] != "dense", r["density"] or 0, _method_order(r["method"]),
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
        for n, method in enumerate(sorted({r["method"] for r in mine}, key=_method_order)):
            points = sorted((r["density"], r["Average"]) for r in mine if r["method"] == method)
            style = dict(linewidth=2.5, zorder=3) if method == "dhsa" else dict(linewidth=1.2)
            ax.plot([100 * x for x, _ in points], [y for _, y in points], marker=markers[n % len(markers)],
                    color=colors[n % len(colors)], label=method, **style)
        dense = _dense_row(rows, {"model": model})
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
