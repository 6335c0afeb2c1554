"""The shared benchmark harness (docs/design.md#benchmarks): every op family's benchmark runs on it.

Model
-----
A family module (``bench/<stem>.py``) starts with ``CASES``: a table of `CaseSpec` records, one
per benchmark case (the op, the sizes and their quick variant, the dtype, forward or
forward+backward, the peers measured, the targets, the timing). Its ``build(spec, device)`` turns
one spec into a `Case` through one of a few short builders. A case holds `Entry` objects: the
pyops backends and the peers a user would pick instead (plain PyTorch, an in-place PyTorch
version, a copy as the machine's bandwidth reference, ...). Each entry is a zero-argument
callable, with optional untimed `setup`/`teardown`, the bytes it must move and the FLOPs it must
do (for the GB/s and GFLOP/s columns); the case states the op's own figures, computed from the
sizes, for the entries that state none (`work`).

Two front ends run the same cases: `run_family` below (``python -m pyops bench``: the entries of
a case alternate, with peak memory and target checks) and ``bench/test_benchmarks.py`` (pytest-
benchmark: one benchmark per entry, warmed up and sized by `warm_up` and `planned_rounds`).

Method
------
1. ``setup`` of every entry, then warm-up calls of each entry (an entry that raises is recorded
   as skipped — `pyops.BackendUnavailableError` — or as an error, with the reason, and the
   others go on). The warm-up also sizes ``number``: how many calls make one timed sample
   (at least ``min_sample_s``).
2. Peak memory of one call per entry: on Linux, "5" written to /proc/self/clear_refs resets
   VmHWM to the current RSS; the entry runs once and VmHWM − VmRSS(before) is its peak extra
   host memory. Where the reset is refused, a thread samples VmRSS every 0.5 ms instead (marked
   ``sampled``); without /proc the column is empty. RSS counts pages newly touched: memory the C
   allocator hands out again from its own heap (glibc: blocks below its mmap threshold, which
   grows up to 32 MiB) does not show, so temporaries of small cases can read as 0; tensors of
   32 MiB and more are fresh mmap pages and count in full. On CUDA the peak device memory above what
   was allocated before (``torch.cuda.max_memory_allocated``) is reported as well.
3. Timed rounds alternate the entries (A B C A B C ...), so that slow drifts of a shared, noisy
   machine hit every entry alike; CUDA samples are timed with CUDA events after a synchronize.
   The result of an entry is the median of its samples. A case stops after ``repeats`` rounds,
   or earlier once ``max_seconds`` are spent (but never before ``min_repeats`` rounds).
4. Ratios against the named baseline entry: speed-up = baseline median / entry median (> 1 is
   faster than the baseline). Effective GB/s = ``bytes`` / median.

Output: `<results_dir>/<stem>-<device>.json` (machine, versions, commit, every sample), a
printed table, and `<results_dir>/<stem>-<device>.png` when matplotlib is installed.
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, TextIO, Union

import torch

SCHEMA = 1
MIB = 1 << 20
M = 1 << 20

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

@dataclass
class Entry:
    """One contender of a case: a pyops backend or a peer.

    fn:        zero-argument callable, the thing timed. Its return value is dropped at once.
    setup:     untimed, called once before the warm-up (e.g. allocate a preallocated `out`).
    teardown:  untimed, called once after the case.
    bytes:     bytes the operation must move (for the GB/s column); None: no GB/s.
    flops:     floating-point operations per call (for GFLOP/s); None: none.
    group:     "pyops" (a pyops backend), "peer" (what a user would use instead) or
               "reference" (a yardstick such as a copy at memory bandwidth).
    note:      one line that says what the entry does, kept in the JSON.
    skip:      a reason not to run this entry at all (recorded, not timed).
    info:      called after the warm-up; its dict goes into the JSON (e.g. which backend ran).
    measure_memory: False leaves out the peak-memory call (for an entry that runs in a child
               process, whose memory this process cannot see: it reports its own in `info`).
    """
    name: str
    fn: Optional[Callable[[], Any]]
    setup: Optional[Callable[[], Any]] = None
    teardown: Optional[Callable[[], Any]] = None
    bytes: Optional[int] = None
    flops: Optional[int] = None
    group: str = "peer"
    note: str = ""
    skip: Optional[str] = None
    info: Optional[Callable[[], dict]] = None
    measure_memory: bool = True


@dataclass
class Check:
    """A figure a family reports with its target (e.g. "GB/s vs copy_ >= 0.7")."""
    name: str
    value: Optional[float]
    target: Optional[float] = None
    cmp: str = ">="            # ">=" or "<="
    unit: str = ""
    note: str = ""

    @property
    def ok(self) -> Optional[bool]:
        if self.value is None or self.target is None or not math.isfinite(self.value):
            return None
        return self.value >= self.target if self.cmp == ">=" else self.value <= self.target

    def to_json(self) -> dict:
        return {"name": self.name, "value": self.value, "target": self.target, "cmp": self.cmp,
                "unit": self.unit, "ok": self.ok, "note": self.note}

    def line(self) -> str:
        val = "n/a" if self.value is None else f"{self.value:.3g}{self.unit}"
        tgt = "" if self.target is None else f" (target {self.cmp} {self.target:g}{self.unit})"
        verdict = {True: "  OK", False: "  MISS", None: ""}[self.ok]
        return f"{self.name}: {val}{tgt}{verdict}" + (f"  [{self.note}]" if self.note else "")


@dataclass
class Case:
    """One problem size of a family, with its entries.

    baseline:    name of the entry the speed-ups are taken against.
    params:      what the case is (dtype, shape, ...), kept in the JSON.
    checks:      called with the `CaseResult` after timing; returns the `Check`s to report.
    verify:      untimed, called once after timing; returns a dict for the JSON (e.g. max error
                 of the pyops output against a reference). A key "ok": False marks a failure.
    spec, op:    the `CaseSpec` (its name) the case was built from and the op it measures.
    cleanup:     called by `release()`, last added first (e.g. remove the files the case wrote).
    bytes, flops: the minimum traffic and the useful FLOPs of one call of the op, from the sizes:
                 the figures of every entry that computes the op and states none of its own
                 (`work`); None: not defined for this op.
    """
    name: str
    entries: list[Entry]
    baseline: str
    params: dict = field(default_factory=dict)
    repeats: int = 15
    min_repeats: int = 3
    max_seconds: float = 60.0
    warmup: int = 2
    min_sample_s: Optional[float] = None     # default: 10 ms on CPU, 2 ms on CUDA
    checks: Optional[Callable[["CaseResult"], list[Check]]] = None
    verify: Optional[Callable[[], dict]] = None
    spec: Optional[str] = None
    op: Optional[str] = None
    cleanup: list = field(default_factory=list)
    bytes: Optional[int] = None
    flops: Optional[int] = None

    def release(self) -> None:
        """Drop every reference to the case's tensors (entries close over them) and run `cleanup`."""
        self.entries = []
        self.checks = None
        self.verify = None
        todo, self.cleanup = self.cleanup, []
        first: Optional[BaseException] = None
        for fn in reversed(todo):
            try:
                fn()
            except Exception as exc:  # the others still run; the first failure is raised after
                first = first or exc
        if first is not None:
            raise first


