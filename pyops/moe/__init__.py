"""Fused expert routing (mixture of experts): route, grouped expert MLP, weighted combine, losses.

Public entry points: `pyops.moe_route`, `pyops.moe_experts`, `pyops.Routing`, `pyops.moe_losses`,
`pyops.nn.TaskMoE`. Modules: `reference` (the definition), `ops` (validation, backend choice,
autograd, the public functions), one module per backend's glue (`backend_cpu`, `backend_cuda`,
`backend_triton`: registered ops, fake kernels, kernel calls, capability declarations), `schema`
(argument codes and op outputs shared by the backends), `pool` (the CPU ops' buffer pools),
`losses`, `nn`, `parallel` (expert parallelism on torch.distributed: dispatch, combine, global
capacity and losses), `verify` (cases for `python -m pyops verify`).
Triton kernels: `kernels/moe.py`; C++ and CUDA kernels: `csrc/moe/`. Semantics: docs/moe.md.
"""
