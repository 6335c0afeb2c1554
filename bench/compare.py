"""`python -m pyops bench --compare OLD.json NEW.json`: two saved runs side by side.

Either file may be a pytest-benchmark JSON (``pytest bench/ --benchmark-json=F`` or
``--benchmark-autosave``, under ``.benchmarks/``) or a results file of ``python -m pyops bench``
(``<family>-<device>.json``). Both name a benchmark the same way, ``<family>/<spec> | <entry>``
(the pytest suite's ``case`` and ``entry`` parameters), so a run of one front end can be compared
with a run of the other; a pytest-benchmark file of another suite is keyed by its test names.

For every benchmark present in both runs the ratio new/old of the median time per call is
printed; a ratio above 1 + noise is flagged as a regression (exit status 1), one below
1 / (1 + noise) as faster. The noise band (default 10%) is what separates a change from the
run-to-run spread of a shared machine; the two runs are only comparable when they ran the same
sizes on the same machine, which the header lines show. A file that cannot be read as either
kind is answered with one line naming it (exit status 2).

This module imports no torch.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TextIO

DEFAULT_NOISE = 0.10
_LISTED = 10         # benchmarks of one run only, listed by name before the rest is counted

__all__ = ["DEFAULT_NOISE", "BadInput", "Run", "Row", "load", "compare", "render", "main"]


class BadInput(ValueError):
    """A file that is not a result file of either kind; the message starts with its path."""


@dataclass
class Run:
    """The median seconds per call of each benchmark of one file, in the file's order."""
    path: str
    kind: str                               # "pytest-benchmark" | "pyops bench"
    medians: dict[str, float] = field(default_factory=dict)
    about: str = ""                         # commit, date, device: for the header line
    sizes: Optional[str] = None             # "quick" | "full" | "mixed" | None (not recorded)


@dataclass(frozen=True)
class Row:
    key: str
    old_s: float
    new_s: float
    ratio: float
    verdict: str                            # "regression" | "faster" | ""


def key(case: str, entry: str) -> str:
    return f"{case} | {entry}"


