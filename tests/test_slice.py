"""Slicing: the sliced child computes what the nested model computes inside its parent."""

import errno
import json
import shutil

import pytest
import torch

from elastic.slicer.storage import writer as checkpoint_mod
from elastic.slicer import slice as slice_mod
from elastic.slicer.storage.reader import Checkpoint
from elastic.slicer.errors import CheckpointError, ConfigError, ElasticError
from elastic.slicer.nn.masked import masked_forward
from elastic.slicer.nn.model import generate, load_model
from elastic.slicer.slice import slice_checkpoint
from elastic.slicer.formats.spec import SliceSpec

from conftest import make_hf_checkpoint
from masked_oracle import masked_logits

PARENT = dict(hybrid_override_pattern="M-M*-M*-M", n_groups=2, mamba_num_heads=8, mamba_head_dim=6,
              num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, hidden_size=32)
SPECS = {  # id: (parent overrides, spec)
    "homogeneous": ({}, {"hidden_size": 24, "layers": [
        *({"index": i, "mamba_num_heads": 4, "mamba_head_dim": 4} for i in (0, 2, 5, 8)),
        *({"index": i, "num_attention_heads": 2} for i in (3, 6)),
        *({"index": i, "intermediate_size": 32} for i in (1, 4, 7))]}),
    "heterogeneous": ({}, {"hidden_size": 32, "layers": [
        {"index": 0, "mamba_num_heads": 6, "mamba_head_dim": 5}, {"index": 2, "mamba_num_heads": 2},
        {"index": 3, "num_attention_heads": 2}, {"index": 1, "intermediate_size": 40},
        {"index": 4, "intermediate_size": 16}]}),
    "puzzle": ({}, {"hidden_size": 28, "layers": [  # one Mamba and attention size, per-layer MLP widths
        *({"index": i, "mamba_num_heads": 6} for i in (0, 2, 5, 8)),
        {"index": 1, "intermediate_size": 40}, {"index": 4, "intermediate_size": 16}]}),
    "dropped_layers": ({}, {"hidden_size": 20, "layers": [
        {"index": 0, "keep": False}, {"index": 6, "keep": False}, {"index": 7, "keep": False},
        {"index": 2, "mamba_num_heads": 4}]}),
    "four_groups": (dict(n_groups=4, mamba_num_heads=8), {"hidden_size": 28, "layers": [
        *({"index": i, "mamba_num_heads": 4, "mamba_head_dim": 3} for i in (0, 2, 5, 8))]}),
}


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    out = {}
    for over, _ in SPECS.values():
        key = json.dumps(over, sort_keys=True)
        if key not in out:
            path = tmp_path_factory.mktemp("parent") / "ckpt"
            make_hf_checkpoint(path, seed=7, max_shard_size="30KB", **{**PARENT, **over})
            out[key] = path
    return {name: out[json.dumps(over, sort_keys=True)] for name, (over, _) in SPECS.items()}


@pytest.mark.parametrize("name", list(SPECS))
def test_sliced_child_equals_masked_parent(parents, tmp_path, name):
    src = parents[name]
    parent = load_model(src)
    spec = SliceSpec.from_json(SPECS[name][1], parent.arch)
    result = slice_checkpoint(src, tmp_path / "child", spec=spec)
    child = load_model(tmp_path / "child")
    assert result.parameters == sum(p.numel() for p in child.parameters())
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = child(ids)
        oracle = masked_logits(parent, spec, ids)
        narrowed = masked_forward(parent, spec, ids)
    assert oracle.abs().max() > 1.0
    torch.testing.assert_close(got, oracle, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(narrowed, got, rtol=1e-5, atol=1e-5)
    # same greedy tokens: the child's cached decoding vs the oracle recomputed from scratch
    prompt = ids[:1, :5]
    tokens = prompt
    for _ in range(8):
        tokens = torch.cat([tokens, masked_logits(parent, spec, tokens)[:, -1:].argmax(-1)], dim=1)
    assert generate(child, prompt, max_new_tokens=8).tolist() == tokens.tolist()


def test_homogeneous_slice_loads_in_transformers(parents, tmp_path):
    from transformers import NemotronHForCausalLM

    src = parents["homogeneous"]
    spec = SliceSpec.from_json(SPECS["homogeneous"][1], load_model(src).arch)
    slice_checkpoint(src, tmp_path / "child", spec=spec)
    cfg = json.loads((tmp_path / "child" / "config.json").read_text())
    assert cfg["model_type"] == "nemotron_h" and "block_configs" not in cfg
    assert cfg["hybrid_override_pattern"] == "M-M*-M*-M" and cfg["num_hidden_layers"] == 9
    assert not any(k.startswith("moe_") for k in cfg)
    hf, info = NemotronHForCausalLM.from_pretrained(tmp_path / "child", output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.arange(11)[None] % 97
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, use_cache=False).logits, load_model(tmp_path / "child")(ids),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,form,vllm", [("puzzle", "nemotron_h_puzzle", True),
                                             ("heterogeneous", "nemotron_h_elastic", False)])
