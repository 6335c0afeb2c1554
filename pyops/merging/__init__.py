"""The merging family's home: its ops and the checkpoint command.

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

What it does. It reads mergekit's YAML, opens the base model and every model (Hugging Face
layout: ``model.safetensors``, or ``model-0000x-of-0000y.safetensors`` shards with
``model.safetensors.index.json``), checks every tensor name, shape and dtype from the headers
alone, then merges one tensor at a time with `pyops.merge_from_models` (task vectors formed on
the fly, the tensor's name as the Philox key of DARE/DELLA drops and the config's ``seed``) on
the CPU threads or a GPU, and streams each result into sharded safetensors plus an index.
``config.json``, ``generation_config.json`` and the tokenizer files are copied from the base,
and the configuration is kept as ``pyops_merge.yaml``. Memory: the next tensor is read and the
previous result written on helper threads while the current one merges, so at most two copies
of one tensor per model, two results and the merge's own temporaries are alive: a few times the
largest tensor, whatever the model or shard size (the writer streams; nothing is accumulated
per shard). Output goes to ``DIR.tmp-<pid>`` and is renamed to DIR only
when complete; any error, Ctrl-C or SIGTERM removes it. Inputs are only ever opened read-only,
and an output that overlaps an input is refused.

The accepted YAML (mergekit's, for the methods pyops implements)::

    merge_method: dare_ties          # task_arithmetic ties dare_ties dare_linear breadcrumbs della
                                     # della_linear model_stock linear, and consensus (pyops); dare
    base_model: /models/base
    models:
      - model: /models/base          # the base may be listed; it is then not a task model
      - model: /models/math
        parameters: {weight: 0.5, density: 0.6}
      - model: /models/code
        parameters:
          weight: [{filter: mlp, value: 0.7}, {value: 0.4}]   # per-tensor: first matching filter
    parameters: {lambda: 1.0, normalize: false, weight: 1.0}  # defaults and method parameters
    dtype: bfloat16                  # output dtype (out_dtype wins if both are given)
    seed: 0                          # pyops: the DARE/DELLA key
    tokenizer_source: base           # or a model directory

Choices where mergekit and pyops differ, or mergekit is ambiguous (mergekit's behaviour is
followed unless stated):

* Parameters. ``weight`` is required (per model or as a top-level default) for every method but
  model_stock, as in mergekit; ``density`` defaults to 1, ``gamma`` to 0.01, ``epsilon`` to 0.15
  (mergekit's; pyops' own function default is 0.1), ``lambda`` to 1, ``k`` to 2, ``tall_lambda``
  to 0.6. ``normalize`` defaults per method as in mergekit's registry: true for ties, della and
  linear, false otherwise (note: pyops.merge itself defaults to true for dare_ties). For methods
  without sign election (task_arithmetic, dare_linear, breadcrumbs, della_linear) normalize
  divides the weights by Σ wᵢ, as mergekit does; consensus ignores it. ``lambda`` may also be
  given per model (mergekit's della): the first model's value is used, as mergekit does.
  ``gamma`` / ``epsilon`` per model must agree between models (pyops applies one value per
  tensor). Per-tensor values: a number, or mergekit's list of ``{filter, value}`` (a filter is
  a substring of the tensor name; the first match wins, an entry without a filter matches all;
  model level first, then the top level). Gradients (lists of numbers interpolated over layers)
  are rejected with the key named. ``blocks`` (None | rows | int) is a pyops extension: the unit
  of TIES / breadcrumbs / DELLA ranking (default: the whole tensor, as mergekit).
* ``rescale``: DARE and DELLA always rescale kept entries by 1/density (the paper's rescale;
  mergekit 0.1.5 rescales by an L1-norm ratio instead); ``rescale: false`` is an error, and so is
  ``rescale: true`` for ties/breadcrumbs. ``int8_mask`` is ignored with a note;
  ``filter_wise: true`` (model_stock) is an error.
* ``linear`` is mergekit's weighted average θ = Σ wᵢθᵢ / Σ wᵢ (``normalize: false``: Σ wᵢθᵢ),
  over all listed models, the base included if listed. It runs as
  ``merge_from_models(zeros, [θ₁..θₙ], method="task_arithmetic", coeffs=w/Σw)``, i.e. task
  arithmetic from a zero base, which is exact for either normalize setting. base_model is
  optional; without it the first model supplies the non-floating tensors and the config files.
* ``dtype`` is the output dtype (mergekit's compute dtype: pyops always accumulates in fp32);
  ``out_dtype`` wins when both are given; default: each tensor keeps the base's dtype. A model
  whose floating tensors have another dtype is converted to the base's before merging, as in
  mergekit. ``config.json``'s ``torch_dtype`` is updated when an output dtype is set.
* Non-floating tensors (int buffers, bool masks, fp8) are copied from the base, not merged, and
  listed in the report. Every model must have exactly the base's tensor names and shapes
  (mergekit skips or truncates mismatched tensors; pyops refuses, naming tensor and model).
* Paths are local; relative paths are relative to the working directory (as in mergekit).
  Not supported: ``slices``, the ``tokenizer:`` block, ``tokenizer_source: union``, LoRA
  (``model+lora``), Hub model ids, pytorch_model.bin; ``chat_template`` is ignored with a note.

Reading does not use ``safetensors.safe_open``: its tensors are views of a file mapping that keeps
every touched page resident for the handle's life, so peak RSS would grow with shard size; see
`pyops.merging.safetensors_io`.
"""
from pyops.merging.config import MergeConfig, load_config
from pyops.merging.errors import CheckpointError, ConfigError, MergeError
from pyops.merging.runner import MergeReport, run_merge

__all__ = ["CheckpointError", "ConfigError", "MergeConfig", "MergeError", "MergeReport", "load_config", "run_merge"]
