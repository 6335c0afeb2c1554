"""`python -m pyops merge` on malformed files, drawn by hypothesis.

Properties:

- pyops' safetensors reader refuses every file that the `safetensors` library refuses, and reads
  the files it accepts as the library does (`test_header_reader_*`).
- Whatever a model's safetensors file or the YAML configuration holds, a merge ends with exit 0
  and the output of the in-memory merge, or with exit 2 and exactly one line on stderr (never a
  traceback). The input files are never modified, and a failed merge leaves nothing beside its
  output.

The safetensors files start from a valid file and are broken in the ways the format can be broken:
the length prefix (wrong, huge, past the end, a file shorter than it), the header's bytes (not
UTF-8, not JSON, JSON that is not an object, NaN, huge numbers, deep nesting), each field of each
entry (dtype, shape, data_offsets set to every JSON type, elements replaced, added or removed),
the byte ranges (shifted into overlaps, gaps and past the end), entries added, dropped, renamed
(unicode, lone surrogates) or repeated, extra fields, `__metadata__` of every shape, bytes added
to or cut from the data. The configurations start from a valid one for a drawn method and get
junk of every type at every key, unknown keys, YAML tags (`!!python/object`, `!!set`, `!!binary`,
`!!timestamp`), anchors and aliases (alias bombs, recursive aliases), deep nesting; or the whole
file is replaced (empty, a scalar, a list, several documents, binary junk).

The merges run in-process through `pyops.__main__.main` (stderr captured); a few fixed cases run
as real subprocesses. Each test draws `FUZZ_EXAMPLES[test]` examples, reproducibly
(`derandomize`); ``PYOPS_FUZZ_EXAMPLES=N`` draws N per test instead, for a longer run.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, find, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import pyops
from pyops.__main__ import main as cli_main
from pyops.merging import CheckpointError, load_config
from pyops.merging import safetensors_io as sio

FUZZ_EXAMPLES = {"header": 1000, "checkpoint": 250, "config": 300}


def _examples(test: str) -> int:
    return int(os.environ.get("PYOPS_FUZZ_EXAMPLES", FUZZ_EXAMPLES[test]))


def _settings(test: str):
    return settings(max_examples=_examples(test), deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# ------------------------------------------------------------------------------------------------
# The models
# ------------------------------------------------------------------------------------------------

BASE = {"w": torch.arange(-6, 6, dtype=torch.float32).reshape(4, 3) / 4,
        "b": torch.tensor([0.5, -1.25, 2.0]),
        "n": torch.tensor([7, 9], dtype=torch.int64)}


def _finetuned(i: int) -> dict:
    g = torch.Generator().manual_seed(100 + i)
    return {n: t + 0.125 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t + i + 1
            for n, t in BASE.items()}


def _digest(root: Path) -> dict:
    """Bytes and mtime of every file under `root` (what 'never modified' compares)."""
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    models = {"base": BASE, "m0": _finetuned(0), "m1": _finetuned(1)}
    for name, tensors in models.items():
        (root / "inputs" / name).mkdir(parents=True)
        save_file(tensors, str(root / "inputs" / name / "model.safetensors"), metadata={"format": "pt"})
    (root / "inputs" / "base" / "config.json").write_text('{"model_type": "toy"}')
    (root / "fuzzed").mkdir()
    return {"root": root, "inputs": root / "inputs", "paths": {n: root / "inputs" / n for n in models},
            "tensors": models, "digest": _digest(root / "inputs"), "counter": iter(range(10**9))}


def _run_cli(argv) -> tuple:
    """(exit status, stdout, stderr) of `python -m pyops merge ...` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(argv)
    return rc, out.getvalue(), err.getvalue()


def _assert_exit_0_or_one_line_2(rc: int, out: str, err: str) -> None:
    assert rc in (0, 2), (rc, err)
    if rc == 2:
        assert len(err.splitlines()) == 1 and err.startswith("pyops merge: error: "), err
        assert "Traceback" not in err
    else:
        assert err == "" and "merged" in out, err


def _expected(cfg, tensors_of) -> dict:
    """The in-memory merge of what `cfg` (validated) asks for: pyops.merge_from_models per tensor."""
    ref_path = cfg.base if cfg.base is not None else cfg.models[0].path
    ref = tensors_of(ref_path)
    want = {}
    for name, base in ref.items():
        if not base.is_floating_point():
            want[name] = base
            continue
        models = [tensors_of(m.path)[name].to(base.dtype) for m in cfg.models]
        if cfg.method == "linear":
            base = torch.zeros_like(models[0])
        out_dtype = sio.torch_dtype(cfg.out_dtype) if cfg.out_dtype else base.dtype
        want[name] = pyops.merge_from_models(base, models, out_dtype=out_dtype, **cfg.tensor_kwargs(name))
    return want


