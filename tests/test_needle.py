"""Needle-in-a-Haystack: haystack building, prompts, scoring, the runner (resume, bad flags) and the heatmaps."""

from __future__ import annotations

import json

import pytest

import run_needle_in_haystack as runner
import visualize_needle_in_haystack as viz
from data.haystack import (
    KEY_PHRASE, NEEDLE, Haystack, after_question, build_prompt, make_sample, read_essays, resolve_prompt_style,
    score_answer, unwrap_lines,
)
from utils.models import tiny_model, tiny_tokenizer

SENTENCES = [f"Sentence number {i} talks about startups and {'wealth ' * (i % 5)}essays." for i in range(400)]


def write_essays(folder, per_file=100):
    """Hard-wrapped essays (a line break every few words, like the Paul Graham files)."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(0, len(SENTENCES), per_file):
        words = " ".join(SENTENCES[n:n + per_file]).split(" ")
        lines = [" ".join(words[i:i + 7]) for i in range(0, len(words), 7)]
        (folder / f"essay{n // per_file}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()  # no chat template


@pytest.fixture(scope="module")
def essays_dir(tmp_path_factory):
    return write_essays(tmp_path_factory.mktemp("essays"))


@pytest.fixture(scope="module")
def haystack(tokenizer, essays_dir):
    return Haystack(read_essays(essays_dir), tokenizer)


# ---- haystack -------------------------------------------------------------------------------------------

def test_unwrap_lines_joins_hard_wraps_and_keeps_paragraphs():
    assert unwrap_lines("one line\nwrapped here.\n\nNew  paragraph\nends.\n") == \
        "one line wrapped here.\n\nNew paragraph ends."


def test_read_essays_sorted_unwrapped_and_separated(tmp_path):
    (tmp_path / "b.txt").write_text("second\nessay.", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first\nessay.", encoding="utf-8")
    assert read_essays(tmp_path) == "first essay.\n\nsecond essay."
    with pytest.raises(FileNotFoundError, match="--haystack-dir"):
        read_essays(tmp_path / "missing")


@pytest.mark.parametrize("depth", [0, 10, 50, 90, 100])
def test_needle_inserted_once_at_sentence_boundary_at_depth(haystack, tokenizer, depth):
    num_tokens = 600
    context, before = haystack.context(num_tokens, depth)
    assert context.count(NEEDLE) == 1
    head, tail = context.split(NEEDLE)
    # the needle follows a sentence end (at 100% it simply ends the haystack, as in the original test)
    if depth < 100:
        assert head.rstrip() == "" or head.rstrip().endswith(".")
    # the haystack around the needle is the first num_tokens tokens
    assert head.endswith("\n") or head == ""
    haystack_text = head.rstrip() + (" " if head.strip() and tail.strip() else "") + tail.lstrip()
    assert len(tokenizer(haystack_text, add_special_tokens=False)["input_ids"]) == pytest.approx(num_tokens, abs=3)
    # depth: the needle sits at most one sentence before the requested position
    longest_sentence = max(len(tokenizer(" " + s, add_special_tokens=False)["input_ids"]) for s in SENTENCES)
    target = num_tokens * depth / 100
    assert target - longest_sentence <= before <= target
    assert len(tokenizer(head.rstrip(), add_special_tokens=False)["input_ids"]) == pytest.approx(before, abs=2)
    if depth == 0:
        assert context.startswith(NEEDLE)
    if depth == 100:
        assert context.endswith(NEEDLE)


def test_haystack_repeats_for_long_contexts(tokenizer):
    small = Haystack("A short essay. It has two sentences.", tokenizer)
    context, _ = small.context(200, 50)
    assert context.count(NEEDLE) == 1 and context.count("A short essay.") > 5


@pytest.mark.parametrize("length", [256, 1000])
def test_sample_fits_length_and_depth(haystack, length):
    sample = make_sample(haystack, length, 50, style="completion")
    assert length - 8 <= len(sample.input_ids) <= length
    assert 50 - 100 * 60 / sample.haystack_tokens <= sample.needle_depth <= 50
    with pytest.raises(ValueError, match="too short"):
        make_sample(haystack, 40, 50, style="completion")


# ---- prompts --------------------------------------------------------------------------------------------

def test_completion_and_paper_prompts_without_chat_template(tokenizer):
    assert resolve_prompt_style(tokenizer, "auto") == "completion"
    prompt = build_prompt("BOOK TEXT", tokenizer)
    assert prompt.startswith("This is a very long story book: <book> BOOK TEXT </book>.")
    assert prompt.endswith("Question: The best thing to do in San Francisco is:\nAnswer:")
    assert "<|im_start|>" not in prompt
    assert build_prompt("BOOK TEXT", tokenizer, "paper").startswith("<|im_start|> This is a very long story book")
    with pytest.raises(ValueError, match="no chat template"):
        build_prompt("BOOK TEXT", tokenizer, "chat")


def test_chat_prompt_puts_book_and_question_in_user_turn(tokenizer):
    chat_tok = tiny_tokenizer(chat_template=True)
    assert resolve_prompt_style(chat_tok, "auto") == "chat"
    prompt = build_prompt("BOOK TEXT", chat_tok)
    assert prompt.startswith("<s>user\nThis is a very long story book: <book> BOOK TEXT </book>.")
    assert prompt.endswith("The best thing to do in San Francisco is:</s>\n<s>assistant\n")
    assert "<|im_start|>" not in prompt


# ---- scoring --------------------------------------------------------------------------------------------

def test_rouge_scores_on_known_strings():
    full = {"score": 100.0, "rougeL": 100.0, "score_full_needle": 100.0, "exact_match": True}
    assert score_answer(NEEDLE) == full
    # a base model completes the question, a chat model restates it: same content, same score
    completion = score_answer("eat a sandwich and sit in Dolores Park on a sunny day.")
    assert completion["score"] == 100.0 and completion["exact_match"]
    # the authors' number: raw answer vs whole needle, 12 of 21 needle words: F = 24/33
    assert completion["score_full_needle"] == pytest.approx(100 * 24 / 33)
    assert after_question("The best thing to do in San Francisco is: to nap.") == "to nap"
    # 8 of the 12 words after the question: P = 1, R = 8/12, F = 16/20
    partial = score_answer("The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park!")
    assert partial["score"] == pytest.approx(100 * 16 / 20) and partial["exact_match"]
    # restating the question is worth nothing in `score` (in the authors' number: 9 of 13 and of 21 words, 18/34)
    restated = score_answer("The best thing to do in San Francisco is: go to the bridge")
    assert restated["score"] == 0.0 and restated["score_full_needle"] == pytest.approx(100 * 18 / 34)
    assert not restated["exact_match"]
    assert score_answer("   ") == {"score": 0.0, "rougeL": 0.0, "score_full_needle": 0.0, "exact_match": False}
    assert score_answer("eats sandwiches")["score"] == pytest.approx(100 * 4 / 14)  # stemmed, as theirs
    assert not score_answer("eat a sandwich and sit in the park")["exact_match"]
    assert KEY_PHRASE.lower() in NEEDLE.lower()


def test_stop_at_newline_only_after_the_answer_starts(tokenizer):
    def stops(text):
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return bool(runner.StopAtNewline(tokenizer, 0)(ids, None)[0])
    assert not stops("\nThe best thing")
    assert stops("The best thing.\nMore")


# ---- runner ---------------------------------------------------------------------------------------------

def test_plan_lengths():
    args = runner.parse_args([])
    assert runner.plan_lengths(args, 8192) == [1024, 2048, 4096, 8192]
    args = runner.parse_args(["--min-length", "1K", "--max-length", "4K", "--num-lengths", "3"])
    assert runner.plan_lengths(args, 8192) == [1024, 2048, 4096]
    args = runner.parse_args(["--lengths", "2K,1K", "3000"])
    assert runner.plan_lengths(args, 8192) == [1024, 2048, 3000]
    with pytest.raises(ValueError, match="exceeds the model's maximum"):
        runner.plan_lengths(runner.parse_args(["--lengths", "16K"]), 8192)
    assert runner.parse_args([]).depths == [float(d) for d in range(0, 101, 10)]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama").eval(), tiny_tokenizer()


def tiny_args(tmp_path, essays_dir, *extra):
    return runner.parse_args(["--lengths", "400", "800", "--depths", "0", "100", "--haystack-dir", str(essays_dir),
                              "--output-dir", str(tmp_path), "--max-new-tokens", "4", "--prompt-style",
                              "completion", *extra])


def test_run_writes_records_and_resumes(tmp_path, essays_dir, haystack, tiny, monkeypatch):
    from utils.patch import patch_model

    model, tok = tiny
    args = tiny_args(tmp_path, essays_dir, "--methods", "dense", "dhsa", "--densities", "0.5")
    summaries = runner.run(model, tok, args, model_name="tiny-llama")
    assert [s["name"] for s in summaries] == ["dense", "dhsa_0.5"]
    path = tmp_path / "tiny-llama" / "dhsa_0.5.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted((r["length"], r["depth"]) for r in records) == [(400, 0.0), (400, 100.0), (800, 0.0), (800, 100.0)]
    patch_model(model, method="dhsa", density=0.5)  # as the runner left it; each record is redone by hand
    for r in records:
        assert r["method"] == "dhsa" and r["density"] == 0.5 and r["decode"] == "dense"
        sample = make_sample(haystack, r["length"], r["depth"], "completion")
        assert r["prompt_tokens"] == len(sample.input_ids) <= r["length"]
        assert r["needle_depth"] == round(sample.needle_depth, 2) and r["haystack_tokens"] == sample.haystack_tokens
        assert r["budget"] == -(-r["prompt_tokens"] // 2) and r["seconds"] > 0
        assert r["answer"] == runner.generate_answer(model, tok, sample.input_ids, 4)
        scores = score_answer(r["answer"])
        assert (r["score"], r["rougeL"], r["exact_match"]) == (round(scores["score"], 2), round(scores["rougeL"], 2),
                                                              scores["exact_match"])
    dense = [json.loads(line) for line in (tmp_path / "tiny-llama" / "dense.jsonl").read_text().splitlines()]
    assert all(r["density"] == 1.0 and r["budget"] == r["prompt_tokens"] for r in dense)

    # an interrupted run: one finished record and a half-written line; the rerun does only the missing three
    path.write_text(path.read_text().splitlines()[0] + "\n" + '{"method": "dhs', encoding="utf-8")
    calls = []
    real = runner.generate_answer
    monkeypatch.setattr(runner, "generate_answer", lambda *a, **k: calls.append(1) or real(*a, **k))
    summaries = runner.run(model, tok, args, model_name="tiny-llama")
    assert len(calls) == 3
    assert all(len(s["records"]) == 4 for s in summaries)
    resumed = [json.loads(line) for line in path.read_text().splitlines()]  # the file, not just memory: whole lines
    assert sorted((r["length"], r["depth"]) for r in resumed) == sorted((r["length"], r["depth"]) for r in records)
    assert {(r["length"], r["depth"]): r["answer"] for r in resumed} == \
        {(r["length"], r["depth"]): r["answer"] for r in records}
    table = runner.score_table(summaries[1]["records"])
    assert "400" in table and "100%" in table and "avg" in table
    assert runner.summary_line(summaries[1]).startswith("dhsa_0.5: average score")

    # the same file with other options is refused instead of mixed
    other = tiny_args(tmp_path, essays_dir, "--method", "dhsa", "--density", "0.5", "--chunk-size", "4")
    with pytest.raises(SystemExit, match="other config"):
        runner.run(model, tok, other, model_name="tiny-llama")


@pytest.mark.parametrize("flags, message", [
    (["--method", "no_such_method"], "unknown method 'no_such_method'"),
    (["--methods", "dense", "nope"], "unknown method 'nope'"),
    (["--density", "1.5"], "density must be in (0, 1]"),
    (["--depths", "0", "120"], "outside 0..100"),
    (["--haystack-dir", "/no/such/folder"], "--haystack-dir"),
    (["--methods", "dense", "dhsa", "--output", "one.jsonl"], "--output-dir"),
])
def test_bad_flags_give_one_line_errors(flags, message, essays_dir, monkeypatch):
    monkeypatch.setattr("utils.models.load_model", lambda *a, **k: pytest.fail("model loaded before flag checks"))
    extra = [] if "--haystack-dir" in flags else ["--haystack-dir", str(essays_dir)]
    with pytest.raises(SystemExit) as err:
        runner.main(flags + extra)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_length_beyond_model_max_is_a_one_line_error(essays_dir, tiny, monkeypatch):
    from utils.models import model_max_length

    model, tok = tiny
    monkeypatch.setattr("utils.models.load_model", lambda *a, **k: (model, tok))
    too_long = model_max_length(model) + 1
    with pytest.raises(SystemExit) as err:
        runner.main(["--lengths", str(too_long), "--haystack-dir", str(essays_dir)])
    assert "exceeds the model's maximum" in str(err.value) and "\n" not in str(err.value)


# ---- heatmaps -------------------------------------------------------------------------------------------

def write_run(path, method, density, scores):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for (length, depth), score in scores.items():
            f.write(json.dumps({"model": "m", "method": method, "density": density, "length": length,
                                "depth": depth, "score": score, "exact_match": score > 50}) + "\n")


def heatmap_colours(png) -> set[str]:
    """Which ends of the score scale ("red": 0, "green": 100) fill at least 2% of a PNG's pixels."""
    import matplotlib.image
    import numpy as np

    pixels = matplotlib.image.imread(png)[..., :3].reshape(-1, 3)
    found = set()
    for name, score in (("red", 0.0), ("green", 1.0)):
        colour = np.array(viz.CMAP(score)[:3])
        if (np.abs(pixels - colour).max(-1) < 0.02).mean() > 0.02:
            found.add(name)
    return found


