"""`python -m pyops merge` takes mergekit 0.1.5's reading of a configuration where mergekit runs it,
and refuses (exit 2, one line naming file, line and key, nothing written) what mergekit refuses
or what pyops cannot honour.

* `linear` with a `base_model` that is not under `models`: mergekit adds the base to the averaged
  inputs (mergekit/plan.py, normalize_config), at the top-level weight, and fails without one.
* `dtype: torch.bfloat16`: mergekit's dtype names with the "torch." prefix are read as without.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pyops.__main__ import main as cli_main
from pyops.merging import ConfigError, load_config, run_merge

SHAPES = {"model.layers.0.mlp.up_proj.weight": (6, 5), "model.norm.weight": (5,)}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    gen = torch.Generator().manual_seed(5)
    tensors = {}
    for name in ("base", "m1", "m2"):
        t = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
        (root / name).mkdir()
        save_file(t, str(root / name / "model.safetensors"), metadata={"format": "pt"})
        (root / name / "config.json").write_text(json.dumps({"model_type": "toy", "num_hidden_layers": 1}))
        tensors[name] = t
    return root, tensors


def _linear(root: Path, top: str = "", list_base: bool = False) -> str:
    listed = f"  - model: {root / 'base'}\n    parameters: {{weight: 0.2}}\n" if list_base else ""
    return (f"merge_method: linear\nbase_model: {root / 'base'}\nmodels:\n{listed}"
            f"  - model: {root / 'm1'}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {root / 'm2'}\n    parameters: {{weight: 0.3}}\n" + top)


def _refused(tmp_path: Path, text: str, capsys, pattern: str) -> None:
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=pattern):
        run_merge(cfg, tmp_path / "out", progress=False)
    assert cli_main(["merge", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyops merge: error: ") and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml"]


def test_linear_with_an_unlisted_base_and_no_weight_is_refused(ckpt, tmp_path, capsys):
    root, _ = ckpt
    _refused(tmp_path, _linear(root), capsys, r"merge\.yaml, line 2, column 1: base_model: linear averages "
                                             r"base_model with the models when it is not listed")


def test_linear_with_an_unlisted_base_averages_it_at_the_top_level_weight(ckpt, tmp_path):
    root, t = ckpt
    cfg = load_config(_linear(root, "parameters: {weight: 0.2}\n"))
    assert [m.key for m in cfg.models] == ["models[0]", "models[1]", "base_model"]
    run_merge(cfg, tmp_path / "out", progress=False)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for n in SHAPES:
        want = (0.5 * t["m1"][n] + 0.3 * t["m2"][n] + 0.2 * t["base"][n]) / 1.0
        torch.testing.assert_close(got[n], want, rtol=1e-6, atol=1e-6)


def test_linear_with_the_base_listed_averages_it_once(ckpt, tmp_path):
    root, t = ckpt
    cfg = load_config(_linear(root, "parameters: {weight: 9.0}\n", list_base=True))
    assert [m.key for m in cfg.models] == ["models[0]", "models[1]", "models[2]"]
    run_merge(cfg, tmp_path / "out", progress=False)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for n in SHAPES:
        want = 0.2 * t["base"][n] + 0.5 * t["m1"][n] + 0.3 * t["m2"][n]
        torch.testing.assert_close(got[n], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,code", [("torch.bfloat16", "BF16"), ("float64", "F64"), ("torch.float16", "F16")])
def test_mergekit_dtype_names(ckpt, name, code):
    root, _ = ckpt
    cfg = load_config(_linear(root, f"dtype: {name}\n", list_base=True))
    assert cfg.out_dtype == cfg.dtype == code


def test_unknown_dtype_names_the_key(ckpt):
    root, _ = ckpt
    with pytest.raises(ConfigError, match=r"line 10, column 1: dtype: expected one of float32, float16, bfloat16, "
                                          r"float64, got 'torch.int8'"):
        load_config(_linear(root, "dtype: torch.int8\n", list_base=True))
