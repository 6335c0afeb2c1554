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
"""
from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import resource
import shutil
import stat
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from pyops.merging import native_engine
from pyops.merging.config import MergeConfig, load_config
from pyops.merging.errors import CheckpointError, MergeError, OutputError, one_line
from pyops.merging.spec import BACKEND_CHOICES
from pyops.merging.safetensors_io import (
    INDEX_FILE, MERGEABLE, TORCH_NAMES, Checkpoint, OutEntry, ShardWriter, parse_size, plan_shards, shard_names,
    torch_dtype, write_index)

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

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / 1e9 / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        lines = [
            f"merged {self.merged} tensors ({self.method}, {self.device}) and copied {len(self.copied)} from the base "
            f"into {self.shards} shard{'s' if self.shards != 1 else ''} in {self.seconds:.2f} s: "
            f"{self.bytes_read / 1e9:.3f} GB read ({self.gb_per_s:.2f} GB/s), {self.bytes_written / 1e9:.3f} GB written",
            f"peak RSS {self.peak_rss / 2**20:.0f} MiB ({self.rss_before / 2**20:.0f} MiB before the merge)",
            f"output: {self.out_dir}",
        ]
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
    kwargs: Optional[dict]  # merge_from_models arguments; None: copied from the base
    nbytes_in: int


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

    def __init__(self, total: int, total_bytes: int, enabled: bool, stream=None):
        self.total, self.total_bytes, self.enabled = total, total_bytes, enabled
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
                print(f"pyops merge: {text}", file=self.stream, flush=True)

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
    """(reference checkpoint, task checkpoints, every checkpoint opened)."""
    opened: List[Checkpoint] = []
    try:
        ref = Checkpoint(cfg.base, "the base model") if cfg.base is not None else None
        if ref is not None:
            opened.append(ref)
        tasks = []
        for m in cfg.models:
            c = Checkpoint(m.path, f"{m.key} ({m.written})")
            opened.append(c)
            tasks.append(c)
        if ref is None:  # linear without a base model: the first model is the reference
            ref = tasks[0]
        return ref, tasks, opened
    except BaseException:
        for c in opened:
            c.close()
        raise


def _first(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(x) for x in list(items)[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _plan(cfg: MergeConfig, ref: Checkpoint, tasks: Sequence[Checkpoint], notes: List[str]) -> List[_Item]:
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
    converted = set()
    items: List[_Item] = []
    for name, info in ref.tensors.items():
        for c in others:
            t = c.tensors[name]
            if t.shape != info.shape:
                raise CheckpointError(f"tensor {name!r} has shape {list(t.shape)} in {c.label} at {c.path} but "
                                      f"{list(info.shape)} in {ref.label}")
            if (info.dtype in MERGEABLE) != (t.dtype in MERGEABLE):
                raise CheckpointError(f"tensor {name!r} is {t.dtype} in {c.label} but {info.dtype} in {ref.label}: "
                                      f"a floating tensor cannot be merged with a non-floating one")
            if info.dtype in MERGEABLE and t.dtype != info.dtype:
                converted.add(f"{c.label} ({t.dtype})")
        nbytes_in = info.nbytes * (1 + len(others))
        if info.dtype in MERGEABLE:
            out_dtype = cfg.out_dtype or info.dtype
            kwargs = cfg.tensor_kwargs(name)
            if kwargs.get("blocks") == "rows" and not info.shape:
                kwargs["blocks"] = None  # a 0-d tensor (a scale) is one row
            items.append(_Item(name, OutEntry(name, out_dtype, info.shape), kwargs, nbytes_in))
        else:
            items.append(_Item(name, OutEntry(name, info.dtype, info.shape), None, info.nbytes))
    if converted:
        notes.append(f"tensors whose dtype differs from the base's are converted to the base's dtype before "
                     f"merging (as mergekit does): {', '.join(sorted(converted))}")
    return items


# --------------------------------------------------------------------------------------------
# The merge
# --------------------------------------------------------------------------------------------

class _TorchEngine:
    """The per-tensor operations of `_stream` on torch tensors: `pyops.merge_from_models` on the
    chosen device and backend (every method, dtype and device). See native_engine.NativeEngine
    for the torch-free one."""

    name = "torch"

    def __init__(self, cfg: MergeConfig, device, backend: str):
        import torch
        self.torch = torch
        self.cfg, self.dev, self.backend = cfg, device, backend
        self.device = str(device)

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
        base = tensors[0]
        if item.kwargs is None:
            return base if out is None else out.copy_(base)
        models = tensors[1:]
        out_dtype = torch_dtype(item.entry.dtype)
        if base.numel() == 0:
            return torch.empty(item.entry.shape, dtype=out_dtype)
        if device.type != "cpu":
            base = base.to(device)
            models = [m.to(device) for m in models]
        models = [m if m.dtype == base.dtype else m.to(base.dtype) for m in models]
        if cfg.method == "linear":
            base = torch.zeros_like(models[0])  # θ = Σ cᵢ·(θᵢ − 0)
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


def _load(item: _Item, ref: Checkpoint, tasks: Sequence[Checkpoint], engine, pool: Optional[_BytePool] = None) -> tuple:
    """(tensors, buffers): the base then each model's tensor; the pool buffers they live in."""
    bufs: list = []

    def read(c: Checkpoint):
        if pool is None:
            return c.read(item.name)
        if os.environ.get("PYOPS_MERGE_MAP", "1") == "1":
            try:
                return engine.map(c, item.name)
            except (OSError, ValueError):  # a file system that cannot map: read into a pool buffer
                pass
        bufs.append(pool.acquire(c.tensors[item.name].nbytes))
        return engine.read(c, item.name, bufs[-1])

    base = read(ref)
    if item.kwargs is None:
        return [base], bufs
    return [base] + [base if c is ref else read(c) for c in tasks], bufs


