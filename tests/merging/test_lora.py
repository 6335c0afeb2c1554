"""pyops.merging.lora: PEFT LoRA adapters applied to a base model's tensors on the fly (mergekit's
`model+lora`), against the formula written out here and against PEFT's own `merge_and_unload`
(where mergekit's venv, which has PEFT, is installed: `PYOPS_MERGEKIT_YAML`)."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pyops.merging.errors import CheckpointError
from pyops.merging.lora import LoraAdapter, split_model_lora

P = "base_model.model."


def write_adapter(root: Path, tensors: dict, **config) -> Path:
    cfg = dict(peft_type="LORA", r=4, lora_alpha=8, fan_in_fan_out=False, use_rslora=False, use_dora=False,
               lora_bias=False, rank_pattern={}, alpha_pattern={})
    cfg.update(config)
    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({P + k: v.contiguous() for k, v in tensors.items()}, str(root / "adapter_model.safetensors"))
    return root


def factors(out_f, in_f, r, gen):
    return torch.randn(r, in_f, generator=gen), torch.randn(out_f, r, generator=gen)


def test_linear_delta_is_b_a_times_alpha_over_r(tmp_path, rng):
    A, B = factors(6, 5, 4, rng)
    ad = LoraAdapter.open(write_adapter(tmp_path, {"layers.0.q.lora_A.weight": A, "layers.0.q.lora_B.weight": B}))
    W = torch.randn(6, 5, generator=rng)
    assert torch.equal(ad.apply("layers.0.q.weight", W), W + (B @ A) * 2.0)
    assert ad.apply("layers.0.k.weight", W) is W                       # not adapted: untouched


@pytest.mark.parametrize("config,scale", [(dict(use_rslora=True), 8 / math.sqrt(4)),
                                          (dict(alpha_pattern={"q": 3}), 3 / 4),
                                          (dict(rank_pattern={"q": 4}, r=2), 8 / 4)],
                         ids=["rslora", "alpha_pattern", "rank_pattern"])
def test_scale_rules(tmp_path, rng, config, scale):
    A, B = factors(6, 5, 4, rng)
    ad = LoraAdapter.open(write_adapter(tmp_path, {"m.q.lora_A.weight": A, "m.q.lora_B.weight": B}, **config))
    W = torch.zeros(6, 5)
    torch.testing.assert_close(ad.apply("m.q.weight", W), (B @ A) * scale, rtol=0, atol=0)


def test_fan_in_fan_out_transposes_the_delta(tmp_path, rng):
    A, B = factors(6, 5, 4, rng)                                      # Conv1D stores W as [in, out]
    ad = LoraAdapter.open(write_adapter(tmp_path, {"h.c_attn.lora_A.weight": A, "h.c_attn.lora_B.weight": B},
                                        fan_in_fan_out=True))
    W = torch.randn(5, 6, generator=rng)
    assert torch.equal(ad.apply("h.c_attn.weight", W), W + (B @ A).t() * 2.0)


def test_embedding_delta_and_replacements(tmp_path, rng):
    A, B = torch.randn(4, 11, generator=rng), torch.randn(7, 4, generator=rng)
    saved_base, head = torch.randn(11, 7, generator=rng), torch.randn(11, 7, generator=rng)
    ad = LoraAdapter.open(write_adapter(tmp_path, {"embed.lora_embedding_A": A, "embed.lora_embedding_B": B,
                                                   "embed.base_layer.weight": saved_base, "lm_head.weight": head}))
    W = torch.randn(11, 7, generator=rng)
    assert torch.equal(ad.apply("embed.weight", W), saved_base + (B @ A).t() * 2.0)   # saved base layer, then delta
    assert torch.equal(ad.apply("lm_head.weight", W), head)                           # modules_to_save


def test_bf16_base_rounds_once(tmp_path, rng):
    A, B = factors(6, 5, 4, rng)
    ad = LoraAdapter.open(write_adapter(tmp_path, {"q.lora_A.weight": A, "q.lora_B.weight": B}))
    W = torch.randn(6, 5, generator=rng).to(torch.bfloat16)
    got = ad.apply("q.weight", W)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, (W.float() + (B @ A) * 2.0).to(torch.bfloat16))


def test_check_base_names_a_missing_target(tmp_path, rng):
    A, B = factors(6, 5, 4, rng)
    ad = LoraAdapter.open(write_adapter(tmp_path, {"m.q.lora_A.weight": A, "m.q.lora_B.weight": B}))
    with pytest.raises(CheckpointError, match=r"targets 'm\.q\.weight', which base model base-x does not have"):
        ad.check_base({"m.k.weight": (6, 5)}, "base-x")
    with pytest.raises(CheckpointError, match=r"implies m\.q\.weight of shape \[6, 5\], but base model b has \[5, 6\]"):
        ad.check_base({"m.q.weight": (5, 6)}, "b")


@pytest.mark.parametrize("tensors,config,match", [
    ({}, dict(peft_type="IA3"), "peft_type: only LORA adapters"),
    ({}, dict(use_dora=True), "use_dora: DoRA adapters"),
    ({}, dict(r=0), "r: expected a number > 0"),
    ({"q.lora_A.weight": torch.zeros(4, 5)}, {}, "module 'q' has no lora_B"),
    ({"q.lora_A.weight": torch.zeros(4, 5, 1, 1), "q.lora_B.weight": torch.zeros(6, 4, 1, 1)}, {},
     "convolution LoRA is not supported"),
    ({"q.lora_A.weight": torch.zeros(4, 5), "q.lora_B.weight": torch.zeros(6, 4), "q.lora_B.bias": torch.zeros(6)},
     {}, "LoRA on biases"),
    ({"q.lora_A.weight": torch.zeros(3, 5), "q.lora_B.weight": torch.zeros(6, 3)}, {}, "rank 3 of the stored A"),
    ({"q.lora_magnitude_vector": torch.zeros(6)}, {}, "DoRA"),
], ids=["not-lora", "dora", "r-zero", "missing-B", "conv", "bias", "rank-mismatch", "magnitude"])
def test_adapters_it_cannot_apply_are_refused(tmp_path, tensors, config, match):
    if not tensors:
        tensors = {"q.lora_A.weight": torch.zeros(4, 5), "q.lora_B.weight": torch.zeros(6, 4)}
    with pytest.raises(CheckpointError, match=match):
        LoraAdapter.open(write_adapter(tmp_path, tensors, **config))


def test_not_an_adapter_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a PEFT adapter directory"):
        LoraAdapter.open(tmp_path)


def test_bin_adapter_that_needs_pickle_code_is_refused(tmp_path):
    write_adapter(tmp_path, {"q.lora_A.weight": torch.zeros(4, 5), "q.lora_B.weight": torch.zeros(6, 4)})
    (tmp_path / "adapter_model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    torch.save({"x": Evil()}, tmp_path / "adapter_model.bin")
    with pytest.raises(CheckpointError, match=r"adapter_model\.bin: .*weights_only=True"):
        LoraAdapter.open(tmp_path)


@pytest.mark.parametrize("text,want", [("a", ("a", None)), ("org/base+org/adapter", ("org/base", "org/adapter"))])
def test_split_model_lora(text, want):
    assert split_model_lora(text) == want


def test_split_model_lora_refuses_two_plus_signs():
    with pytest.raises(ValueError, match="model\\+lora_adapter"):
        split_model_lora("a+b+c")


# ------------------------------------------------------------------------------ against PEFT

MERGEKIT = os.environ.get("PYOPS_MERGEKIT_YAML") or shutil.which("mergekit-yaml")

PEFT_SCRIPT = """
import sys, torch, transformers, peft
out = sys.argv[1]
torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=2)
base = transformers.LlamaForCausalLM(cfg).to(getattr(torch, sys.argv[2]))
base.save_pretrained(out + "/base")
lc = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                     modules_to_save=["lm_head"], rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})
pm = peft.get_peft_model(base, lc)
with torch.no_grad():
    for n, p in pm.named_parameters():
        if "lora_" in n or "modules_to_save" in n:
            p.normal_(0, 0.3)
