"""Suite-wide setup.

Without CUDA, Triton kernels run under its CPU interpreter (docs/design.md#testing). `triton.jit` reads
TRITON_INTERPRET when a kernel is decorated, so it is set here, before anything imports triton
or pyops. The helpers themselves live in tests/_support.py (importable from every test folder).
"""
import atexit
import os
import shutil
import sys
import tempfile
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A private inductor cache per run: torch's FX-graph cache keys a custom op by its name and schema,
# not by its fake kernel, so graphs cached by an older pyops build (other output shapes) would be
# replayed against the new ops. Set TORCHINDUCTOR_CACHE_DIR to reuse a cache on purpose.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="pyops-tests-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)  # a per-run cache leaves nothing behind

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402

from _support import available_backends  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running checks (native builds); deselect with -m 'not slow'")


def pytest_addoption(parser):
    parser.addoption("--native-cpu-sanitized", action="store_true", default=False,
                     help="refuse to run unless pyops._C is the sanitizer build named by PYOPS_NATIVE_CPU "
                          "(.ci/sanitize.sh): a run on the ordinary build would prove nothing")


def _sanitized_cpu_module() -> str:
    """'<file> (<runtimes>)' for the loaded pyops._C, or pytest.exit with why it is not the sanitized build."""
    from pyops import _native

    def refuse(why):
        pytest.exit(f"--native-cpu-sanitized: {why}", returncode=4)

    wanted = os.environ.get(_native.NATIVE_CPU_ENV)
    if not wanted:
        refuse(f"{_native.NATIVE_CPU_ENV} is not set")
    mod = _native.cpu_module
    if mod is None or sys.modules.get("pyops._C") is not mod:
        refuse(f"pyops._C is not loaded ({_native.cpu_missing_reason})")
    if not os.path.samefile(mod.__file__, wanted):
        refuse(f"pyops._C is {mod.__file__}, not {wanted}")
    with open(mod.__file__, "rb") as f:
        image = f.read()
    runtimes = [name for name, symbol in (("address", b"__asan_init"), ("undefined", b"__ubsan_handle_"))
                if symbol in image]
    if not runtimes:
        refuse(f"{mod.__file__} is not instrumented (no __asan_init / __ubsan_handle_ symbol)")
    if "address" in runtimes and os.path.exists("/proc/self/maps"):
        with open("/proc/self/maps") as f:
            if "libasan" not in f.read():
                refuse("the ASan runtime is not loaded in this process")
    return f"{mod.__file__} (-fsanitize={','.join(runtimes)})"


def pytest_sessionstart(session):
    if session.config.getoption("--native-cpu-sanitized"):
        what = _sanitized_cpu_module()
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"pyops._C is the sanitized build {what}")


@pytest.fixture
def rng(request) -> torch.Generator:
    """A CPU generator seeded from the test's id: reproducible, different for every test."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(name="available_backends")
def available_backends_fixture():
    """`available_backends(device=None)` as a fixture."""
    return available_backends


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    """Tests choose their backend explicitly; a PYOPS_BACKEND in the caller's shell must not leak in."""
    monkeypatch.delenv("PYOPS_BACKEND", raising=False)
