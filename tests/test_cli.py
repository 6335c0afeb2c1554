"""`python -m pyops`: every command's --help answers without importing torch, and `verify` plans
its checks as documented (a quick subset that still covers every op, method and dtype)."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest

from pyops import verify

COMMANDS = [[], ["info"], ["verify"], ["bench"], ["merge"]]


def _imported_modules(importtime_stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[-1].strip() for line in importtime_stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "pyops")
def test_help_answers_without_importing_torch(command):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "pyops", *command, "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: python -m pyops" in proc.stdout
    modules = _imported_modules(proc.stderr)
    assert "pyops" in modules  # the probe works: the package itself was imported
    assert "torch" not in modules


@pytest.mark.parametrize("family", verify.FAMILIES)
def test_quick_subset_covers_every_op_and_dtype_of_a_family(family):
    cases = list(verify._families()[family].cases())
    quick = verify.select_cases(cases, full=False)
    assert 0 < len(quick) < len(cases)

    def dtypes(cs):
        return {m for c in cs for m in re.findall(r"float16|bfloat16|float32|float64", c.name)}

    assert {c.op for c in quick} == {c.op for c in cases}
    assert dtypes(quick) == dtypes(cases)
    assert {b for c in quick for b in c.backends} == {b for c in cases for b in c.backends}


def test_quick_subset_covers_every_merge_method():
    cases = [c for c in verify._families()["merging"].cases() if c.op == "merge"]
    quick = verify.select_cases(verify._families()["merging"].cases(), full=False)

    def methods(cs):
        return {c.name.split()[0] for c in cs if c.op == "merge"}

    assert methods(quick) == methods(cases)


def test_full_selects_every_case():
    cases = list(verify._families()["moe"].cases())
    assert verify.select_cases(cases, full=True) == cases


@pytest.mark.parametrize("op", ["merging", "merge", "na2d", "moe_route"])
def test_verify_plans_a_family_or_an_op(op):
    plan = verify._plan(op, full=False)
    ops = {c.op for cases in plan.values() for c in cases}
    assert ops == ({op} if op not in verify.FAMILIES else ops) and ops


def test_verify_refuses_an_unknown_op_with_the_choices():
    out = io.StringIO()
    assert verify.run("nope", "cpu", out=out) == 2
    text = out.getvalue()
    assert "unknown op 'nope'" in text and "merging" in text and "task_arithmetic" in text


@pytest.mark.parametrize("command", [["info"], ["verify", "--op", "moe_route"], ["bench", "--list"],
                                     ["merge", "missing.yaml", "--out", "never-written"]],
                         ids=lambda c: c[0])
def test_every_command_refuses_a_bad_backend_variable_up_front(command, tmp_path):
    env = {**os.environ, "PYOPS_BACKEND": "bogus"}
    proc = subprocess.run([sys.executable, "-m", "pyops", *command], capture_output=True, text=True, timeout=120,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"pyops {command[0]}: PYOPS_BACKEND: expected 'auto' or one of "
                                   "('reference', 'cpu', 'triton', 'cuda'), got 'bogus'")
    assert proc.stdout == "" and not (tmp_path / "never-written").exists()
