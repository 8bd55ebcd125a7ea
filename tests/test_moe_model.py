"""MoE layers of our reference model against transformers' NemotronHMoE on the same checkpoint.

Oracle: transformers' ``NemotronHForCausalLM`` (random, seeded, router bias randomised too) writes a
checkpoint; our ``load_model`` reads it; the float32 logits agree to 1e-5 in prefill and in
token-by-token decode with our cache. What we write, transformers (stock form) or the shipped remote
code (per-layer expert sizes) loads with no missing or unexpected keys and the same logits.
"""

import json

import pytest
import torch
from safetensors import safe_open

from elastic.slicer.formats.arch import FORM_PUZZLE, FORM_STOCK, Arch
from elastic.slicer.nn.model import MoE, TopkRouter, build_model, load_model, save_model

from conftest import assert_same_logits, randomize_, tiny_config

transformers = pytest.importorskip("transformers")

# expert width 12, shared expert 20, latent 16: all distinct from hidden 32 and MLP 48
MOE = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=12, moe_shared_expert_intermediate_size=20)
CASES = [
    # (id, overrides)
    ("one_group", dict(hybrid_override_pattern="ME*E", n_group=1, topk_group=1)),
    ("two_groups_latent", dict(hybrid_override_pattern="ME*E", n_group=2, topk_group=1, moe_latent_size=16,
                               routed_scaling_factor=2.5)),
    ("four_groups_keep_two", dict(hybrid_override_pattern="EM-E", n_group=4, topk_group=2, num_experts_per_tok=3,
                                  norm_topk_prob=False, routed_scaling_factor=1.5)),
    ("two_groups_no_latent", dict(hybrid_override_pattern="M*E-", n_group=2, topk_group=1, num_experts_per_tok=3)),
]


def randomize_router_bias_(model: torch.nn.Module, seed: int) -> None:
    """e_score_correction_bias (a buffer, zero at init) on the scale of the sigmoid scores, so that
    the choice differs from a choice on the plain scores."""
    g = torch.Generator().manual_seed(seed + 1)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.empty(buf.shape).uniform_(-0.3, 0.3, generator=g))


def make_moe_checkpoint(path, seed: int = 0, **over):
    """A random transformers MoE model saved to ``path`` (as make_hf_checkpoint, plus the router bias)."""
    torch.manual_seed(seed)
    config = transformers.NemotronHConfig(**tiny_config(**{**MOE, **over}))
    model = transformers.NemotronHForCausalLM(config).eval()
    randomize_(model, seed)
    randomize_router_bias_(model, seed)
    model.save_pretrained(path)
    return model


def decode_logits(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Our logits for ``ids`` computed as prefill of ``prefill`` tokens, then one token at a time."""
    cache = model.new_cache()
    with torch.no_grad():
        parts = [model(ids[:, :prefill], cache=cache)]
        parts += [model(ids[:, t : t + 1], cache=cache) for t in range(prefill, ids.shape[1])]
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("case,over", CASES, ids=[c[0] for c in CASES])
def test_prefill_and_decode_match_transformers(tmp_path, case, over):
    hf = make_moe_checkpoint(tmp_path / "ckpt", seed=len(case), **over)
    ours = load_model(tmp_path / "ckpt")
    assert_same_logits(hf, ours, seq=11)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
    torch.testing.assert_close(decode_logits(ours, ids, prefill=3), ref, rtol=1e-5, atol=1e-5)


def test_transformers_saves_one_tensor_per_expert(tmp_path):
    """DESIGN.md section 9: merged 3-D experts in memory, NVIDIA's per-expert tensors on disk."""
    hf = make_moe_checkpoint(tmp_path / "ckpt", **CASES[1][1])
    assert hf.model.layers[1].mixer.experts.up_proj.shape == (8, 12, 16)
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:
        on_disk = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert f.get_slice("backbone.layers.1.mixer.gate.e_score_correction_bias").get_dtype() == "F32"
    assert on_disk == Arch.from_file(tmp_path / "ckpt").tensor_shapes()


@pytest.mark.heavy
def test_every_routing_term_changes_the_logits(tmp_path):
    """The oracle tests can fail: the router bias, the group limit and the scaling each matter."""
    make_moe_checkpoint(tmp_path / "ckpt", **CASES[1][1])
    model = load_model(tmp_path / "ckpt")
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(5))
    routers = [m for m in model.modules() if isinstance(m, TopkRouter)]
    assert len(routers) == 2
    with torch.no_grad():
        base = model(ids)
        for attr, value in (("e_score_correction_bias", torch.zeros(8)), ("topk_group", 2), ("scale", 1.0),
                            ("norm_topk_prob", False)):
            saved = [getattr(r, attr) for r in routers]
            for r in routers:
                setattr(r, attr, value)
            assert (model(ids) - base).abs().max() > 1e-3, attr
            for r, v in zip(routers, saved):
                setattr(r, attr, v)
        torch.testing.assert_close(model(ids), base, rtol=0, atol=0)


