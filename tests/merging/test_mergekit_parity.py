"""Where mergekit is installed (its own venv; `PYOPS_MERGEKIT_YAML` or `mergekit-yaml` on PATH),
the same YAML through mergekit and through `python -m pyops merge` gives the same tensors for the
deterministic methods (issue #3). Skipped otherwise: mergekit is not a test dependency (it pins
its own torch and transformers)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from pyops.bench.merging import write_llama_checkpoint
from pyops.testing import compare, tolerance_for

MERGEKIT = os.environ.get("PYOPS_MERGEKIT_YAML") or shutil.which("mergekit-yaml")
pytestmark = pytest.mark.skipif(MERGEKIT is None, reason="mergekit-yaml not found (PYOPS_MERGEKIT_YAML unset)")

TINY = dict(vocab=320, hidden=64, intermediate=128, layers=2, heads=4)
PARAMS = {
    "task_arithmetic": "weight: {w}",
    "ties": "weight: {w}, density: 0.3",
    "breadcrumbs": "weight: {w}, density: 0.5, gamma: 0.05",
    "model_stock": None,
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base, m1..m3 (fp32) and base-bf16 (the base stored in bf16, its config.json saying so)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("ckpt")
    base = write_llama_checkpoint(str(root / "base"), 0, cfg=TINY)
    for k in (1, 2, 3):
        write_llama_checkpoint(str(root / f"m{k}"), k, base=base, cfg=TINY)
    (root / "base-bf16").mkdir()
    save_file({n: t.bfloat16() for n, t in base.items()}, str(root / "base-bf16" / "model.safetensors"),
              metadata={"format": "pt"})
    conf = json.loads((root / "base" / "config.json").read_text())
    (root / "base-bf16" / "config.json").write_text(json.dumps({**conf, "torch_dtype": "bfloat16"}))
    return root


def _both(cfg_text: str, tmp_path, pyops_args=()) -> tuple:
    """(mergekit's output directory, pyops' output directory) for the same YAML."""
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(cfg_text)
    subprocess.run([MERGEKIT, str(cfg), str(tmp_path / "mk"), "--lazy-unpickle", "--no-copy-tokenizer"],
                   check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "pyops", "merge", str(cfg), "--out", str(tmp_path / "py"),
                    "--no-progress", *pyops_args], check=True, capture_output=True)
    return tmp_path / "mk", tmp_path / "py"


def _tensors(out) -> dict:
    from safetensors.torch import load_file
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("method", list(PARAMS))
def test_same_tensors_as_mergekit(method, models, tmp_path):
    from safetensors.torch import load_file

    lines = [f"merge_method: {method}", f"base_model: {models / 'base'}", "dtype: float32", "models:"]
    for k, w in ((1, 0.5), (2, 0.3), (3, 0.7)):
        lines.append(f"  - model: {models / f'm{k}'}")
        if PARAMS[method]:
            lines.append("    parameters: {" + PARAMS[method].format(w=w) + "}")
    cfg = tmp_path / "merge.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    subprocess.run([MERGEKIT, str(cfg), str(tmp_path / "mk"), "--lazy-unpickle", "--no-copy-tokenizer"],
                   check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "pyops", "merge", str(cfg), "--out", str(tmp_path / "py"),
                    "--no-progress"], check=True, capture_output=True)
    a = load_file(str(tmp_path / "mk" / "model.safetensors"))
    b = load_file(str(tmp_path / "py" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        res = compare(b[name], a[name], tolerance_for(torch.float32))
        assert res.ok, (name, res)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_bf16_base_fp32_models_without_dtype_as_mergekit(method, models, tmp_path):
    """No `dtype`: mergekit 0.1.5 promotes bf16 + fp32 to fp32, computes and writes fp32; so does pyops
    (within fp32 rounding: the same sums, fused differently). config.json: mergekit keeps the base's "bfloat16" although it wrote fp32 tensors;
    pyops names the dtype it wrote (deliberately different)."""
    lines = [f"merge_method: {method}", f"base_model: {models / 'base-bf16'}", "models:"]
    for k, w in ((1, 0.5), (2, 0.3), (3, 0.7)):
        lines += [f"  - model: {models / f'm{k}'}", f"    parameters: {{weight: {w}, density: 0.4}}"]
    mk, py = _both("\n".join(lines) + "\n", tmp_path)
    a, b = _tensors(mk), _tensors(py)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.float32, name
        res = compare(b[name], a[name], tolerance_for(torch.float32))
        assert res.ok, (name, res)
    assert json.loads((mk / "config.json").read_text())["dtype"] == "bfloat16"
    conf = json.loads((py / "config.json").read_text())
    assert conf["dtype"] == "float32" and "torch_dtype" not in conf


def test_linear_with_an_unlisted_base_as_mergekit(models, tmp_path):
    """mergekit 0.1.5 adds an unlisted base_model to linear's inputs at the top-level weight; so does pyops."""
    text = (f"merge_method: linear\nbase_model: {models / 'base'}\ndtype: float32\nparameters: {{weight: 0.2}}\n"
            f"models:\n  - model: {models / 'm1'}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {models / 'm2'}\n    parameters: {{weight: 0.3}}\n")
    mk, py = _both(text, tmp_path)
    a, b = _tensors(mk), _tensors(py)
    assert sorted(a) == sorted(b)
    for name in a:
        res = compare(b[name], a[name], tolerance_for(torch.float32))
        assert res.ok, (name, res)


