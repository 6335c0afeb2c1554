"""Per-layer gradients in a merge configuration, read as mergekit 0.1.5 reads them
(mergekit/config.py, evaluate_setting; mergekit/plan.py for where a tensor sits):

* a parameter given as a list of numbers [v0, ..., v(n-1)] takes, for layer i of N (N from
  config.json's num_hidden_layers), the value at t = i / (N - 1) (t = 1 when N = 1) of the
  piecewise-linear curve through the values spread evenly over [0, 1]; a tensor outside the
  layers (embeddings, final norm, lm_head) takes t = 0;
* that holds for top-level and per-model parameters and for the value of a `{filter, value}`
  entry; one `{filter, value}` mapping may stand alone, and filter "*" matches every tensor.
Bad gradients exit 2 naming file, line and key.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pyops
from pyops.__main__ import main as cli_main
from pyops.merging import ConfigError, load_config, run_merge
from pyops.merging.config import interpolate, layer_index

LAYERS = 5
NAMES = ["model.embed_tokens.weight"] + [f"model.layers.{i}.{p}" for i in range(LAYERS)
                                         for p in ("self_attn.q_proj.weight", "mlp.up_proj.weight")] + \
        ["model.norm.weight"]


def _save(d: Path, tensors: dict, layers=LAYERS) -> None:
    d.mkdir(parents=True)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    conf = {"model_type": "llama"} if layers is None else {"model_type": "llama", "num_hidden_layers": layers}
    (d / "config.json").write_text(json.dumps(conf))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    gen = torch.Generator().manual_seed(11)
    base = {n: torch.randn(7, 6, generator=gen) for n in NAMES}
    models = [{n: t + 0.1 * torch.randn(t.shape, generator=gen) for n, t in base.items()} for _ in range(2)]
    _save(root / "base", base)
    for i, m in enumerate(models):
        _save(root / f"m{i}", m)
    _save(root / "no-count", base, layers=None)
    _save(root / "two-layers", base, layers=2)
    return {"root": root, "base": base, "models": models}


def _ties(ckpt, m0: str, m1: str = "{weight: 0.5}", top: str = "", base: str = "base") -> str:
    r = ckpt["root"]
    return (f"merge_method: ties\nbase_model: {r / base}\nmodels:\n"
            f"  - model: {r / 'm0'}\n    parameters: {m0}\n"
            f"  - model: {r / 'm1'}\n    parameters: {m1}\n" + top)


def _t(name: str) -> float:
    i = layer_index(name)
    return 0.0 if i is None else i / (LAYERS - 1)


# ---- the curve and the layer positions ------------------------------------------------------------

@pytest.mark.parametrize("values,t,want", [
    ((0.2, 0.8), 0.0, 0.2), ((0.2, 0.8), 1.0, 0.8), ((0.2, 0.8), 0.25, 0.75 * 0.2 + 0.25 * 0.8),
    ((0.0, 1.0, 0.0), 0.5, 1.0), ((0.0, 1.0, 0.0), 0.75, 0.5), ((0.4,), 0.6, 0.4), ((1.0, 3.0, 2.0, 5.0), 1.0, 5.0)],
    ids=["start", "end", "quarter", "peak", "falling", "one-value", "last-of-four"])
def test_interpolate(values, t, want):
    assert interpolate(values, t) == want


@pytest.mark.parametrize("name,want", [("model.layers.12.mlp.up_proj.weight", 12), ("transformer.h.3.attn.c_attn.weight", 3),
                                       ("encoder.layer.0.output.dense.weight", 0), ("model.embed_tokens.weight", None),
                                       ("lm_head.weight", None), ("model.norm.weight", None)],
                         ids=["llama", "gpt2", "bert", "embed", "lm_head", "norm"])
def test_layer_index(name, want):
    assert layer_index(name) == want


def test_layer_positions(ckpt):
    cfg = load_config(_ties(ckpt, "{weight: [0.0, 1.0], density: 0.5}"))
    w = "models[0].parameters.weight"
    assert [cfg.layer_t(f"model.layers.{i}.mlp.up_proj.weight", w) for i in range(LAYERS)] == [0, 0.25, 0.5, 0.75, 1]
    assert cfg.layer_t("model.embed_tokens.weight", w) == cfg.layer_t("model.norm.weight", w) == 0.0


# ---- where a gradient may stand -------------------------------------------------------------------

CASES = {
    # per-model weight and density, a stand-alone filtered gradient, a top-level filtered gradient
    "per-model": ("{weight: [0.2, 0.9, 0.4], density: [0.3, 0.8]}", "{weight: 0.5, density: 0.6}", "",
                  lambda n, t: ([interpolate((0.2, 0.9, 0.4), t), 0.5], [interpolate((0.3, 0.8), t), 0.6], 1.0)),
    "filter-value": ("{weight: 1.0, density: [{filter: self_attn, value: [0.3, 0.9]}, {value: 0.5}]}",
                     "{weight: {filter: '*', value: [1.0, 0.1]}, density: 0.7}", "",
                     lambda n, t: ([1.0, interpolate((1.0, 0.1), t)],
                                   [interpolate((0.3, 0.9), t) if "self_attn" in n else 0.5, 0.7], 1.0)),
    "top-level": ("{weight: 0.6}", "{weight: 0.4}",
                  "parameters:\n  density: [0.35, 0.65, 0.95]\n  lambda: [{filter: up_proj, value: [0.5, 1.5]}]\n",
                  lambda n, t: ([0.6, 0.4], [interpolate((0.35, 0.65, 0.95), t)] * 2,
                                interpolate((0.5, 1.5), t) if "up_proj" in n else 1.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gradient_merge_matches_in_memory_merge(ckpt, tmp_path, case):
    m0, m1, top, expect = CASES[case]
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(_ties(ckpt, m0, m1, top))
    run_merge(cfg, tmp_path / "out", progress=False)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for n in NAMES:
        weights, densities, lam = expect(n, _t(n))
        want = pyops.merge_from_models(ckpt["base"][n], [m[n] for m in ckpt["models"]], method="ties",
                                       coeffs=weights, density=densities, lam=lam, normalize=True)
        assert torch.equal(got[n], want), n


def test_gradients_vary_across_layers(ckpt):
    cfg = load_config(_ties(ckpt, "{weight: [0.0, 1.0], density: 0.5}"))
    weights = [cfg.tensor_kwargs(f"model.layers.{i}.mlp.up_proj.weight")["coeffs"][0] for i in range(LAYERS)]
    assert weights == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_one_layer_model_takes_the_end_of_the_gradient(ckpt, tmp_path):
    r = ckpt["root"]
    d = tmp_path / "one"
    _save(d, {"model.layers.0.mlp.up_proj.weight": torch.ones(2, 2)}, layers=1)
    cfg = load_config(f"merge_method: task_arithmetic\nbase_model: {d}\nmodels:\n"
                      f"  - model: {r / 'm0'}\n    parameters: {{weight: [0.1, 0.7]}}\n")
    assert cfg.tensor_kwargs("model.layers.0.mlp.up_proj.weight")["coeffs"] == [0.7]


# ---- bad gradients ------------------------------------------------------------------------------

BAD = {
    "empty list": ("{weight: [], density: 0.5}", "",
                   r"line 5, column 18: models\[0\]\.parameters\.weight: an empty list: a gradient needs at least one"),
    "a string in the list": ("{weight: [0.1, x], density: 0.5}", "",
                             r"line 5, column 32: models\[0\]\.parameters\.weight\[1\]: expected a number, got 'x'"),
    "density out of range": ("{weight: 1, density: [0.5, 1.5]}", "",
                             r"models\[0\]\.parameters\.density\[1\]: density must be in \(0, 1\], got 1.5"),
    "gradient in a filter, empty": ("{weight: [{filter: mlp, value: []}], density: 0.5}", "",
                                    r"models\[0\]\.parameters\.weight\[0\]\.value: an empty list"),
    "mixed entries": ("{weight: [{filter: mlp, value: 1.0}, 0.5], density: 0.5}", "",
                      r"models\[0\]\.parameters\.weight\[1\]: expected a mapping \{filter: \.\.\., value: \.\.\.\}"),
    "normalize gradient": ("{weight: 1, density: 0.5}", "parameters:\n  normalize: [true, false]\n",
                           r"parameters\.normalize: expected a single value: pyops applies one normalize"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_gradient_exits_2_naming_the_key(ckpt, tmp_path, capsys, case):
    m0, top, pattern = BAD[case]
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(_ties(ckpt, m0, top=top))
    assert cli_main(["merge", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and re.search(pattern, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml"]


def test_gradient_without_a_layer_count_names_key_tensor_and_config(ckpt, tmp_path):
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(_ties(ckpt, "{weight: [0.1, 0.9], density: 0.5}", base="no-count"))
    with pytest.raises(ConfigError, match=r"merge\.yaml, line 5, column 18: models\[0\]\.parameters\.weight: a "
                                          r"gradient applies to tensor 'model\.layers\.0\.mlp\.up_proj\.weight' "
                                          r"\(layer 0\), but .*no-count/config\.json has no num_hidden_layers"):
        run_merge(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_gradient_on_a_layer_beyond_the_count_is_refused(ckpt, tmp_path):
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(_ties(ckpt, "{weight: [0.1, 0.9], density: 0.5}", base="two-layers"))
    with pytest.raises(ConfigError, match=r"models\[0\]\.parameters\.weight: a gradient applies to tensor "
                                          r"'model\.layers\.2\.mlp\.up_proj\.weight', layer 2, but config\.json "
                                          r"gives 2 layers"):
        run_merge(cfg, tmp_path / "out", progress=False)


def test_gradient_on_tensors_outside_the_layers_needs_no_count(ckpt, tmp_path):
    """Only the tensors a gradient applies to need a layer position: a filter on the embeddings is enough."""
    cfg = load_config(_ties(ckpt, "{weight: [{filter: embed, value: [0.3, 0.9]}, {value: 1.0}], density: 0.5}",
                            base="no-count"))
    assert cfg.tensor_kwargs("model.embed_tokens.weight")["coeffs"][0] == 0.3
    assert cfg.tensor_kwargs("model.layers.1.mlp.up_proj.weight")["coeffs"][0] == 1.0
