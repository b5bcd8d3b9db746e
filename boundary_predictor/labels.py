"""Generate and cache boundary labels: one LLM forward per sample labels all chosen layers (App. B.3-B.4).

    python -m boundary_predictor.labels --model smollm2-135m --data-dir .cache/data/PaulGrahamEssays \
        --max-length 2048 --max-docs 8

Only the labels (attention-mass ratios, eq. 7) and the token ids are stored, never embeddings; the trainer
recomputes the keys with one forward pass per sample. Finished samples are skipped, so a run resumes. At the
end it prints label statistics (share of soft labels >= 0.5, a histogram) and the time per sample.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .attention_mass import ALPHA, BETA, DEFAULT_TILE_ELEMENTS, EPSILON, WINDOW, attention_mass_ratios, soft_labels
from .capture import capture_attention, resolve_layers
from .data import LabelCache, Sample, folder_documents, hf_documents, key_cache_path, make_samples, save_keys


def label_sample(model, input_ids: torch.Tensor, layers: list[int], *, window: int = WINDOW, eps: float = EPSILON,
                 tile_elements: int = DEFAULT_TILE_ELEMENTS, keys_out: dict | None = None) -> torch.Tensor:
    """Ratios of eq. 7 for `layers` from one forward pass. input_ids: [1, L] -> float32 [n_layers, L] (NaN edges).
    keys_out: a dict that receives {layer: post-RoPE keys [1, Hkv, L, D]} of the same forward (CPU)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"label one unpadded sequence at a time: input_ids must be [1, L], "
                         f"got {tuple(input_ids.shape)}")
    ratios: dict[int, torch.Tensor] = {}

    def on_layer(layer, query, key, options):
        ratios[layer] = attention_mass_ratios(
            query, key, scaling=options["scaling"], sliding_window=options["sliding_window"],
            softcap=options["softcap"], window=window, eps=eps, tile_elements=tile_elements)[0].cpu()
        if keys_out is not None:
            keys_out[layer] = key.detach().cpu()

    with torch.no_grad(), capture_attention(model, layers, on_layer):
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    missing = [i for i in layers if i not in ratios]
    if missing:
        raise RuntimeError(f"layers {missing} did not run through the attention interface; unsupported model?")
    return torch.stack([ratios[i] for i in layers])


def label_statistics(ratios: list[torch.Tensor], alpha: float = ALPHA, beta: float = BETA) -> dict:
    """Share of soft labels >= 0.5 and a 10-bin histogram of soft labels over all defined positions."""
    if not ratios:
        return {"positions": 0}
    labels = soft_labels(torch.cat([r.flatten() for r in ratios]), alpha, beta)
    labels = labels[~labels.isnan()]
    hist = torch.histc(labels, bins=10, min=0.0, max=1.0)
    return {"positions": labels.numel(), "positive_share": float((labels >= 0.5).float().mean()),
            "histogram": [round(float(h) / max(1, labels.numel()), 4) for h in hist]}


def add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data-dir", action="append", default=[], help="folder of .txt / .jsonl documents (repeatable)")
    g.add_argument("--hf-dataset", action="append", default=[], help="paper set via `datasets` (needs network): "
                   "booksum, natural_questions, triviaqa, chatqa2 (repeatable)")
    g.add_argument("--hf-docs", type=int, default=10000, help="documents taken from each --hf-dataset")
    g.add_argument("--max-docs", type=int, default=None, help="use only the first N documents (quick runs)")
    g.add_argument("--max-length", type=int, default=8192, help="tokens per sample (longer documents are cut)")
    g.add_argument("--min-length", type=int, default=512, help="drop samples shorter than this")
    g.add_argument("--pieces-per-doc", type=int, default=4, help="at most this many samples per document")
    g.add_argument("--layers", nargs="+", default=["global"],
                   help="layers to label/train on: global (full-attention layers, default), all, or indices")
    g.add_argument("--window", type=int, default=WINDOW, help="w, the half receptive field (App. B.3)")
    g.add_argument("--eps", type=float, default=EPSILON, help="eps of eq. 7")
    g.add_argument("--cache-dir", default=".cache/boundary_labels", help="where the label files go")
    g.add_argument("--label-tile", type=int, default=DEFAULT_TILE_ELEMENTS,
                   help="max elements of one attention tile while labelling (memory bound)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto", help="LLM dtype: auto (bf16 on cuda, fp32 on cpu), fp32, bf16, fp16")


