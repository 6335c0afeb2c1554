"""Triton kernels, one module per op family (shipped as `pyops.kernels`).

Importing a module here imports Triton; the op layer only does so once the Triton backend has
been chosen, so pyops works without Triton installed.
"""
