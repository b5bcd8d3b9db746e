"""LongBench's official metrics (THUDM/LongBench v1 `metrics.py` and the scoring of `eval.py`): one sample's score,
a dataset's score, and LongBench-E's scores per input-length bucket.

    dataset_score("hotpotqa", [{"pred": "Paris", "answers": ["Paris"]}])   # -> 100.0

The metrics reproduce LongBench with the libraries it uses: `rouge` (not `rouge-score`) for ROUGE-L, `jieba` for
Chinese words, and `fuzzywuzzy`'s `fuzz.ratio` for code, which in LongBench's environment (no python-Levenshtein)
is `difflib.SequenceMatcher`; quirks that change scores are kept on purpose and marked. Read by eval_longbench.py;
the prompts and data are in data/longbench.py.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_EN_PUNCTUATION = set(string.punctuation)
_ZH_PUNCTUATION = _EN_PUNCTUATION | set(
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.")


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, drop ASCII punctuation, then the articles a/an/the, then
    collapse whitespace (punctuation goes first, so "the-end" loses its hyphen and keeps "theend")."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Lower case, drop ASCII and Chinese punctuation, drop all whitespace."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ZH_PUNCTUATION).split())


def token_f1(prediction: list[str], reference: list[str]) -> float:
    """F1 of the multiset overlap of two token lists (0 when nothing overlaps)."""
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0
    precision, recall = same / len(prediction), same / len(reference)
    return (2 * precision * recall) / (precision + recall)


def qa_f1_score(prediction: str, reference: str, **_) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def _jieba_words(text: str) -> list[str]:
    import jieba  # imported late: it builds its dictionary (about a second) on first use
    return list(jieba.cut(text, cut_all=False))


def qa_f1_zh_score(prediction: str, reference: str, **_) -> float:
    """F1 over jieba words, each normalised, empty ones dropped."""
    def words(text):
        return [w for w in map(normalize_zh_answer, _jieba_words(text)) if w]
    return token_f1(words(prediction), words(reference))


_ROUGE = None


def rouge_score(prediction: str, reference: str, **_) -> float:
    """ROUGE-L F of the `rouge` package (sentences split at '.', union LCS). LongBench scores 0 whenever the
    package raises (empty text, or recursion too deep on a very long sentence), for any of its metrics, so
    all three are computed as there."""
    global _ROUGE
    if _ROUGE is None:
        from rouge import Rouge
        _ROUGE = Rouge()
    try:
        return _ROUGE.get_scores([prediction], [reference], avg=True)["rouge-l"]["f"]
    except Exception:  # as LongBench: a bare except scores 0
        return 0.0


def rouge_zh_score(prediction: str, reference: str, **_) -> float:
    return rouge_score(" ".join(_jieba_words(prediction)), " ".join(_jieba_words(reference)))


def classification_score(prediction: str, reference: str, *, all_classes: list[str], **_) -> float:
    """1 / (number of class names found in the prediction) if the right class is among them, else 0.

    Class names that are substrings of the reference (but not the reference) are dropped first. LongBench
    drops them while iterating over the same list, so the name right after a dropped one is never checked;
    kept for identical scores. (LongBench's fallback to the most similar class is unreachable: its guard
    compares a list with 0, which is always unequal.)
    """
    found = [name for name in all_classes if name in prediction]
    i = 0
    while i < len(found):
        if found[i] in reference and found[i] != reference:
            found.remove(found[i])  # the list shifts left while i still advances: the next name is skipped
        i += 1
    return 1.0 / len(found) if reference in found else 0.0


def _share_equal(prediction: str, wanted: str) -> float:
    """Share of the numbers in the prediction that equal `wanted` (0 when it has none)."""
    numbers = re.findall(r"\d+", prediction)
    return float(0.0 if not numbers else sum(n == str(wanted) for n in numbers) / len(numbers))


def count_score(prediction: str, reference: str, **_) -> float:
    return _share_equal(prediction, reference)


def retrieval_score(prediction: str, reference: str, **_) -> float:
    """Reference "Paragraph 12": the share of numbers in the prediction that are 12."""
    return _share_equal(prediction, re.findall(r"Paragraph (\d+)", reference)[0])


def retrieval_zh_score(prediction: str, reference: str, **_) -> float:
    return _share_equal(prediction, re.findall(r"段落(\d+)", reference)[0])


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy 0.18 `fuzz.ratio` without python-Levenshtein (LongBench's requirements): 100 for equal
    strings, 0 if one is empty, else round(100 * difflib ratio)."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim_score(prediction: str, reference: str, **_) -> float:
    """Edit similarity of the first generated line that is code: lines with ` (markdown), # or // are
    skipped as comments or fences."""
    line = next((ln for ln in prediction.lstrip("\n").split("\n")
                 if "`" not in ln and "#" not in ln and "//" not in ln), "")
    return fuzz_ratio(line, reference) / 100


