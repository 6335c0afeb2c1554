"""The tensor plan of mergekit's `slices:` (frankenmerges, passthrough stacking, per-slice merges).

A configuration with `slices:` lists output slices; each takes the same number of consecutive
layers from each of its sources (`layer_range: [first, end)`, end exclusive) and merges them.
The output's layers are the slices' layers in order, renumbered from 0. As mergekit 0.1.5 plans it
(`mergekit/plan.py`, `MergePlanner.plan_module` / `plan_slice` / `plan_layer`):

    pre-layer tensors  (embeddings)           from the first slice's sources, gradient t = 0
    layer idx of a slice of n layers          output layer = running count, inputs = each source's
                                              layer first + idx, gradient t = idx / (n − 1) (t = 1 when n = 1)
    post-layer tensors (final norm, lm_head)  from the last slice's sources, gradient t = 0

A config with `models:` is the same plan with one slice over every layer of every model.

Which tensors are layers: the names `<prefix>.<layer>.<rest>` of the one prefix that carries the
most layer numbers (``model.layers`` for Llama / Mistral / Qwen, ``transformer.h`` for GPT-2 /
Falcon). Where mergekit reads an architecture table, pyops reads the names: the other tensors are
pre-layer when their name holds ``embed``, ``wte`` or ``wpe`` (the token / position embeddings),
post-layer otherwise. Torch-free, like spec.py.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

_LAYER = re.compile(r"^(?P<prefix>.+?)\.(?P<index>\d+)\.(?P<rest>.+)$")
_PRE = ("embed", "wte", "wpe")


class SliceError(ValueError):
    """A slice that cannot be planned. `key`: the configuration key at fault, as a path
    (``("slices", 0, "sources", 1, "layer_range")``; () for the whole configuration); `what`: the
    message without it. str() gives both ("slices[0].sources[1].layer_range: ...")."""

    def __init__(self, key: Tuple, what: str):
        self.key, self.what = tuple(key), what
        super().__init__(f"{_dotted(self.key)}: {what}" if self.key else what)


def _dotted(key: Tuple) -> str:
    out = ""
    for p in key:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


@dataclass(frozen=True)
class SliceSource:
    """`model`: an index into the list of model names given to `plan`; layers [first, end)."""
    model: int
    first: int
    end: int

    @property
    def n_layers(self) -> int:
        return self.end - self.first


@dataclass(frozen=True)
class OutputSlice:
    sources: Tuple[SliceSource, ...]


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its name, the tensor of each source it is merged from (model index,
    name in that model), the output slice it belongs to (None for pre/post tensors, which
    take the first / last slice's sources and parameters: `slice_for_params`), its gradient t and
    its output layer (None for pre/post tensors)."""
    name: str
    inputs: Tuple[Tuple[int, str], ...]
    slice: Optional[int]
    slice_for_params: int
    t: float
    layer: Optional[int]


@dataclass
class Layout:
    """The layer structure of one model's tensor names."""
    prefix: Optional[str]
    layers: Dict[int, List[str]] = field(default_factory=dict)   # index -> the `rest` names
    pre: List[str] = field(default_factory=list)
    post: List[str] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return len(self.layers)


def layer_prefix(names: Sequence[str]) -> Optional[str]:
    """The prefix before ``.<layer>.`` that carries the most distinct layer numbers (ties: the most
    tensors), or None when no name has one."""
    indices: Dict[str, set] = {}
    counts: Counter = Counter()
    for n in names:
        m = _LAYER.match(n)
        if m:
            indices.setdefault(m["prefix"], set()).add(int(m["index"]))
            counts[m["prefix"]] += 1
    if not indices:
        return None
    return max(indices, key=lambda p: (len(indices[p]), counts[p], p))


def layout(names: Sequence[str], prefix: Optional[str] = None) -> Layout:
    """Split `names` into layers (by `prefix`, found by `layer_prefix` when None), pre- and
    post-layer tensors. The layer numbers must be 0 … n−1 (SliceError otherwise)."""
    prefix = layer_prefix(names) if prefix is None else prefix
    out = Layout(prefix)
    for n in names:
        m = _LAYER.match(n) if prefix is not None else None
        if m and m["prefix"] == prefix:
            out.layers.setdefault(int(m["index"]), []).append(m["rest"])
        elif any(p in n for p in _PRE):
            out.pre.append(n)
        else:
            out.post.append(n)
    if out.layers and sorted(out.layers) != list(range(len(out.layers))):
        missing = sorted(set(range(max(out.layers) + 1)) - set(out.layers))
        raise SliceError((), f"the layers under {prefix!r} are not numbered 0..n-1 (missing {missing[:5]})")
    return out


