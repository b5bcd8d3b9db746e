"""Results files shared by every runner: run names and crash-safe, resumable JSONL.

Every runner writes one JSON object per line, as it goes, and a rerun skips what is already there. A run that
dies (Ctrl-C, SIGKILL, out of memory, a lost GPU) may leave a last line cut off in the middle. The rules here:

* `read_jsonl` returns the complete records; a cut-off *last* line is ignored (that sample is redone), a broken
  line anywhere else is an error (the file was edited or two runs wrote to it at once).
* `append_jsonl` first cuts such a partial last line away, then writes the new record as one line and flushes it
  to disk, so a record is never glued onto the remains of an interrupted one.
* CSV results (latency) follow the same rules: `append_csv` / `read_csv_rows`, one row per line, header first.
* Several processes may append to one file at once (the ranks of a sharded run, utils/runs/sharding.py): every append
  holds an exclusive lock on the file (`fcntl.flock`, released when the process dies), so records never
  interleave and no process cuts away a line another one is still writing. Readers need no lock: a line being
  written is, to them, an interrupted last line.

Run names: `run_name(config)` is the file stem of a run (`dense`, `dhsa_0.0625`, `dhsa_0.0625_min512`,
`quest_budget2048`; non-default decode protocols add `_decode-<mode>`), the same for every runner.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import io
import json
import os
from pathlib import Path

# What a run did before a field existed: a results record written then lacks the field, and only a run whose value
# equals this one may resume it (check_same_settings below). Add an entry with every new field.
LEGACY_VALUES = {"head_pooling": "mean", "center_keys": False, "decode": "sparse", "token_rescore": 0.0, "rescore_queries": 0, "rescore_window": 0,
                 "chunk_score": "mean",
                 "exact_tail": 0, "dense_tail": 0, "tail_columns": 0.0, "flex_gamma": 0.9, "flex_tau": 0.1, "xattn_threshold": 0.9,
                 "xattn_stride": 8, "peer_budget": "matched", "flex_min_budget": 0, "flex_rule": "paper",
                 "xattn_rule": "paper"}


# Fields that only some methods read: a run of another method ignores them when it resumes (same_config
# below), so a changed default of, say, XAttention's threshold does not split DHSA's results.
METHOD_ONLY_FIELDS = {
    "peer_budget": ("flexprefill", "xattention"),
    "flex_gamma": ("flexprefill",), "flex_tau": ("flexprefill",), "flex_min_budget": ("flexprefill",),
    "flex_rule": ("flexprefill",),
    "xattn_threshold": ("xattention",), "xattn_stride": ("xattention",), "xattn_rule": ("xattention",),
}


def _complete_length(data: bytes) -> int:
    """Bytes of `data` up to and including its last newline (0 if there is none)."""
    return data.rfind(b"\n") + 1


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL results file ([] when it does not exist).

    A last line without its newline is an interrupted write and is left out; any other line that is not a JSON
    object raises a one-line ValueError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete = data[: _complete_length(data)]
    records = []
    for number, line in enumerate(complete.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number} is not a JSON record; delete that line (or the file) and rerun")
        records.append(record)
    return records


def repair_jsonl(path: str | os.PathLike) -> int:
    """Cut an interrupted (newline-less) last line off `path`; returns the bytes removed."""
    path = Path(path)
    if not path.is_file():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb") as f:
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return 0
    keep = _complete_length(path.read_bytes())
    with open(path, "r+b") as f:
        f.truncate(keep)
    return size - keep


def _write(path: Path, data: bytes) -> None:
    """Append `data` (whole lines) to `path` with one write, flushed and fsync'ed. Every results line reaches the
    disk here (the kill-and-resume tests interrupt this write half-way)."""
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def locked(path: str | os.PathLike):
    """Hold an exclusive lock on `path` (created empty if missing) until the block ends; other processes that
    lock it wait. The lock is on the file itself, opened for writing, so it also holds on NFS; it is released
    when the block ends or the process dies."""
    path = Path(path)
    while True:
        handle = open(path, "ab")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            # append_csv may have replaced the file (new header) while we waited: then lock the new one
            if path.exists() and os.path.samestat(os.fstat(handle.fileno()), os.stat(path)):
                break
        except BaseException:
            handle.close()
            raise
        handle.close()
    try:
        yield
    finally:
        handle.close()  # closing the file releases the lock


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one record as one line, after cutting away a partial last line; flushed and fsync'ed, under the
    file's lock (several processes may append to one file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    with locked(path):
        repair_jsonl(path)
        _write(path, line)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a small file (a run's settings) so that readers, in this or another process, see either the old
    content or the whole new one: written beside it under a name of this process, then renamed over it."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


# ---- CSV (one row per line, header first) ----------------------------------------------------------------

def _csv_line(values) -> bytes:
    """One CSV row as one line: line breaks inside values become spaces, so a row never spans two lines."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(
        [" ".join(str(v).splitlines()) if isinstance(v, str) else ("" if v is None else v) for v in values])
    return buffer.getvalue().encode("utf-8")


