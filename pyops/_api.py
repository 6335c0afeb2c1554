"""pyops' public functions and modules, imported by `pyops/__init__.py` (eagerly, except while
`python -m pyops` is the program, which binds them on first use): importing them imports torch
and registers the ops with torch.library."""
import gc as _gc
import sys as _sys

from pyops._lazy_triton_kernels import deferred as _deferred_triton_kernels

# Importing torch and defining the ops allocates ~10^6 objects and almost no garbage, so the cyclic
# collector's passes over them would be pure overhead. It is off for the import only.
_gc_was_enabled = _gc.isenabled()
_gc.disable()
try:
    with _deferred_triton_kernels():  # the ops' Triton kernels are found when torch.compile asks
        from pyops import nn
        from pyops._backend import BACKENDS, BackendUnavailableError, last_choice
        from pyops.merging.merge import merge, merge_from_models
        from pyops.merging.task_arithmetic import task_arithmetic, task_arithmetic_from_models
        from pyops.moe import losses as moe_losses
        from pyops.moe.ops import Routing, moe_experts, moe_route
        from pyops.neighborhood.ops import na1d, na2d, na3d
        from pyops.task_attention import masks
        from pyops.task_attention.ops import task_masked_attention
finally:
    if _gc_was_enabled:
        _gc.enable()

__all__ = ["BACKENDS", "BackendUnavailableError", "last_choice", "masks", "merge", "merge_from_models", "moe_experts",
           "moe_losses", "moe_route", "Routing", "na1d", "na2d", "na3d", "nn", "task_arithmetic",
           "task_arithmetic_from_models", "task_masked_attention"]

# The spelling of the fine-tuned-weights form: pyops.merge.from_models(base, finetuned, ...).
merge.from_models = merge_from_models
task_arithmetic.from_models = task_arithmetic_from_models
# `pyops.masks` and `pyops.moe_losses` are public modules that live in their families' packages;
# the aliases make `import pyops.masks` and `from pyops.moe_losses import ...` work as before.
_sys.modules.setdefault("pyops.masks", masks)
_sys.modules.setdefault("pyops.moe_losses", moe_losses)