def _assert_output(out: Path, want: dict) -> None:
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        torch.testing.assert_close(got[name], t, rtol=0, atol=0, equal_nan=True)


def _nothing_beside(out: Path) -> None:
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(out.name + ".")]


# ------------------------------------------------------------------------------------------------
# Malformed safetensors files
# ------------------------------------------------------------------------------------------------

class Raw:
    """JSON text written as is (what json.dumps cannot write: -0, NaN, 1e400, a lone surrogate).
    Not a str subclass: hypothesis draws a str from `sampled_from` as a string choice."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text!r})"


class Obj(list):
    """A JSON object as a list of (key, value) pairs, so that a key can repeat."""


def _dump(v) -> str:
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, dict):
        v = Obj(v.items())
    if isinstance(v, Obj):
        return "{" + ",".join(f"{_dump(k)}:{_dump(x)}" for k, x in v) + "}"
    if isinstance(v, list):
        return "[" + ",".join(_dump(x) for x in v) + "]"
    return json.dumps(v)


RAW_NUMBERS = [Raw(x) for x in ("-0", "NaN", "Infinity", "-Infinity", "1e400", "8e0", "8.0", "-8", "1" * 400,
                                str(2**64), str(2**64 - 1), str(2**63))]
_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from(RAW_NUMBERS)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6))
JUNK = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
INTS = st.integers(0, 40) | st.integers(-3, -1) | st.sampled_from([2**32, 2**63, 2**64 - 1, 2**64, 10**30])
NAMES = (st.text(max_size=8) | st.sampled_from([Raw('"\\ud800"'), Raw('"\\udc00x"'), Raw('"\\ud83d\\ude00"'), "w",
                                                 "b", "n", "__metadata__", ""]))
DTYPES = st.sampled_from(list(sio.ITEMSIZES) + ["F4", "C64", "F8_E8M0", "X9", "f32", "", "BF16 "])


def _layout(order):
    """A valid header for the base's tensors in `order`: {name: entry} and the data's length."""
    header, offset = {}, 0
    for name in order:
        t = BASE[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": sio.dtype_code(t.dtype), "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return header, offset


@st.composite
def _mutation(draw, header: dict) -> None:
    """Breaks (or keeps valid) `header` in place: one drawn change."""
    names = [k for k in header if k != "__metadata__"]
    kind = draw(st.sampled_from(["field", "element", "shift", "drop", "extra", "add", "rename", "metadata",
                                 "dtype", "repeat", "deep", "overlap", "gap", "empty"]))
    name = draw(st.sampled_from(names)) if names else None
    entry = header.get(name) if name is not None else None
    if kind == "metadata" or entry is None or not isinstance(entry, dict):
        header["__metadata__"] = draw(st.none() | JUNK | st.dictionaries(st.text(max_size=4), st.text(max_size=4),
                                                                        max_size=2))
    elif kind == "field":
        entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(JUNK | INTS.map(lambda i: [i]))
    elif kind == "element":
        field = draw(st.sampled_from(["shape", "data_offsets"]))
        values = list(entry.get(field) or [])
        how = draw(st.sampled_from(["replace", "append", "pop"]))
        if how == "replace" and values:
            values[draw(st.integers(0, len(values) - 1))] = draw(INTS | JUNK)
        elif how == "append":
            values.append(draw(INTS))
        elif values:
            values.pop()
        entry[field] = values
    elif kind == "shift":
        offsets = entry.get("data_offsets")
        if isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets):
            delta = draw(st.integers(1, 12) | st.integers(-12, -1))
            which = draw(st.sampled_from([0, 1, "both"]))
            entry["data_offsets"] = [o + (delta if which in (i, "both") else 0) for i, o in enumerate(offsets)]
    elif kind == "drop":
        entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
    elif kind == "extra":  # ignored by the format, but still JSON that its parser must take
        entry[draw(st.text(max_size=5))] = draw(st.sampled_from(RAW_NUMBERS) | JUNK)
    elif kind == "add":
        header[draw(NAMES)] = {"dtype": draw(DTYPES), "shape": draw(st.lists(INTS, max_size=3)),
                               "data_offsets": draw(st.lists(INTS, min_size=2, max_size=2))}
    elif kind == "rename":
        header[draw(NAMES)] = header.pop(name)
    elif kind == "dtype":
        entry["dtype"] = draw(DTYPES)
    elif kind == "repeat":  # the same name twice: written as an Obj by the caller
        header.setdefault("__repeat__", []).append(name)
    elif kind == "overlap":  # a consistent tensor over bytes that another one holds
        offsets = entry.get("data_offsets")
        if isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets) \
                and 0 <= offsets[0] <= offsets[1]:
            begin = draw(st.integers(offsets[0], offsets[1]))
            end = draw(st.integers(begin, offsets[1]))
            header[draw(NAMES)] = {"dtype": "U8", "shape": [end - begin], "data_offsets": [begin, end]}
    elif kind == "gap":  # the entry and every one after it moved up by k bytes, the data k bytes longer
        offsets = entry.get("data_offsets")
        if isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets):
            k = draw(st.integers(1, 8))
            for e in header.values():
                o = e.get("data_offsets") if isinstance(e, dict) else None
                if isinstance(o, list) and len(o) == 2 and all(type(x) is int for x in o) and o[0] >= offsets[0]:
                    e["data_offsets"] = [o[0] + k, o[1] + k]
            header["__grow__"] = header.get("__grow__", 0) + k
    elif kind == "empty":  # a tensor of no bytes at a tensor boundary, its zero written oddly or beside huge dims
        zero = draw(st.sampled_from([0, 0, Raw("-0"), Raw("0.0"), False, Raw("0e0")]))
        dims = draw(st.lists(st.sampled_from([1, 7, 2**32, 2**63, 2**64 - 1, 2**64, True]), max_size=3))
        shape = draw(st.permutations([zero] + dims))
        bounds = sorted({o for e in header.values() if isinstance(e, dict)
                         for o in (e.get("data_offsets") or []) if type(o) is int and o >= 0} | {0})
        at = draw(st.sampled_from(bounds + [Raw("-0"), False]))
        header[draw(NAMES)] = {"dtype": draw(st.sampled_from(["F32", "U8", "F64"])), "shape": shape,
                               "data_offsets": [at, at]}
    elif kind == "deep":
        depth = draw(st.integers(1, 300))
        entry["x"] = Raw("[" * depth + "]" * depth)


@st.composite
def safetensors_files(draw) -> bytes:
    """The bytes of a safetensors file for the base's tensors: valid, or with up to three changes to
    its entries and one to the file as a whole (some of which keep it valid)."""
    order = draw(st.permutations(list(BASE)))
    header, data_len = _layout(order)
    for _ in range(draw(st.integers(0, 3))):
        draw(_mutation(header))
    repeat = header.pop("__repeat__", [])
    data_len += header.pop("__grow__", 0)
    pairs = Obj(header.items())
    for name in repeat:
        if name in header:
            pairs.append((name, header[name]))
    text = _dump(pairs).encode("utf-8", "surrogatepass")
    data = bytes((7 * i) % 251 for i in range(data_len))
    # Besides the entries, at most one thing about the file as a whole.
    how = draw(st.sampled_from(["keep"] * 10 + ["pad-spaces", "lead-space", "pad-nul", "trailing-junk", "junk-json",
                                                "binary", "bad-utf8", "data-longer", "data-shorter", "prefix-off-by",
                                                "prefix-huge", "prefix-random", "truncated"]))
    if how == "pad-spaces":  # valid: the format allows trailing spaces
        text += b" " * draw(st.integers(1, 9))
    elif how == "lead-space":  # valid JSON whitespace
        text = b"\n " + text
    elif how == "pad-nul":
        text += b"\0"
    elif how == "trailing-junk":
        text += b"{}"
    elif how == "junk-json":
        text = _dump(draw(JUNK)).encode("utf-8", "surrogatepass")
    elif how == "binary":
        text = draw(st.binary(max_size=40))
    elif how == "bad-utf8":
        text = text[:-1] + b"\xff}"
    elif how == "data-longer":
        data += bytes(draw(st.integers(1, 9)))
    elif how == "data-shorter":
        data = data[:-draw(st.integers(1, max(1, len(data))))]
    if how.startswith("prefix") or how == "truncated":
        n = {"prefix-off-by": lambda: len(text) + draw(st.integers(1, 9) | st.integers(-9, -1)),
             "prefix-huge": lambda: draw(st.sampled_from([2**63, 2**64 - 1, 100_000_001, 10**8])),
             "prefix-random": lambda: draw(st.integers(0, 2**64 - 1)),
             "truncated": lambda: len(text)}[how]()
    else:
        n = len(text)
    blob = struct.pack("<Q", max(n, 0)) + text + data
    if how == "truncated":
        blob = blob[:draw(st.integers(0, 7))]  # shorter than the length prefix
    return blob


def _fresh(world, name: str) -> Path:
    d = world["root"] / "fuzzed" / f"{name}{next(world['counter'])}"
    d.mkdir()
    return d


def _library_reads(path: Path):
    """The tensors as the safetensors library reads them, or None where it refuses the file."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # SafetensorError, or a dtype that torch lacks
        return None