@dataclass
class EntryResult:
    name: str
    group: str
    note: str
    status: str = "ok"                     # ok | skipped | error
    reason: Optional[str] = None
    bytes: Optional[int] = None
    flops: Optional[int] = None
    number: int = 1                        # calls per sample
    samples_s: list[float] = field(default_factory=list)
    first_call_s: Optional[float] = None
    peak_rss_bytes: Optional[int] = None
    peak_rss_method: Optional[str] = None
    peak_dev_bytes: Optional[int] = None
    speedup: Optional[float] = None
    info: dict = field(default_factory=dict)

    @property
    def median_s(self) -> Optional[float]:
        return statistics.median(self.samples_s) if self.samples_s else None

    @property
    def spread(self) -> Optional[float]:
        """Half the inter-quartile range, relative to the median."""
        if len(self.samples_s) < 4:
            return None
        q = statistics.quantiles(self.samples_s, n=4)
        return (q[2] - q[0]) / 2 / self.median_s

    @property
    def gbps(self) -> Optional[float]:
        m = self.median_s
        return self.bytes / m / 1e9 if (self.bytes and m) else None

    @property
    def gflops(self) -> Optional[float]:
        m = self.median_s
        return self.flops / m / 1e9 if (self.flops and m) else None

    @property
    def peak_rss_mib(self) -> Optional[float]:
        return None if self.peak_rss_bytes is None else self.peak_rss_bytes / MIB

    @property
    def peak_dev_mib(self) -> Optional[float]:
        return None if self.peak_dev_bytes is None else self.peak_dev_bytes / MIB

    def to_json(self) -> dict:
        m = self.median_s
        return {
            "name": self.name, "group": self.group, "note": self.note, "status": self.status,
            "reason": self.reason, "bytes": self.bytes, "flops": self.flops,
            "median_ms": None if m is None else m * 1e3,
            "min_ms": min(self.samples_s) * 1e3 if self.samples_s else None,
            "spread": self.spread, "gb_per_s": self.gbps, "gflop_per_s": self.gflops,
            "speedup_vs_baseline": self.speedup,
            "peak_rss_mib": self.peak_rss_mib, "peak_rss_method": self.peak_rss_method,
            "peak_device_mib": self.peak_dev_mib,
            "calls_per_sample": self.number, "first_call_ms": None if self.first_call_s is None else self.first_call_s * 1e3,
            "samples_ms": [round(s * 1e3, 4) for s in self.samples_s],
            "info": self.info,
        }


@dataclass
class CaseResult:
    name: str
    params: dict
    baseline: str
    entries: list[EntryResult]
    rounds: int = 0
    wall_s: float = 0.0
    checks: list[Check] = field(default_factory=list)
    verify: dict = field(default_factory=dict)
    spec: Optional[str] = None
    op: Optional[str] = None
    bytes: Optional[int] = None
    flops: Optional[int] = None

    def get(self, name: str) -> Optional[EntryResult]:
        for e in self.entries:
            if e.name == name:
                return e
        return None

    def ok(self, name: str) -> Optional[EntryResult]:
        """The entry's result if it ran, else None."""
        e = self.get(name)
        return e if (e is not None and e.status == "ok" and e.samples_s) else None

    def to_json(self) -> dict:
        return {"name": self.name, "spec": self.spec, "op": self.op, "params": self.params, "baseline": self.baseline,
                "bytes": self.bytes, "flops": self.flops, "rounds": self.rounds, "wall_s": self.wall_s,
                "entries": [e.to_json() for e in self.entries],
                "checks": [c.to_json() for c in self.checks], "verify": self.verify}


