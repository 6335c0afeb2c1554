"""Neighbourhood attention (NATTEN semantics, heads-last `[B, *spatial, H, D]`), 1D/2D/3D.

Public entry points: `pyops.na1d`, `pyops.na2d`, `pyops.na3d`, `pyops.nn.NeighborhoodAttention{1,2,3}D`.
Modules: `reference` (the definition), `ops` (public functions, validation, backend choice,
autograd), `backend_cpu` / `backend_triton` (each backend's capability declaration, registered ops
and fake kernels), `layout` (the 3D-form tensors both backends allocate), `nn` (NATTEN 0.17 /
DiNAT modules), `verify` (cases for `python -m pyops verify`).
Triton kernels: `kernels/neighborhood.py`; C++ kernels: `csrc/neighborhood/`. Semantics: docs/neighborhood.md.
"""
