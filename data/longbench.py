"""LongBench (v1) data: the datasets, their prompts and generation lengths, loading, and input building.

Everything here follows THUDM/LongBench `pred.py` (v1):
- the prompt is LongBench's template for the dataset (`longbench_config.json`, copied from LongBench's
  `config/dataset2prompt.json`) filled with the sample's `context` and `input`;
- a prompt longer than `max_length` tokens loses its middle: the first and last `max_length // 2` tokens are
  decoded back to text and joined (the paper's App. D variant, "first 1K and last C_max - 1K tokens", is
  `keep_head=1024`);
- only then is the chat template applied, except on the few-shot and code datasets (trec, triviaqa, samsum,
  lsht, lcc, repobench-p), where LongBench feeds the raw prompt because chat models do better without it.

Data come from a folder of the official jsonl files (`<name>.jsonl`, `<name>_e.jsonl` for LongBench-E, as in
LongBench's `data.zip`; by default `<cache>/data/LongBench` when it holds them) or, with a network, from the
Hugging Face Hub (`THUDM/LongBench`).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

ENGLISH_DATASETS = [
    "narrativeqa", "qasper", "multifieldqa_en",          # Single-Doc QA
    "hotpotqa", "2wikimqa", "musique",                    # Multi-Doc QA
    "gov_report", "qmsum", "multi_news",                  # Summarization
    "trec", "triviaqa", "samsum",                         # Few-shot Learning
    "passage_count", "passage_retrieval_en",              # Synthetic
    "lcc", "repobench-p",                                 # Code
]
CHINESE_DATASETS = ["multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"]
# LongBench-E: the datasets with a length-balanced `<name>_e` variant (English only).
LONGBENCH_E_DATASETS = [
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news",
    "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
]
ALL_DATASETS = ENGLISH_DATASETS + CHINESE_DATASETS

# Task groups of LongBench (and of the paper's Table 2). Code datasets count for both languages.
GROUPS = {
    "Single-Doc QA": ["narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"],
    "Multi-Doc QA": ["hotpotqa", "2wikimqa", "musique", "dureader"],
    "Summarization": ["gov_report", "qmsum", "multi_news", "vcsum"],
    "Few-shot Learning": ["trec", "triviaqa", "samsum", "lsht"],
    "Synthetic": ["passage_count", "passage_retrieval_en", "passage_retrieval_zh"],
    "Code": ["lcc", "repobench-p"],
}

# pred.py: "chat models are better off without build prompts on these tasks"
NO_CHAT_TEMPLATE = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}

HUB_REPO = "THUDM/LongBench"
CONFIG_PATH = Path(__file__).with_name("longbench_config.json")
_CONFIG = json.loads(CONFIG_PATH.read_text(encoding="utf-8"))
PROMPTS: dict[str, str] = _CONFIG["dataset2prompt"]
MAX_NEW_TOKENS: dict[str, int] = _CONFIG["dataset2maxlen"]


def cache_data_dir() -> Path:
    """Where an offline copy of LongBench is looked for by default: `<cache>/data/LongBench` ($DHSA_CACHE)."""
    from utils.models import cache_dir

    return cache_dir() / "data" / "LongBench"


def default_data_dir() -> Path | None:
    """`cache_data_dir()` when it holds LongBench jsonl files (unzip LongBench's data.zip there), else None
    (then the data come from the Hugging Face Hub)."""
    folder = cache_data_dir()
    return folder if folder.is_dir() and any(folder.glob("*.jsonl")) else None


def file_name(dataset: str, longbench_e: bool = False) -> str:
    """`multi_news.jsonl`, or `multi_news_e.jsonl` for LongBench-E (the official file and Hub config names)."""
    return f"{dataset}_e.jsonl" if longbench_e else f"{dataset}.jsonl"


def check_dataset(dataset: str, longbench_e: bool = False) -> None:
    if dataset not in ALL_DATASETS:
        raise ValueError(f"unknown LongBench dataset {dataset!r}; choose from: {', '.join(ALL_DATASETS)}")
    if longbench_e and dataset not in LONGBENCH_E_DATASETS:
        raise ValueError(f"{dataset} has no LongBench-E variant; LongBench-E has: {', '.join(LONGBENCH_E_DATASETS)}")


def datasets_in_folder(data_dir: str | Path, longbench_e: bool = False, chinese: bool = False) -> list[str]:
    """The datasets (in LongBench order) whose jsonl file is in `data_dir`."""
    names = LONGBENCH_E_DATASETS if longbench_e else ENGLISH_DATASETS + (CHINESE_DATASETS if chinese else [])
    return [name for name in names if (Path(data_dir) / file_name(name, longbench_e)).is_file()]


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_samples(dataset: str, data_dir: str | Path | None = None, longbench_e: bool = False,
                 hub_repo: str = HUB_REPO) -> list[dict]:
    """The test samples of one dataset, each a dict with LongBench's fields (`input`, `context`, `answers`,
    `length`, `dataset`, `language`, `all_classes`, `_id`).

    From `data_dir/<name>.jsonl` when a folder is given, else from the Hub: `datasets.load_dataset(hub_repo,
    name)`, falling back to the repository's `data.zip` (recent `datasets` no longer run LongBench's
    loading script).
    """
    check_dataset(dataset, longbench_e)
    name = file_name(dataset, longbench_e)
    if data_dir is not None:
        path = Path(data_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; put LongBench's {name} there (from its data.zip) "
                                    f"or drop --data-dir to load it from the Hugging Face Hub")
        return read_jsonl(path)
    return _load_from_hub(name.removesuffix(".jsonl"), hub_repo)


def _load_from_hub(config_name: str, hub_repo: str) -> list[dict]:
    try:
        import datasets
        return [dict(row) for row in datasets.load_dataset(hub_repo, config_name, split="test")]
    except Exception as script_error:  # datasets >= 4 refuses LongBench's loading script
        try:
            from huggingface_hub import hf_hub_download
            archive = hf_hub_download(hub_repo, "data.zip", repo_type="dataset")
        except Exception as download_error:
            raise RuntimeError(
                f"could not load {hub_repo}/{config_name} ({script_error}; {download_error}); download "
                f"https://huggingface.co/datasets/{hub_repo}/resolve/main/data.zip on a machine with a network, "
                f"unzip its jsonl files into {cache_data_dir()} (used by default) or pass their folder as "
                f"--data-dir") from download_error
        with zipfile.ZipFile(archive) as zf:
            member = next((m for m in zf.namelist() if m.endswith(f"/{config_name}.jsonl")
                           or m == f"{config_name}.jsonl"), None)
            if member is None:
                raise RuntimeError(f"{config_name}.jsonl is not in {archive}") from script_error
            with zf.open(member) as f:
                return [json.loads(line) for line in io.TextIOWrapper(f, encoding="utf-8") if line.strip()]


def build_prompt(dataset: str, sample: dict) -> str:
    """LongBench's prompt for one sample (its template filled with `context` and `input`)."""
    return PROMPTS[dataset].format(context=sample["context"], input=sample["input"])