@dataclass
class FamilyResult:
    family: str
    device: str
    quick: bool
    machine: dict
    cases: list[CaseResult] = field(default_factory=list)
    wall_s: float = 0.0
    errors: list[str] = field(default_factory=list)
    selection: Optional[list] = None       # the ops asked for (--op an op name); None: the whole family

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "family": self.family, "device": self.device, "quick": self.quick,
                "selection": self.selection, "machine": self.machine, "wall_s": self.wall_s, "errors": self.errors,
                "cases": [c.to_json() for c in self.cases]}

    @property
    def failed(self) -> bool:
        """Something broke (an entry raised other than 'backend unavailable', a verify failed)."""
        return bool(self.errors) or any(
            e.status == "error" for c in self.cases for e in c.entries) or any(
            c.verify.get("ok") is False for c in self.cases)


# --------------------------------------------------------------------------------------------
# Case specs: the data every family module starts with
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    """How long a case is timed (see Method above).

    expect_s: the case's expected wall time (setup, warm-up, timing and checks) on a 2-core CPU
              machine; only the estimate line printed before a run reads it. None: unknown (the
              estimate then counts ``max_seconds``, a bound on the timed rounds).
    """
    repeats: int = 15
    min_repeats: int = 3
    max_seconds: float = 60.0
    warmup: int = 2
    min_sample_s: Optional[float] = None     # default: 10 ms on CPU, 2 ms on CUDA
    expect_s: Optional[float] = None


@dataclass(frozen=True)
class CaseSpec:
    """One benchmark case as data; its family module's ``build(spec, device)`` makes the `Case`.

    name:     stable id, unique in its family (selection, test ids); the printed case name is
              made from the sizes by the builder, so that it says what ran.
    op:       the public op the case measures; ``also``: other public ops it stands for.
    kind:     which builder of the family module turns the spec into a `Case`.
    sizes:    the full-size problem; ``quick`` overrides some of them for the quick (default)
              run, None: the case runs at full size only (``--full``).
    dtype:    "fp32" | "fp16" | "bf16".
    backward: forward+backward (True) or forward only.
    backends: device type -> the pyops backends measured there; the case runs only on the
              device types listed.
    peers:    the entries measured besides pyops, in their order in the table; the token "pyops"
              marks where the pyops entries go. `baseline`: the peer the speed-ups are taken
              against.
    targets:  device type (or "<device type> quick") -> {check key: target}; a key present with
              None reports the figure without a target; a key absent leaves the check out.
    timing:   "full" | "quick" (or "<device type> full|quick") -> `Timing`.
    """
    name: str
    op: str
    kind: str
    sizes: Mapping[str, Any]
    quick: Optional[Mapping[str, Any]] = field(default_factory=dict)
    dtype: str = "fp32"
    backward: bool = False
    backends: Mapping[str, tuple] = field(default_factory=lambda: {"cpu": ("cpu",)})
    peers: tuple = ()
    baseline: str = ""
    targets: Mapping[str, Mapping[str, Optional[float]]] = field(default_factory=dict)
    timing: Mapping[str, Timing] = field(default_factory=dict)
    also: tuple = ()

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"CaseSpec {self.name!r}: dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.baseline and self.baseline not in self.peers:
            raise ValueError(f"CaseSpec {self.name!r}: baseline {self.baseline!r} is not one of its peers {self.peers}")

    @property
    def ops(self) -> tuple:
        return (self.op, *self.also)

    @property
    def devices(self) -> tuple:
        return tuple(self.backends)

    def runs(self, device_type: str, full: bool) -> bool:
        return device_type in self.backends and (full or self.quick is not None)

    def sizes_for(self, full: bool) -> dict:
        out = dict(self.sizes)
        if not full:
            out.update(self.quick or {})
        return out

    def timing_for(self, device_type: str, full: bool) -> Timing:
        mode = "full" if full else "quick"
        return self.timing.get(f"{device_type} {mode}") or self.timing.get(mode) or Timing()

    def targets_for(self, device_type: str, full: bool) -> dict:
        mode = "full" if full else "quick"
        got = self.targets.get(f"{device_type} {mode}")
        return dict(got if got is not None else self.targets.get(device_type, {}))


PYOPS = "pyops"   # the token in CaseSpec.peers where the pyops entries go


