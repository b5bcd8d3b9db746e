"""Training text for the boundary predictor: documents -> token samples -> held-out split -> label cache.

Documents come from folders (offline: `*.txt` files are one document each; `*.jsonl` lines are one document
each, text from "context" (LongBench format, "NEWLINE_CHAR" turned back into newlines), else "text", else
"input") or, with a network, from the paper's sets through `datasets` (`HF_SOURCES`).
Each document is tokenised and cut into consecutive pieces of at most `max_length` tokens (BOS first, if the
tokenizer has one); pieces shorter than `min_length` are dropped. The held-out split is by document: a
document is validation when a hash of (seed, document id) falls below `val_fraction`.

Label cache: one file per sample, `<cache_dir>/<model>_len<max_length>_w<w>_eps<eps>_v<LABEL_VERSION>/<hash of
sample key>.pt` (bump LABEL_VERSION when the label definition changes)
with {"key", "doc_id", "input_ids" (int32 [L]), "layers", "ratios" (fp32 [n_layers, L], NaN = undefined)}.
Files are written atomically, so an interrupted labelling run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

LABEL_VERSION = 1


@dataclass
class Document:
    doc_id: str
    text: str


@dataclass
class Sample:
    key: str          # "<doc_id>#<piece>"
    doc_id: str
    input_ids: list[int]


# name -> (dataset path, config name, data_files, function(row) -> text). The paper's training sets (App. B.4),
# with the fields the authors read; needs a network and `datasets`.
def _join(value) -> str:
    return "\n\n".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


HF_SOURCES = {
    "booksum": ("togethercomputer/Long-Data-Collections", None, "fine-tune/booksum.jsonl.zst",
                lambda r: r["prompt"] + r["completion"]),
    "natural_questions": ("togethercomputer/Long-Data-Collections", None,
                          "fine-tune/natural_questions_10_200_docs.jsonl.zst", lambda r: r["prompt"] + r["completion"]),
    "triviaqa": ("mandarjoshi/trivia_qa", "rc", None,
                 lambda r: _join(r["search_results"]["search_context"]) + "\n\n" + r["question"]),
    "chatqa2": ("nvidia/ChatQA2-Long-SFT-data", "long_sft", None, lambda r: _join(r["question"])),
}


def _jsonl_text(row: dict) -> str | None:
    if "context" in row:
        text = row["context"]
        return text.replace("NEWLINE_CHAR", "\n") if "dataset" in row else text
    for field in ("text", "input"):
        if isinstance(row.get(field), str):
            return row[field]
    return None


def folder_documents(folder: str | Path) -> list[Document]:
    """All documents of a folder (recursive, sorted by path). Raises SystemExit if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"--data-dir {folder}: no such folder (a folder of .txt / .jsonl documents; see "
                         "boundary_predictor/README.md for the essays and LongBench files)")
    docs = []
    for path in sorted(folder.rglob("*")):
        rel = f"{folder.name}/{path.relative_to(folder).as_posix()}"
        if path.suffix == ".txt":
            docs.append(Document(rel, path.read_text(encoding="utf-8", errors="replace")))
        elif path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f):
                    if line.strip():
                        text = _jsonl_text(json.loads(line))
                        if text:
                            docs.append(Document(f"{rel}:{n}", text))
    if not docs:
        raise SystemExit(f"--data-dir {folder}: no .txt or .jsonl documents found")
    return docs


def hf_documents(name: str, max_docs: int) -> list[Document]:
    """The first `max_docs` documents of one of the paper's sets (HF_SOURCES), streamed with `datasets`."""
    if name not in HF_SOURCES:
        raise SystemExit(f"--hf-dataset {name!r}: unknown; choose from {', '.join(HF_SOURCES)}")
    import datasets

    path, config, files, to_text = HF_SOURCES[name]
    try:
        rows = datasets.load_dataset(path, config, data_files=files, split="train", streaming=True)
        docs = []
        for n, row in enumerate(rows):
            if n >= max_docs:
                break
            docs.append(Document(f"{name}:{n}", to_text(row)))
    except Exception as err:  # network / hub errors: one line, with the way out
        raise SystemExit(f"--hf-dataset {name}: could not load {path} ({type(err).__name__}: {err}); "
                         "use --data-dir with local text instead") from None
    return docs


