"""Tests of boundary_predictor/: labels (eq. 5-8), loss (eq. 9), NMS, the network, weights file, training CLI."""

import json
import math

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from boundary_predictor import (BoundaryPredictor, PredictorConfig, attention_mass_ratios, default_weights_path,
                                load_predictor, predict_boundaries, save_predictor, select_boundaries, soft_labels)
from boundary_predictor.capture import capture_keys, global_layers, resolve_layers
from boundary_predictor.data import Document, folder_documents, make_samples, split_samples
from boundary_predictor.labels import label_sample
from boundary_predictor.loss import BoundaryMetrics, focal_bce
from utils.models import tiny_model, tiny_tokenizer


# ---------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: one thread is fastest, and it avoids OpenMP spin-waits on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dense_ratios(attn: torch.Tensor, w: int, eps: float = 1e-3, min_future: int | None = None) -> torch.Tensor:
    """Eq. 5-7 written out literally from a dense head-averaged attention matrix attn: [L, L]."""
    L = attn.shape[0]
    min_future = w if min_future is None else min_future
    out = torch.full((L,), float("nan"), dtype=torch.float64)
    A = attn.double()
    for i in range(L):
        n = L - 1 - i - w
        if n < min_future or i < w:  # edges: too few future queries / past window holds the sink token 0
            continue
        past = sum(A[u, v] for u in range(i + w + 1, L) for v in range(max(0, i - w + 1), i + 1)) / n
        fut = sum(A[u, v] for u in range(i + w + 1, L) for v in range(i + 1, i + w + 1)) / n
        out[i] = (max(past, fut) + eps) / (min(past, fut) + eps)
    return out


def dense_attention(q, k, scaling=None, sliding_window=None, softcap=None):
    """Head-averaged attention [B, L, L] of q [B, Hq, L, D], k [B, Hkv, L, D] (GQA), causal."""
    L, D = q.shape[2], q.shape[3]
    logits = q @ k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).transpose(-1, -2) * (scaling or D**-0.5)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    u, v = torch.arange(L)[:, None], torch.arange(L)[None]
    ok = v <= u
    if sliding_window:
        ok &= (u - v) < sliding_window
    return torch.softmax(logits.masked_fill(~ok, -math.inf), dim=-1).mean(1)


class CharTokenizer:
    """Enough of a tokenizer for data.make_samples: characters -> ids, with a BOS id."""
    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False, verbose=True):
        return {"input_ids": [2 + ord(c) % 120 for c in text]}


FAMILIES = ["llama", "qwen2", "gemma2", "gemma3"]


# ---------------------------------------------------------------------------------------------------- labels
@pytest.mark.parametrize("options", [{}, {"sliding_window": 7}, {"softcap": 2.0}, {"window": 2, "min_future": 1}])
def test_labels_match_dense_eq5_to_8(options):
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 37, 8) * 2, torch.randn(2, 2, 37, 8) * 2
    w = options.get("window", 4)
    # a tiny tile forces many query tiles, so the tiled accumulation itself is tested
    ratios = attention_mass_ratios(q, k, tile_elements=4 * 37 * 3, **options)
    attn = dense_attention(q, k, sliding_window=options.get("sliding_window"), softcap=options.get("softcap"))
    for b in range(2):
        expected = dense_ratios(attn[b], w, min_future=options.get("min_future"))
        assert torch.equal(ratios[b].isnan(), expected.isnan())
        defined = ~expected.isnan()
        assert defined.sum() > 20
        torch.testing.assert_close(ratios[b][defined].double(), expected[defined], rtol=1e-5, atol=1e-6)
        # eq. 8 with alpha = 2, beta = ln 2, zeta = 1e-6
        labels = soft_labels(ratios[b])
        ref = 1 / (1 + torch.exp(-2.0 * (torch.log(expected + 1e-6) - math.log(2.0))))
        torch.testing.assert_close(labels[defined].double(), ref[defined], rtol=1e-5, atol=1e-6)


