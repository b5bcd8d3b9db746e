"""Compare one official RULER sample per task with data/ruler.py's sample for the same task, length and tokenizer.

Assumes the scratch dir /work/scratch_ruler exists, holding NVIDIA/RULER's generator (commit c3f5e3b, patched copy in
scripts/) and its output for each task at max_seq_length 4096, 1 sample, seed 42, tokenizer smollm2-135m
(out/<task>/validation.jsonl, made by /work/scratch_ruler/run_official.sh; logs/<task>.log hold its search lines).
See notes/ruler_check/README.md for how that dir was made.

    cd /work/main && PYTHONPATH=. nice -n 19 .venv/bin/python notes/ruler_check/compare.py [--scratch DIR]

For every task: the prompt (RULER's input + answer_prefix vs our prompt, completion style = RULER's `base`
template) is matched against a regular expression built from RULER's constants.py template, with the random parts
(context, query, values) as groups; "template equal" means both prompts match it and the fixed text between the
groups is the same. The worked examples (vt, cwe) are compared the same way, plus their structure. Then the
context's structure (line kinds, separators, whitespace), the token lengths (official `length` field, recounted,
vs ours) and the back-off: a sample is within RULER's back-off when prompt + generation <= L and L - total is less
than (back-off steps + 1) x the tokens of one increment (RULER's search fits exactly, then steps back whole
increments while a sample is too long).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

from transformers import AutoTokenizer

from data import ruler as R

L = 4096
TOKENIZER = "/work/main/.cache/models/smollm2-135m"
NUM = r"\d+"
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
WORD = r"[a-z][\w' .-]*?"  # wonderwords adjective-noun (some have more hyphens, spaces, apostrophes)
TYPES = {"numbers": NUM, "uuids": UUID, "words": WORD}


def official_constants(scratch: Path) -> dict:
    sys.path.insert(0, str(scratch / "scripts/data/synthetic"))
    import constants  # RULER's scripts/data/synthetic/constants.py

    return constants.TASKS


def template_regex(text: str, groups: dict[str, str]) -> str:
    """A regex for a template: the fixed text escaped, each {name} a named group (repeats: backreference)."""
    out, seen, pos = [], set(), 0
    for m in re.finditer(r"\{(\w+)\}", text):
        out.append(re.escape(text[pos:m.start()]))
        name = m.group(1)
        out.append(f"(?P={name})" if name in seen else f"(?P<{name}>{groups[name]})")
        seen.add(name)
        pos = m.end()
    out.append(re.escape(text[pos:]))
    return "".join(out)


def singular(text: str) -> str:  # niah.py:188-193
    return text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


def prompt_regex(task: R.RulerTask, T: dict) -> tuple[str, dict]:
    """The whole prompt's regex from RULER's constants (as prepare.py composes it with the `base` template)."""
    fam, a = task.family, task.args
    t = T[fam]["template"] + T[fam]["answer_prefix"]
    if fam == "niah":
        nv = a.get("num_needle_v", 1) * a.get("num_needle_q", 1)
        v_type = a["type_needle_v"] if nv > 1 else a["type_needle_v"][:-1]
        t = (t if nv > 1 else singular(t)).replace("{type_needle_v}", v_type)
        return template_regex(t, {"context": r"(?s:.*)", "query": r".+?"}), {}
    if fam == "variable_tracking":
        ex = template_regex(t, {"context": r"(?s:.*)", "query": r"\d{5}", "num_v": r"\d+"})
        ex = ex.replace("(?P<context>", "(?P<ex_context>").replace("(?P<query>", "(?P<ex_query>") \
               .replace("(?P=query)", "(?P=ex_query)").replace("(?P<num_v>", "(?P<ex_num_v>")
        task_re = template_regex(t, {"context": r"(?s:.*)", "query": r"\d{5}", "num_v": r"\d+"})
        return ex + r" (?P<ex_answer>[A-Z ]+)\n\n" + task_re, {}
    if fam == "common_words_extraction":
        one = template_regex(t, {"context": r"(?s:.*?)"})  # RULER's text has the literal "10"
        ex = one.replace("(?P<context>", "(?P<ex_context>")
        return ex + r" (?P<ex_answer>[^\n]*)\n" + one, {}
    if fam == "freq_words_extraction":
        return template_regex(t, {"context": r"(?s:.*)"}), {}
    return template_regex(t, {"context": r"(?s:.*)", "query": r".+?"}), {}


def needle_re(v_type: str, k_pat: str, v_pat: str) -> str:
    return re.escape(R.NEEDLE).replace(r"\{type_needle_v\}", v_type).replace(r"\{key\}", f"(?:{k_pat})") \
        .replace(r"\{value\}", f"(?:{v_pat})")


def context_structure(task: R.RulerTask, ctx: str) -> dict:
    """What a context is made of, independent of its random words."""
    fam, a = task.family, task.args
    s: dict = {"leading_ws": ctx[:1].isspace(), "trailing_ws": ctx[-1:].isspace(), "double_space": "  " in ctx}
    if fam == "niah":
        v_type, hay = a["type_needle_v"], a.get("type_haystack", "essay")
        needle = needle_re(v_type, TYPES[a["type_needle_k"]], TYPES[v_type])
        if hay == "essay":
            found = list(re.finditer(needle, ctx))
            s["needles"] = len(found)
            rest = re.sub(needle, " ", ctx)
            s["units (essay words)"] = len(rest.split())
            s["needle separators"] = sorted({repr(ctx[max(0, m.start() - 1):m.start()]) + "|" +
                                             repr(ctx[m.end():m.end() + 1]) for m in found})
            s["newlines"] = ctx.count("\n")
        else:
            lines = ctx.split("\n")
            kinds = ["noise" if ln == R.NOISE else "needle" if re.fullmatch(needle, ln) else "OTHER" for ln in lines]
            s["line kinds"] = dict(Counter(kinds))
            s["units (lines)"] = len(lines) - (a.get("num_needle_k", 1) * a.get("num_needle_v", 1)
                                               if hay == "needle" else kinds.count("needle"))
            if hay == "noise":
                s["needle after last line"] = kinds[-1] == "needle"
    elif fam == "variable_tracking":
        lines = ctx.split("\n")
        kinds = []
        for ln in lines:
            if ln == R.NOISE:
                kinds.append("noise")
            elif re.fullmatch(r"VAR [A-Z]+ = \d{5}", ln):
                kinds.append("value line (no trailing space)")
            elif re.fullmatch(r"VAR [A-Z]+ = VAR [A-Z]+ ", ln):
                kinds.append("hop line (one trailing space)")
            else:
                kinds.append("OTHER: " + repr(ln))
        s["line kinds"] = dict(Counter(kinds))
        s["units (noise lines)"] = kinds.count("noise")
        s["name length"] = sorted({len(n) for n in re.findall(r"VAR ([A-Z]+)", ctx)})
        s["chain line after last noise line"] = kinds[-1] != "noise"
    elif fam == "common_words_extraction":
        entries = re.findall(r"(\d+)\. (\S+(?: \S+)*?)(?= \d+\. |$)", ctx)
        s["numbered 1..n"] = [int(n) for n, _ in entries] == list(range(1, len(entries) + 1))
        counts = Counter(w for _, w in entries)
        s["entries"] = len(entries)
        s["distinct words"] = len(counts)
        s["repeat counts"] = dict(sorted(Counter(counts.values()).items()))
    elif fam == "freq_words_extraction":
        words = ctx.split(" ")
        counts = Counter(words)
        s["words"] = len(words)
        s["vocabulary used"] = len(counts)
        s["top 4 counts"] = [c for _, c in counts.most_common(4)]
        s["top is '...'"] = counts.most_common(1)[0][0] == "..."
        s["word lengths"] = sorted({len(w) for w in counts})
    else:
        docs = re.split(r"\n\n(?=Document \d+:\n)", ctx)
        s["documents"] = len(docs)
        s["numbered Document 1..n"] = [int(re.match(r"Document (\d+):\n", d).group(1)) for d in docs] == \
            list(range(1, len(docs) + 1))
    return s


def fixed_text(pattern: str, text: str) -> list[str] | None:
    """The text between the regex's groups in `text` (None: no match)."""
    m = re.fullmatch(pattern, text)
    if m is None:
        return None
    cuts = sorted((m.start(g), m.end(g)) for g in m.groupdict() if m.start(g) >= 0)
    pieces, pos = [], 0
    for s, e in cuts:
        pieces.append(text[pos:s])
        pos = e
    pieces.append(text[pos:])
    # the query etc. repeat in the answer prefix (a backreference, not a group): put the placeholder there too
    for g, v in m.groupdict().items():
        if v and "context" not in g and "answer" not in g:
            pieces = [p.replace(v, "{" + g + "}") for p in pieces]
    return pieces


