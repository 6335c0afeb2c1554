"""`python -m pyops merge` with mergekit's `slices:` (frankenmerges, passthrough stacking, per-slice
merges) and the `passthrough` method: the output's layers renumbered from 0 in slice order, each
merged from its slice's sources at the slice's gradient t with the slice's base and parameters
(source > slice > top level), config.json's layer count (and `layer_types`) rewritten; bad slices
exit 2 naming file, line and key with nothing written. Against mergekit 0.1.5 where
PYOPS_MERGEKIT_YAML names its mergekit-yaml."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pyops
from pyops.__main__ import main as cli_main
from pyops.bench.merging import write_llama_checkpoint
from pyops.merging import run_merge
from pyops.merging.config import load_config
from pyops.merging.errors import CheckpointError, ConfigError
from pyops.merging.lora import LoraAdapter
from pyops.testing import compare, tolerance_for

from .test_lora import write_adapter

TINY = dict(vocab=48, hidden=16, intermediate=24, layers=4, heads=2)
MERGEKIT = os.environ.get("PYOPS_MERGEKIT_YAML") or shutil.which("mergekit-yaml")
needs_mergekit = pytest.mark.skipif(MERGEKIT is None, reason="mergekit-yaml not found (PYOPS_MERGEKIT_YAML unset)")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """a (the base), b, c: fp32 Llama-shaped checkpoints of 4 layers; b's adapter `lora`."""
    root = tmp_path_factory.mktemp("slices")
    a = write_llama_checkpoint(str(root / "a"), 0, cfg=TINY)
    for k, name in ((1, "b"), (2, "c")):
        write_llama_checkpoint(str(root / name), k, base=a, cfg=TINY)
    gen = torch.Generator().manual_seed(3)
    h = TINY["hidden"]
    write_adapter(root / "lora", {"model.layers.2.self_attn.q_proj.lora_A.weight": torch.randn(2, h, generator=gen),
                                  "model.layers.2.self_attn.q_proj.lora_B.weight": torch.randn(h, 2, generator=gen)},
                  r=2, lora_alpha=4)
    return root


def _t(world, model: str) -> dict:
    return load_file(str(world / model / "model.safetensors"))


def _run(tmp_path: Path, text: str, **kw):
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(text)
    return run_merge(cfg, tmp_path / "out", progress=False, **kw)


def _out(tmp_path: Path) -> dict:
    return load_file(str(tmp_path / "out" / "model.safetensors"))


def _layer(name: str, i: int) -> str:
    return re.sub(r"layers\.\d+\.", f"layers.{i}.", name)


FRANKEN = """merge_method: passthrough
dtype: float32
slices:
  - sources:
      - model: {w}/a
        layer_range: [0, 3]
  - sources:
      - model: {w}/b
        layer_range: [1, 4]
  - sources:
      - model: {w}/a
        layer_range: [2, 4]
"""
FRANKEN_LAYERS = [("a", 0), ("a", 1), ("a", 2), ("b", 1), ("b", 2), ("b", 3), ("a", 2), ("a", 3)]