def test_per_layer_slice_loads_with_remote_code(parents, tmp_path, name, form, vllm):
    from transformers import AutoModelForCausalLM

    src = parents[name]
    spec = SliceSpec.from_json(SPECS[name][1], load_model(src).arch)
    result = slice_checkpoint(src, tmp_path / "child", spec=spec)
    assert json.loads((tmp_path / "child" / "config.json").read_text())["model_type"] == form
    runtimes = result.manifest["runtimes"]
    assert runtimes["vllm"]["loads"] is vllm and not runtimes["sglang"]["loads"] and not runtimes["llama.cpp converter"]["loads"]
    assert "trust_remote_code=True" in runtimes["transformers"]["how"]
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "child", trust_remote_code=True,
                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.arange(11)[None] % 97
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, use_cache=False).logits, load_model(tmp_path / "child")(ids),
                                   rtol=1e-5, atol=1e-5)


def test_shared_dimension_routes_one_size_for_all_its_layers(parents):
    """A shared dimension has one router row; its choice reaches every layer, and a resolved spec
    that gives its layers different sizes is refused."""
    from elastic.slicer.formats.elastic_format import ElasticConfig, route, spec_from_choices, synthetic_router

    arch = load_model(parents["puzzle"]).arch
    data = {"format": "nemotron-elastic", "version": 1,
            "budgets": [{"name": "full", "target_parameters": arch.param_counts()["total"]},
                        {"name": "small", "target_parameters": 1}],
            "search_space": [{"dimension": "mamba_num_heads", "choices": [8, 6], "layers": [0, 2, 5, 8], "shared": True},
                             {"dimension": "intermediate_size", "choices": [48, 40, 16], "layers": [1, 4, 7]}],
            "resolved": {"full": SliceSpec.full(arch).to_json(arch), "small": SPECS["puzzle"][1] | {"hidden_size": 32}}}
    ec = ElasticConfig.from_json(data, arch)
    assert ec.to_json()["search_space"][0]["shared"] is True and ec.to_json()["router"]["outputs"]["mamba_num_heads"] == [1, 2]
    picks = route(synthetic_router(ec, arch), ec, "small")
    assert picks["mamba_num_heads"] == [6] and len(picks["intermediate_size"]) == 3
    spec = SliceSpec.from_json(spec_from_choices(picks, ec, arch), arch)
    assert [spec.layers[i].mamba_num_heads for i in (0, 2, 5, 8)] == [6] * 4
    assert spec.child_arch(arch).config_form() == "nemotron_h_puzzle"
    bad = json.loads(json.dumps(data))
    bad["resolved"]["small"]["layers"][0]["mamba_num_heads"] = 8
    with pytest.raises(ConfigError) as e:
        ElasticConfig.from_json(bad, arch)
    assert any("shared by layers [0, 2, 5, 8]" in p for p in e.value.problems)
    bad = json.loads(json.dumps(data))
    bad["search_space"][0]["shared"] = "yes"
    with pytest.raises(ConfigError, match="invalid elastic config"):
        ElasticConfig.from_json(bad, arch)


def test_demo_budgets_slice_to_their_size(tmp_path):
    from elastic.slicer.planning.describe import DEMO_CHECKPOINT

    parent = load_model(DEMO_CHECKPOINT)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    for budget in ("100%", "75%", "50%"):
        r = slice_checkpoint(DEMO_CHECKPOINT, tmp_path / budget, budget=budget)
        spec = SliceSpec.from_json(r.manifest["spec"], parent.arch)
        with torch.no_grad():
            torch.testing.assert_close(load_model(tmp_path / budget)(ids), masked_logits(parent, spec, ids),
                                       rtol=1e-5, atol=1e-5)
    assert r.manifest["spec_source"] == "router"


def test_router_and_resolved_choices_agree(tmp_path):
    from elastic.slicer.planning.describe import DEMO_CHECKPOINT

    shutil.copytree(DEMO_CHECKPOINT, tmp_path / "ckpt")
    with_router = slice_checkpoint(tmp_path / "ckpt", tmp_path / "a", budget="50%").manifest
    (tmp_path / "ckpt" / "router.safetensors").unlink()
    without = slice_checkpoint(tmp_path / "ckpt", tmp_path / "b", budget="50%").manifest
    assert without["spec_source"] == "elastic_config.json"
    assert with_router["spec"] == without["spec"] and with_router["parameters"] == without["parameters"]


