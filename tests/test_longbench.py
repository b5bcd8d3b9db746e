"""LongBench: metrics against values computed with LongBench's official metrics.py, prompt building,
middle truncation, resume, and the run -> eval pipeline on a tiny random model (CPU, no network)."""

import json
from pathlib import Path

import pytest

import eval_longbench as ev
import run_longbench as rl
from data import longbench as lb
from data import longbench_metrics as lm
from utils import models
from utils.bench import longbench_plots, longbench_tables
from utils.patch import patch_model

# Test fixture only (the product never reads it): LongBench's multi_news etc. in ../shared beside the repository.
SHARED_LONGBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "LongBench"

# (metric, prediction, reference, all_classes, score from THUDM/LongBench metrics.py with rouge 1.0.1,
#  fuzzywuzzy 0.18.0 (no python-Levenshtein) and jieba 0.42.1)
OFFICIAL = [
    ("qa_f1_score", "The Eiffel Tower!", "eiffel tower", None, 1.0),
    ("qa_f1_score", "an apple a day", "the apple", None, 0.6666666666666666),
    ("qa_f1_score", "the-end", "theend", None, 1.0),      # punctuation goes before articles
    ("qa_f1_score", "the-end", "end", None, 0),
    ("qa_f1_score", "U.S.A. and the U.K.", "USA", None, 0.5),
    ("qa_f1_score", "Paris, France", "paris", None, 0.6666666666666666),
    ("qa_f1_score", "a", "the", None, 0),                  # both normalise to nothing
    ("qa_f1_score", "cats cats dogs", "cats dogs dogs birds", None, 0.5714285714285715),
    ("qa_f1_zh_score", "中国的首都是北京。", "北京是中国的首都", None, 1.0),
    ("qa_f1_zh_score", "北京，", "北京", None, 1.0),
    ("qa_f1_zh_score", "“北京”", "上海", None, 0),
    ("rouge_score", "the cat sat on the mat.", "the cat sat.", None, 0.7499999953125),
    ("rouge_score", "a b c. d e", "a b. c d e", None, 0.999999995),
    ("rouge_score", "", "a b", None, 0.0),
    ("rouge_score", ".", "a b", None, 0.0),
    ("rouge_score", "police arrested protesters at city hall",
     "protesters were arrested by police at city hall on sunday", None, 0.49999999531250006),
    ("rouge_zh_score", "会议讨论了预算。", "会议讨论了预算和人员安排。", None, 0.7692307644970415),
    ("classification_score", "Type: Animal", "Animal", ["Animal", "Color", "City", "Other location"], 1.0),
    ("classification_score", "City or Other location", "Other location",
     ["Animal", "Color", "City", "Other location"], 0.5),
    ("classification_score", "Color", "Animal", ["Animal", "Color", "City", "Other location"], 0.0),
    ("classification_score", "abc", "abc", ["a", "ab", "abc"], 0.5),   # LongBench's remove-while-iterating
    ("classification_score", "nothing", "Animal", ["Animal", "Color"], 0.0),
    ("retrieval_score", "Paragraph 12", "Paragraph 12", None, 1.0),
    ("retrieval_score", "Paragraph 3 or Paragraph 12", "Paragraph 12", None, 0.5),
    ("retrieval_score", "[Passage 3]", "Paragraph 3", None, 1.0),
    ("retrieval_score", "I don't know", "Paragraph 3", None, 0.0),
    ("retrieval_zh_score", "答案是段落5和段落6", "段落5", None, 0.5),
    ("count_score", "12, 13, 12", "12", None, 0.6666666666666666),
    ("count_score", "012", "12", None, 0.0),
    ("code_sim_score", "```python\n    return a + b\n```", "    return a + b", None, 1.0),
    ("code_sim_score", "# add\n    return a+b", "    return a + b", None, 0.93),
    ("code_sim_score", "// c\nint a = 0;", "int a = 1;", None, 0.9),
    ("code_sim_score", "\n\nfoo(bar)\nbaz()", "foo(baz)", None, 0.88),
    ("code_sim_score", "", "x = 1", None, 0.0),
    ("code_sim_score", "print(x) # done", "print(x)", None, 0.0),  # every line is a comment: empty prediction
]


