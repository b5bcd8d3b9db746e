"""DHSA's question tail (`dense_tail`, the authors' dense instruction tail) and the question's keys at sparse decode
steps (`tail_key_ranking`), and the selection testbed that measured them (utils/bench/testbed.py,
run_selection_testbed.py)."""

import json

import pytest
import torch

from utils.attention import dense_attention, sparse_attention
from utils.methods.dhsa.boundaries import fixed_size_ends
from utils.config import DHSAOptions, SparseAttentionConfig
from utils.methods.dhsa.select import dhsa_attention, dhsa_select, tail_key_ranking
from utils.methods import METHODS, LayerContext
from utils.bench.testbed import (dhsa_flop_ratio, parse_spec, score_selection, window_rows, window_starts,
                           window_truth)


def rand_qkv(Hq=4, Hkv=2, L=300, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, Hq, L, D, generator=g), torch.randn(1, Hkv, L, D, generator=g),
            torch.randn(1, Hkv, L, D, generator=g))


def planted(L=600, D=16, key=100, head=1, strength=5.0, seed=0):
    """Random q/k with one key that the question tail of query head `head` (its last 64 queries) matches
    strongly, in a 16-key chunk whose other keys point the other way: the chunk's mean hides it."""
    q, k, v = rand_qkv(L=L + 1, D=D, seed=seed)
    u = torch.nn.functional.normalize(torch.randn(D, generator=torch.Generator().manual_seed(seed + 1)), dim=0)
    q[:, head, L - 64:L] += strength * u
    chunk = slice(key // 16 * 16, key // 16 * 16 + 16)
    k[:, head // 2, chunk] -= 0.5 * strength * u
    k[:, head // 2, key] = strength * u
    return q, k, v


@pytest.mark.parametrize("tail,query_chunk", [(64, 64), (100, 16), (5, 16)])
def test_dense_tail_tiles_equal_dense_and_the_rest_is_unchanged(tail, query_chunk):
    q, k, v = rand_qkv()
    L = q.shape[2]
    first = (L - tail) // query_chunk * query_chunk  # the tiles that hold the last `tail` queries
    out = dhsa_attention(q, k, v, budget=32, query_chunk=query_chunk, dense_tail=tail)
    without = dhsa_attention(q, k, v, budget=32, query_chunk=query_chunk, dense_tail=0)
    torch.testing.assert_close(out[:, :, first:], dense_attention(q, k, v)[:, :, first:], atol=1e-6, rtol=1e-5)
    assert torch.equal(out[:, :, :first], without[:, :, :first])
    assert not torch.allclose(without[:, :, first:], out[:, :, first:])  # 32 keys is not dense
    sel = dhsa_select(q, k, budget=32, boundaries=[fixed_size_ends(L, 16)],
                      options=DHSAOptions(query_chunk=query_chunk, dense_tail=tail))
    assert sel.dense_from == first and sel.budget_rows(L) == first
    mask = sel.mask(L, L)
    assert mask[:, :, :first].sum(-1).max() <= 32  # the budget holds before the tail
    assert torch.equal(mask[:, :, first:], torch.ones(L, L, dtype=torch.bool).tril()[first:].expand_as(mask[:, :, first:]))


def test_dense_tail_longer_than_the_prompt_is_dense_and_decode_steps_keep_the_budget():
    q, k, v = rand_qkv(L=50)
    torch.testing.assert_close(dhsa_attention(q, k, v, budget=8, dense_tail=64), dense_attention(q, k, v),
                               atol=1e-6, rtol=1e-5)
    step = dhsa_select(q[:, :, -1:], k, budget=8, boundaries=[fixed_size_ends(50, 16)],
                       options=DHSAOptions(dense_tail=64))  # a decode step is no prefill tail
    assert step.dense_from is None and (step.key_index >= 0).sum(-1).max() <= 8


def test_dense_tail_keeps_the_planted_needle_that_chunk_scores_miss():
    """The needle test in miniature: one key that only the question reads, in a chunk of noise."""
    q, k, _ = planted()
    q, k = q[:, :, :600], k[:, :, :600]
    ends = [fixed_size_ends(600, 16)]
    plain = dhsa_select(q, k, budget=64, boundaries=ends, options=DHSAOptions(dense_tail=0, sink_tokens=4,
                                                                               local_tokens=16))
    tail = dhsa_select(q, k, budget=64, boundaries=ends, options=DHSAOptions(dense_tail=64, sink_tokens=4,
                                                                              local_tokens=16))
    last = 600 - 1
    assert not plain.mask(600, 600)[0, 1, last, 100]  # the chunk scores of the last tile miss it ...
    assert tail.mask(600, 600)[0, 1, last, 100]       # ... the dense tail reads it


@pytest.mark.parametrize("head_pooling", ["none", "mean"])
def test_sparse_decode_keeps_the_keys_the_question_read(head_pooling):
    q, k, v = planted()
    L = 600
    config = SparseAttentionConfig(method="dhsa", budget=128, decode="sparse", sink_tokens=4, local_tokens=16,
                                   head_pooling=head_pooling)
    kept = {}
    for tail in (64, 0):
        context = LayerContext()
        METHODS["dhsa"].select(q[:, :, :L], k[:, :, :L], config.replace(dense_tail=tail), context)
        assert ("question_keys" in context.state["dhsa"]) == bool(tail)
        step = METHODS["dhsa"].select(q[:, :, L:], k, config.replace(dense_tail=tail), context)
        assert (step.key_index >= 0).sum(-1).max() <= 128 and step.dense_from is None  # the budget holds
        kept[tail] = (step.key_index == 100).any(-1)[0, :, 0]
    row = 1 if head_pooling == "none" else 0  # the query head, or its GQA group
    assert kept[64][row] and not kept[0][row]


def test_tail_key_ranking_is_the_question_attention():
    q, k, _ = rand_qkv(L=120)
    rank = tail_key_ranking(q[:, :, -8:], k, 120, heads=4)
    probs = torch.softmax((q[:, :, -8:] @ k.repeat_interleave(2, 1).transpose(-1, -2)) / 4 +
                          torch.ones(8, 120).triu(113).masked_fill(torch.ones(8, 120).triu(113).bool(), -1e9), -1)
    assert torch.equal(rank[0, :, :10], probs.sum(2).topk(10, -1).indices[0])
    grouped = tail_key_ranking(q[:, :, -8:], k, 5, heads=2)  # a GQA group ranks by its summed mass
    assert torch.equal(grouped[0], probs.sum(2).view(1, 2, 2, 120).sum(2).topk(5, -1).indices[0])


def test_tail_columns_share_the_question_key_with_earlier_tiles_within_the_budget():
    """tail_columns: a middle tile, whose own chunk scores miss the needle, keeps it because the question read it;
    every tile keeps at most N_b keys, none in its future, and the columns take at most their share."""
    q, k, _ = planted()
    L = 600
    q, k = q[:, :, :L], k[:, :, :L]
    q[:, 1, 320:384] = q[:, 1, L - 64:L]  # a middle tile asks the question too: it needs key 100
    config = SparseAttentionConfig(method="dhsa", budget=64, sink_tokens=4, local_tokens=16, dense_tail=64,
                                   query_chunk=64)
    plain = METHODS["dhsa"].select(q, k, config, LayerContext())
    columns = METHODS["dhsa"].select(q, k, config.replace(tail_columns=0.5), LayerContext())
    tile = 5  # queries 320..383
    assert not (plain.key_index[0, 1, tile] == 100).any()
    assert (columns.key_index[0, 1, tile] == 100).any()
    idx = columns.key_index[0, :, : columns.dense_from // 64]
    ends = torch.arange(1, idx.shape[1] + 1) * 64
    assert ((idx >= 0).sum(-1) <= 64).all() and (idx < ends[None, :, None]).all()
    assert all(len(set(row.tolist()) - {-1}) == (row >= 0).sum() for row in idx.reshape(-1, idx.shape[-1]))


def test_ranked_keys_count_only_what_the_tile_sees_and_does_not_keep_anyway():
    q, k, _ = rand_qkv(L=256)
    ranked = torch.tensor([[[250, 2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49]]]).expand(1, 4, -1)
    sel = dhsa_select(q, k, budget=32, boundaries=[fixed_size_ends(256, 16)],
                      options=DHSAOptions(dense_tail=0, sink_tokens=4, local_tokens=8, query_chunk=64),
                      ranked_keys=ranked, ranked_share=0.25)
    # tile 0 (keys < 64): 250 is in its future and 2 is a sink; the share is (32 - 4 - 8) * 0.25 = 5 keys
    kept = set(sel.key_index[0, 0, 0].tolist())
    assert {40, 41, 42, 43, 44} <= kept and 250 not in kept
    full = dhsa_attention(*rand_qkv(L=256), budget=256, tail_columns=0.5)
    torch.testing.assert_close(full, dense_attention(*rand_qkv(L=256)), atol=1e-6, rtol=1e-5)


# ---- testbed --------------------------------------------------------------------------------------------

def test_spec_parsing_and_windows():
    assert parse_spec("dhsa[dense_tail=0,exact_tail=64,token_rescore=1.5,center_keys=False]") == \
        ("dhsa", {"dense_tail": 0, "exact_tail": 64, "token_rescore": 1.5, "center_keys": False})
    assert parse_spec("oracle_topk") == ("oracle_topk", {})
    with pytest.raises(ValueError, match="unknown option"):
        parse_spec("dhsa[no_such=1]")
    starts = window_starts(4000)
    assert starts[-1] == (4000 - 128) // 128 * 128 and all(s % 128 == 0 for s in starts)
    assert len(set(starts)) == len(starts) and starts == sorted(starts) and starts[0] >= 4000 // 8 // 128 * 128
    rows = window_rows(4000, starts)
    assert rows[-1][-1] == 3999 and all(len(r) == 128 for r in rows[:-1])


def test_score_selection_counts_the_dense_tail_and_the_needle():
    q, k, _ = planted()
    q, k = q[:, :, 600 - 128:600], k[:, :, :600]
    truth = window_truth(q, k, {}, 64)
    config = SparseAttentionConfig(method="dhsa", budget=64, sink_tokens=4, local_tokens=16)
    tail = score_selection(truth, METHODS["dhsa"].select(q, k, config, LayerContext()), needle=(98, 102))
    plain = score_selection(truth, METHODS["dhsa"].select(q, k, config.replace(dense_tail=0), LayerContext()),
                            needle=(98, 102))
    oracle = score_selection(truth, METHODS["oracle_topk"].select(q, k, config.replace(method="oracle_topk"),
                                                                  LayerContext()), needle=(98, 102))
    assert tail["needle_heads"] == plain["needle_heads"] >= 1  # head 1 reads the planted key
    assert tail["needle_heads_half"] == tail["needle_heads"] and plain["needle_heads_half"] < plain["needle_heads"]
    assert oracle["topk_overlap"] == pytest.approx(1.0) and oracle["mass_recall"] >= plain["mass_recall"]
    assert tail["mass_recall"] > plain["mass_recall"] and tail["keys_read"] > 64  # the tail rows read everything


def test_flop_ratio_of_the_defaults_is_far_below_dense():
    config = SparseAttentionConfig(method="dhsa", density=0.0625)
    ratio = dhsa_flop_ratio(32768, 64, config)
    assert 0.1 < ratio < 0.25  # chunk scores L/32 + attention 2 N_b per query + the margin's rescoring, vs L dense
    plain = dhsa_flop_ratio(32768, 64, config.replace(token_rescore=0))
    assert plain < ratio < dhsa_flop_ratio(32768, 64, config.replace(rescore_window=0))  # rescoring every slot


def test_testbed_runner_end_to_end_and_resume(tmp_path, monkeypatch):
    import run_selection_testbed as testbed
    from utils.models import tiny_model, tiny_tokenizer

    folder = tmp_path / "essays"
    folder.mkdir()
    (folder / "a.txt").write_text(" ".join(f"w{i % 40}" for i in range(3000)) + "\n")
    model, tok = tiny_model("llama").eval(), tiny_tokenizer()
    monkeypatch.setattr("utils.models.load_model", lambda *a, **k: (model, tok))
    monkeypatch.setenv("DHSA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("data.haystack.NEEDLE_SETS", {"sf": ("w1 w2 w3 w4 w5 w6 w7 w8", "w9 w9", "w5")})
    argv = ["--model", "tiny", "--lengths", "1500", "--haystack-dir", str(folder), "--output-dir",
            str(tmp_path / "out"), "--methods", "oracle_topk", "dhsa", "dhsa[dense_tail=0]", "--min-budget", "64"]
    testbed.main(argv)
    lines = (tmp_path / "out" / "tiny" / "testbed.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert {r["method"] for r in rows} == {"oracle_topk", "dhsa", "dhsa[dense_tail=0]"}
    assert {r["layer"] for r in rows} == {0, 1} and "tail" in {r["window"] for r in rows}
    assert list((tmp_path / "cache" / "testbed" / "tiny").glob("*.pt"))  # the capture is cached
    table = (tmp_path / "out" / "tiny" / "testbed.csv").read_text()
    assert "mass_sampled_vs_oracle" in table and (tmp_path / "out" / "tiny" / "testbed.png").is_file()
    testbed.main(argv)  # resumes: nothing redone
    assert (tmp_path / "out" / "tiny" / "testbed.jsonl").read_text().splitlines() == lines
    with pytest.raises(SystemExit) as err:
        testbed.main(argv[:-4] + ["--methods", "dhsa[nope=1]"])
    assert "unknown option" in str(err.value) and "\n" not in str(err.value)
