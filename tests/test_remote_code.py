"""The modeling code for checkpoints with per-layer sizes, against our reference model on the same weights.

Oracle: ``elastic.slicer.nn.model`` builds every layer at its own size from ``Arch``; transformers builds the
same checkpoint through ``slicer/remote_code`` with ``trust_remote_code=True`` (NVIDIA's Puzzle form and
elastic's extension) or through its own class (stock form). Both must load every tensor at its own shape
and compute the same logits.
"""

import json
import subprocess
import sys

import pytest
import torch

from elastic.slicer.formats.arch import FORM_EXTENSION, FORM_PUZZLE, FORM_STOCK, Arch
from elastic.slicer.nn.model import build_model, generate, load_model, save_model
from elastic.slicer.remote_code import FILES, identity

from conftest import assert_same_logits, randomize_, tiny_config

transformers = pytest.importorskip("transformers")


def _m(heads, dim=6):
    return {"block_type": "mamba", "mamba_num_heads": heads, "mamba_head_dim": dim}


def _a(heads, kv):
    return {"block_type": "attention", "num_attention_heads": heads, "num_key_value_heads": kv}


def _f(width):
    return {"block_type": "mlp", "intermediate_size": width}


# (id, pattern, block_configs, form): Mamba heads are multiples of n_groups (2)
CASES = [
    ("puzzle", "M-*M-*M", [_m(8), _f(96), _a(4, 2), _m(8), _f(40), _a(4, 2), _m(8)], FORM_PUZZLE),
    ("mixed", "M-*M-*M", [_m(4), _f(96), _a(2, 2), _m(8, 3), _f(40), _a(4, 1), _m(2, 5)], FORM_EXTENSION),
    ("mamba_only", "MMM", [_m(2), _m(6, 4), _m(4)], FORM_EXTENSION),
    ("no_mamba", "*-*-", [_a(4, 2), _f(24), _a(2, 1), _f(64)], FORM_EXTENSION),
]
HF_CLASS = {FORM_STOCK: "NemotronHForCausalLM", FORM_PUZZLE: "NemotronHPuzzleForCausalLM",
            FORM_EXTENSION: "NemotronHElasticForCausalLM"}


def write_checkpoint(path, pattern, blocks, seed=0):
    """Our random model written by save_model (which picks the config form and ships the code);
    returns our model loaded back from it."""
    cfg = tiny_config(hybrid_override_pattern=pattern)
    if blocks is not None:
        cfg["block_configs"] = blocks
    model = build_model(Arch.from_config(cfg), seed=seed)
    randomize_(model, seed)
    save_model(model, path)
    return load_model(path)


def load_hf(path, form=None):
    form = form or json.loads((path / "config.json").read_text())["model_type"]
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=form != FORM_STOCK, output_loading_info=True, dtype=torch.float32
    )
    assert type(model).__name__ == HF_CLASS[form]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    return model.eval()


@pytest.mark.parametrize("case,pattern,blocks,form", CASES, ids=[c[0] for c in CASES])
def test_checkpoint_with_per_layer_sizes_loads_and_matches(tmp_path, case, pattern, blocks, form):
    ours = write_checkpoint(tmp_path / case, pattern, blocks)
    assert ours.arch.config_form() == form
    assert {f.name for f in FILES} <= {p.name for p in (tmp_path / case).iterdir()}
    hf = load_hf(tmp_path / case, form)
    # every mixer was built at its own size (a shape mix-up would also show as mismatched keys)
    for i, layer in enumerate(ours.arch.layers):
        cfg = hf.config.get_nemotron_h_config_for_layer(i)
        assert {f: getattr(cfg, f) for f in layer.sizes()} == layer.sizes()
    assert_same_logits(hf, ours)


