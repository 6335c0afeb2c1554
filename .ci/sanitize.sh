#!/usr/bin/env bash
# CI's sanitizer run: builds pyops._C (CPU only, never CUDA) with -fsanitize=address,undefined into
# its own directory, build/asan, and runs the native-kernel tests of every family on it, then the
# cpu-backend cases of every tests/*/test_backends.py. Any sanitizer report, test failure or build
# error makes it exit non-zero. About 5½ minutes on the project's 2-core VM (build 80 s, tests 4 min).
#
#   bash .ci/sanitize.sh                                          # CI: the whole selection
#   bash .ci/sanitize.sh tests/moe/test_native_kernels.py -k gather   # arguments replace the selection
#
# Needs the README's setup (an active venv with torch, pytest and pybind11 from ".[test]") and the
# system's gcc and cmake (ninja if present). The editable install and build/cpu are left alone.
#
# How the sanitized module gets in: the interpreter and torch are not instrumented, so the ASan and
# UBSan runtimes are LD_PRELOADed (ASan's must come first in the process); PYOPS_NATIVE_CPU
# (pyops/_native.py) loads the sanitized file as pyops._C; pytest's --native-cpu-sanitized
# (tests/conftest.py) refuses to run unless pyops._C really is that file and is instrumented.
# Every report aborts its process (-fno-sanitize-recover, halt_on_error, abort_on_error), and the
# output (the tests' subprocesses write to it too) is searched for reports at the end, so even a
# report whose crash a test tolerated fails the run. Leak detection is off: CPython and torch keep
# memory until exit.
#
# Environment: PYTHON (default python), SANITIZERS (default address,undefined), SANITIZE_BUILD
# (default build/asan), JOBS (default nproc).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

python=${PYTHON:-python}
sanitizers=${SANITIZERS:-address,undefined}
build=${SANITIZE_BUILD:-build/asan}
case "$build" in /*) ;; *) build="$repo/$build" ;; esac
jobs=${JOBS:-$(nproc 2>/dev/null || echo 2)}

# The native-kernel tests: the bindings called directly (task_attention, neighborhood, moe), or the
# merge kernels through the cpu backend against the reference (merging), on both ISA builds.
native_tests=(
  tests/task_attention/test_native_kernels.py
  tests/neighborhood/test_native_kernels.py
  tests/moe/test_native_kernels.py
  tests/merging/test_methods_cpu.py
  tests/merging/test_methods_cpu_backward.py
)
backend_tests=(tests/*/test_backends.py)   # run with -k cpu: the public ops on the cpu backend

# ---- build ---------------------------------------------------------------------------------------
t0=$(date +%s)
echo "sanitize: building pyops._C with -fsanitize=$sanitizers into $build"
pybind11_dir=$("$python" -m pybind11 --cmakedir) || {
  echo "sanitize: pybind11 is not importable by $python (pip install -e \".[test]\" installs it)" >&2; exit 2; }
generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
if [ -f "$build/CMakeCache.txt" ] && ! grep -qx "PYOPS_SANITIZE:STRING=$sanitizers" "$build/CMakeCache.txt"; then
  echo "sanitize: $build was configured with other sanitizers; starting it afresh"
  rm -rf "$build"
fi
mkdir -p "$build"
if ! cmake -S "$repo" -B "$build" "${generator[@]}" -Wno-dev \
       -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPYOPS_SANITIZE="$sanitizers" -DPYOPS_CUDA=OFF \
       -DPython_EXECUTABLE="$(command -v "$python")" -Dpybind11_DIR="$pybind11_dir" \
       >"$build/configure.log" 2>&1; then
  cat "$build/configure.log" >&2
  echo "sanitize: cmake configure failed" >&2
  exit 2
fi
cmake --build "$build" --target _C -j "$jobs"
module="$build/_C$("$python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
[ -f "$module" ] || { echo "sanitize: the build did not produce $module" >&2; exit 2; }
t1=$(date +%s)

# ---- run -----------------------------------------------------------------------------------------
preload=()
for want in address:asan undefined:ubsan; do
  if [[ ",$sanitizers," == *",${want%%:*},"* ]]; then
    so=$(gcc -print-file-name="lib${want#*:}.so")
    [ -e "$so" ] || { echo "sanitize: gcc has no lib${want#*:}.so" >&2; exit 2; }
    preload+=("$(readlink -f "$so")")
  fi
done
log=$(mktemp "${TMPDIR:-/tmp}/pyops-sanitize.XXXXXX")
trap 'rm -f "$log"' EXIT
export LD_PRELOAD="${preload[*]}${LD_PRELOAD:+ $LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1"
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1"
export PYOPS_NATIVE_CPU="$module"
echo "sanitize: pyops._C from $module; LD_PRELOAD=$LD_PRELOAD"

# --capture=sys: pytest captures Python's sys.stdout/stderr only, so a report that the runtimes write
# to file descriptor 2 before aborting reaches the log instead of dying in pytest's capture file.
rc=0
run_pytest() {
  echo "sanitize: pytest $*"
  "$python" -m pytest -q -p no:cacheprovider --capture=sys --native-cpu-sanitized "$@" 2>&1 | tee -a "$log" || {
    local status=$?
    echo "sanitize: pytest exit code $status" >&2
    rc=1
  }
}
if [ "$#" -gt 0 ]; then
  run_pytest "$@"
else
  run_pytest "${native_tests[@]}"
  run_pytest "${backend_tests[@]}" -k cpu
fi
t2=$(date +%s)

# Any report fails the run, even one whose abort was survived (a subprocess a test tolerated).
if grep -qE "ERROR: AddressSanitizer|SUMMARY: (AddressSanitizer|UndefinedBehaviorSanitizer)|: runtime error: " "$log"; then
  echo "sanitize: sanitizer reports in the output above:" >&2
  grep -E "ERROR: AddressSanitizer|: runtime error: " "$log" >&2
  rc=1
fi
echo "sanitize: build $((t1 - t0)) s, tests $((t2 - t1)) s, total $((t2 - t0)) s"
if [ "$rc" -ne 0 ]; then
  echo "sanitize: FAILED" >&2
  exit 1
fi
echo "sanitize: passed, no sanitizer report"
