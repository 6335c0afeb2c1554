#!/usr/bin/env bash
# The device check for the lent GPU machine: build pyops with its CUDA kernels, then run
# `python -m pyops info`, `verify --device cuda` and `bench --device cuda`; logs and results go to $OUT.
#
#   bash bench/gpu_check.sh                                    # on the GPU machine (no network needed)
#   PYOPS_CUDA=OFF bash bench/gpu_check.sh                     # dry run on a CPU machine: verify and
#                                                              # bench run on cpu with --quick
#   SKIP_INSTALL=1 ...                                         # use the build already installed
#   PYOPS_COMMIT=<hash> ...                                    # recorded in the JSON when .git is absent
#
# Every step runs even if an earlier one failed; the exit status is non-zero if any step failed.
# $OUT holds at most 8 files, at most 2 folders deep: build.log, nvidia-smi.txt, info.log,
# verify.log, bench.log and results/<family>-<device>.{json,png} (packed into results.tar.gz
# when there are more result files than fit).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$PWD/gpu_out}
PYTHON=${PYTHON:-python}
export PYOPS_CUDA=${PYOPS_CUDA:-ON}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 4)}
mkdir -p "$OUT" "$OUT/results"

if [ "$PYOPS_CUDA" = "OFF" ]; then
    DEVICE=cpu
    EXTRA=(--quick)
else
    DEVICE=cuda
    EXTRA=()
fi

failed=()
summary=()

# step NAME LOG [--quiet] CMD...: run CMD, output to LOG (and the terminal unless --quiet).
step() {
    local name=$1 log=$2 quiet=0 rc=0 t0=$SECONDS
    shift 2
    if [ "${1:-}" = "--quiet" ]; then quiet=1; shift; fi
    echo "=== [$name] $*"
    if [ $quiet = 1 ]; then
        "$@" >"$log" 2>&1 || rc=$?
        if [ $rc -ne 0 ]; then tail -n 40 "$log"; else tail -n 3 "$log"; fi
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
# `verify --quick` only where the command offers it.
VERIFY_EXTRA=()
if [ ${#EXTRA[@]} -ne 0 ] && "$PYTHON" -m pyops verify --help 2>/dev/null | grep -q -- '--quick'; then
    VERIFY_EXTRA=("${EXTRA[@]}")
fi
step verify "$OUT/verify.log" "$PYTHON" -m pyops verify --device "$DEVICE" "${VERIFY_EXTRA[@]}"
step bench "$OUT/bench.log" "$PYTHON" -m pyops bench --device "$DEVICE" --results-dir "$OUT/results" "${EXTRA[@]}"

# Keep what comes back within 8 files: pack the results if the folders hold too many.
n_files=$(find "$OUT" -type f | wc -l)
if [ "$n_files" -gt 8 ]; then
    tar -C "$OUT" -czf "$OUT/results.tar.gz" results && rm -rf "$OUT/results"
    echo "packed $OUT/results into results.tar.gz ($n_files files were too many)"
fi

echo
echo "=== summary ($DEVICE)"
printf '  %s\n' "${summary[@]}"
find "$OUT" -type f | sort | sed 's/^/  /'
if [ ${#failed[@]} -ne 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all steps passed"
