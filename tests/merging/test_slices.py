"""pyops.merging.slices: the tensor plan of mergekit's `slices:` (mergekit 0.1.5, mergekit/plan.py,
MergePlanner.plan_module / plan_slice / plan_layer), on tensor names alone."""
from __future__ import annotations

import pytest

from pyops.merging.slices import OutputSlice, SliceError, SliceSource, layer_prefix, layout, plan

LAYER = ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight")


def llama(n: int, prefix: str = "model.layers") -> list:
    names = ["model.embed_tokens.weight"]
    names += [f"{prefix}.{i}.{r}" for i in range(n) for r in LAYER]
    return names + ["model.norm.weight", "lm_head.weight"]


def one(model: int, first: int, end: int) -> OutputSlice:
    return OutputSlice((SliceSource(model, first, end),))


def test_layout_splits_pre_layers_post():
    lay = layout(llama(3))
    assert lay.prefix == "model.layers" and lay.n_layers == 3
    assert lay.pre == ["model.embed_tokens.weight"] and lay.post == ["model.norm.weight", "lm_head.weight"]
    assert lay.layers[2] == list(LAYER)


@pytest.mark.parametrize("names,prefix", [
    (llama(2), "model.layers"),
    (["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight",
      "transformer.ln_f.weight"], "transformer.h"),
    (["model.embed_tokens.weight", "model.norm.weight"], None),
], ids=["llama", "gpt2", "no-layers"])
def test_layer_prefix(names, prefix):
    assert layer_prefix(names) == prefix


def test_layers_must_be_numbered_without_gaps():
    names = [n for n in llama(3) if ".1." not in n]
    with pytest.raises(SliceError, match=r"not numbered 0\.\.n-1 \(missing \[1\]\)"):
        layout(names)


def test_passthrough_stack_renumbers_layers_in_slice_order():
    """Two models, overlapping ranges, three slices (the bakllama / orcamini-platy-44layer shape)."""
    out, n = plan([one(0, 0, 3), one(1, 1, 4), one(0, 2, 4)], [llama(4), llama(4)], ["a", "b"])
    assert n == 3 + 3 + 2
    by_name = {t.name: t for t in out}
    assert [t.name for t in out][0] == "model.embed_tokens.weight"
    assert [t.name for t in out][-2:] == ["model.norm.weight", "lm_head.weight"]
    src = [by_name[f"model.layers.{i}.mlp.up_proj.weight"].inputs for i in range(n)]
    want = [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (1, 3), (0, 2), (0, 3)]
    assert src == [((m, f"model.layers.{j}.mlp.up_proj.weight"),) for m, j in want]
    assert by_name["model.embed_tokens.weight"].inputs == ((0, "model.embed_tokens.weight"),)
    assert by_name["lm_head.weight"].inputs == ((0, "lm_head.weight"),)  # the last slice's model


def test_gradient_t_per_slice_and_zero_outside_the_layers():
    out, _ = plan([one(0, 0, 3), one(0, 1, 2)], [llama(3)])
    t = {x.name: x.t for x in out}
    assert [t[f"model.layers.{i}.input_layernorm.weight"] for i in range(4)] == [0.0, 0.5, 1.0, 1.0]  # n = 1: t = 1
    assert t["model.embed_tokens.weight"] == t["lm_head.weight"] == 0.0


def test_pre_and_post_tensors_take_the_first_and_last_slices_parameters():
    out, _ = plan([one(0, 0, 1), one(1, 0, 1), one(2, 0, 1)], [llama(1)] * 3)
    by_name = {t.name: t for t in out}
    assert by_name["model.embed_tokens.weight"].slice_for_params == 0
    assert by_name["model.norm.weight"].slice_for_params == 2 and by_name["model.norm.weight"].slice is None
    assert by_name["model.layers.1.mlp.up_proj.weight"].slice == 1


def test_merged_slice_takes_each_sources_own_layers():
    sl = OutputSlice((SliceSource(0, 0, 2), SliceSource(1, 2, 4)))
    out, n = plan([sl], [llama(2), llama(4)])
    assert n == 2
    by_name = {t.name: t for t in out}
    assert by_name["model.layers.1.self_attn.q_proj.weight"].inputs == (
        (0, "model.layers.1.self_attn.q_proj.weight"), (1, "model.layers.3.self_attn.q_proj.weight"))
    assert by_name["model.embed_tokens.weight"].inputs == ((0, "model.embed_tokens.weight"),
                                                           (1, "model.embed_tokens.weight"))


@pytest.mark.parametrize("slices,names,key,match", [
    ([one(0, 2, 5)], [llama(4)], ("slices", 0, "sources", 0, "layer_range"),
     r"\[2, 5\] is not a non-empty range within the 4 layers of a"),
    ([one(0, 2, 2)], [llama(4)], ("slices", 0, "sources", 0, "layer_range"), "non-empty"),
    ([OutputSlice((SliceSource(0, 0, 2), SliceSource(1, 0, 3)))], [llama(4)] * 2, ("slices", 0, "sources"),
     r"same number of layers, got \[2, 3\]"),
    ([OutputSlice(())], [llama(2)], ("slices", 0, "sources"), "at least one source"),
    ([], [llama(2)], ("slices",), "at least one output slice"),
    ([one(0, 0, 1), one(1, 0, 1)], [llama(2), llama(2, "model.blocks")], ("slices",), "different names"),
    ([OutputSlice((SliceSource(0, 0, 1), SliceSource(1, 0, 1)))], [llama(1), llama(1)[:-1]],
     ("slices", 0, "sources", 1), "lm_head.weight: a post-layer tensor of a that b does not have"),
], ids=["beyond-the-model", "empty", "unequal-lengths", "no-sources", "no-slices", "prefixes-differ", "post-missing"])
def test_bad_slices_name_the_key(slices, names, key, match):
    with pytest.raises(SliceError, match=match) as info:
        plan(slices, names, ["a", "b"][:len(names)])
    assert info.value.key == key


def test_layers_that_hold_different_tensors_are_refused():
    other = [n.replace("mlp.up_proj", "mlp.fc") for n in llama(2)]
    with pytest.raises(SliceError, match=r"layer 0 of b does not hold the tensors of layer 0 of a") as info:
        plan([OutputSlice((SliceSource(0, 0, 1), SliceSource(1, 0, 1)))], [llama(2), other], ["a", "b"])
    assert info.value.key == ("slices", 0, "sources", 1)
