"""The benchmark package (`pyops.bench`, bench/ in the source tree): its command line, its case
tables and builders, where its files go, and the results README generator. Nothing is timed
here: the cases are built at quick size and released, and the one run is a tiny checkpoint case
whose merge command is replaced by a stand-in."""
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
    """`python -m pyops bench --help` and `--report` answer without torch: the package is loaded
    from bench/ on its own, without pyops (whose import pulls torch outside the command)."""
    shutil.copy(BENCH_DIR / "results" / "moe-cpu.json", tmp_path / "moe-cpu.json")
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
        assert "torch" not in sys.modules, "torch was imported"
        sys.exit(rc)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "README.md").exists()
