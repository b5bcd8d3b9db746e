"""Sharded runs (utils/sharding.py): which rank takes which work, which device, the file lock that lets ranks append
to one results file (utils/runs.py). The runners under torchrun with two processes: tests/test_resume.py (needle,
LongBench) and tests/test_ruler.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from utils.runs import append_jsonl, locked, read_jsonl
from utils.sharding import Shard, distributed

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
