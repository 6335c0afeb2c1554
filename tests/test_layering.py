"""Dependencies point one way (docs/design.md#dependencies-point-one-way).

* Triton kernel modules (kernels/) import torch, triton, the standard library, their sibling kernel
  modules and the torch-only helper pyops._triton — never the op layer or the public API.
* Native sources (csrc/) include no torch header and import no Python module.
* A reference module imports torch, the standard library, the torch-only helpers pyops._philox
  and pyops._finite, and torch-free spec modules (pyops/<stem>/spec.py) only.
* A spec module imports neither torch nor anything of pyops but other spec modules.
* An engine never imports its command-line front end: only pyops/__main__.py imports a `cli` module.

Imports are read with `ast`, so imports inside functions count as well.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names)
STEMS = ("merging", "task_attention", "neighborhood", "moe")


def imports_of(path: Path) -> list[str]:
    """Absolute module names `path` imports (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":  # shipped as pyops.kernels
        parts = ["pyops"] + parts
    package = parts[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.append(base)
            found += [f"{base}.{a.name}" for a in node.names if base.startswith("pyops")]
    return found


def _top(name: str) -> str:
    return name.split(".")[0]


def _py_files(*globs: str) -> list[Path]:
    return sorted(p for g in globs for p in ROOT.glob(g) if "__pycache__" not in p.parts)


KERNEL_FILES = _py_files("kernels/**/*.py")
REFERENCE_FILES = _py_files("pyops/*/reference.py") + [ROOT / "pyops" / "_philox.py", ROOT / "pyops" / "_finite.py"]
SPEC_FILES = _py_files("pyops/*/spec.py")
PACKAGE_FILES = _py_files("pyops/**/*.py")


def _ids(paths):
    return [str(p.relative_to(ROOT)) for p in paths]


def test_every_family_has_its_layers():
    for stem in STEMS:
        assert (ROOT / "pyops" / stem / "reference.py").is_file(), f"pyops/{stem}/reference.py"
        assert (ROOT / "pyops" / stem / "verify.py").is_file(), f"pyops/{stem}/verify.py"
        assert (ROOT / "kernels" / stem).is_dir() or (ROOT / "kernels" / f"{stem}.py").is_file(), f"kernels/{stem}"
        assert (ROOT / "tests" / stem).is_dir(), f"tests/{stem}"
        assert (ROOT / "bench" / f"{stem}.py").is_file(), f"bench/{stem}.py"


def test_no_path_uses_an_old_family_name():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert tracked
    assert not [p for p in tracked if "task_merge" in p]


@pytest.mark.parametrize("path", KERNEL_FILES, ids=_ids(KERNEL_FILES))
def test_triton_kernels_do_not_import_the_op_layer(path):
    allowed_pyops = ("pyops.kernels", "pyops._triton")
    bad = [m for m in imports_of(path)
           if _top(m) == "pyops" and not m.startswith(allowed_pyops)
           or _top(m) not in STDLIB | {"torch", "triton", "pyops", "__future__"}]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("path", REFERENCE_FILES, ids=_ids(REFERENCE_FILES))
def test_references_import_only_torch_and_specs(path):
    def ok(m: str) -> bool:
        if _top(m) in STDLIB | {"torch", "__future__"}:
            return True
        return m.startswith(("pyops._philox", "pyops._finite")) or bool(re.match(r"pyops\.\w+\.spec(\.|$)", m))

    bad = [m for m in imports_of(path) if not ok(m)]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("path", SPEC_FILES, ids=_ids(SPEC_FILES))
def test_spec_modules_are_torch_free_leaves(path):
    bad = [m for m in imports_of(path)
           if _top(m) not in STDLIB | {"__future__", "pyops"} or (_top(m) == "pyops" and not re.match(r"pyops\.\w+\.spec", m))]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_only_the_program_imports_a_command_line_front_end():
    offenders = {str(p.relative_to(ROOT)): [m for m in imports_of(p) if m.split(".")[-1] == "cli" or ".cli." in m]
                 for p in PACKAGE_FILES if p.name not in ("__main__.py", "cli.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_native_sources_import_no_python_module():
    sources = [p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cuh", ".cpp", ".cu")]
    assert sources
    bad = [str(p.relative_to(ROOT)) for p in sources
           if re.search(r"module_?::import\s*\(|PyImport_", p.read_text())]
    assert not bad, f"native sources import Python modules: {bad}"


def test_imports_of_sees_imports_inside_functions(tmp_path, monkeypatch):
    # the checker itself: an import inside a function body counts
    f = ROOT / "pyops" / "_layering_probe_does_not_exist.py"
    src = "def f():\n    from pyops.merging import ops\n    import torch\n"
    monkeypatch.setattr(Path, "read_text", lambda self: src)
    assert imports_of(f) == ["pyops.merging", "pyops.merging.ops", "torch"]
