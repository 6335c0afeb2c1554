"""The pytest-benchmark front end of the case tables: options, collection and session state.

``pytest bench/ --benchmark-only`` runs every family's cases (the ``CASES`` of `merging`,
`task_attention`, `neighborhood` and `moe`) with one benchmark per (case, entry): the test
`test_benchmarks.test_benchmark` is parametrized here with ``case`` ("<family>/<spec name>") and
``entry`` (the entry's name in the table), so ``--benchmark-group-by=param:case`` puts pyops and
its peers side by side (the group of each benchmark is its case already).

Entry names are known only once a case is built, so collection builds each selected case (at
quick size, which has the same entries, unless the spec has none) and releases it at once; the
run builds it again, once for its consecutive entries. The cases that write files (the checkpoint
cases) share one folder made with pytest's temporary-path factory, removed when the session ends.

pytest loads this file only when it collects bench/; ``python -m pyops bench`` never imports it.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
import traceback
from typing import Optional

import pytest

BUILD_FAILED = "(build)"      # the entry of a case whose builder raised: its one test reports the error


def pytest_addoption(parser):
    group = parser.getgroup("pyops-bench", "pyops benchmark cases (bench/)")
    group.addoption("--bench-full", action="store_true", default=False,
                    help="the full sizes and timings of `python -m pyops bench --full` (default: the quick sizes)")
    group.addoption("--bench-device", default=None, metavar="DEVICE",
                    help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")


def pytest_configure(config):
    if not config.pluginmanager.hasplugin("benchmark"):
        raise pytest.UsageError("bench/: the pytest-benchmark plugin is not loaded "
                                "(pip install pytest-benchmark, part of the `test` extra)")


_STATE = pytest.StashKey["BenchSession"]()


def bench_session(config) -> "BenchSession":
    """The session state of `config`, made on first use."""
    if _STATE not in config.stash:
        config.stash[_STATE] = BenchSession(config)
        config.add_cleanup(config.stash[_STATE].close)
    return config.stash[_STATE]


def _slug(name: str) -> str:
    """A test id part for an entry name: ASCII letters, digits, '.', '-' and '_'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name.replace("³", "^3")).strip("_") or "entry"


