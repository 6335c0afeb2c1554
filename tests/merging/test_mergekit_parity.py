"""Where mergekit is installed (its own venv; `PYOPS_MERGEKIT_YAML` or `mergekit-yaml` on PATH),
the same YAML through mergekit and through `python -m pyops merge` gives the same tensors for the
deterministic methods (issue #3). Skipped otherwise: mergekit is not a test dependency (it pins
its own torch and transformers)."""
from __future__ import annotations

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
    root = tmp_path_factory.mktemp("ckpt")
    base = write_llama_checkpoint(str(root / "base"), 0, cfg=TINY)
    for k in (1, 2, 3):
        write_llama_checkpoint(str(root / f"m{k}"), k, base=base, cfg=TINY)
    return root


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