def essay_vs_reference(ctx: str, needle: str, units: int, data: R.RulerData) -> list:
    """Where a context without its needles departs from the first `units` essay words joined by single spaces
    (RULER: " ".join(haystack[:n]) before its sentence split)."""
    import difflib

    rest = re.sub(" ?" + needle, "", ctx).strip()
    ref = " ".join(data.essay_words[:units])
    out = []
    sm = difflib.SequenceMatcher(None, ref, rest, autojunk=False)
    for op, a0, a1, b0, b1 in sm.get_opcodes():
        if op != "equal":
            out.append(f"{op} {ref[max(0, a0 - 12):a1 + 12]!r} -> {rest[max(0, b0 - 12):b1 + 12]!r}")
    return out


def official_search(log: Path) -> list[int]:
    return [int(x) for x in re.findall(r"Final optimal haystack size \(number of \w+\): (\d+)", log.read_text())]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scratch", default="/work/scratch_ruler")
    ap.add_argument("--tasks", nargs="*", default=list(R.TASK_NAMES))
    args = ap.parse_args()
    scratch = Path(args.scratch)
    T = official_constants(scratch)
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    gen = R.RulerGenerator(tok, "completion", seed=42)
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    (scratch / "ours").mkdir(exist_ok=True)
    rows, details = [], {}
    for name in args.tasks:
        task = gen.tasks[name]
        off = json.loads((scratch / "out" / name / "validation.jsonl").read_text().splitlines()[0])
        off_prompt = off["input"] + off["answer_prefix"]
        ours = gen.sample(name, L, 0)
        (scratch / "ours" / f"{name}.json").write_text(json.dumps(
            {"prompt": ours.prompt, "answers": ours.answers, "prompt_tokens": ours.prompt_tokens,
             "units": ours.units}, indent=1))
        pattern, _ = prompt_regex(task, T)
        fo, fu = fixed_text(pattern, off_prompt), fixed_text(pattern, ours.prompt)
        mo, mu = re.fullmatch(pattern, off_prompt), re.fullmatch(pattern, ours.prompt)
        d: dict = {"official matches RULER's template": fo is not None, "ours matches": fu is not None}
        template_equal = fo is not None and fo == fu
        example_equal = "-"
        if mo and mu:
            d["official context"] = context_structure(task, mo.group("context"))
            d["our context"] = context_structure(task, mu.group("context"))
            if "ex_context" in mo.groupdict():
                so = context_structure(task, mo.group("ex_context"))
                su = context_structure(task, mu.group("ex_context"))
                ex_o, ex_u = off_prompt[:mo.end("ex_answer")], ours.prompt[:mu.end("ex_answer")]
                if task.family == "variable_tracking":
                    for s, m, ex in ((so, mo, ex_o), (su, mu, ex_u)):
                        names = m.group("ex_answer").split(" ")
                        s["answer"] = f"{len(names)} names of {sorted({len(w) for w in names})} letters"
                        s["gap before answer"] = repr(ex[m.start("ex_answer") - 2:m.start("ex_answer")])
                        s["example input tokens (<= 500)"] = count(ex[:m.start("ex_answer") - 1])
                        s["num_v"] = m.group("ex_num_v")
                else:
                    for s, m in ((so, mo), (su, mu)):
                        s["answer"] = re.sub(r"[a-z][\w' -]*?(?= \d+\. |$)", "W", m.group("ex_answer"))
                d["official example"], d["our example"] = so, su
                skip = {"example input tokens (<= 500)", "units (noise lines)", "line kinds"}
                example_equal = all(so[k] == su[k] for k in so if k not in skip) and \
                    (task.family != "variable_tracking" or
                     (so["line kinds"].keys() == su["line kinds"].keys()))
        else:
            d["official prompt head/tail"] = [off_prompt[:300], off_prompt[-300:]]
            d["our prompt head/tail"] = [ours.prompt[:300], ours.prompt[-300:]]
        if fo is not None and fu is not None and fo != fu:
            d["fixed text differences"] = [(a, b) for a, b in zip(fo, fu) if a != b]
        if task.family == "qa":
            d["same question"] = (mo.group("query") == mu.group("query")) if mo and mu else None
            d["same answers"] = off["outputs"] == ours.answers
        off_total = off["length"]
        recount = count(off_prompt) + task.max_new_tokens
        our_total = ours.prompt_tokens + task.max_new_tokens
        inc = R.official_increment(task, L)
        build = gen._builder(gen._draft(task, L, 0))
        inc_tokens = build(ours.units + inc)[-1] - ours.prompt_tokens
        searched = gen._searched.get((name, L))
        our_steps = (searched - ours.units) // inc if searched and task.family != "freq_words_extraction" else 0
        off_units = (d.get("official context") or {})
        off_units = next((v for k, v in off_units.items() if k.startswith("units")), None)
        off_search = official_search(scratch / "logs" / f"{name}.log")
        if task.family == "common_words_extraction":
            off_units = d["official context"]["distinct words"]
        if task.family == "qa":
            off_units = d["official context"]["documents"]
        off_steps = 0  # fwe: its search ends one increment below the first size that is too long
        if off_search and off_units is not None:
            # essay words are counted after RULER's sentence split, which can add a space inside a word (below)
            off_steps = round((off_search[-1] - off_units) / inc)
            if task.args.get("type_haystack", "") == "essay" or (task.family == "niah" and
                                                                 "type_haystack" not in task.args):
                off_units = off_search[-1] - off_steps * inc
        if task.family == "niah" and task.args.get("type_haystack", "essay") == "essay" and mo and mu:
            a = task.args
            needle = needle_re(a["type_needle_v"], TYPES[a["type_needle_k"]], TYPES[a["type_needle_v"]])
            d["official essay text vs reference"] = essay_vs_reference(mo.group("context"), needle, off_units,
                                                                       gen.data)
            d["our essay text vs reference"] = essay_vs_reference(mu.group("context"), needle, ours.units, gen.data)
        d["lengths"] = dict(official=off_total, official_recounted=recount, ours=our_total,
                            official_search_units=off_search, official_units=off_units,
                            official_backoff_steps=off_steps, our_units=ours.units, our_search_units=searched,
                            our_backoff_steps=our_steps, increment=inc, increment_tokens=inc_tokens)
        within = lambda total, steps: total <= L and L - total < ((steps or 0) + 1) * inc_tokens  # noqa: E731
        rows.append((name, template_equal, example_equal, off_total, our_total, within(off_total, off_steps),
                     within(our_total, our_steps)))
        details[name] = d
    print("| task | template equal | example equal | official tokens | our tokens | official within back-off "
          "| ours within back-off |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    print()
    for name, d in details.items():
        print(f"## {name}")
        for k, v in d.items():
            print(f"- {k}: {v}")
        print()


if __name__ == "__main__":
    main()