def check_data_args(args) -> None:
    """Fail fast, before loading the model, on missing data."""
    if not args.data_dir and not args.hf_dataset:
        raise SystemExit("no data: give --data-dir FOLDER (e.g. .cache/data/PaulGrahamEssays) or --hf-dataset NAME")
    for folder in args.data_dir:
        if not Path(folder).is_dir():
            raise SystemExit(f"--data-dir {folder}: no such folder (a folder of .txt / .jsonl documents; see "
                             "boundary_predictor/README.md for the essays and LongBench files)")


def model_layers(model, args) -> list[int]:
    try:
        return resolve_layers(model, args.layers)
    except ValueError as err:
        raise SystemExit(f"--layers: {err}") from None


def load_llm(args):
    """(model, tokenizer, device) for --model through utils.models.load_model."""
    try:
        from utils.models import load_model
    except ImportError as err:
        raise SystemExit(f"cannot import utils.models ({err}); run from the repository root") from None
    try:
        dtype = None if args.dtype == "auto" else args.dtype
        model, tokenizer = load_model(args.model, device=args.device, dtype=dtype)
    except (ValueError, FileNotFoundError, OSError) as err:
        raise SystemExit(f"--model {args.model}: {err}") from None
    return model.eval(), tokenizer, next(model.parameters()).device


def collect_samples(args, tokenizer, model=None) -> list[Sample]:
    check_data_args(args)
    docs = [d for folder in args.data_dir for d in folder_documents(folder)]
    docs += [d for name in args.hf_dataset for d in hf_documents(name, args.hf_docs)]
    if args.max_docs is not None:
        docs = docs[: args.max_docs]
    if model is not None:
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and args.max_length > limit:
            raise SystemExit(f"--max-length {args.max_length} exceeds the model's context ({limit} tokens)")
    samples = make_samples(docs, tokenizer, args.max_length, args.min_length, args.pieces_per_doc)
    if not samples:
        raise SystemExit(f"no sample has >= {args.min_length} tokens; lower --min-length or add data")
    return samples


def ensure_labels(model, samples: list[Sample], layers: list[int], cache: LabelCache, args, device,
                  desc: str = "labels", key_cache=None) -> list[torch.Tensor]:
    """Label every sample missing from the cache (resumable). Returns the ratios computed in this call.
    key_cache: a folder where each labelled sample's keys are kept too (train.py --key-cache)."""
    todo = [s for s in samples if not cache.has(s, layers)]
    done = []
    for sample in tqdm(todo, desc=desc, unit="sample", disable=not todo):
        start = time.perf_counter()
        ids = torch.tensor([sample.input_ids], device=device)
        keys = {} if key_cache else None
        ratios = label_sample(model, ids, layers, window=args.window, eps=args.eps, tile_elements=args.label_tile,
                              keys_out=keys)
        if keys is not None:
            save_keys(key_cache_path(key_cache, ids, layers), keys)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        cache.save(sample, layers, ratios, time.perf_counter() - start)
        done.append(ratios)
    return done


def main(argv=None, model=None, tokenizer=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model name or path for utils.models.load_model")
    add_data_args(parser)
    args = parser.parse_args(argv)
    check_data_args(args)
    if model is None:
        model, tokenizer, device = load_llm(args)
    else:
        device = next(model.parameters()).device
    layers = model_layers(model, args)
    samples = collect_samples(args, tokenizer, model)
    cache = LabelCache(args.cache_dir, args.model, args.max_length, args.window, args.eps)
    print(f"{len(samples)} samples, layers {layers}, cache {cache.dir}", file=sys.stderr)
    ensure_labels(model, samples, layers, cache, args, device)
    entries = [e for _, e in cache.entries(samples)]
    stats = label_statistics([e["ratios"] for e in entries])
    stats["samples"] = len(entries)
    stats["seconds_per_sample"] = sum(e["seconds"] for e in entries) / max(1, len(entries))
    stats["mean_tokens"] = sum(e["input_ids"].numel() for e in entries) / max(1, len(entries))
    print(stats)
    return stats


if __name__ == "__main__":
    main()
