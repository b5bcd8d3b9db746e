"""Run LongBench with any attention method: one JSONL file of predictions per dataset, resumable.

    python run_longbench.py                                            # gemma-3-270m, DHSA at 12.5%, offline data
    python run_longbench.py --method dense --datasets multi_news --max-samples 2
    python run_longbench.py --model meta-llama/Llama-3.1-8B-Instruct --max-length 49152 --method dhsa --density 0.0625
    python run_longbench.py --longbench-e --hub                         # LongBench-E from the Hugging Face Hub
    python run_longbench.py --model qwen2.5-coder-1.5b-instruct --chinese --data-dir DIR \
        --methods dense dhsa block_sparse --densities 0.125             # several runs, one model load
    python -m torch.distributed.run --standalone --nproc-per-node 2 run_longbench.py ...   # 2 GPUs share the work

Inputs are built as LongBench's pred.py builds them (data/longbench.py): LongBench's prompt and generation
length per dataset, the middle of over-long prompts cut out, the chat template (when the tokenizer has one)
except on the few-shot and code datasets. Generation is greedy, one sample at a time, up to the dataset's
length or an end-of-sequence token (samsum also stops at a newline, as in LongBench).

Predictions go to <output-dir>/<model>/<run>/<dataset>.jsonl (<dataset>_e.jsonl for LongBench-E), where
<run> is the run name of utils/runs/records.py (`dense`, `<method>_<density>`, `<method>_budget<N_b>`, ...; a folder
named the older way, `<method>_b<N_b>`, is still resumed); run_config.json beside them records the settings.
Samples whose `_id` is already in the file are skipped, so an interrupted run continues where it stopped (a
line cut off by a crash is dropped and that sample redone). Samples go in order, each with every requested
method in turn, so that an interrupted sweep has all methods on the same samples. Under torchrun each process
takes every N-th sample on its own GPU (cuda:LOCAL_RANK; utils/runs/sharding.py), all appending to the same files.
Score with eval_longbench.py (scripts/run_longbench.sh runs the paper's sweep and scores it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from data.longbench import (CHINESE_DATASETS, ENGLISH_DATASETS, HUB_REPO, LONGBENCH_E_DATASETS, MAX_NEW_TOKENS,
                            build_input, chat_overhead, check_dataset, datasets_in_folder, default_data_dir,
                            file_name, load_samples, uses_chat_template)
from utils.methods.baselines.threshold_blocks import density_reached
from utils.runs.cli import HelpFormatter, add_rope_scaling_arg, results_folder_name, sweep_configs
from utils.runs.cli import add_config_args
from utils.runs.generation import eos_token_ids, greedy_generate
from utils.runs import append_jsonl, config_dict, read_jsonl, run_name, same_config, write_atomic
from utils.runs.sharding import Shard, distributed

DTYPES = ("auto", "bfloat16", "float16", "float32")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m", help="model name (utils/models/specs.py) or path")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="several methods in one invocation (overrides --method); dense runs once")
    parser.add_argument("--densities", nargs="+", type=float, default=None,
                        help="several densities (overrides --density)")
    parser.add_argument("--datasets", nargs="+", default=None,
                        help="LongBench datasets (default: every English one the data source has)")
    parser.add_argument("--chinese", action="store_true", help="also run the five Chinese datasets")
    parser.add_argument("--longbench-e", action="store_true", help="run the LongBench-E variants (<name>_e)")
    parser.add_argument("--data-dir", default=None,
                        help="folder of LongBench's jsonl files, from its data.zip (default: <cache>/data/LongBench "
                             "when it holds them, else the Hugging Face Hub)")
    parser.add_argument("--hub", action="store_true", help=f"load the data from the Hub ({HUB_REPO}) even if "
                                                           "a local folder is there")
    parser.add_argument("--max-length", type=int, default=None,
                        help="prompt tokens kept (the middle of longer prompts is cut out); default and upper "
                             "limit: the model's maximum length minus the generation length and chat template "
                             "(the paper uses 49152 = 48K for Llama-3.1-8B)")
    parser.add_argument("--keep-head", type=int, default=None,
                        help="tokens kept from the start of a cut prompt (default: half, as LongBench; the "
                             "paper's App. D keeps the first 1K: --keep-head 1024)")
    parser.add_argument("--chat-template", default=None, action=argparse.BooleanOptionalAction,
                        help="wrap prompts in the tokenizer's chat template (default: if it has one)")
    parser.add_argument("--max-samples", type=int, default=None, help="only the first N samples of each dataset")
    parser.add_argument("--output-dir", default="results_longbench")
    parser.add_argument("--run-name", default=None,
                        help="run folder name (default: from method and density); one method and density only")
    parser.add_argument("--device", default="auto", help="cuda, cuda:N, cpu, or auto (cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--load-in-4bit", action="store_true",
                        help="4-bit NF4 weights (bitsandbytes, CUDA), as the paper runs Llama-3.1-8B")
    add_rope_scaling_arg(parser)
    add_config_args(parser)
    args = parser.parse_args(argv)
    if args.data_dir is None and not args.hub:
        args.data_dir = default_data_dir()
    return args


# ------------------------------------------------------------------------------------------ bookkeeping

def pick_datasets(args: argparse.Namespace) -> list[str]:
    """The datasets to run: the ones asked for, else every English (and with --chinese, Chinese) dataset
    the data source has."""
    if args.datasets:
        for name in args.datasets:
            check_dataset(name, args.longbench_e)
        return list(dict.fromkeys(args.datasets))
    if args.longbench_e and args.chinese:
        raise ValueError("LongBench-E has no Chinese datasets; drop --chinese or --longbench-e")
    if args.data_dir and not args.hub:
        found = datasets_in_folder(args.data_dir, args.longbench_e, args.chinese)
        if not found:
            raise ValueError(f"no LongBench jsonl files in {args.data_dir}; give --data-dir a folder with them "
                             f"(e.g. multi_news.jsonl) or use --hub")
        return found
    if args.longbench_e:
        return list(LONGBENCH_E_DATASETS)
    return ENGLISH_DATASETS + (CHINESE_DATASETS if args.chinese else [])


def model_folder_name(model: str) -> str:
    """`meta-llama/Llama-3.1-8B-Instruct` or a local path -> `Llama-3.1-8B-Instruct`."""
    return Path(model.rstrip("/")).name


def run_dir_for(model_dir: Path, config, settings: dict) -> Path:
    """The run's folder: model_dir / utils/runs/records.py run_name (`dense`, `dhsa_0.125`, `dhsa_budget2048`, ...), or
    a folder named the older way (`dhsa_b2048`; no `_min<N>` / `_decode-<mode>` suffix) that holds a run with
    exactly these settings, so earlier runs resume."""
    name = run_name(config)
    if (model_dir / name).is_dir() or config.method == "dense":
        return model_dir / name
    older = f"{config.method}_b{config.budget}" if config.budget is not None else f"{config.method}_{config.density:g}"
    if (model_dir / older / "run_config.json").is_file() and not changed_settings(model_dir / older, settings):
        return model_dir / older
    return model_dir / name


def changed_settings(run_dir: Path, settings: dict) -> list[str]:
    """The settings in which `run_dir`'s run_config.json differs from `settings` ([] when it has none)."""
    path = run_dir / "run_config.json"
    if not path.is_file():
        return []
    old, settings = json.loads(path.read_text()), json.loads(json.dumps(settings))  # tuples become lists
    return sorted(k for k in set(old) | set(settings)
                  if not (same_config(old.get(k), settings[k]) if k == "attention" and k in settings
                          else old.get(k) == settings.get(k)))


