"""Models: the model table (specs.py), loading real models (load.py: hub, local folders, offline GGUF from PyPI
wheels through wheels.py and gguf_convert.py; rope_scaling.py for longer contexts), and random-weight stand-ins for
tests and benchmarks (stand_ins.py). This face hands on the names runners and tests use
(`from utils.models import load_model, tiny_model, ...`); runners look `load_model` up here at call time.
"""

from utils.models.load import (ALIASES, MODELS, OFFLINE_DEFAULTS, PUBLISHED_CONFIGS, cache_dir, check_context,
                               default_attn_implementation, find_wheel, load_model, model_max_length,
                               offline_model_dir, resolve_device, resolve_dtype)
from utils.models.stand_ins import (TINY_FAMILIES, TINY_MAX_POSITIONS, TINY_SLIDING_WINDOW, TINY_VOCAB_SIZE,
                                    published_config, random_model, tiny_config, tiny_model, tiny_tokenizer)

__all__ = [
    "MODELS", "ALIASES", "OFFLINE_DEFAULTS", "TINY_FAMILIES", "TINY_VOCAB_SIZE", "TINY_MAX_POSITIONS",
    "TINY_SLIDING_WINDOW", "PUBLISHED_CONFIGS", "load_model", "resolve_device", "resolve_dtype",
    "default_attn_implementation", "model_max_length", "check_context", "cache_dir", "offline_model_dir",
    "find_wheel", "tiny_config", "tiny_model", "tiny_tokenizer", "published_config", "random_model",
]