@pytest.mark.parametrize("metric,prediction,reference,classes,expected", OFFICIAL)
def test_metrics_match_official_values(metric, prediction, reference, classes, expected):
    assert getattr(lm, metric)(prediction, reference, all_classes=classes) == expected


def test_normalisation_edge_cases():
    assert lm.normalize_answer("  The  Cat, an Owl & a DOG! ") == "cat owl dog"
    assert lm.normalize_answer("theatre another") == "theatre another"  # only whole-word articles
    assert lm.normalize_zh_answer("“北京”， 是 首都！") == "北京是首都"
    assert lm.fuzz_ratio("", "") == 100 and lm.fuzz_ratio("a", "") == 0


def test_dataset_scores_first_line_and_best_answer():
    records = [{"pred": "\nAnimal\nColor", "answers": ["Animal"], "all_classes": ["Animal", "Color"], "length": 10},
               {"pred": "Color Animal", "answers": ["Animal"], "all_classes": ["Animal", "Color"], "length": 10}]
    assert lm.dataset_score("trec", records) == 75.0   # first line only on trec: 1 and 1/2
    assert lm.dataset_score("lcc", [{"pred": "x = 1", "answers": ["y = 2", "x = 1"], "length": 1}]) == 100.0
    assert lm.dataset_score("triviaqa", [{"pred": "Paris\nLondon", "answers": ["London"], "length": 1}]) == 0.0
    with pytest.raises(ValueError):
        lm.sample_score("not_a_dataset", "x", ["x"])


def test_longbench_e_buckets():
    records = [{"pred": "12", "answers": ["12"], "length": n} for n in (3999, 4000, 7999)]
    records.append({"pred": "1", "answers": ["12"], "length": 4500})
    assert lm.dataset_score_by_length("passage_count", records) == {"0-4k": 100.0, "4-8k": 66.67, "8k+": None}


def test_rounding_matches_official_per_scorer():
    # official eval.py: the LongBench score rounds a Python float (0.025 -> 0.03), LongBench-E a numpy float
    # (0.025 -> 0.02); one sample whose prediction holds 4000 numbers, one of them right
    records = [{"pred": "12 " + "7 " * 3999, "answers": ["12"], "length": 100}]
    assert lm.dataset_score("passage_count", records) == 0.03
    assert lm.dataset_score_by_length("passage_count", records)["0-4k"] == 0.02


def test_group_summary_uses_dataset_mean():
    # the paper's Avg is the mean of the 16 dataset scores: Llama-3.1-8B dense row of Table 2
    groups = {"Single-Doc QA": 22.0, "Multi-Doc QA": 10.5, "Summarization": 29.4, "Few-shot Learning": 68.3,
              "Synthetic": 44.0, "Code": 22.3}
    scores = {d: groups[g] for g, members in lb.GROUPS.items() for d in members if d in lb.ENGLISH_DATASETS}
    row = longbench_tables.summarize(scores, lb.ENGLISH_DATASETS)
    assert round(row["Average"], 1) == 32.7
    assert longbench_tables.summarize({"multi_news": 20.0}, lb.ENGLISH_DATASETS)["Summarization"] == 20.0
    assert longbench_tables.summarize({"multi_news": 20.0}, lb.ENGLISH_DATASETS)["Code"] is None


# ------------------------------------------------------------------------------------ prompts and data

def test_config_is_longbench_v1():
    assert len(lb.ENGLISH_DATASETS) == 16 and len(lb.ALL_DATASETS) == 21 and len(lb.LONGBENCH_E_DATASETS) == 13
    assert set(lb.PROMPTS) == set(lb.MAX_NEW_TOKENS) == set(lb.ALL_DATASETS)
    assert all("{context}" in p for p in lb.PROMPTS.values())
    assert "asconcisely" in lb.PROMPTS["narrativeqa"]  # LongBench's own typo, kept
    assert lb.PROMPTS["lcc"] == "Please complete the code given below. \n{context}Next line of code:\n"
    assert (lb.MAX_NEW_TOKENS["multi_news"], lb.MAX_NEW_TOKENS["samsum"], lb.MAX_NEW_TOKENS["hotpotqa"],
            lb.MAX_NEW_TOKENS["trec"]) == (512, 128, 32, 64)
    sample = {"context": "C {x}", "input": "Q"}
    assert lb.build_prompt("repobench-p", sample) == "Please complete the code given below. \nC {x}QNext line of code:\n"


