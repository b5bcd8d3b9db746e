"""Selection testbed: attention mass and needle coverage of every method and DHSA variant on one long needle prompt,
from one cached dense forward (utils/bench/testbed.py says what is captured and how each window is scored).

    python run_selection_testbed.py --model qwen2.5-coder-0.5b-instruct --lengths 16K 32K --depth 20 \
        --methods oracle_topk dhsa "dhsa[dense_tail=0]" "dhsa[dense_tail=0,exact_tail=64]" block_sparse

Output (<output-dir>/<model>/): testbed.jsonl (one line per length, window, layer and method, written as each layer
is done; a rerun skips what is there), testbed.csv (per length and method, every method measured at the requested lengths by this or an earlier run: mass recall on the sampled windows and on
the question tail, each also relative to oracle_topk, needle-reading heads that keep half their needle mass, and
DHSA's FLOPs relative to dense attention) and testbed.png.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import sys
import warnings
from pathlib import Path

import torch

from utils import kernels
from utils.runs.cli import parse_length, user_errors
from utils.config import SparseAttentionConfig
from utils.runs.records import METHOD_ONLY_FIELDS
from utils.runs import append_jsonl, read_jsonl
from utils.bench.testbed import (TAIL_OPTIONS, cache_path, capture, dhsa_flop_ratio, parse_spec, score_selection,
                           window_rows, window_starts, window_truth)

DEFAULT_METHODS = ["oracle_topk", "dhsa", "dhsa[dense_tail=0]", "dhsa[dense_tail=0,exact_tail=64]",
                   "dhsa[dense_tail=64]", "dhsa[dense_tail=128]", "dhsa[token_rescore=1.5]", "dhsa[token_rescore=2]",
                   "dhsa[chunk_size=8]", "block_sparse",
                   "vertical_slash", "flexprefill", "xattention", "streaming"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="model name (utils/models/specs.py) or path")
    p.add_argument("--lengths", nargs="+", type=parse_length, default=[16384, 32768], help="prompt lengths (16K)")
    p.add_argument("--depth", type=float, default=20, help="needle depth in percent")
    p.add_argument("--needle-set", default="sf", help="needle (data/haystack.py NEEDLE_SETS)")
    p.add_argument("--haystack-dir", default=None, help="folder of .txt files (default: the Paul Graham essays)")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS,
                   help="registry names, optionally with config overrides: dhsa[dense_tail=0,chunk_size=8]")
    p.add_argument("--density", type=float, default=0.0625, help="N_b / L")
    p.add_argument("--min-budget", type=int, default=512, help="floor on N_b")
    p.add_argument("--output-dir", default="results_recall", help="results go to <dir>/<model>/")
    p.add_argument("--device", default="cpu", help="device of the capture forward and of the scoring (fp32)")
    return p


def check_args(args) -> list[tuple[str, str, dict]]:
    from utils.methods import METHODS, method_names

    specs = []
    for spec in args.methods:
        name, overrides = parse_spec(spec)
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r} in {spec!r}; choose from: {', '.join(method_names())}")
        if METHODS[name].select is None:
            raise ValueError(f"{name!r} keeps every key (recall 1); leave it out of --methods")
        specs.append((spec, name, overrides))
    if not 0 < args.density <= 1 or args.min_budget < 0:
        raise ValueError("--density must be in (0, 1] and --min-budget >= 0")
    return specs


def settings_key(args, length: int) -> str:
    text = json.dumps({"density": args.density, "min_budget": args.min_budget, "depth": args.depth,
                       "needle_set": args.needle_set, "haystack": args.haystack_dir and Path(args.haystack_dir).name,
                       "length": length}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


# Config fields added after rows of testbed.jsonl were written, with the value those rows ran: at that value a field
# stays out of the fingerprint, so the rows stay valid.
ADDED_LATER = {"tail_columns": 0.0, "rescore_queries": 0, "chunk_score": "mean", "rescore_window": 0}


LEARNED_BOUNDARY_METHODS = ("dhsa", "dhsa_no_robust_repr")  # the DHSA variants that read a boundary source


def boundary_weights(spec: str, model_name: str | None) -> Path | None:
    """The predictor weights a spec's boundaries come from (its predictor_path, else the model's shipped weights
    when boundary_source is auto or predictor), or None: uniform chunks."""
    name, overrides = parse_spec(spec)
    config = SparseAttentionConfig(method=name, budget=1, **overrides)
    if name not in LEARNED_BOUNDARY_METHODS or config.boundary_source == "fixed":
        return None
    if config.predictor_path is not None:
        return Path(config.predictor_path)
    from boundary_predictor import default_weights_path

    return default_weights_path(model_name) if model_name else None


@functools.lru_cache(maxsize=None)  # asked once per stored row: the weights are read and hashed once per spec
def spec_digest(spec: str, model_name: str | None = None) -> str:
    """Fingerprint of the whole config a method spec stands for, defaults included, and of the predictor weights
    its boundaries come from: a row made before a default changed (or before weights were shipped for the model)
    is not taken for the new spec ("dhsa" then and now can be two configurations)."""
    name, overrides = parse_spec(spec)
    config = vars(SparseAttentionConfig(method=name, budget=1, **overrides))
    read = {field: value for field, value in config.items() if name in METHOD_ONLY_FIELDS.get(field, (name,))
            and not (field in ADDED_LATER and value == ADDED_LATER[field])}
    weights = boundary_weights(spec, model_name)
    if weights is not None:  # uniform chunks add nothing, so rows made before this field existed stay valid
        read["boundary_weights"] = hashlib.sha1(weights.read_bytes()).hexdigest()[:12]
    return hashlib.sha1(json.dumps(read, sort_keys=True, default=str).encode()).hexdigest()[:12]


def needle_prompt(tokenizer, args, length: int):
    """The needle test's prompt (data/haystack.py) and the needle's key positions."""
    from data.haystack import NEEDLE_SETS, Haystack, make_sample, read_essays

    if args.needle_set not in NEEDLE_SETS:
        raise ValueError(f"unknown needle set {args.needle_set!r}; choose from {', '.join(NEEDLE_SETS)}")
    needle, question, _ = NEEDLE_SETS[args.needle_set]
    sample = make_sample(Haystack(read_essays(args.haystack_dir), tokenizer), length, args.depth,
                         needle=needle, question=question)
    ids = list(sample.input_ids)
    piece = tokenizer.encode(needle, add_special_tokens=False)[2:-2]  # the needle's middle (its ends may merge)
    at = next((i for i in range(len(ids) - len(piece)) if ids[i:i + len(piece)] == piece), None)
    if at is None:
        raise RuntimeError("the needle's tokens were not found in the prompt")
    return ids, (at - 2, at + len(piece) + 2)


def summarize(rows: list[dict], head_dim: dict):
    import pandas as pd

    frame = pd.DataFrame(rows)
    frame["part"] = frame["window"].map(lambda w: "tail" if w == "tail" else "sampled")
    table = frame.groupby(["length", "method", "part"], sort=False)["mass_recall"].mean().unstack("part")
    table.columns = [f"mass_{c}" for c in table.columns]
    tail = frame[frame["part"] == "tail"].groupby(["length", "method"], sort=False)
    table["needle_heads_half"] = tail["needle_heads_half"].sum().astype(int).astype(str) + "/" + \
        tail["needle_heads"].sum().astype(int).astype(str)
    table["needle_mass_kept"] = tail["needle_kept"].sum() / tail["needle_mass"].sum().clip(lower=1e-9)
    table = table.reset_index()
    for part in ("sampled", "tail"):
        oracle = table[table["method"] == "oracle_topk"].set_index("length")[f"mass_{part}"]
        table[f"mass_{part}_vs_oracle"] = table.apply(lambda r: r[f"mass_{part}"] / oracle.get(r["length"], math.nan),
                                                      axis=1)
    table["flops_vs_dense"] = [flop_ratio(r["method"], r["length"], head_dim) for _, r in table.iterrows()]
    return table


def flop_ratio(spec: str, length: int, head_dim: dict) -> float:
    name, overrides = parse_spec(spec)
    if not name.startswith("dhsa"):
        return math.nan
    config = SparseAttentionConfig(method=name, density=head_dim["density"], min_budget=head_dim["min_budget"],
                                   **overrides)
    return dhsa_flop_ratio(length, head_dim["D"], config)


def plot(table, path: Path, model_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted(table["length"].unique())
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 0.45 * table["method"].nunique() + 1.5),
                             squeeze=False)
    for ax, length in zip(axes[0], lengths):
        part = table[table["length"] == length]
        y = range(len(part))
        ax.barh([i - 0.2 for i in y], part["mass_sampled"], height=0.4, label="sampled tiles")
        ax.barh([i + 0.2 for i in y], part["mass_tail"], height=0.4, label="question tail")
        ax.set_yticks(list(y), part["method"], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("attention mass kept")
        ax.set_title(f"{model_name}, L = {length}")
        ax.grid(alpha=0.3, axis="x")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def prompt_columns(q_tail, k, config, budget: int, cache: dict):
    """The column keys (tail_columns) of the whole prompt for one layer: what its question tail ranks best
    (utils.methods.dhsa.question_keys), computed once per layer and selection heads."""
    from utils.methods.dhsa import question_keys

    options = config.dhsa_options()
    key = (options.dense_tail, options.exact_tail, options.share_heads, options.head_pooling)
    if key not in cache:
        with torch.no_grad():
            cache[key] = question_keys(q_tail, k, options, budget)
    return cache[key]


def run(args) -> Path:
    from tqdm import tqdm

    from boundary_predictor.capture import global_layers
    from utils.methods.dhsa.boundaries import as_boundary_list, make_boundary_source
    from utils.methods import METHODS, LayerContext
    from utils.models import load_model
    from utils.models.wheels import cache_dir

    specs = check_args(args)
    model, tokenizer = load_model(args.model, device=args.device, dtype="fp32")
    from utils.models import model_max_length

    too_long = [n for n in args.lengths if n > model_max_length(model)]
    if too_long:
        raise ValueError(f"length {too_long[0]} exceeds the model's maximum ({model_max_length(model)}); use "
                         "shorter --lengths")
    model_name = Path(args.model).name
    layers = global_layers(model)
    out_dir = Path(args.output_dir) / model_name
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / "testbed.jsonl"
    rows = read_jsonl(jsonl)
    sources = {}  # spec -> its boundary source (learned or uniform), made once

    def source_for(spec: str, config: SparseAttentionConfig):
        if spec not in sources:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                weights = boundary_weights(spec, model_name)
                sources[spec] = make_boundary_source(config.replace(boundary_source="fixed") if weights is None
                                                     else config.replace(predictor_path=str(weights)),
                                                     model_name, tokenizer)
        return sources[spec]
    info = {"density": args.density, "min_budget": args.min_budget}
    for length in args.lengths:
        key = settings_key(args, length)
        done = {(r["window"], r["layer"], r["method"]) for r in rows
                if r.get("settings") == key and r.get("config") == spec_digest(r["method"], model_name)}
        ids, needle = needle_prompt(tokenizer, args, length)
        L = len(ids)
        starts = window_starts(L)
        names = [str(s) for s in starts[:-1]] + ["tail"]
        if all((w, layer, spec) in done for w in names for layer in layers for spec, _, _ in specs):
            continue
        print(f"{model_name} L={L}: capture (one dense forward, cached) ...", file=sys.stderr, flush=True)
        data = capture(model, ids, layers, starts, cache_path(cache_dir(), model_name, ids, starts))
        budget = max(math.ceil(args.density * L), args.min_budget)
        windows = window_rows(L, starts)
        ids_t = torch.tensor(ids, device=args.device)[None]
        boundary_cache = {}  # (window, spec) -> the chunk ends of one forward (share_boundaries): from the first layer
        for layer in tqdm(layers, desc=f"L={L} layers", unit="layer"):
            q_all, k, options = data[layer]
            offset, column_cache = 0, {}
            for name, rows_w in zip(names, windows):
                q = q_all[:, :, offset: offset + len(rows_w)]
                offset += len(rows_w)
                end = int(rows_w[-1]) + 1
                truth = None
                for spec, method_name, overrides in specs:
                    if (name, layer, spec) in done:
                        continue
                    state = {}
                    if name != "tail":  # a sampled window is no question tail: tail options off there
                        full = SparseAttentionConfig(method=method_name, budget=budget, **overrides)
                        if full.tail_columns:  # its columns come from the prompt's own tail, as in one prefill
                            state["column_keys"] = prompt_columns(q_all[:, :, -len(windows[-1]):], k, full,
                                                                  budget, column_cache)
                        overrides = {**overrides, **{o: 0 for o in TAIL_OPTIONS}}
                    config = SparseAttentionConfig(method=method_name, budget=budget, **overrides)
                    shared = {"input_ids": ids_t[:, :end]}
                    source = source_for(spec, config) if method_name in LEARNED_BOUNDARY_METHODS else None
                    if source is not None and config.share_boundaries:  # as one prefill: the first layer's keys
                        if (name, spec) not in boundary_cache:
                            first_k = data[layers[0]][1][:, :, :end]
                            boundary_cache[(name, spec)] = as_boundary_list(
                                source(first_k, config.num_chunks(end), shared["input_ids"]), 1, end, first_k.device)
                        shared["boundaries"] = (-1, end, 1, boundary_cache[(name, spec)])
                    context = LayerContext(layer, state, shared, source)
                    with torch.no_grad(), kernels.disabled():  # the PyTorch selections, on any device
                        truth = truth or window_truth(q, k[:, :, :end], options, budget)
                        selection = METHODS[method_name].select(q, k[:, :, :end], config, context)
                        scores = score_selection(truth, selection, needle if name == "tail" else None)
                    row = {"settings": key, "config": spec_digest(spec, model_name), "model": model_name, "length": L,
                           "depth": args.depth,
                           "needle_set": args.needle_set, "window": name, "layer": layer, "method": spec,
                           "budget": budget, "head_dim": k.shape[-1], **scores}
                    append_jsonl(jsonl, row)
                    rows.append(row)
    # the table holds every method measured at these lengths (this run's and earlier runs'), each row made with the
    # config its spec stands for today
    wanted = [r for r in rows if any(r.get("settings") == settings_key(args, n) for n in args.lengths)
              and r.get("config") == spec_digest(r["method"], model_name)]
    table = summarize(wanted, {**info, "D": wanted[0]["head_dim"] if wanted else 64})
    table.to_csv(out_dir / "testbed.csv", index=False, float_format="%.4f")
    plot(table, out_dir / "testbed.png", model_name)
    print(table.to_string(index=False, float_format="%.3f"))
    print(f"wrote {out_dir / 'testbed.csv'} and {out_dir / 'testbed.png'}", file=sys.stderr)
    return out_dir


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    with user_errors():
        run(args)


if __name__ == "__main__":
    main()
