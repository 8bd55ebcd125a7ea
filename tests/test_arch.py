"""Config parsing: every form found in the wild, validation, parameter counts."""

import json
import math
from pathlib import Path

import pytest

from elastic.slicer.formats.arch import Arch, read_config
from elastic.slicer.errors import ConfigError

from conftest import tiny_config

# Nemotron Nano 12B v2 (the Elastic parent) in NVIDIA's config.json form: legacy pattern,
# num_hidden_layers, bare Infinity in time_step_limit
NANO_12B_V2 = json.loads((Path(__file__).resolve().parent.parent / "examples" / "nemotron-elastic-12b"
                          / "config.json").read_text())


def write(tmp_path, text: str):
    (tmp_path / "config.json").write_text(text)
    return tmp_path / "config.json"


def test_nvidia_form_with_bare_infinity(tmp_path):
    text = json.dumps(NANO_12B_V2)  # Python writes bare Infinity, as NVIDIA's files have it
    assert "Infinity" in text and '"__float__"' not in text
    arch = Arch.from_file(write(tmp_path, text))
    assert arch.num_hidden_layers == 62
    assert arch.time_step_limit == (0.0, math.inf)
    kinds = [layer.kind for layer in arch.layers]
    assert (kinds.count("mamba"), kinds.count("attention"), kinds.count("mlp")) == (28, 6, 28)


def test_nano_12b_v2_parameter_count():
    # 12,310,001,152: counted by transformers 5.23 on the meta device (DESIGN.md section 3)
    assert Arch.from_config(NANO_12B_V2).param_counts()["total"] == 12_310_001_152


@pytest.mark.parametrize("names", [
    ["mamba", "mlp", "mamba", "attention", "mlp", "mamba"],  # transformers < 5.13
    ["linear_attention", "mlp", "linear_attention", "full_attention", "mlp", "linear_attention"],  # >= 5.13
])
def test_transformers5_form(tmp_path, names):
    cfg = tiny_config()
    del cfg["hybrid_override_pattern"]
    cfg["layers_block_type"] = names
    text = json.dumps(cfg | {"time_step_limit": [0.0, {"__float__": "Infinity"}]})
    arch = Arch.from_file(write(tmp_path, text))
    assert arch.layer_pattern == "M-M*-M"
    assert arch.time_step_limit == (0.0, math.inf)


def test_written_config_is_legacy_form_and_round_trips():
    cfg = tiny_config()
    del cfg["hybrid_override_pattern"]
    cfg["layers_block_type"] = ["linear_attention", "full_attention", "mlp"]
    out = Arch.from_config(cfg).to_config()
    assert out["hybrid_override_pattern"] == "M*-" and out["num_hidden_layers"] == 3
    assert "layers_block_type" not in out
    assert Arch.from_config(json.loads(json.dumps(out))) == Arch.from_config(cfg)


def test_counts_match_transformers_numel():
    """Parameter counts from the config alone equal what transformers allocates."""
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    for pattern in ["M-M*-M", "MM", "*-"]:
        cfg = tiny_config(hybrid_override_pattern=pattern)
        with torch.device("meta"):
            hf = NemotronHForCausalLM(NemotronHConfig(**cfg))
        assert Arch.from_config(cfg).param_counts()["total"] == sum(p.numel() for p in hf.parameters())


def test_every_violation_reported_at_once():
    bad = tiny_config(
        hybrid_override_pattern="M-X*", num_hidden_layers=7, mamba_num_heads=7, n_groups=2,
        num_attention_heads=5, num_key_value_heads=2, hidden_size=0,
    )
    with pytest.raises(ConfigError) as e:
        Arch.from_config(bad, source="cfg.json")
    text = str(e.value)
    for needle in ["'X'", "num_hidden_layers is 7", "hidden_size must be an integer in 1..",
                   "mamba_num_heads (7) is not a multiple of n_groups (2)",
                   "num_attention_heads (5) is not a multiple of num_key_value_heads (2)", "cfg.json"]:
        assert needle in text, needle


def test_unknown_block_type_name():
    cfg = tiny_config()
    del cfg["hybrid_override_pattern"]
    cfg["layers_block_type"] = ["mamba", "sliding_attention"]
    with pytest.raises(ConfigError, match="layers_block_type\\[1\\] is 'sliding_attention'"):
        Arch.from_config(cfg)


def test_block_configs_give_per_layer_sizes():
    cfg = tiny_config(hybrid_override_pattern="M-M-", block_configs=[
        {"block_type": "mamba", "mamba_num_heads": 4}, {"block_type": "mlp", "intermediate_size": 16},
        {"block_type": "mamba"}, {"block_type": "mlp"},
    ])
    arch = Arch.from_config(cfg)
    assert [layer.mamba_num_heads for layer in arch.layers if layer.kind == "mamba"] == [4, 8]
    assert [layer.intermediate_size for layer in arch.layers if layer.kind == "mlp"] == [16, 48]
    assert not arch.is_homogeneous()
    assert Arch.from_config(arch.to_config()).layers == arch.layers


def test_not_json(tmp_path):
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_config(write(tmp_path, "{nope"))