def test_label_edges_are_undefined():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 20, 4, generator=g), torch.randn(1, 2, 20, 4, generator=g)
    ratios = attention_mass_ratios(q, k, window=4)[0]
    # label defined iff i >= w (no sink token in the past window) and at least w future queries:
    # L-1-i-w >= w  <=>  i <= L-1-2w = 11
    assert ratios[:4].isnan().all() and not ratios[4:12].isnan().any() and ratios[12:].isnan().all()
    torch.testing.assert_close(ratios[4:12].double(), dense_ratios(dense_attention(q, k)[0], 4)[4:12],
                               rtol=1e-5, atol=1e-6)
    assert (ratios[4:12] >= 1).all()


def test_soft_label_is_half_at_ratio_two():
    assert soft_labels(torch.tensor([2.0])).item() == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_from_one_forward_match_the_models_own_attention(family):
    """Capture (GQA, scaling, sliding windows, Gemma-2 soft-capping) + labels == eq. 5-7 on the model's attentions."""
    model = tiny_model(family)
    ids = torch.randint(3, 320, (1, 40), generator=torch.Generator().manual_seed(2))
    layers = resolve_layers(model, "all")
    ratios = label_sample(model, ids, layers)
    reference = tiny_model(family, attn_implementation="eager")
    with torch.no_grad():
        attentions = reference(ids, output_attentions=True, use_cache=False).attentions
    for row, layer in zip(ratios, layers):
        expected = dense_ratios(attentions[layer][0].mean(0), 4)
        defined = ~expected.isnan()
        torch.testing.assert_close(row[defined].double(), expected[defined], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_leaves_outputs_unchanged_and_restores_attention(family):
    model = tiny_model(family)
    implementation = model.config._attn_implementation
    ids = torch.randint(3, 320, (1, 25))
    with torch.no_grad():
        before = model(ids).logits
    layer = global_layers(model)[0]
    keys = capture_keys(model, ids, [layer])
    assert keys[layer].shape == (1, 2, 25, 16)
    assert model.config._attn_implementation == implementation
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)


def test_layer_selection():
    assert global_layers(tiny_model("gemma2")) == [1, 3]
    assert global_layers(tiny_model("gemma3")) == [3]
    assert global_layers(tiny_model("llama")) == [0, 1]
    assert resolve_layers(tiny_model("gemma3"), ["all"]) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="out of range"):
        resolve_layers(tiny_model("llama"), [5])
    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, head_dim=8,
                           num_attention_heads=2, num_key_value_heads=1, layer_types=["sliding_attention"] * 2)
    with pytest.raises(ValueError, match="no full-attention layers"):
        global_layers(Gemma3ForCausalLM(cfg))


# ---------------------------------------------------------------------------------------------------- loss, metrics
def test_focal_loss_equals_eq9_on_hand_values():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0, 0.0])
    labels = torch.tensor([1.0, 0.0, 0.3, 1.0, 0.8])
    mask = torch.tensor([True, True, True, True, False])
    expected = []
    for z, y in zip(logits.tolist()[:4], labels.tolist()[:4]):
        p = 1 / (1 + math.exp(-z))
        p_t = p * y + (1 - p) * (1 - y)
        expected.append((1 - p_t) ** 2 * (-1.3 * y * math.log(p) - (1 - y) * math.log(1 - p)))
    got = focal_bce(logits, labels, mask, gamma=2.0, pos_weight=1.3)
    assert got.item() == pytest.approx(sum(expected) / 4, rel=1e-6)
    # NaN labels outside the mask do not leak into the loss
    labels[4] = float("nan")
    assert focal_bce(logits, labels, mask).item() == pytest.approx(sum(expected) / 4, rel=1e-6)


