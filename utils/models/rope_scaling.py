"""Context extension by RoPE scaling: `--rope-scaling yarn:4` runs a 32K model on up to 128K tokens.

YaRN (Peng et al., 2023, arXiv:2309.00071) stretches the low rotary frequencies by `factor` and keeps the high ones,
and scales the attention logits by 0.1 ln(factor) + 1; Qwen2.5's model cards extend the 32K models to 128K this way
(factor 4 over 32768 positions). transformers implements it (modeling_rope_utils._compute_yarn_parameters); this
module only turns a short spec into the config transformers reads, at load time:

    scaling = parse_rope_scaling("yarn:4")      # RopeScaling(kind="yarn", factor=4.0); str(scaling) == "yarn:4"
    apply_rope_scaling(config, scaling)         # config.rope_parameters gets rope_type "yarn", factor 4 and
                                                # original_max_position_embeddings 32768; max_position_embeddings
                                                # becomes 131072

The scaling is static (the same frequencies at every length, as in vLLM), so it changes short inputs too: a run with
--rope-scaling is a different model setting, and the runners record it and keep its results apart.

Supported: models with one RoPE for all layers, all of them full attention, and no scaling of their own (Qwen2.5,
Llama-family models such as SmolLM2). Gemma-2/3 (sliding-window layers, per-layer RoPE) and Llama-3.1 (already
llama3-scaled to 128K) are refused with a one-line error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ROPE_SCALING_KINDS = ("yarn",)
SUPPORTED_MODEL_TYPES = ("qwen2", "llama")  # rotary embedding built from config.rope_parameters; checked in tests
_NONE = ("", "none", "off")
_EXAMPLE = "e.g. yarn:4 (4 x the native context)"


@dataclass(frozen=True)
class RopeScaling:
    """A RoPE scaling: kind (one of ROPE_SCALING_KINDS) and factor (> 1; new context = factor x native context)."""

    kind: str
    factor: float

    def __str__(self) -> str:  # the spec it parses from; what results record
        return f"{self.kind}:{self.factor:g}"

    @property
    def label(self) -> str:
        """For file and folder names: 'yarn4', 'yarn2.5'."""
        return f"{self.kind}{self.factor:g}"


def parse_rope_scaling(spec) -> RopeScaling | None:
    """'yarn:4' -> RopeScaling('yarn', 4.0); None, '' or 'none' -> None. A RopeScaling passes through.
    Raises a one-line ValueError for anything else."""
    if spec is None or isinstance(spec, RopeScaling):
        return spec
    text = str(spec).strip().lower()
    if text in _NONE:
        return None
    kind, sep, factor_text = text.partition(":")
    if kind not in ROPE_SCALING_KINDS:
        raise ValueError(f"unknown RoPE scaling {spec!r}; use {' or '.join(ROPE_SCALING_KINDS)}:FACTOR, {_EXAMPLE}")
    try:
        factor = float(factor_text) if sep else float("nan")
    except ValueError:
        factor = float("nan")
    if not factor > 1 or factor == float("inf"):  # also catches nan (no or unreadable factor)
        raise ValueError(f"RoPE scaling {spec!r} needs a factor above 1 after the colon, {_EXAMPLE}")
    return RopeScaling(kind, factor)


def apply_rope_scaling(config, scaling) -> object:
    """Set `scaling` (a RopeScaling or a spec like 'yarn:4') on a transformers config, in place, before the model is
    built from it: rope_parameters for transformers' YaRN and max_position_embeddings = factor x the native one.
    Returns the config. None leaves the config as it is. One-line ValueError for a model it does not fit."""
    scaling = parse_rope_scaling(scaling)
    if scaling is None:
        return config
    model_type = getattr(config, "model_type", type(config).__name__)
    rope = getattr(config, "rope_parameters", None)
    layer_types = set(getattr(config, "layer_types", None) or [])
    fix = f"drop --rope-scaling or use a {'/'.join(SUPPORTED_MODEL_TYPES)} model such as qwen2.5-coder-1.5b-instruct"
    if not isinstance(rope, dict) or (layer_types and not layer_types.isdisjoint(rope)):
        raise ValueError(f"--rope-scaling {scaling}: {model_type} has a RoPE per layer type (sliding-window and "
                         f"global layers), not supported; {fix}")
    if layer_types - {"full_attention"}:
        raise ValueError(f"--rope-scaling {scaling}: {model_type} has sliding-window layers "
                         f"({', '.join(sorted(layer_types - {'full_attention'}))}), not supported; {fix}")
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"--rope-scaling {scaling}: {model_type} already uses {rope['rope_type']} RoPE scaling up to "
                         f"{config.max_position_embeddings} positions; drop --rope-scaling")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"--rope-scaling {scaling}: not supported for {model_type} models; {fix}")
    native = int(config.max_position_embeddings)
    config.rope_parameters = {**rope, "rope_type": scaling.kind, "factor": float(scaling.factor),
                              "original_max_position_embeddings": native}
    config.max_position_embeddings = int(round(native * scaling.factor))
    config.validate_rope()
    return config


def too_long_message(length: int, model_max: int, scaling=None) -> str:
    """The one-line error for a length past the model's maximum (with `scaling` applied, if any): it names the
    --rope-scaling factor that would fit."""
    scaling = parse_rope_scaling(scaling)
    native = model_max / scaling.factor if scaling else model_max
    factor = max(2, math.ceil(length / native))
    return (f"length {length} exceeds the model's maximum context of {model_max} tokens"
            f"{f' (with --rope-scaling {scaling})' if scaling else ''}; use --lengths up to {model_max} or extend "
            f"the context with --rope-scaling yarn:{factor} (Qwen2.5 and Llama models)")


__all__ = ["ROPE_SCALING_KINDS", "SUPPORTED_MODEL_TYPES", "RopeScaling", "parse_rope_scaling", "apply_rope_scaling",
           "too_long_message"]
