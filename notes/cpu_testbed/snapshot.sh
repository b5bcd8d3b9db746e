# Sourced by the CPU run scripts of this folder: copy the tree (tracked and untracked-not-ignored files, results
# left out) to $SNAP and cd there, so that edits made while a run goes on do not change it; results go to the real
# checkout ($REPO). Sets PY; `job NAME CMD...` runs one step, logging start, end and rc to $LOG (output to $LOG.out).
REPO=/work/main
export DHSA_CACHE=$REPO/.cache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
rm -rf "$SNAP"; mkdir -p "$SNAP"
(cd $REPO && git ls-files -co --exclude-standard | grep -v '^results_' | tar cf - -T -) | tar xf - -C "$SNAP"
cd "$SNAP"
PY=$REPO/.venv/bin/python
job() { echo "$(date +%T) start $1" >> $LOG; shift; /usr/bin/time -f "%e s wall" "$@" >> $LOG.out 2>&1; echo "$(date +%T) end rc=$?" >> $LOG; }