def plan(slices: Sequence[OutputSlice], names: Sequence[Sequence[str]],
         labels: Optional[Sequence[str]] = None) -> Tuple[List[PlannedTensor], int]:
    """The output tensors of `slices` over models whose tensor names are `names[i]` (`labels[i]`
    names model i in errors), and the output's number of layers.

    SliceError (naming ``slices[s].sources[j]`` and the model) for a slice without sources, a
    layer_range outside the model's layers or empty, sources of different lengths, models whose
    layer prefixes differ, or a layer whose tensors differ between the sources."""
    labels = list(labels) if labels is not None else [f"model {i}" for i in range(len(names))]
    if not slices:
        raise SliceError(("slices",), "expected at least one output slice")
    layouts = []
    for i, n in enumerate(names):
        try:
            layouts.append(layout(n))
        except SliceError as exc:
            raise SliceError((), f"{labels[i]}: {exc.what}") from None
    used = sorted({s.model for sl in slices for s in sl.sources})
    prefixes = {layouts[m].prefix for m in used}
    if len(prefixes) > 1:
        raise SliceError(("slices",), "the models' layers sit under different names: "
                         + ", ".join(f"{labels[m]}: {layouts[m].prefix!r}" for m in used))
    prefix = prefixes.pop() if prefixes else None
    for i, sl in enumerate(slices):
        if not sl.sources:
            raise SliceError(("slices", i, "sources"), "expected at least one source")
        for j, s in enumerate(sl.sources):
            n = layouts[s.model].n_layers
            if not (0 <= s.first < s.end <= n):
                raise SliceError(("slices", i, "sources", j, "layer_range"),
                                 f"[{s.first}, {s.end}] is not a non-empty range within the {n} layers of "
                                 f"{labels[s.model]} (end exclusive)")
        lengths = [s.n_layers for s in sl.sources]
        if len(set(lengths)) > 1:
            raise SliceError(("slices", i, "sources"), f"every source of a slice must have the same number of "
                                                       f"layers, got {lengths}")
    out: List[PlannedTensor] = []
    first, last = slices[0].sources, slices[-1].sources
    for name in layouts[first[0].model].pre:
        out.append(PlannedTensor(name, _same_name(name, first, layouts, labels, "pre", 0), None, 0, 0.0, None))
    layer = 0
    for i, sl in enumerate(slices):
        n = sl.sources[0].n_layers
        for idx in range(n):
            t = idx / (n - 1) if n > 1 else 1.0
            ref = sl.sources[0]
            rests = layouts[ref.model].layers[ref.first + idx]
            for j, s in enumerate(sl.sources[1:], 1):
                other = set(layouts[s.model].layers[s.first + idx])
                if other != set(rests):
                    diff = sorted(set(rests) ^ other)[:3]
                    raise SliceError(("slices", i, "sources", j), f"layer {s.first + idx} of {labels[s.model]} "
                                     f"does not hold the tensors of layer {ref.first + idx} of {labels[ref.model]} "
                                     f"(differs in {diff})")
            for rest in rests:
                ins = tuple((s.model, f"{prefix}.{s.first + idx}.{rest}") for s in sl.sources)
                out.append(PlannedTensor(f"{prefix}.{layer}.{rest}", ins, i, i, t, layer))
            layer += 1
    for name in layouts[last[0].model].post:
        out.append(PlannedTensor(name, _same_name(name, last, layouts, labels, "post", len(slices) - 1),
                                 None, len(slices) - 1, 0.0, None))
    return out, layer


def _same_name(name: str, sources: Sequence[SliceSource], layouts: List[Layout], labels, where: str, i: int):
    """(model, name) for each source of a pre/post tensor, which every source must have."""
    for j, s in enumerate(sources):
        if name not in getattr(layouts[s.model], where):
            raise SliceError(("slices", i, "sources", j), f"{name}: a {where}-layer tensor of "
                                                          f"{labels[sources[0].model]} that {labels[s.model]} "
                                                          f"does not have")
    return tuple((s.model, name) for s in sources)
