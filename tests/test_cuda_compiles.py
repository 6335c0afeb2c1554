"""The CUDA module compiles (DESIGN: nvcc is installed on the CPU machines, nothing runs there).

Configures the repository with PYOPS_CUDA=ON (a compile failure is then fatal, not a warning) into
a temporary build folder and builds only the `_C_cuda` target for sm_80. Slow (nvcc on two
cores): deselect with `-m "not slow"`.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 1200


def _run(cmd, cwd=None):
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"timed out after {TIMEOUT_S}s: {' '.join(map(str, cmd))}\n{exc.stdout or ''}\n{exc.stderr or ''}")
    return proc


def _pybind11_cmakedir() -> str:
    proc = _run([sys.executable, "-m", "pybind11", "--cmakedir"])
    if proc.returncode != 0:
        pytest.skip(f"pybind11 is not importable here: {proc.stderr.strip()}")
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def cuda_build(tmp_path_factory):
    """(returncode, log, build dir) of configuring and building the _C_cuda target once."""
    missing = [tool for tool in ("nvcc", "cmake", "ninja") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"not on PATH: {', '.join(missing)}")
    if not (REPO / "csrc" / "bindings_cuda.cpp").exists():
        pytest.skip("csrc/bindings_cuda.cpp does not exist yet: there is no CUDA module to build")
    build = tmp_path_factory.mktemp("build-cuda")
    configure = [
        "cmake", "-S", str(REPO), "-B", str(build), "-G", "Ninja",
        "-DPYOPS_CUDA=ON", "-DPYOPS_CUDA_ARCHS=80",
        f"-Dpybind11_DIR={_pybind11_cmakedir()}", f"-DPython_EXECUTABLE={sys.executable}",
    ]
    proc = _run(configure)
    if proc.returncode != 0:
        return proc.returncode, f"cmake configure failed:\n{proc.stdout}\n{proc.stderr}", build
    proc = _run(["cmake", "--build", str(build), "--target", "_C_cuda"])
    return proc.returncode, f"building _C_cuda:\n{proc.stdout}\n{proc.stderr}", build


@pytest.mark.slow
def test_cuda_module_compiles(cuda_build):
    rc, log, build = cuda_build
    assert rc == 0, f"exit status {rc}\n{log}"
    assert list(build.glob("_C_cuda*.so")), f"no _C_cuda*.so in {build}\n{log}"


@pytest.mark.slow
def test_cuda_module_is_torch_free(cuda_build):
    """DESIGN rule 1: the CUDA module links the CUDA runtime, never libtorch/libc10."""
    rc, log, build = cuda_build
    if rc != 0 or not list(build.glob("_C_cuda*.so")):
        pytest.skip("the CUDA module did not build (see test_cuda_module_compiles)")
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf is not on PATH")
    so = str(next(build.glob("_C_cuda*.so")))
    out = subprocess.run([readelf, "-d", so], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
    bad = [lib for lib in needed if re.search(r"torch|c10|caffe2", lib, re.IGNORECASE)]
    assert not bad, f"_C_cuda links {bad} (NEEDED: {needed})"
