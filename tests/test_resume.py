"""Kill and resume: each runner, SIGKILLed in the middle of writing a results line (and at a random moment), resumes
into a results file that holds every (sample, method) exactly once, every line parseable, with the scores of an
uninterrupted run. The runs are real: the runner's main() on a tiny random CPU model (tests/crash_harness.py) in a
subprocess that is killed, then resumed in this process."""

from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crash_harness import tiny_loader

REPO = Path(__file__).resolve().parents[1]
HARNESS = Path(__file__).with_name("crash_harness.py")

pytestmark = pytest.mark.filterwarnings("ignore:no boundary-predictor weights")


# ------------------------------------------------------------------------------------------------ helpers

class Runner:
    """One runner with its tiny model: started in a subprocess (to be killed) or run here (reference, resume)."""

    def __init__(self, module: str, family: str = "llama", max_positions: int | None = None,
                 chat_template: bool = False):
        self.module, self.family, self.max_positions, self.chat_template = module, family, max_positions, chat_template

    def start(self, args: list[str], log: Path, half_write: int | None = None, marker: Path | None = None):
        command = [sys.executable, str(HARNESS), self.module, "--family", self.family]
        if self.max_positions:
            command += ["--max-positions", str(self.max_positions)]
        if self.chat_template:
            command.append("--chat-template")
        if half_write is not None:
            command += ["--half-write", str(half_write), "--marker", str(marker)]
        with open(log, "wb") as out:
            return subprocess.Popen(command + ["--", *args], stdout=out, stderr=subprocess.STDOUT, cwd=REPO)

    def run_here(self, args: list[str]) -> None:
        import importlib

        import utils.models

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(utils.models, "load_model", tiny_loader(self.family, self.max_positions, self.chat_template))
            importlib.import_module(self.module).main(args)


