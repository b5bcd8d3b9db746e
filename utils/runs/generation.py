"""Greedy generation shared by the runners: stop tokens, generation with stopping, and device sync for timing.

    stops = eos_token_ids(model, tokenizer)                   # every end-of-sequence id of model and tokenizer
    new_ids = greedy_generate(model, prompt_ids, 48, stops, stopping_criteria=[StopAtNewline(tokenizer, n)])

One sequence at a time (sparse methods run unpadded sequences), greedy (no sampling: results are reproducible).
"""

from __future__ import annotations

import torch
from transformers import StoppingCriteria, StoppingCriteriaList


def eos_token_ids(model, tokenizer, extra=()) -> list[int]:
    """End-of-sequence ids of the model's generation config and of the tokenizer, then `extra`, without repeats
    (instruct models often end a turn with a token other than the tokenizer's eos)."""
    ids = []
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id, *extra):
        ids += list(value) if isinstance(value, (list, tuple)) else [value]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


class StopAtNewline(StoppingCriteria):
    """Stop once the answer has started and a line break follows it (one-sentence answers; a leading line break
    before the answer does not stop)."""

    def __init__(self, tokenizer, prompt_len: int):
        self.tokenizer, self.prompt_len = tokenizer, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        done = ["\n" in self.tokenizer.decode(row[self.prompt_len:], skip_special_tokens=True).lstrip()
                for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def greedy_generate(model, input_ids: list[int], max_new_tokens: int, stop_ids: list[int], *,
                    min_new_tokens: int = 0, stopping_criteria=()) -> list[int]:
    """Greedy continuation of one prompt (token ids); returns the new token ids (up to max_new_tokens, ending at
    the first of `stop_ids` or when one of `stopping_criteria` fires)."""
    ids = torch.tensor([input_ids], device=model.device)
    pad_id = model.generation_config.pad_token_id
    if not isinstance(pad_id, int):  # unused for one sequence; given to silence a warning
        pad_id = stop_ids[0] if stop_ids else 0
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         min_new_tokens=min_new_tokens, do_sample=False, num_beams=1, temperature=None, top_p=None,
                         top_k=None, eos_token_id=list(stop_ids) or None, pad_token_id=pad_id,
                         stopping_criteria=StoppingCriteriaList(list(stopping_criteria)))
    return out[0, ids.shape[1]:].tolist()


def sync(device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so that a host clock times it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = ["eos_token_ids", "StopAtNewline", "greedy_generate", "sync"]
