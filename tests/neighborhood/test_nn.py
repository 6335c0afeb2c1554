"""`pyops.nn.NeighborhoodAttention1D/2D/3D`: NATTEN 0.17 / DiNAT state_dict keys and shapes, and the
forward equal to a manual qkv -> na -> proj."""
from __future__ import annotations

import pytest
import torch

import pyops
from pyops.nn import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D
from pyops.neighborhood import reference as ref
from pyops.testing import compare, tolerance_for

MODULES = {1: NeighborhoodAttention1D, 2: NeighborhoodAttention2D, 3: NeighborhoodAttention3D}


@pytest.mark.parametrize("n", [1, 2, 3], ids=["1d", "2d", "3d"])
def test_state_dict_keys_and_shapes_match_natten_017(n):
    m = MODULES[n](embed_dim=24, num_heads=3, kernel_size=5, dilation=2, rel_pos_bias=True)
    sd = m.state_dict()
    assert set(sd) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "rpb"}
    assert sd["qkv.weight"].shape == (72, 24) and sd["qkv.bias"].shape == (72,)
    assert sd["proj.weight"].shape == (24, 24) and sd["proj.bias"].shape == (24,)
    assert sd["rpb"].shape == (3, *[9] * n)


def test_no_rpb_no_qkv_bias_keys():
    m = NeighborhoodAttention2D(16, 2, 3, qkv_bias=False)
    assert set(m.state_dict()) == {"qkv.weight", "proj.weight", "proj.bias"}


def test_loads_a_dinat_style_checkpoint():
    src = NeighborhoodAttention2D(32, 4, 7, dilation=3, rel_pos_bias=True)
    sd = {k: torch.randn_like(v) for k, v in src.state_dict().items()}   # as saved by NATTEN 0.17
    dst = NeighborhoodAttention2D(32, 4, 7, dilation=3, rel_pos_bias=True)
    dst.load_state_dict(sd, strict=True)
    assert torch.equal(dst.rpb.detach(), sd["rpb"])


FORWARD = [
    (1, (11,), dict(kernel_size=5, dilation=2, rel_pos_bias=True)),
    (2, (7, 9), dict(kernel_size=(3, 5), stride=(1, 2), is_causal=(True, False))),
    (3, (3, 5, 6), dict(kernel_size=3, rel_pos_bias=True, qk_scale=0.2)),
]
FORWARD_IDS = ["1d-B2-L11-C24-H3-k5-d2-rpb", "2d-B2-S7x9-C24-H3-k3x5-s1x2-causalTF",
               "3d-B2-S3x5x6-C24-H3-k3-rpb-scale0.2"]


@pytest.mark.parametrize("n,spatial,kwargs", FORWARD, ids=FORWARD_IDS)
def test_forward_matches_manual_qkv_na_proj(n, spatial, kwargs):
    torch.manual_seed(0)
    C, H = 24, 3
    m = MODULES[n](C, H, **kwargs).eval()
    x = torch.randn(2, *spatial, C, requires_grad=True)
    y = m(x)
    qkv = torch.nn.functional.linear(x, m.qkv.weight, m.qkv.bias).reshape(2, *spatial, 3, H, C // H)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    o = ref.neighborhood_attention(q, k, v, m.kernel_size, m.stride, m.dilation, m.is_causal, m.rpb, m.scale)
    exp = torch.nn.functional.linear(o.reshape(2, *spatial, C), m.proj.weight, m.proj.bias)
    assert y.shape == x.shape
    assert compare(y, exp, tolerance_for(torch.float32)).ok
    y.sum().backward()
    assert x.grad is not None and (m.rpb is None or m.rpb.grad is not None)


def test_attn_drop_in_training_drops_probabilities_and_trains():
    """Training with attn_drop runs the reference with a Philox mask: reproducible for the same
    torch seed, different for another, differentiable; evaluation ignores the dropout."""
    torch.manual_seed(0)
    m = NeighborhoodAttention2D(8, 2, 3, attn_drop=0.3, rel_pos_bias=True)
    x = torch.randn(1, 5, 6, 8, requires_grad=True)
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(1)
    b = m(x)
    torch.manual_seed(2)
    c = m(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    a.sum().backward()
    assert x.grad is not None and m.rpb.grad is not None
    m.eval()
    with torch.no_grad():
        y = m(x)
        full = torch.nn.functional.linear(x, m.qkv.weight, m.qkv.bias).reshape(1, 5, 6, 3, 2, 4)
        o = ref.neighborhood_attention(full[..., 0, :, :], full[..., 1, :, :], full[..., 2, :, :], m.kernel_size,
                                       m.stride, m.dilation, m.is_causal, m.rpb, m.scale)
        exp = torch.nn.functional.linear(o.reshape(1, 5, 6, 8), m.proj.weight, m.proj.bias)
    assert compare(y, exp, tolerance_for(torch.float32)).ok


def test_reference_dropout_is_the_philox_mask_on_the_probabilities(rng):
    q, k, v = (torch.randn(2, 7, 3, 4, generator=rng) for _ in range(3))
    p_drop, seed = 0.25, 12345
    out = ref.neighborhood_attention(q, k, v, (3,), (1,), (1,), (False,), dropout_p=p_drop, seed=seed)
    key, ok, _ = ref._flat_windows((7,), (3,), (1,), (1,), (False,), None, q.device)
    logits = torch.einsum("bnhd,bnkhd->bnhk", q, k[:, key]) * 4 ** -0.5
    p = logits.masked_fill(~ok.view(1, 7, 1, 3), float("-inf")).softmax(-1)
    keep = ref.dropout_keep(p.shape, p_drop, seed, p.device)
    assert 0 < int(keep.sum()) < keep.numel()
    exp = torch.einsum("bnhk,bnkhd->bnhd", p * keep / (1 - p_drop), v[:, key])
    assert compare(out, exp, tolerance_for(torch.float32)).ok


def test_rpb_with_even_kernel_rejected():
    with pytest.raises(ValueError, match="odd"):
        NeighborhoodAttention2D(8, 2, 4, rel_pos_bias=True)