def prepare_run_dir(run_dir: Path, settings: dict) -> None:
    """Create the run folder and its run_config.json, or check that an existing one has the same settings."""
    changed = changed_settings(run_dir, settings)
    if changed:
        raise ValueError(f"{run_dir} holds predictions made with other settings ({', '.join(changed)}); "
                         f"choose another --run-name or --output-dir")
    if not (run_dir / "run_config.json").is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        # atomic: the other ranks of a sharded run read it at the same time
        write_atomic(run_dir / "run_config.json", json.dumps(json.loads(json.dumps(settings)), indent=2) + "\n")


def finished_ids(path: Path) -> set[str]:
    """Sample ids already in a prediction file (utils/runs/records.py read_jsonl: a last line cut off by a crash is not
    counted, and the next append cuts it away)."""
    records = read_jsonl(path)
    missing = [number for number, record in enumerate(records, 1) if "_id" not in record]
    if missing:
        raise ValueError(f"{path}: record {missing[0]} has no _id; is it a LongBench prediction file?")
    return {str(record["_id"]) for record in records}


# ----------------------------------------------------------------------------------------- generation

def stop_token_ids(model, tokenizer, dataset: str) -> list[int]:
    """End-of-sequence ids of the model and tokenizer; for samsum also the newline token, as LongBench stops
    there (models otherwise go on writing the next "Dialogue:" example)."""
    newline = [tokenizer.encode("\n", add_special_tokens=False)[-1]] if dataset == "samsum" else []
    return eos_token_ids(model, tokenizer, extra=newline)


