#!/usr/bin/env bash
# One machine, workers started by torchrun instead of the app's own launcher.
#
#   cluster/torchrun_local.sh                                  # 2 Gloo workers, the default job
#   NPROC=4 cluster/torchrun_local.sh cluster=single_node_gpu  # one worker per GPU, NCCL
#
# Arguments are Hydra overrides for sparsecomm-train. --standalone gives the run a fresh id, which
# every rank reads (TORCHELASTIC_RUN_ID) to agree on one run directory: outputs/<run id>.
#   PYTHON  python of the environment sparsecomm is installed in (default: python)
#   NPROC   worker processes (default: 2)
set -euo pipefail

python=${PYTHON:-python}
nproc=${NPROC:-2}
case "$nproc" in
    '' | *[!0-9]*) echo "error: NPROC=$nproc is not a whole number of processes" >&2; exit 2 ;;
esac
if [ -z "${OMP_NUM_THREADS:-}" ]; then
    cores=$(nproc 2>/dev/null || echo 1)
    OMP_NUM_THREADS=$(( cores / nproc > 0 ? cores / nproc : 1 ))
    export OMP_NUM_THREADS
fi

# OpenMP threads that wait sleep instead of spinning (spinning threads starve the working ones).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

# Check the config once before torchrun starts: a bad value is one line, never retried by restarts.
"$python" -m sparsecomm.app.train --check "cluster.nproc_per_node=$nproc" "$@"

exec "$python" -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "$nproc" \
    -m sparsecomm.app.train "cluster.nproc_per_node=$nproc" "$@"
