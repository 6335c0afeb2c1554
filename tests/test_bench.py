"""The benchmark package (`pyops.bench`, bench/ in the source tree): its command line, its case
tables and builders, where its files go, the results README generator, `--compare`, and the
pytest-benchmark suite. Little is timed here: the cases are built at quick size and released, one
run is a tiny checkpoint case whose merge command is replaced by a stand-in, the pytest-benchmark
suite runs once with --benchmark-disable (every entry called once, its correctness checks
included: CI's guard against the suite rotting) and once timed for the two routing entries."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import pyops.bench as bench
from pyops.bench import harness, report

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
TINY_LLAMA = dict(vocab=64, hidden=16, intermediate=32, layers=1, heads=2)


def _cli(argv: list) -> int:
    p = argparse.ArgumentParser(prog="pyops bench")
    bench.add_arguments(p)
    return bench.main(p.parse_args(argv))


# ------------------------------------------------------------------------------------------------
# --op
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op, expected", [
    (None, [(s, None) for s in ("merging", "task_attention", "neighborhood", "moe")]),
    ("all", [(s, None) for s in ("merging", "task_attention", "neighborhood", "moe")]),
    ("merging", [("merging", None)]),
    ("neighborhood", [("neighborhood", None)]),
    ("task_arithmetic", [("merging", ("task_arithmetic",))]),
    ("merge", [("merging", ("merge",))]),
    ("merge_from_models", [("merging", ("merge_from_models",))]),
    ("na2d", [("neighborhood", ("na2d",))]),
    ("moe_experts", [("moe", ("moe_experts",))]),
    ("task_masked_attention", [("task_attention", ("task_masked_attention",))]),
])
def test_op_resolution(op, expected):
    assert bench.resolve(op) == expected


@pytest.mark.parametrize("bad", ["nope", "merge_methods", "Merging", ""])
def test_bad_op_exits_2_with_the_choices(bad, capsys):
    with pytest.raises(ValueError, match="choices"):
        bench.resolve(bad)
    assert _cli(["--op", bad]) == 2
    err = capsys.readouterr().err
    assert repr(bad) in err
    for stem, ops in bench.FAMILIES.items():
        assert stem in err and all(o in err for o in ops)


def test_quick_and_full_are_exclusive_and_quick_is_accepted():
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    assert p.parse_args(["--quick"]).full is False
    assert p.parse_args(["--full"]).full is True
    with pytest.raises(SystemExit):
        p.parse_args(["--quick", "--full"])


def test_families_table_matches_the_modules():
    for stem, ops in bench.FAMILIES.items():
        mod = bench.module(stem)
        assert mod.FAMILY == stem and tuple(mod.OPS) == ops
        names = [s.name for s in mod.CASES]
        assert len(names) == len(set(names)), f"{stem}: spec names repeat"
        measured = {o for s in mod.CASES for o in s.ops}
        assert measured == set(ops), f"{stem}: ops without a case {set(ops) - measured}, unknown {measured - set(ops)}"
        # the quick (default) run covers every family on CPU
        assert harness.select(mod.CASES, "cpu", full=False), stem


# ------------------------------------------------------------------------------------------------
# Case specs -> Cases
# ------------------------------------------------------------------------------------------------

def _cpu_quick_specs():
    for stem in bench.FAMILIES:
        mod = bench.module(stem)
        for spec in mod.CASES:
            if spec.runs("cpu", full=False):
                yield pytest.param(stem, spec, id=f"{stem}/{spec.name}")


@pytest.mark.parametrize("stem, spec", list(_cpu_quick_specs()))
def test_every_spec_builds_a_case_on_cpu_at_quick_size(stem, spec, tmp_path):
    mod = bench.module(stem)
    if spec.kind == "checkpoint":   # the smallest Llama shape: what is tested is the builder
        spec = dataclasses.replace(spec, quick={"model": TINY_LLAMA})
    case = mod.build(spec, "cpu", workdir=str(tmp_path))
    try:
        assert isinstance(case, harness.Case)
        assert case.spec == spec.name and case.op == spec.op
        names = [e.name for e in case.entries]
        assert case.baseline in names, (case.baseline, names)
        assert len(names) == len(set(names))
        assert sum(e.group == "pyops" for e in case.entries) >= 1
        assert all(e.fn is not None or e.skip for e in case.entries)
        t = spec.timing_for("cpu", full=False)
        assert (case.repeats, case.max_seconds, case.warmup) == (t.repeats, t.max_seconds, t.warmup)
        json.dumps(case.params, default=str)
    finally:
        case.release()


def test_specs_resolve_sizes_targets_and_timing_per_device():
    spec = next(s for s in bench.module("task_attention").CASES if s.name == "blockdiag-fwd-fp16")
    assert not spec.runs("cpu", full=True) and spec.runs("cuda", full=False)
    assert spec.targets_for("cuda", full=True)["vs_flex"] == 1.0
    assert spec.targets_for("cuda", full=False)["vs_flex"] is None
    assert spec.sizes_for(full=True)["L"] == 4096 and spec.sizes_for(full=False)["L"] < 4096
    with pytest.raises(ValueError, match="runs on cuda"):
        harness.prepare(spec, "cpu")
    full_only = next(s for s in bench.module("merging").CASES if s.quick is None)
    assert not full_only.runs("cpu", full=False) and full_only.runs("cpu", full=True)
    with pytest.raises(ValueError, match="full=True"):
        harness.prepare(full_only, "cpu", full=False)
    with pytest.raises(ValueError, match="baseline"):
        harness.CaseSpec("x", "op", "kind", {}, peers=("a",), baseline="b")
    with pytest.raises(ValueError, match="dtype"):
        harness.CaseSpec("x", "op", "kind", {}, dtype="fp8")


# ------------------------------------------------------------------------------------------------
# Where files go
# ------------------------------------------------------------------------------------------------

def test_default_results_dir_is_outside_the_source_tree(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    d = bench.default_results_dir()
    assert ROOT not in d.resolve().parents
    assert d.parent == Path(os.path.expanduser("~")) / ".cache" / "pyops" / "bench"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    d = bench.default_results_dir()
    assert d.parent == tmp_path / "pyops" / "bench" and d.name.endswith("Z")
    assert bench.COMMITTED_RESULTS_DIR == BENCH_DIR / "results"


@pytest.fixture
def tiny_checkpoint_run(monkeypatch, tmp_path):
    """`run` limited to the whole-model task-arithmetic case on a tiny model, the merge command
    replaced by a stand-in that writes an output folder; temporary folders go under tmp_path."""
    merging = bench.module("merging")
    spec = next(s for s in merging.CASES if s.name == "checkpoint-task_arithmetic")
    monkeypatch.setattr(merging, "CASES", [dataclasses.replace(spec, quick={"model": TINY_LLAMA})])
    calls = []

    def fake_child(cmd):
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.safetensors").write_bytes(b"0")
        calls.append(cmd)
        return 12.5

    monkeypatch.setattr(merging, "_timed_child", fake_child)
    monkeypatch.setattr(merging, "mergekit_yaml", lambda: None)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    return {"scratch": scratch, "results": tmp_path / "results", "calls": calls, "merging": merging}


def test_checkpoint_case_removes_its_temporary_models(tiny_checkpoint_run, capsys):
    t = tiny_checkpoint_run
    assert bench.run("merge_from_models", device="cpu", results_dir=str(t["results"])) == 0
    out = capsys.readouterr().out
    assert t["calls"], "the merge command never ran"
    assert "checkpoint cases: up to" in out and str(t["results"]) in out.splitlines()[0]
    assert list(t["scratch"].iterdir()) == [], "temporary checkpoints left behind"
    assert (t["results"] / "merging-cpu.json").exists() and (t["results"] / "README.md").exists()
    data = json.loads((t["results"] / "merging-cpu.json").read_text())
    assert data["quick"] is True and data["selection"] == ["merge_from_models"]
    assert [c["spec"] for c in data["cases"]] == ["checkpoint-task_arithmetic"]


def test_checkpoint_case_built_alone_removes_its_own_folder(monkeypatch, tmp_path):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    merging = bench.module("merging")
    spec = next(s for s in merging.CASES if s.kind == "checkpoint" and s.quick is not None)
    case = merging.build(dataclasses.replace(spec, quick={"model": TINY_LLAMA}), "cpu")
    made = list(tmp_path.iterdir())
    assert len(made) == 1 and made[0].name.startswith("pyops-bench-") and list(made[0].rglob("*.safetensors"))
    case.release()
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_dir_is_removed_on_interrupt(tiny_checkpoint_run, monkeypatch):
    t = tiny_checkpoint_run

    def interrupted(cmd):
        raise KeyboardInterrupt

    monkeypatch.setattr(t["merging"], "_timed_child", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench.run("merge_from_models", device="cpu", results_dir=str(t["results"]))
    assert list(t["scratch"].iterdir()) == []


def test_keep_checkpoints_keeps_and_prints_them(tiny_checkpoint_run, capsys):
    t = tiny_checkpoint_run
    assert bench.run("merge_from_models", device="cpu", results_dir=str(t["results"]), keep_checkpoints=True) == 0
    kept = list(t["scratch"].iterdir())
    assert len(kept) == 1 and kept[0].name.startswith("pyops-bench-")
    assert f"checkpoints kept in {kept[0]}" in capsys.readouterr().out
    assert list(kept[0].rglob("model.safetensors"))
    shutil.rmtree(kept[0])


# ------------------------------------------------------------------------------------------------
# README.md from the JSON files
# ------------------------------------------------------------------------------------------------

def test_report_renders_json_into_readme(tmp_path):
    src = sorted((BENCH_DIR / "results").glob("*-*.json"))
    assert src, "no committed results"
    for f in src:
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "notes.md").write_text("hand-written\n")
    assert _cli(["--report", "--results-dir", str(tmp_path)]) == 0
    text = (tmp_path / "README.md").read_text()
    for f in src:
        data = json.loads(f.read_text())
        assert f"## {f.stem}" in text
        assert data["machine"]["torch"] in text
        for c in data["cases"]:
            assert f"### {c['name']}" in text
            for ch in c["checks"]:
                assert ch["name"].replace("|", "\\|") in text
    assert "[notes.md](notes.md)" in text
    # the file is exactly the rendering of the data (no chart files were copied)
    assert report.render(report.load(tmp_path), ("notes.md",)) == text


def test_report_of_a_missing_folder_exits_2(tmp_path, capsys):
    assert _cli(["--report", "--results-dir", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_command_line_and_report_import_no_torch(tmp_path):
    """`python -m pyops bench --help`, `--report` and `--compare` answer without torch: the package
    is loaded from bench/ on its own, without pyops (whose import pulls torch outside the command)."""
    shutil.copy(BENCH_DIR / "results" / "moe-cpu.json", tmp_path / "moe-cpu.json")
    old = _pytest_benchmark_json(tmp_path / "old.json", OLD)
    code = textwrap.dedent(f"""
        import argparse, importlib.util, sys
        spec = importlib.util.spec_from_file_location("benchpkg", {str(BENCH_DIR / "__init__.py")!r},
                                                      submodule_search_locations=[{str(BENCH_DIR)!r}])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["benchpkg"] = mod
        spec.loader.exec_module(mod)
        p = argparse.ArgumentParser(prog="pyops bench")
        mod.add_arguments(p)
        assert "--full" in p.format_help() and "--keep-checkpoints" in p.format_help()
        rc = mod.main(p.parse_args(["--report", "--results-dir", {str(tmp_path)!r}]))
        assert mod.main(p.parse_args(["--compare", {old!r}, {old!r}])) == 0
        assert "torch" not in sys.modules, "torch was imported"
        sys.exit(rc)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "README.md").exists()