DATASET_METRIC = {
    "narrativeqa": qa_f1_score, "qasper": qa_f1_score, "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score, "hotpotqa": qa_f1_score, "2wikimqa": qa_f1_score, "musique": qa_f1_score,
    "dureader": rouge_zh_score, "gov_report": rouge_score, "qmsum": rouge_score, "multi_news": rouge_score,
    "vcsum": rouge_zh_score, "trec": classification_score, "triviaqa": qa_f1_score, "samsum": rouge_score,
    "lsht": classification_score, "passage_retrieval_en": retrieval_score, "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score, "lcc": code_sim_score, "repobench-p": code_sim_score,
}
# Few-shot answers: only the first line counts (models tend to continue with the next example).
FIRST_LINE_ONLY = {"trec", "triviaqa", "samsum", "lsht"}
LENGTH_BUCKETS = ("0-4k", "4-8k", "8k+")


def sample_score(dataset: str, prediction: str, answers: list[str], all_classes=None) -> float:
    """One sample's score in [0, 1]: the best over its reference answers."""
    if dataset not in DATASET_METRIC:
        raise ValueError(f"no LongBench metric for {dataset!r}; known: {', '.join(DATASET_METRIC)}")
    if dataset in FIRST_LINE_ONLY:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = DATASET_METRIC[dataset]
    score = 0.0
    for answer in answers:
        score = max(score, metric(prediction, answer, all_classes=all_classes))
    return score


def _scores(dataset: str, records: list[dict]) -> list[float]:
    # LongBench's eval.py uses the all_classes of the file's last record for every record (it is the same
    # for all records of a dataset).
    all_classes = records[-1].get("all_classes") if records else None
    return [sample_score(dataset, r["pred"], r["answers"], all_classes) for r in records]


def dataset_score(dataset: str, records: list[dict]) -> float:
    """LongBench score of one dataset: 100 x mean sample score, rounded to 2 decimals."""
    if not records:
        raise ValueError(f"no predictions for {dataset}")
    total = 0.0
    for score in _scores(dataset, records):  # summed in order, as LongBench does, for identical rounding
        total += score
    return round(100 * total / len(records), 2)


def length_bucket(length: int) -> str:
    return "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"


def dataset_score_by_length(dataset: str, records: list[dict]) -> dict[str, float | None]:
    """LongBench-E: the score per input-length bucket (LongBench's `length` field, in words); None where a
    bucket has no sample (LongBench writes NaN)."""
    per_bucket: dict[str, list[float]] = {b: [] for b in LENGTH_BUCKETS}
    for record, score in zip(records, _scores(dataset, records)):
        per_bucket[length_bucket(record["length"])].append(score)
    # numpy's round, as LongBench rounds a numpy float here (it can differ from Python's: 0.025 -> 0.02)
    return {b: (float(round(100 * np.mean(s), 2)) if s else None) for b, s in per_bucket.items()}
