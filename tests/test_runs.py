"""The shared run layer: crash-safe JSONL and CSV results (utils/runs/records.py), run names, and greedy generation with
stopping (utils/runs/generation.py)."""

import csv
import io
import json

import pytest
import torch

from utils.config import SparseAttentionConfig
from utils.runs.generation import StopAtNewline, eos_token_ids, greedy_generate, sync
from utils.runs import (append_csv, append_jsonl, check_same_settings, config_dict, read_csv_rows, read_jsonl,
                        repair_jsonl, run_name)


# ------------------------------------------------------------------------------------------------ JSONL

def test_read_jsonl_leaves_out_a_cut_last_line_and_rejects_other_broken_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    assert read_jsonl(path) == []
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3, "b": "x')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\n{"a": 2\n{"a": 3}\n')
    with pytest.raises(ValueError, match=r"r.jsonl:2 is not a JSON record"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n[1, 2]\n')  # JSON, but not a record
    with pytest.raises(ValueError, match=r"r.jsonl:2"):
        read_jsonl(path)


def test_append_jsonl_cuts_the_partial_line_before_writing(tmp_path):
    path = tmp_path / "sub" / "r.jsonl"
    append_jsonl(path, {"i": 0, "text": "naïve\nline"})   # creates the folder; a line break stays inside the JSON
    with open(path, "ab") as f:
        f.write(b'{"i": 1, "te')                          # an interrupted write
    append_jsonl(path, {"i": 2})
    assert path.read_text(encoding="utf-8") == '{"i": 0, "text": "naïve\\nline"}\n{"i": 2}\n'
    assert read_jsonl(path) == [{"i": 0, "text": "naïve\nline"}, {"i": 2}]


def test_repair_jsonl_returns_the_bytes_cut(tmp_path):
    path = tmp_path / "r.jsonl"
    assert repair_jsonl(path) == 0
    path.write_bytes(b'{"a": 1}\n{"a"')
    assert repair_jsonl(path) == 4 and path.read_bytes() == b'{"a": 1}\n'
    assert repair_jsonl(path) == 0
    path.write_bytes(b'{"a"')                              # nothing complete at all
    assert repair_jsonl(path) == 4 and path.read_bytes() == b""


# ------------------------------------------------------------------------------------------------ CSV

def test_append_csv_header_once_one_line_per_row_and_cut_rows_dropped(tmp_path):
    path = tmp_path / "lat.csv"
    append_csv(path, {"a": 1, "b": 2.5, "note": "two\nlines, and a comma"}, ["a", "b", "note"])
    append_csv(path, {"a": 3}, ["a", "b", "note"])                     # missing columns stay empty
    with open(path, "ab") as f:
        f.write(b"4,5")                                                # a row cut off by a crash
    assert read_csv_rows(path) == [{"a": "1", "b": "2.5", "note": "two lines, and a comma"},
                                   {"a": "3", "b": "", "note": ""}]
    append_csv(path, {"a": 6, "b": None}, ["a", "b", "note"])
    assert path.read_text().splitlines() == ["a,b,note", '1,2.5,"two lines, and a comma"', "3,,", "6,,"]


def test_append_csv_upgrades_an_older_header_and_refuses_unknown_columns(tmp_path):
    path = tmp_path / "lat.csv"
    path.write_text("a,note\n1,x\n2,y\n")
    append_csv(path, {"a": 3, "decode": "dense", "note": "z"}, ["a", "decode", "note"])
    assert list(csv.reader(io.StringIO(path.read_text()))) == [["a", "decode", "note"], ["1", "", "x"], ["2", "", "y"],
                                                              ["3", "dense", "z"]]
    assert not (tmp_path / "lat.csv.tmp").exists()
    with pytest.raises(ValueError, match=r"columns \['decode'\]"):
        append_csv(path, {"a": 4}, ["a", "note"])


# ------------------------------------------------------------------------------------------------ names, settings

def test_run_names():
    assert run_name(SparseAttentionConfig(method="dense", density=None)) == "dense"
    assert run_name(SparseAttentionConfig(method="dhsa", density=0.0625)) == "dhsa_0.0625"
    assert run_name(SparseAttentionConfig(method="dhsa", budget=2048)) == "dhsa_budget2048"
    assert run_name(SparseAttentionConfig(method="streaming", density=0.125, min_budget=512)) == "streaming_0.125_min512"
    assert run_name(SparseAttentionConfig(method="dhsa", density=0.125, decode="sparse")) == "dhsa_0.125_decode-sparse"
    assert run_name(SparseAttentionConfig(method="quest", density=0.125)) == "quest_0.125"  # always sparse decode
    assert run_name(SparseAttentionConfig(method="xattention", density=0.125)) == "xattention_0.125_adaptive"
    assert run_name(SparseAttentionConfig(method="flexprefill", density=0.125, peer_budget="matched")) == \
        "flexprefill_0.125"


def test_check_same_settings_names_what_changed(tmp_path):
    config = config_dict(SparseAttentionConfig(dense_layers=(0, 1)))
    assert config["dense_layers"] == [0, 1] and config["decode"] == "dense"
    records = [{"model": "m", "config": config}]
    check_same_settings(tmp_path / "r.jsonl", records, {"model": "m", "config": SparseAttentionConfig(
        dense_layers=(0, 1)).__dict__})  # tuples and lists compare equal after the JSON round trip
    with pytest.raises(ValueError, match="other model; pass --output-dir"):
        check_same_settings(tmp_path / "r.jsonl", records, {"model": "other", "config": config})


# ------------------------------------------------------------------------------------------------ generation

@pytest.fixture(scope="module")
def tiny():
    from utils.models import tiny_model, tiny_tokenizer

    return tiny_model("llama", initializer_range=0.2), tiny_tokenizer()


def test_eos_token_ids_merge_model_tokenizer_and_extra_without_repeats(tiny):
    model, tok = tiny
    assert eos_token_ids(model, tok) == [2]
    model.generation_config.eos_token_id = [7, 2]
    try:
        assert eos_token_ids(model, tok, extra=[9, 7]) == [7, 2, 9]
    finally:
        model.generation_config.eos_token_id = 2


def manual_greedy(model, ids, steps):
    """Greedy decoding by hand: full forward each step, argmax of the last position."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
    return out


def test_greedy_generate_equals_argmax_decoding_and_stops(tiny):
    model, tok = tiny
    prompt = tok("The needle hides in a haystack of essays.")["input_ids"]
    expected = manual_greedy(model, prompt, 6)
    assert greedy_generate(model, prompt, 6, [0]) == expected                  # stop id 0 never comes
    assert greedy_generate(model, prompt, 6, [expected[2]]) == expected[:expected.index(expected[2]) + 1]
    # min_new_tokens holds a stop id back (LongBench samsum); the first token then differs from the unconstrained one
    held = greedy_generate(model, prompt, 1, [expected[0]], min_new_tokens=1)
    assert len(held) == 1 and held[0] != expected[0]
    sync("cpu")


def test_stop_at_newline_only_after_the_answer_started(tiny):
    _, tok = tiny

    def stops(text, prompt_len=0):
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return bool(StopAtNewline(tok, prompt_len)(ids, None)[0])

    assert not stops("\nThe best thing") and not stops("The best thing")
    assert stops("The best thing.\nMore")
    prompt_len = len(tok("Question:\n", add_special_tokens=False)["input_ids"])
    assert not stops("Question:\nThe answer", prompt_len)                      # the prompt's own line break


def test_records_older_than_a_config_field_resume_only_with_its_legacy_value(tmp_path):
    """A record written before `token_rescore` existed lacks it: it behaved like token_rescore=0 (LEGACY_VALUES), so a
    run with 0 resumes it and a run with 4 is refused; committed results stay resumable when fields are added."""
    current = config_dict(SparseAttentionConfig(method="dhsa", density=0.0625, token_rescore=0))
    old = {k: v for k, v in current.items() if k not in ("token_rescore", "exact_tail", "center_keys")}
    old_record = [{"model": "m", "config": {**old, "center_keys": True}}]
    check_same_settings(tmp_path / "r.jsonl", old_record, {"model": "m", "config": current})
    with pytest.raises(ValueError, match="other config"):
        check_same_settings(tmp_path / "r.jsonl", old_record, {"model": "m", "config": {**current, "token_rescore": 4.0}})
    # center_keys predates nothing here: a record without it was made with the old behaviour (False)
    with pytest.raises(ValueError, match="other config"):
        check_same_settings(tmp_path / "r.jsonl", [{"model": "m", "config": old}], {"model": "m", "config": current})


def test_peer_fields_split_only_the_peers_runs(tmp_path):
    """FlexPrefill's / XAttention's fields (new defaults: the authors' settings) leave other methods' records
    resumable; a peer's record without them was a capped run with the paper's rules (LEGACY_VALUES)."""
    peers = ("peer_budget", "flex_min_budget", "flex_rule", "xattn_rule")
    dhsa = config_dict(SparseAttentionConfig(method="dhsa", density=0.0625))
    old = {**{k: v for k, v in dhsa.items() if k not in peers}, "xattn_threshold": 0.9, "xattn_stride": 8}
    check_same_settings(tmp_path / "r.jsonl", [{"config": old}], {"config": dhsa})
    for name in ("flexprefill", "xattention"):
        current = config_dict(SparseAttentionConfig(method=name, density=0.125))
        old = {k: v for k, v in current.items() if k not in peers}
        old.update(xattn_threshold=0.9, xattn_stride=8)
        with pytest.raises(ValueError, match="other config"):
            check_same_settings(tmp_path / "r.jsonl", [{"config": old}], {"config": current})
        legacy = config_dict(SparseAttentionConfig(method=name, density=0.125, peer_budget="matched",
                                                   flex_min_budget=0, flex_rule="paper", xattn_rule="paper",
                                                   xattn_threshold=0.9, xattn_stride=8))
        check_same_settings(tmp_path / "r.jsonl", [{"config": old}], {"config": legacy})


def test_dense_runs_resume_whatever_the_sparse_options():
    dense = config_dict(SparseAttentionConfig(method="dense", density=None))
    with_flags = config_dict(SparseAttentionConfig(method="dense", density=None, token_rescore=4.0, chunk_size=8))
    tmp = "r.jsonl"
    check_same_settings(tmp, [{"config": dense}], {"config": with_flags})
    with pytest.raises(ValueError, match="other config"):
        check_same_settings(tmp, [{"config": config_dict(SparseAttentionConfig(method="dhsa"))}], {"config": with_flags})
