"""`pyops.nn.TaskMaskedMultiheadAttention` against `torch.nn.MultiheadAttention(batch_first=True)`
given the same weights and the same mask (torch's bool attn_mask means True = blocked), and a
MultiTab-Net-style encoder layer (task tokens + feature tokens, TxT) built both ways."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from _support import assert_close
from .cases import FP32, randn, require_backend
from pyops import masks
from pyops.nn import TaskMaskedMultiheadAttention
from pyops.testing import tolerance_for

TOL = tolerance_for(FP32)


def pair(E=16, H=4, **kw):
    ref = nn.MultiheadAttention(E, H, batch_first=True, **kw)
    ours = TaskMaskedMultiheadAttention(E, H, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def assert_same_backward(ref, ours, out_r, out_o, xr, xo, rng):
    """Backpropagate one random gradient through both modules: the input's and every parameter's
    gradients agree (parameters matched by name)."""
    g = randn(out_r.shape, FP32, rng)
    out_r.backward(g)
    out_o.backward(g)
    assert_close(xo.grad, xr.grad, TOL, "grad of the input")
    grads_r = dict(ref.named_parameters())
    for n, po in ours.named_parameters():
        assert_close(po.grad, grads_r[n].grad, TOL, f"grad of {n}")


def test_state_dict_keys_and_shapes_match_nn_multihead_attention():
    for kw in ({}, {"bias": False}, {"kdim": 8, "vdim": 12}):
        ref = nn.MultiheadAttention(16, 4, batch_first=True, **kw)
        ours = TaskMaskedMultiheadAttention(16, 4, **kw)
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("mode", ["TxT", "FxT_TxT"])
def test_self_attention_matches_nn_with_same_mask(mode, rng):
    ref, ours = pair()
    groups, allow = masks.multitab(3, 10, mode)
    x = randn((5, 13, 16), FP32, rng)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    blocked = ~masks.dense(groups, None, allow)
    out_r, w_r = ref(xr, xr, xr, attn_mask=blocked, need_weights=True)
    out_o, w_o = ours(xo, preset=(groups, allow), need_weights=True)
    assert_close(out_o, out_r, TOL, "output")
    assert_close(w_o, w_r, TOL, "averaged weights")
    assert_same_backward(ref, ours, out_r, out_o, xr, xo, rng)


def test_cross_attention_kdim_vdim_and_key_padding_mask(rng):
    ref, ours = pair(kdim=6, vdim=10)
    B, L, S = 3, 7, 9
    q, k, v = randn((B, L, 16), FP32, rng), randn((B, S, 6), FP32, rng), randn((B, S, 10), FP32, rng)
    qg = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    kg = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    allow = torch.tensor([[True, True, False], [False, True, True], [True, False, True]])
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, -2:] = True
    out_r, _ = ref(q, k, v, attn_mask=~masks.dense(qg, kg, allow), key_padding_mask=kpm, need_weights=False)
    out_o, _ = ours(q, k, v, groups=qg, kv_groups=kg, allow=allow, key_padding_mask=kpm)
    assert_close(out_o, out_r, TOL, "output")


def test_no_groups_is_unmasked_attention_and_batch_first_false(rng):
    ref = nn.MultiheadAttention(16, 2, batch_first=False)
    ours = TaskMaskedMultiheadAttention(16, 2, batch_first=False)
    ours.load_state_dict(ref.state_dict())
    x = randn((6, 2, 16), FP32, rng)
    assert_close(ours(x)[0], ref(x, x, x)[0], TOL, "output")


@pytest.mark.parametrize("extra", [{"add_bias_kv": True}, {"add_zero_attn": True},
                                   {"add_bias_kv": True, "add_zero_attn": True}],
                         ids=["bias_kv", "zero_attn", "bias_kv+zero_attn"])
def test_appended_key_tokens_match_nn(extra, rng):
    """add_bias_kv / add_zero_attn: the appended tokens are attended by every query, masked or not."""
    torch.manual_seed(1)
    ref, ours = pair(**extra)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    B, L = 3, 11
    groups, allow = masks.multitab(3, 8, "TxT")
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[2, -3:] = True
    x = randn((B, L, 16), FP32, rng)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, w_r = ref(xr, xr, xr, attn_mask=~masks.dense(groups, None, allow), key_padding_mask=kpm,
                     need_weights=True)
    out_o, w_o = ours(xo, groups=groups, allow=allow, key_padding_mask=kpm, need_weights=True)
    assert_close(out_o, out_r, TOL, "output")
    assert_close(w_o, w_r, TOL, "averaged weights (the appended columns included)")
    assert_same_backward(ref, ours, out_r, out_o, xr, xo, rng)


def test_appended_key_tokens_with_identity_rule_and_no_groups(rng):
    ref, ours = pair(add_bias_kv=True, add_zero_attn=True)
    x = randn((2, 6, 16), FP32, rng)
    assert_close(ours(x)[0], ref(x, x, x)[0], TOL, "no groups: unmasked")
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    blocked = ~masks.dense(groups, None, None)
    assert_close(ours(x, groups=groups)[0], ref(x, x, x, attn_mask=blocked)[0], TOL, "identity rule")


def test_appended_key_tokens_refuse_causal():
    m = TaskMaskedMultiheadAttention(8, 2, add_zero_attn=True)
    with pytest.raises(ValueError, match="causal"):
        m(torch.randn(1, 3, 8), causal=True)


class EncoderLayer(nn.Module):
    """A MultiTab-Net-style post-norm encoder layer: attention + FFN with residuals and LayerNorm."""

    def __init__(self, attn, E=16):
        super().__init__()
        self.attn = attn
        self.ff = nn.Sequential(nn.Linear(E, 32), nn.GELU(), nn.Linear(32, E))
        self.norm1, self.norm2 = nn.LayerNorm(E), nn.LayerNorm(E)

    def forward(self, x, groups, allow):
        if isinstance(self.attn, nn.MultiheadAttention):
            a = self.attn(x, x, x, attn_mask=~masks.dense(groups, None, allow), need_weights=False)[0]
        else:
            a = self.attn(x, groups=groups, allow=allow)[0]
        x = self.norm1(x + a)
        return self.norm2(x + self.ff(x))


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu", "triton"])
def test_multitab_encoder_layer_matches_nn_version(backend, rng):
    if backend in ("cpu", "triton"):
        require_backend(backend)
    n_tasks, n_features, E = 4, 25, 16
    groups, allow = masks.multitab(n_tasks, n_features, "TxT")
    torch.manual_seed(0)
    ref = EncoderLayer(nn.MultiheadAttention(E, 4, batch_first=True))
    ours = EncoderLayer(TaskMaskedMultiheadAttention(E, 4, backend=backend))
    ours.load_state_dict(ref.state_dict())
    task_tokens = randn((1, n_tasks, E), FP32, rng).expand(8, -1, -1)
    feats = randn((8, n_features, E), FP32, rng)
    x = torch.cat([task_tokens, feats], dim=1)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yo = ref(xr, groups, allow), ours(xo, groups, allow)
    assert_close(yo, yr, TOL, "layer output")
    assert_same_backward(ref, ours, yr, yo, xr, xo, rng)


def test_module_compiles_fullgraph_with_dropout_in_training(rng):
    torch._dynamo.reset()
    m = TaskMaskedMultiheadAttention(16, 4, dropout=0.1)
    g, a = masks.multitab(3, 10, "TxT")
    x = randn((4, 13, 16), FP32, rng, requires_grad=True)
    f = torch.compile(lambda x: m(x, groups=g, allow=a)[0], fullgraph=True, backend="aot_eager")
    y = f(x)
    y.sum().backward()
    assert y.shape == (4, 13, 16) and torch.isfinite(x.grad).all()
    m.eval()
    assert_close(f(x), m(x, groups=g, allow=a)[0], TOL, "eval output, compiled vs eager")
    torch._dynamo.reset()
