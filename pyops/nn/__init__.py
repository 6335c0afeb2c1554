"""Drop-in modules built on the pyops ops.

* `TaskVectorComposition` — learned task-vector merging (aTLAS, AdaMerging): learnable
  block-wise coefficients λ over N task vectors, merged with `pyops.task_arithmetic`.
* `TaskMaskedMultiheadAttention` — `nn.MultiheadAttention` with a group rule instead of a dense mask.
"""
from pyops.nn.task_attention import TaskMaskedMultiheadAttention
from pyops.nn.task_vector_composition import TaskVectorComposition

__all__ = ["TaskMaskedMultiheadAttention", "TaskVectorComposition"]