def test_metrics_counts():
    m = BoundaryMetrics(k=2)
    logits = torch.tensor([3.0, -2.0, 1.0, -1.0, 5.0])
    labels = torch.tensor([0.9, 0.6, 0.1, 0.2, 0.7])
    m.add(logits, labels, torch.tensor([True, True, True, True, False]))
    s = m.summary()
    # positives (label >= .5) among masked: 0, 1; predicted (logit >= 0): 0, 2 -> tp 1, fp 1, fn 1
    assert (s["precision"], s["recall"], s["f1"]) == (0.5, 0.5, 0.5)
    # top-2 by label {0, 1}, by logit {0, 2} -> overlap 1/2
    assert s["topk_overlap"] == 0.5


# ---------------------------------------------------------------------------------------------------- NMS, inference
@pytest.mark.parametrize("window", [1, 8, 64])
def test_nms_keeps_boundaries_apart_and_caps_chunks(window):
    torch.manual_seed(window)
    L = 3000
    scores = torch.rand(L)
    for max_chunks in (1, 5, 400):
        ends = select_boundaries(scores, max_chunks, nms_window=window, min_confidence=0.05)
        assert ends[-1].item() == L and len(ends) <= max_chunks
        assert (ends.diff() > 0).all()
        chunk_lengths = torch.diff(ends, prepend=torch.tensor([0]))
        assert chunk_lengths.min().item() >= window
        assert (scores[ends[:-1] - 1] >= 0.05).all()
    ends = select_boundaries(scores, 2, nms_window=window)
    allowed = scores[max(window - 1, 0): L - window]  # ends i + 1 at least `window` from 0 and from L
    assert ends[0].item() == int(allowed.argmax()) + max(window - 1, 0) + 1  # one cut: the best allowed position


def test_nms_confidence_filter_and_newlines():
    scores = torch.zeros(100)
    scores[[10, 12, 50]] = torch.tensor([0.9, 0.8, 0.7])
    assert select_boundaries(scores, 10, nms_window=8).tolist() == [11, 51, 100]
    assert select_boundaries(scores, 10, nms_window=1).tolist() == [11, 13, 51, 100]
    # newline positions come first and obey the same spacing and cap
    ends = select_boundaries(scores, 10, nms_window=8, forced=torch.tensor([30, 33, 91, 98]))
    assert ends.tolist() == [11, 31, 51, 92, 100]  # 33: too close to 30; 98: too close to the end
    assert select_boundaries(scores, 2, nms_window=8, forced=torch.tensor([30])).tolist() == [31, 100]


def small_predictor(**overrides):
    torch.manual_seed(0)
    return BoundaryPredictor(PredictorConfig(num_kv_heads=2, head_dim=16, d_model=32, **overrides)).eval()


def test_tiled_scores_equal_whole_sequence_and_short_inputs_work():
    predictor = small_predictor()
    keys = torch.randn(2, 2, 61, 16)
    with torch.no_grad():
        whole = torch.sigmoid(predictor(predictor.features_from_keys(keys)))
    torch.testing.assert_close(predictor.scores(keys, tile=7), whole)
    for L in (1, 3, 9):
        assert predictor.scores(torch.randn(1, 2, L, 16)).isfinite().all()
    # padding is masked: the score at position 0 does not depend on keys it cannot see
    a, b = torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
    b[:, :, :5] = a[:, :, :5]
    assert predictor.scores(a)[0, 0] == predictor.scores(b)[0, 0]


def test_predict_boundaries_contract():
    predictor = small_predictor()
    keys = torch.randn(2, 2, 500, 16)
    out = predict_boundaries(predictor, keys, 20, nms_window=8, min_confidence=0.0,
                             newline_positions=[torch.tensor([100]), []])
    assert len(out) == 2
    for ends in out:
        assert ends.dtype == torch.long and ends[-1].item() == 500 and len(ends) <= 20
        assert torch.diff(ends, prepend=torch.tensor([0])).min() >= 8
        assert ends[:-1].max() <= 500 - 4  # last candidate L-1-w, i.e. end L-w
        assert ends[0] >= 8
    assert 101 in out[0].tolist()
    # without NMS every labelled-in-training position may end a chunk, and only those: w .. L-1-w
    cuts = predict_boundaries(predictor, keys[:1], 1000, nms_window=1, min_confidence=0.0)[0][:-1] - 1
    assert cuts.tolist() == list(range(4, 500 - 4))
    with pytest.raises(ValueError, match="keys must be"):
        predict_boundaries(predictor, torch.randn(1, 3, 50, 16), 4)


