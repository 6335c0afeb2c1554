"""Fused expert routing (mixture of experts): route, grouped expert MLP, weighted combine, losses.

Public entry points: `pyops.moe_route`, `pyops.moe_experts`, `pyops.Routing`, `pyops.moe_losses`,
`pyops.nn.TaskMoE`. Modules: `reference` (the definition), `ops` (validation, registration,
backend glue), `losses`, `nn`, `verify` (cases for `python -m pyops verify`).
Triton kernels: `kernels/moe.py`; C++ and CUDA kernels: `csrc/moe/`. Semantics: docs/moe.md.
"""
