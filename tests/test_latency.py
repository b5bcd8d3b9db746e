"""Latency benchmark (run_latency_test.py, utils/bench/latency_methods.py, utils/bench/latency.py) on the CPU: the method table
covers the registry and selects as a patched model does, its one timing loop writes the rows of the CSV, bad flags
give one-line errors. The GPU-only block variants run under Triton's CPU interpreter in a subprocess."""

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run_latency_test
from utils import kernels
from utils.attention import sparse_attention
from utils.config import DHSAOptions, SparseAttentionConfig
from utils.methods.dhsa.select import dhsa_select
from utils.bench.latency_methods import (CPU_DEFAULTS, KERNEL_DEFAULTS, LAYER_METHODS, fixed_boundaries, layer_contexts,
                                   reference)
from utils.methods import METHODS, LayerContext
from utils.selection import KernelSelection

ROOT = Path(__file__).resolve().parents[1]


def qkv(L, Hq=4, Hkv=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, Hq, L, D, generator=g), torch.randn(1, Hkv, L, D, generator=g),
            torch.randn(1, Hkv, L, D, generator=g))


def test_table_covers_the_registry():
    for name, method in METHODS.items():
        if method.select is not None and not method.dense_prefill:
            assert LAYER_METHODS[name].select is not None and not LAYER_METHODS[name].dense, name
    assert "quest" not in LAYER_METHODS  # sparse at decode only: no prefill selection to time
    assert set(KERNEL_DEFAULTS) <= set(LAYER_METHODS) and set(CPU_DEFAULTS) <= set(LAYER_METHODS)
    assert [n for n, m in LAYER_METHODS.items() if m.dense] == ["sdpa", "sdpa_default", "sdpa_flash", "sdpa_cudnn"]
    assert {n for n, m in LAYER_METHODS.items() if m.cuda_only} == {"sdpa_flash", "sdpa_cudnn", "dhsa_block",
                                                                   "dhsa_block_flex"}
    assert not LAYER_METHODS["dhsa_block_flex"].softcap and LAYER_METHODS["dhsa_block"].softcap
    assert not LAYER_METHODS["dhsa_sdpa"].kernels


def test_dhsa_selects_as_the_model_does_and_as_before():
    """The table's DHSA is the registry's; at default options it keeps what the old benchmark's direct call kept."""
    q, k, v = qkv(300)
    config = SparseAttentionConfig(density=0.125)
    first, later = layer_contexts()
    got = LAYER_METHODS["dhsa"].select(q, k, v, config, first)
    again = LAYER_METHODS["dhsa"].select(q, k, v, config, later())  # a later layer reuses the boundaries
    model = METHODS["dhsa"].select(q, k, config, LayerContext())
    options = DHSAOptions(query_chunk=config.query_chunk, query_pooling=config.query_pooling,
                          robust_chunk_repr=config.robust_chunk_repr, sink_tokens=config.sink_tokens,
                          local_tokens=config.local_tokens, share_heads=config.share_heads)
    before = dhsa_select(q, k, budget=config.resolve_budget(300), boundaries=fixed_boundaries(k, config),
                         options=options)
    assert torch.equal(got.key_index, model.key_index) and torch.equal(got.key_index, before.key_index)
    assert torch.equal(again.key_index, got.key_index)


def test_block_sparse_runs_as_whole_blocks():
    """block_sparse's selection is handed over in block form (the GPU runs it through the block kernel); on the
    CPU it is written back to tokens, and both give the registry selection's output."""
    q, k, v = qkv(256)
    config = SparseAttentionConfig(method="block_sparse", density=0.25, block_size=32)
    method = LAYER_METHODS["block_sparse"]
    plan = method.select(q, k, v, config, LayerContext())
    assert isinstance(plan, KernelSelection) and plan.block_size == 32
    tokens = METHODS["block_sparse"].select(q, k, config, LayerContext())
    expected = sparse_attention(q, k, v, tokens)
    torch.testing.assert_close(method.attend(q, k, v, plan, None, None), expected)
    torch.testing.assert_close(reference(q, k, v, plan), expected)


