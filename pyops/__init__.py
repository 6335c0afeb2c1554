"""pyops: fused, verified kernels for multi-task and modular PyTorch models.

Functional API (each op takes ``backend="auto" | "reference" | "cpu" | "triton" | "cuda"``):

* `task_arithmetic`, `task_arithmetic_from_models` — fused block-wise task-vector merging.
* `task_masked_attention` — attention masked by per-token group ids and a G×G rule (`pyops.masks` presets).
* `merge`, `merge_from_models` — TIES, DARE, breadcrumbs, DELLA, model_stock, consensus merging.
* `moe_route`, `moe_experts`, `Routing`, `moe_losses` — fused expert routing (mixture of experts).
* `na1d`, `na2d`, `na3d` — neighbourhood attention (NATTEN semantics, heads-last layout) with RPB.

`pyops.info()` reports which backends load and why the others do not.
"""
import gc as _gc
import sys as _sys

_API = ("BACKENDS", "BackendUnavailableError", "last_choice", "masks", "merge", "merge_from_models", "moe_experts",
        "moe_losses", "moe_route", "Routing", "na1d", "na2d", "na3d", "nn", "task_arithmetic",
        "task_arithmetic_from_models", "task_masked_attention")


def _load_api() -> None:
    """Imports torch and the ops (registering them with torch.library) and binds the API here."""
    from pyops._lazy_triton_kernels import deferred as _deferred_triton_kernels

    # Importing torch and defining the ops allocates ~10^6 objects and almost no garbage: the cyclic
    # collector's passes over them were ~10% of a `python -m pyops merge` run's samples. It is off for
    # the import only.
    was_enabled = _gc.isenabled()
    _gc.disable()
    try:
        with _deferred_triton_kernels():  # the ops' Triton kernels are found when torch.compile asks
            from pyops import masks, nn
            from pyops._backend import BACKENDS, BackendUnavailableError, last_choice
            from pyops import moe_losses
            from pyops.ops.merge import merge, merge_from_models
            from pyops.ops.moe import Routing, moe_experts, moe_route
            from pyops.ops.neighborhood import na1d, na2d, na3d
            from pyops.ops.task_attention import task_masked_attention
            from pyops.ops.task_merge import task_arithmetic, task_arithmetic_from_models
    finally:
        if was_enabled:
            _gc.enable()
    merge.from_models = merge_from_models  # the spelling of the fine-tuned-weights form
    task_arithmetic.from_models = task_arithmetic_from_models
    values = locals()
    globals().update({name: values[name] for name in _API})


if _sys.argv[:2] == ["-m", "merge"]:
    # `python -m pyops merge ...` (runpy imports this package while argv[0] is "-m"): a CPU merge on
    # the C++ kernels needs no torch (pyops.merging.native_engine), and importing it took half of a
    # 3 x 1 GB merge. The API is bound on first use instead, e.g. when the merge needs the torch engine.
    _binding = []  # non-empty while _load_api runs: its `from pyops import masks` must find the submodule

    def __getattr__(name: str):
        if name in _API and not _binding:
            _binding.append(name)
            try:
                _load_api()
            finally:
                _binding.clear()
            return globals()[name]
        raise AttributeError(f"module 'pyops' has no attribute {name!r}")
else:
    _load_api()

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "info",
    "last_choice",
    "masks",
    "merge",
    "merge_from_models",
    "moe_experts",
    "moe_losses",
    "moe_route",
    "Routing",
    "na1d",
    "na2d",
    "na3d",
    "nn",
    "task_arithmetic",
    "task_arithmetic_from_models",
    "task_masked_attention",
]


def info() -> dict:
    """Versions, devices and backend availability (what `python -m pyops info` prints)."""
    from pyops._info import collect

    return collect()
