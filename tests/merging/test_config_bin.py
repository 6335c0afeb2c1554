"""`pytorch_model.bin` checkpoints as merge inputs (single, or sharded with
pytorch_model.bin.index.json), loaded with torch.load(weights_only=True): the merge equals the one
of the same tensors stored as safetensors, byte for byte; a .bin that needs pickle code exits 2
naming the file and runs none of it; a directory with both formats is read from its safetensors,
as mergekit 0.1.5 reads it. .bin inputs run on the torch engine."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pyops.__main__ import main as cli_main
from pyops.merging import CheckpointError, run_merge

SHAPES = {"model.embed_tokens.weight": (11, 6), "model.layers.0.mlp.up_proj.weight": (9, 6),
          "model.layers.0.input_layernorm.weight": (6,), "model.norm.weight": (6,)}


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _as_bin(d: Path, tensors: dict, shards: int = 1, legacy: bool = False) -> Path:
    d.mkdir(parents=True)
    if shards == 1:
        torch.save(tensors, d / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    else:
        names = list(tensors)
        parts = {f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin": names[i::shards] for i in range(shards)}
        for f, ns in parts.items():
            torch.save({n: tensors[n] for n in ns}, d / f)
        (d / "pytorch_model.bin.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {n: f for f, ns in parts.items() for n in ns}}))
    return d


def _as_safetensors(d: Path, tensors: dict) -> Path:
    d.mkdir(parents=True)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    gen = torch.Generator().manual_seed(3)
    base = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    models = [{n: t + 0.1 * torch.randn(t.shape, generator=gen) for n, t in base.items()} for _ in range(2)]
    _as_safetensors(root / "base", base)
    _as_bin(root / "base-bin", base)
    for i, m in enumerate(models):
        _as_safetensors(root / f"m{i}", m)
    _as_bin(root / "m0-bin", models[0])
    _as_bin(root / "m0-legacy", models[0], legacy=True)
    _as_bin(root / "m1-sharded", models[1], shards=2)
    # both formats: the safetensors are m0's, the .bin holds other values
    both = _as_safetensors(root / "m0-both", models[0])
    torch.save({n: t * 100 for n, t in models[0].items()}, both / "pytorch_model.bin")
    return root


def _ties(root: Path, base: str, m0: str, m1: str) -> str:
    return (f"merge_method: ties\nbase_model: {root / base}\nmodels:\n"
            f"  - model: {root / m0}\n    parameters: {{weight: 0.6, density: 0.55}}\n"
            f"  - model: {root / m1}\n    parameters: {{weight: 0.4, density: 0.35}}\n")


def _merge(tmp_path: Path, text: str, name: str):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(text)
    return run_merge(cfg, tmp_path / name, progress=False)


@pytest.mark.parametrize("base,m0,m1", [("base", "m0-bin", "m1"), ("base", "m0", "m1-sharded"),
                                        ("base-bin", "m0-legacy", "m1-sharded"), ("base", "m0-both", "m1")],
                         ids=["single-bin", "sharded-bin-with-index", "bin-base-legacy-format", "both-formats"])
def test_bin_inputs_merge_as_their_safetensors(ckpt, tmp_path, base, m0, m1):
    before = _tree(ckpt)
    want = _merge(tmp_path, _ties(ckpt, "base", "m0", "m1"), "want")
    got = _merge(tmp_path, _ties(ckpt, base, m0, m1), "got")
    a, b = load_file(str(tmp_path / "got" / "model.safetensors")), load_file(str(tmp_path / "want" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]) for n in a)
    assert want.engine == "native" and got.engine == ("native" if m0 == "m0-both" else "torch")
    assert _tree(ckpt) == before  # inputs untouched


def _refused(tmp_path: Path, text: str, capsys, pattern: str) -> str:
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(text)
    with pytest.raises(CheckpointError, match=pattern):
        run_merge(cfg, tmp_path / "out", progress=False)
    assert cli_main(["merge", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyops merge: error: ") and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml"]
    return err


class _RunsCode:
    """Pickled as a call to os.system: what a malicious .bin holds."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bin_that_needs_pickle_code_exits_2_and_runs_none(ckpt, tmp_path_factory, tmp_path, capsys):
    marker = tmp_path_factory.mktemp("marker") / "ran"
    evil = tmp_path_factory.mktemp("evil") / "m"
    evil.mkdir()
    torch.save({"model.norm.weight": torch.ones(6), "payload": _RunsCode(marker)}, evil / "pytorch_model.bin")
    err = _refused(tmp_path, _ties(ckpt, "base", str(evil), "m1"), capsys,
                   r"m/pytorch_model\.bin: needs pickle code to load \(.*GLOBAL posix\.system.*\); pyops loads "
                   r"\.bin files with torch\.load\(weights_only=True\), which runs none")
    assert str(evil / "pytorch_model.bin") in err
    assert not marker.exists()


@pytest.mark.parametrize("content,pattern", [
    (b"not a torch file", r"not a PyTorch checkpoint that torch\.load\(weights_only=True\) reads"),
    ("tensor", r"expected a state dict \{name: tensor\}, got a Tensor"),
    ("nested", r"expected a state dict \{name: tensor\}, but 'inner' holds a dict")],
    ids=["junk", "a-tensor", "nested-dict"])
def test_bin_that_is_not_a_state_dict_exits_2(ckpt, tmp_path_factory, tmp_path, capsys, content, pattern):
    d = tmp_path_factory.mktemp("bad") / "m"
    d.mkdir()
    if isinstance(content, bytes):
        (d / "pytorch_model.bin").write_bytes(content)
    elif content == "tensor":
        torch.save(torch.ones(3), d / "pytorch_model.bin")
    else:
        torch.save({"inner": {"w": torch.ones(3)}}, d / "pytorch_model.bin")
    _refused(tmp_path, _ties(ckpt, "base", str(d), "m1"), capsys, pattern)


def test_bin_index_naming_a_tensor_its_shard_lacks(ckpt, tmp_path_factory, tmp_path, capsys):
    d = tmp_path_factory.mktemp("idx") / "m"
    d.mkdir()
    torch.save({"model.norm.weight": torch.ones(6)}, d / "a.bin")
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": "a.bin",
                                                                               "lm_head.weight": "a.bin"}}))
    _refused(tmp_path, _ties(ckpt, "base", str(d), "m1"), capsys,
             r"pytorch_model\.bin\.index\.json: maps tensor 'lm_head\.weight' to a\.bin, which does not contain it")
