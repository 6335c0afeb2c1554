"""Task-masked attention: every token carries a group id, a G×G rule says which groups attend which.

Public entry points: `pyops.task_masked_attention`, `pyops.masks`, `pyops.nn.TaskMaskedMultiheadAttention`.
Modules: `reference` (the definition), `ops` (validation, backend choice, autograd),
`backend_cpu` / `backend_triton` (each backend's declaration, registered ops, fake kernels and
kernel calls), `masks` (presets), `nn` (the drop-in module), `verify` (cases for `python -m pyops verify`).
Triton kernels: `kernels/task_attention.py`; C++ kernels: `csrc/task_attention/`. Semantics: docs/task_attention.md.
"""