def make_samples(docs: Iterable[Document], tokenizer, max_length: int, min_length: int = 512,
                 pieces_per_doc: int | None = None) -> list[Sample]:
    """Tokenise documents into samples of at most max_length tokens (see module docstring)."""
    if max_length < 2 or min_length > max_length:
        raise SystemExit(f"need 2 <= --min-length <= --max-length, got {min_length} and {max_length}")
    bos = getattr(tokenizer, "bos_token_id", None)
    body = max_length - (bos is not None)
    samples = []
    for doc in docs:
        ids = tokenizer(doc.text, add_special_tokens=False, verbose=False)["input_ids"]  # no "too long" warning
        for piece, start in enumerate(range(0, len(ids), body)):
            if pieces_per_doc is not None and piece >= pieces_per_doc:
                break
            chunk = ([bos] if bos is not None else []) + list(ids[start:start + body])
            if len(chunk) >= min_length:
                samples.append(Sample(f"{doc.doc_id}#{piece}", doc.doc_id, chunk))
    return samples


def is_validation(doc_id: str, val_fraction: float, seed: int) -> bool:
    digest = hashlib.sha1(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def split_samples(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, validation), split by document. With >= 2 documents each side gets at least one."""
    if not 0 <= val_fraction < 1:
        raise SystemExit(f"--val-fraction must be in [0, 1), got {val_fraction}")
    val = [s for s in samples if is_validation(s.doc_id, val_fraction, seed)]
    train = [s for s in samples if not is_validation(s.doc_id, val_fraction, seed)]
    doc_ids = sorted({s.doc_id for s in samples})
    if val_fraction > 0 and len(doc_ids) >= 2 and (not val or not train):
        # tiny corpora: move one whole document across so both sides exist
        pick = min(doc_ids, key=lambda d: hashlib.sha1(f"{seed}:{d}".encode()).digest())
        val = [s for s in samples if s.doc_id == pick] if not val else [s for s in samples if s.doc_id != pick]
        train = [s for s in samples if s not in val]
    return train, val


class LabelCache:
    """One labels file per sample (see module docstring)."""

    def __init__(self, cache_dir: str | Path, model_name: str, max_length: int, window: int, eps: float):
        from .inference import model_key

        self.dir = Path(cache_dir) / f"{model_key(model_name)}_len{max_length}_w{window}_eps{eps:g}_v{LABEL_VERSION}"

    def path(self, key: str) -> Path:
        return self.dir / f"{hashlib.sha1(key.encode()).hexdigest()[:24]}.pt"

    def has(self, sample: Sample, layers: list[int]) -> bool:
        path = self.path(sample.key)
        if not path.is_file():
            return False
        entry = self.load(sample)
        return entry is not None and entry["layers"] == list(layers)

    def save(self, sample: Sample, layers: list[int], ratios: torch.Tensor, seconds: float) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        entry = {"key": sample.key, "doc_id": sample.doc_id,
                 "input_ids": torch.tensor(sample.input_ids, dtype=torch.int32),
                 "layers": list(layers), "ratios": ratios.detach().float().cpu(), "seconds": float(seconds)}
        path = self.path(sample.key)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(entry, tmp)
        tmp.replace(path)

    def load(self, sample: Sample) -> dict | None:
        """The cached entry of a sample, or None if missing or stale (other tokens than the sample's)."""
        path = self.path(sample.key)
        if not path.is_file():
            return None
        entry = torch.load(path, map_location="cpu", weights_only=True)
        if entry["key"] != sample.key or entry["input_ids"].tolist() != list(sample.input_ids):
            return None
        return entry

    def entries(self, samples: list[Sample]) -> Iterator[tuple[Sample, dict]]:
        for sample in samples:
            entry = self.load(sample)
            if entry is not None:
                yield sample, entry


__all__ = ["Document", "Sample", "HF_SOURCES", "folder_documents", "hf_documents", "make_samples",
           "split_samples", "is_validation", "LabelCache"]


def key_cache_path(folder, input_ids: torch.Tensor, layers: list[int]) -> Path:
    """Where training keeps the captured keys of one sample (train.py --key-cache): named by its token ids and
    layers."""
    digest = hashlib.sha1(input_ids.cpu().numpy().tobytes() + json.dumps(list(layers)).encode()).hexdigest()[:20]
    return Path(folder) / f"{digest}.pt"


def save_keys(path: Path, keys: dict) -> None:
    """{layer: keys} to `path`, written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({int(k): v.cpu() for k, v in keys.items()}, tmp)
    tmp.replace(path)
