"""`python -m pyops merge`: the dtype of the merged tensors and the dtype that config.json names.

Without `dtype` / `out_dtype`, each tensor's inputs are merged in their promoted dtype
(torch.promote_types: bf16 with fp32 is fp32, bf16 with fp16 is fp32) and written in it, as
mergekit 0.1.5 does; `out_dtype`, else `dtype`, sets the output dtype. config.json is written as
transformers 5's `save_pretrained` writes it: the model's dtype under "dtype", no "torch_dtype",
so that `from_pretrained(out, dtype="auto")` loads the merge in the dtype it was written in.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import pyops
from pyops.bench.merging import write_llama_checkpoint
from pyops.integrations import prefer_installed_kernels
from pyops.merging import run_merge
from pyops.merging.runner import config_with_dtype, promote

TINY = dict(vocab=96, hidden=32, intermediate=48, layers=2, heads=4)
W = (0.6, 0.9)


def _as(tensors: dict, dtype) -> dict:
    return {n: t.to(dtype) for n, t in tensors.items()}


def _save(d: Path, tensors: dict, conf: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(conf))
    return d


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama base and two fine-tunes in fp32, and the base again in bf16 and fp16 (config.json
    with transformers 4's "torch_dtype" key, as most Hub checkpoints have)."""
    root = tmp_path_factory.mktemp("llama")
    base = write_llama_checkpoint(str(root / "base"), 0, cfg=TINY)
    models = [write_llama_checkpoint(str(root / f"m{k}"), k, base=base, cfg=TINY) for k in (1, 2)]
    conf = json.loads((root / "base" / "config.json").read_text())
    for dtype, tag in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        _save(root / f"base-{tag}", _as(base, dtype), {**conf, "torch_dtype": tag})
        _save(root / f"m1-{tag}", _as(models[0], dtype), {**conf, "torch_dtype": tag})
    return {"root": root, "base": base, "models": models}


def _config(llama, base="base", models=("m1", "m2"), extra="") -> str:
    root = llama["root"]
    return (f"merge_method: ties\nbase_model: {root / base}\nmodels:\n" + "".join(
        f"  - model: {root / m}\n    parameters: {{weight: {w}, density: 0.5}}\n" for m, w in zip(models, W))
        + extra)


def _run(tmp_path: Path, text: str, name: str = "out", **kw):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(text)
    report = run_merge(cfg, tmp_path / name, progress=False, **kw)
    return report, tmp_path / name


def _transformers():
    prefer_installed_kernels()  # the checkout's kernels/ folder would shadow the distribution transformers imports
    return pytest.importorskip("transformers")


def _dtypes(out: Path) -> set:
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


# ---- config.json ------------------------------------------------------------------------------

def test_bf16_merge_config_names_dtype_only(llama, tmp_path):
    _, out = _run(tmp_path, _config(llama, extra="dtype: bfloat16\n"))
    conf = json.loads((out / "config.json").read_text())
    assert conf["dtype"] == "bfloat16" and "torch_dtype" not in conf
    base_conf = json.loads((llama["root"] / "base" / "config.json").read_text())
    assert {k: v for k, v in conf.items() if k != "dtype"} == {k: v for k, v in base_conf.items()
                                                                 if k != "torch_dtype"}


def test_config_json_is_written_as_transformers_writes_it(llama, tmp_path):
    """Sorted keys, two-space indent, a final newline: `PretrainedConfig.to_json_string`'s layout."""
    _, out = _run(tmp_path, _config(llama, extra="dtype: bfloat16\n"))
    text = (out / "config.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


def test_bf16_merge_loads_as_bf16_with_dtype_auto(llama, tmp_path):
    transformers = _transformers()
    _, out = _run(tmp_path, _config(llama, extra="dtype: bfloat16\n"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype="auto")
    assert model.dtype == torch.bfloat16
    merged = load_file(str(out / "model.safetensors"))
    state = model.state_dict()
    for name, t in merged.items():
        assert state[name].dtype == torch.bfloat16 and torch.equal(state[name], t), name


def test_fp32_merge_of_bf16_config_loads_as_fp32(llama, tmp_path):
    """out_dtype float32 over a bf16 base whose config.json says bfloat16: the config follows the tensors."""
    transformers = _transformers()
    _, out = _run(tmp_path, _config(llama, base="base-bfloat16", extra="out_dtype: float32\n"))
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype="auto").dtype == torch.float32


def test_sub_configs_that_name_a_dtype_get_the_models():
    conf = {"torch_dtype": "float32", "text_config": {"torch_dtype": "float32", "hidden_size": 8},
            "vision_config": {"dtype": "float32"}, "other": {"x": 1}}
    assert config_with_dtype(conf, "bfloat16") == {
        "dtype": "bfloat16", "text_config": {"dtype": "bfloat16", "hidden_size": 8},
        "vision_config": {"dtype": "bfloat16"}, "other": {"x": 1}}


# ---- the output dtype without `dtype` ---------------------------------------------------------

@pytest.mark.parametrize("codes,want", [(["BF16", "F32"], "F32"), (["F32", "BF16"], "F32"), (["BF16", "F16"], "F32"),
                                        (["BF16", "BF16"], "BF16"), (["F16", "F64"], "F64"), (["F16"], "F16")],
                         ids=["bf16+fp32", "fp32+bf16", "bf16+fp16", "bf16", "fp16+fp64", "fp16"])
def test_promote_is_torch_promote_types(codes, want):
    names = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
    expected = names[codes[0]]
    for c in codes[1:]:
        expected = torch.promote_types(expected, names[c])
    assert promote(codes) == want and names[want] == expected


def test_bf16_base_fp32_models_merge_and_write_fp32(llama, tmp_path):
    """mergekit 0.1.5 computes and writes fp32 here; so does pyops (the models are not rounded to bf16)."""
    report, out = _run(tmp_path, _config(llama, base="base-bfloat16"))
    assert _dtypes(out) == {"F32"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert any("merged in their promoted dtype" in n and "F32 (BF16 + F32)" in n for n in report.notes)
    got = load_file(str(out / "model.safetensors"))
    for name, t in got.items():
        base = llama["base"][name].bfloat16().float()
        want = pyops.merge_from_models(base, [m[name] for m in llama["models"]], method="ties", coeffs=list(W),
                                       density=[0.5, 0.5], normalize=True)
        assert torch.equal(t, want), name


def test_bf16_with_fp16_model_merges_in_fp32(llama, tmp_path):
    _, out = _run(tmp_path, _config(llama, base="base-bfloat16", models=("m1-float16", "m2")))
    assert _dtypes(out) == {"F32"}


def test_same_dtype_inputs_keep_it(llama, tmp_path):
    report, out = _run(tmp_path, _config(llama, base="base-bfloat16", models=("m1-bfloat16",)))
    assert _dtypes(out) == {"BF16"} and report.engine == "native"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert not any("promoted" in n for n in report.notes)


@pytest.mark.parametrize("extra,want", [("dtype: float16\n", "F16"), ("out_dtype: bfloat16\n", "BF16"),
                                        ("dtype: float16\nout_dtype: float32\n", "F32"), ("dtype: float64\n", "F64")],
                         ids=["dtype", "out_dtype", "out_dtype-wins", "float64"])
def test_configured_dtype_sets_the_output(llama, tmp_path, extra, want):
    _, out = _run(tmp_path, _config(llama, base="base-bfloat16", extra=extra))
    assert _dtypes(out) == {want}
    names = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
    assert json.loads((out / "config.json").read_text())["dtype"] == names[want]
