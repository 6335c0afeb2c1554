"""Triton kernels of the merging family (`pyops.kernels.merging`).

`task_arithmetic` (the fused block-wise sum), `methods` (TIES / DARE / breadcrumbs / DELLA) and
`ranks` (per-block magnitude ranks from a stable device sort; plain torch, no Triton import).
"""