def test_predictor_runs_on_32k_positions_on_cpu(rss_growth_mib):
    """Scores are computed in tiles of 4096 positions: the peak grows by ~110 MiB at 32K (one untiled pass: ~450)."""
    grown_mib = rss_growth_mib(
        "import torch\n"
        "from boundary_predictor import BoundaryPredictor, PredictorConfig, predict_boundaries\n"
        "torch.manual_seed(0)\n"
        "predictor = BoundaryPredictor(PredictorConfig(num_kv_heads=1, head_dim=256)).eval()\n"
        "keys = torch.randn(1, 1, 32768, 256, dtype=torch.bfloat16)",
        "ends = predict_boundaries(predictor, keys, 2048)[0]\n"
        "assert ends[-1].item() == 32768 and 1 < len(ends) <= 2048, ends\n"
        "assert (torch.diff(ends) > 0).all()")
    assert grown_mib < 256, f"peak memory grew by {grown_mib} MiB"


def test_weights_file_roundtrip(tmp_path):
    predictor = small_predictor()
    path = save_predictor(predictor, tmp_path / "tiny-model.pt", {"command": "python -m x", "validation": {"f1": .5}})
    assert path.stat().st_size < 5e6
    loaded = load_predictor(path)
    keys = torch.randn(1, 2, 40, 16)
    torch.testing.assert_close(loaded.scores(keys), predictor.scores(keys))
    assert loaded.metadata["validation"]["f1"] == 0.5
    assert default_weights_path("org/Tiny-Model", weights_dir=tmp_path) == path
    assert default_weights_path("other-model", weights_dir=tmp_path) is None
    with pytest.raises(FileNotFoundError, match="boundary_predictor.train"):
        load_predictor(tmp_path / "missing.pt")


# ---------------------------------------------------------------------------------------------------- data, training
def test_documents_samples_and_split(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 100)
    (tmp_path / "b.jsonl").write_text(json.dumps({"context": "a NEWLINE_CHAR b", "dataset": "multi_news"}) + "\n"
                                      + json.dumps({"text": "plain"}) + "\n")
    docs = folder_documents(tmp_path)
    assert [d.text for d in docs] == ["x" * 100, "a \n b", "plain"]
    samples = make_samples([Document("d1", "y" * 50), Document("d2", "z" * 20)], CharTokenizer(), 16, 8)
    assert all(len(s.input_ids) <= 16 and s.input_ids[0] == 1 for s in samples)
    # 15 characters + BOS per piece; the last pieces (5 + BOS) are shorter than min_length 8: dropped
    assert [s.key for s in samples] == ["d1#0", "d1#1", "d1#2", "d2#0"]
    many = make_samples([Document(f"doc{i}", "w" * 40) for i in range(40)], CharTokenizer(), 16, 8)
    train, val = split_samples(many, 0.25, seed=3)
    assert train and val and not {s.doc_id for s in train} & {s.doc_id for s in val}
    with pytest.raises(SystemExit, match="no such folder"):
        folder_documents(tmp_path / "nope")


def random_documents(folder, seed: int, count: int):
    """`count` short .txt documents of random words (30 each) in `folder`, seeded; returns the folder."""
    folder.mkdir()
    torch.manual_seed(seed)
    words = ["alpha beta gamma. ", "delta epsilon? ", "zeta eta theta!\n", "iota kappa, "]
    for n in range(count):
        folder.joinpath(f"doc{n}.txt").write_text("".join(words[int(i)] for i in torch.randint(0, 4, (30,))))
    return folder


