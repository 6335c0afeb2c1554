"""`TaskVectorComposition`: learned task-vector merging (aTLAS, AdaMerging) on the fused op.

The module holds a frozen base model, N task vectors (or N fine-tuned models) and learnable
coefficients λ, one `[N, n_blocks]` matrix per merged parameter. Each forward builds the merged
parameters with `pyops.task_arithmetic` (or `pyops.task_arithmetic_from_models`) and runs the
base model on them through `torch.func.functional_call`, so ``loss.backward()`` reaches λ.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from pyops import _backend
from pyops.merging.task_arithmetic import resolve_blocks, task_arithmetic, task_arithmetic_from_models

Granularity = Union[str, Tuple[str, int]]
TaskVectors = Sequence[Union[Mapping[str, Tensor], nn.Module]]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _key(name: str) -> str:
    """A parameter's name as a valid submodule attribute / state-dict key ('.' -> '__')."""
    return name.replace(".", "__")


def _fmt_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _parse_granularity(granularity: object) -> Tuple[str, Optional[int]]:
    """('tensor', None) | ('rows', None) | ('chunks', n)."""
    if isinstance(granularity, str):
        if granularity in ("tensor", "rows"):
            return granularity, None
        raise ValueError(f"granularity: expected 'tensor', 'rows' or ('chunks', n), got {granularity!r}")
    if isinstance(granularity, (tuple, list)) and len(granularity) == 2 and granularity[0] == "chunks":
        n = granularity[1]
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"granularity: ('chunks', n) needs an int chunk size n, got {type(n).__name__}")
        if n <= 0:
            raise ValueError(f"granularity: ('chunks', n) needs a chunk size n > 0, got {n}")
        return "chunks", n
    raise ValueError(f"granularity: expected 'tensor', 'rows' or ('chunks', n), got {granularity!r}")


def _blocks_for(kind: str, chunk: Optional[int], param: Tensor) -> Union[None, str, int]:
    """The `blocks` argument of the fused op for one parameter."""
    if param.numel() == 0 or kind == "tensor":
        return None
    if kind == "rows":
        # "rows" of a 1-d tensor would be one block per element; biases, norms and scalars get
        # one coefficient per task instead.
        return "rows" if param.dim() >= 2 else None
    return chunk


def _parse_init(init: object, n: int) -> List[float]:
    if isinstance(init, Tensor):
        if init.dim() == 0:
            return [float(init)] * n
        if init.dim() != 1 or init.shape[0] != n:
            raise ValueError(f"init: expected a float or {n} values (one per task), got a tensor of shape "
                             f"{_fmt_shape(init.shape)}")
        return [float(v) for v in init.tolist()]
    if isinstance(init, (int, float)) and not isinstance(init, bool):
        return [float(init)] * n
    if isinstance(init, (list, tuple)):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in init):
            raise TypeError(f"init: expected a float or a list of {n} floats, got {init!r}")
        if len(init) != n:
            raise ValueError(f"init: expected {n} values (one per task), got {len(init)}")
        return [float(v) for v in init]
    raise TypeError(f"init: expected a float or a list of {n} floats, got {type(init).__name__}")


class _Stacked(nn.Module):
    """Holds the stacked task vectors / fine-tuned weights as non-persistent buffers, so they move
    with `.to()` / `.cuda()` but stay out of the state dict (only base and λ are saved)."""

    def extra_repr(self) -> str:
        return f"{len(self._buffers)} stacked tensors (non-persistent)"