def kill_when(process, ready, log: Path, timeout: float = 240.0, kill=None) -> bool:
    """SIGKILL `process` (or call kill()) as soon as ready() is true; returns False if it finished first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            if process.returncode != 0:
                pytest.fail(f"the run failed before it was killed:\n{log.read_text(errors='replace')[-3000:]}")
            return False
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no results write within {timeout:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.02)
    if process.poll() is not None:  # it finished while ready() waited (a random delay): nothing was killed
        return False
    if kill is None:
        os.kill(process.pid, signal.SIGKILL)
    else:
        kill()
    process.wait()
    return True


def crash_mid_write(runner: Runner, args: list[str], tmp_path: Path, write_number: int, results: Path) -> None:
    """Run until the `write_number`-th results write is half on disk, kill it, and check the file ends cut off."""
    marker = tmp_path / "half-written"
    process = runner.start(args, tmp_path / "killed.log", write_number, marker)
    assert kill_when(process, marker.exists, tmp_path / "killed.log"), "the run finished before the half write"
    assert process.returncode == -signal.SIGKILL
    assert not results.read_bytes().endswith(b"\n"), "the killed run should leave a cut-off last line"


def crash_at_random(runner: Runner, args: list[str], tmp_path: Path, results: Path, seed: int, max_delay: float):
    """Run until the first complete results line is on disk, wait a random (seeded) moment, kill it."""
    delay = random.Random(seed).uniform(0, max_delay)
    process = runner.start(args, tmp_path / "killed.log")

    def ready() -> bool:
        if not (results.is_file() and b"\n" in results.read_bytes()):
            return False
        time.sleep(delay)
        return True

    if kill_when(process, ready, tmp_path / "killed.log"):
        assert process.returncode == -signal.SIGKILL


def jsonl_records(path: Path) -> list[dict]:
    """Every line of a results file, which must all be whole JSON objects (nothing cut off, nothing glued)."""
    data = path.read_bytes()
    assert data.endswith(b"\n"), f"{path} ends with a cut-off line"
    records = [json.loads(line) for line in data.decode("utf-8").splitlines()]
    assert all(isinstance(r, dict) for r in records)
    return records


def by_key(records: list[dict], key, fields) -> dict:
    """{key(record): the record's `fields`}, asserting that no key occurs twice."""
    keys = [key(r) for r in records]
    repeated = {k for k in keys if keys.count(k) > 1}
    assert not repeated, f"results written twice: {sorted(repeated)}"
    return {key(r): {f: r[f] for f in fields} for r in records}


# ------------------------------------------------------------------------------------------------ needle

NEEDLE = Runner("run_needle_in_haystack", family="llama")
NEEDLE_FIELDS = ("answer", "score", "rougeL", "score_full_needle", "exact_match", "prompt_tokens", "budget",
                 "decode")


@pytest.fixture(scope="module")
def essays(tmp_path_factory):
    folder = tmp_path_factory.mktemp("essays")
    sentences = [f"Sentence number {i} talks about startups and {'wealth ' * (i % 5)}essays." for i in range(300)]
    for n in range(3):
        (folder / f"essay{n}.txt").write_text(" ".join(sentences[n * 100:(n + 1) * 100]) + "\n", encoding="utf-8")
    return folder


def needle_args(out: Path, essays: Path) -> list[str]:
    return ["--model", "tiny", "--methods", "dense", "dhsa", "--densities", "0.5", "--lengths", "256", "384",
            "--depths", "0", "100", "--haystack-dir", str(essays), "--output-dir", str(out), "--max-new-tokens", "3",
            "--prompt-style", "completion", "--device", "cpu"]


def needle_results(out: Path) -> dict:
    return {run: by_key(jsonl_records(out / "tiny" / f"{run}.jsonl"), lambda r: (r["length"], r["depth"]),
                        NEEDLE_FIELDS) for run in ("dense", "dhsa_0.5")}


@pytest.fixture(scope="module")
def needle_reference(tmp_path_factory, essays):
    out = tmp_path_factory.mktemp("needle_reference")
    NEEDLE.run_here(needle_args(out, essays))
    results = needle_results(out)
    assert [len(v) for v in results.values()] == [4, 4]
    return results


def test_needle_killed_mid_write_resumes_exactly_once(tmp_path, essays, needle_reference):
    args = needle_args(tmp_path / "out", essays)
    # writes 1-4 fill dense.jsonl, 5-8 dhsa_0.5.jsonl: die half-way through the second dhsa record
    crash_mid_write(NEEDLE, args, tmp_path, 6, tmp_path / "out" / "tiny" / "dhsa_0.5.jsonl")
    NEEDLE.run_here(args)
    assert needle_results(tmp_path / "out") == needle_reference


def test_needle_killed_at_random_resumes_exactly_once(tmp_path, essays, needle_reference):
    args = needle_args(tmp_path / "out", essays)
    crash_at_random(NEEDLE, args, tmp_path, tmp_path / "out" / "tiny" / "dense.jsonl", seed=0, max_delay=1.5)
    NEEDLE.run_here(args)
    assert needle_results(tmp_path / "out") == needle_reference


# ------------------------------------------------------------------------------------------------ LongBench

LONGBENCH = Runner("run_longbench", family="llama", max_positions=160, chat_template=True)


@pytest.fixture(scope="module")
def longbench_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("longbench_data")
    rows = [{"input": f"What is cut into chunks? ({i})", "context": f"Document {i} is cut into chunks. " * (20 + 5 * i),
             "answers": ["A long document"], "length": 280, "dataset": "hotpotqa", "language": "en",
             "all_classes": None, "_id": f"id{i}"} for i in range(3)]
    (folder / "hotpotqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def longbench_args(out: Path, data: Path) -> list[str]:
    return ["--model", "org/tiny", "--data-dir", str(data), "--output-dir", str(out), "--device", "cpu",
            "--method", "dhsa", "--density", "0.25", "--query-chunk", "32"]


def longbench_results(out: Path) -> dict:
    records = jsonl_records(out / "tiny" / "dhsa_0.25" / "hotpotqa.jsonl")
    return by_key(records, lambda r: r["_id"], ("pred", "input_tokens", "truncated", "decode"))


@pytest.fixture(scope="module")
def longbench_reference(tmp_path_factory, longbench_data):
    out = tmp_path_factory.mktemp("longbench_reference")
    LONGBENCH.run_here(longbench_args(out, longbench_data))
    results = longbench_results(out)
    assert sorted(results) == ["id0", "id1", "id2"]
    return results


def test_longbench_killed_mid_write_resumes_exactly_once(tmp_path, longbench_data, longbench_reference):
    args = longbench_args(tmp_path / "out", longbench_data)
    crash_mid_write(LONGBENCH, args, tmp_path, 2, tmp_path / "out" / "tiny" / "dhsa_0.25" / "hotpotqa.jsonl")
    LONGBENCH.run_here(args)
    assert longbench_results(tmp_path / "out") == longbench_reference


def test_longbench_killed_at_random_resumes_exactly_once(tmp_path, longbench_data, longbench_reference):
    args = longbench_args(tmp_path / "out", longbench_data)
    path = tmp_path / "out" / "tiny" / "dhsa_0.25" / "hotpotqa.jsonl"
    crash_at_random(LONGBENCH, args, tmp_path, path, seed=1, max_delay=1.0)
    LONGBENCH.run_here(args)
    assert longbench_results(tmp_path / "out") == longbench_reference


# ------------------------------------------------------------------------------------------------ recall

RECALL = Runner("run_attention_recall", family="gemma3")
RECALL_METRICS = ("mass_recall", "topk_overlap", "keys_read")


def recall_args(out: Path, essays: Path) -> list[str]:
    # 4 layers x 2 methods x 2 budgets = 16 rows, 4 per layer
    return ["--model", "tiny", "--lengths", "256", "--num-queries", "64", "--kept-keys", "16", "32", "--methods",
            "oracle_topk", "dhsa", "--query-chunk", "32", "--block-size", "32", "--layers", "all", "--haystack-dir",
            str(essays), "--output-dir", str(out), "--device", "cpu"]


def recall_results(out: Path) -> dict:
    records = jsonl_records(out / "tiny" / "recall.jsonl")
    return by_key(records, lambda r: (r["length"], r["layer"], r["method"], r["kept_keys"]),
                  RECALL_METRICS + ("decode", "settings"))


@pytest.fixture(scope="module")
def recall_reference(tmp_path_factory, essays):
    out = tmp_path_factory.mktemp("recall_reference")
    RECALL.run_here(recall_args(out, essays))
    results = recall_results(out)
    assert len(results) == 16
    return results


def assert_same_recall(results: dict, reference: dict) -> None:
    assert results.keys() == reference.keys()
    for key, row in results.items():
        numbers = {m: row.pop(m) for m in RECALL_METRICS}
        assert numbers == pytest.approx({m: reference[key][m] for m in RECALL_METRICS}, rel=1e-6), key
        assert row == {f: v for f, v in reference[key].items() if f not in RECALL_METRICS}, key


def test_recall_killed_mid_layer_resumes_exactly_once(tmp_path, essays, recall_reference):
    args = recall_args(tmp_path / "out", essays)
    # the 7th row is the 3rd of layer 1: the resumed run redoes layer 1 and writes only its missing rows
    crash_mid_write(RECALL, args, tmp_path, 7, tmp_path / "out" / "tiny" / "recall.jsonl")
    RECALL.run_here(args)
    assert_same_recall(recall_results(tmp_path / "out"), recall_reference)
    assert (tmp_path / "out" / "tiny" / "recall.csv").is_file()


# ------------------------------------------------------------------------------------------------ latency CSV

def test_latency_csv_killed_mid_row_stays_parseable(tmp_path):
    """The latency runner does not resume (each run measures anew), but a killed run must not break the CSV: the
    next run cuts the half row away and appends whole rows after the complete ones."""
    from utils.bench.latency import COLUMNS

    runner = Runner("run_latency_test")
    out = tmp_path / "out"
    args = ["--mode", "cpu", "--lengths", "64", "128", "--densities", "0.5", "--warmup", "0", "--repeats", "1",
            "--out", str(out)]
    marker = tmp_path / "half-written"
    process = runner.start(args, tmp_path / "killed.log", half_write=3, marker=marker)
    assert kill_when(process, marker.exists, tmp_path / "killed.log")
    (csv_path,) = out.glob("cpu_*.csv")
    assert not csv_path.read_bytes().endswith(b"\n")
    runner.run_here(args)
    lines = csv_path.read_text().splitlines()
    rows = list(csv.reader(lines))
    assert rows[0] == list(COLUMNS) and all(len(row) == len(COLUMNS) for row in rows)
    parts = [(row[COLUMNS.index("length")], row[COLUMNS.index("method")], row[COLUMNS.index("part")]) for row in rows[1:]]
    one_run = [(L, m, p) for L in ("64", "128") for m, p in (("sdpa", "total"), ("dhsa", "select"), ("dhsa", "attn"),
                                                            ("dhsa", "total"))]
    assert parts == one_run[:2] + one_run  # the killed run's two whole rows, then the second run's eight
    assert {row[COLUMNS.index("decode")] for row in rows[1:]} == {"dense"}
    assert all(float(row[COLUMNS.index("median_ms")]) > 0 for row in rows[1:])


# ------------------------------------------------------------------------------------------------ sharded (torchrun)

def start_sharded(runner: Runner, args: list[str], log: Path, write_log: Path | None = None,
                  half_write: int | None = None, marker: Path | None = None, nproc: int = 2):
    """The runner under `torchrun --nproc-per-node nproc` (gloo on the CPU): each rank a process of its own."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               str(HARNESS), runner.module, "--family", runner.family]
    if runner.max_positions:
        command += ["--max-positions", str(runner.max_positions)]
    if runner.chat_template:
        command.append("--chat-template")
    if write_log is not None:
        write_log.mkdir(parents=True, exist_ok=True)
        command += ["--write-log", str(write_log)]
    if half_write is not None:
        command += ["--half-write", str(half_write), "--marker", str(marker)]
    import torch

    # the ranks compute with as many threads as this process (torchrun's default is 1), so that greedy answers match
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    with open(log, "wb") as out:
        return subprocess.Popen(command + ["--", *args], stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)


def run_sharded(runner: Runner, args: list[str], tmp_path: Path, write_log: Path | None = None, nproc: int = 2) -> str:
    log = tmp_path / f"sharded{len(list(tmp_path.glob('sharded*.log')))}.log"
    process = start_sharded(runner, args, log, write_log, nproc=nproc)
    try:
        process.wait(timeout=300)
    finally:
        process.kill()
    output = log.read_text(errors="replace")
    assert process.returncode == 0, f"the sharded run failed:\n{output[-4000:]}"
    return output


def written_by_rank(write_log: Path, key) -> dict[int, list]:
    """{rank: [(file path, key(record)) for each results line the rank wrote]} from the harness's --write-log."""
    found = {}
    for path in sorted(write_log.glob("rank*.log")):
        lines = path.read_text(encoding="utf-8").splitlines()
        found[int(path.stem[4:])] = [(name, key(json.loads(line))) for name, line in (x.split("\t", 1) for x in lines)]
    return found


def assert_disjoint_shares(shares: dict[int, list], total: int) -> None:
    assert sorted(shares) == [0, 1], "both ranks should write results"
    assert all(shares.values()), f"a rank wrote nothing: {shares}"
    assert not set(shares[0]) & set(shares[1]), "the ranks' slices overlap"
    assert sum(len(s) for s in shares.values()) == total


def test_needle_two_processes_split_the_tests_exactly_once(tmp_path, essays, needle_reference):
    args = needle_args(tmp_path / "out", essays)
    output = run_sharded(NEEDLE, args, tmp_path, tmp_path / "writes")
    assert needle_results(tmp_path / "out") == needle_reference   # every (run, length, depth) once, same scores
    shares = written_by_rank(tmp_path / "writes", lambda r: (r["method"], r["length"], r["depth"]))
    assert_disjoint_shares(shares, 8)
    assert [len(s) for s in shares.values()] == [4, 4]                  # round robin over the 8 tests
    assert output.count("average score") == 2 == output.count("over 4 tests")  # rank 0 alone reports all tests


def test_needle_two_processes_killed_mid_write_resume_exactly_once(tmp_path, essays, needle_reference):
    """Both ranks SIGKILLed while rank 0 (or 1) holds a half-written line (the other waits for the file's lock, or
    is anywhere in its work); a new two-process run completes the file: each test once, the reference's scores."""
    args = needle_args(tmp_path / "out", essays)
    marker, log = tmp_path / "half-written", tmp_path / "killed.log"
    process = start_sharded(NEEDLE, args, log, half_write=3, marker=marker)
    pid_files = [Path(f"{marker}.pid.{rank}") for rank in (0, 1)]
    try:
        assert kill_when(process, lambda: marker.exists() and all(p.exists() for p in pid_files), log,
                         kill=lambda: [os.kill(int(p.read_text()), signal.SIGKILL) for p in pid_files])
    finally:
        process.kill()
        process.wait()
    results = tmp_path / "out" / "tiny"
    assert any(not p.read_bytes().endswith(b"\n") for p in results.glob("*.jsonl")), "no cut-off line was left"
    run_sharded(NEEDLE, args, tmp_path)
    assert needle_results(tmp_path / "out") == needle_reference


def test_longbench_two_processes_split_runs_and_datasets_exactly_once(tmp_path, longbench_data):
    """dense and dhsa over an English and a Chinese dataset in one invocation: the two ranks share the 12
    predictions, and the files hold what one process writes."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "hotpotqa.jsonl").write_bytes((longbench_data / "hotpotqa.jsonl").read_bytes())
    rows = [{"input": f"问题 {i}：文件说了什么？", "context": f"第{i}个文件讲的是长文本。" * (10 + 4 * i),
             "answers": ["长文本"], "length": 120, "dataset": "multifieldqa_zh", "language": "zh",
             "all_classes": None, "_id": f"zh{i}"} for i in range(3)]
    (data / "multifieldqa_zh.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                encoding="utf-8")

    def args(out):
        return ["--model", "org/tiny", "--data-dir", str(data), "--chinese", "--output-dir", str(out), "--device",
                "cpu", "--methods", "dense", "dhsa", "--densities", "0.25", "--query-chunk", "32"]

    def results(out):
        return {(run, name): by_key(jsonl_records(out / "tiny" / run / f"{name}.jsonl"), lambda r: r["_id"],
                                    ("pred", "input_tokens", "truncated", "decode"))
                for run in ("dense", "dhsa_0.25") for name in ("hotpotqa", "multifieldqa_zh")}

    LONGBENCH.run_here(args(tmp_path / "one"))
    output = run_sharded(LONGBENCH, args(tmp_path / "two"), tmp_path, tmp_path / "writes")
    assert results(tmp_path / "two") == results(tmp_path / "one")
    assert_disjoint_shares(written_by_rank(tmp_path / "writes", lambda r: r["_id"]), 12)
    assert "dhsa_0.25 multifieldqa_zh: 3/3 predictions" in output and output.count("predictions ->") == 4


# ------------------------------------------------------------------------------------------------ RULER
# Last in the file: the fake data wheels (test_ruler.fake_wheels, module-scoped) stay in the environment until the
# module ends. The in-process reference run unpacks them into DHSA_CACHE, which the killed subprocess inherits (it
# would not accept the fake wheels' hashes, but reads the cached data).

from test_ruler import fake_wheels  # noqa: E402,F401  (a fixture: RULER's data from small fake wheels, no network)

RULER = Runner("run_ruler", family="qwen2")
RULER_FIELDS = ("score", "prediction", "answer", "prompt_tokens", "budget", "density", "decode", "config")


def ruler_args(out: Path) -> list[str]:
    # 2 tasks x 2 samples, each with dense then dhsa: writes alternate dense.jsonl, dhsa_0.25.jsonl (8 in all)
    return ["--model", "tiny", "--methods", "dense", "dhsa", "--density", "0.25", "--tasks", "fwe", "qa_1",
            "--lengths", "1K", "--num-samples", "2", "--output-dir", str(out), "--device", "cpu"]


def ruler_results(out: Path) -> dict:
    return {run: by_key(jsonl_records(out / "tiny" / f"{run}.jsonl"), lambda r: (r["task"], r["length"], r["index"]),
                        RULER_FIELDS) for run in ("dense", "dhsa_0.25")}


@pytest.fixture(scope="module")
def ruler_reference(tmp_path_factory, fake_wheels):
    out = tmp_path_factory.mktemp("ruler_reference")
    RULER.run_here(ruler_args(out))
    results = ruler_results(out)
    assert {run: sorted(r) for run, r in results.items()} == {
        run: [(t, 1024, i) for t in ("fwe", "qa_1") for i in range(2)] for run in ("dense", "dhsa_0.25")}
    return results


def test_ruler_killed_mid_write_resumes_exactly_once(tmp_path, ruler_reference):
    args = ruler_args(tmp_path / "out")
    # the 4th write is the dhsa record of the 2nd sample: dense.jsonl is then one sample ahead of dhsa_0.25.jsonl
    crash_mid_write(RULER, args, tmp_path, 4, tmp_path / "out" / "tiny" / "dhsa_0.25.jsonl")
    assert len(jsonl_records(tmp_path / "out" / "tiny" / "dense.jsonl")) == 2
    RULER.run_here(args)
    assert ruler_results(tmp_path / "out") == ruler_reference
    import csv

    with open(tmp_path / "out" / "tiny" / "results.csv", newline="") as f:
        tables = list(csv.DictReader(f))
    assert len(tables) == 2 * 3 and all(row["samples"] == "2" for row in tables)  # 2 samples per cell


def test_ruler_killed_at_random_resumes_exactly_once(tmp_path, ruler_reference):
    args = ruler_args(tmp_path / "out")
    crash_at_random(RULER, args, tmp_path, tmp_path / "out" / "tiny" / "dense.jsonl", seed=2, max_delay=2.0)
    RULER.run_here(args)
    assert ruler_results(tmp_path / "out") == ruler_reference


# ------------------------------------------------------------------------------------------------ every runner

# ------------------------------------------------------------------------------------------------ testbed

TESTBED = Runner("run_selection_testbed", family="llama")


def selection_bed_args(out: Path, essays: Path) -> list[str]:
    return ["--model", "tiny", "--lengths", "1200", "--methods", "oracle_topk", "dhsa", "--min-budget", "64",
            "--haystack-dir", str(essays), "--output-dir", str(out)]


def selection_bed_results(out: Path) -> dict:
    return by_key(jsonl_records(out / "tiny" / "testbed.jsonl"), lambda r: (r["window"], r["layer"], r["method"]),
                  RECALL_METRICS)


def test_testbed_killed_mid_write_resumes_exactly_once(tmp_path, essays, monkeypatch):
    monkeypatch.setenv("DHSA_CACHE", str(tmp_path / "cache"))  # the capture is cached there, by both runs
    TESTBED.run_here(selection_bed_args(tmp_path / "reference", essays))
    reference = selection_bed_results(tmp_path / "reference")
    args = selection_bed_args(tmp_path / "out", essays)
    crash_mid_write(TESTBED, args, tmp_path, 5, tmp_path / "out" / "tiny" / "testbed.jsonl")
    TESTBED.run_here(args)
    results = selection_bed_results(tmp_path / "out")
    assert results.keys() == reference.keys() and len(results) > 5
    for key, row in results.items():
        assert row == pytest.approx(reference[key], rel=1e-6), key


def test_every_runner_has_a_kill_and_resume_test():
    """A new run_*.py needs its own kill-and-resume test in this file (a Runner for it, used by a test)."""
    import inspect

    source = inspect.getsource(sys.modules[__name__])
    runners = sorted(path.stem for path in REPO.glob("run_*.py"))
    tested = sorted(set(re.findall(r'Runner\("(run_\w+)"', source)))
    assert runners == tested, f"runners without a kill-and-resume test: {sorted(set(runners) - set(tested))}"
