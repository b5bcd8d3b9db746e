# (1) RULER's essay needle insertion (niah.py:156-167, copied) at depth 0 / 100 / equal depths; (2) adjacent chain lines in our vt.
# cd /work/main && PYTHONPATH=. nice -n 19 .venv/bin/python notes/ruler_check/quirks.py 40
import re, sys
def official_insert(document_sents, needles, depths):
    insertion_positions = [0] + sorted([int(len(document_sents) * (depth / 100)) for depth in depths]) + [len(document_sents)]
    document_sents_list = []
    for i in range(1, len(insertion_positions)):
        last_pos = insertion_positions[i-1]; next_pos = insertion_positions[i]
        document_sents_list.append(" ".join(document_sents[last_pos:next_pos]))
        if i-1 < len(needles):
            document_sents_list.append(needles[i-1])
    return " ".join(document_sents_list)
S = ["A.", "B.", "C.", "D."]
for depths in ([0], [100], [50, 51]):
    print("official", depths, repr(official_insert(S, [f"N{i}." for i in range(len(depths))], depths)))
from data import ruler as R
for depths in ([0], [100], [50, 51]):
    cuts = sorted(int(len(S) * d / 100) for d in depths)
    print("ours    ", depths, repr(" ".join(R._interleave(S, [f"N{i}." for i in range(len(depths))], cuts))))
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained("/work/main/.cache/models/smollm2-135m")
g = R.RulerGenerator(tok, "completion", seed=42)
s0 = g.sample("niah_single_2", 4096, 0)
print("BOS/EOS added by completion encode:", s0.prompt_tokens - len(tok(s0.prompt, add_special_tokens=False)["input_ids"]))
adj = 0; n = int(sys.argv[1])
for i in range(n):
    p = g.sample("vt", 4096, i).prompt
    ctx = p[p.rindex("Memorize and track"):]
    lines = ctx.split("\n")
    kinds = ["c" if ln.startswith("VAR ") else "n" for ln in lines]
    adj += "cc" in "".join(kinds)
print(f"our vt samples at 4K with two chain lines adjacent: {adj}/{n}")