def test_same_inputs_give_byte_identical_outputs(parents, tmp_path):
    spec = SliceSpec.from_json(SPECS["dropped_layers"][1], load_model(parents["dropped_layers"]).arch)
    for name in ("a", "b"):
        slice_checkpoint(parents["dropped_layers"], tmp_path / name, spec=spec, max_shard_bytes=20_000)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "model.safetensors.index.json" in files
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_manifest_hashes_and_dtype_cast(parents, tmp_path):
    import hashlib

    spec = SliceSpec.from_json(SPECS["homogeneous"][1], load_model(parents["homogeneous"]).arch)
    r = slice_checkpoint(parents["homogeneous"], tmp_path / "c", spec=spec, dtype="fp16")
    m = json.loads((tmp_path / "c" / "slice_manifest.json").read_text())
    assert m == json.loads(json.dumps(r.manifest))
    for shard in m["shards"]:
        assert hashlib.sha256((tmp_path / "c" / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
    ckpt = Checkpoint.open(tmp_path / "c")
    assert {t.dtype for t in ckpt.tensors.values()} == {"F16"} and ckpt.config["dtype"] == "float16"
    assert m["parameters"]["total"] == r.parameters


# ---- bad input: a clear error and nothing half-written ----------------------------------------


def leftovers(tmp_path, keep=("src", "ckpt")):
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in keep)


def test_budget_on_a_dense_checkpoint(hf_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="not an elastic checkpoint") as e:
        slice_checkpoint(hf_ckpt[0], tmp_path / "out", budget="6B")
    assert e.value.hint.setting == "spec"
    assert leftovers(tmp_path) == []


def test_unknown_budget_lists_the_budgets(tmp_path):
    from elastic.slicer.planning.describe import DEMO_CHECKPOINT

    with pytest.raises(ConfigError, match="unknown budget '6B'; this checkpoint has: 100%, 75%, 50%"):
        slice_checkpoint(DEMO_CHECKPOINT, tmp_path / "out", budget="6B")


def test_invalid_spec_reports_everything(hf_ckpt, tmp_path):
    (tmp_path / "spec.json").write_text(json.dumps({"hidden_size": 64, "layers": [
        {"index": 0, "mamba_num_heads": 3}, {"index": 1, "intermediate_size": 999}, {"index": 42, "keep": False},
        {"index": 3, "intermediate_size": 8}]}))
    with pytest.raises(ConfigError) as e:
        slice_checkpoint(hf_ckpt[0], tmp_path / "out", spec=tmp_path / "spec.json")
    text = str(e.value)
    for needle in ("spec.json", "hidden_size must be an integer in 1..32", "not a multiple of n_groups",
                   "intermediate_size must be an integer in 1..48", "unknown layer index 42",
                   "layer 3 is attention: intermediate_size do not apply"):
        assert needle in text, needle
    assert leftovers(tmp_path) == ["spec.json"]


def test_existing_output_is_kept(hf_ckpt, tmp_path):
    from elastic.slicer.storage.outputs import OutputError

    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    spec = SliceSpec.full(load_model(hf_ckpt[0]).arch)
    with pytest.raises(OutputError, match="already exists"):
        slice_checkpoint(hf_ckpt[0], out, spec=spec)
    with pytest.raises(OutputError, match="not written by elastic"):
        slice_checkpoint(hf_ckpt[0], out, spec=spec, force=True)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    (out / "mine.txt").unlink()
    slice_checkpoint(hf_ckpt[0], out, spec=spec, force=True)  # empty: replaced
    first = (out / "model.safetensors").read_bytes()
    slice_checkpoint(hf_ckpt[0], out, spec=spec, force=True)  # elastic's own output: replaced
    assert (out / "model.safetensors").read_bytes() == first


def test_source_truncated_mid_run(parents, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(parents["homogeneous"], src)
    ckpt = Checkpoint.open(src)  # validated while intact...
    victim = ckpt.weight_files[-1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # ...then cut short
    with pytest.raises(CheckpointError, match=f"{victim.name}: truncated while reading"):
        slice_checkpoint(ckpt, tmp_path / "out", spec=SliceSpec.full(ckpt.arch))
    assert leftovers(tmp_path) == []


def test_disk_full(hf_ckpt, tmp_path, monkeypatch):
    real_open = open

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            self.n += len(data)
            if self.n > 5000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr(checkpoint_mod, "open", lambda p, mode="r", *a, **k: Full(real_open(p, mode, *a, **k))
                        if "w" in mode else real_open(p, mode, *a, **k), raising=False)
    with pytest.raises(ElasticError, match="no space left on the device"):
        slice_checkpoint(hf_ckpt[0], tmp_path / "out", spec=SliceSpec.full(load_model(hf_ckpt[0]).arch))
    assert leftovers(tmp_path) == []


def test_ctrl_c_leaves_nothing(hf_ckpt, tmp_path, monkeypatch):
    real = slice_mod._blocks

    def interrupted(ckpt, rule, dtype):
        yield from real(ckpt, rule, dtype)
        raise KeyboardInterrupt

    monkeypatch.setattr(slice_mod, "_blocks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        slice_checkpoint(hf_ckpt[0], tmp_path / "out", spec=SliceSpec.full(load_model(hf_ckpt[0]).arch))
    assert leftovers(tmp_path) == []
