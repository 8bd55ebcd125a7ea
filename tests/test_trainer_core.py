"""Importance, permutation and the elastic (router) forward."""

import pytest
import torch

from elastic.slicer.nn.model import load_model
from elastic.trainer.importance import depth_candidates, depth_order, width_importance
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
    """A forward that fails inside width_importance (after its hooks are in place: a hook of the test's
    own on norm_f, the last module that runs, sees them and raises) propagates, and no hook stays."""
    make_hf_checkpoint(tmp_path / "p")
    model = load_model(tmp_path / "p")
    seen = []

    def fail(_m, _inp, _out):
        seen.append(sum(len(m._forward_hooks) for m in model.modules()))
        raise RuntimeError("injected failure")

    ours = model.backbone.norm_f.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        width_importance(model, batches(1))
    ours.remove()
    assert seen and seen[0] > 1  # width_importance's hooks were there when the forward failed
    assert all(not m._forward_hooks for m in model.modules())


def test_depth_order_removes_least_harmful_first(tmp_path):
    """Oracle: a brute-force search over every set of up to 3 of the 6 layers, each set's harm computed
    by a forward of our own that skips those blocks, sum((M_full - M_-S)^2) / sum(M_full^2) (DESIGN.md
    section 6). Greedy removal must take, at each step, the set of least harm among those that add one
    layer to the layers it has already removed, and report that set's harm."""
    from itertools import combinations

    make_hf_checkpoint(tmp_path / "p", hybrid_override_pattern="M-M*-M")
    model = load_model(tmp_path / "p")
    data = batches(2)

    def logits_without(skip: frozenset, ids):
        h = model.backbone.embeddings(ids)
        for i, block in enumerate(model.backbone.layers):
            if i not in skip:
                h = block(h, None, i)
        return model.lm_head(model.backbone.norm_f(h)).float()

    with torch.no_grad():
        full = [logits_without(frozenset(), ids) for ids in data]
        denom = sum(float(f.pow(2).sum()) for f in full)
        harm = {frozenset(s): sum(float((f - logits_without(frozenset(s), ids)).pow(2).sum())
                                  for f, ids in zip(full, data)) / denom
                for k in (1, 2, 3) for s in combinations(range(6), k)}
    order = depth_order(model, data, candidates=range(6), steps=3)
    assert all(type(b).__name__ == "Block" for b in model.backbone.layers)  # layers restored
    assert len(order) == 3
    removed: frozenset = frozenset()
    for step, (layer, err) in enumerate(order):
        options = {j: harm[removed | {j}] for j in range(6) if j not in removed}
        ranked = sorted(options, key=options.get)
        assert options[ranked[1]] - options[ranked[0]] > 1e-4, options  # no near-tie: the oracle decides
        assert layer == ranked[0], (step, options)
        assert err == pytest.approx(options[layer], rel=1e-4)
        removed |= {layer}
    # the first removal is the single layer of least harm; the most harmful one is never the first
    singles = {j: harm[frozenset({j})] for j in range(6)}
    assert order[0][0] == min(singles, key=singles.get) != max(singles, key=singles.get)


def test_every_budget_keeps_the_attention_layer_whose_removal_hurts_most(tmp_path):
    """The depth candidates leave out one attention layer: the one whose removal alone changes the
    logits most (computed here directly, layer by layer), unless keep_attention is off."""
    make_hf_checkpoint(tmp_path / "p", hybrid_override_pattern="M*M-*-")
    model = load_model(tmp_path / "p")
    data = batches(2)
    layers = model.backbone.layers
    with torch.no_grad():
        full = [model(ids) for ids in data]
        harm = {}
        for j in (1, 4):  # the attention layers
            block = layers[j]
            layers[j] = torch.nn.Identity()  # a skipped layer: its residual passes through
            layers[j].forward = lambda x, *a, **k: x
            harm[j] = sum(float((f - model(ids)).pow(2).sum()) for f, ids in zip(full, data))
            layers[j] = block
        kept = max(harm, key=harm.get)
        assert depth_candidates(model, data) == [i for i in range(6) if i != kept]
        assert depth_candidates(model, data, keep_attention=False) == list(range(6))


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
        with torch.no_grad():  # the soft masks are exactly 1 in the forward: same as the plain nested model
            torch.testing.assert_close(logits, masked_forward(model, choice.spec, x))
        router.zero_grad()
        logits.square().mean().backward()
        # the soft masks reach every dimension that took more than its smallest choice somewhere (taking the
        # smallest, every choice's mask covers all computed units alike: no difference to learn from)
        for d in dims:
            grads = [p.grad for n, p in router.mlps[d.name].named_parameters() if p.dim() == 2]
            kept = choice.spec.kept_layers()
            live = [r for r, v in enumerate(choice.picks[d.name]) if v != d.choices[-1] and (
                d.layers is None or any(d.row(i) == r and i in kept for i in d.layers))]
            if live and d.name != "depth":
                assert all(g is not None and g.abs().sum() > 0 for g in grads), d.name
        seen.add(choice.spec.parameters(arch))
        forms.add(choice.spec.child_arch(arch).config_form())
    assert len(seen) > 1  # the sampler explores different nested models
    # shared Mamba/attention sizes: every sample is a stock or NVIDIA Puzzle model, never the extension
    assert forms <= {FORM_STOCK, FORM_PUZZLE} if not per_layer_mamba else FORM_EXTENSION in forms