def test_passthrough_frankenmerge_stacks_and_renumbers_layers(world, tmp_path):
    report = _run(tmp_path, FRANKEN.format(w=world))
    got, a, b = _out(tmp_path), _t(world, "a"), _t(world, "b")
    src = {"a": a, "b": b}
    want = {n: a[n] for n in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")}
    for i, (m, j) in enumerate(FRANKEN_LAYERS):
        for n in a:
            if n.startswith("model.layers.0."):
                want[_layer(n, i)] = src[m][_layer(n, j)]
    assert set(got) == set(want)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert report.engine == "native" and report.copied == [] and report.merged == len(want)
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert conf["num_hidden_layers"] == 8 and conf["dtype"] == "float32"


def test_output_tensor_order_is_pre_layers_post(world, tmp_path):
    _run(tmp_path, FRANKEN.format(w=world))
    from pyops.merging.safetensors_io import read_header
    names = list(read_header(tmp_path / "out" / "model.safetensors")[0])
    assert names[0] == "model.embed_tokens.weight" and set(names[-2:]) == {"model.norm.weight", "lm_head.weight"}
    assert [int(n.split(".")[2]) for n in names[1:-2]] == sorted(int(n.split(".")[2]) for n in names[1:-2])


def test_passthrough_scale_gradient_per_slice(world, tmp_path):
    text = (f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {world}/b\n        layer_range: [1, 4]\n"
            f"        parameters: {{scale: [0.5, 1.5]}}\n")
    _run(tmp_path, text)
    got, b = _out(tmp_path), _t(world, "b")
    for i, s in enumerate((0.5, 1.0, 1.5)):  # t = 0, 0.5, 1 over the slice's three layers
        n = f"model.layers.{i}.mlp.up_proj.weight"
        assert torch.equal(got[n], b[_layer(n, i + 1)] * s), n
    assert torch.equal(got["lm_head.weight"], b["lm_head.weight"] * 0.5)  # outside the layers: t = 0


def test_passthrough_of_models_with_a_scale(world, tmp_path):
    _run(tmp_path, f"merge_method: passthrough\nout_dtype: bfloat16\nmodels:\n  - model: {world}/c\n"
                   f"    parameters: {{scale: 0.25}}\n")
    got, c = _out(tmp_path), _t(world, "c")
    assert set(got) == set(c) and all(torch.equal(got[n], (c[n] * 0.25).bfloat16()) for n in c)


@pytest.mark.parametrize("text,match", [
    ("merge_method: passthrough\nmodels:\n  - model: {w}/a\n  - model: {w}/b\n", r"passthrough takes exactly one model"),
    ("merge_method: passthrough\nbase_model: {w}/b\nmodels:\n  - model: {w}/a\n",
     r"line 2, column \d+: base_model: passthrough takes exactly one input"),
    ("merge_method: passthrough\nslices:\n  - sources:\n      - model: {w}/a\n        layer_range: [0, 1]\n"
     "      - model: {w}/b\n        layer_range: [0, 1]\n", r"line 3, column \d+: slices\[0\]\.sources: passthrough "
                                                         r"takes exactly one source per slice, got 2"),
], ids=["two-models", "unlisted-base", "two-sources"])
def test_passthrough_takes_one_input(world, tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        _run(tmp_path, text.format(w=world))
    assert not (tmp_path / "out").exists()


# A per-slice TIES merge: the base is a source of each slice; parameters per source, per slice and
# at the top level; gradients over each slice's own layers; a source whose layers are offset.
PER_SLICE = """merge_method: {method}
base_model: {w}/a
dtype: float32
parameters: {{density: 0.41, weight: 0.5}}
slices:
  - sources:
      - model: {w}/a
        layer_range: [0, 2]
      - model: {w}/b
        layer_range: [0, 2]
        parameters: {{weight: [0.2, 0.8], density: 0.37}}
      - model: {w}/c
        layer_range: [1, 3]
    parameters: {{weight: 0.3, density: [{{filter: mlp, value: 0.53}}, {{value: 0.71}}]}}
  - sources:
      - model: {w}/a
        layer_range: [2, 4]
      - model: {w}/c
        layer_range: [2, 4]
        parameters: {{weight: 0.9}}
    parameters: {{lambda: 1.5}}
"""


def _per_slice_expected(world, method: str) -> dict:
    """PER_SLICE resolved by hand: (output layer, base layer, [(model, layer, weight, density)], λ)."""
    a, b, c = _t(world, "a"), _t(world, "b"), _t(world, "c")
    d1 = lambda n: 0.53 if "mlp" in n else 0.71  # noqa: E731 (slice 0's filtered density)
    plan = [(0, 0, [(b, 0, 0.2, lambda n: 0.37), (c, 1, 0.3, d1)], 1.0),
            (1, 1, [(b, 1, 0.8, lambda n: 0.37), (c, 2, 0.3, d1)], 1.0),
            (2, 2, [(c, 2, 0.9, lambda n: 0.41)], 1.5),
            (3, 3, [(c, 3, 0.9, lambda n: 0.41)], 1.5)]
    kw = dict(method=method) if method == "task_arithmetic" else dict(method=method, normalize=True)
    want = {}
    for out_layer, base_layer, srcs, lam in plan:
        for n in a:
            if not n.startswith("model.layers.0."):
                continue
            o, bn = _layer(n, out_layer), _layer(n, base_layer)
            models = [m[_layer(n, j)] for m, j, _, _ in srcs]
            coeffs = [w for _, _, w, _ in srcs]
            extra = {} if method == "task_arithmetic" else dict(density=[d(n) for *_, d in srcs])
            want[o] = pyops.merge_from_models(a[bn], models, coeffs=coeffs, lam=lam, name=o, **kw, **extra)
    # embeddings: the first slice (t = 0), the final norm and head: the last slice's
    for n, srcs, lam in (("model.embed_tokens.weight", [(b, 0.2, 0.37), (c, 0.3, 0.71)], 1.0),
                         ("model.norm.weight", [(c, 0.9, 0.41)], 1.5), ("lm_head.weight", [(c, 0.9, 0.41)], 1.5)):
        extra = {} if method == "task_arithmetic" else dict(density=[d for *_, d in srcs])
        want[n] = pyops.merge_from_models(a[n], [m[n] for m, _, _ in srcs], coeffs=[w for _, w, _ in srcs], lam=lam,
                                          name=n, **kw, **extra)
    return want


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_per_slice_merge_reads_source_slice_and_top_level_parameters(world, tmp_path, method):
    _run(tmp_path, PER_SLICE.format(method=method, w=world))
    got, want = _out(tmp_path), _per_slice_expected(world, method)
    assert set(got) == set(want)
    for n in want:
        assert torch.equal(got[n], want[n]), n
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 4


def test_per_slice_base_model(world, tmp_path):
    text = (f"merge_method: task_arithmetic\nslices:\n  - base_model: {world}/c\n    sources:\n"
            f"      - model: {world}/b\n        layer_range: [0, 1]\n        parameters: {{weight: 0.5}}\n"
            f"      - model: {world}/c\n        layer_range: [0, 1]\n")
    _run(tmp_path, text)
    got, b, c = _out(tmp_path), _t(world, "b"), _t(world, "c")
    n = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(got[n], pyops.merge_from_models(c[n], [b[n]], method="task_arithmetic", coeffs=[0.5], name=n))


def test_slice_of_the_base_alone_is_the_base(world, tmp_path):
    text = (f"merge_method: ties\nbase_model: {world}/a\nparameters: {{weight: 1.0}}\nslices:\n"
            f"  - sources:\n      - model: {world}/a\n        layer_range: [0, 2]\n"
            f"  - sources:\n      - model: {world}/a\n        layer_range: [2, 3]\n      - model: {world}/b\n"
            f"        layer_range: [0, 1]\n")
    _run(tmp_path, text)
    got, a = _out(tmp_path), _t(world, "a")
    assert torch.equal(got["model.layers.1.mlp.down_proj.weight"], a["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert set(got) == {n for n in a if not n.startswith("model.layers.3.")}


def test_lora_adapter_on_a_slice_source(world, tmp_path):
    text = (f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {world}/b+{world}/lora\n"
            f"        layer_range: [2, 4]\n")
    report = _run(tmp_path, text)
    got, b = _out(tmp_path), _t(world, "b")
    ad = LoraAdapter.open(world / "lora")
    n = "model.layers.2.self_attn.q_proj.weight"
    assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"], ad.apply(n, b[n]))
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"], b[n])
    assert report.engine == "torch"


def test_engines_write_the_same_bytes(world, tmp_path, monkeypatch):
    text = PER_SLICE.format(method="ties", w=world)
    (tmp_path / "n").mkdir()
    (tmp_path / "t").mkdir()
    _run(tmp_path / "n", text)
    monkeypatch.setenv("PYOPS_MERGE_ENGINE", "torch")
    assert _run(tmp_path / "t", text).engine == "torch"
    assert (tmp_path / "n" / "out" / "model.safetensors").read_bytes() == \
        (tmp_path / "t" / "out" / "model.safetensors").read_bytes()


def test_layer_types_follow_the_layers(world, tmp_path_factory, tmp_path):
    """transformers 5 refuses a config whose layer_types length differs from num_hidden_layers:
    each output layer takes the type of the layer it comes from."""
    root = tmp_path_factory.mktemp("types")
    for m, types in (("a", ["full", "sliding", "full", "sliding"]), ("b", ["s0", "s1", "s2", "s3"])):
        shutil.copytree(world / m, root / m)
        conf = json.loads((root / m / "config.json").read_text())
        (root / m / "config.json").write_text(json.dumps({**conf, "layer_types": types}))
    _run(tmp_path, FRANKEN.format(w=root))
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert conf["num_hidden_layers"] == 8
    assert conf["layer_types"] == ["full", "sliding", "full", "s1", "s2", "s3", "full", "sliding"]


def test_layer_types_missing_in_a_source_exits_2(world, tmp_path_factory, tmp_path):
    root = tmp_path_factory.mktemp("types2")
    for m in ("a", "b"):
        shutil.copytree(world / m, root / m)
    conf = json.loads((root / "a" / "config.json").read_text())
    (root / "a" / "config.json").write_text(json.dumps({**conf, "layer_types": ["full"] * 4}))
    with pytest.raises(CheckpointError, match=r"line 9, column \d+: slices\[1\]\.sources\[0\]\.layer_range: the output's "
                                              r"config\.json needs layer_types of layers 1\.\.3 from .*b/config\.json, "
                                              r"which has no list layer_types"):
        _run(tmp_path, FRANKEN.format(w=root))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ bad input

BAD = {
    "layer range beyond the model": (
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: {w}/a\n        layer_range: [2, 5]\n",
        r"line 5, column \d+: slices\[0\]\.sources\[0\]\.layer_range: \[2, 5\] is not a non-empty range within the 4 "
        r"layers of slices\[0\]\.sources\[0\] \(.*/a\)"),
    "unequal source lengths": (
        "merge_method: ties\nbase_model: {w}/a\nslices:\n  - sources:\n      - model: {w}/a\n        layer_range: [0, 2]\n"
        "      - model: {w}/b\n        layer_range: [0, 3]\n        parameters: {{weight: 1}}\n",
        r"line 4, column \d+: slices\[0\]\.sources: every source of a slice must have the same number of layers, got "
        r"\[2, 3\]"),
    "models and slices": (
        "merge_method: passthrough\nmodels:\n  - model: {w}/a\nslices:\n  - sources:\n      - model: {w}/a\n"
        "        layer_range: [0, 1]\n", r"line 4, column 1: slices: models and slices are both given"),
    "empty range": (
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: {w}/a\n        layer_range: [2, 2]\n",
        r"line 5, column \d+: slices\[0\]\.sources\[0\]\.layer_range: expected 0 <= FIRST < END"),
    "range not two ints": (
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: {w}/a\n        layer_range: [0, 1.5]\n",
        r"line 5, column \d+: slices\[0\]\.sources\[0\]\.layer_range: expected \[FIRST, END\]"),
    "base not among the sources": (
        "merge_method: ties\nbase_model: {w}/a\nslices:\n  - sources:\n      - model: {w}/b\n        layer_range: [0, 1]\n"
        "        parameters: {{weight: 1}}\n",
        r"line 4, column \d+: slices\[0\]\.sources: base_model '.*/a' is not among the slice's sources"),
    "no base": (
        "merge_method: ties\nslices:\n  - sources:\n      - model: {w}/b\n        layer_range: [0, 1]\n",
        r"line 3, column \d+: slices\[0\]: ties needs a base_model"),
    "same model twice in a slice": (
        "merge_method: linear\nslices:\n  - sources:\n      - model: {w}/b\n        layer_range: [0, 1]\n"
        "        parameters: {{weight: 1}}\n      - model: {w}/b\n        layer_range: [1, 2]\n"
        "        parameters: {{weight: 1}}\n", r"line 7, column \d+: slices\[0\]\.sources\[1\]\.model: .* is already "
                                               r"slices\[0\]\.sources\[0\]"),
    "no weight": (
        "merge_method: ties\nbase_model: {w}/a\nslices:\n  - sources:\n      - model: {w}/a\n        layer_range: [0, 1]\n"
        "      - model: {w}/b\n        layer_range: [0, 1]\n",
        r"line 7, column \d+: slices\[0\]\.sources\[1\]: no weight for '.*/b'"),
    "unknown slice key": (
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: {w}/a\n        layer_range: [0, 1]\n"
        "    layers: 3\n", r"line 6, column \d+: slices\[0\]\.layers: unknown key"),
    "merge-wide flag in a slice": (
        "merge_method: ties\nbase_model: {w}/a\nslices:\n  - sources:\n      - model: {w}/a\n        layer_range: [0, 1]\n"
        "    parameters: {{normalize: false}}\n",
        r"line 7, column \d+: slices\[0\]\.parameters\.normalize: normalize is a merge-wide parameter"),
    "lambda per source": (
        "merge_method: ties\nbase_model: {w}/a\nslices:\n  - sources:\n      - model: {w}/a\n        layer_range: [0, 1]\n"
        "      - model: {w}/b\n        layer_range: [0, 1]\n        parameters: {{weight: 1, lambda: 2}}\n",
        r"line 9, column \d+: slices\[0\]\.sources\[1\]\.parameters\.lambda: lambda is a merge-wide parameter"),
    "missing layer_range": (
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: {w}/a\n",
        r"line 4, column \d+: slices\[0\]\.sources\[0\]: missing key 'layer_range'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_slices_exit_2_naming_file_line_and_key(world, tmp_path, capsys, case):
    text, pattern = BAD[case]
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(text.format(w=world))
    assert cli_main(["merge", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"pyops merge: error: {cfg}, line"), err
    assert re.search(pattern, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml"]


def test_residual_weight_is_noted_as_ignored(world):
    cfg = load_config(f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {world}/a\n"
                      f"        layer_range: [0, 1]\n    residual_weight: 0.5\n")
    assert any("slices[0].residual_weight is ignored" in n for n in cfg.notes)


# ------------------------------------------------------------------------------ against mergekit

def _both(text: str, tmp_path: Path, pyops_args=()) -> tuple:
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(text)
    subprocess.run([MERGEKIT, str(cfg), str(tmp_path / "mk"), "--lazy-unpickle", "--no-copy-tokenizer"],
                   check=True, capture_output=True, cwd=tmp_path)
    subprocess.run([sys.executable, "-m", "pyops", "merge", str(cfg), "--out", str(tmp_path / "py"), "--no-progress",
                    *pyops_args], check=True, capture_output=True)
    return tmp_path / "mk", tmp_path / "py"


def _compare(mk: Path, py: Path, exact: bool) -> None:
    a, b = load_file(str(mk / "model.safetensors")), load_file(str(py / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            res = compare(b[name], a[name], tolerance_for(torch.float32))
            assert res.ok, (name, res)
    ca, cb = json.loads((mk / "config.json").read_text()), json.loads((py / "config.json").read_text())
    assert ca["num_hidden_layers"] == cb["num_hidden_layers"]


@pytest.fixture(scope="module")
def bf16_world(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("slices-bf16")
    for m in ("a", "b", "c"):
        (root / m).mkdir()
        save_file({n: t.bfloat16() for n, t in _t(world, m).items()}, str(root / m / "model.safetensors"),
                  metadata={"format": "pt"})
        conf = json.loads((world / m / "config.json").read_text())
        (root / m / "config.json").write_text(json.dumps({**conf, "torch_dtype": "bfloat16"}))
    return root


@needs_mergekit
@pytest.mark.parametrize("storage", ["fp32", "bf16"])
def test_passthrough_frankenmerge_as_mergekit(world, bf16_world, tmp_path, storage):
    """Two models, overlapping ranges, three slices, one scaled by a gradient: bit for bit."""
    root = world if storage == "fp32" else bf16_world
    text = FRANKEN.format(w=root).replace("dtype: float32\n", "").replace(
        "        layer_range: [1, 4]\n", "        layer_range: [1, 4]\n        parameters: {scale: [0.5, 1.25]}\n")
    mk, py = _both(text, tmp_path)
    _compare(mk, py, exact=True)
    assert json.loads((py / "config.json").read_text())["num_hidden_layers"] == 8


@needs_mergekit
@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_per_slice_merge_as_mergekit(world, tmp_path, method):
    """Per-source, per-slice and top-level parameters, filters and gradients, offset layer ranges:
    ties bit for bit, task arithmetic within fp32 rounding."""
    mk, py = _both(PER_SLICE.format(method=method, w=world), tmp_path)
    _compare(mk, py, exact=method == "ties")


@needs_mergekit
@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_per_slice_merge_compute_dtype_config_as_mergekit(world, tmp_path, method):
    """dtype: bfloat16 with --compute-dtype config: mergekit's bf16 arithmetic per slice, bit for bit."""
    text = PER_SLICE.format(method=method, w=world).replace("dtype: float32", "dtype: bfloat16")
    mk, py = _both(text, tmp_path, ("--compute-dtype", "config"))
    _compare(mk, py, exact=True)


@needs_mergekit
@pytest.mark.parametrize("compute", ["fp32", "config"])
def test_passthrough_of_one_model_as_mergekit(world, tmp_path, compute):
    """dtype: bfloat16 on fp32 weights, scale 0.3: mergekit rounds the weight to bf16, then the
    product; pyops rounds the fp32 product once (within one bf16 rounding of mergekit's), and
    with --compute-dtype config follows mergekit's two roundings, bit for bit."""
    mk, py = _both(f"merge_method: passthrough\ndtype: bfloat16\nmodels:\n  - model: {world}/c\n"
                   f"    parameters: {{scale: 0.3}}\n", tmp_path, ("--compute-dtype", compute))
    if compute == "config":
        _compare(mk, py, exact=True)
        return
    a, b, c = (load_file(str(d / "model.safetensors")) for d in (mk, py, world / "c"))
    for name in a:
        assert torch.equal(b[name], (c[name] * 0.3).bfloat16()), name
        assert b[name].dtype == a[name].dtype == torch.bfloat16
        assert compare(b[name], a[name], tolerance_for(torch.bfloat16)).ok, name
