"""Drop-in modules built on the pyops ops.

* `NeighborhoodAttention1D/2D/3D` — neighbourhood attention layers (NATTEN 0.17 / DiNAT state_dict keys).
* `TaskVectorComposition` — learned task-vector merging (aTLAS, AdaMerging): learnable
  block-wise coefficients λ over N task vectors, merged with `pyops.task_arithmetic`.
* `TaskMoE` — mixture-of-experts MLP with per-task routers on `pyops.moe_route` / `moe_experts`.
* `TaskMaskedMultiheadAttention` — `nn.MultiheadAttention` with a group rule instead of a dense mask.
"""
from pyops.moe.nn import TaskMoE
from pyops.neighborhood.nn import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D
from pyops.task_attention.nn import TaskMaskedMultiheadAttention
from pyops.merging.nn import TaskVectorComposition

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D",
           "TaskMaskedMultiheadAttention", "TaskMoE", "TaskVectorComposition"]