def test_router_bias_is_a_float32_buffer(tmp_path):
    make_moe_checkpoint(tmp_path / "ckpt", **CASES[0][1])
    model = load_model(tmp_path / "ckpt", dtype=torch.bfloat16)
    gate = model.backbone.layers[1].mixer.gate
    assert gate.weight.dtype == torch.bfloat16 and gate.e_score_correction_bias.dtype == torch.float32
    assert "backbone.layers.1.mixer.gate.e_score_correction_bias" in dict(model.named_buffers())
    assert not any(n.endswith("e_score_correction_bias") for n, _ in model.named_parameters())
    built = build_model(model.arch, dtype=torch.bfloat16)
    assert built.backbone.layers[1].mixer.gate.e_score_correction_bias.dtype == torch.float32


def _our_moe_model(pattern: str, blocks=None, seed: int = 0, **over):
    cfg = tiny_config(hybrid_override_pattern=pattern, **{**MOE, **over})
    if blocks is not None:
        cfg["block_configs"] = blocks
    model = build_model(Arch.from_config(cfg), seed=seed)
    randomize_(model, seed)
    randomize_router_bias_(model, seed)
    return model.eval()


def _load_hf(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=True, output_loading_info=True, dtype=torch.float32)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.eval()


def test_save_model_round_trips_and_transformers_loads_it(tmp_path):
    ours = _our_moe_model("ME*E", n_group=2, topk_group=1, moe_latent_size=16)
    assert ours.arch.config_form() == FORM_STOCK
    save_model(ours, tmp_path / "ckpt")
    again = load_model(tmp_path / "ckpt")
    assert again.state_dict().keys() == ours.state_dict().keys()
    for name, t in ours.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], t, rtol=0, atol=0, msg=name)
    hf = _load_hf(tmp_path / "ckpt")
    assert type(hf).__name__ == "NemotronHForCausalLM"
    assert_same_logits(hf, again)


def _e(experts, width, shared):
    return {"block_type": "moe", "n_routed_experts": experts, "moe_intermediate_size": width,
            "moe_shared_expert_intermediate_size": shared}


def test_per_layer_expert_sizes_load_through_the_remote_code(tmp_path):
    """NVIDIA's Puzzle form with per-layer MoE sizes: the shipped code builds each MoE layer at its own
    size and with one module per expert (transformers merges experts for its own class only)."""
    blocks = [{"block_type": "mamba"}, _e(8, 12, 20), {"block_type": "attention"}, _e(4, 10, 24)]
    ours = _our_moe_model("ME*E", blocks, n_group=2, topk_group=1)
    assert ours.arch.config_form() == FORM_PUZZLE
    save_model(ours, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["block_configs"] == blocks
    hf = _load_hf(tmp_path / "ckpt")
    assert type(hf).__name__ == "NemotronHPuzzleForCausalLM"
    for i, experts, width in [(1, 8, 12), (3, 4, 10)]:
        mixer = hf.backbone.layers[i].mixer
        assert len(mixer.experts) == experts and mixer.gate.weight.shape == (experts, 32)
        assert mixer.experts[0].up_proj.weight.shape == (width, 32)
    assert_same_logits(hf, load_model(tmp_path / "ckpt"))


def test_moe_mixer_is_stateless_in_decode():
    """A MoE layer keeps nothing in the cache (only Mamba and attention layers do)."""
    model = _our_moe_model("E*E")
    assert isinstance(model.backbone.layers[0].mixer, MoE)
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
    assert cache.layers[0] is None and cache.layers[2] is None and cache.layers[1] is not None
