"""Importance, permutation and the elastic (router) forward."""

import pytest
import torch

from elastic.slicer.nn.model import load_model
from elastic.trainer.importance import depth_order, width_importance
from elastic.trainer.permute import orders, permute_

from conftest import make_hf_checkpoint


def batches(n=3, b=2, l=12, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (b, l), generator=g) for _ in range(n)]


def test_permutation_preserves_logits_and_sorts_importance(tmp_path):
    make_hf_checkpoint(tmp_path / "p", hybrid_override_pattern="M-M*-M", n_groups=2, mamba_num_heads=8)
    model = load_model(tmp_path / "p")
    data = batches()
    with torch.no_grad():
        before = [model(x) for x in data]
    scores = width_importance(model, data)
    assert set(scores) >= {"hidden", "layers.0.heads", "layers.0.channels", "layers.3.attention_heads", "layers.1.ffn"}
    permute_(model, orders(model, scores))
    with torch.no_grad():
        for x, ref in zip(data, before):
            torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    # recomputed on the permuted model, scores are sorted: descending, heads inside their group
    again = width_importance(model, data)
    assert torch.all(again["hidden"][:-1] >= again["hidden"][1:] - 1e-3)
    assert torch.all(again["layers.1.ffn"][:-1] >= again["layers.1.ffn"][1:] - 1e-3)
    heads = again["layers.0.heads"].view(2, 4)  # 2 groups of 4 heads
    assert torch.all(heads[:, :-1] >= heads[:, 1:] - 1e-3)


def test_hooks_are_removed_even_on_error(tmp_path):
    make_hf_checkpoint(tmp_path / "p")
    model = load_model(tmp_path / "p")
    try:
        width_importance(model, [torch.full((1, 4), 10_000)])  # out of vocabulary: fails inside
    except (IndexError, RuntimeError):
        pass
    assert all(not m._forward_hooks for m in model.modules())


def test_depth_order_removes_least_harmful_first(tmp_path):
    make_hf_checkpoint(tmp_path / "p", hybrid_override_pattern="M-M*-M")
    model = load_model(tmp_path / "p")
    order = depth_order(model, batches(2), candidates=range(6), steps=3)
    assert len(order) == 3 and len({j for j, _ in order}) == 3
    assert all(err >= 0 for _, err in order)
    assert all(type(b).__name__ == "Block" for b in model.backbone.layers)  # layers restored


@pytest.mark.parametrize("per_layer_mamba", [False, True], ids=["shared", "per_layer"])
def test_expected_params_exact_for_hard_choices_and_router_gets_gradients(tmp_path, per_layer_mamba):
    from elastic.slicer.formats.arch import FORM_EXTENSION, FORM_PUZZLE, FORM_STOCK
    from elastic.slicer.formats.elastic_format import Budget, ElasticConfig
    from elastic.slicer.nn.masked import masked_forward
    from elastic.slicer.formats.spec import SliceSpec
    from elastic.trainer.elastic import Router, default_search_space, elastic_forward, expected_params, sample

    make_hf_checkpoint(tmp_path / "p", hybrid_override_pattern="M-M*-M", n_groups=2, mamba_num_heads=8)
    model = load_model(tmp_path / "p")
    arch = model.arch
    dims = default_search_space(arch, droppable=[1, 4], per_layer_mamba=per_layer_mamba)
    assert {d.name: d.shared for d in dims if d.layers is not None and d.name != "depth"} == {
        "mamba_num_heads": not per_layer_mamba, "mamba_head_dim": not per_layer_mamba,
        "num_attention_heads": not per_layer_mamba, "intermediate_size": False}
    full = SliceSpec.full(arch).to_json(arch)
    ec = ElasticConfig((Budget("a", 10), Budget("b", 5)), dims, {"a": full, "b": full})
    forms = set()
    router = Router(dims, 2)
    gen = torch.Generator().manual_seed(0)
    x = batches(1)[0]
    seen = set()
    for k in range(6):
        choice = sample(router, ec, arch, k % 2, tau=1.0, scale=1.0, gen=gen)
        hard = {d.name: torch.nn.functional.one_hot(
            torch.tensor([d.choices.index(v) for v in choice.picks[d.name]]), len(d.choices)).float() for d in dims}
        assert float(expected_params(arch, ec, hard)) == choice.spec.parameters(arch)
        logits = elastic_forward(model, ec, choice, x)
        with torch.no_grad():  # the straight-through scalars are exactly 1: same as the plain nested model
            torch.testing.assert_close(logits, masked_forward(model, choice.spec, x))
        router.zero_grad()
        logits.square().mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router.parameters() if p.dim() == 2)
        seen.add(choice.spec.parameters(arch))
        forms.add(choice.spec.child_arch(arch).config_form())
    assert len(seen) > 1  # the sampler explores different nested models
    # shared Mamba/attention sizes: every sample is a stock or NVIDIA Puzzle model, never the extension
    assert forms <= {FORM_STOCK, FORM_PUZZLE} if not per_layer_mamba else FORM_EXTENSION in forms

