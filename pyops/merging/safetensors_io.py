"""Reading and writing safetensors checkpoints one tensor at a time, with bounded memory.

Reading. `Checkpoint` opens a Hugging Face model directory (`model.safetensors`, or
`model-0000x-of-0000y.safetensors` shards with `model.safetensors.index.json`), parses every
shard's header up front (names, dtypes, shapes, byte ranges, validated as the format defines them:
`read_header` refuses every file that the `safetensors` library refuses) and reads one tensor on
request with `os.preadv` straight into a freshly allocated tensor.

Why not `safetensors.safe_open(...).get_tensor`: with ``framework="pt"`` it returns tensors that
are views of a file mapping which lives as long as the handle. Every page a merge touches then
stays resident in this process (and counts in its RSS) until the shard is closed, so the peak
RSS grows with the shard size: reading a 320 MB shard through an open handle peaked at 556 MB,
the same reads with `preadv` at 275 MB (the 230 MB of Python + torch included). `preadv`
also never opens an input for writing (files are opened ``O_RDONLY``), and it is thread-safe (no
shared file offset), so the next tensor can be read while the current one is merged.

Writing. A safetensors file is a header (JSON: name -> dtype, shape, byte range) followed by
the data. Every output tensor's dtype and shape is known before the first one is computed, so
`ShardWriter` writes the final header first and then streams each tensor's bytes as it is
produced: nothing is accumulated, and the peak memory does not depend on the shard size.
The files are read back by `safetensors.safe_open` / `load_file` like any other (the tests do).
"""
from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from pyops.merging.errors import CheckpointError

# Safetensors dtype codes (little-endian, as the format prescribes) and their sizes. Tensors'
# dtypes are kept as these codes, so that headers are read and shards written without torch
# (the native engine of `python -m pyops merge` never imports it); `torch_dtype` maps a code.
_DTYPES: Dict[str, Tuple[int, str]] = {  # code -> (bytes per element, torch's name)
    "F64": (8, "float64"), "F32": (4, "float32"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
    "I64": (8, "int64"), "I32": (4, "int32"), "I16": (2, "int16"), "I8": (1, "int8"), "U8": (1, "uint8"),
    "BOOL": (1, "bool"), "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2"), "U16": (2, "uint16"),
    "U32": (4, "uint32"), "U64": (8, "uint64"),
}
ITEMSIZES: Dict[str, int] = {code: size for code, (size, _) in _DTYPES.items()}
TORCH_NAMES: Dict[str, str] = {code: name for code, (_, name) in _DTYPES.items()}  # also config.json's torch_dtype
# The dtypes pyops merges; every other dtype (ints, bool, fp8) is copied from the base model.
MERGEABLE = ("F32", "F16", "BF16", "F64")


def torch_dtype(code: str):
    """The torch dtype of a safetensors code (imports torch)."""
    import torch
    dtype = getattr(torch, TORCH_NAMES[code], None)
    if dtype is None:
        raise CheckpointError(f"dtype {code!r} has no torch dtype in torch {torch.__version__}")
    return dtype


def dtype_code(dtype) -> str:
    """The safetensors code of a torch dtype, or a code given as is."""
    if isinstance(dtype, str):
        if dtype not in ITEMSIZES:
            raise ValueError(f"dtype: expected one of the safetensors codes {', '.join(ITEMSIZES)}, got {dtype!r}")
        return dtype
    name = str(dtype).rpartition(".")[2]
    for code, torch_name in TORCH_NAMES.items():
        if torch_name == name:
            return code
    raise ValueError(f"dtype: {dtype} has no safetensors code")


SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
MAX_HEADER = 100_000_000  # the largest header safetensors itself reads (bytes)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code ("F32", "BF16", ...)
    shape: Tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class RawBuffer:
    """Page-aligned anonymous memory of `nbytes` bytes (the native engine's reusable buffers): pages
    are touched on first write, as with torch.empty."""

    __slots__ = ("mmap", "address", "nbytes", "_anchor")

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.mmap = mmap.mmap(-1, max(nbytes, 1))
        self._anchor = ctypes.c_char.from_buffer(self.mmap)
        self.address = ctypes.addressof(self._anchor)