@_settings("header")
@given(blob=safetensors_files())
def test_header_reader_refuses_what_safetensors_refuses(world, blob):
    d = _fresh(world, "h")
    path = d / "model.safetensors"
    path.write_bytes(blob)
    try:
        infos, _ = sio.read_header(path)
    except CheckpointError as exc:
        event("refused")
        assert len(str(exc).splitlines()) == 1 and str(exc).startswith(str(path)), str(exc)
        return
    finally:
        assert path.read_bytes() == blob
    event("read")
    lib = _library_reads(path)
    assert lib is not None, "pyops read a file that the safetensors library refuses"
    with sio.Checkpoint(d, "m") as c:
        assert set(c.tensors) == set(lib) == set(infos)
        for name, t in lib.items():
            got = c.read(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name
    shutil.rmtree(d)


@_settings("checkpoint")
@given(blob=safetensors_files(), method=st.sampled_from(["task_arithmetic", "ties", "dare_ties", "consensus"]))
def test_merge_with_a_drawn_checkpoint_exits_0_with_the_merge_or_2_with_one_line(world, blob, method):
    d = _fresh(world, "c")
    model = d / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(blob)
    cfg = d / "merge.yaml"
    cfg.write_text(f"merge_method: {method}\nbase_model: {world['paths']['base']}\nmodels:\n"
                   f"  - model: {model}\n    parameters: {{weight: 0.5, density: 0.7}}\n"
                   f"  - model: {world['paths']['m0']}\n    parameters: {{weight: 1.0, density: 0.6}}\n"
                   f"parameters: {{k: 1}}\n")
    out = d / "out"
    rc, stdout, err = _run_cli(["merge", str(cfg), "--out", str(out), "--no-progress", "--threads", "1"])
    event(f"exit {rc}")
    _assert_exit_0_or_one_line_2(rc, stdout, err)
    assert (model / "model.safetensors").read_bytes() == blob
    assert _digest(world["inputs"]) == world["digest"]
    _nothing_beside(out)
    if rc == 0:
        lib = _library_reads(model / "model.safetensors")
        assert lib is not None, "pyops merged a file that the safetensors library refuses"
        tensors = {world["paths"]["base"]: BASE, world["paths"]["m0"]: world["tensors"]["m0"], model: lib}
        _assert_output(out, _expected(load_config(cfg), lambda p: tensors[Path(p)]))
    else:
        assert not out.exists()
    shutil.rmtree(d)


# ------------------------------------------------------------------------------------------------
# Malformed configurations
# ------------------------------------------------------------------------------------------------

METHODS = ["task_arithmetic", "ties", "dare_ties", "dare_linear", "dare", "breadcrumbs", "della", "della_linear",
           "model_stock", "consensus", "linear"]
TOP_KEYS = ["merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "seed", "tokenizer_source",
            "tokenizer", "chat_template", "slices", "merge_methd", "", "1"]
PARAM_KEYS = ["weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale", "int8_mask", "k",
              "tall_lambda", "blocks", "filter_wise", "densty", "filter", "value"]


def _bomb(depth: int, width: int) -> str:
    """A "billion laughs" in flow style: each level aliases the one before `width` times (width**depth values)."""
    return "[&a0 [" + ", ".join(["lol"] * width) + "], " + ", ".join(
        f"&a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, depth)) + "]"


def _raw_yaml(bomb_depth: int, bomb_width: int, depth: int, digits: int) -> list:
    """Raw YAML values: tags, anchors and aliases, deep nesting, numbers YAML reads oddly."""
    bomb = _bomb(bomb_depth, bomb_width)
    return ["!!python/object:os.system {}", "!!python/object/apply:os.system [echo pwned]", "!!python/name:os.system",
            "!!set {a, b}", "!!omap [{a: 1}]", "!!binary aGVsbG8=", "!!binary '***'", "!!timestamp 2001-13-45",
            "2001-02-30", "!!int abc", "!!float x", "!!bool maybe", "!!str 1", "!custom 1", "!!map [1]",
            "&r [1, *r]", "&m {a: *m}", "*undefined", bomb, "[" * depth + "]" * depth,
            "{a: " * depth + "1" + "}" * depth, "9" * digits, "1e400", ".nan", ".inf", "-.inf", "0x1F", "0o17",
            "1_000", "0b101", "~", "''", "'\\n'", '"\\ud800"', '"a\\nb"', '"\\0"', "[1, 2, 3]", "{}", "[]"]


@st.composite
def _yaml_value(draw, world):
    """A value for any key: junk of every type, a path (valid or not), or raw YAML (a tag, an alias bomb...)."""
    paths = [str(p) for p in world["paths"].values()] + ["/nonexistent", "", "~", "base", "union",
                                                        str(world["root"]), "org/model+lora"]
    kind = draw(st.sampled_from(["junk", "junk", "path", "number", "raw"]))
    if kind == "junk":
        return draw(st.recursive(st.none() | st.booleans() | st.integers(-10, 2**65) | st.text(max_size=6)
                                 | st.floats(allow_nan=True, allow_infinity=True),
                                 lambda inner: st.lists(inner, max_size=3)
                                 | st.dictionaries(st.sampled_from(PARAM_KEYS + ["model", "parameters"]), inner,
                                                   max_size=3), max_leaves=5))
    if kind == "path":
        return draw(st.sampled_from(paths))
    if kind == "number":
        return draw(st.sampled_from([0, 1, -1, 0.5, 1.5, 2, 1e-300, 1e300, 2**63, 2**64, True, "rows", None]))
    raw = _raw_yaml(draw(st.integers(2, 9)), draw(st.integers(2, 10)), draw(st.integers(1, 3000)),
                    draw(st.integers(1, 6000)))
    return RawYAML(draw(st.sampled_from(raw)))


class RawYAML(str):
    """YAML text put in place of a value as is."""


def _valid_config(world, method: str, dtype) -> dict:
    p = world["paths"]
    models = [{"model": str(p[m]), "parameters": {"weight": w, "density": d}}
              for m, w, d in (("m0", 0.5, 0.7), ("m1", 1.0, 0.8))]
    if method == "model_stock":
        for m in models:
            del m["parameters"]
    cfg = {"merge_method": method, "base_model": str(p["base"]), "models": models,
           "parameters": {"epsilon": 0.1} if method.startswith("della") else {"k": 1}, "seed": 3}
    if method == "linear":
        del cfg["base_model"]
    if dtype is not None:
        cfg["dtype"] = dtype
    return cfg


@st.composite
def yaml_configs(draw, world) -> bytes:
    """The bytes of a configuration file: a valid one for a drawn method with up to four keys set
    to junk, added or removed, or a file that is not a configuration at all."""
    whole = draw(st.sampled_from(["config"] * 12 + ["empty", "spaces", "comment", "scalar", "list", "documents",
                                                     "binary", "nul", "bom", "tab"]))
    cfg = _valid_config(world, draw(st.sampled_from(METHODS)), draw(st.sampled_from([None, "bfloat16", "float16"])))
    text = yaml.safe_dump(cfg, sort_keys=False)
    if whole == "empty":
        return b""
    if whole == "spaces":
        return b"  \n\n"
    if whole == "comment":
        return b"# nothing\n"
    if whole == "scalar":
        return b"ties\n"
    if whole == "list":
        return b"- merge_method: ties\n"
    if whole == "documents":
        return (text + "---\n" + text).encode()
    if whole == "binary":
        return draw(st.binary(max_size=60))
    if whole == "nul":
        return text.encode()[:20] + b"\0" + text.encode()[20:]
    if whole == "bom":
        return b"\xef\xbb\xbf" + text.encode()
    if whole == "tab":
        return text.replace("  - ", "\t- ", 1).encode()
    raws = []
    for _ in range(draw(st.integers(0, 4))):
        # a path to a mapping in the config, then a change there
        where = draw(st.sampled_from(["top", "parameters", "model", "model-parameters"]))
        node = cfg
        if where == "parameters":
            node = cfg.setdefault("parameters", {}) if isinstance(cfg.get("parameters"), dict) else cfg
        elif where.startswith("model") and isinstance(cfg.get("models"), list) and cfg["models"]:
            entry = draw(st.sampled_from(cfg["models"]))
            node = entry if isinstance(entry, dict) else cfg
            if where == "model-parameters" and isinstance(node.get("parameters"), dict):
                node = node["parameters"]
        keys = TOP_KEYS if node is cfg else PARAM_KEYS + ["model", "parameters"]
        key = draw(st.sampled_from(list(node) + keys) | st.text(max_size=5))  # a junk key: unicode, line breaks
        if draw(st.integers(0, 5)) == 0:
            node.pop(key, None)
            continue
        value = draw(_yaml_value(world))
        if isinstance(value, RawYAML):
            raws.append(str(value))
            value = f"__RAW{len(raws) - 1}__"
        node[key] = value
    text = yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=10**9)
    for i, raw in enumerate(raws):
        text = text.replace(f"__RAW{i}__", raw)
    return text.encode("utf-8", "surrogatepass")


