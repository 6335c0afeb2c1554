#!/usr/bin/env bash
# The device check for the lent GPU machine: build pyops with its CUDA kernels, then run
# `python -m pyops info`, the GPU tests, `verify --device cuda` and `bench --device cuda --full`
# for every family; logs and results go to $OUT.
#
#   bash bench/gpu_check.sh                                    # on the GPU machine (no network needed)
#   PYOPS_CUDA=OFF SKIP_INSTALL=1 bash bench/gpu_check.sh      # dry run on a CPU machine: verify and
#                                                              # bench (quick sizes) run on cpu
#   SKIP_INSTALL=1 ...                                         # use the build already installed
#   PYOPS_COMMIT=<hash> ...                                    # recorded in the JSON when .git is absent
#
# Without PYOPS_CUDA=OFF it stops at once, before building, where no NVIDIA GPU is visible.
# Every step runs even if an earlier one failed; the exit status is non-zero if any step failed.
# $OUT holds 6 files: build.log, nvidia-smi.txt, info.log, verify.log, bench.log and
# results.tar.gz (<family>-<device>.{json,png} and README.md, repacked after every family).
# FAMILIES (stems), VERIFY_TIMEOUT and BENCH_TIMEOUT (seconds per family; BENCH_TIMEOUT_MERGING
# for merging, which holds task arithmetic and the merge methods) bound the run; on a GPU,
# GPU_TESTS (pytest paths; default the CUDA merge kernels' tests and the Triton biased-experts tests) run first under TESTS_TIMEOUT.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$PWD/gpu_out}
PYTHON=${PYTHON:-python}
export PYOPS_CUDA=${PYOPS_CUDA:-ON}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 4)}
export PYTHONUNBUFFERED=1
FAMILIES=${FAMILIES:-"merging task_attention neighborhood moe"}
VERIFY_TIMEOUT=${VERIFY_TIMEOUT:-90}                 # seconds per family
BENCH_TIMEOUT=${BENCH_TIMEOUT:-100}                  # seconds per family
BENCH_TIMEOUT_MERGING=${BENCH_TIMEOUT_MERGING:-200}  # seconds for merging

if [ "$PYOPS_CUDA" = "OFF" ]; then
    DEVICE=cpu
    EXTRA=()            # quick sizes: the default
else
    DEVICE=cuda
    EXTRA=(--full)
    # The lent machines are Hopper (sm_90): one architecture halves the nvcc time.
    export PYOPS_CUDA_ARCHS=${PYOPS_CUDA_ARCHS:-90}
    if ! nvidia-smi -L >/dev/null 2>&1; then
        echo "gpu_check: no NVIDIA GPU visible here (nvidia-smi -L failed or is missing); run it on the" \
             "GPU machine, or set PYOPS_CUDA=OFF SKIP_INSTALL=1 for a CPU dry run" >&2
        exit 2
    fi
fi
mkdir -p "$OUT"

failed=()
summary=()

# step NAME LOG [--quiet] CMD...: run CMD, output to LOG (and the terminal unless --quiet).
step() {
    local name=$1 log=$2 quiet=0 append=0 rc=0 t0=$SECONDS
    shift 2
    if [ "${1:-}" = "--quiet" ]; then quiet=1; shift; fi
    if [ "${1:-}" = "--append" ]; then append=1; shift; fi
    echo "=== [$name] $*"
    if [ $quiet = 1 ]; then
        "$@" >"$log" 2>&1 || rc=$?
        if [ $rc -ne 0 ]; then tail -n 40 "$log"; else tail -n 3 "$log"; fi
    elif [ $append = 1 ]; then
        echo "=== [$name] $*" >>"$log"
        "$@" 2>&1 | tee -a "$log" || rc=$?
    else
        "$@" 2>&1 | tee "$log" || rc=$?
    fi
    local dt=$((SECONDS - t0))
    if [ $rc -ne 0 ]; then
        failed+=("$name")
        summary+=("$(printf '%-8s FAILED (exit %d, %ds): see %s' "$name" "$rc" "$dt" "$log")")
        echo "=== [$name] FAILED with exit status $rc after ${dt}s"
    else
        summary+=("$(printf '%-8s ok (%ds)' "$name" "$dt")")
        echo "=== [$name] ok after ${dt}s"
    fi
}

echo "pyops device check: device=$DEVICE PYOPS_CUDA=$PYOPS_CUDA OUT=$OUT python=$(command -v "$PYTHON")"

if [ "${SKIP_INSTALL:-0}" = "1" ]; then
    echo "=== [build] skipped (SKIP_INSTALL=1)" | tee "$OUT/build.log"
else
    step build "$OUT/build.log" --quiet \
        "$PYTHON" -m pip install -v --no-build-isolation --no-deps -e .
fi

if [ "$DEVICE" = "cuda" ]; then
    step gpu "$OUT/nvidia-smi.txt" nvidia-smi
fi

step info "$OUT/info.log" "$PYTHON" -m pyops info
# The GPU check verifies every case (`--full`, where the command offers it: its default may be a
# quick subset); the CPU dry run the quick subset (`--quick`, where offered).
VERIFY_EXTRA=()
VERIFY_HELP=$("$PYTHON" -m pyops verify --help 2>/dev/null || true)
if [ "$DEVICE" = "cuda" ] && grep -q -- '--full' <<<"$VERIFY_HELP"; then
    VERIFY_EXTRA=(--full)
elif [ "$DEVICE" = "cpu" ] && grep -q -- '--quick' <<<"$VERIFY_HELP"; then
    VERIFY_EXTRA=(--quick)
fi
# One family at a time, each under its own time limit, so one slow or hanging family cannot eat
# the device time of the others; logs are appended, results packed after every family, so a
# run stopped at its limit still returns everything finished before.
: >"$OUT/verify.log"
: >"$OUT/bench.log"
RESULTS=${RESULTS_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/pyops-gpu-results.XXXXXX")}
mkdir -p "$RESULTS"
# GPU-only tests of kernels that have never run on a GPU before (their logs go to verify.log).
GPU_TESTS=${GPU_TESTS-tests/merging/test_methods_cuda.py tests/moe/test_biased_experts.py}
if [ "$DEVICE" = "cuda" ] && [ -n "$GPU_TESTS" ]; then
    step "tests" "$OUT/verify.log" --append timeout -k 10 "${TESTS_TIMEOUT:-150}" \
        "$PYTHON" -m pytest -q -x -p no:cacheprovider $GPU_TESTS
fi
for fam in $FAMILIES; do
    step "verify:$fam" "$OUT/verify.log" --append timeout -k 10 "$VERIFY_TIMEOUT" \
        "$PYTHON" -m pyops verify --op "$fam" --device "$DEVICE" "${VERIFY_EXTRA[@]}"
done
for fam in $FAMILIES; do
    limit=$BENCH_TIMEOUT
    if [ "$fam" = "merging" ]; then limit=$BENCH_TIMEOUT_MERGING; fi
    step "bench:$fam" "$OUT/bench.log" --append timeout -k 10 "$limit" \
        "$PYTHON" -m pyops bench --op "$fam" --device "$DEVICE" --results-dir "$RESULTS" "${EXTRA[@]}"
    tar -C "$RESULTS" -czf "$OUT/results.tar.gz" . 2>/dev/null || true
done

echo
echo "=== summary ($DEVICE)"
printf '  %s\n' "${summary[@]}"
find "$OUT" -type f | sort | sed 's/^/  /'
if [ ${#failed[@]} -ne 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all steps passed"
