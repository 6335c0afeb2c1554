"""`python -m pyops merge` with LoRA inputs, mergekit's `model+adapter` (a PEFT adapter directory):
the adapter is applied to each tensor as it is read (pyops.merging.lora.LoraAdapter), on the torch
engine, never written as a merged copy; an adapter that targets a module the model lacks exits 2
naming the configuration's file, line and key and the adapter's file and tensor. Against mergekit
0.1.5 (which merges the adapter with PEFT into --lora-merge-cache first) where PYOPS_MERGEKIT_YAML
names its mergekit-yaml."""
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
from pyops.bench.merging import write_llama_checkpoint
from pyops.merging import run_merge
from pyops.__main__ import main as cli_main
from pyops.merging.errors import CheckpointError, ConfigError
from pyops.merging.lora import LoraAdapter
from pyops.testing import compare, tolerance_for

from .test_lora import PEFT_SCRIPT, write_adapter

TINY = dict(vocab=48, hidden=16, intermediate=24, layers=2, heads=2)
MERGEKIT = os.environ.get("PYOPS_MERGEKIT_YAML") or shutil.which("mergekit-yaml")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """base, m1, m2 (fp32 Llama-shaped) and two adapters: `qv` (q_proj, v_proj of both layers,
    lm_head saved whole) and `bad` (a module the models lack)."""
    root = tmp_path_factory.mktemp("lora")
    base = write_llama_checkpoint(str(root / "base"), 0, cfg=TINY)
    for k in (1, 2):
        write_llama_checkpoint(str(root / f"m{k}"), k, base=base, cfg=TINY)
    gen = torch.Generator().manual_seed(5)
    h, r = TINY["hidden"], 4
    tensors = {}
    for layer in range(TINY["layers"]):
        for proj in ("q_proj", "v_proj"):
            m = f"model.layers.{layer}.self_attn.{proj}"
            tensors[f"{m}.lora_A.weight"] = torch.randn(r, h, generator=gen) * 0.1
            tensors[f"{m}.lora_B.weight"] = torch.randn(h, r, generator=gen) * 0.1
    tensors["lm_head.weight"] = torch.randn(TINY["vocab"], h, generator=gen) * 0.02
    write_adapter(root / "qv", tensors, r=r, lora_alpha=8)
    write_adapter(root / "bad", {"model.layers.0.self_attn.x_proj.lora_A.weight": torch.zeros(r, h),
                                 "model.layers.0.self_attn.x_proj.lora_B.weight": torch.zeros(h, r)}, r=r, lora_alpha=8)
    return root


def _write(tmp_path: Path, text: str) -> Path:
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(text)
    return cfg


def _ties(world, base: str, m1: str, m2: str = "m2") -> str:
    return (f"merge_method: ties\nbase_model: {world / base}\nmodels:\n"
            f"  - model: {world / m1}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
            f"  - model: {world / m2}\n    parameters: {{weight: 0.4, density: 0.7}}\n")


def _adapted(world, model: str, adapter: str) -> dict:
    ad = LoraAdapter.open(world / adapter)
    return {n: ad.apply(n, t) for n, t in load_file(str(world / model / "model.safetensors")).items()}


def _expected_ties(base: dict, models: list) -> dict:
    return {n: pyops.merge_from_models(base[n], [m[n] for m in models], method="ties", coeffs=[0.6, 0.4],
                                       density=[0.5, 0.7], lam=1.0, normalize=True, name=n) for n in base}


def _assert_equal(out: Path, want: dict) -> None:
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(want)
    for n in want:
        assert got[n].dtype == want[n].dtype and torch.equal(got[n], want[n]), n


def test_adapter_on_a_task_model_is_applied_as_read(world, tmp_path):
    before = {p: p.read_bytes() for p in (world / "m1").iterdir()}
    report = run_merge(_write(tmp_path, _ties(world, "base", f"m1+{world / 'qv'}")), tmp_path / "out", progress=False)
    assert report.engine == "torch"
    m1 = _adapted(world, "m1", "qv")
    m2 = load_file(str(world / "m2" / "model.safetensors"))
    _assert_equal(tmp_path / "out", _expected_ties(load_file(str(world / "base" / "model.safetensors")), [m1, m2]))
    assert {p: p.read_bytes() for p in (world / "m1").iterdir()} == before     # no merged copy written anywhere
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml", "out"]


def test_adapter_on_the_base_model(world, tmp_path):
    run_merge(_write(tmp_path, _ties(world, f"base+{world / 'qv'}", "m1")), tmp_path / "out", progress=False)
    base = _adapted(world, "base", "qv")
    models = [load_file(str(world / m / "model.safetensors")) for m in ("m1", "m2")]
    _assert_equal(tmp_path / "out", _expected_ties(base, models))


def test_base_with_adapter_listed_as_a_model_is_a_task_model(world, tmp_path):
    """`base+qv` under models is another input than `base` (mergekit's ModelReference equality)."""
    run_merge(_write(tmp_path, _ties(world, "base", f"base+{world / 'qv'}", "m1")), tmp_path / "out", progress=False)
    base = load_file(str(world / "base" / "model.safetensors"))
    models = [_adapted(world, "base", "qv"), load_file(str(world / "m1" / "model.safetensors"))]
    _assert_equal(tmp_path / "out", _expected_ties(base, models))