_loaded = {}


def _tensors_of(path) -> dict:
    path = Path(path)
    if path not in _loaded:
        _loaded[path] = load_file(str(path / "model.safetensors"))
    return _loaded[path]


@pytest.mark.parametrize("valid", [True, False], ids=["a-valid-config", "an-invalid-config"])
def test_yaml_config_strategy_draws(world, valid):
    """The configuration fuzz below is only as good as its mix: it draws both (find raises if not)."""
    find(yaml_configs(world), lambda b: _config_ok(b) is valid, settings=settings(derandomize=True, database=None))


def _config_ok(blob: bytes):
    try:
        load_config(blob.decode("utf-8"))
        return True
    except Exception:
        return False


@_settings("config")
@given(data=st.data())
def test_merge_with_a_drawn_config_exits_0_with_the_merge_or_2_with_one_line(world, data):
    blob = data.draw(yaml_configs(world))
    d = _fresh(world, "y")
    cfg = d / "merge.yaml"
    cfg.write_bytes(blob)
    out = d / "out"
    rc, stdout, err = _run_cli(["merge", str(cfg), "--out", str(out), "--no-progress", "--threads", "1"])
    event(f"exit {rc}")
    _assert_exit_0_or_one_line_2(rc, stdout, err)
    assert cfg.read_bytes() == blob and _digest(world["inputs"]) == world["digest"]
    _nothing_beside(out)
    if rc == 0:
        _assert_output(out, _expected(load_config(cfg), _tensors_of))
    else:
        assert not out.exists()
    shutil.rmtree(d)


