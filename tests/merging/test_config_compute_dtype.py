"""`python -m pyops merge --compute-dtype config`: mergekit 0.1.5's arithmetic, in the configured
`dtype` and in mergekit's order of operations, for task_arithmetic, linear and ties (the methods
`pyops.merging.runner.mergekit_order` follows; any other method exits 2). The default,
`--compute-dtype fp32`, accumulates in fp32 and rounds once. Bit equality with mergekit itself is
checked in test_mergekit_parity.py."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pyops.__main__ import main as cli_main
from pyops.merging import MergeError, run_merge
from pyops.merging.runner import _magnitude, mergekit_order

SHAPES = {"model.layers.0.mlp.up_proj.weight": (48, 40), "model.layers.1.self_attn.q_proj.weight": (40, 40),
          "model.norm.weight": (40,)}
W = (0.5, 0.3, 0.7)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    gen = torch.Generator().manual_seed(17)
    base = {n: 0.02 * torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    models = [{n: t + 0.002 * torch.randn(t.shape, generator=gen) for n, t in base.items()} for _ in W]
    for name, tensors in [("base", base)] + [(f"m{i}", m) for i, m in enumerate(models)]:
        for dtype, tag in ((torch.float32, ""), (torch.bfloat16, "-bf16")):
            d = root / (name + tag)
            d.mkdir()
            save_file({n: t.to(dtype) for n, t in tensors.items()}, str(d / "model.safetensors"),
                      metadata={"format": "pt"})
            (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    return {"root": root, "base": base, "models": models}


def _config(ckpt, method: str, tag: str = "", extra: str = "dtype: bfloat16\n") -> str:
    r = ckpt["root"]
    density = ", density: 0.4" if method == "ties" else ""
    text = f"merge_method: {method}\nbase_model: {r / ('base' + tag)}\nmodels:\n" + "".join(
        f"  - model: {r / (f'm{i}' + tag)}\n    parameters: {{weight: {w}{density}}}\n" for i, w in enumerate(W))
    if method == "linear":
        text += "parameters: {weight: 0.2}\n"
    return text + extra


def _run(tmp_path: Path, text: str, name: str, **kw):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(text)
    report = run_merge(cfg, tmp_path / name, progress=False, **kw)
    return report, load_file(str(tmp_path / name / "model.safetensors"))


# ---- the option -----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "ties"])
def test_config_compute_runs_mergekit_order_on_torch(ckpt, tmp_path, method):
    report, got = _run(tmp_path, _config(ckpt, method), "out", compute_dtype="config")
    assert report.engine == "torch" and report.backends == {"mergekit-order": len(SHAPES)}
    assert any("--compute-dtype config: mergekit's" in n and "bfloat16" in n for n in report.notes)
    assert {t.dtype for t in got.values()} == {torch.bfloat16}


@pytest.mark.parametrize("method", ["dare_ties", "breadcrumbs", "model_stock"])
def test_config_compute_refuses_other_methods(ckpt, tmp_path, capsys, method):
    text = _config(ckpt, method).replace(", density: 0.4", "")
    if method == "breadcrumbs":
        text = text.replace("}\n", ", density: 0.5}\n")
    if method == "model_stock":
        text = re.sub(r"\n    parameters: \{[^}]*\}", "", text)
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(text)
    assert cli_main(["merge", str(cfg), "--out", str(tmp_path / "out"), "--compute-dtype", "config"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and re.search(
        rf"--compute-dtype config: mergekit's arithmetic is reproduced for task_arithmetic, linear, ties, passthrough, not "
        rf"{method} \(run without it", err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml"]


def test_unknown_compute_dtype_is_refused(ckpt, tmp_path):
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(_config(ckpt, "ties"))
    with pytest.raises(MergeError, match=r"compute_dtype: expected one of fp32, config, got 'bf16'"):
        run_merge(cfg, tmp_path / "out", progress=False, compute_dtype="bf16")


def test_cli_rejects_an_unknown_choice(ckpt, tmp_path, capsys):
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(_config(ckpt, "ties"))
    with pytest.raises(SystemExit) as exc:
        cli_main(["merge", str(cfg), "--out", str(tmp_path / "out"), "--compute-dtype", "bf16"])
    assert exc.value.code == 2 and "invalid choice: 'bf16'" in capsys.readouterr().err


# ---- what the two modes compute ---------------------------------------------------------------------

@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "ties"])
def test_default_is_the_fp32_merge_rounded_once(ckpt, tmp_path, method):
    """dtype: bfloat16 over fp32 checkpoints: the default mode's tensors are its fp32 merge rounded
    to bf16 on every element; the config mode computes in bf16 and lands elsewhere on some."""
    _, fp32 = _run(tmp_path, _config(ckpt, method, extra="dtype: float32\n"), "fp32")
    _, default = _run(tmp_path, _config(ckpt, method), "default")
    _, config = _run(tmp_path, _config(ckpt, method), "config", compute_dtype="config")
    for n in SHAPES:
        assert torch.equal(default[n], fp32[n].bfloat16()), n
    assert any(not torch.equal(config[n], default[n]) for n in SHAPES)


def test_config_compute_without_dtype_computes_in_the_inputs_dtype(ckpt, tmp_path):
    """No `dtype`: the arithmetic runs in the inputs' (promoted) dtype, here bf16."""
    _, got = _run(tmp_path, _config(ckpt, "task_arithmetic", "-bf16", extra=""), "out", compute_dtype="config")
    base = {n: v.bfloat16() for n, v in ckpt["base"].items()}
    models = [{n: v.bfloat16() for n, v in m.items()} for m in ckpt["models"]]
    for n in SHAPES:
        want = mergekit_order("task_arithmetic", base[n], [m[n] for m in models], W, [1.0] * 3, 1.0, False)
        assert got[n].dtype == torch.bfloat16 and torch.equal(got[n], want), n