class RawTensor:
    """The bytes of one tensor: a safetensors dtype code, a shape, and `nbytes` bytes at `address`,
    kept alive by `owner` (a mapping's anchor or a `RawBuffer`). What the native engine reads,
    merges and writes instead of torch tensors."""

    __slots__ = ("dtype", "shape", "address", "nbytes", "owner")

    def __init__(self, dtype: str, shape: Tuple[int, ...], address: int, nbytes: int, owner: object):
        self.dtype, self.shape, self.address, self.nbytes, self.owner = dtype, tuple(shape), address, nbytes, owner


class _Malformed(Exception):
    """A header that breaks the safetensors format; the message says how (read_header adds the file)."""


# The JSON that safetensors' own parser (serde_json) refuses and Python's `json` would take: it is
# refused here too, so that pyops reads no file that the format's reference implementation does not.
_JSON_MAX_DEPTH = 64  # a header is 3 levels deep; serde_json stops at 128
_U64_MAX = 2**64 - 1  # offsets and dimensions are unsigned 64-bit integers (usize)
_INT64_MAX = 2**63 - 1  # torch's sizes are signed


def _json_object(pairs):
    """object_pairs_hook: an object whose keys are unique (Python's json keeps the last of a
    duplicated key silently; which tensor a name means must not depend on that)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _Malformed(f"the key {key!r} appears twice in one JSON object")
            seen.add(key)
    return out


def _json_int(text: str):
    """parse_int: "-0" stays a float, as serde_json reads it (and then refuses it as an offset or a
    dimension); an integer beyond the range of a double is refused, as serde_json refuses it."""
    if text == "-0":
        return -0.0
    value = int(text)
    try:
        float(value)
    except OverflowError:
        raise _Malformed(f"the number {text[:20]}... is out of range") from None
    return value


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Malformed(f"the number {text[:20]} is out of range")
    return value


def _json_constant(text: str):
    raise _Malformed(f"{text} is not JSON")


def _json_depth(value) -> int:
    """How deep `value` nests (1 for a scalar), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if d > _JSON_MAX_DEPTH:
            break
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


