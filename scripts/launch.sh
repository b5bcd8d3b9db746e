# Sourced by the sweep scripts: `launch SCRIPT.py ARGS...` runs a runner with $PYTHON, or under torchrun with
# $NPROC processes (one per GPU, each taking every NPROC-th sample; utils/runs/sharding.py) when NPROC > 1.
#   NPROC=2 bash scripts/run_longbench.sh        # two GPUs of one machine
NPROC="${NPROC:-1}"
case "${NPROC}" in
    '' | *[!0-9]* | 0)
        echo "error: NPROC must be a positive whole number (processes = GPUs), got '${NPROC}'" >&2
        exit 2 ;;
esac

launch() {
    if [ "${NPROC}" -gt 1 ]; then
        "${PYTHON}" -m torch.distributed.run --standalone --nproc-per-node "${NPROC}" "$@"
    else
        "${PYTHON}" "$@"
    fi
}
