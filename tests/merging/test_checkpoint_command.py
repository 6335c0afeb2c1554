"""`python -m pyops merge` / `pyops.merging.run_merge`: the streaming merge of whole checkpoints.

Small synthetic Hugging Face checkpoints (a base and three fine-tuned models, odd shapes, a 1-D
bias, a 0-d scalar, an int64 buffer, one model sharded with an index) are merged from mergekit
YAML, and every output tensor is compared bit for bit with `pyops.merge_from_models` called in
memory on the same tensors with the same name (so DARE masks agree). The output is read back
with safetensors' own loader. Bad input and interrupted merges must leave nothing behind and
the inputs untouched.

The CLI is exercised in-process through `pyops.__main__.main(argv)` for every method and for
bad input (its parser, messages and exit codes), and once as a real `python -m pyops merge`
subprocess, started before the first test and checked last, so that its `import pyops` overlaps
the other tests.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pyops
from pyops.__main__ import main as cli_main
from pyops.merging import CheckpointError, ConfigError, MergeError, load_config, run_merge
from pyops.merging import safetensors_io as sio

N = 3  # fine-tuned models
SHAPES = {
    "model.embed_tokens.weight": (37, 19),
    "model.layers.0.self_attn.q_proj.weight": (23, 17),
    "model.layers.0.mlp.down_proj.bias": (29,),
    "model.layers.1.mlp.up_proj.weight": (5, 7, 3),
    "model.norm.weight": (1,),
    "logit_scale": (),
}
INT_BUFFER = "model.rotary.position_ids"
SHARDED = 1  # models[SHARDED] is stored as two shards with an index
FLOATS = list(SHAPES)


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------

def _save_model(d: Path, tensors: dict, sharded: bool = False, extra_files: bool = False) -> None:
    d.mkdir(parents=True)
    if sharded:
        names = list(tensors)
        parts = [names[: len(names) // 2], names[len(names) // 2:]]
        files = [f"model-0000{i + 1}-of-00002.safetensors" for i in range(2)]
        for part, f in zip(parts, files):
            save_file({n: tensors[n] for n in part}, str(d / f), metadata={"format": "pt"})
        index = {"metadata": {"total_size": 0}, "weight_map": {n: f for part, f in zip(parts, files) for n in part}}
        (d / sio.INDEX_FILE).write_text(json.dumps(index))
    else:
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    if extra_files:
        (d / "config.json").write_text(json.dumps({"model_type": "toy", "torch_dtype": "float32"}))
        (d / "tokenizer.json").write_text('{"version": "1.0"}')
        (d / "tokenizer_config.json").write_text('{"model_max_length": 64}')


def _tree_hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    gen = torch.Generator().manual_seed(20261101)
    base = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    base[INT_BUFFER] = torch.arange(13, dtype=torch.int64).reshape(1, 13)
    _save_model(root / "base", base, extra_files=True)
    models = []
    for i in range(N):
        m = {n: t + 0.05 * torch.randn(t.shape, generator=gen) for n, t in base.items() if t.is_floating_point()}
        m[INT_BUFFER] = base[INT_BUFFER] + 100 * (i + 1)  # differs: the base's must be copied
        _save_model(root / f"ft{i}", m, sharded=(i == SHARDED))
        models.append(m)
    # Broken variants of ft0 for the error tests.
    bad_shape = dict(models[0])
    bad_shape["model.layers.0.self_attn.q_proj.weight"] = torch.randn(17, 23, generator=gen)
    _save_model(root / "bad_shape", bad_shape)
    missing = {n: t for n, t in models[0].items() if n != "model.layers.0.mlp.down_proj.bias"}
    _save_model(root / "missing", missing)
    return {"root": root, "base": base, "models": models, "paths": [root / f"ft{i}" for i in range(N)],
            "base_path": root / "base", "hashes": _tree_hashes(root)}


def _inputs_unchanged(ckpt) -> None:
    assert _tree_hashes(ckpt["root"]) == ckpt["hashes"], "an input file changed"


def _yaml(ckpt, method: str, model_params=None, parameters=None, extra: str = "", list_base: bool = True,
          paths=None) -> str:
    lines = [f"merge_method: {method}", f"base_model: {ckpt['base_path']}", "models:"]
    if list_base:
        lines.append(f"  - model: {ckpt['base_path']}")
    for i, p in enumerate(paths or ckpt["paths"]):
        lines.append(f"  - model: {p}")
        if model_params and model_params[i]:
            lines.append(f"    parameters: {json.dumps(model_params[i])}")
    if parameters:
        lines.append(f"parameters: {json.dumps(parameters)}")
    return "\n".join(lines) + "\n" + extra


def _write(tmp_path: Path, text: str, name: str = "merge.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _load_output(out: Path) -> dict:
    index = out / sio.INDEX_FILE
    if not index.exists():
        return load_file(str(out / "model.safetensors"))
    idx = json.loads(index.read_text())
    tensors = {}
    for f in sorted(set(idx["weight_map"].values())):
        part = load_file(str(out / f))
        assert all(idx["weight_map"][n] == f for n in part)
        tensors.update(part)
    assert set(tensors) == set(idx["weight_map"])
    assert idx["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    return tensors


# ------------------------------------------------------------------------------------------------
# Methods: config -> the in-memory call that must give the same bits
# ------------------------------------------------------------------------------------------------

def _ta_weight0(name):  # models[0]'s filtered weight
    return 0.7 if "mlp" in name else 0.2


CASES = {
    # method: (per-model parameters, top-level parameters, extra YAML, expected kwargs for tensor `name`)
    "task_arithmetic": (
        [{"weight": [{"filter": "mlp", "value": 0.7}, {"value": 0.2}]}, {"weight": 0.3}, {"weight": 0.8}],
        {"lambda": 0.9}, "",
        lambda n: dict(method="task_arithmetic", coeffs=[_ta_weight0(n), 0.3, 0.8], lam=0.9)),
    "ties": (
        [{"weight": 1.0, "density": 0.5}, {"weight": 0.6, "density": 0.7}, {"weight": 0.8, "density": 0.3}],
        None, "",
        lambda n: dict(method="ties", coeffs=[1.0, 0.6, 0.8], density=[0.5, 0.7, 0.3], normalize=True)),
    "dare_ties": (
        [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.8}],
        {"density": 0.6}, "seed: 1234\n",
        lambda n: dict(method="dare_ties", coeffs=[0.5, 0.3, 0.8], density=0.6, seed=1234, name=n, normalize=False)),
    "breadcrumbs": (
        [{"density": 0.8}, {"density": 0.7}, {"density": 0.9}],
        {"weight": 1.0, "gamma": 0.05}, "",
        lambda n: dict(method="breadcrumbs", coeffs=[1.0, 1.0, 1.0], density=[0.8, 0.7, 0.9], gamma=0.05)),
    "model_stock": (None, None, "", lambda n: dict(method="model_stock")),
    "consensus": (
        None, {"weight": 1.0, "k": 2, "tall_lambda": 0.5, "lambda": 0.8}, "",
        lambda n: dict(method="consensus", coeffs=[1.0, 1.0, 1.0], lam=0.8, k=2, tall_lambda=0.5)),
    # API only: mergekit's normalize for a method without election, DELLA, linear.
    "dare_linear": (
        [{"weight": 1.0}, {"weight": 2.0}, {"weight": 1.0}],
        {"density": 0.7, "normalize": True}, "seed: 5\n",
        lambda n: dict(method="dare_linear", coeffs=[0.25, 0.5, 0.25], density=0.7, seed=5, name=n)),
    "della": (
        [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.7}],
        {"density": 0.5, "epsilon": 0.1, "lambda": 1.1}, "",
        lambda n: dict(method="della", coeffs=[1.0, 0.5, 0.7], density=0.5, epsilon=0.1, lam=1.1, name=n,
                       normalize=True)),
}
CLI_METHODS = ["task_arithmetic", "ties", "dare_ties", "breadcrumbs", "model_stock", "consensus"]


def _expected(ckpt, method: str, out_dtype=None) -> dict:
    expect = CASES[method][3]
    out = {}
    for n in FLOATS:
        ft = [m[n] for m in ckpt["models"]]
        out[n] = pyops.merge_from_models(ckpt["base"][n], ft, out_dtype=out_dtype, **expect(n))
    out[INT_BUFFER] = ckpt["base"][INT_BUFFER]
    return out


def _assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for n in want:
        assert got[n].dtype == want[n].dtype and got[n].shape == want[n].shape, n
        assert torch.equal(got[n], want[n]), f"tensor {n!r} differs from the in-memory merge"


def _config_text(ckpt, method: str) -> str:
    model_params, parameters, extra, _ = CASES[method]
    return _yaml(ckpt, method, model_params, parameters, extra)


def _leftovers(tmp_path: Path, keep=("merge.yaml",)) -> list:
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in keep)


# ------------------------------------------------------------------------------------------------
# The real `python -m pyops merge` (a subprocess started before the first test, checked last)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def subprocess_runs(ckpt, tmp_path_factory):
    """Started before the first test of the module so that their imports overlap the other tests."""
    d = tmp_path_factory.mktemp("cli")
    good = _write(d, _config_text(ckpt, "dare_ties") + "dtype: bfloat16\n", "good.yaml")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    ta = _write(d, _config_text(ckpt, "task_arithmetic"), "ta.yaml")
    stock = _write(d, _config_text(ckpt, "model_stock"), "stock.yaml")
    cmds = {"good": [sys.executable, "-m", "pyops", "merge", str(good), "--out", str(d / "out"),
                     "--shard-size", "1KB", "--threads", "1"],
            # -X importtime lists every module imported, on stderr
            "ta": [sys.executable, "-X", "importtime", "-m", "pyops", "merge", str(ta), "--out", str(d / "out-ta"),
                   "--no-progress"],
            "stock": [sys.executable, "-m", "pyops", "merge", str(stock), "--out", str(d / "out-stock"),
                      "--no-progress"]}
    procs = {k: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for k, c in cmds.items()}
    yield {"dir": d, "procs": procs, "good": good, "ta": ta, "stock": stock}
    for proc in procs.values():  # not collected when only some tests ran
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


# ------------------------------------------------------------------------------------------------
# Every method, through the CLI entry point and the API
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", CLI_METHODS)
def test_cli_matches_in_memory_merge(ckpt, tmp_path, method, capsys):
    cfg = _write(tmp_path, _config_text(ckpt, method))
    rc = cli_main(["merge", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"merged {len(FLOATS)} tensors ({method}" in captured.out
    got = _load_output(tmp_path / "out")
    _assert_same(got, _expected(ckpt, method))
    assert (tmp_path / "out" / "model.safetensors").exists() and not (tmp_path / "out" / sio.INDEX_FILE).exists()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / f).read_bytes() == (ckpt["base_path"] / f).read_bytes()
    # config.json as transformers 5 saves a float32 model: "dtype", no "torch_dtype"
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {"model_type": "toy", "dtype": "float32"}
    assert (tmp_path / "out" / "pyops_merge.yaml").read_text() == cfg.read_text()
    assert _leftovers(tmp_path) == ["out"]
    _inputs_unchanged(ckpt)


@pytest.mark.parametrize("method", list(CASES))
def test_api_matches_in_memory_merge(ckpt, tmp_path, method):
    report = run_merge(_write(tmp_path, _config_text(ckpt, method)), tmp_path / "out", progress=False)
    _assert_same(_load_output(tmp_path / "out"), _expected(ckpt, method))
    assert report.merged == len(FLOATS) and report.copied == [INT_BUFFER] and report.shards == 1
    assert report.bytes_read > 0 and report.peak_rss >= report.rss_before > 0
    assert sum(report.backends.values()) == len(FLOATS)
    _inputs_unchanged(ckpt)


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_ties", "della", "model_stock"])
def test_stream_runs_the_kernels_without_the_op_dispatcher(ckpt, tmp_path, method):
    """The streaming merge calls the C++ kernels directly (`pyops._backend.direct_kernels`): the
    first call of a torch.library op imports torch._dynamo (a large import for a one-shot command),
    and a fresh process merging a model never loads it. The tensors are those of the in-memory merge."""
    cfg = _write(tmp_path, _config_text(ckpt, method))
    code = ("import sys; from pyops.merging import run_merge; "
            f"r = run_merge({str(cfg)!r}, {str(tmp_path / 'out')!r}, progress=False); "
            "print(dict(r.backends), 'torch._dynamo' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == f"{{'cpu': {len(FLOATS)}}} False"
    _assert_same(_load_output(tmp_path / "out"), _expected(ckpt, method))


# ---- the native engine (no torch) and the torch engine ------------------------------------------

def _with_parameters(text: str, extra: dict) -> str:
    """The config with `extra` merged into its top-level parameters."""
    import yaml
    cfg = yaml.safe_load(text)
    cfg["parameters"] = {**(cfg.get("parameters") or {}), **extra}
    return yaml.safe_dump(cfg)


ENGINE_CASES = {m: (lambda c, m=m: _config_text(c, m)) for m in CASES if m != "model_stock"}
ENGINE_CASES.update({
    "ties-rows-bf16-out": lambda c: _with_parameters(_config_text(c, "ties"), {"blocks": "rows"}) + "dtype: bfloat16\n",
    "della-blocks-7-fp16-out": lambda c: _with_parameters(_config_text(c, "della"), {"blocks": 7}) + "dtype: float16\n",
    "linear": lambda c: "merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {p}\n    parameters: {{weight: {w}}}\n" for p, w in zip(c["paths"], (1.0, 2.0, 1.0))),
})


@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_native_engine_writes_the_torch_engines_bytes(ckpt, tmp_path, monkeypatch, case):
    """A CPU merge runs on the native engine (the C++ kernels on raw memory, no torch); forcing the
    torch engine (pyops.merge_from_models) must give the same files, byte for byte."""
    cfg = _write(tmp_path, ENGINE_CASES[case](ckpt))
    native = run_merge(cfg, tmp_path / "native", shard_size="1KB", progress=False)
    monkeypatch.setenv("PYOPS_MERGE_ENGINE", "torch")
    via_torch = run_merge(cfg, tmp_path / "torch", shard_size="1KB", progress=False)
    assert (native.engine, via_torch.engine) == ("native", "torch")
    assert native.backends == via_torch.backends == {"cpu": len(FLOATS)}
    assert _tree_hashes(tmp_path / "native") == _tree_hashes(tmp_path / "torch")
    _inputs_unchanged(ckpt)


def test_native_engine_half_precision_checkpoints(tmp_path):
    """bfloat16 / float16 inputs (the kernels' other input dtypes) merge to the in-memory result."""
    gen = torch.Generator().manual_seed(7)
    shapes = {"w": (33, 9), "b": (13,)}
    for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        base = {n: torch.randn(s, generator=gen).to(dtype) for n, s in shapes.items()}
        models = [{n: (t.float() + 0.05 * torch.randn(t.shape, generator=gen)).to(dtype) for n, t in base.items()}
                  for _ in range(2)]
        _save_model(tmp_path / tag / "base", base)
        for i, m in enumerate(models):
            _save_model(tmp_path / tag / f"m{i}", m)
        text = (f"merge_method: dare_ties\nbase_model: {tmp_path / tag / 'base'}\nseed: 3\nmodels:\n" + "".join(
            f"  - model: {tmp_path / tag / f'm{i}'}\n    parameters: {{weight: {w}, density: 0.5}}\n"
            for i, w in enumerate((0.6, 0.9))))
        report = run_merge(_write(tmp_path, text, f"{tag}.yaml"), tmp_path / f"out-{tag}", progress=False)
        assert report.engine == "native"
        got = load_file(str(tmp_path / f"out-{tag}" / "model.safetensors"))
        for n in shapes:
            want = pyops.merge_from_models(base[n], [m[n] for m in models], method="dare_ties", coeffs=[0.6, 0.9],
                                           density=0.5, seed=3, name=n, normalize=False)
            assert got[n].dtype == dtype and torch.equal(got[n], want), (tag, n)


def test_merges_the_native_engine_cannot_run_go_to_torch(ckpt, tmp_path):
    """model_stock (a Gram pass first), another backend, and a model stored in another dtype (converted
    by torch, as mergekit does) run on the torch engine, with the same results as in memory."""
    report = run_merge(_write(tmp_path, _config_text(ckpt, "model_stock")), tmp_path / "stock", progress=False)
    assert report.engine == "torch"
    _assert_same(_load_output(tmp_path / "stock"), _expected(ckpt, "model_stock"))
    report = run_merge(_write(tmp_path, _config_text(ckpt, "ties"), "ref.yaml"), tmp_path / "ref",
                       backend="reference", progress=False)
    assert report.engine == "torch" and report.backends == {"reference": len(FLOATS)}
    half = {n: t.half() if t.is_floating_point() else t for n, t in ckpt["models"][2].items()}
    _save_model(tmp_path / "ft2-half", half)
    text = _yaml(ckpt, "ties", CASES["ties"][0], paths=[*ckpt["paths"][:2], tmp_path / "ft2-half"])
    report = run_merge(_write(tmp_path, text, "mixed.yaml"), tmp_path / "mixed", progress=False)
    assert report.engine == "torch" and any("merged in their promoted dtype" in n and "F32 (F16 + F32)" in n
                                            for n in report.notes)


class _CountingEngine:
    def __init__(self):
        self.allocated = []

    def alloc(self, nbytes):
        self.allocated.append(nbytes)
        return bytearray(nbytes)

    @staticmethod
    def size(buf):
        return len(buf)


def test_byte_pool_keeps_the_recently_used_sizes():
    """Two big buffers idle since the first tensor must not keep every later size out of the pool:
    the least recently released idle buffers are dropped first."""
    from pyops.merging.runner import _BytePool
    eng = _CountingEngine()
    pool = _BytePool(max_idle=100, engine=eng)
    big = [pool.acquire(45), pool.acquire(45)]
    for b in big:
        pool.release(b)
    for _ in range(10):  # the layers: two sizes, one buffer each in flight
        a, b = pool.acquire(30), pool.acquire(20)
        pool.release(a)
        pool.release(b)
    assert eng.allocated == [45, 45, 30, 20]
    pool.release(bytearray(101))  # larger than the cap: not kept
    assert pool.acquire(101) is not None and eng.allocated[-1] == 101


def test_direct_kernels_is_per_thread_and_restores():
    from pyops import _backend
    import threading
    assert not _backend.direct()
    seen = []
    with _backend.direct_kernels():
        assert _backend.direct()
        t = threading.Thread(target=lambda: seen.append(_backend.direct()))
        t.start()
        t.join()
        with _backend.direct_kernels():
            assert _backend.direct()
        assert _backend.direct()
    assert not _backend.direct() and seen == [False]


def test_api_dict_config_sharded_output(ckpt, tmp_path):
    """A dict config, a tiny shard size: an index JSON and the same tensors as one file."""
    import yaml

    cfg = yaml.safe_load(_config_text(ckpt, "ties"))
    run_merge(cfg, tmp_path / "one", progress=False)
    report = run_merge(cfg, tmp_path / "sharded", shard_size=600, progress=False)
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert report.shards == len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "sharded" / sio.INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(FLOATS) | {INT_BUFFER}
    assert set(index["weight_map"].values()) == set(files)
    one, sharded = _load_output(tmp_path / "one"), _load_output(tmp_path / "sharded")
    _assert_same(sharded, one)
    _assert_same(one, _expected(ckpt, "ties"))


def test_linear_is_the_weighted_average(ckpt, tmp_path):
    text = ("merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {p}\n    parameters: {{weight: {w}}}\n" for p, w in zip(ckpt["paths"], (1.0, 2.0, 1.0))))
    run_merge(_write(tmp_path, text), tmp_path / "out", progress=False)
    got = _load_output(tmp_path / "out")
    for n in FLOATS:
        avg = sum(w * m[n] for w, m in zip((1.0, 2.0, 1.0), ckpt["models"])) / 4.0
        torch.testing.assert_close(got[n], avg, rtol=1e-6, atol=1e-6)
    # No base_model: the first model supplies the non-floating tensors.
    assert torch.equal(got[INT_BUFFER], ckpt["models"][0][INT_BUFFER])