# ------------------------------------------------------------------------------------------------
# --compare: two saved runs
# ------------------------------------------------------------------------------------------------

def _pytest_benchmark_json(path: Path, medians_ms: dict, sizes: str = "quick") -> str:
    """A pytest-benchmark JSON file as `pytest bench/ --benchmark-json` writes it (the fields
    --compare reads), one benchmark per ("case", "entry") key."""
    benchmarks = [{"name": f"test_benchmark[{case}/{entry}]", "fullname": f"bench/test_benchmarks.py::x[{case}]",
                   "group": case, "params": {"case": case, "entry": entry},
                   "extra_info": {"sizes": sizes, "device_name": "test CPU"},
                   "stats": {"median": ms / 1e3, "min": ms / 1e3, "rounds": 5, "iterations": 1}}
                  for (case, entry), ms in medians_ms.items()]
    path.write_text(json.dumps({"machine_info": {}, "commit_info": {"id": "0123456789abcdef", "dirty": False},
                                "benchmarks": benchmarks, "datetime": "2026-01-01T00:00:00", "version": "5.3.1"}))
    return str(path)


def _compare(argv: list, capsys) -> tuple:
    rc = _cli(["--compare", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


OLD = {("moe/routing", "pyops cpu"): 1.0, ("moe/routing", "torch chain"): 2.0,
       ("moe/layer-fwd", "pyops cpu"): 4.0, ("moe/layer-fwd", "gone"): 1.0}
NEW = {("moe/routing", "pyops cpu"): 1.05, ("moe/routing", "torch chain"): 2.5,
       ("moe/layer-fwd", "pyops cpu"): 3.0, ("moe/layer-fwd", "added"): 1.0}


def test_compare_prints_ratios_and_flags_regressions(tmp_path, capsys):
    from pyops.bench import compare

    old = _pytest_benchmark_json(tmp_path / "old.json", OLD)
    new = _pytest_benchmark_json(tmp_path / "new.json", NEW)
    rows, only_old, only_new = compare.compare(compare.load(old), compare.load(new), noise=0.10)
    got = {r.key: (round(r.ratio, 6), r.verdict) for r in rows}
    assert got == {"moe/routing | pyops cpu": (1.05, ""), "moe/routing | torch chain": (1.25, "regression"),
                   "moe/layer-fwd | pyops cpu": (0.75, "faster")}
    assert only_old == ["moe/layer-fwd | gone"] and only_new == ["moe/layer-fwd | added"]

    rc, out, err = _compare([old, new], capsys)
    assert rc == 1 and not err
    line = next(x for x in out.splitlines() if x.startswith("moe/routing | torch chain"))
    assert line.split()[-2:] == ["1.250", "REGRESSION"]
    assert "0.750  faster" in out and "noise band 10%" in out and "1 regressions, 1 faster, 1 within" in out
    assert "only in old: moe/layer-fwd | gone" in out and "commit 0123456789" in out
    # a wider band absorbs the 25%; an identical run is no regression
    assert _compare([old, new, "--noise", "0.3"], capsys)[0] == 0
    assert _compare([old, old], capsys)[0] == 0


def test_compare_reads_the_results_of_python_m_pyops_bench(tmp_path, capsys):
    results = {"schema": 1, "family": "moe", "device": "cpu", "quick": False,
               "machine": {"pyops_commit": "fedcba9876543210", "date": "2026-01-01T00:00:00+00:00"},
               "cases": [{"name": "routing fp32 T=4096 E=64 k=4", "spec": "routing",
                          "entries": [{"name": "pyops cpu", "status": "ok", "median_ms": 1.0},
                                      {"name": "torch chain", "status": "ok", "median_ms": 2.0},
                                      {"name": "natten", "status": "skipped", "median_ms": None}]}]}
    cli = tmp_path / "moe-cpu.json"
    cli.write_text(json.dumps(results))
    new = _pytest_benchmark_json(tmp_path / "new.json", NEW)
    rc, out, _ = _compare([str(cli), new], capsys)
    assert rc == 1                                   # torch chain: 2.0 -> 2.5 ms
    assert "moe/routing | pyops cpu" in out and "fedcba9876" in out
    assert "note: old ran full sizes, new quick sizes" in out


@pytest.mark.parametrize("content, why", [
    ("{not json", "not JSON"),
    ('{"something": 1}', "neither a pytest-benchmark JSON"),
    ('{"benchmarks": []}', "holds no timed benchmark"),
    ('{"benchmarks": [{"name": "a", "stats": {"median": "fast"}}]}', "no valid median"),
    ('{"family": "moe", "cases": [{"name": "x"}]}', "has no entries"),
])
def test_compare_bad_file_exits_2_with_one_line_naming_it(tmp_path, capsys, content, why):
    good = _pytest_benchmark_json(tmp_path / "good.json", OLD)
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    for argv in ([str(bad), good], [good, str(bad)]):
        rc, out, err = _compare(argv, capsys)
        assert rc == 2 and not out
        assert len(err.strip().splitlines()) == 1 and str(bad) in err and why in err, err


def test_compare_missing_file_disjoint_runs_and_bad_noise_exit_2(tmp_path, capsys):
    good = _pytest_benchmark_json(tmp_path / "good.json", OLD)
    other = _pytest_benchmark_json(tmp_path / "other.json", {("merging/ties", "copy_"): 1.0})
    rc, _, err = _compare([str(tmp_path / "absent.json"), good], capsys)
    assert rc == 2 and "absent.json: cannot be read" in err
    rc, _, err = _compare([good, other], capsys)
    assert rc == 2 and "no benchmark in common" in err
    rc, _, err = _compare([good, good, "--noise", "-0.1"], capsys)
    assert rc == 2 and "--noise" in err
    assert _cli(["--noise", "0.2"]) == 2


# ------------------------------------------------------------------------------------------------
# The pytest-benchmark front end (bench/conftest.py, bench/test_benchmarks.py)
# ------------------------------------------------------------------------------------------------

_RECORDER = '''
import json, os

_outcomes = {}


def pytest_collection_finish(session):
    items = [{"nodeid": i.nodeid, "params": dict(i.callspec.params)} for i in session.items]
    with open(os.environ["PYOPS_BENCH_ITEMS"], "w") as f:
        json.dump(items, f, default=str)


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        reason = report.longrepr[2] if report.skipped and isinstance(report.longrepr, tuple) else None
        _outcomes.setdefault(report.nodeid, (report.outcome, reason))


def pytest_sessionfinish(session):
    with open(os.environ["PYOPS_BENCH_OUTCOMES"], "w") as f:
        json.dump(_outcomes, f)
'''


def test_pytest_benchmark_suite_runs_every_case_and_entry_once(tmp_path):
    """`pytest bench/ --benchmark-disable` (what CI runs, through this test): every (case, entry)
    of the quick CPU cases is one test, parametrized with `case` and `entry`, each function runs
    once, the correctness checks pass, and whatever cannot run here is skipped with its reason."""
    (tmp_path / "bench_recorder.py").write_text(_RECORDER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
               PYOPS_BENCH_ITEMS=str(tmp_path / "items.json"), PYOPS_BENCH_OUTCOMES=str(tmp_path / "outcomes.json"))
    r = subprocess.run([sys.executable, "-m", "pytest", "bench", "--benchmark-disable", "--bench-device", "cpu", "-q",
                        "-p", "no:cacheprovider", "-p", "bench_recorder", "--basetemp", str(tmp_path / "basetemp")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    items = json.loads((tmp_path / "items.json").read_text())
    outcomes = json.loads((tmp_path / "outcomes.json").read_text())

    collected: dict = {}
    for it in items:
        assert set(it["params"]) == {"case", "entry"}, it
        collected.setdefault(it["params"]["case"], []).append(it["params"]["entry"])
    for stem in bench.FAMILIES:
        mod = bench.module(stem)
        for spec in harness.select(mod.CASES, "cpu", full=False):
            if spec.kind == "checkpoint":
                spec = dataclasses.replace(spec, quick={"model": TINY_LLAMA})
            case = mod.build(spec, "cpu", workdir=str(tmp_path / "models"))
            try:
                assert collected.pop(f"{stem}/{spec.name}") == [e.name for e in case.entries], spec.name
            finally:
                case.release()
    assert not collected, f"collected cases that are not in the tables: {sorted(collected)}"

    assert {o for o, _ in outcomes.values()} <= {"passed", "skipped"}
    assert len(outcomes) == len(items)
    assert all(reason for o, reason in outcomes.values() if o == "skipped")
    ran = {it["params"]["case"] for it in items if outcomes[it["nodeid"]][0] == "passed"}
    assert ran == {it["params"]["case"] for it in items}, "a case with no entry that ran"
    assert not (tmp_path / "basetemp").exists() or not list((tmp_path / "basetemp").rglob("*.safetensors"))


def test_pytest_benchmark_json_has_what_gb_s_and_gflop_s_need(tmp_path):
    """A timed run of two benchmarks: grouped by case, and the saved JSON's extra_info carries the
    bytes, FLOPs, backend, threads, device and commit; --compare reads the file."""
    out = tmp_path / "run.json"
    r = subprocess.run([sys.executable, "-m", "pytest", "bench", "-k", "routing and not groups", "--benchmark-only",
                        "--bench-device", "cpu", "--benchmark-group-by=param:case", f"--benchmark-json={out}", "-q",
                        "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "basetemp")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "benchmark 'case=moe/routing': 2 tests" in r.stdout
    data = json.loads(out.read_text())
    assert data["machine_info"]["pyops"]["torch_threads"] >= 1
    by_entry = {b["params"]["entry"]: b for b in data["benchmarks"]}
    assert {b["params"]["case"] for b in by_entry.values()} == {"moe/routing"}
    mine = by_entry["pyops cpu"]
    info = mine["extra_info"]
    assert info["backend"] == "cpu" and info["sizes"] == "quick" and info["device"] == "cpu"
    assert info["bytes"] > 0 and info["flops"] is None
    assert info["threads"] >= 1 and info["device_name"] and "pyops_commit" in info
    assert info["verify"]["ok"] is True
    assert info["gb_per_s"] == pytest.approx(info["bytes"] / mine["stats"]["median"] / 1e9)
    assert mine["stats"]["rounds"] >= 2 and mine["stats"]["iterations"] == info["calls_per_round"]
    assert by_entry["torch softmax+topk+argsort+bincount"]["extra_info"]["backend"] is None
    assert bench.main(argparse.Namespace(compare=[str(out), str(out)], noise=None)) == 0


def test_a_wrong_result_fails_the_benchmark_and_is_checked_once():
    from pyops.bench import conftest

    class Config:  # what the session reads of pytest's config
        def getoption(self, name):
            return {"--bench-device": "cpu", "--bench-full": False}[name]

    s = conftest.BenchSession(Config())
    calls = []

    def wrong():
        calls.append(1)
        return {"pyops_cpu_max_abs": 1.0, "ok": False}

    s._current = ("moe/routing", harness.Case("c", [], "b", verify=wrong), None)
    for _ in range(2):
        with pytest.raises(pytest.fail.Exception, match="disagrees with the reference"):
            s.verify("moe/routing")
    assert calls == [1]

    def broken():
        raise RuntimeError("boom")

    s._current = ("moe/layer-fwd", harness.Case("c", [], "b", verify=broken), None)
    with pytest.raises(pytest.fail.Exception, match="boom"):
        s.verify("moe/layer-fwd")
    s._current = ("moe/layer-bwd", harness.Case("c", [], "b", verify=lambda: {"max_abs": 0.0, "ok": True}), None)
    assert s.verify("moe/layer-bwd") == {"max_abs": 0.0, "ok": True}


def test_planned_rounds_and_work_follow_the_case_table():
    case = harness.Case("c", [], "b", repeats=15, min_repeats=3, max_seconds=1.0)
    assert harness.planned_rounds(case, per_call_s=0.001, number=10) == 15     # 10 ms rounds: all 15 fit
    assert harness.planned_rounds(case, per_call_s=0.2, number=1) == 5         # 1 s / 0.2 s
    assert harness.planned_rounds(case, per_call_s=5.0, number=1) == 3         # never below min_repeats
    case.bytes, case.flops = 100, 200
    assert harness.work(case, harness.Entry("pyops cpu", None, group="pyops")) == (100, 200)
    assert harness.work(case, harness.Entry("peer", None, bytes=7)) == (7, 200)
    assert harness.work(case, harness.Entry("copy_", None, bytes=50, group="reference")) == (50, None)
