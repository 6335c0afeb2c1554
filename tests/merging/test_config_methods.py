"""`python -m pyops merge` with mergekit 0.1.5's methods beyond task arithmetic: slerp, nearswap,
nuslerp, multislerp, karcher, sce, ram, ramplus_tl, arcee_fusion (pyops.merging.interpolate's
`merge_tensors`, on the torch engine) and breadcrumbs_ties (pyops.merge_from_models), with
mergekit's parameter names, defaults, scopes, base policies and gradients. Against mergekit where
PYOPS_MERGEKIT_YAML names its mergekit-yaml."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pyops
from pyops.__main__ import main as cli_main
from pyops.bench.merging import write_llama_checkpoint
from pyops.merging import run_merge
from pyops.merging.config import INTERPOLATING, SUPPORTED, interpolate as gradient_at, load_config
from pyops.merging.reference import arcee_fusion as ref_arcee
from pyops.testing import compare, tolerance_for

try:
    from pyops.merging.interpolate import merge_tensors
except ImportError:  # another checkout's methods: the tests are skipped
    merge_tensors = None

pytestmark = pytest.mark.skipif("slerp" not in INTERPOLATING,
                                reason="pyops.merging.interpolate's methods are not in this checkout")

TINY = dict(vocab=48, hidden=16, intermediate=24, layers=4, heads=2)
MERGEKIT = os.environ.get("PYOPS_MERGEKIT_YAML") or shutil.which("mergekit-yaml")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    a = write_llama_checkpoint(str(root / "a"), 0, cfg=TINY)
    for k, name in ((1, "b"), (2, "c")):
        write_llama_checkpoint(str(root / name), k, base=a, cfg=TINY)
    return root


# name -> configuration (w: the checkpoints' directory); every mergekit 0.1.5 method pyops adds here,
# with gradients, filters, optional bases and non-default parameters.
CASES = {
    "slerp-gradient": """slices:
  - sources:
      - model: {w}/a
        layer_range: [0, 4]
      - model: {w}/b
        layer_range: [0, 4]
merge_method: slerp
base_model: {w}/a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
    "slerp-models": """merge_method: slerp
base_model: {w}/a
models:
  - model: {w}/a
  - model: {w}/c
parameters: {{t: [0.1, 0.8]}}
dtype: float32
""",
    "nearswap": """merge_method: nearswap
base_model: {w}/a
models:
  - model: {w}/b
parameters: {{t: 0.001}}
dtype: float32
""",
    "nuslerp": """merge_method: nuslerp
base_model: {w}/a
models:
  - model: {w}/b
    parameters: {{weight: 0.3}}
  - model: {w}/c
    parameters: {{weight: [0.2, 0.9]}}
dtype: float32
""",
    "nuslerp-no-base-row-wise": """merge_method: nuslerp
models:
  - model: {w}/b
    parameters: {{weight: 0.3}}
  - model: {w}/c
    parameters: {{weight: 0.6}}
parameters: {{nuslerp_row_wise: true}}
dtype: float32
""",
    "multislerp": """merge_method: multislerp
base_model: {w}/a
models:
  - model: {w}/b
    parameters: {{weight: 0.3}}
  - model: {w}/c
    parameters: {{weight: 0.6}}
dtype: float32
""",
    "karcher": """merge_method: karcher
models:
  - model: {w}/a
  - model: {w}/b
  - model: {w}/c
parameters: {{max_iter: 20, tol: 1.0e-7}}
dtype: float32
""",
    "breadcrumbs_ties": """merge_method: breadcrumbs_ties
base_model: {w}/a
models:
  - model: {w}/b
    parameters: {{weight: 0.5, density: 0.63, gamma: 0.03}}
  - model: {w}/c
    parameters: {{weight: 0.7, density: 0.77, gamma: 0.03}}
dtype: float32
""",
    "sce": """merge_method: sce
base_model: {w}/a
models:
  - model: {w}/b
  - model: {w}/c
parameters: {{select_topk: 0.53}}
dtype: float32
""",
    "ram": """merge_method: ram
base_model: {w}/a
models:
  - model: {w}/b
  - model: {w}/c
dtype: float32
""",
    "ramplus_tl": """merge_method: ramplus_tl
base_model: {w}/a
models:
  - model: {w}/b
  - model: {w}/c
parameters: {{r: 0.2, alpha: 0.3}}
dtype: float32
""",
    "arcee_fusion": """merge_method: arcee_fusion
base_model: {w}/a
models:
  - model: {w}/b
dtype: float32
""",
}


