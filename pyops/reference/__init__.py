"""The definitions: plain PyTorch, fp32 accumulation (fp64 for fp64 inputs), readable first.

Every kernel is tested against these functions; they are also the fallback backend.
"""
from pyops.reference.task_merge import task_arithmetic

__all__ = ["task_arithmetic"]
