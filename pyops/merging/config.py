"""mergekit's YAML, read and validated for `pyops merge` (see `pyops.merging` for the accepted subset).

`load_config(path | text | dict)` returns a `MergeConfig`; every problem is a `ConfigError` whose
message names the key (``models[1].parameters.density``) and, for YAML input, its line and
column. `MergeConfig.tensor_kwargs(name)` resolves the per-tensor parameters (filters) of one
tensor into the keyword arguments of `pyops.merge_from_models`.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from pyops.merging.errors import ConfigError
from pyops.merging import spec as _spec
from pyops.merging.lora import split_model_lora
from pyops.merging.spec import METHODS

# --------------------------------------------------------------------------------------------
# What is accepted
# --------------------------------------------------------------------------------------------

# mergekit 0.1.5's methods beyond task arithmetic that `pyops.merging.interpolate.merge_tensors`
# runs per tensor (on the torch engine), where this checkout has them (spec.MERGEKIT_METHODS).
_MK_METHODS = getattr(_spec, "MERGEKIT_METHODS", {})
INTERPOLATING = tuple(m for m in ("slerp", "nearswap", "nuslerp", "multislerp", "karcher", "sce", "ram", "ramplus_tl",
                                  "arcee_fusion") if m in _MK_METHODS)
# breadcrumbs + TIES' election: a task-vector method of pyops.merge_from_models where spec has it.
BREADCRUMBS_TIES = ("breadcrumbs_ties",) if "breadcrumbs_ties" in getattr(_spec, "EXTRA_METHODS", ()) else ()
SUPPORTED = tuple(METHODS) + ("linear", "passthrough") + BREADCRUMBS_TIES + INTERPOLATING
# mergekit methods pyops does not implement: named in the error so the user knows it is not a typo.
MERGEKIT_ONLY = tuple(m for m in ("slerp", "nuslerp", "multislerp", "karcher", "arcee_fusion", "breadcrumbs_ties",
                                  "sce", "nearswap", "ram", "ramplus_tl", "lrp") if m not in SUPPORTED)
# mergekit's base policy (mergekit/merge_methods/*.py, InputContract.base): "ignored": every input
# alike, a base_model is one more input (linear, passthrough, karcher); "optional": task vectors
# from the base when there is one (nuslerp, multislerp); "required": the rest.
BASELESS = ("linear", "passthrough") + tuple(m for m in INTERPOLATING if _spec.MERGEKIT_BASE.get(m) == "ignored")
OPTIONAL_BASE = tuple(m for m in INTERPOLATING if _spec.MERGEKIT_BASE.get(m) == "optional")
# (minimum, maximum) non-base inputs of the interpolating methods (None: no maximum)
MODEL_COUNT = {m: _spec.MERGEKIT_MODEL_COUNT[m] for m in INTERPOLATING}
# mergekit's defaults (mergekit/merge_methods/registry.py): normalize / rescale per method.
NORMALIZE_DEFAULT = {"ties": True, "della": True, "linear": True}
RANDOM_METHODS = ("dare", "dare_linear", "dare_ties", "della", "della_linear")
ELECTING = ("ties", "dare_ties", "della") + BREADCRUMBS_TIES

# Per-tensor parameters (filters, gradients). SHARED_PARAMS among them are read at the top level or
# per slice only (ParameterScope.SHARED in mergekit, which ignores a per-model value).
TENSOR_PARAMS = ("weight", "density", "gamma", "epsilon", "lambda", "scale", "t", "select_topk", "r", "alpha", "eps",
                 "tol")
SHARED_PARAMS = ("lambda", "t", "select_topk", "r", "alpha", "eps", "tol")
GLOBAL_PARAMS = ("normalize", "rescale", "int8_mask", "k", "tall_lambda", "blocks", "filter_wise", "max_iter",
                 "nuslerp_row_wise", "nuslerp_flatten", "normalize_weights")
DEFAULTS = {"density": 1.0, "gamma": 0.01, "epsilon": 0.15, "lambda": 1.0, "k": 2, "tall_lambda": 0.6,
            "int8_mask": False, "filter_wise": False, "blocks": None, "scale": None, "select_topk": 1.0, "r": 0.1,
            "alpha": 0.2, "eps": 1e-8, "tol": 1e-5, "max_iter": 10, "nuslerp_row_wise": False,
            "nuslerp_flatten": True, "normalize_weights": True}
_GTA = {"weight", "lambda", "normalize"}
USES = {
    "task_arithmetic": _GTA,
    "ties": _GTA | {"density", "blocks"},
    "dare_ties": _GTA | {"density", "rescale"},
    "dare_linear": _GTA | {"density", "rescale"},
    "dare": _GTA | {"density", "rescale"},
    "breadcrumbs": _GTA | {"density", "gamma", "blocks"},
    "della": _GTA | {"density", "epsilon", "rescale", "blocks"},
    "della_linear": _GTA | {"density", "epsilon", "rescale", "blocks"},
    "model_stock": {"filter_wise"},
    "consensus": {"weight", "lambda", "k", "tall_lambda"},
    "linear": {"weight", "normalize"},
    "passthrough": {"scale"},  # mergekit/merge_methods/passthrough.py: one input, times `scale` if given
    "breadcrumbs_ties": _GTA | {"density", "gamma", "blocks"},
    # mergekit/merge_methods/<name>.py (pyops.merging.interpolate)
    "slerp": {"t"}, "nearswap": {"t"}, "nuslerp": {"weight", "nuslerp_row_wise", "nuslerp_flatten"},
    "multislerp": {"weight", "normalize_weights", "eps"}, "karcher": {"max_iter", "tol"},
    "sce": {"select_topk", "int8_mask"}, "ram": {"epsilon"}, "ramplus_tl": {"r", "alpha", "epsilon"},
    "arcee_fusion": set(),
}
# Parameters the interpolating methods take one value per model for (the others: one per tensor).
PER_MODEL = {"nuslerp": ("weight",), "multislerp": ("weight",)}
# Their defaults where they differ from DEFAULTS (ram's epsilon is not della's).
METHOD_DEFAULTS = {"ram": {"epsilon": 1e-5}, "ramplus_tl": {"epsilon": 1e-5}}
TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "seed", "tokenizer_source",
            "tokenizer", "chat_template", "slices")
MODEL_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources", "base_model", "parameters", "residual_weight")
SOURCE_KEYS = ("model", "layer_range", "parameters")
# The config's dtype names -> safetensors dtype codes (pyops.merging.safetensors_io).
DTYPES = {"float32": "F32", "fp32": "F32", "float": "F32", "float16": "F16", "fp16": "F16", "half": "F16",
          "bfloat16": "BF16", "bf16": "BF16", "float64": "F64"}


Path_ = Tuple[Union[str, int], ...]


def dotted(path: Path_) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


class _Doc:
    """Where each key of the document was written (YAML marks), for error messages."""

    def __init__(self, source: str):
        self.source = source
        self.marks: Dict[Path_, Tuple[int, int]] = {}

    def where(self, path: Path_) -> str:
        p = tuple(path)
        while p and p not in self.marks:
            p = p[:-1]
        mark = self.marks.get(p)
        return f"{self.source}, line {mark[0]}, column {mark[1]}" if mark else self.source

    def error(self, path: Path_, message: str) -> ConfigError:
        return ConfigError(f"{self.where(path)}: {dotted(path)}: {message}")


# --------------------------------------------------------------------------------------------
# YAML with marks
# --------------------------------------------------------------------------------------------

def _yaml_error(exc: Exception, source: str) -> ConfigError:
    import yaml

    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    what = " ".join(str(x) for x in (getattr(exc, "context", None), getattr(exc, "problem", None)) if x) or str(exc)
    what = " ".join(what.split())  # one line: a ReaderError's text spans several
    if mark is not None:
        return ConfigError(f"{source}, line {mark.line + 1}, column {mark.column + 1}: invalid YAML: {what}")
    return ConfigError(f"{source}: invalid YAML: {what}")


# A merge configuration is a few levels deep and a few hundred values long. Anchors and aliases
# are allowed (a shared parameter block), but the document they expand to is bounded, so that an
# alias bomb ("billion laughs": each level aliasing the one before ten times) or a recursive alias
# is refused at once instead of expanding without end.
MAX_DEPTH = 32
MAX_NODES = 100_000
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_LOADER = None


def _loader():
    """yaml.SafeLoader whose scanner refuses flow collections ([ {) nested deeper than MAX_DEPTH:
    its cost per token grows with the nesting (seconds for a few thousand levels), and the
    document would be refused anyway. libyaml caps the nesting the same way."""
    global _LOADER
    if _LOADER is None:
        import yaml

        class Loader(yaml.SafeLoader):
            def fetch_flow_collection_start(self, TokenClass):
                if self.flow_level >= MAX_DEPTH:
                    raise yaml.scanner.ScannerError(None, None, f"collections nested more than {MAX_DEPTH} "
                                                                f"levels deep", self.get_mark())
                super().fetch_flow_collection_start(TokenClass)

        _LOADER = Loader
    return _LOADER


def _check_expansion(root, source: str) -> None:
    """Refuses a document nested more than MAX_DEPTH levels or expanding (aliases followed) to more
    than MAX_NODES values, or holding a recursive alias. Each node's size and height are memoised,
    so a bomb is measured in the time of its few distinct nodes, and an alias is as deep as what
    it stands for wherever it is used."""
    import yaml

    measured: Dict[int, Tuple[int, int]] = {}  # id(node) -> (values, levels) below and including it
    on_path: set = set()

    def where(n) -> str:
        return f"{source}, line {n.start_mark.line + 1}, column {n.start_mark.column + 1}"

    def too_deep(n) -> ConfigError:
        return ConfigError(f"{where(n)}: invalid YAML: collections nested more than {MAX_DEPTH} levels deep")

    def measure(n, depth: int) -> Tuple[int, int]:
        key = id(n)
        if key in measured:
            total, height = measured[key]
            if depth + height > MAX_DEPTH + 1:
                raise too_deep(n)
            return total, height
        if key in on_path:
            raise ConfigError(f"{where(n)}: invalid YAML: a recursive alias (a value that contains itself)")
        if depth > MAX_DEPTH:
            raise too_deep(n)
        total, height = 1, 1
        if isinstance(n, (yaml.MappingNode, yaml.SequenceNode)):
            on_path.add(key)
            children = [c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else n.value
            for c in children:
                size, h = measure(c, depth + 1)
                total, height = total + size, max(height, h + 1)
                if total > MAX_NODES:
                    raise ConfigError(f"{where(n)}: invalid YAML: the document expands to more than {MAX_NODES} "
                                      f"values (aliases of aliases?)")
            on_path.discard(key)
        measured[key] = (total, height)
        return total, height

    measure(root, 0)


def _parse_yaml(text: str, doc: _Doc) -> Any:
    """The YAML document as plain dicts, lists and scalars, with every key's mark in `doc`.

    Only YAML's plain types are built (safe_load's scalars; mappings and sequences without a tag
    such as !!python/object, !!set or !!omap); a scalar that its tag cannot build (!!timestamp
    2001-13-45, !!binary with bad base64) is a ConfigError like any other invalid YAML."""
    import yaml

    try:
        node = yaml.compose(text, Loader=_loader())
        if node is not None:
            _check_expansion(node, doc.source)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, doc.source) from None
    except RecursionError:  # yaml's composer recurses once per level of block nesting
        raise ConfigError(f"{doc.source}: invalid YAML: collections nested too deeply") from None
    if node is None:
        raise ConfigError(f"{doc.source}: the configuration is empty")
    constructor = yaml.SafeLoader("")

    def at(n) -> str:
        return f"{doc.source}, line {n.start_mark.line + 1}, column {n.start_mark.column + 1}"

    def scalar(n, path: Path_) -> Any:
        try:
            return constructor.construct_object(n, deep=True)
        except yaml.YAMLError as exc:
            raise _yaml_error(exc, doc.source) from None
        except Exception as exc:  # a tag's constructor on a bad value: ValueError, KeyError, ...
            raise ConfigError(f"{at(n)}: {dotted(path)}: invalid YAML: {n.tag} {_short(n.value)} cannot be read "
                              f"({type(exc).__name__}: {exc})") from None

    def convert(n, path: Path_) -> Any:
        doc.marks.setdefault(path, (n.start_mark.line + 1, n.start_mark.column + 1))
        if isinstance(n, (yaml.MappingNode, yaml.SequenceNode)):
            if n.tag != (_MAP_TAG if isinstance(n, yaml.MappingNode) else _SEQ_TAG):
                raise ConfigError(f"{at(n)}: {dotted(path)}: the YAML tag {n.tag!r} is not supported "
                                  f"(plain mappings and lists only)")
            if isinstance(n, yaml.SequenceNode):
                return [convert(v, path + (i,)) for i, v in enumerate(n.value)]
            out: Dict[str, Any] = {}
            for k, v in n.value:
                if k.tag == "tag:yaml.org,2002:merge":
                    raise ConfigError(f"{doc.source}, line {k.start_mark.line + 1}: YAML merge keys (<<) are not "
                                      f"supported")
                if not isinstance(k, yaml.ScalarNode):
                    raise ConfigError(f"{at(k)}: {dotted(path)}: a mapping key must be a plain string")
                key = str(scalar(k, path))
                kp = path + (key,)
                if key in out:
                    raise ConfigError(f"{at(k)}: {dotted(kp)}: duplicate key")
                doc.marks[kp] = (k.start_mark.line + 1, k.start_mark.column + 1)
                out[key] = convert(v, kp)
            return out
        return scalar(n, path)

    return convert(node, ())


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------------------------
# The validated configuration
# --------------------------------------------------------------------------------------------

# The dotted path components that number a model's layers in mergekit 0.1.5's architecture
# definitions (mergekit/_data/architectures/*.json: model.layers.N, transformer.h.N,
# encoder.layer.N, decoder.block.N, visual.blocks.N, ...): the first one in a tensor's name gives
# its layer index.
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.(\d+)(?:\.|$)")
# config.json's layer count, by the keys mergekit's architectures read it from.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def layer_index(tensor: str) -> Optional[int]:
    """The layer a tensor belongs to (`model.layers.7.mlp.up_proj.weight` -> 7), None for the
    tensors outside the layers (embeddings, final norm, lm_head)."""
    m = _LAYER.search(tensor)
    return int(m.group(1)) if m else None


def interpolate(values: Tuple[float, ...], t: float) -> float:
    """A gradient's value at t in [0, 1]: piecewise linear over `values` spread evenly on [0, 1],
    computed as mergekit 0.1.5 does (mergekit/config.py, evaluate_setting), in Python floats, so
    that every layer gets mergekit's value to the last bit."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


@dataclass(frozen=True)
class PerTensor:
    """A parameter value: a number, a gradient (a tuple of numbers interpolated across layers), or
    mergekit's list of {filter, value} whose values are either (first match wins; an entry
    without a filter, or with filter "*", matches every tensor; a filter is a substring of the
    tensor name). `where` names it in messages: "FILE, line L, column C: models[1].parameters.weight"."""
    entries: Tuple[Tuple[Optional[str], Any], ...]
    where: str

    def resolve(self, tensor: str, t: "Callable[[str], float]") -> Any:
        """The value for `tensor`, None if no entry matches; `t(where)` gives the tensor's position
        in the layers (asked for only when a gradient applies)."""
        for flt, value in self.entries:
            if flt is None or flt == "*" or flt in tensor:
                return interpolate(value, t(self.where)) if isinstance(value, tuple) else value
        return None


@dataclass
class ModelEntry:
    """One model input: a checkpoint directory, optionally with a PEFT LoRA adapter applied to it
    (mergekit's `model+adapter` syntax), and the per-model parameters given with it."""
    path: Path
    written: str  # the path as written in the config
    key: str  # e.g. models[1], slices[0].sources[1]
    index: int  # its position in the config's models list (in its slice's sources)
    params: Dict[str, PerTensor] = field(default_factory=dict)
    lora: Optional[Path] = None  # the adapter directory of `model+adapter`
    where: str = ""  # "FILE, line L, column C: models[1].model", for errors about the files it names

    @property
    def identity(self) -> Tuple[str, Optional[str]]:
        """What makes two entries the same input (mergekit's ModelReference equality): the real
        paths of the model and of its adapter."""
        return os.path.realpath(self.path), (os.path.realpath(self.lora) if self.lora is not None else None)


@dataclass
class SliceSource:
    """One source of an output slice: `model` (its parameters are the source's) and its layers
    [first, end) (end exclusive, as mergekit's layer_range)."""
    model: ModelEntry
    first: int
    end: int


@dataclass
class SliceDef:
    """One entry of `slices:` (mergekit/config.py, OutputSliceDefinition)."""
    index: int  # i
    sources: List[SliceSource]
    base: Optional[ModelEntry]  # the slice's base_model, else the top-level one; None: no base
    params: Dict[str, PerTensor]  # the slice's parameters (between the sources' and the top level's)

    @property
    def key(self) -> str:
        return f"slices[{self.index}]"


@dataclass(frozen=True)
class Scope:
    """Where one output tensor reads its parameters (mergekit/config.py, ConfigReader): the task
    models' own parameters first, then `params` (its output slice's, for `slices:`), then the
    top level's; gradients at `t` (None: the tensor's layer in the home model, for `models:`).
    `names` are the models' input tensor names, which per-model settings' filters match (as
    mergekit resolves them); None: the output tensor's name."""
    params: Optional[Dict[str, PerTensor]] = None
    t: Optional[float] = None
    names: Optional[Tuple[str, ...]] = None


TOP = Scope()


@dataclass
class MergeConfig:
    method: str  # the method name as in the config (mergekit's)
    base: Optional[Path]
    models: List[ModelEntry]  # the task models (the base model excluded, except for linear); for slices:
    # every distinct source model
    params: Dict[str, PerTensor]  # top-level per-tensor defaults
    normalize: bool
    rescale: bool
    k: int
    tall_lambda: float
    blocks: Union[None, str, int]
    out_dtype: Optional[str]  # a safetensors code ("F32", "F16", "BF16", "F64"): out_dtype, else dtype; None: each
    # tensor's inputs' promoted dtype (see pyops.merging.runner._plan)
    dtype: Optional[str]  # the `dtype:` key alone (mergekit's compute dtype; see --compute-dtype)
    seed: int
    tokenizer_source: Optional[Path]  # None: the base model (or the first model for linear without base)
    text: str  # the configuration, to store next to the merged model
    source: str
    notes: List[str] = field(default_factory=list)
    # config.json's layer count of the home model, for gradients: (N, None) or (None, why not)
    num_layers: Tuple[Optional[int], Optional[str]] = (None, "no config.json was read")
    base_entry: Optional[ModelEntry] = None  # the base model as an input (its adapter, where it was written)
    slices: Optional[List[SliceDef]] = None  # `slices:` (then `models` lists every distinct source model)
    doc: Optional[_Doc] = None
    flags: Dict[str, Any] = field(default_factory=dict)  # the interpolating methods' merge-wide settings
    chat_template: Optional[str] = None  # the Jinja text to write, or "auto" (see _chat_template)

    @property
    def pyops_method(self) -> str:
        """The `pyops.merge_from_models` method: linear runs as task arithmetic from a zero base,
        passthrough as task arithmetic from a zero base with the coefficient `scale` (1 without)."""
        return "task_arithmetic" if self.method in ("linear", "passthrough") else self.method

    @property
    def home(self) -> Path:
        """Where config.json and the tokenizer are copied from: the base model, else the first
        model (for slices: the first slice's first source)."""
        if self.base is not None:
            return self.base
        if self.slices:
            return self.slices[0].sources[0].model.path
        return self.models[0].path

    @property
    def inputs(self) -> List[Path]:
        """Every directory read: models and adapters (to keep the output outside them)."""
        entries = ([self.base_entry] if self.base_entry is not None else []) + list(self.models)
        out: List[Path] = []
        for e in entries:
            out += [e.path] + ([e.lora] if e.lora is not None else [])
        if self.base is not None and self.base_entry is None:
            out.insert(0, self.base)
        return out

    def where(self, path: Path_) -> str:
        """"FILE, line L, column C: key" for a key of the configuration."""
        return f"{self.doc.where(path)}: {dotted(path)}" if self.doc is not None else f"{self.source}: {dotted(path)}"

    def layer_t(self, tensor: str, where: str) -> float:
        """Where `tensor` sits in the layers for a gradient (`where` names the key that holds it), as
        mergekit 0.1.5 places it (mergekit/plan.py): layer i of N at i / (N - 1) (1 when N = 1),
        every tensor outside the layers at 0. N is the home model's config.json layer count."""
        i = layer_index(tensor)
        if i is None:
            return 0.0
        n, why = self.num_layers
        if n is None:
            raise ConfigError(f"{where}: a gradient applies to tensor {tensor!r} (layer {i}), but "
                              f"{why}, so the layer count to spread it over is unknown")
        if i >= n:
            raise ConfigError(f"{where}: a gradient applies to tensor {tensor!r}, layer {i}, but "
                              f"config.json gives {n} layers")
        return i / (n - 1) if n > 1 else 1.0

    def _value(self, model: Optional[ModelEntry], key: str, tensor: str, scope: Scope = TOP,
               name: Optional[str] = None, default: Any = DEFAULTS) -> Any:
        """The setting of `key` for `tensor`: the model's own (None: a shared parameter), the
        scope's, the top level's, else the default. `name` is the tensor name that filters match
        (the model's input tensor; default `tensor`)."""
        name = tensor if name is None else name
        if scope.t is not None:
            t = lambda where: scope.t  # noqa: E731
        else:
            t = lambda where: self.layer_t(tensor, where)  # noqa: E731 (asked for only when a gradient applies)
        chain = ((model.params if model is not None else {}), scope.params or {}, self.params)
        for params in chain:
            source = params.get(key)
            if source is not None:
                v = source.resolve(name, t)
                if v is not None:
                    return v
        if default is not DEFAULTS:
            return default
        if key in DEFAULTS:
            return DEFAULTS[key]
        if model is None:  # a shared parameter
            raise ConfigError(f"{self.source}: parameters.{key}: no {key!r} applies to tensor {tensor!r} (mergekit "
                              f"requires a {key} for {self.method}: set parameters.{key} at the top level or per "
                              f"slice, or add an entry without a filter)")
        raise ConfigError(f"{self.source}: {model.key} ({model.written}): no {key!r} applies to tensor {tensor!r} "
                          f"(mergekit requires a {key} for {self.method}: set parameters.{key} for the model "
                          f"or at the top level, or add an entry without a filter)")

    def _per_model(self, models: Sequence[ModelEntry], key: str, tensor: str, scope: Scope) -> List[Any]:
        names = scope.names or (tensor,) * len(models)
        return [self._value(x, key, tensor, scope, n) for x, n in zip(models, names)]

    def raw_params(self, tensor: str, models: Optional[Sequence[ModelEntry]] = None,
                   scope: Scope = TOP) -> Dict[str, Any]:
        """One tensor's per-model weights and densities, λ and normalize as the configuration gives
        them, before pyops folds normalize into the weights: what mergekit's arithmetic takes
        (`pyops.merging.runner.mergekit_order`, --compute-dtype config). `models`: the task
        models (default: the configuration's)."""
        models = self.models if models is None else models
        if self.method == "passthrough":
            scale = self._per_model(models, "scale", tensor, scope)[0]
            return {"scale": None if scale is None else float(scale)}
        weights = [float(w) for w in self._per_model(models, "weight", tensor, scope)]
        if self.method == "linear":
            return {"weights": weights, "densities": [1.0] * len(weights), "lam": 1.0, "normalize": self.normalize}
        return {"weights": weights, "densities": [float(d) for d in self._per_model(models, "density", tensor, scope)],
                "lam": float(self._value(None, "lambda", tensor, scope)), "normalize": self.normalize}

    def tensor_kwargs(self, tensor: str, models: Optional[Sequence[ModelEntry]] = None,
                      scope: Scope = TOP) -> Dict[str, Any]:
        """Keyword arguments of `pyops.merge_from_models` for one tensor (besides base and models).
        `models`: the task models (default: the configuration's); `scope`: where the parameters are
        read (default: a `models:` configuration's)."""
        m = self.method
        models = self.models if models is None else list(models)
        kw: Dict[str, Any] = {"method": self.pyops_method, "seed": self.seed, "name": tensor,
                              "blocks": self.blocks if "blocks" in USES[m] else None}
        if m == "model_stock":
            return kw
        if m in INTERPOLATING:
            params: Dict[str, Any] = {}
            defaults = METHOD_DEFAULTS.get(m, {})
            for key in sorted(USES[m]):
                if key in PER_MODEL.get(m, ()):
                    params[key] = [float(v) for v in self._per_model(models, key, tensor, scope)]
                elif key in GLOBAL_PARAMS:
                    params[key] = self.flags.get(key, DEFAULTS[key])
                else:
                    v = self._value(None, key, tensor, scope, default=defaults.get(key, DEFAULTS))
                    params[key] = float(v)
            return {"method": m, "mergekit": m, "params": params, "name": tensor, "seed": self.seed, "blocks": None}
        if m == "passthrough":
            scale = self._per_model(models, "scale", tensor, scope)[0]
            kw.update(coeffs=[1.0 if scale is None else float(scale)])
            return kw
        weights = [float(w) for w in self._per_model(models, "weight", tensor, scope)]
        total = sum(weights)
        if m == "linear":
            if self.normalize:
                if abs(total) < 1e-8:
                    raise ConfigError(f"{self.source}: the weights of tensor {tensor!r} sum to {total}: "
                                      f"linear with normalize divides by their sum")
                weights = [w / total for w in weights]
            kw.update(coeffs=weights)
            return kw
        densities = [float(d) for d in self._per_model(models, "density", tensor, scope)]
        lam = float(self._value(None, "lambda", tensor, scope))
        if self.normalize and "normalize" in USES[m] and m not in ELECTING and abs(total) >= 1e-8:
            # mergekit's normalize for a method without sign election divides by Σ wᵢ.
            weights = [w / total for w in weights]
        kw.update(coeffs=weights, density=densities, lam=lam)
        if m in ELECTING:
            kw["normalize"] = self.normalize
        for key in ("gamma", "epsilon"):
            if key not in USES[m]:
                continue
            values = {float(v) for v in self._per_model(models, key, tensor, scope)}
            if len(values) > 1:
                raise ConfigError(f"{self.source}: parameter {key!r} differs between models for tensor {tensor!r} "
                                  f"({sorted(values)}); pyops applies one {key} to every model of a tensor")
            kw[key] = values.pop()
        if m in ("breadcrumbs", "breadcrumbs_ties"):
            for x, d in zip(models, densities):
                if d < 1.0 and d + kw["gamma"] > 1.0 + 1e-12:  # density 1 keeps everything (as mergekit)
                    raise ConfigError(f"{self.source}: {x.key}: density + gamma must be <= 1 for breadcrumbs, got "
                                      f"{d} + {kw['gamma']} for tensor {tensor!r}")
        if m in ("della", "della_linear"):
            eps = kw["epsilon"]
            for x, d in zip(models, densities):
                if d < 1.0 and not (d - eps > 0.0 and d + eps <= 1.0):  # density 1 keeps everything
                    raise ConfigError(f"{self.source}: {x.key}: della needs 0 < density - epsilon and density + "
                                      f"epsilon <= 1, got density={d}, epsilon={eps} for tensor {tensor!r}")
        if m == "consensus":
            kw.update(k=self.k, tall_lambda=self.tall_lambda)
        return kw


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_number(doc: _Doc, path: Path_, key: str, v: Any) -> float:
    if not _is_number(v):
        raise doc.error(path, f"expected a number, got {v!r}")
    v = float(v)
    if key == "density" and not (0.0 < v <= 1.0):
        raise doc.error(path, f"density must be in (0, 1], got {v}")
    if key == "gamma" and not (0.0 <= v < 1.0):
        raise doc.error(path, f"gamma must be in [0, 1), got {v}")
    if key in ("epsilon", "eps", "tol") and v < 0:
        raise doc.error(path, f"{key} must be >= 0, got {v}")
    if key == "select_topk" and not (0.0 < v <= 1.0):
        raise doc.error(path, f"select_topk must be in (0, 1], got {v}")
    return v


def _check_value(doc: _Doc, path: Path_, key: str, v: Any) -> Any:
    """A number, or a gradient: a list of numbers (each in the parameter's range, so every value
    between them is too), kept as a tuple."""
    if isinstance(v, list):
        if not v:
            raise doc.error(path, "an empty list: a gradient needs at least one value (mergekit would silently "
                                  "ignore it)")
        return tuple(_check_number(doc, path + (i,), key, x) for i, x in enumerate(v))
    return _check_number(doc, path, key, v)


def _per_tensor(doc: _Doc, path: Path_, key: str, value: Any) -> PerTensor:
    """mergekit's parameter setting (mergekit/config.py, ParameterSetting): a number, a gradient (a
    list of numbers), one {filter, value} mapping, or a list of them; a value may be a gradient."""
    if isinstance(value, dict):
        value, path_of = [value], (lambda i: path)
    else:
        path_of = (lambda i: path + (i,))
    if isinstance(value, list) and value and any(isinstance(e, dict) for e in value):
        entries = []
        for i, e in enumerate(value):
            if not isinstance(e, dict):
                raise doc.error(path_of(i), f"expected a mapping {{filter: ..., value: ...}} like the other "
                                            f"entries, got {e!r}")
            for k in e:
                if k not in ("filter", "value"):
                    raise doc.error(path_of(i) + (k,), "unknown key in a filtered value (expected filter, value)")
            if "value" not in e:
                raise doc.error(path_of(i), "a filtered entry needs a value")
            flt = e.get("filter")
            if flt is not None and not isinstance(flt, str):
                raise doc.error(path_of(i) + ("filter",), f"expected a string (a substring of tensor names), "
                                                          f"got {flt!r}")
            entries.append((flt, _check_value(doc, path_of(i) + ("value",), key, e["value"])))
        return PerTensor(tuple(entries), f"{doc.where(path)}: {dotted(path)}")
    return PerTensor(((None, _check_value(doc, path, key, value)),), f"{doc.where(path)}: {dotted(path)}")


def _layer_count(home: Path) -> Tuple[Optional[int], Optional[str]]:
    """(N, None): the layer count in `home`'s config.json; (None, why) where it has none."""
    conf_path = home / "config.json" if home.is_dir() else home.parent / "config.json"
    try:
        conf = json.loads(conf_path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        return None, f"{conf_path} cannot be read ({type(exc).__name__})"
    if isinstance(conf, dict):
        for key in LAYER_COUNT_KEYS:
            n = conf.get(key)
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                return n, None
    return None, f"{conf_path} has no {' / '.join(LAYER_COUNT_KEYS)}"


# A ChatML conversation (pyops' own text): <|im_start|>role\ncontent<|im_end|>\n per message, then
# <|im_start|>assistant\n with add_generation_prompt.
CHATML = ("{%- for message in messages -%}"
          "{{- '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content'] ~ '<|im_end|>\\n' -}}"
          "{%- endfor -%}"
          "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
# The named templates mergekit 0.1.5 ships besides chatml (mergekit/_data/chat_templates).
MERGEKIT_TEMPLATE_NAMES = ("alpaca", "exaone", "llama3", "mistral")


def _chat_template(doc: _Doc, value) -> str:
    """`chat_template:` as mergekit 0.1.5 reads it (mergekit/merge.py, _set_chat_template): "auto"
    (the most common template among the inputs' tokenizers), a template name (a short string with
    no newline and no "{"), or the Jinja text itself (at least 20 characters with a "{")."""
    if not isinstance(value, str):
        raise doc.error(("chat_template",), f"expected a string (auto, chatml or a Jinja template), "
                                            f"got {type(value).__name__}")
    if value == "auto":
        return value
    if len(value) < 256 and "\n" not in value and "{" not in value:
        if value == "chatml":
            return CHATML
        if value in MERGEKIT_TEMPLATE_NAMES:
            raise doc.error(("chat_template",), f"the named template {value!r} is not shipped with pyops (chatml "
                                                "is): give its Jinja text instead")
    if len(value) < 20 or "{" not in value:
        raise doc.error(("chat_template",), f"invalid chat template {value!r} (expected auto, chatml or a Jinja "
                                            "template of at least 20 characters)")
    return value


def _resolve_path(doc: _Doc, path: Path_, written: Any, what: str = "model directory") -> Path:
    if not isinstance(written, str) or not written.strip():
        raise doc.error(path, f"expected a local {what}, got {written!r}")
    p = Path(os.path.expanduser(written))
    if not p.exists():
        hint = " (pyops merge reads local checkpoints: download Hub models first)" if what == "model directory" else ""
        raise doc.error(path, f"{written!r} does not exist{hint}")
    return Path(os.path.abspath(p))


def _model(doc: _Doc, path: Path_, written: Any, key: str, index: int,
           params: Optional[Dict[str, PerTensor]] = None) -> ModelEntry:
    """A model reference as mergekit's ModelReference parses it: `model` or `model+lora_adapter`
    (one "+", which always splits, as in mergekit; both parts local directories)."""
    if not isinstance(written, str) or not written.strip():
        raise doc.error(path, f"expected a local model directory (or model+lora_adapter), got {written!r}")
    try:
        model, lora = split_model_lora(written)
    except ValueError as exc:
        raise doc.error(path, str(exc)) from None
    if lora is None:
        model_path, lora_path = _resolve_path(doc, path, written), None
    else:
        model_path = _resolve_path(doc, path, model)
        lora_path = _resolve_path(doc, path, lora, "LoRA adapter directory")
        if not lora_path.is_dir():
            raise doc.error(path, f"{lora!r} (after '+') is not a directory: expected a PEFT adapter directory")
    return ModelEntry(model_path, written, key, index, params or {}, lora_path, f"{doc.where(path)}: {dotted(path)}")


def _params(doc: _Doc, path: Path_, raw: Any, allowed: Tuple[str, ...], level: str) -> Dict[str, PerTensor]:
    """The `parameters:` mapping of a model, slice source or slice. `allowed`: the per-tensor
    parameters this level takes; a merge-wide parameter is refused naming the key (mergekit 0.1.5
    reads them from the top level only and silently ignores them elsewhere)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise doc.error(path, f"expected a mapping, got {raw!r}")
    per: Dict[str, PerTensor] = {}
    for key, value in raw.items():
        p = path + (key,)
        if key in GLOBAL_PARAMS or (key in TENSOR_PARAMS and key not in allowed):
            # mergekit 0.1.5 reads these at the top level (ParameterScope.SHARED; lambda also in a
            # slice's parameters) and silently ignores a per-model value.
            raise doc.error(p, f"{key} is a merge-wide parameter: set it in the top-level parameters (mergekit "
                               f"ignores a {level} {key})")
        if key not in allowed:
            raise doc.error(p, f"unknown parameter (expected one of {', '.join(allowed)})")
        per[key] = _per_tensor(doc, p, key, value)
    return per


MODEL_PARAMS = tuple(k for k in TENSOR_PARAMS if k not in SHARED_PARAMS)


def _check_count(doc: _Doc, path: Path_, method: str, n: int) -> None:
    """The number of inputs besides the base that an interpolating method takes (mergekit's
    InputContract: slerp, nearswap, arcee_fusion one; nuslerp two; karcher every input)."""
    lo, hi = MODEL_COUNT[method]
    lo = max(lo, 1)
    if n < lo or (hi is not None and n > hi):
        count = f"{lo}" if hi == lo else f"at least {lo}" if hi is None else f"{lo} to {hi}"
        what = "inputs" if method in BASELESS else "models besides the base"
        raise doc.error(path, f"{method} takes {count} {what}, got {n}")


def _slices(doc: _Doc, raw: Any, method: str, base: Optional[ModelEntry]) -> List[SliceDef]:
    """`slices:` (mergekit/config.py, OutputSliceDefinition / InputSliceDefinition), checked as far
    as the configuration alone allows; the layer ranges against the models' layers are checked
    when the checkpoints are opened (pyops.merging.slices.plan)."""
    if not isinstance(raw, list) or not raw:
        raise doc.error(("slices",), f"expected a list of {{sources: [{{model, layer_range}}, ...]}}, got {raw!r}")
    out: List[SliceDef] = []
    for i, sl in enumerate(raw):
        p = ("slices", i)
        if not isinstance(sl, dict):
            raise doc.error(p, f"expected a mapping {{sources: [...], parameters: {{...}}}}, got {sl!r}")
        for key in sl:
            if key not in SLICE_KEYS:
                raise doc.error(p + (key,), f"unknown key (expected one of {', '.join(SLICE_KEYS)})")
        params = _params(doc, p + ("parameters",), sl.get("parameters"), TENSOR_PARAMS, "per-slice")
        slice_base = base
        if sl.get("base_model") is not None:
            slice_base = _model(doc, p + ("base_model",), sl["base_model"], f"slices[{i}].base_model", -1)
        sources_raw = sl.get("sources")
        if not isinstance(sources_raw, list) or not sources_raw:
            raise doc.error(p + ("sources",) if "sources" in sl else p,
                            f"expected a list of {{model: PATH, layer_range: [FIRST, END]}}, got {sources_raw!r}")
        sources: List[SliceSource] = []
        for j, src in enumerate(sources_raw):
            q = p + ("sources", j)
            if not isinstance(src, dict):
                raise doc.error(q, f"expected a mapping {{model: PATH, layer_range: [FIRST, END]}}, got {src!r}")
            for key in src:
                if key not in SOURCE_KEYS:
                    raise doc.error(q + (key,), f"unknown key (expected one of {', '.join(SOURCE_KEYS)})")
            for key in ("model", "layer_range"):
                if key not in src:
                    raise doc.error(q, f"missing key {key!r}")
            rng = src["layer_range"]
            if not (isinstance(rng, list) and len(rng) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in rng)):
                raise doc.error(q + ("layer_range",), f"expected [FIRST, END] (two ints, END exclusive), got {rng!r}")
            if not 0 <= rng[0] < rng[1]:
                raise doc.error(q + ("layer_range",), f"expected 0 <= FIRST < END (a non-empty range, END "
                                                      f"exclusive), got {rng!r}")
            sp = _params(doc, q + ("parameters",), src.get("parameters"), MODEL_PARAMS, "per-source")
            entry = _model(doc, q + ("model",), src["model"], f"slices[{i}].sources[{j}]", j, sp)
            for earlier in sources:
                if earlier.model.identity == entry.identity:
                    # mergekit keys a tensor's inputs by model: a second source of the same model
                    # in one slice fails there ("Duplicate merge inputs").
                    raise doc.error(q + ("model",), f"{src['model']!r} is already {earlier.model.key}: a slice "
                                                    f"takes each model once (mergekit refuses duplicate inputs)")
            sources.append(SliceSource(entry, rng[0], rng[1]))
        lengths = [s.end - s.first for s in sources]
        if len(set(lengths)) > 1:
            raise doc.error(p + ("sources",), f"every source of a slice must have the same number of layers, got "
                                              f"{lengths} (layer_range is [FIRST, END), END exclusive)")
        if method == "passthrough" and len(sources) != 1:
            raise doc.error(p + ("sources",), f"passthrough takes exactly one source per slice, got {len(sources)}")
        if method in OPTIONAL_BASE:
            if slice_base is not None and all(s.model.identity != slice_base.identity for s in sources):
                raise doc.error(p + ("sources",), f"base_model {slice_base.written!r} is not among the slice's "
                                                  f"sources (mergekit: 'Base input is not present in merge inputs')")
        elif method not in BASELESS:
            if slice_base is None:
                raise doc.error(p, f"{method} needs a base_model (the model the task vectors are taken from): set "
                                   f"base_model at the top level or in the slice")
            if all(s.model.identity != slice_base.identity for s in sources):
                what = "slices[%d].base_model" % i if sl.get("base_model") is not None else "base_model"
                raise doc.error(p + ("sources",), f"{what} {slice_base.written!r} is not among the slice's sources: "
                                                  f"{method} needs it among the inputs (mergekit: 'Base input is not "
                                                  f"present in merge inputs')")
            if method == "model_stock" and len(sources) < 3:
                raise doc.error(p + ("sources",), f"model_stock needs at least 2 models besides the base, got "
                                                  f"{len(sources) - 1}")
        if method in MODEL_COUNT:
            has_base = (method not in BASELESS and slice_base is not None
                        and any(s.model.identity == slice_base.identity for s in sources))
            _check_count(doc, p + ("sources",), method, len(sources) - has_base)
        out.append(SliceDef(i, sources, slice_base if method not in BASELESS else None, params))
    return out


def _dtype(doc: _Doc, cfg: dict, key: str) -> Optional[str]:
    v = cfg.get(key)
    if v is None:
        return None
    name = v[len("torch."):] if isinstance(v, str) and v.startswith("torch.") else v  # mergekit reads both
    if not isinstance(name, str) or name.lower() not in DTYPES:
        raise doc.error((key,), f"expected one of float32, float16, bfloat16, float64, got {v!r}")
    return DTYPES[name.lower()]


def load_config(config: Union[str, os.PathLike, dict, "MergeConfig"]) -> MergeConfig:
    """Read and validate a mergekit YAML file (a path), YAML text, or an equivalent dict."""
    if isinstance(config, MergeConfig):
        return config
    if isinstance(config, dict):
        import yaml

        doc = _Doc("config")
        raw, text = config, yaml.safe_dump(config, sort_keys=False)
    elif isinstance(config, os.PathLike) or (isinstance(config, str) and "\n" not in config and (
            os.path.exists(config) or config.endswith((".yaml", ".yml")))):
        path = Path(config)
        try:
            text = path.read_text("utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc})") from None
        doc = _Doc(str(path))
        raw = _parse_yaml(text, doc)
    elif isinstance(config, str):
        doc, text = _Doc("config"), config
        raw = _parse_yaml(text, doc)
    else:
        raise TypeError(f"config: expected a path, YAML text or a dict, got {type(config).__name__}")
    return _validate(raw, doc, text)


def _validate(raw: Any, doc: _Doc, text: str) -> MergeConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{doc.where(())}: expected a mapping with merge_method, base_model, models, ..., "
                          f"got {type(raw).__name__}")
    for key in raw:
        if key not in TOP_KEYS:
            raise doc.error((key,), f"unknown key (expected one of {', '.join(TOP_KEYS)})")
    notes: List[str] = []
    if "slices" in raw and "models" in raw:
        # mergekit/config.py, MergeConfiguration.validate_inputs: exactly one of models, slices
        raise doc.error(("slices",), "models and slices are both given: use one of them (mergekit requires "
                                     "exactly one)")
    if "tokenizer" in raw:
        raise doc.error(("tokenizer",), "the tokenizer block (vocabulary merging) is not supported; "
                                        "use tokenizer_source: base or a model path")
    chat_template = _chat_template(doc, raw.get("chat_template")) if "chat_template" in raw else None

    method = raw.get("merge_method")
    if method is None:
        raise ConfigError(f"{doc.source}: merge_method: missing (one of {', '.join(SUPPORTED)})")
    if not isinstance(method, str) or method not in SUPPORTED:
        extra = " (a mergekit method that pyops does not implement)" if method in MERGEKIT_ONLY else ""
        raise doc.error(("merge_method",), f"unknown method {method!r}{extra}; pyops merge supports "
                                           f"{', '.join(SUPPORTED)}")

    # ---- top-level parameters
    top = raw.get("parameters") or {}
    if not isinstance(top, dict):
        raise doc.error(("parameters",), f"expected a mapping, got {top!r}")
    params: Dict[str, PerTensor] = {}
    scalars: Dict[str, Any] = {}
    for key, value in top.items():
        p = ("parameters", key)
        if key in TENSOR_PARAMS:
            params[key] = _per_tensor(doc, p, key, value)
        elif key in GLOBAL_PARAMS:
            if isinstance(value, list):
                raise doc.error(p, f"expected a single value: pyops applies one {key} to the whole merge "
                                   f"(gradients and filters are supported for {', '.join(TENSOR_PARAMS)})")
            scalars[key] = value
        else:
            raise doc.error(p, f"unknown parameter (expected one of {', '.join(TENSOR_PARAMS + GLOBAL_PARAMS)})")

    def flag(key: str, default: bool) -> bool:
        v = scalars.get(key, default)
        if not isinstance(v, bool):
            raise doc.error(("parameters", key), f"expected true or false, got {v!r}")
        return v

    normalize = flag("normalize", NORMALIZE_DEFAULT.get(method, False))
    rescale = flag("rescale", method in RANDOM_METHODS)
    if flag("int8_mask", False):
        notes.append("int8_mask is ignored (pyops keeps its masks in registers, never as int8 tensors)")
    if method in RANDOM_METHODS and not rescale:
        raise doc.error(("parameters", "rescale"), f"rescale: false is not supported: pyops' {method} always "
                                                   f"rescales kept entries by 1/density (the DARE paper's rescale)")
    if method not in RANDOM_METHODS and "rescale" in scalars and rescale:
        raise doc.error(("parameters", "rescale"), f"rescale: true is not supported for {method} (mergekit's "
                                                   f"L1-norm rescale of magnitude pruning is not implemented)")
    if flag("filter_wise", False):
        raise doc.error(("parameters", "filter_wise"), "filter_wise: true (row-wise model_stock) is not supported")
    k = scalars.get("k", DEFAULTS["k"])
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise doc.error(("parameters", "k"), f"expected an int >= 1 (tasks that must agree), got {k!r}")
    tall_lambda = scalars.get("tall_lambda", DEFAULTS["tall_lambda"])
    if not _is_number(tall_lambda) or tall_lambda < 0:
        raise doc.error(("parameters", "tall_lambda"), f"expected a number >= 0, got {tall_lambda!r}")
    blocks = scalars.get("blocks")
    if not (blocks is None or blocks == "rows"
            or (isinstance(blocks, int) and not isinstance(blocks, bool) and 0 < blocks < 2 ** 63)):
        # 2**63: the int64 that the ops' schemas and the kernels carry a block size in
        raise doc.error(("parameters", "blocks"), f"expected null, 'rows' or an int in [1, 2**63), got {blocks!r}")
    flags: Dict[str, Any] = {k: flag(k, DEFAULTS[k]) for k in ("nuslerp_row_wise", "nuslerp_flatten",
                                                                 "normalize_weights", "int8_mask") if k in scalars}
    if "max_iter" in scalars:
        v = scalars["max_iter"]
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 10**6:
            raise doc.error(("parameters", "max_iter"), f"expected an int in [1, 10**6], got {v!r}")
        flags["max_iter"] = v

    # ---- models
    base_entry: Optional[ModelEntry] = None
    if raw.get("base_model") is not None:
        base_entry = _model(doc, ("base_model",), raw["base_model"], "base_model", -1)
    elif method not in BASELESS + OPTIONAL_BASE and "slices" not in raw:
        raise ConfigError(f"{doc.source}: base_model: missing; {method} needs the model the task vectors are "
                          f"taken from")
    base = base_entry.path if base_entry is not None else None
    slices: Optional[List[SliceDef]] = None
    models: List[ModelEntry] = []
    if "slices" in raw:
        slices = _slices(doc, raw["slices"], method, base_entry)
        seen_ids: set = set()
        for sl in slices:  # every distinct input, in order of appearance (each is opened once)
            for e in [s.model for s in sl.sources] + ([sl.base] if sl.base is not None else []):
                if e.identity not in seen_ids and not (base_entry is not None and e.identity == base_entry.identity):
                    seen_ids.add(e.identity)
                    models.append(e)
        if "weight" in USES[method]:
            for sl in slices:
                for s_ in sl.sources:
                    if sl.base is not None and s_.model.identity == sl.base.identity:
                        continue
                    if "weight" not in s_.model.params and "weight" not in sl.params and "weight" not in params:
                        raise doc.error(("slices", sl.index, "sources", s_.model.index),
                                        f"no weight for {s_.model.written!r}: mergekit requires a weight per model "
                                        f"for {method} (set parameters.weight for the source, the slice, or a "
                                        f"default in the top-level parameters)")
    else:
        models_raw = raw.get("models")
        if not isinstance(models_raw, list) or not models_raw:
            raise doc.error(("models",), f"expected a list of {{model: PATH, parameters: {{...}}}} (or slices:), "
                                         f"got {models_raw!r}")
        seen: Dict[Tuple[str, Optional[str]], str] = {}
        for i, entry in enumerate(models_raw):
            p = ("models", i)
            if not isinstance(entry, dict):
                raise doc.error(p, f"expected a mapping {{model: PATH, parameters: {{...}}}}, got {entry!r}")
            for key in entry:
                if key not in MODEL_KEYS:
                    raise doc.error(p + (key,), f"unknown key (expected one of {', '.join(MODEL_KEYS)})")
            if "model" not in entry:
                raise doc.error(p, "missing key 'model'")
            per = _params(doc, p + ("parameters",), entry.get("parameters"), MODEL_PARAMS, "per-model")
            m = _model(doc, p + ("model",), entry["model"], f"models[{i}]", i, per)
            if base_entry is not None and m.identity == base_entry.identity and method not in BASELESS:
                if per:
                    notes.append(f"models[{i}] is the base model: its parameters are ignored (it is not a task model)")
                continue
            if m.identity in seen:
                raise doc.error(p + ("model",), f"{entry['model']!r} is listed twice (also as {seen[m.identity]})")
            seen[m.identity] = f"models[{i}]"
            models.append(m)
        if method in BASELESS and base_entry is not None and base_entry.identity not in seen:
            # mergekit 0.1.5 (mergekit/plan.py, normalize_config) adds a base_model that is not listed to
            # the inputs of every method; linear then averages it with the others, at the weight the
            # top-level parameters give it (its own parameters are empty), last in the sum.
            if method == "passthrough":
                raise doc.error(("base_model",), "passthrough takes exactly one input, and mergekit adds a "
                                                 "base_model that is not under models to the inputs: remove "
                                                 "base_model or make it the one model")
            if "weight" in USES[method] and "weight" not in params:
                raise doc.error(("base_model",), "linear averages base_model with the models when it is not listed "
                                                 "under models (as mergekit does), and it has no weight: list it under "
                                                 "models with a weight, set parameters.weight at the top level, or "
                                                 "remove base_model")
            models.append(ModelEntry(base_entry.path, base_entry.written, "base_model", len(models_raw), {},
                                     base_entry.lora, base_entry.where))
        n = len(models)
        if n == 0:
            raise doc.error(("models",), "no task model: every entry is the base model")
        if method == "passthrough" and n != 1:
            raise doc.error(("models",), f"passthrough takes exactly one model (mergekit/merge_methods/passthrough.py), "
                                         f"got {n}")
        if method in MODEL_COUNT:
            _check_count(doc, ("models",), method, n)
        if method == "model_stock" and n < 2:
            raise doc.error(("models",), f"model_stock needs at least 2 models besides the base, got {n}")
        if method == "consensus" and k > n:
            raise doc.error(("parameters", "k"), f"expected an int in [1, {n}] (tasks that must agree), got {k}")
        if "weight" in USES[method]:
            for m in models:
                if "weight" not in m.params and "weight" not in params:
                    raise doc.error(("models", m.index), f"no weight for {m.written!r}: mergekit requires a weight "
                                                         f"per model for {method} (set parameters.weight for the "
                                                         f"model, or a default in the top-level parameters)")
    if method == "consensus" and slices is not None:
        for sl in slices:
            if k > len(sl.sources) - 1:
                raise doc.error(("parameters", "k"), f"expected an int in [1, {len(sl.sources) - 1}] (tasks that must "
                                                     f"agree in {sl.key}), got {k}")

    if method in METHOD_DEFAULTS:  # ram, ramplus_tl: epsilon is one value per tensor (ParameterScope.SHARED)
        located = [(("models", m.index), m) for m in models if slices is None] + \
                  [(("slices", sl.index, "sources", s_.model.index), s_.model) for sl in slices or [] for s_ in sl.sources]
        for path, m in located:
            if "epsilon" in m.params:
                raise doc.error(path + ("parameters", "epsilon"), f"epsilon is a merge-wide parameter for {method}: "
                                                                  f"set it in the top-level parameters (mergekit "
                                                                  f"ignores a per-model epsilon)")

    # ---- parameters that this method does not use
    used = USES[method]
    unused: Dict[str, List[str]] = {}
    for key in list(params) + list(scalars):
        if key not in used and key not in ("int8_mask", "rescale"):
            unused.setdefault(key, []).append("parameters")
    for m in models:
        for key in m.params:
            if key not in used:
                unused.setdefault(key, []).append(m.key)
    for sl in slices or []:
        for key in sl.params:
            if key not in used:
                unused.setdefault(key, []).append(sl.key)
        if raw["slices"][sl.index].get("residual_weight") is not None:
            notes.append(f"{sl.key}.residual_weight is ignored (mergekit 0.1.5 reads it nowhere either)")
    for key, where in unused.items():
        notes.append(f"{key} is not used by {method} (ignored; set in {', '.join(where)})")

    # ---- output and the rest
    dtype = _dtype(doc, raw, "dtype")
    out_dtype = _dtype(doc, raw, "out_dtype") or dtype
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not (0 <= seed < 2 ** 64):
        raise doc.error(("seed",), f"expected an int in [0, 2**64), got {seed!r}")
    tok = raw.get("tokenizer_source")
    tokenizer_source = None
    if tok is not None and tok != "base":
        if tok == "union":
            raise doc.error(("tokenizer_source",), "union (merging vocabularies) is not supported; use base or "
                                                   "a model path")
        tokenizer_source = _resolve_path(doc, ("tokenizer_source",), tok)
        if not tokenizer_source.is_dir():
            raise doc.error(("tokenizer_source",), f"{tok!r} is not a directory")
    settings = list(params.values()) + [v for m in models for v in m.params.values()]
    gradients = any(isinstance(value, tuple) for p in settings for _, value in p.entries)
    home = base if base is not None else (slices[0].sources[0].model.path if slices else models[0].path)
    # slices: each slice's layers give their own t (pyops.merging.slices), config.json is not asked
    num_layers = _layer_count(home) if (gradients and slices is None) else (None, "no gradient was given")
    return MergeConfig(method=method, base=base, models=models, params=params, normalize=normalize, rescale=rescale,
                       k=k, tall_lambda=float(tall_lambda), blocks=blocks, out_dtype=out_dtype, dtype=dtype,
                       seed=seed, tokenizer_source=tokenizer_source, text=text, source=doc.source, notes=notes,
                       num_layers=num_layers, base_entry=base_entry, slices=slices, doc=doc, flags=flags,
                       chat_template=chat_template)