def test_dare_merge_is_deterministic(ckpt, tmp_path):
    cfg = _write(tmp_path, _config_text(ckpt, "dare_ties"))
    run_merge(cfg, tmp_path / "a", shard_size="1KB", progress=False)
    run_merge(cfg, tmp_path / "b", shard_size="1KB", progress=False, prefetch=False, threads=1)
    a, b = _tree_hashes(tmp_path / "a"), _tree_hashes(tmp_path / "b")
    assert a == b and len(a) > 3
    run_merge(_write(tmp_path, _config_text(ckpt, "dare_ties").replace("seed: 1234", "seed: 99"), "other.yaml"),
              tmp_path / "c", shard_size="1KB", progress=False)
    assert _tree_hashes(tmp_path / "c") != a  # the seed is part of the key


def test_overwrite_replaces_only_when_complete(ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    cfg = _write(tmp_path, _config_text(ckpt, "ties"))
    with pytest.raises(MergeError, match="already exists.*--overwrite"):
        run_merge(cfg, out, progress=False)
    assert (out / "keep.txt").read_text() == "old" and _leftovers(tmp_path) == ["out"]
    assert cli_main(["merge", str(cfg), "--out", str(out), "--no-progress"]) == 2
    run_merge(cfg, out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and _leftovers(tmp_path) == ["out"]
    _assert_same(_load_output(out), _expected(ckpt, "ties"))


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error, nothing written, inputs untouched
# ------------------------------------------------------------------------------------------------

def _bad(ckpt, **kw):
    model_params = kw.pop("model_params", [{"weight": 1.0}] * N)
    return _yaml(ckpt, kw.pop("method", "ties"), model_params, kw.pop("parameters", None), **kw)


BAD = {
    "unknown method": (lambda c: f"base_model: {c['base_path']}\nmodels:\n  - model: {c['paths'][0]}\n"
                                 f"merge_method: lrp\n",
                       ConfigError, r"line 4, column 1: merge_method: unknown method 'lrp' \(a mergekit method that "
                                    r"pyops does not implement\)"),
    "density 1.5": (lambda c: _bad(c, model_params=[{"weight": 1.0}, {"weight": 1.0, "density": 1.5}, {"weight": 1.0}]),
                    ConfigError, r"line 8, column \d+: models\[2\]\.parameters\.density: density must be in \(0, 1\], got 1.5"),
    "shape mismatch": (lambda c: _bad(c, paths=[c["paths"][0], c["root"] / "bad_shape", c["paths"][2]]),
                       CheckpointError, r"'model.layers.0.self_attn.q_proj.weight' has shape \[17, 23\] in models\[2\] "
                                        r"\(.*bad_shape\)"),
    "missing tensor": (lambda c: _bad(c, paths=[c["root"] / "missing", c["paths"][1], c["paths"][2]]),
                       CheckpointError, r"'model.layers.0.mlp.down_proj.bias' is missing from models\[1\]"),
    "malformed yaml": (lambda c: f"merge_method: ties\nbase_model: {c['base_path']}\nmodels:\n  - model: [oops\n",
                       ConfigError, r"line \d+, column \d+: invalid YAML"),
    "unknown key": (lambda c: _bad(c) + "merge_methd: ties\n", ConfigError,
                    r"line 11, column 1: merge_methd: unknown key"),
    "unknown parameter": (lambda c: _bad(c, parameters={"densty": 0.5}), ConfigError,
                          r"line 11, column \d+: parameters\.densty: unknown parameter"),
    "gradient without a layer count": (
        lambda c: _bad(c, model_params=[{"weight": [0.1, 0.5, 1.0]}, {"weight": 1}, {"weight": 1}]), ConfigError,
        r"line 6, column \d+: models\[1\]\.parameters\.weight: a gradient applies to tensor "
        r"'model\.layers\.0\.[a-z_.]+' \(layer 0\), but .*config\.json has no num_hidden_layers"),
    "dare without rescale": (lambda c: _bad(c, method="dare_ties", parameters={"rescale": False}), ConfigError,
                             r"parameters\.rescale: rescale: false is not supported.*1/density"),
    "per-model lambda": (lambda c: _bad(c, model_params=[{"weight": 1.0, "lambda": 1.1}] * N), ConfigError,
                         r"line 6, column \d+: models\[1\]\.parameters\.lambda: lambda is a merge-wide parameter: "
                         r"set it in the top-level parameters \(mergekit ignores a per-model lambda\)"),
    "no weight": (lambda c: _bad(c, model_params=[{"density": 0.5}] * N), ConfigError,
                  r"models\[1\]: no weight"),
    "missing model dir": (lambda c: _bad(c, paths=[c["root"] / "nope", c["paths"][1], c["paths"][2]]), ConfigError,
                          r"line 5, column \d+: models\[1\]\.model: .*does not exist"),
    "bad dtype": (lambda c: _bad(c) + "dtype: float8\n", ConfigError, r"line 11, column \d+: dtype: expected one of"),
    "block size beyond int64": (lambda c: _bad(c, parameters={"blocks": 2**70}), ConfigError,
                                r"parameters\.blocks: expected null, 'rows' or an int in \[1, 2\*\*63\)"),
    # YAML that must not run code, expand without end or recurse: refused like any invalid YAML.
    "yaml python tag": (lambda c: _bad(c) + "chat_template: !!python/object/apply:os.system [echo hi]\n", ConfigError,
                        r"line 11, column \d+: chat_template: the YAML tag '.*python/object/apply:os.system' is not "
                        r"supported"),
    "yaml set tag": (lambda c: _bad(c) + "parameters: !!set {normalize}\n", ConfigError,
                     r"parameters: the YAML tag 'tag:yaml.org,2002:set' is not supported"),
    "yaml alias bomb": (lambda c: _bad(c) + "chat_template: [&a0 [x, x, x, x, x, x, x, x, x, x], " + ", ".join(
        f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)) + "]\n", ConfigError,
                        r"invalid YAML: the document expands to more than 100000 values"),
    "yaml recursive alias": (lambda c: _bad(c) + "chat_template: &loop [*loop]\n", ConfigError,
                             r"line 11, column \d+: invalid YAML: a recursive alias"),
    "yaml nested 5000 deep": (lambda c: _bad(c) + "chat_template: " + "[" * 5000 + "]" * 5000 + "\n", ConfigError,
                              r"line 11, column \d+: invalid YAML: collections nested more than 32 levels deep"),
    "yaml aliases nested 800 deep": (lambda c: _bad(c) + "chat_template: [&a0 " + "[" * 20 + "]" * 20 + "".join(
        f", &a{i} " + "[" * 20 + f"*a{i - 1}" + "]" * 20 for i in range(1, 40)) + "]\n", ConfigError,
                                     r"line 11, column \d+: invalid YAML: collections nested more than 32 levels deep"),
    "yaml impossible date": (lambda c: _bad(c) + "seed: 2001-13-45\n", ConfigError,
                             r"line 11, column \d+: seed: invalid YAML: .*timestamp '2001-13-45' cannot be read"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_leaves_nothing(ckpt, tmp_path, case):
    make, exc, pattern = BAD[case]
    cfg = _write(tmp_path, make(ckpt))
    with pytest.raises(exc, match=pattern):
        run_merge(cfg, tmp_path / "out", progress=False)
    assert _leftovers(tmp_path) == []
    _inputs_unchanged(ckpt)


@pytest.mark.parametrize("case", ["unknown method", "density 1.5", "shape mismatch", "malformed yaml",
                                  "yaml alias bomb", "yaml impossible date"])
def test_bad_input_cli_exit_code(ckpt, tmp_path, capsys, case):
    make, _, pattern = BAD[case]
    cfg = _write(tmp_path, make(ckpt))
    assert cli_main(["merge", str(cfg), "--out", str(tmp_path / "out" / "nested")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyops merge: error:") and re.search(pattern, err)
    assert _leftovers(tmp_path) == []
    _inputs_unchanged(ckpt)


def test_output_overlapping_an_input_is_refused(ckpt, tmp_path):
    cfg = _write(tmp_path, _config_text(ckpt, "ties"))
    for out in (ckpt["paths"][0], ckpt["root"], ckpt["paths"][0] / "sub"):
        with pytest.raises(MergeError, match="overlaps the input"):
            run_merge(cfg, out, overwrite=True, progress=False)
    _inputs_unchanged(ckpt)


def test_per_model_gamma_must_agree(ckpt, tmp_path):
    cfg = _write(tmp_path, _bad(ckpt, method="breadcrumbs", model_params=[
        {"weight": 1, "gamma": 0.01}, {"weight": 1, "gamma": 0.02}, {"weight": 1}]))
    with pytest.raises(ConfigError, match="'gamma' differs between models"):
        run_merge(cfg, tmp_path / "out", progress=False)
    assert _leftovers(tmp_path) == []


def test_notes(ckpt):
    cfg = load_config(_bad(ckpt, parameters={"int8_mask": True, "gamma": 0.1}))
    assert any("int8_mask is ignored" in n for n in cfg.notes)
    assert any("gamma is not used by ties (ignored; set in parameters)" in n for n in cfg.notes)


# ------------------------------------------------------------------------------------------------
# Interrupted merges
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_merge_leaves_nothing(ckpt, tmp_path, monkeypatch, error):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")  # with --overwrite, the old output must survive a failure
    cfg = _write(tmp_path, _config_text(ckpt, "dare_ties"))
    calls = {"n": 0}
    original = sio.ShardWriter.write_tensor

    def failing(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:  # after at least one complete shard
            raise error("simulated failure")
        return original(self, name, tensor)

    monkeypatch.setattr(sio.ShardWriter, "write_tensor", failing)
    with pytest.raises(error, match="simulated"):
        run_merge(cfg, out, overwrite=True, shard_size="1KB", progress=False)
    assert calls["n"] == 5
    assert _leftovers(tmp_path) == ["out"] and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    _inputs_unchanged(ckpt)


# ------------------------------------------------------------------------------------------------
# The real subprocesses' results (last, so that they had the whole module to run)
# ------------------------------------------------------------------------------------------------

def _finish(proc) -> tuple:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_cli_subprocess_merge(ckpt, subprocess_runs, tmp_path):
    rc, out, err = _finish(subprocess_runs["procs"]["good"])
    assert rc == 0, err
    assert "merged 6 tensors" in out and "copied 1" in out and "GB/s" in out and "peak RSS" in out
    assert INT_BUFFER in out
    d = subprocess_runs["dir"]
    got = _load_output(d / "out")
    _assert_same(got, _expected(ckpt, "dare_ties", out_dtype=torch.bfloat16))
    assert len(list((d / "out").glob("model-*-of-*.safetensors"))) > 1
    conf = json.loads((d / "out" / "config.json").read_text())
    assert conf["dtype"] == "bfloat16" and "torch_dtype" not in conf
    # The same merge through the API gives the same bytes, file for file.
    run_merge(subprocess_runs["good"], tmp_path / "api", shard_size="1KB", progress=False)
    assert _tree_hashes(tmp_path / "api") == _tree_hashes(d / "out")
    assert sorted(p.name for p in d.iterdir() if p.name.startswith(("good", "out."))) == ["good.yaml"]
    _inputs_unchanged(ckpt)


def test_cli_subprocess_cpu_merge_never_imports_torch(ckpt, subprocess_runs):
    """`python -m pyops merge` on the native engine: pyops' API (and torch) is never imported."""
    rc, out, err = _finish(subprocess_runs["procs"]["ta"])
    assert rc == 0, err[-3000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in err.splitlines() if line.startswith("import time:")}
    assert "pyops.merging.native_engine" in imported and f"backends: cpu ({len(FLOATS)} tensors); native engine" in out
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}, "torch was imported"
    _assert_same(_load_output(subprocess_runs["dir"] / "out-ta"), _expected(ckpt, "task_arithmetic"))


def test_cli_subprocess_torch_engine_loads_the_api_on_demand(ckpt, subprocess_runs):
    """model_stock needs the torch engine: the API that `python -m pyops merge` did not import at
    start is imported when the merge asks for it."""
    rc, out, err = _finish(subprocess_runs["procs"]["stock"])
    assert rc == 0, err[-3000:]
    assert "merged 6 tensors (model_stock" in out and "; torch engine" in out
    _assert_same(_load_output(subprocess_runs["dir"] / "out-stock"), _expected(ckpt, "model_stock"))


# ---- the output writer and the input mappings ------------------------------------------------

def _odd_entries():
    """Sizes that leave the data's end off any 4096-byte boundary (and one empty tensor)."""
    g = torch.Generator().manual_seed(3)
    return {"a": torch.randn(3, 5, generator=g).half(), "empty": torch.empty(0, 4),
            "b": torch.randn(70001, generator=g), "c": torch.randn(2, 3, generator=g).bfloat16()}


WRITER_MODES = {"o_direct": ("1", None), "page-cache": ("0", None),
                # small staging buffers: each tensor spans several stage switches (one stage filled
                # while the other is on its way to the disk)
                "o_direct-stage4KiB": ("1", 1), "o_direct-stage12KiB": ("1", 3), "o_direct-stage256KiB": ("1", 64)}


@pytest.mark.parametrize("mode", list(WRITER_MODES))
def test_shard_writer_output_loads_exactly(tmp_path, monkeypatch, mode):
    direct, stage_blocks = WRITER_MODES[mode]
    monkeypatch.setenv("PYOPS_MERGE_DIRECT_IO", direct)
    if stage_blocks is not None:
        monkeypatch.setattr(sio, "_STAGING_BYTES", stage_blocks * 4096)
    tensors = _odd_entries()
    tensors["d"] = torch.arange(300_001, dtype=torch.float32)
    entries = [sio.OutEntry(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    w = sio.ShardWriter(tmp_path / "x.safetensors", entries)
    for n, t in tensors.items():
        w.write_tensor(n, t)
    w.close()
    got = load_file(tmp_path / "x.safetensors")
    assert set(got) == set(tensors)
    for n, t in tensors.items():
        assert got[n].dtype == t.dtype and torch.equal(got[n], t), n
    header_len = int.from_bytes((tmp_path / "x.safetensors").read_bytes()[:8], "little")
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    assert (tmp_path / "x.safetensors").stat().st_size == 8 + header_len + data  # no padding after the data


def test_shard_writer_disk_error_surfaces_and_aborts(tmp_path, monkeypatch):
    """A write error on the disk thread is raised to the writer (not lost), and abort closes up."""
    monkeypatch.setenv("PYOPS_MERGE_DIRECT_IO", "1")
    monkeypatch.setattr(sio, "_STAGING_BYTES", 4096)
    t = torch.arange(10_000, dtype=torch.float32)
    w = sio.ShardWriter(tmp_path / "x.safetensors", [sio.OutEntry("t", t.dtype, tuple(t.shape))])
    if w._direct is None:
        pytest.skip("this file system has no O_DIRECT")

    def failing(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sio.os, "write", failing)
    with pytest.raises(OSError, match="No space left"):
        w.write_tensor("t", t)
        w.close()
    w.abort()
    assert w._direct.fd == -1


def test_shard_writer_refuses_an_existing_file(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        sio.ShardWriter(tmp_path / "x.safetensors", [sio.OutEntry("a", torch.float32, (2,))])
    assert (tmp_path / "x.safetensors").read_bytes() == b"keep"


def test_mapped_tensor_matches_read_and_never_writes_the_file(tmp_path):
    tensors = _odd_entries()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    before = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    c = sio.Checkpoint(tmp_path, "m")
    try:
        for n, t in tensors.items():
            m = c.map(n)
            assert m.dtype == t.dtype and tuple(m.shape) == tuple(t.shape)
            assert torch.equal(m, c.read(n)) and torch.equal(m, t), n
            if m.numel():
                m.zero_()  # a private copy-on-write page: the file keeps its bytes
    finally:
        c.close()
    assert hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest() == before


def test_read_path_gives_the_same_merge_as_mapped_inputs(ckpt, tmp_path, monkeypatch):
    cfg = _write(tmp_path, _config_text(ckpt, "ties"))
    run_merge(cfg, tmp_path / "mapped", progress=False)
    monkeypatch.setenv("PYOPS_MERGE_MAP", "0")
    run_merge(cfg, tmp_path / "read", progress=False)
    a, b = _load_output(tmp_path / "mapped"), _load_output(tmp_path / "read")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fn", [pyops.merge, pyops.merge_from_models], ids=lambda f: f.__name__)
def test_merge_defaults_table_matches_the_signatures(fn):
    """The native engine fills absent parameters from merge_params.MERGE_DEFAULTS: the same values
    as pyops.merge's own defaults."""
    import inspect
    from pyops.merging.spec import MERGE_DEFAULTS
    params = inspect.signature(fn).parameters
    assert {k: params[k].default for k in MERGE_DEFAULTS} == MERGE_DEFAULTS


# ------------------------------------------------------------------------------------------------
# Files the safetensors format forbids: exit 2, one line naming the file and the tensor
# ------------------------------------------------------------------------------------------------

def _raw_file(path: Path, header, data: bytes, *, text: str = None, length: int = None) -> Path:
    """A safetensors file written byte by byte: `header` as JSON (or `text` as is), an 8-byte length
    (the header's, or `length`), then `data`."""
    raw = (text if text is not None else json.dumps(header)).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((len(raw) if length is None else length).to_bytes(8, "little") + raw + data)
    return path


def _f32(shape, offsets) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": offsets}


_W = '"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
# case: (header, data bytes, extra _raw_file arguments, the message after "<file>: ", whether the
# safetensors library refuses the file too)
MALFORMED = {
    "data_offsets-strings": ({"w": _f32([2], ["0", "8"])}, 8, {}, r"tensor 'w': data_offsets \['0', '8'\]", True),
    "data_offsets-floats": ({"w": _f32([2], [0.0, 8.0])}, 8, {}, r"tensor 'w': data_offsets \[0\.0, 8\.0\]", True),
    "data_offsets-bools": ({"w": _f32([1], [False, True])}, 4, {}, r"tensor 'w': data_offsets \[False, True\]", True),
    "data_offsets-negative": ({"w": _f32([2], [-8, 0])}, 8, {}, r"tensor 'w': data_offsets \[-8, 0\]", True),
    "data_offsets-three-values": ({"w": _f32([2], [0, 8, 8])}, 8, {}, r"tensor 'w': data_offsets \[0, 8, 8\]", True),
    "data_offsets-end-before-start": ({"w": _f32([0], [8, 0])}, 8, {}, r"tensor 'w': .* ends before it begins",
                                      True),
    "data_offsets-beyond-the-file": ({"w": _f32([2], [0, 8])}, 4, {}, r"tensor 'w': .* reach beyond the file's 4 "
                                                                       r"data bytes", True),
    "ranges-overlap": ({"w": _f32([2], [0, 8]), "v": _f32([1], [4, 8])}, 8, {},
                       r"tensor 'v': bytes \[4, 8\) overlap tensor 'w'", True),
    "ranges-leave-a-gap": ({"w": _f32([2], [4, 12])}, 12, {}, r"tensor 'w': begins at byte 4, leaving bytes \[0, 4\)",
                           True),
    "bytes-after-the-last-tensor": ({"w": _f32([2], [0, 8])}, 12, {}, r"the last 4 bytes after tensor 'w' are in no "
                                                                       r"tensor", True),
    "shape-float": ({"w": _f32([16.7], [0, 64])}, 64, {}, r"tensor 'w': shape \[16\.7\] is not a list of integers",
                    True),
    "shape-bool": ({"w": _f32([True, True], [0, 4])}, 4, {}, r"tensor 'w': shape \[True, True\]", True),
    "shape-negative": ({"w": _f32([-2], [0, 8])}, 8, {}, r"tensor 'w': shape \[-2\]", True),
    "shape-string": ({"w": _f32(["2"], [0, 8])}, 8, {}, r"tensor 'w': shape \['2'\]", True),
    "shape-does-not-match-the-range": ({"w": _f32([3], [0, 8])}, 8, {}, r"tensor 'w': F32 \[3\] is 12 bytes but "
                                                                         r"data_offsets \[0, 8\] hold 8", True),
    "shape-overflows-64-bits": ({"w": {"dtype": "U8", "shape": [2**32, 2**32, 0], "data_offsets": [0, 0]}}, 0, {},
                                r"tensor 'w': shape .* has more bytes than 64 bits can count", True),
    "dtype-unknown": ({"w": {"dtype": "F31", "shape": [2], "data_offsets": [0, 8]}}, 8, {},
                      r"tensor 'w': dtype 'F31' is not one pyops reads", True),
    "entry-not-an-object": ({"w": [0, 8]}, 8, {}, r"tensor 'w': expected an object", True),
    "entry-without-data_offsets": ({"w": {"dtype": "F32", "shape": [2]}}, 8, {}, r"tensor 'w': has no data_offsets",
                                   True),
    "metadata-not-an-object": ({"__metadata__": ["pt"], "w": _f32([2], [0, 8])}, 8, {},
                               r"its __metadata__ must be an object of strings, got \['pt'\]", True),
    "metadata-non-string-value": ({"__metadata__": {"format": 1}, "w": _f32([2], [0, 8])}, 8, {},
                                  r"its __metadata__ must be an object of strings", True),
    "header-length-beyond-the-file": ({"w": _f32([2], [0, 8])}, 8, {"length": 10_000},
                                      r"not a safetensors file \(header length 10000 does not fit", True),
    "header-not-an-object": (None, 0, {"text": "[1, 2]"}, r"its header is a JSON list, not an object", True),
    "header-not-json": (None, 8, {"text": "{w: 1}"}, r"its header is not JSON", True),
    "header-nan": (None, 8, {"text": '{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}'},
                   r"NaN is not JSON", True),
    "header-lone-surrogate": (None, 8, {"text": '{"\\ud800": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'},
                              r"half of a surrogate pair", True),
    "header-nested-200-deep": (None, 8, {"text": '{%s, "x": %s}' % (_W, "[" * 200 + "]" * 200)},
                               r"nests more than 64 levels deep", True),
    # The library keeps the last of two entries of one name; which bytes a name means must not
    # depend on that, so pyops refuses it.
    "duplicate-tensor-name": (None, 8, {"text": "{%s, %s}" % (_W, _W)}, r"the key 'w' appears twice", False),
}


def _malformed_model(root: Path, case: str) -> Path:
    header, nbytes, extra, _, _ = MALFORMED[case]
    return _raw_file(root / "model.safetensors", header, bytes(range(nbytes)), **extra)


def _tiny_base(root: Path) -> Path:
    """A one-tensor base model, `w` F32 [2], beside which a malformed model is merged."""
    save_file({"w": torch.tensor([1.0, 2.0])}, str(root / "model.safetensors"))
    return root


def _tiny_config(tmp_path: Path, base: Path, model: Path) -> Path:
    return _write(tmp_path, f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                            f"  - model: {model}\n    parameters: {{weight: 1.0}}\n")


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_safetensors_exits_2_with_one_line_naming_file_and_tensor(tmp_path, capsys, case):
    (tmp_path / "base").mkdir()
    base = _tiny_base(tmp_path / "base")
    bad = _malformed_model(tmp_path / "bad", case)
    before = bad.read_bytes(), bad.stat().st_mtime_ns
    cfg = _tiny_config(tmp_path, base, bad.parent)
    assert cli_main(["merge", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert re.match(rf"pyops merge: error: {re.escape(str(bad))}: .*{MALFORMED[case][3]}", err), err
    assert (bad.read_bytes(), bad.stat().st_mtime_ns) == before
    assert _leftovers(tmp_path) == ["bad", "base"]


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_safetensors_is_refused_by_the_safetensors_library_too(tmp_path, case):
    """pyops refuses at least every file the format's reference implementation refuses; the
    table's cases are such files (but one that pyops refuses on its own, said so)."""
    from safetensors import safe_open
    path = _malformed_model(tmp_path, case)
    if MALFORMED[case][4]:
        with pytest.raises(Exception):
            with safe_open(str(path), "numpy") as f:
                list(f.keys())
    else:
        with safe_open(str(path), "numpy") as f:
            assert list(f.keys())


VALID_EDGES = {
    # case: (header text, data): files the format allows, which pyops reads like the library
    "empty-tensors-share-an-offset": ('{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, '
                                      '"b": {"dtype": "F16", "shape": [0, 3], "data_offsets": [0, 0]}, %s}' % _W, 8),
    "empty-tensor-at-the-end": ('{%s, "z": {"dtype": "I64", "shape": [0], "data_offsets": [8, 8]}}' % _W, 8),
    "header-padded-with-spaces": ('{%s}' % _W + " " * 13, 8),
    "metadata-null": ('{"__metadata__": null, %s}' % _W, 8),
    "metadata-strings": ('{"__metadata__": {"format": "pt", "note": "é"}, %s}' % _W, 8),
    "entry-with-an-extra-field": ('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": [1, {"y": -0}]}}',
                                  8),
    "entries-out-of-offset-order": ('{"v": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}, %s}' % _W, 12),
    "unicode-name": ('{"\\u00e9\\ud83d\\ude00": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', 8),
    "zero-tensors": ("{}", 0),
}


@pytest.mark.parametrize("case", list(VALID_EDGES))
def test_valid_edge_case_files_read_as_the_library_reads_them(tmp_path, case):
    text, nbytes = VALID_EDGES[case]
    path = _raw_file(tmp_path / "model.safetensors", None, bytes(range(nbytes)), text=text)
    want = load_file(str(path))
    with sio.Checkpoint(tmp_path, "m") as c:
        assert set(c.tensors) == set(want)
        for name, t in want.items():
            got = c.read(name)
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name


MALFORMED_INDEX = {
    "nested-100000-deep": '{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "not-an-object": "[1]",
    "not-utf-8": b'{"weight_map": {"w": "\xff"}}',
}


@pytest.mark.parametrize("case", list(MALFORMED_INDEX))
def test_malformed_index_exits_2_with_one_line_naming_it(tmp_path, capsys, case):
    (tmp_path / "base").mkdir()
    base = _tiny_base(tmp_path / "base")
    (tmp_path / "sharded").mkdir()
    save_file({"w": torch.tensor([1.0, 2.0])}, str(tmp_path / "sharded" / "model-00001-of-00001.safetensors"))
    index = tmp_path / "sharded" / sio.INDEX_FILE
    content = MALFORMED_INDEX[case]
    index.write_bytes(content if isinstance(content, bytes) else content.encode())
    cfg = _tiny_config(tmp_path, base, tmp_path / "sharded")
    assert cli_main(["merge", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert err.startswith(f"pyops merge: error: {index}: not a valid safetensors index")


def test_cli_subprocess_string_data_offsets_exit_2_without_a_traceback(tmp_path):
    """The real `python -m pyops merge` (no in-process exception handling around it)."""
    (tmp_path / "base").mkdir()
    base = _tiny_base(tmp_path / "base")
    bad = _malformed_model(tmp_path / "bad", "data_offsets-strings")
    cfg = _tiny_config(tmp_path, base, bad.parent)
    p = subprocess.run([sys.executable, "-m", "pyops", "merge", str(cfg), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1, p.stderr
    assert re.match(rf"pyops merge: error: {re.escape(str(bad))}: .*tensor 'w': data_offsets", p.stderr)


# ------------------------------------------------------------------------------------------------
# An output that cannot be written: exit 2, one line, nothing left behind
# ------------------------------------------------------------------------------------------------

def _oserror(code: int, filename=None) -> OSError:
    return OSError(code, os.strerror(code), *([os.fspath(filename)] if filename is not None else []))


class _FailingWrites:
    """A file object whose writes fail with `code` (a buffered file on a full disk)."""

    def __init__(self, fh, code: int):
        self._fh, self._code = fh, code

    def write(self, data):
        raise _oserror(self._code)

    def __getattr__(self, name):
        return getattr(self._fh, name)


def _fail_mkdir(monkeypatch, code):
    """Every mkdir fails (the merge creates directories only for its output)."""
    monkeypatch.setattr(os, "mkdir", lambda path, *a, **k: (_ for _ in ()).throw(_oserror(code, path)))


def _fail_shard_create(monkeypatch, code):
    real_open = os.open

    def fake_open(path, flags, *a, **k):
        if flags & os.O_CREAT and os.fspath(path).endswith(".safetensors"):
            raise _oserror(code, path)
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", fake_open)  # O_DIRECT
    _patch_writing_open(monkeypatch, lambda path, mode: (_ for _ in ()).throw(_oserror(code, path)))


def _patch_writing_open(monkeypatch, opener):
    """safetensors_io's open() for writing (the page-cache writer) becomes opener(path, mode)."""
    import builtins

    def fake(path, mode="r", *a, **k):
        return opener(path, mode) if "x" in mode or "w" in mode else builtins.open(path, mode, *a, **k)

    monkeypatch.setattr(sio, "open", fake, raising=False)


def _fail_data_writes(monkeypatch, code):
    import builtins
    monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(_oserror(code)))  # O_DIRECT
    _patch_writing_open(monkeypatch, lambda path, mode: _FailingWrites(builtins.open(path, mode), code))


def _fail(name, code):
    """monkeypatch -> None: os.<name> raises OSError(code)."""
    return lambda monkeypatch: monkeypatch.setattr(os, name, lambda *a, **k: (_ for _ in ()).throw(_oserror(code)))


def _fail_copy(code):
    import shutil
    return lambda monkeypatch: monkeypatch.setattr(shutil, "copyfile", lambda src, dst, **k: (
        _ for _ in ()).throw(_oserror(code, dst)))


# case: (patch(monkeypatch), errno): os-level calls fail as on a read-only or full file system.
# chmod would not do: the tests may run as root, whom permissions do not stop.
UNWRITABLE = {
    "EROFS-creating-the-directory": (lambda mp: _fail_mkdir(mp, errno.EROFS), errno.EROFS),
    "EACCES-creating-the-directory": (lambda mp: _fail_mkdir(mp, errno.EACCES), errno.EACCES),
    "EPERM-creating-the-directory": (lambda mp: _fail_mkdir(mp, errno.EPERM), errno.EPERM),
    "EROFS-creating-a-shard": (lambda mp: _fail_shard_create(mp, errno.EROFS), errno.EROFS),
    "ENOSPC-writing-the-data": (lambda mp: _fail_data_writes(mp, errno.ENOSPC), errno.ENOSPC),
    "ENOSPC-at-fsync": (_fail("fsync", errno.ENOSPC), errno.ENOSPC),
    "ENOSPC-copying-the-config-files": (_fail_copy(errno.ENOSPC), errno.ENOSPC),
    "EROFS-renaming-into-place": (_fail("rename", errno.EROFS), errno.EROFS),
}


@pytest.mark.parametrize("case", list(UNWRITABLE))
def test_unwritable_output_exits_2_with_one_line_and_leaves_nothing(ckpt, tmp_path, monkeypatch, capsys, case):
    patch, code = UNWRITABLE[case]
    cfg = _write(tmp_path, _config_text(ckpt, "ties"))
    out = tmp_path / "out" / "nested"
    patch(monkeypatch)
    rc = cli_main(["merge", str(cfg), "--out", str(out), "--shard-size", "1KB", "--no-progress"])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"pyops merge: error: output {out}: cannot be written ({os.strerror(code)}")
    assert ("free space there or choose another --out" in err) == (code == errno.ENOSPC)
    assert _leftovers(tmp_path) == []
    _inputs_unchanged(ckpt)


def test_full_disk_with_overwrite_keeps_the_old_output(ckpt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    cfg = _write(tmp_path, _config_text(ckpt, "ties"))
    _fail("fsync", errno.ENOSPC)(monkeypatch)
    rc = cli_main(["merge", str(cfg), "--out", str(out), "--overwrite", "--no-progress"])
    monkeypatch.undo()
    assert rc == 2 and len(capsys.readouterr().err.splitlines()) == 1
    assert _leftovers(tmp_path) == ["out"] and sorted(p.name for p in out.iterdir()) == ["keep.txt"]


_SUBPROCESS_FAILURE = """
import errno, os, sys
code = errno.{code}
def fail(*a, **k):
    raise OSError(code, os.strerror(code))
os.{call} = fail
from pyops.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("code, call", [("EROFS", "mkdir"), ("ENOSPC", "fsync")])
def test_cli_subprocess_unwritable_output_exit_2_without_a_traceback(ckpt, tmp_path, code, call):
    cfg = _write(tmp_path, _config_text(ckpt, "ties"))
    p = subprocess.run([sys.executable, "-c", _SUBPROCESS_FAILURE.format(code=code, call=call), "merge", str(cfg),
                        "--out", str(tmp_path / "out"), "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1, p.stderr
    assert p.stderr.startswith(f"pyops merge: error: output {tmp_path / 'out'}: cannot be written "
                               f"({os.strerror(getattr(errno, code))}")
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# Temporary directories left by a killed merge
# ------------------------------------------------------------------------------------------------

def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _stale_dir(out: Path, pid: int) -> Path:
    d = out.parent / f"{out.name}.tmp-{pid}"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"partial")
    return d


def test_temporary_directory_of_a_dead_merge_is_removed_with_one_line(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    pid = _dead_pid()
    stale = _stale_dir(out, pid)
    cfg = _write(tmp_path, _config_text(ckpt, "ties"))
    assert cli_main(["merge", str(cfg), "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.splitlines() == [f"pyops merge: removing {stale}, left by an earlier merge (process {pid}) that did "
                                f"not finish"]
    assert not os.path.lexists(stale) and _leftovers(tmp_path) == ["out"]
    _assert_same(_load_output(out), _expected(ckpt, "ties"))


def test_temporary_directory_of_a_running_process_is_kept(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        busy = _stale_dir(out, sleeper.pid)
        cfg = _write(tmp_path, _config_text(ckpt, "ties"))
        assert cli_main(["merge", str(cfg), "--out", str(out), "--no-progress"]) == 0
        assert capsys.readouterr().err == ""
        assert (busy / "model.safetensors").read_bytes() == b"partial"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_names_a_merge_does_not_write_are_left_alone(ckpt, tmp_path, capsys):
    """Only a directory named exactly OUT.tmp-<pid> is a merge's: not a file of that name, another
    output's directory, or a pid written otherwise."""
    out = tmp_path / "out"
    pid = _dead_pid()
    others = [tmp_path / f"out.tmp-0{pid}", tmp_path / f"other.tmp-{pid}", tmp_path / "out.tmp-x1"]
    for d in others:
        d.mkdir()
    (tmp_path / f"out.tmp-{pid}").write_text("a file")
    cfg = _write(tmp_path, _config_text(ckpt, "ties"))
    assert cli_main(["merge", str(cfg), "--out", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    assert all(d.is_dir() for d in others) and (tmp_path / f"out.tmp-{pid}").read_text() == "a file"