@pytest.mark.heavy
def test_soft_masks_give_every_choice_its_first_order_distillation_signal(tmp_path):
    """The gradient reaching choice k of a dimension is d/de of the loss when the units choice k keeps
    are scaled by (1 + e): checked against central differences of the slicer's own masked forward
    (another implementation of the nested model) on a parent whose weights are scaled that way."""
    from elastic.slicer.formats.elastic_format import Budget, ElasticConfig
    from elastic.slicer.formats.rules import kept_heads, indices
    from elastic.slicer.nn.masked import masked_forward
    from elastic.slicer.formats.spec import SliceSpec
    from elastic.trainer.elastic import Choice, default_search_space, elastic_forward

    make_hf_checkpoint(tmp_path / "p", hybrid_override_pattern="M-M*-M", n_groups=2, mamba_num_heads=8)
    model = load_model(tmp_path / "p").double()
    arch = model.arch
    dims = default_search_space(arch, droppable=[])
    full = SliceSpec.full(arch).to_json(arch)
    ec = ElasticConfig((Budget("a", 10),), dims, {"a": full})
    # the second-largest choice everywhere: smaller choices keep a strict subset of its units
    picks = {d.name: [d.choices[1]] * d.rows for d in dims}
    from elastic.slicer.formats.elastic_format import spec_from_choices
    spec = SliceSpec.from_json(spec_from_choices(picks, ec, arch), arch)
    hard = {d.name: torch.nn.functional.one_hot(torch.ones(d.rows, dtype=torch.long), len(d.choices)).double()
            .requires_grad_(True) for d in dims}
    x = batches(1)[0]
    loss = lambda logits: logits.square().mean()  # noqa: E731
    loss(elastic_forward(model, ec, Choice(spec, picks, {}, hard), x)).backward()

    def scaled(name: str, k: int, eps: float) -> float:
        """The loss of the nested model with choice k's units of dimension ``name`` scaled by 1 + eps."""
        m = load_model(tmp_path / "p").double()
        d = next(d for d in dims if d.name == name)
        size = d.choices[k]
        with torch.no_grad():
            for i, layer in enumerate(arch.layers):
                if name == "hidden_size":
                    m.backbone.embeddings.weight[:, :size] *= 1 + eps
                    break
                if d.layers is None or i not in d.layers:
                    continue
                mixer = m.backbone.layers[i].mixer
                if name == "intermediate_size":
                    mixer.down_proj.weight[:, :size] *= 1 + eps
                elif name == "num_attention_heads":
                    cols = indices(kept_heads(layer.num_attention_heads, layer.num_key_value_heads, size))
                    w = mixer.o_proj.weight.view(-1, layer.num_attention_heads, arch.head_dim)
                    w[:, cols] *= 1 + eps
                else:  # Mamba heads (first size/G of each group) or channels (first size of every head)
                    w = mixer.out_proj.weight.view(-1, layer.mamba_num_heads, layer.mamba_head_dim)
                    if name == "mamba_num_heads":
                        w[:, indices(kept_heads(layer.mamba_num_heads, arch.n_groups, size))] *= 1 + eps
                    else:
                        w[:, :, :size] *= 1 + eps
            return float(loss(masked_forward(m, spec, x)))

    # central differences, Richardson-extrapolated (O(eps^4)); the logits are float32, so the step cannot be tiny
    eps = 2e-2
    checked = 0
    for d in dims:
        for k in range(len(d.choices)):
            diff = lambda e: (scaled(d.name, k, e) - scaled(d.name, k, -e)) / (2 * e)  # noqa: E731
            want = (4 * diff(eps / 2) - diff(eps)) / 3
            got = float(hard[d.name].grad[:, k].sum())  # every row scaled together in the oracle
            assert got == pytest.approx(want, rel=1e-2, abs=1e-7), (d.name, k)
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize("latent", [None, 16], ids=["no_latent", "latent"])
def test_moe_permutation_preserves_logits_and_sorts_experts_inside_groups(tmp_path, latent):
    from test_moe_model import make_moe_checkpoint

    make_moe_checkpoint(tmp_path / "p", hybrid_override_pattern="ME*E", n_group=2, topk_group=1, moe_latent_size=latent)
    model = load_model(tmp_path / "p")
    data = batches(vocab=97)
    with torch.no_grad():
        before = [model(x) for x in data]
    scores = width_importance(model, data)
    assert scores["layers.1.experts"].shape == (8,) and scores["layers.1.expert_ffn"].shape == (8, 12)
    assert scores["layers.1.shared_ffn"].shape == (20,) and scores["layers.1.experts"].sum() > 0
    permute_(model, orders(model, scores))
    with torch.no_grad():
        for x, ref in zip(data, before):
            torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    again = width_importance(model, data)
    experts = again["layers.3.experts"].view(2, 4)  # 2 routing groups of 4: sorted inside each
    assert torch.all(experts[:, :-1] >= experts[:, 1:] - 1e-4)
    neurons = again["layers.3.expert_ffn"]
    used = neurons.sum(1) > 0
    assert torch.all((neurons[used, :-1] >= neurons[used, 1:] - 1e-4))