# ------------------------------------------------------------------------------------------------
# A few cases as real processes: no traceback reaches the terminal
# ------------------------------------------------------------------------------------------------

SUBPROCESS_CASES = {
    "config-alias-bomb": lambda w: _valid_text(w) + "chat_template: " + _bomb(9, 10) + "\n",
    "config-python-object": lambda w: _valid_text(w) + "chat_template: !!python/object/apply:os.system [echo x]\n",
    "config-binary-junk": lambda w: bytes(range(256)),
    "checkpoint-float-data_offsets": None,
}


def _valid_text(world) -> str:
    return yaml.safe_dump(_valid_config(world, "ties", None), sort_keys=False)


def test_cli_subprocess_malformed_inputs_exit_2_with_one_line(world):
    d = _fresh(world, "p")
    procs = {}
    for case, make in SUBPROCESS_CASES.items():
        cfg = d / f"{case}.yaml"
        if make is None:
            model = d / case
            model.mkdir()
            text = _dump({"w": {"dtype": "F32", "shape": [4, 3], "data_offsets": [0.0, 48.0]}}).encode()
            (model / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + bytes(48))
            cfg.write_text(f"merge_method: ties\nbase_model: {world['paths']['base']}\nmodels:\n"
                           f"  - model: {model}\n    parameters: {{weight: 1.0}}\n")
        else:
            content = make(world)
            cfg.write_bytes(content if isinstance(content, bytes) else content.encode())
        procs[case] = subprocess.Popen([sys.executable, "-m", "pyops", "merge", str(cfg), "--out", f"{d / case}-out"],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for case, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and len(err.splitlines()) == 1 and err.startswith("pyops merge: error:"), \
            (case, err)
    assert _digest(world["inputs"]) == world["digest"]
