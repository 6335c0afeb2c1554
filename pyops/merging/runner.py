"""`run_merge`: the streaming merge of whole checkpoints (see `pyops.merging` for the overview).

Phases: (1) read and validate the configuration, the output path and every input header —
names, shapes, dtypes and per-tensor parameters of every tensor — before anything is created;
(2) plan the output (one entry per tensor in the base's file order, cut into shards);
(3) in a temporary directory next to the output, for each tensor: read it from the base and
every model (the next tensor is read by a helper thread while this one merges), merge it with
`pyops.merge_from_models` on the chosen device, stream its bytes into the current shard;
(4) write the index, the config and tokenizer files and `pyops_merge.yaml`; (5) rename the
temporary directory to the output. Any exception, KeyboardInterrupt or SystemExit before the
rename removes the temporary directory; the inputs are only ever opened read-only. A failure to
write (read-only file system, no permission, full disk) is an `OutputError`, raised once the
temporary directory is gone. The temporary directory of a merge that was killed (SIGKILL, power
loss) cannot be removed by that merge: the next merge to the same output removes it once its
process is gone.

Several processes (`torchrun --nproc-per-node N -m pyops merge ...`, or `run_merge(group=...)`):
every rank validates everything and the ranks check that they agree on the plan; the tensors are
cut into one contiguous run per rank (file order, balanced by bytes), each rank merges its run
into shards of its own in one temporary directory that rank 0 creates, and rank 0 writes the index
and the other files and renames the directory once every rank has reported success. The ranks
coordinate through the process group's key-value store (no tensor crosses between them); see
`_run_ranks`.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import gc
import hashlib
import json
import os
import re
import resource
import shutil
import socket
import stat
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

from pyops.merging import native_engine, slices as slice_plan
from pyops.merging.config import BASELESS, LAYER_COUNT_KEYS, MergeConfig, ModelEntry, Scope, load_config
from pyops.merging.errors import CheckpointError, ConfigError, MergeError, OutputError, one_line
from pyops.merging.spec import BACKEND_CHOICES
from pyops.merging.safetensors_io import (
    INDEX_FILE, ITEMSIZES, MERGEABLE, TORCH_NAMES, AdaptedCheckpoint, Checkpoint, OutEntry, ShardWriter, parse_size,
    plan_shards, shard_names, torch_dtype, write_index)

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
CONFIG_COPY = "pyops_merge.yaml"
# Idle reusable buffers kept by the merge (at least two of the largest tensor).
_POOL_IDLE_BYTES = 256 << 20
# Results queued for the writer thread: the disk (O_DIRECT) and the merge take turns being the
# slower one from tensor to tensor, and a queue of two lets each run ahead of the other (one more
# result buffer of memory).
_WRITES_IN_FLIGHT = 2


@dataclass
class MergeReport:
    """What a merge did. `summary()` is what `python -m pyops merge` prints at the end."""
    out_dir: Path
    method: str
    device: str
    tensors: int = 0
    merged: int = 0
    copied: List[str] = field(default_factory=list)  # tensors copied from the base, not merged (ints, bool, fp8)
    shards: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    rss_before: int = 0  # bytes, when the merge started (Python and pyops loaded; torch too, unless not needed)
    peak_rss: int = 0  # bytes, the process's peak resident set (getrusage ru_maxrss)
    backends: Dict[str, int] = field(default_factory=dict)  # backend -> tensors it merged
    files: List[str] = field(default_factory=list)  # non-tensor files copied into the output
    notes: List[str] = field(default_factory=list)
    engine: str = ""  # "native" (the C++ kernels on raw memory, no torch) or "torch" (pyops.merge_from_models)
    ranks: int = 1  # processes that merged (torchrun); the counts above are their sums, peak_rss their maximum
    rank: int = 0  # this process's rank
    per_rank: List[dict] = field(default_factory=list)  # each rank's tensors, shards, bytes and peak RSS

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / 1e9 / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        by = f" by {self.ranks} processes" if self.ranks > 1 else ""
        per = " in the largest process" if self.ranks > 1 else ""
        lines = [
            f"merged {self.merged} tensors ({self.method}, {self.device}) and copied {len(self.copied)} from the base "
            f"into {self.shards} shard{'s' if self.shards != 1 else ''}{by} in {self.seconds:.2f} s: "
            f"{self.bytes_read / 1e9:.3f} GB read ({self.gb_per_s:.2f} GB/s), {self.bytes_written / 1e9:.3f} GB written",
            f"peak RSS {self.peak_rss / 2**20:.0f} MiB{per} ({self.rss_before / 2**20:.0f} MiB before the merge)",
            f"output: {self.out_dir}",
        ]
        if self.per_rank:
            shown = [f"rank {r}: {p['tensors']} tensors, {p['shards']} shards, {p['bytes_read'] / 1e9:.3f} GB read, "
                     f"{p['seconds']:.2f} s, peak RSS {p['peak_rss'] / 2**20:.0f} MiB"
                     for r, p in enumerate(self.per_rank[:8])]
            more = f"; ... ({len(self.per_rank)} ranks)" if len(self.per_rank) > 8 else ""
            lines.append("; ".join(shown) + more)
        if self.backends:
            lines.append("backends: " + ", ".join(f"{b} ({n} tensors)" for b, n in sorted(self.backends.items()))
                         + (f"; {self.engine} engine" if self.engine else ""))
        if self.copied:
            shown = ", ".join(self.copied[:8]) + (f", ... ({len(self.copied)} in all)" if len(self.copied) > 8 else "")
            lines.append(f"not merged (not floating point), copied from the base: {shown}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class _Item:
    name: str
    entry: OutEntry  # the output tensor
    kwargs: Optional[dict]  # merge_from_models arguments; None: copied from inputs[0]
    nbytes_in: int
    in_dtype: Optional[str] = None  # the dtype every input is converted to before merging (see `promote`)
    # (checkpoint, tensor name) of each input: the base, then the models; with `zero_base` the
    # models only (linear, passthrough: θ = Σ cᵢ·(θᵢ − 0)); one entry for a copied tensor.
    inputs: tuple = ()
    zero_base: bool = False
    floating_copy: bool = False  # a copy that is a merge result (passthrough without scale), not a buffer
    params_at: tuple = ()  # (task models, Scope): where cfg.raw_params reads this tensor's settings


def _current_rss() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _peak_rss()


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------

class _Progress:
    """A `\\r` bar on a terminal, else a line every 10% (or every 30 s); on stderr."""

    def __init__(self, total: int, total_bytes: int, enabled: bool, stream=None, label: str = "pyops merge"):
        self.total, self.total_bytes, self.enabled, self.label = total, total_bytes, enabled, label
        self.stream = stream or sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._last_step = -1

    def update(self, done: int, done_bytes: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        rate = done_bytes / 1e9 / elapsed
        text = (f"{done}/{self.total} tensors  {done_bytes / 1e9:.2f}/{self.total_bytes / 1e9:.2f} GB  "
                f"{rate:.2f} GB/s  {elapsed:.0f} s")
        if self.tty:
            if now - self._last_draw < 0.1 and done < self.total:
                return
            self._last_draw = now
            width = 24
            filled = int(width * done_bytes / max(self.total_bytes, 1))
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\x1b[K")
            if done == self.total:
                self.stream.write("\n")
            self.stream.flush()
        else:
            step = 10 * done_bytes // max(self.total_bytes, 1)
            if step > self._last_step or now - self._last_draw > 30 or done == self.total:
                self._last_step, self._last_draw = step, now
                print(f"{self.label}: {text}", file=self.stream, flush=True)

    def abort(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------------------------
# Checks and plan
# --------------------------------------------------------------------------------------------

def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def _check_output(out: Path, cfg: MergeConfig, overwrite: bool) -> None:
    real_out = os.path.realpath(out)
    inputs = cfg.inputs + ([cfg.tokenizer_source] if cfg.tokenizer_source else [])
    for p in inputs:
        rp = os.path.realpath(p)
        if _inside(rp, real_out) or _inside(real_out, rp):
            raise MergeError(f"output {out}: overlaps the input {p}; choose a directory outside every input "
                             f"(inputs are never modified)")
    if os.path.lexists(out):
        if not overwrite:
            raise MergeError(f"output {out}: already exists; pass --overwrite (overwrite=True) to replace it "
                             f"(it is replaced only once the new merge is complete)")
        if not os.path.isdir(out) and not os.path.islink(out):
            raise MergeError(f"output {out}: exists and is not a directory; remove it yourself")


def _open_all(cfg: MergeConfig) -> tuple:
    """(reference checkpoint, task checkpoints, every checkpoint opened, {identity: checkpoint}).

    Each distinct input (model directory and adapter, `ModelEntry.identity`) is opened once; a
    `model+adapter` input is its checkpoint with the adapter applied as each tensor is read
    (`AdaptedCheckpoint`), the adapter's targets checked against the checkpoint's tensors first.
    For `slices:`, the tasks are every distinct source model; the reference is the base (None
    without one)."""
    opened: list = []
    by_id: Dict[tuple, object] = {}

    def open_entry(e: ModelEntry, label: str):
        c = by_id.get(e.identity)
        if c is not None:
            return c
        c = Checkpoint(e.path, label)
        opened.append(c)
        if e.lora is not None:
            c = AdaptedCheckpoint(c, _adapter(e, c), label)
            opened.append(c)
        by_id[e.identity] = c
        return c

    try:
        base = cfg.base_entry
        if base is None and cfg.base is not None:  # a MergeConfig built by hand
            base = ModelEntry(cfg.base, str(cfg.base), "base_model", -1)
        ref = open_entry(base, "the base model") if base is not None else None
        tasks = [open_entry(m, f"{m.key} ({m.written})") for m in cfg.models]
        for sl in cfg.slices or []:
            for s in sl.sources:
                open_entry(s.model, f"{s.model.key} ({s.model.written})")
        if ref is None and not cfg.slices:  # linear / passthrough without a base model: the first model
            ref = tasks[0]
        return ref, tasks, opened, by_id
    except BaseException:
        for c in opened:
            c.close()
        raise


def _adapter(e: ModelEntry, c: Checkpoint):
    """The LoRA adapter of `e`, checked against checkpoint `c`; its errors name the config key."""
    from pyops.merging.lora import LoraAdapter
    try:
        adapter = LoraAdapter.open(e.lora)
        adapter.check_base({n: t.shape for n, t in c.tensors.items()}, f"{e.path}")
    except CheckpointError as exc:
        raise CheckpointError(f"{e.where}: {exc}") from None
    return adapter


def _first(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(x) for x in list(items)[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def promote(codes: Sequence[str]) -> str:
    """The dtype that every one of `codes` (floating safetensors codes) converts to without loss, as
    torch.promote_types folds them: F16 with BF16 is F32, anything with F64 is F64. mergekit 0.1.5
    merges each tensor's inputs in this dtype when the configuration sets no `dtype`
    (mergekit/merge_methods/dtype.py, promoted_dtype) and writes the result in it."""
    out = codes[0]
    for c in codes[1:]:
        if c == out:
            continue
        if "F64" in (c, out):
            out = "F64"
        elif "F32" in (c, out) or {c, out} == {"F16", "BF16"}:
            out = "F32"
    return out


def _plan(cfg: MergeConfig, ref: Checkpoint, tasks: Sequence[Checkpoint], notes: List[str]) -> List[_Item]:
    """One item per tensor of the reference, in its file order (a `models:` configuration). A
    floating tensor's inputs are merged in their promoted dtype (`promote`, lossless), the result
    written in `out_dtype` or `dtype` if the configuration sets one, else in that promoted dtype,
    as mergekit 0.1.5 does."""
    names = set(ref.tensors)
    others = [c for c in tasks if c is not ref]
    for c in others:
        missing = [n for n in ref.tensors if n not in c.tensors]
        if missing:
            raise CheckpointError(f"tensor {missing[0]!r} is missing from {c.label} at {c.path} (it is in {ref.label}); "
                                  f"missing: {_first(missing)}")
        extra = [n for n in c.tensors if n not in names]
        if extra:
            raise CheckpointError(f"{c.label} at {c.path} has tensor {extra[0]!r}, which {ref.label} lacks; "
                                  f"extra: {_first(extra)}")
    promoted: Dict[str, int] = {}  # "F32 (BF16 + F32)" -> tensors merged so
    items: List[_Item] = []
    zero_base = cfg.method in BASELESS or cfg.base is None  # no base input (linear, an optional base not given)
    for name in ref.tensors:
        inputs = tuple((c, name) for c in tasks) if zero_base else ((ref, name),) + tuple((c, name) for c in tasks)
        items.append(_item(cfg, name, inputs, zero_base, cfg.models, Scope(), promoted, (ref, name)))
    _note_promoted(cfg, promoted, notes)
    return items


def _note_promoted(cfg: MergeConfig, promoted: Dict[str, int], notes: List[str]) -> None:
    if promoted:
        shown = ", ".join(f"{n} tensor{'s' if n != 1 else ''} in {k}" for k, n in sorted(promoted.items()))
        out = f"written as {TORCH_NAMES[cfg.out_dtype]}" if cfg.out_dtype else "written in that dtype"
        notes.append(f"inputs of different dtypes are merged in their promoted dtype (torch.promote_types, as "
                     f"mergekit does), {out}: {shown}")


def _item(cfg: MergeConfig, name: str, inputs: tuple, zero_base: bool, models: Sequence[ModelEntry], scope: Scope,
          promoted: Dict[str, int], copy_from: Optional[tuple] = None) -> _Item:
    """The plan of output tensor `name` from `inputs` ((checkpoint, tensor name): the base, unless
    `zero_base`, then one per task model `models`), its parameters read in `scope`. Checks that
    the inputs (and `copy_from`) agree in shape and in being floating point. A non-floating tensor
    is copied from `copy_from` (default: the first input); passthrough's tensor without a scale,
    where the dtype is kept, is its input's."""
    copy_from = copy_from or inputs[0]
    first_c, first_n = copy_from
    info = first_c.tensors[first_n]
    for c, n in inputs:
        t = c.tensors[n]
        if c is first_c and n == first_n:
            continue
        if t.shape != info.shape:
            raise CheckpointError(f"tensor {n!r} has shape {list(t.shape)} in {c.label} at {c.path} but "
                                  f"{list(info.shape)} in {first_c.label}" + (f" ({first_n!r})" if n != first_n else ""))
        if (info.dtype in MERGEABLE) != (t.dtype in MERGEABLE):
            raise CheckpointError(f"tensor {n!r} is {t.dtype} in {c.label} but {info.dtype} in {first_c.label}: "
                                  f"a floating tensor cannot be merged with a non-floating one")
    if info.dtype not in MERGEABLE:
        return _Item(name, OutEntry(name, info.dtype, info.shape), None, info.nbytes, inputs=(copy_from,))
    nbytes_in = info.nbytes * len({(id(c), n) for c, n in inputs + (copy_from,)})
    codes = [c.tensors[n].dtype for c, n in inputs]
    in_dtype = promote(codes)
    if len(set(codes)) > 1:
        key = f"{in_dtype} ({' + '.join(sorted(set(codes)))})"
        promoted[key] = promoted.get(key, 0) + 1
    out_dtype = cfg.out_dtype or in_dtype
    kwargs = cfg.tensor_kwargs(name, models, scope)
    if cfg.method == "passthrough" and kwargs["coeffs"] == [1.0] and out_dtype == in_dtype \
            and cfg.dtype in (None, in_dtype):  # (--compute-dtype config rounds to `dtype` on the way)
        return _Item(name, OutEntry(name, out_dtype, info.shape), None, info.nbytes, in_dtype, inputs=inputs[:1],
                     floating_copy=True)
    if kwargs.get("blocks") == "rows" and not info.shape:
        kwargs["blocks"] = None  # a 0-d tensor (a scale) is one row
    return _Item(name, OutEntry(name, out_dtype, info.shape), kwargs, nbytes_in, in_dtype, inputs=inputs,
                 zero_base=zero_base, params_at=(tuple(models), scope))