def test_linear_with_an_unlisted_base_without_weight_fails_in_both(models, tmp_path):
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"merge_method: linear\nbase_model: {models / 'base'}\n"
                   f"models:\n  - model: {models / 'm1'}\n    parameters: {{weight: 0.5}}\n")
    mk = subprocess.run([MERGEKIT, str(cfg), str(tmp_path / "mk"), "--lazy-unpickle"], capture_output=True, text=True)
    assert mk.returncode != 0 and "Missing required parameter weight" in mk.stderr
    py = subprocess.run([sys.executable, "-m", "pyops", "merge", str(cfg), "--out", str(tmp_path / "py")],
                        capture_output=True, text=True)
    assert py.returncode == 2 and "base_model: linear averages base_model" in py.stderr
    assert not (tmp_path / "py").exists()


DEEP = dict(TINY, layers=5)  # five layers: a gradient is interpolated between its points at t = 0.25, 0.5, 0.75


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    root = tmp_path_factory.mktemp("deep")
    base = write_llama_checkpoint(str(root / "base"), 0, cfg=DEEP)
    for k in (1, 2, 3):
        write_llama_checkpoint(str(root / f"m{k}"), k, base=base, cfg=DEEP)
    return root


# Densities whose product with the tensor sizes is never an integer in float64 (see the report on k).
GRADIENT = """merge_method: {method}
base_model: {root}/base
dtype: float32
models:
  - model: {root}/m1
    parameters:
      weight: [0.2, 0.9, 0.4]
      density: [{{filter: self_attn, value: [0.31, 0.93]}}, {{filter: mlp, value: 0.61}}, {{value: [0.93, 0.51, 0.47]}}]
  - model: {root}/m2
    parameters: {{weight: 0.3}}
  - model: {root}/m3
    parameters:
      weight: {{filter: "*", value: [1.0, 0.1]}}
parameters:
  density: [0.71, 0.27]
  lambda: [{{filter: up_proj, value: [0.5, 1.5]}}, {{value: 1.0}}]
"""


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_gradients_as_mergekit(method, deep, tmp_path):
    """Gradients in per-model, top-level and filtered values, interpolated over five layers."""
    mk, py = _both(GRADIENT.format(method=method, root=deep), tmp_path)
    a, b = _tensors(mk), _tensors(py)
    assert sorted(a) == sorted(b)
    for name in a:
        res = compare(b[name], a[name], tolerance_for(torch.float32))
        assert res.ok, (name, res)