def test_linear_of_a_model_with_and_without_its_adapter(world, tmp_path):
    text = (f"merge_method: linear\nmodels:\n  - model: {world / 'm1'}\n    parameters: {{weight: 1.0}}\n"
            f"  - model: {world / 'm1'}+{world / 'qv'}\n    parameters: {{weight: 3.0}}\n")
    run_merge(_write(tmp_path, text), tmp_path / "out", progress=False)
    plain, lora = load_file(str(world / "m1" / "model.safetensors")), _adapted(world, "m1", "qv")
    want = {n: pyops.merge_from_models(torch.zeros_like(plain[n]), [plain[n], lora[n]], method="task_arithmetic",
                                       coeffs=[0.25, 0.75], name=n) for n in plain}
    _assert_equal(tmp_path / "out", want)


def test_missing_target_module_exits_2_naming_file_line_key_and_adapter(world, tmp_path, capsys):
    cfg = _write(tmp_path, _ties(world, "base", f"m1+{world / 'bad'}"))
    assert cli_main(["merge", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert re.search(rf"{re.escape(str(cfg))}, line 4, column \d+: models\[0\]\.model: .*bad/adapter_model"
                     rf"\.safetensors: base_model\.model\.model\.layers\.0\.self_attn\.x_proj\.lora_A\.weight: targets "
                     rf"'model\.layers\.0\.self_attn\.x_proj\.weight', which base model .*m1 does not have", err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("written,match", [
    ("{m1}+{root}/nope", r"models\[0\]\.model: '.*nope' does not exist"),
    ("{m1}+{m2}", r"models\[0\]\.model: .*m2: not a PEFT adapter directory \(no adapter_config\.json\)"),
    ("{m1}+{root}/qv+{root}/qv", r"models\[0\]\.model: expected 'model' or 'model\+lora_adapter'"),
    ("{root}/nope+{root}/qv", r"models\[0\]\.model: '.*nope' does not exist"),
], ids=["adapter-missing", "not-an-adapter", "two-plus", "model-missing"])
def test_bad_model_references_exit_2(world, tmp_path, written, match):
    text = _ties(world, "base", "m1").replace(str(world / "m1"),
                                               written.format(m1=world / "m1", m2=world / "m2", root=world), 1)
    with pytest.raises((ConfigError, CheckpointError), match=match):
        run_merge(_write(tmp_path, text), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_output_inside_the_adapter_directory_is_refused(world, tmp_path):
    from pyops.merging.errors import MergeError
    with pytest.raises(MergeError, match="overlaps the input"):
        run_merge(_write(tmp_path, _ties(world, "base", f"m1+{world / 'qv'}")), world / "qv" / "out", progress=False)
    assert not (world / "qv" / "out").exists()


# ------------------------------------------------------------------------------ against mergekit

@pytest.fixture(scope="module")
def peft_world(tmp_path_factory):
    """A tiny Llama saved by transformers, a PEFT adapter for it (q/v/down_proj, embed_tokens,
    modules_to_save lm_head, rank and alpha patterns) and two fine-tuned copies of the base."""
    if MERGEKIT is None:
        pytest.skip("mergekit-yaml not found (PYOPS_MERGEKIT_YAML unset)")
    root = tmp_path_factory.mktemp("peft")
    python = Path(MERGEKIT).parent / "python"
    # cwd outside the checkout: its kernels/ folder would shadow the `kernels` package transformers imports
    subprocess.run([str(python), "-c", PEFT_SCRIPT, str(root), "float32"], check=True, capture_output=True,
                   timeout=300, cwd=root)
    base = load_file(str(root / "base" / "model.safetensors"))
    gen = torch.Generator().manual_seed(11)
    for k in (1, 2):
        (root / f"m{k}").mkdir()
        shutil.copy(root / "base" / "config.json", root / f"m{k}" / "config.json")
        save_file({n: t + 0.01 * torch.randn(t.shape, generator=gen) for n, t in base.items()},
                  str(root / f"m{k}" / "model.safetensors"), metadata={"format": "pt"})
    return root


def _both(root: Path, text: str, tmp_path: Path) -> tuple:
    cfg = _write(tmp_path, text)
    subprocess.run([MERGEKIT, str(cfg), str(tmp_path / "mk"), "--lazy-unpickle", "--no-copy-tokenizer",
                    "--lora-merge-cache", str(tmp_path / "cache")], check=True, capture_output=True, cwd=tmp_path)
    subprocess.run([sys.executable, "-m", "pyops", "merge", str(cfg), "--out", str(tmp_path / "py"), "--no-progress"],
                   check=True, capture_output=True)
    return load_file(str(tmp_path / "mk" / "model.safetensors")), load_file(str(tmp_path / "py" / "model.safetensors"))


@pytest.mark.parametrize("where", ["task-model", "base"])
@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_lora_inputs_as_mergekit(peft_world, tmp_path, method, where):
    """mergekit 0.1.5 merges the adapter with PEFT's merge_and_unload into its cache, then merges;
    pyops applies it as it reads: every tensor within fp32 rounding (the adapted weights are PEFT's bit
    for bit, tests/merging/test_lora.py; the merge's sums are fused differently)."""
    r = peft_world
    adapted = f"{r / 'base'}+{r / 'adapter'}"
    base, m1 = (adapted, r / "m1") if where == "base" else (r / "base", adapted)
    text = (f"merge_method: {method}\nbase_model: {base}\ndtype: float32\nmodels:\n"
            f"  - model: {m1}\n    parameters: {{weight: 0.6, density: 0.43}}\n"
            f"  - model: {r / 'm2'}\n    parameters: {{weight: 0.3, density: 0.61}}\n")
    a, b = _both(r, text, tmp_path)
    assert sorted(a) == sorted(b)
    for name in a:
        res = compare(b[name], a[name], tolerance_for(torch.float32))
        assert res.ok, (name, res)
    conf = json.loads((tmp_path / "py" / "config.json").read_text())
    assert conf["num_hidden_layers"] == 2