@pytest.mark.parametrize("name", [n for n, m in LAYER_METHODS.items() if not m.cuda_only])
def test_every_cpu_method_runs_through_the_timing_loop(name, tmp_path):
    q, k, v = qkv(128)
    args = argparse.Namespace(device="cpu", warmup=0, repeats=1, softcap=True)
    results = run_latency_test.Results(tmp_path, "cpu", "cpu", "test")
    shape = dict(name="tiny", heads=4, kv_heads=2, head_dim=16, scale=None, softcap=None)
    dense_ms = {"sdpa": 2.0}
    config = SparseAttentionConfig(density=0.25, block_size=32)
    row = dict(shape="tiny", dtype="fp32", batch=1, length=128, density=0.25)
    run_latency_test.time_method(LAYER_METHODS[name], q, k, v, config, row, shape, args, results, dense_ms)
    parts = [r["part"] for r in results.rows]
    if LAYER_METHODS[name].dense:
        assert parts == ["total"] and dense_ms[name] > 0
        assert dense_ms[name] == pytest.approx(results.rows[0]["median_ms"], abs=1e-4)  # the CSV rounds
    else:
        assert parts == ["select", "attn", "total"], results.rows
        select, attn, total = results.rows
        assert total["median_ms"] == pytest.approx(select["median_ms"] + attn["median_ms"], abs=1e-3)
        assert total["speedup_vs_dense"] == pytest.approx(2.0 / total["median_ms"], rel=1e-3)
        assert "total = median select + median attn" in total["note"]


