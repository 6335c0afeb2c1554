"""pyops: fused, verified kernels for multi-task and modular PyTorch models.

Functional API (each op takes ``backend="auto" | "reference" | "cpu" | "triton" | "cuda"``):

* `task_arithmetic`, `task_arithmetic_from_models` — fused block-wise task-vector merging.
* `task_masked_attention` — attention masked by per-token group ids and a G×G rule (`pyops.masks` presets).
* `merge`, `merge_from_models` — TIES, DARE, breadcrumbs, DELLA, model_stock, consensus merging.
* `moe_route`, `moe_experts`, `Routing`, `moe_losses` — fused expert routing (mixture of experts).
* `na1d`, `na2d`, `na3d` — neighbourhood attention (NATTEN semantics, heads-last layout) with RPB.

`pyops.info()` reports which backends load and why the others do not.
"""
import sys as _sys

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


def _running_as_command() -> bool:
    """True while `python -m pyops ...` imports this package (runpy sets argv[0] to "-m" until
    pyops.__main__ runs)."""
    argv = list(getattr(_sys, "orig_argv", ()))
    if _sys.argv[:1] != ["-m"] or "-m" not in argv:
        return False
    return argv[argv.index("-m") + 1:argv.index("-m") + 2] == ["pyops"]


if _running_as_command():
    # `python -m pyops ...`: the command line answers --help and parses arguments without torch, and a
    # CPU merge on the C++ kernels needs no torch at all (pyops.merging.native_engine). The API
    # (pyops._api, which imports torch and registers the ops) is bound on first use instead.
    _binding = []  # non-empty while pyops._api imports: its imports must find the submodules

    def __getattr__(name: str):
        if name in __all__ and not _binding:
            _binding.append(name)
            try:
                from pyops import _api
            finally:
                _binding.clear()
            globals().update({n: getattr(_api, n) for n in _api.__all__})
            return globals()[name]
        raise AttributeError(f"module 'pyops' has no attribute {name!r}")
else:
    from pyops._api import (BACKENDS, BackendUnavailableError, Routing, last_choice, masks, merge, merge_from_models,
                            moe_experts, moe_losses, moe_route, na1d, na2d, na3d, nn, task_arithmetic,
                            task_arithmetic_from_models, task_masked_attention)


def info() -> dict:
    """Versions, devices and backend availability (what `python -m pyops info` prints)."""
    from pyops._info import collect

    return collect()