def _stream(order: List[_Item], shards, files, tmp: Path, ref: Checkpoint, tasks: Sequence[Checkpoint], engine,
            report: MergeReport, bar: _Progress, overlap: bool) -> int:
    """Read, merge and write every tensor, in shard order. With `overlap`, the next tensor is read
    and the previous result written on two helper threads while the current one merges (file I/O
    and the kernels release the GIL). Returns the largest RSS seen after a tensor."""
    rss_seen = 0
    writers: List[ShardWriter] = []
    largest = max((it.entry.nbytes for it in order), default=0)
    on_cpu = engine.device == "cpu"
    pool = _BytePool(max(_POOL_IDLE_BYTES, 2 * largest), engine) if on_cpu else None

    def load(p: int) -> tuple:
        return _load(order[p], ref, tasks, engine, pool)

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
                    if item.kwargs is None:
                        report.copied.append(item.name)
                    else:
                        report.merged += 1
                    report.bytes_read += item.nbytes_in
                    report.bytes_written += entry.nbytes
                    bar.update(pos, report.bytes_read)
                    rss_seen = max(rss_seen, _current_rss())
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


def _copy_files(cfg: MergeConfig, tmp: Path, copy_tokenizer: bool, report: MergeReport) -> None:
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
            if fname == "config.json" and cfg.out_dtype is not None:
                try:
                    conf = json.loads(src.read_text("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    conf = None
                if isinstance(conf, dict):
                    conf["torch_dtype"] = TORCH_NAMES[cfg.out_dtype]
                    with open(dst, "x", encoding="utf-8") as fh:
                        json.dump(conf, fh, indent=2)
                        fh.write("\n")
                    report.files.append(fname)
                    continue
            shutil.copyfile(src, dst)
            report.files.append(fname)
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


def _tmp_name(out: Path, pid: int) -> Path:
    """The temporary directory that process `pid` writes the merge into `out` in."""
    return out.parent / f"{out.name}.tmp-{pid}"


def _remove_stale_tmp(out: Path) -> None:
    """Removes the temporary directories `OUT.tmp-<pid>` of earlier merges into `out` whose process
    no longer exists (a merge killed by SIGKILL, or the machine going down, cannot remove its own),
    saying so on stderr. One whose process still runs (another merge into the same output, or
    an unrelated process that reused the pid) is left alone; so is anything that is not a plain
    directory of exactly that name."""
    prefix = f"{out.name}.tmp-"
    try:
        names = os.listdir(out.parent)
    except OSError:
        return
    for name in names:
        digits = name[len(prefix):]
        if not name.startswith(prefix) or not (digits.isascii() and digits.isdigit()) or str(int(digits)) != digits:
            continue
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


def _engine(cfg: MergeConfig, dev, backend: str, threads: Optional[int], ref: Checkpoint,
            tasks: Sequence[Checkpoint], items: Sequence[_Item]):
    """The native engine where it can run the merge (see native_engine.reason), else torch's."""
    if native_engine.reason(cfg, dev, backend, ref, tasks, items) is None:
        return native_engine.NativeEngine(cfg, threads)
    import torch
    return _TorchEngine(cfg, torch.device(dev) if isinstance(dev, str) else dev, backend)


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
) -> MergeReport:
    """Merge whole checkpoints as a mergekit YAML describes, into a new directory `out_dir`.

    Args:
        config: a YAML file path, YAML text, a dict of the same structure, or a `MergeConfig`.
        out_dir: the output directory; must not exist unless `overwrite` (then it is replaced
            only after the new model is complete).
        device: where the tensors are merged ("cpu", "cuda", "cuda:1", or a torch.device);
            files are read and written on the host either way.
        shard_size: the most bytes per output shard ("5GB", "500MB", "2GiB", an int).
        backend: the pyops backend for every tensor ("auto", "reference", "cpu", "triton", "cuda").
        progress: print progress on stderr.
        copy_tokenizer: copy the tokenizer files of the base (or `tokenizer_source`).
        threads: CPU threads for the merge (default: torch's thread count if torch is loaded,
            else OMP_NUM_THREADS or the CPUs available; torch's setting is restored afterwards).
        prefetch: read the next tensor and write the previous one on helper threads while the
            current one merges (False: everything on the calling thread, one tensor at a time).

    Returns a `MergeReport`. Raises `MergeError` (`ConfigError`, `CheckpointError`) for bad input,
    before anything is written, and `OutputError` (a `MergeError`) when the output cannot be
    written; on any failure nothing is left at `out_dir` or beside it. A temporary directory that
    an earlier, killed merge left beside `out_dir` is removed (with a line on stderr) once its
    process is gone.

    A CPU merge of float32 / float16 / bfloat16 checkpoints on the C++ kernels (every method but
    model_stock) runs on the native engine, without importing torch; the rest goes through
    `pyops.merge_from_models` (`report.engine` says which). Both write the same bytes.
    """
    t_start = time.perf_counter()
    rss_before = _current_rss()
    cfg = load_config(config)
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

    ref, tasks, opened = _open_all(cfg)
    tmp: Optional[Path] = None
    rss_seen = rss_before
    made_parents: List[Path] = []
    bar = None
    out_bytes = 0
    try:
        items = _plan(cfg, ref, tasks, report.notes)
        out_bytes = sum(it.entry.nbytes for it in items)
        shards = plan_shards([it.entry for it in items], shard_bytes)
        files = shard_names(len(shards))
        report.tensors = len(items)
        report.shards = len(shards)
        total_in = sum(it.nbytes_in for it in items)
        _check_output(out, cfg, overwrite)  # again, right before creating anything

        for parent in reversed(out.parents):
            if not parent.exists():
                parent.mkdir()
                made_parents.append(parent)
        _remove_stale_tmp(out)
        tmp = _tmp_name(out, os.getpid())
        if os.path.lexists(tmp):
            shutil.rmtree(tmp)
        tmp.mkdir()
        engine = _engine(cfg, dev, backend, threads, ref, tasks, items)
        report.engine = engine.name

        bar = _Progress(len(items), total_in, progress)
        by_name = {it.name: it for it in items}
        order = [by_name[e.name] for shard in shards for e in shard]
        # The collector's passes over every object alive before the merge (torch, pyops) would be
        # pure overhead: freeze those (the merge's own cycles are still collected; they hold
        # tensors, and mapped ones pin their pages). A merge allocates a few hundred small objects
        # per tensor, so the young generation's threshold is raised to 20 000 allocations: a
        # collection every several tensors instead of a few per tensor.
        gc.freeze()
        _gc_threshold = gc.get_threshold()
        gc.set_threshold(20_000, *_gc_threshold[1:])
        try:
            with engine.running(threads):
                rss_seen = _stream(order, shards, files, tmp, ref, tasks, engine, report, bar, prefetch)
        finally:
            gc.unfreeze()
            gc.set_threshold(*_gc_threshold)
        if len(shards) > 1:
            write_index(tmp / INDEX_FILE, shards, files)
        _copy_files(cfg, tmp, copy_tokenizer, report)
        _install(tmp, out)
        tmp = None
    except BaseException as exc:
        if bar is not None:
            bar.abort()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for parent in reversed(made_parents):
            try:
                parent.rmdir()
            except OSError:
                pass
        if isinstance(exc, OSError):  # the inputs' errors are CheckpointErrors: this is the output's
            raise _output_error(exc, out, out_bytes) from None
        raise
    finally:
        for c in opened:
            c.close()
    report.seconds = time.perf_counter() - t_start
    # ru_maxrss (the kernel's high-water mark, updated lazily) and the RSS sampled after each tensor.
    report.peak_rss = max(_peak_rss(), rss_before, rss_seen, _current_rss())
    return report