def _t(world, m: str) -> dict:
    return load_file(str(world / m / "model.safetensors"))


def _run(world, tmp_path: Path, text: str):
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(text.format(w=world))
    return run_merge(cfg, tmp_path / "out", progress=False), load_file(str(tmp_path / "out" / "model.safetensors"))


def test_every_mergekit_method_is_accepted():
    for m in ("slerp", "nearswap", "nuslerp", "multislerp", "karcher", "sce", "ram", "ramplus_tl", "arcee_fusion",
              "breadcrumbs_ties", "passthrough", "linear"):
        assert m in SUPPORTED, m


def test_slerp_gradient_per_filter_and_layer(world, tmp_path):
    """gradient-slerp.yml: t from each filter's curve at the layer's position, 0.5 elsewhere."""
    report, got = _run(world, tmp_path, CASES["slerp-gradient"])
    a, b = _t(world, "a"), _t(world, "b")
    curves = {"self_attn": (0, 0.5, 0.3, 0.7, 1), "mlp": (1, 0.5, 0.7, 0.3, 0)}
    for name in a:
        i = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        curve = next((c for f, c in curves.items() if f in name), None)
        t = 0.5 if curve is None else gradient_at(curve, 0.0 if i is None else i / 3)
        want = merge_tensors("slerp", a[name], [b[name]], {"t": t})
        assert torch.equal(got[name], want), name
    assert report.engine == "native" and report.backends.get("slerp") == len(a)


def test_karcher_takes_an_unlisted_base_as_one_more_input(world, tmp_path):
    """karcher ignores the base's role (mergekit's BasePolicy.IGNORED); mergekit adds an unlisted base_model
    to the inputs, so it is averaged too."""
    text = CASES["karcher"].replace("  - model: {w}/a\n", "") + "base_model: {w}/a\n"
    _, got = _run(world, tmp_path, text)
    a, b, c = _t(world, "a"), _t(world, "b"), _t(world, "c")
    n = "model.layers.1.mlp.up_proj.weight"
    want = merge_tensors("karcher", None, [b[n], c[n], a[n]], {"max_iter": 20, "tol": 1e-7})
    assert torch.equal(got[n], want)


def test_breadcrumbs_ties_runs_on_the_native_engine(world, tmp_path):
    report, got = _run(world, tmp_path, CASES["breadcrumbs_ties"])
    a, b, c = _t(world, "a"), _t(world, "b"), _t(world, "c")
    assert report.engine == "native"
    for n in a:
        want = pyops.merge_from_models(a[n], [b[n], c[n]], method="breadcrumbs_ties", coeffs=[0.5, 0.7],
                                       density=[0.63, 0.77], gamma=0.03, normalize=False, name=n)
        assert torch.equal(got[n], want), n


def test_ram_epsilon_default_is_rams(world):
    cfg = load_config(CASES["ram"].format(w=world))
    assert cfg.tensor_kwargs("model.norm.weight")["params"] == {"epsilon": 1e-5}


