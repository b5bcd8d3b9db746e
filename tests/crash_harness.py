"""Run a runner's main() on a tiny random CPU model, optionally dying in the middle of writing a results line.

    python tests/crash_harness.py run_needle_in_haystack --family llama [--half-write 6 --marker F] -- FLAGS...
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/crash_harness.py MODULE --write-log D -- ...

Used by tests/test_resume.py (kill-and-resume tests). utils.models.load_model is replaced by `tiny_loader`, so the
runner does everything it does for a real model (flags, prompts, patching, generation, results files) in seconds.
With --half-write N, the N-th write of results lines (utils.runs.records._write, where every JSONL/CSV line reaches the disk)
writes only half of its last line, flushes it to disk, creates the file --marker, and waits to be killed: the
test then SIGKILLs the process, as a crash, an out-of-memory kill or a lost machine would (each process also writes its
pid to `<marker>.pid.<RANK>`, so that a test can kill the ranks of a torchrun launch). With --write-log DIR, every
results line is also logged to DIR/rank<RANK>.log as `<file name>\t<line>`, to tell which rank wrote what.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tiny_loader(family: str = "llama", max_positions: int | None = None, chat_template: bool = False):
    """A stand-in for utils.models.load_model: a tiny random model of `family` (same seed, same weights) and the
    tiny tokenizer, whatever name is asked for."""
    from utils.models import tiny_model, tiny_tokenizer

    overrides = {"max_position_embeddings": max_positions} if max_positions else {}

    def load_model(name, device="cpu", dtype=None, **kwargs):
        return tiny_model(family, **overrides), tiny_tokenizer(chat_template=chat_template)

    return load_model


def die_during_write(number: int, marker: Path) -> None:
    """Make the `number`-th results write (1-based) stop half-way through its last line and hang there."""
    import utils.runs.records

    real_write = utils.runs.records._write
    count = 0

    def write(path, data: bytes) -> None:
        nonlocal count
        count += 1
        if count != number:
            return real_write(path, data)
        last_line = data.rstrip(b"\n").rfind(b"\n") + 1
        cut = last_line + (len(data) - last_line) // 2
        with open(path, "ab") as f:
            f.write(data[:cut])
            f.flush()
            os.fsync(f.fileno())
        marker.touch()
        time.sleep(600)  # the test kills the process here
        raise SystemExit("crash_harness: not killed within 600 s")

    utils.runs.records._write = write


def log_writes(folder: Path) -> None:
    """Also log every results line to folder/rank<RANK>.log, as `<file path>\\t<line>`."""
    import utils.runs.records

    real_write = utils.runs.records._write
    log = folder / f"rank{os.environ.get('RANK', '0')}.log"

    def write(path, data: bytes) -> None:
        with open(log, "ab") as f:
            f.writelines(str(path).encode() + b"\t" + line + b"\n" for line in data.splitlines())
        real_write(path, data)

    utils.runs.records._write = write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", help="runner module: run_needle_in_haystack, run_longbench, ...")
    parser.add_argument("--family", default="llama", help="tiny model family (utils.models.TINY_FAMILIES)")
    parser.add_argument("--max-positions", type=int, default=None, help="the tiny model's maximum length")
    parser.add_argument("--chat-template", action="store_true", help="give the tokenizer a chat template")
    parser.add_argument("--half-write", type=int, default=None, help="die in the middle of this results write")
    parser.add_argument("--marker", type=Path, default=None, help="file created once the half write is on disk")
    parser.add_argument("--write-log", type=Path, default=None, help="log every results line to DIR/rank<RANK>.log")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    options, runner_args = parser.parse_args(argv[:split]), argv[split + 1:]  # the runner's own flags follow --

    import utils.models

    utils.models.load_model = tiny_loader(options.family, options.max_positions, options.chat_template)
    if options.write_log is not None:
        log_writes(options.write_log)
    if options.half_write is not None:
        die_during_write(options.half_write, options.marker)
    if options.marker is not None:
        Path(f"{options.marker}.pid.{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))
    importlib.import_module(options.module).main(runner_args)


if __name__ == "__main__":
    main()