def test_offline_default_is_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DHSA_CACHE", str(tmp_path))
    assert lb.cache_data_dir() == tmp_path / "data" / "LongBench"
    assert lb.default_data_dir() is None                 # nothing there: the Hub
    lb.cache_data_dir().mkdir(parents=True)
    assert lb.default_data_dir() is None                 # an empty folder is not data
    (lb.cache_data_dir() / "multi_news.jsonl").write_text("{}\n")
    assert lb.default_data_dir() == tmp_path / "data" / "LongBench"


def test_offline_data_slice():
    data_dir = SHARED_LONGBENCH
    if not data_dir.is_dir():
        pytest.skip("no ../shared/data/LongBench next to the repository")
    assert lb.datasets_in_folder(data_dir) == ["multi_news"]
    rows = lb.load_samples("multi_news", data_dir)
    assert {"input", "context", "answers", "length", "all_classes", "_id"} <= set(rows[0])
    with pytest.raises(FileNotFoundError):
        lb.load_samples("qasper", data_dir)
    with pytest.raises(ValueError):
        lb.load_samples("narrativeqa", data_dir, longbench_e=True)  # no LongBench-E variant


def test_middle_cut_keeps_head_and_tail():
    ids = list(range(10))
    assert lb.middle_cut(ids, 6) == ([0, 1, 2], [7, 8, 9])
    assert lb.middle_cut(ids, 7) == ([0, 1, 2], [7, 8, 9])     # int(7 / 2) each side, as LongBench
    assert lb.middle_cut(ids, 6, keep_head=1) == ([0], [5, 6, 7, 8, 9])
    assert lb.middle_cut(ids, 6, keep_head=0) == ([], [4, 5, 6, 7, 8, 9])
    assert lb.middle_cut(ids, 10) == (ids, [])
    with pytest.raises(ValueError):
        lb.middle_cut(ids, 6, keep_head=6)