@dataclass
class Build:
    """A `CaseSpec` resolved for one device and size: what a family's builder works from."""
    spec: CaseSpec
    device: torch.device
    full: bool
    sizes: dict
    backends: tuple
    targets: dict
    timing: Timing
    workdir: Optional[str] = None

    @property
    def cpu(self) -> bool:
        return self.device.type == "cpu"

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.spec.dtype]

    @property
    def tag(self) -> str:
        return "fwd+bwd" if self.spec.backward else "fwd"

    def target(self, key: str) -> Optional[float]:
        return self.targets.get(key)

    def generator(self, seed: int, device: Optional[Union[str, torch.device]] = None) -> torch.Generator:
        return torch.Generator(device=device or self.device).manual_seed(seed)

    def entries(self, make: Mapping[str, Callable[[], Union[Entry, Sequence[Entry]]]]) -> list:
        """The entries of `spec.peers` (and the pyops ones at the "pyops" token), in that order;
        `make` maps each key to a factory, so that a peer left out allocates nothing."""
        missing = [p for p in self.spec.peers if p not in make]
        if missing:
            raise ValueError(f"case {self.spec.name!r}: no builder for peers {missing}; known: {sorted(make)}")
        out: list[Entry] = []
        for key in self.spec.peers:
            got = make[key]()
            out.extend([got] if isinstance(got, Entry) else got)
        return out

    def case(self, name: str, entries: list, baseline: str, params: dict,
             checks: Optional[Callable[["CaseResult"], list]] = None,
             verify: Optional[Callable[[], dict]] = None, *, bytes: Optional[int] = None,
             flops: Optional[int] = None) -> "Case":
        t = self.timing
        return Case(name=name, entries=entries, baseline=baseline, params=params, repeats=t.repeats,
                    min_repeats=t.min_repeats, max_seconds=t.max_seconds, warmup=t.warmup,
                    min_sample_s=t.min_sample_s, checks=checks, verify=verify, spec=self.spec.name,
                    op=self.spec.op, bytes=bytes, flops=flops)


def prepare(spec: CaseSpec, device: Union[str, torch.device], full: bool = False,
            workdir: Optional[str] = None) -> Build:
    """Resolve `spec` for `device` at full or quick size; ValueError if it does not run there."""
    dev = torch.device(device)
    if dev.type not in spec.backends:
        raise ValueError(f"case {spec.name!r} runs on {', '.join(spec.backends)}, not on {dev.type}")
    if not full and spec.quick is None:
        raise ValueError(f"case {spec.name!r} has no quick size: it runs with full=True only")
    return Build(spec, dev, full, spec.sizes_for(full), tuple(spec.backends[dev.type]),
                 spec.targets_for(dev.type, full), spec.timing_for(dev.type, full), workdir)


def select(specs: Iterable[CaseSpec], device_type: str, full: bool, ops: Optional[Iterable[str]] = None) -> list:
    """The specs that run on `device_type` at this size, measuring one of `ops` (None: all)."""
    wanted = None if ops is None else set(ops)
    return [s for s in specs if s.runs(device_type, full) and (wanted is None or wanted & set(s.ops))]


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------

def is_cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


def synchronize(device: str) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(torch.device(device))


def synchronized_timer(device: str) -> Callable[[], float]:
    """A clock for timers that read it around a batch of calls (pytest-benchmark's `timer`): on
    CUDA it first waits for the device's queued work, so that a reading covers the kernels the
    calls launched, not just their launches; on CPU it is `time.perf_counter`."""
    if not is_cuda(device):
        return time.perf_counter
    dev = torch.device(device)

    def cuda_synchronized_perf_counter() -> float:
        torch.cuda.synchronize(dev)
        return time.perf_counter()
    return cuda_synchronized_perf_counter


def _time_sample(fn: Callable[[], Any], number: int, device: str) -> float:
    """Seconds per call over `number` back-to-back calls."""
    if is_cuda(device):
        dev = torch.device(device)
        torch.cuda.synchronize(dev)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / number
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


# --------------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------------

def _proc_status_kib(*keys: str) -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = int(v.split()[0])
    return out


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_hwm_reset_ok: Optional[bool] = None


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS; True if it worked (checked once)."""
    global _hwm_reset_ok
    if _hwm_reset_ok is False:
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        if _hwm_reset_ok is None:
            s = _proc_status_kib("VmHWM", "VmRSS")
            # After a reset VmHWM equals VmRSS (a few pages of slack for the reading itself).
            _hwm_reset_ok = s["VmHWM"] <= s["VmRSS"] + 1024
        return bool(_hwm_reset_ok)
    except OSError:
        _hwm_reset_ok = False
        return False


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def measure_peak_rss(fn: Callable[[], Any], device: str) -> tuple[Optional[int], Optional[str]]:
    """(peak extra host bytes of one call above the RSS before it, method), or (None, reason)."""
    if not os.path.exists("/proc/self/status"):
        return None, "unavailable (no /proc/self/status)"
    gc.collect()
    synchronize(device)
    if _reset_hwm():
        before = _proc_status_kib("VmRSS")["VmRSS"]
        fn()
        synchronize(device)
        hwm = _proc_status_kib("VmHWM")["VmHWM"]
        return max(0, hwm - before) * 1024, "VmHWM"
    # Fallback: sample VmRSS from a thread while the call runs (misses spikes < 0.5 ms).
    before = _rss_bytes()
    peak = [before]
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        fn()
        synchronize(device)
    finally:
        stop.set()
        t.join()
    peak[0] = max(peak[0], _rss_bytes())
    return max(0, peak[0] - before), "sampled"


def measure_peak_device(fn: Callable[[], Any], device: str) -> Optional[int]:
    if not is_cuda(device):
        return None
    dev = torch.device(device)
    gc.collect()
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    torch.cuda.synchronize(dev)
    return max(0, torch.cuda.max_memory_allocated(dev) - before)


# --------------------------------------------------------------------------------------------
# Machine metadata
# --------------------------------------------------------------------------------------------

def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [x for x in ("avx", "avx2", "fma", "avx512f", "avx512bw", "amx_tile") if x in flags]
    except OSError:
        pass
    return []


def _mem_total_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return None


def _dist_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


def _git_commit() -> dict:
    """The pyops checkout's commit, when this package runs from a git checkout (editable install)."""
    root = Path(__file__).resolve().parent.parent
    from_env = {"commit": os.environ.get("PYOPS_COMMIT") or None, "commit_source": "PYOPS_COMMIT"}
    try:
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"],
                             capture_output=True, text=True, timeout=10)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root:
            return from_env
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20).stdout.strip()
        return {"commit": head or None, "dirty": bool(dirty)}
    except Exception:  # no git on this machine
        return from_env