def _plan_slices(cfg: MergeConfig, by_id: Dict[tuple, object], notes: List[str]) -> tuple:
    """(items, config.json overrides) of a `slices:` configuration: the tensors
    `pyops.merging.slices.plan` lays out (the first slice's embeddings, every slice's layers
    renumbered from 0, the last slice's final norm and head), each merged from its slice's
    sources with the slice's base and parameters at the slice's gradient t; and the layer count
    (and per-layer lists such as `layer_types`) of the output's config.json."""
    order: List[tuple] = []  # model identities, in order of appearance
    index: Dict[tuple, int] = {}
    for sl in cfg.slices:
        for src in sl.sources:
            if src.model.identity not in index:
                index[src.model.identity] = len(order)
                order.append(src.model.identity)
    ckpts = [by_id[i] for i in order]
    out_slices = [slice_plan.OutputSlice(tuple(slice_plan.SliceSource(index[src.model.identity], src.first, src.end)
                                               for src in sl.sources)) for sl in cfg.slices]
    try:
        planned, n_layers = slice_plan.plan(out_slices, [list(c.tensors) for c in ckpts], [c.label for c in ckpts])
    except slice_plan.SliceError as exc:
        raise ConfigError(f"{cfg.where(exc.key)}: {exc.what}" if exc.key else f"{cfg.source}: {exc.what}") from None
    promoted: Dict[str, int] = {}
    items: List[_Item] = []
    for pt in planned:
        sl = cfg.slices[pt.slice_for_params]
        inputs = [(ckpts[m], n) for m, n in pt.inputs]  # one per source of sl, in its order
        if cfg.method in BASELESS or sl.base is None:
            tasks = list(range(len(inputs)))
            base_at = None
        else:
            base_at = next(j for j, src in enumerate(sl.sources) if src.model.identity == sl.base.identity)
            tasks = [j for j in range(len(inputs)) if j != base_at]
        scope = Scope(sl.params, pt.t, tuple(inputs[j][1] for j in tasks))
        models = [sl.sources[j].model for j in tasks]
        if base_at is None:
            items.append(_item(cfg, pt.name, tuple(inputs), True, models, scope, promoted))
        elif not tasks:  # only the base: nothing to add to it (mergekit: base + λ·0)
            items.append(_base_only(cfg, pt.name, inputs[base_at]))
        else:
            ins = (inputs[base_at],) + tuple(inputs[j] for j in tasks)
            items.append(_item(cfg, pt.name, ins, False, models, scope, promoted))
    _note_promoted(cfg, promoted, notes)
    return items, _layer_config(cfg, n_layers)


def _base_only(cfg: MergeConfig, name: str, source: tuple) -> _Item:
    """A tensor of a slice whose only source is the base: the base's tensor, in the output dtype."""
    c, n = source
    info = c.tensors[n]
    out_dtype = (cfg.out_dtype or info.dtype) if info.dtype in MERGEABLE else info.dtype
    if out_dtype == info.dtype:
        return _Item(name, OutEntry(name, info.dtype, info.shape), None, info.nbytes, info.dtype, inputs=(source,),
                     floating_copy=info.dtype in MERGEABLE)
    kwargs = {"method": "task_arithmetic", "seed": cfg.seed, "name": name, "blocks": None, "coeffs": [1.0]}
    return _Item(name, OutEntry(name, out_dtype, info.shape), kwargs, info.nbytes, info.dtype, inputs=(source,),
                 zero_base=True)


# Per-layer lists of config.json (one entry per layer) that a slices merge rebuilds from the
# layers it takes: transformers 5 refuses a config whose `layer_types` length differs from
# num_hidden_layers.
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None