def tiny_tokenizer(chat: bool = True):
    """A word-level Hugging Face tokenizer (BOS added, newline is a token) with a small chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = ["<pad>", "<s>", "</s>", "<unk>", "\n", "<user>", "<bot>"] + [f"w{i}" for i in range(40)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|[^ \n]+"), behavior="removed", invert=True)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    if chat:
        tok.chat_template = ("{{ bos_token }}{% for m in messages %}<user> {{ m['content'] }}{% endfor %}"
                             "{% if add_generation_prompt %} <bot>{% endif %}")
    return tok


def test_truncate_prompt_decodes_head_and_tail():
    tok = tiny_tokenizer()
    prompt = " ".join(f"w{i}" for i in range(20))              # 21 tokens with BOS
    text, before, cut = lb.truncate_prompt(tok, prompt, 8)
    assert (before, cut) == (21, True)
    # head: BOS w0 w1 w2, tail: w16..w19, each decoded without special tokens and joined as LongBench does
    assert text == "w0 w1 w2" + "w16 w17 w18 w19"
    assert lb.truncate_prompt(tok, prompt, 21) == (prompt, 21, False)


def test_chat_template_after_truncation_and_not_on_few_shot():
    tok = tiny_tokenizer()
    sample = {"context": " ".join(f"w{i}" for i in range(30)), "input": "w39"}
    built = lb.build_input(tok, "multi_news", sample, max_length=10)
    tokens = tok.convert_ids_to_tokens(built["input_ids"])
    assert built["truncated"] and tokens[:2] == ["<s>", "<user>"] and tokens[-1] == "<bot>"
    assert tokens.count("<s>") == 1
    few_shot = lb.build_input(tok, "triviaqa", sample, max_length=10_000)
    assert "<user>" not in tok.convert_ids_to_tokens(few_shot["input_ids"])
    assert not lb.uses_chat_template("multi_news", False, tok)
    assert not lb.uses_chat_template("multi_news", None, tiny_tokenizer(chat=False))
    with pytest.raises(ValueError):
        lb.uses_chat_template("multi_news", True, tiny_tokenizer(chat=False))
    assert lb.chat_overhead(tok, True) == 2 and lb.chat_overhead(tok, False) == 0


# ------------------------------------------------------------------------------------ run and resume

def test_finished_ids_skip_cut_last_line_and_reject_broken_files(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"_id": "a", "pred": "p"}\n{"_id": "b", "pred": "p"}\n{"_id": "c", "pr')
    assert rl.finished_ids(path) == {"a", "b"}
    path.write_text('{"_id": "a"}\nnot json\n{"_id": "c"}\n')
    with pytest.raises(ValueError, match="x.jsonl:2 is not a JSON record"):
        rl.finished_ids(path)
    path.write_text('{"_id": "a"}\n{"pred": "no id"}\n')
    with pytest.raises(ValueError, match="record 2 has no _id"):
        rl.finished_ids(path)


def test_run_names_and_caps(tmp_path):
    from utils.config import SparseAttentionConfig
    settings = {"model": "m", "attention": {"method": "dhsa", "budget": 2048}}
    budget = SparseAttentionConfig(method="dhsa", budget=2048)
    assert rl.run_dir_for(tmp_path, SparseAttentionConfig(method="dense"), {}) == tmp_path / "dense"
    assert rl.run_dir_for(tmp_path, SparseAttentionConfig(method="dhsa", density=0.0625), {}) == \
        tmp_path / "dhsa_0.0625"
    assert rl.run_dir_for(tmp_path, budget, settings) == tmp_path / "dhsa_budget2048"
    # a run folder named the older way resumes when it holds these settings, not otherwise
    rl.prepare_run_dir(tmp_path / "dhsa_b2048", settings)
    assert rl.run_dir_for(tmp_path, budget, settings) == tmp_path / "dhsa_b2048"
    assert rl.run_dir_for(tmp_path, budget, {**settings, "model": "other"}) == tmp_path / "dhsa_budget2048"
    with pytest.raises(ValueError, match=r"other settings \(model\)"):
        rl.prepare_run_dir(tmp_path / "dhsa_b2048", {**settings, "model": "other"})
    assert rl.model_folder_name("meta-llama/Llama-3.1-8B-Instruct/") == "Llama-3.1-8B-Instruct"
    assert rl.prompt_cap(None, 8192, 512, 10) == 7670 and rl.prompt_cap(4000, 8192, 512, 10) == 4000
    assert rl.prompt_cap(49152, 8192, 512, 10) == 7670


def test_samsum_stops_at_newline():
    tok, model = tiny_tokenizer(), models.tiny_model("llama")
    assert rl.stop_token_ids(model, tok, "samsum") == [2, 4]       # </s> and the newline token
    assert rl.stop_token_ids(model, tok, "multi_news") == [2]


@pytest.mark.filterwarnings("ignore:no boundary-predictor weights")
@pytest.mark.parametrize("method", ["dense", "dhsa"])
def test_predict_dataset_resumes(tmp_path, monkeypatch, method):
    tok, model = models.tiny_tokenizer(), models.tiny_model("llama")
    patch_model(model, method=method, density=0.25, query_chunk=16)
    context = "The needle hides in a haystack of essays. " * 12
    samples = [{"_id": f"s{i}", "context": context, "input": "Where is the needle?", "answers": ["haystack"],
                "length": 96, "all_classes": None, "language": "en"} for i in range(3)]
    out = tmp_path / "hotpotqa.jsonl"
    assert rl.predict_dataset(model, tok, "hotpotqa", samples[:2], out, max_length=64) == 2
    calls = []
    real = rl.greedy_generate
    monkeypatch.setattr(rl, "greedy_generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert rl.predict_dataset(model, tok, "hotpotqa", samples, out, max_length=64) == 1
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["_id"] for r in records] == ["s0", "s1", "s2"] and len(calls) == 1
    assert all(r["truncated"] and r["prompt_tokens"] > 64 and r["input_tokens"] <= 64 + 2 for r in records)
    assert records[0]["pred"] == records[2]["pred"]  # greedy: same input, same answer


@pytest.mark.filterwarnings("ignore:no boundary-predictor weights")
def test_run_then_eval_end_to_end(tmp_path, monkeypatch):
    """run_longbench.main on a 2-sample slice with a tiny DHSA-patched model, then eval_longbench.main."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    rows = [{"input": "What is cut into chunks?", "context": "A long document is cut into chunks. " * 40,
             "answers": ["A long document"], "length": 280, "dataset": "hotpotqa", "language": "en",
             "all_classes": None, "_id": f"id{i}"} for i in range(3)]
    (data_dir / "hotpotqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(models, "load_model", lambda name, **kw: (
        models.tiny_model("llama", max_position_embeddings=160), models.tiny_tokenizer(chat_template=True)))
    out = tmp_path / "results"
    args = ["--model", "org/tiny", "--data-dir", str(data_dir), "--max-samples", "2", "--output-dir", str(out),
            "--device", "cpu", "--method", "dhsa", "--density", "0.25", "--query-chunk", "32"]
    rl.main(args)
    run_dir = out / "tiny" / "dhsa_0.25"
    records = [json.loads(line) for line in (run_dir / "hotpotqa.jsonl").read_text().splitlines()]
    assert [r["_id"] for r in records] == ["id0", "id1"]
    assert all(r["truncated"] and r["input_tokens"] <= 160 - 32 for r in records)
    rl.main(args)                                                      # resume: nothing new
    assert len((run_dir / "hotpotqa.jsonl").read_text().splitlines()) == 2
    with pytest.raises(SystemExit):
        rl.main(args + ["--keep-head", "4"])                           # other settings, same folder
    with pytest.raises(SystemExit):
        rl.main(args + ["--method", "no_such_method"])

    ev.main(["--results-dir", str(out)])
    expected = lm.dataset_score("hotpotqa", records)
    assert json.loads((run_dir / "result.json").read_text()) == {"hotpotqa": expected}
    table = (out / "results.md").read_text()
    assert f"| tiny | dhsa | 0.25 | dense | {expected:.2f} | {expected:.2f} | 2 |" in table   # every run, by dataset
    assert "## Table 2" not in table                                   # no dense and no 12.5% run: no Table 2
    (row,) = list(__import__("csv").DictReader(open(out / "results.csv", encoding="utf-8")))
    assert (row["model"], row["method"], row["density"], row["decode"]) == ("tiny", "dhsa", "0.25", "dense")
    assert float(row["hotpotqa"]) == expected and row["n_hotpotqa"] == "2" and row["datasets"] == "1/21 (hotpotqa:2)"
    assert row["multifieldqa_zh"] == row["n_multifieldqa_zh"] == ""


