"""GGUF file -> Hugging Face folder (bf16 weights, config, tokenizer), with the tokenizer fixes transformers 5.17
needs when it reads GGUF files.

Tokenizers: transformers builds Gemma-3's tokenizer as a Unigram model from the GGUF scores, which splits words
wrongly (and never adds <bos>), and it gives SmolLM2's tokenizer <|im_start|> as eos. So the SentencePiece
vocabularies (Gemma) are rebuilt here as the BPE they are (merge order = piece score, as llama.cpp tokenizes GGUF),
and the special tokens of every model are set from the ids the GGUF file names (for Qwen2.5: eos <|im_end|>,
pad/bos <|endoftext|>, as in its Hugging Face release). Chat templates stored in the GGUF are kept.

Precision: bf16. The GGUF weights are 4- to 8-bit blocks with fp16 scales (Q4_K_M / Q4_1; Q4_K_M keeps some tensors
in 5, 6 or 8 bits); rounding their dequantised values to bf16 (8-bit mantissa, relative error <= 2^-9) is far below
the quantisation step (1/16 of a block's range at 4 bits), and bf16 is the dtype the models were trained in. It
halves the folder (gemma-3-270m ~540 MB instead of ~1.1 GB); loading with dtype="fp32" upcasts exactly.

A GGUF that stores a separate output matrix (the Qwen2.5 files: output.weight quantised apart from token_embd) gives
a folder with an untied lm_head, as llama.cpp runs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer


def convert_gguf(gguf_path: Path, out_dir: Path, name: str, sha256: str) -> None:
    """Dequantise a GGUF file into a bf16 Hugging Face folder (weights, config, tokenizer, source note)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    if gguf_field(reader, "tokenizer.ggml.model") == "llama":  # SentencePiece vocabulary (Gemma)
        tokenizer = spm_bpe_tokenizer(reader)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tokenizer.clean_up_tokenization_spaces = False  # destructive for byte-level BPE
    set_special_tokens(tokenizer, reader)
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


def gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def spm_bpe_tokenizer(reader):
    """Gemma tokenizer from GGUF SentencePiece data: BPE whose merge order is the merged piece's score.

    Normal pieces (type 1) form the BPE vocabulary; byte pieces (<0x00>..) serve byte fallback; control pieces
    (<bos>, <start_of_turn>, ...) are special added tokens; user-defined pieces (newline and space runs, HTML tags)
    are added tokens matched on the raw text, as llama.cpp does.
    """
    from tokenizers import AddedToken
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    normal_type, control_type, user_type = 1, 3, 4
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    scores = gguf_field(reader, "tokenizer.ggml.scores")
    types = gguf_field(reader, "tokenizer.ggml.token_type")
    normal = {tok: i for i, tok in enumerate(tokens) if types[i] == normal_type}
    ranked = []
    for piece, i in normal.items():
        splits = [(normal[piece[:k]], normal[piece[k:]]) for k in range(1, len(piece))
                  if piece[:k] in normal and piece[k:] in normal]
        ranked += [(-scores[i], i, left, right) for left, right in sorted(splits)]
    ranked.sort()
    merges = [(tokens[left], tokens[right]) for _, _, left, right in ranked]
    tokenizer = GemmaTokenizer(vocab={tok: i for i, tok in enumerate(tokens)}, merges=merges,
                               add_bos_token=bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", True)),
                               add_eos_token=bool(gguf_field(reader, "tokenizer.ggml.add_eos_token", False)))
    tokenizer.add_tokens([AddedToken(tokens[i], normalized=False, special=True)
                          for i in range(len(tokens)) if types[i] == control_type], special_tokens=True)
    tokenizer.add_tokens([AddedToken(tokens[i], normalized=False, special=False)
                          for i in range(len(tokens)) if types[i] == user_type])
    return tokenizer


def set_special_tokens(tokenizer, reader) -> None:
    """bos/eos/unk/pad tokens as the GGUF names them by id (tokenizer ids are the GGUF ids); the chat template too."""
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id")):
        token_id = gguf_field(reader, f"tokenizer.ggml.{key}")
        if token_id is not None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(int(token_id)))
    template = gguf_field(reader, "tokenizer.chat_template")
    if template:
        tokenizer.chat_template = template


__all__ = ["convert_gguf", "spm_bpe_tokenizer", "set_special_tokens", "gguf_field"]