def _layer_config(cfg: MergeConfig, n_layers: int) -> dict:
    """The keys of the home model's config.json that a slices merge changes: its layer count
    (the first of num_hidden_layers, n_layer, num_layers it has, as mergekit sets the
    architecture's key) and each per-layer list, rebuilt from the config.json of the model each
    output layer comes from (a slice's first source, as mergekit counts layers)."""
    home = _read_json(cfg.home / "config.json") if cfg.home.is_dir() else None
    if not isinstance(home, dict):
        return {}
    out: dict = {}
    key = next((k for k in LAYER_COUNT_KEYS if k in home), None)
    if key is not None:
        out[key] = n_layers
    confs: Dict[Path, object] = {}
    for lk in PER_LAYER_KEYS:
        if not isinstance(home.get(lk), list):
            continue
        values = []
        for sl in cfg.slices:
            src = sl.sources[0]
            conf = confs.setdefault(src.model.path, _read_json(src.model.path / "config.json"))
            got = conf.get(lk) if isinstance(conf, dict) else None
            if not isinstance(got, list) or len(got) < src.end:
                raise CheckpointError(f"{cfg.where(('slices', sl.index, 'sources', 0, 'layer_range'))}: the output's "
                                      f"config.json needs {lk} of layers {src.first}..{src.end - 1} from "
                                      f"{src.model.path / 'config.json'}, which has "
                                      f"{'no list ' + lk if not isinstance(got, list) else f'{len(got)} entries'}")
            values += got[src.first:src.end]
        out[lk] = values
    return out


# --------------------------------------------------------------------------------------------
# The merge
# --------------------------------------------------------------------------------------------

# --compute-dtype: "fp32" (the default): the merge accumulates in fp32 (fp64 for fp64 inputs) and
# rounds once; "config": mergekit 0.1.5's arithmetic, in its dtype and its order, for the methods
# `mergekit_order` follows.
COMPUTE_DTYPES = ("fp32", "config")
MERGEKIT_ORDER = ("task_arithmetic", "linear", "ties", "passthrough")


def _magnitude(delta, density: float):
    """mergekit 0.1.5's magnitude sparsification (mergekit/sparsify.py, `magnitude`, no rescale):
    keeps the k = max(1, int(density·n)) entries first in `argsort(|τ|, descending=True)` (on the
    CPU of |τ| in fp32), exactly k even where magnitudes tie, zeroes the rest (τ · mask in τ's dtype)."""
    import torch
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mags = delta.abs().reshape(-1)
    if mags.device.type == "cpu":
        mags = mags.float()
    mask[torch.argsort(mags, descending=True)[:k]] = 1
    return delta * mask.reshape_as(delta)