def test_rope_scaling_reaches_the_loader_and_its_own_run_folder(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    rows = [{"input": "What is cut?", "context": "A long document is cut into chunks. " * 10, "answers": ["it"],
             "length": 70, "dataset": "hotpotqa", "language": "en", "all_classes": None, "_id": "id0"}]
    (data_dir / "hotpotqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    asked = []
    monkeypatch.setattr(models, "load_model", lambda name, **kw: asked.append(kw["rope_scaling"]) or (
        models.tiny_model("llama"), models.tiny_tokenizer(chat_template=True)))
    out = tmp_path / "results"
    args = ["--model", "org/tiny", "--data-dir", str(data_dir), "--output-dir", str(out), "--device", "cpu",
            "--method", "dense"]
    rl.main(args + ["--rope-scaling", "yarn:4"])
    rl.main(args)
    assert [str(a) if a else a for a in asked] == ["yarn:4", None]
    scaled, plain = out / "tiny_yarn4" / "dense", out / "tiny" / "dense"
    assert json.loads((scaled / "run_config.json").read_text())["rope_scaling"] == "yarn:4"
    assert json.loads((plain / "run_config.json").read_text())["rope_scaling"] is None
    assert ev.describe_run(scaled)["model"] == "tiny_yarn4" and ev.describe_run(plain)["model"] == "tiny"
    assert len((scaled / "hotpotqa.jsonl").read_text().splitlines()) == 1


def test_eval_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        ev.main(["--results-dir", str(tmp_path / "missing")])
    (tmp_path / "m" / "r").mkdir(parents=True)
    (tmp_path / "m" / "r" / "qasper.jsonl").write_text('{"pred": "x"}\n')
    with pytest.raises(SystemExit, match="no 'pred'/'answers'"):
        ev.main(["--results-dir", str(tmp_path)])


def test_hub_fallback_reads_data_zip(tmp_path, monkeypatch):
    """Recent `datasets` refuse LongBench's loading script: the loader falls back to the repo's data.zip."""
    import zipfile

    import datasets
    import huggingface_hub
    row = {"input": "q", "context": "c", "answers": ["a"], "length": 3, "dataset": "qasper_e", "language": "en",
           "all_classes": None, "_id": "x"}
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("data/qasper_e.jsonl", json.dumps(row) + "\n")

    def no_scripts(*args, **kwargs):
        raise RuntimeError("Dataset scripts are no longer supported, but found LongBench.py")
    monkeypatch.setattr(datasets, "load_dataset", no_scripts)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, repo_type: str(archive))
    assert lb.load_samples("qasper", longbench_e=True) == [row]


@pytest.mark.slow
def test_real_model_on_offline_multi_news(tmp_path):
    """SmolLM2-135M-Instruct (offline default) on one real multi_news sample, dense, then scored."""
    if not SHARED_LONGBENCH.is_dir():
        pytest.skip("no ../shared/data/LongBench next to the repository")
    out = tmp_path / "results"
    rl.main(["--model", "smollm2-135m", "--method", "dense", "--datasets", "multi_news", "--max-samples", "1",
             "--max-length", "1024", "--output-dir", str(out), "--data-dir", str(SHARED_LONGBENCH)])
    record = json.loads((out / "smollm2-135m" / "dense" / "multi_news.jsonl").read_text())
    assert record["pred"].strip() and record["truncated"] and record["input_tokens"] <= 1024 + 40
    ev.main(["--results-dir", str(out)])
    assert 0 < json.loads((out / "smollm2-135m" / "dense" / "result.json").read_text())["multi_news"] <= 100


def test_longbench_e_table(tmp_path):
    run = tmp_path / "m" / "dense"
    run.mkdir(parents=True)
    lines = [{"pred": "a b c", "answers": ["a b c"], "length": n, "all_classes": None} for n in (100, 5000)]
    (run / "multi_news_e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    ev.main(["--results-dir", str(tmp_path)])
    table = (tmp_path / "results_e.md").read_text()
    assert "| m | dense | – | dense | 0-4k | – | – | 100.00 | – | – | – | 100.00 | 1/13 (multi_news:2) |" in table
    assert "| m | dense | – | dense | 8k+ | – | – | – | – | – | – | – |" in table
    assert not (tmp_path / "results.md").exists()


def test_common_samples_scores_runs_on_the_samples_they_share(tmp_path):
    import json as _json

    import eval_longbench

    def write_run(name, ids, pred):
        folder = tmp_path / "m" / name
        folder.mkdir(parents=True)
        (folder / "run_config.json").write_text(_json.dumps({"model_name": "m", "attention": {"method": name}}))
        with open(folder / "trec.jsonl", "w") as f:
            for i in ids:
                f.write(_json.dumps({"_id": i, "pred": pred, "answers": ["a"], "all_classes": ["a", "b"],
                                     "length": 10}) + "\n")

    write_run("dense", ["x", "y", "z"], "a")
    write_run("dhsa", ["x"], "b")
    eval_longbench.main(["--results-dir", str(tmp_path), "--common-samples"])
    scored = _json.loads((tmp_path / "m" / "dense" / "result_common.json").read_text())
    assert scored == {"trec": 100.0}
    assert "(trec:1)" in (tmp_path / "results_common.md").read_text()


def test_describe_run_from_folder_names_without_run_config(tmp_path):
    def described(name):
        info = ev.describe_run(tmp_path / "m" / name)
        return info["method"], info["density"], info["budget"], info["decode"]

    assert described("dense") == ("dense", None, None, "dense")
    assert described("dhsa_0.125") == ("dhsa", 0.125, None, "dense")
    assert described("dhsa_fixed_chunks_0.0625_min512") == ("dhsa_fixed_chunks", 0.0625, None, "dense")
    assert described("block_sparse_budget2048") == ("block_sparse", None, 2048, "dense")
    assert described("dhsa_b2048") == ("dhsa", None, 2048, "dense")                  # older LongBench folders
    assert described("dhsa_0.125_decode-sparse") == ("dhsa", 0.125, None, "sparse")
    assert described("my_run") == ("my_run", None, None, "dense")
    (tmp_path / "m" / "old").mkdir(parents=True)                                      # a run_config.json without decode
    (tmp_path / "m" / "old" / "run_config.json").write_text(json.dumps({"attention": {"method": "dhsa",
                                                                                      "density": 0.125}}))
    assert described("old") == ("dhsa", 0.125, None, "sparse")  # Algorithm 2 before the setting


def write_predictions(run_dir: Path, dataset: str, right: list[bool], config: dict | None = None) -> None:
    """A run folder's predictions for `dataset`: sample i right or wrong (answer "段落1" / "summary words ...")."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (run_dir / "run_config.json").write_text(json.dumps({"model_name": run_dir.parent.name,
                                                             "attention": {"decode": "dense", **config}}))
    answer = {"passage_retrieval_zh": "段落1", "multifieldqa_zh": "北京", "multi_news": "police arrested protesters"}
    wrong = {"passage_retrieval_zh": "段落2", "multifieldqa_zh": "上海", "multi_news": "sunny weather today"}
    with open(run_dir / f"{dataset}.jsonl", "w", encoding="utf-8") as f:
        for i, ok in enumerate(right):
            f.write(json.dumps({"_id": f"{dataset}{i}", "pred": (answer if ok else wrong)[dataset],
                                "answers": [answer[dataset]], "all_classes": None, "length": 100},
                               ensure_ascii=False) + "\n")


def test_tables_2_to_4_and_density_plot(tmp_path):
    """Runs over an English and two Chinese datasets land in one table: results.csv has one row per (model, method,
    density, decode) with every dataset's score and sample count; results.md renders Tables 2-4 from it; density.png
    plots the sweep."""
    import csv

    datasets = ["multi_news", "multifieldqa_zh", "passage_retrieval_zh"]
    runs = {  # folder: (config, samples right out of 4 per dataset)
        "dense": ({"method": "dense", "density": None}, 4),
        "dhsa_0.0625": ({"method": "dhsa", "density": 0.0625}, 1),
        "dhsa_0.125": ({"method": "dhsa", "density": 0.125}, 3),
        "dhsa_0.25": ({"method": "dhsa", "density": 0.25}, 4),
        "dhsa_0.125_decode-sparse": ({"method": "dhsa", "density": 0.125, "decode": "sparse"}, 2),
        "dhsa_no_robust_repr_0.125": ({"method": "dhsa_no_robust_repr", "density": 0.125}, 2),
        "dhsa_fixed_chunks_0.125": ({"method": "dhsa_fixed_chunks", "density": 0.125}, 2),
        "block_sparse_0.125": ({"method": "block_sparse", "density": 0.125}, 1),
        "streaming_0.125": ({"method": "streaming", "density": 0.125}, 0),
    }
    for name, (config, right) in runs.items():
        for dataset in datasets:
            write_predictions(tmp_path / "m" / name, dataset, [i < right for i in range(4)], config)
    ev.main(["--results-dir", str(tmp_path)])

    rows = list(csv.DictReader(open(tmp_path / "results.csv", encoding="utf-8")))
    assert [(r["method"], r["density"], r["decode"]) for r in rows] == [
        ("dense", "", "dense"), ("dhsa", "0.0625", "dense"), ("dhsa", "0.125", "dense"), ("dhsa", "0.25", "dense"),
        ("dhsa_fixed_chunks", "0.125", "dense"), ("dhsa_no_robust_repr", "0.125", "dense"),
        ("block_sparse", "0.125", "dense"), ("streaming", "0.125", "dense"), ("dhsa", "0.125", "sparse")]
    assert all(f"n_{d}" in rows[0] and d in rows[0] for d in lb.ALL_DATASETS)
    dhsa = rows[2]
    assert [float(dhsa[d]) for d in datasets] == [75.0, 75.0, 75.0] and dhsa["n_multifieldqa_zh"] == "4"
    assert float(dhsa["Average"]) == 75.0 and float(dhsa["Synthetic"]) == 75.0 and dhsa["Code"] == ""
    assert dhsa["datasets"] == "3/21 (multi_news:4, multifieldqa_zh:4, passage_retrieval_zh:4)"

    md = (tmp_path / "results.md").read_text(encoding="utf-8")
    table2, rest = md.split("## Table 2")[1].split("## Table 3")
    table3, rest = rest.split("## Table 4")
    table4, every = rest.split("## Every run")
    assert "| Model | Method | Decode | Single-Doc QA | Summarization | Synthetic | Average | % of dense |" in table2
    assert "| m | dhsa | dense | 75.00 | 75.00 | 75.00 | 75.00 | 75.0% |" in table2
    assert "| m | dhsa | sparse | 50.00 |" in table2 and "| m | streaming | dense | 0.00 |" in table2
    assert "0.0625" not in table2 and table2.count("| m |") == 7
    assert "| m | 0.0625 | dhsa | dense | 25.00 |" in table3 and "| m | 0.25 | dhsa | dense | 100.00 |" in table3
    assert table3.count("| m |") == 4 and "streaming" not in table3 and "sparse" not in table3  # dense, dhsa x 3
    assert [line.split(" | ")[1] for line in table4.splitlines() if line.startswith("| m |")] == [
        "DHSA", "DHSA w/o robust chunk repr.", "DHSA w/o dynamic chunking",
        "Block Sparse (DHSA w/o robust chunk repr. & dynamic chunking)", "DHSA"]
    assert "| m | streaming | 0.125 | dense | 0.00 | 0.00 | 0.00 | 0.00 | 4 4 4 |" in every

    png = (tmp_path / "density.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert longbench_plots.plot_density(longbench_tables.result_rows([]), tmp_path / "none.png") is None


def test_reached_density_of_the_peers_is_tabulated(tmp_path):
    """FlexPrefill / XAttention record density_reached per prediction: its mean is a results.csv column, shown in
    the tables beside the config density, and the density plot places the run there."""
    import csv

    write_predictions(tmp_path / "m" / "dense", "multi_news", [True] * 2, {"method": "dense", "density": None})
    run = tmp_path / "m" / "xattention_0.125_adaptive"
    write_predictions(run, "multi_news", [True, False], {"method": "xattention", "density": 0.125})
    lines = (run / "multi_news.jsonl").read_text(encoding="utf-8").splitlines()
    (run / "multi_news.jsonl").write_text("".join(json.dumps({**json.loads(line), "density_reached": value}) + "\n"
                                                  for line, value in zip(lines, (0.25, 0.35))), encoding="utf-8")
    ev.main(["--results-dir", str(tmp_path)])
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "results.csv", encoding="utf-8"))}
    assert float(rows["xattention"]["density_reached"]) == pytest.approx(0.3) and rows["dense"]["density_reached"] == ""
    assert "| m | xattention | 0.125 (reached 0.300) | dense |" in (tmp_path / "results.md").read_text(encoding="utf-8")
    assert (tmp_path / "density.png").read_bytes().startswith(b"\x89PNG")


def test_relative_to_dense_only_on_the_same_samples(tmp_path):
    for name, config, right in (("dense", {"method": "dense"}, [True] * 4),
                                ("dhsa_0.125", {"method": "dhsa", "density": 0.125}, [True, False])):
        write_predictions(tmp_path / "m" / name, "passage_retrieval_zh", right, config)
    ev.main(["--results-dir", str(tmp_path)])
    assert "| m | dhsa | dense | 50.00 | 50.00 | – |" in (tmp_path / "results.md").read_text(encoding="utf-8")
    ev.main(["--results-dir", str(tmp_path), "--common-samples"])      # scored on the 2 samples both have
    assert "| m | dhsa | dense | 50.00 | 50.00 | 50.0% |" in (tmp_path / "results_common.md").read_text("utf-8")
    assert (tmp_path / "density_common.png").is_file()