pm.save_pretrained(out + "/adapter")
pm.merge_and_unload().save_pretrained(out + "/merged")
"""


@pytest.mark.skipif(MERGEKIT is None, reason="mergekit's venv (with PEFT) not found (PYOPS_MERGEKIT_YAML unset)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matches_peft_merge_and_unload(tmp_path, dtype):
    """Every tensor of PEFT's merged model (what mergekit writes to its LoRA cache): fp32 bit for
    bit; bf16 within PEFT's two roundings (it rounds the delta to bf16 before adding)."""
    python = Path(MERGEKIT).parent / "python"
    # cwd outside the checkout: its kernels/ folder would shadow the `kernels` package transformers imports
    subprocess.run([str(python), "-c", PEFT_SCRIPT, str(tmp_path), dtype], check=True, capture_output=True,
                   timeout=300, cwd=tmp_path)
    base, merged = load_file(str(tmp_path / "base/model.safetensors")), load_file(str(tmp_path / "merged/model.safetensors"))
    ad = LoraAdapter.open(tmp_path / "adapter")
    ad.check_base({k: v.shape for k, v in base.items()}, "base")
    assert set(merged) == set(base)
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.down_proj.weight"} <= \
        set(ad.targets) | set(ad.replaced)
    for name, w in base.items():
        got, want = ad.apply(name, w), merged[name]
        assert got.dtype == want.dtype, name
        if dtype == "float32":
            assert torch.equal(got, want), name
        else:
            # PEFT rounds the delta to bf16, then the sum: at most one rounding of each, i.e.
            # eps·(|delta| + |sum|); pyops rounds the exact sum once (half of eps·|sum|)
            bound = torch.finfo(torch.bfloat16).eps * ((want.float() - w.float()).abs() + want.float().abs())
            assert bool(((got.float() - want.float()).abs() <= bound).all()), name