def test_puzzle_config_is_nvidias_form(tmp_path):
    """Per-layer MLP widths only: block entries carry only what NVIDIA's Puzzle dataclasses take
    (docs/runtime-facts.md section 1), the per-layer field leaves the top level, Mamba and
    attention sizes are global, and no MTP head is announced."""
    write_checkpoint(tmp_path / "p", *CASES[0][1:3])
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert cfg["model_type"] == "nemotron_h_puzzle" and cfg["architectures"] == ["NemotronHPuzzleForCausalLM"]
    assert cfg["auto_map"] == identity(FORM_PUZZLE)["auto_map"]
    assert cfg["block_configs"] == [{"block_type": "mamba"}, _f(96), {"block_type": "attention"}, {"block_type": "mamba"},
                                    _f(40), {"block_type": "attention"}, {"block_type": "mamba"}]
    assert "intermediate_size" not in cfg
    assert (cfg["mamba_num_heads"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (8, 4, 2)
    assert (cfg["mtp_block_configs"], cfg["num_nextn_predict_layers"]) == ([], 0)


def test_stock_form_needs_no_code(tmp_path):
    ours = write_checkpoint(tmp_path / "ckpt", "M-M*-M", None)
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["model_type"] == "nemotron_h" and "block_configs" not in cfg and "auto_map" not in cfg
    assert not any((tmp_path / "ckpt" / f.name).exists() for f in FILES)
    assert_same_logits(load_hf(tmp_path / "ckpt"), ours)


def test_nvidia_puzzle_entries_are_read(tmp_path):
    """A config as NVIDIA writes it (optional null sliding_window, ssm_state_size per Mamba block,
    no top-level intermediate_size) reads the same in our Arch and in the shipped config class."""
    ours = write_checkpoint(tmp_path / "p", *CASES[0][1:3])
    path = tmp_path / "p" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["block_configs"] = [{**b, "ssm_state_size": 5} if b["block_type"] == "mamba" else
                            {**b, "sliding_window": None} if b["block_type"] == "attention" else b
                            for b in cfg["block_configs"]]
    path.write_text(json.dumps(cfg))
    assert Arch.from_file(path).layers == ours.arch.layers
    assert_same_logits(load_hf(tmp_path / "p"), ours)
    cfg["block_configs"][0]["ssm_state_size"] = 7
    cfg["block_configs"][2]["sliding_window"] = 128
    path.write_text(json.dumps(cfg))
    from elastic.slicer.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        Arch.from_file(path)
    assert any("ssm_state_size is 7" in p for p in e.value.problems)
    assert any("sliding_window is 128" in p for p in e.value.problems)


def test_generation_with_the_cache_matches_ours(tmp_path):
    """transformers' cache sizes each layer's state from its tensors: per-layer sizes decode too."""
    ours = write_checkpoint(tmp_path / "ckpt", *CASES[1][1:3])
    hf = load_hf(tmp_path / "ckpt")
    hf.set_attn_implementation("eager")  # reaches every layer: they share the model's config
    assert {b.mixer.config._attn_implementation for b in hf.backbone.layers} == {"eager"}
    prompt = torch.tensor([[5, 17, 42, 8, 3, 60, 11]])
    with torch.no_grad():
        got = hf.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert got.tolist() == generate(ours, prompt, max_new_tokens=10).tolist()


def test_save_pretrained_round_trips(tmp_path):
    """transformers writes layers_block_type + block_configs + auto_map and copies the two files."""
    ours = write_checkpoint(tmp_path / "ckpt", *CASES[1][1:3])
    load_hf(tmp_path / "ckpt").save_pretrained(tmp_path / "again")
    for f in FILES:
        assert (tmp_path / "again" / f.name).is_file()
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["model_type"] == FORM_EXTENSION and saved["auto_map"] == identity(FORM_EXTENSION)["auto_map"]
    assert Arch.from_file(tmp_path / "again").layers == ours.arch.layers  # our reader takes this form too
    assert_same_logits(load_hf(tmp_path / "again"), ours)


def test_fresh_model_initialises_each_mamba_layer_at_its_size(tmp_path):
    """The stock _init_weights sizes A_log from the global mamba_num_heads; ours uses the layer's."""
    write_checkpoint(tmp_path / "ckpt", "MMM", [_m(2), _m(6, 4), _m(4)])
    config = transformers.AutoConfig.from_pretrained(tmp_path / "ckpt", trust_remote_code=True)
    model = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    for layer, heads in zip(model.backbone.layers, (2, 6, 4)):
        torch.testing.assert_close(layer.mixer.A_log.data, torch.arange(1, heads + 1).float().log())


def test_layer_config_and_validation(tmp_path):
    from huggingface_hub.errors import StrictDataclassClassValidationError as Invalid

    from elastic.slicer.remote_code.configuration_nemotron_h_puzzle import (NemotronHElasticConfig,
                                                                            NemotronHPuzzleConfig)

    cfg = NemotronHElasticConfig(**tiny_config(hybrid_override_pattern="M-", block_configs=[_m(4), _f(96)]))
    layer = cfg.get_nemotron_h_config_for_layer(1)
    assert (layer.intermediate_size, cfg.intermediate_size) == (96, 48)  # a copy; the global is untouched
    assert cfg.get_nemotron_h_config_for_layer(0).mamba_num_heads == 4
    cfg.save_pretrained(tmp_path)
    assert NemotronHElasticConfig.from_pretrained(tmp_path).block_configs == [_m(4), _f(96)]
    both = r"block_configs\[0\]\.block_type is 'mlp'.*block_configs\[1\]\.intermediate_size"  # all problems at once
    with pytest.raises(Invalid, match=both):
        NemotronHElasticConfig(**tiny_config(hybrid_override_pattern="M-", block_configs=[_f(9), _f(0)]))
    with pytest.raises(Invalid, match="1 entries for 2 layers"):
        NemotronHElasticConfig(**tiny_config(hybrid_override_pattern="M-", block_configs=[_m(4)]))
    # NVIDIA's form takes per-layer MLP widths only; the extension's Mamba sizes are refused with the reason
    puzzle = NemotronHPuzzleConfig(**tiny_config(hybrid_override_pattern="M-", block_configs=[{"block_type": "mamba"},
                                                                                              _f(96)]))
    assert puzzle.get_nemotron_h_config_for_layer(1).intermediate_size == 96
    with pytest.raises(Invalid, match="model_type nemotron_h_elastic"):
        NemotronHPuzzleConfig(**tiny_config(hybrid_override_pattern="M-", block_configs=[_m(4), _f(96)]))
    with pytest.raises(Invalid, match=r"\(mlp\) needs intermediate_size"):
        NemotronHPuzzleConfig(**tiny_config(hybrid_override_pattern="M-", block_configs=[{"block_type": "mamba"},
                                                                                         {"block_type": "mlp"}]))


def test_remote_code_package_imports_no_torch():
    assert identity(FORM_STOCK) == {"model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"]}
    for form in (FORM_PUZZLE, FORM_EXTENSION):
        assert {f.name for f in FILES} == {v.split(".")[0] + ".py" for v in identity(form)["auto_map"].values()}
    code = "import sys, elastic.slicer.remote_code; assert not {'torch', 'transformers'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
