#!/usr/bin/env bash
# The GPU check, on a machine with at least one CUDA GPU, in under 8 minutes:
#   1. the `gpu` tests (tests/test_gpu.py: hook with fp32/fp16/bf16 wire on NCCL and on Gloo with
#      CUDA tensors, packing, the Fisher layers engine, the masked optimizers, against CPU references);
#   2. a short NCCL benchmark (python -m benchmarks.gpu_comm: dense DDP vs the masked hook, one rank per GPU).
# Each part runs under `timeout`; a summary says PASS/FAIL per part. Exit 0 when both pass, 1 when
# one fails, 2 when there is no usable GPU (nothing ran).
#
#   bash benchmarks/gpu_check.sh
#   PYTHON=/path/to/python TESTS_TIMEOUT=330 BENCH_TIMEOUT=120 bash benchmarks/gpu_check.sh
#
# Needs a CUDA build of torch: make setup TORCH_SPEC="torch==<version> --index-url <CUDA wheel index>".
set -u

cd "$(dirname "$0")/.." || exit 2
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
TESTS_TIMEOUT=${TESTS_TIMEOUT:-330}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-120}
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")

ngpu=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>"$LOGS/probe.log")
if [[ -z "$ngpu" || "$ngpu" == 0 ]]; then
    echo "gpu_check: no usable CUDA GPU for $PYTHON ($("$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1));"
    echo "gpu_check: install a CUDA build of torch (see the Makefile's TORCH_SPEC) on a GPU machine. Nothing ran."
    cat "$LOGS/probe.log"
    exit 2
fi
echo "gpu_check: $ngpu GPU(s), $("$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", ".".join(map(str, torch.cuda.nccl.version())), "-", torch.cuda.get_device_name(0))')"

# run NAME TIMEOUT CMD...: run CMD under timeout, output to $LOGS/NAME.log (tail shown on failure)
declare -A RESULT
run() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS rc=0
    echo "gpu_check: $name ..."
    timeout --kill-after=15 "$limit" "$@" >"$LOGS/$name.log" 2>&1 || rc=$?
    local took=$((SECONDS - start))
    if [[ $rc -eq 0 ]]; then
        RESULT[$name]="PASS (${took} s)"
    else
        if [[ $rc -eq 124 || $rc -eq 137 ]]; then
            RESULT[$name]="FAIL (timed out after ${limit} s)"
        else
            RESULT[$name]="FAIL (exit $rc, ${took} s)"
        fi
        echo "---- last lines of $LOGS/$name.log"
        tail -n 40 "$LOGS/$name.log"
    fi
    grep -E "passed|failed|skipped|^gpu_comm:" "$LOGS/$name.log" | tail -n 8
}

run gpu_tests "$TESTS_TIMEOUT" "$PYTHON" -m pytest -q -m gpu -rs -p no:cacheprovider tests
if [[ ${RESULT[gpu_tests]} == PASS* ]] && ! grep -qE "[0-9]+ passed" "$LOGS/gpu_tests.log"; then
    RESULT[gpu_tests]="FAIL (nothing ran: every gpu test was skipped)"
fi
run nccl_bench "$BENCH_TIMEOUT" "$PYTHON" -m benchmarks.gpu_comm --ranks "$ngpu" --model mlp --steps 20

status=0
echo "== gpu_check summary (logs in $LOGS)"
for name in gpu_tests nccl_bench; do
    printf '  %-12s %s\n' "$name" "${RESULT[$name]}"
    [[ ${RESULT[$name]} == PASS* ]] || status=1
done
if [[ $status -eq 0 ]]; then echo "  overall      PASS"; else echo "  overall      FAIL"; fi
exit "$status"