class BenchSession:
    """Device, sizes, the shared checkpoint folder, the case being run and its verification."""

    BUILD_FAILED = BUILD_FAILED

    def __init__(self, config):
        from . import resolve_device

        self.config = config
        try:
            self.device = resolve_device(config.getoption("--bench-device"))
        except ValueError as exc:
            raise pytest.UsageError(f"--bench-device: {exc}") from None
        self.device_type = self.device.split(":")[0]
        self.full = bool(config.getoption("--bench-full"))
        self._workdir: Optional[str] = None
        self._current: Optional[tuple] = None       # (case id, Case or None, error or None)
        self._verified: dict[str, dict] = {}
        self._machine: Optional[dict] = None

    # ---- the table -------------------------------------------------------------------------

    def workdir(self) -> str:
        """The folder the checkpoint cases write their models into (shared: written once)."""
        if self._workdir is None:
            # the factory behind the tmp_path_factory fixture, which collection cannot request
            factory = getattr(self.config, "_tmp_path_factory", None)
            self._workdir = (str(factory.mktemp("pyops-bench-checkpoints", numbered=False)) if factory is not None
                             else tempfile.mkdtemp(prefix="pyops-bench-"))
        return self._workdir

    def _workdir_for(self, mod, spec, full: bool) -> Optional[str]:
        # as `python -m pyops bench`: the cases that write files (disk_bytes) get the shared folder
        needs = hasattr(mod, "disk_bytes") and mod.disk_bytes([spec], full) > 0
        return self.workdir() if needs else None

    def specs(self) -> list:
        """[(case id, family module, spec)] of every case that runs on this device at this size."""
        from . import FAMILIES, harness, module

        return [(f"{stem}/{spec.name}", mod, spec) for stem in FAMILIES
                for mod in (module(stem),) for spec in harness.select(mod.CASES, self.device_type, self.full)]

    def entry_names(self, mod, spec) -> list:
        """The entries `spec` builds here; [BUILD_FAILED] when its builder raises."""
        case = None
        try:
            full = spec.quick is None
            case = mod.build(spec, self.device, full=full, workdir=self._workdir_for(mod, spec, full))
            return [e.name for e in case.entries]
        except Exception:
            return [BUILD_FAILED]
        finally:
            if case is not None:
                case.release()

    def timer(self):
        from . import harness

        return harness.synchronized_timer(self.device)

    # ---- the run ---------------------------------------------------------------------------

    def case(self, case_id: str):
        """The built case `case_id`: built when the previous test ran another case (which is
        released first), so that one case's tensors are alive at a time. Fails the test when the
        builder raised."""
        if self._current is None or self._current[0] != case_id:
            self.release()
            stem, name = case_id.split("/", 1)
            from . import module

            mod = module(stem)
            spec = next(s for s in mod.CASES if s.name == name)
            try:
                built = mod.build(spec, self.device, full=self.full,
                                  workdir=self._workdir_for(mod, spec, self.full))
                self._current = (case_id, built, None)
            except Exception as exc:
                self._current = (case_id, None, f"building case {case_id!r} failed: {type(exc).__name__}: {exc}\n"
                                                f"{traceback.format_exc(limit=6)}")
        if self._current[2] is not None:
            pytest.fail(self._current[2], pytrace=False)
        return self._current[1]

    def verify(self, case_id: str) -> dict:
        """The case's correctness check (`Case.verify`), run once per case, untimed; fails the test
        when it reports ``ok: False`` (a pyops output disagrees with the reference)."""
        if case_id not in self._verified:
            built = self.case(case_id)
            try:
                got = dict(built.verify() or {}) if built.verify is not None else {}
            except Exception as exc:
                got = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            self._verified[case_id] = _plain(got)
        got = self._verified[case_id]
        if got.get("ok") is False:
            pytest.fail(f"{case_id}: the pyops output disagrees with the reference: {got}", pytrace=False)
        return got

    def release(self) -> None:
        if self._current is not None and self._current[1] is not None:
            case, self._current = self._current[1], None
            case.release()
            import gc
            gc.collect()
            if self.device_type == "cuda":
                import torch
                torch.cuda.empty_cache()
        self._current = None

    def machine(self) -> dict:
        """`harness.machine_info` of this device, read once (it runs git)."""
        if self._machine is None:
            from . import harness

            self._machine = _plain(harness.machine_info(self.device))
        return self._machine

    def close(self) -> None:
        try:
            self.release()
        finally:
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)


def _plain(obj):
    """`obj` as JSON values (tuples to lists, anything else to its str)."""
    return json.loads(json.dumps(obj, default=str))


def pytest_generate_tests(metafunc):
    if not {"case", "entry"} <= set(metafunc.fixturenames):
        return
    s = bench_session(metafunc.config)
    timer = {"timer": s.timer()} if s.device_type == "cuda" else {}
    params = []
    for case_id, mod, spec in s.specs():
        names = s.entry_names(mod, spec)
        seen: set = set()
        for name in names:
            slug = _slug(name)
            while slug in seen:
                slug += "_"
            seen.add(slug)
            # group: pyops and its peers in one table; disable_gc: as the harness times its samples
            mark = pytest.mark.benchmark(group=case_id, disable_gc=True, **timer)
            params.append(pytest.param(case_id, name, id=f"{case_id}/{slug}", marks=mark))
    metafunc.parametrize(("case", "entry"), params)


@pytest.fixture(scope="session")
def pyops_bench(request) -> BenchSession:
    """The session state: device, sizes, the case being run."""
    return bench_session(request.config)


# What describes the machine: pytest-benchmark compares a saved run's machine_info with the current
# one and warns when they differ, so the date, the load and the commit (each benchmark's extra_info
# has the commit) stay out.
_MACHINE_KEYS = ("cpu_model", "cpu_flags", "cpu_count", "cpu_llc_mib", "cpu_affinity", "torch_threads", "mem_total_gib",
                 "platform", "python", "torch", "torch_cuda", "triton", "device_name", "device_capability",
                 "device_mem_gib", "device_sms")


def pytest_benchmark_update_machine_info(config, machine_info):
    m = bench_session(config).machine()
    machine_info["pyops"] = {k: m[k] for k in _MACHINE_KEYS if k in m}
