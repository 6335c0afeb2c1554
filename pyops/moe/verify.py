"""Verify cases for `moe_route` and `moe_experts`: odd sizes (T=1, E=1, k=E, empty experts, all
tokens on one expert), capacity drops, DeepSeek-V3 group-limited routing with a bias and scaling,
every activation, fp32/fp16/bf16, GPT-OSS's experts (biases, swiglu_oai, interleaved gate/up views);
forward and the gradients of x, w1, w2, w3, the biases and the router logits (through the routing
weights)."""
from __future__ import annotations

from typing import Dict

import torch

import pyops
from pyops.testing import REDUCTION_TOL, Tol, tolerance_for
from pyops.verify import Case

EXACT = Tol(atol=0.0, rtol=0.0)
# (T, d, hidden, E, k, special)
SHAPES = [(1, 8, 16, 1, 1, None), (1, 5, 7, 4, 4, None), (37, 24, 40, 6, 2, None), (64, 16, 33, 8, 2, "empty"),
          (50, 12, 20, 5, 3, "hot"), (129, 32, 48, 16, 2, None)]
ROUTE_SHAPES = [(1, 1, 1), (7, 5, 5), (301, 16, 2), (1000, 64, 4)]
# group-limited routing: (T, E, k, n_group, topk_group, score, with a bias, routed_scaling)
GROUP_SHAPES = [(33, 64, 6, 8, 4, "sigmoid", True, 2.5), (7, 12, 3, 4, 2, "softmax", False, 1.0),
                (1, 8, 1, 8, 1, "sigmoid", True, 1.0), (257, 16, 4, 2, 1, "sigmoid", True, 0.5)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTS = ["swiglu", "geglu", "gelu", "silu", "relu", "swiglu_oai"]


def _logits(T, E, special, device):
    z = torch.randn(T, E)
    if special == "hot":
        z[:, 0] += 20.0
    elif special == "empty":
        z[:, 1:3] -= 30.0
    return z.to(device)


def _route_make(T, E, cf, dtype, bias=False):
    def make(device):
        return dict(z=torch.randn(T, E, device=device).to(dtype), gw=torch.randn(T, E, device=device),
                    cf=cf, bias=torch.randn(E, device=device) * 0.1 if bias else None)
    return make


def _route_run(k, score, **groups):
    def run(backend: str, x: dict) -> Dict[str, torch.Tensor]:
        z = x["z"].clone().requires_grad_(True)
        r = pyops.moe_route(z, k, score=score, capacity_factor=x["cf"], bias=x["bias"], backend=backend, **groups)
        r.weights.float().backward(x["gw"][:, :k])
        return {"weights": r.weights.detach(), "experts": r.experts, "order": r.order, "offsets": r.offsets,
                "dropped": r.dropped, "grad_logits": z.grad}
    return run


def _experts_make(T, d, h, E, k, special, dtype, act, cf):
    def make(device):
        glu = act in ("swiglu", "geglu", "swiglu_oai")
        return dict(x=torch.randn(T, d, device=device).to(dtype), z=_logits(T, E, special, device),
                    w1=(torch.randn(E, d, h, device=device) * d ** -0.5).to(dtype),
                    w2=(torch.randn(E, h, d, device=device) * h ** -0.5).to(dtype),
                    w3=(torch.randn(E, d, h, device=device) * d ** -0.5).to(dtype) if glu else None,
                    dy=torch.randn(T, d, device=device).to(dtype), k=k, act=act, cf=cf)
    return make


def _experts_run(backend: str, x: dict) -> Dict[str, torch.Tensor]:
    leaves = {n: x[n].clone().requires_grad_(True) for n in ("x", "z", "w1", "w2", "w3") if x[n] is not None}
    r = pyops.moe_route(leaves["z"], x["k"], capacity_factor=x["cf"], backend="reference")
    y = pyops.moe_experts(leaves["x"], r, leaves["w1"], leaves["w2"], leaves.get("w3"), activation=x["act"],
                          backend=backend)
    y.backward(x["dy"])
    out = {"y": y.detach()}
    out.update({f"grad_{n}": t.grad for n, t in leaves.items()})
    return out


# GPT-OSS-shaped experts: (T, d, hidden, E, k, limit); inputs scaled so that limit 0.5 clamps
OAI_SHAPES = [(37, 24, 20, 6, 2, 7.0), (64, 16, 33, 8, 4, 0.5)]


def _oai_make(T, d, h, E, k, dtype, limit):
    def make(device):
        rnd = lambda *shape, s=1.0: (torch.randn(*shape, device=device) * s).to(dtype)  # noqa: E731
        return dict(x=rnd(T, d, s=2.0), z=_logits(T, E, None, device), gate_up=rnd(E, d, 2 * h, s=2 * d ** -0.5),
                    gate_up_bias=rnd(E, 2 * h), down=rnd(E, h, d, s=h ** -0.5), down_bias=rnd(E, d),
                    dy=rnd(T, d), k=k, limit=limit)
    return make


def _oai_run(backend: str, x: dict) -> Dict[str, torch.Tensor]:
    """The fused, interleaved GPT-OSS storage passed as strided views (transformers' layout)."""
    names = ("x", "z", "gate_up", "gate_up_bias", "down", "down_bias")
    leaves = {n: x[n].clone().requires_grad_(True) for n in names}
    r = pyops.moe_route(leaves["z"], x["k"], backend="reference")
    gu, gub = leaves["gate_up"], leaves["gate_up_bias"]
    y = pyops.moe_experts(leaves["x"], r, gu[..., ::2], leaves["down"], gu[..., 1::2], activation="swiglu_oai",
                          b1=gub[:, ::2], b2=leaves["down_bias"], b3=gub[:, 1::2], limit=x["limit"], backend=backend)
    y.backward(x["dy"])
    out = {"y": y.detach()}
    out.update({f"grad_{n}": t.grad for n, t in leaves.items()})
    return out


def cases():
    for i, (T, E, k) in enumerate(ROUTE_SHAPES):
        for score in ("softmax", "sigmoid"):
            cf = None if i % 2 == 0 else 1.0
            dtype = DTYPES[i % 3]
            tols = {n: EXACT for n in ("experts", "order", "offsets", "dropped")}
            tols.update(weights=tolerance_for(dtype), grad_logits=tolerance_for(dtype))
            yield Case("moe_route", f"T={T} E={E} k={k} {score} cf={cf} {str(dtype)[6:]}", _route_make(T, E, cf, dtype),
                       _route_run(k, score), tols, backends=("cpu", "cuda"))
    for i, (T, E, k, G, M, score, bias, scale) in enumerate(GROUP_SHAPES):
        dtype = DTYPES[i % 3]
        tols = {n: EXACT for n in ("experts", "order", "offsets", "dropped")}
        tols.update(weights=tolerance_for(dtype), grad_logits=tolerance_for(dtype))
        yield Case("moe_route", f"T={T} E={E} k={k} n_group={G} topk_group={M} {score}" + (" bias" if bias else "")
                   + f" scaling={scale} {str(dtype)[6:]}", _route_make(T, E, None, dtype, bias),
                   _route_run(k, score, n_group=G, topk_group=M, routed_scaling=scale), tols, backends=("cpu", "cuda"))
    for i, (T, d, h, E, k, special) in enumerate(SHAPES):
        for j, dtype in enumerate(DTYPES):
            act = ACTS[(i + j) % len(ACTS)]
            cf = 0.8 if (i + j) % 3 == 0 else None
            tol = tolerance_for(dtype)
            red = REDUCTION_TOL if dtype == torch.float32 else tol
            tols = {"y": tol, "grad_x": tol, "grad_z": red, "grad_w1": red, "grad_w2": red, "grad_w3": red}
            if act not in ("swiglu", "geglu", "swiglu_oai"):
                del tols["grad_w3"]
            name = f"T={T} d={d} h={h} E={E} k={k} {act} {str(dtype)[6:]}" + (f" {special}" if special else "") + \
                (f" cf={cf}" if cf else "")
            yield Case("moe_experts", name, _experts_make(T, d, h, E, k, special, dtype, act, cf), _experts_run,
                       tols, backends=("cpu", "triton"))
    for (T, d, h, E, k, limit), dtype in zip(OAI_SHAPES, (torch.float32, torch.bfloat16)):
        tol = tolerance_for(dtype)
        red = REDUCTION_TOL if dtype == torch.float32 else tol
        tols = {"y": tol, "grad_x": tol, "grad_z": red, "grad_gate_up": red, "grad_gate_up_bias": red,
                "grad_down": red, "grad_down_bias": red}
        yield Case("moe_experts", f"T={T} d={d} h={h} E={E} k={k} swiglu_oai limit={limit} biases interleaved "
                   f"{str(dtype)[6:]}", _oai_make(T, d, h, E, k, dtype, limit), _oai_run, tols,
                   backends=("cpu", "triton"))
