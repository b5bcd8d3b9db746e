#!/bin/bash
# Run RULER's official generator (patched copy in scripts/) for each task at 4096, 1 sample, smollm2-135m tokenizer.
cd ${SCRATCH:-/work/scratch_ruler}
export PATH=/work/main/.venv/bin:$PATH PYTHONPATH=${SCRATCH:-/work/scratch_ruler}/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
TOK=/work/main/.cache/models/smollm2-135m
TASKS=${@:-niah_single_1 niah_single_2 niah_single_3 niah_multikey_1 niah_multikey_2 niah_multikey_3 niah_multivalue niah_multiquery vt cwe fwe qa_1 qa_2}
for task in $TASKS; do
  cmd=$(nice -n 19 python official_cmd.py $task 4096 $TOK out)
  echo "$cmd" > logs/$task.cmd
  ( cd . && /usr/bin/time -f "%e s" nice -n 19 bash -c "$cmd" ) > logs/$task.log 2>&1
  echo "$task rc=$? $(tail -1 logs/$task.log)"
done