def _median(path: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise BadInput(f"{path}: benchmark {name!r} has no valid median time ({value!r})")
    return float(value)


def _sizes(values: set) -> Optional[str]:
    values.discard(None)
    return None if not values else (values.pop() if len(values) == 1 else "mixed")


def _from_pytest_benchmark(path: str, data: dict) -> Run:
    run = Run(path, "pytest-benchmark")
    sizes, devices = set(), set()
    for i, b in enumerate(data["benchmarks"]):
        if not isinstance(b, dict) or not isinstance(b.get("stats"), dict):
            raise BadInput(f"{path}: benchmarks[{i}] has no stats")
        params = b.get("params") or {}
        if isinstance(params, dict) and "case" in params and "entry" in params:
            name = key(str(params["case"]), str(params["entry"]))
        else:
            name = str(b.get("fullname") or b.get("name") or f"benchmarks[{i}]")
        if name in run.medians:
            raise BadInput(f"{path}: benchmark {name!r} appears twice")
        run.medians[name] = _median(path, name, b["stats"].get("median"))
        extra = b.get("extra_info") if isinstance(b.get("extra_info"), dict) else {}
        sizes.add(extra.get("sizes"))
        devices.add(extra.get("device_name"))
    commit = data.get("commit_info") if isinstance(data.get("commit_info"), dict) else {}
    cid = str(commit.get("id") or "")[:10]
    devices.discard(None)
    bits = [f"{len(run.medians)} benchmarks"]
    if cid:
        bits.append(f"commit {cid}" + ("+dirty" if commit.get("dirty") else ""))
    if data.get("datetime"):
        bits.append(str(data["datetime"])[:19])
    if devices:
        bits.append(", ".join(sorted(map(str, devices))))
    run.sizes = _sizes(sizes)
    if run.sizes:
        bits.append(f"{run.sizes} sizes")
    run.about = "; ".join(bits)
    return run


def _from_pyops_bench(path: str, data: dict) -> Run:
    run = Run(path, "pyops bench")
    family = data.get("family")
    cases = data.get("cases")
    if not isinstance(family, str) or not isinstance(cases, list):
        raise BadInput(f"{path}: a results file of `python -m pyops bench` needs 'family' and 'cases'")
    for i, c in enumerate(cases):
        if not isinstance(c, dict) or not isinstance(c.get("entries"), list):
            raise BadInput(f"{path}: cases[{i}] has no entries")
        case = f"{family}/{c.get('spec') or c.get('name')}"
        for e in c["entries"]:
            if not isinstance(e, dict) or "name" not in e:
                raise BadInput(f"{path}: an entry of case {case!r} has no name")
            if e.get("status") != "ok" or e.get("median_ms") is None:
                continue                    # skipped or failed: nothing to compare
            name = key(case, str(e["name"]))
            run.medians[name] = _median(path, name, e["median_ms"]) / 1e3
    machine = data.get("machine") if isinstance(data.get("machine"), dict) else {}
    bits = [f"{len(run.medians)} benchmarks, family {family}"]
    if machine.get("pyops_commit"):
        bits.append(f"commit {str(machine['pyops_commit'])[:10]}" + ("+dirty" if machine.get("pyops_dirty") else ""))
    if machine.get("date"):
        bits.append(str(machine["date"])[:19])
    if machine.get("device_name"):
        bits.append(str(machine["device_name"]))
    if isinstance(data.get("quick"), bool):
        run.sizes = "quick" if data["quick"] else "full"
        bits.append(f"{run.sizes} sizes")
    run.about = "; ".join(bits)
    return run


def load(path) -> Run:
    """The benchmarks of one file of either kind; `BadInput` (naming the file) otherwise."""
    path = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise BadInput(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    except UnicodeDecodeError:
        raise BadInput(f"{path}: not a text file") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(f"{path}: not JSON ({exc.msg}, line {exc.lineno})") from None
    if isinstance(data, dict) and isinstance(data.get("benchmarks"), list):
        run = _from_pytest_benchmark(path, data)
    elif isinstance(data, dict) and "cases" in data and "family" in data:
        run = _from_pyops_bench(path, data)
    else:
        raise BadInput(f"{path}: neither a pytest-benchmark JSON (--benchmark-json, --benchmark-autosave) nor a "
                       f"results file of `python -m pyops bench`")
    if not run.medians:
        raise BadInput(f"{path}: holds no timed benchmark")
    return run


def compare(old: Run, new: Run, noise: float = DEFAULT_NOISE) -> tuple[list[Row], list[str], list[str]]:
    """(one row per benchmark of both runs in the old run's order, keys only in old, only in new)."""
    rows = []
    for name, o in old.medians.items():
        if name not in new.medians:
            continue
        n = new.medians[name]
        ratio = n / o if o > 0 else (1.0 if n == 0 else math.inf)
        verdict = "regression" if ratio > 1 + noise else ("faster" if ratio < 1 / (1 + noise) else "")
        rows.append(Row(name, o, n, ratio, verdict))
    only_old = [k for k in old.medians if k not in new.medians]
    only_new = [k for k in new.medians if k not in old.medians]
    return rows, only_old, only_new


def _ms(s: float) -> str:
    return f"{s * 1e3:.4g}"


def render(old: Run, new: Run, rows: list, only_old: list, only_new: list, noise: float) -> str:
    width = max([len("benchmark")] + [len(r.key) for r in rows])
    lines = [f"old: {old.path} ({old.kind}: {old.about})", f"new: {new.path} ({new.kind}: {new.about})"]
    if old.sizes and new.sizes and old.sizes != new.sizes:
        lines.append(f"note: old ran {old.sizes} sizes, new {new.sizes} sizes: the ratios compare different problems")
    lines.append(f"{'benchmark':<{width}}  {'old ms':>10}  {'new ms':>10}  {'new/old':>8}")
    lines.append(f"{'-' * width}  {'-' * 10}  {'-' * 10}  {'-' * 8}")
    for r in rows:
        flag = {"regression": "  REGRESSION", "faster": "  faster", "": ""}[r.verdict]
        lines.append(f"{r.key:<{width}}  {_ms(r.old_s):>10}  {_ms(r.new_s):>10}  {r.ratio:>8.3f}{flag}")
    worse = sorted((r for r in rows if r.verdict == "regression"), key=lambda r: -r.ratio)
    n_fast = sum(r.verdict == "faster" for r in rows)
    lines.append(f"noise band {noise:.0%}: new/old above {1 + noise:.3g} is a regression, below "
                 f"{1 / (1 + noise):.3g} faster")
    lines.append(f"{len(rows)} compared: {len(worse)} regressions, {n_fast} faster, "
                 f"{len(rows) - len(worse) - n_fast} within the band; only in old: {len(only_old)}, "
                 f"only in new: {len(only_new)}")
    for label, keys in (("only in old", only_old), ("only in new", only_new)):
        lines += [f"  {label}: {k}" for k in keys[:_LISTED]]
        if len(keys) > _LISTED:
            lines.append(f"  {label}: ... and {len(keys) - _LISTED} more")
    if worse:
        lines.append("regressions, worst first:")
        lines += [f"  {r.ratio:.3f}x  {r.key}" for r in worse]
    return "\n".join(lines)


def main(old_path, new_path, noise: float = DEFAULT_NOISE, out: TextIO = None, err: TextIO = None) -> int:
    """Print the comparison; 0, 1 when a regression is flagged, 2 for a bad file or noise band."""
    out = out or sys.stdout
    err = err or sys.stderr
    if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
        print(f"pyops bench --compare: --noise: expected a fraction >= 0 (0.10 = 10%), got {noise!r}", file=err)
        return 2
    try:
        old, new = load(old_path), load(new_path)
    except BadInput as exc:
        print(f"pyops bench --compare: {exc}", file=err)
        return 2
    rows, only_old, only_new = compare(old, new, noise)
    if not rows:
        print(f"pyops bench --compare: {old_path} and {new_path} have no benchmark in common", file=err)
        return 2
    print(render(old, new, rows, only_old, only_new, noise), file=out)
    return 1 if any(r.verdict == "regression" for r in rows) else 0