def _has_lone_surrogate(value) -> bool:
    """Whether a string anywhere in `value` holds half of a surrogate pair (JSON's "\\ud800"), which
    Python's json accepts and serde_json, UTF-8 and safetensors do not."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _u64(value) -> bool:
    """An unsigned 64-bit integer as the format stores offsets and dimensions: a JSON integer, not a
    float, a bool or a string."""
    return type(value) is int and 0 <= value <= _U64_MAX


def _parse_header(text: bytes) -> Tuple[Dict[str, object], Dict[str, str]]:
    """The header's JSON: ({name: entry}, metadata); raises _Malformed."""
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_json_object, parse_int=_json_int,
                            parse_float=_json_float, parse_constant=_json_constant)
    except UnicodeDecodeError as exc:
        raise _Malformed(f"its header is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise _Malformed("its header nests too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError, or an integer too long for int()
        raise _Malformed(f"its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _Malformed(f"its header is a JSON {type(header).__name__}, not an object")
    if _json_depth(header) > _JSON_MAX_DEPTH:
        raise _Malformed(f"its header nests more than {_JSON_MAX_DEPTH} levels deep")
    if b"\\u" in text and _has_lone_surrogate(header):
        raise _Malformed("its header has a string with half of a surrogate pair (not UTF-8)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _Malformed(f"its __metadata__ must be an object of strings, got {_short(metadata)}")
    return header, metadata


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _tensor_info(path: Path, name: str, entry, data_start: int) -> Tuple[TensorInfo, int, int]:
    """(TensorInfo, begin, end) of one header entry, its fields checked as the format defines them:
    a known dtype, a shape of unsigned integers, two unsigned offsets with begin <= end, and
    end - begin = the product of the shape times the dtype's size."""
    if not isinstance(entry, dict):
        raise _Malformed(f"tensor {name!r}: expected an object with dtype, shape and data_offsets, "
                         f"got {_short(entry)}")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise _Malformed(f"tensor {name!r}: has no {', '.join(missing)}")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str) or code not in ITEMSIZES:
        raise _Malformed(f"tensor {name!r}: dtype {_short(code)} is not one pyops reads "
                         f"(known: {', '.join(ITEMSIZES)})")
    if not isinstance(shape, list) or not all(_u64(s) for s in shape):
        raise _Malformed(f"tensor {name!r}: shape {_short(shape)} is not a list of integers in [0, 2**64)")
    if any(s > _INT64_MAX for s in shape):  # the format allows it beside a 0; torch (int64 sizes) does not
        raise _Malformed(f"tensor {name!r}: shape {_short(shape)} has a dimension of 2**63 or more, which torch "
                         f"cannot hold")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_u64(o) for o in offsets):
        raise _Malformed(f"tensor {name!r}: data_offsets {_short(offsets)} is not two integers in [0, 2**64)")
    begin, end = offsets
    if end < begin:
        raise _Malformed(f"tensor {name!r}: data_offsets [{begin}, {end}] ends before it begins")
    # The element and bit counts must fit 64 bits at every step, as the format's reader computes them.
    numel = 1
    for s in shape:
        numel *= s
        if numel > _U64_MAX:
            break
    if numel > _U64_MAX or numel * ITEMSIZES[code] * 8 > _U64_MAX:
        raise _Malformed(f"tensor {name!r}: shape {shape} of {code} has more bytes than 64 bits can count")
    nbytes = numel * ITEMSIZES[code]
    if end - begin != nbytes:
        raise _Malformed(f"tensor {name!r}: {code} {shape} is {nbytes} bytes but data_offsets [{begin}, {end}] "
                         f"hold {end - begin}")
    return TensorInfo(name, code, tuple(shape), Path(path), data_start + begin, nbytes), begin, end


def read_header(path: Path) -> Tuple[Dict[str, TensorInfo], Dict[str, str]]:
    """Parse and validate one safetensors file's header: {name: TensorInfo}, metadata.

    Refuses (CheckpointError, naming the file and the tensor) whatever the format forbids and
    `safetensors` itself refuses: a header length beyond the file or above 100 MB, a header that
    is not UTF-8 JSON of an object, a `__metadata__` that is not an object of strings, an entry
    whose dtype is unknown, whose shape or offsets are not unsigned integers, or whose byte range
    does not hold its shape; and byte ranges that overlap or leave any byte of the data region
    uncovered (sorted by offset, each tensor starts where the previous one ends and the last ends
    at the end of the file). It also refuses a key repeated in one JSON object (the library keeps
    the last one) and a dimension of 2**63 or more beside a 0 (which the format allows and torch's
    int64 sizes cannot hold).
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: not a safetensors file (header length {n} does not fit "
                                      f"a file of {size} bytes)")
            text = fh.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    data_start, data_len = 8 + n, size - 8 - n
    try:
        header, metadata = _parse_header(text)
        spans = []
        for name, entry in header.items():
            info, begin, end = _tensor_info(path, name, entry, data_start)
            if end > data_len:
                raise _Malformed(f"tensor {name!r}: data_offsets [{begin}, {end}] reach beyond the file's "
                                 f"{data_len} data bytes")
            spans.append((info, begin, end))
        # The data region is covered exactly: in offset order, each tensor begins where the one
        # before it ends (empty tensors may share an offset), and the last ends the file.
        spans.sort(key=lambda s: (s[1], s[2]))
        cursor, previous = 0, None
        for info, begin, end in spans:
            if begin < cursor:
                raise _Malformed(f"tensor {info.name!r}: bytes [{begin}, {end}) overlap tensor {previous!r} "
                                 f"(which ends at {cursor})")
            if begin > cursor:
                after = f"after tensor {previous!r}" if previous is not None else "at the start of the data"
                raise _Malformed(f"tensor {info.name!r}: begins at byte {begin}, leaving bytes [{cursor}, {begin}) "
                                 f"{after} in no tensor")
            cursor, previous = end, info.name
        if cursor < data_len:
            last = f"after tensor {previous!r}" if previous is not None else "of the data"
            raise _Malformed(f"the last {data_len - cursor} bytes {last} are in no tensor")
    except _Malformed as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file: {exc}") from None
    # File order: reading tensors in this order is sequential on disk.
    out = {info.name: info for info, _, _ in spans}
    return out, metadata


def _read_index(index: Path, path: Path) -> Tuple[List[Path], Dict[str, str]]:
    """The shard files an index lists (each a file inside `path`) and its weight map."""
    try:
        weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not a {name: file} object")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:  # ValueError: not UTF-8, not JSON
        kind = "safetensors" if index.name == INDEX_FILE else "pytorch_model.bin"
        raise CheckpointError(f"{index}: not a valid {kind} index ({type(exc).__name__}: {exc})") from None
    files = []
    for f in dict.fromkeys(weight_map.values()):
        p = path / f
        if os.path.isabs(f) or ".." in Path(f).parts or not p.is_file():
            raise CheckpointError(f"{index}: lists shard {f!r}, which is not a file in {path}")
        files.append(p)
    return files, weight_map


def checkpoint_files(path: Path) -> Tuple[List[Path], Optional[Dict[str, str]]]:
    """The weight files of a model directory (or a single .safetensors / .bin file) and, for a
    sharded checkpoint, the index's weight map. As mergekit 0.1.5 looks for them
    (mergekit/io/lazy_tensor_loader.py): model.safetensors or its index first, then
    pytorch_model.bin or its index, so a directory with both is read from its safetensors."""
    if path.is_file():
        if path.suffix not in (".safetensors", ".bin"):
            raise CheckpointError(f"{path}: expected a model directory, a .safetensors or a .bin file")
        return [path], None
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory (pyops merge reads local checkpoints; "
                              f"download a Hub model first, e.g. with `huggingface-cli download`)")
    for single, index in ((SINGLE_FILE, INDEX_FILE), (BIN_FILE, BIN_INDEX_FILE)):
        if (path / index).is_file():
            return _read_index(path / index, path)
        if (path / single).is_file():
            return [path / single], None
    others = sorted(p.name for p in path.glob("*.safetensors")) + sorted(p.name for p in path.glob("*.bin"))
    found = f"; found {', '.join(others)} without an index" if others else ""
    raise CheckpointError(f"{path}: no {SINGLE_FILE}, {INDEX_FILE}, {BIN_FILE} or {BIN_INDEX_FILE}{found}")


def read_bin(path: Path) -> Dict[str, object]:
    """The tensors of a PyTorch `.bin` state dict, {name: CPU tensor}, in its order.

    Loaded with ``torch.load(weights_only=True)``, whose unpickler builds tensors and plain
    containers only and refuses every other global, so no pickle code from the file runs; a
    file that needs some (a pickled class, a function call) is a CheckpointError naming it.
    ``mmap=True`` maps the file (private, read-only use) instead of reading it, where its
    format allows (the zip format torch.save writes since 1.6); the legacy format is read."""
    import torch
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc).lower() and "zip" not in str(exc).lower():
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # a legacy (non-zip) file
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except Exception as exc:  # pickle.UnpicklingError (code needed, or not a pickle), RuntimeError, EOFError ...
        # torch's message: a generic paragraph, the cause, a pointer to the docs; keep the cause
        lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
        cause = [x for x in lines if not x.startswith(("Weights only load failed", "Check the documentation",
                                                       "Please file an issue"))]
        what = " ".join(cause or lines or [type(exc).__name__])[:300]
        if "GLOBAL" in what:
            raise CheckpointError(f"{path}: needs pickle code to load ({what}); pyops loads .bin files with "
                                  f"torch.load(weights_only=True), which runs none: convert it to safetensors "
                                  f"where you trust its code") from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint that torch.load(weights_only=True) reads "
                              f"({type(exc).__name__}: {what})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict {{name: tensor}}, got a {type(state).__name__}")
    for name, t in state.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path}: expected a state dict {{name: tensor}}, but {name!r} holds a "
                                  f"{type(t).__name__}")
        if t.layout != torch.strided or t.is_quantized:
            raise CheckpointError(f"{path}: tensor {name!r} is {t.layout}{' quantized' if t.is_quantized else ''}; "
                                  f"only dense tensors can be merged")
    return state


class Checkpoint:
    """The tensors of one model, read lazily, one at a time. Files are opened read-only."""

    def __init__(self, path: Path, label: str):
        self.path = Path(path)
        self.label = label
        files, weight_map = checkpoint_files(self.path)
        # `.bin` files: their tensors, loaded (mapped) up front; reads copy from them. None: safetensors.
        self._bin: Optional[Dict[str, object]] = None
        if files and files[0].suffix == ".bin":
            self._bin = {}
            by_file = {}
            for f in files:
                state = read_bin(f)
                by_file[f] = {}
                for name, t in state.items():
                    try:
                        code = dtype_code(t.dtype)
                    except ValueError:
                        raise CheckpointError(f"{f}: tensor {name!r} is {t.dtype}, which pyops does not read") from None
                    by_file[f][name] = TensorInfo(name, code, tuple(t.shape), f, 0, t.numel() * ITEMSIZES[code])
                    self._bin[(f, name)] = t
        else:
            by_file = {f: read_header(f)[0] for f in files}
        self.tensors: Dict[str, TensorInfo] = {}
        if weight_map is None:
            for infos in by_file.values():
                self.tensors.update(infos)
        else:
            # The index decides which shard holds a tensor; the tensor must then be in that shard.
            index = self.path / (BIN_INDEX_FILE if self._bin is not None else INDEX_FILE)
            order = {f: i for i, f in enumerate(files)}
            entries = []
            for name, f in weight_map.items():
                info = by_file[self.path / f].get(name)
                if info is None:
                    raise CheckpointError(f"{index}: maps tensor {name!r} to {f}, which does not contain it")
                entries.append(info)
            if self._bin is None:
                entries.sort(key=lambda t: (order[t.file], t.offset))
            else:  # a .bin file's own order within it
                place = {(f, n): i for f, infos in by_file.items() for i, n in enumerate(infos)}
                entries.sort(key=lambda t: (order[t.file], place[(t.file, t.name)]))
            self.tensors = {t.name: t for t in entries}
        self._fds: Dict[Path, int] = {}

    @property
    def is_bin(self) -> bool:
        """Whether the tensors come from `.bin` files (torch reads them: the native engine cannot)."""
        return self._bin is not None

    def _bin_tensor(self, name: str):
        info = self.tensors[name]
        return self._bin[(info.file, name)]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def _fd(self, file: Path) -> int:
        """The read-only descriptor of one of the files, opened on first use."""
        fd = self._fds.get(file)
        if fd is None:
            try:
                fd = self._fds[file] = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as exc:
                raise CheckpointError(f"{file}: cannot be read ({exc.strerror or exc})") from None
        return fd

    def _pread(self, info: TensorInfo, dest: memoryview) -> None:
        """The stored bytes of `info` into `dest` (one `preadv`, no mapping kept)."""
        fd = self._fd(info.file)
        done = 0
        while done < info.nbytes:
            try:
                n = os.preadv(fd, [dest[done:]], info.offset + done)
            except OSError as exc:  # EIO: an input's error, not the output's
                raise CheckpointError(f"{info.file}: cannot read tensor {info.name!r} "
                                      f"({exc.strerror or exc})") from None
            if n <= 0:
                raise CheckpointError(f"{info.file}: ended while reading tensor {info.name!r} (was it truncated "
                                      f"or modified during the merge?)")
            done += n

    def _mapping(self, info: TensorInfo) -> Tuple[mmap.mmap, int]:
        """A private, copy-on-write mapping holding `info`'s bytes, and their offset in it."""
        fd = self._fd(info.file)
        start = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY
        skip = info.offset - start
        m = mmap.mmap(fd, skip + info.nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                      offset=start)
        return m, skip

    def read(self, name: str, buffer=None):
        """A CPU tensor with the stored values of `name` (one `preadv`, no mapping kept).

        Without `buffer` the tensor is newly allocated. With `buffer` (a contiguous uint8 CPU
        tensor of at least the tensor's byte size) the bytes land in its first bytes and the result
        is a view of it: a merge that reuses its buffers touches no fresh pages, and a fresh page
        costs about as much as reading it (the first write of new memory faults the page in).
        """
        import torch
        info = self.tensors[name]
        dtype = torch_dtype(info.dtype)
        if self._bin is not None:
            src = self._bin_tensor(name)
            if buffer is None:
                return src.clone(memory_format=torch.contiguous_format)
            if buffer.numel() < info.nbytes:
                raise ValueError(f"buffer: expected at least {info.nbytes} bytes for {name!r}, got {buffer.numel()}")
            return buffer[:info.nbytes].view(dtype).view(info.shape).copy_(src)
        if buffer is None:
            t = torch.empty(info.shape, dtype=dtype)
        else:
            if buffer.dtype != torch.uint8 or buffer.device.type != "cpu" or not buffer.is_contiguous() \
                    or buffer.numel() < info.nbytes:
                raise ValueError(f"buffer: expected a contiguous CPU uint8 tensor of at least {info.nbytes} bytes "
                                 f"for {name!r}, got {buffer.dtype} {list(buffer.shape)} on {buffer.device}")
            t = buffer[:info.nbytes].view(dtype).view(info.shape)
        if info.nbytes:
            self._pread(info, memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B"))
        return t

    def map(self, name: str):
        """A CPU tensor over a private, copy-on-write mapping of `name`'s bytes in the file (the
        page cache, no copy): the mapping goes when the tensor does. Reading through it copies
        nothing, where `read` copies every byte out of the page cache into a buffer; a write to
        the tensor would touch a private copy, never the file. As with any mapped checkpoint
        (safetensors' safe_open, mergekit), a file truncated by another process while it is being
        merged ends the process with SIGBUS: `read` is the fallback for files on a filesystem that
        cannot map them. The next tensor's pages are not faulted in ahead on the reader thread: that
        raises the peak RSS without a measurable gain."""
        import torch
        info = self.tensors[name]
        dtype = torch_dtype(info.dtype)
        if self._bin is not None:
            src = self._bin_tensor(name)  # already a (private) mapping of the file, or read from it
            return src if src.is_contiguous() else src.contiguous()
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        m, skip = self._mapping(info)
        raw = torch.frombuffer(m, dtype=torch.uint8, count=info.nbytes, offset=skip)
        return raw.view(dtype).view(info.shape)

    def map_raw(self, name: str) -> "RawTensor":
        """`map` without torch: the tensor's bytes in a private mapping, as a `RawTensor`."""
        if self._bin is not None:
            raise ValueError(f"{self.path}: .bin checkpoints are read through torch (the torch engine)")
        info = self.tensors[name]
        if info.nbytes == 0:
            return RawTensor(info.dtype, info.shape, 0, 0, None)
        m, skip = self._mapping(info)
        anchor = ctypes.c_char.from_buffer(m, skip)  # keeps the mapping alive as long as the RawTensor
        return RawTensor(info.dtype, info.shape, ctypes.addressof(anchor), info.nbytes, anchor)

    def read_raw(self, name: str, buffer: "RawBuffer") -> "RawTensor":
        """`read` without torch: the tensor's bytes in the first bytes of `buffer`."""
        if self._bin is not None:
            raise ValueError(f"{self.path}: .bin checkpoints are read through torch (the torch engine)")
        info = self.tensors[name]
        if buffer.nbytes < info.nbytes:
            raise ValueError(f"buffer: expected at least {info.nbytes} bytes for {name!r}, got {buffer.nbytes}")
        if info.nbytes:
            self._pread(info, memoryview(buffer.mmap)[:info.nbytes])
        return RawTensor(info.dtype, info.shape, buffer.address, info.nbytes, buffer)

    def close(self) -> None:
        if self._bin is not None:
            self._bin = {}  # drops the mappings
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AdaptedCheckpoint:
    """A `Checkpoint` whose tensors pass through an adapter as they are read: mergekit's
    `model+lora` input, a PEFT LoRA adapter (`pyops.merging.lora.LoraAdapter`) applied to each
    tensor it targets (`adapter.touches(name)`, `adapter.apply(name, tensor)`, which keeps the
    tensor's dtype and shape), so that no merged copy of the model is ever written. Read through
    torch only (`map_raw` / `read_raw` refuse: the torch engine runs such merges)."""

    is_bin = False

    def __init__(self, inner: Checkpoint, adapter, label: str):
        self.inner, self.adapter, self.label = inner, adapter, label
        self.path = inner.path
        self.tensors = inner.tensors

    def _adapted(self, name: str, t):
        return self.adapter.apply(name, t) if self.adapter.touches(name) else t

    def read(self, name: str, buffer=None):
        return self._adapted(name, self.inner.read(name, buffer))

    def map(self, name: str):
        return self._adapted(name, self.inner.map(name))

    def map_raw(self, name: str):
        raise ValueError(f"{self.path}: a model with a LoRA adapter is read through torch (the torch engine)")

    read_raw = map_raw

    def close(self) -> None:
        self.adapter.close()
        self.inner.close()


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OutEntry:
    """One tensor of an output shard. `dtype`: a safetensors code; a torch dtype is taken too and
    stored as its code."""
    name: str
    dtype: str
    shape: Tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "dtype", dtype_code(self.dtype))
        object.__setattr__(self, "shape", tuple(int(x) for x in self.shape))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZES[self.dtype]


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?)B?\s*$", re.IGNORECASE)


