"""Sharded runs (utils/runs/sharding.py): which rank takes which work, which device, the file lock that lets ranks append
to one results file (utils/runs/records.py). The runners under torchrun with two processes: tests/test_resume.py (needle,
LongBench) and tests/test_ruler.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from utils.runs import append_jsonl, locked, read_jsonl
from utils.runs.sharding import Shard, distributed

REPO = Path(__file__).resolve().parents[1]


def test_one_process_without_torchrun():
    assert Shard.from_env({}) == Shard(0, 1, 0)
    shard = Shard.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (shard.rank, shard.world_size, shard.local_rank, shard.is_main) == (3, 4, 1, False)
    assert Shard().is_main and Shard().label("dense") == "dense" and shard.label("dense") == "dense [rank 3/4]"
    for bad in ({"WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"}, {"RANK": "2", "WORLD_SIZE": "2"}):
        with pytest.raises(ValueError, match="torchrun"):
            Shard.from_env(bad)


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_slices_are_disjoint_and_cover_the_work(world_size):
    items = [(run, sample) for run in ("dense", "dhsa") for sample in range(10)]
    slices = [Shard(rank, world_size).take(items) for rank in range(world_size)]
    assert sorted(item for part in slices for item in part) == sorted(items)       # each item exactly once
    assert all(len(part) in (len(items) // world_size, -(-len(items) // world_size)) for part in slices)  # balanced
    assert slices[0][0] == items[0] and all(part == sorted(part, key=items.index) for part in slices)


def test_device_per_rank_without_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Shard().device("cuda:1") == "cuda:1"                  # one process: as asked
    shard = Shard(1, 2, 1)
    assert shard.device("cpu") == "cpu" and shard.device("auto") == "cpu"
    assert shard.device("cuda") == "cuda"                        # load_model then says CUDA is missing
    with pytest.raises(ValueError, match="--device cuda"):
        shard.device("cuda:0")


def test_device_per_rank_with_gpus(monkeypatch):
    import torch

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert Shard(1, 2, 1).device("auto") == "cuda:1" and Shard(0, 2, 0).device("cuda") == "cuda:0"
    assert chosen == [1, 0]
    with pytest.raises(ValueError, match="NPROC=2"):
        Shard(2, 3, 2).device("cuda")


def test_one_process_needs_no_process_group():
    import torch.distributed as dist

    with distributed(Shard()) as shard:
        shard.barrier()
        with shard.main_first():
            pass
        assert not dist.is_initialized()


APPEND = ("import sys; sys.path.insert(0, {repo!r}); from utils.runs import append_jsonl\n"
          "print('ready', flush=True)\n"
          "append_jsonl({path!r}, {{'writer': 'other'}})\n")


def test_append_waits_for_the_lock(tmp_path):
    """A process appending to a file another process holds locked waits until it is released."""
    path = tmp_path / "r.jsonl"
    append_jsonl(path, {"writer": "me", "i": 0})
    with locked(path):
        other = subprocess.Popen([sys.executable, "-c", APPEND.format(repo=str(REPO), path=str(path))],
                                 stdout=subprocess.PIPE, text=True)
        assert other.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        assert other.poll() is None and len(read_jsonl(path)) == 1, "the append did not wait for the lock"
        with open(path, "ab") as f:                                  # the holder writes while the other waits
            f.write(b'{"writer": "me", "i": 1}\n')
    other.wait(timeout=30)
    assert other.returncode == 0
    assert [r["writer"] for r in read_jsonl(path)] == ["me", "me", "other"]


WRITER = ("import sys; sys.path.insert(0, {repo!r}); from utils.runs import append_jsonl\n"
          "for i in range({n}):\n"
          "    append_jsonl({path!r}, {{'writer': {w}, 'i': i, 'text': 'x' * (100_000 + 997 * i)}})\n")


def test_concurrent_appends_keep_every_record_whole(tmp_path):
    """Three processes appending large records to one file: every record there once, every line whole."""
    path, n = tmp_path / "r.jsonl", 40
    writers = [subprocess.Popen([sys.executable, "-c", WRITER.format(repo=str(REPO), n=n, path=str(path), w=w)])
               for w in range(3)]
    assert [p.wait(timeout=120) for p in writers] == [0, 0, 0]
    data = path.read_bytes()
    records = [json.loads(line) for line in data.decode().splitlines()]
    assert data.endswith(b"\n") and sorted((r["writer"], r["i"]) for r in records) == \
        [(w, i) for w in range(3) for i in range(n)]
    assert all(len(r["text"]) == 100_000 + 997 * r["i"] for r in records)


# ---- the sweep scripts ----------------------------------------------------------------------------------

def script_calls(tmp_path, script: str, env: dict, *args) -> list[str]:
    """The python command lines a sweep script runs, with a stand-in PYTHON that only logs its arguments."""
    log, fake = tmp_path / "calls.log", tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    result = subprocess.run(["bash", str(REPO / "scripts" / script), *args], cwd=tmp_path, capture_output=True,
                            text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake), **env})
    assert result.returncode == 0, result.stderr
    return log.read_text().splitlines()


def test_longbench_sweep_is_the_papers_runs(tmp_path):
    calls = script_calls(tmp_path, "run_longbench.sh", {}, "--data-dir", "D")
    table_2_4 = ("dense dhsa dhsa_no_robust_repr dhsa_fixed_chunks block_sparse streaming streaming_dilated "
                 "streaming_strided vertical_slash flexprefill xattention")
    common = "--decode dense --output-dir results_longbench --chinese --data-dir D"
    assert calls == [
        f"run_longbench.py --model qwen2.5-coder-1.5b-instruct --methods {table_2_4} --densities 0.125 {common}",
        f"run_longbench.py --model qwen2.5-coder-1.5b-instruct --methods dhsa --densities 0.0625 0.25 {common}",
        "eval_longbench.py --results-dir results_longbench"]


@pytest.mark.parametrize("script", ["run_longbench.sh", "run_needle_in_haystack.sh", "run_ruler.sh"])
def test_sweeps_launch_torchrun_when_nproc_is_above_one(tmp_path, script):
    one = script_calls(tmp_path, script, {"MODELS": "m", "NPROC": "1"})
    (tmp_path / "calls.log").unlink()
    two = script_calls(tmp_path, script, {"MODELS": "m", "NPROC": "2"})
    runner = script.removeprefix("run_").removesuffix(".sh")
    torchrun = "-m torch.distributed.run --standalone --nproc-per-node 2 "
    assert one and all(c.startswith(("run_", "eval_")) for c in one)
    assert two == [torchrun + c if c.startswith("run_") else c for c in one]
    assert all(f"run_{runner}.py --model m" in c for c in two if c.startswith(torchrun))
    bad = subprocess.run(["bash", str(REPO / "scripts" / script)], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": "false", "NPROC": "two"})
    assert bad.returncode == 2 and "NPROC must be a positive whole number" in bad.stderr
