"""Run Hugging Face transformers models on pyops kernels (docs/integrations.md).

* `patch_model(model)`: routes every supported MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
  DeepSeek-V3, GPT-OSS) through `pyops.moe_route` + `pyops.moe_experts`, and every DiNAT /
  OneFormer-DiNAT `NeighborhoodAttention` through `pyops.na2d`, in place. The blocks keep their
  parameters: the expert weights are passed as views of HF's tensors (``[E, out, in]`` transposed,
  GPT-OSS's interleaved gate/up columns), nothing is copied, so optimizers, ``state_dict`` and
  ``save_pretrained`` see the same model.
* `enable_natten()`: lets transformers' DiNAT construct and run without a NATTEN that has the 0.17
  functional API (`pyops.integrations.natten_compat`).
* `register_attention(name)`: ``attn_implementation=name`` runs `pyops.task_masked_attention`.

transformers is imported only inside these functions; importing this module does not import it.
Anything pyops does not compute exactly as transformers does raises `NotImplementedError` naming
the module class and the option, never a silently different model.
"""
from __future__ import annotations

import importlib.machinery
import math
import sys
import types
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

__all__ = ["patch_model", "enable_natten", "register_attention", "SUPPORTED_MOE", "SUPPORTED_NA"]

#: MoE block classes patch_model routes through pyops, by class name.
SUPPORTED_MOE = ("MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock",
                 "OlmoeSparseMoeBlock", "DeepseekV3MoE", "GptOssMLP")
#: Neighbourhood-attention classes patch_model routes through pyops.na2d, by class name.
SUPPORTED_NA = ("NeighborhoodAttention",)

# Known MoE / neighbourhood classes pyops refuses, with the reason.
_REFUSED: Dict[str, str] = {}

_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}
_PATCHED = "_pyops_patched"


class UnsupportedModelError(NotImplementedError):
    """A block (or one of its options) that pyops does not compute exactly as transformers does."""


def _refuse(qualname: str, module: torch.nn.Module, what: str) -> UnsupportedModelError:
    name = f" ({qualname})" if qualname else ""
    return UnsupportedModelError(f"pyops: {type(module).__name__}{name}: {what}")


# --------------------------------------------------------------------------------------------- MoE


@dataclass(frozen=True)
class _MoeSpec:
    renormalize: bool
    activation: str
    shared: str = ""                    # "" | "gated" (Qwen2-MoE) | "plain" (DeepSeek-V3)
    score: str = "softmax"
    n_group: Optional[int] = None
    topk_group: Optional[int] = None
    routed_scaling: float = 1.0
    alpha: Optional[float] = None       # swiglu_oai (GPT-OSS)
    limit: Optional[float] = None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _deepseek_router(qualname: str, block: torch.nn.Module, gate: torch.nn.Module, E: int, d: int) -> dict:
    """The options of transformers' `DeepseekV3TopkRouter` that pyops' group-limited routing takes,
    after checking that pyops computes exactly what that router computes with them."""
    for attr in ("weight", "e_score_correction_bias", "top_k", "num_group", "topk_group", "norm_topk_prob",
                 "routed_scaling_factor"):
        if not hasattr(gate, attr):
            raise _refuse(qualname, block, f"router {type(gate).__name__} has no {attr!r} (a different "
                                           "transformers version?)")
    if tuple(gate.weight.shape) != (E, d) or getattr(gate, "bias", None) is not None:
        raise _refuse(qualname, block, f"router weight {tuple(gate.weight.shape)} is not [E, d] = [{E}, {d}] "
                                       "without a bias")
    bias = gate.e_score_correction_bias
    if not isinstance(bias, Tensor) or tuple(bias.shape) != (E,):
        raise _refuse(qualname, block, "e_score_correction_bias is not a [E] tensor")
    G, M, k, scale = gate.num_group, gate.topk_group, gate.top_k, gate.routed_scaling_factor
    if not _is_int(G) or G < 1 or E % G:
        raise _refuse(qualname, block, f"n_group={G!r} is not a positive divisor of n_routed_experts={E} "
                                       "(transformers' router cannot run it)")
    if E // G < 2:
        raise _refuse(qualname, block, f"n_group={G} leaves one expert per group: transformers' router scores "
                                       "a group by its top-2 experts and fails there")
    if not _is_int(M) or not 1 <= M <= G:
        raise _refuse(qualname, block, f"topk_group={M!r} is not in [1, n_group={G}]")
    if not _is_int(k) or not 1 <= k <= M * (E // G):
        raise _refuse(qualname, block, f"num_experts_per_tok={k!r} exceeds the {M * (E // G)} experts of the "
                                       f"topk_group={M} kept groups (transformers would pick excluded experts)")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0 < scale < math.inf):
        raise _refuse(qualname, block, f"routed_scaling_factor={scale!r} is not supported (pyops needs a finite "
                                       "number > 0)")
    return dict(score="sigmoid", n_group=G, topk_group=M, routed_scaling=float(scale),
                renormalize=bool(gate.norm_topk_prob))


