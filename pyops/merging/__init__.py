"""The merging family's home: its ops and the checkpoint command.

mergekit 0.1.5's methods beyond task arithmetic are ops here, bound on first use (they import
torch, which the checkpoint command's CPU path avoids): `pyops.merging.linear`, `slerp`,
`nearswap`, `passthrough`, `nuslerp`, `multislerp`, `karcher`, `ram`, `ramplus_tl`, `sce`,
`arcee_fusion`, and `merge_tensors` (one tensor of a checkpoint merge by method name; it also
runs `breadcrumbs_ties` through `pyops.merge_from_models`); see `pyops.merging.interpolate`.

The ops (public as `pyops.task_arithmetic`, `pyops.task_arithmetic_from_models`, `pyops.merge`,
`pyops.merge_from_models`): `reference.py` is the definition; `task_arithmetic.py` and `merge.py`
validate, choose the backend and register the autograd; `backend_cpu.py`, `backend_triton.py` and
`backend_cuda.py` hold each backend's registered ops and glue, `registry.py` what they share;
`spec.py` the method tables, defaults and random key without torch; `nn.py` the learned-merging
module (`pyops.nn.TaskVectorComposition`); `verify.py` the cases of `python -m pyops verify`. The
package is ``pyops.merging`` because ``pyops.merge`` is the merge function.

The checkpoint command (`cli.py`, `config.py`, `runner.py`, `native_engine.py`,
`safetensors_io.py`, `errors.py`) streams a merge of whole checkpoints:
`python -m pyops merge CONFIG.yaml --out DIR`.

    from pyops.merging import run_merge
    report = run_merge("merge.yaml", "out/merged", device="cpu", shard_size="5GB")
    print(report.summary())

It reads mergekit's YAML, checks every tensor name, shape and dtype from the headers alone, then
merges one tensor at a time (task vectors formed on the fly, the tensor's name as the Philox key
of DARE/DELLA drops) on the CPU threads or a GPU and streams each result into sharded
safetensors; output goes to ``DIR.tmp-<pid>@<host>`` and is renamed only when complete. Which
mergekit features it takes, its dtype rules and every place where its answer differs from
mergekit's are in docs/merging.md ("The checkpoint command" and "Checkpoint command: mergekit
configuration features"). Reading does not use ``safetensors.safe_open``, whose mappings keep
every touched page resident (`pyops.merging.safetensors_io`).
"""
from pyops.merging.config import MergeConfig, load_config
from pyops.merging.errors import CheckpointError, ConfigError, MergeError
from pyops.merging.runner import MergeReport, run_merge

# The ops of pyops.merging.interpolate, imported on first access (they import torch).
_INTERPOLATE = ("arcee_fusion", "karcher", "linear", "merge_tensors", "multislerp", "nearswap", "nuslerp",
                "passthrough", "ram", "ramplus_tl", "sce", "slerp")

__all__ = ["CheckpointError", "ConfigError", "MergeConfig", "MergeError", "MergeReport", "load_config", "run_merge",
           *_INTERPOLATE]


def __getattr__(name: str):
    if name in _INTERPOLATE:
        from pyops.merging import interpolate

        return getattr(interpolate, name)
    raise AttributeError(f"module 'pyops.merging' has no attribute {name!r}")
