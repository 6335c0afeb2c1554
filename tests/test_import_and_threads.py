"""Process-level behaviour of `import pyops` and of the CPU kernels' threads: the import does not
pull in torch's inductor (the Triton kernel lists of the ops are found lazily, with the same
result), it leaves the garbage collector as it found it, and the kernels share torch's OpenMP
runtime instead of bringing a second one."""
from __future__ import annotations

import gc
import subprocess
import sys

import pytest
import torch

import pyops
from pyops import _lazy_triton_kernels, _native

TRITON_OPS = ["pyops::task_masked_attention_triton", "pyops::na_triton", "pyops::moe_experts_triton",
              "pyops::task_arithmetic_triton", "pyops::merge_triton"]


def _run(code: str) -> str:
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout.strip()


def test_import_does_not_load_inductor():
    out = _run("import sys, pyops; print('torch._inductor' in sys.modules, 'torch._dynamo' in sys.modules)")
    assert out == "False False"


def test_import_leaves_the_collector_as_it_found_it():
    assert gc.isenabled()
    assert _run("import gc; gc.disable(); import pyops; print(gc.isenabled())") == "False"


@pytest.mark.parametrize("name", TRITON_OPS)
def test_deferred_kernel_lists_match_torchs_own_discovery(name):
    import torch._library.triton as lib
    deferred = lib.get_triton_kernels_for_op(name)
    assert isinstance(deferred, _lazy_triton_kernels._DeferredKernels)
    fn = deferred._fn  # None once an earlier read computed the list
    got = list(deferred)
    if fn is not None:
        assert got == list(lib.get_inner_triton_kernels(fn))
    assert list(deferred) == got  # computed once, stable


def test_deferred_kernels_compute_on_first_read_only():
    calls = []

    def find(fn):
        calls.append(fn)
        return ["k1", "k2"]

    d = _lazy_triton_kernels._DeferredKernels(find, "fn")
    assert calls == []
    assert list(d) == ["k1", "k2"] and len(d) == 2 and d[1] == "k2" and bool(d)
    assert calls == ["fn"]


def test_triton_op_definition_uses_torchs_discovery_outside_pyops():
    """The swap is scoped to pyops's own import: torch's function is back afterwards."""
    import torch._library.triton as lib
    with _lazy_triton_kernels.deferred():
        assert lib.get_inner_triton_kernels.__name__ == "<lambda>"
    assert lib.get_inner_triton_kernels.__name__ == "get_inner_triton_kernels"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_one_openmp_runtime_in_the_process():
    if _native.cpu_module is None:
        pytest.skip(_native.cpu_missing_reason)
    with open(_native.cpu_module.__file__, "rb") as f:
        if b"libgomp.so.1" not in f.read():
            pytest.skip("built without OpenMP (PYOPS_OPENMP=OFF): the private thread pool is used")
    pyops.task_masked_attention(torch.randn(2, 2, 9, 4), torch.randn(2, 2, 9, 4), torch.randn(2, 2, 9, 4),
                                torch.zeros(9, dtype=torch.int32), backend="cpu")
    with open("/proc/self/maps") as f:
        gomp = {line.split()[-1] for line in f if "libgomp" in line}
    assert len(gomp) == 1, gomp


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_forked_child_with_one_thread_runs_the_kernels():
    """DataLoader-style workers: the parent ran the kernels on two threads, the child sets one
    thread (as torch's DataLoader does) and runs them again."""
    code = """
import os, torch, pyops
torch.set_num_threads(2)
g = torch.zeros(33, dtype=torch.int32)
q = torch.randn(4, 2, 33, 4)
want = pyops.task_masked_attention(q, q, q, g, backend="cpu")
pid = os.fork()
if pid == 0:
    torch.set_num_threads(1)
    got = pyops.task_masked_attention(q, q, q, g, backend="cpu")
    os._exit(0 if torch.equal(got, want) else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""
    assert _run(code) == "0"


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_forked_child_of_a_threaded_parent_runs_and_is_told_why_it_has_one_thread():
    """torch's thread pool cannot run in a forked child once the parent used it: without pyops'
    fork hook the child below hangs in its first op (plain torch.mm included). The hook sets the
    child to one thread and the first pyops op there warns once, naming the fix."""
    code = """
import os, sys, time, warnings, torch, pyops
torch.set_num_threads(2)
a = torch.randn(256, 256)
(a @ a).sum()
g = torch.zeros(33, dtype=torch.int32)
q = torch.randn(4, 2, 33, 4)
want = pyops.task_masked_attention(q, q, q, g, backend="cpu")
pid = os.fork()
if pid == 0:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = pyops.task_masked_attention(q, q, q, g, backend="cpu")
        pyops.task_masked_attention(q, q, q, g, backend="cpu")
        (a @ a).sum()
    told = [w for w in seen if "forked" in str(w.message) and "spawn" in str(w.message)]
    ok = torch.equal(got, want) and torch.get_num_threads() == 1 and len(told) == 1
    os._exit(0 if ok else 3)
deadline = time.time() + 60
while time.time() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print(os.waitstatus_to_exitcode(status))
        break
    time.sleep(0.05)
else:
    os.kill(pid, 9)
    print("hung")
"""
    assert _run(code) == "0"


def test_from_models_spellings_are_the_same_functions():
    """The issue's `from_models` form of `pyops.merge` (and of the pilot op) is reachable as an attribute."""
    assert pyops.merge.from_models is pyops.merge_from_models
    assert pyops.task_arithmetic.from_models is pyops.task_arithmetic_from_models


def test_public_names_are_the_api_modules_names():
    """pyops.__all__ (info aside) is what pyops._api binds: the lazy binding under `python -m pyops
    merge` and the eager import give the same names."""
    from pyops import _api
    assert set(pyops.__all__) - {"info"} == set(_api.__all__)
    assert all(getattr(pyops, n) is getattr(_api, n) for n in _api.__all__)
