"""--rope-scaling (YaRN context extension): the spec, what reaches the model, refusals, and the NIAH runner's records,
folders and length checks. Tiny models on CPU, no network."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

import run_needle_in_haystack as runner
import visualize_needle_in_haystack as viz
from utils.runs.cli import results_folder_name, parse_length
from utils.models import TINY_MAX_POSITIONS, load_model, published_config, tiny_config, tiny_model, tiny_tokenizer
from utils.models.rope_scaling import RopeScaling, apply_rope_scaling, parse_rope_scaling

REPO = Path(__file__).resolve().parents[1]


# ---- the spec -------------------------------------------------------------------------------------------

def test_parse_rope_scaling():
    scaling = parse_rope_scaling("yarn:4")
    assert scaling == RopeScaling("yarn", 4.0) and str(scaling) == "yarn:4" and scaling.label == "yarn4"
    assert parse_rope_scaling(" YaRN:2.5 ") == RopeScaling("yarn", 2.5)
    assert parse_rope_scaling("yarn:2.5").label == "yarn2.5"
    assert parse_rope_scaling(str(scaling)) == scaling and parse_rope_scaling(scaling) is scaling
    for nothing in (None, "", "none", "off"):
        assert parse_rope_scaling(nothing) is None
    assert results_folder_name("qwen2.5-coder-1.5b-instruct", scaling) == "qwen2.5-coder-1.5b-instruct_yarn4"
    assert results_folder_name("/models/qwen/", "yarn:2") == "qwen_yarn2" and results_folder_name("m", None) == "m"


@pytest.mark.parametrize("spec, message", [
    ("yarn", "needs a factor above 1"), ("yarn:", "needs a factor above 1"), ("yarn:1", "needs a factor above 1"),
    ("yarn:0.5", "needs a factor above 1"), ("yarn:x", "needs a factor above 1"), ("yarn:inf", "needs a factor"),
    ("yarn:nan", "needs a factor"), ("linear:2", "unknown RoPE scaling"), ("4", "unknown RoPE scaling"),
])
def test_bad_specs_are_one_line_errors(spec, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_rope_scaling(spec)
    assert "\n" not in str(err.value) and "yarn:4" in str(err.value)  # names the fix


# ---- what reaches the model ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_yarn_reaches_the_rotary_embedding(family):
    plain = tiny_model(family)
    config = apply_rope_scaling(tiny_config(family), "yarn:4")
    assert config.max_position_embeddings == 4 * TINY_MAX_POSITIONS
    assert config.rope_parameters == {"rope_theta": plain.config.rope_parameters["rope_theta"], "rope_type": "yarn",
                                      "factor": 4.0, "original_max_position_embeddings": TINY_MAX_POSITIONS}
    scaled = tiny_model(family, rope_parameters=config.rope_parameters,
                        max_position_embeddings=config.max_position_embeddings)
    rotary, plain_rotary = scaled.model.rotary_emb, plain.model.rotary_emb
    assert plain_rotary.attention_scaling == 1.0
    assert rotary.attention_scaling == pytest.approx(0.1 * math.log(4) + 1)  # YaRN's logit temperature
    # high frequencies (first dims) are kept, the lowest ones are interpolated: divided by the factor
    torch.testing.assert_close(rotary.inv_freq[0], plain_rotary.inv_freq[0])
    torch.testing.assert_close(rotary.inv_freq[-1], plain_rotary.inv_freq[-1] / 4)
    ids = torch.arange(3, 60).unsqueeze(0)
    with torch.no_grad():
        assert not torch.allclose(scaled(ids).logits, plain(ids).logits, atol=1e-4)


def test_load_model_applies_scaling_without_changing_the_folder(tmp_path):
    tiny_model("qwen2", seed=1).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    saved = (tmp_path / "config.json").read_text()
    plain, tok = load_model(str(tmp_path))
    scaled, scaled_tok = load_model(str(tmp_path), rope_scaling="yarn:2")
    assert (tmp_path / "config.json").read_text() == saved  # the folder (e.g. the converted cache) is untouched
    assert scaled.config.max_position_embeddings == scaled_tok.model_max_length == 2 * TINY_MAX_POSITIONS
    assert scaled.config.rope_parameters["rope_type"] == "yarn"
    assert scaled.model.rotary_emb.attention_scaling == pytest.approx(0.1 * math.log(2) + 1)
    assert plain.config.max_position_embeddings == tok.model_max_length == TINY_MAX_POSITIONS
    assert plain.model.rotary_emb.attention_scaling == 1.0
    again, _ = load_model(str(tmp_path))  # a scaled load leaves nothing behind for the next one
    assert again.config.rope_parameters["rope_type"] == "default"
    torch.testing.assert_close(again.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq)


def test_qwen25_models_reach_128k():
    for name in ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct", "qwen2.5-3b-instruct"):
        config = apply_rope_scaling(published_config(name), "yarn:4")
        assert config.max_position_embeddings == 131072 == parse_length("128K")
        assert config.rope_parameters["original_max_position_embeddings"] == 32768


@pytest.mark.parametrize("config, message", [
    (lambda: tiny_config("gemma3"), "RoPE per layer type"),
    (lambda: published_config("gemma-3-270m"), "RoPE per layer type"),
    (lambda: tiny_config("gemma2"), "sliding-window layers"),
    (lambda: published_config("llama-3.1-8b-instruct"), "already uses llama3 RoPE scaling"),
    (lambda: AutoConfig.for_model("mistral"), "not supported for mistral"),
])
def test_models_it_does_not_fit_are_refused(config, message):
    config = config()
    before = json.dumps(config.to_dict(), sort_keys=True, default=str)
    with pytest.raises(ValueError, match=message) as err:
        apply_rope_scaling(config, "yarn:4")
    assert "\n" not in str(err.value) and "--rope-scaling" in str(err.value)
    assert json.dumps(config.to_dict(), sort_keys=True, default=str) == before  # refused before any change


# ---- the NIAH runner -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def essays_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("essays")
    text = " ".join(f"Sentence number {i} talks about startups and essays." for i in range(300))
    (folder / "essay.txt").write_text(text + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-qwen"
    tiny_model("qwen2").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def niah(folder, out, essays_dir, *extra) -> list[str]:
    return ["--model", str(folder), "--device", "cpu", "--methods", "dense", "--depths", "0", "100",
            "--haystack-dir", str(essays_dir), "--output-dir", str(out), "--max-new-tokens", "2",
            "--prompt-style", "completion", *extra]


def test_runner_records_rope_scaling_and_keeps_runs_apart(tmp_path, tiny_folder, essays_dir, monkeypatch):
    past_native = str(TINY_MAX_POSITIONS + 1024)  # beyond the tiny model's 8192 positions
    runner.main(niah(tiny_folder, tmp_path, essays_dir, "--lengths", "512", past_native, "--rope-scaling", "yarn:2"))
    runner.main(niah(tiny_folder, tmp_path, essays_dir, "--lengths", "512"))
    scaled = [json.loads(line) for line in (tmp_path / "tiny-qwen_yarn2" / "dense.jsonl").read_text().splitlines()]
    plain = [json.loads(line) for line in (tmp_path / "tiny-qwen" / "dense.jsonl").read_text().splitlines()]
    assert sorted((r["length"], r["depth"]) for r in scaled) == [(512, 0.0), (512, 100.0), (9216, 0.0), (9216, 100.0)]
    assert all(r["rope_scaling"] == "yarn:2" and r["model"] == "tiny-qwen" for r in scaled)
    assert max(r["prompt_tokens"] for r in scaled) > TINY_MAX_POSITIONS
    assert [r["rope_scaling"] for r in plain] == [None, None]  # the unscaled run did not resume the scaled one

    # a rerun resumes its own folder: nothing left to generate
    calls = []
    real = runner.generate_answer
    monkeypatch.setattr(runner, "generate_answer", lambda *a, **k: calls.append(1) or real(*a, **k))
    runner.main(niah(tiny_folder, tmp_path, essays_dir, "--lengths", "512", "--rope-scaling", "yarn:2"))
    assert calls == []
    # one file, two settings: refused instead of mixed
    with pytest.raises(SystemExit, match="other rope_scaling"):
        runner.main(niah(tiny_folder, tmp_path, essays_dir, "--lengths", "512", "--rope-scaling", "yarn:4",
                         "--output", str(tmp_path / "tiny-qwen_yarn2" / "dense.jsonl")))


def test_runner_length_errors_name_rope_scaling(tiny_folder, essays_dir, tmp_path):
    with pytest.raises(SystemExit) as err:  # past the native length, without scaling
        runner.main(niah(tiny_folder, tmp_path, essays_dir, "--lengths", "9K"))
    assert "--rope-scaling yarn:2" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SystemExit) as err:  # past the scaled length: the factor it would take
        runner.main(niah(tiny_folder, tmp_path, essays_dir, "--lengths", "20K", "--rope-scaling", "yarn:2"))
    assert "(with --rope-scaling yarn:2)" in str(err.value) and "--rope-scaling yarn:3" in str(err.value)
    assert not list(tmp_path.rglob("*.jsonl"))


@pytest.mark.parametrize("flags, message", [
    (["--model", "qwen2.5-coder-1.5b-instruct", "--lengths", "32K", "64K"], "--rope-scaling yarn:2"),
    (["--model", "qwen2.5-coder-1.5b-instruct", "--lengths", "128K", "--rope-scaling", "yarn:2"], "yarn:4"),
    (["--model", "gemma-3-270m", "--rope-scaling", "yarn:4"], "RoPE per layer type"),
])
def test_known_models_are_checked_before_loading(flags, message, essays_dir, monkeypatch):
    monkeypatch.setattr("utils.models.load_model", lambda *a, **k: pytest.fail("model loaded before the checks"))
    with pytest.raises(SystemExit) as err:
        runner.main(flags + ["--haystack-dir", str(essays_dir)])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_lengths_to_128k_plan_with_yarn():
    args = runner.parse_args(["--lengths", "32K", "64K", "96K", "128K", "--rope-scaling", "yarn:4"])
    assert runner.plan_lengths(args, 131072) == [32768, 65536, 98304, 131072]
    assert str(args.rope_scaling) == "yarn:4"
    assert runner.plan_lengths(runner.parse_args(["--rope-scaling", "yarn:4"]), 131072)[-1] == 131072  # 1K..128K
    with pytest.raises(SystemExit):
        runner.parse_args(["--rope-scaling", "yarn:1"])


def test_heatmap_labels_reach_128k_and_name_the_scaling(tmp_path):
    lengths = [1024 * 2 ** i for i in range(8)] + [98304]
    path = tmp_path / "m_yarn4" / "dense.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps({"model": "m", "method": "dense", "density": 1.0, "length": n, "depth": d,
                                        "score": 100.0, "exact_match": True, "rope_scaling": "yarn:4"}) + "\n"
                            for n in lengths for d in (0.0, 100.0)))
    frame = viz.load_run(path)
    fig, ax = viz.plt.subplots()
    viz.draw_heatmap(ax, frame, viz._model(frame))
    labels = [t.get_text() for t in ax.get_xticklabels()]
    viz.plt.close(fig)
    assert labels == ["1K", "2K", "4K", "8K", "16K", "32K", "64K", "96K", "128K"]
    assert viz._model(frame) == "m, yarn:4"
    assert viz.plot_run(path).is_file()


def test_sweep_script_passes_rope_scaling_and_lengths(tmp_path):
    log, fake = tmp_path / "calls.log", tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "MODELS": "qwen2.5-coder-1.5b-instruct", "METHODS": "dense",
           "DECODES": "dense", "ROPE_SCALING": "yarn:4", "LENGTHS": "32K 64K 96K 128K"}
    result = subprocess.run(["bash", str(REPO / "scripts" / "run_needle_in_haystack.sh"), "--depths", "0"],
                            cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines() == [
        "run_needle_in_haystack.py --model qwen2.5-coder-1.5b-instruct --methods dense --densities 0.0625 "
        "--min-budget 512 --decode dense --output-dir results_needle --lengths 32K 64K 96K 128K "
        "--rope-scaling yarn:4 --depths 0"]
