"""Shared test helpers: tiny random Nemotron-H checkpoints written by transformers (the oracle)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch


@pytest.hookimpl(trylast=True)  # after pytest's tmpdir plugin has set up the tmp_path_factory
def pytest_configure(config):
    """The session's environment, undone when it ends: remote-code loads copy modeling files into
    ``HF_HOME`` (transformers reads it when imported, during collection, hence a hook and not a
    fixture), so it points into pytest's own temporary directory (which pytest prunes) and never at
    the user's cache; the Hub stays offline; the graph cache is the session's own; the pure-PyTorch path unless ELASTIC_KERNELS is set."""
    env = pytest.MonkeyPatch()
    config.stash[_ENV] = env
    env.setenv("HF_HOME", str(config._tmp_path_factory.mktemp("hf-home")))  # the tmp_path_factory fixture's
    env.setenv("HF_HUB_OFFLINE", "1")
    # traced ONNX graphs (export.onnx_export) are cached per session, never in the user's ~/.cache/elastic
    env.setenv("ELASTIC_CACHE_DIR", str(config._tmp_path_factory.mktemp("elastic-cache")))
    if "ELASTIC_KERNELS" not in os.environ:
        env.setenv("ELASTIC_KERNELS", "0")


def pytest_unconfigure(config):
    env = config.stash.get(_ENV, None)
    if env is not None:
        env.undo()


_ENV = pytest.StashKey[pytest.MonkeyPatch]()


def tiny_config(**over) -> dict:
    """A small but complete nemotron_h config; every size distinct so a mix-up changes shapes."""
    cfg = dict(
        vocab_size=97,
        hidden_size=32,
        hybrid_override_pattern="M-M*-M",
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=48,
        mamba_num_heads=8,
        mamba_head_dim=6,
        n_groups=2,
        ssm_state_size=5,
        conv_kernel=4,
        chunk_size=4,
        layer_norm_epsilon=1e-5,
        # transformers clamps dt to time_step_min in its chunked path only (DESIGN.md section 3);
        # with input-dependent dt that clamp bites at random. Turn it off so both compute the
        # model as NVIDIA's kernels do (time_step_limit (0, inf)).
        time_step_min=1e-9,
    )
    cfg.update(over)
    return cfg


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that every term matters (init-scale weights hide mistakes).

    dt_bias puts softplus(dt_bias) in [0.02, 0.3]; the input-dependent part of dt varies around it.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "A_log":
                p.copy_(torch.log(torch.empty(p.shape).uniform_(0.5, 8.0, generator=g)))
            elif leaf == "dt_bias":
                dt = torch.empty(p.shape).uniform_(0.02, 0.3, generator=g)
                p.copy_(dt + torch.log(-torch.expm1(-dt)))
            elif leaf == "D":
                p.copy_(torch.randn(p.shape, generator=g))
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


def make_hf_checkpoint(path: Path, seed: int = 0, max_shard_size: str | None = None, **over):
    """Write a random transformers NemotronHForCausalLM to ``path``; return the (eval) model."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(seed)
    model = NemotronHForCausalLM(NemotronHConfig(**tiny_config(**over))).eval()
    randomize_(model, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model


def assert_same_logits(hf, ours, seq: int = 11) -> None:
    """transformers' logits (cache off) == ours to 1e-5 on a random batch of ``seq`` tokens."""
    ids = torch.randint(0, 97, (2, seq), generator=torch.Generator().manual_seed(seq))
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
        got = ours(ids)
    assert ref.abs().max() > 1.0  # the weights are large enough for every term to matter
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.fixture
def hf_ckpt(tmp_path):
    """A default tiny checkpoint directory and the transformers model that wrote it."""
    path = tmp_path / "ckpt"
    model = make_hf_checkpoint(path)
    return path, model