def _gpt_oss_spec(qualname: str, block: torch.nn.Module) -> _MoeSpec:
    """transformers' `GptOssMLP`: a `router` (linear with a bias, softmax over the top-k logits) and
    `experts` with biases, gate/up interleaved in ``gate_up_proj [E, d, 2h]`` (x @ W layout) and the
    clamped SwiGLU; checked against the layout pyops reads."""
    router, experts = getattr(block, "router", None), getattr(block, "experts", None)
    if router is None or experts is None:
        raise _refuse(qualname, block, "expected `router` and `experts` children (a different transformers version?)")
    if not type(router).__name__.endswith("TopKRouter"):
        raise _refuse(qualname, block, f"router class {type(router).__name__} is not supported (expected the "
                                       "softmax top-k router)")
    for attr, want in (("has_bias", True), ("is_transposed", True), ("is_concatenated", False),
                       ("_is_expert_parallel", False)):
        if getattr(experts, attr, want) != want:
            raise _refuse(qualname, block, f"experts option {attr}={getattr(experts, attr)!r} is not supported")
    names = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
    if not all(isinstance(getattr(experts, n, None), Tensor) for n in names):
        raise _refuse(qualname, block, "expected the experts as gate_up_proj, gate_up_proj_bias, down_proj, "
                                       "down_proj_bias tensors (a different transformers version?)")
    gu, gub, down, downb = (getattr(experts, n) for n in names)
    E, d, h2 = gu.shape if gu.dim() == 3 else (0, 0, 0)
    h = h2 // 2
    if gu.dim() != 3 or h2 % 2 or tuple(gub.shape) != (E, h2) or tuple(down.shape) != (E, h, d) or \
            tuple(downb.shape) != (E, d):
        raise _refuse(qualname, block, f"unexpected expert shapes gate_up_proj {tuple(gu.shape)}, gate_up_proj_bias "
                                       f"{tuple(gub.shape)}, down_proj {tuple(down.shape)}, down_proj_bias "
                                       f"{tuple(downb.shape)} (expected [E, d, 2h], [E, 2h], [E, h, d], [E, d])")
    if tuple(router.weight.shape) != (E, d) or not isinstance(getattr(router, "bias", None), Tensor):
        raise _refuse(qualname, block, f"router weight {tuple(router.weight.shape)} is not [E, d] = [{E}, {d}] "
                                       "with a bias")
    alpha, limit = getattr(experts, "alpha", None), getattr(experts, "limit", None)
    for n, v in (("swiglu_alpha", alpha), ("swiglu_limit", limit)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
                (n == "swiglu_limit" and v <= 0):
            raise _refuse(qualname, block, f"{n}={v!r} is not supported (pyops needs a finite number"
                                           + (" > 0)" if n == "swiglu_limit" else ")"))
    return _MoeSpec(renormalize=True, activation="swiglu_oai", alpha=float(alpha), limit=float(limit))


def _moe_spec(qualname: str, block: torch.nn.Module, model_config) -> _MoeSpec:
    cls = type(block).__name__
    if cls == "GptOssMLP":
        return _gpt_oss_spec(qualname, block)
    gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
    if gate is None or experts is None:
        raise _refuse(qualname, block, "expected `gate` and `experts` children (a different transformers version?)")
    deepseek = cls == "DeepseekV3MoE"
    router = "TopkRouter" if deepseek else "TopKRouter"
    if not type(gate).__name__.endswith(router):
        raise _refuse(qualname, block, f"router class {type(gate).__name__} is not supported (expected the "
                                       + ("sigmoid group-limited" if deepseek else "softmax") + " top-k router)")
    if getattr(gate, "bias", None) is not None:
        raise _refuse(qualname, block, "a router with a bias is not supported")
    for attr, want in (("has_bias", False), ("has_gate", True), ("is_transposed", False),
                       ("is_concatenated", True), ("_is_expert_parallel", False), ("has_post_expert_norm", False)):
        if getattr(experts, attr, want) != want:
            raise _refuse(qualname, block, f"experts option {attr}={getattr(experts, attr)!r} is not supported")
    if not isinstance(getattr(experts, "gate_up_proj", None), Tensor) or \
            not isinstance(getattr(experts, "down_proj", None), Tensor) or experts.gate_up_proj.dim() != 3:
        raise _refuse(qualname, block, "expected the experts as 3-D gate_up_proj / down_proj tensors (a different "
                                       "transformers version?)")
    E, h2, d = experts.gate_up_proj.shape
    if experts.down_proj.shape != (E, d, h2 // 2) or h2 % 2:
        raise _refuse(qualname, block, f"unexpected expert weight shapes gate_up_proj {tuple(experts.gate_up_proj.shape)}"
                                       f", down_proj {tuple(experts.down_proj.shape)}")
    config = getattr(experts, "config", None) or getattr(block, "config", None) or model_config
    act = getattr(config, "hidden_act", None)
    if act not in _ACTIVATIONS:
        raise _refuse(qualname, block, f"hidden_act={act!r} is not supported (pyops has silu and exact gelu GLUs)")
    if deepseek:
        if not isinstance(getattr(block, "shared_experts", None), torch.nn.Module):
            raise _refuse(qualname, block, "expected a `shared_experts` child (a different transformers version?)")
        return _MoeSpec(activation=_ACTIVATIONS[act], shared="plain", **_deepseek_router(qualname, block, gate, E, d))
    if cls == "MixtralSparseMoeBlock":
        renormalize = True                                  # Mixtral always renormalises the top-k
    else:
        renormalize = bool(gate.norm_topk_prob)
    return _MoeSpec(renormalize, _ACTIVATIONS[act], "gated" if cls == "Qwen2MoeSparseMoeBlock" else "")


def _halves(gate_up: Tensor) -> tuple:
    """Mixtral-style ``gate_up_proj [E, 2h, d]`` (gate rows, then up rows) as ``w1, w3 [E, d, h]``."""
    h = gate_up.shape[1] // 2
    return gate_up[:, :h].transpose(1, 2), gate_up[:, h:].transpose(1, 2)


def _interleaved(gate_up: Tensor) -> tuple:
    """GPT-OSS's gate/up interleaved in the last dimension (gate at even, up at odd columns)."""
    return gate_up[..., ::2], gate_up[..., 1::2]


class _FusedViews(torch.autograd.Function):
    """A fused gate/up tensor as pyops' ``w1, w3`` (or ``b1, b3``): two views by `split`, no copy.
    The backward writes both gradients into one tensor of the fused shape, through the same views;
    autograd's own backward of two slices would zero-fill a full-size tensor per slice and add them."""

    @staticmethod
    def forward(ctx, fused: Tensor, split: Callable):
        ctx.split = split
        ctx.shape = fused.shape
        return split(fused)

    @staticmethod
    def backward(ctx, g1: Optional[Tensor], g3: Optional[Tensor]):
        if g1 is None and g3 is None:
            return None, None
        like = g1 if g1 is not None else g3
        out = like.new_empty(ctx.shape)
        for part, g in zip(ctx.split(out), (g1, g3)):
            if g is None:
                part.zero_()
            else:
                part.copy_(g)
        return out, None


def _gpt_oss_forward(self, hidden_states: Tensor):
    """GptOssMLP.forward on pyops: returns (y, router_scores [T, k]) as transformers' block does."""
    import pyops

    spec: _MoeSpec = self._pyops_moe
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    # The router module runs as transformers wrote it (its output recorder sees the logits); the
    # softmax over its top-k logits is pyops' softmax over all experts renormalised over the top-k.
    logits = self.router(x)[0]
    routing = pyops.moe_route(logits, self.router.top_k, renormalize=True)
    ex = self.experts
    w1, w3 = _FusedViews.apply(ex.gate_up_proj, _interleaved)
    b1, b3 = _FusedViews.apply(ex.gate_up_proj_bias, _interleaved)
    y = pyops.moe_experts(x, routing, w1, ex.down_proj, w3, activation="swiglu_oai", b1=b1, b2=ex.down_proj_bias,
                          b3=b3, alpha=spec.alpha, limit=spec.limit)
    return y.reshape(shape), routing.weights


def _moe_forward(self, hidden_states: Tensor) -> Tensor:
    import pyops

    spec: _MoeSpec = self._pyops_moe
    if self.training and getattr(self, "jitter_noise", 0) > 0:
        raise UnsupportedModelError(f"pyops: {type(self).__name__}: router_jitter_noise={self.jitter_noise} in "
                                    "training is not supported (set it to 0 or use eval mode)")
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    # The router module runs as transformers wrote it, so its hooks (output_router_logits) still see
    # it; only its logits are used (its own top-k selection is discarded).
    logits = self.gate(x)[0]
    if spec.score == "sigmoid":
        # DeepSeek-V3: fp32 logits (the router computes them in fp32), sigmoid scores, the bias for
        # the selection only, group-limited top-k, renormalise (norm_topk_prob), routed_scaling_factor.
        bias = self.gate.e_score_correction_bias
        routing = pyops.moe_route(logits, self.gate.top_k, score="sigmoid", renormalize=spec.renormalize,
                                  bias=bias.to(logits.dtype), n_group=spec.n_group, topk_group=spec.topk_group,
                                  routed_scaling=spec.routed_scaling)
    else:
        routing = pyops.moe_route(logits, self.gate.top_k, renormalize=spec.renormalize)
    ex = self.experts
    # HF stores [E, out, in] (x @ W.T); pyops takes x @ W: transposed views, no copies.
    w1, w3 = _FusedViews.apply(ex.gate_up_proj, _halves)
    w2 = ex.down_proj.transpose(1, 2)
    y = pyops.moe_experts(x, routing, w1, w2, w3, activation=spec.activation)
    if spec.shared == "gated":
        y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
    elif spec.shared == "plain":
        y = y + self.shared_experts(x)
    return y.reshape(shape)


# ------------------------------------------------------------------------------ neighbourhood attn


def _na_check(qualname: str, module: torch.nn.Module) -> None:
    for attr in ("query", "key", "value", "rpb", "kernel_size", "dilation", "num_attention_heads",
                 "attention_head_size"):
        if not hasattr(module, attr):
            raise _refuse(qualname, module, f"missing attribute {attr!r} (not transformers' DiNAT layer?)")
    k, H = module.kernel_size, module.num_attention_heads
    if module.rpb is not None and tuple(module.rpb.shape) != (H, 2 * k - 1, 2 * k - 1):
        raise _refuse(qualname, module, f"rpb shape {tuple(module.rpb.shape)} is not [H, 2k-1, 2k-1]")


def _na_forward(self, hidden_states: Tensor, output_attentions: Optional[bool] = False):
    import pyops

    if output_attentions:
        raise UnsupportedModelError(f"pyops: {type(self).__name__}: output_attentions=True is not supported "
                                    "(the fused kernel never forms the attention probabilities)")
    if self.training and self.dropout.p > 0:
        raise UnsupportedModelError(f"pyops: {type(self).__name__}: attention_probs_dropout_prob="
                                    f"{self.dropout.p} in training is not supported")
    B, X, Y, _ = hidden_states.shape
    H, D = self.num_attention_heads, self.attention_head_size
    q = self.query(hidden_states).view(B, X, Y, H, D)       # pyops' heads-last layout: no transposes
    k = self.key(hidden_states).view(B, X, Y, H, D)
    v = self.value(hidden_states).view(B, X, Y, H, D)
    out = pyops.na2d(q, k, v, self.kernel_size, dilation=self.dilation, rpb=self.rpb, scale=1.0 / math.sqrt(D))
    return (out.reshape(B, X, Y, H * D),)


# ------------------------------------------------------------------------------------ patch_model


def patch_model(model: torch.nn.Module) -> List[str]:
    """Route every supported block of a transformers `model` through pyops, in place.

    Returns the qualified names of the modules patched by this call (none on a second call). Checks
    every block before changing any: a known-unsupported block or option raises
    `NotImplementedError` (`UnsupportedModelError`) naming the class and the option.
    """
    model_config = getattr(model, "config", None)
    plan: list = []
    for name, module in model.named_modules():
        cls = type(module).__name__
        if getattr(module, _PATCHED, False):
            continue
        if cls in _REFUSED:
            raise _refuse(name, module, _REFUSED[cls])
        if cls in SUPPORTED_MOE:
            plan.append((name, module, "moe", _moe_spec(name, module, model_config)))
        elif cls in SUPPORTED_NA:
            _na_check(name, module)
            plan.append((name, module, "na", None))
        elif isinstance(getattr(module, "experts", None), torch.nn.Module) and \
                (hasattr(module, "gate") or hasattr(module, "router")):
            raise _refuse(name, module, "this MoE block is not supported yet (supported: " + ", ".join(SUPPORTED_MOE) + ")")
    for name, module, kind, spec in plan:
        if kind == "moe":
            module._pyops_moe = spec
            forward = _gpt_oss_forward if spec.activation == "swiglu_oai" else _moe_forward
            module.forward = types.MethodType(forward, module)
        else:
            module.forward = types.MethodType(_na_forward, module)
        setattr(module, _PATCHED, True)
    return [name for name, *_ in plan]


# ----------------------------------------------------------------------------------- enable_natten


def _natten_status() -> tuple:
    """(state, version): state "absent", "legacy" (has the 0.17 functional API) or "modern"."""
    try:
        import natten  # noqa: F401
        import natten.functional as nf
    except ImportError:
        return "absent", None
    except Exception as exc:                                       # a broken install
        return "broken", repr(exc)
    version = getattr(sys.modules.get("natten"), "__version__", "unknown")
    if getattr(sys.modules["natten"], "__pyops_shim__", False):
        return "shim", version
    if hasattr(nf, "natten2dqkrpb") and hasattr(nf, "natten2dav"):
        return "legacy", version
    return "modern", version


def _shim_functions() -> Dict[str, Callable]:
    from pyops.integrations import natten_compat as nc
    return {n: getattr(nc, n) for n in nc.__all__ if n.startswith("natten")}


def _install_shim() -> None:
    from pyops.integrations.natten_compat import NATTEN_VERSION

    pkg = types.ModuleType("natten", "NATTEN 0.17's functional API on pyops (pyops.integrations.natten_compat)")
    fn = types.ModuleType("natten.functional")
    for n, f in _shim_functions().items():
        setattr(fn, n, f)
    pkg.__version__ = f"{NATTEN_VERSION}+pyops"
    pkg.__pyops_shim__ = True
    pkg.__path__ = []
    pkg.__spec__ = importlib.machinery.ModuleSpec("natten", None, is_package=True)
    fn.__spec__ = importlib.machinery.ModuleSpec("natten.functional", None)
    pkg.functional = fn
    sys.modules["natten"] = pkg
    sys.modules["natten.functional"] = fn


def _refresh_transformers() -> None:
    """Make transformers' cached natten check see the current state, and rebind DiNAT's imports."""
    iu = sys.modules.get("transformers.utils.import_utils")
    if iu is not None and hasattr(iu.is_natten_available, "cache_clear"):
        iu.is_natten_available.cache_clear()
    dinat = sys.modules.get("transformers.models.dinat.modeling_dinat")
    if dinat is not None:
        from natten.functional import natten2dav, natten2dqkrpb
        dinat.natten2dqkrpb, dinat.natten2dav = natten2dqkrpb, natten2dav


def enable_natten() -> str:
    """Make transformers' DiNAT / OneFormer-DiNAT construct and run with pyops standing in for NATTEN.

    Call it before ``from_pretrained`` / ``from_config``. What it does depends on what is installed:

    * no natten (or a broken one): registers a ``natten`` / ``natten.functional`` module implementing
      NATTEN 0.17's functions on pyops, and makes transformers' availability check pass. Returns "shim".
    * natten < 0.20 (has ``natten2dqkrpb``): leaves it alone and warns that it does. Returns "natten".
    * natten >= 0.20 (removed the 0.17 functions, so it cannot run these models): adds the 0.17
      functions from pyops to its ``natten.functional``, leaves the rest of it as it is, and warns.
      Returns "patched".

    Calling it again changes nothing. `patch_model` then moves each layer onto the fused `pyops.na2d`.
    """
    state, version = _natten_status()
    if state == "legacy":
        warnings.warn(f"pyops.enable_natten: natten {version} is installed and has NATTEN 0.17's functional "
                      "API; it is left alone (patch_model still routes DiNAT layers through pyops.na2d)",
                      stacklevel=2)
        return "natten"
    if state in ("absent", "broken", "shim"):
        if state == "broken":
            warnings.warn(f"pyops.enable_natten: natten failed to import ({version}); using pyops' shim",
                          stacklevel=2)
        if state != "shim":
            for key in [k for k in sys.modules if k == "natten" or k.startswith("natten.")]:
                if sys.modules[key] is None:                # an import blocker: replaced by the shim
                    del sys.modules[key]
            _install_shim()
        _refresh_transformers()
        return "shim"
    import natten.functional as nf
    if not getattr(nf, "__pyops_added__", False):
        warnings.warn(f"pyops.enable_natten: natten {version} removed natten2dqkrpb / natten2dav, which "
                      "transformers' DiNAT imports; pyops adds them (NATTEN 0.17 semantics) to "
                      "natten.functional and leaves the rest of natten as it is", stacklevel=2)
        for n, f in _shim_functions().items():
            if not hasattr(nf, n):
                setattr(nf, n, f)
        nf.__pyops_added__ = True
    _refresh_transformers()
    return "patched"


# ------------------------------------------------------------------------------ register_attention


@dataclass(frozen=True)
class GroupMask:
    """What pyops' mask function hands its attention function: group ids per token (−1 = padding,
    never attended; a padding query outputs zeros) and whether the rule is causal."""
    q_groups: Tensor        # [B, Lq] int32
    kv_groups: Tensor       # [B, Lk] int32
    causal: bool


def _ids_from_starts(starts: Tensor, valid: Tensor) -> Tensor:
    """Per batch row, number the distinct segment starts of the valid tokens 0, 1, ...; −1 elsewhere."""
    out = torch.full(starts.shape, -1, dtype=torch.int32, device=starts.device)
    for b in range(starts.shape[0]):
        if valid[b].any():
            _, inv = torch.unique(starts[b][valid[b]], return_inverse=True)
            out[b][valid[b]] = inv.to(torch.int32)
    return out


def group_mask_from_dense(mask: Tensor) -> GroupMask:
    """Recover segment groups, padding and causality from a dense bool mask ``[B, 1, Lq, Lk]``
    (True = attend) exactly, or raise `NotImplementedError`. Rows of padding queries (those that do
    not attend their own position) are not matched: pyops outputs zeros there."""
    from pyops.task_attention.masks import dense

    if mask.dim() != 4 or mask.shape[1] != 1 or mask.dtype != torch.bool:
        raise NotImplementedError(f"pyops attention: expected a bool [B, 1, Lq, Lk] mask, got {mask.dtype} "
                                  f"{tuple(mask.shape)}")
    m = mask[:, 0]
    B, Lq, Lk = m.shape
    if Lq == 1:
        kv = torch.where(m[:, 0], 0, -1).to(torch.int32)
        q = torch.where(m[:, 0].any(-1, keepdim=True), 0, -1).to(torch.int32)
        return GroupMask(q, kv, False)
    if Lq != Lk:
        raise NotImplementedError(f"pyops attention: queries of length {Lq} against {Lk} cached keys (chunked "
                                  "prefill with a cache) are not supported; only Lq == Lk or one query")
    valid = torch.diagonal(m, dim1=-2, dim2=-1)                         # [B, L]: a token attends itself
    starts = torch.argmax(m.to(torch.uint8), dim=-1)                    # first attended key of each row
    groups = _ids_from_starts(starts, valid)
    for causal in (True, False):
        cand = dense(groups, groups, None, causal=causal)
        if bool(((cand == m) | ~valid[:, :, None]).all()):
            return GroupMask(groups, groups, causal)
    raise NotImplementedError("pyops attention: the attention mask is not 'packed segments + padding "
                              "(+ causal)' (a sliding window, a prefix or image-token overlay, ...); not "
                              "supported")


def _pyops_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                mask_function: Optional[Callable] = None, attention_mask: Optional[Tensor] = None, **kwargs):
    """transformers mask interface: HF's own sdpa mask (None when plain causal), turned into groups."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    dense = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                      kv_offset=kv_offset, mask_function=mask_function or causal_mask_function,
                      attention_mask=attention_mask, **kwargs)
    return None if dense is None else group_mask_from_dense(dense)


def _segments_from_cu_seqlens(cu, length: int, name: str, cls: str) -> Tensor:
    """``[length]`` int32 segment ids from cumulative lengths ``[S+1]`` = (0, l1, l1+l2, …, length),
    as flash-attention's varlen kwargs (``cu_seq_lens_q`` / ``cu_seq_lens_k``) give them."""
    cu = torch.as_tensor(cu).to(torch.int64).flatten()
    if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != length or bool((cu[1:] < cu[:-1]).any()):
        raise UnsupportedModelError(f"pyops: {cls}: {name} must be cumulative sequence lengths from 0 to the "
                                    f"{length} packed tokens, got {cu.tolist()[:8]}")
    lengths = cu[1:] - cu[:-1]
    return torch.repeat_interleave(torch.arange(lengths.numel(), dtype=torch.int32), lengths,
                                   output_size=length)


def _intersect(groups: Tensor, segments: Tensor, n_segments: int) -> Tensor:
    """Tokens share a group iff they share both a group of `groups` (−1: padding, kept −1) and a
    segment: the pair (group, segment) numbered group·S + segment, the same rule for q and kv."""
    seg = segments.to(groups.device)
    return torch.where(groups >= 0, groups * n_segments + seg, torch.full_like(groups, -1))


def pyops_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                            attention_mask, dropout: float = 0.0, scaling: Optional[float] = None,
                            is_causal: Optional[bool] = None, **kwargs):
    """transformers attention interface on `pyops.task_masked_attention`.

    q ``[B, Hq, L, D]``, k / v ``[B, Hkv, Lk, D]`` (grouped-query attention read in place); returns
    ``(out [B, L, Hq, D], None)``. Packed sequences come from the mask (transformers derives it
    from ``position_ids`` resets) or from flash-attention's ``cu_seq_lens_q`` / ``cu_seq_lens_k``
    kwargs (one packed row); with both, a token attends where both allow."""
    import pyops

    cls = type(module).__name__
    for opt in ("softcap", "s_aux", "sinks", "position_bias"):
        if kwargs.get(opt) is not None:
            raise UnsupportedModelError(f"pyops: {cls}: attention option {opt!r} is not supported")
    B, _, Lq, _ = query.shape
    Lk = key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None:
        if causal and Lq != Lk:
            if Lq != 1:
                raise UnsupportedModelError(f"pyops: {cls}: {Lq} queries against {Lk} cached keys are not "
                                            "supported; only Lq == Lk or one query")
            causal = False                   # one new query sees every cached key
        q_groups = torch.zeros(Lq, dtype=torch.int32, device=query.device)
        kv_groups = torch.zeros(Lk, dtype=torch.int32, device=query.device)
    else:
        if isinstance(attention_mask, Tensor):
            attention_mask = group_mask_from_dense(attention_mask)     # a 4D bool mask passed by the caller
        if not isinstance(attention_mask, GroupMask):
            raise UnsupportedModelError(f"pyops: {cls}: unsupported attention mask {type(attention_mask).__name__}")
        q_groups, kv_groups, causal = attention_mask.q_groups, attention_mask.kv_groups, attention_mask.causal
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        # flash-attention's packed-sequence kwargs (DataCollatorWithFlattening): a token attends
        # only inside its sequence, whatever the mask says
        if B != 1:
            raise UnsupportedModelError(f"pyops: {cls}: cu_seq_lens_q/k with a batch of {B} rows; packed "
                                        "sequences come as one row")
        seg_q = _segments_from_cu_seqlens(cu_q if cu_q is not None else cu_k, Lq, "cu_seq_lens_q", cls)
        seg_k = _segments_from_cu_seqlens(cu_k if cu_k is not None else cu_q, Lk, "cu_seq_lens_k", cls)
        n = int(seg_q.max()) + 1 if seg_q.numel() else 1
        if Lq == Lk and not torch.equal(seg_q, seg_k):
            raise UnsupportedModelError(f"pyops: {cls}: cu_seq_lens_q and cu_seq_lens_k describe different "
                                        "packings of the same tokens")
        q_groups, kv_groups = _intersect(q_groups, seg_q, n), _intersect(kv_groups, seg_k, n)
    out = pyops.task_masked_attention(query, key, value, q_groups, kv_groups, causal=causal,
                                      dropout_p=float(dropout), scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register_attention(name: str = "pyops") -> str:
    """Register pyops' task-masked attention (and its mask function) with transformers under `name`,
    so ``from_pretrained(..., attn_implementation=name)`` or ``model.set_attn_implementation(name)``
    runs it. Returns `name`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, pyops_attention_forward)
    AttentionMaskInterface.register(name, _pyops_mask)
    return name
