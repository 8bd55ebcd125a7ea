"""The remote code for heterogeneous checkpoints, against our reference model on the same weights.

Oracle: ``elastic.slicer.nn.model`` builds every layer at its own size from ``Arch``; transformers builds the
same checkpoint through ``slicer/remote_code`` with ``trust_remote_code=True``. Both must load
every tensor at its own shape and compute the same logits.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from elastic.slicer.formats.arch import Arch
from elastic.slicer.nn.model import build_model, generate, load_model, save_model
from elastic.slicer.remote_code import FILES, puzzle_config

from conftest import assert_same_logits, randomize_, tiny_config

transformers = pytest.importorskip("transformers")


def _m(heads, dim=6):
    return {"block_type": "mamba", "mamba_num_heads": heads, "mamba_head_dim": dim}


def _a(heads, kv):
    return {"block_type": "attention", "num_attention_heads": heads, "num_key_value_heads": kv}


def _f(width):
    return {"block_type": "mlp", "intermediate_size": width}


# (id, pattern, block_configs): Mamba heads are multiples of n_groups (2); head_dim is global
CASES = [
    ("mixed", "M-*M-*M", [_m(4), _f(96), _a(2, 2), _m(8, 3), _f(40), _a(4, 1), _m(2, 5)]),
    ("mamba_only", "MMM", [_m(2), _m(6, 4), _m(4)]),
    ("no_mamba", "*-*-", [_a(4, 2), _f(24), _a(2, 1), _f(64)]),
]


def write_puzzle_checkpoint(path, pattern, blocks, seed=0):
    """Our random model written as a remote-code checkpoint; returns our model loaded back from it."""
    cfg = tiny_config(hybrid_override_pattern=pattern)
    if blocks is not None:
        cfg["block_configs"] = blocks
    model = build_model(Arch.from_config(cfg), seed=seed)
    randomize_(model, seed)
    save_model(model, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(puzzle_config(config), indent=2))
    for f in FILES:
        shutil.copy(f, path / f.name)
    return load_model(path)


def load_hf(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=True, output_loading_info=True, dtype=torch.float32
    )
    assert type(model).__name__ == "NemotronHPuzzleForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    return model.eval()


@pytest.mark.parametrize("case,pattern,blocks", CASES, ids=[c[0] for c in CASES])
def test_heterogeneous_checkpoint_loads_and_matches(tmp_path, case, pattern, blocks):
    ours = write_puzzle_checkpoint(tmp_path / case, pattern, blocks)
    assert not ours.arch.is_homogeneous()
    hf = load_hf(tmp_path / case)
    # every mixer was built at its own size (a shape mix-up would also show as mismatched keys)
    for i, layer in enumerate(ours.arch.layers):
        cfg = hf.config.get_nemotron_h_config_for_layer(i)
        assert {f: getattr(cfg, f) for f in layer.sizes()} == layer.sizes()
    assert_same_logits(hf, ours)


def test_homogeneous_checkpoint_loads_through_the_same_code(tmp_path):
    ours = write_puzzle_checkpoint(tmp_path / "ckpt", "M-M*-M", None)
    assert "block_configs" not in json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert_same_logits(load_hf(tmp_path / "ckpt"), ours)


def test_generation_with_the_cache_matches_ours(tmp_path):
    """transformers' cache sizes each layer's state from its tensors: per-layer sizes decode too."""
    ours = write_puzzle_checkpoint(tmp_path / "ckpt", *CASES[0][1:])
    hf = load_hf(tmp_path / "ckpt")
    hf.set_attn_implementation("eager")  # reaches every layer: they share the model's config
    assert {b.mixer.config._attn_implementation for b in hf.backbone.layers} == {"eager"}
    prompt = torch.tensor([[5, 17, 42, 8, 3, 60, 11]])
    with torch.no_grad():
        got = hf.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert got.tolist() == generate(ours, prompt, max_new_tokens=10).tolist()


def test_save_pretrained_round_trips(tmp_path):
    """transformers writes layers_block_type + block_configs + auto_map and copies the two files."""
    ours = write_puzzle_checkpoint(tmp_path / "ckpt", *CASES[0][1:])
    load_hf(tmp_path / "ckpt").save_pretrained(tmp_path / "again")
    for f in FILES:
        assert (tmp_path / "again" / f.name).is_file()
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["model_type"] == "nemotron_h_puzzle" and saved["auto_map"] == puzzle_config({})["auto_map"]
    assert Arch.from_file(tmp_path / "again").layers == ours.arch.layers  # our reader takes this form too
    assert_same_logits(load_hf(tmp_path / "again"), ours)


def test_fresh_model_initialises_each_mamba_layer_at_its_size(tmp_path):
    """The stock _init_weights sizes A_log from the global mamba_num_heads; ours uses the layer's."""
    write_puzzle_checkpoint(tmp_path / "ckpt", "MMM", [_m(2), _m(6, 4), _m(4)])
    config = transformers.AutoConfig.from_pretrained(tmp_path / "ckpt", trust_remote_code=True)
    model = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    for layer, heads in zip(model.backbone.layers, (2, 6, 4)):
        torch.testing.assert_close(layer.mixer.A_log.data, torch.arange(1, heads + 1).float().log())


def test_layer_config_and_validation(tmp_path):
    from huggingface_hub.errors import StrictDataclassClassValidationError as Invalid

    from elastic.slicer.remote_code.configuration_nemotron_h_puzzle import NemotronHPuzzleConfig

    cfg = NemotronHPuzzleConfig(**tiny_config(hybrid_override_pattern="M-", block_configs=[_m(4), _f(96)]))
    layer = cfg.get_nemotron_h_config_for_layer(1)
    assert (layer.intermediate_size, cfg.intermediate_size) == (96, 48)  # a copy; the global is untouched
    assert cfg.get_nemotron_h_config_for_layer(0).mamba_num_heads == 4
    cfg.save_pretrained(tmp_path)
    assert NemotronHPuzzleConfig.from_pretrained(tmp_path).block_configs == [_m(4), _f(96)]
    both = r"block_configs\[0\]\.block_type is 'mlp'.*block_configs\[1\]\.intermediate_size"  # all problems at once
    with pytest.raises(Invalid, match=both):
        NemotronHPuzzleConfig(**tiny_config(hybrid_override_pattern="M-", block_configs=[_f(9), _f(0)]))
    with pytest.raises(Invalid, match="1 entries for 2 layers"):
        NemotronHPuzzleConfig(**tiny_config(hybrid_override_pattern="M-", block_configs=[_m(4)]))


def test_puzzle_config_copies_and_imports_no_torch():
    src = {"model_type": "nemotron_h", "block_configs": [_f(8)], "architectures": ["NemotronHForCausalLM"]}
    out = puzzle_config(src)
    assert src["model_type"] == "nemotron_h" and out["block_configs"] is not src["block_configs"]
    assert out["architectures"] == ["NemotronHPuzzleForCausalLM"]
    assert {f.name for f in FILES} == {v.split(".")[0] + ".py" for v in out["auto_map"].values()}
    code = "import sys, elastic.slicer.remote_code; assert not {'torch', 'transformers'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