def test_cpu_mode_writes_the_csv(tmp_path):
    run_latency_test.main(["--mode", "cpu", "--lengths", "160", "--densities", "0.25", "--methods", "sdpa", "dhsa",
                           "streaming", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    [path] = tmp_path.glob("cpu_*.csv")
    rows = list(csv.DictReader(path.open()))
    assert [(r["method"], r["part"]) for r in rows] == [
        ("sdpa", "total"), ("dhsa", "select"), ("dhsa", "attn"), ("dhsa", "total"),
        ("streaming", "select"), ("streaming", "attn"), ("streaming", "total")]
    assert {r["shape"] for r in rows} == {"smollm2-135m"} and all(float(r["median_ms"]) > 0 for r in rows)
    assert rows[3]["speedup_vs_dense"] and not rows[3]["speedup_vs_flash"]


def test_csv_is_named_by_the_cpu_model(monkeypatch, tmp_path):
    """Runs on different CPUs behind one box never share a CSV: the file is named by /proc/cpuinfo's model name,
    made filename-safe; without one, by the platform's machine name."""
    import utils.bench.latency as latency
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8488C CPU @ 2.40GHz\n")
    monkeypatch.setattr(latency, "_CPUINFO", str(cpuinfo))
    assert latency.device_name("cpu") == "Intel_Xeon_Platinum_8488C"
    cpuinfo.write_text("processor\t: 0\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n\nprocessor\t: 1\n")
    assert latency.device_name("cpu") == "AMD_EPYC_f25m17"  # a name without a model number: family and model
    cpuinfo.write_text("processor\t: 0\n")
    monkeypatch.setattr(latency.platform, "processor", lambda: "")
    monkeypatch.setattr(latency.platform, "machine", lambda: "x86_64")
    assert latency.device_name("cpu") == "x86_64"


@pytest.mark.parametrize("flags, message", [
    (["--mode", "cpu", "--methods", "dhsa_block"], "dhsa_block need\\(s\\) a CUDA GPU"),
    (["--mode", "cpu", "--methods", "nope"], "unknown method\\(s\\) \\['nope'\\]; choose from sdpa, .*dhsa_block"),
    (["--mode", "cpu", "--shape", "nope"], r"unknown shape 'nope'; choose a model of utils/models/specs.py \(.*qwen.*\) or give HqxHkvxD"),
    (["--mode", "cpu", "--kernel-configs", "[{}]"], "use it with --mode kernel"),
])
def test_bad_flags_give_one_line_errors(flags, message):
    with pytest.raises(SystemExit, match=message) as err:
        run_latency_test.parse_args(flags)
    assert "\n" not in str(err.value)


def test_shape_aliases_come_from_the_model_table():
    assert run_latency_test.layer_shape("llama-3.1-8b")["name"] == "llama-3.1-8b-instruct"
    assert run_latency_test.parse_args(["--mode", "cpu"]).methods == list(CPU_DEFAULTS)
    args = run_latency_test.parse_args(["--mode", "cpu", "--shape", "qwen2.5-coder-1.5b-instruct"])
    assert run_latency_test.layer_shape(args.shape)["head_dim"] == 128


_INTERPRETER_CHECK = """
import torch
from utils.kernels._interpreter import fix_interpreter
fix_interpreter()
from utils.config import DHSAOptions, SparseAttentionConfig
from utils.methods.dhsa.fused import dhsa_block_select
from utils.bench.latency_methods import LAYER_METHODS, fixed_boundaries, plan_selection, reference

g = torch.Generator().manual_seed(0)
q, k, v = torch.randn(1, 4, 256, 16, generator=g), torch.randn(1, 2, 256, 16, generator=g), \\
    torch.randn(1, 2, 256, 16, generator=g)
config = SparseAttentionConfig(density=0.25, block_size=32, sink_tokens=32, local_tokens=32)
direct = dhsa_block_select(q, k, budget=64, boundaries=fixed_boundaries(k, config), block_size=32,
                           options=DHSAOptions(sink_tokens=32, local_tokens=32))
for name in ("dhsa_block", "dhsa_block_flex"):
    method = LAYER_METHODS[name]
    plan = method.select(q, k, v, config, None)
    assert torch.equal(plan_selection(plan).key_index, direct.key_index), name
    err = (method.attend(q, k, v, plan, None, None) - reference(q, k, v, plan)).norm() / reference(q, k, v, plan).norm()
    assert err < 1e-5, (name, err)
print("ok")
"""


@pytest.mark.skipif(not kernels.triton_available(), reason="triton is not installed")
def test_block_variants_under_triton_interpreter():
    """dhsa_block's Triton selection and dhsa_block_flex's FlexAttention plan, on the CPU through the interpreter:
    the table selects what dhsa_block_select selects, and both attend to what the executor computes."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", _INTERPRETER_CHECK], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ decode mode

def test_decode_step_runs_the_registry_decode_with_the_selection_inside():
    """DecodeStep is run_method's sparse decode step (Algorithm 2 for DHSA: the prompt's chunks in the layer state,
    the new token reading at most N_b keys, itself included), and each call selects again for its query."""
    from utils.bench.latency_decode import DecodeStep, decode_inputs
    from utils.methods import run_method

    shape = dict(name="tiny", heads=4, kv_heads=2, head_dim=16, scale=None, softcap=None)
    q, k, v = decode_inputs(shape, 1, 400, torch.float32, "cpu", seed=0)
    config = SparseAttentionConfig(density=0.125)
    step = DecodeStep("dhsa", q, k, v, config)
    assert step.config.decode == "sparse" and step.context.state["dhsa"]["prompt_len"] == 399
    selection = step.select()
    kept = selection.key_index[0, :, 0]
    assert selection.key_index.shape[-1] == config.resolve_budget(400) and (kept == 399).any(-1).all()
    context = LayerContext()
    expected = run_method(METHODS["dhsa"], q, k, v, config.replace(decode="sparse"), context)
    torch.testing.assert_close(step(), expected)
    torch.testing.assert_close(step(), step.attend(selection))
    assert not torch.equal(step(), run_method(METHODS["dhsa"], q, k, v, config, LayerContext()))  # dense decode

    other = decode_inputs(shape, 1, 400, torch.float32, "cpu", seed=1)[0]
    step.q = other
    new_selection = step.select()
    assert not torch.equal(new_selection.key_index, selection.key_index)
    torch.testing.assert_close(step(), step.attend(new_selection))


def test_pinned_dense_decode_reads_each_kv_head_for_its_group():
    """The pinned SDPA entries pass a GQA group's heads as queries of their KV head: the same output as dense
    attention with K/V shared per group (here on SDPA's math backend, which the CPU has)."""
    from utils.attention import dense_attention
    from utils.bench.latency_decode import _pinned, decode_inputs

    shape = dict(name="tiny", heads=6, kv_heads=2, head_dim=16, scale=None, softcap=None)
    q, k, v = decode_inputs(shape, 2, 50, torch.float32, "cpu", seed=3)
    torch.testing.assert_close(_pinned("math")(q, k, v, 0.3, None), dense_attention(q, k, v, scale=0.3))


def test_decode_mode_writes_and_resumes_the_csv(tmp_path):
    flags = ["--mode", "decode", "--device", "cpu", "--lengths", "300", "--densities", "0.25", "--methods", "sdpa",
             "dhsa", "quest", "streaming", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]
    run_latency_test.main(flags)
    [path] = tmp_path.glob("decode_*.csv")
    rows = list(csv.DictReader(path.open()))
    assert [(r["method"], r["part"]) for r in rows] == [("sdpa", "total")] + [
        (m, part) for m in ("dhsa", "quest", "streaming") for part in ("select", "attn", "total")]
    assert {r["shape"] for r in rows} == {"smollm2-135m"} and {r["decode"] for r in rows} == {"sparse"}
    assert all(float(r["median_ms"]) > 0 for r in rows) and rows[0]["density"] == "1.0"
    dense = float(rows[0]["min_ms"])  # on the CPU the steps run interleaved; speed-ups from the minima
    assert all("interleaved" in r["note"] for r in rows)
    for r in rows[1:]:
        if r["part"] == "total":
            # the CSV rounds milliseconds to 1e-4 (each off by <= 5e-5); the speed-up was computed before rounding
            ms = float(r["min_ms"])
            assert float(r["speedup_vs_dense"]) == pytest.approx(dense / ms, rel=1e-4 / min(dense, ms) + 1e-6)
            assert not r["speedup_vs_flash"] and not r["rel_err"]  # no flash on the CPU; error checked on the GPU
    assert path.with_suffix(".png").is_file()

    run_latency_test.main(flags)  # everything measured: nothing is timed again
    assert len(list(csv.DictReader(path.open()))) == len(rows)
    run_latency_test.main(flags[:5] + ["300", "400"] + flags[6:])  # a new cache length: only it is timed
    assert [r["length"] for r in csv.DictReader(path.open())][len(rows):] == ["400"] * len(rows)


@pytest.mark.parametrize("flags, message", [
    (["--mode", "decode", "--device", "cpu", "--methods", "sdpa_flash"], "sdpa_flash need\\(s\\) a CUDA GPU"),
    (["--mode", "decode", "--device", "cpu", "--methods", "dhsa_block"],
     "unknown decode method\\(s\\) \\['dhsa_block'\\]; choose from sdpa, sdpa_flash, sdpa_cudnn, .*quest"),
    (["--mode", "decode", "--device", "cpu", "--lengths", "1"], "a KV cache of at least 2 keys"),
])
def test_decode_bad_flags_give_one_line_errors(flags, message):
    with pytest.raises(SystemExit, match=message) as err:
        run_latency_test.parse_args(flags)
    assert "\n" not in str(err.value)


def test_decode_defaults():
    args = run_latency_test.parse_args(["--mode", "decode", "--device", "cpu"])
    assert args.methods == ["sdpa", "dhsa", "quest", "streaming"] and args.shape == "smollm2-135m"
    assert args.lengths == [4096, 8192, 16384] and args.dtype == "fp32"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_mode_on_cuda(tmp_path):
    """Every default entry on the GPU at small caches: dense backends agree, sparse steps match the executor."""
    from utils.bench.latency_decode import DENSE_DECODE, decode_inputs

    shape = run_latency_test.layer_shape("llama-3.1-8b")
    q, k, v = decode_inputs(shape, 1, 4096, torch.bfloat16, "cuda", seed=0)
    ref = DENSE_DECODE["sdpa"].attend(q, k, v, None, None)
    for name in ("sdpa_flash", "sdpa_cudnn"):
        try:
            out = DENSE_DECODE[name].attend(q, k, v, None, None)
        except RuntimeError as exc:  # cuDNN may not take a single query on every version: the mode writes an error row
            assert name == "sdpa_cudnn", exc
            continue
        assert run_latency_test.rel_err(out, ref) < 1e-2, name
    run_latency_test.main(["--mode", "decode", "--lengths", "4096", "8192", "--densities", "0.0625", "--repeats",
                           "3", "--warmup", "1", "--out", str(tmp_path)])
    [path] = tmp_path.glob("decode_*.csv")
    rows = list(csv.DictReader(path.open()))
    totals = [r for r in rows if r["part"] == "total" and r["method"] in ("dhsa", "quest", "streaming")]
    assert len(totals) == 6 and all(r["speedup_vs_dense"] and r["speedup_vs_flash"] for r in totals)
    assert all(float(r["rel_err"]) < 1e-2 for r in totals)


def test_cpu_mode_interleaves_several_shapes(tmp_path):
    run_latency_test.main(["--mode", "cpu", "--shape", "4x2x16", "6x2x16", "--lengths", "160", "--densities", "0.25",
                           "--methods", "sdpa", "dhsa", "--repeats", "2", "--warmup", "0", "--threads", "1", "--clock", "process",
                           "--out", str(tmp_path)])
    [path] = tmp_path.glob("cpu_*.csv")
    rows = list(csv.DictReader(path.open()))
    assert [(r["shape"], r["method"], r["part"]) for r in rows] == [
        (shape, m, p) for shape in ("4x2x16", "6x2x16")
        for m, p in (("sdpa", "total"), ("dhsa", "select"), ("dhsa", "attn"), ("dhsa", "total"))]
    assert all("interleaved, 2 runs" in r["note"] and "1 threads" in r["note"] and "CPU time" in r["note"] for r in rows)
    for r in rows:
        assert float(r["min_ms"]) <= float(r["median_ms"]) <= float(r["max_ms"])
    assert all(r["speedup_vs_dense"] for r in rows if r["part"] == "total")


def test_several_shapes_only_for_layer_modes():
    with pytest.raises(SystemExit, match="takes one --shape"):
        run_latency_test.parse_args(["--mode", "decode", "--device", "cpu", "--shape", "4x2x16", "8x2x64"])


def test_e2e_on_the_cpu_times_attention_inside_the_prefill(tmp_path, capsys):
    run_latency_test.main(["--mode", "e2e", "--device", "cpu", "--models", "smollm2-135m", "--num-layers", "1",
                           "--e2e-methods", "dense", "dhsa", "--lengths", "128", "--densities", "0.25",
                           "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    [path] = tmp_path.glob("e2e_*.csv")
    rows = list(csv.DictReader(path.open()))
    assert [(r["method"], r["part"]) for r in rows] == [("dense", "prefill"), ("dense", "attn"), ("dhsa", "prefill"),
                                                        ("dhsa", "attn")]
    for prefill, attn in zip(rows[::2], rows[1::2]):
        assert 0 < float(attn["median_ms"]) < float(prefill["min_ms"])
        assert "% of the fastest prefill" in attn["note"] and "interleaved" in prefill["note"]
    assert "attention" in capsys.readouterr().out


def test_decode_step_keeps_the_chunk_vectors_between_steps():
    """On the CPU the timed DHSA decode step reads the prompt's chunk vectors from the layer state."""
    from utils.bench.latency_decode import DecodeStep, decode_inputs
    q, k, v = decode_inputs(dict(heads=4, kv_heads=2, head_dim=16), 1, 600, torch.float32, "cpu", seed=0)
    step = DecodeStep("dhsa", q, k, v, SparseAttentionConfig(density=0.125))
    entry = step.context.state["dhsa"]["decode_cache"]["chunks"][0]
    step()
    assert step.context.state["dhsa"]["decode_cache"]["chunks"][0] is entry and entry.n == 599