def test_heatmaps_written(tmp_path):
    scores = {(n, d): (100.0 if d < 50 else 0.0) for n in (1024, 2048, 4096) for d in (0.0, 50.0, 100.0)}
    write_run(tmp_path / "m" / "dense.jsonl", "dense", 1.0, {k: 100.0 for k in scores})
    write_run(tmp_path / "m" / "dhsa_0.0625.jsonl", "dhsa", 0.0625, scores)
    frame = viz.load_run(tmp_path / "m" / "dhsa_0.0625.jsonl")
    grid = viz.score_grid(frame)
    assert list(grid.columns) == [1024, 2048, 4096] and list(grid.index) == [0.0, 50.0, 100.0]
    assert grid.loc[0.0, 2048] == 100.0 and grid.loc[100.0, 4096] == 0.0

    viz.main([str(tmp_path)])
    # cells are drawn in the scale's colours: score 100 green, score 0 red (a run cut off mid-line still draws)
    with open(tmp_path / "m" / "dhsa_0.0625.jsonl", "a") as f:
        f.write('{"model": "m", "method": "dhsa", "den')
    viz.main([str(tmp_path)])
    for name, colours in (("dense.png", {"green"}), ("dhsa_0.0625.png", {"green", "red"}),
                          ("compare_0.0625.png", {"green", "red"})):
        assert heatmap_colours(tmp_path / "m" / name) == colours, name
    out = viz.plot_side_by_side([tmp_path / "m" / "dense.jsonl", tmp_path / "m" / "dhsa_0.0625.jsonl"],
                                tmp_path / "side.png")
    assert heatmap_colours(out) == {"green", "red"}

    fig, ax = viz.plt.subplots()
    assert viz.draw_heatmap(ax, frame, "dhsa") == pytest.approx(100 / 3)
    assert ax.get_title() == "dhsa\naverage score 33.3"
    viz.plt.close(fig)

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no .jsonl results"):
        viz.main([str(tmp_path / "empty")])
