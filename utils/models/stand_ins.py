"""Stand-ins for real models, for tests and benchmarks.

Tiny models (`tiny_model`, `tiny_tokenizer`): random weights, hidden 64, 4 query / 2 KV heads of dim 16, for fast
CPU tests. `random_model(name)`: the published architecture of a model of the table (utils/models/specs.py) with
random weights, for latency.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from utils.models.load import PUBLISHED_CONFIGS, resolve_device, resolve_dtype
from utils.models.specs import default_attn_implementation, find_spec

# ----------------------------------------------------------------------------------------------------------------
# tiny random-weight models and tokenizer for tests

TINY_FAMILIES = ("llama", "qwen2", "gemma2", "gemma3")
TINY_VOCAB_SIZE = 320          # 256 byte symbols + 3 special tokens + 61 merges of tiny_tokenizer
TINY_MAX_POSITIONS = 8192
TINY_SLIDING_WINDOW = 16

_TINY_COMMON = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    max_position_embeddings=TINY_MAX_POSITIONS, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_TINY_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "gemma2": "gemma2", "gemma3": "gemma3_text"}


def tiny_config(family: str, **overrides):
    """Config of `tiny_model(family)`; gemma2/gemma3 mix sliding-window (window 16) and global layers."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; choose from {', '.join(TINY_FAMILIES)}")
    values = dict(_TINY_COMMON)
    if family in ("gemma2", "gemma3"):
        values.update(num_hidden_layers=4, sliding_window=TINY_SLIDING_WINDOW, query_pre_attn_scalar=16)
    values.update(overrides)
    if family == "gemma3" and "layer_types" not in overrides:
        # Gemma-3 has 5 sliding layers per global one; with 4 layers, 3:1 keeps both kinds.
        n = values["num_hidden_layers"]
        layer_types = ["full_attention" if i % 4 == 3 else "sliding_attention" for i in range(n)]
        layer_types[-1] = "full_attention" if "full_attention" not in layer_types else layer_types[-1]
        values["layer_types"] = layer_types
    # gemma2 derives its alternating sliding/global layer_types from num_hidden_layers and keeps its default
    # attn_logit_softcapping (50) and final_logit_softcapping (30).
    return AutoConfig.for_model(_TINY_MODEL_TYPES[family], **values)


def tiny_model(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
               attn_implementation: str | None = None, **config_overrides):
    """Random-weight model of a real family's class (LlamaForCausalLM, Qwen2ForCausalLM, Gemma2ForCausalLM,
    Gemma3ForCausalLM): hidden 64, 2 layers (4 for gemma), 4 query / 2 KV heads of dim 16, vocab 320, 8192
    positions. Same seed, same weights. Eval mode, CPU. `config_overrides` go to the config (e.g.
    num_hidden_layers=3, initializer_range=0.2 for peakier attention)."""
    config = tiny_config(family, **config_overrides)
    attn = attn_implementation or default_attn_implementation(config.model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.to(dtype).eval()


_TINY_CORPUS = (
    "The most important thing is to keep the attention on what matters. A long document is cut into chunks, "
    "and each chunk is scored against the query. The needle hides in a haystack of essays; the model must find "
    "the magic number and say it. Sparse attention keeps a few keys per query and skips the rest, so the cost "
    "of the prefill no longer grows with the square of the length.\n"
    "def attention(q, k, v):\n    return softmax(q @ k.T) @ v\n"
    "Question: What is the capital of France? Answer: Paris.\n"
) * 3
_TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def tiny_tokenizer(chat_template: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer (320 tokens: fits tiny_model's vocab), trained on a fixed text, so it is the same
    on every call and encodes any text. Special tokens: <pad>=0, <s>=1 (bos), </s>=2 (eos). No bos is added.
    chat_template=True adds a minimal chat template for code paths of instruct models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB_SIZE, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([_TINY_CORPUS], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=TINY_MAX_POSITIONS,
                                   clean_up_tokenization_spaces=False)
    if chat_template:
        fast.chat_template = _TINY_CHAT_TEMPLATE
    return fast


# ----------------------------------------------------------------------------------------------------------------
# published architectures with random weights, for latency benchmarks


def published_config(name: str, num_layers: int | None = None):
    """transformers config of a published architecture; `num_layers` keeps only the first layers."""
    spec = find_spec(name)
    if spec is None:
        raise ValueError(f"no published config for {name!r}; choose from {', '.join(PUBLISHED_CONFIGS)}")
    values = dict(spec.config)
    if num_layers is not None:
        if not 1 <= num_layers <= values["num_hidden_layers"]:
            raise ValueError(f"num_layers must be in [1, {values['num_hidden_layers']}] for {name}, got {num_layers}")
        values["num_hidden_layers"] = num_layers
        if "layer_types" in values:
            values["layer_types"] = values["layer_types"][:num_layers]
    return AutoConfig.for_model(values.pop("model_type"), **values)


def random_model(name: str, *, dtype=torch.bfloat16, device: str = "cpu", num_layers: int | None = None,
                 attn_implementation: str | None = None):
    """Model of a published architecture with random weights (latency benchmarks without the hub).

    Built on the meta device (instant), then materialised on `device` and initialised there, so an 8B model
    is filled by the GPU rather than the CPU. device="meta" returns the unmaterialised model (shapes only).
    """
    config = published_config(name, num_layers)
    torch_dtype = resolve_dtype(dtype, str(device))
    attn = attn_implementation or default_attn_implementation(config.model_type)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, attn_implementation=attn)
    if str(device) != "meta":
        model.to_empty(device=resolve_device(device))
        model.initialize_weights()  # also recomputes the rotary inv_freq buffers that to_empty left empty
        model.tie_weights()
    return model.eval()


__all__ = ["TINY_FAMILIES", "TINY_VOCAB_SIZE", "TINY_MAX_POSITIONS", "TINY_SLIDING_WINDOW", "tiny_config",
           "tiny_model", "tiny_tokenizer", "published_config", "random_model"]