def test_training_cli_end_to_end_and_resume(tmp_path):
    from boundary_predictor import train

    data = random_documents(tmp_path / "data", seed=1, count=5)
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    argv = ["--model", "tiny-llama", "--data-dir", str(data), "--max-length", "96", "--min-length", "48",
            "--pieces-per-doc", "2", "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(tmp_path / "run"),
            "--out", str(tmp_path / "w" / "tiny-llama.pt"), "--val-fraction", "0.34", "--d-model", "32",
            "--hidden", "32", "--device", "cpu", "--save-every", "2", "--topk", "10"]
    result = train.main(argv + ["--epochs", "2"], model=model, tokenizer=tokenizer)
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(0 <= r["val"]["f1"] <= 1 and 0 <= r["val"]["topk_overlap"] <= 1 for r in log)
    predictor = load_predictor(result["out"])
    meta = predictor.metadata
    assert meta["command"].startswith("python -m boundary_predictor.train --model tiny-llama")
    assert meta["validation"]["positions"] > 0 and meta["layers"] == [0, 1]
    # an interrupted run, rerun with the same command, ends with the same weights as the uninterrupted one
    calls, real_run_sample = [], train.run_sample

    def interrupted(*a, **k):
        if k.get("optimizer") is not None:  # a training step
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
        return real_run_sample(*a, **k)

    other = [a if a != str(tmp_path / "run") else str(tmp_path / "run2") for a in argv] + ["--epochs", "2"]
    train.run_sample = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            train.main(other, model=model, tokenizer=tokenizer)
    finally:
        train.run_sample = real_run_sample
    saved = torch.load(tmp_path / "run2" / "checkpoint.pt", weights_only=True)
    assert (saved["epoch"], saved["position"]) == (0, 2)  # --save-every 2, stopped in sample 3
    train.main(other, model=model, tokenizer=tokenizer)
    state_a = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["predictor"]
    state_b = torch.load(tmp_path / "run2" / "checkpoint.pt", weights_only=True)["predictor"]
    for name in state_a:
        torch.testing.assert_close(state_a[name], state_b[name], rtol=1e-5, atol=1e-6)
    # rerunning with more epochs resumes: only epoch 3 is trained
    train.main(argv + ["--epochs", "3"], model=model, tokenizer=tokenizer)
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    with pytest.raises(SystemExit, match="other settings"):
        train.main(argv + ["--epochs", "3", "--lr", "1e-2"], model=model, tokenizer=tokenizer)
    # the trained predictor reads keys captured from the model
    keys = capture_keys(model, torch.randint(3, 320, (1, 120)), [1])[1]
    ends = predict_boundaries(predictor, keys, 8)[0]
    assert ends[-1].item() == 120 and len(ends) <= 8


def test_training_with_a_key_cache_makes_the_same_weights_with_one_forward_per_sample(tmp_path, monkeypatch):
    """--key-cache: the label forward keeps each sample's keys, so training runs no LLM forward of its own, and
    the weights are those of a run that recomputes the keys every epoch."""
    from boundary_predictor import train

    data = random_documents(tmp_path / "data", seed=2, count=4)
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()

    def argv(name):
        return ["--model", "tiny-llama", "--data-dir", str(data), "--max-length", "96", "--min-length", "48",
                "--cache-dir", str(tmp_path / f"cache_{name}"), "--run-dir", str(tmp_path / f"run_{name}"),
                "--out", str(tmp_path / f"{name}.pt"), "--val-fraction", "0.25", "--d-model", "32", "--hidden", "32",
                "--device", "cpu", "--topk", "10", "--epochs", "2"]

    plain = load_predictor(train.main(argv("plain"), model=model, tokenizer=tokenizer)["out"])
    captures = []
    real_capture = train.capture_keys
    monkeypatch.setattr(train, "capture_keys", lambda *a: captures.append(1) or real_capture(*a))
    cached = load_predictor(train.main(argv("cached") + ["--key-cache", str(tmp_path / "keys")], model=model,
                                       tokenizer=tokenizer)["out"])
    assert captures == [] and len(list((tmp_path / "keys").glob("*.pt"))) >= 3
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(cached.state_dict()[name], value)
