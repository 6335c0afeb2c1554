"""The CUDA module compiles (nvcc is on the CPU machines; nothing runs there).

Configures the repository with PYOPS_CUDA=ON (a compile failure is then fatal, not a warning) into
a temporary build folder and builds only the `_C_cuda` target for sm_80. Slow (nvcc on two
cores): deselect with `-m "not slow"`.

Also checks the default PYOPS_CUDA=AUTO decision with configure-only runs: the CUDA module is
built only where it can be used (a CUDA compiler, and a CUDA torch or an NVIDIA driver), so a CPU
install on a machine with nvcc does not compile CUDA kernels it cannot run.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 1200


def _run(cmd, cwd=None):
    return _run_env(cmd, None, cwd)


def _run_env(cmd, env, cwd=None):
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
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
    if not (REPO / "csrc" / "module_cuda.cpp").exists():
        pytest.skip("csrc/module_cuda.cpp does not exist: there is no CUDA module to build")
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
    """docs/design.md#the-native-core-is-torch-free: the CUDA module links the CUDA runtime, never libtorch/libc10."""
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


def _nvidia_driver_present() -> bool:
    """The probes of CMakeLists.txt's AUTO mode: the driver's /proc entry, libcuda.so.1, nvidia-smi."""
    if Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi"):
        return True
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def _fake_torch(root: Path, cuda) -> Path:
    """A folder holding a stand-in `torch` package for the configure step's probe: torch.version.cuda
    is `cuda`, or importing torch fails when `cuda` is the string "ImportError"."""
    pkg = root / "torch"
    pkg.mkdir(parents=True)
    body = ("raise ImportError('torch is not installed in this build environment')\n" if cuda == "ImportError"
            else f"class version:\n    cuda = {cuda!r}\n")
    (pkg / "__init__.py").write_text(body)
    return root


# (stand-in torch: torch.version.cuda, or "ImportError" as under pip's build isolation; expected decision)
AUTO_CASES = {
    "cpu-torch": (None, "skip"),
    "torch-not-importable": ("ImportError", "skip"),
    "cuda-torch": ("12.4", "build"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(AUTO_CASES))
def test_auto_builds_the_cuda_module_only_where_it_can_be_used(case, tmp_path):
    """PYOPS_CUDA=AUTO on a machine with nvcc and no NVIDIA driver: a CPU torch, or a torch the
    configuring Python cannot import (pip's build isolation), skips _C_cuda with one status line that
    says why and how to force it; a CUDA torch builds it."""
    cuda, expected = AUTO_CASES[case]
    missing = [tool for tool in ("nvcc", "cmake", "ninja") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"not on PATH: {', '.join(missing)}")
    if expected == "skip" and _nvidia_driver_present():
        pytest.skip("an NVIDIA driver is present: AUTO builds the CUDA module here")
    env = dict(os.environ, PYTHONPATH=str(_fake_torch(tmp_path / "fake-torch", cuda)))
    build = tmp_path / "build"
    proc = _run_env([
        "cmake", "-S", str(REPO), "-B", str(build), "-G", "Ninja", "-DPYOPS_CUDA=AUTO",
        f"-Dpybind11_DIR={_pybind11_cmakedir()}", f"-DPython_EXECUTABLE={sys.executable}",
    ], env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"cmake configure failed:\n{log}"
    lines = [line for line in log.splitlines() if "_C_cuda" in line]
    targets = (build / "build.ninja").read_text()
    if expected == "skip":
        assert len(lines) == 1, f"expected one status line about _C_cuda, got {lines}\n{log}"
        assert "not building _C_cuda" in lines[0] and "PYOPS_CUDA=ON" in lines[0], lines[0]
        reason = "torch is not importable" if cuda == "ImportError" else "the installed torch is a CPU build"
        assert reason in lines[0] and "no NVIDIA driver" in lines[0], lines[0]
        assert "_C_cuda" not in targets, "AUTO skipped _C_cuda but build.ninja has a _C_cuda target"
    else:
        assert any("building _C_cuda" in line and "not building" not in line for line in lines), log
        assert "_C_cuda" in targets, "AUTO with a CUDA torch did not generate the _C_cuda target"


def test_unknown_pyops_cuda_value_is_refused(tmp_path):
    """PYOPS_CUDA takes AUTO, ON or OFF (or a CMake boolean); anything else stops the configure."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not on PATH")
    proc = _run_env([
        "cmake", "-S", str(REPO), "-B", str(tmp_path / "build"), "-DPYOPS_CUDA=sometimes",
        f"-Dpybind11_DIR={_pybind11_cmakedir()}", f"-DPython_EXECUTABLE={sys.executable}",
    ], dict(os.environ))
    assert proc.returncode != 0
    assert "PYOPS_CUDA: expected AUTO, ON or OFF, got 'sometimes'" in proc.stdout + proc.stderr
