"""The native core is torch-free (docs/design.md#the-native-core-is-torch-free): no torch header in csrc/, no libtorch/libc10
dependency or symbol in the built module, and the module loads in a process without torch."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyops import _native

REPO = Path(__file__).resolve().parents[1]
TORCH_LIB = re.compile(r"torch|c10|caffe2|libshm", re.IGNORECASE)


def native_modules():
    mods = [("_C", _native.cpu_module, _native.cpu_missing_reason),
            ("_C_cuda", _native.cuda_module, _native.cuda_missing_reason)]
    return [pytest.param(m, reason, id=name) for name, m, reason in mods]


def module_file(module, reason) -> str:
    if module is None:
        pytest.skip(reason)
    return module.__file__


@pytest.mark.parametrize("module,reason", native_modules())
def test_no_torch_in_needed_libraries(module, reason):
    so = module_file(module, reason)
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf is not on PATH")
    out = subprocess.run([readelf, "-d", so], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
    assert needed, f"readelf -d {so} listed no NEEDED entries:\n{out}"
    bad = [lib for lib in needed if TORCH_LIB.search(lib)]
    assert not bad, f"{os.path.basename(so)} links {bad}"


@pytest.mark.parametrize("module,reason", native_modules())
def test_no_torch_symbols(module, reason):
    """No undefined symbol from c10/ATen/torch (e.g. an accidental header-only use that needs libc10)."""
    so = module_file(module, reason)
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm is not on PATH")
    out = subprocess.run([nm, "-D", "-C", "--undefined-only", so], capture_output=True, text=True, check=True).stdout
    bad = [line.strip() for line in out.splitlines() if re.search(r"\b(c10|at|torch|caffe2)::", line)]
    assert not bad, f"{os.path.basename(so)} needs torch symbols: {bad[:10]}"


def test_cpu_module_loads_without_torch():
    """Loaded straight from its file in a fresh interpreter, pyops._C never imports torch."""
    so = module_file(_native.cpu_module, _native.cpu_missing_reason)
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('_C', {so!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert m.active_isa() in ('base', 'avx2'), m.active_isa()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def test_csrc_includes_no_torch_headers():
    sources = [p for p in (REPO / "csrc").rglob("*") if p.suffix in {".h", ".hpp", ".cuh", ".cpp", ".cc", ".cu"}]
    if not sources:
        pytest.skip(f"no C++/CUDA sources under {REPO / 'csrc'}")
    pattern = re.compile(r'^\s*#\s*include\s*[<"](torch/|ATen/|c10/|caffe2/)', re.MULTILINE)
    bad = [f"{p.relative_to(REPO)}: {m.group(0).strip()}" for p in sources for m in pattern.finditer(p.read_text())]
    assert not bad, "torch headers in csrc/: " + "; ".join(bad)