def prompt_cap(max_length: int | None, model_max: int, max_new_tokens: int, overhead: int) -> int:
    """Prompt tokens kept: --max-length, at most what leaves room for the chat template and the answer."""
    room = model_max - max_new_tokens - overhead
    if room < 2:
        raise ValueError(f"the model's maximum length {model_max} leaves no room for a prompt")
    return room if max_length is None else min(max_length, room)


def predict(model, tokenizer, dataset: str, sample: dict, built: dict, decode: str | None) -> dict:
    """The prediction record of one sample, from its model input `built` (data/longbench.py build_input):
    {"_id", "pred", "answers", "all_classes", "length", "dataset", "language", "prompt_tokens" (before the cut),
    "input_tokens" (fed to the model), "truncated", "decode" (the decode protocol of the attention config)}."""
    stops = stop_token_ids(model, tokenizer, dataset)
    min_new = 1 if dataset == "samsum" else 0  # LongBench: min_length=context_length+1 on samsum
    new_ids = greedy_generate(model, built["input_ids"], MAX_NEW_TOKENS[dataset], stops, min_new_tokens=min_new)
    return {"_id": sample["_id"], "pred": tokenizer.decode(new_ids, skip_special_tokens=True),
            "answers": sample["answers"], "all_classes": sample.get("all_classes"),
            "length": sample["length"], "dataset": dataset, "language": sample.get("language"),
            "prompt_tokens": built["prompt_tokens"], "input_tokens": len(built["input_ids"]),
            "truncated": built["truncated"], "decode": decode, "density_reached": density_reached(model)}


def predict_dataset(model, tokenizer, dataset: str, samples: list[dict], out_path: Path, *, max_length: int,
                    chat_template: bool | None = None, keep_head: int | None = None, decode: str | None = None) -> int:
    """Write one prediction (`predict`) per sample not yet in `out_path`, with the model as patched now; returns
    how many were written. `decode` defaults to the patched model's decode protocol."""
    done = finished_ids(out_path)
    todo = [s for s in samples if str(s["_id"]) not in done]
    if decode is None:
        decode = _patched_decode(model)
    for sample in tqdm(todo, desc=dataset, initial=len(samples) - len(todo), total=len(samples)):
        built = build_input(tokenizer, dataset, sample, max_length, chat_template=chat_template, keep_head=keep_head)
        append_jsonl(out_path, predict(model, tokenizer, dataset, sample, built, decode))
    return len(todo)


def _patched_decode(model) -> str | None:
    """The decode protocol of a model patched by utils/patch.py (None when it is not patched)."""
    for module in model.modules():
        config = getattr(module, "sparse_config", None)
        if config is not None:
            return config.decode
    return None


# ------------------------------------------------------------------------------------------------ main

def run_configs(args: argparse.Namespace) -> list:
    """One attention config per requested run: methods x densities (dense once). Raises ValueError for bad input."""
    configs = sweep_configs(args)
    if args.run_name and len(configs) > 1:
        raise ValueError("--run-name names one run; with several methods/densities leave it out")
    return configs