def last_level_cache_bytes() -> Optional[int]:
    """Size of the CPU's last-level cache (Linux sysfs), or None."""
    best: tuple[int, int] = (0, 0)
    try:
        for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
            level = int((d / "level").read_text().strip())
            size = (d / "size").read_text().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
            n = int(size.rstrip("KMG")) * mult
            best = max(best, (level, n))
    except (OSError, ValueError):
        return None
    return best[1] or None


def _loadavg() -> Optional[list[float]]:
    """1, 5 and 15-minute load averages: how busy the (shared) machine was."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info(device: str) -> dict:
    try:
        affinity = len(os.sched_getaffinity(0))
    except Exception:
        affinity = None
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpu_count": os.cpu_count(),
        "cpu_llc_mib": (lambda b: None if b is None else b / MIB)(last_level_cache_bytes()),
        "cpu_affinity": affinity,
        "torch_threads": torch.get_num_threads(),
        "mem_total_gib": _mem_total_gib(),
        "loadavg_at_start": _loadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _dist_version("triton"),
        "pyops": _dist_version("pyops"),
        **{f"pyops_{k}": v for k, v in _git_commit().items()},
    }
    try:
        import pyops
        info["pyops"] = getattr(pyops, "__version__", info["pyops"])
    except Exception as exc:  # the harness must still describe the machine
        info["pyops_import_error"] = f"{type(exc).__name__}: {exc}"
    if is_cuda(device):
        dev = torch.device(device)
        props = torch.cuda.get_device_properties(dev)
        info.update(device_name=torch.cuda.get_device_name(dev),
                    device_capability=f"{props.major}.{props.minor}",
                    device_mem_gib=round(props.total_memory / (1 << 30), 1),
                    device_sms=props.multi_processor_count)
    else:
        info["device_name"] = info["cpu_model"]
    return info


# --------------------------------------------------------------------------------------------
# Running a case
# --------------------------------------------------------------------------------------------

def _emit(stream: TextIO, msg: str) -> None:
    print(msg, file=stream, flush=True)


def classify(exc: BaseException) -> tuple[str, str]:
    """("skipped" | "error", reason) for an exception an entry raised: `pyops.BackendUnavailableError`
    (an explicit backend that cannot run here, a `can_run` refusal) is a skip, anything else an error."""
    try:
        from pyops import BackendUnavailableError
        unavailable = isinstance(exc, BackendUnavailableError)
    except Exception:
        unavailable = type(exc).__name__ == "BackendUnavailableError"
    reason = f"{type(exc).__name__}: {exc}".strip()
    if len(reason) > 600:
        reason = reason[:600] + "..."
    return ("skipped" if unavailable else "error"), reason


def _fmt_ms(s: Optional[float]) -> str:
    if s is None:
        return "-"
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 1 else (f"{ms:.2f}" if ms < 100 else f"{ms:.1f}")


def warm_up(fn: Callable[[], Any], case: Case, device: str) -> tuple[float, float, int]:
    """Step 1 of the Method: ``case.warmup`` calls of `fn` (at least one), each timed alone.
    Returns (first call s, fastest call s, calls per timed sample): a sample lasts at least
    ``case.min_sample_s`` (default 10 ms on CPU, 2 ms on CUDA), so that the clock's resolution and
    the cost of reading it stay small against what is measured."""
    min_sample = case.min_sample_s if case.min_sample_s is not None else (0.002 if is_cuda(device) else 0.01)
    times = [_time_sample(fn, 1, device) for _ in range(max(1, case.warmup))]
    per_call = min(times)
    return times[0], per_call, max(1, min(100_000, math.ceil(min_sample / max(per_call, 1e-9))))


def planned_rounds(case: Case, per_call_s: float, number: int) -> int:
    """The timed rounds of an entry measured on its own (the pytest front end), decided before
    they start: ``case.repeats``, or as many as it takes to reach ``case.max_seconds`` when that
    is fewer, never fewer than ``case.min_repeats`` (`run_case` applies the same bounds as it
    goes)."""
    fit = math.ceil(case.max_seconds / max(per_call_s * number, 1e-9))
    return max(1, case.min_repeats, min(case.repeats, fit))


def work(case: Case, entry: Entry) -> tuple[Optional[int], Optional[int]]:
    """(bytes, FLOPs) of one call of `entry`: its own figures, else the case's (the op's) for an
    entry that computes the op; a reference entry (a copy, a matmul yardstick) does other work
    and keeps its own."""
    own = entry.group == "reference"
    return (entry.bytes if entry.bytes is not None or own else case.bytes,
            entry.flops if entry.flops is not None or own else case.flops)


def run_case(case: Case, device: str, stream: TextIO = sys.stdout, prefix: str = "") -> CaseResult:
    t_case = time.perf_counter()
    results = [EntryResult(e.name, e.group, e.note, bytes=e.bytes, flops=e.flops) for e in case.entries]
    res = CaseResult(case.name, dict(case.params), case.baseline, results, spec=case.spec, op=case.op,
                     bytes=case.bytes, flops=case.flops)
    tag = f"{prefix}{case.name}"
    _emit(stream, f"{tag}: {len(case.entries)} entries, baseline '{case.baseline}'")

    active: list[tuple[Entry, EntryResult]] = []
    for e, r in zip(case.entries, results):
        if e.skip is not None or e.fn is None:
            r.status, r.reason = "skipped", e.skip or "no callable"
            _emit(stream, f"  {e.name:<28} skipped: {r.reason}")
            continue
        try:
            if e.setup is not None:
                e.setup()
            r.first_call_s, per_call, r.number = warm_up(e.fn, case, device)
            if e.info is not None:
                r.info.update(e.info() or {})
            if e.measure_memory:
                r.peak_rss_bytes, r.peak_rss_method = measure_peak_rss(e.fn, device)
                r.peak_dev_bytes = measure_peak_device(e.fn, device)
        except Exception as exc:
            r.status, r.reason = classify(exc)
            if r.status == "error":
                r.info["traceback"] = traceback.format_exc(limit=6)
            _emit(stream, f"  {e.name:<28} {r.status}: {r.reason}")
            continue
        mem = "" if r.peak_rss_bytes is None else f", peak RSS +{r.peak_rss_mib:.1f} MiB"
        if r.peak_dev_bytes is not None:
            mem += f", peak device +{r.peak_dev_mib:.1f} MiB"
        _emit(stream, f"  {e.name:<28} warm-up {_fmt_ms(per_call)} ms/call, {r.number} call(s)/sample{mem}")
        active.append((e, r))

    # Timed rounds, alternating the entries.
    t0 = time.perf_counter()
    last_print = t0
    rounds = 0
    gc_was_enabled = gc.isenabled()
    try:
        for rnd in range(case.repeats):
            for e, r in active:
                if r.status != "ok":
                    continue
                gc.disable()
                try:
                    r.samples_s.append(_time_sample(e.fn, r.number, device))
                except Exception as exc:
                    r.status, r.reason = classify(exc)
                    _emit(stream, f"  {e.name:<28} {r.status} while timing: {r.reason}")
                finally:
                    if gc_was_enabled:
                        gc.enable()
            rounds = rnd + 1
            now = time.perf_counter()
            done = rounds == case.repeats or (now - t0 > case.max_seconds and rounds >= case.min_repeats)
            if done or now - last_print >= 2.0:
                last_print = now
                parts = " | ".join(f"{r.name} {_fmt_ms(r.median_s)}" for _, r in active if r.samples_s)
                _emit(stream, f"  round {rounds}/{case.repeats} ({now - t0:.0f} s), median ms: {parts}")
            if done:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    res.rounds = rounds

    base = res.ok(case.baseline)
    for r in results:
        if base is not None and r.status == "ok" and r.samples_s:
            r.speedup = base.median_s / r.median_s
    for _, r in active:
        if r.status == "ok":
            gb = "" if r.gbps is None else f", {r.gbps:.2f} GB/s"
            sp = "" if r.speedup is None else f", {r.speedup:.2f}x vs {case.baseline}"
            _emit(stream, f"  {r.name:<28} median {_fmt_ms(r.median_s)} ms over {len(r.samples_s)} samples{gb}{sp}")

    if case.verify is not None:
        try:
            res.verify = dict(case.verify() or {})
        except Exception as exc:
            res.verify = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        _emit(stream, f"  verify: {res.verify}")
    for e in case.entries:
        if e.teardown is not None:
            try:
                e.teardown()
            except Exception as exc:
                _emit(stream, f"  {e.name}: teardown failed: {type(exc).__name__}: {exc}")
    if case.checks is not None:
        try:
            res.checks = list(case.checks(res))
        except Exception as exc:
            res.checks = [Check("checks", None, note=f"failed: {type(exc).__name__}: {exc}")]
    res.wall_s = time.perf_counter() - t_case
    return res


def run_family(family: str, builds: Iterable[tuple[str, Callable[[], Case]]], device: str, quick: bool,
               stream: TextIO = sys.stdout, selection: Optional[list] = None) -> FamilyResult:
    """Build and run the cases one after another: `builds` yields (spec name, a function that
    builds its `Case`), so that each case allocates its tensors only when its turn comes and
    releases them before the next is built. A case that fails to build is recorded and skipped."""
    t0 = time.perf_counter()
    result = FamilyResult(family, device, quick, machine_info(device), selection=selection)
    _emit(stream, f"[{family}] device {device} ({result.machine.get('device_name')}), "
                  f"torch {result.machine['torch']}, {result.machine['torch_threads']} threads"
                  + (", quick" if quick else ""))
    for spec_name, make in builds:
        case = None
        try:
            case = make()
            result.cases.append(run_case(case, device, stream, prefix=f"[{family}] "))
        except Exception as exc:  # one broken case must not lose the others
            what = f"case {spec_name!r}" if case is not None else f"building case {spec_name!r}"
            msg = f"{what} failed: {type(exc).__name__}: {exc}"
            result.errors.append(msg)
            _emit(stream, f"[{family}] {msg}\n{traceback.format_exc(limit=6)}")
        finally:
            if case is not None:
                try:
                    case.release()
                except Exception as exc:
                    msg = f"case {spec_name!r}: cleanup failed: {type(exc).__name__}: {exc}"
                    result.errors.append(msg)
                    _emit(stream, f"[{family}] {msg}")
            case = None
            gc.collect()
            if is_cuda(device):
                torch.cuda.empty_cache()
    result.wall_s = time.perf_counter() - t0
    result.machine["loadavg_at_end"] = _loadavg()
    return result


# --------------------------------------------------------------------------------------------
# Output: table, JSON, chart
# --------------------------------------------------------------------------------------------

def _f(x: Optional[float], fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_table(result: FamilyResult) -> str:
    cuda = is_cuda(result.device)
    head = ["case", "entry", "median ms", "±%", "GB/s", "speed-up", "peak RSS MiB"]
    if cuda:
        head.append("peak dev MiB")
    rows: list[list[str]] = []
    notes: list[str] = []
    for c in result.cases:
        for i, e in enumerate(c.entries):
            name = e.name + (" (baseline)" if e.name == c.baseline else "")
            if e.status != "ok" or not e.samples_s:
                row = [c.name if i == 0 else "", name, e.status, "", "", "", ""]
                if cuda:
                    row.append("")
                rows.append(row)
                notes.append(f"{c.name} / {e.name}: {e.status}: {e.reason}")
                continue
            row = [c.name if i == 0 else "", name, _fmt_ms(e.median_s),
                   _f(None if e.spread is None else 100 * e.spread, ".0f"),
                   _f(e.gbps, ".2f"), _f(e.speedup, ".2f") + ("x" if e.speedup is not None else ""),
                   _f(e.peak_rss_mib, ".1f") + ("~" if e.peak_rss_method == "sampled" else "")]
            if cuda:
                row.append(_f(e.peak_dev_mib, ".1f"))
            rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    right = {2, 3, 4, 5, 6, 7}

    def fmt(r: list[str]) -> str:
        return "  ".join(s.rjust(w) if i in right else s.ljust(w) for i, (s, w) in enumerate(zip(r, widths)))

    m = result.machine
    commit = m.get("pyops_commit")
    lines = [f"{result.family} on {result.device}: {m.get('device_name')} | torch {m.get('torch')} | "
             f"{m.get('torch_threads')} threads | pyops {m.get('pyops')}"
             + (f" @ {commit[:10]}{'+dirty' if m.get('pyops_dirty') else ''}" if commit else "")
             + (f" | load {m['loadavg_at_start'][0]:g} -> {m['loadavg_at_end'][0]:g}"
                if m.get("loadavg_at_start") and m.get("loadavg_at_end") else "")
             + (" | QUICK" if result.quick else ""),
             fmt(head), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in rows]
    lines.append("speed-up = baseline median / entry median (>1: faster than the baseline); "
                 "±% = half the inter-quartile range of the samples; peak RSS = extra host memory of one call"
                 + (" (~ = sampled)" if any(e.peak_rss_method == "sampled" for c in result.cases for e in c.entries) else ""))
    if result.quick:
        lines.append("quick sizes: a smoke test of every case; the targets are set for the full sizes (--full)")
    for c in result.cases:
        if c.checks or c.verify:
            lines.append(f"{c.name}:")
            lines += [f"  {ch.line()}" for ch in c.checks]
            if c.verify:
                lines.append("  verify: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                        for k, v in c.verify.items()))
    if notes:
        lines.append("not timed:")
        lines += [f"  {n}" for n in notes]
    if result.errors:
        lines.append("errors:")
        lines += [f"  {x}" for x in result.errors]
    return "\n".join(lines)


def result_stem(result: FamilyResult) -> str:
    dev = torch.device(result.device).type
    return f"{result.family}-{dev}"


def write_json(result: FamilyResult, results_dir: os.PathLike | str) -> Path:
    d = Path(results_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{result_stem(result)}.json"
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(result.to_json(), f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path


_COLORS = {"pyops": "#1f77b4", "peer": "#8c8c8c", "reference": "#2ca02c", "baseline": "#ff7f0e"}


def write_chart(result: FamilyResult, results_dir: os.PathLike | str,
                stream: TextIO = sys.stdout) -> Optional[Path]:
    """A PNG with one panel per case: effective GB/s (or speed-up when bytes are unknown) per entry."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except Exception as exc:
        _emit(stream, f"matplotlib is not available ({type(exc).__name__}: {exc}); no chart written "
                      f"(pip install matplotlib)")
        return None
    cases = [c for c in result.cases if c.entries]
    if not cases:
        return None
    try:
        heights = [0.9 + 0.32 * len(c.entries) for c in cases]
        fig = Figure(figsize=(10, sum(heights) + 0.8))
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(cases), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
        for ax, c in zip(axes, cases):
            ran = [e for e in c.entries if e.status == "ok" and e.samples_s]
            use_bw = bool(ran) and all(e.gbps is not None for e in ran)
            names, vals, colors, labels = [], [], [], []
            for e in c.entries:
                names.append(e.name + (" (baseline)" if e.name == c.baseline else ""))
                if e.status != "ok" or not e.samples_s:
                    vals.append(0.0)
                    colors.append("white")
                    labels.append(e.status)
                    continue
                v = e.gbps if use_bw else (e.speedup or 0.0)
                vals.append(v)
                colors.append(_COLORS["baseline"] if e.name == c.baseline else _COLORS.get(e.group, "#9467bd"))
                bits = [f"{_fmt_ms(e.median_s)} ms"]
                if use_bw:
                    bits.insert(0, f"{e.gbps:.2f} GB/s")
                if e.speedup is not None:
                    bits.append(f"{e.speedup:.2f}x")
                labels.append(" · ".join(bits))
            y = list(range(len(names)))[::-1]
            ax.barh(y, vals, color=colors, edgecolor="#444444", linewidth=0.5)
            ax.set_yticks(y)
            ax.set_yticklabels(names, fontsize=8)
            vmax = max(vals) if vals and max(vals) > 0 else 1.0
            ax.set_xlim(0, vmax * 1.45)
            for yi, v, lab in zip(y, vals, labels):
                ax.text(v + vmax * 0.01, yi, lab, va="center", fontsize=7)
            ax.set_title(c.name, fontsize=9, loc="left")
            ax.set_xlabel("effective GB/s (higher is better)" if use_bw else
                          f"speed-up vs {c.baseline} (higher is better)", fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
            if not use_bw:
                ax.axvline(1.0, color="#444444", linewidth=0.6, linestyle="--")
            else:
                for e in ran:
                    if e.group == "reference":
                        ax.axvline(e.gbps, color=_COLORS["reference"], linewidth=0.8, linestyle=":")
        m = result.machine
        commit = m.get("pyops_commit")
        fig.suptitle(f"{result.family} — {result.device}: {m.get('device_name')}\n"
                     f"torch {m.get('torch')}, {m.get('torch_threads')} threads, {m.get('date')}"
                     + (f", pyops {commit[:10]}" if commit else "") + (" (quick)" if result.quick else ""),
                     fontsize=9)
        fig.tight_layout()
        d = Path(results_dir)
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{result_stem(result)}.png"
        fig.savefig(path, dpi=110)
        return path
    except Exception as exc:  # a chart must never cost the results
        _emit(stream, f"chart not written: {type(exc).__name__}: {exc}")
        return None


# --------------------------------------------------------------------------------------------
# Building blocks of the family builders
# --------------------------------------------------------------------------------------------

def randn(shape: Sequence[int], dtype: torch.dtype, device: Union[str, torch.device], gen: torch.Generator,
          scale: float = 1.0) -> torch.Tensor:
    """Normal samples drawn in fp32 on the generator's device, times `scale`, then moved to
    `device` and cast to `dtype` (the same values for every dtype and device of one seed)."""
    t = torch.randn(tuple(shape), generator=gen, device=gen.device, dtype=torch.float32)
    if scale != 1.0:
        t = t * scale
    return t.to(device=device, dtype=dtype)


def uniform(shape: Sequence[int], dtype: torch.dtype, device: Union[str, torch.device], gen: torch.Generator,
            lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    """U(lo, hi) drawn in place: every page is written, so no page fault is left for the timing."""
    return torch.empty(tuple(shape), dtype=dtype, device=device).uniform_(lo, hi, generator=gen)


def nbytes(numel: int, dtype: torch.dtype) -> int:
    return numel * torch.empty(0, dtype=dtype).element_size()


def fmt_count(n: int) -> str:
    """4194304 -> "4M", 3072 -> "3K", else the number."""
    return f"{n // M}M" if n % M == 0 else (f"{n // 1024}K" if n % 1024 == 0 else str(n))


def choice_info(op: str) -> Callable[[], dict]:
    """An `Entry.info` that records which pyops backend ran `op` last, and why."""
    def info() -> dict:
        import pyops
        ch = pyops.last_choice(op)
        return {"backend_ran": ch.backend if ch else None, "choice": ch.explain() if ch else None}
    return info


def mm_entry(name: str, device: torch.device, dtype: torch.dtype, note: str, n: int = 1024) -> Entry:
    """A plain n×n×n `torch.mm`: the machine's GFLOP/s yardstick, measured in the same run."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return Entry(name, lambda: torch.mm(a, b), flops=2 * n ** 3, group="reference", note=note)


def peak_mib(e: Optional[EntryResult], device: torch.device) -> Optional[float]:
    """The entry's peak extra memory: device memory on CUDA, host RSS on CPU."""
    if e is None:
        return None
    return e.peak_dev_mib if device.type == "cuda" else e.peak_rss_mib


def ratio(r: CaseResult, slow: str, fast: str) -> Optional[float]:
    """median(slow) / median(fast), when both ran: how many times faster `fast` is."""
    a, b = r.ok(slow), r.ok(fast)
    return a.median_s / b.median_s if (a and b) else None


def not_run(r: CaseResult, name: str) -> str:
    e = r.get(name)
    return (e.reason or e.status) if e else "not measured"


def verify_backends(backends: Iterable[str], figures: Callable[[str], tuple[dict, bool]], **extra) -> dict:
    """{**extra, the figures of every backend that could run, "ok": all of them passed}; a backend
    that is unavailable here (`pyops.BackendUnavailableError`) is left out."""
    from pyops import BackendUnavailableError

    out, ok = dict(extra), True
    for b in backends:
        try:
            got, good = figures(b)
        except BackendUnavailableError:
            continue
        out.update(got)
        ok = ok and bool(good)
    out["ok"] = ok
    return out