class TaskVectorComposition(nn.Module):
    r"""A base model plus learnable task-vector coefficients: learned model merging.

    The merged parameters are, for every parameter ``p`` present in the task vectors and every
    block ``b`` of its flattened elements,

        θ_p = θ_base,p + Σᵢ λ_p[i, b] · τᵢ,p,        τᵢ = θᵢ − θ_base,

    computed by the fused op `pyops.task_arithmetic` (one pass over memory, fp32 accumulation),
    and the forward pass is ``torch.func.functional_call(base_module, merged, args, kwargs)``.
    This is the learned merging of aTLAS (Zhang et al., "Knowledge Composition using Task Vectors
    with Learned Anisotropic Scaling", NeurIPS 2024; block-wise, "anisotropic" coefficients) and
    AdaMerging (Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning",
    ICLR 2024; task-wise or layer-wise coefficients learned by entropy minimisation on unlabelled
    test data). Train it like any module: the only trainable parameters are the λ (plus the base
    model's, with ``learnable_base=True``).

    Gradients reach only λ: with the task vectors held as buffers (no grad) and the base frozen,
    the backward of the fused op computes, per block, the reductions
    ``∂L/∂λ[i, b] = Σ_{j ∈ b} ∂L/∂θ[j] · τᵢ[j]`` in one pass and never allocates per-task (or
    base) parameter gradients: beyond the ``∂L/∂θ`` of the merged parameters (one model's
    worth, which autograd produces anyway) it allocates only the ``[N, n_blocks]`` coefficient
    gradients. Plain autograd through ``base + Σᵢ λᵢ·τᵢ`` instead allocates a parameter-sized
    product ``λᵢ·τᵢ`` per task in the forward and a ``∂L/∂θ · τᵢ`` per task in the backward.

    Args:
        base_module: the pretrained model θ_base, kept as the submodule ``base_module``. Its
            parameters are frozen (``requires_grad=False``) unless ``learnable_base=True``.
            Its buffers (e.g. BatchNorm statistics) are used as they are.
        task_vectors: N ≥ 1 task vectors in one of two forms:

            * N dicts ``name -> τᵢ`` (e.g. ``{n: ft[n] - base[n]}``), names of floating
              parameters of ``base_module`` (as in ``named_parameters()``), same keys in every
              dict, each tensor of the parameter's shape and dtype (copied to its device).
              Parameters absent from the dicts are used from the base unchanged.
            * N fine-tuned ``nn.Module`` s of the same architecture as ``base_module`` (same
              parameter names, shapes and dtypes). Every floating parameter is merged with
              `pyops.task_arithmetic_from_models` semantics: τᵢ = θᵢ − θ_base is formed inside
              the kernel and never materialised. The fine-tuned modules' buffers are ignored.

            Either way the tensors are detached and stacked per parameter into non-persistent
            buffers ``task_vectors.<key>`` of shape ``[N, *shape]`` (τ, or θ in the modules
            form); they never receive gradients.
        granularity: the blocks that share one coefficient per task:
            ``"tensor"`` (default; one λ per task and parameter tensor, aTLAS),
            ``"rows"`` (one per task and index of the first dimension; parameters with fewer
            than 2 dimensions get one per task), or ``("chunks", n)`` (chunks of n elements of
            the flattened parameter, the last possibly shorter).
        init: initial value of every λ: a float (default 0.3, the usual task-arithmetic
            scale), or N floats (one per task).
        learnable_base: ``False`` (default) freezes every base parameter; ``True`` leaves their
            ``requires_grad`` flags as they are, so trainable base parameters are trained with λ
            (the fused op then also returns ``∂L/∂θ_base``).
        backend: the `backend` argument of the fused op (``"auto"`` by default).

    Attributes:
        coeffs: an ``nn.ParameterDict`` of fp32 ``nn.Parameter`` s ``[N, n_blocks]``, one per
            merged parameter, keyed by the parameter's name with ``.`` replaced by ``__``
            (state-dict keys ``coeffs.<key>``). `coefficients()` gives them by parameter name.

    Shapes: ``forward`` takes and returns whatever ``base_module`` does.

    Example::

        comp = pyops.nn.TaskVectorComposition(pretrained, [ft1, ft2, ft3], granularity="rows")
        opt = torch.optim.Adam(comp.parameters(), lr=1e-2)   # only λ requires grad
        loss = F.cross_entropy(comp(x), y); loss.backward(); opt.step()
        deployed = comp.merge_and_unload()                    # a plain copy of `pretrained`
    """

    def __init__(
        self,
        base_module: nn.Module,
        task_vectors: TaskVectors,
        granularity: Granularity = "tensor",
        init: Union[float, Sequence[float]] = 0.3,
        learnable_base: bool = False,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(base_module, nn.Module):
            raise TypeError(f"base_module: expected an nn.Module, got {type(base_module).__name__}")
        kind, chunk = _parse_granularity(granularity)
        if not isinstance(learnable_base, bool):
            raise TypeError(f"learnable_base: expected a bool, got {type(learnable_base).__name__}")
        _backend.check_backend_name(backend)
        if isinstance(task_vectors, (Mapping, nn.Module, Tensor)) or not isinstance(task_vectors, Sequence):
            raise TypeError("task_vectors: expected a list of N dicts (name -> task vector) or a list of N "
                            f"fine-tuned nn.Modules, got {type(task_vectors).__name__}")
        items = list(task_vectors)
        if len(items) == 0:
            raise ValueError("task_vectors: expected at least one task (N >= 1), got an empty list")

        base_params = dict(base_module.named_parameters())
        if all(isinstance(t, nn.Module) for t in items):
            from_models = True
            per_task = [self._module_params(t, i, base_params) for i, t in enumerate(items)]
        elif all(isinstance(t, Mapping) for t in items):
            from_models = False
            per_task = [dict(t) for t in items]
        else:
            got = ", ".join(sorted({type(t).__name__ for t in items}))
            raise TypeError("task_vectors: expected a list of dicts (name -> task vector) or a list of nn.Modules "
                            f"(fine-tuned models), not a mix or other types; got {got}")
        names = self._validate(per_task, base_params, from_models)

        n = len(items)
        init_values = _parse_init(init, n)
        self.base_module = base_module
        self.n_tasks = n
        self.from_models = from_models
        self.granularity = granularity if isinstance(granularity, str) else (kind, chunk)
        self.learnable_base = learnable_base
        self.backend = backend
        self._requires_grad = {name: p.requires_grad for name, p in base_params.items()}
        if not learnable_base:
            for p in base_module.parameters():
                p.requires_grad_(False)

        self.task_vectors = _Stacked()
        self.coeffs = nn.ParameterDict()
        plan: List[Tuple[str, str, Union[None, str, int]]] = []
        for name in names:
            base_p = base_params[name]
            key = _key(name)
            blocks = _blocks_for(kind, chunk, base_p)
            _, n_blocks = resolve_blocks(blocks, base_p.shape)
            with torch.no_grad():
                stacked = torch.stack([t[name].detach().to(base_p.device) for t in per_task])
            self.task_vectors.register_buffer(key, stacked, persistent=False)
            init_t = torch.tensor(init_values, dtype=torch.float32, device=base_p.device)
            self.coeffs[key] = nn.Parameter(init_t[:, None].expand(n, n_blocks).clone())
            plan.append((name, key, blocks))
        self._plan = plan

    # ----------------------------------------------------------------------------------------
    # Validation
    # ----------------------------------------------------------------------------------------

    @staticmethod
    def _module_params(module: nn.Module, i: int, base_params: Dict[str, Tensor]) -> Dict[str, Tensor]:
        params = dict(module.named_parameters())
        missing = [k for k in base_params if k not in params]
        extra = [k for k in params if k not in base_params]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {missing[:5]}")
            if extra:
                parts.append(f"unexpected {extra[:5]}")
            raise ValueError(f"task_vectors[{i}]: expected a fine-tuned model with the parameters of base_module, "
                             f"got {'; '.join(parts)}")
        # Only floating parameters are merged; the others are used from the base.
        return {k: v for k, v in params.items() if base_params[k].dtype in _FLOAT_DTYPES}

    @staticmethod
    def _validate(per_task: List[Dict[str, Any]], base_params: Dict[str, Tensor], from_models: bool) -> List[str]:
        what = "fine-tuned parameter" if from_models else "task vector"
        names = list(per_task[0].keys())
        for i, tv in enumerate(per_task):
            for name in tv:
                if not isinstance(name, str):
                    raise TypeError(f"task_vectors[{i}]: expected str parameter names as keys, got {name!r}")
                if name not in base_params:
                    raise ValueError(f"task_vectors[{i}]['{name}']: '{name}' is not a parameter of base_module "
                                     "(task vectors cover parameters only; buffers are taken from base_module)")
            if set(tv) != set(names):
                missing = sorted(set(names) - set(tv))
                extra = sorted(set(tv) - set(names))
                detail = f"missing {missing[:5]}" if missing else f"unexpected {extra[:5]}"
                raise ValueError(f"task_vectors[{i}]: expected the same parameter names as task_vectors[0], "
                                 f"got {detail}")
        if not names:
            raise ValueError("task_vectors: no parameter to merge (the task vectors are empty dicts)")
        keys: Dict[str, str] = {}
        for name in names:
            base_p = base_params[name]
            if base_p.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"task_vectors: parameter '{name}' of base_module has dtype {base_p.dtype}; "
                                "only floating-point parameters (float32, float16, bfloat16, float64) can be merged")
            key = _key(name)
            if key in keys:
                raise ValueError(f"task_vectors: parameters '{keys[key]}' and '{name}' both map to the key "
                                 f"'{key}' ('.' -> '__'); rename one of them")
            keys[key] = name
            for i, tv in enumerate(per_task):
                t = tv[name]
                if not isinstance(t, Tensor):
                    raise TypeError(f"task_vectors[{i}]['{name}']: expected a torch.Tensor, got {type(t).__name__}")
                if tuple(t.shape) != tuple(base_p.shape):
                    raise ValueError(f"task_vectors[{i}]['{name}']: expected the {what}'s shape to be "
                                     f"{_fmt_shape(base_p.shape)} (the base parameter's), got {_fmt_shape(t.shape)}")
                if t.dtype != base_p.dtype:
                    raise TypeError(f"task_vectors[{i}]['{name}']: expected dtype {base_p.dtype} (the base "
                                    f"parameter's), got {t.dtype}")
        return names

    # ----------------------------------------------------------------------------------------
    # Coefficients
    # ----------------------------------------------------------------------------------------

    def coefficients(self) -> Dict[str, nn.Parameter]:
        """The learnable λ by parameter name: ``name -> nn.Parameter [N, n_blocks]`` (fp32)."""
        return {name: self.coeffs[key] for name, key, _ in self._plan}

    def n_coefficients(self) -> int:
        """The number of learnable coefficients (Σ over merged parameters of N · n_blocks)."""
        return sum(int(self.coeffs[key].numel()) for _, key, _ in self._plan)

    def blocks(self) -> Dict[str, Union[None, str, int]]:
        """The `blocks` argument of the fused op used for each merged parameter."""
        return {name: blocks for name, _, blocks in self._plan}

    # ----------------------------------------------------------------------------------------
    # Merging and forward
    # ----------------------------------------------------------------------------------------

    def _merge_one(self, name: str, key: str, blocks, out: Optional[Tensor] = None) -> Tensor:
        base_p = self.base_module.get_parameter(name)
        fn = task_arithmetic_from_models if self.from_models else task_arithmetic
        stacked = getattr(self.task_vectors, key)
        coeffs = self.coeffs[key]
        return fn(base_p, stacked, coeffs, blocks=blocks, out=out, backend=self.backend)

    def merged_parameters(self) -> Dict[str, Tensor]:
        """``name -> θ_base + Σᵢ λ[i, block]·τᵢ`` for every merged parameter (differentiable in λ)."""
        return {name: self._merge_one(name, key, blocks) for name, key, blocks in self._plan}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Runs ``base_module`` with the merged parameters (its own buffers and unmerged parameters)."""
        return torch.func.functional_call(self.base_module, self.merged_parameters(), args, kwargs)

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """A deep copy of ``base_module`` with the merged weights written in, for deployment.

        Computed without autograd, the fused op writing straight into the copy's parameters.
        The copy's parameters get back the ``requires_grad`` flags the base parameters had
        before this module froze them; this module and its base are left unchanged.
        """
        merged = copy.deepcopy(self.base_module)
        for name, key, blocks in self._plan:
            p = merged.get_parameter(name)
            if p.is_contiguous():
                self._merge_one(name, key, blocks, out=p.detach())
            else:
                p.copy_(self._merge_one(name, key, blocks))
        for name, p in merged.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, p.requires_grad))
        return merged

    def extra_repr(self) -> str:
        form = "fine-tuned models" if self.from_models else "task vectors"
        return (f"n_tasks={self.n_tasks}, from {form}, granularity={self.granularity!r}, "
                f"merged_parameters={len(self._plan)}, n_coefficients={self.n_coefficients()}, "
                f"learnable_base={self.learnable_base}")


__all__ = ["TaskVectorComposition"]