def main(argv=None) -> None:
    args = parse_args(argv)
    shard = Shard.from_env()
    try:
        configs = run_configs(args)
        if args.max_samples is not None and args.max_samples < 1:
            raise ValueError(f"--max-samples must be >= 1, got {args.max_samples}")
        datasets = pick_datasets(args)
        data_dir = None if args.hub else args.data_dir
        device = shard.device(args.device)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        sys.exit(f"error: {err}")

    import torch
    from utils.models import load_model, model_max_length
    from utils.patch import patch_model

    torch.manual_seed(42)  # as LongBench's pred.py (decoding is greedy anyway)
    dtype = None if args.dtype == "auto" else args.dtype
    with distributed(shard):
        with shard.main_first():  # rank 0 downloads the data and converts the model first, into the cache
            try:
                samples = {d: load_samples(d, data_dir, args.longbench_e)[: args.max_samples] for d in datasets}
                model, tokenizer = load_model(args.model, device=device, dtype=dtype, load_in_4bit=args.load_in_4bit,
                                              rope_scaling=args.rope_scaling)
            except (ValueError, FileNotFoundError, RuntimeError, OSError) as err:
                sys.exit(f"error: {err}")
        model.eval()
        model_max = model_max_length(model)
        caps = {}
        for dataset in datasets:
            try:
                overhead = chat_overhead(tokenizer, uses_chat_template(dataset, args.chat_template, tokenizer))
                caps[dataset] = prompt_cap(args.max_length, model_max, MAX_NEW_TOKENS[dataset], overhead)
                if args.keep_head is not None and not 0 <= args.keep_head < caps[dataset]:
                    raise ValueError(f"--keep-head must be in [0, {caps[dataset]}) for {dataset}, got {args.keep_head}")
            except ValueError as err:
                sys.exit(f"error: {err}")
            if args.max_length is not None and caps[dataset] < args.max_length and shard.is_main:
                print(f"{dataset}: --max-length {args.max_length} leaves no room for the answer within the model's "
                      f"{model_max} tokens; keeping {caps[dataset]} prompt tokens")

        folder = results_folder_name(args.model, args.rope_scaling)  # <model>_yarn4 with --rope-scaling yarn:4
        model_dir = Path(args.output_dir) / folder
        run_dirs = []  # every run folder is checked before any sample runs
        for config in configs:
            settings = {"model": args.model, "model_name": folder,
                        "model_max_length": model_max, "max_length": args.max_length, "keep_head": args.keep_head,
                        "chat_template": args.chat_template, "dtype": args.dtype, "load_in_4bit": args.load_in_4bit,
                        "attention": config_dict(config),
                        "rope_scaling": str(args.rope_scaling) if args.rope_scaling else None,
                        "prompts": "data/longbench_config.json (THUDM/LongBench config)"}
            run_dir = model_dir / args.run_name if args.run_name else run_dir_for(model_dir, config, settings)
            try:
                patch_model(model, config=config, tokenizer=tokenizer)  # a config the model cannot take fails now
                prepare_run_dir(run_dir, settings)
            except (ValueError, FileNotFoundError) as err:
                sys.exit(f"error: {err}")
            run_dirs.append(run_dir)

        # this rank's samples (every N-th), each run with every method in turn: at any moment all runs hold the
        # same samples; what a file already holds is skipped
        try:
            done = {(i, d): finished_ids(run_dir / file_name(d, args.longbench_e))
                    for i, run_dir in enumerate(run_dirs) for d in datasets}
        except ValueError as err:  # a results file that is not a prediction file, or edited by hand
            sys.exit(f"error: {err}")
        mine = shard.take([(d, k) for d in datasets for k in range(len(samples[d]))])
        todo = [(d, k, i) for d, k in mine for i in range(len(configs)) if str(samples[d][k]["_id"]) not in done[i, d]]
        built_key, patched = None, len(configs) - 1  # patched with the last config above
        bar = tqdm(todo, desc=shard.label(model_folder_name(args.model)), unit="prediction")
        for dataset, k, i in bar:
            sample = samples[dataset][k]
            if patched != i:
                patch_model(model, config=configs[i], tokenizer=tokenizer)
                patched = i
            if built_key != (dataset, k):  # the same input for every method
                built = build_input(tokenizer, dataset, sample, caps[dataset], chat_template=args.chat_template,
                                    keep_head=args.keep_head)
                built_key = (dataset, k)
            record = predict(model, tokenizer, dataset, sample, built, configs[i].decode)
            append_jsonl(run_dirs[i] / file_name(dataset, args.longbench_e), record)
            bar.set_postfix(run=run_dirs[i].name, dataset=dataset)
        shard.barrier()  # every rank's predictions are in the files now

    if shard.is_main:
        for run_dir in run_dirs:
            for dataset in datasets:
                out_path = run_dir / file_name(dataset, args.longbench_e)
                have = len(finished_ids(out_path) & {str(s["_id"]) for s in samples[dataset]})
                print(f"{run_dir.name} {dataset}: {have}/{len(samples[dataset])} predictions -> {out_path}")


if __name__ == "__main__":
    main()