def test_bin_inputs_as_mergekit(models, tmp_path_factory, tmp_path):
    """pytorch_model.bin models (one single, one sharded with an index) give mergekit's merge."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("bin")
    for k, shards in ((1, 1), (2, 2)):
        d = root / f"m{k}"
        d.mkdir()
        t = load_file(str(models / f"m{k}" / "model.safetensors"))
        shutil.copy(models / f"m{k}" / "config.json", d / "config.json")
        if shards == 1:
            torch.save(t, d / "pytorch_model.bin")
            continue
        names = list(t)
        parts = {f"pytorch_model-{i + 1:05d}-of-00002.bin": names[i::2] for i in range(2)}
        for f, ns in parts.items():
            torch.save({n: t[n] for n in ns}, d / f)
        (d / "pytorch_model.bin.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {n: f for f, ns in parts.items() for n in ns}}))
    text = (f"merge_method: ties\nbase_model: {models / 'base'}\ndtype: float32\nmodels:\n"
            f"  - model: {root / 'm1'}\n    parameters: {{weight: 0.5, density: 0.33}}\n"
            f"  - model: {root / 'm2'}\n    parameters: {{weight: 0.3, density: 0.57}}\n")
    mk, py = _both(text, tmp_path)
    a, b = _tensors(mk), _tensors(py)
    assert sorted(a) == sorted(b)
    for name in a:
        res = compare(b[name], a[name], tolerance_for(torch.float32))
        assert res.ok, (name, res)


@pytest.fixture(scope="module")
def bf16_models(models, tmp_path_factory):
    """base, m1..m3 stored in bf16."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("bf16")
    for name in ("base", "m1", "m2", "m3"):
        (root / name).mkdir()
        t = load_file(str(models / name / "model.safetensors"))
        save_file({n: v.bfloat16() for n, v in t.items()}, str(root / name / "model.safetensors"),
                  metadata={"format": "pt"})
        conf = json.loads((models / name / "config.json").read_text())
        (root / name / "config.json").write_text(json.dumps({**conf, "torch_dtype": "bfloat16"}))
    return root


@pytest.mark.parametrize("storage", ["bf16", "fp32"])
@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "linear"])
def test_compute_dtype_config_is_mergekit_bit_for_bit(method, storage, models, bf16_models, tmp_path):
    """dtype: bfloat16 with --compute-dtype config: mergekit's bf16 arithmetic in its order, every tensor
    bit for bit (checkpoints stored in bf16, or in fp32 and rounded to bf16 on loading as mergekit does)."""
    root = bf16_models if storage == "bf16" else models
    density = ", density: 0.33" if method == "ties" else ""
    lines = [f"merge_method: {method}", f"base_model: {root / 'base'}", "dtype: bfloat16", "models:"]
    for k, w in ((1, 0.5), (2, 0.3), (3, 0.7)):
        lines += [f"  - model: {root / f'm{k}'}", f"    parameters: {{weight: {w}{density}}}"]
    if method == "linear":
        lines.append("parameters: {weight: 0.2}")
    mk, py = _both("\n".join(lines) + "\n", tmp_path, ("--compute-dtype", "config"))
    a, b = _tensors(mk), _tensors(py)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype == torch.bfloat16, name
        assert torch.equal(a[name], b[name]), name


def test_per_model_lambda_is_ignored_by_mergekit_and_refused_by_pyops(models, tmp_path):
    """mergekit 0.1.5 reads lambda from the top-level parameters only: a per-model lambda changes nothing
    there. pyops refuses it (exit 2) instead of silently ignoring it."""
    def text(lam: str) -> str:
        return (f"merge_method: task_arithmetic\nbase_model: {models / 'base'}\ndtype: float32\nmodels:\n"
                f"  - model: {models / 'm1'}\n    parameters: {{weight: 0.5{lam}}}\n"
                f"  - model: {models / 'm2'}\n    parameters: {{weight: 0.3}}\n")
    outs = []
    for i, lam in enumerate(("", ", lambda: 2.0")):
        cfg = tmp_path / f"{i}.yaml"
        cfg.write_text(text(lam))
        subprocess.run([MERGEKIT, str(cfg), str(tmp_path / f"mk{i}"), "--lazy-unpickle", "--no-copy-tokenizer"],
                       check=True, capture_output=True)
        outs.append(_tensors(tmp_path / f"mk{i}"))
    assert all(torch.equal(outs[0][n], outs[1][n]) for n in outs[0])
    py = subprocess.run([sys.executable, "-m", "pyops", "merge", str(tmp_path / "1.yaml"), "--out", str(tmp_path / "py")],
                        capture_output=True, text=True)
    assert py.returncode == 2 and "models[0].parameters.lambda: lambda is a merge-wide parameter" in py.stderr