BAD = {
    "slerp without t": (CASES["nearswap"].replace("nearswap", "slerp").replace("parameters: {{t: 0.001}}\n", ""),
                        r"no 't' applies to tensor"),
    "slerp with two models": (CASES["nearswap"].replace("nearswap", "slerp").replace(
        "  - model: {w}/b\n", "  - model: {w}/b\n  - model: {w}/c\n"),
        r"line 3, column \d+: models: slerp takes 1 models besides the base, got 2"),
    "t per model": (CASES["nearswap"].replace("  - model: {w}/b\n", "  - model: {w}/b\n    parameters: {{t: 0.3}}\n"),
                    r"line 5, column \d+: models\[0\]\.parameters\.t: t is a merge-wide parameter"),
    "nuslerp with three models": (CASES["nuslerp"].replace("dtype", "  - model: {w}/a\n    parameters: {{weight: 1}}\ndtype")
                                  .replace("base_model: {w}/a\n", ""),
                                  r"models: nuslerp takes 2 models besides the base, got 3"),
    "nuslerp without weight": (CASES["nuslerp"].replace("    parameters: {{weight: 0.3}}\n", ""),
                               r"models\[0\]: no weight for"),
    "sce select_topk 0": (CASES["sce"].replace("0.53", "0"), r"parameters\.select_topk: select_topk must be in \(0, 1\]"),
    "ram epsilon per model": (CASES["ram"].replace("  - model: {w}/b\n", "  - model: {w}/b\n    parameters: {{epsilon: 0.1}}\n"),
                              r"line 5, column \d+: models\[0\]\.parameters\.epsilon: epsilon is a merge-wide parameter "
                              r"for ram"),
    "karcher max_iter 0": (CASES["karcher"].replace("max_iter: 20", "max_iter: 0"),
                           r"parameters\.max_iter: expected an int in \[1, 10\*\*6\]"),
    "slerp slice without the base": ("""merge_method: slerp
base_model: {w}/a
parameters: {{t: 0.5}}
slices:
  - sources:
      - model: {w}/b
        layer_range: [0, 2]
      - model: {w}/c
        layer_range: [0, 2]
""", r"line 5, column \d+: slices\[0\]\.sources: base_model '.*/a' is not among the slice's sources"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_method_configs_exit_2(world, tmp_path, capsys, case):
    text, pattern = BAD[case]
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(text.format(w=world))
    assert cli_main(["merge", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and re.search(pattern, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml"]


@pytest.mark.skipif(MERGEKIT is None, reason="mergekit-yaml not found (PYOPS_MERGEKIT_YAML unset)")
@pytest.mark.parametrize("case", list(CASES))
def test_same_tensors_as_mergekit(world, tmp_path, case):
    """Every tensor within fp32 rounding of mergekit 0.1.5's (breadcrumbs_ties, ram, ramplus_tl bit for
    bit on these checkpoints; the slerp family reduces its dot products in another order, sce's C++
    kernels its weights' sums). arcee_fusion: the reference backend bit for bit; the default (C++)
    backend takes mergekit's pick on every element but those whose importance lies within the two
    fp32 KL evaluations' distance of the threshold, and the base's or the model's value on those
    (tests/merging/test_fusion_cpu.py's check). On these near-uniform softmaxes (weights ~0.02)
    every row's KL (~2e-6) is within a few fp32 ulps of the probabilities of 0, so that band may
    hold every element: the kernels' mask is checked on well-conditioned data in test_fusion_cpu.py."""
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(CASES[case].format(w=world))
    subprocess.run([MERGEKIT, str(cfg), str(tmp_path / "mk"), "--lazy-unpickle", "--no-copy-tokenizer"],
                   check=True, capture_output=True, cwd=tmp_path)
    a = load_file(str(tmp_path / "mk" / "model.safetensors"))
    for backend in ("auto", "reference") if case == "arcee_fusion" else ("auto",):
        out = tmp_path / f"py-{backend}"
        subprocess.run([sys.executable, "-m", "pyops", "merge", str(cfg), "--out", str(out), "--no-progress",
                        "--backend", backend], check=True, capture_output=True)
        b = load_file(str(out / "model.safetensors"))
        assert sorted(a) == sorted(b)
        for name in a:
            assert a[name].dtype == b[name].dtype, name
            if case == "arcee_fusion" and backend == "auto":
                from .test_fusion_cpu import check_arcee

                base, model = _t(world, "a")[name], _t(world, "b")[name]
                assert torch.equal(a[name], ref_arcee(base, model)), name  # mergekit's = the reference's
                check_arcee(base, model, b[name], max_band=1.0)
                continue
            res = compare(b[name], a[name], tolerance_for(torch.float32))
            assert res.ok, (backend, name, res)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", [c for c in CASES if c != "breadcrumbs_ties"])
def test_native_engine_writes_the_torch_engines_bytes(world, tmp_path, monkeypatch, case, dtype):
    """Every mergekit method runs on the native engine (the C++ kernels on raw memory, the scalars
    between their passes from interp_scalars, no torch); the torch engine writes the same bytes."""
    text = CASES[case].format(w=world).replace("dtype: float32", f"dtype: {dtype}")
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(text)
    native = run_merge(cfg, tmp_path / "native", progress=False)
    monkeypatch.setenv("PYOPS_MERGE_ENGINE", "torch")
    via_torch = run_merge(cfg, tmp_path / "torch", progress=False)
    assert (native.engine, via_torch.engine) == ("native", "torch")
    assert native.backends == via_torch.backends
    assert (tmp_path / "native" / "model.safetensors").read_bytes() == \
        (tmp_path / "torch" / "model.safetensors").read_bytes()


def test_interpolating_merge_never_imports_torch(world, tmp_path):
    """`python -m pyops merge` with a mergekit method on the native engine imports no torch."""
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(CASES["multislerp"].format(w=world))
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "pyops", "merge", str(cfg), "--out",
                           str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "pyops.merging.interp_scalars" in imported and "native engine" in proc.stdout
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}, "torch was imported"