def middle_cut(ids: list[int], max_length: int, keep_head: int | None = None) -> tuple[list[int], list[int]]:
    """Split token ids `[n]` into the head and tail that survive a cut to `max_length` tokens.

    LongBench keeps `int(max_length / 2)` tokens at each end (so an odd `max_length` keeps one token fewer);
    `keep_head` keeps that many head tokens and `max_length - keep_head` tail tokens instead. A sequence that
    fits is returned whole as the head.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
    if len(ids) <= max_length:
        return list(ids), []
    if keep_head is None:
        head = tail = int(max_length / 2)
    else:
        if not 0 <= keep_head < max_length:
            raise ValueError(f"keep_head must be in [0, max_length={max_length}), got {keep_head}")
        head, tail = keep_head, max_length - keep_head
    return list(ids[:head]), list(ids[len(ids) - tail:])


def truncate_prompt(tokenizer, prompt: str, max_length: int, keep_head: int | None = None) -> tuple[str, int, bool]:
    """Cut the middle out of a prompt longer than `max_length` tokens, as LongBench's pred.py does.

    The prompt is tokenized with the tokenizer's special tokens (so a BOS counts), the kept head and tail are
    decoded without special tokens and joined as text. Returns (prompt, tokens before the cut, was cut).
    """
    ids = tokenizer(prompt, truncation=False).input_ids
    if len(ids) <= max_length:
        return prompt, len(ids), False
    head, tail = middle_cut(ids, max_length, keep_head)
    text = tokenizer.decode(head, skip_special_tokens=True) + tokenizer.decode(tail, skip_special_tokens=True)
    return text, len(ids), True


def uses_chat_template(dataset: str, chat_template: bool | None, tokenizer) -> bool:
    """Whether this dataset's prompt goes through the chat template.

    `chat_template=None` means: when the tokenizer has one. The few-shot and code datasets never do.
    """
    if dataset in NO_CHAT_TEMPLATE:
        return False
    if chat_template is None:
        return getattr(tokenizer, "chat_template", None) is not None
    if chat_template and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("--chat-template was asked for, but this tokenizer has none; use --no-chat-template")
    return chat_template


def encode_input(tokenizer, prompt: str, use_chat: bool) -> list[int]:
    """Token ids `[n]` fed to the model: the prompt as one user turn of the chat template, or the raw prompt
    with the tokenizer's special tokens (LongBench tokenizes both with the tokenizer's defaults; a chat
    template already writes its BOS, so no second one is added)."""
    if not use_chat:
        return tokenizer(prompt).input_ids
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def chat_overhead(tokenizer, use_chat: bool) -> int:
    """Tokens the chat template adds around a prompt (0 without it), to keep room for it under the cap."""
    if not use_chat:
        return 0
    return max(0, len(encode_input(tokenizer, "", True)) - len(tokenizer("").input_ids))


def build_input(tokenizer, dataset: str, sample: dict, max_length: int, *, chat_template: bool | None = None,
                keep_head: int | None = None) -> dict:
    """Everything LongBench does before generation, for one sample.

    Returns {"input_ids": [n] token ids, "prompt_tokens": prompt length before the cut, "truncated": bool}.
    """
    prompt = build_prompt(dataset, sample)
    prompt, prompt_tokens, truncated = truncate_prompt(tokenizer, prompt, max_length, keep_head)
    use_chat = uses_chat_template(dataset, chat_template, tokenizer)
    return {"input_ids": encode_input(tokenizer, prompt, use_chat), "prompt_tokens": prompt_tokens,
            "truncated": truncated}


__all__ = [
    "ENGLISH_DATASETS", "CHINESE_DATASETS", "LONGBENCH_E_DATASETS", "ALL_DATASETS", "GROUPS", "NO_CHAT_TEMPLATE",
    "PROMPTS", "MAX_NEW_TOKENS", "cache_data_dir", "default_data_dir", "file_name", "check_dataset", "datasets_in_folder",
    "read_jsonl", "load_samples", "build_prompt", "middle_cut", "truncate_prompt", "uses_chat_template",
    "encode_input", "chat_overhead", "build_input",
]