def read_csv_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a CSV results file as dicts of strings ([] when it does not exist); a cut-off last line is
    left out, as in read_jsonl."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    text = data[: _complete_length(data)].decode("utf-8")
    return list(csv.DictReader(io.StringIO(text)))


def append_csv(path: str | os.PathLike, row: dict, columns) -> None:
    """Append one row (the `columns` of `row`, missing ones empty) as one line, after cutting away a partial last
    line; the header is written first into a new file. A file whose header lacks some of `columns` (written by
    an older version) is rewritten once with the new header, its rows keeping their values; a header with
    columns not in `columns` is an error. Under the file's lock, as append_jsonl."""
    path = Path(path)
    columns = list(columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path):
        _append_csv_locked(path, row, columns)


def _append_csv_locked(path: Path, row: dict, columns: list[str]) -> None:
    repair_jsonl(path)
    header = None
    if path.is_file() and path.stat().st_size:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), None)
    if header != columns and header:
        unknown = [c for c in header if c not in columns]
        if unknown:
            raise ValueError(f"{path} has columns {unknown} that this version does not write; move the file away "
                             "or write elsewhere")
        rows = read_csv_rows(path)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_bytes(_csv_line(columns) + b"".join(_csv_line(r.get(c, "") for c in columns) for r in rows))
        os.replace(temporary, path)
    line = _csv_line(row.get(c, "") for c in columns)
    _write(path, line if header else _csv_line(columns) + line)


def config_dict(config) -> dict:
    """A SparseAttentionConfig as a JSON-ready dict (tuples as lists), as stored in results."""
    values = dataclasses.asdict(config)
    return json.loads(json.dumps(values))


def run_name(config) -> str:
    """File stem of a run: dense, dhsa_0.0625, dhsa_0.0625_min512, quest_budget2048, dhsa_0.0625_decode-sparse,
    xattention_0.125_adaptive.

    The decode protocol is named only when it is not the default one, so that names of earlier runs stay valid.
    """
    if config.method == "dense":
        return "dense"
    name = f"{config.method}_budget{config.budget}" if config.budget is not None else f"{config.method}_{config.density:g}"
    if config.min_budget:
        name += f"_min{config.min_budget}"
    # FlexPrefill / XAttention as their authors run them (no cap: the density is unused) get their own name, so
    # that the earlier capped runs' files (no such field: peer_budget "matched") keep their names
    if config.method in ("flexprefill", "xattention") and getattr(config, "peer_budget", "matched") == "adaptive":
        name += "_adaptive"
    # the method's default protocol (Quest acts only at decode: its decode is always sparse, never named)
    default_decode = dataclasses.replace(config, decode=type(config)().decode).decode if hasattr(config, "decode") \
        else None
    if getattr(config, "decode", None) not in (None, default_decode):
        name += f"_decode-{config.decode}"
    return name


def same_config(recorded: dict | None, current: dict) -> bool:
    """Whether a recorded config (config_dict) is the current one; a field the record lacks (it predates the field)
    counts as its LEGACY_VALUES entry, the behaviour before the field existed. Dense attention ignores every
    option, so any two dense configs are the same run (a DHSA flag on the command line does not split it); fields
    that only other methods read (METHOD_ONLY_FIELDS: FlexPrefill's and XAttention's) are ignored likewise."""

    if recorded is None:
        return False
    if current.get("method") == "dense":
        return recorded.get("method") == "dense"
    missing = object()
    method = current.get("method")
    return all(recorded.get(name, LEGACY_VALUES.get(name, missing)) == value for name, value in current.items()
               if method in METHOD_ONLY_FIELDS.get(name, (method,)))


def check_same_settings(path, records: list[dict], settings: dict) -> None:
    """Refuse to mix results made with other options into one file (one-line error naming the fix)."""
    settings = json.loads(json.dumps(settings))
    for record in records:
        changed = [key for key, value in settings.items()
                   if not (same_config(record.get(key), value) if key == "config" else record.get(key) == value)]
        if changed:
            raise ValueError(f"{path} holds results made with other {', '.join(changed)}; pass --output-dir/--output "
                             "to write elsewhere, or delete the file to redo it")


__all__ = ["read_jsonl", "append_jsonl", "locked", "write_atomic", "repair_jsonl", "read_csv_rows", "append_csv", "config_dict", "run_name", "same_config",
           "check_same_settings"]
