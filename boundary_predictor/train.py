"""Train the boundary predictor of one LLM (paper App. B.4); CPU or CUDA, resumable, seeded.

    python -m boundary_predictor.train --model smollm2-135m \
        --data-dir .cache/data/PaulGrahamEssays --data-dir .cache/data/LongBench \
        --max-length 8192 --epochs 8 --out boundary_predictor/weights/smollm2-135m.pt

Steps: (1) label every sample missing from the label cache (one forward per sample, all layers at once, see
labels.py); (2) each epoch, for each training sample in a seeded order: one LLM forward captures the
post-RoPE keys of the labelled layers, the predictor (shared by all layers) scores every position of every
layer, and one optimiser step follows on the mean focal BCE (eq. 9) over the labelled positions; (3) after
each epoch, metrics on the held-out documents (precision / recall / F1, top-K overlap) go to
`<run-dir>/metrics.jsonl`, and the weights with the lowest validation loss go to --out together with their
metadata (training command, validation metrics, ...). The checkpoint `<run-dir>/checkpoint.pt` is written
every --save-every samples and after each epoch; rerunning the same command resumes from it.

Keys are recomputed each epoch by default: on a GPU one forward of these small models is cheaper than reading
L x (layers x Hkv x D) numbers back from disk (smollm2-135m at 8K: ~90 MB of keys per sample). On a CPU the
forward dominates (qwen2.5-coder-0.5b-instruct at 2K: ~25 MB of fp32 keys per sample against tens of seconds of
forward), so `--key-cache DIR` keeps each sample's captured keys on disk after their first forward.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from utils.runs import append_jsonl

from .attention_mass import ALPHA, BETA, soft_labels
from .capture import capture_keys, kv_shape
from .data import LabelCache, key_cache_path, save_keys, split_samples
from .inference import WEIGHTS_DIR, model_key, save_predictor
from .labels import add_data_args, check_data_args, collect_samples, ensure_labels, load_llm, model_layers
from .loss import GAMMA, POS_WEIGHT, TOP_K, BoundaryMetrics, focal_bce
from .model import BoundaryPredictor, PredictorConfig

# Settings that must match for a checkpoint to be resumed.
_RUN_KEYS = ("model", "max_length", "min_length", "pieces_per_doc", "max_docs", "data_dir", "hf_dataset", "layers",
             "window", "eps", "alpha", "beta", "gamma", "pos_weight", "d_model", "heads", "hidden", "lr",
             "weight_decay", "val_fraction", "seed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model name or path for utils.models.load_model")
    add_data_args(parser)
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=8)
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--layer-batch", type=int, default=8, help="layers scored per backward pass (memory bound)")
    g.add_argument("--alpha", type=float, default=ALPHA, help="soft-label slope (eq. 8)")
    g.add_argument("--beta", type=float, default=BETA, help="soft-label offset (eq. 8), ln 2")
    g.add_argument("--gamma", type=float, default=GAMMA, help="focal parameter (eq. 9)")
    g.add_argument("--pos-weight", type=float, default=POS_WEIGHT, help="positive-class weight (eq. 9)")
    g.add_argument("--topk", type=int, default=TOP_K, help="K of the top-K overlap metric")
    g.add_argument("--d-model", type=int, default=128, help="width of the window encoder")
    g.add_argument("--heads", type=int, default=8, help="attention heads of the window encoder")
    g.add_argument("--hidden", type=int, default=256, help="MLP hidden size")
    g.add_argument("--val-fraction", type=float, default=0.1, help="share of documents held out")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--save-every", type=int, default=200, help="checkpoint every N training samples")
    g.add_argument("--out", default=None, help="weights file (default boundary_predictor/weights/<model>.pt)")
    g.add_argument("--run-dir", default=None, help="checkpoint + metrics.jsonl (default .cache/boundary_runs/<model>)")
    g.add_argument("--key-cache", default=None, help="folder that keeps each sample's captured keys after the first "
                   "forward (CPU training; default: recompute every epoch)")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from <run-dir>/checkpoint.pt when it exists (default)")
    return parser


def _run_settings(args) -> dict:
    return {k: getattr(args, k) for k in _RUN_KEYS}


def _layer_batches(model, ids, layers, layer_batch, key_cache=None):
    """Captured keys of all layers as predictor features, in groups: yields (indices into layers, keys list).
    key_cache: a folder where the keys of these token ids and layers are read from, or written after the forward."""
    path = key_cache_path(key_cache, ids, layers) if key_cache is not None else None
    if path is not None and path.is_file():
        keys = {int(k): v.to(ids.device) for k, v in torch.load(path, weights_only=True).items()}
    else:
        keys = capture_keys(model, ids, layers)
        if path is not None:
            save_keys(path, keys)
    for start in range(0, len(layers), layer_batch):
        group = list(range(start, min(len(layers), start + layer_batch)))
        yield group, [keys[layers[j]] for j in group]


def run_sample(model, predictor, entry, layers, args, device, metrics, optimizer=None) -> float:
    """Forward (and, with an optimizer, one training step) on one sample; returns the mean loss."""
    ids = entry["input_ids"].long().unsqueeze(0).to(device)
    labels_all = soft_labels(entry["ratios"], args.alpha, args.beta).to(device)
    total_positions = int((~labels_all.isnan()).sum())
    if total_positions == 0:
        return float("nan")
    loss_sum = 0.0
    for group, keys in _layer_batches(model, ids, layers, args.layer_batch, args.key_cache):
        features = torch.cat([predictor.features_from_keys(k) for k in keys]).float()   # [g, L, C]
        labels = labels_all[group]
        mask = ~labels.isnan()
        with torch.set_grad_enabled(optimizer is not None):
            logits = predictor(features)
            loss = focal_bce(logits, labels, mask, gamma=args.gamma, pos_weight=args.pos_weight)
            weighted = loss * (mask.sum() / total_positions)  # mean over all labelled positions of the sample
            if optimizer is not None:
                weighted.backward()
        loss_sum += float(weighted.detach())
        metrics.add(logits, labels, mask)
    if optimizer is not None:
        torch.nn.utils.clip_grad_norm_(predictor.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    metrics.add_loss(loss_sum)
    return loss_sum


def evaluate(model, predictor, samples, cache, layers, args, device) -> dict:
    predictor.eval()
    metrics = BoundaryMetrics(args.topk)
    for _, entry in tqdm(list(cache.entries(samples)), desc="validation", unit="sample", leave=False):
        run_sample(model, predictor, entry, layers, args, device, metrics)
    predictor.train()
    return metrics.summary()


def _save_checkpoint(path: Path, predictor, optimizer, epoch, position, best, metrics, settings):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"predictor": predictor.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "position": position, "best": best, "train_metrics": vars(metrics), "settings": settings}, tmp)
    tmp.replace(path)


def main(argv=None, model=None, tokenizer=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.epochs < 1 or args.layer_batch < 1 or args.save_every < 1:
        raise SystemExit("--epochs, --layer-batch and --save-every must be >= 1")
    check_data_args(args)
    if model is None:
        model, tokenizer, device = load_llm(args)
    else:
        device = next(model.parameters()).device
    model.eval().requires_grad_(False)
    name = model_key(args.model)
    out = Path(args.out) if args.out else WEIGHTS_DIR / f"{name}.pt"
    run_dir = Path(args.run_dir) if args.run_dir else Path(".cache/boundary_runs") / name
    ckpt_path, log_path = run_dir / "checkpoint.pt", run_dir / "metrics.jsonl"

    layers = model_layers(model, args)
    samples = collect_samples(args, tokenizer, model)
    train_set, val_set = split_samples(samples, args.val_fraction, args.seed)
    cache = LabelCache(args.cache_dir, args.model, args.max_length, args.window, args.eps)
    print(f"{len(train_set)} train / {len(val_set)} validation samples "
          f"({len({s.doc_id for s in train_set})} / {len({s.doc_id for s in val_set})} documents), "
          f"layers {layers}, device {device}", file=sys.stderr)
    ensure_labels(model, train_set + val_set, layers, cache, args, device, key_cache=args.key_cache)

    num_kv_heads, head_dim = kv_shape(model)
    config = PredictorConfig(num_kv_heads=num_kv_heads, head_dim=head_dim, window=args.window,
                             d_model=args.d_model, num_heads=args.heads, hidden=args.hidden)
    torch.manual_seed(args.seed)
    predictor = BoundaryPredictor(config).to(device).train()
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    settings = _run_settings(args)
    epoch, position, best = 0, 0, {"val_loss": math.inf, "epoch": None, "val": None, "train": None}
    metrics = BoundaryMetrics(args.topk)
    if args.resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        if ckpt["settings"] != settings:
            changed = sorted(k for k in settings if ckpt["settings"].get(k) != settings[k])
            raise SystemExit(f"checkpoint {ckpt_path} was made with other settings ({', '.join(changed)}); "
                             "pass --no-resume to start over or --run-dir for a new run")
        predictor.load_state_dict(ckpt["predictor"])
        optimizer.load_state_dict(ckpt["optimizer"])
        epoch, position, best = ckpt["epoch"], ckpt["position"], ckpt["best"]
        vars(metrics).update(ckpt["train_metrics"])
        print(f"resuming from {ckpt_path}: epoch {epoch + 1}, sample {position}", file=sys.stderr)
    elif ckpt_path.is_file():
        ckpt_path.unlink()
        log_path.unlink(missing_ok=True)

    train_entries = [s for s, _ in cache.entries(train_set)]  # the training samples that have labels
    if not train_entries:
        raise SystemExit("no training samples with labels; add data or lower --val-fraction")
    summary = {}
    while epoch < args.epochs:
        started = time.perf_counter()
        order = torch.randperm(len(train_entries), generator=torch.Generator().manual_seed(args.seed + epoch))
        bar = tqdm(order.tolist()[position:], desc=f"epoch {epoch + 1}/{args.epochs}", unit="sample",
                   initial=position, total=len(order))
        for index in bar:
            entry = cache.load(train_entries[index])
            loss = run_sample(model, predictor, entry, layers, args, device, metrics, optimizer=optimizer)
            bar.set_postfix(loss=f"{loss:.4f}")
            position += 1
            if position % args.save_every == 0 and position < len(order):
                _save_checkpoint(ckpt_path, predictor, optimizer, epoch, position, best, metrics, settings)
        train_summary = metrics.summary()
        val_summary = evaluate(model, predictor, val_set, cache, layers, args, device) if val_set else None
        summary = {"epoch": epoch + 1, "train": train_summary, "val": val_summary,
                   "seconds": round(time.perf_counter() - started, 1)}
        append_jsonl(log_path, summary)  # crash-safe (utils/runs/records.py); creates run_dir
        print(json.dumps(summary), file=sys.stderr)
        score = val_summary["loss"] if val_summary else train_summary["loss"]
        if score <= best["val_loss"]:
            best = {"val_loss": score, "epoch": epoch + 1, "val": val_summary, "train": train_summary}
            metadata = {
                "model": args.model, "model_key": name, "layers": layers,
                "label": {"window": args.window, "eps": args.eps, "alpha": args.alpha, "beta": args.beta},
                "loss": {"gamma": args.gamma, "pos_weight": args.pos_weight},
                "data": {"data_dir": args.data_dir, "hf_dataset": args.hf_dataset, "max_length": args.max_length,
                         "train_samples": len(train_entries), "val_samples": len(val_set),
                         "train_documents": len({s.doc_id for s in train_set}),
                         "val_documents": len({s.doc_id for s in val_set})},
                "epoch": epoch + 1, "epochs": args.epochs, "seed": args.seed,
                "validation": val_summary, "train": train_summary,
                "command": "python -m boundary_predictor.train " + shlex.join(argv),
                "device": str(device), "torch": str(torch.__version__),
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            save_predictor(predictor, out, metadata)
            print(f"saved {out} (epoch {epoch + 1}, validation loss {score:.4f})", file=sys.stderr)
        epoch, position = epoch + 1, 0
        metrics = BoundaryMetrics(args.topk)
        _save_checkpoint(ckpt_path, predictor, optimizer, epoch, position, best, metrics, settings)
    return {"last": summary, "best": best, "out": str(out)}


if __name__ == "__main__":
    main()
