"""Drop-in modules built on the pyops ops.

* `TaskVectorComposition` — learned task-vector merging (aTLAS, AdaMerging): learnable
  block-wise coefficients λ over N task vectors, merged with `pyops.task_arithmetic`.
* `TaskMoE` — mixture-of-experts MLP with per-task routers on `pyops.moe_route` / `moe_experts`.
"""
from pyops.nn.moe import TaskMoE
from pyops.nn.task_vector_composition import TaskVectorComposition

__all__ = ["TaskMoE", "TaskVectorComposition"]