def test_config_compute_in_fp32_is_within_rounding_of_the_default(ckpt, tmp_path):
    _, a = _run(tmp_path, _config(ckpt, "task_arithmetic", extra="dtype: float32\n"), "a")
    _, b = _run(tmp_path, _config(ckpt, "task_arithmetic", extra="dtype: float32\n"), "b", compute_dtype="config")
    for n in SHAPES:
        torch.testing.assert_close(b[n], a[n], rtol=1e-6, atol=1e-7)


# ---- mergekit's operation order, piece by piece -------------------------------------------------------

@pytest.mark.parametrize("density,n,k", [(0.5, 10, 5), (0.33, 10, 3), (0.01, 10, 1), (1.0, 10, 10)],
                         ids=["half", "floor", "at-least-one", "all"])
def test_magnitude_keeps_exactly_k_even_among_ties(density, n, k):
    delta = torch.full((n,), 0.25, dtype=torch.bfloat16)  # every magnitude tied
    kept = _magnitude(delta, density)
    assert kept.dtype == torch.bfloat16 and int((kept != 0).sum()) == k


def test_magnitude_keeps_the_largest():
    delta = torch.tensor([0.1, -0.9, 0.3, 0.05, -0.4])
    assert torch.equal(_magnitude(delta, 0.4), torch.tensor([0.0, -0.9, 0.0, 0.0, -0.4]))


def test_task_arithmetic_order_in_bf16_rounds_each_step():
    """base −0.14453125, θ −0.11376953125, w 0.3 (all in bf16 where they are stored): mergekit rounds
    w to bf16 (0.30078125) and w·τ to bf16 (0.00927734375) before adding the base, landing on
    −0.134765625; the fp32 route, rounded once, gives −0.1357421875."""
    base = torch.tensor([-0.14453125], dtype=torch.bfloat16)
    model = torch.tensor([-0.11376953125], dtype=torch.bfloat16)
    got = mergekit_order("task_arithmetic", base, [model], [0.3], [1.0], 1.0, False)
    assert got.dtype == torch.bfloat16 and float(got) == -0.134765625
    once = (base.float() + torch.tensor(0.3) * (model.float() - base.float())).bfloat16()
    assert float(once) == -0.1357421875


def test_ties_order_elects_on_the_weighted_sum_and_normalizes_by_agreeing_weights():
    base = torch.zeros(3)
    models = [torch.tensor([1.0, -1.0, 2.0]), torch.tensor([-3.0, 2.0, 2.0])]
    got = mergekit_order("ties", base, models, [1.0, 0.5], [1.0, 1.0], 1.0, True)
    # weighted τ: [1, -1, 2] and [-1.5, 1, 1]; sums -0.5, 0, 3: signs -, + (0 counts positive), +
    assert torch.equal(got, torch.tensor([-1.5 / 0.5, 1.0 / 0.5, 3.0 / 1.5]))


def test_linear_order_accumulates_in_fp32_and_rounds_to_the_input_dtype():
    models = [torch.full((2,), 1.0, dtype=torch.bfloat16), torch.full((2,), 2.0 ** -9, dtype=torch.bfloat16)]
    got = mergekit_order("linear", None, models, [1.0, 1.0], [1.0, 1.0], 1.0, False)
    assert got.dtype == torch.bfloat16 and torch.equal(got, (torch.tensor(1.0) + 2.0 ** -9).bfloat16().expand(2))