def mergekit_order(method: str, base, models: Sequence, weights: Sequence[float], densities: Sequence[float],
                   lam: float, normalize: bool):
    """One tensor merged with mergekit 0.1.5's operations, in its order and in the inputs' dtype
    (`--compute-dtype config`): the tensors `base` and `models` (all of one dtype D, the compute
    dtype; for linear, `models` are every averaged input and `base` is unused) give the same bits
    as mergekit on the same torch build.

    * task_arithmetic / ties (mergekit/merge_methods/generalized_task_arithmetic.py): τᵢ = θᵢ − base
      in D; ties sparsifies each τᵢ by `_magnitude` (exactly k kept); the τᵢ stacked in D, each
      times its weight rounded to D; ties elects the sign of Στᵢ (≥ 0 positive) and sums the agreeing
      entries, dividing by the sum of their weights (normalize, a zero sum read as 1);
      task_arithmetic sums every τᵢ, dividing by Σ wᵢ (normalize, |Σ| < 1e-8 read as 1); then
      × λ where λ ≠ 1, and base + that, in D.
    * linear (mergekit/merge_methods/linear.py): the inputs in D, accumulated as
      Σ θᵢ·wᵢ with `addcmul_` into fp32 (fp64 for fp64 inputs) with fp32 weights, divided by
      Σ wᵢ (normalize), rounded to D.
    * passthrough (mergekit/merge_methods/passthrough.py): the one input in D, times `scale`
      (`weights[0]`; None: the input itself) in D.
    Returns a tensor of dtype D."""
    import torch
    if method == "passthrough":
        return models[0] if weights[0] is None else models[0] * weights[0]
    if method == "linear":
        first = models[0]
        acc = torch.float64 if first.dtype == torch.float64 else torch.float32
        w = torch.tensor([list(weights)], dtype=acc, device=first.device)  # [1 group, N inputs], as mergekit packs
        shape = (1,) + (1,) * first.dim()
        result = torch.zeros((1, *first.shape), dtype=acc, device=first.device)
        for t, c in zip(models, w.unbind(1)):
            result.addcmul_(t.unsqueeze(0), c.reshape(shape))
        if normalize:
            result.div_(w.sum(dim=1).reshape(shape))
        return result.to(first.dtype)[0]
    if method not in ("task_arithmetic", "ties"):
        raise ValueError(f"method: mergekit's operation order is followed for {', '.join(MERGEKIT_ORDER)}, "
                         f"got {method!r}")
    deltas = base.new_empty((len(models), *base.shape))
    for i, m in enumerate(models):
        delta = m - base
        if method == "ties":
            delta = _magnitude(delta, densities[i])
        deltas[i] = delta
        del delta
    w = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device)
    while deltas.dim() > w.dim():
        w.unsqueeze_(-1)
    deltas.mul_(w)
    if method == "ties":
        sign = deltas.sign().to(base.dtype)  # int8_mask changes this dtype only, not the mask
        majority = (deltas.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
        mask = sign == majority
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return (base + mixed).to(base.dtype)


class _TorchEngine:
    """The per-tensor operations of `_stream` on torch tensors: `pyops.merge_from_models` on the
    chosen device and backend (every method, dtype and device). See native_engine.NativeEngine
    for the torch-free one."""

    name = "torch"

    def __init__(self, cfg: MergeConfig, device, backend: str, compute_dtype: str = "fp32"):
        import torch
        self.torch = torch
        self.cfg, self.dev, self.backend, self.compute = cfg, device, backend, compute_dtype
        self.device = str(device)
        self._zeros = None

    def alloc(self, nbytes: int):
        return self.torch.empty(max(nbytes, 1), dtype=self.torch.uint8)

    @staticmethod
    def size(buf) -> int:
        return buf.numel()

    @staticmethod
    def view(buf, entry: OutEntry):
        return buf[:entry.nbytes].view(torch_dtype(entry.dtype)).view(entry.shape)

    @staticmethod
    def map(c: Checkpoint, name: str):
        return c.map(name)

    @staticmethod
    def read(c: Checkpoint, name: str, buf):
        return c.read(name, buf)

    def merge(self, item: _Item, tensors: list, out, tally: Dict[str, int]):
        """The merged tensor; written into `out` (a CPU tensor of the entry's dtype and shape) when given."""
        import pyops
        from pyops import _backend

        torch, cfg, device = self.torch, self.cfg, self.dev
        base = tensors[0]  # None: a zero base (item.zero_base)
        if item.kwargs is None:
            return base if out is None else out.copy_(base)
        models = tensors[1:]
        out_dtype = torch_dtype(item.entry.dtype)
        if (base if base is not None else models[0]).numel() == 0:
            return torch.empty(item.entry.shape, dtype=out_dtype)
        if device.type != "cpu":
            base = base.to(device) if base is not None else None
            models = [m.to(device) for m in models]
        # --compute-dtype config: mergekit's arithmetic in the configured dtype (its LoadTensor casts
        # every input to `dtype`), else in the promoted one; otherwise the promoted dtype, lossless.
        in_dtype = torch_dtype(self.cfg.dtype if (self.compute == "config" and self.cfg.dtype) else item.in_dtype)
        base = base if (base is None or base.dtype == in_dtype) else base.to(in_dtype)
        models = [m if m.dtype == in_dtype else m.to(in_dtype) for m in models]
        if self.compute == "config":
            raw = cfg.raw_params(item.name, *item.params_at) if item.params_at else cfg.raw_params(item.name)
            with torch.no_grad():
                if cfg.method == "passthrough":
                    result = mergekit_order("passthrough", None, models, [raw["scale"]], [], 1.0, False)
                else:
                    result = mergekit_order(cfg.method, base, models, raw["weights"], raw["densities"], raw["lam"],
                                            raw["normalize"])
                result = result.to(out_dtype)
            tally["mergekit-order"] = tally.get("mergekit-order", 0) + 1
            if out is None:
                return result
            return out.copy_(result)
        if "mergekit" in item.kwargs:  # mergekit's interpolating methods (pyops.merging.interpolate)
            from pyops.merging.interpolate import merge_tensors
            with torch.no_grad():
                result = merge_tensors(item.kwargs["mergekit"], base, models, item.kwargs["params"],
                                       out_dtype=out_dtype, backend=self.backend if self.backend in ("cpu", "reference")
                                       else "auto")
            tally[item.kwargs["mergekit"]] = tally.get(item.kwargs["mergekit"], 0) + 1
            return result if out is None or out.device != result.device else out.copy_(result)
        if base is None:  # θ = Σ cᵢ·(θᵢ − 0): one zero buffer, its pages never written
            m0 = models[0]
            if self._zeros is None or self._zeros.numel() < m0.numel() or self._zeros.dtype != m0.dtype \
                    or self._zeros.device != m0.device:
                self._zeros = torch.zeros(m0.numel(), dtype=m0.dtype, device=m0.device)
            base = self._zeros[:m0.numel()].view(m0.shape)
        if out is not None and device.type != "cpu":
            out = None  # merged on the device, copied to the host by the writer
        with torch.no_grad():
            if out is None:
                out = pyops.merge_from_models(base, models, out_dtype=out_dtype, backend=self.backend, **item.kwargs)
            else:
                pyops.merge_from_models(base, models, out=out, backend=self.backend, **item.kwargs)
        op = "task_arithmetic" if cfg.pyops_method == "task_arithmetic" else "merge"
        choice = _backend.last_choice(op)
        if choice is not None:
            tally[choice.backend] = tally.get(choice.backend, 0) + 1
        return out

    @contextlib.contextmanager
    def running(self, threads: Optional[int]):
        """torch's thread count set for the merge, the kernels called without the dispatcher."""
        from pyops import _backend
        torch = self.torch
        old_threads = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            # No tracing or autograd here: the kernels run without the op dispatcher, whose first
            # call would import torch._dynamo, a large import a one-shot command need not pay.
            with _backend.direct_kernels():
                yield
        finally:
            if threads is not None:
                torch.set_num_threads(old_threads)


class _BytePool:
    """Reusable byte buffers, kept by exact size.

    Reading every tensor into fresh memory costs a page fault per 4 KiB, and the first write of
    new memory can be slower than the read itself. A transformer's tensors repeat a handful of
    shapes layer after layer, so buffers released after a tensor is merged (inputs) or written
    (outputs) are handed out again for the next tensor of that size and their pages are touched
    once. Idle buffers are capped at `max_idle` bytes, the least recently released going back to
    the allocator first, so that buffers idle from the first tensor to the last (the embedding's)
    cannot fill the cap and leave every layer's buffers fresh. The memory stays a few tensors'
    worth whatever the model size. The engine allocates and sizes the buffers (torch
    uint8 tensors, or native RawBuffers)."""

    def __init__(self, max_idle: int, engine):
        self.max_idle = max_idle
        self.engine = engine
        self._idle_bufs: list = []  # (nbytes, buffer), least recently released first
        self._idle = 0
        self._lock = threading.Lock()

    def acquire(self, nbytes: int):
        with self._lock:
            for i in range(len(self._idle_bufs) - 1, -1, -1):
                if self._idle_bufs[i][0] == nbytes:
                    self._idle -= nbytes
                    return self._idle_bufs.pop(i)[1]
        return self.engine.alloc(nbytes)

    def release(self, buf) -> None:
        nbytes = self.engine.size(buf)
        if nbytes > self.max_idle:
            return
        with self._lock:
            self._idle_bufs.append((nbytes, buf))
            self._idle += nbytes
            while self._idle > self.max_idle:
                self._idle -= self._idle_bufs.pop(0)[0]


def _load(item: _Item, engine, pool: Optional[_BytePool] = None) -> tuple:
    """(tensors, buffers): the item's inputs (None first for a zero base), each distinct input
    read once; the pool buffers they live in."""
    bufs: list = []

    def read(c, name: str):
        if pool is None:
            return c.read(name)
        if os.environ.get("PYOPS_MERGE_MAP", "1") == "1":
            try:
                return engine.map(c, name)
            except (OSError, ValueError):  # a file system that cannot map: read into a pool buffer
                pass
        bufs.append(pool.acquire(c.tensors[name].nbytes))
        return engine.read(c, name, bufs[-1])

    seen: Dict[tuple, object] = {}
    tensors: list = [None] if (item.zero_base and item.kwargs is not None) else []
    for c, name in item.inputs:
        key = (id(c), name)
        if key not in seen:
            seen[key] = read(c, name)
        tensors.append(seen[key])
    return tensors, bufs


def _stream(order: List[_Item], shards, files, tmp: Path, engine, report: MergeReport, bar: _Progress, overlap: bool,
            tick: Optional[Callable[[], None]] = None) -> int:
    """Read, merge and write every tensor, in shard order. With `overlap`, the next tensor is read
    and the previous result written on two helper threads while the current one merges (file I/O
    and the kernels release the GIL). `tick` is called after each tensor (a distributed merge
    reports its progress and stops there when another rank failed). Returns the largest RSS seen
    after a tensor."""
    rss_seen = 0
    writers: List[ShardWriter] = []
    largest = max((it.entry.nbytes for it in order), default=0)
    on_cpu = engine.device == "cpu"
    pool = _BytePool(max(_POOL_IDLE_BYTES, 2 * largest), engine) if on_cpu else None

    def load(p: int) -> tuple:
        return _load(order[p], engine, pool)

    def write(writer: ShardWriter, name: str, result, out_buf) -> None:
        writer.write_tensor(name, result)
        if out_buf is not None:
            pool.release(out_buf)

    with ThreadPoolExecutor(1, thread_name_prefix="pyops-merge-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="pyops-merge-write") as writer_pool:
        pending_read = reader.submit(load, 0) if (overlap and order) else None
        pending_writes: List = []  # at most _WRITES_IN_FLIGHT, oldest first
        pos = 0
        try:
            for shard, fname in zip(shards, files):
                writer = ShardWriter(tmp / fname, shard)
                writers.append(writer)
                for entry in shard:
                    item = order[pos]
                    # The inputs of position pos + 1 are mapped (or read into pool buffers) while pos
                    # merges; output pos takes a pool buffer that no queued write still holds (a
                    # buffer goes back to the pool only once its tensor is on disk). A tensor copied
                    # from the base is written straight from its input.
                    tensors, in_bufs = pending_read.result() if pending_read is not None else load(pos)
                    pos += 1
                    pending_read = reader.submit(load, pos) if (overlap and pos < len(order)) else None
                    out_buf = pool.acquire(entry.nbytes) if (pool is not None and item.kwargs is not None) else None
                    out_view = engine.view(out_buf, entry) if out_buf is not None else None
                    result = engine.merge(item, tensors, out_view, report.backends)
                    del tensors, out_view
                    if pool is not None:
                        for b in in_bufs:
                            pool.release(b)
                    del in_bufs
                    while len(pending_writes) >= _WRITES_IN_FLIGHT:
                        pending_writes.pop(0).result()  # an earlier tensor is on disk (or its error raised here)
                    if overlap:
                        pending_writes.append(writer_pool.submit(write, writer, item.name, result, out_buf))
                    else:
                        write(writer, item.name, result, out_buf)
                    del out_buf
                    del result
                    if item.kwargs is None and not item.floating_copy:
                        report.copied.append(item.name)
                    else:
                        report.merged += 1
                    report.bytes_read += item.nbytes_in
                    report.bytes_written += entry.nbytes
                    bar.update(pos, report.bytes_read)
                    rss_seen = max(rss_seen, _current_rss())
                    if tick is not None:
                        tick()
                while pending_writes:
                    pending_writes.pop(0).result()
                writer.close()
        except BaseException:
            for f in pending_writes + [pending_read]:  # let the helpers finish before the files go
                if f is not None:
                    wait([f])
            for w in writers:
                w.abort()
            raise
    return rss_seen


def model_dtype(shards) -> Optional[str]:
    """The dtype that the merged model's config.json names: that of its floating tensors (the one
    holding the most elements where they differ: transformers' `PreTrainedModel.dtype` is its first
    floating parameter's); None without floating tensors."""
    counts: Dict[str, int] = {}
    for shard in shards:
        for e in shard:
            if e.dtype in MERGEABLE:
                counts[e.dtype] = counts.get(e.dtype, 0) + (e.nbytes // max(ITEMSIZES[e.dtype], 1))
    return max(counts, key=lambda c: counts[c]) if counts else None


def config_with_dtype(conf: dict, dtype_name: str) -> dict:
    """`conf` (a config.json object) as transformers 5's `save_pretrained` writes it for a model of
    `dtype_name`: the dtype under "dtype" and no "torch_dtype" (transformers 5 reads "torch_dtype"
    only when "dtype" is absent, and never writes it), in the top level and in every sub-config
    that names a dtype (from_pretrained gives sub-configs the model's dtype)."""
    out = {}
    for key, value in conf.items():
        if key == "torch_dtype":
            continue
        if isinstance(value, dict) and ("dtype" in value or "torch_dtype" in value):
            value = config_with_dtype(value, dtype_name)
        out[key] = value
    out["dtype"] = dtype_name
    return out


def _template_of(model_dir: Path) -> Optional[str]:
    """A model's chat template as transformers loads it: chat_template.jinja, else tokenizer_config.json's
    `chat_template` (a string, or a list of named templates: the "default" one); stripped."""
    jinja = model_dir / "chat_template.jinja"
    try:
        if jinja.is_file():
            return jinja.read_text("utf-8").strip() or None
        conf = json.loads((model_dir / "tokenizer_config.json").read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    t = conf.get("chat_template") if isinstance(conf, dict) else None
    if isinstance(t, list):
        t = next((e.get("template") for e in t if isinstance(e, dict) and e.get("name") == "default"), None)
    return (t.strip() or None) if isinstance(t, str) else None


def _chat_template(cfg: MergeConfig, copy_tokenizer: bool) -> Optional[str]:
    """The Jinja text `chat_template:` asks for (None: "auto" found no template, the tokenizer is
    copied as it is). mergekit 0.1.5 (mergekit/merge.py) re-serialises the tokenizer with the
    template set; pyops copies the tokenizer files and writes the template where transformers 5's
    save_pretrained puts it. "auto": the most common template among the inputs (base, models,
    slice sources, in the configuration's order; a tie goes to the first — mergekit's order is a
    set's). A template that cannot be written is an error, not a note."""
    def error(message: str) -> ConfigError:
        return cfg.doc.error(("chat_template",), message) if cfg.doc is not None else ConfigError(
            f"{cfg.source}: chat_template: {message}")

    if not copy_tokenizer:
        raise error("the template is written with the tokenizer files, which --no-copy-tokenizer leaves out")
    src = cfg.tokenizer_source or cfg.home
    if not (src / "tokenizer_config.json").is_file():
        raise error(f"the tokenizer source {src} has no tokenizer_config.json to set the template on")
    if cfg.chat_template != "auto":
        return cfg.chat_template
    dirs: List[Path] = [cfg.base] if cfg.base is not None else []
    dirs += [m.path for m in cfg.models]
    for sl in cfg.slices or ():
        dirs += [src_.model.path for src_ in sl.sources]
    seen, found = set(), []
    for d in dirs:
        if d in seen:
            continue
        seen.add(d)
        t = _template_of(d)
        if t is not None:
            found.append(t)
    return collections.Counter(found).most_common(1)[0][0] if found else None


def _write_chat_template(tmp: Path, text: str, report: MergeReport) -> None:
    """chat_template.jinja holds the template (as transformers 5 writes it: the text as is) and
    tokenizer_config.json no `chat_template` key (which transformers would prefer over nothing)."""
    conf_path = tmp / "tokenizer_config.json"
    try:
        conf = json.loads(conf_path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        conf = None
    if isinstance(conf, dict) and "chat_template" in conf:
        del conf["chat_template"]
        conf_path.write_text(json.dumps(conf, indent=2, sort_keys=True, ensure_ascii=False) + "\n", "utf-8")
    (tmp / "chat_template.jinja").write_text(text, "utf-8")
    if "chat_template.jinja" not in report.files:
        report.files.append("chat_template.jinja")


def _copy_files(cfg: MergeConfig, tmp: Path, copy_tokenizer: bool, report: MergeReport,
                dtype: Optional[str] = None, layer_config: Optional[dict] = None) -> None:
    """config.json (its dtype set to `dtype`, a safetensors code, see `config_with_dtype`, and the
    keys of `layer_config` replaced: a slices merge's layer count; written as transformers writes
    it: sorted keys, 2-space indent), generation_config.json and the tokenizer files, then the
    configuration itself."""
    home = cfg.home if cfg.home.is_dir() else None
    sources = [(home, CONFIG_FILES)]
    if copy_tokenizer:
        sources.append((cfg.tokenizer_source or home, TOKENIZER_FILES))
    for src_dir, names in sources:
        if src_dir is None:
            continue
        for fname in names:
            src = src_dir / fname
            if not src.is_file():
                continue
            dst = tmp / fname
            if fname == "config.json" and (dtype is not None or layer_config):
                try:
                    conf = json.loads(src.read_text("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                    conf = None
                if isinstance(conf, dict):
                    conf = {**conf, **(layer_config or {})}
                    if dtype is not None:
                        conf = config_with_dtype(conf, TORCH_NAMES[dtype])
                    with open(dst, "x", encoding="utf-8") as fh:
                        fh.write(json.dumps(conf, indent=2, sort_keys=True) + "\n")
                    report.files.append(fname)
                    continue
            shutil.copyfile(src, dst)
            report.files.append(fname)
    if copy_tokenizer and cfg.chat_template is not None:
        _write_chat_template(tmp, cfg.chat_template, report)
    with open(tmp / CONFIG_COPY, "x", encoding="utf-8") as fh:
        fh.write(cfg.text if cfg.text.endswith("\n") else cfg.text + "\n")
    report.files.append(CONFIG_COPY)


def _install(tmp: Path, out: Path) -> None:
    """Rename the finished temporary directory to `out` (moving an existing `out` away first)."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    old = out.parent / f"{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def _host_tag() -> str:
    """This machine's host name as it appears in a distributed merge's temporary directory: the
    characters a file name can always hold ([A-Za-z0-9._-]), anything else as "_"."""
    name = socket.gethostname() or "localhost"
    return "".join(c if (c.isascii() and (c.isalnum() or c in "._-")) else "_" for c in name)


def _tmp_name(out: Path, pid: int, host: Optional[str] = None) -> Path:
    """The temporary directory that process `pid` writes the merge into `out` in: `OUT.tmp-<pid>`
    for a single process; `OUT.tmp-<pid>@<host>` for a distributed merge, whose rank 0 (`pid`)
    runs on `host` while the directory sits on storage that other machines share, where a pid
    alone does not say which machine's process it is."""
    return out.parent / (f"{out.name}.tmp-{pid}" + (f"@{host}" if host is not None else ""))


def _remove_stale_tmp(out: Path) -> None:
    """Removes the temporary directories `OUT.tmp-<pid>` and `OUT.tmp-<pid>@<this host>` of earlier
    merges into `out` whose process no longer exists (a merge killed by SIGKILL, or the machine
    going down, cannot remove its own), saying so on stderr. One whose process still runs (another
    merge into the same output, or an unrelated process that reused the pid) is left alone; so is
    anything that is not a plain directory of exactly that name. A pid can only be checked on its
    own machine: `OUT.tmp-<pid>@<other host>` (a distributed merge whose rank 0 ran elsewhere) is
    always left alone, and a bare `OUT.tmp-<pid>` is taken to be this machine's."""
    prefix = f"{out.name}.tmp-"
    here = _host_tag()
    try:
        names = os.listdir(out.parent)
    except OSError:
        return
    for name in names:
        if not name.startswith(prefix):
            continue
        digits, at, host = name[len(prefix):].partition("@")
        if not (digits.isascii() and digits.isdigit()) or str(int(digits)) != digits:
            continue
        if at and host != here:
            continue  # another machine's process: it cannot be checked from here
        pid = int(digits)
        if pid == os.getpid():
            continue  # this process's own name: run_merge replaces it
        try:
            os.kill(pid, 0)
            continue  # alive
        except ProcessLookupError:
            pass  # gone: the directory is stale
        except PermissionError:
            continue  # alive, another user's
        except (OverflowError, OSError):
            pass  # beyond the pid range (or EINVAL): no process could have written it
        path = out.parent / name
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                continue
        except OSError:
            continue
        print(one_line(f"pyops merge: removing {path}, left by an earlier merge (process {pid}) that did not "
                       f"finish"), file=sys.stderr, flush=True)
        shutil.rmtree(path, ignore_errors=True)


def _output_error(exc: OSError, out: Path, nbytes: int) -> OutputError:
    """The one-line error for an OSError met while creating or writing the output."""
    what = exc.strerror or str(exc) or type(exc).__name__
    where = f": {exc.filename}" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        size = f"{nbytes / 1e9:.2f} GB" if nbytes >= 10**7 else f"{nbytes / 1e6:.2f} MB"
        hint = f"; the merged model needs {size}: free space there or choose another --out"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = "; choose a writable --out"
    else:
        hint = ""
    return OutputError(f"output {out}: cannot be written ({what}{where}){hint}; the partial output was removed")


def _check_device(device):
    """"cpu" as given (no torch needed), else a checked torch.device."""
    if isinstance(device, str) and device.strip() == "cpu":
        return "cpu"
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise MergeError(f"device: expected cpu or cuda, got {device!r} ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergeError("device: cuda was asked for, but CUDA is not available here (torch "
                         f"{torch.__version__}); use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise MergeError(f"device: expected cpu or cuda, got {device!r}")
    return dev


def _engine(cfg: MergeConfig, dev, backend: str, threads: Optional[int], opened: Sequence[Checkpoint],
            items: Sequence[_Item], compute_dtype: str = "fp32"):
    """The native engine where it can run the merge (see native_engine.reason), else torch's
    (always for --compute-dtype config: mergekit's arithmetic is torch's)."""
    if compute_dtype == "fp32" and native_engine.reason(cfg, dev, backend, opened, items) is None:
        return native_engine.NativeEngine(cfg, threads)
    import torch
    return _TorchEngine(cfg, torch.device(dev) if isinstance(dev, str) else dev, backend, compute_dtype)


@dataclass
class _Prepared:
    """A merge validated and planned (phases 1 and 2), nothing created yet."""
    cfg: MergeConfig
    dev: object  # "cpu" or a torch.device
    shard_bytes: int
    out: Path
    report: MergeReport
    opened: List[Checkpoint]
    items: List[_Item]
    compute_dtype: str = "fp32"
    layer_config: dict = field(default_factory=dict)  # config.json keys a slices merge changes

    def close(self) -> None:
        for c in self.opened:
            c.close()


def _prepare(config, out_dir, overwrite: bool, device, shard_size, backend: str, threads, rss_before: int,
             compute_dtype: str = "fp32", copy_tokenizer: bool = True) -> _Prepared:
    """Reads and checks the configuration, the arguments, the output path and every input header,
    and plans the output; raises `MergeError` before anything is created."""
    cfg = load_config(config)
    if cfg.chat_template is not None:
        cfg = dataclasses.replace(cfg, chat_template=_chat_template(cfg, copy_tokenizer))
    if compute_dtype not in COMPUTE_DTYPES:
        raise MergeError(f"compute_dtype: expected one of {', '.join(COMPUTE_DTYPES)}, got {compute_dtype!r}")
    if compute_dtype == "config" and cfg.method not in MERGEKIT_ORDER:
        raise MergeError(f"--compute-dtype config: mergekit's arithmetic is reproduced for "
                         f"{', '.join(MERGEKIT_ORDER)}, not {cfg.method} (run without it: fp32 accumulation, "
                         f"rounded once)")
    dev = _check_device(device)
    if not isinstance(backend, str) or backend not in BACKEND_CHOICES:
        raise MergeError(f"backend: expected 'auto' or one of {BACKEND_CHOICES[1:]}, got {backend!r}")
    try:
        shard_bytes = parse_size(shard_size)
    except ValueError as exc:
        raise MergeError(str(exc)) from None
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise MergeError(f"threads: expected a positive int, got {threads!r}")
    out = Path(os.path.abspath(os.path.expanduser(os.fspath(out_dir))))
    _check_output(out, cfg, overwrite)
    report = MergeReport(out_dir=out, method=cfg.method, device=str(dev), notes=list(cfg.notes),
                         rss_before=rss_before)
    ref, tasks, opened, by_id = _open_all(cfg)
    layer_config: dict = {}
    try:
        if cfg.slices:
            items, layer_config = _plan_slices(cfg, by_id, report.notes)
        else:
            items = _plan(cfg, ref, tasks, report.notes)
    except BaseException:
        for c in opened:
            c.close()
        raise
    if compute_dtype == "config":
        report.notes.append(f"--compute-dtype config: mergekit's {cfg.method} arithmetic in "
                            f"{TORCH_NAMES[cfg.dtype] if cfg.dtype else 'the inputs promoted dtype'}, its order of "
                            f"operations and its exact-k TIES selection")
    return _Prepared(cfg, dev, shard_bytes, out, report, opened, items, compute_dtype, layer_config)


@contextlib.contextmanager
def _collector_quiet():
    """The collector's passes over every object alive before the merge (torch, pyops) would be
    pure overhead: those are frozen (the merge's own cycles are still collected; they hold
    tensors, and mapped ones pin their pages). A merge allocates a few hundred small objects per
    tensor, so the young generation's threshold is raised to 20 000 allocations: a collection
    every several tensors instead of a few per tensor."""
    gc.freeze()
    threshold = gc.get_threshold()
    gc.set_threshold(20_000, *threshold[1:])
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def _write_rest(tmp: Path, shards, files, cfg: MergeConfig, copy_tokenizer: bool, report: MergeReport,
                layer_config: Optional[dict] = None) -> None:
    """Phase 4: the index (when there are several shards), the config and tokenizer files and the
    configuration, into the temporary directory."""
    if len(shards) > 1:
        write_index(tmp / INDEX_FILE, shards, files)
    _copy_files(cfg, tmp, copy_tokenizer, report, model_dtype(shards), layer_config)


def run_merge(
    config: Union[str, os.PathLike, dict, MergeConfig],
    out_dir: Union[str, os.PathLike],
    *,
    overwrite: bool = False,
    device="cpu",
    shard_size: Union[str, int] = "5GB",
    backend: str = "auto",
    progress: bool = True,
    copy_tokenizer: bool = True,
    threads: Optional[int] = None,
    prefetch: bool = True,
    group=None,
    dist_timeout: Optional[float] = None,
    compute_dtype: str = "fp32",
) -> MergeReport:
    """Merge whole checkpoints as a mergekit YAML describes, into a new directory `out_dir`.

    Args:
        config: a YAML file path, YAML text, a dict of the same structure, or a `MergeConfig`.
        out_dir: the output directory; must not exist unless `overwrite` (then it is replaced
            only after the new model is complete).
        device: where the tensors are merged ("cpu", "cuda", "cuda:1", or a torch.device);
            files are read and written on the host either way. In a distributed merge "cuda"
            means cuda:LOCAL_RANK.
        shard_size: the most bytes per output shard ("5GB", "500MB", "2GiB", an int).
        backend: the pyops backend for every tensor ("auto", "reference", "cpu", "triton", "cuda").
        progress: print progress on stderr (rank 0 only in a distributed merge).
        copy_tokenizer: copy the tokenizer files of the base (or `tokenizer_source`).
        threads: CPU threads for the merge (default: torch's thread count if torch is loaded,
            else OMP_NUM_THREADS or the CPUs available; torch's setting is restored afterwards;
            in a distributed merge, the CPUs available divided by the ranks on this machine).
        prefetch: read the next tensor and write the previous one on helper threads while the
            current one merges (False: everything on the calling thread, one tensor at a time).
        group: a `torch.distributed` process group whose ranks all call `run_merge` with the
            same arguments and split the merge between them (a group of one rank: a single
            process). None: distributed when the environment says the process runs under
            torchrun (WORLD_SIZE > 1), on the default group if torch.distributed is initialised,
            else on one initialised here from RANK, MASTER_ADDR and MASTER_PORT (destroyed before
            returning); a single process otherwise. False: a single process whatever the
            environment (one rank of a distributed job merging alone).
        dist_timeout: seconds (default 600) after which a rank that has stopped answering
            (killed, hung) makes the others fail instead of waiting forever; also the timeout
            of a process group initialised here.
        compute_dtype: "fp32" (default): accumulate in fp32 (fp64 for fp64 inputs) and round
            once to the output dtype. "config": reproduce mergekit 0.1.5's arithmetic, in the
            configuration's `dtype` (else the inputs' promoted dtype) and in mergekit's order of
            operations (`mergekit_order`), for task_arithmetic, linear and ties (other methods:
            MergeError); on the torch engine.

    Returns a `MergeReport` (in a distributed merge, the whole merge's on every rank). Raises
    `MergeError` (`ConfigError`, `CheckpointError`) for bad input, before anything is written, and
    `OutputError` (a `MergeError`) when the output cannot be written; on any failure nothing is
    left at `out_dir` or beside it. A temporary directory that an earlier, killed merge left
    beside `out_dir` is removed (with a line on stderr) once its process is gone.

    A CPU merge of float32 / float16 / bfloat16 checkpoints on the C++ kernels (every method but
    model_stock) runs on the native engine, without importing torch (unless distributed); the
    rest goes through `pyops.merge_from_models` (`report.engine` says which). Both write the same
    bytes, and a distributed merge writes the same tensors as a single process.
    """
    if dist_timeout is None:
        dist_timeout = DIST_TIMEOUT
    if isinstance(dist_timeout, bool) or not isinstance(dist_timeout, (int, float)) or not 0 < dist_timeout < 1e9:
        raise MergeError(f"dist_timeout: expected a positive number of seconds, got {dist_timeout!r}")
    ranks = _Ranks.find(group, device, float(dist_timeout))
    if ranks is not None:
        try:
            return _run_ranks(ranks, config, out_dir, overwrite=overwrite, device=device, shard_size=shard_size,
                              backend=backend, progress=progress, copy_tokenizer=copy_tokenizer, threads=threads,
                              prefetch=prefetch, compute_dtype=compute_dtype)
        finally:
            ranks.close()

    t_start = time.perf_counter()
    rss_before = _current_rss()
    prep = _prepare(config, out_dir, overwrite, device, shard_size, backend, threads, rss_before, compute_dtype,
                    copy_tokenizer)
    cfg, dev, out, report, items = prep.cfg, prep.dev, prep.out, prep.report, prep.items
    tmp: Optional[Path] = None
    rss_seen = rss_before
    made_parents: List[Path] = []
    bar = None
    out_bytes = 0
    try:
        out_bytes = sum(it.entry.nbytes for it in items)
        shards = plan_shards([it.entry for it in items], prep.shard_bytes)
        files = shard_names(len(shards))
        report.tensors = len(items)
        report.shards = len(shards)
        total_in = sum(it.nbytes_in for it in items)
        _check_output(out, cfg, overwrite)  # again, right before creating anything

        _make_parents(out, made_parents)
        _remove_stale_tmp(out)
        tmp = _tmp_name(out, os.getpid())
        if os.path.lexists(tmp):
            shutil.rmtree(tmp)
        tmp.mkdir()
        engine = _engine(cfg, dev, backend, threads, prep.opened, items, compute_dtype)
        report.engine = engine.name

        bar = _Progress(len(items), total_in, progress)
        by_name = {it.name: it for it in items}
        order = [by_name[e.name] for shard in shards for e in shard]
        with _collector_quiet(), engine.running(threads):
            rss_seen = _stream(order, shards, files, tmp, engine, report, bar, prefetch)
        _write_rest(tmp, shards, files, cfg, copy_tokenizer, report, prep.layer_config)
        _install(tmp, out)
        tmp = None
    except BaseException as exc:
        if bar is not None:
            bar.abort()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_parents(made_parents)
        if isinstance(exc, OSError):  # the inputs' errors are CheckpointErrors: this is the output's
            raise _output_error(exc, out, out_bytes) from None
        raise
    finally:
        prep.close()
    report.seconds = time.perf_counter() - t_start
    # ru_maxrss (the kernel's high-water mark, updated lazily) and the RSS sampled after each tensor.
    report.peak_rss = max(_peak_rss(), rss_before, rss_seen, _current_rss())
    return report


def _make_parents(out: Path, made: List[Path]) -> None:
    """Creates the missing parents of `out`, outermost first, appending each to `made` (so that
    the caller removes them again should a later one fail)."""
    for parent in reversed(out.parents):
        if not parent.exists():
            parent.mkdir()
            made.append(parent)


def _remove_parents(made: List[Path]) -> None:
    for parent in reversed(made):
        try:
            parent.rmdir()
        except OSError:
            pass


# --------------------------------------------------------------------------------------------
# Several processes: torchrun, or run_merge(group=...)
# --------------------------------------------------------------------------------------------

DIST_TIMEOUT = 600.0  # seconds; see run_merge's dist_timeout
# Test hook, read here only: "R" ends rank R with os._exit(1) after its first tensor (a killed
# process); "R:raise" makes it raise a CheckpointError there (a rank that cannot read its input).
_FAIL_HOOK = "PYOPS_MERGE_TEST_FAIL_RANK"
_ENV_NEEDED = ("RANK", "MASTER_ADDR", "MASTER_PORT")


class _Lost(MergeError):
    """Another rank cannot be reached or stopped answering (killed, hung, timed out)."""


class _PeerFailed(Exception):
    """Another rank reported a failure: this one stops merging (its status says why)."""


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise MergeError(f"{name}: expected an integer (torchrun sets it), got {value!r}") from None


def _cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class _Ranks:
    """This process's place in a distributed merge, and the coordination between the ranks.

    The ranks exchange a few small messages and never tensors. The first exchange (each rank's
    plan, to check that they agree) is an `all_gather_object` on the group. Every later one goes
    through the process group's key-value store (the TCPStore that torchrun's agent or rank 0
    serves) under a prefix unique to this merge, polled with a deadline: waiting on the store
    never blocks inside a collective, so a rank whose peer stops answering fails after
    `timeout` seconds, cleans up and exits instead of hanging (or, with NCCL, being aborted
    without cleaning up). Waiting for the ranks to finish their tensors is timed from each
    peer's last finished tensor, not from the start of the wait, so ranks that take minutes
    longer than others (a slower disk) are waited for as long as they make progress.
    Keys: prog/R (tensors R finished, a counter), failures (a counter), tmp, status/R, final, ack/R.
    """

    def __init__(self, dist, group, rank: int, size: int, timeout: float, owned: bool):
        self.dist, self.group, self.rank, self.size, self.timeout, self.owned = dist, group, rank, size, timeout, owned
        self.store = None
        self._last_tick = 0.0
        self._ticks = 0  # tensors finished since the last count posted
        self._finished = 0
        self._hook = os.environ.get(_FAIL_HOOK, "")

    # -- joining ------------------------------------------------------------------------------

    @classmethod
    def find(cls, group, device, timeout: float) -> "Optional[_Ranks]":
        """The distributed merge this process takes part in, or None for a single process."""
        if group is False:
            return None
        owned = False
        if group is None:
            world = _env_int("WORLD_SIZE")
            if world is None or world <= 1:
                return None  # not under torchrun: the single-process merge, torch not even imported
            import torch.distributed as dist
            if dist.is_available() and dist.is_initialized():
                group = dist.group.WORLD
            else:
                group = cls._init_from_env(world, device, timeout)
                owned = True
        import torch.distributed as dist
        if not dist.is_initialized():
            raise MergeError("group: a process group was given but torch.distributed is not initialised")
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        if rank < 0:
            raise MergeError("group: this process is not a member of the process group it was given")
        if size == 1:
            if owned:
                dist.destroy_process_group()
            return None
        return cls(dist, group, rank, size, timeout, owned)

    @staticmethod
    def _init_from_env(world: int, device, timeout: float):
        import datetime
        missing = [k for k in _ENV_NEEDED if not os.environ.get(k)]
        if missing:
            raise MergeError(f"WORLD_SIZE={world} asks for a distributed merge, but {', '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} not set: start it with torchrun")
        rank = _env_int("RANK")
        if not 0 <= rank < world:
            raise MergeError(f"RANK: expected 0 <= RANK < WORLD_SIZE={world}, got {rank}")
        import torch.distributed as dist
        if not dist.is_available():
            raise MergeError("torch.distributed is not available in this torch build: run a single process")
        # Object exchanges run on gloo (CPU); NCCL is there for a GPU merge's group but carries nothing.
        on_cuda = str(device).strip().startswith("cuda")
        backend = "cpu:gloo,cuda:nccl" if on_cuda and dist.is_nccl_available() else "gloo"
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        except Exception as exc:  # DistNetworkError, RuntimeError, ValueError: the rendezvous failed
            raise _Lost(f"rank {rank} of {world}: cannot join the other ranks at "
                        f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({type(exc).__name__}: "
                        f"{exc})") from None
        return dist.group.WORLD

    def close(self) -> None:
        if self.owned and self.dist.is_initialized():
            self.dist.destroy_process_group()

    # -- exchanges ------------------------------------------------------------------------------

    def where(self) -> str:
        return f"rank {self.rank} of {self.size}"

    def gather(self, obj) -> list:
        """Every rank's `obj`, rank order (a collective on the group)."""
        out = [None] * self.size
        try:
            self.dist.all_gather_object(out, obj, group=self.group)
        except Exception as exc:  # a peer is gone, or the group's timeout expired
            raise _Lost(f"{self.where()}: lost the other ranks while exchanging the plan "
                        f"({type(exc).__name__}: {exc})") from None
        return out

    def attach(self, token: str) -> None:
        """Uses the default group's store under a prefix that rank 0 drew for this merge."""
        from torch.distributed.distributed_c10d import _get_default_store
        self.store = self.dist.PrefixStore(f"pyops_merge/{token}/", _get_default_store())

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except Exception as exc:  # the store is gone (its host died) or refused
            raise _Lost(f"{self.where()}: lost the other ranks ({what} on the rendezvous store: "
                        f"{type(exc).__name__}: {exc})") from None

    def post(self, key: str, value: dict) -> None:
        self._call(f"set {key}", self.store.set, key, json.dumps(value))

    def flag_failure(self) -> None:
        """Tells the other ranks to stop at their next tensor (best effort: a failing rank may
        have lost the store too)."""
        try:
            self.store.add("failures", 1)
        except Exception:
            pass

    def tick(self) -> None:
        """After each tensor: counts this rank's progress and stops it (raises `_PeerFailed`) when
        another rank failed. At most 20 round trips a second."""
        self._ticks += 1
        self._finished += 1
        if self._hook and self._finished == 1:
            rank, _, mode = self._hook.partition(":")
            if rank == str(self.rank):
                if mode == "raise":
                    raise CheckpointError(f"{_FAIL_HOOK}: failure injected on rank {self.rank} after its first tensor")
                os._exit(1)
        now = time.monotonic()
        if now - self._last_tick < 0.05:
            return
        self._last_tick = now
        self._call("add", self.store.add, f"prog/{self.rank}", self._ticks)
        self._ticks = 0
        if self._call("add", self.store.add, "failures", 0) > 0:
            raise _PeerFailed()

    def wait(self, key: str, ranks: Sequence[int], what: str, progress: bool = False) -> Dict[int, dict]:
        """{rank: value} of `key/<rank>` (`key` alone for rank 0's single keys when `ranks` is
        (None,)), polled until every one is there. A rank that has not posted and (with
        `progress`) has finished no tensor for `timeout` seconds raises `_Lost`."""
        pending = {r: (f"{key}/{r}" if r is not None else key) for r in ranks}
        got: Dict[int, dict] = {}
        start = time.monotonic()
        seen = {r: (None, start) for r in pending}
        pause = 0.002
        while True:
            for r, k in list(pending.items()):
                if self._call(f"check {k}", self.store.check, [k]):
                    got[r] = json.loads(self._call(f"get {k}", self.store.get, k))
                    del pending[r]
            if not pending:
                return got
            now = time.monotonic()
            for r in pending:
                if progress:
                    n = self._call("add", self.store.add, f"prog/{r}", 0)
                    if n != seen[r][0]:
                        seen[r] = (n, now)
                if now - seen[r][1] > self.timeout:
                    who = f"rank {r}" if r is not None else "rank 0"
                    idle = "has finished no tensor and " if progress else ""
                    raise _Lost(f"{self.where()}: {who} {idle}did not {what} for {self.timeout:g} s (--dist-timeout): "
                                f"it was killed or hangs")
            time.sleep(pause)
            pause = min(pause * 2, 0.1)


def _split(items: Sequence[_Item], size: int) -> List[int]:
    """The rank of each item: one contiguous run per rank in file order, the runs balanced by the
    bytes each item reads and writes (item i goes to the rank whose equal share of the total holds
    the middle of its bytes). Contiguous runs keep each rank's reads sequential in the files."""
    weights = [it.nbytes_in + it.entry.nbytes for it in items]
    total = sum(weights)
    owner, before = [], 0
    for w in weights:
        owner.append(min(size - 1, (2 * before + w) * size // (2 * total)) if total else 0)
        before += w
    return owner


def _layout(items: Sequence[_Item], size: int, shard_bytes: int) -> tuple:
    """(shards, files, owners): the output's shards, in file order; each rank's run cut into
    shards of at most `shard_bytes` (a shard never spans two ranks), their names, and each
    shard's rank. Every rank computes the same layout from the same plan."""
    owner = _split(items, size)
    shards: List[List[OutEntry]] = []
    owners: List[int] = []
    for r in range(size):
        entries = [it.entry for it, o in zip(items, owner) if o == r]
        if entries:
            for shard in plan_shards(entries, shard_bytes):
                shards.append(shard)
                owners.append(r)
    if not shards:  # no tensors at all: one empty file, as a single process writes
        shards, owners = [[]], [0]
    return shards, shard_names(len(shards)), owners


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def _agreement(prep: _Prepared, backend: str, copy_tokenizer: bool, overwrite: bool) -> List[tuple]:
    """What every rank must have alike: (field, key compared, how it is shown) in the order they
    are checked; a difference in a later field follows from an earlier one."""
    cfg = prep.cfg
    options = (f"shard size {prep.shard_bytes} bytes, device {getattr(prep.dev, 'type', prep.dev)}, "
               f"backend {backend}, copy_tokenizer {copy_tokenizer}, overwrite {overwrite}"
               + (f", compute dtype {prep.compute_dtype}" if prep.compute_dtype != "fp32" else ""))
    inputs = ", ".join(str(p) for p in cfg.inputs + ([cfg.tokenizer_source] if cfg.tokenizer_source else []))
    conf = _digest(cfg.text)
    fields = [("options", options, options), ("output", str(prep.out), str(prep.out)),
              ("inputs", inputs, inputs), ("configuration", conf, f"{cfg.source} (sha256 {conf})")]
    for c in prep.opened:
        heads = ";".join(f"{t.name}|{t.dtype}|{list(t.shape)}|{t.file.name}|{t.offset}" for t in c.tensors.values())
        h = _digest(heads)
        fields.append((f"headers of {c.label}", h, f"{c.path} (sha256 {h})"))
    plan = _digest(";".join(f"{it.name}|{it.entry.dtype}|{list(it.entry.shape)}|{sorted((it.kwargs or {}).items())}|"
                            + ",".join(f"{c.label}:{n}" for c, n in it.inputs) for it in prep.items))
    fields.append(("plan", plan, f"{len(prep.items)} tensors (sha256 {plan})"))
    return fields


def _disagreement(views: List[dict]) -> Optional[str]:
    """The first field in which a rank differs from rank 0, as a sentence; None if they agree."""
    first = views[0]["plan"]
    for r, v in enumerate(views[1:], start=1):
        for (field_0, key_0, shown_0), (field_r, key_r, shown_r) in zip(first, v["plan"]):
            if field_0 != field_r or key_0 != key_r:
                name = field_0 if field_0 == field_r else f"{field_0} / {field_r}"
                return f"the ranks disagree on the {name}: rank 0 has {shown_0}, rank {r} has {shown_r}"
        if len(v["plan"]) != len(first):
            return (f"the ranks disagree on the checkpoints: rank 0 opened {len(first) - 5}, "
                    f"rank {r} {len(v['plan']) - 5}")
    return None


def _ranked(exc: BaseException, where: str) -> BaseException:
    """A rank's own error, its message prefixed with the rank (a MergeError keeps its class)."""
    if isinstance(exc, MergeError) and not str(exc).startswith(where):
        return type(exc)(f"{where}: {exc}")
    return exc


_WHERE = re.compile(r"^rank \d+ of \d+: ")


def _cause(exc: BaseException) -> str:
    """How a rank's failure is told to the others: one line, without the rank."""
    if isinstance(exc, MergeError):
        return one_line(_WHERE.sub("", str(exc), count=1))
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, SystemExit):
        return "terminated"
    return one_line(f"{type(exc).__name__}: {exc}")


def _stats(report: MergeReport, seconds: float, peak: int) -> dict:
    return {"tensors": report.merged + len(report.copied), "merged": report.merged, "copied": report.copied,
            "shards": report.shards, "bytes_read": report.bytes_read, "bytes_written": report.bytes_written,
            "backends": report.backends, "engine": report.engine, "seconds": seconds, "peak_rss": peak,
            "rss_before": report.rss_before}


def _run_ranks(ranks: _Ranks, config, out_dir, *, overwrite: bool, device, shard_size, backend: str, progress: bool,
               copy_tokenizer: bool, threads: Optional[int], prefetch: bool, compute_dtype: str = "fp32") -> MergeReport:
    """One rank's part of a distributed merge.

    1. Every rank validates and plans as a single process would (cheap: headers only), then the
       ranks gather each other's plan (every argument, the configuration, each checkpoint's
       headers, the tensor list, as digests) and any error: a rank that failed raises its own
       error, the others "rank R failed: <its error>"; ranks that disagree all raise an error
       naming the first field that differs. Nothing has been created yet.
    2. Every rank computes the same layout (`_layout`). Rank 0 creates the parents of the output
       and one temporary directory `OUT.tmp-<pid>@<host>` (pid and host of rank 0) and posts its
       name; the others wait for it.
    3. Each rank merges its run of tensors into its own shards there. After each tensor it counts
       its progress on the store and stops if another rank flagged a failure.
    4. Each rank posts its status: ok; failed, with the cause; stopped, for another rank's
       failure; left (Ctrl-C, SIGTERM, or the others lost: it does not wait any more). Then it
       waits for everyone's: a peer that goes silent (no status, no tensor finished) for the
       timeout is taken for dead.
    5. Rank 0, when every status is ok, writes the index, config, tokenizer and configuration
       files and renames the directory to the output; on any failure it removes the directory.
       Then it posts the outcome; every rank waits for it (so no rank returns before the output
       exists, or exits before it is cleaned up), acknowledges it, and returns or raises: its own
       error, else "rank R failed: <cause>" for the lowest rank that failed.
    A rank that loses the others (`_Lost`) or is stopped (SIGTERM, Ctrl-C) removes the temporary
    directory itself, since rank 0 may be the one that is gone, unless every rank had reported
    success: rank 0 may be renaming it then.
    """
    t_start = time.perf_counter()
    rss_before = _current_rss()
    rank, size, where = ranks.rank, ranks.size, ranks.where()
    prep: Optional[_Prepared] = None
    error: Optional[BaseException] = None
    try:
        prep = _prepare(config, out_dir, overwrite, device, shard_size, backend, threads, rss_before, compute_dtype,
                        copy_tokenizer)
    except Exception as exc:  # reported to the other ranks first; Ctrl-C / SIGTERM leave at once
        error = exc
    tmp: Optional[Path] = None
    made_parents: List[Path] = []
    bar = None
    posted = {"tmp": rank != 0, "status": False, "final": rank != 0}
    # Set once every rank reported success: rank 0 may be renaming the directory from then on,
    # and no other rank may touch it (removing it mid-rename would install a partial model).
    rank0_owns_tmp = False
    try:
        # 1. the plan, agreed
        views = ranks.gather({"token": uuid.uuid4().hex if rank == 0 else None, "host": _host_tag(),
                              "error": _cause(error) if error is not None else None,
                              "plan": _agreement(prep, backend, copy_tokenizer, overwrite) if prep else None})
        if error is not None:
            raise _ranked(error, where)
        failed = [r for r, v in enumerate(views) if v["error"] is not None]
        if failed:
            raise MergeError(f"{where}: rank {failed[0]} failed: {views[failed[0]]['error']}")
        differ = _disagreement(views)
        if differ is not None:
            raise MergeError(f"{where}: {differ}; nothing was written")
        ranks.attach(views[0]["token"])
        cfg, out, report, items = prep.cfg, prep.out, prep.report, prep.items
        report.ranks, report.rank = size, rank
        out_bytes = sum(it.entry.nbytes for it in items)
        shards, files, owners = _layout(items, size, prep.shard_bytes)

        own: Optional[BaseException] = None
        state = "ok"
        rss_seen = rss_before
        try:
            hosts = [v["host"] for v in views]
            local_rank, local_size = _env_int("LOCAL_RANK"), _env_int("LOCAL_WORLD_SIZE")
            if local_rank is None or local_size is None:
                local_rank, local_size = hosts[:rank].count(hosts[rank]), hosts.count(hosts[rank])
            dev = prep.dev
            if getattr(dev, "type", None) == "cuda":
                dev = _rank_device(dev, local_rank, where)
                report.device = str(dev)
            if threads is None:  # torchrun sets OMP_NUM_THREADS=1: the machine's CPUs are shared out instead
                threads = max(1, _cpus() // max(local_size, 1))
            mine = [i for i, o in enumerate(owners) if o == rank]
            my_shards, my_files = [shards[i] for i in mine], [files[i] for i in mine]
            by_name = {it.name: it for it in items}
            order = [by_name[e.name] for shard in my_shards for e in shard]
            report.tensors, report.shards = len(items), len(my_shards)

            # 2. the temporary directory, made by rank 0
            if rank == 0:
                _check_output(out, cfg, overwrite)  # again, right before creating anything
                _make_parents(out, made_parents)
                _remove_stale_tmp(out)
                made = _tmp_name(out, os.getpid(), hosts[0])
                if os.path.lexists(made):
                    shutil.rmtree(made)
                made.mkdir()
                tmp = made
                ranks.post("tmp", {"tmp": str(tmp)})
                posted["tmp"] = True
            else:
                answer = ranks.wait("tmp", [None], "create the temporary directory")[None]
                if "tmp" not in answer:
                    raise _PeerFailed()
                tmp = Path(answer["tmp"])

            # 3. this rank's tensors
            engine = _engine(cfg, dev, backend, threads, prep.opened, items, prep.compute_dtype)
            report.engine = engine.name
            bar = _Progress(len(order), sum(it.nbytes_in for it in order), progress and rank == 0,
                            label=f"pyops merge ({where})")
            with _collector_quiet(), engine.running(threads):
                rss_seen = _stream(order, my_shards, my_files, tmp, engine, report, bar, prefetch, tick=ranks.tick)
        except _PeerFailed:
            state = "stopped"
        except _Lost:
            raise
        except Exception as exc:
            own = _output_error(exc, out, out_bytes) if isinstance(exc, OSError) else exc
            state = "failed"
            ranks.flag_failure()
            if not posted["tmp"]:
                ranks.post("tmp", {"error": _cause(own)})
                posted["tmp"] = True
        if state != "ok" and bar is not None:
            bar.abort()
        peak = max(_peak_rss(), rss_before, rss_seen, _current_rss())
        ranks.post(f"status/{rank}", {"state": state, "cause": _cause(own) if own else None,
                                      "stats": _stats(report, time.perf_counter() - t_start, peak)})
        posted["status"] = True

        # 4. everyone's status
        statuses = ranks.wait("status", range(size), "report its status", progress=True)
        bad = [r for r in range(size) if statuses[r]["state"] in ("failed", "left")]
        if not bad:
            bad = [r for r in range(size) if statuses[r]["state"] != "ok"]
        first = bad[0] if bad else None
        cause = (statuses[first]["cause"] or "it stopped") if bad else None
        rank0_owns_tmp = first is None

        # 5. rank 0 finishes (or cleans up); everyone waits for the outcome
        if rank == 0:
            if first is None:
                try:
                    _write_rest(tmp, shards, files, cfg, copy_tokenizer, report, prep.layer_config)
                    _install(tmp, out)
                    tmp = None
                except Exception as exc:
                    own = _output_error(exc, out, out_bytes) if isinstance(exc, OSError) else exc
                    first, cause = 0, _cause(own)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp = None
                _remove_parents(made_parents)
                made_parents = []
            ranks.post("final", {"failed": first, "cause": cause, "files": report.files})
            posted["final"] = True
            with contextlib.suppress(_Lost):  # the output is settled: a peer gone now changes nothing
                ranks.wait("ack", [r for r in range(1, size) if statuses[r]["state"] != "left"],
                           "acknowledge the outcome")
        elif statuses[0]["state"] == "left":  # rank 0 is gone: nobody else will clean up
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp = None
        else:
            final = ranks.wait("final", [None], "finish the output")[None]
            first, cause, report.files = final["failed"], final["cause"], final["files"]
            ranks.post(f"ack/{rank}", {})
            tmp = None  # renamed or removed by rank 0
        if own is not None:
            raise _ranked(own, where)
        if first is not None:
            raise MergeError(f"{where}: rank {first} failed: {cause}")

        # the whole merge's report, on every rank
        per = [statuses[r]["stats"] for r in range(size)]
        report.per_rank = per
        report.merged = sum(p["merged"] for p in per)
        report.copied = [n for p in per for n in p["copied"]]
        report.shards = len(shards)
        report.bytes_read = sum(p["bytes_read"] for p in per)
        report.bytes_written = sum(p["bytes_written"] for p in per)
        report.backends = {}
        for p in per:
            for b, n in p["backends"].items():
                report.backends[b] = report.backends.get(b, 0) + n
        report.engine = ", ".join(dict.fromkeys(p["engine"] for p in per if p["engine"]))
        report.rss_before = max(p["rss_before"] for p in per)
        report.seconds = time.perf_counter() - t_start
        report.peak_rss = max([p["peak_rss"] for p in per] + [_peak_rss()])
        return report
    except BaseException as exc:
        if bar is not None:
            bar.abort()
        if ranks.store is not None:  # best effort: the others stop now instead of timing out
            with contextlib.suppress(Exception):
                if not posted["status"]:
                    ranks.flag_failure()
                    if not posted["tmp"]:
                        ranks.post("tmp", {"error": _cause(exc)})
                    ranks.post(f"status/{rank}", {"state": "left", "cause": _cause(exc), "stats": None})
                elif not posted["final"]:
                    ranks.post("final", {"failed": 0, "cause": _cause(exc), "files": []})
        # Rank 0's job, unless rank 0 may be gone: the others were lost, or this rank is being
        # stopped (torchrun stops every rank once one has exited, so rank 0 may be the one killed).
        if tmp is not None and (rank == 0 or (isinstance(exc, (_Lost, KeyboardInterrupt, SystemExit))
                                              and not rank0_owns_tmp)):
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_parents(made_parents)
        raise
    finally:
        if prep is not None:
            prep.close()


def _rank_device(dev, local_rank: int, where: str):
    """cuda:LOCAL_RANK for a distributed merge asked for "cuda" (an explicit index is kept)."""
    import torch
    if dev.index is None:
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise MergeError(f"device: {where} is local rank {local_rank} but this machine has {count} GPU"
                             f"{'s' if count != 1 else ''}; start at most {count} processes per machine")
        dev = torch.device("cuda", local_rank)
    torch.cuda.set_device(dev)
    return dev