def parse_size(text) -> int:
    """'5GB' -> 5·10⁹ (Hugging Face's convention), '500MiB' -> 500·2²⁰, '1000' -> 1000 bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        m = _SIZE.match(str(text))
        if not m:
            raise ValueError(f"shard size: expected a size such as 5GB, 500MB, 2GiB or a byte count, got {text!r}")
        number, unit, binary = m.groups()
        scale = (1024 if binary else 1000) ** " KMGT".index(unit.upper() or " ")
        size = int(float(number) * scale)
    if size <= 0:
        raise ValueError(f"shard size: expected a positive size, got {text!r}")
    return size


def plan_shards(entries: Sequence[OutEntry], shard_size: int) -> List[List[OutEntry]]:
    """Consecutive groups of at most `shard_size` bytes (a larger tensor gets a shard of its own)."""
    shards: List[List[OutEntry]] = []
    current: List[OutEntry] = []
    size = 0
    for e in entries:
        if current and size + e.nbytes > shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += e.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def shard_names(n: int) -> List[str]:
    if n == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def encode_header(entries: Iterable[OutEntry], metadata: Optional[Dict[str, str]] = None, align: int = 8) -> bytes:
    """The 8-byte length and the JSON header, padded with spaces (which the safetensors format
    allows) so that the data starts `align`-byte aligned."""
    header: Dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % align)
    return struct.pack("<Q", len(text)) + text


# Direct I/O: the output goes to the disk from a reused, page-aligned staging buffer instead of
# through the page cache. A model-sized write into the page cache needs that many fresh pages, and
# on VMs whose free memory is handed back to the host first-touching them is slower than O_DIRECT
# to the same disk; direct I/O also leaves the inputs' cached pages alone, and the closing fsync
# has nothing left to flush.
_DIRECT_BLOCK = 4096
_STAGING_BYTES = 32 << 20


class _DirectSink:
    """Appends bytes to a file opened with O_DIRECT through two aligned staging buffers: while one
    is on its way to the disk (a helper thread blocks in `write`), the other is filled, so the
    copy into staging and the disk transfer overlap (with one buffer they would take turns, the
    disk idle during every copy). `open` returns
    None where the platform or file system has no O_DIRECT (tmpfs, macOS), and the caller then
    writes through the page cache."""

    @classmethod
    def open(cls, path: Path) -> "Optional[_DirectSink]":
        flag = getattr(os, "O_DIRECT", 0)
        if not flag or os.environ.get("PYOPS_MERGE_DIRECT_IO", "1") == "0":
            return None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | flag, 0o644)
        except OSError:
            return None
        return cls(fd)

    def __init__(self, fd: int):
        from concurrent.futures import ThreadPoolExecutor
        self.fd = fd
        self._stages = [RawBuffer(_STAGING_BYTES), None]  # page-aligned, as O_DIRECT wants; the 2nd on demand
        self._cur = 0
        self._pending = [None, None]  # the Future of each stage's disk write
        self._disk = ThreadPoolExecutor(1, thread_name_prefix="pyops-merge-disk")
        self._fill = 0
        self.size = 0

    def write(self, address: int, n: int) -> None:
        """Appends the n bytes at `address`."""
        pos = 0
        while pos < n:
            stage = self._stages[self._cur]
            take = min(n - pos, _STAGING_BYTES - self._fill)
            # A plain memcpy (ctypes releases the GIL), not Tensor.copy_: this runs on the merge's
            # writer thread, and a torch op there starts a second OpenMP team that spins against
            # the merge kernel's team on the same cores and slows the kernels down several times.
            ctypes.memmove(stage.address + self._fill, address + pos, take)
            self._fill += take
            pos += take
            if self._fill == _STAGING_BYTES:
                self._flush(_STAGING_BYTES)
        self.size += n

    def _write_stage(self, i: int, nbytes: int) -> None:
        view = memoryview(self._stages[i].mmap)[:nbytes]
        try:
            done = 0
            while done < nbytes:
                done += os.write(self.fd, view[done:])
        finally:
            view.release()

    def _flush(self, nbytes: int) -> None:
        """Hands the current stage to the disk thread and switches to the other one (once its own
        write is done: a write error surfaces here)."""
        self._pending[self._cur] = self._disk.submit(self._write_stage, self._cur, nbytes)
        self._cur ^= 1
        if self._pending[self._cur] is not None:
            self._pending[self._cur].result()
            self._pending[self._cur] = None
        if self._stages[self._cur] is None:
            self._stages[self._cur] = RawBuffer(_STAGING_BYTES)
        self._fill = 0

    def _drain(self) -> None:
        for i, f in enumerate(self._pending):
            if f is not None:
                self._pending[i] = None
                f.result()

    def close_data(self) -> None:
        """Writes the tail (padded to the block size, then truncated to the exact size)."""
        if self._fill:
            tail = self._fill
            padded = -(-tail // _DIRECT_BLOCK) * _DIRECT_BLOCK
            ctypes.memset(self._stages[self._cur].address + tail, 0, padded - tail)
            self._flush(padded)
        self._drain()
        if self.size % _DIRECT_BLOCK:
            os.ftruncate(self.fd, self.size)

    def abort(self) -> None:
        try:
            self._drain()
        except OSError:
            pass  # the caller is failing already
        finally:
            self._disk.shutdown(wait=True)
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            # drop the buffers (and their ctypes anchors, which would keep the mappings from closing)
            maps = [stage.mmap for stage in self._stages if stage is not None]
            self._stages = [None, None]
            for m in maps:
                try:
                    m.close()
                except BufferError:  # still exported (a traceback's frame holds a buffer): freed with it
                    pass


class ShardWriter:
    """Writes one safetensors file whose header is known up front; tensors arrive in order."""

    def __init__(self, path: Path, entries: Sequence[OutEntry], metadata: Optional[Dict[str, str]] = None):
        self.path = Path(path)
        self.entries = list(entries)
        self._next = 0
        self._direct = _DirectSink.open(self.path)  # never overwrites anything (O_EXCL / "xb")
        self._fh = None if self._direct is not None else open(self.path, "xb")
        header = encode_header(self.entries, metadata, align=_DIRECT_BLOCK if self._direct is not None else 8)
        staged = ctypes.create_string_buffer(header, len(header))
        self._put(ctypes.addressof(staged), len(header))

    def _put(self, address: int, n: int) -> None:
        if self._direct is not None:
            self._direct.write(address, n)
        else:
            self._fh.write((ctypes.c_char * n).from_address(address))

    def write_tensor(self, name: str, tensor) -> None:
        """Appends the next planned tensor: a torch tensor (any device; copied to the host if
        needed) or a `RawTensor`."""
        if self._next >= len(self.entries):
            raise RuntimeError(f"{self.path.name}: got tensor {name!r} after the last planned tensor")
        e = self.entries[self._next]
        raw = isinstance(tensor, RawTensor)
        code = tensor.dtype if raw else dtype_code(tensor.dtype)
        if name != e.name or code != e.dtype or tuple(tensor.shape) != e.shape:
            raise RuntimeError(f"{self.path.name}: expected tensor {e.name!r} {e.dtype} {list(e.shape)}, "
                               f"got {name!r} {code} {list(tensor.shape)}")
        if e.nbytes:
            if raw:
                self._put(tensor.address, e.nbytes)
            else:
                t = tensor.detach()
                if t.device.type != "cpu":
                    t = t.cpu()
                t = t.contiguous()
                self._put(t.data_ptr(), e.nbytes)
        self._next += 1

    def close(self, sync: bool = True) -> None:
        """Finish the file; raises if a planned tensor was not written."""
        if self._next != len(self.entries):
            self.abort()
            raise RuntimeError(f"{self.path.name}: only {self._next} of {len(self.entries)} tensors were written")
        if self._direct is not None:
            fd = self._direct.fd
            try:
                self._direct.close_data()
                if sync:
                    os.fsync(fd)  # the metadata (size); the data went to the disk already
            finally:
                self._direct.abort()
            return
        self._fh.flush()
        if sync:
            os.fsync(self._fh.fileno())
        self._fh.close()

    def abort(self) -> None:
        """Closes the file after a failure (the caller removes it): an error flushing the buffered
        bytes, such as the full disk that caused the failure, is not raised over the first one."""
        if self._direct is not None:
            self._direct.abort()
        elif not self._fh.closed:
            try:
                self._fh.close()
            except OSError:
                pass


def write_index(path: Path, shards: Sequence[Sequence[OutEntry]], names: Sequence[str]) -> None:
    weight_map = {e.name: f for f, shard in zip(names, shards) for e in shard}
    total = sum(e.nbytes for shard in shards for e in shard)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(path, "x", encoding="utf-8") as fh:
        json.dump(index, fh, indent=2)
        fh.write("\n")
